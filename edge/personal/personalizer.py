"""Personalizing requests that carry `user`: the persona, the user's own samples, the n-gram cache.

`Personalizer` is the request side of the user store (`edge.personal.store`). For a request with
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
  cache can reuse it. They are *bounded by similarity*: offered only when the user's cache
  foresees the request's own tokens (`samples_offered`, the request's `NgramCache.fit`), and
  then *gated on evidence* by the router (`samples_help`): the request is prefilled with and
  without them, and they stay only when they make the request's own tokens more likely by
  more than `personalize_sample_gain` nats in all. A request with nothing the user's samples
  explain runs without them.
  `Personalization.system_text` is the persona alone; `samples_text` the persona with the
  samples (None: none picked);
- **the adapter**: the user's `adapt.NgramCache` (a snapshot when one is current, see
  Snapshots), bounded for the request (`NgramCache.bounded`: its weight scaled by how well
  it foresees the request's own tokens, none for text unlike the user's), mixed into the
  edge model's logits at each step (`EdgeRuntime.submit(adapter=...)`);
- **sampling defaults**: the profile's temperature, top_p, max_tokens and penalties, where
  the request left them unset (the caller applies them);
- **consent**: `allow_cloud: false` makes the request `local_only`; the cloud gets the
  request's own messages or prompt, plus the persona (never the samples nor the cache) only
  when `share_profile` is true.

An unknown user (or an id the store would refuse) is no error: the request runs unpersonalized.
A store that cannot be read (corrupt, locked) logs a warning and the request runs unpersonalized.

**The caches.** Each user's cache lives in memory in an LRU bounded by `memory_bytes` (an
estimate, `UserState.size`: `adapt.BYTES_PER_CONTEXT` a context of the cache and of its
snapshot, plus the kept samples' text and grams), loaded on first use from the store's learned
blob, or rebuilt from the stored feedback (`NgramCache.from_samples`) when there is none or it
cannot be read. The blob is stored with the id of the newest feedback sample it holds, and a
load learns the newer ones: those given while the user was not in memory (it had left the LRU,
or the edge had restarted) or not yet written back when the edge stopped. Each cache holds at
most `max_contexts` contexts and each user at most the store's `max_user_bytes` of text, so the
largest user allowed is bounded (`largest_user_bytes`); the constructor refuses caps whose
largest user would not fit the budget. The personalizer is a `UserListener`: a feedback sample
of a resident user is queued with its id (one indexed read) under the store's lock, and learned,
tokenized with the edge model's tokenizer, by the user's next request or the write-back, outside
the store's lock (`_learn`); `stats()` reports the mean time it takes. A reset or deletion drops
the user's state from memory, queued samples included, and no id of a forgotten user stays
behind. Updated caches are written back to the learned blob at most every `persist_s` seconds (a
timer thread), and at `close`.

Snapshots. A request's adapter is read by the runtime's worker thread while it runs. Copying a
cache grows with its contexts (`to_bytes` + `from_bytes`), too much for a request's path. So the
write-back, which serializes the cache anyway, also builds an immutable snapshot from those
bytes, off the request path, and requests use the latest snapshot once it matches the cache.
Between a feedback and its write-back (about `persist_s`), and for a user loaded but not yet
updated, requests use the live cache, so a feedback that is learned when a request or the
write-back takes it. The runtime tolerates this: a step that reads the cache while it changes goes
unmixed. Learning therefore applies to the very next request.

A write-back that raced a reset (the blob written just after the reset wiped it) is detected
(a forget counter; the ids forgotten while write-backs are in flight are kept only until they
end) and repaired by rebuilding the blob from the feedback kept
after the reset. Nothing here logs a user's text: only ids, counts and sizes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from broker.errors import BadRequest, HybridgenError, NotFound
from edge.personal.adapt import MAX_CONTEXTS, ORDER, NgramCache
from edge.personal.resident import KEPT_SAMPLES, UserState, largest_user_bytes, sample_bytes
from edge.personal.samples import (
    SAMPLES_HEADING,
    Personalization,
    Sample,
    gram_frequencies,
    owns_prefix,
    pick_samples,
    sample_grams,
    samples_help,
    samples_offered,
    system_text,
    user_prefix_key,
    with_prefix,
    with_system,
)
from edge.personal.store import UserStore

__all__ = [
    "SAMPLES_HEADING",
    "Personalization",
    "Personalizer",
    "Sample",
    "gram_frequencies",
    "owns_prefix",
    "pick_samples",
    "sample_grams",
    "samples_help",
    "samples_offered",
    "system_text",
    "user_prefix_key",
    "with_prefix",
    "with_system",
]

logger = logging.getLogger(__name__)


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
        max_contexts: cap of each user's cache (loaded ones take it too).
        max_user_bytes: the store's cap on a user's text (None: not checked); with
            `max_contexts` it must fit the budget (`largest_user_bytes`).

    Raises:
        ValueError: the largest user the caps allow would not fit `memory_bytes`.
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
        max_contexts: int = MAX_CONTEXTS,
        max_user_bytes: int | None = None,
    ) -> None:
        if max_user_bytes is not None:
            largest = largest_user_bytes(max_user_bytes, max_contexts)
            if largest > memory_bytes:
                raise ValueError(
                    f"the largest user allowed needs about {largest / 2**20:.1f} MiB, over the "
                    f"personalization budget of {memory_bytes / 2**20:.1f} MiB: lower "
                    "HG_EDGE_PERSONALIZE_MAX_CONTEXTS or HG_EDGE_PERSONALIZE_MAX_USER_BYTES, or "
                    "raise HG_EDGE_PERSONALIZE_MEMORY_MB"
                )
        self.store = store
        self.encode = encode
        self.memory_bytes = memory_bytes
        self.samples_k = samples_k
        self.persist_s = persist_s
        self.order = order
        self.max_contexts = max_contexts
        self._lock = threading.RLock()
        self._users: OrderedDict[str, UserState] = OrderedDict()
        # Forgets, for write-backs that raced one: a counter, and the users forgotten while
        # write-backs were in flight (cleared when none is: no id outlives them).
        self._epoch = 0
        self._forgotten: dict[str, int] = {}
        self._writing = 0
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
        """Queue a new sample of a resident user, with its store id; it is learned by the
        user's next request or the write-back (`_learn`), outside the store's lock. A user
        not in memory learns it when loaded: it is newer than the stored state (`_load`)."""
        with self._lock:
            if user_id in self._loading:
                self._loading[user_id] += 1
            if user_id not in self._users:
                return
        try:  # listeners run under the store's lock: the user's newest sample is this one
            feedback_id = self.store.list_feedback(user_id, 1)[-1].id
        except (HybridgenError, IndexError):
            feedback_id = None
        with self._lock:
            state = self._users.get(user_id)
            if state is None:
                return
            if feedback_id is None:  # unknown id: reload from the store, which has it
                self._users.pop(user_id)
                self._dirty.discard(user_id)
                return
            state.pending.append(accepted)
            state.pending_bytes += len(accepted.encode())
            state.pending_id = feedback_id
            self._dirty.add(user_id)
            self._schedule()

    def on_forget(self, user_id: str) -> None:
        """A reset or deletion: drop everything held in memory about the user."""
        with self._lock:
            self._users.pop(user_id, None)
            self._dirty.discard(user_id)
            self._epoch += 1
            if self._writing:
                self._forgotten[user_id] = self._epoch
            if user_id in self._loading:
                self._loading[user_id] += 1

    def _learn(self, user_id: str) -> None:
        """Learn the user's queued samples (under this lock, never the store's)."""
        evicted: list[tuple[str, UserState, int]] = []
        with self._lock:
            state = self._users.get(user_id)
            if state is None or not state.pending:
                return
            started = time.perf_counter()
            for text in state.pending:
                self._learn_sample(state, text, self.encode(text))
                self.updates += 1
            state.pending, state.pending_bytes = [], 0
            state.feedback_id = state.pending_id
            self.update_s += time.perf_counter() - started
            evicted = self._evict()
        self._write_evicted(evicted)

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
                    adapter = state.adapter().bounded(query_ids)
                    if samples_offered(adapter.request_fit, len(query_ids)):
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

    def _state(self, user_id: str) -> UserState:
        with self._lock:
            state = self._users.get(user_id)
            if state is not None:
                self._users.move_to_end(user_id)
        if state is not None:
            self._learn(user_id)
            return state
        with self._lock:
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
        self._write_evicted(evicted)
        return state

    def _load(self, user_id: str) -> UserState:
        """The user's state from the store: the learned blob, which learns the samples newer
        than it (given while the user was not in memory, or not written before a stop), else
        rebuilt from feedback."""
        learned = self.store.get_learned_state(user_id)
        feedback = self.store.list_feedback(user_id, KEPT_SAMPLES)
        blob, held_id = learned if learned is not None else (None, None)
        cache = None
        if blob is not None:
            try:
                cache = NgramCache.from_bytes(blob)
            except ValueError:
                logger.warning("a learned state could not be read; rebuilding it from feedback")
        held = 0  # the id of the newest sample the blob holds
        if cache is not None:
            cache.set_max_contexts(self.max_contexts)
            # A blob written before the ids were kept holds what was stored then.
            held = max((s.id for s in feedback), default=0) if held_id is None else held_id
            if len(feedback) == KEPT_SAMPLES and feedback[0].id > held:
                feedback = self.store.list_feedback(user_id)  # more new ones than are kept
        state = UserState(cache or NgramCache(self.order, max_contexts=self.max_contexts))
        learning = 0
        for sample in feedback:
            ids = self.encode(sample.accepted)
            if cache is None or sample.id > held:
                self._learn_sample(state, sample.accepted, ids)
                learning += 1
            else:
                self._keep_sample(state, sample.accepted, ids)
        state.feedback_id = state.pending_id = max(held, feedback[-1].id if feedback else 0)
        if learning:
            with self._lock:
                self._dirty.add(user_id)
                self._schedule()
        return state

    def _learn_sample(self, state: UserState, text: str, ids: list[int]) -> None:
        """Learn one feedback sample: the cache and the kept samples (the one rule of both
        `_learn` and `_load`)."""
        state.cache.update(ids)
        self._keep_sample(state, text, ids)
        state.version += 1

    def _keep_sample(self, state: UserState, text: str, ids: list[int]) -> None:
        sample = Sample(state.next_order, text, sample_grams(ids), len(ids))
        state.samples.append(sample)
        state.samples_bytes += sample_bytes(sample)
        state.next_order += 1
        if len(state.samples) > KEPT_SAMPLES:
            state.samples_bytes -= sample_bytes(state.samples.pop(0))

    def _evict(self) -> list[tuple[str, UserState, int]]:
        """Drop least recently used users past the memory budget (under the lock).

        Returns:
            The dropped users that changed (id, state, epoch), for `_write_evicted` once the
            lock is released (the store must never be called under it: the store calls the
            listeners under its own lock).
        """
        jobs: list[tuple[str, UserState, int]] = []
        while len(self._users) > 1 and self.memory_used() > self.memory_bytes:
            user_id, state = self._users.popitem(last=False)
            if user_id in self._dirty:
                self._dirty.discard(user_id)
                self._writing += 1
                jobs.append((user_id, state, self._epoch))
        return jobs

    def _write_evicted(self, jobs: list[tuple[str, UserState, int]]) -> None:
        """Write a dropped user back (what it still had queued is newer than the state
        written: its next load learns it)."""
        for user_id, state, epoch in jobs:
            self._write(user_id, state.cache.to_bytes(), epoch, state.feedback_id)

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
            dirty = sorted(self._dirty)
        for user_id in dirty:
            self._learn(user_id)
        with self._lock:
            jobs: list[tuple[str, bytes, int, int, UserState, int]] = []
            for user_id in sorted(self._dirty):
                state = self._users.get(user_id)
                if state is not None:
                    self._writing += 1
                    blob = state.cache.to_bytes()
                    jobs.append(
                        (user_id, blob, state.feedback_id, self._epoch, state, state.version)
                    )
            self._dirty.clear()
        for user_id, blob, feedback_id, epoch, state, version in jobs:
            self._write(user_id, blob, epoch, feedback_id)
            if self._closed:
                continue
            snapshot = NgramCache.from_bytes(blob)
            with self._lock:
                if state.version == version and self._users.get(user_id) is state:
                    state.snapshot, state.snapshot_version = snapshot, version
        if jobs:
            logger.debug("personalization: %d learned states written back", len(jobs))
        return len(jobs)

    def _write(self, user_id: str, state: bytes, epoch: int, feedback_id: int) -> None:
        """Store one user's blob taken at `epoch`, which holds the samples up to
        `feedback_id` (called without the lock: the store calls listeners under its own
        lock), and repair it if a reset raced it."""
        try:
            self._put(user_id, state, feedback_id)
        finally:
            with self._lock:
                raced = self._forgotten.get(user_id, 0) > epoch
                if raced:
                    self._users.pop(user_id, None)
                self._writing -= 1
                if not self._writing:
                    self._forgotten.clear()
        if raced:  # the write landed after a reset: store what the kept feedback says
            try:
                feedback = self.store.list_feedback(user_id)
                cache = NgramCache.from_samples(
                    (self.encode(s.accepted) for s in feedback),
                    self.order,
                    max_contexts=self.max_contexts,
                )
                held = feedback[-1].id if feedback else None
                self.store.put_learned(user_id, cache.to_bytes(), held)
            except HybridgenError:
                pass

    def _put(self, user_id: str, state: bytes, feedback_id: int) -> None:
        try:
            self.store.put_learned(user_id, state, feedback_id)
        except NotFound:
            return  # deleted meanwhile: nothing to keep
        except HybridgenError as exc:
            logger.warning("personalization: a learned state was not stored (%s)", exc.code.value)

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
