"""`hybridgen bench personalization --quick --json` on the session's tiny model set: every
figure derived from others is checked against them, and the samples' gate on inputs built for
it. How much personalization helps (the goals) and how fast it is are the bench's to report,
not asserted here."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from hybridgen.benches import BENCHES
from hybridgen.benches import main as bench_main
from hybridgen.benches.personalization_samples import MIN_GAIN, gated

KEYS = {
    "users", "per_user", "reduction_median", "reduction_min", "reduction_prose_min",
    "reduction_persona_median", "generic_change_mean", "generic_change_max", "update_ms_p50",
    "mix_us_per_step", "decode_overhead", "samples_prefill_ms_p50", "samples_prefix_ms_p50",
    "generic_change_unbounded_max", "fit_ms_p50",
}  # fmt: skip


def test_personalization_is_registered() -> None:
    assert BENCHES["personalization"] == ("hybridgen.benches.personalization", "main")


def test_the_samples_gate_opens_once_they_gained_more_than_the_margin() -> None:
    """Each position gains 1 nat with the samples: the gate opens after the margin (2 nats)
    is passed, at position 3 of 8, so 5 of 8 positions use them."""
    assert MIN_GAIN == 2.0
    plain = np.full(8, -2.0)
    out, share = gated(plain, plain + 1.0)
    assert share == 5 / 8
    assert out.tolist() == [-2.0, -2.0, -2.0, -1.0, -1.0, -1.0, -1.0, -1.0]


def test_the_samples_gate_stays_shut_when_they_do_not_help() -> None:
    plain = np.full(8, -2.0)
    out, share = gated(plain, plain - 1.0)
    assert share == 0.0 and out.tolist() == plain.tolist()


def ratio_change(numerator: float, denominator: float) -> float:
    return numerator / denominator - 1.0


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
    prose = [r for r in real if r["kind"] == "prose"]
    personas = [r for r in rows if r["kind"] == "persona"]
    assert len(real) >= 8 and len(prose) >= 2 and len(personas) >= 2
    generic = result["generic_ppl_without"]
    for row in rows:
        assert row["feedback_samples"] == result["feedback_per_user"]
        assert row["held_out_samples"] == result["held_out_per_user"]
        # Held-out text never comes from a feedback document.
        assert not set(row["feedback_documents"]) & set(row["held_out_documents"])
        without = row["ppl_without"]
        # Each reduction and change is its perplexities' (rounded to 3 decimals) ratio.
        for key, ppl in (("reduction", "ppl_with"), ("reduction_cache", "ppl_cache"),
                         ("reduction_samples", "ppl_samples")):  # fmt: skip
            assert row[key] == pytest.approx(-ratio_change(row[ppl], without), abs=1e-3), key
        for key, ppl in (("generic_change", "generic_ppl_with"),
                         ("generic_change_cache", "generic_ppl_cache")):  # fmt: skip
            assert row[key] == pytest.approx(ratio_change(row[ppl], generic), abs=1e-3), key
    # Templated personas repeat their vocabulary: the cache must help them a lot.
    assert result["reduction_persona_median"] > 0.3
    # The summary figures are the rows' (medians, minima, mean and maximum, rounded).
    assert result["reduction_median"] == round(statistics.median(r["reduction"] for r in real), 4)
    assert result["reduction_min"] == min(r["reduction"] for r in real)
    assert result["reduction_prose_min"] == min(r["reduction"] for r in prose)
    assert result["reduction_persona_median"] == round(
        statistics.median(r["reduction"] for r in personas), 4
    )
    changes = [r["generic_change"] for r in rows]
    assert result["generic_change_mean"] == round(statistics.fmean(changes), 4)
    assert result["generic_change_max"] == max(changes)
    assert result["generic_change_unbounded_max"] == max(
        r["generic_change_unbounded"] for r in rows
    )
    # Chat personas on a narrow topic, far from the generic text, are among the users.
    assert {"pirate", "butler", "sourdough", "fantasy-football"} <= {r["user"] for r in personas}
    assert set(result["goals"]) <= set(result)
