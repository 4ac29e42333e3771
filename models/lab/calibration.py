"""Calibrate the edge's routing threshold on held-out prompts, at build time.

The edge sends a request to the cloud when its prompt perplexity (read from the prefill
logits) is above `perplexity_threshold`. This module chooses that threshold for a model set:
it cuts held-out passages of `min_tokens`..`max_tokens` tokens from both sides of the corpus
(the edge's domain and the rest; documents the models never trained on), measures each one's
prompt perplexity with a scorer: the build passes `models.ort_edge.EdgeModel`, which the edge
runtime serves too (the same loader, tokenizer, chat template and `models.scoring.prefill`
the router reads at serving time, on the int4 build)
and picks the threshold that maximises balanced accuracy for "out of domain -> cloud". It
also reports the ROC AUC of the signal. The result goes into `manifest.json` under `routing`;
the edge uses it whenever its policy leaves `perplexity_threshold` unset.

Short prompts have a higher perplexity than long ones (less context), so passages are cut at
varied lengths (LENGTH_BUCKETS) and one threshold is fitted per bucket of scored tokens
(`thresholds_by_length`); the edge picks the bucket by the request's scored-token count. Each
passage is scored twice, as the edge serves it: as a completion prompt (all its tokens) and
wrapped as a chat user message (its content tokens only, not the role tags).

Torch-free, deterministic given the seed and the corpus; it imports no service.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from models.scoring import encode_with_span

logger = logging.getLogger(__name__)

#: Passages per side (in / out of the edge's domain) and length bucket at most.
MAX_PROMPTS = 48
#: Length buckets of scored tokens: (shortest passage, largest scored-token count; None for
#: the last, open bucket, whose passages are cut up to MAX_TOKENS).
LENGTH_BUCKETS: tuple[tuple[int, int | None], ...] = ((4, 12), (13, 24), (25, 48), (49, None))
MIN_TOKENS = 4
MAX_TOKENS = 96
#: Fewer passages than this on either side: no calibration (too noisy to trust).
MIN_PROMPTS = 8


def roc_auc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """Probability that a positive scores above a negative (ties count one half)."""
    neg = np.asarray(negatives, dtype=np.float64)[:, None]
    pos = np.asarray(positives, dtype=np.float64)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (neg.size * pos.size))


def best_threshold(
    negatives: Sequence[float], positives: Sequence[float]
) -> tuple[float, float, float, float]:
    """The threshold T maximising balanced accuracy of "score > T -> positive".

    T is placed halfway (geometrically: perplexities are ratios) between the last score kept
    below it and the next one, so small drifts do not flip a calibration prompt. Among equal
    balanced accuracies the largest T wins (more stays on the edge).

    Returns:
        (threshold, balanced accuracy, true-positive rate, true-negative rate).
    """
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    pos = np.sort(np.asarray(positives, dtype=np.float64))
    values = np.unique(np.concatenate([neg, pos]))
    best: tuple[float, float, float, float] | None = None
    # Candidate i: T in [values[i], values[i+1]); scores <= values[i] stay on the edge.
    for i in range(len(values) - 1, -1, -1):
        cut = values[i]
        tpr = float((pos > cut).mean())
        tnr = float((neg <= cut).mean())
        score = (tpr + tnr) / 2
        if best is None or score > best[1] + 1e-12:
            upper = values[i + 1] if i + 1 < len(values) else cut
            threshold = math.sqrt(cut * upper) if cut > 0 else (cut + upper) / 2
            best = (float(threshold), score, tpr, tnr)
    assert best is not None
    return best


def passages(
    texts: Sequence[str],
    encode: Any,
    decode: Any,
    *,
    rng: random.Random,
    limit: int,
    min_tokens: int,
    max_tokens: int,
) -> list[str]:
    """Up to `limit` passages of `min_tokens`..`max_tokens` tokens cut from `texts`.

    Each document is cut into consecutive windows of random length; windows are taken
    round-robin over documents (first window of every document, then the second...), so a
    long document does not crowd out the others.
    """
    per_doc: list[list[str]] = []
    for text in texts:
        ids = encode(text)
        windows: list[str] = []
        start = 0
        while True:
            size = rng.randint(min_tokens, max_tokens)
            if start + size > len(ids):
                break
            windows.append(decode(ids[start : start + size]))
            start += size
        if windows:
            per_doc.append(windows)
    out: list[str] = []
    depth = 0
    while len(out) < limit and any(depth < len(w) for w in per_doc):
        for windows in per_doc:
            if depth < len(windows) and len(out) < limit:
                out.append(windows[depth])
        depth += 1
    return out


def _perplexities(
    scorer: PromptScorer, prompts: list[tuple[list[int], tuple[int, int]]]
) -> list[float]:
    """Prompt perplexity of each (token ids, scored span)."""
    values = (scorer.perplexity(ids, span) for ids, span in prompts)
    return [value for value in values if value is not None]


def _fit(inside: Sequence[float], outside: Sequence[float]) -> dict[str, Any]:
    """Threshold, AUC and rates for one set of scores (threshold None when it cannot be fitted)."""
    out: dict[str, Any] = {
        "threshold": None,
        "prompts": {"in_domain": len(inside), "out_of_domain": len(outside)},
    }
    if min(len(inside), len(outside)) < MIN_PROMPTS:
        return out
    threshold, balanced, tpr, tnr = best_threshold(inside, outside)
    out.update(
        auc=round(roc_auc(inside, outside), 4),
        balanced_accuracy=round(balanced, 4),
        to_cloud_rate_out_of_domain=round(tpr, 4),
        to_edge_rate_in_domain=round(tnr, 4),
        median_perplexity={
            "in_domain": round(float(np.median(inside)), 3),
            "out_of_domain": round(float(np.median(outside)), 3),
        },
    )
    if balanced > 0.5:
        out["threshold"] = round(threshold, 3)
    return out


class PromptScorer(Protocol):
    """What calibration needs of the edge model: its text side and its prompt perplexity."""

    context_length: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: list[dict[str, Any]]) -> str: ...

    def perplexity(
        self, ids: Sequence[int], span: tuple[int, int] | None = None
    ) -> float | None: ...


def calibrate(
    scorer: PromptScorer,
    in_domain: Sequence[str],
    out_of_domain: Sequence[str],
    *,
    seed: int = 0,
    max_prompts: int = MAX_PROMPTS,
    min_tokens: int = MIN_TOKENS,
    max_tokens: int = MAX_TOKENS,
    precision: str = "int4",
) -> dict[str, Any]:
    """Choose the edge's perplexity thresholds (overall and per length bucket) on held-out text.

    Args:
        scorer: the edge build to measure, loaded (`models.ort_edge.EdgeModel`).
        in_domain: held-out documents of the edge's domain.
        out_of_domain: held-out documents outside it.
        seed: passage lengths are drawn from a generator seeded with it.
        max_prompts: passages per side and length bucket at most.
        min_tokens: shortest passage (tokens).
        max_tokens: longest passage (tokens; capped below the edge's context window).
        precision: recorded with the result.

    Returns:
        The manifest's `routing` section: `perplexity_threshold` fitted on every score (None
        when a side has fewer than MIN_PROMPTS passages or the signal does not separate the
        sides at all, with `skipped` saying why), `thresholds_by_length` (one entry per
        bucket: `max_tokens` of scored tokens, None for the last; `threshold`, None when that
        bucket cannot be fitted; `auc`; `prompts`), `auc`, `balanced_accuracy`,
        `to_cloud_rate_out_of_domain`, `to_edge_rate_in_domain`, `median_perplexity`,
        `prompts` (scored prompts per side: each passage twice, completion and chat),
        `prompt_tokens`, `precision`, `seconds`.
    """
    started = time.perf_counter()
    # Room for the chat wrapping (a few tokens) inside the context window.
    top = max(2, min(max_tokens, scorer.context_length - 16))
    low = max(2, min(min_tokens, top))
    rng = random.Random(seed)

    buckets: list[tuple[int, int, int | None]] = []  # (shortest, longest passage, max)
    for shortest, most in LENGTH_BUCKETS:
        a = max(low, shortest)
        b = min(top, most if most is not None else top)
        if a <= b:
            buckets.append((a, b, most))
    # side -> bucket index -> scored prompts (token ids, span)
    sides: dict[str, list[list[tuple[list[int], tuple[int, int]]]]] = {}
    for name, texts in (("in_domain", in_domain), ("out_of_domain", out_of_domain)):
        per_bucket = []
        for a, b, _ in buckets:
            cut = passages(
                texts,
                scorer.encode,
                scorer.decode,
                rng=rng,
                limit=max_prompts,
                min_tokens=a,
                max_tokens=b,
            )
            scored: list[tuple[list[int], tuple[int, int]]] = []
            for text in cut:
                scored.append(encode_with_span(scorer.encode, text, None))
                # Wrapped by the edge model's own chat template, as the edge serves it.
                chat = scorer.render_chat([{"role": "user", "content": text}])
                begin = chat.rindex(text)
                scored.append(encode_with_span(scorer.encode, chat, (begin, begin + len(text))))
            per_bucket.append(scored)
        sides[name] = per_bucket
    result: dict[str, Any] = {
        "perplexity_threshold": None,
        "thresholds_by_length": [],
        "prompts": {k: sum(len(b) for b in v) for k, v in sides.items()},
        "prompt_tokens": [low, top],
        "precision": precision,
        "seed": seed,
    }
    if min(result["prompts"].values()) < MIN_PROMPTS:
        result["skipped"] = (
            f"too little held-out text (scored prompts: {result['prompts']}, need "
            f"{MIN_PROMPTS} on each side)"
        )
        logger.warning("routing calibration skipped: %s", result["skipped"])
        return result
    scores = {
        name: [_perplexities(scorer, prompts) for prompts in per_bucket]
        for name, per_bucket in sides.items()
    }
    inside = [v for bucket in scores["in_domain"] for v in bucket]
    outside = [v for bucket in scores["out_of_domain"] for v in bucket]
    overall = _fit(inside, outside)
    by_length = []
    for index, (_, _, most) in enumerate(buckets):
        fit = _fit(scores["in_domain"][index], scores["out_of_domain"][index])
        entry = {"max_tokens": most, "threshold": fit["threshold"], "auc": fit.get("auc")}
        entry["balanced_accuracy"] = fit.get("balanced_accuracy")
        entry["prompts"] = fit["prompts"]
        by_length.append(entry)
    result.update(
        {k: v for k, v in overall.items() if k not in ("threshold",)},
        thresholds_by_length=by_length,
        seconds=round(time.perf_counter() - started, 2),
    )
    if overall["threshold"] is not None:
        result["perplexity_threshold"] = overall["threshold"]
    else:
        result["skipped"] = "prompt perplexity does not separate the domains on this model set"
    logger.info(
        "routing calibration: threshold %s (by length %s), AUC %s (%s prompts)",
        result["perplexity_threshold"],
        [(e["max_tokens"], e["threshold"], e["auc"]) for e in by_length],
        result.get("auc"),
        result["prompts"],
    )
    return result
