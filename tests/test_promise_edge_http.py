"""Promises of README.md and docs/edge.md about the edge's HTTP API that no other test keeps.

Where and why in every chunk, the route counter on `/metrics`, what an API key leaves open,
the `Host` names an edge answers to, the profile fields' bounds, when the users' file is
made, and how a persona is laid out in front of a request. A live edge (real uvicorn, the
session's tiny int4 model) where the answer matters; the edge app in-process (its real
middleware, no model) where only the guard in front of it does.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.api.app import create_app
from edge.cli import main as edge_main
from edge.settings import EdgeSettings
from models.registry import ModelSet
from tests.fixtures_edge import ADMIN_HEADERS, LiveEdge
from tests.fixtures_models import copy_model_set

#: The perplexity rule off: a local answer is `in_domain` whatever the tiny model thinks.
LOCAL = {"perplexity_threshold": 1e9}
PERSONA = "Answers tersely, with shell one-liners."
WHERE = ("served_by", "route_reason", "request_id")
HEADERS = {
    "served_by": "x-hybridgen-served-by",
    "route_reason": "x-hybridgen-route-reason",
    "request_id": "x-request-id",
}


def data_events(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON events of an SSE answer (it must end with `[DONE]`)."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


async def streamed(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[Any, list]:
    async with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        return response.headers, data_events(lines)


# ----------------------------------------------------------------- where and why (README)


async def test_where_and_why_are_in_the_body_the_headers_and_every_chunk(
    start_edge: Callable[..., Any],
) -> None:
    edge: LiveEdge = await start_edge(no_cloud=True, policy=LOCAL)
    chat = {"model": "hg-edge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    text = {"model": "hg-edge", "prompt": "The program", "max_tokens": 4}
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", text)):
            whole = await http.post(path, json=body)
            assert whole.status_code == 200, whole.text
            answer = whole.json()
            assert (answer["served_by"], answer["route_reason"]) == ("edge", "in_domain")
            assert {f: whole.headers[h] for f, h in HEADERS.items()} == {
                f: answer[f] for f in WHERE
            }
            headers, chunks = await streamed(http, path, body)
            assert len(chunks) >= 2  # the first (role) and at least the last
            wanted = {f: headers[h] for f, h in HEADERS.items()}
            assert wanted["served_by"] == "edge" and wanted["route_reason"] == "in_domain"
            for chunk in chunks:
                assert {f: chunk[f] for f in WHERE} == wanted, chunk


async def test_a_set_whose_two_ends_share_weights_answers_at_the_edge_by_default(
    start_edge: Callable[..., Any], tiny_models: ModelSet, tmp_path: Path
) -> None:
    """README, "Calling the edge" and "Models": on a model set whose ends run the same
    weights (the default SmolLM2 set, `routing.mode: same_weights`), with no policy, the
    edge answers without a confidence rule: `route_reason: edge_default`."""
    same = copy_model_set(tiny_models, tmp_path / "home")
    manifest_path = same.root / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["routing"] = {"mode": "same_weights", "perplexity_threshold": None}
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    edge: LiveEdge = await start_edge(no_cloud=True, model_dir=same.edge_dir("int4"))
    body = {"model": "hg-edge", "prompt": "The program", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        answer = (await http.post("/v1/completions", json=body)).json()
    assert (answer["served_by"], answer["route_reason"]) == ("edge", "edge_default")
    assert edge.node.threshold_source == "off"


async def test_metrics_count_each_answer_by_where_and_why(start_edge: Callable[..., Any]) -> None:
    """docs/edge.md, "Running it": `hybridgen_edge_routes_total{served_by,route_reason}`."""
    edge: LiveEdge = await start_edge(no_cloud=True, policy=LOCAL)
    body = {"model": "hg-edge", "prompt": "The program", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        for extra in ({"local_only": True}, {"local_only": True}, {}):
            assert (await http.post("/v1/completions", json={**body, **extra})).status_code == 200
        scraped = (await http.get("/metrics")).text
    counts = {
        (sample.labels["served_by"], sample.labels["route_reason"]): sample.value
        for family in text_string_to_metric_families(scraped)
        if family.name == "hybridgen_edge_routes"
        for sample in family.samples
        if sample.name == "hybridgen_edge_routes_total"
    }
    assert counts == {("edge", "local_only"): 2.0, ("edge", "in_domain"): 1.0}


# ------------------------------------------------------------------- keys (docs/edge.md)


async def test_an_api_key_leaves_only_health_readiness_and_metrics_open(
    start_edge: Callable[..., Any],
) -> None:
    """docs/edge.md, "Keys": with `HG_EDGE_API_KEYS`, every route but `/healthz`, `/readyz`
    and `/metrics` is refused (401) without a key."""
    edge: LiveEdge = await start_edge(no_cloud=True, api_keys=["edge-key"], user_keys=[])
    completion = {"model": "hg-edge", "prompt": "x", "max_tokens": 1}
    chat = {"model": "hg-edge", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        for response in (
            await http.get("/v1/models"),
            await http.get("/v1/models/hg-edge"),
            await http.post("/v1/completions", json=completion),
            await http.post("/v1/chat/completions", json=chat),
            await http.get("/v1/users/alice"),
        ):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "unauthorized"
        keyed = await http.post(
            "/v1/completions", json=completion, headers={"Authorization": "Bearer edge-key"}
        )
        assert keyed.status_code == 200, keyed.text


def test_a_bad_key_entry_stops_the_edge_naming_the_setting_and_position(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/edge.md, "Keys": an entry that does not parse stops the edge at start with a
    message naming the setting and the entry's position, never the key."""
    status = edge_main(["--no-cloud", "--api-key", "good-one", "--api-key", "s3cret key"])
    assert status == 2
    err = capsys.readouterr().err
    assert "HG_EDGE_API_KEYS / --api-key entry 2" in err
    assert "s3cret" not in err
    status = edge_main(["--no-cloud", "--user-key", "u@alice", "--user-key", "s3cret-no-users"])
    assert status == 2
    err = capsys.readouterr().err
    assert "HG_EDGE_USER_KEYS / --user-key entry 2" in err
    assert "s3cret" not in err


# ---------------------------------------------------------- Host and Origin (docs/edge.md)


async def guard_status(settings: EdgeSettings, host: str, origin: str | None = None) -> int:
    """The status of `GET /healthz` with this `Host` (and `Origin`) on the edge app."""
    transport = httpx.ASGITransport(app=create_app(settings))
    headers = {"Host": host, **({"Origin": origin} if origin else {})}
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        return (await http.get("/healthz", headers=headers)).status_code


@pytest.mark.parametrize(
    ("settings", "host", "status"),
    [
        ({}, "127.0.0.1:8400", 200),
        ({}, "localhost:8400", 200),
        ({}, "edge.lan:8400", 403),
        ({"allowed_hosts": ["edge.lan"]}, "edge.lan:8400", 200),
        ({"allowed_hosts": ["edge.lan"]}, "other.lan:8400", 403),
        ({"allowed_hosts": ["*"]}, "anything.example:8400", 200),
        ({"advertise_url": "http://kitchen.local:8400"}, "kitchen.local:8400", 200),
        ({"advertise_url": "http://kitchen.local:8400"}, "hall.local:8400", 403),
        ({"host": "0.0.0.0", "api_keys": ["k"]}, "192.0.2.7:8400", 200),  # any IP address
        # (port 0: no advertised URL, whose host would be the machine's name too)
        ({"host": "0.0.0.0", "port": 0, "api_keys": ["k"]}, f"{socket.gethostname()}:80", 200),
        ({"host": "0.0.0.0", "api_keys": ["k"]}, "evil.example:8400", 403),
        ({}, "192.0.2.7:8400", 403),  # a loopback edge: no other address
    ],
)
async def test_the_host_header_must_name_the_edge(
    edge_dir: Path, settings: dict[str, Any], host: str, status: int
) -> None:
    """docs/edge.md, "Browsers kept out": its bind host, localhost, the host of
    `advertise_url`, `HG_EDGE_ALLOWED_HOSTS` (`*`: any); bound to 0.0.0.0 also the
    machine's name and any IP address; anything else 403."""
    edge = EdgeSettings(model_dir=edge_dir, no_cloud=True, **settings)
    assert await guard_status(edge, host) == status


async def test_the_edges_own_origin_is_allowed(edge_dir: Path) -> None:
    """docs/edge.md, "Origin": refused unless allowed "or the edge's own"."""
    edge = EdgeSettings(model_dir=edge_dir, no_cloud=True)
    assert await guard_status(edge, "127.0.0.1:8400", "http://127.0.0.1:8400") == 200
    assert await guard_status(edge, "127.0.0.1:8400", "http://127.0.0.1:3000") == 403


# ------------------------------------------------------------- users (docs/edge.md)


async def test_profile_fields_are_bounded_and_a_form_body_is_415(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    """docs/edge.md, "Personalization": `display_name` up to 200 characters, `persona` up to
    8000, `temperature` 0-2, `top_p` (0, 1], `max_tokens` 1-32768, `presence_penalty` and
    `frequency_penalty` -2 to 2, `repetition_penalty` (0, 2]; a POST that is not JSON
    (`multipart/form-data` too) is 415; `reset` takes an empty JSON body."""
    edge: LiveEdge = await start_edge(no_cloud=True, users_db=tmp_path / "users.sqlite3")
    async with httpx.AsyncClient(base_url=f"{edge.url}/v1/users", headers=ADMIN_HEADERS) as http:
        for field, good, bad in (
            ("display_name", "n" * 200, "n" * 201),
            ("persona", "p" * 8000, "p" * 8001),
            ("temperature", 2.0, 2.01),
            ("temperature", 0.0, -0.01),
            ("top_p", 1.0, 0.0),
            ("top_p", 0.01, 1.01),
            ("max_tokens", 32768, 32769),
            ("max_tokens", 1, 0),
            ("presence_penalty", 2.0, 2.01),
            ("frequency_penalty", -2.0, -2.01),
            ("repetition_penalty", 2.0, 2.01),
            ("repetition_penalty", 0.01, 0.0),
        ):
            put = await http.put("/kim", json={field: good})
            assert put.status_code == 200, (field, good, put.text)
            assert put.json()[field] == good
            refused = await http.put("/kim", json={field: bad})
            assert refused.status_code == 400, (field, bad, refused.text)
            assert refused.json()["error"]["param"] == field
            assert (await http.get("/kim")).json()[field] == good  # nothing half-applied
        form = await http.post("/kim/feedback", files={"accepted": (None, "text")})
        assert form.status_code == 415, form.text
        assert form.json()["error"]["code"] == "bad_request"
        reset = await http.post("/kim/reset", headers={"content-type": "application/json"})
        assert reset.status_code == 200, reset.text
        assert reset.json()["reset"] is True


async def test_the_users_file_is_made_when_a_user_route_is_first_used(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    """docs/edge.md, "What stays on the device": created the first time a user route is
    used, with three tables, `users`, `feedback` and `learned`."""
    db = tmp_path / "edge" / "users.sqlite3"
    edge: LiveEdge = await start_edge(no_cloud=True, users_db=db, policy=LOCAL)
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS, timeout=60) as http:
        body = {"model": "hg-edge", "prompt": "Hello", "max_tokens": 2}
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        assert not db.exists()  # a plain completion opens nothing
        assert (await http.put("/v1/users/lee", json={})).status_code == 200
    assert db.exists()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as reader:
        tables = {
            row[0] for row in reader.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    assert tables == {"users", "feedback", "learned"}


# ------------------------------------------------- the persona's place (README, edge.md)


def content(answer: dict[str, Any]) -> str:
    choice = answer["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


async def both(
    http: httpx.AsyncClient, path: str, personal: dict[str, Any], plain: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The answers to a request of user `pat` (a persona, nothing learned) and to a plain
    one; both read the same prompt tokens."""
    common = {"model": "hg-edge", "max_tokens": 6, "temperature": 0, "route": "edge"}
    mine = await http.post(path, json={**common, **personal, "user": "pat"})
    theirs = await http.post(path, json={**common, **plain})
    assert mine.status_code == theirs.status_code == 200, (mine.text, theirs.text)
    a, b = mine.json(), theirs.json()
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    return a, b


async def same_answer(
    http: httpx.AsyncClient, path: str, personal: dict[str, Any], plain: dict[str, Any]
) -> None:
    """The personalized request reads the same prompt as the plain one, and greedy decoding
    gives the same text."""
    scores = {"logprobs": True, "top_logprobs": 1} if "messages" in plain else {"logprobs": 1}
    mine, theirs = await both(http, path, {**personal, **scores}, {**plain, **scores})
    assert content(mine) == content(theirs)
    # The same prompt gives the same scores (up to the float noise of a reused prefix).
    assert logprobs(mine) == pytest.approx(logprobs(theirs), abs=1e-3)


def logprobs(answer: dict[str, Any]) -> list[float]:
    scores = answer["choices"][0]["logprobs"]
    if "content" in scores:  # chat
        return [entry["logprob"] for entry in scores["content"]]
    return list(scores["token_logprobs"])


async def test_the_persona_goes_in_front_as_a_system_message_or_a_prefix(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    """README "Personalization", docs/edge.md "Persona": a chat gets the persona as a system
    message in front (first in the request's own system message, then a blank line); a
    completion prompt gets it as a prefix followed by a blank line; `echo` returns the
    caller's own prompt."""
    edge: LiveEdge = await start_edge(no_cloud=True, users_db=tmp_path / "users.sqlite3")
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS, timeout=60) as http:
        assert (await http.put("/v1/users/pat", json={"persona": PERSONA})).status_code == 200
        question = {"role": "user", "content": "How do I list files?"}
        own_system = {"role": "system", "content": "Reply in English."}
        chat = "/v1/chat/completions"
        await same_answer(
            http,
            chat,
            {"messages": [question]},
            {"messages": [{"role": "system", "content": PERSONA}, question]},
        )
        merged = {"role": "system", "content": f"{PERSONA}\n\nReply in English."}
        await same_answer(
            http, chat, {"messages": [own_system, question]}, {"messages": [merged, question]}
        )
        prompt = "The ls command"
        text = "/v1/completions"
        await same_answer(http, text, {"prompt": prompt}, {"prompt": f"{PERSONA}\n\n{prompt}"})
        echoed, plain = await both(
            http, text, {"prompt": prompt, "echo": True}, {"prompt": f"{PERSONA}\n\n{prompt}"}
        )
        assert content(echoed) == prompt + content(plain)  # the caller's own prompt only
