"""Telemetry window, heartbeat/event publishing, and control endpoints."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client

from broker import errors, subjects, wire
from broker.bus import send_control, serve_control
from broker.telemetry import RequestStats, Telemetry, default_node_id


def test_request_stats_window() -> None:
    now = [100.0]
    stats = RequestStats(window_s=10, clock=lambda: now[0])
    for i in range(10):
        stats.record(0.010 * (i + 1), tokens=5)
    stats.record(1.0, error=True)
    now[0] += 10  # the whole window has elapsed since start
    snap = stats.snapshot()
    assert snap["rps"] == pytest.approx(1.1)
    assert snap["latency_p50_ms"] == pytest.approx(60, abs=11)
    assert snap["latency_p95_ms"] == pytest.approx(100)
    assert snap["tokens_per_s"] == pytest.approx(5.0)
    assert snap["errors"] == 1
    now[0] += 11  # everything slides out
    snap = stats.snapshot()
    assert snap["rps"] == 0 and snap["latency_p50_ms"] is None and snap["errors"] == 0
    assert stats.total_requests == 11


def test_default_node_id_is_a_token() -> None:
    node = default_node_id("edge")
    assert node.startswith("edge-") and subjects.is_token(node)
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
        first = wire.decode((await beats.next_msg(timeout=1)).data, wire.Heartbeat)
        second = wire.decode((await beats.next_msg(timeout=1)).data, wire.Heartbeat)
        assert (first.in_flight, second.in_flight) == (1, 3)
        await t.publish_event("drain", "draining now", request_id="r1", pending=2)
        event = wire.decode((await events.next_msg(timeout=1)).data, wire.Event)
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
        reply = await send_control(nc, "n1", "drain", {"timeout": 3})
        assert reply.ok and reply.data == {"timeout": 3} and drained.is_set()
        reply = await send_control(nc, "n1", "set-policy", {"threshold": "x"})
        assert not reply.ok and "threshold" in reply.message
        # Garbage on the wire: ok=False, endpoint still up.
        msg = await nc.request(subjects.control("n1", "drain"), b"\xc1", timeout=2)
        assert wire.decode(msg.data, wire.ControlReply).ok is False
        assert (await send_control(nc, "n1", "drain")).ok
        with pytest.raises(errors.NoResponders):
            await send_control(nc, "n1", "resume")
        info = await nc.request("$SRV.INFO.hybridgen-edge", b"", timeout=2)  # an edge's
        assert b"hg.ctl.n1.drain" in info.data
    finally:
        await service.stop()
