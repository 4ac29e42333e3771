"""The console's secondary screens: events, node detail, help and the confirmation dialog.

Every string a node supplies is drawn as a rich `Text`, never parsed as markup.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Static
from textual_plot import PlotWidget

from broker import wire
from tui.event_log import EventFilter, EventLog
from tui.state import FLEET_COLUMNS, FleetState
from tui.trace import AskRequestId, TraceScreen

#: (history series, title) of each plot on the node screen.
PLOTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("latency_p50_ms", "latency_p95_ms"), "latency p50/p95 (ms)"),
    (("tokens_per_s",), "tokens/s"),
    (("queue_depth",), "queue depth"),
    (("cloud_share",), "cloud share"),
)
_PLOT_STYLES = ("green", "red")

#: Key names as the help shows them.
_KEY_NAMES = {"slash": "/", "question_mark": "?"}

#: The help: (section, ((key names, what they do), ...)) for every screen. Key names are
#: Textual's (`slash`, `ctrl+s`); each is bound on that screen (tests check it).
HELP_SECTIONS: tuple[tuple[str, tuple[tuple[tuple[str, ...], str], ...]], ...] = (
    (
        "Fleet (the main screen)",
        (
            (("up", "down"), "select a node (the mouse works too)"),
            (("enter",), "the node's detail"),
            (("slash",), "filter the rows by text (enter: back to the table)"),
            (("t",), "role shown: all, edge, cloud, api"),
            (("s", "r"), "sort by the next column / reverse the order"),
            (("d", "u"), "drain / resume the node (both ask first)"),
            (("p",), "routing policy (no node selected: the fleet default)"),
            (("m",), "roll a model-set version out, or roll back"),
            (("g",), "send a test prompt to the selected edge"),
            (("x",), "A/B experiment: its variants side by side, start, stop"),
            (("o",), "summary of the whole fleet"),
            (("e",), "events"),
            (("question_mark",), "this help"),
            (("q",), "quit"),
        ),
    ),
    ("Summary", ((("o", "escape"), "back"),)),
    (
        "Events",
        (
            (("slash",), "filter: node:X kind:Y req:Z and free words"),
            (("enter",), "trace the request id of the row"),
            (("t",), "trace a request id (asks for it)"),
            (("escape",), "back"),
        ),
    ),
    ("Trace", ((("escape",), "back"),)),
    (
        "Node detail",
        (
            (("d", "u"), "drain / resume this node (both ask first)"),
            (("p",), "routing policy of this node"),
            (("m",), "roll a model-set version out to this node"),
            (("g",), "send a test prompt to this node"),
            (("escape",), "back"),
        ),
    ),
    (
        "Policy",
        (
            (("ctrl+t",), "edit the fleet default / the node override"),
            (("ctrl+s",), "validate, ask, then write to hg_config"),
            (("escape",), "back"),
        ),
    ),
    (
        "Roll-out",
        (
            (("enter",), "roll out the version typed or picked (asks first)"),
            (("ctrl+o",), "target: the node / every live edge"),
            (("ctrl+b",), "roll the changed nodes back (asks first)"),
            (("ctrl+r",), "list the versions in hg_models again"),
            (("escape",), "back"),
        ),
    ),
    (
        "Experiment",
        (
            (("enter",), "start the experiment typed in the form (asks first)"),
            (("ctrl+s",), "stop the experiment (asks first)"),
            (("ctrl+r",), "read the experiment from hg_config again"),
            (("escape",), "back"),
        ),
    ),
    (
        "Test prompt",
        (
            (("enter",), "send the prompt"),
            (("ctrl+t",), "route: auto (the edge decides) / cloud"),
            (("escape",), "back"),
        ),
    ),
    (
        "Confirmation dialog",
        (
            (("y",), "yes"),
            (("n", "escape"), "no"),
        ),
    ),
    ("Help", ((("escape", "q", "question_mark"), "close"),)),
)


def key_label(keys: tuple[str, ...]) -> str:
    """Key names as the help shows them: `ctrl+s`, `/`, `d / u`."""
    return " / ".join(_KEY_NAMES.get(key, key) for key in keys)


def help_text() -> str:
    """The help screen's text: every screen's keys, one a line, under the screen's name."""
    lines = ["hybridgen console: keys (scroll with up/down; escape closes)"]
    for section, entries in HELP_SECTIONS:
        lines += ["", section]
        lines += [f"  {key_label(keys):<14} {does}" for keys, does in entries]
    lines += [
        "",
        "Every drain, resume, policy write, roll-out, roll back, experiment start",
        "and stop and test prompt is published as an operator_action event",
        "(events: kind:operator_action).",
    ]
    return "\n".join(lines)


HELP_TEXT = help_text()


def event_cells(event: wire.Event) -> tuple[Text, ...]:
    """An event as table cells, every node-supplied string as plain text."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
    return tuple(
        Text(value)
        for value in (
            stamp,
            event.role,
            event.node_id,
            event.kind,
            event.request_id or "-",
            event.message,
        )
    )


EVENT_COLUMNS = ("time", "role", "node", "kind", "request id", "message")


class ConfirmScreen(ModalScreen[bool]):
    """Ask yes or no before an action; dismisses with True only on yes."""

    BINDINGS = [
        Binding("y", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Grid(id="confirm"):
            yield Label(Text(self.question), id="question")
            yield Button("Yes (y)", variant="error", id="yes")
            yield Button("No (n)", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        """Close the dialog with the answer."""
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    """The key bindings of every screen, in a box that scrolls when the terminal is short
    (the whole box stays on screen down to 80x24)."""

    DEFAULT_CSS = """
    HelpScreen #help { max-height: 100%; max-width: 100%; }
    HelpScreen #help-text { width: 100%; height: auto; }
    """
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(Text(HELP_TEXT), id="help-text")

    def on_mount(self) -> None:
        self.query_one("#help", VerticalScroll).focus()


class EventsScreen(Screen[None]):
    """Recent events of the whole fleet, newest first, filterable."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("slash", "focus_filter", "filter"),
        Binding("t", "ask_trace", "trace a request id"),
    ]

    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self.log_of_events = log
        self.where = EventFilter()
        self._drawn = -1
        #: The events drawn, in the table's row order.
        self.shown: list[wire.Event] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="node:X kind:Y req:Z words", id="events-filter")
        yield DataTable(id="events", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns(*EVENT_COLUMNS)
        table.focus()
        self.redraw(force=True)
        self.set_interval(0.5, self.redraw)

    def action_focus_filter(self) -> None:
        """Move the focus to the filter box."""
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(DataTable).focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a row: open the trace of its request id."""
        event.stop()
        row = event.cursor_row
        if not 0 <= row < len(self.shown):
            return
        request_id = self.shown[row].request_id
        if not request_id:
            self.notify("this event has no request id to trace", severity="warning")
            return
        self.open_trace(request_id)

    def action_ask_trace(self) -> None:
        """Ask for a request id, then open its trace."""

        def answered(request_id: str | None) -> None:
            if request_id:
                self.open_trace(request_id)

        self.app.push_screen(AskRequestId(), answered)

    def open_trace(self, request_id: str) -> None:
        """Show every event of `request_id` across the fleet as a path."""
        self.app.push_screen(TraceScreen(request_id, self.log_of_events))

    def on_input_changed(self, event: Input.Changed) -> None:
        self.where = EventFilter.parse(event.value)
        self.redraw(force=True)

    def redraw(self, force: bool = False) -> None:
        """Redraw the table when events arrived (or `force`)."""
        if not force and self._drawn == self.log_of_events.added:
            return
        self._drawn = self.log_of_events.added
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        self.shown = self.log_of_events.select(self.where, limit=500)
        for event in self.shown:
            table.add_row(*event_cells(event))
        if self.shown:
            table.move_cursor(row=min(row, len(self.shown) - 1))


#: Heartbeat `extra` keys the node screen leaves out: the policy block shows them.
_COVERED_EXTRA = frozenset({"policy", "perplexity_threshold", "perplexity_threshold_source"})


def _compact(value: object) -> str:
    """A heartbeat figure in few characters: dicts as `k=v, ...`, floats to 4 digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        return "off" if value == float("inf") else f"{value:.4g}"
    return "-" if value is None else str(value)


def policy_lines(extra: dict[str, object]) -> list[str]:
    """The "policy in force" block from a heartbeat's `extra["policy"]`: value (source)."""
    policy = extra.get("policy")
    if not isinstance(policy, dict) or not policy:
        return ["policy in force: not reported by this node"]
    lines = ["policy in force (source):"]
    for name, entry in policy.items():
        if isinstance(entry, dict):
            value, source = _compact(entry.get("value")), entry.get("source", "?")
            lines.append(f" {name}: {value} ({source})")
    return lines


class NodeScreen(Screen[None]):
    """One node: its latest figures, its policy in force, recent events and live plots."""

    CSS = """
    NodeScreen #node-top { height: 5fr; }
    NodeScreen #node-info { width: 44; }
    NodeScreen #node-figures, NodeScreen #node-policy, NodeScreen #node-extra {
        width: 1fr; height: auto; padding: 0 1; }
    NodeScreen #node-plots { grid-size: 2 2; }
    NodeScreen #node-policy { color: $accent; }
    NodeScreen #node-events { height: 1fr; }
    """
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("d", "app.control('drain')", "drain"),
        Binding("u", "app.control('resume')", "resume"),
        Binding("p", "app.policy", "policy"),
        Binding("m", "app.rollout", "roll out"),
        Binding("g", "app.test_prompt", "test prompt"),
    ]

    def __init__(self, node_id: str, fleet: FleetState, log: EventLog) -> None:
        super().__init__()
        self.node_id = node_id
        self.fleet = fleet
        self.log_of_events = log

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="node-top"):
            with VerticalScroll(id="node-info"):
                yield Static(id="node-figures")
                yield Static(id="node-policy")
                yield Static(id="node-extra")
            with Grid(id="node-plots"):
                for index, (_, title) in enumerate(PLOTS):
                    plot = PlotWidget(id=f"plot-{index}")
                    plot.border_title = title
                    yield plot
        yield DataTable(id="node-events", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#node-events", DataTable).add_columns(*EVENT_COLUMNS)
        self.redraw()
        self.set_interval(1.0, self.redraw)

    def figures(self) -> Text:
        """The node's latest heartbeat, two figures a line, as plain text."""
        view = self.fleet.view(self.node_id)
        if view is None:
            return Text(f"{self.node_id}: no longer known")
        hb = view.node.heartbeat
        self.sub_title = f"{hb.role} node {self.node_id}"  # not repeated in the figures
        pairs = [
            f"{label}: {cell}"
            for (key, label), cell in zip(FLEET_COLUMNS, view.cells(), strict=True)
            if key not in ("node", "role")
        ]
        pairs += [f"heard: {view.age_s:.1f} s ago", f"version: {hb.version or '-'}"]
        lines = [" · ".join(pairs[i : i + 2]) for i in range(0, len(pairs), 2)]
        if hb.fallback_ratio:
            lines.append("cloud by reason: " + _compact(hb.fallback_ratio))
        return Text("\n".join(lines))

    def policy(self) -> Text:
        """The node's policy in force, one value a line with where it comes from."""
        node = self.fleet.get(self.node_id)
        return Text("\n".join(policy_lines(node.heartbeat.extra if node else {})))

    def extras(self) -> Text:
        """The node's own extra figures, compact, without those the policy block shows."""
        node = self.fleet.get(self.node_id)
        extra = node.heartbeat.extra if node else {}
        return Text(
            "\n".join(f"{k}: {_compact(v)}" for k, v in extra.items() if k not in _COVERED_EXTRA)
        )

    def redraw(self) -> None:
        """Refresh figures, events and plots from the fleet model."""
        self.query_one("#node-figures", Static).update(self.figures())
        self.query_one("#node-policy", Static).update(self.policy())
        self.query_one("#node-extra", Static).update(self.extras())
        table = self.query_one("#node-events", DataTable)
        table.clear()
        for event in self.log_of_events.select(EventFilter(node=self.node_id), limit=50):
            if event.node_id == self.node_id:
                table.add_row(*event_cells(event))
        node = self.fleet.get(self.node_id)
        if node is None or not node.history.at:
            return
        start = node.history.at[0]
        xs = [at - start for at in node.history.at]
        for index, (series, _) in enumerate(PLOTS):
            plot = self.query_one(f"#plot-{index}", PlotWidget)
            plot.clear()
            for name, style in zip(series, _PLOT_STYLES, strict=False):
                plot.plot(xs, list(getattr(node.history, name)), line_style=style)
