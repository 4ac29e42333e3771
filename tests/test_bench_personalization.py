"""`hybridgen bench personalization --quick --json` on the session's tiny model set: the
keys and sane values (not the goals)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hybridgen.benches import BENCHES
from hybridgen.benches import main as bench_main

KEYS = {
    "users", "per_user", "reduction_median", "reduction_min", "reduction_prose_min",
    "reduction_persona_median", "generic_change_mean", "generic_change_max", "update_ms_p50",
    "mix_us_per_step", "decode_overhead",
}  # fmt: skip


def test_personalization_is_registered() -> None:
    assert BENCHES["personalization"] == ("hybridgen.benches.personalization", "main")


@pytest.mark.slow
def test_personalization_quick_json(
    tiny_models_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HG_HOME", str(tiny_models_home))
    assert bench_main(["personalization", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= KEYS
    rows = result["per_user"]
    assert result["users"] == len(rows)
    real = [r for r in rows if r["kind"] != "persona"]
    assert len(real) >= 8 and sum(r["kind"] == "prose" for r in real) >= 2
    assert sum(r["kind"] == "persona" for r in rows) >= 2
    for row in rows:
        assert row["feedback_samples"] == result["feedback_per_user"]
        assert row["held_out_samples"] == result["held_out_per_user"]
        # Held-out text never comes from a feedback document.
        assert not set(row["feedback_documents"]) & set(row["held_out_documents"])
        assert row["ppl_without"] > 1 and row["ppl_with"] > 1
        assert row["reduction"] == pytest.approx(1 - row["ppl_with"] / row["ppl_without"], abs=1e-3)
    # Templated personas repeat their vocabulary: the cache must help them a lot.
    assert result["reduction_persona_median"] > 0.3
    assert result["reduction_min"] <= result["reduction_median"]
    assert result["generic_change_mean"] <= result["generic_change_max"]
    for key in ("update_ms_p50", "mix_us_per_step"):
        assert 0 < result[key] < 1e4
    assert math.isfinite(result["decode_overhead"]) and result["decode_overhead"] > -1
    assert result["generic_samples"] > 0 and result["vocab_size"] > 0
    assert set(result["goals"]) <= set(result)
    for row in rows:
        assert 0 <= row["samples_gate_open"] <= 1 and 0 <= row["generic_gate_open"] <= 1
        assert row["samples_prefix_tokens"] > 0
        for key in ("reduction_cache", "reduction_samples", "generic_change_cache"):
            assert -1 < row[key] < 1
    assert result["samples_prefill_ms_p50"] > 0 and result["samples_prefix_ms_p50"] > 0
    assert result["samples_k"] > 0 and result["samples_tokens"] > 0
