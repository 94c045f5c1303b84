"""``rc-worker run``: one worker of the consumer group, its hooks counted by the observability package, until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from worker.config import Settings


async def command(settings: Settings, _args: argparse.Namespace) -> int:
    """``rc-worker run``: run until SIGTERM/SIGINT, then drain within processing.shutdown_timeout_s."""
    from worker.collector import tune_for_throughput
    from worker.observability import observe, serve
    from worker.pipeline.runner import Worker
    from worker.plugins import load_apps

    apps = load_apps(settings.handlers.enabled, settings.handlers.settings)
    worker = Worker(settings, apps, hooks=observe)
    pages = None
    if settings.observability.web:
        from worker.web.embedded import pages_factory

        pages = pages_factory(settings)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - asyncio.run always runs us in a task
        raise RuntimeError("rc-worker run must be called from a task")
    deadline: list[asyncio.TimerHandle] = []

    def on_signal() -> None:
        worker.stop()
        if not deadline:  # a second signal does not extend the deadline
            deadline.append(loop.call_later(settings.processing.shutdown_timeout_s, task.cancel))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    tune_for_throughput()
    try:
        async with serve(settings.observability, worker.status, pages=pages):
            await worker.run()
    except asyncio.CancelledError:
        print(f"rc-worker: shutdown took longer than {settings.processing.shutdown_timeout_s}s; stopped hard", file=sys.stderr)
        return 1
    return 0
