"""Bus helpers against a real nats-server: streaming, cancel, timeouts, queue groups."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import msgpack
import pytest
from nats.aio.client import Client

from broker import errors, subjects, wire
from broker.bus import GenerationService, Responder, connect
from broker.server import NatsServer
from broker.streaming import request_stream

MODEL = "test-model"


def make_request(prompt: str = "hello", **kwargs: object) -> wire.GenerateRequest:
    return wire.GenerateRequest(
        request_id=wire.new_request_id(), model=MODEL, prompt=prompt, **kwargs
    )


async def echo_handler(request: wire.GenerateRequest, responder: Responder) -> None:
    words = request.prompt.split()
    for i, word in enumerate(words):
        await responder.chunk(word + " ", token_ids=[i])
    await responder.done("stop", wire.Usage(prompt_tokens=len(words), completion_tokens=len(words)))


async def test_stream_round_trip(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1") as service:
        async with request_stream(nc, make_request("a b c")) as stream:
            chunks = [chunk async for chunk in stream]
        assert [c.seq for c in chunks] == [0, 1, 2, 3]
        assert "".join(c.text for c in chunks) == "a b c "
        assert stream.done is not None
        assert stream.done.served_by == "w1"
        assert stream.done.seq == 4
        assert stream.done.usage.completion_tokens == 3
        assert service.stats.total_requests == 1


async def test_no_responders_is_immediate(nc: Client) -> None:
    started = time.perf_counter()
    with pytest.raises(errors.NoResponders):
        async with request_stream(nc, make_request(), accept_timeout=5.0):
            pass
    assert time.perf_counter() - started < 0.5


async def test_accept_timeout(nc: Client) -> None:
    # Something subscribes but never answers: the accept timeout fires.
    async def silent(msg: object) -> None:
        pass

    await nc.subscribe(subjects.gen(MODEL), cb=silent)
    started = time.perf_counter()
    with pytest.raises(errors.Timeout, match="accepted"):
        async with request_stream(nc, make_request(), accept_timeout=0.2):
            pass
    assert 0.15 < time.perf_counter() - started < 2


async def test_idle_and_total_timeouts(nc: Client) -> None:
    async def stalls(request: wire.GenerateRequest, responder: Responder) -> None:
        await responder.chunk("first")
        await asyncio.sleep(30)

    async with GenerationService(nc, model=MODEL, handler=stalls, node_id="w1") as service:
        with pytest.raises(errors.Timeout, match="idle"):
            async with request_stream(nc, make_request(), idle_timeout=0.2) as stream:
                async for _ in stream:
                    pass
        with pytest.raises(errors.Timeout, match="total"):
            async with request_stream(
                nc, make_request(), idle_timeout=5, total_timeout=0.3
            ) as stream:
                async for _ in stream:
                    pass
        # Leaving early published cancels: the worker's tasks end.
        assert await service.wait_idle(2.0)


async def test_cancel_reaches_worker(nc: Client) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(request: wire.GenerateRequest, responder: Responder) -> None:
        try:
            for i in range(1000):
                await responder.chunk(f"t{i} ")
                started.set()
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with GenerationService(nc, model=MODEL, handler=slow, node_id="w1") as service:
        async with request_stream(nc, make_request()) as stream:
            async for chunk in stream:
                if chunk.seq >= 3:
                    break
        await asyncio.wait_for(cancelled.wait(), 2)
        assert await service.wait_idle(2.0)
        assert service.in_flight == 0


async def test_caller_task_cancelled_publishes_cancel(nc: Client) -> None:
    cancelled = asyncio.Event()
    streaming = asyncio.Event()

    async def slow(request: wire.GenerateRequest, responder: Responder) -> None:
        try:
            while True:
                await responder.chunk("x")
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def consume() -> None:
        async with request_stream(nc, make_request()) as stream:
            async for _ in stream:
                streaming.set()

    async with GenerationService(nc, model=MODEL, handler=slow, node_id="w1"):
        task = asyncio.create_task(consume())
        await asyncio.wait_for(streaming.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(cancelled.wait(), 2)


async def test_coded_errors_and_crashes(nc: Client) -> None:
    async def handler(request: wire.GenerateRequest, responder: Responder) -> None:
        if request.prompt == "long":
            raise errors.ContextLengthExceeded("prompt too long", param="prompt")
        if request.prompt == "crash":
            raise ZeroDivisionError("boom")
        if request.prompt == "forget":
            return
        await responder.done("stop", wire.Usage(prompt_tokens=1, completion_tokens=0))

    async with GenerationService(nc, model=MODEL, handler=handler, node_id="w1"):
        with pytest.raises(errors.ContextLengthExceeded) as info:
            async with request_stream(nc, make_request("long")) as stream:
                await stream.collect()
        assert info.value.param == "prompt"
        with pytest.raises(errors.Internal, match="ZeroDivisionError"):
            async with request_stream(nc, make_request("crash")) as stream:
                await stream.collect()
        with pytest.raises(errors.Internal, match="without finishing"):
            async with request_stream(nc, make_request("forget")) as stream:
                await stream.collect()
        # Still serving after all that.
        async with request_stream(nc, make_request("ok")) as stream:
            _text, done = await stream.collect()
        assert done.finish_reason == "stop"


async def test_request_timeout_ms_enforced_by_service(nc: Client) -> None:
    async def slow(request: wire.GenerateRequest, responder: Responder) -> None:
        await asyncio.sleep(10)

    async with GenerationService(nc, model=MODEL, handler=slow, node_id="w1"):
        with pytest.raises(errors.Timeout, match="100 ms"):
            async with request_stream(nc, make_request(timeout_ms=100)) as stream:
                await stream.collect()


async def bad_reply(nc: Client, payload: bytes) -> wire.Error:
    msg = await nc.request(subjects.gen(MODEL), payload, timeout=2)
    reply = wire.decode_reply(msg.data)
    assert isinstance(reply, wire.Error)
    return reply


async def test_malformed_requests_answer_bad_request(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1"):
        for payload, fragment in [
            (b"\xc1\xc1garbage", "malformed msgpack"),
            (msgpack.packb([1, 2, 3]), "msgpack map"),
            (msgpack.packb({"v": 1}), "version"),
            (msgpack.packb({"v": wire.VERSION, "request_id": "r1", "model": MODEL}), "prompt"),
            (
                msgpack.packb({"v": wire.VERSION, "request_id": "r1", "model": MODEL, "prompt": 5}),
                "prompt",
            ),
            (
                msgpack.packb(
                    {"v": wire.VERSION, "request_id": "a.b", "model": MODEL, "prompt": "x"}
                ),
                "request_id",
            ),
            (b"", "malformed"),
        ]:
            reply = await bad_reply(nc, payload)
            assert reply.code == "bad_request", payload
            assert fragment in reply.message, (payload, reply.message)
        reply = await bad_reply(
            nc, msgpack.packb({"v": wire.VERSION, "request_id": "r9", "prompt": 1})
        )
        assert reply.request_id == "r9"
        # And it still serves a good one.
        async with request_stream(nc, make_request("still here")) as stream:
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
            assert reply.code == "bad_request"
            assert "exceeds the limit" in reply.message
            async with request_stream(client, make_request("fine")) as stream:
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
        async with request_stream(nc, make_request()) as first:
            with pytest.raises(errors.Overloaded) as info:
                async with request_stream(nc, make_request()):
                    pass
            assert info.value.retry_after == 1.0
            release.set()
            await first.collect()
        assert await service.wait_idle(1)


async def test_queue_group_shares_load(nats_url: str, nc: Client) -> None:
    served: Counter[str] = Counter()

    def handler_for(node: str):  # type: ignore[no-untyped-def]
        async def handler(request: wire.GenerateRequest, responder: Responder) -> None:
            served[node] += 1
            await asyncio.sleep(0.005)
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
                    async with request_stream(requester, make_request()) as stream:
                        _, done = await stream.collect()
                    return done.served_by or ""

                results = await asyncio.gather(*(one() for _ in range(60)))
            finally:
                await requester.close()
    finally:
        await worker_nc.close()
    assert Counter(results) == served
    assert served["w1"] >= 10 and served["w2"] >= 10, served


async def test_drain_and_resume(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1") as service:
        await service.stop_accepting()
        with pytest.raises(errors.NoResponders):
            async with request_stream(nc, make_request()):
                pass
        await service.resume()
        async with request_stream(nc, make_request("back")) as stream:
            text, _ = await stream.collect()
        assert text == "back "


async def test_micro_discovery_lists_service(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1"):
        msg = await nc.request("$SRV.INFO.hybridgen-cloud", b"", timeout=2)
        assert b'"hg.gen.test-model"' in msg.data
        assert b'"cloud.test-model"' in msg.data


async def test_connect_fails_fast_without_server() -> None:
    started = time.perf_counter()
    with pytest.raises(errors.Unavailable):
        await connect("nats://127.0.0.1:1", name="nobody")
    assert time.perf_counter() - started < 2.5


async def test_service_and_client_survive_broker_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = NatsServer(store_dir=tmp_path / "nats")
    await first.start()
    port = int(first.client_url.rsplit(":", 1)[1])
    worker = await connect(first.client_url, name="worker")
    client = await connect(first.client_url, name="client")
    second = NatsServer(store_dir=tmp_path / "nats", port=port)
    try:
        async with GenerationService(worker, model=MODEL, handler=echo_handler, node_id="w1"):
            async with request_stream(client, make_request("before")) as stream:
                assert (await stream.collect())[0] == "before "
            await first.shutdown()
            await second.start()
            deadline = time.monotonic() + 10
            while True:
                try:
                    async with request_stream(client, make_request("after")) as stream:
                        text, _ = await stream.collect()
                    break
                except (errors.NoResponders, errors.Timeout):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            assert text == "after "
    finally:
        await client.close()
        await worker.close()
        await second.shutdown()
        await first.shutdown()


async def test_request_too_big_for_the_bus_is_bad_request(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo_handler, node_id="w1"):
        with pytest.raises(errors.BadRequest, match="exceeds the bus limit"):
            async with request_stream(nc, make_request("x" * (nc.max_payload + 10))):
                pass


async def test_closed_connection_is_unavailable(nats_url: str) -> None:
    client = await connect(nats_url, name="closing")
    await client.close()
    with pytest.raises(errors.Unavailable):
        async with request_stream(client, make_request()):
            pass


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
                request_stream(nc, make_request("x")) as stream,
            ):
                await stream.collect()
    finally:
        await worker.close()


def test_micro_request_reply_subject() -> None:
    """nats.micro hides a request's reply subject; the one adapter that reads it must notice
    an upgrade that moves it (and the pin in pyproject.toml says why)."""
    from nats.aio.msg import Msg
    from nats.micro.request import Request

    from broker.service import reply_subject

    with_reply = Request(Msg(_client=None, subject="hg.gen.m", reply="_INBOX.a.b", data=b""))  # type: ignore[arg-type]
    assert reply_subject(with_reply) == "_INBOX.a.b"
    assert reply_subject(Request(Msg(_client=None, subject="hg.gen.m", reply="", data=b""))) is None  # type: ignore[arg-type]
