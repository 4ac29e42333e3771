"""The cloud worker over a real nats-server, spoken to with the bus helpers directly."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.errors import ContextLengthExceeded, Internal, NoResponders, Overloaded
from broker.streaming import request_stream
from tests.fixtures_cloud import LONG_CACHE_TOKENS, LONG_CONTEXT
from tests.waits import eventually

MODEL = "hg-cloud"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.lab.random_model import make_random_llama

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

    beat = (await eventually(idle, "an idle heartbeat after the request"))[0]
    assert beat.status == "ready" and beat.model == MODEL
    assert beat.model_version == worker.model_version and beat.extra["device"] == "cpu"


async def test_window_and_overload(make_worker: Callable[..., Any], nc: Client) -> None:
    """(Deadlines: tests/test_cloud_deadlines.py.)"""
    worker = await make_worker(max_queue_tokens=300)
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
    await eventually(
        lambda: worker.admitted == worker.admitted_tokens == worker.queued == 0,
        "the worker's queue is empty again",
    )


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
    events = await events_of(nc, worker.node_id)
    with pytest.raises(Internal):
        async with request_stream(nc, request("boom")):
            pass
    served = request(max_tokens=4)
    async with request_stream(nc, served) as stream:
        _text, done = await stream.collect()
    assert done.usage.completion_tokens == 4
    # The crash is one `error` event; the request served after it a `request` event, which
    # also marks the end of what the crash could have published.
    await eventually(lambda: [e for e in events if e.kind == "request"], "the request event")
    assert [e.kind for e in events] == ["error", "request"]
    assert events[0].data["code"] == "internal"
    assert events[1].request_id == served.request_id
    assert events[1].data["completion_tokens"] == 4 and events[1].data["finish_reason"] == "length"


async def events_of(nc: Client, node_id: str) -> list[wire.Event]:
    """The events the worker `node_id` publishes from now on (filled as they come)."""
    events: list[wire.Event] = []

    async def on_event(msg: Msg) -> None:
        events.append(wire.decode(msg.data, wire.Event))

    await nc.subscribe(subjects.events("cloud", node_id), cb=on_event)
    await nc.flush()
    return events


async def test_request_events_and_what_they_leave_out(
    start_cloud_worker: Callable[..., Any], cloud_long_model: Path, nc: Client
) -> None:
    """docs/cloud.md: a `request` event per served request (its id, origin, model, version,
    token counts, finish reason and timings; never the prompt or the answer); `overloaded`
    and `cancelled` requests publish no `error` event."""
    worker = await start_cloud_worker(
        cloud_long_model, cache_tokens=LONG_CACHE_TOKENS, max_queue_requests=1
    )
    events = await events_of(nc, worker.node_id)
    async with request_stream(nc, request(max_tokens=LONG_CONTEXT - 100)):  # holds the slot
        with pytest.raises(Overloaded):
            async with request_stream(nc, request(max_tokens=4)):
                pass
    # Leaving the first stream early cancelled it (it runs far longer than this test).
    await eventually(lambda: worker.admitted == 0, "the cancelled request left the worker")
    served = request("Quokka marmalade", max_tokens=6, origin="edge-events")
    async with request_stream(nc, served) as stream:
        answer, done = await stream.collect()
    # The served request's event comes after anything the other two could have published.
    await eventually(lambda: [e for e in events if e.kind == "request"], "the request event")
    assert [(e.kind, e.request_id) for e in events] == [("request", served.request_id)]
    data = events[0].data
    assert set(data) == {"origin", "model", "model_version", "prompt_tokens",
                         "completion_tokens", "finish_reason", "ttft_ms", "total_ms"}  # fmt: skip
    assert (data["origin"], data["model"], data["model_version"]) == (
        "edge-events",
        MODEL,
        worker.model_version,
    )
    assert (data["prompt_tokens"], data["completion_tokens"], data["finish_reason"]) == (
        done.usage.prompt_tokens, 6, "length"
    )  # fmt: skip
    assert 0 < data["ttft_ms"] <= data["total_ms"]  # the first output comes before the end
    assert "Quokka" not in repr(events[0]) and answer not in repr(events[0])


async def test_drain_finishes_in_flight_and_refuses_new(
    make_worker: Callable[..., Any], nc: Client
) -> None:
    worker = await make_worker()
    events = await events_of(nc, worker.node_id)
    async with request_stream(nc, request(max_tokens=120)) as stream:
        drain = asyncio.create_task(worker.drain(timeout=10))
        _text, done = await stream.collect()
    assert done.finish_reason == "length" and done.usage.completion_tokens == 120
    assert await drain is True
    with pytest.raises(NoResponders):
        async with request_stream(nc, request()):
            pass
    assert worker.heartbeat().status == "draining"
    await eventually(lambda: [e for e in events if e.kind == "drain"], "the drain event")


async def test_chat_messages_use_the_workers_own_template(
    make_worker: Callable[..., Any], nc: Client, model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    await make_worker()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = wire.GenerateRequest(
        request_id=wire.new_request_id(),
        model=MODEL,
        messages=[wire.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        max_tokens=6,
        temperature=0.0,
    )
    async with request_stream(nc, chat) as stream:
        answer = "".join([chunk.text async for chunk in stream])
    assert stream.done is not None
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rendered = str(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    expected_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert stream.done.usage.prompt_tokens == len(expected_ids)
    # The worker's rendering is exactly what a completion of the rendered text reads.
    async with request_stream(nc, request(rendered, max_tokens=6)) as same:
        assert "".join([chunk.text async for chunk in same]) == answer


async def test_unset_max_tokens_fits_the_context_window(
    make_worker: Callable[..., Any], nc: Client
) -> None:
    """No max_tokens and a cap beyond the window: it makes what the window leaves
    (`ignore_eos`, so that the model cannot end it sooner)."""
    await make_worker(max_tokens_cap=10_000)
    async with request_stream(nc, request("word " * 60, ignore_eos=True)) as stream:
        async for _ in stream:
            pass
    assert stream.done is not None
    usage = stream.done.usage
    assert usage.prompt_tokens == 121  # "word" and " " for each word, but the last space
    assert usage.completion_tokens == 256 - 121 and stream.done.finish_reason == "length"


def logged_text(record: logging.LogRecord) -> str:
    """All a log record carries: its formatted message, its raw message and arguments, and
    any traceback."""
    return " ".join(
        (record.getMessage(), str(record.msg), repr(record.args), record.exc_text or "")
    )


def string_args(record: logging.LogRecord) -> list[str]:
    """The record's string arguments of 3 characters or more (shorter ones, "a" or "cpu",
    are in any text)."""
    args = record.args if isinstance(record.args, tuple) else ()
    return [a for a in args if isinstance(a, str) and len(a.strip()) >= 3]


async def test_info_logs_carry_request_ids_and_sizes_never_the_text(
    make_worker: Callable[..., Any], nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """README ("Logs at INFO carry request ids, routes and sizes, never prompts or generated
    text"; docs/cloud.md: `request_id` is "the id every hop logs"): a completion and a chat
    with distinctive texts are served and a third is refused; every INFO record of the
    process is free of their texts and answers, and each request's id is logged with its
    sizes."""
    caplog.set_level(logging.INFO)
    await make_worker()
    # Sampled (seeded), so that the answers are distinctive text, not a repeated token.
    sampled: dict[str, Any] = {"max_tokens": 12, "temperature": 1.0, "seed": 5}
    completion = request("Quokka marmalade zephyr 7319", origin="edge-logs", **sampled)
    async with request_stream(nc, completion) as stream:
        answer, done = await stream.collect()
    chat = wire.GenerateRequest(
        request_id=wire.new_request_id(),
        model=MODEL,
        messages=[
            wire.ChatMessage(role="system", content="Sphinx of black quartz"),
            wire.ChatMessage(role="user", content="judge my vow 4242"),
        ],
        **{**sampled, "seed": 6},
    )
    async with request_stream(nc, chat) as stream:
        chat_answer, chat_done = await stream.collect()
    refused = request("Quokka marmalade zephyr 7319" + " word" * 300, max_tokens=8)
    with pytest.raises(ContextLengthExceeded):
        async with request_stream(nc, refused):
            pass

    secrets = ["Quokka", "marmalade", "zephyr", "7319", "Sphinx", "quartz", "vow 4242"]
    secrets += [answer.strip(), chat_answer.strip()]
    assert min(len(answer.strip()), len(chat_answer.strip())) >= 10  # long enough to search
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    leaks = [(r.name, r.getMessage()) for r in records for s in secrets if s in logged_text(r)]
    # A piece of a text as an argument (a token of an answer, say) is a leak too.
    texts = " ".join([completion.prompt or "", answer, chat_answer, *secrets])
    leaks += [(r.name, r.getMessage()) for r in records for a in string_args(r) if a in texts]
    assert leaks == []

    served = [r.getMessage() for r in records if " served: " in r.getMessage()]
    assert [line.rsplit(",", 1)[0] for line in served] == [
        f"request {completion.request_id} from edge-logs served: {done.usage.prompt_tokens} "
        f"prompt + 12 completion tokens, {done.finish_reason}",
        f"request {chat.request_id} from an unnamed caller served: "
        f"{chat_done.usage.prompt_tokens} prompt + 12 completion tokens, "
        f"{chat_done.finish_reason}",
    ]
    assert any(refused.request_id in r.getMessage() for r in records), "the refusal's id"
