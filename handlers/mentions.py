"""mentions: tag messages that mention users, and keep each user's unread mentions per room.

The worked example of docs/writing-a-handler.md. For each message it:

- tags a message whose text mentions ``@username`` with ``customFields.mentions`` (the
  usernames, in order), through ``modify``: a command published once, after commit;
- adds the message to one record per mentioned user and room, associated with
  ``user:<username>``, ``room:<room id>`` and ``misc:unread-mentions``: one user's unread
  mentions are the records with their ``user:``, one room's those with its ``room:``, all of
  them those with ``misc:unread-mentions``;
- removes the sender's own record for the room: posting in a room means having read it.

Messages sent by the app user (the worker's own Rocket.Chat account) are skipped: the
worker's own notifications must not count as anyone's mentions. With no Rocket.Chat
configured (the default) the user reader cannot say who that is, and every message counts;
the runner's loop guard (``rocketchat.app_user_id``) drops the worker's own before any app.

Every write is read-modify-write through the unit of work, so repeated runs and concurrent
workers leave exactly the state one run in order leaves.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field

from worker import App, Association, AssociationModel, IHttp, IModify, IPersistence, IRead, Message, RocketChatUnavailable

UNREAD = Association(AssociationModel.MISC, "unread-mentions")
# Rocket.Chat usernames: letters, digits, dots, dashes, underscores. The lookbehind keeps
# e-mail addresses (bob@example.com) and "@@x" from counting as mentions.
MENTION = re.compile(r"(?<![\w@.])@([A-Za-z0-9_][A-Za-z0-9._-]*)")


class MentionSettings(BaseModel):
    """``handlers.settings.mentions``."""

    ignored: list[str] = Field(default_factory=lambda: ["all", "here"], description="mentions that name no user")
    max_per_message: int = Field(20, ge=1, le=1000, description="mentions after this many in one message are ignored")
    keep_message_ids: int = Field(50, ge=1, le=10_000, description="the latest unread message ids kept per user and room")
    tag_field: str = Field("mentions", min_length=1, description="the customFields key the usernames are written to")
    reset_on_post: bool = Field(True, description="a user who posts in a room has read their mentions there")


def mentioned_usernames(text: str, *, sender: str | None, ignored: list[str], limit: int) -> list[str]:
    """The usernames ``text`` mentions, first mention first, without the sender and ``ignored``."""
    skip = {name.lower() for name in ignored}
    found: list[str] = []
    for match in MENTION.finditer(text):
        name = match.group(1).rstrip(".")  # "thanks @bob." mentions bob
        if name and name.lower() not in skip and name != sender and name not in found:
            found.append(name)
    return found[:limit]


class Mentions(App):
    """Tags mentions with ``customFields.mentions`` and keeps unread mentions per user and room."""

    settings_model = MentionSettings

    async def check_post_message_sent(self, message: Message, read: IRead, http: IHttp) -> bool:
        """Skip the app user's own messages, and messages without an ``@`` unless posting resets the sender's unread mentions."""
        reset_on_post = read.get_environment_reader().get_settings().get_value_by_id("reset_on_post")
        if not (reset_on_post or "@" in (message.text or "")):
            return False
        try:
            app_user = await read.get_user_reader().get_app_user()
        except RocketChatUnavailable:
            return True  # no Rocket.Chat configured: nothing to compare with (the loop guard has run already)
        return app_user is None or app_user.id != message.sender.id

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        """Reset the sender's unread mentions in the room, count the new ones, tag the message."""
        settings = read.get_environment_reader().get_settings()
        room = Association(AssociationModel.ROOM, message.room.id)
        sender = message.sender.username
        if sender and settings.get_value_by_id("reset_on_post"):
            await persistence.remove_by_associations([Association(AssociationModel.USER, sender), room, UNREAD])
        names = mentioned_usernames(
            message.text or "",
            sender=sender,
            ignored=settings.get_value_by_id("ignored"),
            limit=settings.get_value_by_id("max_per_message"),
        )
        reader = read.get_persistence_reader()
        for name in names:
            associations = [Association(AssociationModel.USER, name), room, UNREAD]
            found = await reader.read_by_associations(associations)
            await persistence.update_by_associations(
                associations, _add(found[0] if found else None, name, message, settings.get_value_by_id("keep_message_ids")), upsert=True
            )
        if names:
            updater = modify.get_updater()
            await updater.finish(updater.message(message.id).add_custom_field(settings.get_value_by_id("tag_field"), names))


def _add(current: dict[str, Any] | None, username: str, message: Message, keep: int) -> dict[str, Any]:
    record = current or {"username": username, "roomId": message.room.id, "count": 0, "messageIds": []}
    if message.id in record["messageIds"]:
        return record  # the same message sent again as a new event: already counted
    return {**record, "count": record["count"] + 1, "messageIds": [*record["messageIds"], message.id][-keep:]}
