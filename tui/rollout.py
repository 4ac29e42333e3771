"""The roll-out screen: send a model-set version to one edge or to every live edge, node by
node, with per-node progress; roll the changed nodes back to their previous version.

Each node gets the `reload-model` control verb (`{"version": V}`; the edge pulls the set from
the object store `hg_models` when it is not installed) and is shown as waiting, loading, done
or failed. A roll-out halts at the first failure: the nodes after it stay `skipped`. A roll
back sends every node changed by a roll-out, and not rolled back since, to the
`previous_version` it reported. Those nodes are kept in a dict the app owns
(`HybridgenConsole.last_rollout`), so closing and reopening the screen can still roll back.
They are also written to the fleet config (`models.rollouts`, key `rollout.last`), the record
`hybridgen fleet rollout|rollback` reads and writes: a screen opened with no roll-out of its
own rolls back the nodes of the last recorded one, from the CLI or another console.
Every node's result is recorded as an `operator_action` event.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, OptionList, Static

from broker.control import send_control
from broker.errors import HybridgenError
from models.distribution import published_versions
from models.rollouts import RolloutRecord, load_record, save_record
from tui.policy import ActionRecorder
from tui.screens import ConfirmScreen
from tui.state import FleetState

log = logging.getLogger(__name__)

#: Seconds a node has to answer `reload-model` (pulling and loading a model set is slow).
RELOAD_TIMEOUT_S = 120.0
#: Operator-event action names.
ROLLOUT = "rollout"
ROLLBACK = "rollback"
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


@dataclass
class NodeStep:
    """One node's part of a roll-out or roll back."""

    node_id: str
    from_version: str | None
    to_version: str
    #: waiting, loading, done, failed or skipped.
    state: str = "waiting"
    started: float | None = None
    seconds: float | None = None
    message: str = ""

    def cells(self, now: float) -> tuple[Text, ...]:
        """The step as progress-table cells; node-supplied strings as plain text."""
        seconds = self.seconds
        if seconds is None and self.started is not None:
            seconds = now - self.started
        return (
            Text(self.node_id),
            Text(self.from_version or "-"),
            Text(self.to_version),
            Text(self.state, style=_STATE_STYLES.get(self.state, "")),
            Text("-" if seconds is None else f"{seconds:.1f}"),
            Text(self.message),
        )


def live_edges(fleet: FleetState) -> list[str]:
    """The ids of the edges that are neither stale nor gone, sorted."""
    return [
        view.node_id for view in fleet.rows(role="edge") if view.status not in ("stale", "gone")
    ]


def running_version(fleet: FleetState, node_id: str) -> str | None:
    """The model-set version a node's last heartbeat reported."""
    node = fleet.get(node_id)
    return None if node is None else node.heartbeat.model_version


class RolloutScreen(Screen[None]):
    """Pick a version and a target, confirm, then reload the nodes one by one.

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
        record: ActionRecorder,
        *,
        timeout_s: float = RELOAD_TIMEOUT_S,
        changed: dict[str, str | None] | None = None,
    ) -> None:
        super().__init__()
        self.nc = nc
        self.fleet = fleet
        self.selected = selected
        self.record = record
        self.timeout_s = timeout_s
        #: Whether the target is every live edge (else the selected node).
        self.all_edges = selected is None
        self.versions: list[str] = []
        self.steps: list[NodeStep] = []
        #: Nodes rolled out and not rolled back yet, with the version they ran before (None:
        #: no version); shared with the app when it passed one.
        self.changed: dict[str, str | None] = {} if changed is None else changed
        #: The version of the roll-out `changed` comes from (for the shared record).
        self.rolled_out: str | None = None
        self.running = False

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
            return live_edges(self.fleet)
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
            self.show_status(f"versions not listed ({_why(exc)}): type one")
            return
        self.versions = versions
        options = self.query_one("#rollout-versions", OptionList)
        options.clear_options()
        options.add_options([Text(version) for version in versions])
        if not versions:
            self.show_status("no version published in hg_models: type one")

    @work(exclusive=True, group="rollout-record")
    async def load_shared_record(self) -> None:
        """With no roll-out of this console to roll back, take the last recorded one's."""
        if self.changed:
            return
        try:
            record = await load_record(self.nc)
        except (HybridgenError, NatsError) as exc:
            log.info("roll-out record not read: %s", _why(exc))
            return
        if record is not None and record.nodes and not self.changed:
            self.changed.update(record.nodes)
            self.rolled_out = record.version

    async def save_shared_record(self, version: str, state: str) -> None:
        """Write the nodes changed and not rolled back as the fleet's last roll-out."""
        record = RolloutRecord(version=version, state=state, nodes=dict(self.changed), by="console")
        try:
            await save_record(self.nc, record)
        except (HybridgenError, NatsError) as exc:
            self.notify(
                f"roll-out not recorded in hg_config ({_why(exc)}): the CLI cannot roll it back",
                severity="warning",
                markup=False,
            )

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
        steps = [NodeStep(n, running_version(self.fleet, n), version) for n in targets]

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_steps(steps, ROLLOUT, halt_on_failure=True)
            else:
                self.notify(f"roll-out of {version}: cancelled", markup=False)

        question = f"roll out {version} to {len(targets)} node(s): {', '.join(targets)}?"
        self.app.push_screen(ConfirmScreen(question), answered)

    def action_roll_back(self) -> None:
        """Ask, then send every node rolled out (not rolled back yet) to its previous version."""
        if self.running:
            self.notify("a roll-out is running: wait for it", severity="warning")
            return
        steps = [
            NodeStep(node_id, running_version(self.fleet, node_id), previous)
            for node_id, previous in self.changed.items()
            if previous is not None
        ]
        unknown = [node_id for node_id, previous in self.changed.items() if previous is None]
        if unknown:
            self.notify(
                f"no previous version to go back to on {', '.join(unknown)} (it ran a bare "
                "model folder): reload it by hand",
                severity="warning",
                markup=False,
            )
        if not steps:
            self.notify("nothing to roll back: no roll-out changed a node", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_steps(steps, ROLLBACK, halt_on_failure=False)
            else:
                self.notify("roll back: cancelled")

        plan = ", ".join(f"{s.node_id} -> {s.to_version}" for s in steps)
        self.app.push_screen(ConfirmScreen(f"roll back {plan}?"), answered)

    @work(exclusive=True, group="rollout-run")
    async def run_steps(self, steps: list[NodeStep], action: str, *, halt_on_failure: bool) -> None:
        """Reload the nodes one by one, drawing each step, recording each node's result."""
        self.running = True
        self.steps = steps
        version = steps[0].to_version if action == ROLLOUT else self.rolled_out or ""
        failed: NodeStep | None = None
        try:
            for step in steps:
                if failed is not None and halt_on_failure:
                    step.state = "skipped"
                    continue
                ok = await self.reload(step)
                if not ok:
                    failed = failed or step
                verdict = "ok" if ok else "failed"
                message = (
                    f"{action} {step.node_id}: {step.from_version or '-'} -> {step.to_version} "
                    f"{verdict} in {step.seconds or 0:.1f} s: {step.message}"
                )
                self.draw()
                await self.record(action, step.node_id, ok, message)
        finally:
            self.running = False
            self.draw()
        done = sum(step.state == "done" for step in steps)
        skipped = sum(step.state == "skipped" for step in steps)
        if action == ROLLOUT:
            self.rolled_out = version
            await self.save_shared_record(version, "halted" if failed else "done")
        else:
            await self.save_shared_record(
                version, "partly_rolled_back" if self.changed else "rolled_back"
            )
        summary = f"{action}: {done}/{len(steps)} node(s) done"
        if failed is not None:
            summary += f"; {failed.node_id} failed ({failed.message})"
        if skipped:
            summary += f"; halted, {skipped} skipped"
        self.show_status(summary)
        self.notify(summary, severity="error" if failed else "information", markup=False)

    async def reload(self, step: NodeStep) -> bool:
        """Send `reload-model` to one node and fill in its step; True when it swapped."""
        step.state = "loading"
        step.started = time.monotonic()
        self.show_status(f"{step.node_id}: loading {step.to_version} ...")
        self.draw()
        data: dict[str, Any] = {}
        try:
            reply = await send_control(
                self.nc,
                step.node_id,
                "reload-model",
                {"version": step.to_version},
                timeout=self.timeout_s,
            )
            ok, step.message, data = reply.ok, reply.message, dict(reply.data)
        except HybridgenError as exc:
            ok, step.message = False, exc.message
        except NatsError as exc:  # the connection went away mid-request
            ok, step.message = False, _why(exc)
        step.seconds = time.monotonic() - step.started
        step.state = "done" if ok else "failed"
        if not ok:
            return False
        if "previous_version" in data:
            previous = data["previous_version"]
            step.from_version = None if previous is None else str(previous)
        if data.get("model_version"):
            step.to_version = str(data["model_version"])
        if data.get("load_s") is not None:
            step.message = f"{step.message} (load {data['load_s']} s)".strip()
        if self.changed.get(step.node_id, "") == step.to_version:
            del self.changed[step.node_id]  # rolled back
        else:
            self.changed[step.node_id] = step.from_version
        return True

    # -- drawing ------------------------------------------------------------------------------

    def draw(self) -> None:
        """Redraw the progress table from the steps."""
        table = self.query_one("#rollout-progress", DataTable)
        table.clear()
        now = time.monotonic()
        for step in self.steps:
            table.add_row(*step.cells(now), key=step.node_id)

    def tick(self) -> None:
        """Keep the seconds of a loading node counting."""
        if any(step.state == "loading" for step in self.steps):
            self.draw()


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, HybridgenError) else str(exc) or type(exc).__name__
