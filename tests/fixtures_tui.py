"""Console fixtures: a clock the test moves by hand, and the console on the test's
nats-server with a fleet that reads that clock (stale after 5 s, gone after 30 s)."""

from __future__ import annotations

import pytest

from broker.settings import BusSettings
from tui.app import HybridgenConsole
from tui.state import EventLog, FleetState


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
