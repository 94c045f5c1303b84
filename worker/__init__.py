"""rc-apps-worker: Rocket.Chat-style app handlers on Kafka events, over shared persistence.

The names below are the whole public API for handler authors; nothing else is promised.
A handler subclasses :class:`App`; its methods receive a :class:`Message` and the accessors
typed by the ``I*`` Protocols. ``worker.testing`` is what its tests use.

Each name is imported where it lives on first use (PEP 562), so importing ``worker`` (as
every ``rc-worker`` command does, ``--help`` too) costs nothing until a handler needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.apps.accessors import (
        IHttp,
        IMessageRead,
        IModify,
        IModifyDeleter,
        INotifier,
        IPersistence,
        IPersistenceRead,
        IRead,
        IRoomRead,
        IUserRead,
        MessageBuilder,
        Record,
    )
    from worker.apps.contract import App
    from worker.apps.http import HttpResponse
    from worker.errors import DeadLetterNow, HttpError, RocketChatUnavailable, WorkerError
    from worker.events import Message, MessageDeleteContext, Room, User
    from worker.persistence.associations import Association, AssociationModel

__all__ = [
    "App",
    "Association",
    "AssociationModel",
    "DeadLetterNow",
    "HttpError",
    "HttpResponse",
    "IHttp",
    "IMessageRead",
    "IModify",
    "IModifyDeleter",
    "INotifier",
    "IPersistence",
    "IPersistenceRead",
    "IRead",
    "IRoomRead",
    "IUserRead",
    "Message",
    "MessageBuilder",
    "MessageDeleteContext",
    "Record",
    "RocketChatUnavailable",
    "Room",
    "User",
    "WorkerError",
]

# The names again, as data: the imports above are for type checkers only (mypy must see
# the real classes, or a handler's `class X(App)` subclasses Any), and a runtime table
# cannot be read back from them. Kept twice on purpose: tests/test_public_api.py checks
# the table resolves every name in __all__, and mypy checks the imports.
_MODULES = {
    "worker.apps.contract": ("App",),
    "worker.apps.accessors": (
        "IHttp",
        "IMessageRead",
        "IModify",
        "IModifyDeleter",
        "INotifier",
        "IPersistence",
        "IPersistenceRead",
        "IRead",
        "IRoomRead",
        "IUserRead",
        "MessageBuilder",
        "Record",
    ),
    "worker.apps.http": ("HttpResponse",),
    "worker.errors": ("DeadLetterNow", "HttpError", "RocketChatUnavailable", "WorkerError"),
    "worker.events": ("Message", "MessageDeleteContext", "Room", "User"),
    "worker.persistence.associations": ("Association", "AssociationModel"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
