"""Wire messages: every type round-trips through a real server; bad input is bad_request."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from nats.aio.client import Client

from broker import errors, wire

SAMPLES: list[wire.Message] = [
    wire.GenerateRequest(
        request_id=wire.new_request_id(),
        model="hg-cloud",
        prompt="héllo ✓",
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        stop=["\n\n"],
        seed=3,
        logprobs=True,
        timeout_ms=1500,
        origin="edge-a",
        user="u1",
    ),
    wire.GenerateRequest(
        request_id=wire.new_request_id(),
        model="hg-cloud",
        messages=[
            wire.ChatMessage(role="system", content="Be brief."),
            wire.ChatMessage(role="user", content="héllo ✓"),
        ],
    ),
    wire.Chunk(request_id="r1", seq=0),
    wire.Chunk(request_id="r1", seq=1, text="hi", token_ids=[5, 6], logprobs=[-0.1, -2.5]),
    wire.Done(
        request_id="r1",
        seq=2,
        finish_reason="length",
        usage=wire.Usage(prompt_tokens=3, completion_tokens=2),
        served_by="cloud-x-1a2b",
        model_version="v1",
    ),
    wire.Error(request_id="r1", code="overloaded", message="busy", retry_after=1.5, seq=0),
    wire.Heartbeat(
        role="edge",
        node_id="edge-x-0001",
        status="degraded",
        in_flight=2,
        latency_p50_ms=12.5,
        fallback_ratio={"too_long": 0.25},
        extra={"breaker": "open", "cache": [1, 2]},
    ),
    wire.Event(kind="fallback", role="edge", node_id="edge-x", request_id="r1", data={"n": 1}),
    wire.ControlRequest(verb="set-policy", args={"threshold": 3.5}),
    wire.ControlReply(ok=True, message="done", data={"version": "v2"}),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
async def test_round_trip_through_server(nc: Client, message: wire.Message) -> None:
    sub = await nc.subscribe("hg.test.wire")
    await nc.publish("hg.test.wire", wire.encode(message))
    received = await sub.next_msg(timeout=2)
    decoded = wire.decode(received.data, type(message))
    assert decoded == message
    if isinstance(decoded, wire.Chunk | wire.Done | wire.Error):
        assert wire.decode_reply(received.data) == message


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "malformed msgpack"),
        (b"\xc1", "malformed msgpack"),
        (b"\x93\x01\x02", "malformed msgpack"),  # truncated array
        (msgpack.packb("a string"), "must be a msgpack map"),
        (msgpack.packb({"prompt": "x"}), "version"),
        (msgpack.packb({"v": "1"}), "version"),
        (msgpack.packb({"v": wire.VERSION, "type": "chunk"}), "expected a 'generate' message"),
        (msgpack.packb({"v": wire.VERSION, "model": "m", "prompt": "p"}), "'request_id'"),
        # v1 carried a rendered prompt for every request: refused, not misread.
        (msgpack.packb({"v": 1, "request_id": "r", "model": "m", "prompt": "p"}), "version 1"),
        (msgpack.packb({"v": wire.VERSION, "request_id": "r", "model": "m"}), "exactly one of"),
        (
            msgpack.packb(
                {
                    "v": wire.VERSION,
                    "request_id": "r",
                    "model": "m",
                    "prompt": "p",
                    "messages": [{"role": "user", "content": "x"}],
                }
            ),
            "exactly one of",
        ),
        (
            msgpack.packb({"v": wire.VERSION, "request_id": "r", "model": "m", "messages": []}),
            "'messages'",
        ),
        (
            msgpack.packb(
                {"v": wire.VERSION, "request_id": "r", "model": "m", "messages": [{"role": "user"}]}
            ),
            "'messages.0.content'",
        ),
        (
            msgpack.packb({"v": wire.VERSION, "request_id": "r", "model": "m", "prompt": b"\x00"}),
            "'prompt'",
        ),
        (
            msgpack.packb(
                {"v": wire.VERSION, "request_id": "r", "model": "m", "prompt": "p", "max_tokens": 0}
            ),
            "'max_tokens'",
        ),
        (
            msgpack.packb(
                {
                    "v": wire.VERSION,
                    "request_id": "r",
                    "model": "m",
                    "prompt": "p",
                    "stop": ["a"] * 40,
                }
            ),
            "'stop'",
        ),
        (msgpack.packb({1: 2}), "malformed msgpack"),  # non-string key
        (b"\x00" * (wire.MAX_MESSAGE_BYTES + 1), "exceeds the limit"),
    ],
)
def test_decoder_refuses_bad_input(payload: bytes, fragment: str) -> None:
    with pytest.raises(errors.BadRequest) as info:
        wire.decode(payload, wire.GenerateRequest)
    assert fragment in info.value.message


def test_reply_decoder_refuses_unknown_type() -> None:
    with pytest.raises(errors.BadRequest):
        wire.decode_reply(msgpack.packb({"v": wire.VERSION, "type": "nope"}))
    with pytest.raises(errors.BadRequest):
        wire.decode_reply(msgpack.packb({"v": wire.VERSION, "type": "chunk", "request_id": "r"}))


def test_deeply_nested_input_does_not_crash() -> None:
    payload = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(errors.BadRequest):
        wire.decode(payload, wire.GenerateRequest)


async def test_unknown_fields_ignored(nc: Client) -> None:
    raw = msgpack.packb(
        {"v": wire.VERSION, "type": "chunk", "request_id": "r", "seq": 0, "future_field": [1, 2]}
    )
    assert wire.decode_reply(raw) == wire.Chunk(request_id="r", seq=0)
    await asyncio.sleep(0)
