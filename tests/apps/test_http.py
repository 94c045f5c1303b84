"""The http accessor against a real HTTP server on 127.0.0.1: responses, limits from config, errors."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from worker.apps.http import Http
from worker.config import HttpSettings, Settings
from worker.errors import HttpError
from worker.testing import HttpStub, StubRequest


def _echo(request: StubRequest) -> tuple[int, Any]:
    return 200, {"method": request.method, "query": request.query, "headers": request.headers, "body": request.body.decode()}


def _slow(request: StubRequest) -> tuple[int, Any]:
    time.sleep(0.6)
    return 200, {"late": True}


def _chunks() -> Iterator[bytes]:
    for _ in range(20):
        yield b"x" * 1000


ROUTES = {
    **{f"{method} /echo": _echo for method in ("GET", "POST", "PUT", "DELETE", "PATCH")},
    "GET /text": lambda request: (200, "plain words"),
    "GET /missing": lambda request: (404, {"error": "gone"}),
    "GET /unavailable": lambda request: (503, "try later"),
    "GET /teapot": lambda request: (418, "short and stout"),
    "GET /big": lambda request: (200, b"y" * 5000),
    "GET /stream": lambda request: (200, _chunks()),
    "GET /slow": _slow,
    "GET /headers": lambda request: (200, {}, {"x-trace": "abc"}),
}


@pytest.fixture(scope="module")
def service() -> Iterator[HttpStub]:
    """One stub service for the module."""
    with HttpStub(ROUTES) as stub:
        yield stub


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    """The accessor with a small body limit and a short timeout."""
    client = Http(HttpSettings(timeout_s=2, max_response_bytes=4096))
    yield client
    await client.aclose()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TestResponses:
    async def test_get_returns_status_headers_text_and_parsed_json(self, http: Http, service: HttpStub) -> None:
        """A JSON answer: status, headers, the text, and the parsed body."""
        response = await http.get(f"{service.url}/echo", params={"q": "1"}, headers={"x-app": "test"})
        assert response.status_code == 200
        assert response.ok
        assert response.headers["content-type"] == "application/json"
        assert response.data["query"] == {"q": ["1"]}
        assert response.data["headers"]["x-app"] == "test"
        assert response.text == response.content
        assert '"method":"GET"' in response.content

    @pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
    async def test_each_method_sends_its_verb_and_json_body(self, http: Http, service: HttpStub, method: str) -> None:
        """post/put/patch/delete send their method, and json= as a JSON body with its content type."""
        response = await getattr(http, method)(f"{service.url}/echo", json={"n": 1})
        assert response.data["method"] == method.upper()
        assert response.data["body"] == '{"n":1}'
        assert response.data["headers"]["content-type"] == "application/json"

    async def test_raw_content_is_sent_as_given(self, http: Http, service: HttpStub) -> None:
        """content= is the body, byte for byte."""
        response = await http.post(f"{service.url}/echo", content="a=1&b=2", headers={"content-type": "application/x-www-form-urlencoded"})
        assert response.data["body"] == "a=1&b=2"

    async def test_a_text_body_has_no_data(self, http: Http, service: HttpStub) -> None:
        """A body that is not JSON: text only, data None."""
        response = await http.get(f"{service.url}/text")
        assert (response.content, response.data) == ("plain words", None)

    async def test_response_headers_are_returned(self, http: Http, service: HttpStub) -> None:
        """Headers the service sets reach the handler."""
        assert (await http.get(f"{service.url}/headers")).headers["x-trace"] == "abc"

    async def test_json_and_content_together_are_refused(self, http: Http, service: HttpStub) -> None:
        """Two bodies are a programming error, said at the call."""
        with pytest.raises(ValueError, match="json= or content="):
            await http.post(f"{service.url}/echo", json={}, content="x")


class TestStatus:
    async def test_an_error_status_is_returned_not_raised(self, http: Http, service: HttpStub) -> None:
        """4xx and 5xx come back as responses, as in the Apps-Engine."""
        response = await http.get(f"{service.url}/missing")
        assert (response.status_code, response.ok, response.data) == (404, False, {"error": "gone"})

    async def test_raise_for_status_raises_a_non_retriable_error_for_4xx(self, http: Http, service: HttpStub) -> None:
        """A 4xx will not change on retry: HttpError with the status, not retriable."""
        response = await http.get(f"{service.url}/teapot")
        with pytest.raises(HttpError, match=r"GET .*/teapot answered 418: short and stout") as caught:
            response.raise_for_status()
        assert caught.value.status_code == 418
        assert caught.value.retriable is False

    async def test_raise_for_status_raises_a_retriable_error_for_5xx(self, http: Http, service: HttpStub) -> None:
        """A 5xx may pass on retry: the dispatcher retries the run."""
        with pytest.raises(HttpError) as caught:
            (await http.get(f"{service.url}/unavailable")).raise_for_status()
        assert (caught.value.status_code, caught.value.retriable) == (503, True)

    async def test_raise_for_status_returns_a_2xx_response(self, http: Http, service: HttpStub) -> None:
        """So it chains: (await http.get(...)).raise_for_status().data."""
        assert (await http.get(f"{service.url}/echo")).raise_for_status().data["method"] == "GET"


class TestLimits:
    async def test_a_body_over_the_limit_fails(self, http: Http, service: HttpStub) -> None:
        """A declared length over http.max_response_bytes fails the call, naming the setting."""
        with pytest.raises(HttpError, match=r"declares 5000 bytes, over http\.max_response_bytes \(4096\)"):
            await http.get(f"{service.url}/big")

    async def test_a_streamed_body_is_cut_off_at_the_limit(self, http: Http, service: HttpStub) -> None:
        """Without a content-length, reading stops once the limit is passed."""
        with pytest.raises(HttpError, match=r"the response is over \d+ bytes, over http\.max_response_bytes"):
            await http.get(f"{service.url}/stream")

    async def test_a_slow_service_times_out(self, service: HttpStub) -> None:
        """A call longer than http.timeout_s fails with HttpError, which is retriable."""
        http = Http(HttpSettings(timeout_s=0.2))
        try:
            with pytest.raises(HttpError, match=r"took longer than 0\.2s; raise http\.timeout_s") as caught:
                await http.get(f"{service.url}/slow")
        finally:
            await http.aclose()
        assert caught.value.retriable

    async def test_a_call_may_shorten_the_timeout_but_not_lengthen_it(self, service: HttpStub) -> None:
        """timeout= is capped by http.timeout_s."""
        http = Http(HttpSettings(timeout_s=0.2))
        try:
            with pytest.raises(HttpError, match=r"took longer than 0\.2s"):
                await http.get(f"{service.url}/slow", timeout=30)
        finally:
            await http.aclose()

    def test_limits_come_from_config(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The http section of config.yaml, overridable as RC_WORKER_HTTP__*."""
        monkeypatch.setenv("RC_WORKER_HTTP__TIMEOUT_S", "3.5")
        monkeypatch.setenv("RC_WORKER_HTTP__MAX_RESPONSE_BYTES", "1000")
        assert Settings().http == HttpSettings(timeout_s=3.5, max_response_bytes=1000)


class TestConnectionErrors:
    async def test_a_refused_connection_is_an_http_error(self, http: Http) -> None:
        """Nothing listening: HttpError, retriable, chained from httpx's error."""
        with pytest.raises(HttpError, match=r"GET http://127\.0\.0\.1:\d+/x failed: ConnectError") as caught:
            await http.get(f"http://127.0.0.1:{_closed_port()}/x")
        assert caught.value.retriable
        assert isinstance(caught.value.__cause__, httpx.ConnectError)

    async def test_an_unsupported_url_is_an_http_error(self, http: Http) -> None:
        """A URL httpx cannot send is reported as HttpError too."""
        with pytest.raises(HttpError, match=r"ftp://example\.invalid/x failed: UnsupportedProtocol"):
            await http.get("ftp://example.invalid/x")


class TestAppsEngineNames:
    async def test_data_is_the_apps_engine_name_for_a_json_body(self, http: Http, service: HttpStub) -> None:
        """data= (IHttpRequest.data) is sent as JSON, exactly as json= is."""
        response = await http.post(f"{service.url}/echo", data={"n": 1})
        assert response.data["body"] == '{"n":1}'
        assert response.data["headers"]["content-type"] == "application/json"

    async def test_data_and_json_together_are_refused(self, http: Http, service: HttpStub) -> None:
        """One body: data= and json= name the same one."""
        with pytest.raises(ValueError, match="data= is the Apps-Engine's name for json="):
            await http.post(f"{service.url}/echo", data={}, json={})
