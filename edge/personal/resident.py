"""A resident user's state in the personalizer's memory, and the estimate of its bytes.

The personalizer (`edge.personal.personalizer.Personalizer`) keeps each user it serves in an LRU
bounded by an estimate of bytes, not by a count of users: a `UserState` (the live n-gram cache,
its snapshot, the kept and queued samples) says its own size (`UserState.size`), and
`largest_user_bytes` bounds the largest user the store's caps allow, so that the edge refuses
caps whose largest user would not fit its memory budget. The per-object figures are estimates
measured with tracemalloc (see the CHANGELOG and `hybridgen bench personalization`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from edge.personal.adapt import BYTES_PER_CONTEXT, NgramCache
from edge.personal.samples import Sample, gram_frequencies

#: Estimated bytes per context of a snapshot (`NgramCache.from_bytes` makes an int object per
#: token of its keys and followers, which the live cache shares: 584 measured).
BYTES_PER_SNAPSHOT_CONTEXT = 600
#: Fixed cost estimate of one resident user.
BYTES_PER_USER = 2048
#: Feedback samples kept in memory per user, for the samples-in-context pick.
KEPT_SAMPLES = 200
#: Estimated bytes per distinct unigram/bigram of a kept sample: its tuple and set slot (~90
#: measured) and its entry in the user's gram frequencies (`pick_samples`).
BYTES_PER_GRAM = 160
#: Estimated fixed bytes of a kept sample (its objects besides text and grams).
BYTES_PER_SAMPLE = 200


def largest_user_bytes(max_user_bytes: int, max_contexts: int) -> int:
    """Estimated memory of the largest user the caps allow: the live cache and its snapshot
    at `max_contexts`, and `max_user_bytes` of text kept twice (samples, queued) with one
    token per byte at most (byte-level BPE), i.e. two grams per byte."""
    return (
        BYTES_PER_USER
        + (BYTES_PER_CONTEXT + BYTES_PER_SNAPSHOT_CONTEXT) * max_contexts
        + KEPT_SAMPLES * BYTES_PER_SAMPLE
        + max_user_bytes * (2 + 2 * BYTES_PER_GRAM)
    )


@dataclass
class UserState:
    """A resident user: the live cache, its snapshot, the kept samples."""

    cache: NgramCache
    samples: list[Sample] = field(default_factory=list)
    #: An immutable copy of `cache` as of update `snapshot_version` (None: none yet).
    snapshot: NgramCache | None = None
    snapshot_version: int = -1
    #: Updates of `cache` since it was loaded.
    version: int = 0
    next_order: int = 0
    #: Estimated bytes of `samples` (kept up to date by `Personalizer._keep_sample`).
    samples_bytes: int = 0
    #: In how many of `samples` each gram occurs, as of `version` (`pick_samples`).
    frequencies: Counter[tuple[int, ...]] | None = None
    frequencies_version: int = -1
    #: Feedback texts stored but not learned yet (`Personalizer._learn`), and their bytes.
    pending: list[str] = field(default_factory=list)
    pending_bytes: int = 0
    #: Store ids of the newest feedback sample `cache` holds and of the newest queued one.
    feedback_id: int = 0
    pending_id: int = 0

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
        """Estimated bytes: the cache, its snapshot, the kept and the queued samples."""
        snapshot = len(self.snapshot) if self.snapshot is not None else 0
        contexts = BYTES_PER_CONTEXT * len(self.cache) + BYTES_PER_SNAPSHOT_CONTEXT * snapshot
        return BYTES_PER_USER + contexts + self.samples_bytes + self.pending_bytes


def sample_bytes(sample: Sample) -> int:
    """Estimated bytes of a kept sample: its text and its grams (with their frequencies)."""
    return BYTES_PER_SAMPLE + len(sample.text.encode()) + BYTES_PER_GRAM * len(sample.grams)
