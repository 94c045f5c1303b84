"""bounded(): a handler's coroutine under a time limit, with no timer while it does not suspend."""

from __future__ import annotations

import asyncio

import pytest

from worker.pipeline.bounded import bounded


async def answer(value: int) -> int:
    return value


async def sleeps(seconds: float, value: int) -> int:
    await asyncio.sleep(seconds)
    return value


async def fails_after_suspending() -> None:
    await asyncio.sleep(0)
    raise ValueError("broken")


class TestBounded:
    async def test_a_coroutine_that_never_suspends_returns_its_value_without_a_timer(self) -> None:
        """No timer is armed at all: the loop has nothing scheduled."""
        loop = asyncio.get_running_loop()
        before = len(loop._scheduled)  # type: ignore[attr-defined]
        assert await bounded(answer(7), 0.001) == 7
        assert len(loop._scheduled) == before  # type: ignore[attr-defined]

    async def test_a_coroutine_that_suspends_and_ends_in_time_returns_its_value(self) -> None:
        """It goes on where it suspended, its awaits answered as usual."""
        assert await bounded(sleeps(0.01, 3), 5.0) == 3

    async def test_a_coroutine_that_runs_on_past_the_limit_is_cut_off(self) -> None:
        """TimeoutError, as asyncio.timeout raises."""
        with pytest.raises(TimeoutError):
            await bounded(sleeps(10, 3), 0.05)

    async def test_an_error_after_suspending_reaches_the_caller(self) -> None:
        """The coroutine's own exception passes through unchanged."""
        with pytest.raises(ValueError, match="broken"):
            await bounded(fails_after_suspending(), 5.0)

    async def test_cancelling_the_caller_cancels_the_coroutine(self) -> None:
        """A cancellation is thrown into the coroutine where it waits, and the caller sees it cancelled."""
        cancelled = asyncio.Event()

        async def waits() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        task = asyncio.create_task(bounded(waits(), 60))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cancelled.is_set()
