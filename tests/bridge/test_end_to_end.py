"""Rocket.Chat in and out, end to end, with crashes: signed app events and webhook posts -> ingest ->
topic -> worker (mentions, and a greeter that creates messages) -> commands -> apply -> the fake
Rocket.Chat, which must show each command's effect exactly once although the worker and the
applier are SIGKILLed mid-run and the fake throttles (429 with Retry-After) and fails (5xx)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bridge.test_apply import create_topic
from tests.bridge.test_ingest import SECRET, TOKEN, app_event, sign
from tests.fakes.rocketchat import FakeRocketChat
from tests.support import FIXTURES, StartWorker, TopicSet, store_for, wait_until, write_distribution
from worker import constants
from worker.config import Settings
from worker.kafka import read_topic

GREETER = '''
from worker import App


class Greeter(App):
    """Answers "!hello" in the message's thread: a create command per message."""

    async def check_post_message_sent(self, message, read, http):
        return (message.text or "").startswith("!hello")

    async def execute_post_message_sent(self, message, read, http, persistence, modify):
        creator = modify.get_creator()
        await creator.finish(creator.start_message().set_room(message.room).set_thread_id(message.id).set_text(f"hello {message.sender.username}"))
'''

TEXTS = ["hi @alice and @bob", "!hello there @carol", "just text"]
MENTIONS = [["alice", "bob"], ["carol"], []]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> None:
    """Post until 202, as the app and Rocket.Chat's webhook retry do (503 and connection errors)."""
    for _ in range(120):
        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.TransportError:
            await asyncio.sleep(0.5)
            continue
        if response.status_code == 202:
            return
        assert response.status_code in (503,), (response.status_code, response.text)
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
    raise AssertionError(f"{url} never answered 202")


async def _post_app_event(client: httpx.AsyncClient, body: bytes) -> None:
    await _post(client, "/v1/events", body, {"Content-Type": constants.STRUCTURED_CONTENT_TYPE, "X-Signature": sign(body)})


@pytest.mark.kafka
@pytest.mark.slow
class TestEndToEnd:
    async def test_every_command_changes_rocket_chat_once_through_crashes(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: StartWorker
    ) -> None:
        """Mentions tag each message once (others' custom fields kept), greetings are created once, the app user's message triggers nothing."""
        fake = FakeRocketChat(rate_limit=8, rate_window_s=2)
        fake.fail_next("chat.update", 503, 500)
        fake.fail_next("chat.sendMessage", 502)
        ids = [f"msg{i:02d}" for i in range(24)]
        for i, message_id in enumerate(ids):
            fake.add_message(message_id, f"R{i % 3}", TEXTS[i % 3], customFields={"origin": i})
        webhook = json.loads((FIXTURES / "rocketchat" / "webhook-message-sent.json").read_text())
        hooks = [{**webhook, "message_id": f"hook{i}", "text": f"ping @dave {i}"} for i in range(6)]
        for hook in hooks:
            fake.add_message(hook["message_id"], hook["channel_id"], hook["text"])
        fake.add_message("own0", "R0", "!hello @alice", customFields={"origin": "app"})

        async with store_for(sqlite_url):
            pass  # the schema, as `rc-worker db upgrade` makes it
        await create_topic(Settings(kafka=topics.kafka_settings()), f"{topics.commands_topic}.dlq")
        site = write_distribution(
            tmp_path / "site", "rc-test-greeter", {"greeter": "rc_test_greeter:Greeter"}, {"rc_test_greeter": GREETER}
        )
        port = _free_port()
        with fake.serve() as rocketchat_url:
            env = topics.env(
                sqlite_url,
                PYTHONPATH=str(site),
                RC_WORKER_HANDLERS__ENABLED='["mentions", "greeter"]',
                RC_WORKER_INGEST__PORT=str(port),
                RC_WORKER_INGEST__SECRET=SECRET,
                RC_WORKER_INGEST__WEBHOOK_TOKEN=TOKEN,
                RC_WORKER_ROCKETCHAT__URL=rocketchat_url,
                RC_WORKER_ROCKETCHAT__USER_ID=fake.user_id,
                RC_WORKER_ROCKETCHAT__AUTH_TOKEN=fake.auth_token,
                RC_WORKER_ROCKETCHAT__APP_USER_ID=fake.user_id,
                RC_WORKER_ROCKETCHAT__APPLY_GROUP_ID=f"{topics.group_id}-apply",
                RC_WORKER_ROCKETCHAT__BACKOFF_INITIAL_S="0.1",
                RC_WORKER_ROCKETCHAT__BACKOFF_MAX_S="1",
            )
            ingest = start_worker(env, "ingest", "ingest")
            worker = start_worker(env, "worker")
            applier = start_worker(env, "apply", "apply")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                await wait_until(lambda: ingest.events("ingest_listening"), timeout=60, what="ingest to listen")
                for i, message_id in enumerate(ids[:12]):
                    await _post_app_event(client, app_event(message_id, room=f"R{i % 3}", text=TEXTS[i % 3]))
                await wait_until(lambda: fake.count("chat.update", 200) >= 2, timeout=120, what="the first updates")
                applier.kill()  # mid-run: some commands applied, others not yet committed
                applier.start()
                for i, message_id in enumerate(ids[12:], start=12):
                    await _post_app_event(client, app_event(message_id, room=f"R{i % 3}", text=TEXTS[i % 3]))
                    if i == 16:
                        worker.kill()
                        worker.start()
                for hook in hooks:
                    await _post(client, "/v1/webhooks/rocketchat", json.dumps(hook).encode(), {"Content-Type": "application/json"})
                edited = {**hooks[0], "isEdited": True, "text": "ping @dave, edited"}
                await _post(client, "/v1/webhooks/rocketchat", json.dumps(edited).encode(), {"Content-Type": "application/json"})
                own = app_event("own0", room="R0", text="!hello @alice").replace(b'"id":"u1"', f'"id":"{fake.user_id}"'.encode())
                await _post_app_event(client, own)
                # Sent twice, as the app's retry after a lost 202 would: the worker drops the repeat.
                await _post_app_event(client, app_event(ids[0], room="R0", text=TEXTS[0]))

            def settled() -> bool:
                tagged = all(
                    fake.messages[m].get("customFields", {}).get("mentions") == MENTIONS[i % 3]
                    for i, m in enumerate(ids)
                    if MENTIONS[i % 3]
                )
                hooked = all(fake.messages[h["message_id"]].get("customFields", {}).get("mentions") == ["dave"] for h in hooks)
                greeted = {m.get("tmid") for m in fake.messages.values() if m.get("tmid")}
                return tagged and hooked and greeted >= {m for i, m in enumerate(ids) if i % 3 == 1}

            await wait_until(settled, timeout=240, what="every command's effect in the fake Rocket.Chat")
            await asyncio.sleep(3)  # let any late repeat arrive before counting
            for process in (ingest, worker, applier):
                assert process.terminate() == 0

        greetings = [m for m in fake.messages.values() if m.get("tmid")]
        assert sorted(m["tmid"] for m in greetings) == sorted(m for i, m in enumerate(ids) if i % 3 == 1)
        assert all(count == 1 for count in fake.inserts.values())
        assert len(fake.inserts) == len(greetings) == 8
        for i, message_id in enumerate(ids):
            expected: dict[str, Any] = {"origin": i, "mentions": MENTIONS[i % 3]} if MENTIONS[i % 3] else {"origin": i}
            assert fake.messages[message_id]["customFields"] == expected
        assert fake.messages["own0"]["customFields"] == {"origin": "app"}  # the loop guard
        assert fake.count("chat.update", 503) == fake.count("chat.update", 500) == fake.count("chat.sendMessage", 502) == 1
        assert sum(1 for c in fake.calls if c.status == 429) >= 1
        assert [r async for r in read_topic(topics.kafka_settings(), topics.dead_letter_topic)] == []
        assert [r async for r in read_topic(topics.kafka_settings(), f"{topics.commands_topic}.dlq")] == []
