"""Incremental detokenizing for the cloud engine (stop strings: `serving.stops`).

Runs on the asyncio side of a request (`Engine.generate`), never in the generation thread:
`IncrementalDetokenizer` turns the growing token list into text deltas without splitting a
UTF-8 character; `push_text` feeds it new tokens through a request's stop strings.
"""

from __future__ import annotations

from typing import Any

from serving.stops import StopMatcher


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (never splitting a UTF-8 char)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, new_ids: list[int]) -> str:
        """Add token ids; return the text they complete (may be "" while a char is partial)."""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""


def push_text(
    detok: IncrementalDetokenizer, stops: StopMatcher, ids: list[int]
) -> tuple[str, int | None]:
    """The text `ids` add that may be shown, and how many of them a stop string took (None:
    no stop reached). With stop strings the ids are fed one at a time, so a stop string
    ends the answer at the token that completes it however many came at once."""
    if not stops.stops:
        return detok.push(ids), None
    pieces: list[str] = []
    for used, token in enumerate(ids, start=1):
        text, stopped = stops.push(detok.push([token]))
        pieces.append(text)
        if stopped:
            return "".join(pieces), used
    return "".join(pieces), None
