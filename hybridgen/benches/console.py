"""`hybridgen bench console`: how the operator console copes with a large fleet.

A real nats-server, N simulated nodes each publishing one heartbeat a second (edges and
cloud workers with varied figures; a few stop after their first beat and go stale), and the
real console app running headless. Measured through the app's `on_timing` hook:

- `apply_p95_ms`: one heartbeat in the console's callback (decode + apply to the fleet).
- `render_p95_ms`: a timed refresh of the fleet table (the incremental update: changed
  cells rewritten in place).
- `full_refresh_p95_ms`: a refresh that rebuilds the table (forced by flipping the sort
  order after the heartbeats stop).
- `full_refresh_paint_p95_ms`: the same plus rendering the table's visible lines.

Goals at 200 nodes: `apply_p95_ms` <= 5 and `full_refresh_p95_ms` < 50. The JSON also
records the CPU (model name, avx2/avx512) and the load average, which inflate every figure
on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from textual.geometry import Region

from broker import subjects, wire
from broker.bus import connect
from broker.server import NatsServer
from broker.settings import BusSettings
from hybridgen.benches.bus_hop import percentile
from hybridgen.benches.machine import cpu_info
from tui.app import REFRESH_S, HybridgenConsole
from tui.event_log import EventLog
from tui.state import FleetState

#: Goals checked in the table: key -> the most it may be.
GOALS: dict[str, float] = {"apply_p95_ms": 5.0, "full_refresh_p95_ms": 50.0}
#: One node in this many stops after its first heartbeat (and shows as stale).
STALE_EVERY = 20
#: Full-table rebuilds timed after the heartbeats stop.
REBUILDS = 20
#: Seconds the console may take to apply the last heartbeats sent.
DRAIN_BOUND_S = 60.0
EDGE_REASONS = ("in_domain", "edge_default", "confident_draft")
CLOUD_REASONS = ("low_confidence", "requested_cloud", "edge_overloaded")


def heartbeat(index: int, rng: random.Random) -> wire.Heartbeat:
    """Node `index`'s next heartbeat: one in four is a cloud worker, the rest edges."""
    if index % 4 == 3:
        return wire.Heartbeat(
            role="cloud",
            node_id=f"worker-{index:04d}",
            model="hg-cloud",
            model_version="7",
            status="draining" if index % 40 == 3 else "ready",
            queue_depth=rng.randrange(0, 12),
            in_flight=rng.randrange(0, 8),
            rps=rng.uniform(0, 40),
            latency_p50_ms=rng.uniform(50, 200),
            latency_p95_ms=rng.uniform(200, 900),
            tokens_per_s=rng.uniform(100, 2000),
            errors=rng.randrange(0, 3),
        )
    routes = {r: rng.randrange(0, 500) for r in (*EDGE_REASONS, *CLOUD_REASONS)}
    total = sum(routes.values()) or 1
    return wire.Heartbeat(
        role="edge",
        node_id=f"edge-{index:04d}",
        model="hg-edge",
        model_version=str(1 + index % 3),
        status="degraded" if index % 50 == 0 else "ready",
        queue_depth=rng.randrange(0, 5),
        in_flight=rng.randrange(0, 4),
        rps=rng.uniform(0, 20),
        latency_p50_ms=rng.uniform(5, 60),
        latency_p95_ms=rng.uniform(60, 300),
        tokens_per_s=rng.uniform(20, 400),
        fallback_ratio={r: routes[r] / total for r in CLOUD_REASONS},
        errors=rng.randrange(0, 2),
        extra={"routes": routes, "breaker": "closed"},
    )


async def publish_fleet(nc: Client, nodes: int, seconds: float, rng: random.Random) -> int:
    """Publish one heartbeat per node per second, spread over the second; the count sent."""
    sent = 0
    chunk = max(1, nodes // 20)
    started = time.monotonic()
    second = 0
    while time.monotonic() - started < seconds:
        tick = started + second
        for first in range(0, nodes, chunk):
            for index in range(first, min(nodes, first + chunk)):
                if second > 0 and index % STALE_EVERY == STALE_EVERY - 1:
                    continue  # this one went quiet after its first beat
                beat = heartbeat(index, rng)
                await nc.publish(subjects.telemetry(beat.role, beat.node_id), wire.encode(beat))
                sent += 1
            await nc.flush()
            due = tick + (first + chunk) / nodes
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        second += 1
    return sent


async def run(nodes: int, seconds: float, *, seed: int = 7) -> dict[str, Any]:
    """Run the benchmark; the result dict (see the module docstring)."""
    timings: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="hg-bench-console-") as tmp:
        async with NatsServer(store_dir=Path(tmp) / "nats", jetstream=False) as server:
            # Stale after 2.5 s (beats come every second), so the quiet nodes show as stale
            # within a run of a few seconds.
            fleet = FleetState(stale_after=2.5, gone_after=max(60.0, seconds * 2))
            bus = BusSettings(url=server.client_url)
            app = HybridgenConsole(bus, fleet=fleet, events=EventLog())
            app.on_timing = lambda kind, s: timings[kind].append(s * 1000)
            publisher = await connect(server.client_url, name="bench-console-nodes")
            try:
                async with app.run_test(size=(160, 50)) as pilot:
                    for _ in range(500):
                        if app.connected:
                            break
                        await pilot.pause(0.02)
                    else:
                        raise RuntimeError(f"the console never connected to {server.client_url}")
                    started = time.monotonic()
                    sent = await publish_fleet(publisher, nodes, seconds, random.Random(seed))
                    elapsed = time.monotonic() - started
                    # Every beat applied (bounded), then one more refresh.
                    deadline = time.monotonic() + DRAIN_BOUND_S
                    while len(timings["apply"]) < sent and time.monotonic() < deadline:
                        await pilot.pause(0.02)
                    await pilot.pause(REFRESH_S + 0.1)
                    app.refresh_fleet()
                    rows, statuses = app.fleet_table.row_count, app.fleet.summary().statuses
                    paints: list[float] = []
                    table = app.fleet_table
                    for _ in range(REBUILDS):
                        app.descending = not app.descending
                        begun = time.perf_counter()
                        app.refresh_fleet()
                        table.render_lines(Region(0, 0, table.size.width, table.size.height))
                        paints.append((time.perf_counter() - begun) * 1000)
                        await pilot.pause(0.05)
            finally:
                await publisher.close()
    applies, renders, rebuilds = timings["apply"], timings["render"], timings["full_refresh"]
    cpu = cpu_info()
    return {
        "nodes": nodes,
        "seconds": round(elapsed, 2),
        "heartbeats_sent": sent,
        "heartbeats_applied": len(applies),
        "heartbeats_per_s": round(len(applies) / elapsed, 1) if elapsed else 0.0,
        "apply_p50_ms": round(percentile(applies, 0.50), 4),
        "apply_p95_ms": round(percentile(applies, 0.95), 4),
        "render_p95_ms": round(percentile(renders, 0.95), 3),
        "renders": len(renders),
        "full_refresh_p95_ms": round(percentile(rebuilds, 0.95), 3),
        "full_refreshes": len(rebuilds),
        "full_refresh_paint_p95_ms": round(percentile(paints, 0.95), 3),
        "rows": rows,
        "statuses": statuses,
        "cpu": {
            "model": cpu["model"],
            "avx2": cpu["flags"]["avx2"],
            "avx512": cpu["flags"]["avx512f"],
        },
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"console benchmark: {result['nodes']} nodes, one heartbeat a second each, "
        "real nats-server, headless console 160x50"
    ]
    for key, value in result.items():
        goal = GOALS.get(key)
        verdict = "" if goal is None else ("  ok" if value <= goal else f"  over goal {goal}")
        lines.append(f"  {key:<28} {value}{verdict}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`hybridgen bench console [--nodes 200] [--seconds 10] [--json]`."""
    parser = argparse.ArgumentParser(
        prog="hybridgen bench console",
        description="Time the operator console with N simulated nodes heartbeating over a "
        "real nats-server: heartbeat apply time and fleet table refresh time (p95).",
    )
    parser.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    parser.add_argument("--seconds", type=float, default=10.0, help="heartbeat phase length")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    result = asyncio.run(run(args.nodes, args.seconds))
    print(json.dumps(result) if args.json else _table(result))
    sys.stdout.flush()
    return 0
