"""`HybridgenConsole`: the operator console's Textual app and its Fleet screen.

The console sees nodes only through the bus: heartbeats (`hg.telemetry.>`) and events
(`hg.events.>`) feed a `FleetState` and an `EventLog`; actions are control verbs
(`hg.ctl.<node_id>.<verb>`). nats.micro discovery (`$SRV.INFO`, every few seconds) adds
nodes that answer the bus without heartbeats. Bus consumption runs in an exclusive worker
that reconnects until the app exits; the tables are redrawn on a timer, never per message,
and only the cells that changed are rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import DataTable, Footer, Header, Input, Static

from broker import subjects, wire
from broker.bus import connect_settings
from broker.control import send_control
from broker.errors import HybridgenError
from broker.settings import BusSettings
from broker.telemetry import default_node_id, publish_operator_action
from tui.connection import link_text, refusal_of
from tui.discovery import DISCOVERY_S, run_discovery
from tui.event_log import EventLog
from tui.experiment import ExperimentScreen
from tui.fleet_summary import SummaryHistory
from tui.policy import PolicyScreen
from tui.prompt import PromptScreen
from tui.rollout import RolloutScreen
from tui.screens import ConfirmScreen, EventsScreen, HelpScreen, NodeScreen
from tui.state import FLEET_COLUMNS, ROLES, SORT_KEYS, FleetState, NodeView, row_style
from tui.summary import SummaryScreen
from tui.trust import receive_heartbeat

log = logging.getLogger(__name__)

#: Seconds between redraws of the fleet table.
REFRESH_S = 0.5
#: Seconds between connection attempts while NATS is away.
RETRY_S = 1.0

#: One drawn fleet row: its cells as plain strings and the style of the whole row.
DrawnRow = tuple[tuple[str, ...], str]
#: `on_timing(kind, seconds)`: kind is `apply` (one heartbeat decoded and applied),
#: `render` (an incremental table refresh) or `full_refresh` (the table rebuilt).
TimingHook = Callable[[str, float], None]


#: Beyond this many changed cells per row (on average), `refresh_fleet` rebuilds the table:
#: one `DataTable.update_cell` costs about half an `add_row` (measured with 200 nodes).
REBUILD_CELLS_PER_ROW = 2


def _drawn_row(view: NodeView) -> DrawnRow:
    return view.cells(), row_style(view.status)


def _changed_cells(key: str, old: DrawnRow, new: DrawnRow) -> list[tuple[str, str, Text, bool]]:
    """(row key, column key, new cell, wider than before) of each cell of a row that differs
    (every cell when the row's style changed)."""
    if old == new:
        return []
    (old_cells, old_style), (new_cells, style) = old, new
    return [
        (key, column, Text(after, style=style), len(after) > len(before))
        for (column, _), before, after in zip(FLEET_COLUMNS, old_cells, new_cells, strict=True)
        if before != after or old_style != style
    ]


class HybridgenConsole(App[None]):
    """The operator console: fleet table, events, node detail and drain/resume.

    Args:
        bus: how to reach NATS.
        fleet: the fleet model (default: a fresh one, stale after 5 s).
        events: the event ring (default: 1000 events).
        console_id: this console's id in its operator events (default:
            `console-<host>-<4 hex>`).

    Attributes:
        summary_history: fleet summaries sampled on every refresh tick (the summary screen).
        discovery_s: seconds between nats.micro discovery rounds.
        on_timing: optional `TimingHook`, called with the time each heartbeat and each
            table refresh took (benchmarks set it; nothing is timed when None).
        last_rollout: nodes changed by roll-outs and not rolled back yet, with the version
            each ran before (the roll-out screen's `ctrl+b` sends them back).
    """

    TITLE = "hybridgen console"
    CSS = """
    #connection { height: 1; padding: 0 1; background: $error; color: $text; }
    #connection.connected { background: $success; }
    #fleet-filter, #events-filter { height: 3; }
    #confirm { grid-size: 2; grid-gutter: 1 2; grid-rows: 1fr 3; padding: 0 1;
               width: 60; height: 11; border: thick $background 80%; background: $surface; }
    #question { column-span: 2; height: 1fr; width: 1fr; content-align: center middle; }
    ConfirmScreen, HelpScreen { align: center middle; }
    #help { width: 80; height: auto; border: round $accent; background: $surface; padding: 0 1; }
    #node-top { height: 2fr; }
    #node-figures { width: 40; padding: 0 1; }
    #node-plots PlotWidget { height: 1fr; border: round $accent; }
    #node-events { height: 1fr; }
    #policy-current, #policy-editing { height: auto; padding: 0 1; }
    #policy-editor { height: 1fr; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("e", "events", "events"),
        Binding("slash", "focus_filter", "filter"),
        Binding("s", "cycle_sort", "sort"),
        Binding("r", "reverse_sort", "reverse"),
        Binding("t", "cycle_role", "role"),
        Binding("d", "control('drain')", "drain"),
        Binding("u", "control('resume')", "resume"),
        Binding("p", "policy", "policy"),
        Binding("o", "overview", "overview"),
        Binding("m", "rollout", "roll out"),
        Binding("g", "test_prompt", "test prompt"),
        Binding("x", "experiment", "experiment"),
    ]

    connected: reactive[bool] = reactive(False)
    sort_by: reactive[str] = reactive("node")
    descending: reactive[bool] = reactive(False)
    role: reactive[str | None] = reactive(None)
    filter_text: reactive[str] = reactive("")

    def __init__(
        self,
        bus: BusSettings,
        *,
        fleet: FleetState | None = None,
        events: EventLog | None = None,
        console_id: str | None = None,
        edge_api_key: str | None = None,
    ) -> None:
        super().__init__()
        self.bus = bus
        #: Bearer key for the edges' HTTP APIs (test prompts), when they require one.
        self.edge_api_key = edge_api_key
        self.console_id = default_node_id("console") if console_id is None else console_id
        self.fleet = FleetState() if fleet is None else fleet
        self.events = EventLog() if events is None else events
        self.summary_history = SummaryHistory()
        self.discovery_s = DISCOVERY_S
        self.on_timing: TimingHook | None = None
        #: Nodes changed by roll-outs from this console and not rolled back yet, with the
        #: model-set version each ran before (None: unknown); the roll-out screen rolls
        #: them back, also after it was closed and opened again.
        self.last_rollout: dict[str, str | None] = {}
        self.nc: Client | None = None
        self.refused: str | None = None  # a refused login, said on the bar (`refusal_of`)
        # What the fleet table shows now: row keys in order, and each row's cells and style.
        self._shown_order: list[str] = []
        self._shown_rows: dict[str, DrawnRow] = {}
        # The fleet widgets live on the default screen: keep them at hand while another
        # screen is on top (`query_one` searches only the active one).
        self.bar = Static(id="connection")
        self.fleet_filter = Input(placeholder="filter nodes (/)", id="fleet-filter")
        self.fleet_table: DataTable[Text] = DataTable(
            id="fleet", cursor_type="row", zebra_stripes=True
        )

    def compose(self) -> ComposeResult:
        yield Header()
        yield self.bar
        yield self.fleet_filter
        yield self.fleet_table
        yield Footer()

    def on_mount(self) -> None:
        table = self.fleet_table
        for key, label in FLEET_COLUMNS:
            table.add_column(label, key=key)
        table.focus()
        self.show_connection()
        self.set_interval(REFRESH_S, self.refresh_tick)
        self.consume_bus()

    # -- the bus ------------------------------------------------------------------------------

    @work(exclusive=True, group="bus")
    async def consume_bus(self) -> None:
        """Connect, subscribe to heartbeats and events, and reconnect if the first try fails."""
        while True:
            try:
                nc = await connect_settings(
                    self.bus, name="hybridgen-console", error_cb=self._on_link_error
                )
            except HybridgenError as exc:
                log.info("console: %s", exc.message)
                self.connected, self.refused = False, refusal_of(exc, self.bus)
                await asyncio.sleep(RETRY_S)
                continue
            self.nc, self.refused = nc, None
            discovery: asyncio.Task[None] | None = None
            try:
                await nc.subscribe(subjects.TELEMETRY_ALL, cb=self._on_heartbeat)
                await nc.subscribe(subjects.EVENTS_ALL, cb=self._on_event)
                await nc.flush()
                discovery = asyncio.create_task(
                    run_discovery(nc, self.fleet, interval_s=self.discovery_s),
                    name="console-discovery",
                )
                # nats-py reconnects by itself: watch the state, and start over only if
                # the client gave up (closed).
                while not nc.is_closed:
                    self.connected = nc.is_connected
                    await asyncio.sleep(REFRESH_S / 2)
            finally:
                if discovery is not None:
                    discovery.cancel()
                    with contextlib.suppress(BaseException):
                        await discovery
                self.nc = None
                self.connected = False
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _on_link_error(self, exc: Exception) -> None:
        self.refused = refusal_of(exc, self.bus)  # a refused login; None: any other error

    async def _on_heartbeat(self, msg: Msg) -> None:
        started = time.perf_counter()
        try:
            receive_heartbeat(self.fleet, msg.subject, wire.decode(msg.data, wire.Heartbeat))
        except HybridgenError as exc:
            log.debug("console: bad heartbeat on %s: %s", msg.subject, exc.message)
        if self.on_timing is not None:
            self.on_timing("apply", time.perf_counter() - started)

    async def _on_event(self, msg: Msg) -> None:
        try:
            self.events.add(wire.decode(msg.data, wire.Event))
        except HybridgenError as exc:
            log.debug("console: bad event on %s: %s", msg.subject, exc.message)

    # -- drawing ------------------------------------------------------------------------------

    def watch_connected(self) -> None:
        if self.bar.is_mounted:
            self.show_connection()

    def show_connection(self) -> None:
        """Say whether the bus is reachable (if refused, why and how to fix it) in the bar."""
        bar = self.bar
        bar.set_class(self.connected, "connected")
        state = link_text(self.bus.url, connected=self.connected, refused=self.refused)
        role = self.role or "all roles"
        order = "desc" if self.descending else "asc"
        bar.update(Text(f"{state} · {role} · sort {self.sort_by} {order}"))

    def refresh_tick(self) -> None:
        """Every `REFRESH_S`: drop gone nodes, sample the summary, and redraw the fleet
        table if it is on screen (not while another screen is on top)."""
        self.fleet.prune()
        self.sample_summary()
        if len(self.screen_stack) <= 1:
            self.refresh_fleet()

    def sample_summary(self) -> None:
        """Append the fleet's summary now to `summary_history`."""
        self.summary_history.sample(self.fleet.summary(), self.fleet.clock())

    def refresh_fleet(self) -> None:
        """Bring the fleet table up to date with the model, keeping the selected node selected.

        Only the cells that changed are rewritten, and rows are added and removed in place;
        the table is rebuilt only when the order of the rows changed (a new sort, a node
        that sorts between others), or when so many cells changed that rewriting them one by
        one would cost more than a rebuild (`REBUILD_CELLS_PER_ROW`). Rows are drawn bold red
        when the node is not heard (stale, gone, silent) and yellow when it is draining or
        degraded.
        """
        started = time.perf_counter()
        self.fleet.prune()
        table = self.fleet_table
        selected = self.selected_node()
        views = self.fleet.rows(
            sort_by=self.sort_by, descending=self.descending, text=self.filter_text, role=self.role
        )
        wanted = {view.node_id: _drawn_row(view) for view in views}
        order = list(wanted)
        shown = self._shown_rows
        kept = [key for key in self._shown_order if key in wanted]
        rebuild = kept + [key for key in order if key not in shown] != order
        changes: list[tuple[str, str, Text, bool]] = []
        if not rebuild:
            for key in kept:
                changes += _changed_cells(key, shown[key], wanted[key])
            rebuild = len(changes) > REBUILD_CELLS_PER_ROW * max(1, len(order))
        if rebuild:
            table.clear()
            for key in order:
                table.add_row(*_texts(wanted[key]), key=key)
        else:
            for key in self._shown_order:
                if key not in wanted:
                    table.remove_row(key)
            for key, column, text, grow in changes:
                table.update_cell(key, column, text, update_width=grow)
            for key in order:
                if key not in shown:
                    table.add_row(*_texts(wanted[key]), key=key)
        self._shown_order, self._shown_rows = order, wanted
        if selected is not None and selected in wanted:
            index = table.get_row_index(selected)
            if rebuild or table.cursor_row != index:
                table.move_cursor(row=index)
        self.show_connection()
        if self.on_timing is not None:
            kind = "full_refresh" if rebuild else "render"
            self.on_timing(kind, time.perf_counter() - started)

    def selected_node(self) -> str | None:
        """The node id of the fleet table's highlighted row, if any."""
        table = self.fleet_table
        if table.row_count == 0:
            return None
        try:
            key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        except Exception:
            return None
        return key.value

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "fleet-filter":
            self.filter_text = event.value
            self.refresh_fleet()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "fleet-filter":
            self.fleet_table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "fleet" and event.row_key.value is not None:
            self.push_screen(NodeScreen(event.row_key.value, self.fleet, self.events))

    # -- actions ------------------------------------------------------------------------------

    def action_help(self) -> None:
        """Show the key bindings."""
        self.push_screen(HelpScreen())

    def action_overview(self) -> None:
        """Open the summary screen: the whole fleet's figures and plots."""
        self.sample_summary()
        self.push_screen(SummaryScreen(self.summary_history))

    def action_events(self) -> None:
        """Open the events screen."""
        self.push_screen(EventsScreen(self.events))

    def action_focus_filter(self) -> None:
        """Move the focus to the fleet filter."""
        self.fleet_filter.focus()

    def action_cycle_sort(self) -> None:
        """Sort by the next column."""
        self.sort_by = SORT_KEYS[(SORT_KEYS.index(self.sort_by) + 1) % len(SORT_KEYS)]
        self.refresh_fleet()

    def action_reverse_sort(self) -> None:
        """Flip the sort order."""
        self.descending = not self.descending
        self.refresh_fleet()

    def action_cycle_role(self) -> None:
        """Show all roles, then each role alone in turn."""
        choices: list[str | None] = [None, *ROLES]
        self.role = choices[(choices.index(self.role) + 1) % len(choices)]
        self.refresh_fleet()

    def action_control(self, verb: str) -> None:
        """Ask for confirmation, then send `verb` to the node in view (or selected)."""
        screen = self.screen
        node_id = screen.node_id if isinstance(screen, NodeScreen) else self.selected_node()
        if node_id is None:
            self.notify("no node selected", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.send_verb(node_id, verb)
            else:
                self.notify(f"{verb} {node_id}: cancelled", markup=False)

        self.push_screen(ConfirmScreen(f"{verb} node {node_id}?"), answered)

    @work(group="control")
    async def send_verb(self, node_id: str, verb: str) -> wire.ControlReply | None:
        """Send one control verb, show the reply in a notification and record it."""
        if self.nc is None or not self.nc.is_connected:
            self.notify(f"{verb} {node_id}: not connected to NATS", severity="error")
            return None
        try:
            reply = await send_control(self.nc, node_id, verb)
        except HybridgenError as exc:
            text = f"{verb} {node_id}: {exc.message}"
            self.notify(text, severity="error", markup=False)
            await self.record_action(verb, node_id, False, text)
            return None
        text = f"{verb} {node_id}: {'ok' if reply.ok else 'refused'} {reply.message}".rstrip()
        self.notify(text, severity="information" if reply.ok else "error", markup=False)
        await self.record_action(verb, node_id, reply.ok, text)
        return reply

    def action_policy(self) -> None:
        """Open the policy screen for the node in view (or selected), else the fleet default."""
        if self.nc is None or not self.nc.is_connected:
            self.notify("policy: not connected to NATS", severity="error")
            return
        screen = self.screen
        node_id = screen.node_id if isinstance(screen, NodeScreen) else self.selected_node()
        self.push_screen(PolicyScreen(self.nc, node_id, self.record_action))

    def action_rollout(self) -> None:
        """Open the roll-out screen for the node in view (or selected), else all live edges."""
        if isinstance(self.screen, RolloutScreen | PromptScreen | ConfirmScreen):
            return
        if self.nc is None or not self.nc.is_connected:
            self.notify("roll-out: not connected to NATS", severity="error")
            return
        screen = self.screen
        node_id = screen.node_id if isinstance(screen, NodeScreen) else self.selected_node()
        self.push_screen(
            RolloutScreen(
                self.nc, self.fleet, node_id, self.record_action, changed=self.last_rollout
            )
        )

    def action_experiment(self) -> None:
        """Open the experiment screen: the A/B experiment, its variants, start and stop."""
        if isinstance(self.screen, ExperimentScreen | RolloutScreen | PromptScreen | ConfirmScreen):
            return
        if self.nc is None or not self.nc.is_connected:
            self.notify("experiment: not connected to NATS", severity="error")
            return
        self.push_screen(ExperimentScreen(self.nc, self.fleet, self.record_action))

    def action_test_prompt(self) -> None:
        """Open the test-prompt screen for the edge in view (or selected)."""
        if isinstance(self.screen, RolloutScreen | PromptScreen | ConfirmScreen):
            return
        screen = self.screen
        node_id = screen.node_id if isinstance(screen, NodeScreen) else self.selected_node()
        view = None if node_id is None else self.fleet.view(node_id)
        if view is None:
            self.notify("test prompt: no node selected", severity="warning")
            return
        heartbeat = view.node.heartbeat
        api_url = url if isinstance(url := heartbeat.extra.get("api_url"), str) else ""
        refusal = (
            "posed as another node: its api_url is not trusted"  # the key never goes there
            if view.node_id in self.fleet.impostors
            else "is not an edge"
            if heartbeat.role != "edge"
            else "advertises no api_url (set HG_EDGE_ADVERTISE_URL there)"
            if not api_url
            else None
        )
        if refusal is not None:
            self.notify(f"test prompt: {node_id} {refusal}", severity="warning", markup=False)
            return
        model = heartbeat.model or "hg-edge"
        self.push_screen(
            PromptScreen(
                view.node_id, api_url, self.record_action, api_key=self.edge_api_key, model=model
            )
        )

    async def record_action(self, action: str, target: str, ok: bool, message: str) -> None:
        """Publish an `operator_action` event, seen on the events screen of every console."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            log.warning("console: %s not recorded, not connected", action)
            return
        try:
            await publish_operator_action(nc, self.console_id, action, target, ok, message)
        except Exception as exc:  # the action itself is done; losing its record is logged
            log.warning("console: %s not recorded: %s", action, exc)


def _texts(row: DrawnRow) -> list[Text]:
    cells, style = row
    return [Text(cell, style=style) for cell in cells]
