"""Broker fixtures: a real nats-server on a random port with its own JetStream store.

- `nats_server`: a started `NatsServer` (function scope), shut down in `finally`.
- `nats_url`: its client URL.
- `nc`: a connected client, closed after the test.
- `start_nats`: a factory for more servers in one test (leaf/hub, custom config).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from broker.bus import connect
from broker.server import NatsServer


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path / "nats")
    try:
        await server.start()
        yield server
    finally:
        await server.shutdown()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.client_url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(nats_url, name="test")
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.close()


@pytest.fixture
async def start_nats(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[NatsServer]]]:
    """`await start_nats(name, **NatsServer kwargs)` -> a started server, stopped after."""
    servers: list[NatsServer] = []

    async def start(name: str = "extra", **kwargs: Any) -> NatsServer:
        kwargs.setdefault("store_dir", tmp_path / name)
        server = NatsServer(**kwargs)
        servers.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(servers):
            await server.shutdown()
