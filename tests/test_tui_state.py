"""The console's fleet model: pure, no server, a hand-driven clock."""

from __future__ import annotations

import pytest

from broker import wire
from tui.state import EventFilter, EventLog, FleetState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(node_id: str, role: str = "edge", **fields: object) -> wire.Heartbeat:
    return wire.Heartbeat(role=role, node_id=node_id, **fields)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(clock: Clock) -> FleetState:
    return FleetState(stale_after=5, gone_after=30, history_size=3, clock=clock)


def test_one_row_per_node_with_latest_heartbeat(fleet: FleetState) -> None:
    fleet.apply_heartbeat(beat("a", in_flight=1))
    fleet.apply_heartbeat(beat("b", role="cloud"))
    fleet.apply_heartbeat(beat("a", in_flight=7))
    rows = fleet.rows()
    assert [r.node_id for r in rows] == ["a", "b"]
    assert rows[0].node.heartbeat.in_flight == 7


def test_status_goes_stale_then_gone_and_prune_drops_only_gone(
    fleet: FleetState, clock: Clock
) -> None:
    fleet.apply_heartbeat(beat("a", status="draining"))
    fleet.apply_heartbeat(beat("b"))
    assert {r.node_id: r.status for r in fleet.rows()} == {"a": "draining", "b": "ready"}
    clock.now += 5
    fleet.apply_heartbeat(beat("b"))
    assert {r.node_id: r.status for r in fleet.rows()} == {"a": "stale", "b": "ready"}
    assert fleet.prune() == []
    assert len(fleet) == 2  # a stale node stays visible
    clock.now += 25
    assert {r.node_id: r.status for r in fleet.rows()} == {"a": "gone", "b": "stale"}
    assert fleet.prune() == ["a"]
    assert [r.node_id for r in fleet.rows()] == ["b"]


def test_a_heartbeat_revives_a_stale_node(fleet: FleetState, clock: Clock) -> None:
    fleet.apply_heartbeat(beat("a"))
    clock.now += 10
    assert fleet.rows()[0].status == "stale"
    fleet.apply_heartbeat(beat("a"))
    assert fleet.rows()[0].status == "ready"


def test_sort_by_any_column_unknown_last(fleet: FleetState) -> None:
    fleet.apply_heartbeat(beat("a", rps=2.0, latency_p95_ms=50.0))
    fleet.apply_heartbeat(beat("b", rps=9.0))
    fleet.apply_heartbeat(beat("c", rps=5.0, latency_p95_ms=10.0))
    assert [r.node_id for r in fleet.rows(sort_by="rps")] == ["a", "c", "b"]
    assert [r.node_id for r in fleet.rows(sort_by="rps", descending=True)] == ["b", "c", "a"]
    assert [r.node_id for r in fleet.rows(sort_by="latency")] == ["c", "a", "b"]
    assert [r.node_id for r in fleet.rows(sort_by="latency", descending=True)] == ["a", "c", "b"]
    with pytest.raises(ValueError, match="unknown sort column"):
        fleet.rows(sort_by="nope")


def test_filter_by_text_and_role(fleet: FleetState) -> None:
    fleet.apply_heartbeat(beat("edge-1", model="smol"))
    fleet.apply_heartbeat(beat("edge-2", model="tiny"))
    fleet.apply_heartbeat(beat("worker-1", role="cloud", model="smol"))
    assert [r.node_id for r in fleet.rows(text="SMOL")] == ["edge-1", "worker-1"]
    assert [r.node_id for r in fleet.rows(role="cloud")] == ["worker-1"]
    assert [r.node_id for r in fleet.rows(text="smol", role="edge")] == ["edge-1"]


def test_cells_and_cloud_share(fleet: FleetState) -> None:
    fleet.apply_heartbeat(
        beat(
            "a",
            model="smol",
            model_version="3",
            latency_p50_ms=12.4,
            latency_p95_ms=80.0,
            fallback_ratio={"too_long": 0.25, "overloaded": 0.5},
        )
    )
    fleet.apply_heartbeat(beat("b", role="cloud"))
    a, b = fleet.rows()
    assert a.cells()[3] == "smol@3"
    assert a.cells()[7] == "12/80"
    assert a.cells()[9] == "75%"
    assert b.cells()[3] == "-"
    assert b.cells()[7] == "-/-"
    assert b.cells()[9] == "-"


def test_history_is_bounded_and_ordered(fleet: FleetState, clock: Clock) -> None:
    for queue in range(5):
        clock.now += 1
        fleet.apply_heartbeat(beat("a", queue_depth=queue, fallback_ratio={"x": 0.1 * queue}))
    node = fleet.get("a")
    assert node is not None
    assert list(node.history.queue_depth) == [2.0, 3.0, 4.0]
    assert list(node.history.at) == [1003.0, 1004.0, 1005.0]
    assert list(node.history.cloud_share) == pytest.approx([0.2, 0.3, 0.4])


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError):
        FleetState(stale_after=10, gone_after=5)


def event(node_id: str, kind: str, request_id: str | None = None, message: str = "") -> wire.Event:
    return wire.Event(
        kind=kind, role="edge", node_id=node_id, request_id=request_id, message=message
    )


def test_event_log_is_a_bounded_ring_newest_first() -> None:
    log = EventLog(size=3)
    log.extend(event("a", f"k{i}") for i in range(5))
    assert len(log) == 3
    assert log.added == 5
    assert [e.kind for e in log.select()] == ["k4", "k3", "k2"]
    assert [e.kind for e in log.select(limit=2)] == ["k4", "k3"]


def test_event_filter_by_node_kind_request_and_text() -> None:
    log = EventLog()
    log.add(event("edge-1", "fallback", "r1", "sent to cloud"))
    log.add(event("edge-2", "error", "r2", "boom"))
    log.add(event("edge-1", "drain"))
    pick = lambda q: [(e.node_id, e.kind) for e in log.select(EventFilter.parse(q))]  # noqa: E731
    assert pick("node:edge-1") == [("edge-1", "drain"), ("edge-1", "fallback")]
    assert pick("kind:error") == [("edge-2", "error")]
    assert pick("req:r1") == [("edge-1", "fallback")]
    assert pick("node:edge-1 kind:fallback cloud") == [("edge-1", "fallback")]
    assert pick("boom") == [("edge-2", "error")]
    assert pick("kind:nothing") == []
    assert EventFilter.parse("request:x y z") == EventFilter(request_id="x", text="y z")
