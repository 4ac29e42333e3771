"""Snapshot tests of the console's screens: `export_screenshot()` SVGs against committed files.

The data is deterministic: a `FleetState` on a fake clock fed heartbeats directly, an
`EventLog` of fixed-time events, times drawn in UTC, and the console pointed at a NATS URL
nobody listens on, so the bar always says disconnected. The fleet screen at 100x30 is the
README's screenshot (docs/img/console.svg).

The SVGs depend on Textual's and textual-plot's drawing (both pinned in pyproject.toml). After
a deliberate change of a screen, accept the new pictures with
`HG_UPDATE_SNAPSHOTS=1 pytest tests/test_tui_snapshots.py`, look at them, and commit them.
"""

from __future__ import annotations

import html
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.containers import VerticalScroll
from textual.pilot import Pilot
from textual.widgets import DataTable, Input

from broker import wire
from broker.settings import BusSettings
from tests.fixtures_tui import Clock, until
from tui.app import HybridgenConsole
from tui.event_log import EventLog
from tui.experiment import ExperimentScreen
from tui.fleet_summary import SummaryHistory
from tui.policy import PolicyScreen
from tui.prompt import PromptScreen
from tui.rollout import RolloutScreen
from tui.screens import (
    HELP_SECTIONS,
    ConfirmScreen,
    EventsScreen,
    HelpScreen,
    NodeScreen,
    help_text,
    key_label,
)
from tui.state import FleetState
from tui.summary import SummaryScreen
from tui.trace import TraceScreen

SNAPSHOTS = Path(__file__).parent / "snapshots"
README_SHOT = Path(__file__).parent.parent / "docs" / "img" / "console.svg"
UPDATE_ENV = "HG_UPDATE_SNAPSHOTS"
#: A NATS URL nobody listens on: the console stays disconnected, the bar says so.
NOWHERE = BusSettings(url="nats://127.0.0.1:1", connect_timeout_s=0.2)
#: The fake clock's start, and the wall-clock time of the events (2026-11-20 09:00 UTC).
START = 1000.0
EPOCH = 1_795_165_200.0
TRACED = "req-7f3a9c"


def _policy(threshold: float, source: str) -> dict[str, dict[str, Any]]:
    return {
        "perplexity_threshold": {"value": threshold, "source": source},
        "second_stage_k": {"value": 4, "source": "default"},
        "latency_budget_ms": {"value": 800.0, "source": "fleet"},
        "breaker.failures": {"value": 5, "source": "default"},
    }


def _beats(step: int) -> list[wire.Heartbeat]:
    """One heartbeat of every node at step `step` of the demo (the figures wander a bit)."""
    wave = (step % 7) / 7
    edge_common: dict[str, Any] = {"role": "edge", "model": "hg-edge", "version": "0.9.0"}
    beats = [
        wire.Heartbeat(
            node_id="edge-lab-1",
            model_version="2026.11.2",
            in_flight=1 + step % 3,
            queue_depth=step % 4 // 2,
            rps=4.0 + 2 * wave,
            latency_p50_ms=38 + 10 * wave,
            latency_p95_ms=120 + 40 * wave,
            tokens_per_s=180 + 30 * wave,
            fallback_ratio={"low_confidence": 0.18, "context_overflow": 0.04},
            extra={
                "api_url": "http://10.0.0.11:8000/",
                "policy": _policy(14.5, "model_set"),
                "cache_entries": 212,
            },
            **edge_common,
        ),
        wire.Heartbeat(
            node_id="edge-lab-2",
            status="draining",
            model_version="2026.11.2",
            in_flight=2,
            queue_depth=3,
            rps=1.5 - wave,
            latency_p50_ms=44,
            latency_p95_ms=150,
            tokens_per_s=90,
            fallback_ratio={"low_confidence": 0.25},
            extra={"api_url": "http://10.0.0.12:8000/", "policy": _policy(12.0, "node")},
            **edge_common,
        ),
        wire.Heartbeat(
            node_id="cloud-gpu-1",
            role="cloud",
            model="hg-cloud",
            model_version="2026.11.1",
            version="0.9.0",
            in_flight=3,
            queue_depth=1 + step % 2,
            rps=2.0 + wave,
            latency_p50_ms=210,
            latency_p95_ms=480 + 60 * wave,
            tokens_per_s=950,
        ),
        wire.Heartbeat(
            node_id="cloud-gpu-2",
            role="cloud",
            model="hg-cloud",
            model_version="2026.11.1",
            version="0.9.0",
            in_flight=1,
            rps=1.0,
            latency_p50_ms=190,
            latency_p95_ms=410,
            tokens_per_s=610,
            errors=1,
        ),
        wire.Heartbeat(
            node_id="api-1",
            role="api",
            version="0.9.0",
            in_flight=2,
            rps=3.0,
            latency_p50_ms=230,
            latency_p95_ms=520,
        ),
    ]
    if step <= 20:  # edge-shop-3 stops reporting: stale at the end
        beats.append(
            wire.Heartbeat(
                node_id="edge-shop-3",
                model_version="2026.11.1",
                rps=0.8,
                latency_p50_ms=61,
                latency_p95_ms=230,
                tokens_per_s=70,
                fallback_ratio={"edge_overloaded": 0.4},
                **edge_common,
            )
        )
    return beats


def demo_fleet() -> tuple[FleetState, SummaryHistory]:
    """A fleet of 3 edges (one draining, one stale), 2 cloud workers and an API, as heard
    over a minute on a fake clock, with the summary sampled every two seconds."""
    clock = Clock(START)
    fleet = FleetState(stale_after=5, gone_after=600, clock=clock)
    history = SummaryHistory()
    for step in range(31):
        clock.now = START + 2 * step
        for beat in _beats(step):
            fleet.apply_heartbeat(beat.model_copy(update={"ts": EPOCH + 2 * step}))
        history.sample(fleet.summary(), clock.now)
    clock.now += 1.0
    return fleet, history


def demo_events() -> EventLog:
    """Fixed-time events: one request traced edge -> bus -> worker, and the usual others."""

    def event(offset_s: float, **fields: Any) -> wire.Event:
        return wire.Event(ts=EPOCH + offset_s, **fields)

    log = EventLog()
    log.extend(
        [
            event(
                5.0,
                kind="drain",
                role="edge",
                node_id="edge-lab-2",
                message="draining: 2 requests in flight",
            ),
            event(
                12.0,
                kind="operator_action",
                role="operator",
                node_id="console-ops-1a2b",
                message="policy-write edge-lab-2: ok revision 7",
                data={"action": "policy-write", "target": "edge-lab-2", "ok": True},
            ),
            event(
                20.000,
                kind="fallback",
                role="edge",
                node_id="edge-lab-1",
                request_id=TRACED,
                message="low_confidence: sent to the cloud",
            ),
            event(
                20.410,
                kind="request",
                role="cloud",
                node_id="cloud-gpu-1",
                request_id=TRACED,
                message="served for edge-lab-1",
                data={
                    "origin": "edge-lab-1",
                    "finish_reason": "stop",
                    "prompt_tokens": 18,
                    "completion_tokens": 64,
                    "ttft_ms": 95.0,
                    "total_ms": 380.0,
                },
            ),
            event(
                20.450,
                kind="request",
                role="edge",
                node_id="edge-lab-1",
                request_id=TRACED,
                message="served by cloud (low_confidence)",
                data={
                    "served_by": "cloud",
                    "route_reason": "low_confidence",
                    "worker": "cloud-gpu-1",
                    "finish_reason": "stop",
                    "prompt_tokens": 18,
                    "completion_tokens": 64,
                    "route_ms": 12.0,
                    "ttft_ms": 140.0,
                    "hop_ms": 8.5,
                    "total_ms": 462.0,
                },
            ),
            event(
                31.0,
                kind="error",
                role="cloud",
                node_id="cloud-gpu-2",
                request_id="req-0c41d2",
                message="generation failed: CUDA out of memory [retry on cloud-gpu-1]",
            ),
            event(
                44.0,
                kind="model_swap",
                role="edge",
                node_id="edge-lab-1",
                message="model set 2026.11.1 -> 2026.11.2 (load 3.2 s)",
            ),
        ]
    )
    return log


def demo_console() -> HybridgenConsole:
    """The console on the demo fleet and events, disconnected."""
    fleet, history = demo_fleet()
    app = HybridgenConsole(NOWHERE, fleet=fleet, events=demo_events(), console_id="console-demo")
    app.summary_history = history
    return app


# -- comparing ----------------------------------------------------------------------------------

_TEXT = re.compile(r'<text class="[^"]*" x="([\d.]+)" y="([\d.]+)"[^>]*>([^<]*)</text>')
#: Width of one terminal cell in Rich's SVG export (0.61 x its 20 px font).
_CELL_PX = 12.2


def screen_lines(svg: str) -> list[str]:
    """The characters of an exported screen, one string per terminal line (the SVG leaves
    out runs of blanks: each run of text is put back at its column)."""
    rows: dict[float, list[str]] = {}
    for x, y, text in _TEXT.findall(svg):
        line = rows.setdefault(float(y), [])
        column = round(float(x) / _CELL_PX)
        line.extend(" " * (column - len(line)))
        line[column:] = html.unescape(text).replace("\xa0", " ")
    return ["".join(line).rstrip() for _, line in sorted(rows.items())]


def tick(app: Any) -> None:
    """What the timers of the app and of the screen on top do, now."""
    app.refresh_tick()
    for name in ("redraw", "tick"):
        method = getattr(app.screen, name, None)
        if callable(method):
            method()


async def settled(pilot: Pilot[None]) -> str:
    """The screen as an SVG once drawing has settled: a tick of the app and of the screen in
    between changes nothing (a screen that changes on every tick never settles: it fails)."""
    app = pilot.app
    shots: list[str] = []

    def steady() -> bool:
        shots.append(app.export_screenshot())
        tick(app)
        return len(shots) >= 2 and shots[-1] == shots[-2]

    await until(pilot, steady, "the screen unchanged by a tick: deterministic")
    return shots[-1]


def check_snapshot(svg: str, expected: Path, tmp_path: Path) -> None:
    """Fail unless `svg` equals the committed `expected` (write it with HG_UPDATE_SNAPSHOTS=1)."""
    accept = f"{UPDATE_ENV}=1 pytest tests/test_tui_snapshots.py"
    if os.environ.get(UPDATE_ENV) == "1":
        expected.parent.mkdir(parents=True, exist_ok=True)
        expected.write_text(svg, encoding="utf-8")
        return
    if not expected.exists():
        pytest.fail(f"no snapshot {expected}: create it with `{accept}` and commit it")
    want = expected.read_text(encoding="utf-8")
    if want == svg:
        return
    actual = tmp_path / f"actual-{expected.name}"
    actual.write_text(svg, encoding="utf-8")
    got_lines, want_lines = screen_lines(svg), screen_lines(want)
    hint = "the text is the same: colours or styles differ"
    for number, (got, old) in enumerate(zip(got_lines, want_lines, strict=False), start=1):
        if got != old:
            hint = f"first differing line {number}:\n  expected: {old!r}\n  actual:   {got!r}"
            break
    else:
        if len(got_lines) != len(want_lines):
            hint = f"{len(want_lines)} lines expected, {len(got_lines)} drawn"
    pytest.fail(
        f"screen differs from {expected}\nactual screen written to {actual}\n{hint}\n"
        f"if the change is intended, accept it with `{accept}` and commit the SVGs"
    )


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Draw event times in UTC whatever the machine's zone, and in colour."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def fleet_drawn(pilot: Pilot[None], app: HybridgenConsole) -> None:
    app.refresh_fleet()
    await pilot.pause()
    assert app.fleet_table.row_count == 6


# -- the snapshots ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 24), (120, 32)])
async def test_fleet_snapshot(size: tuple[int, int], tmp_path: Path) -> None:
    app = demo_console()
    async with app.run_test(size=size) as pilot:
        await fleet_drawn(pilot, app)
        svg = await settled(pilot)
        lines = screen_lines(svg)
        assert len(lines) == size[1]
        assert any("disconnected" in line for line in lines)
        check_snapshot(svg, SNAPSHOTS / f"fleet_{size[0]}x{size[1]}.svg", tmp_path)


async def test_readme_screenshot_is_the_fleet_screen(tmp_path: Path) -> None:
    """docs/img/console.svg, the README's picture, is this fleet at 100x30."""
    app = demo_console()
    async with app.run_test(size=(100, 30)) as pilot:
        await fleet_drawn(pilot, app)
        check_snapshot(await settled(pilot), README_SHOT, tmp_path)


async def test_node_detail_snapshot(tmp_path: Path) -> None:
    app = demo_console()
    async with app.run_test(size=(120, 32)) as pilot:
        await fleet_drawn(pilot, app)
        await pilot.press("down", "down", "down", "enter")  # api-1, cloud-gpu-1, -2, edge-lab-1
        assert isinstance(app.screen, NodeScreen) and app.screen.node_id == "edge-lab-1"
        svg = await settled(pilot)
        assert any("perplexity_threshold: 14.5 (model_set)" in line for line in screen_lines(svg))
        check_snapshot(svg, SNAPSHOTS / "node_120x32.svg", tmp_path)


async def test_events_and_trace_snapshots(tmp_path: Path) -> None:
    app = demo_console()
    async with app.run_test(size=(120, 32)) as pilot:
        await fleet_drawn(pilot, app)
        await pilot.press("e")
        screen = app.screen
        assert isinstance(screen, EventsScreen)
        svg = await settled(pilot)
        assert any("09:00:44" in line for line in screen_lines(svg))  # UTC
        check_snapshot(svg, SNAPSHOTS / "events_120x32.svg", tmp_path)

        row = next(i for i, e in enumerate(screen.shown) if e.request_id == TRACED)
        screen.query_one(DataTable).move_cursor(row=row)
        await pilot.press("enter")
        assert isinstance(app.screen, TraceScreen)
        check_snapshot(await settled(pilot), SNAPSHOTS / "trace_120x32.svg", tmp_path)


async def test_summary_snapshot(tmp_path: Path) -> None:
    app = demo_console()
    async with app.run_test(size=(120, 32)) as pilot:
        await fleet_drawn(pilot, app)
        await pilot.press("o")
        assert isinstance(app.screen, SummaryScreen)
        check_snapshot(await settled(pilot), SNAPSHOTS / "summary_120x32.svg", tmp_path)


async def test_help_snapshot_fits_80x24_and_scrolls_to_its_last_line(tmp_path: Path) -> None:
    app = demo_console()
    text = help_text().splitlines()
    async with app.run_test(size=(80, 24)) as pilot:
        await fleet_drawn(pilot, app)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        box = app.screen.query_one("#help", VerticalScroll)
        svg = await settled(pilot)
        assert app.screen.region.contains_region(box.region), "help box cut off at 80x24"
        lines = screen_lines(svg)
        assert any(text[0] in line for line in lines)
        assert not any(text[-1] in line for line in lines), "expected the help to scroll"
        check_snapshot(svg, SNAPSHOTS / "help_80x24.svg", tmp_path)

        def shown() -> list[str]:
            return screen_lines(app.export_screenshot())

        await pilot.press("end")
        await until(pilot, lambda: any(text[-1] in line for line in shown()), "the last line")
        assert not any(text[0] in line for line in shown())
        await pilot.press("home")
        await until(pilot, lambda: any(text[0] in line for line in shown()), "the first line")
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


# -- the help against the bindings --------------------------------------------------------------

#: Where each help section's keys are bound: the screen, and widgets it holds that bind keys
#: the help names (a table's enter, an input's enter, a scroll's up/down).
_BOUND_IN: dict[str, tuple[type, ...]] = {
    "Fleet (the main screen)": (HybridgenConsole, DataTable),
    "Summary": (SummaryScreen,),
    "Events": (EventsScreen, DataTable),
    "Trace": (TraceScreen,),
    "Node detail": (NodeScreen,),
    "Policy": (PolicyScreen,),
    "Roll-out": (RolloutScreen, Input),
    "Experiment": (ExperimentScreen, Input),
    "Test prompt": (PromptScreen, Input),
    "Confirmation dialog": (ConfirmScreen,),
    "Help": (HelpScreen, VerticalScroll),
}


def _bound_keys(owner: type) -> set[str]:
    keys: set[str] = set()
    for binding in getattr(owner, "BINDINGS", []):
        key = binding.key if hasattr(binding, "key") else binding[0]
        keys.update(part.strip() for part in key.split(","))
    return keys


def test_every_key_in_the_help_is_bound_on_its_screen() -> None:
    assert [section for section, _ in HELP_SECTIONS] == list(_BOUND_IN)
    text = help_text()
    for section, entries in HELP_SECTIONS:
        bound = set().union(*(_bound_keys(owner) for owner in _BOUND_IN[section]))
        for keys, does in entries:
            missing = [key for key in keys if key not in bound]
            assert not missing, f"help lists {missing} under {section!r}, not bound there"
            assert f"{key_label(keys):<14} {does}" in text
    # and every key a screen binds is in its section
    for section, entries in HELP_SECTIONS:
        listed = {key for keys, _ in entries for key in keys}
        own = _bound_keys(_BOUND_IN[section][0])
        assert own <= listed, f"{section!r} binds {own - listed}, not in the help"
