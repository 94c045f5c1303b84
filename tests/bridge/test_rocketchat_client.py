"""The Rocket.Chat REST client against the local fake server: auth, errors, Retry-After."""

from __future__ import annotations

import httpx
import pytest

from tests.fakes.rocketchat import FakeRocketChat
from worker.config import RocketChatSettings
from worker.errors import RocketChatError, WorkerError
from worker.rocketchat.client import RocketChatClient, retry_after


def _client(fake: FakeRocketChat, **overrides: str) -> RocketChatClient:
    values = {"url": "http://rc.test", "user_id": fake.user_id, "auth_token": fake.auth_token, **overrides}
    return RocketChatClient(RocketChatSettings.model_validate(values), transport=httpx.ASGITransport(app=fake.app))


class TestCall:
    async def test_answers_the_json_body_with_auth_headers_sent(self) -> None:
        """A call authenticates with X-User-Id and X-Auth-Token and returns the decoded body."""
        fake = FakeRocketChat()
        fake.add_message("m1", "GENERAL", "hello")
        async with _client(fake) as client:
            body = await client.call("GET", "chat.getMessage", params={"msgId": "m1"})
        assert body["message"]["msg"] == "hello"
        assert fake.calls[-1].status == 200

    async def test_wrong_token_is_a_permanent_401(self) -> None:
        """Bad credentials: 401, not retriable, under the WorkerError root."""
        fake = FakeRocketChat()
        async with _client(fake, auth_token="wrong") as client:  # noqa: S106 - a test credential
            with pytest.raises(RocketChatError) as caught:
                await client.call("GET", "chat.getMessage", params={"msgId": "m1"})
        assert isinstance(caught.value, WorkerError)
        assert caught.value.status == 401
        assert not caught.value.retriable
        assert "logged in" in caught.value.error

    async def test_rate_limit_gives_429_with_the_wait(self) -> None:
        """Over the limit: 429, retriable, with the Retry-After the server sent."""
        fake = FakeRocketChat(rate_limit=2, rate_window_s=30)
        fake.add_message("m1", "GENERAL", "hello")
        async with _client(fake) as client:
            for _ in range(2):
                await client.call("GET", "chat.getMessage", params={"msgId": "m1"})
            with pytest.raises(RocketChatError) as caught:
                await client.call("GET", "chat.getMessage", params={"msgId": "m1"})
        assert caught.value.status == 429
        assert caught.value.retriable
        assert caught.value.retry_after is not None
        assert 0 < caught.value.retry_after <= 30

    async def test_server_errors_are_retriable(self) -> None:
        """A 5xx may succeed later."""
        fake = FakeRocketChat()
        fake.fail_next("chat.react", 502)
        async with _client(fake) as client:
            with pytest.raises(RocketChatError) as caught:
                await client.call("POST", "chat.react", json={"messageId": "m", "emoji": "x", "shouldReact": True})
        assert (caught.value.status, caught.value.retriable) == (502, True)

    async def test_no_answer_is_status_zero_and_retriable(self) -> None:
        """A refused connection is reported as no answer, retriable."""
        settings = RocketChatSettings(url="http://127.0.0.1:9", user_id="u", auth_token="t", timeout_s=2)  # type: ignore[arg-type]  # noqa: S106
        async with RocketChatClient(settings) as client:
            with pytest.raises(RocketChatError) as caught:
                await client.call("GET", "chat.getMessage", params={"msgId": "m1"})
        assert (caught.value.status, caught.value.retriable) == (0, True)


class TestRetryAfter:
    def test_seconds(self) -> None:
        """Retry-After in seconds."""
        assert retry_after(httpx.Headers({"Retry-After": "7"})) == 7.0

    def test_http_date(self) -> None:
        """Retry-After as an HTTP date, relative to now."""
        assert retry_after(httpx.Headers({"Retry-After": "Thu, 01 Jan 1970 00:01:40 GMT"}), now=90.0) == pytest.approx(10.0)

    def test_rocket_chat_reset_in_epoch_milliseconds(self) -> None:
        """Without Retry-After, X-RateLimit-Reset (epoch ms, as Rocket.Chat sends it) gives the wait."""
        assert retry_after(httpx.Headers({"X-RateLimit-Reset": "1700000012000"}), now=1_700_000_000.0) == pytest.approx(12.0)

    def test_neither(self) -> None:
        """No header, no wait known."""
        assert retry_after(httpx.Headers({})) is None
