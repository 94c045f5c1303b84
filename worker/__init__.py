"""rc-apps-worker: Rocket.Chat-style app handlers on Kafka events, over shared persistence.

The names below are the whole public API for handler authors; nothing else is promised.
"""

from worker.apps import App, IHttp, IModify, IPersistence, IPersistenceRead, IRead, Record
from worker.errors import DeadLetterNow, WorkerError
from worker.events import Message, Room, User
from worker.persistence.associations import Association, AssociationModel

__all__ = [
    "App",
    "Association",
    "AssociationModel",
    "DeadLetterNow",
    "IHttp",
    "IModify",
    "IPersistence",
    "IPersistenceRead",
    "IRead",
    "Message",
    "Record",
    "Room",
    "User",
    "WorkerError",
]
