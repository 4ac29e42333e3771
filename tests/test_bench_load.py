"""`hybridgen bench load` end to end: real nats-server, worker and edge processes, on the
session's tiny model set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.registry import ModelSet

pytestmark = pytest.mark.slow

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
    assert figures["completed"] >= 1
    assert figures["requests"] == figures["completed"] + figures["shed_503"]
    assert 0 <= figures["edge_share"] <= 1
    assert figures["p50_ttft_ms"] is not None and figures["rss_mb_max"] > 0
    assert set(figures["cpu"]) == {"model", "flags"}
