"""Serving the pages with uvicorn inside the running event loop: ``rc-worker web``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import structlog
import uvicorn

from worker.config import Settings
from worker.errors import ConfigError
from worker.persistence.store import Store
from worker.web.app import create_app
from worker.web.live import Live

log = structlog.get_logger("worker.web")


class _Server(uvicorn.Server):
    """uvicorn's server, leaving signals to the process that embeds it (a worker drains on SIGTERM itself)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install no handlers."""
        yield


@contextlib.asynccontextmanager
async def serving(settings: Settings, store: Store, host: str, port: int) -> AsyncIterator[str]:
    """Serve the pages on ``host:port`` for the block; yields the base URL (the real port if 0 was asked)."""
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(
            f"web: cannot listen on {host}:{port} ({exc.strerror}); set web.port (RC_WORKER_WEB__PORT) or --port to a free port, or 0"
        ) from exc
    app = create_app(settings, store, Live(settings, store))
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="web-server")
    bound = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    try:
        while not server.started:
            if task.done():
                await task  # raises what stopped it
                raise ConfigError(f"web: the server on {url} stopped while starting")
            await asyncio.sleep(0.05)
        log.info("web_listening", host=host, port=bound, url=url, read_only=settings.web.token is None)
        yield url
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker web``: serve the status pages until interrupted."""
    host = args.host or settings.web.host
    port = args.port if args.port is not None else settings.web.port
    store = Store.from_settings(settings.persistence)
    try:
        await store.check_schema()
        async with serving(settings, store, host, port) as url:
            print(
                f"rc-worker web: serving the status pages at {url}/" + ("" if settings.web.token else " (read-only: no web.token)"),
                flush=True,
            )
            await asyncio.Event().wait()
    finally:
        await store.close()
    return 0
