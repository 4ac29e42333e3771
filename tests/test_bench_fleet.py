"""`hybridgen bench fleet` end to end: a real nats-server and 1, 2 and 4 real cloud worker
processes in one queue group, on the session's tiny model set; and its pure arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybridgen.benches.fleet import efficiencies
from models.registry import ModelSet

KEYS = {
    "workers",
    "tok_s",
    "scaling_efficiency",
    "efficiency",
    "cpu",
    "cpu_count",
    "limited_by_machine",
    "limited_workers",
    "model_set",
    "errors",
}


def test_efficiency_is_throughput_over_linear_scaling() -> None:
    assert efficiencies([1, 2, 4], [100.0, 180.0, 200.0]) == [1.0, 0.9, 0.5]
    assert efficiencies([1, 2], [0.0, 10.0]) == [None, None]


@pytest.mark.slow
def test_bench_fleet_quick_json(tiny_models: ModelSet, tiny_models_home: Path) -> None:
    argv = [sys.executable, "-m", "hybridgen", "bench", "fleet", "--quick", "--json"]
    argv += ["--set", tiny_models.version, "--home", str(tiny_models_home)]
    argv += ["--workers", "1,2"]  # the bench's own default (1,2,4) only costs start-ups here
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures.keys() >= KEYS
    assert figures["workers"] == [1, 2] and figures["model_set"] == tiny_models.version
    assert len(figures["tok_s"]) == 2 and figures["errors"] == 0
    # The derived figures are the measured rates' (1.0 at one worker: it produced tokens).
    assert figures["efficiency"] == efficiencies([1, 2], figures["tok_s"])
    assert figures["efficiency"][0] == 1.0
    one, two = figures["tok_s"][0], figures["tok_s"][1]
    assert figures["scaling_efficiency"] == round(two / (2 * one), 3)
    cores = figures["cpu_count"]
    assert figures["limited_by_machine"] == (cores <= 2)
    assert figures["limited_workers"] == [n for n in (1, 2) if n >= cores]
