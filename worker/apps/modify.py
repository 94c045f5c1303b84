"""The ``modify`` accessor: changes to the chat, staged as commands in the unit of work's outbox.

As in the Apps-Engine, ``modify.get_updater().message(id, editor)`` starts a builder and
``finish(builder)`` submits it; the creator, notifier and deleter work alike. Nothing is sent then: the command, a CloudEvent, is staged in
the unit of work and written to the outbox in the same transaction as the app's records and
the event's processed marker; the worker publishes it to ``kafka.commands_topic`` after the
commit. A run that is repeated (after a conflict or an error) stages the same commands with
the same ids, and only the run that commits leaves them in the outbox.
"""

from __future__ import annotations

from typing import Any

import orjson

from worker import constants
from worker.apps.accessors import MessageBuilder
from worker.apps.getter import Getter
from worker.errors import CommandTooLargeError
from worker.events import Event, Message, Room, User
from worker.persistence.records import OutboxMessage
from worker.persistence.unit import UnitOfWork
from worker.persistence.values import compact

#: CloudEvents types of the commands, in the contract's reverse-DNS style.
UPDATE_MESSAGE = "chat.rocket.message.update"
CREATE_MESSAGE = "chat.rocket.message.create"
DELETE_MESSAGE = "chat.rocket.message.delete"
NOTIFY_USER = "chat.rocket.user.notify"
NOTIFY_ROOM = "chat.rocket.room.notify"
COMMAND_SOURCE_PREFIX = "rc-apps-worker/"


def command_id(event: Event, app_id: str, number: int) -> str:
    """The id of the ``number``-th command (from 0) that ``app_id`` stages for ``event``.

    It depends only on the event and the command's position, so a repeated run stages the
    same ids, and a consumer of the commands topic can drop a repeat by id.
    """
    return f"{event.source}/{event.id}/{app_id}/{number}"


class _Stager:
    """Stages commands of one app's run on one event; the updater and creator share a counter."""

    def __init__(self, unit: UnitOfWork, app_id: str, event: Event, topic: str, counter: list[int]) -> None:
        self._unit, self._app_id, self._event, self._topic = unit, app_id, event, topic
        self._counter = counter

    def _stage(self, kind: str, data: dict[str, Any], key: str | None) -> str:
        number = self._counter[0]
        self._counter[0] += 1
        identifier = command_id(self._event, self._app_id, number)
        envelope = {
            "specversion": constants.CLOUDEVENTS_SPECVERSION,
            "type": kind,
            "source": COMMAND_SOURCE_PREFIX + self._app_id,
            "id": identifier,
            # No "time": a repeated run must stage byte-for-byte the same command.
            "subject": self._event.id,
            "datacontenttype": "application/json",
            "data": data,
        }
        headers = (("content-type", constants.STRUCTURED_CONTENT_TYPE.encode()),)
        value = compact(orjson.dumps(envelope))
        encoded_key = key.encode() if key else None
        size = len(value) + len(encoded_key or b"")
        if size > constants.MAX_COMMAND_BYTES:
            # Refused here, as this handler's error, rather than by Kafka once committed, where
            # it would hold up every command and dead letter of the partition after it.
            raise CommandTooLargeError(
                f"{kind} command {identifier} of app {self._app_id} is {size} bytes, over the limit of "
                f"{constants.MAX_COMMAND_BYTES}; stage less (shorter text, fewer or smaller attachments and custom fields)"
            )
        self._unit.publish(OutboxMessage(self._app_id, self._topic, encoded_key, value, headers))
        return identifier


class MessageUpdater(_Stager):
    """``modify.get_updater()``: stages ``chat.rocket.message.update`` commands."""

    def message(self, message_id: str, editor: User | str | None = None) -> MessageBuilder:
        """Start changing ``message_id``; ``editor`` (a User or id) is recorded as who changed it."""
        if not message_id:
            raise ValueError("message_id must be a non-empty message id, e.g. message.id")
        return MessageBuilder(message_id=message_id, editor=editor if editor is None or isinstance(editor, str) else editor.id)

    async def finish(self, builder: MessageBuilder) -> str:
        """Stage the update; returns the command id.

        Raises:
            ValueError: the builder did not come from :meth:`message`.
            CommandTooLargeError: the command is over ``constants.MAX_COMMAND_BYTES``.

        """
        if builder.message_id is None:
            raise ValueError("an update needs a message id: start it with modify.get_updater().message(id)")
        data: dict[str, Any] = {"messageId": builder.message_id, "editor": builder.editor}
        if builder.text is not None:
            data["text"] = builder.text
        data.update(_extras(builder))
        data["customFields"] = builder.custom_fields
        data["replaceCustomFields"] = builder.replace_custom_fields
        # Keyed by room, like the events, so one room's commands keep their order.
        room = self._event.message.room.id if self._event.message else None
        return self._stage(UPDATE_MESSAGE, data, room)


class MessageCreator(_Stager):
    """``modify.get_creator()``: stages ``chat.rocket.message.create`` commands."""

    def start_message(self) -> MessageBuilder:
        """Start a new message; set at least its room with ``set_room``."""
        return MessageBuilder()

    async def finish(self, builder: MessageBuilder) -> str:
        """Stage the new message; returns the command id.

        Raises:
            ValueError: the builder has no room, or came from the updater.
            CommandTooLargeError: the command is over ``constants.MAX_COMMAND_BYTES``.

        """
        if builder.message_id is not None:
            raise ValueError("this builder changes an existing message: finish it with modify.get_updater().finish(builder)")
        if builder.room_id is None:
            raise ValueError("a new message needs a room: call set_room(room) on the builder")
        data: dict[str, Any] = {
            "roomId": builder.room_id,
            "text": builder.text or "",
            "sender": builder.sender_id,
            "customFields": builder.custom_fields,
        }
        if builder.thread_id is not None:
            data["threadId"] = builder.thread_id
        data.update(_extras(builder))
        return self._stage(CREATE_MESSAGE, data, builder.room_id)


def _extras(builder: MessageBuilder) -> dict[str, Any]:
    """The builder's attachments and blocks, where it has them: every command that carries a message sends them alike."""
    extras: dict[str, Any] = {}
    if builder.attachments:
        extras["attachments"] = builder.attachments
    if builder.blocks is not None:
        extras["blocks"] = builder.blocks
    return extras


def _content(builder: MessageBuilder) -> dict[str, Any]:
    """What a notification shows: text, attachments, blocks (the builder's room and sender do not apply)."""
    return {"text": builder.text or "", **_extras(builder)}


class Notifier(_Stager):
    """``modify.get_notifier()``: stages ``chat.rocket.user.notify`` and ``chat.rocket.room.notify`` commands."""

    def get_message_builder(self) -> MessageBuilder:
        """A builder for the notification's text, attachments and blocks."""
        return MessageBuilder()

    async def notify_user(self, user: User | str, message: MessageBuilder) -> str:
        """Stage a notification of one user (a User or its id); returns the command id."""
        data: dict[str, Any] = {"userId": user if isinstance(user, str) else user.id, **_content(message)}
        if isinstance(user, User) and user.username:
            data["username"] = user.username
        if message.room_id is not None:
            data["roomId"] = message.room_id
        return self._stage(NOTIFY_USER, data, self._event_room())

    async def notify_room(self, room: Room | str, message: MessageBuilder) -> str:
        """Stage a notification of every member of a room (a Room or its id); returns the command id."""
        room_id = room if isinstance(room, str) else room.id
        return self._stage(NOTIFY_ROOM, {"roomId": room_id, **_content(message)}, room_id)

    def _event_room(self) -> str | None:
        return self._event.message.room.id if self._event.message else None


class MessageDeleter(_Stager):
    """``modify.get_deleter()``: stages ``chat.rocket.message.delete`` commands."""

    async def delete_message(self, message: Message | str, user: User | str | None = None) -> str:
        """Stage the deletion of a message as ``user`` (who deletes it; None: the worker's user); returns the command id.

        Raises:
            ValueError: ``message`` is an id other than the event's own message: pass the
                Message (``await read.get_message_reader().get_by_id(id)``), whose room the
                deletion needs.

        """
        if isinstance(message, str):
            own = self._event.message
            if own is None or own.id != message:
                raise ValueError(
                    f"delete_message({message!r}): pass the Message (await read.get_message_reader().get_by_id(id)); "
                    "deleting needs its room, known without a read only for the event's own message"
                )
            message = own
        data = {"messageId": message.id, "roomId": message.room.id, "user": user if user is None or isinstance(user, str) else user.id}
        return self._stage(DELETE_MESSAGE, data, message.room.id)


class Modify:
    """The ``modify`` accessor of one handler run on one event."""

    __slots__ = ("_app_id", "_counter", "_creator", "_deleter", "_event", "_notifier", "_topic", "_unit", "_updater")

    def __init__(self, unit: UnitOfWork, app_id: str, event: Event, topic: str) -> None:
        self._unit, self._app_id, self._event, self._topic = unit, app_id, event, topic
        self._counter = [0]  # one numbering for every command of the run: ids follow staging order
        # Made on first use (see Getter): most handler runs stage nothing.
        self._updater: MessageUpdater | None = None
        self._creator: MessageCreator | None = None
        self._notifier: Notifier | None = None
        self._deleter: MessageDeleter | None = None

    def _build(self, attribute: str) -> _Stager:
        made = _STAGERS[attribute](self._unit, self._app_id, self._event, self._topic, self._counter)
        setattr(self, attribute, made)
        return made

    get_notifier = Getter[Notifier]("_notifier", "Notify users and rooms.")
    get_deleter = Getter[MessageDeleter]("_deleter", "Delete messages.")
    get_updater = Getter[MessageUpdater]("_updater", "Change existing messages.")
    get_creator = Getter[MessageCreator]("_creator", "Create new messages.")


_STAGERS: dict[str, type[_Stager]] = {
    "_updater": MessageUpdater,
    "_creator": MessageCreator,
    "_notifier": Notifier,
    "_deleter": MessageDeleter,
}
