"""Slow clients on a live edge (real uvicorn with the deadline protocol the CLIs use).

A slowloris client, dripping its request a byte at a time, is disconnected by the read
deadline while a normal client is served; a client that never reads a streamed answer is
cut off by the write-stall deadline, and its generation stops.
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

from edge.app import create_app
from edge.cli import build_parser
from edge.settings import EdgeSettings
from serving.slow_clients import deadline_protocol
from tests.live import serve_app

pytestmark = pytest.mark.slow

#: The test's deadlines: short, so that the bounded polls below end soon.
READ_TIMEOUT_S = 0.5
WRITE_TIMEOUT_S = 0.5


def small_buffers(protocol: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """`protocol` with small send buffers: the tiny model's answers (a few dozen KB) then
    fill them, as a long answer does on a real network. (Loopback's huge MSS grows the
    kernel's send buffer to megabytes, and asyncio buffers 64 KiB before it pauses.)"""

    class Small(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            transport.set_write_buffer_limits(high=4096)
            super().connection_made(transport)

    return Small


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
                    await asyncio.sleep(0.02)
            assert served
            assert closed.done(), "the slow request was never closed"
            data = await asyncio.wait_for(closed, 5) if not closed.exception() else b""
            assert data == b""  # closed without an answer
        finally:
            closed.cancel()
            writer.close()


async def test_a_connection_that_sends_nothing_is_closed(edge_dir: Path) -> None:
    async with live_edge(edge_dir) as (_server, url, _app):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            data = await asyncio.wait_for(reader.read(), 20)  # bounded: never a hang
            assert data == b""
        finally:
            writer.close()


async def test_a_client_that_never_reads_is_cut_off_and_generation_stops(
    edge_dir: Path,
) -> None:
    async with live_edge(edge_dir) as (server, url, app):
        runtime = app.state.service.node.runtime
        port = int(url.rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # tiny window, never read
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        # Many large chunks (20 alternatives per token): more than the buffers hold.
        body = (
            b'{"model":"hg-edge","stream":true,"max_tokens":%d,"logprobs":true,'
            b'"top_logprobs":20,"temperature":1.5,"seed":1,'
            b'"messages":[{"role":"user","content":"Tell me a long story"}]}'
        ) % (runtime.context_length - 40)
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await loop.sock_sendall(sock, head + body)
        try:
            # The generation starts (a generous bound: a loaded machine may take seconds).
            for _ in range(3000):
                if runtime.in_flight or runtime.tokens_generated:
                    break
                await asyncio.sleep(0.01)
            assert runtime.tokens_generated or runtime.in_flight
            assert server.server_state.connections
            # ...the server gives up on the client: its connection is dropped...
            for _ in range(400):
                if not server.server_state.connections:
                    break
                await asyncio.sleep(0.05)
            assert not server.server_state.connections, "the stalled client was never cut off"
            # ...and nothing is generated for it any more.
            for _ in range(400):
                if runtime.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert runtime.in_flight == 0
            received = b""
            try:
                while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 2):
                    received += chunk
            except (ConnectionError, TimeoutError):  # reset, or what was in flight then nothing
                pass
            assert received.startswith(b"HTTP/1.1 200")
            assert b"data: [DONE]" not in received  # aborted, not finished
        finally:
            sock.close()
