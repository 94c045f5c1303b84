"""An outgoing-webhook payload of Rocket.Chat (event "Message Sent") as a contract CloudEvent.

Rocket.Chat's trigger handler posts token, bot, channel_id, channel_name, message_id,
timestamp, user_id, user_name, text, siteUrl, alias, isEdited and tmid (and, for some events,
the raw ``message``). It re-sends an edited message under the same ``message_id`` with
``isEdited``: that becomes ``chat.rocket.message.updated`` with an id of its own, derived
from the edit's content, so a retried delivery of the same edit keeps its id (the worker
drops the repeat) while a different edit gets a new one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker import constants
from worker.errors import DecodeError
from worker.rocketchat.names import imessage_from_raw


class WebhookPayload(BaseModel):
    """The fields of an outgoing webhook's post that the conversion reads."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    token: str
    bot: Any = False
    channel_id: str = Field(min_length=1)
    channel_name: str | None = None
    message_id: str = Field(min_length=1)
    timestamp: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    user_name: str | None = None
    text: str | None = None
    site_url: str = Field(alias="siteUrl", min_length=1)
    alias: str | None = None
    is_edited: bool = Field(False, alias="isEdited")
    tmid: str | None = None
    message: dict[str, Any] | None = None


def parse(body: bytes) -> WebhookPayload:
    """The payload in a webhook's body.

    Raises:
        DecodeError: not JSON, or a field the conversion needs is missing or of the wrong type.

    """
    try:
        return WebhookPayload.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"body is not JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise DecodeError(f"{where}: {'is required' if first['type'] == 'missing' else first['msg']}") from None


def to_cloudevent(payload: WebhookPayload) -> dict[str, Any]:
    """The structured CloudEvent of ``payload``, its message in Apps-Engine IMessage names."""
    message = _message(payload)
    if payload.is_edited:
        digest = hashlib.sha256(orjson.dumps(message, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        kind, event_id = constants.POST_MESSAGE_UPDATED, f"{payload.message_id}:updated:{digest}"
    else:
        kind, event_id = constants.POST_MESSAGE_SENT, payload.message_id
    return {
        "specversion": constants.CLOUDEVENTS_SPECVERSION,
        "type": kind,
        "source": payload.site_url,
        "id": event_id,
        "datacontenttype": "application/json",
        "data": message,
    }


def _message(payload: WebhookPayload) -> dict[str, Any]:
    room = {"id": payload.channel_id, "slugifiedName": payload.channel_name} if payload.channel_name else {"id": payload.channel_id}
    if payload.message is not None:
        # The raw document is richer (attachments, customFields, editedAt): converted, not guessed.
        return imessage_from_raw(payload.message, room)
    sender: dict[str, Any] = {"id": payload.user_id, "type": "bot" if payload.bot else "user"}
    if payload.user_name:
        sender["username"] = payload.user_name
    message: dict[str, Any] = {"id": payload.message_id, "room": room, "sender": sender, "createdAt": payload.timestamp}
    for name, value in (("text", payload.text), ("threadId", payload.tmid), ("alias", payload.alias)):
        if value is not None:
            message[name] = value
    return message
