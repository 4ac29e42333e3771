"""Per-token math of the worker: log-probabilities, top-k scores, adapter mixing, penalties.

A token's log-probability is read from the logits the token was drawn from, before
penalties, temperature and a grammar's mask (log-softmax; the mixture's, for a personalized
request) and kept for the router. A request that asks for `top_logprobs` also gets the k
most likely tokens of each step: `np.argpartition` over V (no Python loop over the
vocabulary), then a sort of those k only, scored against the same logsumexp.

Personalization. A request may carry a per-user adapter (`edge.personal.adapt.NgramCache`).
At each position the worker asks it for its sparse next-token distribution after the context
(the prompt's tail, then the generated tokens); when its gate is open the logits are mixed in
place (`edge.personal.adapt.mix_logits`: one logsumexp over V, then only the cache's tokens),
and the token is drawn from the mixture (temperature, top-p and top-k apply to the mixed
logits). The reported log-probability is that of the mixed distribution and reuses the
logsumexp, so it costs no second pass over V. A request without an adapter runs none of this.

Penalties (`serving.penalties`: presence, frequency, repetition) come after the adapter: they
act on the distribution the token is drawn from, as temperature does, so a user's mixture is
penalized like the model's own. They change a copy of the (mixed) logits, so the reported
log-probabilities stay those of the model (or its mixture). A grammar's mask comes after
them. The request's whole history lives in its job, so a kept prefix generator serves any
penalties.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edge.personal.adapt import NgramCache, mix_logits, mixed_logsumexp
from models.logits import log_softmax, logsumexp
from serving.penalties import TokenCounts, penalize


def token_logprob(logits: np.ndarray, token_id: int, mixed_lse: float | None) -> float:
    """Log-probability of `token_id` under the (V,) `logits` it was drawn from.

    `mixed_lse`: the logsumexp of adapter-mixed logits (`mixed_row`), reused; None: the
    logits are the model's own and are normalized here.
    """
    if mixed_lse is None:
        return float(log_softmax(logits, token_id))
    return float(logits[token_id]) - mixed_lse


def top_scores(
    logits: np.ndarray,
    token_id: int,
    top_logprobs: int,
    lse: float | None,
    decode: Callable[[list[int]], str],
) -> tuple[str, tuple[tuple[str, float], ...]]:
    """The chosen token's text and the step's `top_logprobs` most likely tokens.

    `logits` are the (V,) logits the token was drawn from (mixed, for an adapter, with
    their logsumexp `lse`; None: computed here). Top-k by `np.argpartition`, O(V).
    """
    k = min(top_logprobs, logits.shape[-1])
    if k <= 0:
        return decode([token_id]), ()
    total = logsumexp(logits) if lse is None else lse
    ids = np.argpartition(logits, -k)[-k:]
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    top = tuple((decode([int(i)]), float(logits[i]) - total) for i in ids)
    return decode([token_id]), top


def mixed_row(adapter: NgramCache, context: Sequence[int], logits: np.ndarray) -> float | None:
    """Mix `adapter`'s prediction after `context` into (V,) `logits` in place.

    Returns the logsumexp of the mixed logits, or None when the gate is closed (the logits
    are left as they are).
    """
    try:
        ids, probs, weight = adapter.predict(context)
    except (RuntimeError, KeyError):  # updated by another thread meanwhile: skip a step
        return None
    if weight <= 0.0:
        return None
    if int(ids.max()) >= logits.shape[-1]:  # learned with another tokenizer: ignore those ids
        keep = ids < logits.shape[-1]
        ids, probs = ids[keep], probs[keep]
        if len(ids) == 0:
            return None
    lse = logsumexp(logits)
    mix_logits(logits, ids, probs, weight, lse=lse)
    return mixed_logsumexp(lse, probs, weight)


def penalized_row(counts: TokenCounts, logits: np.ndarray) -> np.ndarray:
    """(V,) `logits` under the penalties: a copy (the same array when nothing is seen)."""
    ids, seen = counts.entries()
    if not ids:
        return logits
    index = np.fromiter(ids, dtype=np.int64, count=len(ids))
    penalized = logits.copy()
    penalized[index] = penalize(
        penalized[index], np.asarray(seen), counts.presence, counts.frequency, counts.repetition
    )
    return penalized
