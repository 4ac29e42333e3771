"""Usage per API key and model: requests and input/output tokens, counted once per answer.

`UsageBook` keeps an API's totals since it started, exposes them as Prometheus counters
(`hybridgen_<service>_key_requests_total`, `..._key_tokens_total{kind=input|output}` and
`..._key_rate_limited_total{limit}`, labelled by key name and model) and as a plain snapshot
that heartbeats carry (`extra["usage"]`) and `GET /v1/usage` returns. Keys appear by name only
(`serving.limits`), never as themselves.

Several API instances each report their own totals; `sum_usage` adds the snapshots of every
instance (the console and `GET /v1/usage`'s readers sum them), so no instance writes to a
shared store on the request path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

#: The figures of one (key, model): what a snapshot holds for each.
FIELDS = ("requests", "input_tokens", "output_tokens")

#: {key name: {model: {"requests", "input_tokens", "output_tokens"}}}
Snapshot = dict[str, dict[str, dict[str, int]]]


@dataclass
class Tally:
    """One key's figures for one model."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


class UsageBook:
    """An API's usage by key name and model since it started.

    Args:
        service: the metrics prefix (`hybridgen_<service>_...`), as `HttpMetrics`'s.
        registry: the API's Prometheus registry (its `/metrics`).
    """

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        prefix = f"hybridgen_{service}_key"
        self._tallies: dict[tuple[str, str], Tally] = {}
        self.requests = Counter(
            f"{prefix}_requests",
            "Answered requests by API key name and model (cancelled ones included).",
            ["key", "model"],
            registry=registry,
        )
        self.tokens = Counter(
            f"{prefix}_tokens",
            "Tokens by API key name, model and kind (input|output).",
            ["key", "model", "kind"],
            registry=registry,
        )
        self.rate_limited = Counter(
            f"{prefix}_rate_limited",
            "Requests refused with 429 by API key name and limit (requests|tokens|concurrent).",
            ["key", "limit"],
            registry=registry,
        )

    def record(self, key: str, model: str, input_tokens: int, output_tokens: int) -> None:
        """Count one answer (called once per answer, however it ended)."""
        tally = self._tallies.setdefault((key, model), Tally())
        tally.requests += 1
        tally.input_tokens += input_tokens
        tally.output_tokens += output_tokens
        self.requests.labels(key, model).inc()
        self.tokens.labels(key, model, "input").inc(input_tokens)
        self.tokens.labels(key, model, "output").inc(output_tokens)

    def refused(self, key: str, limit: str) -> None:
        """Count one request refused by a limit."""
        self.rate_limited.labels(key, limit).inc()

    def snapshot(self) -> Snapshot:
        """Every key's figures by model (plain JSON: heartbeats and `/v1/usage` carry it)."""
        snapshot: Snapshot = {}
        for (key, model), tally in sorted(self._tallies.items()):
            snapshot.setdefault(key, {})[model] = tally.as_dict()
        return snapshot


def sum_usage(snapshots: Iterable[Mapping[str, Any] | None]) -> Snapshot:
    """The sum of several instances' snapshots (malformed parts are skipped: a heartbeat is
    data from the bus, not trusted to be well formed)."""
    total: Snapshot = {}
    for snapshot in snapshots:
        if not isinstance(snapshot, Mapping):
            continue
        for key, models in snapshot.items():
            if not isinstance(models, Mapping):
                continue
            for model, figures in models.items():
                if not isinstance(figures, Mapping):
                    continue
                into = total.setdefault(str(key), {}).setdefault(
                    str(model), dict.fromkeys(FIELDS, 0)
                )
                for name in FIELDS:
                    value = figures.get(name, 0)
                    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                        into[name] += value
    return total


def key_totals(snapshot: Snapshot) -> dict[str, dict[str, int]]:
    """Each key's figures over every model."""
    totals: dict[str, dict[str, int]] = {}
    for key, models in snapshot.items():
        into = totals.setdefault(key, dict.fromkeys(FIELDS, 0))
        for figures in models.values():
            for name in FIELDS:
                into[name] += figures.get(name, 0)
    return totals
