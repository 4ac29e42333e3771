"""What a personalized request gets, and how the user's own samples are picked for it.

Split from `edge.personal.personalizer` (which re-exports every name here; its docstring
describes the whole): the `Personalization` of one request, the samples-in-context pick
(`pick_samples`), the bound on them by the request's similarity to the user's text
(`samples_offered`), the router's gate on them (`samples_help`) and the system text they make
(`system_text`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge.personal.adapt import NgramCache
from edge.personal.store import Profile
from serving.sampling import SamplingParams

#: Heading of the samples in the system text.
#: The profile's sampling defaults that apply where the request leaves the field unset
#: (a request field and a `SamplingParams` field of the same name; `max_tokens` apart).
PROFILE_SAMPLING = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
SAMPLES_HEADING = "Examples of this user's own writing:"
#: The request's fit (`NgramCache.fit`) the samples need to be offered (`samples_offered`).
SAMPLES_FIT = 0.01
#: Requests shorter than this (tokens) are not judged by their fit (`samples_offered`).
SAMPLES_FIT_TOKENS = 4


@dataclass(frozen=True)
class Personalization:
    """What one request of a known user gets (`Personalizer.prepare`).

    Attributes:
        user_id: the user.
        profile: their profile (sampling defaults and consent flags).
        system_text: the persona for the edge (None: none).
        cloud_system_text: what the cloud may see: the persona when `share_profile`, else None.
        adapter: the user's n-gram cache, its latest snapshot when current (module
            docstring), bounded by the request's own text (`NgramCache.bounded`); None:
            nothing learned yet.
        samples_text: the persona with the picked samples under `SAMPLES_HEADING`, the
            request's alternative for the router's gate (None: no samples picked, or the
            request's fit left them out, `samples_offered`).
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
        return user_prefix_key(self.user_id, self.system_text)

    @property
    def samples_prefix_key(self) -> str | None:
        """`prefix_key` of `samples_text` (the persona and the picked samples)."""
        return user_prefix_key(self.user_id, self.samples_text)

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

    def sampling(self, options: SamplingParams, fields_set: set[str]) -> SamplingParams:
        """`options` with the profile's defaults where the request left them unset
        (`fields_set`: the request body's fields that were set, `model_fields_set`)."""
        profile = self.profile
        changes: dict[str, Any] = {}
        for name in PROFILE_SAMPLING:
            value = getattr(profile, name)
            if value is not None and name not in fields_set:
                changes[name] = value
        if profile.max_tokens is not None and options.max_tokens is None:
            changes["max_tokens"] = profile.max_tokens
        return dataclasses.replace(options, **changes) if changes else options


@dataclass
class Sample:
    """One feedback sample held in memory: its store order, text, unigrams and bigrams of
    its token ids (`sample_grams`) and length in tokens."""

    order: int
    text: str
    grams: frozenset[tuple[int, ...]]
    length: int = 0


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


def user_prefix_key(user_id: str, text: str | None) -> str | None:
    """`user:<id>:<16 hex of the text's sha256>`: a user's prefix key (None without text);
    `owns_prefix` tells a user's keys apart."""
    if not text:
        return None
    return f"user:{user_id}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def owns_prefix(user_id: str) -> Any:
    """A test of the runtime's prefix keys: is this key one of `user_id`'s (`user_prefix_key`)?

    Exact: `user:bob:<hash>` is bob's, `user:bob:x:<hash>` is not (ids may hold `:`).
    """
    owner = f"user:{user_id}"

    def match(key: object) -> bool:
        return isinstance(key, str) and key.rpartition(":")[0] == owner

    return match


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


def samples_offered(fit: float, tokens: int) -> bool:
    """The similarity bound on the user's samples: they are offered to a request of `tokens`
    tokens only when the user's n-gram cache foresaw some of them (`NgramCache.fit` of at
    least `SAMPLES_FIT`); a request shorter than `SAMPLES_FIT_TOKENS` is too short to judge,
    and the evidence gate alone decides (`samples_help`).

    The evidence gate alone let a user's samples into text far from theirs (a chat persona's
    before documentation or code) whenever its first tokens happened to gain, and its later
    tokens then paid for them; text the user's cache foresees nothing of never sees them.
    """
    return tokens < SAMPLES_FIT_TOKENS or fit >= SAMPLES_FIT


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
