"""The console driven by Pilot against a real nats-server; the test plays the nodes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable, Static, TextArea

from broker import subjects, wire
from broker.bus import connect
from broker.control import serve_control
from broker.server import NatsServer, free_port
from broker.settings import BusSettings
from broker.store import FleetConfig
from tests.fixtures_tui import Clock, until
from tui.app import HybridgenConsole
from tui.event_log import EventLog
from tui.policy import PolicyScreen
from tui.screens import ConfirmScreen, EventsScreen, NodeScreen
from tui.state import Node
from tui.trust import receive_heartbeat

SIZE = (160, 40)


async def publish_beat(nc: Client, node_id: str, role: str = "edge", **fields: object) -> None:
    heartbeat = wire.Heartbeat(role=role, node_id=node_id, **fields)  # type: ignore[arg-type]
    await nc.publish(subjects.telemetry(role, node_id), wire.encode(heartbeat))
    await nc.flush()


def fleet_order(app: HybridgenConsole) -> list[str]:
    table = app.query_one("#fleet", DataTable)
    return [str(row.key.value) for row in table.ordered_rows]


def cell(app: HybridgenConsole, node_id: str, column: str) -> Text:
    value = app.query_one("#fleet", DataTable).get_cell(node_id, column)
    assert isinstance(value, Text)
    return value


def fleet_node(app: HybridgenConsole, node_id: str) -> Node:
    node = app.fleet.get(node_id)
    assert node is not None
    return node


def notes(app: HybridgenConsole) -> list[str]:
    """The notifications on screen now (the app runs with `notifications=True`)."""
    return [str(toast.render()) for toast in app.screen.query("Toast")]


def bar(app: HybridgenConsole) -> str:
    """The connection bar's text, whichever screen is on top."""
    return str(app.bar.render())


async def connected(pilot: Pilot[None], app: HybridgenConsole) -> None:
    """Until the console is connected, and its bar says so (fresh: all roles, by node)."""
    await until(pilot, lambda: app.connected, "connected to NATS")
    assert bar(app) == f"NATS {app.bus.url}: connected · all roles · sort node asc"


async def seen(pilot: Pilot[None], app: HybridgenConsole, *node_ids: str) -> None:
    await until(pilot, lambda: all(app.fleet.get(n) for n in node_ids), f"heartbeats {node_ids}")
    app.refresh_fleet()
    await pilot.pause()


async def test_rows_appear_go_stale_stay_visible_then_leave(
    console: HybridgenConsole, nc: Client, clock: Clock
) -> None:
    async with console.run_test(size=SIZE, notifications=True) as pilot:
        await connected(pilot, console)
        await publish_beat(nc, "edge-1", model="smol", model_version="3", rps=4.0)
        await publish_beat(nc, "worker-1", role="cloud", status="draining")
        await seen(pilot, console, "edge-1", "worker-1")
        assert fleet_order(console) == ["edge-1", "worker-1"]
        assert cell(console, "edge-1", "status").plain == "ready"
        assert cell(console, "edge-1", "model").plain == "smol@3"
        assert cell(console, "worker-1", "status").plain == "draining"

        clock.now += 6
        await publish_beat(nc, "worker-1", role="cloud")
        await until(pilot, lambda: fleet_node(console, "worker-1").last_seen == clock.now, "beat")
        console.refresh_fleet()
        assert fleet_order(console) == ["edge-1", "worker-1"]
        assert cell(console, "edge-1", "status").plain == "stale"
        assert cell(console, "worker-1", "status").plain == "ready"

        clock.now += 30
        console.refresh_fleet()
        assert fleet_order(console) == []


async def test_sorting_and_filtering(console: HybridgenConsole, nc: Client) -> None:
    async with console.run_test(size=SIZE, notifications=True) as pilot:
        await connected(pilot, console)
        await publish_beat(nc, "edge-a", rps=5.0)
        await publish_beat(nc, "edge-b", rps=1.0)
        await publish_beat(nc, "worker-c", role="cloud", rps=9.0)
        await seen(pilot, console, "edge-a", "edge-b", "worker-c")
        assert fleet_order(console) == ["edge-a", "edge-b", "worker-c"]

        while console.sort_by != "rps":
            await pilot.press("s")
        assert fleet_order(console) == ["edge-b", "edge-a", "worker-c"]
        await pilot.press("r")
        assert fleet_order(console) == ["worker-c", "edge-a", "edge-b"]

        await pilot.press("t")  # role: edge
        assert fleet_order(console) == ["edge-a", "edge-b"]
        await pilot.press("t")  # role: cloud
        assert fleet_order(console) == ["worker-c"]
        await pilot.press("t", "t")  # api, then all again
        assert console.role is None

        await pilot.press("slash", *"edge-b", "enter")
        assert fleet_order(console) == ["edge-b"]
        assert console.query_one("#fleet", DataTable).has_focus


async def test_node_strings_are_shown_literally(console: HybridgenConsole, nc: Client) -> None:
    markup = "[bold red]x[/]"
    async with console.run_test(size=SIZE, notifications=True) as pilot:
        await connected(pilot, console)
        await publish_beat(nc, "edge-1", model=markup)
        event = wire.Event(kind="error", role="edge", node_id="edge-1", message=markup)
        await nc.publish(subjects.events("edge", "edge-1"), wire.encode(event))
        await seen(pilot, console, "edge-1")
        model = cell(console, "edge-1", "model")
        assert model.plain == markup
        assert not model.spans
        await until(pilot, lambda: len(console.events) == 1, "the event")

        await pilot.press("e")
        assert isinstance(console.screen, EventsScreen)
        table = console.screen.query_one("#events", DataTable)
        await until(pilot, lambda: table.row_count == 1, "the event row")
        message = table.get_row_at(0)[-1]
        assert isinstance(message, Text) and message.plain == markup and not message.spans
        await pilot.press("escape")

        await pilot.press("enter")  # the node's detail
        assert isinstance(console.screen, NodeScreen)
        figures = console.screen.query_one("#node-figures", Static).render()
        assert f"model@version: {markup}" in str(figures)
        assert not getattr(figures, "spans", None)


async def test_events_screen_filters(console: HybridgenConsole, nc: Client) -> None:
    async with console.run_test(size=SIZE, notifications=True) as pilot:
        await connected(pilot, console)
        for node_id, kind, request_id in [("e1", "fallback", "r1"), ("e2", "error", "r2")]:
            event = wire.Event(kind=kind, role="edge", node_id=node_id, request_id=request_id)
            await nc.publish(subjects.events("edge", node_id), wire.encode(event))
        await until(pilot, lambda: len(console.events) == 2, "two events")
        await pilot.press("e")
        table = console.screen.query_one("#events", DataTable)
        await until(pilot, lambda: table.row_count == 2, "both events listed")
        await pilot.press("slash", *"req:r2", "enter")
        assert table.has_focus
        assert [str(c) for c in table.get_row_at(0)[2:5]] == ["e2", "error", "r2"]
        assert table.row_count == 1


async def test_drain_asks_first_and_sends_the_verb(console: HybridgenConsole, nc: Client) -> None:
    received: list[str] = []

    async def drain(request: wire.ControlRequest) -> wire.ControlReply:
        received.append(request.verb)
        return wire.ControlReply(ok=True, message="draining now")

    service = await serve_control(nc, node_id="edge-1", role="edge", handlers={"drain": drain})
    try:
        async with console.run_test(size=SIZE, notifications=True) as pilot:
            await connected(pilot, console)
            await publish_beat(nc, "edge-1")
            await seen(pilot, console, "edge-1")

            await pilot.press("d")
            assert isinstance(console.screen, ConfirmScreen)
            await pilot.press("n")
            assert not isinstance(console.screen, ConfirmScreen)
            assert "drain edge-1: cancelled" in notes(console)

            await pilot.press("d")
            assert isinstance(console.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: any("ok" in n for n in notes(console)), "the reply")
            assert received == ["drain"]  # the cancelled one sent nothing
            assert "drain edge-1: ok draining now" in notes(console)

            await pilot.press("u", "y")  # nobody answers resume
            await until(pilot, lambda: any("resume" in n for n in notes(console)), "refusal")
            assert any("does not answer resume" in n for n in notes(console))
    finally:
        await service.stop()


async def test_drain_is_recorded_as_an_operator_event(
    console: HybridgenConsole, nc: Client
) -> None:
    recorded: list[wire.Event] = []

    async def on_event(msg: Msg) -> None:
        recorded.append(wire.decode(msg.data, wire.Event))

    await nc.subscribe(subjects.events_of_role("operator"), cb=on_event)

    async def drain(request: wire.ControlRequest) -> wire.ControlReply:
        return wire.ControlReply(ok=True, message="draining now")

    service = await serve_control(nc, node_id="edge-1", role="edge", handlers={"drain": drain})
    try:
        async with console.run_test(size=SIZE, notifications=True) as pilot:
            await connected(pilot, console)
            await publish_beat(nc, "edge-1")
            await seen(pilot, console, "edge-1")
            await pilot.press("d", "y")
            await until(pilot, lambda: bool(recorded), "the operator event")
            event = recorded[0]
            assert event.kind == "operator_action"
            assert event.role == "operator"
            assert event.node_id == console.console_id
            assert event.node_id.startswith("console-")
            assert event.data == {
                "action": "drain",
                "target": "edge-1",
                "ok": True,
                "message": "drain edge-1: ok draining now",
            }
            # every console sees it on its events screen, this one included
            await until(
                pilot,
                lambda: any(e.kind == "operator_action" for e in console.events.select(limit=10)),
                "the event in the console's log",
            )
    finally:
        await service.stop()


async def open_policy(pilot: Pilot[None], app: HybridgenConsole) -> PolicyScreen:
    await pilot.press("p")
    screen = app.screen
    assert isinstance(screen, PolicyScreen)
    await until(pilot, lambda: screen.loaded, "the policy loaded from KV")
    return screen


async def type_policy(pilot: Pilot[None], screen: PolicyScreen, text: str) -> None:
    screen.query_one("#policy-editor", TextArea).load_text(text)
    await pilot.press("ctrl+s")


async def test_policy_edit_lands_in_kv_after_confirming(
    console: HybridgenConsole, nc: Client
) -> None:
    config = await FleetConfig.open(nc)
    await config.put(subjects.policy_key(), {"perplexity_threshold": 40.0})
    recorded: list[wire.Event] = []

    async def on_event(msg: Msg) -> None:
        recorded.append(wire.decode(msg.data, wire.Event))

    await nc.subscribe(subjects.events_of_role("operator"), cb=on_event)
    async with console.run_test(size=SIZE, notifications=True) as pilot:
        await connected(pilot, console)
        await publish_beat(nc, "edge-1")
        await seen(pilot, console, "edge-1")
        screen = await open_policy(pilot, console)
        assert screen.key == subjects.policy_key("edge-1")
        shown = str(screen.query_one("#policy-current", Static).render())
        assert '"perplexity_threshold": 40.0' in shown  # the fleet default
        assert "policy.node.edge-1): (none)" in shown

        await type_policy(pilot, screen, '{"perplexity_threshold": 25.5}')
        assert isinstance(console.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: any("written" in n for n in notes(console)), "the write")
        assert await config.get(subjects.policy_key("edge-1")) == {"perplexity_threshold": 25.5}
        assert await config.get(subjects.policy_key()) == {"perplexity_threshold": 40.0}
        await until(pilot, lambda: bool(recorded), "the operator event")
        assert recorded[0].data["action"] == "policy-write"
        assert recorded[0].data["target"] == "edge-1"
        assert recorded[0].data["ok"] is True

        await pilot.press("ctrl+t")  # now the fleet default
        assert screen.key == subjects.policy_key()
        await type_policy(pilot, screen, '{"latency_budget_ms": 900}')
        await pilot.press("y")
        await until(pilot, lambda: screen.fleet == {"latency_budget_ms": 900}, "fleet write")
        assert await config.get(subjects.policy_key()) == {"latency_budget_ms": 900}
        await pilot.press("escape")
        assert not isinstance(console.screen, PolicyScreen)


async def test_policy_edit_cancelled_writes_nothing(console: HybridgenConsole, nc: Client) -> None:
    config = await FleetConfig.open(nc)
    async with console.run_test(size=SIZE, notifications=True) as pilot:
        await connected(pilot, console)
        screen = await open_policy(pilot, console)  # no node: the fleet default
        assert screen.key == subjects.policy_key()
        await type_policy(pilot, screen, '{"perplexity_threshold": 30}')
        assert isinstance(console.screen, ConfirmScreen)
        await pilot.press("n")
        assert isinstance(console.screen, PolicyScreen)
        assert "policy.default: cancelled, nothing written" in notes(console)
        assert await config.get(subjects.policy_key()) is None


async def test_invalid_policy_is_refused_and_nothing_written(
    console: HybridgenConsole, nc: Client
) -> None:
    config = await FleetConfig.open(nc)
    async with console.run_test(size=SIZE, notifications=True) as pilot:
        await connected(pilot, console)
        await publish_beat(nc, "edge-1")
        await seen(pilot, console, "edge-1")
        screen = await open_policy(pilot, console)
        await type_policy(pilot, screen, '{"perplexity_threshold": -3}')
        assert isinstance(console.screen, PolicyScreen)  # no confirmation asked
        refusal = [n for n in notes(console) if "refused" in n]
        assert refusal and "perplexity_threshold" in refusal[0]
        assert "greater than 0" in refusal[0]  # pydantic's own message

        await type_policy(pilot, screen, "[1, 2]")
        assert isinstance(console.screen, PolicyScreen)
        assert any("must be a JSON object" in n for n in notes(console))
        assert await config.get(subjects.policy_key("edge-1")) is None
        assert await config.get(subjects.policy_key()) is None


async def test_shows_disconnected_when_nats_is_down() -> None:
    app = HybridgenConsole(BusSettings(url="nats://127.0.0.1:1", connect_timeout_s=0.2))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        assert not app.connected
        expected = "NATS nats://127.0.0.1:1: disconnected (retrying) · all roles · sort node asc"
        assert bar(app) == expected
        await pilot.press("d")
        assert "no node selected" in notes(app)


async def test_actions_that_need_the_bus_say_it_is_not_there() -> None:
    """Disconnected, drain (of a node it still shows), policy, roll-out and experiment each
    say `not connected to NATS` instead of acting."""
    app = HybridgenConsole(BusSettings(url="nats://127.0.0.1:1", connect_timeout_s=0.2))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        beat = wire.Heartbeat(role="edge", node_id="edge-1")
        assert receive_heartbeat(app.fleet, subjects.telemetry("edge", "edge-1"), beat)
        app.refresh_fleet()
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "asks first")
        await pilot.press("y")
        await until(pilot, lambda: "drain edge-1: not connected to NATS" in notes(app), "drain")
        for key, what in (("p", "policy"), ("m", "roll-out"), ("x", "experiment")):
            await pilot.press(key)
            await until(pilot, lambda: f"{what}: not connected to NATS" in notes(app), what)  # noqa: B023
        assert len(app.screen_stack) == 1  # no screen opened


async def test_connects_once_the_broker_appears(
    start_nats: Callable[..., Awaitable[NatsServer]],
) -> None:
    """The first connection fails (nothing listens yet): the console keeps trying, and
    connects by itself once a broker serves on its URL."""
    port = free_port()
    app = HybridgenConsole(BusSettings(url=f"nats://127.0.0.1:{port}", connect_timeout_s=0.2))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        assert (
            bar(app)
            == f"NATS nats://127.0.0.1:{port}: disconnected (retrying) · all roles · sort node asc"
        )
        await start_nats("late", port=port, jetstream=False)
        await connected(pilot, app)


def test_the_tui_command_is_registered_and_checks_its_thresholds() -> None:
    from hybridgen.cli import COMMANDS, _resolve
    from tui.cli import main

    assert _resolve(*COMMANDS["tui"][:2]) is main
    assert main(["--stale-after", "10", "--gone-after", "5"]) == 2


async def test_reconnects_after_the_broker_restarts(
    start_nats: Callable[..., Awaitable[NatsServer]], tmp_path: Path
) -> None:
    """The broker goes away and comes back on the same port: the console says so, then
    reconnects by itself and shows new heartbeats, with no restart."""
    first = await start_nats("broker")
    port = int(first.client_url.rsplit(":", 1)[1])
    app = HybridgenConsole(BusSettings(url=first.client_url), events=EventLog())
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await connected(pilot, app)
        publisher = await connect(first.client_url, name="test-node")
        await publish_beat(publisher, "edge-1", model_version="1")
        await seen(pilot, app, "edge-1")
        await publisher.close()

        await first.shutdown()
        await until(pilot, lambda: not app.connected, "the loss is noticed")
        assert (
            bar(app)
            == f"NATS {first.client_url}: disconnected (retrying) · all roles · sort node asc"
        )
        # A real outage: the client tries to reconnect while nothing listens.
        await until(pilot, lambda: app.nc is not None and app.nc.is_reconnecting, "reconnecting")

        await start_nats("broker", port=port, store_dir=tmp_path / "broker")
        await until(pilot, lambda: app.connected, "reconnected")
        assert bar(app) == f"NATS {first.client_url}: connected · all roles · sort node asc"
        publisher = await connect(first.client_url, name="test-node")
        try:
            await publish_beat(publisher, "edge-1", model_version="2")
            await until(
                pilot,
                lambda: fleet_node(app, "edge-1").heartbeat.model_version == "2",
                "a heartbeat after the reconnect",
            )
        finally:
            await publisher.close()
