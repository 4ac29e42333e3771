"""The `--in-context` variant of `hybridgen bench personalization`: the user's own samples in
the prompt, picked for relevance and gated.

For a held-out sample (the request), its first `REQUEST_TOKENS` tokens stand for what the
caller sent: they pick the `K` feedback samples sharing most of their bigrams and trigrams
with it, and they open the gate when the user's cache matches at least two tokens of context
at `GATE_MATCH` of their positions (the request "looks like the user's text"). With the gate
open, the picked samples (most relevant last) go in front of the request; with it closed the
request is scored alone. Only positions after the first `REQUEST_TOKENS` are scored, so
nothing the picking or the gate looked at is scored: `ppl_without` here is over those
positions too and differs from the main table's.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from edge.adapt import NgramCache
from hybridgen.benches.personalization_data import User
from models.ort_edge import EdgeModel

#: Feedback samples put in front of a request when the gate is open.
K = 5
#: Tokens of the held-out sample that stand for the request (picking and gating only).
REQUEST_TOKENS = 16
#: The gate opens when this fraction of the request's positions match 2+ tokens of context.
GATE_MATCH = 0.3


def _ngrams(ids: list[int]) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + n]) for n in (2, 3) for i in range(len(ids) - n + 1)}


def pick(feedback: list[list[int]], request: list[int], k: int = K) -> list[int]:
    """Token ids of the `k` feedback samples most relevant to `request`, most relevant last."""
    wanted = _ngrams(request)
    scores = [len(wanted & _ngrams(sample)) for sample in feedback]
    order = sorted(range(len(feedback)), key=lambda i: (-scores[i], i))[:k]
    return [t for i in reversed(order) for t in feedback[i]]


def gate_open(cache: NgramCache, request: list[int]) -> bool:
    """Whether the request looks like the user's text (see the module docstring)."""
    positions = range(1, len(request))
    hits = sum(cache.match(request[max(0, i - cache.order + 1) : i]) >= 2 for i in positions)
    return bool(positions) and hits / len(positions) >= GATE_MATCH


def logprobs_after(model: EdgeModel, prefix: list[int], ids: list[int]) -> np.ndarray:
    """log p_model(ids[i] | prefix + ids[:i]) for i = 1..n-1: one forward pass.

    A prefix longer than the context window leaves has its oldest (least relevant) tokens cut.
    """
    import onnxruntime_genai as og

    room = max(0, model.context_length - len(ids))
    prefix = prefix[len(prefix) - room :] if len(prefix) > room else prefix
    sequence = prefix + ids
    params = og.GeneratorParams(model.model)
    params.set_search_options(max_length=len(sequence))
    generator = og.Generator(model.model, params)
    generator.append_tokens(np.asarray(sequence, dtype=np.int32))
    logits = np.asarray(generator.get_output("logits"))[0, len(prefix) : -1].astype(np.float64)
    peak = logits.max(axis=-1)
    lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
    return np.asarray(logits[np.arange(len(ids) - 1), ids[1:]] - lse)


def _ppl(parts: list[np.ndarray]) -> float:
    return float(np.exp(-np.concatenate([p[REQUEST_TOKENS - 1 :] for p in parts]).mean()))


def _scored(
    model: EdgeModel, user: User, cache: NgramCache, ids: list[int], plain: np.ndarray
) -> tuple[np.ndarray, bool]:
    """Log-probabilities of `ids` with the user's picked samples in front when the gate opens
    (else `plain`, its log-probabilities alone), and whether it opened."""
    request = ids[:REQUEST_TOKENS]
    if not gate_open(cache, request):
        return plain, False
    return logprobs_after(model, pick(user.feedback, request), ids), True


def measure(
    model: EdgeModel,
    users: list[User],
    caches: dict[str, NgramCache],
    base: dict[str, list[np.ndarray]],
    generic: list[list[int]],
    generic_base: list[np.ndarray],
) -> dict[str, Any]:
    """Per user: held-out and generic perplexity with the gated samples in context, alone and
    with the cache mixed in as well; and the summary figures."""
    from hybridgen.benches.personalization import mixed_logprobs

    rows: list[dict[str, Any]] = []
    generic_without = _ppl(generic_base)
    for user in users:
        cache = caches[user.name]
        held = [
            _scored(model, user, cache, s, b)
            for s, b in zip(user.held_out, base[user.name], strict=True)
        ]
        gen = [
            _scored(model, user, cache, s, b) for s, b in zip(generic, generic_base, strict=True)
        ]
        without = _ppl(base[user.name])
        with_context = _ppl([lp for lp, _ in held])
        with_both = _ppl(
            [mixed_logprobs(cache, s, lp) for s, (lp, _) in zip(user.held_out, held, strict=True)]
        )
        generic_with = _ppl(
            [mixed_logprobs(cache, s, lp) for s, (lp, _) in zip(generic, gen, strict=True)]
        )
        rows.append(
            {
                "user": user.name,
                "kind": user.kind,
                "ppl_without": round(without, 3),
                "ppl_in_context": round(with_context, 3),
                "ppl_in_context_and_cache": round(with_both, 3),
                "reduction": round(1 - with_context / without, 4),
                "reduction_with_cache": round(1 - with_both / without, 4),
                "gate_open": round(statistics.fmean(float(o) for _, o in held), 3),
                "generic_gate_open": round(statistics.fmean(float(o) for _, o in gen), 3),
                "generic_change_with_cache": round(generic_with / generic_without - 1, 4),
            }
        )
    real = [r for r in rows if r["kind"] != "persona"]
    prose = [r for r in real if r["kind"] == "prose"]
    changes = [r["generic_change_with_cache"] for r in rows]
    return {
        "k": K,
        "request_tokens": REQUEST_TOKENS,
        "gate_match": GATE_MATCH,
        "per_user": rows,
        "reduction_with_cache_median": round(
            statistics.median(r["reduction_with_cache"] for r in real), 4
        ),
        "reduction_with_cache_prose_min": round(min(r["reduction_with_cache"] for r in prose), 4)
        if prose
        else None,
        "generic_change_with_cache_mean": round(statistics.fmean(changes), 4),
        "generic_change_with_cache_max": round(max(changes), 4),
    }
