"""Slow clients on the cloud API (docs/cloud.md, "Input limits and slow clients").

A slowloris, dripping a request that never ends, is disconnected by the read deadline of the
API started by its CLI (`--read-timeout-s`) while other clients are served. A client that
never reads a streamed answer is cut off by the write-stall deadline (the CLI's protocol
class, with small send buffers) and its generation is cancelled on the worker.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from cloud.cli import _parser
from serving.slow_clients import deadline_protocol
from tests.fixtures_cloud import LONG_CACHE_TOKENS, LONG_CONTEXT, cli_cloud_api, live_cloud_api
from tests.live import small_buffers
from tests.waits import BOUND_S, eventually

pytestmark = pytest.mark.slow

MODEL = "hg-cloud"
#: The deadlines the tests start the API with: short, so that the waits end soon.
READ_TIMEOUT_S = 0.5
WRITE_TIMEOUT_S = 0.5


def test_the_cli_deadlines_default_to_the_documented_values() -> None:
    defaults = _parser().parse_args(["api"])
    assert (defaults.read_timeout_s, defaults.write_timeout_s) == (10.0, 30.0)
    given = _parser().parse_args(["api", "--read-timeout-s", "3", "--write-timeout-s", "4"])
    assert (given.read_timeout_s, given.write_timeout_s) == (3.0, 4.0)


async def test_a_slowloris_is_disconnected_while_others_are_served(
    nats_url: str, tmp_path: Path
) -> None:
    """Whole headers, then a body that trickles one byte per request another client gets
    served: each byte comes well inside any idle timeout, but the request as a whole can
    never arrive within the read deadline. The connection is closed without an answer."""
    flags = ("--read-timeout-s", str(READ_TIMEOUT_S))
    async with cli_cloud_api(nats_url, *flags, log=tmp_path / "api.log") as (_, url):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        closed = asyncio.ensure_future(reader.read())  # all it got, once the server closes
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: 900000\r\n\r\n{" % port
        )
        served = 0
        try:
            async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
                async with asyncio.timeout(BOUND_S):
                    while not closed.done():
                        writer.write(b" ")  # the slow client's next byte...
                        try:
                            await writer.drain()
                        except ConnectionError:
                            break
                        response = await http.get("/healthz")  # ...paced by a normal client
                        assert response.status_code == 200
                        served += 1
            assert await closed == b""  # closed, and no answer at all
            assert served > 0
        finally:
            closed.cancel()
            writer.close()


@pytest.fixture
async def worker(start_cloud_worker: Any, cloud_long_model: Path) -> Any:
    return await start_cloud_worker(cloud_long_model, cache_tokens=LONG_CACHE_TOKENS)


async def recorder(nc: Client, subject: str, decode: Any = None) -> list[Any]:
    """What is published on `subject` from now on (decoded with `decode` when given)."""
    seen: list[Any] = []

    async def on_msg(msg: Msg) -> None:
        seen.append(msg.subject if decode is None else decode(msg.data))

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return seen


async def test_a_client_that_never_reads_a_stream_is_cut_off_and_its_generation_stops(
    worker: Any, nats_url: str, nc: Client
) -> None:
    requests = await recorder(
        nc, subjects.gen(MODEL), functools.partial(wire.decode, cls=wire.GenerateRequest)
    )
    cancels = await recorder(nc, subjects.CANCEL_ALL)
    protocol = deadline_protocol(read_timeout_s=READ_TIMEOUT_S, write_timeout_s=WRITE_TIMEOUT_S)
    max_tokens = LONG_CONTEXT - 100  # far more than the buffers hold, and than it will make
    body = b'{"model":"hg-cloud","prompt":"Hello","stream":true,"temperature":0,"max_tokens":%d}'
    body %= max_tokens
    async with live_cloud_api(nats_url, http=small_buffers(protocol)) as (server, url):
        port = int(url.rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # tiny window, never read
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            head = (
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (port, len(body))
            )
            await loop.sock_sendall(sock, head + body)
            await eventually(lambda: worker.tokens_out > 0, "the generation started")
            await eventually(
                lambda: not server.server_state.connections, "the stalled client was cut off"
            )
            await eventually(lambda: worker.admitted == 0, "the worker stopped generating")
        finally:
            sock.close()
    assert [r.max_tokens for r in requests] == [max_tokens]
    assert cancels == [subjects.cancel(requests[0].request_id)]
    assert worker.tokens_out < max_tokens
