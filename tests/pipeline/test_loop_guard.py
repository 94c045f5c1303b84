"""The loop guard: messages sent by rocketchat.app_user_id skip handlers, unless a handler opts in."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from tests.support import store_for
from worker import App
from worker.apps.http import Http
from worker.config import ProcessingSettings, Settings
from worker.events import Message, RawRecord
from worker.pipeline.dispatch import Dispatcher, Topics

APP_USER = "app-user-id"


class Recorder(App):
    """Records the ids of the messages it saw."""

    seen: ClassVar[list[str]] = []

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        type(self).seen.append(message.id)


class OwnToo(Recorder):
    """Opts in to the app user's messages."""

    seen: ClassVar[list[str]] = []
    handles_own_messages = True


def _record(offset: int, sender: str) -> RawRecord:
    data = {"id": f"m{offset}", "room": {"id": "GENERAL"}, "sender": {"id": sender, "type": "app"}, "createdAt": "2024-05-01T10:00:00Z"}
    value = orjson.dumps({"specversion": "1.0", "type": "chat.rocket.message.sent", "source": "s", "id": f"m{offset}", "data": data})
    return RawRecord("t", 0, offset, 0, b"GENERAL", value, (("content-type", b"application/cloudevents+json"),))


async def _dispatch(url: str, own_user_id: str | None) -> None:
    apps: list[App] = [Recorder(), OwnToo()]
    apps[0].bind("recorder", {})
    apps[1].bind("own-too", {})
    async with store_for(url) as store:
        http = Http(Settings().http)
        try:
            dispatcher = Dispatcher(apps, store, http, Topics("t.dlq", "t.cmd"), ProcessingSettings(), own_user_id=own_user_id)
            await dispatcher.dispatch([_record(0, "alice"), _record(1, APP_USER)], None)
        finally:
            await http.aclose()


class TestLoopGuard:
    async def test_app_users_messages_skip_handlers_that_do_not_opt_in(self, sqlite_url: str) -> None:
        """The app user's message reaches only the handler with handles_own_messages; others see every other message."""
        Recorder.seen.clear()
        OwnToo.seen.clear()
        await _dispatch(sqlite_url, APP_USER)
        assert Recorder.seen == ["m0"]
        assert OwnToo.seen == ["m0", "m1"]

    async def test_without_an_app_user_nothing_is_skipped(self, sqlite_url: str) -> None:
        """rocketchat.app_user_id unset (the default): every handler sees every message."""
        Recorder.seen.clear()
        OwnToo.seen.clear()
        await _dispatch(sqlite_url, None)
        assert Recorder.seen == ["m0", "m1"]
