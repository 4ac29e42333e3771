"""Live servers for tests: a real uvicorn serving an app on a free loopback port, in the
test's own event loop."""

from __future__ import annotations

import asyncio
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
