"""Stop strings in streamed text: one matcher for the edge and the cloud.

Text is released as soon as it cannot be part of a stop string: only the longest suffix that
is a proper prefix of some stop string is held back (not a fixed number of characters), so a
stream with stop strings is as live as one without. A match cuts the text at the earliest
stop string found; the stop string itself is never shown.
"""

from __future__ import annotations

from collections.abc import Sequence


def held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


class StopMatcher:
    """Finds stop strings across the pieces of a streamed answer."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Feed a piece of text; return (text safe to show now, whether a stop was reached).

        After a stop the matcher holds nothing: the caller ends the answer.
        """
        if not self.stops:
            return text, False
        pending = self._pending + text
        cut = min((i for i in (pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        keep = held_suffix(pending, self.stops)
        self._pending = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of an answer that reached no stop string."""
        out, self._pending = self._pending, ""
        return out
