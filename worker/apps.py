"""The handler contract: the App base class and the accessors a handler is handed.

This is the Apps-Engine's ``IPostMessageSent`` in Python: ``check_post_message_sent(message,
read, http)`` and ``execute_post_message_sent(message, read, http, persistence, modify)``.
The accessors are Protocols, so a plugin depends on nothing but ``worker``'s public names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import structlog
from pydantic import BaseModel

from worker.events import Message
from worker.persistence.associations import Association


@dataclass(frozen=True, slots=True)
class Record:
    """A persisted record in its versioned form: what ``read_record*`` returns."""

    id: str
    data: dict[str, Any]
    version: int
    associations: tuple[Association, ...]


class IPersistenceRead(Protocol):
    """Reads of this app's records (``read.get_persistence_reader()``)."""

    async def read(self, record_id: str) -> dict[str, Any] | None:
        """The data of the record with this id, or None."""
        ...

    async def read_by_association(self, association: Association) -> list[dict[str, Any]]:
        """The data of every record having ``association``."""
        ...

    async def read_by_associations(self, associations: Sequence[Association]) -> list[dict[str, Any]]:
        """The data of every record having all of ``associations``."""
        ...

    async def read_record(self, record_id: str) -> Record | None:
        """The record with this id, with its version and associations, or None."""
        ...

    async def read_records_by_association(self, association: Association) -> list[Record]:
        """Every record having ``association``, versioned."""
        ...

    async def read_records_by_associations(self, associations: Sequence[Association]) -> list[Record]:
        """Every record having all of ``associations``, versioned."""
        ...


class IPersistence(Protocol):
    """Writes to this app's records; staged, and committed only if nothing read has changed."""

    async def create(self, data: Mapping[str, Any]) -> str:
        """Create a record; returns its id."""
        ...

    async def create_with_association(self, data: Mapping[str, Any], association: Association) -> str:
        """Create a record with one association; returns its id."""
        ...

    async def create_with_associations(self, data: Mapping[str, Any], associations: Sequence[Association]) -> str:
        """Create a record with several associations; returns its id."""
        ...

    async def update(self, record_id: str, data: Mapping[str, Any], upsert: bool = False) -> str:
        """Replace the data of a record (create it with this id, with upsert); returns the id."""
        ...

    async def update_by_association(self, association: Association, data: Mapping[str, Any], upsert: bool = False) -> list[str]:
        """Replace the data of every record having ``association``; returns their ids."""
        ...

    async def update_by_associations(self, associations: Sequence[Association], data: Mapping[str, Any], upsert: bool = False) -> list[str]:
        """Replace the data of every record having all ``associations``; returns their ids."""
        ...

    async def remove(self, record_id: str) -> list[dict[str, Any]]:
        """Remove a record; returns the data removed (empty if there was none)."""
        ...

    async def remove_by_association(self, association: Association) -> list[dict[str, Any]]:
        """Remove every record having ``association``; returns the data removed."""
        ...

    async def remove_by_associations(self, associations: Sequence[Association]) -> list[dict[str, Any]]:
        """Remove every record having all ``associations``; returns the data removed."""
        ...


class ISettingRead(Protocol):
    """This app's settings from ``handlers.settings.<app id>`` in config.yaml."""

    def get_value_by_id(self, setting_id: str) -> Any:
        """The value of one setting (its default when not configured)."""
        ...


class IEnvironmentRead(Protocol):
    """The app's environment (``read.get_environment_reader()``)."""

    def get_settings(self) -> ISettingRead:
        """This app's settings."""
        ...


class IRead(Protocol):
    """Everything a handler may read."""

    def get_persistence_reader(self) -> IPersistenceRead:
        """Reads of this app's persisted records."""
        ...

    def get_environment_reader(self) -> IEnvironmentRead:
        """This app's settings."""
        ...


class IHttp(Protocol):
    """Outgoing HTTP; see ``worker.http``. A handler rerun after a conflict may call it again."""

    async def get(self, url: str, **options: Any) -> Any:
        """GET ``url``."""
        ...

    async def post(self, url: str, **options: Any) -> Any:
        """POST to ``url``."""
        ...


class IModify(Protocol):
    """Changes to the chat, staged as commands and published only after commit."""

    def get_updater(self) -> Any:
        """Start changing an existing message."""
        ...

    def get_creator(self) -> Any:
        """Start creating a new message."""
        ...


class App:
    """Base class of every handler plugin; the runtime sets ``id``, ``settings`` and ``log``.

    Subclasses define ``execute_post_message_sent`` and may define ``check_post_message_sent``.
    A subclass takes no constructor arguments of its own. State belongs in ``persistence``,
    never in attributes: several workers run the same app at once.
    """

    #: The settings the app accepts: a pydantic model whose fields give types, defaults and
    #: which are required; ``handlers.settings.<app id>`` is validated against it at start-up.
    settings_model: ClassVar[type[BaseModel] | None] = None

    id: str = ""
    settings: Mapping[str, Any] = {}
    log: Any = structlog.get_logger("app")

    def bind(self, app_id: str, settings: Mapping[str, Any]) -> None:
        """Called once by the runtime before the first event."""
        self.id = app_id
        self.settings = settings
        self.log = structlog.get_logger("app").bind(app=app_id)

    async def check_post_message_sent(self, message: Message, read: IRead, http: IHttp) -> bool:
        """Return False to skip ``execute_post_message_sent`` for this message."""
        return True

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        """Handle one sent message; raise to have it retried, then dead-lettered."""
        raise NotImplementedError(f"{type(self).__name__} must define execute_post_message_sent")


class SettingsReader:
    """``read.get_environment_reader().get_settings()``: validated settings of one app."""

    __slots__ = ("_settings",)

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._settings = settings

    def get_value_by_id(self, setting_id: str) -> Any:
        """The value of one setting; KeyError names the settings the app has."""
        try:
            return self._settings[setting_id]
        except KeyError:
            known = ", ".join(sorted(self._settings)) or "none"
            raise KeyError(f"no setting {setting_id!r}; this app has: {known}") from None


class EnvironmentReader:
    """``read.get_environment_reader()``."""

    __slots__ = ("_settings",)

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._settings = SettingsReader(settings)

    def get_settings(self) -> SettingsReader:
        """This app's settings."""
        return self._settings


class Read:
    """The ``read`` accessor: persistence reads and the environment of one app."""

    __slots__ = ("_environment", "_persistence")

    def __init__(self, persistence: IPersistenceRead, settings: Mapping[str, Any]) -> None:
        self._persistence = persistence
        self._environment = EnvironmentReader(settings)

    def get_persistence_reader(self) -> IPersistenceRead:
        """Reads of this app's records."""
        return self._persistence

    def get_environment_reader(self) -> EnvironmentReader:
        """This app's settings."""
        return self._environment
