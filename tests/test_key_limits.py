"""Per-key limits and usage at the cloud API (`serving.limits`, `serving.usage`): a real
nats-server, a real cloud worker on a random Llama and the cloud API under a real uvicorn.

A limiter's clock is a `StepClock` the test moves (no sleeping): the buckets refill only
when it says.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.store import FleetConfig
from cloud.settings import ApiSettings
from serving.limits import LIMITS_KEY, Limits, format_duration, parse_rules
from tests.fixtures_cloud import live_cloud_api
from tests.waits import eventually

pytestmark = pytest.mark.slow

ALICE = "alice-secret-key"
BOB = "bob-secret-key"
ADMIN = "admin-secret-key"
MODEL = "hg-cloud"


def sha(key: str, digits: int = 12) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:digits]


class StepClock:
    """A monotonic clock that moves only when the test says (`advance`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def start_worker(start_cloud_worker: Callable[..., Any], cloud_long_model: Path) -> Any:
    return functools.partial(start_cloud_worker, cloud_long_model, model=MODEL)


@asynccontextmanager
async def cloud_api(
    nats_url: str, limits: dict[str, Any], clock: StepClock | None = None, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Limits]]:
    """The cloud API with keys alice, bob and admin (`@*`) and `limits`; yields a client on it
    and its `Limits` (on `clock` when given)."""
    async with live_cloud_api(
        nats_url,
        api_keys=[ALICE, BOB, f"{ADMIN}@*"],
        models=[MODEL],
        key_limits=limits,
        **settings,
    ) as (server, url):
        state: Limits = server.config.app.state.limits
        if clock is not None:
            state.clock = clock
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            yield http, state


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def complete(http: httpx.AsyncClient, key: str, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **body}
    return await http.post("/v1/completions", json=payload, headers=as_key(key))


async def usage(http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.get("/v1/usage", headers=as_key(ADMIN))
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


# --------------------------------------------------------------------------------- pure rules


def test_rules_name_keys_by_hash_prefix_and_refuse_what_names_no_key() -> None:
    rules = parse_rules(json.dumps({"alice": {"key_sha256": sha(ALICE), "rpm": 2}}), where="X")
    assert rules["alice"].limits() == {"rpm": 2}
    auto = parse_rules({f"key-{sha(BOB, 8)}": {"tpm": 50}}, where="X")
    assert auto[f"key-{sha(BOB, 8)}"].key_sha256 == sha(BOB, 8)
    with pytest.raises(ValueError, match="names no key"):
        parse_rules({"carol": {"rpm": 1}}, where="X")
    with pytest.raises(ValueError, match="rpm"):
        parse_rules({"*": {"rpm": 0}}, where="X")
    assert [format_duration(s) for s in (0.02, 1.5, 30, 60, 90)] == [
        "20ms",
        "1.5s",
        "30s",
        "1m0s",
        "1m30s",
    ]


# ------------------------------------------------------------------------------- the limits


async def test_requests_per_minute_give_429_with_openai_headers(
    nats_url: str, start_worker: Any
) -> None:
    await start_worker()
    clock = StepClock()
    limits = {"alice": {"key_sha256": sha(ALICE), "rpm": 2}}
    async with cloud_api(nats_url, limits, clock) as (http, _):
        first, second = await complete(http, ALICE), await complete(http, ALICE)
        assert (first.status_code, second.status_code) == (200, 200)
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        assert second.headers["x-ratelimit-reset-requests"] == "1m0s"
        assert "x-ratelimit-limit-tokens" not in first.headers  # no tpm set

        refused = await complete(http, ALICE)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
        assert "'alice'" in error["message"] and ALICE not in refused.text
        assert refused.headers["retry-after"] == "30"  # one request refills in 30 s
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"

        # Another key is not limited, and its answers carry no limit headers.
        other = await complete(http, BOB)
        assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers
        clock.advance(30)
        again = await complete(http, ALICE)
        assert again.status_code == 200
        assert again.headers["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_per_minute_are_estimated_then_settled(
    nats_url: str, start_worker: Any
) -> None:
    await start_worker()
    clock = StepClock()
    limits = {"alice": {"key_sha256": sha(ALICE), "tpm": 100}}
    async with cloud_api(nats_url, limits, clock) as (http, _):
        first = await complete(http, ALICE, max_tokens=40)
        assert first.status_code == 200, first.text
        used = first.json()["usage"]["total_tokens"]
        # The estimate (prompt / 4 + max_tokens) was replaced by the answer's real usage.
        assert first.headers["x-ratelimit-limit-tokens"] == "100"
        assert first.headers["x-ratelimit-remaining-tokens"] == str(100 - used)

        too_big = await complete(http, ALICE, max_tokens=200)  # more than a minute's tokens
        assert too_big.status_code == 429 and "retry-after" not in too_big.headers
        assert too_big.json()["error"]["type"] == "tokens"
        assert "lower max_tokens" in too_big.json()["error"]["message"]

        second = await complete(http, ALICE, max_tokens=40)
        assert second.status_code == 200
        left = 100 - used - second.json()["usage"]["total_tokens"]
        refused = await complete(http, ALICE, max_tokens=40)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        wanted = 2 + 40  # "Hello": 5 characters, 2 tokens by the estimate
        assert refused.headers["retry-after"] == str(-(-(wanted - left) * 60 // 100))
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(left)


async def test_concurrent_requests_past_the_limit_are_shed_at_once(
    nats_url: str, start_worker: Any
) -> None:
    await start_worker()
    limits = {"alice": {"key_sha256": sha(ALICE), "concurrent": 1}}
    async with cloud_api(nats_url, limits) as (http, state):
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3000, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body, headers=as_key(ALICE)) as s:
            assert s.status_code == 200
            lines = s.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            refused = await complete(http, ALICE)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert "in flight" in refused.json()["error"]["message"]
            assert (await complete(http, BOB)).status_code == 200  # another key's slots
        await eventually(lambda: state.states["alice"].in_flight == 0, "the stream released")
        assert (await complete(http, ALICE)).status_code == 200


# -------------------------------------------------------------------------------- the usage


async def test_usage_counts_answers_streams_and_cancelled_streams(
    nats_url: str, start_worker: Any
) -> None:
    await start_worker()
    limits = {"alice": {"key_sha256": sha(ALICE), "rpm": 100}}
    async with cloud_api(nats_url, limits) as (http, _):
        whole = (await complete(http, ALICE, max_tokens=5)).json()["usage"]
        body = {"model": MODEL, "prompt": "Hi there", "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        chunks = []
        async with http.stream("POST", "/v1/completions", json=body, headers=as_key(ALICE)) as s:
            assert s.headers["x-ratelimit-limit-requests"] == "100"  # on the stream's start
            async for line in s.aiter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        streamed = chunks[-1]["usage"]
        expected = {
            "requests": 2,
            "input_tokens": whole["prompt_tokens"] + streamed["prompt_tokens"],
            "output_tokens": whole["completion_tokens"] + streamed["completion_tokens"],
        }
        assert (await usage(http))["keys"] == {"alice": {MODEL: expected}}

        # A client that hangs up mid-stream: what was generated is counted, once.
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3000, "stream": True}
        received = 0
        async with http.stream("POST", "/v1/completions", json=body, headers=as_key(BOB)) as s:
            async for line in s.aiter_lines():
                received += line.startswith("data: {")
                if received == 6:
                    break

        async def bob() -> Any:
            return (await usage(http))["keys"].get(f"key-{sha(BOB, 8)}")

        counted = (await eventually(bob, "the cancelled stream counted"))[MODEL]
        assert counted["requests"] == 1
        assert counted["input_tokens"] == 2  # the estimate: "Hello" is 5 characters
        assert received - 1 <= counted["output_tokens"] < 3000  # the first chunk has no text
        metrics = (await http.get("/metrics")).text
        alice = f'key="alice",model="{MODEL}"'
        assert f"hybridgen_cloud_api_key_requests_total{{{alice}}} 2.0" in metrics
        output = f'key="alice",kind="output",model="{MODEL}"'  # labels come sorted
        line = f"hybridgen_cloud_api_key_tokens_total{{{output}}} {expected['output_tokens']}.0"
        assert line in metrics


async def test_usage_is_for_admin_keys_only(nats_url: str) -> None:
    async with cloud_api(nats_url, {}) as (http, _):
        assert (await http.get("/v1/usage")).status_code == 401
        refused = await http.get("/v1/usage", headers=as_key(ALICE))
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "forbidden"
        assert (await http.get("/v1/usage", headers=as_key(ADMIN))).status_code == 200


async def test_an_admin_key_reads_usage_and_leaves_the_api_open(nats_url: str) -> None:
    """`admin_keys` (what `hybridgen up` gives its cloud API): usage needs one, the rest of a
    loopback API stays open to anonymous clients; an entry must be `KEY@*`."""
    async with (
        live_cloud_api(nats_url, admin_keys=[f"{ADMIN}@*"], models=[MODEL]) as (_, url),
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        assert (await http.get("/v1/models")).status_code == 200
        refused = await http.get("/v1/usage")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        assert (await http.get("/v1/usage", headers=as_key(ALICE))).status_code == 401
        assert (await http.get("/v1/usage", headers=as_key(ADMIN))).status_code == 200
    with pytest.raises(ValueError, match=r"--admin-key entry 1: give an admin key as KEY@\*"):
        ApiSettings(admin_keys=[ADMIN]).key_ring()


async def test_a_limit_changes_live_through_the_fleet_config(
    nats_url: str, nc: Client, start_worker: Any
) -> None:
    await start_worker()
    clock = StepClock()
    async with cloud_api(nats_url, {}, clock) as (http, state):
        await eventually(lambda: state.live_updates >= 1, "the limits watch started")
        config = await FleetConfig.open(nc)
        # `hybridgen fleet limits --set` checks the value with the APIs' rule, then stores it.
        from hybridgen.fleet import run

        assert await run(["limits", "--set", '{"alice": {"rpm": 1}}', "--nats-url", nats_url]) == 1
        rule = json.dumps({"alice": {"key_sha256": sha(ALICE), "rpm": 1}})
        assert await run(["limits", "--set", rule, "--nats-url", nats_url]) == 0
        await eventually(lambda: state.live_updates >= 2, "the new limits in force")
        assert (await complete(http, ALICE)).status_code == 200
        refused = await complete(http, ALICE)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
        await config.put(LIMITS_KEY, {"alice": {"key_sha256": sha(ALICE), "rpm": 3}})
        await eventually(lambda: state.live_updates >= 3, "the raised limit in force")
        raised = await complete(http, ALICE)
        assert raised.status_code == 200
        assert raised.headers["x-ratelimit-limit-requests"] == "3"
        assert raised.headers["x-ratelimit-remaining-requests"] == "1"
        await config.delete(LIMITS_KEY)
        await eventually(lambda: state.live_updates >= 4, "the limits deleted")
        assert "x-ratelimit-limit-requests" not in (await complete(http, ALICE)).headers


async def fleet_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """`hybridgen fleet ARGV` in this event loop; its JSON output."""
    from hybridgen.fleet import run

    capsys.readouterr()
    assert await run(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


async def test_two_api_instances_usage_is_summed_by_the_console(
    nats_url: str, nc: Client, start_worker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from tui.state import FleetState

    await start_worker()
    fleet = FleetState()

    async def on_beat(msg: Any) -> None:
        fleet.apply_heartbeat(wire.decode(msg.data, wire.Heartbeat))

    await nc.subscribe(subjects.telemetry_of_role("api"), cb=on_beat)
    named = {"alice": {"key_sha256": sha(ALICE)}}
    async with (
        cloud_api(nats_url, named, node_id="api-one") as (one, _),
        cloud_api(nats_url, named, node_id="api-two") as (two, _),
    ):
        answers = [await complete(one, ALICE), await complete(two, ALICE)]
        answers.append(await complete(two, BOB))
        totals = [a.json()["usage"] for a in answers]
        assert (await usage(one))["keys"]["alice"][MODEL]["requests"] == 1  # its own count
        expected = {
            "alice": {
                MODEL: {
                    "requests": 2,
                    "input_tokens": totals[0]["prompt_tokens"] + totals[1]["prompt_tokens"],
                    "output_tokens": totals[0]["completion_tokens"]
                    + totals[1]["completion_tokens"],
                }
            },
            f"key-{sha(BOB, 8)}": {
                MODEL: {
                    "requests": 1,
                    "input_tokens": totals[2]["prompt_tokens"],
                    "output_tokens": totals[2]["completion_tokens"],
                }
            },
        }
        await eventually(lambda: fleet.summary().usage == expected, "both instances summed")

        # The same sum from the command line: `hybridgen fleet usage --json`.
        out = await fleet_cli(capsys, "usage", "--json", "--nats-url", nats_url)
        assert out["nodes"] == ["api-one", "api-two"] and out["keys"] == expected


async def test_the_api_role_reads_the_limits_but_cannot_write_them(bus: Any) -> None:
    from tests.fixtures_secure_bus import kv_put_fails

    ops, api = await bus.connect("ops"), await bus.connect("api")
    await (await FleetConfig.open(ops)).put(LIMITS_KEY, {"*": {"rpm": 5}})
    assert await (await FleetConfig.open(api)).get(LIMITS_KEY) == {"*": {"rpm": 5}}
    bus.no_violation("api")
    await kv_put_fails(api, LIMITS_KEY)
    await bus.violation("api", f"$KV.{subjects.CONFIG_BUCKET}.{LIMITS_KEY}")


def test_the_console_summary_lists_usage_by_key_summed_over_instances() -> None:
    from tui.fleet_summary import summarize
    from tui.summary import usage_text

    def beat(node: str, usage: dict[str, Any]) -> wire.Heartbeat:
        return wire.Heartbeat(role="api", node_id=node, extra={"usage": usage})

    one = {"alice": {MODEL: {"requests": 2, "input_tokens": 10, "output_tokens": 30}}}
    two = {"alice": {MODEL: {"requests": 1, "input_tokens": 5, "output_tokens": 7}},
           "bob": {"other": {"requests": 4, "input_tokens": 1, "output_tokens": 2}}}  # fmt: skip
    summary = summarize(["ready", "ready"], [beat("api-1", one), beat("api-2", two)])
    assert summary.usage["alice"][MODEL] == {
        "requests": 3,
        "input_tokens": 15,
        "output_tokens": 37,
    }
    assert usage_text(summary).plain.splitlines() == [
        "key                       requests   input  output",
        "alice                            3      15      37",
        "bob                              4       1       2",
    ]
    empty = summarize(["ready"], [beat("api-1", {})])
    assert empty.usage == {} and usage_text(empty).plain == ""


async def test_the_summary_screen_shows_usage_by_key(console: Any, nc: Client) -> None:
    from textual.widgets import Static

    from tests.test_tui_app import connected, publish_beat, seen
    from tui.summary import SummaryScreen

    async with console.run_test(size=(100, 30)) as pilot:
        await connected(pilot, console)
        one = {"alice": {MODEL: {"requests": 2, "input_tokens": 10, "output_tokens": 30}}}
        two = {"alice": {MODEL: {"requests": 1, "input_tokens": 5, "output_tokens": 7}}}
        await publish_beat(nc, "api-1", role="api", extra={"usage": one})
        await publish_beat(nc, "api-2", role="api", extra={"usage": two})
        await seen(pilot, console, "api-1", "api-2")
        await pilot.press("o")
        screen = console.screen
        assert isinstance(screen, SummaryScreen)

        def shown() -> list[list[str]]:
            usage = screen.query_one("#summary-usage", Static)
            lines = str(usage.render()).splitlines()
            return [line.split() for line in lines[1:]] if usage.display else []

        await eventually(lambda: shown() == [["alice", "3", "15", "37"]], "alice's usage")
