"""The summary screen: the whole fleet in one view (key `o` on the fleet screen).

Figures come from the app's `SummaryHistory` (sampled on every refresh tick from
`FleetState.summary()`): requests/s, the share served at the edge against the cloud by
route reason, cloud queue depth and error rate, each with a plot of the last minutes; usage by
API key (summed over the API instances) once some key has any.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Static
from textual_plot import PlotWidget

from serving.usage import key_totals
from tui.fleet_summary import FleetSummary, SummaryHistory

#: (history series, title) of each plot.
SUMMARY_PLOTS: tuple[tuple[str, str], ...] = (
    ("total_rps", "requests/s"),
    ("edge_share", "served at the edge"),
    ("cloud_queue_depth", "cloud queue depth"),
    ("cloud_error_rate", "cloud error rate"),
)
#: Route reasons listed beside the figures (the busiest).
TOP_ROUTES = 6
#: API keys listed under the figures (the most tokens).
TOP_KEYS = 6


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def figures_text(summary: FleetSummary | None) -> Text:
    """The fleet's headline figures as plain text."""
    if summary is None:
        return Text("no sample yet")
    statuses = " ".join(f"{status} {count}" for status, count in summary.statuses.items())
    lines = [
        f"nodes: {summary.nodes}  {statuses}".rstrip(),
        f"requests/s: {summary.total_rps:.1f}",
        f"edge {_share(summary.edge_share)} · cloud {_share(summary.cloud_share)}",
        f"cloud workers: {summary.cloud_workers} at {summary.cloud_rps:.1f} rps",
        f"cloud queue: {summary.cloud_queue_depth}",
        f"cloud errors: {summary.cloud_errors} ({_share(summary.cloud_error_rate)})",
    ]
    return Text("\n".join(lines))


def routes_text(summary: FleetSummary | None) -> Text:
    """The busiest route reasons as plain text: reason, where served, rps and share."""
    if summary is None or not summary.routes:
        return Text("routes: no edge traffic")
    lines = ["route reason          at     rps share"]
    for route in summary.routes[:TOP_ROUTES]:
        reason = route.reason[:20]
        lines.append(f"{reason:<20}  {route.served:<5} {route.rps:5.1f} {route.share:4.0%}")
    hidden = len(summary.routes) - TOP_ROUTES
    if hidden > 0:
        lines.append(f"… {hidden} more")
    return Text("\n".join(lines))


def usage_text(summary: FleetSummary | None) -> Text:
    """Usage by API key over every model (empty: no key used yet), most tokens first."""
    if summary is None or not summary.usage:
        return Text("")
    totals = key_totals(summary.usage)
    ranked = sorted(
        totals.items(),
        key=lambda item: (-item[1]["input_tokens"] - item[1]["output_tokens"], item[0]),
    )
    lines = ["key                       requests   input  output"]
    for name, figures in ranked[:TOP_KEYS]:
        lines.append(
            f"{name[:24]:<24} {figures['requests']:>9} {figures['input_tokens']:>7} "
            f"{figures['output_tokens']:>7}"
        )
    if len(ranked) > TOP_KEYS:
        lines.append(f"… {len(ranked) - TOP_KEYS} more keys")
    return Text("\n".join(lines))


class SummaryScreen(Screen[None]):
    """Fleet-wide figures and their plots over the last minutes."""

    DEFAULT_CSS = """
    #summary-top { height: 8; }
    #summary-figures { width: 1fr; padding: 0 1; }
    #summary-routes { width: 1fr; padding: 0 1; }
    #summary-usage { height: auto; padding: 0 1; }
    #summary-plots { grid-size: 2 2; height: 1fr; }
    #summary-plots PlotWidget { border: round $accent; }
    """
    BINDINGS = [Binding("escape,o", "app.pop_screen", "back")]

    def __init__(self, history: SummaryHistory) -> None:
        super().__init__()
        self.history = history

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="summary-top"):
            yield Static(id="summary-figures")
            yield Static(id="summary-routes")
        yield Static(id="summary-usage")  # shown once some key has usage
        with Grid(id="summary-plots"):
            for name, title in SUMMARY_PLOTS:
                plot = PlotWidget(id=f"summary-{name.replace('_', '-')}")
                plot.border_title = title
                yield plot
        yield Footer()

    def on_mount(self) -> None:
        self.redraw()
        self.set_interval(1.0, self.redraw)

    def redraw(self) -> None:
        """Redraw figures and plots from the history's latest samples."""
        latest = self.history.latest
        self.query_one("#summary-figures", Static).update(figures_text(latest))
        self.query_one("#summary-routes", Static).update(routes_text(latest))
        usage = self.query_one("#summary-usage", Static)
        usage.update(text := usage_text(latest))
        usage.display = bool(text.plain)
        if not self.history.at:
            return
        end = self.history.at[-1]
        xs = [at - end for at in self.history.at]  # seconds before the latest sample
        for name, _ in SUMMARY_PLOTS:
            plot = self.query_one(f"#summary-{name.replace('_', '-')}", PlotWidget)
            plot.clear()
            plot.plot(xs, list(self.history.series[name]), line_style="green")
