"""The cloud worker over a real nats-server, spoken to with the bus helpers directly."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.errors import ContextLengthExceeded, Internal, NoResponders, Overloaded, Timeout
from broker.streaming import request_stream

MODEL = "hg-cloud"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.random_model import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("worker_model"), context_length=256)


@pytest.fixture
def make_worker(start_cloud_worker: Callable[..., Any], model_dir: Path) -> Callable[..., Any]:
    """`await make_worker(**WorkerSettings overrides)`: a worker with a fast heartbeat."""
    return functools.partial(start_cloud_worker, model_dir, heartbeat_s=0.2)


def request(prompt: str = "Hello", **fields: Any) -> wire.GenerateRequest:
    fields.setdefault("temperature", 0.0)
    return wire.GenerateRequest(
        request_id=wire.new_request_id(), model=MODEL, prompt=prompt, **fields
    )


async def test_stream_protocol_and_heartbeat(make_worker: Callable[..., Any], nc: Client) -> None:
    worker = await make_worker(node_id="cloud-hb")
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Msg) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    await nc.subscribe(subjects.telemetry("cloud", "cloud-hb"), cb=on_beat)
    async with request_stream(nc, request(max_tokens=8)) as stream:
        chunks = [chunk async for chunk in stream]
    assert chunks[0].seq == 0 and chunks[0].text == ""
    assert stream.done is not None and stream.done.served_by == "cloud-hb"
    assert stream.done.usage.completion_tokens == sum(len(c.token_ids) for c in chunks) == 8
    # A beat published during the request says in_flight 1; the request's own bookkeeping
    # ends just after its Done, so wait (bounded) for a later beat that is idle again.
    finished = time.time()

    def idle() -> list[wire.Heartbeat]:
        return [b for b in beats if b.ts >= finished and b.in_flight == 0]

    for _ in range(200):
        if idle():
            break
        await asyncio.sleep(0.05)
    assert idle(), f"no idle heartbeat after the request: {beats[-3:]}"
    beat = idle()[0]
    assert beat.status == "ready" and beat.model == MODEL
    assert beat.model_version == worker.model_version and beat.extra["device"] == "cpu"


async def test_deadline_and_window_and_overload(
    make_worker: Callable[..., Any], nc: Client
) -> None:
    worker = await make_worker(max_queue_tokens=300)
    with pytest.raises(Timeout):
        async with request_stream(nc, request(max_tokens=240, timeout_ms=30)) as stream:
            async for _ in stream:
                pass
    with pytest.raises(ContextLengthExceeded):
        async with request_stream(nc, request(max_tokens=256)):
            pass
    async with request_stream(nc, request(max_tokens=240)) as first:
        with pytest.raises(Overloaded) as info:
            async with request_stream(nc, request(max_tokens=100)):
                pass
        assert info.value.retry_after == 1.0
        async for _ in first:
            pass
    for _ in range(100):
        if worker.admitted == 0:
            break
        await asyncio.sleep(0.02)
    assert worker.admitted == 0 and worker.admitted_tokens == 0 and worker.queued == 0


async def test_crash_in_one_request_answers_internal(
    make_worker: Callable[..., Any], nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = await make_worker()
    assert worker.engine is not None
    encode = worker.engine.encode

    def faulty(text: str) -> list[int]:
        if text == "boom":
            raise RuntimeError("injected fault")
        return encode(text)

    monkeypatch.setattr(worker.engine, "encode", faulty)
    events: list[wire.Event] = []

    async def on_event(msg: Msg) -> None:
        events.append(wire.decode(msg.data, wire.Event))

    await nc.subscribe(subjects.events("cloud", worker.node_id), cb=on_event)
    with pytest.raises(Internal):
        async with request_stream(nc, request("boom")):
            pass
    async with request_stream(nc, request(max_tokens=4)) as stream:
        _text, done = await stream.collect()
    assert done.usage.completion_tokens == 4
    await nc.flush()
    await asyncio.sleep(0.1)
    # The crash is an `error` event; the request served after it a `request` event.
    assert [e.kind for e in events] == ["error", "request"]
    assert events[0].data["code"] == "internal"
    assert events[1].data["completion_tokens"] == 4 and events[1].data["finish_reason"]


async def test_drain_finishes_in_flight_and_refuses_new(
    make_worker: Callable[..., Any], nc: Client
) -> None:
    worker = await make_worker()
    async with request_stream(nc, request(max_tokens=120)) as stream:
        drain = asyncio.create_task(worker.drain(timeout=10))
        _text, done = await stream.collect()
    assert done.finish_reason == "length" and done.usage.completion_tokens == 120
    assert await drain is True
    with pytest.raises(NoResponders):
        async with request_stream(nc, request()):
            pass
    assert worker.heartbeat().status == "draining"


async def test_chat_messages_use_the_workers_own_template(
    make_worker: Callable[..., Any], nc: Client, model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    await make_worker()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = wire.GenerateRequest(
        request_id=wire.new_request_id(),
        model=MODEL,
        messages=[wire.ChatMessage(**m) for m in messages],
        max_tokens=6,
        temperature=0.0,
    )
    async with request_stream(nc, chat) as stream:
        answer = "".join([chunk.text async for chunk in stream])
    assert stream.done is not None
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert stream.done.usage.prompt_tokens == len(expected_ids)
    # The worker's rendering is exactly what a completion of the rendered text reads.
    async with request_stream(nc, request(rendered, max_tokens=6)) as same:
        assert "".join([chunk.text async for chunk in same]) == answer


async def test_unset_max_tokens_fits_the_context_window(
    make_worker: Callable[..., Any], nc: Client
) -> None:
    await make_worker(default_max_tokens=10_000)
    async with request_stream(nc, request("word " * 60)) as stream:
        async for _ in stream:
            pass
    assert stream.done is not None
    usage = stream.done.usage
    assert usage.prompt_tokens + usage.completion_tokens <= 256
    assert (
        usage.completion_tokens == 256 - usage.prompt_tokens or stream.done.finish_reason == "stop"
    )
