"""The console's event log: a bounded ring of recent events and the filter the views apply.

Pure Python, no Textual, no bus: the console adds each event it hears (`EventLog.add`) and the
events screen, a node's screen and a request's trace select from it (`EventFilter`, parsed from
`node:X kind:Y req:Z words`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from broker import wire


@dataclass(frozen=True)
class EventFilter:
    """Which events to show: each set field must match (substring, case-insensitive)."""

    node: str = ""
    kind: str = ""
    request_id: str = ""
    text: str = ""

    @classmethod
    def parse(cls, query: str) -> EventFilter:
        """Read `node:X kind:Y req:Z free words` (each part optional) into a filter."""
        fields = {"node": "", "kind": "", "request_id": "", "text": []}
        words: list[str] = []
        for part in query.split():
            name, sep, value = part.partition(":")
            name = {"req": "request_id", "request": "request_id"}.get(name, name)
            if sep and name in ("node", "kind", "request_id"):
                fields[name] = value
            else:
                words.append(part)
        return cls(
            node=str(fields["node"]),
            kind=str(fields["kind"]),
            request_id=str(fields["request_id"]),
            text=" ".join(words),
        )

    def matches(self, event: wire.Event) -> bool:
        """True when `event` passes every set field."""
        checks = (
            (self.node, event.node_id),
            (self.kind, event.kind),
            (self.request_id, event.request_id or ""),
        )
        if any(want and want.lower() not in have.lower() for want, have in checks):
            return False
        if self.text:
            haystack = " ".join(
                (event.node_id, event.kind, event.request_id or "", event.message)
            ).lower()
            return self.text.lower() in haystack
        return True


class EventLog:
    """A bounded ring of the most recent events, oldest first."""

    def __init__(self, size: int = 1000) -> None:
        self._events: deque[wire.Event] = deque(maxlen=size)
        #: Events ever added, so a view can tell it has something new to draw.
        self.added = 0

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: wire.Event) -> None:
        """Append one event, dropping the oldest when full."""
        self._events.append(event)
        self.added += 1

    def select(
        self, where: EventFilter | None = None, *, limit: int | None = None
    ) -> list[wire.Event]:
        """The events that match `where`, newest first, at most `limit`."""
        chosen: list[wire.Event] = []
        for event in reversed(self._events):
            if where is None or where.matches(event):
                chosen.append(event)
                if limit is not None and len(chosen) >= limit:
                    break
        return chosen

    def extend(self, events: Iterable[wire.Event]) -> None:
        """Append several events in order."""
        for event in events:
            self.add(event)
