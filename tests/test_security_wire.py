"""Strict bus input: msgpack extension types, oversized and invalid grammars, integers past
what the wire and the engines take, and names that end in a newline, refused with a coded
error (`bad_request` on the bus, a 400 naming the field over HTTP), never a crash."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgpack
import pytest
from nats.aio.client import Client

from broker import errors, subjects, wire
from broker.bus import GenerationService, Responder
from broker.config import User
from broker.permissions import permissions_for
from models.registry import check_version
from tests.fixtures_cloud import serve_cloud_api
from tests.fixtures_edge import ADMIN_HEADERS, LiveEdge

MODEL = "hg-cloud"
#: Over every bound: msgpack carries at most 64-bit integers.
HUGE = 2**80
#: Generous bound of one bus round trip.
WAIT_S = 10.0


def request_map(**fields: Any) -> dict[str, Any]:
    """A valid `GenerateRequest` as a plain map, with `fields` set or replaced."""
    base = {"v": 3, "type": "generate", "request_id": wire.new_request_id(), "model": MODEL}
    return {**base, "prompt": "hello", **fields}


def with_ext(**fields: Any) -> bytes:
    """A request map packed with `fields` (which may hold msgpack extension values)."""
    return msgpack.packb(request_map(**fields), use_bin_type=True)  # type: ignore[no-any-return]


EXT_PAYLOADS = {
    "ext type 5 in tools": with_ext(tools=[{"type": "function", "x": msgpack.ExtType(5, b"x")}]),
    "timestamp in tools": with_ext(tools=[{"type": "function", "x": msgpack.Timestamp(1, 0)}]),
    "ext type 42 in a list": with_ext(tools=[[msgpack.ExtType(42, b"\x00" * 8)]]),
}


@pytest.mark.parametrize("name", sorted(EXT_PAYLOADS))
def test_decode_refuses_msgpack_ext_types(name: str) -> None:
    with pytest.raises(errors.BadRequest, match="extension type"):
        wire.decode(EXT_PAYLOADS[name], wire.GenerateRequest)
    # The same map without the extension value decodes.
    assert wire.decode(with_ext(tools=[{"type": "function"}]), wire.GenerateRequest).tools


def test_control_and_telemetry_refuse_ext_types() -> None:
    control = {"v": 3, "type": "control", "verb": "drain", "args": {"x": msgpack.ExtType(1, b"")}}
    with pytest.raises(errors.BadRequest, match="extension type 1"):
        wire.decode(msgpack.packb(control), wire.ControlRequest)
    beat = {"v": 3, "type": "heartbeat", "role": "edge", "node_id": "e1"}
    beat["extra"] = {"t": msgpack.Timestamp(5, 0)}
    with pytest.raises(errors.BadRequest, match="timestamp"):
        wire.decode(msgpack.packb(beat), wire.Heartbeat)


def test_bus_grammar_has_a_size_cap() -> None:
    big = {"kind": "regex", "data": "a" * (wire.MAX_GRAMMAR_CHARS + 1)}
    with pytest.raises(errors.BadRequest) as caught:
        wire.decode(with_ext(grammar=big), wire.GenerateRequest)
    assert caught.value.param == "grammar.data"
    at_cap = {"kind": "regex", "data": "a" * wire.MAX_GRAMMAR_CHARS}
    assert wire.decode(with_ext(grammar=at_cap), wire.GenerateRequest).grammar is not None


async def first_reply(
    nc: Client, payload: bytes, model: str = MODEL
) -> wire.Chunk | wire.Done | wire.Error:
    """The first reply to a raw request on `hg.gen.<model>`."""
    msg = await nc.request(subjects.gen(model), payload, timeout=WAIT_S)
    return wire.decode_reply(msg.data)


async def echo(request: wire.GenerateRequest, responder: Responder) -> None:
    await responder.chunk(request.prompt or "")
    await responder.done("stop", wire.Usage(prompt_tokens=1, completion_tokens=1))


async def test_service_answers_ext_types_and_newline_ids_with_bad_request(nc: Client) -> None:
    async with GenerationService(nc, model=MODEL, handler=echo, node_id="w1"):
        for name, payload in EXT_PAYLOADS.items():
            reply = await first_reply(nc, payload)
            assert isinstance(reply, wire.Error), name
            assert reply.code == "bad_request" and "extension type" in reply.message, reply
        # A request id that ends in a newline is not a subject token.
        reply = await first_reply(nc, with_ext(request_id="abc\n"))
        assert isinstance(reply, wire.Error)
        assert (reply.code, reply.param) == ("bad_request", "request_id")
        # The service is still serving.
        ok = await first_reply(nc, with_ext(prompt="still here"))
        assert isinstance(ok, wire.Chunk), ok


async def test_worker_refuses_bad_grammars_and_ext_types(
    nc: Client, start_worker: Callable[..., Awaitable[Any]]
) -> None:
    await start_worker(model="hg-cloud", node_id="w-strict")
    # An extension type: the worker's service answers a coded error.
    reply = await first_reply(nc, EXT_PAYLOADS["ext type 5 in tools"])
    assert isinstance(reply, wire.Error) and reply.code == "bad_request", reply
    # Over the cap: refused by the wire before the worker sees it.
    big = {"kind": "regex", "data": "a" * (wire.MAX_GRAMMAR_CHARS + 1)}
    reply = await first_reply(nc, with_ext(grammar=big, max_tokens=4))
    assert isinstance(reply, wire.Error)
    assert (reply.code, reply.param) == ("bad_request", "grammar.data")
    # A grammar llguidance refuses: checked by the worker before admission.
    for bad in ({"kind": "json_schema", "data": "{not json"}, {"kind": "lark", "data": "start: ("}):
        reply = await first_reply(nc, with_ext(grammar=bad, max_tokens=4))
        assert isinstance(reply, wire.Error), bad
        assert (reply.code, reply.param) == ("bad_request", "grammar"), reply
    # A valid grammar is served.
    good = {"kind": "regex", "data": "(yes|no)"}
    reply = await first_reply(nc, with_ext(grammar=good, max_tokens=4))
    assert isinstance(reply, wire.Chunk), reply


HUGE_FIELDS = {
    "seed": HUGE,
    "max_tokens": HUGE,
    "top_k": HUGE,
}


async def check_400(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error


@pytest.mark.parametrize("field", sorted(HUGE_FIELDS))
async def test_huge_integers_are_400_on_the_cloud_api(nats_url: str, field: str) -> None:
    async with (
        serve_cloud_api(nats_url, models=[MODEL]) as url,
        httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client,
    ):
        for path, body in (
            ("/v1/completions", {"model": MODEL, "prompt": "hi"}),
            (
                "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            ),
        ):
            response = await client.post(path, json={**body, field: HUGE_FIELDS[field]})
            await check_400(response, field)
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        response = await client.post(
            "/v1/chat/completions", json={**chat, "max_completion_tokens": HUGE}
        )
        await check_400(response, "max_completion_tokens")
        tool = {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer", "maximum": HUGE}},
                },
            },
        }
        response = await client.post("/v1/chat/completions", json={**chat, "tools": [tool]})
        await check_400(response, "tools")


async def test_huge_seed_is_400_on_the_edge(start_edge: Callable[..., Awaitable[LiveEdge]]) -> None:
    edge = await start_edge()
    async with httpx.AsyncClient(
        base_url=edge.url, timeout=WAIT_S, headers=ADMIN_HEADERS
    ) as client:
        for path, body in (
            ("/v1/completions", {"model": "hg-edge", "prompt": "hi", "max_tokens": 2}),
            (
                "/v1/chat/completions",
                {
                    "model": "hg-edge",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            ),
        ):
            for route in ("edge", "cloud"):
                response = await client.post(path, json={**body, "seed": HUGE, "route": route})
                await check_400(response, "seed")
            # The largest seed the engines take is served.
            response = await client.post(
                path, json={**body, "seed": 2**31 - 1, "route": "edge", "temperature": 1.0}
            )
            assert response.status_code == 200, response.text


def test_names_and_versions_are_matched_whole() -> None:
    for name in ("edge-1\n", "hg-cloud\n", "a\nb", "x "):
        assert not subjects.is_token(name)
        with pytest.raises(ValueError, match="not a valid subject token"):
            subjects.token(name)
    with pytest.raises(ValueError, match="node_id"):
        subjects.telemetry("edge", "edge-1\n")
    with pytest.raises(ValueError, match="model"):
        subjects.gen("hg-cloud\n")
    with pytest.raises(ValueError, match="node_id"):
        permissions_for("edge", "edge-1\n")
    with pytest.raises(ValueError, match="node_id"):
        permissions_for(
            User.parse("e:pw:edge:edge-1\n").role, User.parse("e:pw:edge:edge-1\n").node_id
        )
    with pytest.raises(errors.BadRequest, match="version"):
        check_version("v1\n")
    assert check_version("v1.2_rc-3") == "v1.2_rc-3"


async def test_services_refuse_names_with_a_newline(nc: Client) -> None:
    with pytest.raises(ValueError, match="model"):
        GenerationService(nc, model="hg-cloud\n", handler=echo, node_id="w1")
    with pytest.raises(ValueError, match="node_id"):
        async with GenerationService(nc, model=MODEL, handler=echo, node_id="w1\n"):
            pass
