"""Rocket.Chat's own field names (``msg``, ``rid``, ``u``, ``ts``, ``t``, flat attachments) and the Apps-Engine's.

The contract speaks the Apps-Engine IMessage; raw documents are converted here, at the edge
(ingest on the way in, apply on the way out), so the worker never has to guess which it got.
"""

from __future__ import annotations

from typing import Any

# Apps-Engine IMessageAttachment nests title and author; the REST API's MessageAttachment is flat.
_NESTED = {
    "title": {"value": "title", "link": "title_link", "displayDownloadLink": "title_link_download"},
    "author": {"name": "author_name", "link": "author_link", "icon": "author_icon"},
}
_FLAT = {
    "imageUrl": "image_url",
    "audioUrl": "audio_url",
    "videoUrl": "video_url",
    "thumbnailUrl": "thumb_url",
    "timestampLink": "message_link",
    "timestamp": "ts",
}
_FLAT_BACK = {rest: apps for apps, rest in _FLAT.items()}
_NESTED_BACK = {rest: (outer, inner) for outer, names in _NESTED.items() for inner, rest in names.items()}


def rest_attachment(attachment: dict[str, Any]) -> dict[str, Any]:
    """An Apps-Engine attachment in the REST API's names; fields already in those names pass unchanged."""
    out: dict[str, Any] = {}
    for key, value in attachment.items():
        if key in _NESTED and isinstance(value, dict):
            out.update({_NESTED[key][k]: v for k, v in value.items() if k in _NESTED[key]})
        else:
            out[_FLAT.get(key, key)] = value
    return out


def apps_attachment(attachment: dict[str, Any]) -> dict[str, Any]:
    """A REST (raw) attachment in the Apps-Engine's names: title and author nested again."""
    out: dict[str, Any] = {}
    for key, value in attachment.items():
        if key in _NESTED_BACK:
            outer, inner = _NESTED_BACK[key]
            out.setdefault(outer, {})[inner] = value
        elif key == "title" and isinstance(value, str):
            out.setdefault("title", {})["value"] = value
        else:
            out[_FLAT_BACK.get(key, key)] = value
    return out


def imessage_from_raw(raw: dict[str, Any], room: dict[str, Any] | None = None) -> dict[str, Any]:
    """A raw Rocket.Chat message document (``_id``, ``rid``, ``msg``, ``u``, ``ts``...) as an Apps-Engine IMessage.

    ``room`` adds what the document does not carry (slugifiedName, type, displayName).
    Fields without an Apps-Engine name are kept under their own names.
    """
    rest = dict(raw)
    user = rest.pop("u", None) or {}
    message: dict[str, Any] = {
        "id": rest.pop("_id", None),
        "room": {"id": rest.pop("rid", None), **(room or {})},
        "sender": {"id": user.get("_id"), "username": user.get("username"), "name": user.get("name")},
        "text": rest.pop("msg", None),
        "createdAt": rest.pop("ts", None),
        "updatedAt": rest.pop("_updatedAt", None),
        "threadId": rest.pop("tmid", None),
        "type": rest.pop("t", None),
    }
    if rest.get("bot"):
        message["sender"]["type"] = "bot"
    edited_by = rest.pop("editedBy", None)
    if edited_by:
        message["editor"] = {"id": edited_by.get("_id"), "username": edited_by.get("username")}
    if "attachments" in rest:
        message["attachments"] = [apps_attachment(a) for a in rest.pop("attachments") or []]
    message.update(rest)  # editedAt, customFields, alias, blocks... have the same names in both
    message["sender"] = {k: v for k, v in message["sender"].items() if v is not None}
    return {k: v for k, v in message.items() if v is not None}
