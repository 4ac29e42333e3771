"""The roll-out screen: send a model-set version to one edge or to every live edge, node by
node, with per-node progress; roll the changed nodes back to their previous version.

The screen only draws and asks: the roll-out itself is the engine `hybridgen fleet rollout`
drives too (`fleet.rollout.RolloutEngine`), run here with no watch, so a roll-out halts at
the first failed swap and the nodes after it stay `skipped`. Each node gets the
`reload-model` control verb (`{"version": V}`; the edge pulls the set from the object store
`hg_models` when it is not installed) and is shown as waiting, loading, done, failed or
skipped. The engine writes the record of the last roll-out (`fleet.rollout_record`, key
`rollout.last`) after every swap, and publishes every node's result as an `operator_action`
event. A roll back sends every node the last roll-out changed, and not rolled back since, to
the version it ran before. Those nodes are also kept in a dict the app owns
(`HybridgenConsole.last_rollout`), so closing and reopening the screen can still roll back;
a screen opened with none takes those of the last recorded roll-out (from the CLI or
another console).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.errors import Error as NatsError
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, OptionList, Static

from broker import wire
from broker.errors import HybridgenError
from fleet.rollout import (
    LOADING,
    RELOAD_TIMEOUT_S,
    Recorder,
    RolloutEngine,
    RolloutOptions,
    Step,
    reason,
)
from fleet.rollout_record import RolloutRecord, load_record
from fleet.watch import live_edges
from models.distribution import published_versions
from tui.screens import ConfirmScreen
from tui.state import FleetState

log = logging.getLogger(__name__)

#: Who the record names as having run a roll-out from a console.
BY = "console"
#: Progress table columns: (key, label).
PROGRESS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("node", "node"),
    ("from", "from version"),
    ("to", "to version"),
    ("state", "state"),
    ("seconds", "seconds"),
    ("message", "message"),
)
_STATE_STYLES = {"loading": "bold yellow", "done": "green", "failed": "bold red", "skipped": "dim"}


def cells(step: Step, now: float) -> tuple[Text, ...]:
    """A step as progress-table cells; node-supplied strings as plain text."""
    seconds = step.seconds
    if seconds is None and step.started is not None:
        seconds = now - step.started
    return (
        Text(step.node),
        Text(step.from_version or "-"),
        Text(step.to_version),
        Text(step.state, style=_STATE_STYLES.get(step.state, "")),
        Text("-" if seconds is None else f"{seconds:.1f}"),
        Text(step.message),
    )


class FleetEdges:
    """The console's fleet table as the roll-out engine sees the edges (`fleet.watch.EdgeView`)."""

    def __init__(self, fleet: FleetState) -> None:
        self.fleet = fleet

    def edge_statuses(self) -> dict[str, str]:
        """Each edge's status now (`stale`, `gone`, `silent` when not heard lately)."""
        return {view.node_id: view.status for view in self.fleet.rows(role="edge")}

    def last(self, node: str) -> wire.Heartbeat | None:
        """A node's last heartbeat."""
        found = self.fleet.get(node)
        return None if found is None else found.heartbeat


class _Shown:
    """The engine's observer: each step and note goes to the screen."""

    def __init__(self, screen: RolloutScreen) -> None:
        self.screen = screen

    def step(self, step: Step) -> None:
        self.screen.show_step(step)

    def note(self, text: str, *, warn: bool = False) -> None:
        self.screen.show_note(text, warn=warn)


class RolloutScreen(Screen[None]):
    """Pick a version and a target, confirm, then drive the roll-out engine, drawing each step.

    Args:
        nc: a connected client.
        fleet: the console's fleet model (live edges, their current versions).
        selected: the node in view or selected (None: all live edges).
        record: publishes one operator event per node.
        timeout_s: seconds each node has to answer `reload-model`.
        changed: the nodes rolled out and not rolled back yet, with the version each ran
            before; updated in place (pass the app's `last_rollout` to keep it past this
            screen; default: a fresh dict).
    """

    DEFAULT_CSS = """
    #rollout-target, #rollout-status { height: auto; padding: 0 1; }
    #rollout-versions { height: auto; max-height: 8; }
    #rollout-progress { height: 1fr; }
    """
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("ctrl+o", "toggle_target", "selected/all edges"),
        Binding("ctrl+b", "roll_back", "roll back"),
        Binding("ctrl+r", "load_versions", "versions"),
    ]

    def __init__(
        self,
        nc: Client,
        fleet: FleetState,
        selected: str | None,
        record: Recorder,
        *,
        timeout_s: float = RELOAD_TIMEOUT_S,
        changed: dict[str, str | None] | None = None,
    ) -> None:
        super().__init__()
        self.nc = nc
        self.fleet = fleet
        self.selected = selected
        #: Whether the target is every live edge (else the selected node).
        self.all_edges = selected is None
        self.versions: list[str] = []
        self.steps: list[Step] = []
        #: Nodes rolled out and not rolled back yet, with the version they ran before (None:
        #: no version): the engine's record's, mirrored into the app's dict when it passed one.
        self.changed: dict[str, str | None] = {} if changed is None else changed
        self.edges = FleetEdges(fleet)
        self.engine = RolloutEngine(
            nc, self.edges, _Shown(self), record, by=BY, reload_timeout_s=timeout_s
        )
        if self.changed:  # this console's roll-out, from a screen closed since
            self.engine.record = RolloutRecord(version="", nodes=dict(self.changed), by=BY)
        self.running = False
        #: The engine's last note (a run's outcome).
        self.last_note = ""

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="rollout-target")
        yield OptionList(id="rollout-versions")
        yield Input(
            placeholder="model-set version (enter: roll out, asks first)", id="rollout-version"
        )
        yield Static(id="rollout-status")
        yield DataTable(id="rollout-progress", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#rollout-progress", DataTable)
        for key, label in PROGRESS_COLUMNS:
            table.add_column(label, key=key)
        self.show_target()
        self.show_status("pick a version (listed from hg_models) or type one")
        self.query_one("#rollout-version", Input).focus()
        self.action_load_versions()
        self.load_shared_record()
        self.set_interval(0.5, self.tick)

    # -- target and versions ------------------------------------------------------------------

    def targets(self) -> list[str]:
        """The nodes a roll-out goes to now, in order."""
        if self.all_edges or self.selected is None:
            return live_edges(self.edges)
        return [self.selected]

    def show_target(self) -> None:
        """Say which nodes a roll-out would reach."""
        targets = self.targets()
        what = "all live edges" if self.all_edges or self.selected is None else "selected node"
        names = ", ".join(targets) if targets else "(none)"
        self.query_one("#rollout-target", Static).update(
            Text(f"target ({what}, ctrl+o switches): {names}")
        )

    def show_status(self, text: str) -> None:
        """One line about what is going on."""
        self.query_one("#rollout-status", Static).update(Text(text))

    def action_toggle_target(self) -> None:
        """Switch between the selected node and every live edge."""
        if self.selected is None:
            self.notify("no node selected: the target is all live edges", severity="warning")
            return
        self.all_edges = not self.all_edges
        self.show_target()

    @work(exclusive=True, group="rollout-versions")
    async def action_load_versions(self) -> None:
        """List the versions published in the object store."""
        try:
            versions = await published_versions(self.nc)
        except (HybridgenError, NatsError) as exc:
            self.show_status(f"versions not listed ({reason(exc)}): type one")
            return
        self.versions = versions
        options = self.query_one("#rollout-versions", OptionList)
        options.clear_options()
        options.add_options([Text(version) for version in versions])
        if not versions:
            self.show_status("no version published in hg_models: type one")

    @work(exclusive=True, group="rollout-record")
    async def load_shared_record(self) -> None:
        """Read the last recorded roll-out: with none of this console's to roll back, it is
        the one `ctrl+b` undoes (the CLI's or another console's); with the same nodes as this
        console's, it brings their version."""
        try:
            record = await load_record(self.nc)
        except (HybridgenError, NatsError) as exc:
            log.info("roll-out record not read: %s", reason(exc))
            return
        if record is None or not record.nodes or self.steps:  # a run here since: it counts
            return
        if not self.changed:
            self.changed.update(record.nodes)
            self.engine.record = record
        elif record.nodes == self.changed:
            self.engine.record = record

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        box = self.query_one("#rollout-version", Input)
        box.value = self.versions[event.option_index]
        box.focus()

    # -- roll-out and roll back ---------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "rollout-version":
            self.start_rollout(event.value.strip())

    def start_rollout(self, version: str) -> None:
        """Ask, then roll `version` out to the target nodes."""
        if self.running:
            self.notify("a roll-out is running: wait for it", severity="warning")
            return
        if not version:
            self.notify("type or pick a version first", severity="warning")
            return
        targets = self.targets()
        if not targets:
            self.notify("no live edge to roll out to", severity="warning")
            return
        steps = self.engine.plan(version, targets)
        options = RolloutOptions(version, watch_s=0)  # halts on a failed swap only

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_steps(steps, lambda: self.engine.rollout(steps, options))
            else:
                self.notify(f"roll-out of {version}: cancelled", markup=False)

        question = f"roll out {version} to {len(targets)} node(s): {', '.join(targets)}?"
        self.app.push_screen(ConfirmScreen(question), answered)

    def action_roll_back(self) -> None:
        """Ask, then send every node rolled out (not rolled back yet) to its previous version."""
        if self.running:
            self.notify("a roll-out is running: wait for it", severity="warning")
            return
        steps, _ = self.engine.rollback_plan()  # the nodes left to reload by hand are said
        if not steps:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_steps(steps, lambda: self.engine.rollback(steps))
            else:
                self.notify("roll back: cancelled")

        plan = ", ".join(f"{s.node} -> {s.to_version}" for s in steps)
        self.app.push_screen(ConfirmScreen(f"roll back {plan}?"), answered)

    @work(exclusive=True, group="rollout-run")
    async def run_steps(self, steps: list[Step], run: Callable[[], Awaitable[bool]]) -> None:
        """Run a roll-out or roll back of the engine, drawing its steps as they go."""
        self.running = True
        self.steps = steps
        self.draw()
        ok = False
        try:
            ok = await run()
        finally:
            self.running = False
            self.sync_changed()
            self.draw()
        self.notify(self.last_note, severity="information" if ok else "error", markup=False)

    def sync_changed(self) -> None:
        """Mirror the engine's record (the nodes to roll back) into `changed`."""
        record = self.engine.record
        if record is not None:
            self.changed.clear()
            self.changed.update(record.nodes)

    # -- drawing ------------------------------------------------------------------------------

    def show_step(self, step: Step) -> None:
        """A step changed: redraw, and say which node is loading."""
        if step.state == LOADING:
            self.show_status(f"{step.node}: loading {step.to_version} ...")
        self.sync_changed()
        self.draw()

    def show_note(self, text: str, *, warn: bool = False) -> None:
        """An engine's note: the status line; a warning before a run is also notified."""
        self.last_note = text
        self.show_status(text)
        if warn and not self.running:
            self.notify(text, severity="warning", markup=False)

    def draw(self) -> None:
        """Redraw the progress table from the steps."""
        table = self.query_one("#rollout-progress", DataTable)
        table.clear()
        now = time.monotonic()
        for step in self.steps:
            table.add_row(*cells(step, now), key=step.node)

    def tick(self) -> None:
        """Keep the seconds of a loading node counting."""
        if any(step.state == LOADING for step in self.steps):
            self.draw()
