"""The built-in handlers: what mentions keeps and stages, and both passing the kit's cluster checks."""

from __future__ import annotations

from typing import Any

import pytest

from handlers.mentions import UNREAD, Mentions, mentioned_usernames
from handlers.message_count import MessageCount
from worker import Association, AssociationModel
from worker.testing import Harness, assert_concurrency_safe, assert_idempotent, message


def user(name: str) -> Association:
    return Association(AssociationModel.USER, name)


def room(name: str) -> Association:
    return Association(AssociationModel.ROOM, name)


CHAT = [
    message("@bob @carol standup", sender="alice", room="dev", message_id="m1"),
    message("@bob review please", sender="carol", room="ops", message_id="m2"),
    message("on it", sender="bob", room="dev", message_id="m3"),
    message("thanks @bob.", sender="alice", room="ops", message_id="m4"),
    message("@carol @dave lunch?", sender="bob", room="dev", message_id="m5"),
    message("no mentions here", sender="dave", room="ops", message_id="m6"),
]


class TestMentionParsing:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("hi @bob and @carol", ["bob", "carol"]),
            ("thanks @bob.", ["bob"]),
            ("@bob @bob @Bob", ["bob", "Bob"]),
            ("mail bob@example.com or @@x", []),
            ("@all @HERE @channel", ["channel"]),
            ("@alice talking to myself", []),
            ("@first.last-name_1 ok", ["first.last-name_1"]),
            ("@a @b @c @d", ["a", "b", "c"]),
        ],
    )
    def test_usernames_are_found_in_order_without_the_sender_or_ignored_ones(self, text: str, expected: list[str]) -> None:
        """@username tokens; not e-mail addresses, not @all/@here, not the sender; at most the limit."""
        assert mentioned_usernames(text, sender="alice", ignored=["all", "here"], limit=3) == expected


class TestMentions:
    async def test_mentioned_messages_are_tagged_through_modify(self) -> None:
        """One update command per message with mentions: customFields.mentions, the others kept."""
        async with Harness(Mentions) as harness:
            await harness.deliver(CHAT)
            commands = await harness.commands()
        assert {c.data["messageId"]: c.data["customFields"] for c in commands} == {
            "m1": {"mentions": ["bob", "carol"]},
            "m2": {"mentions": ["bob"]},
            "m4": {"mentions": ["bob"]},
            "m5": {"mentions": ["carol", "dave"]},
        }
        assert {c.data["replaceCustomFields"] for c in commands} == {False}
        assert {c.key for c in commands} == {"dev", "ops"}

    async def test_unread_mentions_are_kept_per_user_and_room(self) -> None:
        """Records with user:, room: and misc:unread-mentions, holding the count and the message ids."""
        async with Harness(Mentions) as harness:
            await harness.deliver(CHAT)
            assert await harness.data(user("bob"), room("ops")) == [
                {"username": "bob", "roomId": "ops", "count": 2, "messageIds": ["m2", "m4"]}
            ]
            assert await harness.data(user("carol"), room("dev")) == [
                {"username": "carol", "roomId": "dev", "count": 2, "messageIds": ["m1", "m5"]}
            ]
            assert sorted(r["username"] for r in await harness.data(room("dev"))) == ["carol", "dave"]
            assert len(await harness.data(UNREAD)) == 3

    async def test_posting_in_a_room_clears_the_senders_mentions_there_only(self) -> None:
        """bob posted in dev after being mentioned there: his dev record is gone, his ops record stays."""
        async with Harness(Mentions) as harness:
            await harness.deliver(CHAT)
            assert await harness.data(user("bob"), room("dev")) == []
            assert [r["roomId"] for r in await harness.data(user("bob"))] == ["ops"]

    async def test_reset_on_post_can_be_turned_off(self) -> None:
        """reset_on_post: false keeps bob's dev mentions, and skips messages without an @."""
        async with Harness(Mentions, settings={"reset_on_post": False}) as harness:
            await harness.deliver(CHAT)
            assert [r["count"] for r in await harness.data(user("bob"), room("dev"))] == [1]

    async def test_settings_rename_the_field_and_cap_the_ids(self) -> None:
        """tag_field names the custom field; keep_message_ids keeps the latest ids only."""
        chat = [message(f"@erin #{n}", sender="fred", room="dev", message_id=f"k{n}") for n in range(4)]
        async with Harness(Mentions, settings={"tag_field": "who", "keep_message_ids": 2}) as harness:
            await harness.deliver(chat)
            [record] = await harness.data(user("erin"))
            commands = await harness.commands()
        assert (record["count"], record["messageIds"]) == (4, ["k2", "k3"])
        assert {tuple(c.data["customFields"]) for c in commands} == {("who",)}

    async def test_the_same_message_sent_again_as_a_new_event_is_counted_once(self) -> None:
        """A publisher that re-sends a message with a new event id does not double its mentions."""
        from worker.testing import cloud_event

        again = message("@gina hi", sender="hal", room="dev", message_id="same")
        async with Harness(Mentions) as harness:
            await harness.deliver([cloud_event(again, event_id="e1"), cloud_event(again, event_id="e2")])
            assert [r["count"] for r in await harness.data(user("gina"))] == [1]


class TestMessageCount:
    async def test_counts_in_total_and_per_room(self) -> None:
        """misc:message-count for all, room:<id> per room."""
        async with Harness(MessageCount) as harness:
            await harness.deliver(CHAT)
            assert await harness.data(Association(AssociationModel.MISC, "message-count")) == [{"count": 6}]
            assert await harness.data(room("dev")) == [{"count": 3}]


BUILT_IN: list[tuple[type[Any], list[dict[str, Any]]]] = [(MessageCount, CHAT), (Mentions, CHAT)]


class TestClusterChecks:
    @pytest.mark.parametrize(("app", "events"), BUILT_IN, ids=["message-count", "mentions"])
    async def test_built_in_handler_is_idempotent(self, app: type[Any], events: list[dict[str, Any]]) -> None:
        """Redelivered events and repeated runs leave the state of a single run."""
        await assert_idempotent(app, events)

    @pytest.mark.parametrize(("app", "events"), BUILT_IN, ids=["message-count", "mentions"])
    async def test_built_in_handler_is_concurrency_safe(self, app: type[Any], events: list[dict[str, Any]]) -> None:
        """Copies at once leave the state of one copy processing the events in order."""
        await assert_concurrency_safe(app, events)
