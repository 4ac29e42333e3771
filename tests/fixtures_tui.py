"""Console fixtures: a clock the test moves by hand, the console on the test's nats-server
with a fleet that reads that clock (stale after 5 s, gone after 30 s), and the one way the
console tests wait: Pilot pauses until a condition holds, bounded by `BOUND_S`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from textual.pilot import Pilot

from broker.settings import BusSettings
from tests.waits import BOUND_S, POLL_S
from tui.app import HybridgenConsole
from tui.event_log import EventLog
from tui.state import FleetState


async def until(pilot: Pilot[None], check: Callable[[], Any], what: str) -> Any:
    """Let the app run (Pilot pauses) until `check()` holds, and return what it returned;
    fails once `BOUND_S` passes first (never asserted as a duration)."""
    deadline = time.monotonic() + BOUND_S
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {BOUND_S:g} s: {what}")
        await pilot.pause(POLL_S)
    return result


class Clock:
    """A clock the test moves by hand (`clock.now += 6`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def console(nats_url: str, clock: Clock) -> HybridgenConsole:
    fleet = FleetState(stale_after=5, gone_after=30, clock=clock)
    return HybridgenConsole(BusSettings(url=nats_url), fleet=fleet, events=EventLog())
