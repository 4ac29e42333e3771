"""Per-token math of the worker: log-probabilities, top-k scores, adapter mixing, penalties,
search options.

A token's log-probability is read from the raw logits the worker fetched before sampling
(log-softmax before temperature) and kept for the router. A request that asks for
`top_logprobs` also gets the k most likely tokens of each step: `np.argpartition` over V (no
Python loop over the vocabulary), then a sort of those k only, scored against the same
logsumexp.

Personalization. A request may carry a per-user adapter (`edge.personal.adapt.NgramCache`).
At each step the worker asks it for its sparse next-token distribution after the context (the
prompt's tail, then the generated tokens); when its gate is open the logits are mixed in place
(`edge.personal.adapt.mix_logits`: one logsumexp over V, then only the cache's tokens) and
handed back with `Generator.set_logits((1, 1, V) float32)` before `generate_next_token()`,
which then samples from the mixture (temperature, top-p and top-k apply to the mixed logits).
The reported log-probability is that of the mixed distribution and reuses the logsumexp, so
it costs no second pass over V. A request without an adapter runs none of this.

Penalties (`serving.penalties`: presence, frequency, repetition) come after the adapter: they
act on the distribution the token is drawn from, as temperature does, so a user's mixture is
penalized like the model's own. They change a copy of the (mixed) logits, handed to the
generator with `set_logits` (which copies it), so the reported log-probabilities stay those
of the model (or its mixture), taken before the penalties. A grammar's mask still applies
after them. onnxruntime-genai's own `repetition_penalty` search option is not used: it is a
search option, so kept prefix generators would be keyed by it (`edge.runtime.prefix`), and
it has no presence or frequency penalty beside it; here the whole history lives in the
request's job, so any kept generator serves any penalties.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge.personal.adapt import NgramCache, mix_logits, mixed_logsumexp
from models.logits import log_softmax, logsumexp
from serving.penalties import TokenCounts, penalize
from serving.sampling import SamplingParams


def token_logprob(logits: np.ndarray, token_id: int, mixed_lse: float | None) -> float:
    """Log-probability of `token_id` under the (V,) `logits` it was drawn from.

    `mixed_lse`: the logsumexp of adapter-mixed logits (`mix_adapter`), reused; None: the
    logits are the model's own and are normalized here.
    """
    if mixed_lse is None:
        return float(log_softmax(logits, token_id))
    return float(logits[token_id]) - mixed_lse


def search_options(options: SamplingParams, vocab_size: int) -> dict[str, Any]:
    """onnxruntime-genai search options of a request, but `max_length`."""
    search: dict[str, Any] = {}
    if not options.greedy:
        search.update(
            do_sample=True,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k or vocab_size,
        )
        if options.seed is not None:
            search["random_seed"] = options.seed
    else:
        search["do_sample"] = False
    return search


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


def mix_adapter(
    adapter: NgramCache, context: Sequence[int], raw: np.ndarray, generator: Any
) -> float | None:
    """Mix `adapter` into `raw` ((1, 1, V) logits) and hand them to `generator`.

    Returns the logsumexp of the mixed logits, or None when the gate is closed (the
    generator keeps its own logits).
    """
    lse = mixed_row(adapter, context, raw[0, 0])
    if lse is not None:
        generator.set_logits(raw)
    return lse


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


def apply_penalties(counts: TokenCounts, raw: np.ndarray, generator: Any) -> None:
    """Hand `generator` a penalized copy of `raw` ((1, 1, V) logits, an adapter's mixture
    included); `raw` itself is left as it is (the log-probabilities read it)."""
    if counts.entries()[0]:
        generator.set_logits(penalized_row(counts, raw[0, 0])[None, None, :])


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
