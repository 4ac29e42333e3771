"""`hybridgen bench fleet`: how generation throughput scales with the workers of a queue group.

Starts a nats-server, then for each count in `--workers` (1, 2 and 4) that many cloud worker
processes (one torch thread each, as `hybridgen cloud worker` runs them) in the queue group of
one model name, on a model set: `--set VERSION`, else the current one, else the `tiny` lab
profile built once into a temporary HG_HOME. Every count gets the same offered load: `--requests`
completions with fixed prompts and `max_tokens`, `--concurrency` at a time, sent through the
bus (`broker.streaming.request_stream`) by this process. The workers are warmed up (each has served
a request) before the clock starts, and stopped before the next count.

JSON (`--json`): `{"workers": [1, 2, 4], "tok_s": [...], "scaling_efficiency",
"efficiency": [...], "cpu", "cpu_count", "limited_by_machine", "limited_workers",
"model_set", "requests", "concurrency", "max_tokens", "errors", "load_avg"}`.
`tok_s` is completion tokens per second of wall time; `efficiency[i]` is
`tok_s[i] / (workers[i] * tok_s[0] / workers[0])`, and `scaling_efficiency` is that figure
from 1 to 2 workers (`tok_s[2] / (2 * tok_s[1])`; the goal is 0.8 or more). A count of
workers that is not below the cores this process may use (`cpu_count`) cannot scale on this
machine (the client and the nats-server need a core too): those counts are listed in
`limited_workers`, and `limited_by_machine` says the 1-to-2 figure is one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hybridgen.benches.load import Children, Scratch, scratch_network

#: Fixed prompts, cycled over the requests.
PROMPTS = (
    "The program reads a file and",
    "Permission is hereby granted, free of charge,",
    "To list the files in a folder,",
    "The licence says that",
)
#: The model name the workers serve (their queue group).
MODEL = "hg-bench-fleet"
#: Seconds the workers may take to load and answer their first request.
START_TIMEOUT_S = 180.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen bench fleet",
        description="Tokens/s of 1, 2 and 4 cloud workers in one queue group under the same "
        "offered load; the scaling efficiency from 1 to 2 workers.",
    )
    parser.add_argument("--workers", default="1,2,4", help="worker counts (1,2,4)")
    parser.add_argument("--requests", type=int, default=64, help="requests per count (64)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at a time (8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each (32)")
    parser.add_argument("--set", dest="model_set", help="model-set version (default: current)")
    parser.add_argument("--home", type=Path, help="HG_HOME holding the model set")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def efficiencies(workers: list[int], tok_s: list[float]) -> list[float | None]:
    """Each count's throughput over what linear scaling from the first count would give."""
    if not tok_s or tok_s[0] <= 0:
        return [None for _ in workers]
    per_worker = tok_s[0] / workers[0]
    return [round(t / (n * per_worker), 3) for n, t in zip(workers, tok_s, strict=True)]


async def one_request(nc: Any, index: int, max_tokens: int) -> tuple[int, str | None]:
    """One completion through the bus: (completion tokens, served_by); raises on failure."""
    from broker import wire
    from broker.streaming import request_stream

    request = wire.GenerateRequest(
        request_id=wire.new_request_id(),
        model=MODEL,
        prompt=PROMPTS[index % len(PROMPTS)],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    async with request_stream(nc, request, accept_timeout=30.0, idle_timeout=60.0) as stream:
        _, done = await stream.collect()
    return done.usage.completion_tokens, done.served_by


async def offered_load(
    nc: Any, requests: int, concurrency: int, max_tokens: int
) -> tuple[float, int, int]:
    """Send `requests` completions, `concurrency` at a time: (seconds, tokens, errors)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    tokens = errors = 0

    async def client() -> None:
        nonlocal tokens, errors
        while not queue.empty():
            index = queue.get_nowait()
            try:
                got, _ = await one_request(nc, index, max_tokens)
                tokens += got
            except Exception as exc:  # counted and reported, never fatal to the run
                errors += 1
                print(f"request {index} failed: {exc}", file=sys.stderr)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started, tokens, errors


async def warm_up(nc: Any, count: int, children: Children) -> None:
    """Send requests until each of the `count` workers has served one."""
    served: set[str] = set()
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(served) < count:
        children.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers did not all answer in {START_TIMEOUT_S:g} s")
        results = await asyncio.gather(
            *(one_request(nc, i, 2) for i in range(2 * count)), return_exceptions=True
        )
        served |= {r[1] for r in results if isinstance(r, tuple) and r[1]}
        if len(served) < count:
            await asyncio.sleep(0.3)


async def _each_count(
    args: argparse.Namespace, counts: list[int], requests: int, concurrency: int, net: Scratch
) -> tuple[list[float], int]:
    """Tokens/s under the same offered load for each worker count; and the failed requests."""
    from broker.bus import connect

    nc = await connect(net.server.client_url, name="bench-fleet")
    tok_s: list[float] = []
    errors = 0
    try:
        for count in counts:
            children = Children(net.logs, net.env)
            try:
                for i in range(count):
                    children.start(
                        f"worker-{count}-{i}",
                        [sys.executable, "-m", "cloud", "worker", "--nats",
                         net.server.client_url, "--model-set", net.version, "--model", MODEL,
                         "--node-id", f"bench-fleet-{count}-{i}", "--threads", "1",
                         "--device", "cpu", "--drain-timeout-s", "2"],
                    )  # fmt: skip
                await warm_up(nc, count, children)
                seconds, tokens, failed = await offered_load(
                    nc, requests, concurrency, args.max_tokens
                )
            finally:
                await asyncio.to_thread(children.stop)
            errors += failed
            tok_s.append(round(tokens / seconds, 2) if seconds > 0 else 0.0)
    finally:
        await nc.close()
    return tok_s, errors


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every worker count and return the figures."""
    from hybridgen.benches.machine import cpu_info, load_average

    counts = [int(n) for n in str(args.workers).split(",") if n.strip()]
    requests, concurrency = args.requests, args.concurrency
    if args.quick:
        requests, concurrency = min(requests, 16), min(concurrency, 4)
    with tempfile.TemporaryDirectory(prefix="hg-bench-fleet-") as tmp:
        async with scratch_network(args.model_set, args.home, Path(tmp)) as net:
            version = net.version
            tok_s, errors = await _each_count(args, counts, requests, concurrency, net)
    cores = usable_cores()
    each = efficiencies(counts, tok_s)
    one_to_two = None
    if 1 in counts and 2 in counts and tok_s[counts.index(1)] > 0:
        one_to_two = round(tok_s[counts.index(2)] / (2 * tok_s[counts.index(1)]), 3)
    return {
        "workers": counts,
        "tok_s": tok_s,
        "scaling_efficiency": one_to_two,
        "efficiency": each,
        "cpu": cpu_info()["model"],
        "cpu_count": cores,
        "limited_by_machine": cores <= 2,
        "limited_workers": [n for n in counts if n >= cores],
        "model_set": version,
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": args.max_tokens,
        "errors": errors,
        "load_avg": load_average(),
    }


def main(argv: list[str] | None = None) -> int:
    """`hybridgen bench fleet [--quick] [--json] [--set V] [--workers 1,2,4]`."""
    args = build_parser().parse_args(argv)
    figures = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(figures))
        return 0 if figures["errors"] == 0 else 1
    machine = f"{figures['cpu']}, {figures['cpu_count']} cores"
    print(f"fleet scaling on {figures['model_set']} ({machine})")
    for n, t, e in zip(figures["workers"], figures["tok_s"], figures["efficiency"], strict=True):
        note = "  (limited by the machine)" if n in figures["limited_workers"] else ""
        print(f"  {n} worker(s): {t:8.1f} tok/s  efficiency {e}{note}")
    eff = figures["scaling_efficiency"]
    verdict = "limited by the machine" if figures["limited_by_machine"] else "goal >= 0.8"
    print(f"  1 -> 2 workers: scaling efficiency {eff} ({verdict})")
    if figures["errors"]:
        print(f"  {figures['errors']} request(s) failed", file=sys.stderr)
    return 0 if figures["errors"] == 0 else 1
