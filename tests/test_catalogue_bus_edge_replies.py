"""The bus catalogue, the edge's side: broken worker replies as a real edge sees them.

A real edge (uvicorn, its runtime on the tiny model) on a real nats-server sends `route:
"cloud"` requests to a stand-in worker (`scripted_worker`: no real worker sends a malformed
or out-of-sequence reply). The caller's stream turns each into `Internal`
(`test_broker_reply_stream.py`); here is what the edge's client gets (docs/edge.md, "Cloud
failures"), streamed or not:

- on the first reply: the cloud did not accept, so the edge answers locally
  (`route_reason: cloud_unavailable`), counts a cloud failure and says why in a
  `cloud_error` event;
- mid-stream: the edge finishes the answer locally from the text already streamed
  (`completed_by: edge`);
- mid-stream, when that cannot be done (a constrained answer, or text that does not fit the
  edge context): 503 `unavailable` in OpenAI's envelope, or that error event then `[DONE]`.

Every script that goes on after its bad reply ends with a good `Done`: an edge that let the
bad reply through would answer as the cloud, and the test fail at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from tests.fixtures_bus_catalogue import Script, ScriptedWorker, chunk, done, pack
from tests.fixtures_edge import LiveEdge, ends_well, sse_json, sse_lines
from tests.waits import BOUND_S, eventually

CLOUD = subjects.gen("hg-cloud")
PROMPT = "Permission is hereby granted"
MAX_TOKENS = 4
#: A timeout no test waits out: with the cloud's timeouts at this, only the replies decide.
NEVER_MS = 1000 * 10 * BOUND_S
POLICY = {"cloud_timeout_ms": NEVER_MS, "cloud_idle_timeout_ms": NEVER_MS}


def body(stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": "hg-edge",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
        "route": "cloud",
        **extra,
    }


@pytest.fixture
async def edge(start_edge: Callable[..., Any]) -> LiveEdge:
    live: LiveEdge = await start_edge(policy=POLICY)
    return live


@pytest.fixture
async def http(edge: LiveEdge) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge.url, timeout=BOUND_S) as client:
        yield client


@pytest.fixture
async def events(nc: Client, edge: LiveEdge) -> list[wire.Event]:
    """The edge's events, from now on."""
    seen: list[wire.Event] = []

    async def on_event(msg: Any) -> None:
        seen.append(wire.decode(msg.data, wire.Event))

    await nc.subscribe(subjects.events("edge", edge.node_id), cb=on_event)
    await nc.flush()
    return seen


async def cloud_error(events: list[wire.Event], request_id: str) -> str:
    """The message of the request's `cloud_error` event (the only one it gets)."""

    def found() -> list[wire.Event]:
        return [e for e in events if e.kind == "cloud_error" and e.request_id == request_id]

    [event] = await eventually(found, f"the cloud_error event of {request_id}")
    return event.message


# -------------------------------------------------------------------- the first reply

#: (case, script, the `Internal` message after "<subject>: "; `{rid}` is the request id)
FIRST: list[tuple[str, Script, str]] = [
    ("not msgpack", lambda rid: [b"\xc1"], "malformed reply: malformed msgpack (FormatError: )"),
    (
        "an unknown type",
        lambda rid: [pack({"v": wire.VERSION, "type": "nope", "request_id": rid, "seq": 0})],
        "malformed reply: Input tag 'nope' found using 'type' does not match any of the "
        "expected tags: 'chunk', 'done', 'error'",
    ),
    (
        "a first reply past seq 0",
        lambda rid: [chunk(rid, 1, " cloud"), done(rid, 2)],
        "broken reply sequence for request {rid}: expected seq 0, got 1",
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("case", "script", "message"), FIRST, ids=[c[0] for c in FIRST])
async def test_a_broken_first_reply_is_answered_locally(
    scripted_worker: ScriptedWorker,
    edge: LiveEdge,
    http: httpx.AsyncClient,
    events: list[wire.Event],
    case: str,
    script: Script,
    message: str,
    stream: bool,
) -> None:
    received = await scripted_worker(script)
    if stream:
        lines = await sse_lines(http, body(True))
        ends_well(lines)
        answers = [sse_json(line) for line in lines[:-1]]
    else:
        response = await http.post("/v1/completions", json=body(False))
        assert response.status_code == 200, response.text
        answers = [response.json()]
    request_id = answers[0]["request_id"]
    assert [r.request_id for r in received] == [request_id]  # the cloud was asked first
    for answer in answers:
        assert "error" not in answer, answer
        assert (answer["served_by"], answer["route_reason"], answer["request_id"]) == (
            "edge",
            "cloud_unavailable",
            request_id,
        )
        assert "completed_by" not in answer
    if not stream:  # the edge's own prefill of the prompt, not the stand-in's figure
        assert answers[0]["usage"]["prompt_tokens"] == len(edge.node.runtime.encode(PROMPT))
    assert await cloud_error(events, request_id) == (
        f"internal: {CLOUD}: " + message.format(rid=request_id)
    )
    assert edge.node.counters.cloud_failures == 1


# ---------------------------------------------------------------------------- mid-stream

#: (case, script, the `Internal` message after "<subject>: "; `{rid}` is the request id).
#: The cloud streams " one" (one token) before it breaks.
MID: list[tuple[str, Script, str]] = [
    (
        "not msgpack",
        lambda rid: [chunk(rid, 0), chunk(rid, 1, " one", [7]), b"\xc1", done(rid, 3)],
        "malformed reply: malformed msgpack (FormatError: )",
    ),
    (
        "a skipped seq",
        lambda rid: [
            chunk(rid, 0),
            chunk(rid, 1, " one", [7]),
            chunk(rid, 3, " three", [9]),
            done(rid, 4),
        ],
        "broken reply sequence for request {rid}: expected seq 2, got 3",
    ),
    (
        "a repeated seq",
        lambda rid: [
            chunk(rid, 0),
            chunk(rid, 1, " one", [7]),
            chunk(rid, 1, " one", [7]),
            done(rid, 3),
        ],
        "broken reply sequence for request {rid}: expected seq 2, got 1",
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("case", "script", "message"), MID, ids=[c[0] for c in MID])
async def test_a_broken_reply_mid_stream_is_finished_locally(
    scripted_worker: ScriptedWorker,
    edge: LiveEdge,
    http: httpx.AsyncClient,
    events: list[wire.Event],
    case: str,
    script: Script,
    message: str,
    stream: bool,
) -> None:
    await scripted_worker(script)
    if stream:
        lines = await sse_lines(http, body(True))
        last = ends_well(lines)
        answers = [sse_json(line) for line in lines[:-1]]
        text = "".join(a["choices"][0]["text"] for a in answers if a["choices"])
    else:
        response = await http.post("/v1/completions", json=body(False))
        assert response.status_code == 200, response.text
        last = response.json()
        answers = [last]
        text = last["choices"][0]["text"]
    request_id = last["request_id"]
    for answer in answers:
        assert "error" not in answer, answer
        assert (answer["served_by"], answer["route_reason"]) == ("cloud", "requested_cloud")
    assert last["completed_by"] == "edge"
    # The cloud's part, once, then the edge's: nothing of the bad reply.
    assert text.startswith(" one") and not text.startswith((" one one", " one three")), text
    assert await cloud_error(events, request_id) == (
        f"cloud failed mid-stream: internal: {CLOUD}: " + message.format(rid=request_id)
    )
    counters = edge.node.counters
    assert (counters.cloud_failures, counters.mid_stream_recoveries) == (1, 1)


# ------------------------------------------------------------ mid-stream, not finishable


def long_text(edge: LiveEdge) -> str:
    """More text than the edge context holds (each word is at least a token)."""
    return " lorem" * (edge.node.runtime.context_length + 1)


#: (case, the request's extra fields, the text the cloud streams, why the edge cannot finish)
UNFINISHABLE: list[tuple[str, dict[str, Any], Callable[[LiveEdge], str], str]] = [
    (
        "constrained",
        {"response_format": {"type": "json_object"}},
        lambda edge: '{"a"',
        "a constrained answer cannot be finished on the edge; retry the request",
    ),
    (
        "too long for the edge",
        {},
        long_text,
        "the answer so far does not fit the edge context to finish it locally",
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    ("case", "extra", "cloud_text", "why"), UNFINISHABLE, ids=[c[0] for c in UNFINISHABLE]
)
async def test_a_broken_reply_that_cannot_be_finished_locally_is_unavailable(
    scripted_worker: ScriptedWorker,
    edge: LiveEdge,
    http: httpx.AsyncClient,
    case: str,
    extra: dict[str, Any],
    cloud_text: Callable[[LiveEdge], str],
    why: str,
    stream: bool,
) -> None:
    text = cloud_text(edge)
    received = await scripted_worker(
        lambda rid: [chunk(rid, 0), chunk(rid, 1, text), chunk(rid, 3, "}"), done(rid, 4)]
    )
    if stream:
        lines = await sse_lines(http, body(True, **extra))
        error = ends_well(lines)
        answers = [sse_json(line) for line in lines[:-2]]
        assert "".join(a["choices"][0]["text"] for a in answers if a["choices"]) == text
    else:
        response = await http.post("/v1/completions", json=body(False, **extra))
        assert response.status_code == 503, response.text
        error = response.json()
    [request_id] = [r.request_id for r in received]
    cause = f"internal: {CLOUD}: broken reply sequence for request {request_id}: "
    assert error == {
        "error": {
            "message": f"the cloud failed mid-stream ({cause}expected seq 2, got 3) and {why}",
            "type": "service_unavailable_error",
            "param": None,
            "code": "unavailable",
        }
    }
    assert edge.node.counters.cloud_failures == 1
    # The edge goes on serving: a local request is answered.
    response = await http.post(
        "/v1/completions", json={**body(False), "route": "edge", "max_tokens": 1}
    )
    assert response.status_code == 200, response.text
    assert json.loads(response.text)["served_by"] == "edge"
