"""The console at scale, driven by Pilot against a real nats-server: micro discovery of
silent nodes, the summary screen, the incremental fleet refresh, and the console bench."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from nats import micro
from nats.aio.client import Client
from textual.widgets import Static
from textual_plot import PlotWidget

from broker import wire
from broker.control import serve_control
from tests.fixtures_tui import Clock
from tests.test_tui_app import cell, connected, fleet_order, publish_beat, seen, until
from tui.app import HybridgenConsole
from tui.state import FLEET_COLUMNS, Node
from tui.summary import SummaryScreen


def node(app: HybridgenConsole, node_id: str) -> Node:
    found = app.fleet.get(node_id)
    assert found is not None
    return found


def row_styles(app: HybridgenConsole, node_id: str) -> set[str]:
    return {str(cell(app, node_id, key).style) for key, _ in FLEET_COLUMNS}


async def test_a_node_that_only_answers_discovery_shows_as_silent(
    console: HybridgenConsole, nc: Client
) -> None:
    async def drain(request: wire.ControlRequest) -> wire.ControlReply:
        return wire.ControlReply(ok=True)

    quiet = await serve_control(nc, node_id="quiet-1", role="edge", handlers={"drain": drain})
    heard = await serve_control(nc, node_id="edge-1", role="edge", handlers={"drain": drain})
    generation = await micro.add_service(
        nc, name="hybridgen-cloud", version="1.0.0", metadata={"node_id": "w-9", "model": "m1"}
    )
    other = await micro.add_service(nc, name="not-ours", version="1.0.0")  # names no node
    try:
        async with console.run_test(size=(160, 40)) as pilot:
            await connected(pilot, console)
            await publish_beat(nc, "edge-1")
            await seen(pilot, console, "edge-1", "quiet-1", "w-9")
            assert fleet_order(console) == ["edge-1", "quiet-1", "w-9"]
            assert cell(console, "quiet-1", "status").plain == "silent"
            assert cell(console, "w-9", "status").plain == "silent"
            assert cell(console, "w-9", "role").plain == "cloud"
            assert cell(console, "w-9", "model").plain == "m1"
            assert row_styles(console, "quiet-1") == {"bold red"}
            assert cell(console, "edge-1", "status").plain == "ready"
            assert row_styles(console, "edge-1") == {""}
            node = console.fleet.get("edge-1")
            assert node is not None and node.heard and node.discovered_at is not None
    finally:
        for service in (quiet, heard, generation, other):
            await service.stop()


async def test_summary_screen_shows_fleet_figures_at_80x24(
    console: HybridgenConsole, nc: Client
) -> None:
    async with console.run_test(size=(80, 24)) as pilot:
        await connected(pilot, console)
        routes = {"in_domain": 3, "low_confidence": 1}
        await publish_beat(
            nc,
            "edge-1",
            rps=10.0,
            fallback_ratio={"low_confidence": 0.25},
            extra={"routes": routes},
        )
        await publish_beat(nc, "edge-2", rps=5.0, fallback_ratio={"requested_cloud": 1.0})
        await publish_beat(nc, "worker-1", role="cloud", rps=2.0, queue_depth=4, errors=3)
        await seen(pilot, console, "edge-1", "edge-2", "worker-1")

        await pilot.press("o")
        screen = console.screen
        assert isinstance(screen, SummaryScreen)
        figures = str(screen.query_one("#summary-figures", Static).render())
        assert "requests/s: 15.0" in figures
        assert "edge 50% · cloud 50%" in figures
        assert "cloud queue: 4" in figures
        assert "cloud errors: 3" in figures
        shown_routes = str(screen.query_one("#summary-routes", Static).render())
        rows = [line.split() for line in shown_routes.splitlines()[1:]]
        assert rows == [
            ["in_domain", "edge", "7.5", "50%"],
            ["requested_cloud", "cloud", "5.0", "33%"],
            ["low_confidence", "cloud", "2.5", "17%"],
        ]
        plots = screen.query(PlotWidget)
        assert len(plots) == 4
        assert all(p.size.height >= 3 and p.size.width >= 20 for p in plots)

        # The fleet table waits while the summary is on top; the summary keeps sampling.
        table = console.fleet_table
        shown = table.row_count
        samples = len(console.summary_history)
        await publish_beat(nc, "edge-3", rps=1.0)
        await until(pilot, lambda: len(console.summary_history) >= samples + 2, "two samples")
        assert console.fleet.get("edge-3") is not None
        assert console.summary_history.latest is not None
        assert console.summary_history.latest.total_rps == pytest.approx(16.0)
        assert table.row_count == shown
        await pilot.press("escape")
        await until(pilot, lambda: table.row_count == shown + 1, "the fleet redrawn")


async def test_refresh_updates_cells_in_place_and_marks_rows(
    console: HybridgenConsole, nc: Client, clock: Clock
) -> None:
    kinds: list[str] = []
    nodes = [f"edge-{i:02d}" for i in range(1, 13)]
    async with console.run_test(size=(160, 40)) as pilot:
        await connected(pilot, console)
        for node_id in nodes:
            await publish_beat(nc, node_id, rps=1.0)
        await seen(pilot, console, *nodes)
        await pilot.press("down")
        assert console.selected_node() == "edge-02"
        console.on_timing = lambda kind, _: kinds.append(kind)

        await publish_beat(nc, "edge-02", rps=7.5)
        await until(pilot, lambda: node(console, "edge-02").heartbeat.rps == 7.5, "the beat")
        await publish_beat(nc, "edge-99")  # sorts last: added in place
        await seen(pilot, console, "edge-99")
        assert cell(console, "edge-02", "rps").plain == "7.5"
        assert fleet_order(console) == [*nodes, "edge-99"]
        assert console.selected_node() == "edge-02"

        clock.now += 6  # edge-01 goes stale, edge-03 drains, the others beat as before
        for node_id in [*nodes[1:], "edge-99"]:
            rps = {"edge-02": 7.5, "edge-99": 0.0}.get(node_id, 1.0)
            status = "draining" if node_id == "edge-03" else "ready"
            await publish_beat(nc, node_id, rps=rps, status=status)
        await until(pilot, lambda: node(console, "edge-99").last_seen == clock.now, "beats")
        console.refresh_fleet()
        assert cell(console, "edge-01", "status").plain == "stale"
        assert row_styles(console, "edge-01") == {"bold red"}
        assert row_styles(console, "edge-02") == {""}
        assert row_styles(console, "edge-03") == {"yellow"}
        refreshes = [kind for kind in kinds if kind != "apply"]
        assert refreshes and set(refreshes) == {"render"}  # cells rewritten, never rebuilt
        assert fleet_order(console) == [*nodes, "edge-99"]
        assert console.selected_node() == "edge-02"

        await publish_beat(nc, "edge-00")  # sorts first: the order changed, so a rebuild
        await seen(pilot, console, "edge-00")
        assert "full_refresh" in kinds
        assert fleet_order(console) == ["edge-00", *nodes, "edge-99"]
        assert console.selected_node() == "edge-02"
        assert row_styles(console, "edge-01") == {"bold red"}


@pytest.mark.slow
def test_console_bench_prints_its_figures() -> None:
    argv = ["bench", "console", "--nodes", "20", "--seconds", "2", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "hybridgen", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("nodes", "heartbeats_per_s", "apply_p95_ms", "render_p95_ms"):
        assert key in result
    assert {"full_refresh_p95_ms", "cpu"} <= set(result)
    assert result["nodes"] == 20
    assert result["heartbeats_applied"] == result["heartbeats_sent"]  # every one, once
    assert result["heartbeats_sent"] >= 20  # a beat of every node in the first second
    assert result["rows"] == 20
    assert set(result["cpu"]) >= {"model", "avx2", "avx512"}
