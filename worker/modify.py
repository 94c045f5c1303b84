"""The ``modify`` accessor: changes to the chat, staged as commands in the outbox.

As in the Apps-Engine, ``modify.get_updater().message(id, editor)`` starts a builder and
``finish(builder)`` submits it. Nothing is sent then: the command is staged in the unit of
work and published to the commands topic only after the unit commits, so a handler that is
run again after a conflict never sends twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.events import Event
from worker.persistence.unit import OutboxMessage, UnitOfWork

UPDATE_MESSAGE = "chat.rocket.message.update"
CREATE_MESSAGE = "chat.rocket.message.create"


@dataclass(slots=True)
class MessageBuilder:
    """A message to create or the changes to one message; chain its setters, then finish it."""

    message_id: str | None = None
    editor: str | None = None
    room_id: str | None = None
    text: str | None = None
    sender_id: str | None = None
    custom_fields: dict[str, Any] = field(default_factory=dict)
    replace_custom_fields: bool = False

    def set_room(self, room_id: str) -> MessageBuilder:
        """The room of a new message."""
        self.room_id = room_id
        return self

    def set_text(self, text: str) -> MessageBuilder:
        """The message text."""
        self.text = text
        return self

    def set_sender(self, user_id: str) -> MessageBuilder:
        """Who sends a new message."""
        self.sender_id = user_id
        return self

    def add_custom_field(self, key: str, value: Any) -> MessageBuilder:
        """Set one custom field, keeping the others."""
        self.custom_fields[key] = value
        return self

    def set_custom_fields(self, fields: dict[str, Any]) -> MessageBuilder:
        """Replace all custom fields."""
        self.custom_fields = dict(fields)
        self.replace_custom_fields = True
        return self


class _Stager:
    def __init__(self, unit: UnitOfWork, app_id: str, event: Event, topic: str, counter: list[int]) -> None:
        self._unit, self._app_id, self._event, self._topic = unit, app_id, event, topic
        self._counter = counter  # shared by the updater and creator of one handler run

    def _stage(self, kind: str, data: dict[str, Any], key: str | None) -> str:
        # Deterministic ids: the same handler run, retried, stages the same command id, and
        # the outbox row id lets readers drop any repeat.
        number = self._counter[0]
        self._counter[0] += 1
        command_id = f"{self._event.source}/{self._event.id}/{self._app_id}/{number}"
        envelope = {
            "specversion": "1.0",
            "type": kind,
            "source": f"rc-apps-worker/{self._app_id}",
            "id": command_id,
            "subject": self._event.id,
            "datacontenttype": "application/json",
            "data": data,
        }
        headers = (("content-type", b"application/cloudevents+json"),)
        self._unit.publish(OutboxMessage(self._app_id, self._topic, key.encode() if key else None, orjson.dumps(envelope), headers))
        return command_id


class MessageUpdater(_Stager):
    """``modify.get_updater()``."""

    def message(self, message_id: str, editor: str | None = None) -> MessageBuilder:
        """Start changing ``message_id``; ``editor`` is the user id recorded as the editor."""
        return MessageBuilder(message_id=message_id, editor=editor)

    async def finish(self, builder: MessageBuilder) -> str:
        """Stage the update; returns the command id."""
        if builder.message_id is None:
            raise ValueError("an update needs a message id: use modify.get_updater().message(id)")
        data: dict[str, Any] = {"messageId": builder.message_id, "editor": builder.editor}
        if builder.text is not None:
            data["text"] = builder.text
        data["customFields"] = builder.custom_fields
        data["replaceCustomFields"] = builder.replace_custom_fields
        room = self._event.message.room.id if self._event.message else None
        return self._stage(UPDATE_MESSAGE, data, room)


class MessageCreator(_Stager):
    """``modify.get_creator()``."""

    def start_message(self) -> MessageBuilder:
        """Start a new message."""
        return MessageBuilder()

    async def finish(self, builder: MessageBuilder) -> str:
        """Stage the creation; returns the command id."""
        if builder.room_id is None:
            raise ValueError("a new message needs a room: call set_room(room_id)")
        data = {"roomId": builder.room_id, "text": builder.text or "", "sender": builder.sender_id, "customFields": builder.custom_fields}
        return self._stage(CREATE_MESSAGE, data, builder.room_id)


class Modify:
    """The ``modify`` accessor for one handler run."""

    __slots__ = ("_creator", "_updater")

    def __init__(self, unit: UnitOfWork, app_id: str, event: Event, topic: str) -> None:
        counter = [0]
        self._updater = MessageUpdater(unit, app_id, event, topic, counter)
        self._creator = MessageCreator(unit, app_id, event, topic, counter)

    def get_updater(self) -> MessageUpdater:
        """Change existing messages."""
        return self._updater

    def get_creator(self) -> MessageCreator:
        """Create new messages."""
        return self._creator
