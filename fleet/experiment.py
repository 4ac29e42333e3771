"""A/B experiments: the schema of the `experiment` key in `hg_config`, sticky assignment,
and the fleet-wide comparison of the variants' figures.

An experiment gives a share of requests to each of its variants; the rest is `control`
(the node's own model set and cloud model). A variant is either an edge model-set version
(the edge loads it next to its own model and serves the variant's local requests with it)
or a cloud model name (the variant's cloud requests go to `hg.gen.<cloud_model>`).

Assignment is sticky: a request's key (its user, else its request id) is hashed with the
experiment's name into a bucket in [0, 1) (`bucket`); the variants take consecutive ranges
of buckets in their order, `control` the rest. The same user gets the same variant on every
edge for as long as the experiment lasts. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.subjects import is_token

#: The `hg_config` key that holds the experiment in force (absent: none).
EXPERIMENT_KEY = "experiment"
#: The variant name of requests the experiment leaves on the node's own models.
CONTROL = "control"
#: The per-variant figures an edge reports (`extra["variants"]` of its heartbeat).
FIGURES = (
    "requests",
    "errors",
    "error_rate",
    "latency_p50_ms",
    "latency_p95_ms",
    "tokens_per_s",
    "cloud_share",
    "feedback_accepted",
    "feedback_rejected",
)


class Variant(BaseModel):
    """One variant: a share of requests served by another edge model set or cloud model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=32, description="Shown in answers (`variant`).")
    share: float = Field(gt=0, le=1, description="Share of requests (0-1] assigned to it.")
    edge_version: str | None = Field(
        default=None,
        description="Model-set version the edge serves this variant's local share with.",
    )
    cloud_model: str | None = Field(
        default=None, description="Cloud model (bus subject token) of its cloud requests."
    )

    @model_validator(mode="after")
    def _one_target(self) -> Variant:
        if (self.edge_version is None) == (self.cloud_model is None):
            raise ValueError(
                f"variant {self.name!r}: set exactly one of edge_version and cloud_model"
            )
        if self.name == CONTROL:
            raise ValueError(f"variant name {CONTROL!r} is reserved for the rest of the traffic")
        if self.cloud_model is not None and not is_token(self.cloud_model):
            raise ValueError(f"cloud_model {self.cloud_model!r} is not a subject token")
        return self


class Experiment(BaseModel):
    """The experiment in force: its name (the hash salt) and its variants."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    variants: list[Variant] = Field(min_length=1)
    #: Unix time it was started (set by whoever writes it; shown only).
    started_at: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must differ: {names}")
        total = sum(v.share for v in self.variants)
        if total > 1 + 1e-9:
            raise ValueError(f"the variants' shares add up to {total:g}, more than 1")
        if sum(v.edge_version is not None for v in self.variants) > 1:
            raise ValueError("at most one variant may be an edge model set (one extra runtime)")
        return self

    @property
    def edge_variant(self) -> Variant | None:
        """The variant served by another edge model set, if any."""
        return next((v for v in self.variants if v.edge_version is not None), None)

    def assign(self, key: str) -> Variant | None:
        """The variant of the request keyed `key` (its user, else its request id); None:
        `control`."""
        point = bucket(self.name, key)
        edge = 0.0
        for variant in self.variants:
            edge += variant.share
            if point < edge:
                return variant
        return None


def bucket(experiment: str, key: str) -> float:
    """Where `key` falls in [0, 1) for the experiment named `experiment` (SHA-256 based)."""
    digest = hashlib.sha256(f"{experiment}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def combine(reports: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fleet's figures per variant from the edges' `extra["variants"]` reports.

    Counts and tokens/s add up; the error rate and cloud share are recomputed from the
    counts; latency percentiles are averaged weighted by each edge's requests (an
    approximation: exact fleet percentiles would need every sample).
    """
    totals: dict[str, dict[str, Any]] = {}
    for report in reports:
        for name, figures in report.items():
            if not isinstance(figures, dict):
                continue
            row = totals.setdefault(
                name,
                {
                    "requests": 0,
                    "errors": 0,
                    "cloud": 0,
                    "tokens_per_s": 0.0,
                    "feedback_accepted": 0,
                    "feedback_rejected": 0,
                    "_p50": [],
                    "_p95": [],
                },
            )
            requests = int(figures.get("requests") or 0)
            row["requests"] += requests
            row["errors"] += int(figures.get("errors") or 0)
            row["cloud"] += round(float(figures.get("cloud_share") or 0.0) * requests)
            row["tokens_per_s"] += float(figures.get("tokens_per_s") or 0.0)
            row["feedback_accepted"] += int(figures.get("feedback_accepted") or 0)
            row["feedback_rejected"] += int(figures.get("feedback_rejected") or 0)
            for key in ("p50", "p95"):
                value = figures.get(f"latency_{key}_ms")
                if value is not None and requests:
                    row[f"_{key}"].append((float(value), requests))
    result: dict[str, dict[str, Any]] = {}
    for name, row in sorted(totals.items(), key=lambda item: (item[0] != CONTROL, item[0])):
        requests = row["requests"]
        out: dict[str, Any] = {
            "requests": requests,
            "errors": row["errors"],
            "error_rate": row["errors"] / requests if requests else 0.0,
            "cloud_share": row["cloud"] / requests if requests else 0.0,
            "tokens_per_s": round(row["tokens_per_s"], 3),
            "feedback_accepted": row["feedback_accepted"],
            "feedback_rejected": row["feedback_rejected"],
        }
        for key in ("p50", "p95"):
            pairs = row[f"_{key}"]
            weight = sum(w for _, w in pairs)
            out[f"latency_{key}_ms"] = (
                round(sum(v * w for v, w in pairs) / weight, 3) if weight else None
            )
        result[name] = out
    return result


def figures_table(variants: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The variants side by side as rows of text: a header, then one row per variant."""

    def ms(value: Any) -> str:
        return "-" if value is None else f"{float(value):.0f}"

    rows = [["variant", "reqs", "p50 ms", "p95 ms", "tok/s", "cloud", "errors", "accept/reject"]]
    for name, f in variants.items():
        rows.append(
            [
                name,
                str(f.get("requests", 0)),
                ms(f.get("latency_p50_ms")),
                ms(f.get("latency_p95_ms")),
                f"{float(f.get('tokens_per_s') or 0.0):.1f}",
                f"{float(f.get('cloud_share') or 0.0):.0%}",
                f"{float(f.get('error_rate') or 0.0):.0%}",
                f"{f.get('feedback_accepted', 0)}/{f.get('feedback_rejected', 0)}",
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    """Rows of text as aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )
