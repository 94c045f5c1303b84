"""The handler contract: the App base class and the accessors a handler is handed.

This is the Apps-Engine's ``IPostMessageSent`` in Python: ``check_post_message_sent(message,
read, http)`` and ``execute_post_message_sent(message, read, http, persistence, modify)``.
The accessors are Protocols, so a plugin depends on nothing but ``worker``'s public names.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import structlog
from pydantic import BaseModel, ConfigDict

from worker.apps.http import HttpResponse
from worker.apps.readers import Directory
from worker.events import INTERFACES, Message, MessageDeleteContext, Room, User
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
        """The data of every record having ``association``, ordered by record id.

        The order is the same for every run and every worker; records created by ``create``
        have random ids, so sort by a field of your own where the order means something.
        """
        ...

    async def read_by_associations(self, associations: Sequence[Association]) -> list[dict[str, Any]]:
        """The data of every record having all of ``associations``, ordered by record id."""
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
        """Replace the data of a record; returns the id.

        The record keeps its associations. With ``upsert=True`` and no record of that id, a
        record is created under exactly that id with ``data`` and no associations (to create
        one with associations, use ``update_by_association(..., upsert=True)``). Without
        upsert, a missing record raises ``RecordNotFoundError``.
        """
        ...

    async def update_by_association(self, association: Association, data: Mapping[str, Any], upsert: bool = False) -> list[str]:
        """Replace the data of every record having ``association``; returns their ids.

        With ``upsert=True`` and no such record, one is created with ``data`` and the
        association, under a new random id.
        """
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


class IUserRead(Protocol):
    """``read.get_user_reader()``: Rocket.Chat users (the Apps-Engine's ``IUserRead``).

    Users the event carries (the sender) are answered from it; others through Rocket.Chat's
    REST API (``users.info``), cached for a few minutes. Without a ``rocketchat`` section
    those raise ``RocketChatUnavailable``.
    """

    async def get_app_user(self) -> User | None:
        """The worker's own Rocket.Chat user (``rocketchat.user_id``); None when no Rocket.Chat is configured."""
        ...

    async def get_by_id(self, user_id: str) -> User | None:
        """The user with this id, or None if Rocket.Chat has none."""
        ...

    async def get_by_username(self, username: str) -> User | None:
        """The user with this username, or None if Rocket.Chat has none."""
        ...


class IRoomRead(Protocol):
    """``read.get_room_reader()``: Rocket.Chat rooms (the Apps-Engine's ``IRoomRead``).

    The event's room is answered from it; other rooms and the members of any room through
    the REST API (``rooms.info``; ``channels.members``, ``groups.members``, ``im.members``).
    """

    async def get_by_id(self, room_id: str) -> Room | None:
        """The room with this id, or None."""
        ...

    async def get_by_name(self, name: str) -> Room | None:
        """The room with this name (its slugified name), or None."""
        ...

    async def get_members(self, room_id: str) -> list[User]:
        """The room's members (at most ``constants.MEMBERS_LIMIT``)."""
        ...


class IMessageRead(Protocol):
    """``read.get_message_reader()``: Rocket.Chat messages (the Apps-Engine's ``IMessageRead``)."""

    async def get_by_id(self, message_id: str) -> Message | None:
        """The message with this id (the event's own message without a REST call), or None."""
        ...


class IRead(Protocol):
    """Everything a handler may read."""

    def get_persistence_reader(self) -> IPersistenceRead:
        """Reads of this app's persisted records."""
        ...

    def get_environment_reader(self) -> IEnvironmentRead:
        """This app's settings."""
        ...

    def get_user_reader(self) -> IUserRead:
        """Rocket.Chat users, the app's own user included."""
        ...

    def get_room_reader(self) -> IRoomRead:
        """Rocket.Chat rooms and their members."""
        ...

    def get_message_reader(self) -> IMessageRead:
        """Rocket.Chat messages."""
        ...


class IHttp(Protocol):
    """Outgoing HTTP (``worker.apps.http.Http``); errors are raised as ``worker.HttpError``.

    A handler run again after a version conflict or an error calls it again: use it for
    reads and idempotent calls; stage changes to the chat through ``modify`` instead.
    """

    async def get(self, url: str, **options: Any) -> HttpResponse:
        """GET ``url``; options: headers, params, json (or data, the Apps-Engine's name), content, timeout."""
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
    blocks: list[dict[str, Any]] | None = None

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

    def set_blocks(self, blocks: Sequence[Mapping[str, Any]]) -> MessageBuilder:
        """Replace the message's blocks (UIKit layout blocks, as JSON objects)."""
        self.blocks = [dict(block) for block in blocks]
        return self

    def add_blocks(self, blocks: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> MessageBuilder:
        """Append one block or several to the message's blocks."""
        more = [blocks] if isinstance(blocks, Mapping) else list(blocks)
        self.blocks = [*(self.blocks or []), *(dict(block) for block in more)]
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


class INotifier(Protocol):
    """``modify.get_notifier()``: notifications (the Apps-Engine's ``INotifier``), staged as commands.

    Rocket.Chat's REST API has no ephemeral notification: the command's applier sends the
    closest thing it has, a message from the worker's user (see docs/writing-a-handler.md).
    """

    def get_message_builder(self) -> MessageBuilder:
        """A builder for the notification's text, attachments and blocks."""
        ...

    async def notify_user(self, user: User | str, message: MessageBuilder) -> str:
        """Notify one user (a User or its id); returns the command id."""
        ...

    async def notify_room(self, room: Room | str, message: MessageBuilder) -> str:
        """Notify every member of a room (a Room or its id); returns the command id."""
        ...


class IModifyDeleter(Protocol):
    """``modify.get_deleter()``: deletions (the Apps-Engine's ``IModifyDeleter``), staged as commands."""

    async def delete_message(self, message: Message | str, user: User | str | None = None) -> str:
        """Delete a message (a Message, or the id of the event's own message) as ``user``; returns the command id."""
        ...


class IModify(Protocol):
    """Changes to the chat, staged as commands (an outbox) and published only after commit."""

    def get_updater(self) -> IMessageUpdater:
        """Change existing messages."""
        ...

    def get_creator(self) -> IMessageCreator:
        """Create new messages."""
        ...

    def get_notifier(self) -> INotifier:
        """Notify users and rooms."""
        ...

    def get_deleter(self) -> IModifyDeleter:
        """Delete messages."""
        ...


class App:
    """Base class of every handler plugin (the Apps-Engine's ``IPostMessageSent``, ``IPostMessageUpdated``, ``IPostMessageDeleted``).

    A plugin subclasses it, defines ``execute_post_message_sent`` (or the ``_updated`` /
    ``_deleted`` one, or several; optionally the ``check_`` pair of each, and a
    ``settings_model``) and registers the class under the
    entry-point group ``rc_worker.handlers``; the entry point's name is the app id. The
    runtime creates it with no arguments, then gives it its id, settings and logger through
    :meth:`bind`. Example::

        class Greeter(App):
            async def execute_post_message_sent(self, message, read, http, persistence, modify):
                self.log.info("message_seen", room=message.room.id)

    Several workers run the same app at once, and a run may be repeated (after a version
    conflict, an error, or a crash): keep state in ``persistence``, never in attributes.

    An app sees the events whose ``execute_`` method it defines, and no other: its
    ``event_types`` are derived from them (set ``event_types`` to narrow them).

    Attributes:
        event_types: the CloudEvents types the app takes; None (the default) means those
            whose ``execute_`` method the class defines.
        handles_own_messages: True to see messages sent by ``rocketchat.app_user_id`` too; by
            default they skip the app, so what the app posts does not trigger it again.
        settings_model: the settings the app accepts, as a pydantic model whose fields give
            types, defaults and which are required; ``handlers.settings.<app id>`` is
            validated against it at start-up. None means the app takes no settings.
        id: the app id (the entry point's name), set by the runtime.
        settings: the validated settings: an instance of ``settings_model``, defaults filled
            in, read-only (``self.settings.limit``; declare ``settings: MySettings`` in the
            class body for typed access). ``self.settings["limit"]`` and
            ``dict(self.settings)`` work too. An app without a model gets an empty one.
        log: a structlog logger bound to ``app=<id>``.

    """

    settings_model: ClassVar[type[BaseModel] | None] = None
    event_types: ClassVar[frozenset[str] | None] = None
    handles_own_messages: ClassVar[bool] = False

    id: str = ""
    settings: Any = None
    log: Any = structlog.get_logger("app")

    def bind(self, app_id: str, settings: BaseModel | Mapping[str, Any]) -> None:
        """Called once by the runtime, before the first event: sets ``id``, ``settings``, ``log``.

        ``settings`` are the values already validated against ``settings_model`` (a model
        instance, or its fields by name); they are kept as a read-only instance of it.
        """
        self.id = app_id
        self.settings = frozen_settings(type(self).settings_model, settings)
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

    async def check_post_message_updated(self, message: Message, read: IRead, http: IHttp) -> bool:
        """Return False to skip ``execute_post_message_updated`` for this message (the default runs it)."""
        return True

    async def execute_post_message_updated(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        """Handle one edited message (CloudEvents type ``chat.rocket.message.updated``).

        Args:
            message: the message as it is after the edit.
            read: as for ``execute_post_message_sent``.
            http: as for ``execute_post_message_sent``.
            persistence: as for ``execute_post_message_sent``.
            modify: as for ``execute_post_message_sent``.

        """
        raise NotImplementedError(f"{type(self).__name__} must define execute_post_message_updated")

    async def check_post_message_deleted(self, message: Message, read: IRead, http: IHttp, context: MessageDeleteContext) -> bool:
        """Return False to skip ``execute_post_message_deleted`` for this message (the default runs it)."""
        return True

    async def execute_post_message_deleted(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify, context: MessageDeleteContext
    ) -> None:
        """Handle one deleted message (CloudEvents type ``chat.rocket.message.deleted``).

        Args:
            message: the message that was deleted.
            read: as for ``execute_post_message_sent``.
            http: as for ``execute_post_message_sent``.
            persistence: as for ``execute_post_message_sent``.
            modify: as for ``execute_post_message_sent``.
            context: the deleted message and who deleted it.

        """
        raise NotImplementedError(f"{type(self).__name__} must define execute_post_message_deleted")

    @classmethod
    def defined_event_types(cls) -> frozenset[str]:
        """The CloudEvents types whose ``execute_`` method this class defines."""
        return frozenset(
            kind for kind, name in INTERFACES.items() if getattr(cls, f"execute_{name}") is not getattr(App, f"execute_{name}")
        )

    @classmethod
    def takes(cls, event_type: str) -> bool:
        """Whether this app sees events of ``event_type``."""
        return event_type in (cls.event_types if cls.event_types is not None else cls.defined_event_types())


class _SettingsMapping:
    """Mapping access to a settings model (``settings["limit"]``, ``dict(settings)``), mixed into its frozen copy."""

    model_config = ConfigDict(frozen=True)

    def keys(self) -> list[str]:
        """The setting names (the model's fields, and extra keys where the model allows them)."""
        return [*type(self).model_fields, *(self.model_extra or {})]  # type: ignore[attr-defined]

    def __getitem__(self, name: str) -> Any:
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.keys()


class _NoSettings(BaseModel):
    """The settings of an app that declares no ``settings_model``: none."""


@functools.cache
def _frozen_model(model: type[BaseModel]) -> type[BaseModel]:
    # A subclass, so isinstance(app.settings, MySettings) holds and the fields validate as
    # declared; frozen, so no run can change what every other run reads.
    return type(model.__name__, (_SettingsMapping, model), {"__module__": model.__module__, "__doc__": model.__doc__})


def frozen_settings(model: type[BaseModel] | None, values: BaseModel | Mapping[str, Any]) -> BaseModel:
    """``values`` (validated against ``model``) as a read-only instance of ``model``."""
    given = values.model_dump() if isinstance(values, BaseModel) else dict(values)
    return _frozen_model(model or _NoSettings).model_validate(given)


class SettingsReader:
    """``read.get_environment_reader().get_settings()``: validated settings of one app."""

    __slots__ = ("_settings",)

    def __init__(self, settings: BaseModel | Mapping[str, Any]) -> None:
        # An app's frozen settings model has mapping access (keys, []); a plain mapping too.
        self._settings: Any = settings

    def get_value_by_id(self, setting_id: str) -> Any:
        """The value of one setting; KeyError names the settings the app has."""
        try:
            return self._settings[setting_id]
        except KeyError:
            known = ", ".join(sorted(self._settings.keys())) or "none"
            raise KeyError(f"no setting {setting_id!r}; this app has: {known}") from None


class EnvironmentReader:
    """``read.get_environment_reader()``."""

    __slots__ = ("_settings",)

    def __init__(self, settings: BaseModel | Mapping[str, Any]) -> None:
        self._settings = SettingsReader(settings)

    def get_settings(self) -> SettingsReader:
        """This app's settings."""
        return self._settings


class Read:
    """The ``read`` accessor: persistence reads, the environment, and Rocket.Chat's users, rooms and messages."""

    __slots__ = ("_environment", "_messages", "_persistence", "_rooms", "_users")

    def __init__(self, persistence: IPersistenceRead, settings: BaseModel | Mapping[str, Any], chat: ChatReaders | None = None) -> None:
        self._persistence = persistence
        self._environment = EnvironmentReader(settings)
        if chat is None:
            chat = Directory().for_message(None)
        self._users, self._rooms, self._messages = chat.users, chat.rooms, chat.messages

    def get_persistence_reader(self) -> IPersistenceRead:
        """Reads of this app's records."""
        return self._persistence

    def get_environment_reader(self) -> EnvironmentReader:
        """This app's settings."""
        return self._environment

    def get_user_reader(self) -> IUserRead:
        """Rocket.Chat users, the app's own user included."""
        return self._users

    def get_room_reader(self) -> IRoomRead:
        """Rocket.Chat rooms and their members."""
        return self._rooms

    def get_message_reader(self) -> IMessageRead:
        """Rocket.Chat messages."""
        return self._messages


class ChatReaders(Protocol):
    """The user, room and message readers of one handler run (``worker.apps.readers.Readers``)."""

    @property
    def users(self) -> IUserRead:
        """``read.get_user_reader()``."""
        ...

    @property
    def rooms(self) -> IRoomRead:
        """``read.get_room_reader()``."""
        ...

    @property
    def messages(self) -> IMessageRead:
        """``read.get_message_reader()``."""
        ...
