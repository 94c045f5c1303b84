"""``rc-worker ingest``: the HTTP endpoint that puts Rocket.Chat's messages on ``kafka.topic``.

``POST /v1/events`` takes the Rocket.Chat App's signed structured CloudEvent; ``POST
/v1/webhooks/rocketchat`` takes an outgoing webhook's payload and converts it. Both are
checked with the worker's own decoder (what ingest accepts, the worker accepts) and answered
202 only once the broker has acknowledged the record (acks=all, idempotent producer, keyed
by room): a sender that got 202 can forget the message. 401: bad signature or token; 400:
not a contract event, with the reason; 413: body over ``ingest.max_body_bytes``; 503 with
Retry-After: the broker did not acknowledge in ``ingest.produce_timeout_s``, send it again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import signal
import time
from collections.abc import Callable, Iterator

import orjson
import structlog
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker import constants
from worker.bridge import webhook
from worker.config import IngestSettings, KafkaSettings, Settings
from worker.errors import BrokerError, ConfigError, DecodeError, WorkerError
from worker.events import Event, Message, RawRecord, decode
from worker.kafka import Outgoing, Producer

log = structlog.get_logger("worker.ingest")

SIGNATURE_HEADER = "x-signature"
SIGNATURE_PREFIX = "sha256="
ACCEPTED_TYPES = (constants.POST_MESSAGE_SENT, constants.POST_MESSAGE_UPDATED, constants.POST_MESSAGE_DELETED)


class Refused(WorkerError):
    """Raised when a request is answered with an HTTP error status; never leaves this module."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers


class Publisher:
    """Produces accepted events; the producer is started on first use, and again after it failed to start."""

    def __init__(self, kafka: KafkaSettings, settings: IngestSettings) -> None:
        self.kafka, self.settings = kafka, settings
        self._producer: Producer | None = None
        self._starting = asyncio.Lock()

    async def publish(self, key: bytes, value: bytes) -> None:
        """Send one structured record and wait for the broker's acknowledgement.

        Raises:
            Refused: 503, the broker did not acknowledge in time; nothing can be promised.

        """
        try:
            async with asyncio.timeout(self.settings.produce_timeout_s):
                producer = await self._started()
                headers = [("content-type", constants.STRUCTURED_CONTENT_TYPE.encode())]
                await producer.send_many([Outgoing(self.kafka.topic, key, value, headers)])
        except (BrokerError, TimeoutError) as exc:
            log.warning("ingest_broker_unavailable", error=str(exc) or "no acknowledgement in time", topic=self.kafka.topic)
            retry = str(self.settings.retry_after_s)
            raise Refused(503, "the broker did not acknowledge the event; send it again later", {"Retry-After": retry}) from exc

    async def _started(self) -> Producer:
        async with self._starting:
            if self._producer is None:
                producer = Producer(self.kafka)
                await producer.__aenter__()
                self._producer = producer
            return self._producer

    async def close(self) -> None:
        """Flush and close the producer, if it was started."""
        if self._producer is not None:
            await self._producer.__aexit__(None, None, None)
            self._producer = None


def build_app(settings: Settings, publisher: Publisher) -> Starlette:
    """The ASGI application of ingest."""
    ingest = settings.ingest

    async def events(request: Request) -> Response:
        return await _answer(request, lambda body: _signed_event(request, body, ingest), publisher, ingest)

    async def webhooks(request: Request) -> Response:
        return await _answer(request, lambda body: _webhook_event(body, ingest), publisher, ingest)

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/events", events, methods=["POST"]),
            Route("/v1/webhooks/rocketchat", webhooks, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


async def _answer(
    request: Request, convert: Callable[[bytes], tuple[bytes, Event]], publisher: Publisher, settings: IngestSettings
) -> Response:
    started = time.perf_counter()
    try:
        body = await _body(request, settings.max_body_bytes)
        value, event = convert(body)
        await publisher.publish(_key(event), value)
    except Refused as refusal:
        log.info("ingest_refused", path=request.url.path, status=refusal.status, reason=refusal.reason)
        return JSONResponse({"error": refusal.reason}, status_code=refusal.status, headers=refusal.headers)
    log.info("ingest_accepted", type=event.type, event_id=event.id, duration_ms=round((time.perf_counter() - started) * 1000, 1))
    return JSONResponse({"id": event.id, "type": event.type}, status_code=202)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"body of {declared} bytes is over ingest.max_body_bytes ({limit})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a chunked body, or a Content-Length that lied
            raise Refused(413, f"body is over ingest.max_body_bytes ({limit})")
        chunks.append(chunk)
    return b"".join(chunks)


def _signed_event(request: Request, body: bytes, settings: IngestSettings) -> tuple[bytes, Event]:
    secret = settings.secret.get_secret_value()
    if not secret:
        raise Refused(401, "ingest.secret is not set: /v1/events takes nothing")
    given = request.headers.get(SIGNATURE_HEADER, "")
    expected = SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.strip().lower().encode(), expected.encode()):
        raise Refused(401, "X-Signature is missing or does not match the body (HMAC-SHA256 with the shared secret)")
    return body, _validated(body)  # the signed bytes themselves go on the topic


def _webhook_event(body: bytes, settings: IngestSettings) -> tuple[bytes, Event]:
    token = settings.webhook_token.get_secret_value()
    if not token:
        raise Refused(401, "ingest.webhook_token is not set: /v1/webhooks/rocketchat takes nothing")
    try:
        payload = webhook.parse(body)
    except DecodeError as exc:
        if exc.reason.startswith("token:"):
            raise Refused(401, "the webhook's token is missing") from None
        raise Refused(400, exc.reason) from None
    if not hmac.compare_digest(payload.token.encode(), token.encode()):
        raise Refused(401, "the webhook's token does not match ingest.webhook_token")
    value = orjson.dumps(webhook.to_cloudevent(payload))
    return value, _validated(value)


def _validated(value: bytes) -> Event:
    """The event in ``value``, decoded by the worker's decoder, or 400 with its reason."""
    record = RawRecord("ingest", 0, 0, 0, None, value, (("content-type", constants.STRUCTURED_CONTENT_TYPE.encode()),))
    try:
        event = decode(record)
        if event.type not in ACCEPTED_TYPES:
            raise DecodeError(f"type {event.type!r} is not one ingest takes: {', '.join(ACCEPTED_TYPES)}")
        if event.message is None:  # updated and deleted carry the message too; the decoder reads only sent
            data = orjson.loads(value).get("data")
            try:
                Message.model_validate(data)
            except ValidationError as exc:
                raise DecodeError(f"data: {exc.errors()[0]['msg']} at {'.'.join(map(str, exc.errors()[0]['loc']))}") from None
    except DecodeError as exc:
        raise Refused(400, exc.reason) from None
    return event


def _key(event: Event) -> bytes:
    if event.message is not None:
        return event.message.room.id.encode()
    return str(orjson.loads(event.record.value or b"{}")["data"]["room"]["id"]).encode()


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by SIGTERM/SIGINT without dying of the signal afterwards.

    uvicorn re-raises a captured signal once it has drained, so the process would end with
    the signal's status; for ingest a signal is the ordinary way to stop, and it exits 0.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _stop(self) -> None:
        # A second signal stops at once, without waiting for requests in flight.
        self.force_exit = self.should_exit
        self.should_exit = True


async def serve(settings: Settings) -> None:
    """Serve ingest until SIGTERM/SIGINT (requests in flight finish), then close the producer."""
    publisher = Publisher(settings.kafka, settings.ingest)
    config = uvicorn.Config(
        build_app(settings, publisher),
        host=settings.ingest.host,
        port=settings.ingest.port,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    server = _Server(config)
    watcher = asyncio.create_task(_announce(server))
    try:
        await server.serve()
    finally:
        watcher.cancel()
        await publisher.close()


async def _announce(server: uvicorn.Server) -> None:
    for _ in range(600):
        if server.started:
            ports = [s.getsockname()[1] for srv in server.servers for s in (srv.sockets or ())]
            log.info("ingest_listening", host=server.config.host, ports=ports)
            return
        await asyncio.sleep(0.05)


async def ingest_command(settings: Settings, _args: argparse.Namespace) -> int:
    """``rc-worker ingest``: serve until SIGTERM/SIGINT.

    Raises:
        ConfigError: neither ``ingest.secret`` nor ``ingest.webhook_token`` is set.

    """
    if not settings.ingest.secret.get_secret_value() and not settings.ingest.webhook_token.get_secret_value():
        raise ConfigError("ingest.secret and ingest.webhook_token are both empty: set at least one (RC_WORKER_INGEST__SECRET)")
    await serve(settings)
    return 0
