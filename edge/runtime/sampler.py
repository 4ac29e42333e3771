"""The edge's own token choice: greedy, or a seeded draw under temperature, top-k and top-p.

Every request is sampled here rather than by onnxruntime-genai's search, so that speculative
decoding (`edge.runtime.speculative`) can choose a token from any position of a verify pass,
and so that drafting never changes a seeded answer: a draft is a single token (a point
mass), so the exact speculative-sampling rule reduces to "draw the token from the model's
distribution at that position, keep the draft when it is the draw". Every position thus
takes one draw from the request's generator, with or without drafts. A grammar's mask
(`edge.runtime.guided`) applies before the draw.

Order of the knobs, as in vLLM and transformers: temperature, then top-k, then top-p (the
smallest set of the most likely tokens whose probability reaches `top_p`).
"""

from __future__ import annotations

import numpy as np

from serving.sampling import SamplingParams

#: Candidates taken by a partial sort first when top-p alone narrows the distribution; the
#: whole vocabulary is sorted only when they hold less than `top_p`.
_TOP_P_FIRST = 256


def new_rng(options: SamplingParams) -> np.random.Generator:
    """The request's random generator: seeded by `options.seed`, else from the OS."""
    return np.random.default_rng(options.seed)


def choose(logits: np.ndarray, options: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from (V,) `logits` (penalties and any mixture already applied)."""
    if options.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / options.temperature
    ids = _candidates(scaled, options.top_k)
    values = scaled[ids]
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    if options.top_p < 1.0:
        ids, probs = _nucleus(scaled, ids, probs, options.top_p)
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(ids[min(index, len(ids) - 1)])


def _candidates(scaled: np.ndarray, top_k: int) -> np.ndarray:
    """Token ids left by top-k (every id when `top_k` is 0 or covers the vocabulary)."""
    if 0 < top_k < scaled.shape[-1]:
        return np.argpartition(-scaled, top_k - 1)[:top_k]
    return np.arange(scaled.shape[-1])


def _nucleus(
    scaled: np.ndarray, ids: np.ndarray, probs: np.ndarray, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """The smallest most-likely prefix of (`ids`, `probs`) whose probability reaches `top_p`,
    renormalized; sorted by probability, ties by id."""
    if len(ids) > _TOP_P_FIRST:
        head = np.argpartition(-probs, _TOP_P_FIRST - 1)[:_TOP_P_FIRST]
        if probs[head].sum() >= top_p:
            ids, probs = ids[head], probs[head]
    order = np.lexsort((ids, -probs))
    ids, probs = ids[order], probs[order]
    keep = int(np.searchsorted(np.cumsum(probs), top_p, side="left")) + 1
    ids, probs = ids[:keep], probs[:keep]
    return ids, probs / probs.sum()
