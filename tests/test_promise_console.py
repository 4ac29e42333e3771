"""docs/console.md promises: the mouse works (click a row, a button, a footer key),
`--edge-api-key` defaults to `HG_CONSOLE_EDGE_API_KEY`, and an action cancelled in its
dialog is recorded as no event. The console runs under Pilot against a real nats-server;
the test plays the nodes (their control services are real, on the same bus)."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import Client
from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets import Input

from broker import wire
from broker.control import serve_control
from tests.fixtures_tui import until
from tests.test_tui_app import SIZE, connected, notes, publish_beat, seen
from tests.test_tui_ops import operator_events
from tui.app import HybridgenConsole
from tui.experiment import ExperimentScreen
from tui.policy import PolicyScreen
from tui.rollout import RolloutScreen
from tui.screens import ConfirmScreen, NodeScreen


async def serve_verbs(nc: Client, node_id: str, received: list[str]) -> Any:
    """`node_id`'s control service: answers drain and resume, appending each verb."""

    async def answer(request: wire.ControlRequest) -> wire.ControlReply:
        received.append(request.verb)
        return wire.ControlReply(ok=True, message=f"{request.verb} done")

    return await serve_control(
        nc, node_id=node_id, role="edge", handlers={"drain": answer, "resume": answer}
    )


def footer_key(app: HybridgenConsole, key: str) -> Widget:
    """The footer's entry for `key` on the screen in view."""
    [found] = [k for k in app.screen.query("FooterKey") if getattr(k, "key", None) == key]
    return found


async def click(pilot: Pilot[None], target: Widget | str, offset: tuple[int, int] = (1, 0)) -> None:
    """Click `target` and check the click landed on it."""
    assert await pilot.click(target, offset=offset), f"the click missed {target}"
    await pilot.pause()


def row_offset(index: int) -> tuple[int, int]:
    """Where row `index` of the fleet table is, under its header line."""
    return (2, 1 + index)


async def test_the_mouse_clicks_rows_buttons_and_footer_keys(
    console: HybridgenConsole, nc: Client
) -> None:
    """A click on a row selects it and a click on the selected row opens it; a footer key
    clicked does what the key does (here drain and resume, which ask first); the dialog's
    buttons answer it: No sends nothing (the drain after it is the first verb sent to that
    node since), Yes sends the verb."""
    received: list[str] = []
    service = await serve_verbs(nc, "edge-1", received)
    try:
        async with console.run_test(size=SIZE, notifications=True) as pilot:
            await connected(pilot, console)
            await publish_beat(nc, "edge-1")
            await publish_beat(nc, "edge-2")
            await seen(pilot, console, "edge-1", "edge-2")
            assert console.selected_node() == "edge-1"

            await click(pilot, "#fleet", row_offset(1))
            assert console.selected_node() == "edge-2"
            assert not isinstance(console.screen, NodeScreen)
            await click(pilot, "#fleet", row_offset(1))
            assert isinstance(console.screen, NodeScreen)
            assert console.screen.node_id == "edge-2"
            await pilot.press("escape")

            await click(pilot, "#fleet", row_offset(0))
            assert console.selected_node() == "edge-1"
            await click(pilot, footer_key(console, "u"))
            assert isinstance(console.screen, ConfirmScreen)
            assert console.screen.question == "resume node edge-1?"
            await click(pilot, "#no")
            assert not isinstance(console.screen, ConfirmScreen)
            assert "resume edge-1: cancelled" in notes(console)

            await click(pilot, footer_key(console, "d"))
            assert isinstance(console.screen, ConfirmScreen)
            assert console.screen.question == "drain node edge-1?"
            await click(pilot, "#yes")
            await until(pilot, lambda: "drain edge-1: ok drain done" in notes(console), "reply")
            assert received == ["drain"]
    finally:
        await service.stop()


def test_the_edge_api_key_defaults_to_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`hybridgen tui` run with `HG_CONSOLE_EDGE_API_KEY` set gives the console that key for
    its test prompts; `--edge-api-key` wins over it; with neither there is none. The app is
    built by the command itself; only its `run` (which takes over the terminal, which a
    test does not have) is replaced by keeping the app."""
    from hybridgen.cli import main

    apps: list[HybridgenConsole] = []
    monkeypatch.setattr(HybridgenConsole, "run", lambda self, *a, **k: apps.append(self))
    argv = ["tui", "--nats", "nats://127.0.0.1:1"]

    monkeypatch.setenv("HG_CONSOLE_EDGE_API_KEY", "from-the-env")
    assert main(argv) == 0
    assert main([*argv, "--edge-api-key", "from-the-flag"]) == 0
    monkeypatch.delenv("HG_CONSOLE_EDGE_API_KEY")
    assert main(argv) == 0
    assert [app.edge_api_key for app in apps] == ["from-the-env", "from-the-flag", None]


async def submit(pilot: Pilot[None], box: Input, text: str) -> None:
    box.value = text
    box.focus()
    await pilot.press("enter")


async def test_a_cancelled_action_records_no_event(console: HybridgenConsole, nc: Client) -> None:
    """Drain (`n`), resume (Escape), a policy write, a roll-out and an experiment start,
    each cancelled in its dialog, publish no operator event: the first one that arrives is
    the drain confirmed after them all."""
    recorded = await operator_events(nc)
    received: list[str] = []
    service = await serve_verbs(nc, "edge-1", received)
    try:
        async with console.run_test(size=SIZE, notifications=True) as pilot:
            await connected(pilot, console)
            await publish_beat(nc, "edge-1", model_version="1")
            await seen(pilot, console, "edge-1")

            async def cancel(*keys: str) -> None:
                assert isinstance(console.screen, ConfirmScreen), console.screen
                await pilot.press(*keys)
                assert not isinstance(console.screen, ConfirmScreen)

            await pilot.press("d")
            await cancel("n")
            await pilot.press("u")
            await cancel("escape")

            await pilot.press("p")
            policy = console.screen
            assert isinstance(policy, PolicyScreen)
            await until(pilot, lambda: policy.loaded, "the policy loaded")
            await pilot.press("ctrl+s")  # the editor holds `{}`: write it?
            await cancel("n")
            await pilot.press("escape")

            await pilot.press("m")
            rollout = console.screen
            assert isinstance(rollout, RolloutScreen)
            await submit(pilot, rollout.query_one("#rollout-version", Input), "2")
            await cancel("n")
            await pilot.press("escape")

            await pilot.press("x")
            experiment = console.screen
            assert isinstance(experiment, ExperimentScreen)
            await until(pilot, lambda: experiment.loaded, "the experiment loaded")
            form = experiment.query_one("#experiment-form", Input)
            await submit(pilot, form, "trial cloud:hg-cloud 0.5")
            await cancel("n")
            await pilot.press("escape")
            assert len(console.screen_stack) == 1

            await pilot.press("d", "y")
            await until(pilot, lambda: bool(recorded), "the confirmed drain's event")
            assert [(e.data["action"], e.data["target"], e.data["ok"]) for e in recorded] == [
                ("drain", "edge-1", True)
            ]
            assert received == ["drain"]
    finally:
        await service.stop()
