"""rc-apps-worker: Rocket.Chat-style app handlers on Kafka events, over shared persistence.

The names below are the whole public API for handler authors; nothing else is promised.
A handler subclasses :class:`App`; its methods receive a :class:`Message` and the accessors
typed by the ``I*`` Protocols. ``worker.testing`` is what its tests use.
"""

from worker.apps.contract import App, IHttp, IModify, IPersistence, IPersistenceRead, IRead, MessageBuilder, Record
from worker.apps.http import HttpResponse
from worker.errors import DeadLetterNow, HttpError, WorkerError
from worker.events import Message, Room, User
from worker.persistence.associations import Association, AssociationModel

__all__ = [
    "App",
    "Association",
    "AssociationModel",
    "DeadLetterNow",
    "HttpError",
    "HttpResponse",
    "IHttp",
    "IModify",
    "IPersistence",
    "IPersistenceRead",
    "IRead",
    "Message",
    "MessageBuilder",
    "Record",
    "Room",
    "User",
    "WorkerError",
]
