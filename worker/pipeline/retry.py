"""The retry policy: one backoff, and one loop that runs a batch again until it commits.

The lane (live processing), the replay tool and the runner's partition claim all wait the
same way between tries of something the database or the broker refused: exponential,
capped, with full jitter, plus a small floor that grows with the attempt, at most 5 s.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from worker.config import ProcessingSettings

_T = TypeVar("_T")

# Never wait longer than this between tries of a batch: an outage that ends is noticed soon.
MAX_RETRY_DELAY_S = 5.0


def backoff(attempt: int, settings: ProcessingSettings) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential, capped, full jitter."""
    ceiling = min(settings.backoff_max_ms, settings.backoff_initial_ms * 2 ** (attempt - 1))
    return random.uniform(0, ceiling) / 1000  # noqa: S311 - jitter, not cryptography


def retry_delay(attempt: int, settings: ProcessingSettings) -> float:
    """Seconds before a batch (or a claim) is tried again after ``attempt`` failures."""
    return min(MAX_RETRY_DELAY_S, backoff(attempt, settings) + 0.1 * attempt)


async def until_committed(
    run: Callable[[], Awaitable[_T]],
    settings: ProcessingSettings,
    *,
    retry_on: tuple[type[Exception], ...],
    on_retry: Callable[[Exception, int], None],
    give_up_on: tuple[type[Exception], ...] = (),
    max_attempts: int | None = None,
    running: Callable[[], bool] = lambda: True,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> _T | None:
    """Run ``run`` until it returns; what it raises of ``retry_on`` is reported and tried again.

    A bounded loop (``max_attempts``, the tools) raises the last error when attempts run out,
    or at once when the error says it is not ``retriable``; an unbounded one (the live lane)
    tries until ``running()`` turns false, and then returns None: the batch is abandoned.
    Whatever is in ``give_up_on``, or not in ``retry_on``, propagates at once.
    """
    attempt = 0
    while running() or attempt == 0:
        try:
            return await run()
        except give_up_on:
            raise
        except retry_on as exc:
            attempt += 1
            if max_attempts is not None and (attempt >= max_attempts or not getattr(exc, "retriable", True)):
                raise
            on_retry(exc, attempt)
            await sleep(retry_delay(attempt, settings))
    return None
