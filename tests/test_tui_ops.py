"""Console actions against a real nats-server: model roll-out and roll back with per-node
progress (nodes played by the test, then a real edge), and the test prompt to a real edge."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.text import Text
from textual.widgets import DataTable, Input, Label, OptionList, Static

from broker import subjects, wire
from broker.bus import GenerationService, Responder, connect
from broker.control import serve_control
from broker.errors import NotFound
from broker.server import free_port
from broker.settings import BusSettings
from broker.store import ArtifactStore
from models.registry import ModelSet
from tests.fixtures_tui import Clock, until
from tests.test_tui_app import SIZE, connected, publish_beat, seen
from tui.app import HybridgenConsole
from tui.event_log import EventLog
from tui.prompt import PromptScreen
from tui.rollout import RolloutScreen
from tui.screens import ConfirmScreen, NodeScreen
from tui.state import FleetState

MARKUP = "[bold red]x[/]"


def console_for(nats_url: str, clock: Clock | None = None) -> HybridgenConsole:
    fleet = FleetState(stale_after=5, gone_after=30)
    if clock is not None:
        fleet = FleetState(stale_after=5, gone_after=30, clock=clock)
    return HybridgenConsole(BusSettings(url=nats_url), fleet=fleet, events=EventLog())


async def operator_events(nc: Client) -> list[wire.Event]:
    recorded: list[wire.Event] = []

    async def on_event(msg: Msg) -> None:
        recorded.append(wire.decode(msg.data, wire.Event))

    await nc.subscribe(subjects.events_of_role("operator"), cb=on_event)
    await nc.flush()
    return recorded


def progress(screen: RolloutScreen) -> dict[str, list[str]]:
    """The progress table: node -> [from, to, state, seconds, message] as plain strings."""
    table = screen.query_one("#rollout-progress", DataTable)
    rows: dict[str, list[str]] = {}
    for row in table.ordered_rows:
        cells = table.get_row(row.key)
        assert all(isinstance(c, Text) for c in cells)
        rows[str(row.key.value)] = [c.plain for c in cells[1:]]
    return rows


def prompt_screen(app: HybridgenConsole) -> PromptScreen:
    screen = app.screen
    assert isinstance(screen, PromptScreen), screen
    return screen


def shown(widget: Static) -> Text:
    content = widget.content
    assert isinstance(content, Text)
    return content


# ------------------------------------------------------------------------------- roll-out


async def test_rollout_shows_each_node_halts_at_a_failure_and_rolls_back(
    nats_url: str, nc: Client
) -> None:
    running = {"edge-a": "v1", "edge-b": "v1", "edge-c": "v1"}
    received: dict[str, list[dict[str, Any]]] = {node_id: [] for node_id in running}
    release = asyncio.Event()

    def reload_handler(node_id: str, refuse: bool) -> Any:
        async def reload(request: wire.ControlRequest) -> wire.ControlReply:
            received[node_id].append(dict(request.args))
            version = str(request.args["version"])
            if refuse:
                raise NotFound(f"model set {version!r} is not in hg_models")
            await release.wait()  # the test looks at the table meanwhile
            previous, running[node_id] = running[node_id], version
            info = {"model_version": version, "previous_version": previous, "load_s": 0.5}
            return wire.ControlReply(ok=True, message="model swapped", data=info)

        return reload

    services = [
        await serve_control(
            nc,
            node_id=node_id,
            role="edge",
            handlers={"reload-model": reload_handler(node_id, node_id == "edge-b")},
        )
        for node_id in running
    ]
    store = await ArtifactStore.open(nc)
    await store.put_bytes("v2/manifest.json", b"{}")  # a published version, as listed
    recorded = await operator_events(nc)
    app = console_for(nats_url, Clock())
    try:
        async with app.run_test(size=SIZE) as pilot:
            await connected(pilot, app)
            for node_id in running:
                await publish_beat(nc, node_id, model="hg-edge", model_version="v1")
            await publish_beat(nc, "worker-1", role="cloud", model_version="c1")
            await seen(pilot, app, *running, "worker-1")

            await pilot.press("m")
            screen = app.screen
            assert isinstance(screen, RolloutScreen)
            target = screen.query_one("#rollout-target", Static)
            assert "selected node" in shown(target).plain and screen.targets() == ["edge-a"]
            await pilot.press("ctrl+o")  # every live edge, never the cloud worker
            assert "edge-a, edge-b, edge-c" in shown(target).plain
            assert "worker-1" not in shown(target).plain

            versions = screen.query_one("#rollout-versions", OptionList)
            await until(pilot, lambda: versions.option_count == 1, "the published version")
            versions.focus()
            await pilot.press("down", "enter")
            box = screen.query_one("#rollout-version", Input)
            assert box.value == "v2" and box.has_focus
            await pilot.press("enter")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")

            await until(pilot, lambda: progress(screen)["edge-a"][2] == "loading", "loading")
            table = progress(screen)
            assert table["edge-a"][:3] == ["v1", "v2", "loading"]
            assert table["edge-b"][2] == table["edge-c"][2] == "waiting"
            release.set()

            await until(pilot, lambda: not screen.running and bool(screen.steps), "the end")
            table = progress(screen)
            assert table["edge-a"][:3] == ["v1", "v2", "done"]
            assert "model swapped" in table["edge-a"][4]
            assert table["edge-b"][2] == "failed"
            assert "not in hg_models" in table["edge-b"][4]
            assert table["edge-c"][2] == "skipped"
            assert received == {
                "edge-a": [{"version": "v2"}],
                "edge-b": [{"version": "v2"}],
                "edge-c": [],
            }
            await until(pilot, lambda: len(recorded) == 2, "one event per node tried")
            assert [
                (e.kind, e.data["action"], e.data["target"], e.data["ok"]) for e in recorded
            ] == [
                ("operator_action", "rollout", "edge-a", True),
                ("operator_action", "rollout", "edge-b", False),
            ]
            assert "v1 -> v2" in recorded[0].message

            # edge-a now says it runs v2, as a real edge would
            await publish_beat(nc, "edge-a", model="hg-edge", model_version="v2")
            await until(
                pilot,
                lambda: (
                    (n := app.fleet.get("edge-a")) is not None and n.heartbeat.model_version == "v2"
                ),
                "edge-a's new heartbeat",
            )
            await pilot.press("ctrl+b")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: len(recorded) == 3, "the roll back recorded")
            await until(pilot, lambda: not screen.running, "the roll back done")
            assert received["edge-a"][-1] == {"version": "v1"}  # its previous_version
            assert len(received["edge-b"]) == 1 and received["edge-c"] == []
            table = progress(screen)
            assert list(table) == ["edge-a"] and table["edge-a"][:3] == ["v2", "v1", "done"]
            assert (recorded[2].data["action"], recorded[2].data["ok"]) == ("rollback", True)
            assert running["edge-a"] == "v1"
    finally:
        release.set()
        for service in services:
            await service.stop()


async def test_roll_back_after_the_rollout_screen_was_closed_and_node_screen_keys(
    nats_url: str, nc: Client
) -> None:
    """`m` and `g` on a node's screen reach that node; a roll-out started there can be
    rolled back from a roll-out screen opened later (the app keeps `last_rollout`)."""
    running = {"edge-a": "v1", "edge-b": "v1"}
    received: dict[str, list[dict[str, Any]]] = {node_id: [] for node_id in running}

    def reload_handler(node_id: str) -> Any:
        async def reload(request: wire.ControlRequest) -> wire.ControlReply:
            received[node_id].append(dict(request.args))
            version = str(request.args["version"])
            previous, running[node_id] = running[node_id], version
            info = {"model_version": version, "previous_version": previous}
            return wire.ControlReply(ok=True, message="model swapped", data=info)

        return reload

    services = [
        await serve_control(
            nc, node_id=node_id, role="edge", handlers={"reload-model": reload_handler(node_id)}
        )
        for node_id in running
    ]
    recorded = await operator_events(nc)
    app = console_for(nats_url, Clock())
    try:
        async with app.run_test(size=SIZE) as pilot:
            await connected(pilot, app)
            for node_id in running:
                await publish_beat(
                    nc,
                    node_id,
                    model="hg-edge",
                    model_version="v1",
                    extra={"api_url": "http://127.0.0.1:9/"},
                )
            await seen(pilot, app, *running)
            await pilot.press("down", "enter")  # edge-b's detail
            assert isinstance(app.screen, NodeScreen) and app.screen.node_id == "edge-b"

            await pilot.press("g")
            assert prompt_screen(app).node_id == "edge-b"
            await pilot.press("escape")
            assert isinstance(app.screen, NodeScreen)

            await pilot.press("m")
            screen = app.screen
            assert isinstance(screen, RolloutScreen) and screen.targets() == ["edge-b"]
            await pilot.press(*"v2", "enter", "y")
            await until(pilot, lambda: bool(screen.steps) and not screen.running, "roll-out")
            assert progress(screen)["edge-b"][:3] == ["v1", "v2", "done"]
            assert app.last_rollout == {"edge-b": "v1"}
            await pilot.press("escape", "escape")  # roll-out screen, then node screen
            assert len(app.screen_stack) == 1

            await pilot.press("m")  # a new roll-out screen, on edge-a (selected now)
            again = app.screen
            assert isinstance(again, RolloutScreen) and again is not screen
            await pilot.press("ctrl+b")
            assert isinstance(app.screen, ConfirmScreen)
            question = app.screen.query_one("#question", Label).content
            assert "edge-b -> v1" in str(question)
            await pilot.press("y")
            await until(pilot, lambda: bool(again.steps) and not again.running, "roll back")
            assert received == {"edge-a": [], "edge-b": [{"version": "v2"}, {"version": "v1"}]}
            assert progress(again)["edge-b"][:3] == ["v2", "v1", "done"]
            assert running["edge-b"] == "v1" and app.last_rollout == {}
            await until(pilot, lambda: len(recorded) == 2, "both operator events")
            assert [e.data["action"] for e in recorded] == ["rollout", "rollback"]
    finally:
        for service in services:
            await service.stop()


async def test_rollout_to_a_real_edge_then_its_heartbeat_shows_the_version(
    start_edge: Callable[..., Any],
    nats_url: str,
    nc: Client,
    tiny_models: ModelSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from models import distribution

    await distribution.publish(nc, tiny_models)
    monkeypatch.setenv("HG_HOME", str(tmp_path / "edge-home"))  # the edge pulls the set
    local = tmp_path / "local-build"  # a bare folder: its version is its name
    shutil.copytree(tiny_models.edge_dir("int4"), local)
    edge = await start_edge(model_dir=local)
    recorded = await operator_events(nc)
    app = console_for(nats_url)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await until(
            pilot,
            lambda: (
                (n := app.fleet.get(edge.node_id)) is not None
                and n.heartbeat.model_version == "local-build"
            ),
            "a heartbeat of the edge",
        )
        await seen(pilot, app, edge.node_id)

        await pilot.press("m")
        screen = app.screen
        assert isinstance(screen, RolloutScreen)
        assert screen.targets() == [edge.node_id]
        await pilot.press(*tiny_models.version, "enter", "y")
        await until(pilot, lambda: bool(screen.steps) and not screen.running, "the reload")
        row = progress(screen)[edge.node_id]
        assert row[:3] == ["local-build", tiny_models.version, "done"], row
        await until(pilot, lambda: len(recorded) == 1, "the operator event")
        assert recorded[0].data["ok"] is True

        def beat_version() -> str | None:
            node = app.fleet.get(edge.node_id)
            return None if node is None else node.heartbeat.model_version

        await until(pilot, lambda: beat_version() == tiny_models.version, "a beat of the new set")


# ----------------------------------------------------------------------------- test prompt


async def test_prompt_streams_from_a_real_edge_with_where_why_and_how_fast(
    start_edge: Callable[..., Any],
    nats_url: str,
    nc: Client,
) -> None:
    gate = asyncio.Event()

    async def marked_up(request: wire.GenerateRequest, responder: Responder) -> None:
        """A stand-in cloud worker whose answer contains markup, sent in two pieces."""
        await responder.chunk(text="[bold red]", token_ids=[1])
        await gate.wait()
        await responder.chunk(text="x[/]", token_ids=[2])
        await responder.done("stop", wire.Usage(prompt_tokens=3, completion_tokens=2))

    worker_nc = await connect(nats_url, name="markup-worker")
    # The perplexity rule off: the auto route answers on the edge.
    edge = await start_edge(api_keys=["s3cret"], policy={"perplexity_threshold": 1e9})
    edge.node.settings.advertise_url = edge.url  # uvicorn bound a free port
    recorded = await operator_events(nc)
    app = console_for(nats_url)
    try:
        async with (
            GenerationService(worker_nc, model="hg-cloud", handler=marked_up, node_id="w"),
            app.run_test(size=SIZE) as pilot,
        ):
            await connected(pilot, app)
            await until(
                pilot,
                lambda: (
                    (n := app.fleet.get(edge.node_id)) is not None
                    and n.heartbeat.extra.get("api_url") == edge.url
                ),
                "a heartbeat with the api_url",
            )
            await seen(pilot, app, edge.node_id)

            # No key: the edge's error envelope is shown.
            await pilot.press("g")
            screen = prompt_screen(app)
            await pilot.press(*"hello", "enter")
            await until(pilot, lambda: screen.answer is not None, "the refusal")
            stats = screen.query_one("#prompt-stats", Static)
            assert "HTTP 401" in shown(stats).plain
            await pilot.press("escape")

            app.edge_api_key = "s3cret"
            await pilot.press("g")
            screen = prompt_screen(app)
            await pilot.press(*"hello there", "enter")
            await until(pilot, lambda: screen.answer is not None, "the local answer")
            answer = screen.answer
            assert answer is not None and answer.ok, answer
            assert answer.served_by == "edge" and answer.route_reason and answer.request_id
            assert (
                answer.text
                and shown(screen.query_one("#prompt-answer", Static)).plain == answer.text
            )
            figures = shown(screen.query_one("#prompt-stats", Static)).plain
            assert "served_by: edge" in figures
            assert f"route_reason: {answer.route_reason}" in figures
            assert f"request id: {answer.request_id}" in figures
            for label in ("TTFT: ", "tokens/s: ", "total: "):
                assert label in figures
            assert "TTFT: -" not in figures and "total: -" not in figures

            await pilot.press("ctrl+t")  # ask for the cloud: the stand-in worker answers
            assert "route: cloud" in shown(screen.query_one("#prompt-target", Static)).plain
            box = screen.query_one("#prompt-input", Input)
            box.value = ""
            await pilot.press(*"again", "enter")
            answer_box = screen.query_one("#prompt-answer", Static)
            await until(pilot, lambda: shown(answer_box).plain == "[bold red]", "the first piece")
            assert screen.streaming  # shown while the answer is still coming
            gate.set()
            await until(pilot, lambda: not screen.streaming, "the cloud answer")
            answer = screen.answer
            assert answer is not None and answer.ok, answer
            assert (answer.served_by, answer.route_reason) == ("cloud", "requested_cloud")
            text = shown(answer_box)
            assert text.plain == MARKUP and not text.spans  # shown as written, not as markup
            assert str(answer_box.render()) == MARKUP

            await until(pilot, lambda: len(recorded) == 3, "three operator events")
            assert [(e.data["action"], e.data["target"], e.data["ok"]) for e in recorded] == [
                ("test-prompt", edge.node_id, False),
                ("test-prompt", edge.node_id, True),
                ("test-prompt", edge.node_id, True),
            ]
            assert "served_by cloud (requested_cloud)" in recorded[2].message
    finally:
        gate.set()
        await worker_nc.close()


async def test_prompt_to_an_unreachable_edge_says_so_and_non_edges_are_refused(
    nats_url: str, nc: Client
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    recorded = await operator_events(nc)
    app = console_for(nats_url, Clock())
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await publish_beat(nc, "edge-away", extra={"api_url": url})
        await publish_beat(nc, "edge-mute")  # no api_url
        await publish_beat(nc, "worker-1", role="cloud", extra={"api_url": url})
        await seen(pilot, app, "edge-away", "edge-mute", "worker-1")
        table = app.query_one("#fleet", DataTable)

        for node_id in ("edge-mute", "worker-1"):
            table.move_cursor(row=table.get_row_index(node_id))
            await pilot.press("g")
            assert not isinstance(app.screen, PromptScreen), node_id

        table.move_cursor(row=table.get_row_index("edge-away"))
        await pilot.press("g")
        screen = app.screen
        assert isinstance(screen, PromptScreen)
        await pilot.press(*"anyone there", "enter")
        await until(pilot, lambda: screen.answer is not None, "the failure")
        stats = shown(screen.query_one("#prompt-stats", Static)).plain
        assert f"cannot connect to {url}" in stats
        assert isinstance(app.screen, PromptScreen)  # still there, nothing crashed
        await until(pilot, lambda: len(recorded) == 1, "the operator event")
        assert (recorded[0].data["action"], recorded[0].data["ok"]) == ("test-prompt", False)


def test_edge_settings_advertise_a_reachable_api_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge.settings import EdgeSettings

    assert EdgeSettings(host="127.0.0.1", port=8401).advertise_url == "http://127.0.0.1:8401"
    wildcard = EdgeSettings(host="0.0.0.0", port=8401).advertise_url
    assert wildcard == f"http://{socket.gethostname()}:8401"
    assert EdgeSettings(host="::1", port=8401).advertise_url == "http://[::1]:8401"
    assert EdgeSettings(port=0).advertise_url is None  # the port is not known yet
    monkeypatch.setenv("HG_EDGE_ADVERTISE_URL", "http://edge.example:9000/")
    assert EdgeSettings(port=0).advertise_url == "http://edge.example:9000"
