"""Telemetry window, heartbeat/event publishing, and control endpoints."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import pytest
from nats.aio.client import Client

from broker import errors, subjects, wire
from broker.bus import send_control, serve_control
from broker.telemetry import RequestStats, Telemetry, default_node_id
from tests.waits import BOUND_S


def test_request_stats_window() -> None:
    now = [100.0]
    stats = RequestStats(window_s=10, clock=lambda: now[0])
    for i in range(10):
        stats.record(0.010 * (i + 1), tokens=5)
    stats.record(1.0, error=True)
    now[0] += 10  # the whole window has elapsed since start
    snap = stats.snapshot()
    assert snap["rps"] == pytest.approx(1.1)
    # Nearest rank of the 10 successes (10, 20, ... 100 ms): the 5th and the 10th.
    assert snap["latency_p50_ms"] == pytest.approx(50)
    assert snap["latency_p95_ms"] == pytest.approx(100)
    assert snap["tokens_per_s"] == pytest.approx(5.0)
    assert snap["errors"] == 1
    now[0] += 11  # everything slides out
    snap = stats.snapshot()
    assert snap["rps"] == 0 and snap["latency_p50_ms"] is None and snap["errors"] == 0
    assert stats.total_requests == 11


def test_default_node_id_is_a_token() -> None:
    node = default_node_id("edge")
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname().split(".")[0]).strip("-")
    assert re.fullmatch(rf"edge-{re.escape(host or 'host')}-[0-9a-f]{{4}}", node), node
    assert subjects.is_token(node)
    assert default_node_id("edge") != node


async def test_telemetry_publishes_heartbeats_and_events(nc: Client) -> None:
    beats = await nc.subscribe(subjects.telemetry_of_role("cloud"))
    events = await nc.subscribe(subjects.EVENTS_ALL)
    count = 0

    def build() -> wire.Heartbeat:
        nonlocal count
        count += 1
        if count == 2:
            raise RuntimeError("a broken builder must not stop the loop")
        return wire.Heartbeat(role="cloud", node_id="c1", in_flight=count)

    async with Telemetry(nc, role="cloud", node_id="c1", build_heartbeat=build, interval=0.05) as t:
        first = wire.decode((await beats.next_msg(timeout=BOUND_S)).data, wire.Heartbeat)
        second = wire.decode((await beats.next_msg(timeout=BOUND_S)).data, wire.Heartbeat)
        assert (first.in_flight, second.in_flight) == (1, 3)
        await t.publish_event("drain", "draining now", request_id="r1", pending=2)
        event = wire.decode((await events.next_msg(timeout=BOUND_S)).data, wire.Event)
    assert (event.kind, event.node_id, event.request_id, event.data) == (
        "drain",
        "c1",
        "r1",
        {"pending": 2},
    )
    await t.close()  # idempotent


async def test_serve_control(nc: Client) -> None:
    drained = asyncio.Event()

    async def drain(request: wire.ControlRequest) -> wire.ControlReply:
        drained.set()
        return wire.ControlReply(ok=True, message="draining", data=request.args)

    async def set_policy(request: wire.ControlRequest) -> wire.ControlReply:
        raise errors.BadRequest("threshold must be a number", param="threshold")

    service = await serve_control(
        nc, node_id="n1", role="edge", handlers={"drain": drain, "set-policy": set_policy}
    )
    try:
        reply = await send_control(nc, "n1", "drain", {"timeout": 3}, timeout=BOUND_S)
        assert reply == wire.ControlReply(ok=True, message="draining", data={"timeout": 3})
        assert drained.is_set()
        # A handler's coded error: ok=False, its message, code and param.
        reply = await send_control(nc, "n1", "set-policy", {"threshold": "x"}, timeout=BOUND_S)
        assert reply == wire.ControlReply(
            ok=False,
            message="threshold must be a number",
            data={"code": "bad_request", "param": "threshold"},
        )
        # Garbage on the wire: a coded refusal, and the endpoint still up.
        msg = await nc.request(subjects.control("n1", "drain"), b"\xc1", timeout=BOUND_S)
        assert wire.decode(msg.data, wire.ControlReply) == wire.ControlReply(
            ok=False, message="malformed msgpack (FormatError: )", data={"code": "bad_request"}
        )
        assert (await send_control(nc, "n1", "drain", timeout=BOUND_S)).ok
        with pytest.raises(errors.NoResponders):
            await send_control(nc, "n1", "resume", timeout=BOUND_S)
        info = await nc.request("$SRV.INFO.hybridgen-edge", b"", timeout=BOUND_S)  # an edge's
        endpoints = json.loads(info.data)["endpoints"]
        assert [e["subject"] for e in endpoints] == ["hg.ctl.n1.drain", "hg.ctl.n1.set-policy"]
    finally:
        await service.stop()


def test_micro_request_reply_subject() -> None:
    """nats.micro hides a request's reply subject; the one adapter that reads it must notice
    an upgrade that moves it (and the pin in pyproject.toml says why)."""
    from nats.aio.msg import Msg
    from nats.micro.request import Request

    from broker.service import reply_subject

    with_reply = Request(Msg(_client=None, subject="hg.gen.m", reply="_INBOX.a.b", data=b""))  # type: ignore[arg-type]
    assert reply_subject(with_reply) == "_INBOX.a.b"
    assert reply_subject(Request(Msg(_client=None, subject="hg.gen.m", reply="", data=b""))) is None  # type: ignore[arg-type]
