"""The suite's one way to wait: poll a condition with one generous bound, never a clock.

A test never sleeps to synchronize and never asserts a duration. It waits until a condition
holds, failing only when `BOUND_S` passes first (a bound so generous that a loaded 2-core
machine never reaches it while the behaviour works). A "nothing happened" check waits for a
positive marker that comes after the thing that must not happen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

#: Upper bound of every wait in the suite, in seconds.
BOUND_S = 60.0
#: How often a condition is polled.
POLL_S = 0.02


async def eventually(check: Callable[[], Any], what: str = "", *, bound: float = BOUND_S) -> Any:
    """Poll `check` (sync or async) until it returns something truthy, and return that."""
    deadline = time.monotonic() + bound
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {bound:g} s: {what or check!r}")
        await asyncio.sleep(POLL_S)


def wait_until(check: Callable[[], Any], what: str = "", *, bound: float = BOUND_S) -> Any:
    """Blocking `eventually`, for tests without an event loop."""
    deadline = time.monotonic() + bound
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {bound:g} s: {what or check!r}")
        time.sleep(POLL_S)
