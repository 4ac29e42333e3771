"""OpenTelemetry traces across a real edge, real cloud workers and the real cloud API, sent
by the standard OTLP/HTTP exporter to a real OTLP/HTTP receiver in this process
(`tests.fixtures_otlp`); every test waits on "the receiver has these spans" with one
generous bound.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import Responder
from edge.route.rules import Reason
from edge.settings import EdgeSettings
from fleet.experiment import CONTROL
from hybridgen.fleet import run as fleet
from serving import tracing
from tests.fixtures_cloud import LONG_CACHE_TOKENS, serve_cloud_api
from tests.fixtures_edge import ADMIN_HEADERS, ADMIN_KEY, serve_edge, stand_in
from tests.fixtures_otlp import CLIENT, SERVER, STATUS_ERROR, OtlpReceiver
from tests.waits import eventually
from tui.trace import summary_of

pytestmark = pytest.mark.slow

PROMPT = "Permission is hereby granted"
#: A caller's own trace context (W3C `traceparent`), and its `tracestate`.
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
TRACESTATE = "vendor=hybridgen-test"


@pytest.fixture
async def events(nc: Client) -> AsyncIterator[list[wire.Event]]:
    """Every event published on the bus while the test runs."""
    seen: list[wire.Event] = []

    async def on_event(msg: Any) -> None:
        seen.append(wire.decode(msg.data, wire.Event))

    sub = await nc.subscribe(subjects.EVENTS_ALL, cb=on_event)
    await nc.flush()
    try:
        yield seen
    finally:
        await sub.unsubscribe()


def completion(route: str = "cloud", **fields: Any) -> dict[str, Any]:
    return {"model": "hg-edge", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            "route": route, **fields}  # fmt: skip


def http_of(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=60.0)


EDGE, WORKER, API = tracing.EDGE, tracing.WORKER, tracing.CLOUD_API
OP = "text_completion"
POST = "POST /v1/completions"


# --------------------------------------------------------------------------------- tests


async def test_one_trace_from_the_edge_to_the_worker_and_back(
    otlp: OtlpReceiver,
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
    events: list[wire.Event],
) -> None:
    worker = await start_worker()
    edge = await start_edge()
    async with http_of(edge.url) as http:
        response = await http.post("/v1/completions", json=completion())
    assert response.status_code == 200, response.text
    body = response.json()
    trace_id, request_id = response.headers["X-Trace-Id"], response.headers["X-Request-Id"]
    assert len(trace_id) == 32
    found = await otlp.trace(trace_id, (EDGE, "POST /v1/completions"),
                             (WORKER, "hybridgen.decode"))  # fmt: skip

    server = found.one(EDGE, "POST /v1/completions")
    assert (server.parent_id, server.kind) == ("", SERVER)
    assert server.attributes["hybridgen.request_id"] == request_id
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/completions"

    answer = found.one(EDGE, f"{OP} hg-edge", parent=server)
    usage = body["usage"]
    assert answer.attributes == {
        "gen_ai.operation.name": OP,
        "gen_ai.provider.name": "hybridgen",
        "gen_ai.request.model": "hg-edge",
        "gen_ai.request.max_tokens": 8,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 1.0,
        "hybridgen.request_id": request_id,
        "hybridgen.served_by": "cloud",
        "hybridgen.route_reason": Reason.REQUESTED_CLOUD.value,
        "gen_ai.response.finish_reasons": [body["choices"][0]["finish_reason"]],
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
    }
    route, hop = found.children(answer)
    assert route.name == "hybridgen.route"
    assert route.attributes["hybridgen.route_reason"] == Reason.REQUESTED_CLOUD.value
    assert (hop.name, hop.kind) == (f"{OP} hg-cloud", CLIENT)
    assert hop.attributes["hybridgen.worker"] == worker.node_id

    served = found.one(WORKER, f"{OP} hg-cloud")
    assert (served.parent_id, served.kind) == (hop.span_id, SERVER)
    assert served.attributes["hybridgen.served_by"] == worker.node_id
    assert served.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert served.attributes["hybridgen.request_id"] == request_id
    queued, prefill, decode = found.children(served)
    assert [s.name for s in (queued, prefill, decode)] == [
        "hybridgen.queue_wait", "hybridgen.prefill", "hybridgen.decode"
    ]  # fmt: skip
    # The scheduler's own times: admitted, then prefilled (a prefill takes time).
    assert queued.end_ns == prefill.start_ns and prefill.end_ns == decode.start_ns
    assert queued.start_ns <= queued.end_ns < prefill.end_ns
    assert served.start_ns <= queued.start_ns and decode.end_ns <= served.end_ns

    # The request id leads to the trace: both hops' `request` events carry its id.
    def traced() -> dict[str, Any]:
        return {e.role: e.data.get("trace_id") for e in events if e.kind == "request"}

    assert await eventually(lambda: len(traced()) == 2 and traced())
    assert traced() == {"edge": trace_id, "cloud": trace_id}
    assert f"trace {trace_id}" in summary_of(request_id, events)


async def test_the_worker_answers_with_its_own_span_in_the_reply_headers(
    otlp: OtlpReceiver, nc: Client, start_worker: Callable[..., Any]
) -> None:
    """A bus client's `traceparent` is continued by the worker; each reply names the
    worker's span (same trace, the worker's span id)."""
    await start_worker()
    request = wire.GenerateRequest(request_id=wire.new_request_id(), model="hg-cloud",
                                   prompt=PROMPT, max_tokens=3, temperature=0)  # fmt: skip
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.gen("hg-cloud"), wire.encode(request), reply=inbox,
                     headers={"traceparent": TRACEPARENT})  # fmt: skip
    replies = []
    while not replies or isinstance(replies[-1][0], wire.Chunk):
        msg = await sub.next_msg(timeout=60)
        replies.append((wire.decode_reply(msg.data), msg.headers or {}))
    assert isinstance(replies[-1][0], wire.Done)
    found = await otlp.trace(CALLER_TRACE, (WORKER, f"{OP} hg-cloud"))
    served = found.one(WORKER, f"{OP} hg-cloud")
    assert served.parent_id == CALLER_SPAN
    worker_context = f"00-{CALLER_TRACE}-{served.span_id}-01"
    assert [headers.get("traceparent") for _, headers in replies] == [worker_context] * len(replies)


async def test_a_callers_traceparent_is_continued_through_the_cloud_api(
    otlp: OtlpReceiver, nats_url: str, start_worker: Callable[..., Any]
) -> None:
    await start_worker()
    headers = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    chat = {"model": "hg-cloud", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 6, "temperature": 0}  # fmt: skip
    async with serve_cloud_api(nats_url) as url, http_of(url) as http:
        response = await http.post("/v1/chat/completions", json=chat, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["X-Trace-Id"] == CALLER_TRACE
    found = await otlp.trace(CALLER_TRACE, (API, "POST /v1/chat/completions"),
                             (WORKER, "hybridgen.decode"))  # fmt: skip
    server = found.one(API, "POST /v1/chat/completions")
    assert server.parent_id == CALLER_SPAN
    asked = found.one(API, "chat hg-cloud", parent=server)
    assert asked.kind == CLIENT
    served = found.one(WORKER, "chat hg-cloud", parent=asked)
    assert served.attributes["gen_ai.operation.name"] == "chat"
    assert served.trace_state == TRACESTATE
    request_id = response.headers["X-Request-Id"]
    assert {s.attributes["hybridgen.request_id"] for s in (server, asked, served)} == {request_id}


async def test_a_fallback_keeps_the_worker_and_the_local_answer_in_one_trace(
    otlp: OtlpReceiver, start_edge: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    """A worker whose engine stopped refuses (`unavailable`): the edge answers locally."""
    worker = await start_worker()
    await asyncio.to_thread(worker.engine.close)
    edge = await start_edge()
    async with http_of(edge.url) as http:
        response = await http.post("/v1/completions", json=completion(),
                                   headers={"traceparent": TRACEPARENT})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["route_reason"] == Reason.CLOUD_UNAVAILABLE.value
    found = await otlp.trace(CALLER_TRACE, (EDGE, "POST /v1/completions"),
                             (WORKER, f"{OP} hg-cloud"))  # fmt: skip
    server = found.one(EDGE, "POST /v1/completions")
    assert server.parent_id == CALLER_SPAN
    answer = found.one(EDGE, f"{OP} hg-edge", parent=server)
    assert answer.attributes["hybridgen.served_by"] == "edge"
    assert answer.attributes["hybridgen.route_reason"] == Reason.CLOUD_UNAVAILABLE.value
    route, hop, local = found.children(answer)
    assert route.name == "hybridgen.route"
    assert (hop.name, hop.kind, hop.status) == (f"{OP} hg-cloud", CLIENT, STATUS_ERROR)
    assert hop.attributes["error.type"] == "unavailable"
    refused = found.one(WORKER, f"{OP} hg-cloud", parent=hop)
    assert (refused.status, refused.attributes["error.type"]) == (STATUS_ERROR, "unavailable")
    assert found.children(refused) == []  # refused before it reached the engine
    assert (local.name, local.attributes["hybridgen.served_by"]) == (f"{OP} hg-edge", "edge")
    assert (
        local.attributes["gen_ai.usage.output_tokens"]
        == (response.json()["usage"]["completion_tokens"])
    )
    assert hop.end_ns <= local.start_ns


async def test_an_answer_finished_locally_after_a_mid_stream_failure_is_one_trace(
    otlp: OtlpReceiver, start_edge: Callable[..., Any], nats_url: str
) -> None:
    """A stand-in worker fails after two chunks (no real worker fails on demand): the bus
    request's span ends in error, the edge's finishing generation follows it."""

    async def crashing(request: wire.GenerateRequest, responder: Responder) -> None:
        await responder.chunk(text=" one", token_ids=[1])
        await responder.chunk(text=" two", token_ids=[2])
        raise RuntimeError("boom")

    async with stand_in(nats_url, crashing):
        edge = await start_edge()
        async with http_of(edge.url) as http:
            response = await http.post("/v1/completions", json=completion(max_tokens=16))
    assert response.status_code == 200, response.text
    found = await otlp.trace(response.headers["X-Trace-Id"], (EDGE, "POST /v1/completions"))
    answer = found.one(EDGE, f"{OP} hg-edge", parent=found.one(EDGE, "POST /v1/completions"))
    assert answer.attributes["hybridgen.completed_locally"] is True
    assert answer.attributes["hybridgen.served_by"] == "cloud"
    route, hop, local = found.children(answer)
    assert (route.name, hop.name, local.name) == ("hybridgen.route", f"{OP} hg-cloud",
                                                  f"{OP} hg-edge")  # fmt: skip
    assert (hop.status, hop.attributes["error.type"]) == (STATUS_ERROR, "internal")
    assert local.attributes["hybridgen.served_by"] == "edge"
    assert hop.end_ns <= local.start_ns


async def test_an_error_at_the_worker_is_on_every_span_of_its_path(
    otlp: OtlpReceiver, start_edge: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    """More tokens than the cloud's window: the worker refuses, the client gets a 400."""
    await start_worker()
    edge = await start_edge()
    async with http_of(edge.url) as http:
        response = await http.post("/v1/completions", json=completion(max_tokens=5000))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"
    trace_id = response.headers["X-Trace-Id"]
    found = await otlp.trace(trace_id, (EDGE, "POST /v1/completions"),
                             (WORKER, f"{OP} hg-cloud"))  # fmt: skip
    server = found.one(EDGE, "POST /v1/completions")
    assert server.attributes["http.response.status_code"] == 400
    answer = found.one(EDGE, f"{OP} hg-edge", parent=server)
    hop = found.one(EDGE, f"{OP} hg-cloud", parent=answer)
    refused = found.one(WORKER, f"{OP} hg-cloud", parent=hop)
    for span in (answer, hop, refused):
        assert (span.status, span.attributes["error.type"]) == (
            STATUS_ERROR,
            "context_length_exceeded",
        ), span.name


async def test_a_cancelled_request_ends_its_spans_on_every_hop(
    otlp: OtlpReceiver,
    start_edge: Callable[..., Any],
    start_cloud_worker: Callable[..., Any],
    cloud_long_model: Path,
) -> None:
    """The client leaves after the first text of a long answer: the worker stops it."""
    worker = await start_cloud_worker(cloud_long_model, cache_tokens=LONG_CACHE_TOKENS)
    edge = await start_edge()
    payload = completion(prompt="Hello", max_tokens=4000, stream=True)  # no end token
    http = http_of(edge.url)
    async with http, http.stream("POST", "/v1/completions", json=payload) as response:
        assert response.status_code == 200
        trace_id = response.headers["X-Trace-Id"]
        async for line in response.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # leave with the answer running
    found = await otlp.trace(trace_id, (EDGE, "POST /v1/completions"),
                             (WORKER, f"{OP} hg-cloud"))  # fmt: skip
    server = found.one(EDGE, "POST /v1/completions")
    answer = found.one(EDGE, f"{OP} hg-edge", parent=server)
    hop = found.one(EDGE, f"{OP} hg-cloud", parent=answer)
    served = found.one(WORKER, f"{OP} hg-cloud", parent=hop)
    for span in (answer, hop, served):
        assert span.attributes.get("hybridgen.cancelled") is True, span.name
        assert "gen_ai.usage.output_tokens" not in span.attributes, span.name
    decode = found.one(WORKER, "hybridgen.decode", parent=served)
    assert decode.end_ns <= served.end_ns
    assert worker.admitted == 0


async def test_an_ab_variant_is_on_the_answers_span(
    otlp: OtlpReceiver,
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
    nats_url: str,
) -> None:
    """Each arm of an A/B experiment is named on its answers' spans (`hybridgen.variant`)."""
    await start_worker(model="hg-cloud-b")  # the variant's model; the control's is local
    edge = await start_edge()
    start = ["experiment", "start", "ab-trace", "--variant", "treatment", "--share", "0.5",
             "--cloud-model", "hg-cloud-b", "--nats-url", nats_url]  # fmt: skip
    assert await fleet(start) == 0
    experiment = await eventually(lambda: edge.node.experiments.experiment)
    arms = {experiment.assign(f"user-{i}") is None: f"user-{i}" for i in range(100)}
    answers, hops = {}, {}
    async with http_of(edge.url) as http:
        for arm, user, route in (("treatment", arms[False], "cloud"),
                                 (CONTROL, arms[True], "edge")):  # fmt: skip
            response = await http.post("/v1/completions", json=completion(route, user=user),
                                       headers=ADMIN_HEADERS)  # fmt: skip
            assert response.status_code == 200, response.text
            assert response.json()["variant"] == arm
            found = await otlp.trace(response.headers["X-Trace-Id"], (EDGE, POST),
                                     (EDGE, f"{OP} hg-edge"))  # fmt: skip
            answers[arm] = found.one(EDGE, f"{OP} hg-edge", parent=found.one(EDGE, POST))
            hops[arm] = [s.name for s in found.children(answers[arm])]
    shown = {arm: (s.attributes["hybridgen.variant"], s.attributes["hybridgen.served_by"])
             for arm, s in answers.items()}  # fmt: skip
    assert shown == {"treatment": ("treatment", "cloud"), CONTROL: (CONTROL, "edge")}
    # The variant's answer went to the variant's model; the control's was made locally.
    assert hops == {"treatment": ["hybridgen.route", f"{OP} hg-cloud-b"],
                    CONTROL: ["hybridgen.route", f"{OP} hg-edge"]}  # fmt: skip


@pytest.mark.parametrize("opted_in", [False, True], ids=["default", "opted-in"])
async def test_spans_carry_the_text_only_when_the_operator_opts_in(
    opted_in: bool,
    otlp: OtlpReceiver,
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "the zanzibar marmalade recipe"
    if opted_in:
        monkeypatch.setenv("HG_TRACE_CONTENT", "1")
    await start_worker()
    edge = await start_edge()
    chat = {"model": "hg-edge", "messages": [{"role": "user", "content": secret}],
            "max_tokens": 6, "temperature": 0, "route": "cloud"}  # fmt: skip
    async with http_of(edge.url) as http:
        response = await http.post("/v1/chat/completions", json=chat)
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["message"]["content"]
    found = await otlp.trace(response.headers["X-Trace-Id"], (EDGE, "POST /v1/chat/completions"),
                             (WORKER, "hybridgen.decode"))  # fmt: skip
    answer = found.one(EDGE, "chat hg-edge")
    served = found.one(WORKER, "chat hg-cloud")
    carrying = sorted(s.name for s in found.spans if secret in json.dumps(s.attributes))
    if not opted_in:
        assert carrying == []
        assert "gen_ai.output.messages" not in answer.attributes
        return
    assert carrying == ["chat hg-cloud", "chat hg-edge"]
    asked = [{"role": "user", "parts": [{"type": "text", "content": secret}]}]
    assert json.loads(answer.attributes["gen_ai.input.messages"]) == asked
    assert json.loads(served.attributes["gen_ai.input.messages"]) == asked
    finish = response.json()["choices"][0]["finish_reason"]
    assert json.loads(answer.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": text}],
         "finish_reason": finish}
    ]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_the_cloud_apis_span_carries_the_answer_when_opted_in(
    stream: bool,
    otlp: OtlpReceiver,
    nats_url: str,
    start_worker: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HG_TRACE_CONTENT", "1")
    await start_worker()
    chat = {"model": "hg-cloud", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 6, "temperature": 0, "stream": stream}  # fmt: skip
    async with serve_cloud_api(nats_url) as url, http_of(url) as http:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=chat) as response:
                assert response.status_code == 200
                lines = [line async for line in response.aiter_lines()]
            chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            choices = [c["choices"][0] for c in chunks if c["choices"]]
            text = "".join(c["delta"].get("content") or "" for c in choices)
            (finish,) = [c["finish_reason"] for c in choices if c["finish_reason"]]
        else:
            response = await http.post("/v1/chat/completions", json=chat)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            text, finish = choice["message"]["content"], choice["finish_reason"]
    assert text
    found = await otlp.trace(response.headers["X-Trace-Id"], (API, "chat hg-cloud"))
    asked = found.one(API, "chat hg-cloud")
    assert json.loads(asked.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": text}],
         "finish_reason": finish}
    ]  # fmt: skip
    assert json.loads(asked.attributes["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}]  # fmt: skip


async def test_nothing_is_exported_without_an_endpoint(
    otlp_receiver: OtlpReceiver,
    start_worker: Callable[..., Any],
    edge_dir: Path,
    nats_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tracing off: no span leaves, yet a caller's trace context still travels on."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    worker = await start_worker()
    settings = EdgeSettings(model_dir=edge_dir, nats_url=nats_url, node_id="edge-untraced",
                            users_db=tmp_path / "users.sqlite3", threads=1,
                            user_keys=[f"{ADMIN_KEY}@*"])  # fmt: skip
    async with serve_edge(settings) as edge, http_of(edge.url) as http:
        plain = await http.post("/v1/completions", json=completion())
        continued = await http.post("/v1/completions", json=completion(),
                                    headers={"traceparent": TRACEPARENT})  # fmt: skip
        assert tracing.tracer(EDGE) is tracing.tracer(WORKER)  # both the no-op tracer
    await worker.close()  # both services stopped: what they would have sent is sent
    assert (plain.status_code, continued.status_code) == (200, 200)
    assert "X-Trace-Id" not in plain.headers
    assert continued.headers["X-Trace-Id"] == CALLER_TRACE
    # The marker: one span sent after the services stopped; the receiver got it alone.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    assert tracing.start("hybridgen-marker")
    tracing.tracer("hybridgen-marker").start_span("marker").end()
    await tracing.stop("hybridgen-marker", timeout_s=30.0)
    await eventually(lambda: otlp_receiver.spans, "the marker span")
    assert [s.name for s in otlp_receiver.spans] == ["marker"]
    assert otlp_receiver.requests == 1


async def test_a_collector_that_never_answers_does_not_hold_up_a_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A collector that reads the exporter's request and does not answer: the service stops."""
    held: list[asyncio.StreamWriter] = []
    got = bytearray()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while chunk := await reader.read(65536):
            got.extend(chunk)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{host}:{port}")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "120")  # the exporter alone would wait
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # the span leaves at the stop
    service = "hybridgen-silent-collector"
    try:
        assert tracing.start(service)
        tracing.tracer(service).start_span("last words").end()
        # Generous around its 1 s (`tracing.FLUSH_BOUND_S`), below the SDK's own 30 s wait.
        async with asyncio.timeout(15.0):
            await tracing.stop(service)
        await eventually(lambda: b"POST /v1/traces" in got, "the exporter's request was sent")
        # The collector answers at last: the SDK's thread ends here, not in a later test.
        for writer in held:  # an empty `ExportTraceServiceResponse`
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await eventually(lambda: all(t.name != f"otel-stop-{service}"
                                     for t in threading.enumerate()))  # fmt: skip
    finally:
        for writer in held:
            writer.close()
        server.close()


def test_the_consoles_trace_screen_shows_the_trace_id() -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    done = wire.Event(kind="request", role="edge", node_id="edge-1", request_id="r1",
                      data={"served_by": "edge", "route_reason": "in_domain",
                            "total_ms": 12.0, "finish_reason": "stop",
                            "trace_id": trace_id})  # fmt: skip
    assert summary_of("r1", [done]).endswith(f", trace {trace_id}")
    untraced = wire.Event(kind="request", role="edge", node_id="edge-1", request_id="r2",
                          data={"served_by": "edge", "total_ms": 1.0})  # fmt: skip
    assert "trace" not in summary_of("r2", [untraced])
