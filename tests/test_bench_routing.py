"""`hybridgen bench routing`: the curve arithmetic on hand-made cases, and a run on `tiny`.

The arithmetic tests use per-prompt qualities whose answers are worked out by hand; the run
on the tiny set checks the pieces fit (keys, plot, the edge's scorer agreeing with the
router's own prefill), never the figures the tiny models happen to give.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridgen.benches import routing as bench
from models.lab import calibration_eval as ce
from models.lab import calibration_quality as cq
from models.lab import calibration_scores as cs
from models.lab.calibration_set import EvalPrompt
from models.ort_edge import EdgeModel
from models.registry import ModelSet

#: Five prompts, gaps 4, 3, 2, 1, 0 nats/token (total 10).
GAPS = [4.0, 3.0, 2.0, 1.0, 0.0]


def test_curve_cpt_and_gain_on_a_known_case() -> None:
    best = cq.curve(GAPS, [10, 8, 6, 4, 2])  # ranks exactly by gap
    assert best.recovered.tolist() == pytest.approx([0, 0.4, 0.7, 0.9, 1.0, 1.0])
    assert cq.cpt(best, 0.5) == pytest.approx(0.4)
    assert cq.cpt(best, 0.8) == pytest.approx(0.6)
    # Gain over edge-only, nats/token over all five prompts: top 1 sent -> 4/5.
    assert cq.gain_at(best, 0.2) == pytest.approx(0.8)
    assert cq.gain_at(best, 1.0) == pytest.approx(2.0)
    worst = cq.curve(GAPS, [1, 2, 3, 4, 5])  # ranks backwards
    assert worst.recovered.tolist() == pytest.approx([0, 0, 0.1, 0.3, 0.6, 1.0])
    assert cq.cpt(worst, 0.8) == pytest.approx(1.0)
    assert cq.cpt(worst, 0.5) == pytest.approx(0.8)
    # No gap to recover: no cpt.
    assert cq.cpt(cq.curve([0.0, 0.0], [1, 2]), 0.8) is None


def test_auc_and_area() -> None:
    assert cq.auc(GAPS, [10, 8, 6, 4, 2]) == 1.0
    assert cq.auc(GAPS, [2, 4, 6, 8, 10]) == 0.0
    assert cq.auc(GAPS, [1, 1, 1, 1, 1]) == 0.5
    # Equal gaps: whatever the order, the curve is the diagonal (area one half).
    assert cq.area(cq.curve([1.0] * 4, [3, 1, 4, 2])) == pytest.approx(0.5)
    # Ranked by gap: trapezoids under 0, .4, .7, .9, 1, 1 at steps of 1/5.
    expected = (0 + 0.4 + 0.4 + 0.7 + 0.7 + 0.9 + 0.9 + 1 + 1 + 1) / 2 / 5
    assert cq.area(cq.curve(GAPS, GAPS)) == pytest.approx(expected)


def test_oracle_and_split_half_oracle() -> None:
    # A prompt where the edge is better (negative gap): the oracle recovers over 100%
    # before sending it. Order 0, 2, 3, 1: recovered 0, .75, 1, 1.25, 1.
    assert cq.oracle_cpt([3.0, -1.0, 1.0, 1.0]) == pytest.approx(0.5)
    # The first halves point at prompt 0, the second halves' gap is all on prompt 3: the
    # split-half oracle must send everything, while the (second-half) oracle sends one.
    first, second = [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]
    assert cq.split_half_cpt(first, second) == pytest.approx(1.0)
    assert cq.oracle_cpt(second) == pytest.approx(0.25)
    # When the halves agree it matches the oracle.
    assert cq.split_half_cpt(GAPS, GAPS) == cq.oracle_cpt(GAPS) == pytest.approx(0.6)


def test_threshold_at_the_target() -> None:
    scores = [10.0, 8.0, 6.0, 4.0, 2.0]
    threshold, share = cq.threshold_at(scores, cq.curve(GAPS, scores), 0.8) or (0.0, 0.0)
    # Three sent (80% needs 4+3+2 of 10): the cut lies halfway between 6 and 4.
    assert (threshold, share) == (pytest.approx(5.0), pytest.approx(0.6))
    # Tied scores cannot be cut between: the tie goes along.
    tied = [10.0, 8.0, 6.0, 6.0, 2.0]
    assert cq.threshold_at(tied, cq.curve(GAPS, tied), 0.8) == (4.0, pytest.approx(0.8))
    sent = np.asarray(scores) > threshold
    assert cq.policy_outcome(GAPS, sent) == {
        "prompts": 5,
        "cloud_share": 0.6,
        "recovered": 0.9,
        "gain": 1.8,
    }
    # Only the masked prompts count.
    mask = [False, True, True, True, True]
    assert cq.policy_outcome(GAPS, sent, mask=mask)["recovered"] == pytest.approx(5 / 6, abs=1e-4)


def test_length_normalisation_and_learned_combination() -> None:
    n = np.array([4, 8, 16, 32, 64, 128])
    log_ppl = 2.0 - 0.5 * np.log(n)
    assert cq.length_fit(log_ppl, n) == (pytest.approx(2.0), pytest.approx(-0.5), 0.0)
    # Chat messages read 0.7 nats higher at every length.
    chat = np.array([1, 0, 1, 0, 1, 0])
    fit = cq.length_fit(log_ppl + 0.7 * chat, n, chat)
    assert fit == (pytest.approx(2.0), pytest.approx(-0.5), pytest.approx(0.7))
    residual = cq.normalised_perplexity(log_ppl + 0.7 * chat + 1.0, n, fit, chat)
    assert residual == pytest.approx(np.ones(6))
    # The label follows the second feature only: the learned score ranks by it.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    model = cq.fit_logistic(x, x[:, 1] > 0)
    assert abs(model.weights[1]) > 5 * abs(model.weights[0]) and model.weights[1] > 0
    assert cq.auc(x[:, 1], model.score(x)) == 1.0


def _data(gap: np.ndarray, log_ppl: np.ndarray, n: np.ndarray) -> dict[str, np.ndarray]:
    """Per-prompt arrays as `Records.arrays` gives them, the edge scoring 0 everywhere."""
    size = gap.size
    return {
        "gap": gap,
        "gap_first": gap,
        "gap_second": gap,
        "q_edge": np.zeros(size),
        "q_cloud": gap,
        "log_perplexity": log_ppl,
        "scored_tokens": n.astype(np.float64),
        "prompt_tokens": n.astype(np.float64),
        "draft_mean_logprob": np.zeros(size),
        "draft_low_quantile": np.ones(size),
        "entropy": np.zeros(size),
        "question": n < 16,
        "free_form": np.zeros(size, dtype=bool),
        "in_domain": np.arange(size) % 2 == 0,
    }


def test_short_prompts_fixed_by_length_normalisation() -> None:
    # The cloud gains only on every third prompt; short prompts score a high perplexity
    # whatever their gap. Plain perplexity ranks the short ones first; the length residual
    # ranks by the gap.
    size = 60
    n = np.where(np.arange(size) % 2 == 0, 8, 64)
    gap = np.where(np.arange(size) % 3 == 0, 1.0, 0.0)
    log_ppl = 4.0 - 0.8 * np.log(n) + gap
    fit, evaluation = _data(gap, log_ppl, n), _data(gap, log_ppl, n)
    calibrated = ce.calibrate_signal(fit, target=0.8)
    assert calibrated["signal"] == "perplexity_by_length"
    # The 20 gainers tie on the residual: all of them are sent (a third of the prompts).
    assert calibrated["expected_cloud_share"] == pytest.approx(1 / 3, abs=1e-4)
    result, curves = bench.evaluate(fit, evaluation, manifest_routing=None)
    assert result["signals"]["perplexity_by_length"]["cpt80"] == result["oracle_cpt80"]
    assert result["signals"]["prompt_perplexity"]["cpt80"] > result["oracle_cpt80"]
    assert result["random_cpt80"] == 0.8
    assert result["split_half_cpt80"] == result["oracle_cpt80"]
    # Sending the 20% with the highest residual sends 12 of the 20 gainers: 12/60 nats/token.
    assert result["gain_at"]["0.2"] == pytest.approx(12 / 60, abs=1e-4)
    assert result["gain_at"]["1.0"] == pytest.approx(20 / 60, abs=1e-4)
    after = result["calibration"]["after"]
    assert after["signal"] == "perplexity_by_length"
    assert after["all"]["recovered"] >= 0.8
    # Before: no manifest routing, nothing sent.
    assert result["calibration"]["before"]["all"]["cloud_share"] == 0.0
    assert set(curves) >= {*bench.SIGNALS, "oracle", "split_half_oracle"}


def test_goals_read_the_figures() -> None:
    gain = {"0.1": 0.05, "0.2": 0.1, "0.3": 0.09, "1.0": 0.06}
    result: dict[str, Any] = {"cpt80_best": 0.35, "split_half_cpt80": 0.32, "gain_at": gain}
    assert all(bench.goals(result).values())
    result["cpt80_best"] = 0.45
    met = bench.goals(result)
    assert not met["cpt80_best_le_0.40"] and not met["within_0.05_of_split_half"]
    gain["0.2"] = 0.05
    assert bench.goals(result)["hybrid_at_30pct_ge_cloud_only"]  # 0.3 still beats 1.0
    gain["0.3"] = 0.05
    assert not bench.goals(result)["hybrid_at_30pct_ge_cloud_only"]


def test_edge_scorer_reads_perplexity_as_the_router(tiny_models: ModelSet) -> None:
    edge = EdgeModel(tiny_models.edge_dir("int4"))
    prompt = EvalPrompt(
        "question", True, "What does ls do?", " ls - list directory", " contents of a folder"
    )
    ids, span = cs._edge_prompt(edge, prompt)
    [score] = cs.score_edge(edge, [prompt])
    expected = edge.perplexity(ids, span)
    assert expected is not None
    assert math.exp(score.log_perplexity) == pytest.approx(expected, rel=1e-4)
    assert score.scored_tokens == len(edge.encode("What does ls do?"))
    # The continuation's log-likelihood is the teacher-forced sum over its tokens.
    whole = ids + edge.encode(prompt.first) + edge.encode(prompt.second)
    logprobs = cs.edge_logprobs(edge, whole)
    assert sum(score.loglik) == pytest.approx(float(logprobs[len(ids) - 1 :].sum()), rel=1e-6)
    assert len(logprobs) == len(whole) - 1


def test_bench_runs_on_tiny(tiny_models: ModelSet, tmp_path: Path) -> None:
    result = bench.run(tiny_models, limit=80, threads=1, out_dir=tmp_path)
    json.dumps(result)  # plain JSON
    assert {
        "prompts",
        "q_edge",
        "q_cloud",
        "signals",
        "best_signal",
        "cpt80_best",
        "random_cpt80",
        "oracle_cpt80",
        "split_half_cpt80",
        "gain_at",
    } <= set(result)
    assert set(result["gain_at"]) == {"0.1", "0.2", "0.3", "1.0"}
    # prefill_learned is left out when its fit does not weigh perplexity up.
    assert set(bench.SIGNALS) - {"prefill_learned"} <= set(result["signals"]) <= set(bench.SIGNALS)
    for figures in result["signals"].values():
        assert set(figures) == {"cpt50", "cpt80", "auc"}
    assert result["prompts"] > 0 and result["prompts_fit"] > 0
    plot = Path(result["plot"])
    assert plot.parent == tmp_path and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["calibration"]) == {"before", "after"}


def test_bare_png_is_a_valid_image(tmp_path: Path) -> None:
    path = tmp_path / "bare.png"
    bench._bare_png({"a": cq.curve(GAPS, GAPS)}, path, size=32)
    data = path.read_bytes()
    assert (
        data[:8] == b"\x89PNG\r\n\x1a\n"
        and data[12:16] == b"IHDR"
        and data.endswith(b"IEND\xaeB`\x82")
    )
