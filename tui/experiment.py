"""The experiment screen (key `x`): the A/B experiment in force, its variants side by side,
and a small form to start one or a key to stop it.

The experiment is the `experiment` key of `hg_config` (`fleet.experiment`), as
`hybridgen fleet experiment` writes it. The figures are the edges' heartbeats
(`extra["variants"]` of those reporting the experiment), added up with
`fleet.experiment.combine`. Starting and stopping are recorded as `operator_action` events.
"""

from __future__ import annotations

import time
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from pydantic import ValidationError
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from broker.errors import HybridgenError
from broker.store import FleetConfig
from fleet.experiment import (
    CONTROL,
    EXPERIMENT_KEY,
    Experiment,
    combine,
    figures_table,
)
from fleet.rollout import Recorder
from tui.screens import ConfirmScreen
from tui.state import FleetState

#: Seconds between redraws of the figures.
REDRAW_S = 1.0
#: The form's syntax, shown as its placeholder.
FORM_HINT = "start: NAME cloud:MODEL|edge:VERSION [SHARE], e.g. ab1 cloud:hg-cloud-b 0.5"


def parse_start(text: str) -> Experiment:
    """The experiment the start form describes (one variant `b`).

    Raises:
        ValueError: the text does not follow `FORM_HINT`, or the experiment is invalid (the
            message says what to fix).
    """
    parts = text.split()
    if len(parts) not in (2, 3) or ":" not in parts[1]:
        raise ValueError(f"use {FORM_HINT.removeprefix('start: ')}")
    kind, _, target = parts[1].partition(":")
    if kind not in ("cloud", "edge") or not target:
        raise ValueError("the variant is cloud:MODEL or edge:VERSION")
    try:
        share = float(parts[2]) if len(parts) == 3 else 0.5
    except ValueError:
        raise ValueError(f"share {parts[2]!r} is not a number in (0, 1]") from None
    field = "cloud_model" if kind == "cloud" else "edge_version"
    try:
        return Experiment.model_validate(
            {
                "name": parts[0],
                "variants": [{"name": "b", "share": share, field: target}],
                "started_at": time.time(),
            }
        )
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"]) from None


def experiment_text(experiment: Experiment | None, edges: list[str]) -> Text:
    """The experiment in force (plain text: names come from the bus)."""
    if experiment is None:
        return Text("no experiment is running (type one below to start it)")
    lines = [f"experiment {experiment.name}"]
    for v in experiment.variants:
        what = f"cloud model {v.cloud_model}" if v.cloud_model else f"model set {v.edge_version}"
        lines.append(f"  {v.name}: {v.share:.0%} of requests, {what}")
    rest = 1 - sum(v.share for v in experiment.variants)
    lines.append(f"  {CONTROL}: {rest:.0%} of requests, the nodes' own models")
    lines.append(f"edges reporting: {len(edges)} {' '.join(edges)}".rstrip())
    return Text("\n".join(lines))


class ExperimentScreen(Screen[None]):
    """The A/B experiment: what it is, its variants' figures, start and stop.

    Args:
        nc: a connected client.
        fleet: the console's fleet model (the edges' heartbeats).
        record: called after every start and stop, to publish an operator event.
    """

    DEFAULT_CSS = """
    #experiment-current { height: auto; padding: 0 1; }
    #experiment-variants { height: 1fr; }
    #experiment-form { height: 3; }
    """
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("ctrl+s", "stop", "stop"),
        Binding("ctrl+r", "reload", "reload"),
    ]

    def __init__(self, nc: Client, fleet: FleetState, record: Recorder) -> None:
        super().__init__()
        self.nc = nc
        self.fleet = fleet
        self.record = record
        self.config: FleetConfig | None = None
        #: The experiment in `hg_config` as last read (None: none).
        self.experiment: Experiment | None = None
        self.loaded = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(Text("loading hg_config ..."), id="experiment-current")
        yield DataTable(id="experiment-variants", cursor_type="none", zebra_stripes=True)
        yield Input(placeholder=FORM_HINT, id="experiment-form")
        yield Footer()

    def on_mount(self) -> None:
        self.load()
        self.set_interval(REDRAW_S, self.redraw)

    async def _config(self) -> FleetConfig:
        if self.config is None:
            self.config = await FleetConfig.open(self.nc)
        return self.config

    @work(exclusive=True, group="experiment-load")
    async def load(self) -> None:
        """Read the experiment from `hg_config` and redraw."""
        try:
            value = await (await self._config()).get(EXPERIMENT_KEY)
            self.experiment = None if value is None else Experiment.model_validate(value)
        except (HybridgenError, NatsError, ValidationError) as exc:
            self.notify(f"experiment: {_why(exc)}", severity="error", markup=False)
            return
        self.loaded = True
        self.redraw()

    def reports(self) -> dict[str, dict[str, Any]]:
        """The variants' figures of each edge heard reporting the experiment, by node id."""
        if self.experiment is None:
            return {}
        found: dict[str, dict[str, Any]] = {}
        for view in self.fleet.rows(role="edge"):
            extra = view.node.heartbeat.extra
            variants = extra.get("variants")
            if extra.get("experiment") == self.experiment.name and isinstance(variants, dict):
                found[view.node_id] = variants
        return found

    def redraw(self) -> None:
        """Draw the experiment and its variants' figures side by side."""
        if not self.loaded:
            return
        reports = self.reports()
        self.query_one("#experiment-current", Static).update(
            experiment_text(self.experiment, sorted(reports))
        )
        table: DataTable[Text] = self.query_one("#experiment-variants", DataTable)
        rows = figures_table(combine(list(reports.values())))
        table.clear(columns=True)
        table.add_columns(*rows[0])
        for row in rows[1:]:
            table.add_row(*(Text(cell) for cell in row))

    def action_reload(self) -> None:
        """Read the experiment again."""
        self.load()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "experiment-form":
            return
        if self.experiment is not None:
            self.notify("stop the running experiment first (ctrl+s)", severity="warning")
            return
        try:
            experiment = parse_start(event.value)
        except ValueError as exc:
            self.notify(f"experiment: {exc}", severity="error", markup=False)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.write(experiment)

        variant = experiment.variants[0]
        target = variant.cloud_model or variant.edge_version
        question = f"start experiment {experiment.name}: {variant.share:.0%} to {target}?"
        self.app.push_screen(ConfirmScreen(question), answered)

    def action_stop(self) -> None:
        """Ask, then delete the experiment from `hg_config`."""
        if self.experiment is None:
            self.notify("no experiment is running", severity="warning")
            return
        name = self.experiment.name

        def answered(yes: bool | None) -> None:
            if yes:
                self.write(None, stopping=name)

        self.app.push_screen(ConfirmScreen(f"stop experiment {name}?"), answered)

    @work(group="experiment-write")
    async def write(self, experiment: Experiment | None, *, stopping: str = "") -> None:
        """Write (or, with None, delete) the experiment; notify and record the outcome."""
        action = "experiment-start" if experiment is not None else "experiment-stop"
        name = experiment.name if experiment is not None else stopping
        try:
            config = await self._config()
            if experiment is None:
                await config.delete(EXPERIMENT_KEY)
            else:
                await config.put(EXPERIMENT_KEY, experiment.model_dump(exclude_none=True))
        except (HybridgenError, NatsError) as exc:
            text = f"{action} {name}: {_why(exc)}"
            self.notify(text, severity="error", markup=False)
            await self.record(action, name, False, text)
            return
        self.experiment = experiment
        verb = "started" if experiment is not None else "stopped"
        text = f"experiment {name} {verb}"
        self.notify(text, markup=False)
        await self.record(action, name, True, text)
        self.query_one("#experiment-form", Input).value = ""
        self.redraw()


def _why(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    return str(message or exc or type(exc).__name__)
