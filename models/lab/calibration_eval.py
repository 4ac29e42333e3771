"""The edge's default routing rule, chosen by quality on held-out prompts.

Used by the build (the signal and threshold stored in the manifest's `routing` section) and
by `hybridgen bench routing` (the curves). The prompts come from `models.lab.calibration_set`,
each end's scores from `models.lab.calibration_scores`; here, on the fit split, each prefill
signal the edge can apply (plain or length-normalised prompt perplexity, or a learned mix) is
fitted, and the one that recovers the target share of the edge-to-cloud gap while sending
the fewest prompts is kept, with its threshold (`models.lab.calibration_quality`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.lab import calibration_quality as cq
from models.lab.calibration_scores import measure
from models.lab.calibration_set import CONTINUATION_TOKENS, MAX_PROMPT_TOKENS, eval_set
from models.lab.corpus import Corpus

logger = logging.getLogger(__name__)

#: Signals the edge's default policy can apply at prefill (the build chooses among them).
PREFILL_SIGNALS = ("prompt_perplexity", "perplexity_by_length", "prefill_learned")


def prefill_features(data: dict[str, np.ndarray]) -> np.ndarray:
    """What the edge knows at prefill: ln perplexity, ln scored tokens, chat (1) or not (0)."""
    return np.column_stack(
        [
            data["log_perplexity"],
            np.log(np.maximum(1.0, data["scored_tokens"])),
            data["question"].astype(np.float64),
        ]
    )


@dataclass(frozen=True)
class PrefillRule:
    """A prefill signal, fitted: send when `ln ppl > log_threshold(n, chat)` where
    `log_threshold = threshold + intercept + slope * ln n + chat_offset * chat`."""

    signal: str
    values: np.ndarray  # the signal on the prompts it was fitted on (higher: send)
    intercept: float = 0.0
    slope: float = 0.0
    chat_offset: float = 0.0
    #: The learned rule's log-odds -> ln-perplexity terms (its threshold maps through them).
    learned: cq.Logistic | None = None

    def routing(self, threshold: float) -> dict[str, float]:
        """The manifest fields that make the edge send when the signal is above `threshold`."""
        if self.learned is None:
            return {
                "signal_threshold": threshold,
                "length_intercept": self.intercept,
                "length_slope": self.slope,
                "chat_offset": self.chat_offset,
            }
        # score = w . (x - mean) / scale + bias > threshold, solved for ln ppl (w_p > 0).
        (w_p, w_n, w_c), (m_p, m_n, m_c), (s_p, s_n, s_c) = (
            self.learned.weights,
            self.learned.mean,
            self.learned.scale,
        )
        k = s_p / w_p
        constant = m_p + k * (threshold - self.learned.bias + w_n * m_n / s_n + w_c * m_c / s_c)
        return {
            "signal_threshold": float(constant),
            "length_intercept": 0.0,
            "length_slope": float(-k * w_n / s_n),
            "chat_offset": float(-k * w_c / s_c),
        }


def prefill_rules(data: dict[str, np.ndarray]) -> list[PrefillRule]:
    """The candidate prefill signals fitted on `data` (PREFILL_SIGNALS, in that order).

    `prompt_perplexity`: ln perplexity. `perplexity_by_length`: its residual over a least
    squares fit on length and chat (`calibration_quality.length_fit`): short prompts and chat
    messages read higher whatever their domain. `prefill_learned`: a logistic model of "gap
    above the median" on the three (dropped when it does not weigh perplexity up).
    """
    log_ppl, n, chat = data["log_perplexity"], data["scored_tokens"], data["question"]
    fit = cq.length_fit(log_ppl, n, chat)
    rules = [
        PrefillRule("prompt_perplexity", log_ppl),
        PrefillRule("perplexity_by_length", cq.normalised_perplexity(log_ppl, n, fit, chat), *fit),
    ]
    gap = data["gap"]
    labels = gap > np.median(gap)
    if 0 < labels.sum() < labels.size:
        model = cq.fit_logistic(prefill_features(data), labels)
        if model.weights[0] > 1e-6:
            rules.append(
                PrefillRule("prefill_learned", model.score(prefill_features(data)), learned=model)
            )
    return rules


def calibrate_signal(
    data: dict[str, np.ndarray], *, target: float = cq.DEFAULT_TARGET
) -> dict[str, Any]:
    """The manifest's routing fields for the best prefill signal on calibration prompts.

    Args:
        data: `Records.arrays("fit")`.
        target: share of the edge-to-cloud gap the threshold should recover.

    Returns:
        `signal` (one of PREFILL_SIGNALS), `signal_threshold`, `length_intercept`,
        `length_slope` and `chat_offset` (the edge sends a prompt of n scored tokens when
        `ln ppl > signal_threshold + length_intercept + length_slope * ln n + chat_offset *
        chat`; see `edge.route.rules.signal_threshold`), `target_recovered`,
        `expected_cloud_share`, `perplexity_threshold` (the threshold at `reference_tokens`
        scored tokens, the median, of a completion prompt), and `quality` (each candidate's
        cpt at the target and AUC); or only `quality` with `signal_skipped` when the cloud is
        not better on these prompts.
    """
    gap = data["gap"]
    candidates: dict[str, dict[str, Any]] = {}
    rules = {rule.signal: rule for rule in prefill_rules(data)}
    for name, rule in rules.items():
        c = cq.curve(gap, rule.values)
        candidates[name] = {"cpt": cq.cpt(c, target), "auc": cq.auc(gap, rule.values)}
        found = cq.threshold_at(rule.values, c, target)
        if found is not None:
            candidates[name]["threshold"], candidates[name]["share"] = found
    out: dict[str, Any] = {
        "quality": {
            "prompts": int(gap.size),
            "mean_gap": round(float(gap.mean()), 4) if gap.size else None,
            "candidates": {
                k: {"cpt": v["cpt"], "auc": None if v["auc"] is None else round(v["auc"], 4)}
                for k, v in candidates.items()
            },
        }
    }
    usable = [k for k in PREFILL_SIGNALS if "threshold" in candidates.get(k, {})]
    if not usable or float(gap.sum()) <= 0:
        out["signal_skipped"] = "the cloud does not do better than the edge on these prompts"
        return out
    # The smallest share for the target; ties go to the simpler signal (listed first).
    best = min(usable, key=lambda k: (candidates[k]["cpt"], PREFILL_SIGNALS.index(k)))
    fields = rules[best].routing(float(candidates[best]["threshold"]))
    reference = int(np.median(data["scored_tokens"]))
    log_at_reference = (
        fields["signal_threshold"]
        + fields["length_intercept"]
        + fields["length_slope"] * math.log(max(1, reference))
    )
    out.update(
        signal=best,
        **{k: round(v, 6) for k, v in fields.items()},
        target_recovered=target,
        expected_cloud_share=round(float(candidates[best]["share"]), 4),
        reference_tokens=reference,
        perplexity_threshold=round(math.exp(min(log_at_reference, 700.0)), 3),
    )
    return out


def calibrate_quality(
    edge: Any,
    cloud: Any,
    tokenizer: Any,
    corpus: Corpus,
    *,
    cloud_context: int,
    seed: int = 0,
    limit: int = 400,
    target: float = cq.DEFAULT_TARGET,
) -> dict[str, Any]:
    """The build's quality calibration: `calibrate_signal` on the fit split of `eval_set`.

    Only the fit split is scored; `hybridgen bench routing` measures the result on the
    other split.
    """
    started = time.perf_counter()
    prompts = eval_set(
        corpus,
        edge.encode,
        edge.decode,
        limit=limit,
        max_prompt_tokens=min(MAX_PROMPT_TOKENS, edge.context_length - CONTINUATION_TOKENS - 16),
        seed=seed,
    )
    fit = [p for p in prompts if p.split == "fit"]
    if len(fit) < 8:
        return {"signal_skipped": f"too little held-out text ({len(fit)} calibration prompts)"}
    records = measure(edge, cloud, tokenizer, fit, cloud_context=cloud_context)
    if len(records.prompts) < 8:
        scored = len(records.prompts)
        return {"signal_skipped": f"too few calibration prompts fit the edge ({scored})"}
    out = calibrate_signal(records.arrays(), target=target)
    out["quality"]["seconds"] = round(time.perf_counter() - started, 2)
    logger.info(
        "routing quality calibration: signal %s, threshold %s, expected cloud share %s",
        out.get("signal"),
        out.get("signal_threshold"),
        out.get("expected_cloud_share"),
    )
    return out
