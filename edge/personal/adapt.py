"""Per-user online adaptation: a gated token n-gram cache mixed into the edge model's logits.

Numpy only (the edge never imports torch or transformers).

The model. `NgramCache` counts, for every context of 1 to `order - 1` tokens (order 7: up to
six tokens) seen in a user's accepted text, which token followed it. `predict(context)` finds
the longest suffix of the context it has seen and returns the Witten-Bell interpolated
distribution of the next token, sparse (only the tokens it has counts for), with a gate weight:

    P_k(w) = (c_k(w) + T_k * P_{k-1}(w)) / (c_k + T_k),   P_1(w) = c_1(w) / c_1

where c_k(w) is the count of w after the k-token suffix, c_k its total and T_k its number of
distinct followers. Every follower of a longer context is a follower of its shorter suffixes
(all orders are counted together), so the support is the followers of the last token.

The gate: with c the total count of the longest matched context, the weight is
`0.3 * c / (c + 0.25)`, a quarter of that when only one token of context matched, and 0 when
nothing matched. A new user therefore changes nothing.

The request's fit. The gate alone opens on any matched context, and a user whose text is far
from a request's (a chat persona on a narrow topic, and generic text) shares its common
phrases: there the cache pulled the model towards the user's words and raised the perplexity
of the request's text. So each request gets a bounded view (`bounded`): `fit` reads the
request's own tokens (its caller's text, the prompt) and averages, weighted by the gate, the
probability the cache gave each next one; below `FIT_LOW` the weight is 0, from `FIT_FULL` it
is whole, linear between (`fit_scale`). The rule is model-free (no extra prefill) and decided
before the first step, so every token of the answer, not only the first ones, is served under
it. The user's samples in context are bounded by the same fit (`samples.samples_offered`).

Mixing. `mix_logits` turns the mixture p = (1 - w) p_model + w p_cache into logits in place,
touching only the cache's tokens: softmax is shift-invariant, so with lse = logsumexp(logits)

    new_logit_t = logaddexp(logit_t, lse + log(w / (1 - w)) + log p_cache_t)

(the same as logit_t + log1p(w p_cache_t / ((1 - w) p_model_t)), but finite when p_model_t
underflows). The only O(V) work is one vectorized logsumexp (`models.logits.logsumexp`),
which replaces the log-softmax the runtime would compute for the token's log-probability:
the mixed distribution's own log-normaliser is lse - log(1 - w) (`mixed_logsumexp`), so its
log-probabilities come free.

Temperature. The edge samples with onnxruntime-genai's sampler after `set_logits`, which then
applies temperature / top-p / top-k to the mixed logits: the mixture is formed at temperature 1
and tempered afterwards (softmax(log p_mix / T)), not a mixture of tempered distributions.
Greedy decoding takes the argmax of the mixture.

Memory. At most `max_contexts` contexts are kept (default `MAX_CONTEXTS`; the edge sets it
from `EdgeSettings.personalize_max_contexts`); a kept context costs about
`BYTES_PER_CONTEXT` bytes of Python objects, the dict's reinsert slack included.

Pruning is incremental. The contexts dict is kept in recency order: an update moves each
context it touches to the end (pop and reinsert, O(1)), and within one position the longest
context first, so a context's shorter suffixes always come after it. When the cap is passed
(checked at each position of an update, so one long sample never holds much more), the
oldest contexts are dropped from the front down to 90% of the cap: each drop examines only
the contexts it drops, so a batch costs O(cap / 10) once per cap / 10 new contexts, O(1) per
new context amortized, and never a sort (`examined` counts them). A dropped context never
leaves a longer extension behind.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import msgpack
import numpy as np

from models.logits import logsumexp

#: Default n-gram order: the next token given up to six tokens of context.
ORDER = 7
#: Default cap on kept contexts per user (see the module docstring).
MAX_CONTEXTS = 100_000
#: Bytes of Python objects per kept context, measured (tracemalloc, SmolLM2-sized ids).
BYTES_PER_CONTEXT = 480
#: Pruning drops down to this fraction of the cap (a batch of a tenth of it).
PRUNE_TO = 0.9
#: Gate: the cache's weight tends to this as the matched context's count grows.
GATE_MAX = 0.3
#: Gate: half-saturation count of the longest matched context.
GATE_COUNT = 0.25
#: Gate: factor applied when only one token of context matched.
GATE_UNIGRAM_CONTEXT = 0.25
#: The request's fit (`NgramCache.fit`) under which the cache stays out (`fit_scale`).
FIT_LOW = 0.05
#: The request's fit from which the cache's weight is whole (`fit_scale`).
FIT_FULL = 0.2
#: `fit` reads at most this many of the request's last tokens.
FIT_TOKENS = 256

_FORMAT = 1
_EMPTY_IDS = np.zeros(0, dtype=np.int64)
_EMPTY_PROBS = np.zeros(0, dtype=np.float64)

Prediction = tuple[np.ndarray, np.ndarray, float]


class _Context:
    """Counts of the tokens that followed one context."""

    __slots__ = ("followers", "stamp", "total")

    def __init__(self, stamp: int) -> None:
        self.followers: dict[int, int] = {}
        self.total = 0
        self.stamp = stamp


class NgramCache:
    """A per-user token n-gram model with Witten-Bell interpolation and a gate weight.

    Args:
        order: n of the n-gram (contexts of 1 to n - 1 tokens).
        max_contexts: cap on kept contexts (least recently updated are dropped past it).
    """

    def __init__(self, order: int = ORDER, *, max_contexts: int = MAX_CONTEXTS) -> None:
        if order < 2:
            raise ValueError(f"order must be at least 2 (one token of context), not {order}")
        if max_contexts < 1:
            raise ValueError(f"max_contexts must be positive, not {max_contexts}")
        self.order = order
        self.max_contexts = max_contexts
        # In recency order, least recently updated first (the module docstring).
        self._contexts: dict[tuple[int, ...], _Context] = {}
        self._clock = 0  # update counter: the recency stamp of a context
        self.samples = 0  # samples learned since creation or the last reset
        self.tokens = 0  # tokens learned since creation or the last reset
        self.created = 0  # contexts created, in all (measurements)
        self.examined = 0  # contexts the pruning looked at, in all: each one it dropped

    # ------------------------------------------------------------------ learning

    @classmethod
    def from_samples(
        cls,
        samples: Iterable[Sequence[int]],
        order: int = ORDER,
        *,
        max_contexts: int = MAX_CONTEXTS,
    ) -> NgramCache:
        """A cache learned from `samples` (token ids of each accepted text), oldest first."""
        cache = cls(order, max_contexts=max_contexts)
        for sample in samples:
            cache.update(sample)
        return cache

    def update(self, token_ids: Sequence[int]) -> None:
        """Learn one sample (the token ids of one accepted text); contexts stay inside it."""
        ids = tuple(int(t) for t in token_ids)
        if len(ids) < 2:
            return
        self._clock += 1
        stamp = self._clock
        contexts = self._contexts
        longest = self.order - 1
        cap = self.max_contexts
        for i in range(1, len(ids)):
            nxt = ids[i]
            # Longest context first, so a suffix is always more recent than its extensions.
            for k in range(min(longest, i), 0, -1):
                key = ids[i - k : i]
                entry = contexts.pop(key, None)  # reinserted last: the most recent
                if entry is None:
                    entry = _Context(stamp)
                    self.created += 1
                else:
                    entry.stamp = stamp
                contexts[key] = entry
                followers = entry.followers
                followers[nxt] = followers.get(nxt, 0) + 1
                entry.total += 1
            if len(contexts) > cap:
                self._prune()
        self.samples += 1
        self.tokens += len(ids)

    def _prune(self) -> None:
        """Drop the least recently updated contexts (the front) down to `PRUNE_TO` of the cap."""
        contexts = self._contexts
        drop = len(contexts) - max(1, int(self.max_contexts * PRUNE_TO))
        if drop <= 0:
            return
        victims = list(itertools.islice(contexts, drop))
        for key in victims:
            del contexts[key]
        self.examined += len(victims)

    def set_max_contexts(self, max_contexts: int) -> None:
        """Change the cap (a loaded cache takes the settings' one); prunes when now over it."""
        if max_contexts < 1:
            raise ValueError(f"max_contexts must be positive, not {max_contexts}")
        self.max_contexts = max_contexts
        if len(self._contexts) > max_contexts:
            self._prune()

    def reset(self) -> None:
        """Forget everything learned."""
        self._contexts.clear()
        self._clock = 0
        self.samples = 0
        self.tokens = 0

    def __len__(self) -> int:
        """Number of kept contexts."""
        return len(self._contexts)

    def contexts(self) -> Iterator[tuple[int, ...]]:
        """The kept contexts (token-id tuples of 1 to order - 1 tokens)."""
        return iter(list(self._contexts))

    def count(self, context: Sequence[int], token: int | None = None) -> int:
        """How often `token` followed `context` (or how often `context` was followed at all)."""
        entry = self._contexts.get(tuple(int(t) for t in context))
        if entry is None:
            return 0
        return entry.total if token is None else entry.followers.get(int(token), 0)

    # ------------------------------------------------------------------ prediction

    def match(self, context_ids: Sequence[int]) -> int:
        """Length of the longest suffix of `context_ids` the cache has seen (0: none)."""
        return len(self._matched(context_ids))

    def _matched(self, context_ids: Sequence[int]) -> list[_Context]:
        """Entries of the matched suffixes of `context_ids`, shortest first."""
        if isinstance(context_ids, deque):  # no slicing; short in the runtime (maxlen)
            context_ids = tuple(context_ids)
        tail = tuple(int(t) for t in context_ids[-(self.order - 1) :])
        entries: list[_Context] = []
        for k in range(1, len(tail) + 1):
            entry = self._contexts.get(tail[-k:])
            if entry is None:  # no extension of an unseen context was ever seen
                break
            entries.append(entry)
        return entries

    def predict(self, context_ids: Sequence[int]) -> Prediction:
        """The cache's next-token distribution after `context_ids`, sparse, and its weight.

        Returns:
            (token_ids int64 (K,), probs float64 (K,) summing to 1, weight in [0, GATE_MAX]).
            K = 0 and weight 0 when no suffix of the context was seen.
        """
        entries = self._matched(context_ids)
        if not entries:
            return _EMPTY_IDS, _EMPTY_PROBS, 0.0
        base = entries[0]
        ids = np.fromiter(base.followers.keys(), dtype=np.int64, count=len(base.followers))
        probs = np.fromiter(base.followers.values(), dtype=np.float64, count=len(ids))
        probs /= base.total
        if len(entries) > 1:
            position = {token: i for i, token in enumerate(base.followers)}
            for entry in entries[1:]:
                distinct = len(entry.followers)
                denominator = entry.total + distinct
                probs *= distinct / denominator
                for token, n in entry.followers.items():
                    probs[position[token]] += n / denominator
        count = entries[-1].total
        weight = GATE_MAX * count / (count + GATE_COUNT)
        if len(entries) == 1:
            weight *= GATE_UNIGRAM_CONTEXT
        return ids, probs, weight

    # ------------------------------------------------------------------ the request's fit

    def fit(self, token_ids: Sequence[int]) -> float:
        """How well the cache predicts a text (the request's own tokens): the probability it
        gave each next token, averaged with its gate weights (0: it matched nothing).

        Model-free, so a request's text is judged before any step: a user's own text is
        largely what the cache foresees, text unlike theirs rarely is.
        """
        ids = [int(t) for t in token_ids[-FIT_TOKENS:]]
        longest = self.order - 1
        hits = weights = 0.0
        for i in range(1, len(ids)):
            tokens, probs, weight = self.predict(ids[max(0, i - longest) : i])
            if weight <= 0.0:
                continue
            found = np.flatnonzero(tokens == ids[i])
            hits += weight * (float(probs[found[0]]) if len(found) else 0.0)
            weights += weight
        return hits / weights if weights > 0.0 else 0.0

    def bounded(self, token_ids: Sequence[int]) -> BoundedCache:
        """This cache for one request whose own tokens are `token_ids`: its weight scaled by
        `fit_scale` of the request's `fit` (a view that shares the counts, `BoundedCache`).

        The gate alone opens on any matched context, so a user whose text is far from the
        request's (a narrow persona, generic text) would still pull every common phrase
        towards their own words; the request's fit keeps the weight near 0 there and whole
        on the user's own kind of text.
        """
        fit = self.fit(token_ids)
        return BoundedCache(self, fit, fit_scale(fit))

    # ------------------------------------------------------------------ storage

    def to_bytes(self) -> bytes:
        """Compact serialization (msgpack of flat little-endian arrays) for the user store."""
        entries = list(self._contexts.items())
        lengths = np.fromiter((len(k) for k, _ in entries), dtype=np.uint8, count=len(entries))
        keys = np.fromiter((t for k, _ in entries for t in k), dtype="<i4")
        widths = np.fromiter(
            (len(e.followers) for _, e in entries), dtype="<u4", count=len(entries)
        )
        tokens = np.fromiter((t for _, e in entries for t in e.followers), dtype="<i4")
        counts = np.fromiter((n for _, e in entries for n in e.followers.values()), dtype="<u4")
        stamps = np.fromiter((e.stamp for _, e in entries), dtype="<u8", count=len(entries))
        payload = {
            "format": _FORMAT,
            "order": self.order,
            "max_contexts": self.max_contexts,
            "clock": self._clock,
            "samples": self.samples,
            "tokens": self.tokens,
            "lengths": lengths.tobytes(),
            "keys": keys.tobytes(),
            "widths": widths.tobytes(),
            "followers": tokens.tobytes(),
            "counts": counts.tobytes(),
            "stamps": stamps.tobytes(),
        }
        return bytes(msgpack.packb(payload, use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> NgramCache:
        """The cache `to_bytes` wrote.

        Raises:
            ValueError: the bytes are not a serialized cache (rebuild it with `from_samples`).
        """
        try:
            payload = msgpack.unpackb(data, raw=False)
            if payload.get("format") != _FORMAT:
                raise ValueError(f"unknown format {payload.get('format')!r}")
            cache = cls(int(payload["order"]), max_contexts=int(payload["max_contexts"]))
            lengths = np.frombuffer(payload["lengths"], dtype=np.uint8).tolist()
            keys = np.frombuffer(payload["keys"], dtype="<i4").tolist()
            widths = np.frombuffer(payload["widths"], dtype="<u4").tolist()
            tokens = np.frombuffer(payload["followers"], dtype="<i4").tolist()
            counts = np.frombuffer(payload["counts"], dtype="<u4").tolist()
            stamps = np.frombuffer(payload["stamps"], dtype="<u8").tolist()
            if not len(lengths) == len(widths) == len(stamps):
                raise ValueError("context arrays differ in length")
            if sum(lengths) != len(keys) or not sum(widths) == len(tokens) == len(counts):
                raise ValueError("truncated arrays")
            key_at = follower_at = 0
            loaded: list[tuple[tuple[int, ...], _Context]] = []
            for length, width, stamp in zip(lengths, widths, stamps, strict=True):
                entry = _Context(stamp)
                entry.followers = dict(
                    zip(
                        tokens[follower_at : follower_at + width],
                        counts[follower_at : follower_at + width],
                        strict=True,
                    )
                )
                entry.total = sum(entry.followers.values())
                loaded.append((tuple(keys[key_at : key_at + length]), entry))
                key_at += length
                follower_at += width
            if any(a > b for a, b in itertools.pairwise(stamps)):  # an older blob: by stamp
                loaded.sort(key=lambda item: (item[1].stamp, -len(item[0])))
            cache._contexts = dict(loaded)
            cache._clock = int(payload["clock"])
            cache.samples = int(payload["samples"])
            cache.tokens = int(payload["tokens"])
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
            raise ValueError(
                f"not a serialized NgramCache ({exc}); rebuild it from the user's samples "
                "with NgramCache.from_samples"
            ) from exc
        return cache


def fit_scale(fit: float) -> float:
    """The share of the cache's gate weight a request gets from its `fit`: 0 up to `FIT_LOW`,
    rising linearly to 1 at `FIT_FULL`."""
    return min(1.0, max(0.0, (fit - FIT_LOW) / (FIT_FULL - FIT_LOW)))


class BoundedCache(NgramCache):
    """A view of a cache for one request (`NgramCache.bounded`): the counts are the cache's
    own (shared, not copied); `predict`'s weight is scaled by `scale`, the request's
    `fit_scale`; `request_fit` is the request's `fit`."""

    def __init__(self, cache: NgramCache, fit: float, scale: float) -> None:
        self.__dict__.update(cache.__dict__)
        self.request_fit = fit
        self.scale = scale

    def predict(self, context_ids: Sequence[int]) -> Prediction:
        """`NgramCache.predict`, its weight times `scale` (0: the cache stays out)."""
        if self.scale <= 0.0:
            return _EMPTY_IDS, _EMPTY_PROBS, 0.0
        ids, probs, weight = super().predict(context_ids)
        return ids, probs, weight * self.scale


# ---------------------------------------------------------------------- mixing


def mix_logits(
    logits: np.ndarray,
    ids: np.ndarray,
    probs: np.ndarray,
    weight: float,
    *,
    lse: float | None = None,
) -> None:
    """Make `logits` (V,) the logits of (1 - weight) softmax(logits) + weight p_cache, in place.

    Only the entries `ids` change; `probs` (summing to 1) is the cache's distribution over them
    and `weight` its gate (`NgramCache.predict`). `lse` is `logsumexp(logits)` when the caller
    already has it. Nothing changes when `weight` is 0 or `ids` is empty.
    """
    if weight <= 0.0 or len(ids) == 0:
        return
    if weight >= 1.0:
        raise ValueError(f"the cache weight must be below 1, not {weight}")
    if lse is None:
        lse = logsumexp(logits)
    offset = lse + math.log(weight / (1.0 - weight))
    with np.errstate(divide="ignore"):  # a zero cache probability leaves its logit alone
        added = offset + np.log(probs)
    logits[ids] = np.logaddexp(logits[ids], added)


def mixed_logsumexp(lse: float, probs: np.ndarray, weight: float) -> float:
    """logsumexp of the logits after `mix_logits`, from the one before it (no pass over V)."""
    if weight <= 0.0 or len(probs) == 0:
        return lse
    return lse + math.log1p(weight / (1.0 - weight) * float(probs.sum()))
