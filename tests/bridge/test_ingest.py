"""``rc-worker ingest`` over the real broker: each kind of post gets its answer, and 202 means on the topic."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.services import OwnKafka
from tests.support import FIXTURES, ROOT, TopicSet
from worker import constants
from worker.bridge.ingest import Publisher, build_app
from worker.config import IngestSettings, Settings
from worker.events import decode
from worker.kafka import create_topics, read_topic

SECRET = "test-secret"  # noqa: S105 - the shared secret of the test fixtures
TOKEN = "webhook-test-token"  # noqa: S105


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def app_event(message_id: str, room: str = "GENERAL", text: str = "hello @alice", kind: str = constants.POST_MESSAGE_SENT) -> bytes:
    """A structured CloudEvent as the Rocket.Chat App sends it."""
    event_id = message_id if kind == constants.POST_MESSAGE_SENT else f"{message_id}:updated:1714557660000"
    data = {
        "id": message_id,
        "room": {"id": room, "slugifiedName": room.lower(), "type": "c", "displayName": room.lower()},
        "sender": {"id": "u1", "username": "marc.pow", "name": "Marc Pow", "type": "user"},
        "text": text,
        "createdAt": "2024-05-01T10:00:00.000Z",
    }
    return orjson.dumps({"specversion": "1.0", "type": kind, "source": "https://chat.example.org", "id": event_id, "data": data})


def _settings(topics: TopicSet, **ingest: Any) -> Settings:
    values = {"secret": SECRET, "webhook_token": TOKEN, "max_body_bytes": 4096, "produce_timeout_s": 5, **ingest}
    return Settings(kafka=topics.kafka_settings(), ingest=IngestSettings.model_validate(values))


async def _client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    publisher = Publisher(settings.kafka, settings.ingest)
    transport = httpx.ASGITransport(app=build_app(settings, publisher))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest.test") as client:
            yield client
    finally:
        await publisher.close()


@pytest.fixture
async def ingest(topics: TopicSet) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(_settings(topics)):
        yield client


async def _on_topic(topics: TopicSet) -> list[Any]:
    return [record async for record in read_topic(topics.kafka_settings(), topics.topic)]


def _post_event(body: bytes, signature: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": constants.STRUCTURED_CONTENT_TYPE, "X-Signature": signature or sign(body)}
    return {"url": "/v1/events", "content": body, "headers": headers}


@pytest.mark.kafka
class TestAppEvents:
    async def test_signed_event_is_on_the_topic_when_answered_202(self, ingest: httpx.AsyncClient, topics: TopicSet) -> None:
        """202 comes after the broker's acknowledgement: the exact signed bytes are on the topic, keyed by room."""
        body = app_event("m-202")
        response = await ingest.post(**_post_event(body))
        assert response.status_code == 202, response.text
        records = await _on_topic(topics)
        assert [(r.key, r.value) for r in records] == [(b"GENERAL", body)]
        assert records[0].header("content-type") == constants.STRUCTURED_CONTENT_TYPE.encode()
        assert decode(records[0]).is_post_message_sent

    async def test_updated_and_deleted_events_are_taken(self, ingest: httpx.AsyncClient, topics: TopicSet) -> None:
        """Ingest takes all three message types; the worker skips what no handler takes."""
        for kind in (constants.POST_MESSAGE_UPDATED, constants.POST_MESSAGE_DELETED):
            assert (await ingest.post(**_post_event(app_event("m-upd", kind=kind)))).status_code == 202
        assert len(await _on_topic(topics)) == 2

    @pytest.mark.parametrize("signature", ["sha256=" + "0" * 64, "", "sha1=abc", None])
    async def test_bad_signature_is_401_and_nothing_is_produced(
        self, ingest: httpx.AsyncClient, topics: TopicSet, signature: str | None
    ) -> None:
        """A wrong, missing or foreign signature: 401, nothing on the topic."""
        body = app_event("m-401")
        request = _post_event(body, sign(body, "other-secret") if signature is None else signature)
        if signature == "":
            del request["headers"]["X-Signature"]
        response = await ingest.post(**request)
        assert response.status_code == 401
        assert await _on_topic(topics) == []

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b'{"specversion": "1.0", "type"', "not JSON"),
            (orjson.dumps({"specversion": "1.0", "type": constants.POST_MESSAGE_SENT, "source": "s", "id": "x"}), "data is missing"),
            (
                orjson.dumps({"specversion": "1.0", "type": "chat.rocket.room.created", "source": "s", "id": "x", "data": {}}),
                "not one ingest takes",
            ),
            (app_event("m-400").replace(b'"createdAt"', b'"ts"'), "createdAt"),
        ],
        ids=["broken-json", "no-data", "foreign-type", "raw-name"],
    )
    async def test_invalid_event_is_400_with_the_reason(
        self, ingest: httpx.AsyncClient, topics: TopicSet, body: bytes, reason: str
    ) -> None:
        """A signed body that is no contract event: 400 naming what is wrong, nothing produced."""
        response = await ingest.post(**_post_event(body))
        assert response.status_code == 400
        assert reason in response.json()["error"]
        assert await _on_topic(topics) == []

    async def test_oversize_body_is_413_by_length_and_by_stream(self, ingest: httpx.AsyncClient, topics: TopicSet) -> None:
        """Over max_body_bytes: 413, whether Content-Length says so or a chunked body grows too large."""
        body = app_event("m-413", text="x" * 5000)
        assert (await ingest.post(**_post_event(body))).status_code == 413

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 1000):
                yield body[start : start + 1000]

        headers = {"Content-Type": constants.STRUCTURED_CONTENT_TYPE, "X-Signature": sign(body)}
        assert (await ingest.post("/v1/events", content=chunks(), headers=headers)).status_code == 413
        assert await _on_topic(topics) == []

    async def test_healthz(self, ingest: httpx.AsyncClient) -> None:
        """/healthz answers while the process serves."""
        assert (await ingest.get("/healthz")).json() == {"status": "ok"}

    async def test_every_signed_body_of_the_rocket_chat_app_is_accepted(self, ingest: httpx.AsyncClient, topics: TopicSet) -> None:
        """Interop: each body the app's own tests sign (rocketchat-app/test/fixtures, secret "test-secret") gets 202, byte for byte on the topic."""
        directory = ROOT / "rocketchat-app" / "test" / "fixtures"
        index = json.loads((directory / "signatures.json").read_text())
        assert index["secret"] == SECRET
        events = index["events"]
        assert {e["type"] for e in events} == {constants.POST_MESSAGE_SENT, constants.POST_MESSAGE_UPDATED, constants.POST_MESSAGE_DELETED}
        for entry in events:
            body = (directory / entry["file"]).read_bytes()
            headers = {"Content-Type": index["contentType"], index["header"]: entry["signature"]}
            response = await ingest.post("/v1/events", content=body, headers=headers)
            assert response.status_code == 202, (entry["file"], response.text)
            assert response.json() == {"id": entry["id"], "type": entry["type"]}
        on_topic = await _on_topic(topics)
        assert sorted(r.value for r in on_topic) == sorted((directory / e["file"]).read_bytes() for e in events)
        assert all(decode(r).id in {e["id"] for e in events} for r in on_topic)


@pytest.mark.kafka
class TestWebhooks:
    async def test_webhook_post_is_converted_and_produced(self, ingest: httpx.AsyncClient, topics: TopicSet) -> None:
        """A Message Sent webhook becomes a contract event on the topic, keyed by channel id."""
        payload = (FIXTURES / "rocketchat" / "webhook-message-sent.json").read_bytes()
        response = await ingest.post("/v1/webhooks/rocketchat", content=payload, headers={"Content-Type": "application/json"})
        assert response.status_code == 202, response.text
        [record] = await _on_topic(topics)
        event = decode(record)
        assert (record.key, event.id, event.source) == (b"GENERAL", "Hx7nPqR2sT3uVwXyZ", "https://chat.example.org")

    @pytest.mark.parametrize("token", ["wrong", None])
    async def test_bad_or_missing_token_is_401(self, ingest: httpx.AsyncClient, topics: TopicSet, token: str | None) -> None:
        """The webhook's token must match ingest.webhook_token."""
        payload = json.loads((FIXTURES / "rocketchat" / "webhook-message-sent.json").read_text())
        if token is None:
            del payload["token"]
        else:
            payload["token"] = token
        assert (await ingest.post("/v1/webhooks/rocketchat", json=payload)).status_code == 401
        assert await _on_topic(topics) == []

    async def test_broken_json_is_400(self, ingest: httpx.AsyncClient) -> None:
        """A body that is not JSON: 400."""
        response = await ingest.post("/v1/webhooks/rocketchat", content=b'{"token": ', headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert "not JSON" in response.json()["error"]


@pytest.mark.kafka
@pytest.mark.slow
class TestBrokerOutage:
    async def test_outage_is_503_with_retry_after_and_the_resent_event_arrives(self, own_kafka: OwnKafka) -> None:
        """While the broker is down: 503 with Retry-After; sent again once it is back: 202, and every 202'd event is on the topic."""
        name = f"i-{uuid.uuid4().hex[:10]}"
        topics = TopicSet(own_kafka.bootstrap, name, f"{name}.dlq", f"{name}.cmd", f"g-{name}")
        await create_topics(topics.kafka_settings(), partitions=3)
        settings = _settings(topics, produce_timeout_s=3, retry_after_s=2)
        async for client in _client(settings):
            before = app_event("before-outage")
            assert (await client.post(**_post_event(before))).status_code == 202
            own_kafka.stop()
            try:
                during = app_event("during-outage")
                refused = await client.post(**_post_event(during))
                assert refused.status_code == 503
                assert refused.headers["Retry-After"] == "2"
            finally:
                own_kafka.start()
            for _ in range(30):  # the sender retries, as the app does
                answer = await client.post(**_post_event(during))
                if answer.status_code == 202:
                    break
            assert answer.status_code == 202
        ids = {decode(r).id for r in await _on_topic(topics)}
        assert {"before-outage", "during-outage"} <= ids
