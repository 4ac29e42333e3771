"""`hybridgen bench hop`: what one NATS hop adds to a request.

The same trivial handler is called (1) in-process and (2) through the embedded nats-server
(request-reply between two connections), both with the wire codec on each side (encode
the request, decode it, run the handler, encode the reply, decode it), so the difference
is the hop itself: 5,000 sequential requests each (`--quick`: 1,000).

Other parts add measurements of their own to the same JSON: `main(argv, extra=[...])` takes
async functions that receive a `HopBench` (a connected client, the server URL, the request
count) and return a dict of extra fields; `hybridgen.benches.hop` adds the edge's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.bus import GenerationService, Responder, connect
from broker.server import NatsServer
from broker.streaming import request_stream

BENCH_MODEL = "bench"
GOALS = {"added_p50_ms": 0.5, "added_p99_ms": 2.0}


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of samples, in the samples' unit; 0 when none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def trivial_handler(request: wire.GenerateRequest) -> wire.Done:
    """The benchmark's handler: answers at once, no generation."""
    return wire.Done(
        request_id=request.request_id,
        seq=0,
        finish_reason="stop",
        usage=wire.Usage(prompt_tokens=len(request.prompt or ""), completion_tokens=0),
    )


def _request() -> wire.GenerateRequest:
    return wire.GenerateRequest(
        request_id=wire.new_request_id(), model=BENCH_MODEL, prompt="hello " * 20
    )


@dataclass
class HopBench:
    """What extra measurements get: a connected client, the server URL, the request count."""

    nc: Client
    url: str
    requests: int
    quick: bool


Measurement = Callable[[HopBench], Awaitable[dict[str, Any]]]


async def measure_stream(context: HopBench) -> dict[str, Any]:
    """The full streaming path (`request_stream` to a `GenerationService`: accept + Done).

    A fifth of the requests (at least 50): it adds a task per request and two replies.
    """
    model = "bench-stream"

    async def handler(request: wire.GenerateRequest, responder: Responder) -> None:
        await responder.done("stop", wire.Usage(prompt_tokens=0, completion_tokens=0))

    samples = []
    async with GenerationService(context.nc, model=model, handler=handler, node_id="bench"):
        for _ in range(max(50, context.requests // 5)):
            request = wire.GenerateRequest(
                request_id=wire.new_request_id(), model=model, prompt="hello " * 20
            )
            started = time.perf_counter()
            async with request_stream(context.nc, request) as stream:
                await stream.collect()
            samples.append((time.perf_counter() - started) * 1000)
    return {
        "stream_p50_ms": round(percentile(samples, 0.50), 4),
        "stream_p99_ms": round(percentile(samples, 0.99), 4),
    }


#: Extra measurements merged into the result (e.g. the edge's no-responders decision time).
#: Measurements of the bus itself, run after the hop.
BUS_MEASUREMENTS: tuple[Measurement, ...] = (measure_stream,)


async def measure_inproc(requests: int) -> list[float]:
    """Latencies (ms) of the handler called in-process, with the codec on both sides."""
    samples = []
    for index in range(requests):
        request = _request()
        started = time.perf_counter()
        decoded = wire.decode(wire.encode(request), wire.GenerateRequest)
        reply = wire.decode_reply(wire.encode(trivial_handler(decoded)))
        assert isinstance(reply, wire.Done)
        samples.append((time.perf_counter() - started) * 1000)
        if index % 256 == 0:
            await asyncio.sleep(0)
    return samples


async def measure_nats(client: Client, requests: int) -> list[float]:
    """Latencies (ms) of the same handler through the server (request-reply)."""
    subject = subjects.gen(BENCH_MODEL)
    samples = []
    for _ in range(requests):
        request = _request()
        started = time.perf_counter()
        msg = await client.request(subject, wire.encode(request), timeout=5)
        reply = wire.decode_reply(msg.data)
        assert isinstance(reply, wire.Done)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def run(
    requests: int,
    *,
    quick: bool = False,
    warmup: int = 200,
    extra: Sequence[Measurement] = (),
) -> dict[str, Any]:
    """Run the benchmark; the result dict (see module docstring). `extra` measurements (other
    parts' fields) run after the bus's own."""
    with tempfile.TemporaryDirectory(prefix="hg-bench-hop-") as tmp:
        async with NatsServer(store_dir=Path(tmp) / "nats", jetstream=False) as server:
            worker = await connect(server.client_url, name="bench-worker")
            client = await connect(server.client_url, name="bench-client")
            try:

                async def serve(msg: Msg) -> None:
                    request = wire.decode(msg.data, wire.GenerateRequest)
                    await msg.respond(wire.encode(trivial_handler(request)))

                await worker.subscribe(
                    subjects.gen(BENCH_MODEL), queue=subjects.queue_group(BENCH_MODEL), cb=serve
                )
                await worker.flush()
                await measure_inproc(warmup)
                await measure_nats(client, warmup)
                gc.collect()
                inproc = await measure_inproc(requests)
                gc.collect()
                hop = await measure_nats(client, requests)
                result: dict[str, Any] = {
                    "inproc_p50_ms": round(percentile(inproc, 0.50), 4),
                    "nats_p50_ms": round(percentile(hop, 0.50), 4),
                    "nats_p99_ms": round(percentile(hop, 0.99), 4),
                    "added_p50_ms": round(percentile(hop, 0.50) - percentile(inproc, 0.50), 4),
                    "added_p99_ms": round(percentile(hop, 0.99) - percentile(inproc, 0.99), 4),
                    "requests": requests,
                    # Context for the figures: the hop costs a few process wake-ups, so a
                    # busy machine (load above its core count) inflates it.
                    "cpu_count": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                }
                context = HopBench(nc=client, url=server.client_url, requests=requests, quick=quick)
                for measurement in (*BUS_MEASUREMENTS, *extra):
                    result.update(await measurement(context))
                return result
            finally:
                await client.close()
                await worker.close()


def _table(result: dict[str, Any]) -> str:
    lines = ["hop benchmark: trivial handler, in-process vs through nats-server (wire codec)"]
    for key, value in result.items():
        goal = GOALS.get(key)
        verdict = "" if goal is None else ("  ok" if value <= goal else f"  over goal {goal}")
        lines.append(f"  {key:<28} {value}{verdict}")
    return "\n".join(lines)


def main(argv: list[str], extra: Sequence[Measurement] = ()) -> int:
    """`hybridgen bench hop [--json] [--quick] [--requests N]`, with `extra` measurements."""
    parser = argparse.ArgumentParser(
        prog="hybridgen bench hop",
        description="Latency one NATS hop adds: the same trivial handler in-process and "
        "through the embedded nats-server, with the msgpack wire codec.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="1,000 requests instead of 5,000")
    parser.add_argument("--requests", type=int, default=None, help="sequential requests")
    args = parser.parse_args(argv)
    requests = args.requests or (1000 if args.quick else 5000)
    if requests < 1:
        parser.error("--requests must be at least 1")
    result = asyncio.run(run(requests, quick=args.quick, warmup=min(200, requests), extra=extra))
    if args.json:
        print(json.dumps(result))
    else:
        print(_table(result))
    sys.stdout.flush()
    return 0
