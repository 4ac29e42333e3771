"""The user's own samples in context, for `hybridgen bench personalization`: picked and gated
exactly as the edge does it (`edge.personal.personalizer.pick_samples`, `samples_help`, the edge's
settings), teacher-forced over held-out text.

Every position of a held-out sample is a request: the text before it is what the caller sent,
the token at it is what the edge should predict. For each position the edge's rules give:

- **the picks**: the user's samples most relevant to the request so far. Re-picking at every
  position would cost a forward pass per position, so the picks are made twice per sample:
  for the positions among its first `REQUEST_TOKENS` tokens, with an empty request (the
  user's most representative samples, what `pick_samples` falls back to), and after that
  from its first `REQUEST_TOKENS` tokens. No position is scored with picks made from
  itself or later tokens.
- **the bound**: the samples are offered at a position only when the user's cache foresees
  the tokens before it (`samples_offered` of `NgramCache.fit`), as the edge offers them to a
  request only for its own text;
- **the gate**: offered samples are in context at a position when they made the tokens
  before it more likely by more than the edge's `personalize_sample_gain` nats in all (the
  edge compares the request with and without them in the same way); else the model alone.
- the user's n-gram cache mixed on top (`personalization.mixed_logprobs`), as the edge mixes
  it into every step.

The samples text is the edge's (`edge.personal.personalizer.system_text`: the heading, the
samples in feedback order) followed by a blank line, as in front of a personalized completion;
at most `personalize_samples` samples and `personalize_sample_tokens` tokens (the edge's
defaults). A kept generator holds the representative prefix and is rewound for each sample, as
the edge's prefix reuse does; `prefill_ms` is the time of one such prefill of a sample behind
the kept prefix (what each of the gate's extra prefills costs a request whose samples prefix is
kept), `prefix_ms` the time to prefill the samples prefix itself (paid once per new picks)."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.personal.adapt import NgramCache
from edge.personal.personalizer import (
    Sample,
    gram_frequencies,
    pick_samples,
    sample_grams,
    samples_help,
    samples_offered,
    system_text,
    with_prefix,
)
from edge.settings import EdgeSettings
from hybridgen.benches.personalization_data import User
from models.logits import log_softmax_at, teacher_forced
from models.ort_edge import EdgeModel, new_generator

#: Tokens at the start of a held-out sample picked for with an empty request.
REQUEST_TOKENS = 16

_FIELDS = EdgeSettings.model_fields
#: The edge's defaults: samples offered, their token budget, the gate's margin (nats).
SAMPLES_K: int = _FIELDS["personalize_samples"].default
SAMPLES_TOKENS: int = _FIELDS["personalize_sample_tokens"].default
MIN_GAIN: float = _FIELDS["personalize_sample_gain"].default


def _scored(chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The float64 log-probabilities of teacher-forced `(rows, targets)` chunks, in order."""
    parts = [log_softmax_at(rows, targets) for rows, targets in chunks]
    return np.concatenate(parts) if parts else np.empty(0)


def logprobs_after(model: EdgeModel, prefix: list[int], ids: list[int]) -> np.ndarray:
    """log p_model(ids[i] | prefix + ids[:i]) for i = 1..n-1: one forward pass."""
    generator = new_generator(model.model, len(prefix) + len(ids))
    scored = range(len(prefix) + 1, len(prefix) + len(ids))
    return _scored(teacher_forced(generator, prefix + ids, scored, chunk=None))


class KeptPrefix:
    """A generator holding `prefix`, rewound to it for each sample scored behind it."""

    def __init__(self, model: EdgeModel, prefix: list[int], longest: int) -> None:
        started = time.perf_counter()
        self.generator = new_generator(model.model, len(prefix) + longest)
        self.generator.append_tokens(np.asarray(prefix, dtype=np.int32))
        #: Milliseconds to prefill the prefix itself (what new picks cost a request once).
        self.prefix_ms = (time.perf_counter() - started) * 1e3
        self.prefix = prefix
        self.depth = len(prefix)
        self.prefill_ms: list[float] = []

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """log p_model(ids[i] | prefix + ids[:i]) for i = 1..n-1."""
        started = time.perf_counter()
        self.generator.rewind_to(self.depth)
        scored = range(self.depth + 1, self.depth + len(ids))
        chunks = list(
            teacher_forced(self.generator, self.prefix + ids, scored, start=self.depth, chunk=None)
        )
        self.prefill_ms.append((time.perf_counter() - started) * 1e3)
        return _scored(chunks)


@dataclass
class UserSamples:
    """A user's feedback samples as the edge keeps them, and the picks' token ids."""

    model: EdgeModel
    samples: list[Sample]
    #: The samples' token budget: the edge's setting, at most a quarter of the context.
    budget: int
    #: `gram_frequencies(samples)`, counted once as the edge keeps it per user.
    frequencies: Counter[tuple[int, ...]]

    @classmethod
    def of(cls, model: EdgeModel, user: User) -> UserSamples:
        samples = [
            Sample(i, model.decode(ids), sample_grams(ids), len(ids))
            for i, ids in enumerate(user.feedback)
        ]
        budget = min(SAMPLES_TOKENS, model.context_length // 4)
        return cls(model, samples, budget, gram_frequencies(samples))

    def prefix(self, request: list[int]) -> list[int]:
        """Token ids of the samples text picked for `request`, and the blank line after it."""
        picked = pick_samples(self.samples, request, SAMPLES_K, self.budget, self.frequencies)
        text = system_text(None, [s.text for s in picked])
        return self.model.encode(with_prefix("", text)) if text else []


def with_samples(
    model: EdgeModel, samples: UserSamples, kept: KeptPrefix, ids: list[int]
) -> np.ndarray:
    """log-probabilities of `ids` with the picked samples in front: the representative
    picks for its first `REQUEST_TOKENS` tokens, then the picks for those tokens."""
    early = kept.logprobs(ids)
    late = logprobs_after(model, samples.prefix(ids[:REQUEST_TOKENS]), ids)
    cut = REQUEST_TOKENS - 1  # logprob i is token i + 1's
    return np.concatenate([early[:cut], late[cut:]])


def offered(cache: NgramCache, ids: list[int]) -> np.ndarray:
    """Per scored position of `ids`, whether the samples are offered to the request made of
    the tokens before it (`samples_offered` of the user's cache's `fit` on them)."""
    return np.array([samples_offered(cache.fit(ids[:i]), i) for i in range(1, len(ids))])


def gated(
    plain: np.ndarray, samples: np.ndarray, offer: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Per position, the samples' log-probability when they are offered there (`offer`,
    None: everywhere) and gained more than the margin on the tokens before it
    (`samples_help`), else the model's alone; and the share of positions with the samples
    in."""
    out = plain.copy()
    gain, used = 0.0, 0
    for i in range(len(plain)):
        if (offer is None or offer[i]) and samples_help(gain, MIN_GAIN):
            out[i] = samples[i]
            used += 1
        gain += float(samples[i] - plain[i])
    return out, used / max(len(plain), 1)


def measure(
    model: EdgeModel,
    user: User,
    cache: NgramCache,
    held_base: list[np.ndarray],
    generic: list[list[int]],
    generic_base: list[np.ndarray],
) -> dict[str, Any]:
    """The user's held-out and generic log-probabilities with the samples offered and gated
    as the edge does (before the cache is mixed in), the generic ones also gated on evidence
    alone (`generic_unbounded`, the rule before the similarity bound), the gate's open share
    on each, the mean fit of the user's cache on each (`NgramCache.fit`), and the
    kept-prefix prefill times."""
    samples = UserSamples.of(model, user)
    longest = max(len(s) for s in [*user.held_out, *generic])
    kept = KeptPrefix(model, samples.prefix([]), longest)
    held = [
        gated(base, with_samples(model, samples, kept, ids), offered(cache, ids))
        for ids, base in zip(user.held_out, held_base, strict=True)
    ]
    generic_samples = [with_samples(model, samples, kept, ids) for ids in generic]
    other = [
        gated(base, lp, offered(cache, ids))
        for ids, base, lp in zip(generic, generic_base, generic_samples, strict=True)
    ]
    unbounded = [gated(base, lp)[0] for base, lp in zip(generic_base, generic_samples, strict=True)]
    return {
        "held_out": [lp for lp, _ in held],
        "generic": [lp for lp, _ in other],
        "generic_unbounded": unbounded,
        "fit_held_out": statistics.fmean(cache.fit(ids) for ids in user.held_out),
        "fit_generic": statistics.fmean(cache.fit(ids) for ids in generic),
        "gate_open": statistics.fmean(share for _, share in held),
        "generic_gate_open": statistics.fmean(share for _, share in other),
        "prefill_ms": kept.prefill_ms,
        "prefix_ms": kept.prefix_ms,
        "prefix_tokens": kept.depth,
    }
