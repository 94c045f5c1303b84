"""The handler contract: the App base class and the accessors a handler is handed.

This is the Apps-Engine's ``IPostMessageSent`` in Python: ``check_post_message_sent(message,
read, http)`` and ``execute_post_message_sent(message, read, http, persistence, modify)``.
The accessors are Protocols, so a plugin depends on nothing but ``worker``'s public names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import structlog
from pydantic import BaseModel

from worker.apps.http import HttpResponse
from worker.events import Message, Room, User
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
    """Outgoing HTTP (``worker.apps.http.Http``); errors are raised as ``worker.HttpError``.

    A handler run again after a version conflict or an error calls it again: use it for
    reads and idempotent calls; stage changes to the chat through ``modify`` instead.
    """

    async def get(self, url: str, **options: Any) -> HttpResponse:
        """GET ``url``; options: headers, params, json, content, timeout."""
        ...

    async def post(self, url: str, **options: Any) -> HttpResponse:
        """POST to ``url``."""
        ...

    async def put(self, url: str, **options: Any) -> HttpResponse:
        """PUT to ``url``."""
        ...

    async def delete(self, url: str, **options: Any) -> HttpResponse:
        """DELETE ``url``."""
        ...

    async def patch(self, url: str, **options: Any) -> HttpResponse:
        """PATCH ``url``."""
        ...


@dataclass(slots=True)
class MessageBuilder:
    """A message to create, or the changes to one message (the Apps-Engine's IMessageBuilder).

    Get one from ``modify.get_updater().message(id)`` or ``modify.get_creator().start_message()``,
    chain its setters, then hand it to that accessor's ``finish``.
    """

    message_id: str | None = None
    editor: str | None = None
    room_id: str | None = None
    text: str | None = None
    sender_id: str | None = None
    thread_id: str | None = None
    custom_fields: dict[str, Any] = field(default_factory=dict)
    replace_custom_fields: bool = False
    attachments: list[dict[str, Any]] = field(default_factory=list)

    def set_room(self, room: Room | str) -> MessageBuilder:
        """The room of a new message (a Room or its id)."""
        self.room_id = room if isinstance(room, str) else room.id
        return self

    def set_sender(self, user: User | str) -> MessageBuilder:
        """Who sends a new message (a User or its id)."""
        self.sender_id = user if isinstance(user, str) else user.id
        return self

    def set_text(self, text: str) -> MessageBuilder:
        """The message text."""
        self.text = text
        return self

    def set_thread_id(self, thread_id: str) -> MessageBuilder:
        """Post a new message into the thread of this message id."""
        self.thread_id = thread_id
        return self

    def add_attachment(self, attachment: Mapping[str, Any]) -> MessageBuilder:
        """Add one attachment (a JSON object)."""
        self.attachments.append(dict(attachment))
        return self

    def add_custom_field(self, key: str, value: Any) -> MessageBuilder:
        """Set one custom field; the message's other custom fields are kept."""
        self.custom_fields[key] = value
        return self

    def set_custom_fields(self, fields: Mapping[str, Any]) -> MessageBuilder:
        """Replace all the message's custom fields with ``fields``."""
        self.custom_fields = dict(fields)
        self.replace_custom_fields = True
        return self


class IMessageUpdater(Protocol):
    """``modify.get_updater()``: changes to existing messages."""

    def message(self, message_id: str, editor: User | str | None = None) -> MessageBuilder:
        """Start changing ``message_id``; ``editor`` (a User or id) is recorded as who changed it."""
        ...

    async def finish(self, builder: MessageBuilder) -> str:
        """Stage the change; it is published after the unit of work commits. Returns the command id."""
        ...


class IMessageCreator(Protocol):
    """``modify.get_creator()``: new messages."""

    def start_message(self) -> MessageBuilder:
        """Start a new message; set at least its room."""
        ...

    async def finish(self, builder: MessageBuilder) -> str:
        """Stage the new message; it is published after the unit of work commits. Returns the command id."""
        ...


class IModify(Protocol):
    """Changes to the chat, staged as commands (an outbox) and published only after commit."""

    def get_updater(self) -> IMessageUpdater:
        """Change existing messages."""
        ...

    def get_creator(self) -> IMessageCreator:
        """Create new messages."""
        ...


class App:
    """Base class of every handler plugin (the Apps-Engine's ``IPostMessageSent``).

    A plugin subclasses it, defines ``execute_post_message_sent`` (and, optionally,
    ``check_post_message_sent`` and a ``settings_model``) and registers the class under the
    entry-point group ``rc_worker.handlers``; the entry point's name is the app id. The
    runtime creates it with no arguments, then gives it its id, settings and logger through
    :meth:`bind`. Example::

        class Greeter(App):
            async def execute_post_message_sent(self, message, read, http, persistence, modify):
                self.log.info("message_seen", room=message.room.id)

    Several workers run the same app at once, and a run may be repeated (after a version
    conflict, an error, or a crash): keep state in ``persistence``, never in attributes.

    Attributes:
        handles_own_messages: True to see messages sent by ``rocketchat.app_user_id`` too; by
            default they skip the app, so what the app posts does not trigger it again.
        settings_model: the settings the app accepts, as a pydantic model whose fields give
            types, defaults and which are required; ``handlers.settings.<app id>`` is
            validated against it at start-up. None means the app takes no settings.
        id: the app id (the entry point's name), set by the runtime.
        settings: the validated settings, defaults filled in, read-only.
        log: a structlog logger bound to ``app=<id>``.

    """

    settings_model: ClassVar[type[BaseModel] | None] = None
    handles_own_messages: ClassVar[bool] = False

    id: str = ""
    settings: Mapping[str, Any] = MappingProxyType({})
    log: Any = structlog.get_logger("app")

    def bind(self, app_id: str, settings: Mapping[str, Any]) -> None:
        """Called once by the runtime, before the first event: sets ``id``, ``settings``, ``log``."""
        self.id = app_id
        self.settings = MappingProxyType(dict(settings))
        self.log = structlog.get_logger("app").bind(app=app_id)

    async def check_post_message_sent(self, message: Message, read: IRead, http: IHttp) -> bool:
        """Return False to skip ``execute_post_message_sent`` for this message (the default runs it)."""
        return True

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        """Handle one sent message.

        Args:
            message: the message that was sent.
            read: reads of this app's records and settings.
            http: outgoing HTTP; may be called again when the run is repeated.
            persistence: writes to this app's records, committed only if nothing read has changed.
            modify: changes to the chat, published once, after commit.

        Raises:
            Exception: any error has the run retried with backoff, then the event dead-lettered
                for this app (``DeadLetterNow`` skips the retries).

        """
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
