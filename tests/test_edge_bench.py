"""The edge's fields of `hybridgen bench hop`, on the tiny model set."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from broker import bench
from edge.bench import hop_measurement, register
from models.registry import ModelSet

pytestmark = pytest.mark.slow


async def test_hop_measurement(
    tiny_models: ModelSet, tiny_models_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HG_HOME", str(tiny_models_home))
    figures = await hop_measurement(SimpleNamespace(quick=True))
    assert set(figures) >= {"no_responders_decision_ms", "fallback_added_p50_ms", "edge_rss_mb"}
    assert 0 < figures["no_responders_decision_ms"] < 1000
    assert 0 < figures["edge_rss_mb"] < 1000
    register()
    register()
    try:
        assert bench.EXTRA_MEASUREMENTS.count(hop_measurement) == 1
    finally:
        bench.EXTRA_MEASUREMENTS.remove(hop_measurement)


async def test_hop_measurement_without_a_model_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HG_HOME", str(tmp_path))
    figures = await hop_measurement(SimpleNamespace(quick=True))
    assert "hybridgen models build" in figures["edge_error"]
