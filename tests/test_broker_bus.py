"""Bus helpers against a real nats-server: streaming, cancel, timeouts, queue groups."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client

from broker import errors, subjects, wire
from broker.bus import GenerationService, Responder, connect
from broker.server import NatsServer
from broker.streaming import ReplyStream, request_stream
from tests.waits import BOUND_S, eventually

MODEL = "test-model"
SUBJECT = subjects.gen(MODEL)
#: A timeout no test waits out: a stream that waited on it instead hits the test's bound.
NEVER_S = 10 * BOUND_S


def make_request(prompt: str = "hello", **kwargs: Any) -> wire.GenerateRequest:
    return wire.GenerateRequest(
        request_id=wire.new_request_id(), model=MODEL, prompt=prompt, **kwargs
    )


def stream_of(nc: Client, request: wire.GenerateRequest, **options: Any) -> Any:
    """`request_stream` whose accept and idle timeouts are the suite's bound unless a test
    sets its own: only the tests of those timeouts wait on a short one."""
    options = {"accept_timeout": BOUND_S, "idle_timeout": BOUND_S, **options}
    return request_stream(nc, request, **options)


async def forever() -> None:
    """A handler's stall: only a cancel ends it."""
    await asyncio.Event().wait()


async def echo_handler(request: wire.GenerateRequest, responder: Responder) -> None:
    words = (request.prompt or "").split()
    for i, word in enumerate(words):
        await responder.chunk(word + " ", token_ids=[i])
    await responder.done("stop", wire.Usage(prompt_tokens=len(words), completion_tokens=len(words)))


async def test_stream_round_trip(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1") as service:
        async with stream_of(nc, make_request("a b c")) as stream:
            chunks = [chunk async for chunk in stream]
        assert [c.seq for c in chunks] == [0, 1, 2, 3]
        assert "".join(c.text for c in chunks) == "a b c "
        assert stream.done is not None
        assert stream.done.served_by == "w1"
        assert stream.done.seq == 4
        assert stream.done.usage.completion_tokens == 3
        assert service.stats.total_requests == 1


async def test_no_responders_is_known_without_waiting_for_the_accept_timeout(
    nc: Client,
) -> None:
    """The bus answers "no responders" at once: the caller gets `NoResponders`, which only
    that status gives; the accept timeout (the suite's bound) would give `Timeout`."""
    with pytest.raises(errors.HybridgenError) as info:
        async with stream_of(nc, make_request()):
            pass
    assert type(info.value) is errors.NoResponders
    assert (info.value.code, info.value.message) == ("unavailable", f"no worker serves {SUBJECT}")


async def test_accept_timeout(nc: Client) -> None:
    """Something subscribes but never answers: the request reached it, the accept timeout
    fires, and the caller publishes the request's cancel on its way out."""
    received: list[wire.GenerateRequest] = []
    cancels: list[str] = []

    async def silent(msg: Any) -> None:
        received.append(wire.decode(msg.data, wire.GenerateRequest))

    async def on_cancel(msg: Any) -> None:
        cancels.append(msg.subject)

    request = make_request()
    await nc.subscribe(SUBJECT, cb=silent)
    await nc.subscribe(subjects.cancel(request.request_id), cb=on_cancel)
    with pytest.raises(errors.Timeout) as info:
        async with request_stream(nc, request, accept_timeout=0.2):
            pass
    assert info.value.message == (
        f"{SUBJECT}: no worker accepted request {request.request_id} within 0.2 s"
    )
    await eventually(lambda: cancels, "the cancel of the request that was not accepted")
    assert [r.request_id for r in received] == [request.request_id]
    assert cancels == [subjects.cancel(request.request_id)]


async def test_idle_and_total_timeouts(nc: Client) -> None:
    async def stalls(request: wire.GenerateRequest, responder: Responder) -> None:
        await responder.chunk("first")
        await forever()

    async def read(stream: ReplyStream, texts: list[str]) -> None:
        async for chunk in stream:
            texts.append(chunk.text)

    async with GenerationService(nc, model=MODEL, handler=stalls, node_id="w1") as service:
        idle, total = make_request(), make_request()
        texts: list[str] = []
        with pytest.raises(errors.Timeout) as info:
            async with (
                asyncio.timeout(BOUND_S),
                stream_of(nc, idle, accept_timeout=NEVER_S, idle_timeout=0.2) as stream,
            ):
                await read(stream, texts)
        assert texts == ["", "first"]  # accepted, one chunk, then nothing
        assert info.value.message == (
            f"{SUBJECT}: request {idle.request_id} sent nothing for 0.2 s (idle timeout)"
        )
        texts.clear()
        with pytest.raises(errors.Timeout) as info:
            async with (
                asyncio.timeout(BOUND_S),
                stream_of(
                    nc, total, accept_timeout=NEVER_S, idle_timeout=NEVER_S, total_timeout=0.3
                ) as stream,
            ):
                await read(stream, texts)
        assert texts == ["", "first"]
        assert info.value.message == (
            f"{SUBJECT}: request {total.request_id} exceeded its total timeout of 0.3 s"
        )
        # Leaving early published cancels: the worker's tasks end.
        assert await service.wait_idle(BOUND_S)
        assert service.in_flight == 0


async def test_cancel_reaches_worker(nc: Client) -> None:
    """A caller that leaves mid-stream publishes the cancel: the handler, which only a
    cancel ends, is cancelled."""
    cancelled = asyncio.Event()

    async def stalls_after_five(request: wire.GenerateRequest, responder: Responder) -> None:
        try:
            for i in range(5):
                await responder.chunk(f"t{i} ")
            await forever()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with GenerationService(
        nc, model=MODEL, handler=stalls_after_five, node_id="w1"
    ) as service:
        async with stream_of(nc, make_request()) as stream:
            async for chunk in stream:
                if chunk.seq >= 3:
                    break
        await eventually(cancelled.is_set, "the worker's handler cancelled")
        assert await service.wait_idle(BOUND_S)
        assert service.in_flight == 0


async def test_caller_task_cancelled_publishes_cancel(nc: Client) -> None:
    cancelled = asyncio.Event()
    streaming = asyncio.Event()

    async def one_then_stall(request: wire.GenerateRequest, responder: Responder) -> None:
        try:
            await responder.chunk("x")
            await forever()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def consume() -> None:
        async with stream_of(nc, make_request()) as stream:
            async for _ in stream:
                streaming.set()

    async with GenerationService(nc, model=MODEL, handler=one_then_stall, node_id="w1"):
        task = asyncio.create_task(consume())
        await eventually(streaming.is_set, "the first chunk")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(cancelled.is_set, "the worker's handler cancelled")


async def test_coded_errors_and_crashes(nc: Client) -> None:
    async def handler(request: wire.GenerateRequest, responder: Responder) -> None:
        if request.prompt == "long":
            raise errors.ContextLengthExceeded("prompt too long", param="prompt")
        if request.prompt == "crash":
            raise ZeroDivisionError("boom")
        if request.prompt == "forget":
            return
        await responder.done("stop", wire.Usage(prompt_tokens=1, completion_tokens=0))

    async def failure(prompt: str) -> tuple[type, str, str, str | None]:
        with pytest.raises(errors.HybridgenError) as info:
            async with stream_of(nc, make_request(prompt)) as stream:
                await stream.collect()
        exc = info.value
        return type(exc), exc.code.value, exc.message, exc.param

    async with GenerationService(nc, model=MODEL, handler=handler, node_id="w1"):
        assert await failure("long") == (
            errors.ContextLengthExceeded, "context_length_exceeded", "prompt too long", "prompt"
        )  # fmt: skip
        assert await failure("crash") == (
            errors.Internal, "internal", "internal error in the worker (ZeroDivisionError)", None
        )  # fmt: skip
        assert await failure("forget") == (
            errors.Internal,
            "internal",
            "the worker's handler returned without finishing the stream",
            None,
        )
        # Still serving after all that.
        async with stream_of(nc, make_request("ok")) as stream:
            _text, done = await stream.collect()
        assert done.finish_reason == "stop"


async def test_request_timeout_ms_enforced_by_service(nc: Client) -> None:
    async def stalls(request: wire.GenerateRequest, responder: Responder) -> None:
        await forever()

    async with GenerationService(nc, model=MODEL, handler=stalls, node_id="w1") as service:
        with pytest.raises(errors.Timeout) as info:
            async with stream_of(nc, make_request(timeout_ms=100)) as stream:
                await stream.collect()
        assert info.value.message == "request exceeded its timeout of 100 ms"
        assert await service.wait_idle(BOUND_S)


async def bad_reply(nc: Client, payload: bytes) -> wire.Error:
    msg = await nc.request(SUBJECT, payload, timeout=BOUND_S)
    reply = wire.decode_reply(msg.data)
    assert isinstance(reply, wire.Error)
    return reply


async def test_malformed_requests_answer_bad_request(nc: Client) -> None:
    base = {"v": wire.VERSION, "request_id": "r1", "model": MODEL}
    rows: list[tuple[bytes, str, str | None, str | None]] = [
        (b"\xc1\xc1garbage", "malformed msgpack (FormatError: )", None, None),
        (msgpack.packb([1, 2, 3]), "message must be a msgpack map, got list", None, None),
        (msgpack.packb({"v": 1}), "unsupported message version 1 (this node speaks v3)", "v", None),
        (msgpack.packb(base), "exactly one of 'messages' and 'prompt' must be set", None, "r1"),
        (
            msgpack.packb({**base, "prompt": 5}),
            "invalid field 'prompt': Input should be a valid string",
            "prompt",
            "r1",
        ),
        (
            msgpack.packb({**base, "request_id": "a.b", "prompt": "x"}),
            "invalid field 'request_id': use letters, digits, '-' or '_'",
            "request_id",
            "a.b",
        ),
        (b"", "malformed msgpack (ValueError: Unpack failed: incomplete input)", None, None),
        # The request id is echoed whenever the request carries one.
        (
            msgpack.packb({"v": wire.VERSION, "request_id": "r9", "prompt": 1}),
            "missing field 'model'",
            "model",
            "r9",
        ),
    ]
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1"):
        for payload, message, param, request_id in rows:
            reply = await bad_reply(nc, payload)
            assert (reply.code, reply.message, reply.param, reply.request_id, reply.seq) == (
                "bad_request",
                message,
                param,
                request_id,
                None,
            ), payload
        # And it still serves a good one.
        async with stream_of(nc, make_request("still here")) as stream:
            text, _ = await stream.collect()
        assert text == "still here "


async def test_oversized_request_refused(start_nats, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A server that lets 4 MiB messages through: the service refuses what wire does not take.
    config = tmp_path / "big.conf"
    config.write_text("max_payload: 4MB\n")
    server: NatsServer = await start_nats("big", config_file=config)
    client = await connect(server.client_url, name="big")
    try:
        async with GenerationService(client, model=MODEL, handler=echo_handler, node_id="w1"):
            huge = wire.encode(make_request("x" * (2 * 1024 * 1024)))
            reply = await bad_reply(client, huge)
            assert (reply.code, reply.message, reply.param) == (
                "bad_request",
                f"message of {len(huge)} bytes exceeds the limit of {wire.MAX_MESSAGE_BYTES} bytes",
                None,
            )
            async with stream_of(client, make_request("fine")) as stream:
                text, _ = await stream.collect()
            assert text == "fine "
    finally:
        await client.close()


async def test_max_in_flight_overloaded(nc: Client) -> None:
    release = asyncio.Event()

    async def waits(request: wire.GenerateRequest, responder: Responder) -> None:
        await release.wait()
        await responder.done("stop", wire.Usage(prompt_tokens=0, completion_tokens=0))

    async with GenerationService(
        nc, model=MODEL, handler=waits, node_id="w1", max_in_flight=1
    ) as service:
        async with stream_of(nc, make_request()) as first:
            with pytest.raises(errors.Overloaded) as info:
                async with stream_of(nc, make_request()):
                    pass
            assert (info.value.message, info.value.retry_after) == (
                "w1 has 1 requests in flight",
                1.0,
            )
            release.set()
            await first.collect()
        assert await service.wait_idle(BOUND_S)


async def test_queue_group_shares_load(nats_url: str, nc: Client) -> None:
    served: Counter[str] = Counter()

    def handler_for(node: str):  # type: ignore[no-untyped-def]
        async def handler(request: wire.GenerateRequest, responder: Responder) -> None:
            served[node] += 1
            await responder.done("stop", wire.Usage(prompt_tokens=0, completion_tokens=0))

        return handler

    worker_nc = await connect(nats_url, name="w2")
    try:
        async with (
            GenerationService(nc, model=MODEL, handler=handler_for("w1"), node_id="w1"),
            GenerationService(worker_nc, model=MODEL, handler=handler_for("w2"), node_id="w2"),
        ):
            requester = await connect(nats_url, name="requester")
            try:

                async def one() -> str:
                    async with stream_of(requester, make_request()) as stream:
                        _, done = await stream.collect()
                    return done.served_by or ""

                results = await asyncio.gather(*(one() for _ in range(60)))
            finally:
                await requester.close()
    finally:
        await worker_nc.close()
    # Each request served once, by one of the two; both took a share (a queue group picks
    # at random: one getting fewer than 10 of 60 has a chance below 1e-8).
    assert Counter(results) == served and sum(served.values()) == 60
    assert served["w1"] >= 10 and served["w2"] >= 10, served


async def test_drain_and_resume(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1") as service:
        await service.stop_accepting()
        with pytest.raises(errors.NoResponders):
            async with stream_of(nc, make_request()):
                pass
        await service.resume()
        async with stream_of(nc, make_request("back")) as stream:
            text, _ = await stream.collect()
        assert text == "back "


async def test_micro_discovery_lists_service(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1"):
        msg = await nc.request("$SRV.INFO.hybridgen-cloud", b"", timeout=BOUND_S)
    info = json.loads(msg.data)
    assert (info["name"], info["metadata"]) == (
        "hybridgen-cloud",
        {"node_id": "w1", "model": MODEL},
    )
    assert info["endpoints"] == [
        {
            "name": "generate",
            "subject": SUBJECT,
            "queue_group": "cloud.test-model",
            "metadata": {"model": MODEL},
        }
    ]


async def test_connect_fails_on_the_refusal_without_server() -> None:
    """A refused connection fails the connect on the refusal: a connect that waited for its
    connect timeout (one no test waits out) would hit the test's bound instead."""
    with pytest.raises(errors.HybridgenError) as info:
        async with asyncio.timeout(BOUND_S):
            await connect("nats://127.0.0.1:1", name="nobody", connect_timeout=NEVER_S)
    assert type(info.value) is errors.Unavailable
    assert info.value.message == (
        "cannot connect to NATS at nats://127.0.0.1:1 (ConnectionRefusedError: "
        "[Errno 111] Connect call failed ('127.0.0.1', 1))"
    )


async def test_service_and_client_survive_broker_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = NatsServer(store_dir=tmp_path / "nats")
    await first.start()
    port = int(first.client_url.rsplit(":", 1)[1])
    worker = await connect(first.client_url, name="worker")
    client = await connect(first.client_url, name="client")
    second = NatsServer(store_dir=tmp_path / "nats", port=port)
    try:
        async with GenerationService(worker, model=MODEL, handler=echo_handler, node_id="w1"):
            async with stream_of(client, make_request("before")) as stream:
                assert (await stream.collect())[0] == "before "
            await first.shutdown()
            await second.start()

            async def served_after() -> str | None:
                # Until both have reconnected and the worker re-subscribed: no responders,
                # or a request lost on the way (its accept timeout ends that try).
                try:
                    async with stream_of(client, make_request("after"), accept_timeout=2) as s:
                        return (await s.collect())[0]
                except (errors.NoResponders, errors.Timeout):
                    return None

            assert await eventually(served_after, "a request served after the restart") == (
                "after "
            )
    finally:
        await client.close()
        await worker.close()
        await second.shutdown()
        await first.shutdown()


async def test_request_too_big_for_the_bus_is_bad_request(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1"):
        request = make_request("x" * (nc.max_payload + 10))
        size = len(wire.encode(request))
        with pytest.raises(errors.BadRequest) as info:
            async with stream_of(nc, request):
                pass
    assert (info.value.message, info.value.param) == (
        f"request of {size} bytes exceeds the bus limit of {nc.max_payload} bytes",
        "prompt",
    )


async def test_closed_connection_is_unavailable(nats_url: str) -> None:
    client = await connect(nats_url, name="closing")
    await client.close()
    with pytest.raises(errors.Unavailable) as info:
        async with stream_of(client, make_request()):
            pass
    assert info.value.message == "the bus connection is not usable (nats: connection closed)"


async def test_connect_settings(nats_url: str) -> None:
    from broker.bus import connect_settings
    from broker.settings import BusSettings

    client = await connect_settings(BusSettings(url=nats_url), name="from-settings")
    try:
        assert client.is_connected
    finally:
        await client.close()
    with pytest.raises(errors.Unavailable):
        await connect_settings(
            BusSettings(url="nats://127.0.0.1:1", connect_timeout_s=0.5), name="nowhere"
        )


async def test_worker_reachable_right_after_resubscribing(nats_url: str, nc: Client) -> None:
    # A worker that leaves and comes back (restart, drain + resume) is found by the very
    # next request: no spurious no-responders.
    worker = await connect(nats_url, name="worker")
    try:
        for _ in range(100):
            async with (
                GenerationService(worker, model=MODEL, handler=echo_handler, node_id="w"),
                stream_of(nc, make_request("x")) as stream,
            ):
                await stream.collect()
    finally:
        await worker.close()
