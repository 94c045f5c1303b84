"""The accessors a handler is handed, as Protocols: persistence, the readers, http, modify.

They mirror the Apps-Engine's ``IPersistence``, ``IRead``, ``IHttp`` and ``IModify`` in Python
names, so a plugin depends on nothing but ``worker``'s public names; the runtime's classes
that implement them live beside this module (persistence.py, readers.py, http.py, modify.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
        """The worker's own Rocket.Chat user (``rocketchat.app_user_id``, else ``rocketchat.user_id``), or None if Rocket.Chat has none.

        ``rocketchat.app_user_id`` alone, with no connection, gives a User of that id (type
        ``app``, no username). With neither, it raises ``RocketChatUnavailable``.
        """
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
