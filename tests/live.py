"""Live servers for tests: a real uvicorn serving an app on a free loopback port, in the
test's own event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn

from tests.waits import eventually


@asynccontextmanager
async def serve_app(app: Any, **config: Any) -> AsyncIterator[tuple[uvicorn.Server, str]]:
    """Serve `app` (extra `uvicorn.Config` options in `config`); yields (server, base URL).

    Raises:
        Whatever stopped the server from starting (e.g. the app's lifespan failing).
    """
    options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "log_level": "warning"}
    server = uvicorn.Server(uvicorn.Config(app, **{**options, **config}))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), "uvicorn started")
        if task.done():
            task.result()
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def small_buffers(protocol: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """`protocol` with small send buffers, so that a few dozen chunks fill them as a long
    answer does on a real network. (Loopback's huge MSS grows the kernel's send buffer to
    megabytes, and asyncio buffers 64 KiB before it pauses.)"""

    class Small(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            transport.set_write_buffer_limits(high=4096)
            super().connection_made(transport)

    return Small
