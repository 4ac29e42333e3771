"""The console driven by Pilot against a real nats-server, a real edge and a real cloud worker.

The edge (uvicorn), the worker and the console all run in the test's event loop; the models
run in their own threads (the session's tiny model set).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from rich.text import Text
from textual.containers import VerticalScroll
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static, TextArea

from broker import subjects, wire
from broker.settings import BusSettings
from broker.store import FleetConfig
from tests.fixtures_edge import LiveEdge
from tests.fixtures_tui import until
from tui.app import HybridgenConsole
from tui.policy import PolicyScreen
from tui.screens import ConfirmScreen, EventsScreen, NodeScreen
from tui.trace import AskRequestId, TraceScreen

pytestmark = pytest.mark.slow

SIZE = (160, 40)
MARKUP = "[bold red]x[/]"


@pytest.fixture
def console(nats_url: str) -> HybridgenConsole:
    return HybridgenConsole(BusSettings(url=nats_url))


async def connected_and_seen(pilot: Pilot[None], app: HybridgenConsole, node_id: str) -> None:
    await until(pilot, lambda: app.connected, "connected to NATS")
    await until(pilot, lambda: app.fleet.get(node_id) is not None, f"a heartbeat of {node_id}")
    # The cursor starts on the first row: with a worker in the fleet too, whichever heartbeat
    # came first. The operator moves it to the node, as with the arrow keys.
    table = app.fleet_table
    await until(pilot, lambda: node_id in table.rows, f"{node_id} listed")
    table.move_cursor(row=table.get_row_index(node_id))
    await until(pilot, lambda: app.selected_node() == node_id, f"{node_id} selected")


def status_of(app: HybridgenConsole, node_id: str) -> str:
    value = app.fleet_table.get_cell(node_id, "status")
    return value.plain if isinstance(value, Text) else str(value)


async def complete(edge: LiveEdge, **body: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        return await http.post(
            "/v1/completions", json={"model": "hg-edge", "max_tokens": 3, **body}
        )


def events_of(app: HybridgenConsole, request_id: str) -> list[wire.Event]:
    return [e for e in app.events.select() if e.request_id == request_id]


def rows(table: DataTable[Any]) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


# --------------------------------------------------------------------------------- tests


async def test_drain_and_resume_from_the_console_reach_a_real_edge(
    console: HybridgenConsole, start_edge: Callable[..., Any]
) -> None:
    edge = await start_edge(telemetry_interval_s=0.2, policy={"perplexity_threshold": 1e9})
    async with console.run_test(size=SIZE) as pilot:
        await connected_and_seen(pilot, console, edge.node_id)
        assert status_of(console, edge.node_id) == "ready"

        await pilot.press("d")
        assert isinstance(console.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: status_of(console, edge.node_id) == "draining", "draining")
        response = await complete(edge, prompt="x")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"

        await pilot.press("u")
        await pilot.press("y")
        await until(pilot, lambda: status_of(console, edge.node_id) == "ready", "ready again")
        response = await complete(edge, prompt="a private prompt")
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]

        # The finished request is one `request` event: its path and timings, never its text.
        await until(pilot, lambda: events_of(console, request_id), "the request event")
        (event,) = events_of(console, request_id)
        assert event.kind == "request" and event.node_id == edge.node_id
        assert event.data["served_by"] == "edge"
        assert event.data["route_reason"] == "in_domain"
        assert event.data["completion_tokens"] >= 1
        assert event.data["finish_reason"] in ("stop", "length")
        assert {"route_ms", "ttft_ms", "total_ms", "prompt_tokens"} <= set(event.data)
        encoded = wire.encode(event)
        assert b"private" not in encoded
        text = response.json()["choices"][0]["text"]
        assert not text.strip() or text.encode() not in encoded


async def test_policy_edit_from_the_console_reaches_the_real_edge(
    console: HybridgenConsole, start_edge: Callable[..., Any], nc: Client
) -> None:
    config = await FleetConfig.open(nc)
    await config.put(subjects.policy_key(), {"latency_budget_ms": 1500})
    edge = await start_edge(telemetry_interval_s=0.2, policy={"second_stage_k": 2})

    def in_force(field: str) -> Any:
        node = console.fleet.get(edge.node_id)
        return (node.heartbeat.extra.get("policy") or {}).get(field) if node else None

    async with console.run_test(size=SIZE) as pilot:
        await connected_and_seen(pilot, console, edge.node_id)
        await until(pilot, lambda: in_force("latency_budget_ms"), "the policy in force")
        assert in_force("latency_budget_ms") == {"value": 1500.0, "source": "fleet"}
        assert in_force("second_stage_k") == {"value": 2, "source": "settings"}
        assert in_force("cloud_timeout_ms")["source"] == "default"

        await pilot.press("p")
        screen = console.screen
        assert isinstance(screen, PolicyScreen)
        await until(pilot, lambda: screen.loaded, "the policy loaded from KV")
        assert screen.key == subjects.policy_key(edge.node_id)
        screen.query_one("#policy-editor", TextArea).load_text('{"perplexity_threshold": 123.5}')
        await pilot.press("ctrl+s")
        assert isinstance(console.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: in_force("perplexity_threshold"), "a reported threshold")
        await until(
            pilot,
            lambda: in_force("perplexity_threshold") == {"value": 123.5, "source": "node"},
            "the edge reporting the new threshold",
        )
        assert await config.get(subjects.policy_key(edge.node_id)) == {
            "perplexity_threshold": 123.5
        }
        await pilot.press("escape")

        await pilot.press("enter")  # the node's detail
        node_screen = console.screen
        assert isinstance(node_screen, NodeScreen)
        policy = node_screen.query_one("#node-policy", Static)
        await until(pilot, lambda: "123.5 (node)" in str(policy.render()), "the policy block")
        shown = str(policy.render())
        assert "perplexity_threshold: 123.5 (node)" in shown
        assert "latency_budget_ms: 1500 (fleet)" in shown
        assert "second_stage_k: 2 (settings)" in shown


async def test_policy_block_fits_the_node_screen_at_80x24(
    console: HybridgenConsole, start_edge: Callable[..., Any]
) -> None:
    edge = await start_edge(telemetry_interval_s=0.2)
    async with console.run_test(size=(80, 24)) as pilot:
        await connected_and_seen(pilot, console, edge.node_id)
        await pilot.press("enter")
        screen = console.screen
        assert isinstance(screen, NodeScreen)
        policy = screen.query_one("#node-policy", Static)
        await until(pilot, lambda: "(source)" in str(policy.render()), "the policy block")
        await pilot.pause()
        # The info column scrolls: brought into view, every line of the block is on screen
        # at once, inside the column and above the events.
        info = screen.query_one("#node-info", VerticalScroll)
        info.scroll_to_widget(policy, animate=False, top=True)
        await pilot.pause()
        region = policy.region
        assert region.height >= len(str(policy.render()).splitlines())
        assert info.region.contains_region(region), (region, info.region)
        assert region.bottom <= screen.query_one("#node-events").region.y


async def test_a_request_traced_across_a_real_edge_and_cloud_worker(
    console: HybridgenConsole,
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
) -> None:
    worker = await start_worker()
    edge = await start_edge(telemetry_interval_s=0.2)
    async with console.run_test(size=SIZE) as pilot:
        await connected_and_seen(pilot, console, edge.node_id)
        response = await complete(edge, prompt="hello", route="cloud")
        assert response.status_code == 200
        assert response.headers["x-hybridgen-served-by"] == "cloud"
        request_id = response.headers["x-request-id"]

        def kinds() -> set[tuple[str, str]]:
            return {(e.role, e.kind) for e in events_of(console, request_id)}

        wanted = {("edge", "fallback"), ("cloud", "request"), ("edge", "request")}
        await until(pilot, lambda: wanted <= kinds(), "the events of the request")
        cloud_event = next(e for e in events_of(console, request_id) if e.role == "cloud")
        assert cloud_event.node_id == worker.node_id
        assert cloud_event.data["origin"] == edge.node_id
        edge_event = next(
            e for e in events_of(console, request_id) if (e.role, e.kind) == ("edge", "request")
        )
        assert edge_event.data["worker"] == worker.node_id
        assert edge_event.data["served_by"] == "cloud"
        assert edge_event.data["route_reason"] == "requested_cloud"
        assert "hop_ms" in edge_event.data

        # The events screen asks for a request id (t) and opens its trace.
        await pilot.press("e")
        assert isinstance(console.screen, EventsScreen)
        await pilot.press("t")
        assert isinstance(console.screen, AskRequestId)
        console.screen.query_one(Input).value = request_id
        await pilot.press("enter")
        trace = console.screen
        assert isinstance(trace, TraceScreen) and trace.request_id == request_id
        table = trace.query_one("#trace", DataTable)
        await until(pilot, lambda: table.row_count >= 4, "the trace drawn")
        path = rows(table)
        assert [row[3] for row in path] == ["decision", "bus hop", "worker", "done"]
        nodes = [edge.node_id, edge.node_id, worker.node_id, edge.node_id]
        assert [row[2] for row in path] == nodes
        assert path[0][0] == "+0.0" and "cloud (requested_cloud)" in path[0][4]
        assert worker.node_id in path[3][4]
        summary = str(trace.query_one("#trace-summary", Static).render())
        assert f"served by cloud ({worker.node_id})" in summary
        assert "requested_cloud" in summary
        await pilot.press("escape")

        # Enter on an event row with a request id opens the same trace.
        events_screen = console.screen
        assert isinstance(events_screen, EventsScreen)
        await pilot.press("slash", *f"req:{request_id} kind:fallback", "enter")
        events_table = events_screen.query_one("#events", DataTable)
        await until(pilot, lambda: events_table.row_count == 1, "the fallback row alone")
        await pilot.press("enter")
        assert isinstance(console.screen, TraceScreen)
        assert console.screen.request_id == request_id


async def test_trace_shows_node_strings_literally(console: HybridgenConsole, nc: Client) -> None:
    request_id = "req-markup"
    events = [
        wire.Event(
            kind="request",
            role="edge",
            node_id="edge-1",
            request_id=request_id,
            message=MARKUP,
            data={
                "served_by": "edge",
                "route_reason": MARKUP,
                "route_ms": 1.0,
                "total_ms": 5.0,
                "finish_reason": "stop",
            },
        ),
        wire.Event(
            kind="note", role="edge", node_id="edge-1", request_id=request_id, message=MARKUP
        ),
    ]
    async with console.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: console.connected, "connected to NATS")
        for event in events:
            await nc.publish(subjects.events("edge", "edge-1"), wire.encode(event))
        await nc.flush()
        await until(pilot, lambda: len(console.events) == 2, "both events")
        await pilot.press("e")
        await pilot.press("t", *request_id, "enter")
        trace = console.screen
        assert isinstance(trace, TraceScreen)
        table = trace.query_one("#trace", DataTable)
        await until(pilot, lambda: table.row_count == 3, "the trace drawn")
        cells = [c for i in range(table.row_count) for c in table.get_row_at(i)]
        assert all(isinstance(c, Text) and not c.spans for c in cells)
        assert MARKUP in [c.plain for c in cells]  # the note's message, as it is
        assert any(MARKUP in c.plain for c in cells if c.plain != MARKUP)  # the route reason
        summary = trace.query_one("#trace-summary", Static).render()
        assert MARKUP in str(summary) and not getattr(summary, "spans", None)
