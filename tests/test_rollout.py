"""Roll-outs: the halting rule, `hybridgen fleet rollout|rollback` on real edges, no request
dropped during an edge swap, and a cloud model change with no downtime.

The edges and workers are real (tests/fixtures_edge.py, tests/fixtures_cloud.py) on a real
nats-server; the model sets are the session's tiny set and a copy of it under a second
version, both published to the object store `hg_models`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.control import send_control
from edge.runtime import SamplingParams
from fleet.rollout import stages
from fleet.rollout_record import load_record
from fleet.watch import Bounds, Figures, figures, judge, live_edges
from hybridgen import fleet
from models import distribution, registry
from models.registry import ModelSet
from tests.fixtures_cloud import serve_cloud_api
from tests.fixtures_edge import LiveEdge
from tests.fixtures_models import copy_model_set
from tests.waits import eventually

NEW = "tiny-next"


def beat(**fields: Any) -> wire.Heartbeat:
    return wire.Heartbeat(role="edge", node_id=fields.pop("node_id", "e1"), **fields)


# ------------------------------------------------------------------ the halting rule (pure)


def test_figures_take_the_worst_heartbeat() -> None:
    assert figures([]) is None
    got = figures([beat(rps=1.0, errors=0, latency_p95_ms=10.0), beat(rps=1.0, errors=30), beat()])
    assert got == Figures(error_rate=0.5, p95_ms=10.0, heartbeats=3)  # 30 / (30 + 1 * 30 s)


def test_judge_halts_on_error_rate_or_latency_past_the_bound() -> None:
    bounds = Bounds(max_error_rate=0.05, max_p95_ms=100.0)
    before = Figures(error_rate=0.01, p95_ms=200.0, heartbeats=5)
    healthy = Figures(error_rate=0.05, p95_ms=290.0, heartbeats=5)
    assert judge(healthy, before, None, bounds) is None
    errors = judge(Figures(0.07, 200.0, 5), before, None, bounds)
    assert errors is not None and "error rate" in errors
    slow = judge(Figures(0.0, 301.0, 5), before, None, bounds)
    assert slow is not None and "p95" in slow
    assert judge(None, before, None, bounds) is not None  # the new version never reported


def test_judge_baseline_is_the_node_else_its_peers() -> None:
    bounds = Bounds(max_error_rate=0.05, max_p95_ms=100.0)
    after = Figures(error_rate=0.2, p95_ms=450.0, heartbeats=3)
    # The node's own figures win over its peers'.
    assert judge(after, Figures(0.18, 400.0, 3), Figures(0.0, 10.0, 3), bounds) is None
    # No figures of its own: its peers' are the baseline.
    assert judge(after, None, Figures(0.18, 400.0, 3), bounds) is None
    assert judge(after, None, Figures(0.0, 400.0, 3), bounds) is not None
    # No baseline at all: the error rate against the bound, the latency not judged.
    assert judge(Figures(0.04, 9e9, 1), None, None, bounds) is None
    assert judge(Figures(0.06, 1.0, 1), None, None, bounds) is not None
    # No p95 of its own (no traffic): the peers' p95 is the baseline.
    assert judge(after, Figures(0.2, None, 3), Figures(0.2, 100.0, 3), bounds) is not None


class Edges:
    """An `EdgeView` of fixed statuses (the console's fleet table or the CLI's heartbeats)."""

    def __init__(self, statuses: dict[str, str]) -> None:
        self.statuses = statuses

    def edge_statuses(self) -> dict[str, str]:
        return self.statuses

    def last(self, node: str) -> wire.Heartbeat | None:
        return None


def test_a_roll_out_reaches_the_edges_heard_lately_and_not_stopped() -> None:
    """One live-edge rule for the CLI and the console (docs/console.md, "Roll-out")."""
    statuses = {"e-stale": "stale", "e-gone": "gone", "e-silent": "silent",
                "e-stopped": "stopped", "e-b": "ok", "e-a": "draining"}  # fmt: skip
    assert live_edges(Edges(statuses)) == ["e-a", "e-b"]


def test_stages_canary_first_then_node_by_node() -> None:
    nodes = ["a", "b", "c", "d", "e"]
    assert stages(nodes, None) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert stages(nodes, 40) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert stages(nodes, 1) == [["a"], ["b"], ["c"], ["d"], ["e"]]  # at least one node
    assert stages(nodes, 100) == [nodes]


# ---------------------------------------------------------------------- real edges, the CLI


def new_version(model_set: ModelSet, home: Path, version: str) -> ModelSet:
    """A copy of `model_set` under another version, installed in `home`."""
    root = registry.models_home(home) / version
    shutil.copytree(model_set.root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = version
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return registry.resolve(version, home)


@pytest.fixture
async def two_versions(
    nc: Client, tiny_models: ModelSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """(old, new): the tiny set installed in the edges' HG_HOME, and both versions published."""
    other = new_version(tiny_models, tmp_path / "publisher", NEW)
    await distribution.publish(nc, tiny_models)
    await distribution.publish(nc, other)
    monkeypatch.setenv("HG_HOME", str(tmp_path / "edge-home"))
    copy_model_set(tiny_models, tmp_path / "edge-home")  # the edges start on the old version
    return tiny_models.version, NEW


async def versioned_edge(start_edge: Callable[..., Any], version: str, **kw: Any) -> LiveEdge:
    edge: LiveEdge = await start_edge(
        model_dir=None, model_version=version, telemetry_interval_s=0.2, **kw
    )
    return edge


@contextlib.asynccontextmanager
async def operator_events(nc: Client) -> AsyncIterator[list[wire.Event]]:
    events: list[wire.Event] = []

    async def on_event(msg: Any) -> None:
        events.append(wire.decode(msg.data, wire.Event))

    sub = await nc.subscribe(subjects.events_of_role("operator"), cb=on_event)
    try:
        yield events
    finally:
        await sub.unsubscribe()


@pytest.mark.slow
async def test_cli_rolls_out_node_by_node_and_rolls_back(
    start_edge: Callable[..., Any],
    nc: Client,
    nats_url: str,
    two_versions: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, new = two_versions
    edges = [await versioned_edge(start_edge, old) for _ in range(2)]
    bus = ["--nats-url", nats_url]
    async with operator_events(nc) as events:
        code = await fleet.run(["rollout", new, "--watch-s", "0.8", "--discover-s", "1.0", *bus])
        out = capsys.readouterr().out
        assert code == 0, out
        assert all(edge.node.runtime.version == new for edge in edges)
        for edge in edges:  # per-node status lines: node, from -> to, state, seconds
            assert any(
                line.startswith(edge.node_id) and f"{old} -> {new}" in line and "done" in line
                for line in out.splitlines()
            ), out
            assert f"{edge.node_id:<20} {new} healthy" in out
        record = await load_record(nc)
        assert record is not None and record.version == new and record.state == "done"
        assert record.nodes == {edge.node_id: old for edge in edges}

        assert await fleet.run(["rollback", *bus]) == 0
        out = capsys.readouterr().out
        assert all(edge.node.runtime.version == old for edge in edges), out
        record = await load_record(nc)
        assert record is not None and record.state == "rolled_back" and record.nodes == {}
        assert await fleet.run(["rollback", *bus]) == 1  # nothing left to roll back

        def actions() -> list[tuple[str, str, bool]]:
            return [(e.data["action"], e.data["target"], e.data["ok"]) for e in events]

        wanted = {(verb, edge.node_id, True) for edge in edges for verb in ("rollout", "rollback")}
        await eventually(lambda: wanted <= set(actions()), "each node's operator events")
    assert all(e.kind == "operator_action" and e.role == "operator" for e in events)


@pytest.mark.slow
async def test_canary_halts_on_a_regressing_node_and_rolls_it_back(
    start_edge: Callable[..., Any],
    nc: Client,
    nats_url: str,
    two_versions: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, new = two_versions
    canary = await versioned_edge(start_edge, old)
    rest = await versioned_edge(start_edge, old)

    async def regressing() -> None:
        """The canary 'plays' failing requests on the new version: high error counts."""
        while True:
            bad = beat(node_id=canary.node_id, model_version=new, rps=1.0, errors=40)
            await nc.publish(subjects.telemetry("edge", canary.node_id), wire.encode(bad))
            await asyncio.sleep(0.1)

    player = asyncio.create_task(regressing())
    try:
        code = await fleet.run(
            [
                "rollout", new, "--canary", "50%", "--nodes", f"{canary.node_id},{rest.node_id}",
                "--watch-s", "0.8", "--discover-s", "0.5", "--nats-url", nats_url,
            ]
        )  # fmt: skip
    finally:
        player.cancel()
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"{canary.node_id:<20} {new} regressed: error rate" in out
    assert "halted" in out
    # The canary went back to the old version; the other node was never touched.
    assert canary.node.runtime.version == old
    assert rest.node.runtime.version == old
    assert any(line.startswith(rest.node_id) and "skipped" in line for line in out.splitlines())
    record = await load_record(nc)
    assert record is not None and record.state == "halted" and record.nodes == {}


# ------------------------------------------------------------- no request dropped in a swap


async def stream_to_done(edge: LiveEdge, prompt: str) -> set[str]:
    """Stream one completion to its `[DONE]` (finished by stop or length, no error); the
    fingerprints its chunks carried."""
    fingerprints: set[str] = set()
    finish = None
    body = {
        "model": "hg-edge", "prompt": prompt, "max_tokens": 24, "stream": True,
        "temperature": 0, "local_only": True, "route": "edge",
    }  # fmt: skip
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200, await response.aread()
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            if chunk.get("system_fingerprint"):
                fingerprints.add(chunk["system_fingerprint"])
            if chunk.get("choices"):
                finish = chunk["choices"][0].get("finish_reason") or finish
        assert done, f"stream {prompt!r} ended without [DONE]"
        assert finish in ("stop", "length"), f"stream {prompt!r} finished with {finish!r}"
    return fingerprints


@pytest.mark.slow
async def test_streams_running_through_a_version_swap_all_complete(
    start_edge: Callable[..., Any], nc: Client, two_versions: tuple[str, str]
) -> None:
    old, new = two_versions
    edge = await versioned_edge(start_edge, old, max_active=1, max_queue=32)
    old_runtime = edge.node.runtime
    # The old model's only slot is taken by a held job, so the 8 streams are all admitted by
    # the old model and still queued in it when the swap lands.
    busy = old_runtime.submit(
        old_runtime.encode("busy"), SamplingParams(max_tokens=1), hold_after_prefill=True
    )
    await busy.next_event()
    running = [asyncio.create_task(stream_to_done(edge, f"line {i}")) for i in range(8)]
    await eventually(lambda: old_runtime.in_flight == 9)
    reply = await send_control(nc, edge.node_id, "reload-model", {"version": new}, timeout=120)
    assert reply.ok, reply.message
    assert reply.data["previous_version"] == old
    assert edge.node.runtime is not old_runtime
    assert old_runtime.in_flight == 9  # all 8 cross the swap on the old model
    busy.cancel()
    later = [asyncio.create_task(stream_to_done(edge, f"after {i}")) for i in range(4)]
    results = await asyncio.gather(*running, *later)  # none raised: every stream got [DONE]
    assert results[:8] == [{f"fp_{old}"}] * 8  # finished on the model they started on
    assert results[8:] == [{f"fp_{new}"}] * 4  # started after the swap: the new model


# --------------------------------------------------------------- a cloud model change, no gap


@pytest.mark.slow
async def test_cloud_model_change_start_new_then_drain_old(
    start_cloud_worker: Callable[..., Any], nats_url: str, tiny_models: ModelSet, tmp_path: Path
) -> None:
    new_dir = tmp_path / "cloud-next"  # the worker's model_version is its folder's name
    shutil.copytree(tiny_models.cloud_dir, new_dir)
    small = {"cache_tokens": 2048, "max_batch_tokens": 256}
    old_worker = await start_cloud_worker(tiny_models.cloud_dir, **small)
    seen: list[str | None] = []
    failures: list[str] = []
    stop = asyncio.Event()

    # The API, both workers and the new worker's model load share this test's process: a
    # generous accept timeout keeps a starved event loop from reading as a lost request (a
    # request no worker answers still fails, after it).
    async with serve_cloud_api(nats_url, models=["hg-cloud"], accept_timeout_s=15.0) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        async def keep_asking(index: int) -> None:
            while not stop.is_set():
                try:
                    answer = await client.completions.create(
                        model="hg-cloud", prompt=f"ask {index}", max_tokens=6, temperature=0
                    )
                    seen.append(answer.system_fingerprint)
                except openai.APIError as exc:
                    failures.append(repr(exc))

        askers = [asyncio.create_task(keep_asking(i)) for i in range(3)]
        try:
            await eventually(lambda: len(seen) >= 3)
            new_worker = await start_cloud_worker(new_dir, **small)  # joins the queue group
            joined = len(seen)
            await eventually(lambda: f"fp_{new_worker.model_version}" in seen[joined:])
            assert await old_worker.drain(timeout=30)  # leaves the group, finishes its own
            await old_worker.close()
            drained = len(seen)
            await eventually(lambda: len(seen) >= drained + 6)
        finally:
            stop.set()
            await asyncio.gather(*askers)
            await client.close()
    assert failures == []
    assert f"fp_{old_worker.model_version}" in seen[:joined]
    assert set(seen[drained:]) == {"fp_cloud-next"}


@pytest.mark.slow
async def test_console_rolls_back_a_cli_rollout_from_the_shared_record(
    start_edge: Callable[..., Any], nc: Client, nats_url: str, two_versions: tuple[str, str]
) -> None:
    from tests.test_tui_app import SIZE, connected, seen, until
    from tests.test_tui_ops import console_for
    from tui.rollout import RolloutScreen
    from tui.screens import ConfirmScreen

    old, new = two_versions
    edge = await versioned_edge(start_edge, old)
    bus = ["--nats-url", nats_url, "--discover-s", "0.6", "--watch-s", "0"]
    assert await fleet.run(["rollout", new, *bus]) == 0
    assert edge.node.runtime.version == new
    app = console_for(nats_url)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await seen(pilot, app, edge.node_id)
        await pilot.press("m")
        screen = app.screen
        assert isinstance(screen, RolloutScreen)
        await until(pilot, lambda: screen.changed == {edge.node_id: old}, "the CLI's record")
        await pilot.press("ctrl+b")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: bool(screen.steps) and not screen.running, "rolled back")
        await until(pilot, lambda: edge.node.runtime.version == old, "the old version")
    record = await load_record(nc)
    assert record is not None and record.state == "rolled_back" and record.nodes == {}
