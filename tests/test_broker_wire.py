"""Wire messages: every type round-trips through a real server; bad input is bad_request."""

from __future__ import annotations

import msgpack
import pytest
from nats.aio.client import Client

from broker import errors, wire
from tests.waits import BOUND_S

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
    received = await sub.next_msg(timeout=BOUND_S)
    decoded = wire.decode(received.data, type(message))
    assert decoded == message
    if isinstance(decoded, wire.Chunk | wire.Done | wire.Error):
        assert wire.decode_reply(received.data) == message


BASE = {"v": wire.VERSION, "request_id": "r", "model": "m"}


@pytest.mark.parametrize(
    ("payload", "message", "param"),
    [
        (b"", "malformed msgpack (ValueError: Unpack failed: incomplete input)", None),
        (b"\xc1", "malformed msgpack (FormatError: )", None),
        # a truncated array
        (b"\x93\x01\x02", "malformed msgpack (ValueError: Unpack failed: incomplete input)", None),
        (msgpack.packb("a string"), "message must be a msgpack map, got str", None),
        (
            msgpack.packb({"prompt": "x"}),
            "unsupported message version None (this node speaks v3)",
            "v",
        ),
        (msgpack.packb({"v": "1"}), "unsupported message version '1' (this node speaks v3)", "v"),
        (
            msgpack.packb({"v": wire.VERSION, "type": "chunk"}),
            "expected a 'generate' message, got 'chunk'",
            "type",
        ),
        (
            msgpack.packb({"v": wire.VERSION, "model": "m", "prompt": "p"}),
            "missing field 'request_id'",
            "request_id",
        ),
        # v1 carried a rendered prompt for every request: refused, not misread.
        (
            msgpack.packb({**BASE, "v": 1, "prompt": "p"}),
            "unsupported message version 1 (this node speaks v3)",
            "v",
        ),
        (msgpack.packb(BASE), "exactly one of 'messages' and 'prompt' must be set", None),
        (
            msgpack.packb({**BASE, "prompt": "p", "messages": [{"role": "user", "content": "x"}]}),
            "exactly one of 'messages' and 'prompt' must be set",
            None,
        ),
        (
            msgpack.packb({**BASE, "messages": []}),
            "invalid field 'messages': List should have at least 1 item after validation, not 0",
            "messages",
        ),
        (
            msgpack.packb({**BASE, "messages": [{"role": "user"}]}),
            "missing field 'messages.0.content'",
            "messages.0.content",
        ),
        (
            msgpack.packb({**BASE, "prompt": b"\x00"}),
            "invalid field 'prompt': Input should be a valid string",
            "prompt",
        ),
        (
            msgpack.packb({**BASE, "prompt": "p", "max_tokens": 0}),
            "invalid field 'max_tokens': Input should be greater than or equal to 1",
            "max_tokens",
        ),
        (
            msgpack.packb({**BASE, "prompt": "p", "stop": ["a"] * 40}),
            "invalid field 'stop': List should have at most 16 items after validation, not 40",
            "stop",
        ),
        # a non-string key
        (
            msgpack.packb({1: 2}),
            "malformed msgpack (ValueError: int is not allowed for map key when "
            "strict_map_key=True)",
            None,
        ),
        (
            b"\x00" * (wire.MAX_MESSAGE_BYTES + 1),
            "message of 1048577 bytes exceeds the limit of 1048576 bytes",
            None,
        ),
    ],
)
def test_decoder_refuses_bad_input(payload: bytes, message: str, param: str | None) -> None:
    with pytest.raises(errors.BadRequest) as info:
        wire.decode(payload, wire.GenerateRequest)
    assert (info.value.message, info.value.param) == (message, param)


def test_reply_decoder_refuses_unknown_type() -> None:
    with pytest.raises(errors.BadRequest) as info:
        wire.decode_reply(msgpack.packb({"v": wire.VERSION, "type": "nope"}))
    assert (info.value.message, info.value.param) == (
        "Input tag 'nope' found using 'type' does not match any of the expected tags: "
        "'chunk', 'done', 'error'",
        None,
    )
    with pytest.raises(errors.BadRequest) as info:
        wire.decode_reply(msgpack.packb({"v": wire.VERSION, "type": "chunk", "request_id": "r"}))
    assert (info.value.message, info.value.param) == ("missing field 'chunk.seq'", "chunk.seq")


def test_deeply_nested_input_does_not_crash() -> None:
    payload = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(errors.BadRequest) as info:
        wire.decode(payload, wire.GenerateRequest)
    assert info.value.message == "malformed msgpack (StackError: )"


def test_unknown_fields_ignored() -> None:
    raw = msgpack.packb(
        {"v": wire.VERSION, "type": "chunk", "request_id": "r", "seq": 0, "future_field": [1, 2]}
    )
    assert wire.decode_reply(raw) == wire.Chunk(request_id="r", seq=0)
