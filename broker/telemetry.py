"""Telemetry: a sliding window of request figures, and the heartbeat/event publisher.

Every node publishes a `wire.Heartbeat` on `hg.telemetry.<role>.<node_id>` each second and
`wire.Event`s on `hg.events.<role>.<node_id>`; the operator console reads both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

from nats.aio.client import Client

from broker import subjects, wire

log = logging.getLogger(__name__)


def default_node_id(role: str) -> str:
    """A node id that is unique enough and one subject token: `<role>-<host>-<4 hex>`."""
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname().split(".")[0]).strip("-")
    return subjects.token(f"{role}-{host or 'host'}-{secrets.token_hex(2)}", what="node_id")


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class RequestStats:
    """Requests of the last `window_s` seconds: rate, latency percentiles, tokens/s, errors.

    Args:
        window_s: the window length.
        clock: a monotonic clock (tests pass their own).
    """

    def __init__(
        self, window_s: float = 30.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._started = clock()
        # (when, latency_s, tokens, error)
        self._records: deque[tuple[float, float, int, bool]] = deque()
        #: Totals since start (never trimmed).
        self.total_requests = 0
        self.total_errors = 0

    def record(self, latency_s: float, tokens: int = 0, error: bool = False) -> None:
        """Count one finished request."""
        now = self._clock()
        self._records.append((now, latency_s, tokens, error))
        self.total_requests += 1
        self.total_errors += int(error)
        self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._records and self._records[0][0] < horizon:
            self._records.popleft()

    def snapshot(self) -> dict[str, Any]:
        """`{"rps", "latency_p50_ms", "latency_p95_ms", "tokens_per_s", "errors"}` of the window.

        Latencies are of successful requests; `None` when there were none. `errors` counts
        failed requests in the window.
        """
        now = self._clock()
        self._trim(now)
        span = max(1e-9, min(self.window_s, now - self._started))
        latencies = sorted(r[1] for r in self._records if not r[3])
        tokens = sum(r[2] for r in self._records)
        return {
            "rps": len(self._records) / span,
            "latency_p50_ms": _percentile(latencies, 0.50) * 1000 if latencies else None,
            "latency_p95_ms": _percentile(latencies, 0.95) * 1000 if latencies else None,
            "tokens_per_s": tokens / span,
            "errors": sum(1 for r in self._records if r[3]),
        }


class Telemetry:
    """Publishes a heartbeat every `interval` seconds, and events on demand.

    Async context manager; `close()` is idempotent. A failing `build_heartbeat` or
    publish is logged and retried at the next tick, never fatal.

    Args:
        nc: a connected client.
        role: the node's role (`edge`, `cloud`, `api`, ...).
        node_id: the node's id (a subject token).
        build_heartbeat: returns the current `wire.Heartbeat`.
        interval: seconds between heartbeats.
    """

    def __init__(
        self,
        nc: Client,
        *,
        role: str,
        node_id: str,
        build_heartbeat: Callable[[], wire.Heartbeat],
        interval: float = 1.0,
    ) -> None:
        self.nc = nc
        self.role = role
        self.node_id = node_id
        self.build_heartbeat = build_heartbeat
        self.interval = interval
        self.telemetry_subject = subjects.telemetry(role, node_id)
        self.events_subject = subjects.events(role, node_id)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Publish one heartbeat now, then every `interval` seconds."""
        if self._task is None:
            await self.publish_heartbeat()
            self._task = asyncio.create_task(self._loop(), name=f"hg-telemetry-{self.node_id}")

    async def publish_heartbeat(self) -> None:
        """Build and publish one heartbeat now (e.g. right after a status change)."""
        try:
            await self.nc.publish(self.telemetry_subject, wire.encode(self.build_heartbeat()))
        except Exception as exc:  # a heartbeat must never take the node down
            log.warning("heartbeat of %s not published: %s", self.node_id, exc)

    async def _loop(self) -> None:
        next_tick = time.monotonic()
        while True:
            next_tick += self.interval
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            await self.publish_heartbeat()

    async def publish_event(
        self, kind: str, message: str = "", request_id: str | None = None, **data: Any
    ) -> None:
        """Publish an `Event` (fallback, error, rollout, drain, ...) on this node's subject."""
        event = wire.Event(
            kind=kind,
            role=self.role,
            node_id=self.node_id,
            request_id=request_id,
            message=message,
            data=data,
        )
        try:
            await self.nc.publish(self.events_subject, wire.encode(event))
        except Exception as exc:
            log.warning("event %s of %s not published: %s", kind, self.node_id, exc)

    async def close(self) -> None:
        """Stop the heartbeat loop. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Telemetry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def publish_operator_action(
    nc: Client, operator_id: str, action: str, target: str, ok: bool, message: str
) -> None:
    """Publish what an operator did (console or `hybridgen fleet`) as an `operator_action`
    event on `hg.events.operator.<operator_id>`; every console shows it.

    Raises:
        Whatever `nc.publish` raises (the caller decides how to report a lost record).
    """
    event = wire.Event(
        kind="operator_action",
        role="operator",
        node_id=operator_id,
        message=message,
        data={"action": action, "target": target, "ok": ok, "message": message},
    )
    await nc.publish(subjects.events("operator", operator_id), wire.encode(event))
