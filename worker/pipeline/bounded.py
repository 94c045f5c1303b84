"""Await a handler's coroutine under a time limit that costs nothing while it does not suspend.

Most handler runs never suspend: every read is answered from the unit of work's snapshot, so
the coroutine runs to its end in one step. A timer armed and cancelled around each of those
runs (``asyncio.timeout``) was a tenth of a worker's CPU; here the coroutine is first stepped
by hand, and only one that suspends gets the timer, from that point on, for the rest of its
run. A run that never suspends could not have been cut off by a timer anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

_T = TypeVar("_T")


async def bounded(coro: Coroutine[Any, Any, _T], limit_s: float) -> _T:
    """The result of ``coro``; TimeoutError if, once suspended, it runs on past ``limit_s``."""
    try:
        pending = coro.send(None)
    except StopIteration as stop:
        result: _T = stop.value
        return result
    async with asyncio.timeout(limit_s):
        resumed: _T = await _Resumed(coro, pending)
        return resumed


class _Resumed:
    """The rest of a coroutine already stepped once: awaiting it goes on where it suspended."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        # What ``yield from`` does: hand each future the coroutine waits on to the task, and
        # pass the task's answer (a value, or an exception such as a cancellation) back in.
        coro, pending = self._coro, self._pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # noqa: BLE001 - every exception goes to the coroutine, as yield from does
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as stop:
                    return stop.value
