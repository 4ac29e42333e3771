"""Personalizing requests that carry `user`: the persona, the user's own samples, the n-gram cache.

`Personalizer` is the request side of the user store (`edge.users`). For a request with
`user: <id>` it builds a `Personalization` (`prepare`):

- **persona**: the profile's persona, as a system message in front of a chat request's
  messages (merged with the request's own first system message), or as a text prefix of a
  completion prompt (`persona + "\\n\\n" + prompt`);
- **the user's own samples in context**: up to `samples_k` feedback samples (at most
  `max_sample_tokens` tokens in all), picked for their relevance to the request
  (`pick_samples`: overlap of token unigrams and bigrams, each weighted by its inverse
  frequency among the user's samples; the user's most representative samples when nothing
  overlaps), under "Examples of this user's own writing:" after the persona. They go in
  their feedback order (oldest first), so the same picks give the same text and the prefix
  cache can reuse it. They are *gated on evidence* by the router (`samples_help`): the
  request is prefilled with and without them, and they stay only when they make the
  request's own tokens more likely by more than `personalize_sample_gain` nats in all. A
  request with nothing the user's samples explain runs without them.
  `Personalization.system_text` is the persona alone; `samples_text` the persona with the
  samples (None: none picked);
- **the adapter**: the user's `edge.adapt.NgramCache` (a snapshot when one is current, see
  Snapshots), mixed into the edge model's logits at each step
  (`EdgeRuntime.submit(adapter=...)`);
- **sampling defaults**: the profile's temperature, top_p and max_tokens, where the request
  left them unset (the caller applies them);
- **consent**: `allow_cloud: false` makes the request `local_only`; the cloud gets the
  request's own messages or prompt, plus the persona (never the samples nor the cache) only
  when `share_profile` is true.

An unknown user (or an id the store would refuse) is no error: the request runs unpersonalized.
A store that cannot be read (corrupt, locked) logs a warning and the request runs unpersonalized.

**The caches.** Each user's cache lives in memory in an LRU bounded by `memory_bytes` (an
estimate: ~400 bytes a context plus the kept samples' text), loaded on first use from the
store's learned blob, or rebuilt from the stored feedback (`NgramCache.from_samples`) when
there is none or it cannot be read. The personalizer is a `UserListener`: a feedback sample
updates the resident cache at once, tokenized with the edge model's tokenizer. For README
paragraphs of 161 SmolLM2 tokens on average, on the 2-core dev machine at load 4-5, tokenizing
took 0.38 ms and `NgramCache.update` 0.71 ms (p50). The whole listener call took 1.26 ms
(p50), so about 0.8 ms per 100 tokens. `stats()` reports the mean. A reset or deletion drops
the user's state from memory. Updated
caches are written back to the learned blob at most every `persist_s` seconds (a timer thread),
and at `close`.

Snapshots. A request's adapter is read by the runtime's worker thread while it runs. Copying a
cache costs ~50 ms per 10,000 contexts (`to_bytes` + `from_bytes`; measured under load), too
much for a request's path. So the write-back, which serializes the cache anyway, also builds
an immutable snapshot from those bytes, off the request path, and requests use the latest
snapshot once it matches the cache. Between a feedback and its write-back (about `persist_s`),
and for a user loaded but not yet updated, requests use the live cache, so a feedback that
arrives mid-request can change that request's later steps. The runtime tolerates this: a step
that reads the cache while it changes goes unmixed. Learning therefore applies to the very
next request.

A write-back that raced a reset (the blob written just after the reset wiped it) is detected
(a per-user generation number) and repaired by rebuilding the blob from the feedback kept
after the reset. Nothing here logs a user's text: only ids, counts and sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.errors import BadRequest, HybridgenError, NotFound
from edge.adapt import ORDER, NgramCache
from edge.users import Profile, UserStore
from serving.sampling import SamplingParams

logger = logging.getLogger(__name__)

#: Estimated bytes of Python objects per kept n-gram context (edge.adapt's measurements).
BYTES_PER_CONTEXT = 400
#: Fixed cost estimate of one resident user.
BYTES_PER_USER = 2048
#: Feedback samples kept in memory per user, for the samples-in-context pick.
KEPT_SAMPLES = 200
#: Heading of the samples in the system text.
SAMPLES_HEADING = "Examples of this user's own writing:"


@dataclass(frozen=True)
class Personalization:
    """What one request of a known user gets (`Personalizer.prepare`).

    Attributes:
        user_id: the user.
        profile: their profile (sampling defaults and consent flags).
        system_text: the persona for the edge (None: none).
        cloud_system_text: what the cloud may see: the persona when `share_profile`, else None.
        adapter: the user's n-gram cache, its latest snapshot when current (module
            docstring); None: nothing learned yet.
        samples_text: the persona with the picked samples under `SAMPLES_HEADING`, the
            request's alternative for the router's gate (None: no samples picked).
        samples_used: how many of the user's samples are in `samples_text`.
    """

    user_id: str
    profile: Profile
    system_text: str | None
    cloud_system_text: str | None
    adapter: NgramCache | None
    samples_text: str | None = None
    samples_used: int = 0

    @property
    def prefix_key(self) -> str | None:
        """Key of the edge's persona text for the runtime's prefix reuse: the same for the
        same user and text (None without a persona)."""
        return _prefix_key(self.user_id, self.system_text)

    @property
    def samples_prefix_key(self) -> str | None:
        """`prefix_key` of `samples_text` (the persona and the picked samples)."""
        return _prefix_key(self.user_id, self.samples_text)

    @property
    def local_only(self) -> bool:
        """The user did not allow the cloud: the request never leaves the node."""
        return not self.profile.allow_cloud

    def chat(
        self, messages: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A chat's messages for the edge (the persona in front) and for the cloud (the
        request's own, plus the persona only when shared)."""
        return with_system(messages, self.system_text), with_system(
            messages, self.cloud_system_text
        )

    def samples_chat(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """A chat's messages for the edge with the persona and the samples in front (None:
        no samples picked)."""
        return with_system(messages, self.samples_text) if self.samples_text else None

    def prompt(self, prompt: str) -> tuple[str, str]:
        """A completion prompt for the edge (`system_text + "\n\n" + prompt`) and for the
        cloud (the prompt, behind the persona only when shared)."""
        return with_prefix(prompt, self.system_text), with_prefix(prompt, self.cloud_system_text)

    def samples_prompt(self, prompt: str) -> str | None:
        """A completion prompt for the edge behind the persona and the samples (None: no
        samples picked)."""
        return with_prefix(prompt, self.samples_text) if self.samples_text else None

    def sampling(
        self, options: SamplingParams, max_tokens_given: bool, fields_set: set[str]
    ) -> tuple[SamplingParams, bool]:
        """`options` with the profile's defaults where the request left them unset.

        Args:
            options: the request's sampling parameters.
            max_tokens_given: whether the request set max_tokens itself.
            fields_set: the request body's fields that were set (`model_fields_set`).

        Returns:
            The options, and whether max_tokens is now given (by the request or the profile).
        """
        profile = self.profile
        changes: dict[str, Any] = {}
        if profile.temperature is not None and "temperature" not in fields_set:
            changes["temperature"] = profile.temperature
        if profile.top_p is not None and "top_p" not in fields_set:
            changes["top_p"] = profile.top_p
        if profile.max_tokens is not None and not max_tokens_given:
            changes["max_tokens"] = profile.max_tokens
            max_tokens_given = True
        return (dataclasses.replace(options, **changes) if changes else options), max_tokens_given


@dataclass
class Sample:
    """One feedback sample held in memory: its store order, text, unigrams and bigrams of
    its token ids (`sample_grams`) and length in tokens."""

    order: int
    text: str
    grams: frozenset[tuple[int, ...]]
    length: int = 0


@dataclass
class _UserState:
    """A resident user: the live cache, its snapshot, the kept samples."""

    cache: NgramCache
    samples: list[Sample] = field(default_factory=list)
    #: An immutable copy of `cache` as of update `snapshot_version` (None: none yet).
    snapshot: NgramCache | None = None
    snapshot_version: int = -1
    #: Updates of `cache` since it was loaded.
    version: int = 0
    next_order: int = 0
    #: Estimated bytes of `samples` (kept up to date by `_keep_sample`).
    samples_bytes: int = 0
    #: In how many of `samples` each gram occurs, as of `version` (`pick_samples`).
    frequencies: Counter[tuple[int, ...]] | None = None
    frequencies_version: int = -1

    def sample_frequencies(self) -> Counter[tuple[int, ...]]:
        """`frequencies`, recounted when the samples changed since (under the lock)."""
        if self.frequencies is None or self.frequencies_version != self.version:
            self.frequencies = gram_frequencies(self.samples)
            self.frequencies_version = self.version
        return self.frequencies

    def adapter(self) -> NgramCache:
        """What a request mixes in: the snapshot when it is current, else the live cache."""
        if self.snapshot is not None and self.snapshot_version == self.version:
            return self.snapshot
        return self.cache

    def size(self) -> int:
        return BYTES_PER_USER + BYTES_PER_CONTEXT * len(self.cache) + self.samples_bytes


def with_system(messages: list[dict[str, Any]], text: str | None) -> list[dict[str, Any]]:
    """`messages` with `text` as a system message in front (merged into the request's own
    first system message, after `text`); `messages` itself when `text` is None."""
    if not text:
        return messages
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{text}\n\n{first.get('content') or ''}"
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def with_prefix(prompt: str, text: str | None) -> str:
    """A completion prompt behind `text` and a blank line (`prompt` when `text` is None)."""
    return f"{text}\n\n{prompt}" if text else prompt


def _sample_bytes(sample: Sample) -> int:
    """Estimated bytes of a kept sample: its text and its gram set."""
    return 100 + len(sample.text) + 96 * len(sample.grams)


def _prefix_key(user_id: str, text: str | None) -> str | None:
    if not text:
        return None
    return f"user:{user_id}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def sample_grams(ids: Sequence[int]) -> frozenset[tuple[int, ...]]:
    """The unigrams and bigrams of a text's token ids (what relevance is scored on)."""
    ids = list(ids)
    return frozenset(tuple(ids[i : i + n]) for n in (1, 2) for i in range(len(ids) - n + 1))


def gram_frequencies(samples: Sequence[Sample]) -> Counter[tuple[int, ...]]:
    """In how many of `samples` each gram occurs."""
    return Counter(gram for sample in samples for gram in sample.grams)


def pick_samples(
    samples: Sequence[Sample],
    query: Sequence[int],
    k: int,
    max_tokens: int | None = None,
    frequencies: Counter[tuple[int, ...]] | None = None,
) -> list[Sample]:
    """Up to `k` distinct samples most relevant to the request's token ids `query`, at most
    `max_tokens` tokens in all, in their feedback order (oldest first: the same picks give
    the same text).

    Relevance is the overlap of the query's unigrams and bigrams with a sample's, each gram
    weighted by log(1 + n / f): n samples, f of them have it (a gram every sample has counts
    little). With an empty query, or one that shares nothing with any sample, the user's most
    representative samples are picked instead: those whose grams the other samples share
    most (the same weights times how many others have the gram, per token).

    Args:
        frequencies: `gram_frequencies(samples)` when the caller keeps it (else counted).
    """
    if k <= 0 or not samples:
        return []
    counts = frequencies if frequencies is not None else gram_frequencies(samples)
    n = len(samples)

    def weight(gram: tuple[int, ...]) -> float:
        return math.log(1.0 + n / counts[gram]) if counts[gram] else 0.0

    wanted = sample_grams(query)
    scores = [sum(weight(g) for g in s.grams & wanted) for s in samples]
    if max(scores) <= 0.0:
        scores = [
            sum(weight(g) * (counts[g] - 1) for g in s.grams) / max(s.length, 1) for s in samples
        ]
    ranked = sorted(range(n), key=lambda i: (-scores[i], -samples[i].order))
    best: list[Sample] = []
    texts: set[str] = set()
    used = 0
    for i in ranked:
        sample = samples[i]
        if len(best) >= k:
            break
        if sample.text in texts:
            continue
        if max_tokens is not None and used + sample.length > max_tokens:
            continue
        best.append(sample)
        texts.add(sample.text)
        used += sample.length
    return sorted(best, key=lambda s: s.order)


def samples_help(gain: float, min_gain: float) -> bool:
    """The router's gate on the user's samples: keep them in context when they raise the
    log-likelihood of the request's own tokens by more than `min_gain` nats in all.

    `gain` is the sum over the request's scored tokens of log p(token | persona, samples,
    request so far) - log p(token | persona, request so far). A request the samples do not
    explain (generic text) gains little or loses, and runs without them.
    """
    return gain > min_gain


def system_text(persona: str | None, samples: Sequence[str]) -> str | None:
    """The edge's system text: the persona, then the samples under `SAMPLES_HEADING`."""
    parts = [persona] if persona else []
    if samples:
        parts.append(SAMPLES_HEADING + "\n" + "\n\n".join(f"- {s}" for s in samples))
    return "\n\n".join(parts) if parts else None


class Personalizer:
    """Per-user n-gram caches in memory, and each personalized request's `Personalization`.

    Args:
        store: the user store (the personalizer registers itself as its listener).
        encode: the edge model's tokenizer (text -> token ids).
        memory_bytes: budget of the resident users (least recently used ones are dropped).
        samples_k: most samples offered to a request's context (the router's gate decides
            whether they stay, `samples_help`).
        persist_s: delay before updated caches are written back to the store.
        order: n-gram order of new caches.
    """

    def __init__(
        self,
        store: UserStore,
        encode: Callable[[str], list[int]],
        *,
        memory_bytes: int = 64 << 20,
        samples_k: int = 8,
        persist_s: float = 2.0,
        order: int = ORDER,
    ) -> None:
        self.store = store
        self.encode = encode
        self.memory_bytes = memory_bytes
        self.samples_k = samples_k
        self.persist_s = persist_s
        self.order = order
        self._lock = threading.RLock()
        self._users: OrderedDict[str, _UserState] = OrderedDict()
        self._generation: dict[str, int] = {}  # bumped on each forget
        self._loading: dict[str, int] = {}  # users being loaded: events seen meanwhile
        self._dirty: set[str] = set()
        self._timer: threading.Timer | None = None
        self._closed = False
        #: Feedback updates of resident caches, and their total seconds (for measurements).
        self.updates = 0
        self.update_s = 0.0
        store.add_listener(self)

    # ------------------------------------------------------------------ the store's events

    def on_feedback(self, user_id: str, accepted: str, rejected: str | None) -> None:
        """Learn a new sample at once when the user is resident (else it loads with it)."""
        with self._lock:
            if user_id in self._loading:
                self._loading[user_id] += 1
            state = self._users.get(user_id)
            if state is None:
                return  # loaded from the store (which has the sample now) on first use
            started = time.perf_counter()
            ids = self.encode(accepted)
            state.cache.update(ids)
            self._keep_sample(state, accepted, ids)
            state.version += 1
            self.update_s += time.perf_counter() - started
            self.updates += 1
            self._dirty.add(user_id)
            self._users.move_to_end(user_id)
            evicted = self._evict()
            self._schedule()
        for job in evicted:  # the store's lock is this thread's already
            self._write(*job)

    def on_forget(self, user_id: str) -> None:
        """A reset or deletion: drop everything held in memory about the user."""
        with self._lock:
            self._users.pop(user_id, None)
            self._dirty.discard(user_id)
            self._generation[user_id] = self._generation.get(user_id, 0) + 1
            if user_id in self._loading:
                self._loading[user_id] += 1

    # ------------------------------------------------------------------ requests

    def prepare(
        self, user_id: str, text: str, max_sample_tokens: int | None = None
    ) -> Personalization | None:
        """The personalization of a request by `user_id` whose own text is `text` (blocking:
        call it with `asyncio.to_thread`); the picked samples hold at most
        `max_sample_tokens` tokens in all (None: no limit).

        Returns:
            None for an unknown user (or an id the store refuses), or when the store cannot
            be read (logged, without the user's text).
        """
        try:
            profile = self.store.get_profile(user_id)
        except (NotFound, BadRequest):
            return None
        except HybridgenError as exc:
            logger.warning("personalization off for a request: user store %s", exc.code.value)
            return None
        try:
            state = self._state(user_id)
        except HybridgenError as exc:
            logger.warning("personalization: no learned state (%s)", exc.code.value)
            state = None
        adapter = None
        picked: list[Sample] = []
        if state is not None:
            query_ids = self.encode(text) if text else []
            with self._lock:
                if state.cache.samples > 0:
                    adapter = state.adapter()
                    picked = pick_samples(
                        state.samples,
                        query_ids,
                        self.samples_k,
                        max_sample_tokens,
                        state.sample_frequencies(),
                    )
        persona = profile.persona or None
        samples_text = system_text(persona, [s.text for s in picked]) if picked else None
        cloud_text = persona if profile.share_profile else None
        logger.debug(
            "personalized request: persona %s, %d samples offered, adapter %s",
            persona is not None,
            len(picked),
            adapter is not None,
        )
        return Personalization(
            user_id, profile, persona, cloud_text, adapter, samples_text, len(picked)
        )

    # ------------------------------------------------------------------ the resident users

    def resident(self, user_id: str) -> bool:
        """Whether the user's state is in memory."""
        with self._lock:
            return user_id in self._users

    def memory_used(self) -> int:
        """Estimated bytes of the resident users."""
        with self._lock:
            return sum(state.size() for state in self._users.values())

    def _state(self, user_id: str) -> _UserState:
        with self._lock:
            state = self._users.get(user_id)
            if state is not None:
                self._users.move_to_end(user_id)
                return state
            events = self._loading.setdefault(user_id, 0)
        try:
            state = self._load(user_id)
        finally:
            with self._lock:
                changed = self._loading.pop(user_id, events) != events
        with self._lock:
            current = self._users.get(user_id)
            if current is not None:  # loaded by another request meanwhile
                return current
            if changed:  # a feedback or forget came while loading: this request only
                return state
            self._users[user_id] = state
            evicted = self._evict()
        for job in evicted:
            self._write(*job)
        return state

    def _load(self, user_id: str) -> _UserState:
        """The user's state from the store: the learned blob, else rebuilt from feedback."""
        feedback = self.store.list_feedback(user_id, KEPT_SAMPLES)
        blob = self.store.get_learned(user_id)
        cache = None
        if blob is not None:
            try:
                cache = NgramCache.from_bytes(blob)
            except ValueError:
                logger.warning("a learned state could not be read; rebuilding it from feedback")
        state = _UserState(cache or NgramCache(self.order))
        for sample in feedback:
            ids = self.encode(sample.accepted)
            self._keep_sample(state, sample.accepted, ids)
            if cache is None:
                state.cache.update(ids)
        if cache is None and feedback:
            with self._lock:
                self._dirty.add(user_id)
                self._schedule()
        return state

    def _keep_sample(self, state: _UserState, text: str, ids: list[int]) -> None:
        sample = Sample(state.next_order, text, sample_grams(ids), len(ids))
        state.samples.append(sample)
        state.samples_bytes += _sample_bytes(sample)
        state.next_order += 1
        if len(state.samples) > KEPT_SAMPLES:
            state.samples_bytes -= _sample_bytes(state.samples.pop(0))

    def _evict(self) -> list[tuple[str, bytes, int]]:
        """Drop least recently used users past the memory budget (under the lock).

        Returns:
            The write-backs of the dropped users that changed, for `_write` once the lock
            is released (the store must never be called under it: the store calls the
            listeners under its own lock).
        """
        jobs: list[tuple[str, bytes, int]] = []
        while len(self._users) > 1 and self.memory_used() > self.memory_bytes:
            user_id, state = self._users.popitem(last=False)
            if user_id in self._dirty:
                self._dirty.discard(user_id)
                jobs.append((user_id, state.cache.to_bytes(), self._generation.get(user_id, 0)))
        return jobs

    # ------------------------------------------------------------------ persistence

    def _schedule(self) -> None:
        if self._timer is not None or self._closed:
            return
        self._timer = threading.Timer(self.persist_s, self.flush)
        self._timer.daemon = True
        self._timer.start()

    def flush(self) -> int:
        """Write the updated caches back to the store now.

        Returns:
            How many were written.
        """
        with self._lock:
            self._timer = None
            jobs: list[tuple[str, bytes, int, _UserState, int]] = []
            for user_id in sorted(self._dirty):
                state = self._users.get(user_id)
                if state is not None:
                    generation = self._generation.get(user_id, 0)
                    jobs.append((user_id, state.cache.to_bytes(), generation, state, state.version))
            self._dirty.clear()
        for user_id, blob, generation, state, version in jobs:
            self._write(user_id, blob, generation)
            if self._closed:
                continue
            snapshot = NgramCache.from_bytes(blob)
            with self._lock:
                if state.version == version and self._users.get(user_id) is state:
                    state.snapshot, state.snapshot_version = snapshot, version
        if jobs:
            logger.debug("personalization: %d learned states written back", len(jobs))
        return len(jobs)

    def _write(self, user_id: str, state: bytes, generation: int) -> None:
        """Store one user's blob (called without the lock: the store calls listeners under its
        own lock), and repair it if a reset raced it."""
        try:
            self.store.put_learned(user_id, state)
        except NotFound:
            return  # deleted meanwhile: nothing to keep
        except HybridgenError as exc:
            logger.warning("personalization: a learned state was not stored (%s)", exc.code.value)
            return
        with self._lock:
            raced = self._generation.get(user_id, 0) != generation
            if raced:
                self._users.pop(user_id, None)
        if raced:  # the write landed after a reset: store what the kept feedback says
            try:
                feedback = self.store.list_feedback(user_id)
                cache = NgramCache.from_samples(
                    (self.encode(s.accepted) for s in feedback), self.order
                )
                self.store.put_learned(user_id, cache.to_bytes())
            except HybridgenError:
                pass

    def close(self) -> None:
        """Stop the timer, write back what changed and stop listening to the store."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self.flush()
        self.store.remove_listener(self)

    def stats(self) -> dict[str, Any]:
        """Resident users, their estimated bytes, and feedback updates so far."""
        with self._lock:
            return {
                "users": len(self._users),
                "bytes": self.memory_used(),
                "updates": self.updates,
                "update_ms_mean": round(self.update_s / self.updates * 1e3, 4)
                if self.updates
                else None,
            }
