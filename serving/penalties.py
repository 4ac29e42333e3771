"""Repetition penalties: one rule for the edge and the cloud.

For every token already seen, with `count` the times the answer itself holds it:

1. `repetition_penalty` (llama.cpp's, vLLM's and transformers' meaning), on every token seen
   in the prompt or the answer: a positive logit is divided by it, a negative one multiplied
   (1: off);
2. then OpenAI's `presence_penalty` and `frequency_penalty`:
   `logit -= presence_penalty * (count > 0) + frequency_penalty * count`.

This is vLLM's order. Both ends apply them to the logits the next token is drawn from (at
the edge, after a personalization adapter's mixing), before temperature, top-k, top-p and a
grammar's mask, so a penalty never lets a token past a grammar. The log-probabilities an
answer reports stay the model's own, taken before the penalties. The rule depends only on
the tokens so far, so a seeded request still repeats.

`penalize` uses only the arithmetic numpy arrays and torch tensors share, so both ends run
this code: the edge on one row's seen tokens, the cloud on the seen tokens of a whole batch
gathered into one tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from serving.sampling import SamplingParams

Values = TypeVar("Values")


def penalize(values: Values, counts: Any, presence: Any, frequency: Any, repetition: Any) -> Values:
    """The penalized logits of some seen tokens (elementwise; scalars or arrays of the
    values' shape).

    Args:
        values: the tokens' logits (a numpy array or a torch tensor).
        counts: how many times the answer holds each token (0: seen in the prompt only).
        presence, frequency: OpenAI's penalties.
        repetition: the multiplicative penalty (1: off).
    """
    positive = values > 0  # type: ignore[operator]
    scaled = values * (positive / repetition + ~positive * repetition)  # type: ignore[operator]
    result: Values = scaled - presence * (counts > 0) - frequency * counts
    return result


class TokenCounts:
    """The tokens one answer's penalties read: each token seen, with its count in the answer.

    Kept as two aligned lists (ids in the order first seen, their counts) that grow by at
    most one entry a step, so reading them costs nothing per step.

    Args:
        params: the request's sampling (its three penalties).
        prompt_ids: the prompt (read by `repetition_penalty` only).
        answer_ids: the answer so far, when it did not start here (an answer the edge
            finishes after the cloud failed mid-stream).
    """

    def __init__(
        self, params: SamplingParams, prompt_ids: Iterable[int], answer_ids: Iterable[int] = ()
    ) -> None:
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.repetition = params.repetition_penalty
        self._at: dict[int, int] = {}  # token -> its place in the lists
        self._ids: list[int] = []
        self._counts: list[int] = []
        if self.repetition != 1.0:
            for token in prompt_ids:
                self._place(token)
        for token in answer_ids:
            self.observe(token)

    @classmethod
    def of(
        cls, params: SamplingParams, prompt_ids: Iterable[int], answer_ids: Iterable[int] = ()
    ) -> TokenCounts | None:
        """The counts of a request whose penalties are on; None when they are all off."""
        return cls(params, prompt_ids, answer_ids) if params.penalized else None

    def _place(self, token: int) -> int:
        place = self._at.get(token)
        if place is None:
            place = self._at[token] = len(self._ids)
            self._ids.append(token)
            self._counts.append(0)
        return place

    def observe(self, token: int) -> None:
        """The answer holds one more `token`."""
        self._counts[self._place(token)] += 1

    def count(self, token: int) -> int:
        """How many times the answer holds `token`."""
        place = self._at.get(token)
        return 0 if place is None else self._counts[place]

    def entries(self) -> tuple[list[int], list[int]]:
        """(seen token ids, their counts in the answer), aligned; read them, never change
        them."""
        return self._ids, self._counts
