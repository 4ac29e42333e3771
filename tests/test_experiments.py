"""A/B experiments (issue 14): a live edge + a real nats-server + real cloud workers.

The experiment is written, read and deleted by `hybridgen fleet experiment` (run in the
test's loop); the edge applies it from `hg_config`. Assignment is checked against the
deterministic hash (`fleet.experiment.bucket`), never against statistics.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.store import FleetConfig
from fleet.experiment import CONTROL, Experiment, bucket
from hybridgen.fleet import run as fleet
from models.registry import ModelSet, models_home
from tests.fixtures_edge import ADMIN_HEADERS, LiveEdge
from tests.waits import eventually

pytestmark = pytest.mark.slow

VARIANT_MODEL = "hg-cloud-b"


async def ask(edge: LiveEdge, user: str | None, **body: Any) -> tuple[dict[str, Any], Any]:
    """One non-streamed chat request; (its JSON body, its headers)."""
    payload = {
        "model": "hg-edge",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
        "temperature": 0,
        **body,
    }
    if user is not None:
        payload["user"] = user
    async with httpx.AsyncClient(base_url=edge.url, timeout=60, headers=ADMIN_HEADERS) as http:
        response = await http.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200, response.text
    return response.json(), response.headers


def users_of(experiment: Experiment) -> dict[str, str]:
    """A user id assigned to each arm (variant name or `control`), by the hash."""
    found: dict[str, str] = {}
    for i in range(1000):
        user = f"user-{i}"
        variant = experiment.assign(user)
        found.setdefault(CONTROL if variant is None else variant.name, user)
    return found


def test_assignment_is_sticky_and_follows_the_shares() -> None:
    experiment = Experiment.model_validate(
        {"name": "ab", "variants": [{"name": "b", "share": 0.3, "cloud_model": "m"}]}
    )
    users = [f"u{i}" for i in range(2000)]
    first = [experiment.assign(u) for u in users]
    assert first == [experiment.assign(u) for u in users]  # sticky
    # A user is in the variant exactly when its hash falls below the share.
    assert [v is not None for v in first] == [bucket("ab", u) < 0.3 for u in users]
    # The experiment's name salts the hash: another experiment splits users differently.
    assert [bucket("ab", u) for u in users[:20]] != [bucket("cd", u) for u in users[:20]]
    with pytest.raises(ValueError, match="exactly one"):
        Experiment.model_validate({"name": "x", "variants": [{"name": "b", "share": 0.5}]})
    with pytest.raises(ValueError, match="more than 1"):
        Experiment.model_validate(
            {
                "name": "x",
                "variants": [
                    {"name": "b", "share": 0.7, "cloud_model": "m"},
                    {"name": "c", "share": 0.7, "cloud_model": "n"},
                ],
            }
        )


async def test_cloud_model_variant(
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
    nc: Client,
    nats_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    control_worker = await start_worker()
    variant_worker = await start_worker(model=VARIANT_MODEL)
    edge = await start_edge(telemetry_interval_s=0.2)
    events: list[wire.Event] = []
    beats: list[wire.Heartbeat] = []

    async def on_event(msg: Any) -> None:
        events.append(wire.decode(msg.data, wire.Event))

    async def on_beat(msg: Any) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    await nc.subscribe(subjects.events("edge", edge.node_id), cb=on_event)
    await nc.subscribe(subjects.telemetry("edge", edge.node_id), cb=on_beat)
    url = ["--nats-url", nats_url]

    # No experiment: answers carry no variant.
    body, headers = await ask(edge, "someone", route="cloud")
    assert "variant" not in body and "x-hybridgen-variant" not in headers

    start = ["experiment", "start", "ab1", "--cloud-model", VARIANT_MODEL, "--share", "0.5"]
    assert await fleet([*start, *url]) == 0
    assert "ab1" in capsys.readouterr().out
    await eventually(lambda: edge.node.experiments.experiment is not None)
    experiment = edge.node.experiments.experiment
    arms = users_of(experiment)
    variant_user, control_user = arms["b"], arms[CONTROL]

    # A second start is refused while one runs.
    assert await fleet([*start, *url]) == 1
    assert "stop it first" in capsys.readouterr().err

    # The variant user's feedback counts for the variant that served them last.
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS) as http:
        assert (await http.put(f"/v1/users/{variant_user}", json={})).status_code == 200

    served: dict[str, str] = {}
    for _ in range(3):  # sticky: the same user, the same variant, every time
        for user, arm in ((variant_user, "b"), (control_user, CONTROL)):
            body, headers = await ask(edge, user, route="cloud")
            assert body["variant"] == arm and headers["x-hybridgen-variant"] == arm
            assert body["served_by"] == "cloud"
            served[body["request_id"]] = arm

    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS) as http:
        feedback = {"accepted": "a nice answer", "rejected": "a bad one"}
        response = await http.post(f"/v1/users/{variant_user}/feedback", json=feedback)
        assert response.status_code == 200

    # Streamed: every chunk says the variant.
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=60, headers=ADMIN_HEADERS) as http,
        http.stream(
            "POST",
            "/v1/completions",
            json={
                "model": "hg-edge",
                "prompt": "The",
                "max_tokens": 3,
                "stream": True,
                "user": variant_user,
                "route": "cloud",
            },
        ) as response,
    ):
        assert response.headers["x-hybridgen-variant"] == "b"
        chunks = [
            json.loads(line[6:])
            async for line in response.aiter_lines()
            if line.startswith("data: {")
        ]
    assert chunks and all(chunk["variant"] == "b" for chunk in chunks)

    # The variant's cloud requests went to the variant's model, the others to the node's.
    def request_events() -> dict[str, wire.Event]:
        return {e.request_id: e for e in events if e.kind == "request" and e.request_id}

    await eventually(lambda: set(served) <= set(request_events()))
    for request_id, arm in served.items():
        data = request_events()[request_id].data
        assert data["variant"] == arm
        worker = variant_worker if arm == "b" else control_worker
        assert data["worker"] == worker.node_id

    # The heartbeat reports each variant's figures.
    def reported() -> dict[str, Any]:
        last = beats[-1].extra if beats else {}
        return last.get("variants", {}) if last.get("experiment") == "ab1" else {}

    await eventually(
        lambda: (
            reported().get("b", {}).get("requests", 0) >= 4
            and reported().get("b", {}).get("feedback_accepted") == 1
        )
    )
    figures = reported()
    assert figures["b"]["feedback_rejected"] == 1
    assert figures["b"]["cloud_share"] == 1.0 and figures["b"]["error_rate"] == 0.0
    assert figures["b"]["latency_p50_ms"] is not None and figures["b"]["tokens_per_s"] > 0
    assert figures[CONTROL]["requests"] == 3 and figures[CONTROL]["feedback_accepted"] == 0

    # `status` adds up the edges' figures.
    assert await fleet(["experiment", "status", "--seconds", "1", "--json", *url]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["edges"] == [edge.node_id]
    assert status["variants"]["b"]["requests"] >= 4
    assert status["variants"][CONTROL]["requests"] == 3
    assert await fleet(["experiment", "status", "--seconds", "1", *url]) == 0
    text = capsys.readouterr().out
    assert "accept/reject" in text and "1/1" in text and "control" in text

    # `stop` ends it: answers carry no variant again, and the arms' routing is gone.
    assert await fleet(["experiment", "stop", *url]) == 0
    assert "stopped" in capsys.readouterr().out
    await eventually(lambda: edge.node.experiments.experiment is None)
    body, headers = await ask(edge, variant_user, route="cloud")
    assert "variant" not in body and "x-hybridgen-variant" not in headers
    await eventually(lambda: body["request_id"] in request_events())
    assert request_events()[body["request_id"]].data["worker"] == control_worker.node_id
    assert "variant" not in request_events()[body["request_id"]].data
    config = await FleetConfig.open(nc)
    assert await config.get("experiment") is None


async def test_edge_model_set_variant(
    start_edge: Callable[..., Any],
    tiny_models: ModelSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nats_url: str,
) -> None:
    # A second model set: the tiny set copied under another version name.
    home = tmp_path / "home"
    root = models_home(home) / "tiny-b"
    shutil.copytree(tiny_models.root, root)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    manifest["version"] = "tiny-b"
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    monkeypatch.setenv("HG_HOME", str(home))

    edge = await start_edge(policy={"perplexity_threshold": 1e9})
    assert edge.node.runtime.version == "tiny-test"
    url = ["--nats-url", nats_url]
    start = ["experiment", "start", "ab2", "--edge-version", "tiny-b", "--share", "0.5"]
    assert await fleet([*start, *url]) == 0
    await eventually(lambda: edge.node.experiments.edge_runtime is not None, "its runtime")
    experiment = edge.node.experiments.experiment
    assert experiment is not None
    arms = users_of(experiment)

    for _ in range(2):
        body, _ = await ask(edge, arms["b"])
        assert (body["variant"], body["served_by"]) == ("b", "edge")
        assert body["system_fingerprint"] == "fp_tiny-b"  # the variant's model set served it
        body, _ = await ask(edge, arms[CONTROL])
        assert (body["variant"], body["served_by"]) == (CONTROL, "edge")
        assert body["system_fingerprint"] == "fp_tiny-test"  # the node's own model set

    # Asked for the cloud while no worker is there: each arm is answered locally, by its own
    # model set (the variant's request is recorded under the variant, so it must be its model).
    for arm, version in (("b", "tiny-b"), (CONTROL, "tiny-test")):
        body, _ = await ask(edge, arms[arm], route="cloud")
        assert (body["served_by"], body["route_reason"]) == ("edge", "cloud_unavailable")
        assert (body["variant"], body["system_fingerprint"]) == (arm, f"fp_{version}")

    assert await fleet(["experiment", "stop", *url]) == 0
    await eventually(lambda: edge.node.experiments.experiment is None)
    assert edge.node.experiments.edge_runtime is None  # unloaded
    body, _ = await ask(edge, arms["b"])
    assert "variant" not in body and body["system_fingerprint"] == "fp_tiny-test"


async def test_console_shows_and_stops_the_experiment(
    start_edge: Callable[..., Any], nats_url: str, nc: Client
) -> None:
    from textual.widgets import DataTable, Input, Static

    from broker.settings import BusSettings
    from tests.test_tui_app import connected, until
    from tui.app import HybridgenConsole
    from tui.experiment import ExperimentScreen
    from tui.screens import ConfirmScreen

    edge = await start_edge(policy={"perplexity_threshold": 1e9}, telemetry_interval_s=0.2)
    config = await FleetConfig.open(nc)
    app = HybridgenConsole(BusSettings(url=nats_url))
    async with app.run_test(size=(140, 40)) as pilot:
        await connected(pilot, app)
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ExperimentScreen), "experiment screen")
        screen = app.screen
        assert isinstance(screen, ExperimentScreen)
        current = screen.query_one("#experiment-current", Static)
        await until(pilot, lambda: "no experiment" in str(current.render()), "none running")

        # Start one from the form (cloud variant, no worker needed: these stay local).
        form = screen.query_one("#experiment-form", Input)
        form.focus()
        form.value = "ab3 cloud:hg-cloud-b 0.5"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "asks first")
        await pilot.press("y")
        await until(pilot, lambda: edge.node.experiments.experiment is not None, "edge applies it")
        assert (await config.get("experiment") or {}).get("name") == "ab3"
        await ask(edge, "someone")

        # The edge's heartbeats fill the variants table.
        table = screen.query_one("#experiment-variants", DataTable)

        def rows() -> list[str]:
            return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]

        await until(pilot, lambda: len(rows()) >= 1, "variant figures")
        assert "experiment ab3" in str(current.render())
        assert edge.node_id in str(current.render())
        arm = Experiment.model_validate(await config.get("experiment")).assign("someone")
        assert rows() == [CONTROL if arm is None else arm.name]

        # Stop it: asks, deletes the key, the edge ends it.
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "asks first")
        await pilot.press("y")
        await until(pilot, lambda: edge.node.experiments.experiment is None, "edge stops it")
        assert await config.get("experiment") is None
        await until(pilot, lambda: "no experiment" in str(current.render()), "shown stopped")
