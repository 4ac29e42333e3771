"""The console's fleet model: pure, no server, a hand-driven clock."""

from __future__ import annotations

import pytest

from broker import wire
from tests.fixtures_tui import Clock
from tui.event_log import EventFilter, EventLog
from tui.fleet_summary import SummaryHistory, route_mix
from tui.state import FleetState, row_style


def beat(node_id: str, role: str = "edge", **fields: object) -> wire.Heartbeat:
    return wire.Heartbeat(role=role, node_id=node_id, **fields)  # type: ignore[arg-type]


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


# -- discovery ------------------------------------------------------------------------------


def test_a_discovered_node_never_heard_is_silent_then_gone(fleet: FleetState, clock: Clock) -> None:
    fleet.apply_discovery("w-1", "cloud", {"node_id": "w-1", "model": "hg-cloud"}, service="gen")
    (row,) = fleet.rows()
    assert row.status == "silent"
    assert row.cells()[:4] == ("cloud", "w-1", "silent", "hg-cloud")
    node = fleet.get("w-1")
    assert node is not None and not node.heard and "gen" in node.services
    clock.now += 29
    fleet.apply_discovery("w-1", "cloud", {"node_id": "w-1"})
    clock.now += 29  # still answering discovery: kept
    assert fleet.rows()[0].status == "silent"
    assert fleet.prune() == []
    clock.now += 1  # discovery silent for gone_after too: the row goes
    assert fleet.rows()[0].status == "gone"
    assert fleet.prune() == ["w-1"]


def test_discovery_marks_a_heard_node_without_reviving_its_heartbeat(
    fleet: FleetState, clock: Clock
) -> None:
    fleet.apply_heartbeat(beat("e-1", model="smol", status="draining"))
    fleet.apply_discovery("e-1", "edge", {"node_id": "e-1", "model": "other"})
    node = fleet.get("e-1")
    assert node is not None and node.heard and node.discovered_at == clock.now
    assert node.heartbeat.model == "smol"  # a heartbeat wins over metadata
    assert fleet.rows()[0].status == "draining"
    clock.now += 10
    fleet.apply_discovery("e-1", "edge", {"node_id": "e-1"})
    assert fleet.rows()[0].status == "stale"  # discovery does not refresh last_seen
    assert node.last_seen == 1000.0
    clock.now += 25  # heartbeats gone, but it still answered discovery 25 s ago
    assert fleet.rows()[0].status == "silent"
    clock.now += 5
    assert fleet.prune() == ["e-1"]  # both old: gone


def test_a_heartbeat_turns_a_silent_node_into_a_heard_one(fleet: FleetState) -> None:
    fleet.apply_discovery("e-1", "edge", {"node_id": "e-1"})
    fleet.apply_heartbeat(beat("e-1", status="degraded"))
    assert fleet.rows()[0].status == "degraded"


def test_row_styles() -> None:
    assert [row_style(s) for s in ("stale", "gone", "silent")] == ["bold red"] * 3
    assert [row_style(s) for s in ("draining", "degraded")] == ["yellow"] * 2
    assert row_style("ready") == ""


# -- summary -------------------------------------------------------------------------------


def test_route_mix_from_counts_else_fallback_ratio() -> None:
    counts = beat("e", extra={"routes": {"in_domain": 3, "low_confidence": 1, "bad": "x"}})
    assert route_mix(counts) == {"in_domain": 0.75, "low_confidence": 0.25}
    ratio = beat("e", fallback_ratio={"low_confidence": 0.25})
    assert route_mix(ratio) == {"low_confidence": 0.25, "edge": 0.75}
    assert route_mix(beat("e")) == {}


def test_summary_weights_each_edge_by_its_rps(fleet: FleetState, clock: Clock) -> None:
    # edge a: 10 rps, 80% in_domain (edge), 20% low_confidence (cloud)
    fleet.apply_heartbeat(
        beat(
            "a",
            rps=10.0,
            fallback_ratio={"low_confidence": 0.2},
            extra={"routes": {"in_domain": 8, "low_confidence": 2}},
        )
    )
    # edge b: 30 rps, everything sent to the cloud (no route counts: its fallback_ratio)
    fleet.apply_heartbeat(beat("b", rps=30.0, fallback_ratio={"requested_cloud": 1.0}))
    fleet.apply_heartbeat(beat("w1", role="cloud", rps=20.0, queue_depth=3, errors=6))
    fleet.apply_heartbeat(beat("w2", role="cloud", rps=12.0, queue_depth=4, errors=0))
    clock.now += 3
    fleet.apply_heartbeat(beat("old", rps=100.0))  # fresh now, goes stale below
    fleet.apply_discovery("quiet", "cloud", {"node_id": "quiet"})

    summary = fleet.summary()
    assert summary.total_rps == pytest.approx(140.0)  # edges only; workers not counted
    clock.now += 3  # a, b, w1, w2 are 6 s old: stale; "old" 3 s: still counted
    assert fleet.summary().statuses == {"ready": 1, "silent": 1, "stale": 4}
    clock.now -= 3

    assert summary.nodes == 6
    assert summary.statuses == {"ready": 5, "silent": 1}
    routes = {r.reason: (r.served, r.rps) for r in summary.routes}
    assert routes == {
        "requested_cloud": ("cloud", pytest.approx(30.0)),
        "in_domain": ("edge", pytest.approx(8.0)),
        "low_confidence": ("cloud", pytest.approx(2.0)),
    }
    assert [r.reason for r in summary.routes] == ["requested_cloud", "in_domain", "low_confidence"]
    assert summary.edge_share == pytest.approx(8 / 40)
    assert summary.cloud_share == pytest.approx(32 / 40)
    assert sum(r.share for r in summary.routes) == pytest.approx(1.0)
    assert summary.cloud_workers == 2
    assert summary.cloud_rps == pytest.approx(32.0)
    assert summary.cloud_queue_depth == 7
    assert summary.cloud_errors == 6
    assert summary.cloud_error_rate == pytest.approx(6 / (32 * 30))


def test_summary_of_an_idle_fleet_has_no_shares(fleet: FleetState) -> None:
    summary = fleet.summary()
    assert summary.nodes == 0 and summary.total_rps == 0
    assert summary.edge_share is None and summary.cloud_error_rate is None
    fleet.apply_heartbeat(beat("a", rps=0.0))
    assert fleet.summary().routes == ()


def test_summary_history_is_a_bounded_ring(fleet: FleetState, clock: Clock) -> None:
    history = SummaryHistory(size=3)
    for rps in range(5):
        clock.now += 1
        fleet.apply_heartbeat(beat("a", rps=float(rps), extra={"routes": {"in_domain": 1}}))
        fleet.apply_heartbeat(beat("w", role="cloud", queue_depth=rps))
        history.sample(fleet.summary(), clock.now)
    assert len(history) == 3
    assert list(history.at) == [1003.0, 1004.0, 1005.0]
    assert list(history.series["total_rps"]) == [2.0, 3.0, 4.0]
    assert list(history.series["cloud_queue_depth"]) == [2.0, 3.0, 4.0]
    assert list(history.series["edge_share"]) == [1.0, 1.0, 1.0]
    assert list(history.series["cloud_error_rate"]) == [0.0, 0.0, 0.0]
    assert history.latest is not None and history.latest.total_rps == 4.0
    with pytest.raises(ValueError):
        SummaryHistory(size=0)
