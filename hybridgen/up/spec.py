"""What the launcher runs: a child's spec, its readiness check, and the error of a bad start.

A child is a command line with its extra environment, whether it owns the terminal, how it
is checked ready, how long it may drain, and which bus user it connects as.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from broker.errors import HybridgenError
from broker.permissions import Role


@dataclass
class ChildSpec:
    """One process the launcher runs.

    Attributes:
        name: short name, used for the log file and messages.
        argv: the command line (e.g. `[sys.executable, "-m", "cloud", "worker"]`).
        env: extra environment variables (on top of `HG_NATS_URL` and `HG_HOME`).
        foreground: the child owns the terminal (the TUI); when it exits, everything stops.
        ready: optional check awaited after the start until it returns True (e.g. an HTTP
            `/readyz` probe), so the next child starts only once this one serves.
        ready_timeout: seconds to wait for `ready`.
        stop_timeout: seconds between SIGTERM and SIGKILL (the child's drain bound plus a
            margin).
        url: where the child serves, if it has an HTTP API (printed by `up`).
        role: its NATS role (edge, cloud, api, operator); with a secured broker it connects
            as its own user with that role's permissions. None: no credentials.
        node_id: the node id it speaks for (its user may use only that node's subjects).
        user: its NATS user name (default `name`).
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    foreground: bool = False
    ready: Callable[[], Awaitable[bool]] | None = None
    ready_timeout: float = 300.0
    stop_timeout: float = 10.0
    url: str | None = None
    role: Role | None = None
    node_id: str | None = None
    user: str | None = None

    @property
    def nats_user(self) -> str:
        """The bus user it connects as (when it has a role)."""
        return self.user or self.name


class ChildFailed(HybridgenError):
    """A child exited while starting, or never became ready."""


def http_ready(url: str, *, timeout_s: float = 1.0) -> Callable[[], Awaitable[bool]]:
    """A `ChildSpec.ready` check: True once `GET url` answers 2xx (e.g. `/readyz`).

    Plain asyncio, no HTTP client dependency; `http://host:port/path` only.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"http_ready needs an http://host:port/path URL, got {url!r}")
    host, port, path = parts.hostname, parts.port or 80, parts.path or "/"

    async def check() -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(
                        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                    )
                    await writer.drain()
                    status = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False
        fields = status.split()
        return len(fields) >= 2 and fields[1].startswith(b"2")

    return check
