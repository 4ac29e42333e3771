"""Bus catalogue fixtures: a scripted stand-in worker, for the replies no real worker sends.

- `scripted_worker`: `await scripted_worker(script, model=...)` puts a stand-in on
  `hg.gen.<model>` (on its own connection) that answers every request with the raw replies
  `script(request_id)`, in order; it returns the list of requests received. Gone after the test.
- `pack`, `chunk`, `done`: raw reply builders for scripts.

A stand-in because no real worker can be made to send a malformed reply or break its
sequence: `GenerationService`'s `Responder` numbers its replies itself, and `wire.encode`
writes only valid messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.bus import connect

#: Builds the raw replies to one request from its request id.
Script = Callable[[str], list[bytes]]
ScriptedWorker = Callable[..., Awaitable[list[wire.GenerateRequest]]]


def pack(obj: Any) -> bytes:
    """msgpack of anything (a reply the wire types would never write)."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def chunk(request_id: str, seq: int, text: str = "", token_ids: list[int] | None = None) -> bytes:
    return wire.encode(
        wire.Chunk(request_id=request_id, seq=seq, text=text, token_ids=token_ids or [])
    )


def done(request_id: str, seq: int) -> bytes:
    usage = wire.Usage(prompt_tokens=1, completion_tokens=seq)
    return wire.encode(wire.Done(request_id=request_id, seq=seq, finish_reason="stop", usage=usage))


@pytest.fixture
async def scripted_worker(nats_url: str) -> AsyncIterator[ScriptedWorker]:
    """`await scripted_worker(script, model="hg-cloud")` -> the requests it will receive."""
    stack = contextlib.AsyncExitStack()

    async def start(script: Script, *, model: str = "hg-cloud") -> list[wire.GenerateRequest]:
        received: list[wire.GenerateRequest] = []
        worker = await connect(nats_url, name=f"scripted-{model}")
        stack.push_async_callback(worker.close)

        async def answer(msg: Msg) -> None:
            request = wire.decode(msg.data, wire.GenerateRequest)
            received.append(request)
            for payload in script(request.request_id):
                await worker.publish(msg.reply, payload)

        await worker.subscribe(subjects.gen(model), cb=answer)
        await worker.flush()
        return received

    async with stack:
        yield start
