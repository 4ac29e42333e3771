"""The build-time calibration of the edge's routing threshold (manifest `routing`)."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from models.cli import main
from models.lab import calibration
from models.manifest import routing_calibration, verify
from models.ort_edge import EdgeModel
from models.registry import ModelSet


def test_tiny_build_records_a_calibrated_threshold(tiny_models: ModelSet) -> None:
    routing = tiny_models.manifest["routing"]
    threshold = routing["perplexity_threshold"]
    assert isinstance(threshold, float) and math.isfinite(threshold) and threshold > 0
    # (The AUC's value is checked on scores built for it: test_known_scores_give_known_figures.)
    assert 0.5 < routing["balanced_accuracy"] <= 1.0  # a threshold only when it separates
    assert routing["balanced_accuracy"] == round(
        (routing["to_cloud_rate_out_of_domain"] + routing["to_edge_rate_in_domain"]) / 2, 4
    )
    assert routing["prompts"]["in_domain"] > 0 and routing["prompts"]["out_of_domain"] > 0
    assert routing["precision"] == "int4"
    low, high = routing["prompt_tokens"]
    assert 2 <= low <= high < tiny_models.edge_context_length
    # The threshold sits between the two sides' typical perplexities.
    medians = routing["median_perplexity"]
    assert medians["in_domain"] < medians["out_of_domain"]
    assert "calibration_s" in tiny_models.manifest["timings"]
    # One threshold per length bucket of scored tokens, the last one open.
    buckets = routing["thresholds_by_length"]
    assert [b["max_tokens"] for b in buckets] == [12, 24, 48, None]
    for bucket in buckets:
        assert bucket["prompts"]["in_domain"] >= calibration.MIN_PROMPTS
        assert bucket["threshold"] is None or bucket["threshold"] > 0
    assert any(b["threshold"] is not None for b in buckets)
    verify(tiny_models)  # calibration wrote nothing into the set behind the manifest's back


def test_edge_builds_find_their_calibration(tiny_models: ModelSet, tmp_path: Path) -> None:
    expected = tiny_models.manifest["routing"]["perplexity_threshold"]
    for precision in ("int4", "fp32"):
        found = routing_calibration(tiny_models.edge_dir(precision))
        assert found is not None and found["perplexity_threshold"] == expected
    # A folder outside a model set (or not listed as one of its builds) has none.
    alone = tmp_path / "edge-int4"
    shutil.copytree(tiny_models.edge_dir("int4"), alone)
    assert routing_calibration(alone) is None
    assert routing_calibration(tiny_models.root / "tokenizer") is None


def test_calibration_matches_the_runtime_and_is_deterministic(tiny_models: ModelSet) -> None:
    in_texts = ["NAME\n\nls - list directory contents. " * 30]
    out_texts = ["def popitem(self, last=True):\n    Remove and return a pair. " * 30]
    first = calibration.calibrate(
        EdgeModel(tiny_models.edge_dir("int4")), in_texts, out_texts, seed=3
    )
    again = calibration.calibrate(
        EdgeModel(tiny_models.edge_dir("int4")), in_texts, out_texts, seed=3
    )
    for result in (first, again):
        result.pop("seconds")
    assert first == again
    assert first["prompts"]["in_domain"] >= calibration.MIN_PROMPTS


def test_no_out_of_domain_text_records_null(tiny_models: ModelSet) -> None:
    result = calibration.calibrate(
        EdgeModel(tiny_models.edge_dir("int4")), ["some text " * 200], []
    )
    assert result["perplexity_threshold"] is None
    assert result["prompts"]["out_of_domain"] == 0 and "skipped" in result


class KnownScorer:
    """A scorer whose prompt perplexities are known: one character per token, and each
    passage's perplexity set by the letter it is made of (the first one it scores).

    Calibration's figures (AUC, threshold, rates, medians) are known exactly only for scores
    built for them; the real edge model goes through the same code in
    test_calibration_matches_the_runtime_and_is_deterministic."""

    context_length = 512

    def __init__(self, perplexity_of: dict[str, float]) -> None:
        self.perplexity_of = perplexity_of

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return f"<user>{messages[0]['content']}</user>"

    def perplexity(self, ids: Sequence[int], span: tuple[int, int] | None = None) -> float:
        return self.perplexity_of[chr(ids[0 if span is None else span[0]])]


@pytest.mark.parametrize(
    ("inside", "outside", "auc", "threshold"),
    [
        pytest.param(5.0, 50.0, 1.0, 15.811, id="separated"),  # sqrt(5 * 50)
        pytest.param(50.0, 5.0, 0.0, None, id="reversed"),
        pytest.param(7.0, 7.0, 0.5, None, id="alike"),
    ],
)
def test_known_scores_give_known_figures(
    inside: float, outside: float, auc: float, threshold: float | None
) -> None:
    """In-domain passages all score `inside`, out-of-domain ones `outside`: the AUC, the
    threshold (halfway, geometrically) and the rates follow, overall and in every bucket."""
    scorer = KnownScorer({"a": inside, "z": outside})
    result = calibration.calibrate(scorer, ["a" * 6000], ["z" * 6000])  # 48 cuts a bucket
    separated = threshold is not None
    assert result["auc"] == auc
    assert result["perplexity_threshold"] == threshold
    assert result["balanced_accuracy"] == (1.0 if separated else 0.5)
    assert result["to_cloud_rate_out_of_domain"] == (1.0 if separated else 0.0)
    assert result["to_edge_rate_in_domain"] == 1.0
    assert result["median_perplexity"] == {"in_domain": inside, "out_of_domain": outside}
    assert result["prompts"] == {"in_domain": 4 * 2 * 48, "out_of_domain": 4 * 2 * 48}
    assert ("skipped" in result) is not separated
    buckets = result["thresholds_by_length"]
    assert [(b["max_tokens"], b["auc"], b["threshold"]) for b in buckets] == [
        (most, auc, threshold) for most in (12, 24, 48, None)
    ]


def test_threshold_and_auc() -> None:
    assert calibration.roc_auc([1, 2, 3], [4, 5, 6]) == 1.0
    assert calibration.roc_auc([4, 5, 6], [1, 2, 3]) == 0.0
    assert calibration.roc_auc([1, 2], [1, 2]) == 0.5
    threshold, balanced, tpr, tnr = calibration.best_threshold([10, 20, 30], [40, 50])
    assert 30 < threshold < 40 and balanced == tpr == tnr == 1.0
    threshold, balanced, _, _ = calibration.best_threshold([10, 20, 45], [40, 50, 60])
    # Two cuts tie (20..40 and 45..50): the larger one keeps more on the edge.
    assert balanced == pytest.approx((2 / 3 + 1) / 2) and 45 < threshold < 50
    # No separation at all: the largest threshold (everything stays on the edge).
    threshold, balanced, _, _ = calibration.best_threshold([5, 5], [5, 5])
    assert balanced == 0.5 and threshold == 5


def test_passages_are_round_robin_and_bounded() -> None:
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    out = calibration.passages(
        ["a" * 100, "b" * 30, "c" * 50],
        encode,
        decode,
        rng=random.Random(0),
        limit=4,
        min_tokens=10,
        max_tokens=20,
    )
    assert len(out) == 4 and all(10 <= len(p) <= 20 for p in out)
    assert [p[0] for p in out[:3]] == ["a", "b", "c"]


def test_models_list_shows_the_threshold(
    tiny_models: ModelSet, tiny_models_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", "--home", str(tiny_models_home), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    routing = next(s for s in listed if s["version"] == tiny_models.version)["routing"]
    assert (
        routing["perplexity_threshold"] == tiny_models.manifest["routing"]["perplexity_threshold"]
    )
    assert routing["auc"] == tiny_models.manifest["routing"]["auc"]
    assert main(["list", "--home", str(tiny_models_home)]) == 0
    table = capsys.readouterr().out
    assert "ROUTE PPL>" in table and f"AUC {routing['auc']:.2f}" in table


def test_build_stores_the_quality_signal_and_threshold(tiny_models: ModelSet) -> None:
    from models.lab.calibration_eval import PREFILL_SIGNALS

    routing = tiny_models.manifest.routing
    assert routing is not None
    assert routing.signal in PREFILL_SIGNALS
    assert isinstance(routing.signal_threshold, float)
    assert routing.target_recovered == 0.8
    assert routing.expected_cloud_share is not None and 0 < routing.expected_cloud_share <= 1
    assert routing.quality["prompts"] >= 8
    assert set(routing.quality["candidates"]) == set(PREFILL_SIGNALS)
    # The manifest's perplexity threshold is the signal's at its reference length.
    assert routing.reference_tokens is not None and routing.perplexity_threshold is not None
    from edge.route.rules import length_threshold

    at_reference = length_threshold(routing.to_json(), routing.reference_tokens)
    assert at_reference == pytest.approx(routing.perplexity_threshold, rel=1e-3)


def test_edge_thresholds_follow_the_calibrated_signal() -> None:
    from edge.route.rules import length_threshold

    buckets = [{"max_tokens": 12, "threshold": 900.0}, {"max_tokens": None, "threshold": 50.0}]
    old = {"perplexity_threshold": 80.0, "thresholds_by_length": buckets}
    assert length_threshold(old, 8) == 900.0 and length_threshold(old, 40) == 50.0
    plain = {**old, "signal": "prompt_perplexity", "signal_threshold": math.log(60.0)}
    assert length_threshold(plain, 8) == pytest.approx(60.0)
    assert length_threshold(plain, 40) == pytest.approx(60.0)
    by_length = {
        **old,
        "signal": "perplexity_by_length",
        "signal_threshold": 0.25,
        "length_intercept": 6.0,
        "length_slope": -0.5,
    }
    for n in (4, 12, 100):
        expected = math.exp(0.25 + 6.0 - 0.5 * math.log(n))
        assert length_threshold(by_length, n) == pytest.approx(expected)
    # An unknown signal falls back to the buckets.
    assert length_threshold({**old, "signal": "draft", "signal_threshold": 1.0}, 8) == 900.0


async def test_edge_default_policy_uses_the_signal(tiny_models: ModelSet) -> None:
    from edge.link import BusLink
    from edge.node import EdgeNode
    from edge.route.rules import PolicySettings
    from edge.runtime import EdgeRuntime
    from edge.settings import EdgeSettings
    from tui.screens import policy_lines

    async def no_reload(args: dict[str, object]) -> dict[str, object]:
        return {}

    runtime = EdgeRuntime(tiny_models.edge_dir("int4"), threads=1)
    try:
        node = EdgeNode(EdgeSettings(), runtime, PolicySettings())
        routing = tiny_models.manifest["routing"]
        assert node.routing_signal is not None and node.routing_signal.startswith(routing["signal"])
        # The heartbeat's policy in force names it, and the console's node screen shows it.
        shown = BusLink(node, reload_model=no_reload).policy_in_force()
        assert shown["routing_signal"] == {"value": node.routing_signal, "source": "model_set"}
        assert f" routing_signal: {node.routing_signal} (model_set)" in policy_lines(
            {"policy": shown}
        )
        log_threshold = routing["signal_threshold"]
        for n in (4, 30, 90):
            expected = log_threshold
            if routing["signal"] == "perplexity_by_length":
                expected += routing["length_intercept"] + routing["length_slope"] * math.log(n)
            threshold, source = node.threshold_for(n)
            assert source == "model_set" and threshold == pytest.approx(math.exp(expected))
        # A policy value still wins.
        node.set_policy(PolicySettings(perplexity_threshold=123.0))
        assert node.threshold_for(4) == (123.0, "policy")
        assert "routing_signal" not in BusLink(node, reload_model=no_reload).policy_in_force()
    finally:
        await runtime.close()
