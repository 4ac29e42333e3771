"""The caller's side of a stream checks every reply: a malformed reply, or one out of
sequence (a `seq` skipped or repeated), ends the stream with `Internal`, never a hang or a
reply taken as it came. A real nats-server; the responder is a stand-in, as no real worker
sends such replies (`tests.fixtures_bus_catalogue.scripted_worker` says why)."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from broker import errors, subjects, wire
from broker.streaming import request_stream
from serving.errors import status_of
from tests.fixtures_bus_catalogue import Script, ScriptedWorker, chunk, done, pack
from tests.waits import BOUND_S

MODEL = "test-model"
SUBJECT = subjects.gen(MODEL)


def make_request() -> wire.GenerateRequest:
    return wire.GenerateRequest(request_id=wire.new_request_id(), model=MODEL, prompt="hello")


def assert_internal(exc: BaseException, message: str) -> None:
    """`exc` is the coded `Internal` with exactly `message` (and no param, no retry)."""
    assert type(exc) is errors.Internal, repr(exc)
    assert isinstance(exc, errors.HybridgenError)
    assert (exc.code, status_of(exc), exc.message, exc.param, exc.retry_after) == (
        errors.ErrorCode.INTERNAL,
        500,
        message,
        None,
        None,
    )


#: (case, script, the text after "<subject>: " of the error; `{rid}` is the request id)
MALFORMED_ACCEPT: list[tuple[str, Script, str]] = [
    ("not msgpack", lambda rid: [b"\xc1"], "malformed reply: malformed msgpack (FormatError: )"),
    (
        "not a map",
        lambda rid: [pack([1, 2])],
        "malformed reply: message must be a msgpack map, got list",
    ),
    (
        "another version",
        lambda rid: [pack({"v": 2, "type": "chunk", "request_id": rid, "seq": 0})],
        "malformed reply: unsupported message version 2 (this node speaks v3)",
    ),
    (
        "an unknown type",
        lambda rid: [pack({"v": wire.VERSION, "type": "nope", "request_id": rid, "seq": 0})],
        "malformed reply: Input tag 'nope' found using 'type' does not match any of the "
        "expected tags: 'chunk', 'done', 'error'",
    ),
    (
        "no type",
        lambda rid: [pack({"v": wire.VERSION, "request_id": rid, "seq": 0})],
        "malformed reply: Unable to extract tag using discriminator 'type'",
    ),
    (
        "a chunk without seq",
        lambda rid: [pack({"v": wire.VERSION, "type": "chunk", "request_id": rid})],
        "malformed reply: missing field 'chunk.seq'",
    ),
    (
        "a negative seq",
        lambda rid: [pack({"v": wire.VERSION, "type": "chunk", "request_id": rid, "seq": -1})],
        "malformed reply: invalid field 'chunk.seq': Input should be greater than or equal to 0",
    ),
    (
        "a seq of the wrong type",
        lambda rid: [pack({"v": wire.VERSION, "type": "chunk", "request_id": rid, "seq": "0"})],
        "malformed reply: invalid field 'chunk.seq': Input should be a valid integer",
    ),
]


@pytest.mark.parametrize(
    ("case", "script", "message"), MALFORMED_ACCEPT, ids=[c[0] for c in MALFORMED_ACCEPT]
)
async def test_a_malformed_first_reply_is_internal(
    scripted_worker: ScriptedWorker, nc: Client, case: str, script: Script, message: str
) -> None:
    received = await scripted_worker(script, model=MODEL)
    request = make_request()
    with pytest.raises(errors.HybridgenError) as info:
        async with request_stream(nc, request, accept_timeout=BOUND_S):
            pass
    assert [r.request_id for r in received] == [request.request_id]
    assert_internal(info.value, f"{SUBJECT}: {message}")


#: (case, script, the seqs of the good chunks streamed before it broke, the error's text).
#: A script that goes on after its bad reply ends with a good `Done`: a stream that let the
#: bad reply through would end there, and the test fail at once, rather than wait.
BROKEN_MID_STREAM: list[tuple[str, Script, list[int], str]] = [
    (
        "not msgpack after the accept",
        lambda rid: [chunk(rid, 0), chunk(rid, 1, "a"), b"\xc1", done(rid, 3)],
        [0, 1],
        "malformed reply: malformed msgpack (FormatError: )",
    ),
    (
        "a number after the accept",
        lambda rid: [chunk(rid, 0), pack(7), done(rid, 2)],
        [0],
        "malformed reply: message must be a msgpack map, got int",
    ),
    (
        "a done without usage",
        lambda rid: [
            chunk(rid, 0),
            pack(
                {
                    "v": wire.VERSION,
                    "type": "done",
                    "request_id": rid,
                    "seq": 1,
                    "finish_reason": "stop",
                }
            ),
            done(rid, 2),
        ],
        [0],
        "malformed reply: missing field 'done.usage'",
    ),
    (
        "a skipped seq",
        lambda rid: [chunk(rid, 0), chunk(rid, 1, "a"), chunk(rid, 3, "c"), done(rid, 4)],
        [0, 1],
        "broken reply sequence for request {rid}: expected seq 2, got 3",
    ),
    (
        "a repeated seq",
        lambda rid: [chunk(rid, 0), chunk(rid, 1, "a"), chunk(rid, 1, "a"), done(rid, 3)],
        [0, 1],
        "broken reply sequence for request {rid}: expected seq 2, got 1",
    ),
    (
        "a seq going back to the accept",
        lambda rid: [chunk(rid, 0), chunk(rid, 1, "a"), chunk(rid, 0), done(rid, 3)],
        [0, 1],
        "broken reply sequence for request {rid}: expected seq 2, got 0",
    ),
    (
        "a done that skips a seq",
        lambda rid: [chunk(rid, 0), chunk(rid, 1, "a"), done(rid, 3)],
        [0, 1],
        "broken reply sequence for request {rid}: expected seq 2, got 3",
    ),
    (
        "a done that repeats a seq",
        lambda rid: [chunk(rid, 0), chunk(rid, 1, "a"), done(rid, 1)],
        [0, 1],
        "broken reply sequence for request {rid}: expected seq 2, got 1",
    ),
]


@pytest.mark.parametrize(
    ("case", "script", "seqs", "message"),
    BROKEN_MID_STREAM,
    ids=[c[0] for c in BROKEN_MID_STREAM],
)
async def test_a_bad_reply_mid_stream_is_internal(
    scripted_worker: ScriptedWorker,
    nc: Client,
    case: str,
    script: Script,
    seqs: list[int],
    message: str,
) -> None:
    streamed: list[int] = []
    await scripted_worker(script, model=MODEL)
    request = make_request()
    with pytest.raises(errors.HybridgenError) as info:
        async with request_stream(
            nc, request, accept_timeout=BOUND_S, idle_timeout=BOUND_S
        ) as stream:
            async for good in stream:
                streamed.append(good.seq)
    assert streamed == seqs
    assert stream.done is None
    assert_internal(info.value, f"{SUBJECT}: " + message.format(rid=request.request_id))


async def test_the_first_reply_must_be_seq_0(scripted_worker: ScriptedWorker, nc: Client) -> None:
    """A stream that starts past the accept chunk (`seq` 0 lost or never sent)."""
    await scripted_worker(lambda rid: [chunk(rid, 1, "a"), done(rid, 2)], model=MODEL)
    request = make_request()
    with pytest.raises(errors.HybridgenError) as info:
        async with request_stream(nc, request, accept_timeout=BOUND_S):
            pass
    assert_internal(
        info.value,
        f"{SUBJECT}: broken reply sequence for request {request.request_id}: expected seq 0, got 1",
    )


async def test_an_unbroken_script_streams_whole(
    scripted_worker: ScriptedWorker, nc: Client
) -> None:
    """The same stand-in with its replies in order: the stream is read to its `Done`, so the
    failures above come from the replies, not from the stand-in."""

    def script(rid: str) -> list[bytes]:
        return [chunk(rid, 0), chunk(rid, 1, "a"), chunk(rid, 2, "b"), done(rid, 3)]

    await scripted_worker(script, model=MODEL)
    request = make_request()
    async with request_stream(nc, request, accept_timeout=BOUND_S, idle_timeout=BOUND_S) as stream:
        text, finished = await stream.collect()
    assert (text, finished.seq, finished.finish_reason) == ("ab", 3, "stop")
