"""Drafts for speculative decoding, made without a draft model: the rule both ends share.

A request's next tokens are guessed from text it already holds, and the model checks the
guesses in one forward pass (the edge: `edge.runtime.speculative`; the cloud:
`cloud.speculative`). Two sources, tried in order:

* prompt lookup (`PromptLookup`): the request's last `min_match` tokens occurred before in its
  prompt or answer; the tokens that followed their latest earlier occurrence are proposed.
  Rewriting, quoting, extracting and editing repeat their input, and answers reuse names
  from the conversation.
* a predictor such as the user's n-gram cache at the edge (`cache_draft`): for a
  personalized request, the token the user's cache predicts after the context, chained
  while the cache is sure of it (its probability at least `cache_min_prob`) and its weight
  in the mixture is not zero.

Each proposes at most `tokens` tokens, and only on a confident match, so open-ended text
drafts rarely. A request whose drafts keep failing waits before it drafts again
(`DraftControl`): after a verify that accepted nothing it skips 2, 4, 8 ... tokens (at most
`MAX_BACKOFF`), and the first accepted draft resets the wait. A draft costs little when the
model rejects it (the verify reads a few more positions in the same forward pass), but the
back-off keeps that cost off answers that never repeat their input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydantic import Field

#: Default most tokens one verify checks after the chosen token (`HG_EDGE_DRAFT_TOKENS`).
DRAFT_TOKENS = 6
#: Default suffix length that must have occurred before (`HG_EDGE_DRAFT_MIN_MATCH`).
DRAFT_MIN_MATCH = 3
#: Default lowest probability of the user's cache for a token it drafts
#: (`HG_EDGE_DRAFT_CACHE_MIN_PROB`).
DRAFT_CACHE_MIN_PROB = 0.8
#: Longest wait (in tokens) after drafts that failed.
MAX_BACKOFF = 32


def draft_tokens_field() -> Any:
    """The settings field `draft_tokens` of both ends (one rule for its bounds and help)."""
    return Field(
        default=DRAFT_TOKENS, ge=1, le=32, description="Most tokens drafted for one check."
    )


def draft_min_match_field() -> Any:
    """The settings field `draft_min_match` of both ends."""
    return Field(
        default=DRAFT_MIN_MATCH,
        ge=1,
        le=16,
        description="Draft from the request's text after its last this-many tokens occurred "
        "before in it.",
    )


class Predictor(Protocol):
    """A next-token predictor drafts can chain (the edge's `NgramCache`)."""

    def predict(self, context_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
        """(token ids, their probabilities, the predictor's weight in the mixture)."""
        ...


@dataclass(frozen=True)
class DraftSettings:
    """How a request drafts: at most `tokens` per verify (0: never), prompt lookup after a
    suffix of `min_match` tokens seen before, the user's cache where it is at least
    `cache_min_prob` sure."""

    tokens: int = DRAFT_TOKENS
    min_match: int = DRAFT_MIN_MATCH
    cache_min_prob: float = DRAFT_CACHE_MIN_PROB


class PromptLookup:
    """The request's tokens (prompt, then answer) with an index of every `min_match`-gram's
    ends, so a lookup costs one dict access however long the prompt is."""

    def __init__(self, tokens: Sequence[int], min_match: int = DRAFT_MIN_MATCH) -> None:
        self.min_match = max(1, min_match)
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> latest end before the last
        self._last: tuple[tuple[int, ...], int] | None = None
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """The request holds one more token."""
        if self._last is not None:  # the previous suffix now has a continuation
            gram, end = self._last
            self._ends[gram] = end
        self.tokens.append(token)
        n = self.min_match
        if len(self.tokens) >= n:
            self._last = (tuple(self.tokens[-n:]), len(self.tokens))

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the request's
        last `min_match` tokens; [] when they never occurred before."""
        if limit <= 0 or self._last is None:
            return []
        end = self._ends.get(self._last[0])
        if end is None:
            return []
        return self.tokens[end : end + limit]


def cache_draft(cache: Predictor, context: Sequence[int], limit: int, min_prob: float) -> list[int]:
    """Up to `limit` tokens the user's cache predicts after `context`, each at least
    `min_prob` likely under the cache and with a weight in the mixture."""
    draft: list[int] = []
    window = list(context)
    while len(draft) < limit:
        try:
            ids, probs, weight = cache.predict(window)
        except (RuntimeError, KeyError):  # updated by another thread meanwhile
            break
        if weight <= 0.0 or len(ids) == 0:
            break
        best = int(probs.argmax())
        if float(probs[best]) < min_prob:
            break
        token = int(ids[best])
        draft.append(token)
        window.append(token)
    return draft


class DraftControl:
    """One request's drafting: its sources, how long to wait after failed drafts, and the
    counts it reports (`drafted`, `accepted`, `verifies`), current during a verify."""

    def __init__(self, settings: DraftSettings, tokens: Sequence[int]) -> None:
        self.settings = settings
        self.lookup = PromptLookup(tokens, settings.min_match)
        self.drafted = 0
        self.accepted = 0
        self.verifies = 0
        self.checking = False  # a verify of a draft is under way
        self._accepted_now = 0
        self._failures = 0
        self._wait = 0

    def append(self, token: int) -> None:
        """The request holds one more token (the chosen one, an accepted draft)."""
        self.lookup.append(token)

    def propose(
        self, limit: int, cache: Predictor | None = None, context: Sequence[int] = ()
    ) -> list[int]:
        """The draft for the next verify (at most `limit` tokens), or [] while waiting."""
        limit = min(limit, self.settings.tokens)  # tokens 0: drafting is off
        if limit <= 0:
            return []
        if self._wait > 0:
            self._wait -= 1
            return []
        draft = self.lookup.propose(limit)
        if not draft and cache is not None:
            draft = cache_draft(cache, context, limit, self.settings.cache_min_prob)
        return draft

    def begin(self, drafted: int) -> None:
        """A verify of `drafted` tokens starts."""
        self.drafted += drafted
        self.verifies += 1
        self.checking = True
        self._accepted_now = 0

    def accept(self) -> None:
        """The model drew the draft's next token."""
        self.accepted += 1
        self._accepted_now += 1

    def end(self) -> None:
        """The verify is over: wait before the next draft when it accepted nothing."""
        self.checking = False
        if self._accepted_now:
            self._failures = 0
        else:
            self._failures += 1
            self._wait = min(MAX_BACKOFF, 2**self._failures)
