"""`hybridgen bench load`: its figures from a run built for them, and end to end with real
nats-server, worker and edge processes on the session's tiny model set."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybridgen.benches.load import Result, Run, summary
from models.registry import ModelSet

KEYS = {
    "streams",
    "seconds",
    "requests",
    "completed",
    "shed_503",
    "errors",
    "p50_ttft_ms",
    "p95_ttft_ms",
    "edge_share",
    "rss_mb_max",
    "cpu",
    "model_set",
}


def test_figures_of_a_known_run() -> None:
    """4 completed streams (3 served by the edge), a shed 503, and one error of each kind:
    the counts, the edge's share, the nearest-rank TTFT percentiles and the peak RSS."""
    run = Run(
        results=[
            Result(200, done=True, ttft_s=0.030, served_by="edge"),
            Result(200, done=True, ttft_s=0.010, served_by="edge"),
            Result(200, done=True, ttft_s=0.040, served_by="cloud"),
            Result(200, done=True, ttft_s=0.020, served_by="edge"),
            Result(503, retry_after=1.0),
            Result(503),
            Result(200, ttft_s=0.005, served_by="edge"),  # cut before [DONE]
            Result(0, failure="ReadTimeout before the answer: timed out"),
        ],
        rss_mb=[100.0, 181.0, 150.0],
    )
    figures = summary(argparse.Namespace(streams=8, seconds=3.0), run, "v1")
    assert {k: figures[k] for k in figures if k not in ("cpu", "load_avg")} == {
        "streams": 8,
        "seconds": 3.0,
        "requests": 8,
        "completed": 4,
        "shed_503": 1,
        "errors": 3,
        "p50_ttft_ms": 20.0,
        "p95_ttft_ms": 40.0,
        "edge_share": 0.75,
        "rss_mb_max": 181.0,
        "model_set": "v1",
        "error_kinds": {
            "503 without Retry-After": 1,
            "no [DONE]": 1,
            "ReadTimeout before the answer": 1,
        },
    }


def test_no_completed_stream_has_no_share_and_no_ttft() -> None:
    figures = summary(argparse.Namespace(streams=1, seconds=1.0), Run([Result(503)]), "v1")
    assert (figures["completed"], figures["edge_share"], figures["p50_ttft_ms"]) == (0, None, None)
    assert figures["rss_mb_max"] is None


@pytest.mark.slow
def test_bench_load_json(tiny_models: ModelSet, tiny_models_home: Path) -> None:
    argv = [sys.executable, "-m", "hybridgen", "bench", "load", "--streams", "8"]
    argv += ["--seconds", "3", "--json", "--set", tiny_models.version]
    argv += ["--home", str(tiny_models_home)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures.keys() >= KEYS
    assert (figures["streams"], figures["model_set"]) == (8, tiny_models.version)
    assert figures["errors"] == 0, figures
    assert figures["error_kinds"] == {}
    assert figures["completed"] >= 1  # the figures' arithmetic: test_figures_of_a_known_run
    assert figures["requests"] == figures["completed"] + figures["shed_503"]
    measured = ("edge_share", "p50_ttft_ms", "p95_ttft_ms", "rss_mb_max")
    assert all(figures[key] is not None for key in measured), figures
    assert set(figures["cpu"]) == {"model", "flags"}
