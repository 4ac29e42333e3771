"""One request's path across the fleet: the `TraceScreen` and the pure functions behind it.

Every event that carries a request id is a step of that request's path. The edge's
`request` event (published when the answer is done) tells where it was served, why and how
fast: it yields two steps, the routing decision (at arrival + `route_ms`) and the done. A
`fallback` event is the hop onto the bus, the cloud worker's `request` event the worker
that served it; errors and anything else keep their own kind. Steps are ordered by time and
drawn relative to the first one. The summary line names the request's OpenTelemetry trace
id (its `request` events carry it), the key to the same request in a tracing tool.

Every string a node supplies is drawn as a rich `Text`, never parsed as markup.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, Static

from broker import wire
from tui.event_log import EventFilter, EventLog

TRACE_COLUMNS = ("+ms", "role", "node", "step", "detail")

#: Rank of each step in a request's path, for steps published at the same instant.
_RANK = {"decision": 0, "bus hop": 1, "worker": 2, "done": 3}


@dataclass(frozen=True)
class TraceStep:
    """One step of a request's path."""

    ts: float
    role: str
    node_id: str
    step: str
    detail: str

    def cells(self, origin: float) -> tuple[Text, ...]:
        """The step as table cells, its time in ms after `origin`; all plain text."""
        offset = f"{(self.ts - origin) * 1e3:+.1f}"
        return tuple(Text(v) for v in (offset, self.role, self.node_id, self.step, self.detail))


def _ms(value: Any) -> str:
    """A duration in ms from an event's data, or `?` when absent or not a number."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.1f} ms"
    return "?"


def _tokens(data: dict[str, Any]) -> str:
    return f"{data.get('prompt_tokens', '?')}+{data.get('completion_tokens', '?')} tokens"


def steps_of(request_id: str, events: Iterable[wire.Event]) -> list[TraceStep]:
    """The path of `request_id` from the events that carry it, in time order."""
    steps: list[TraceStep] = []
    for event in events:
        if event.request_id != request_id:
            continue
        data = event.data
        if event.kind == "request" and event.role == "edge":
            total, route_ms = data.get("total_ms"), data.get("route_ms")
            if isinstance(total, int | float) and isinstance(route_ms, int | float):
                decided = event.ts - (total - route_ms) / 1e3
                detail = (
                    f"{data.get('served_by', '?')} ({data.get('route_reason', '?')}), "
                    f"decided in {_ms(route_ms)}"
                )
                steps.append(TraceStep(decided, event.role, event.node_id, "decision", detail))
            worker = f" by {data['worker']}" if data.get("worker") else ""
            hop = f", hop {_ms(data['hop_ms'])}" if "hop_ms" in data else ""
            detail = (
                f"{data.get('finish_reason', '?')}{worker}: {_tokens(data)}, ttft "
                f"{_ms(data.get('ttft_ms'))}, total {_ms(total)}{hop}"
            )
            steps.append(TraceStep(event.ts, event.role, event.node_id, "done", detail))
        elif event.kind == "request":
            detail = (
                f"for {data.get('origin') or '?'}: {data.get('finish_reason', '?')}, "
                f"{_tokens(data)}, ttft {_ms(data.get('ttft_ms'))}, total "
                f"{_ms(data.get('total_ms'))}"
            )
            steps.append(TraceStep(event.ts, event.role, event.node_id, "worker", detail))
        elif event.kind == "fallback":
            steps.append(TraceStep(event.ts, event.role, event.node_id, "bus hop", event.message))
        else:
            steps.append(TraceStep(event.ts, event.role, event.node_id, event.kind, event.message))
    steps.sort(key=lambda s: (s.ts, _RANK.get(s.step, 1)))
    return steps


def summary_of(request_id: str, events: Iterable[wire.Event]) -> str:
    """One line: where the request was served, why, by which worker, how long it took, and
    its trace id when it has one."""
    mine = [e for e in events if e.request_id == request_id]
    if not mine:
        return f"request {request_id}: no event seen (yet)"
    done = next((e for e in mine if e.kind == "request" and e.role == "edge"), None)
    worker = next((e for e in mine if e.kind == "request" and e.role != "edge"), None)
    if done is None:
        kinds = ", ".join(sorted({e.kind for e in mine}))
        return f"request {request_id}: not finished at the edge yet ({len(mine)} events: {kinds})"
    data = done.data
    where = str(data.get("served_by", "?"))
    by = data.get("worker") or (worker.node_id if worker is not None else None)
    if by:
        where += f" ({by})"
    errors = sum(1 for e in mine if e.kind in ("error", "cloud_error"))
    line = (
        f"request {request_id}: served by {where} on {done.node_id}, why "
        f"{data.get('route_reason', '?')}, total {_ms(data.get('total_ms'))}, "
        f"{data.get('finish_reason', '?')}"
    )
    line += f", {errors} error(s) on the way" if errors else ""
    # Its OpenTelemetry trace (`serving.tracing`): the id to look up in Jaeger, Tempo, ...
    trace_id = data.get("trace_id") or (worker.data.get("trace_id") if worker else None)
    return line + (f", trace {trace_id}" if trace_id else "")


class TraceScreen(Screen[None]):
    """Every event of one request across the fleet, as a path with relative timings."""

    DEFAULT_CSS = """
    #trace-summary { height: auto; padding: 0 1; background: $boost; }
    #trace { height: 1fr; }
    """
    BINDINGS = [Binding("escape", "app.pop_screen", "back")]

    def __init__(self, request_id: str, log: EventLog) -> None:
        super().__init__()
        self.request_id = request_id
        self.log_of_events = log
        self._drawn = -1

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="trace-summary")
        yield DataTable(id="trace", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#trace", DataTable)
        table.add_columns(*TRACE_COLUMNS)
        table.focus()
        self.redraw()
        self.set_interval(0.5, self.redraw)

    def events(self) -> list[wire.Event]:
        """The events of this request in the log, oldest first."""
        found = self.log_of_events.select(EventFilter(request_id=self.request_id))
        return [e for e in reversed(found) if e.request_id == self.request_id]

    def redraw(self) -> None:
        """Redraw the path when events arrived."""
        if self._drawn == self.log_of_events.added:
            return
        self._drawn = self.log_of_events.added
        events = self.events()
        self.query_one("#trace-summary", Static).update(Text(summary_of(self.request_id, events)))
        table = self.query_one("#trace", DataTable)
        table.clear()
        steps = steps_of(self.request_id, events)
        if not steps:
            return
        origin = steps[0].ts
        for step in steps:
            table.add_row(*step.cells(origin))
        first = time.strftime("%H:%M:%S", time.localtime(origin))
        self.sub_title = f"{len(events)} events from {first}"


class AskRequestId(ModalScreen[str | None]):
    """Ask for a request id; dismisses with it (stripped), or None on escape or empty."""

    DEFAULT_CSS = """
    AskRequestId { align: center middle; }
    #ask-request { width: 64; height: auto; border: round $accent; background: $surface;
                   padding: 0 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="ask-request"):
            yield Label("Trace which request id? (enter to open, escape to cancel)")
            yield Input(placeholder="request id", id="request-id")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        """Close without a request id."""
        self.dismiss(None)
