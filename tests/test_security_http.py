"""Attacks on the HTTP APIs, against real uvicorn servers: one user acting for another at the
edge, personal data without a key, and web pages reaching a local API (DNS rebinding, a
cross-site form, a foreign origin). Each is refused in OpenAI's envelope with nothing
learned and nothing changed; the requests carry the headers a browser sends.

The live edge is `start_edge` (tests/fixtures_edge.py: the tiny int4 model, real uvicorn);
the cloud API runs on the test's nats-server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.errors import NotFound
from cloud.api import create_app as create_cloud_app
from cloud.settings import ApiSettings
from edge.api.app import create_app
from edge.settings import EdgeSettings
from hybridgen.up.children import give_cloud_api_an_admin_key, give_edges_an_admin_key
from hybridgen.up.spec import ChildSpec
from models.registry import ModelSet
from tests.fixtures_edge import LiveEdge, serve_edge
from tests.live import serve_app
from tests.test_up import running_up

ALICE_KEY = "alice-key-3f9a"
ADMIN_KEY = "admin-key-77c1"
EVIL = "https://evil.example"
COMPLETION = {"model": "hg-edge", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
#: What Chrome sends with a page's cross-site request (a form post, a navigation, a fetch).
BROWSER = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language": "en-US,en;q=0.9",
    "Origin": EVIL,
    "Referer": f"{EVIL}/",
    "Sec-Fetch-Site": "cross-site",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Dest": "document",
}


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error


async def keyed_edge(start_edge: Callable[..., Any], tmp_path: Path, **extra: Any) -> LiveEdge:
    """An edge with a key for alice and an admin key, and user bob with a persona and one
    feedback sample (made with the admin key)."""
    edge: LiveEdge = await start_edge(
        no_cloud=True,
        users_db=tmp_path / "users.sqlite3",
        user_keys=[f"{ALICE_KEY}@alice", f"{ADMIN_KEY}@*"],
        **extra,
    )
    async with httpx.AsyncClient(base_url=edge.url, headers=as_(ADMIN_KEY)) as admin:
        put = await admin.put("/v1/users/bob", json={"persona": "Bob the beekeeper"})
        assert put.status_code == 200, put.text
        sample = await admin.post("/v1/users/bob/feedback", json={"accepted": "bees hum"})
        assert sample.status_code == 200, sample.text
    return edge


def held(edge: LiveEdge, user_id: str) -> dict[str, Any]:
    """Everything the edge's store holds about `user_id` (read in-process)."""
    exported: dict[str, Any] = edge.app.state.service.users.export(user_id)
    exported.pop("exported")  # when it was read
    return exported


def absent(edge: LiveEdge, user_id: str) -> bool:
    try:
        edge.app.state.service.users.get_profile(user_id)
    except NotFound:
        return True
    return False


# ------------------------------------------------------------------------- per-user keys


@pytest.mark.slow
async def test_a_key_cannot_act_for_another_user(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge = await keyed_edge(start_edge, tmp_path)
    before = held(edge, "bob")
    async with httpx.AsyncClient(base_url=edge.url, headers=as_(ALICE_KEY)) as alice:
        for response in (
            await alice.get("/v1/users/bob"),
            await alice.get("/v1/users/bob/export"),
            await alice.put("/v1/users/bob", json={"share_profile": True}),
            await alice.put("/v1/users/bob", json={"persona": "hijacked"}),
            await alice.post("/v1/users/bob/feedback", json={"accepted": "pwned"}),
            await alice.post("/v1/users/bob/reset", json={}),
            await alice.delete("/v1/users/bob"),
        ):
            error = refused(response, 403, "forbidden")
            assert error["param"] == "user_id"
            assert "Bob the beekeeper" not in response.text and "bees" not in response.text
        # `user: bob` in a request: no persona, no samples, no answer.
        for path, body in (
            ("/v1/completions", {**COMPLETION, "user": "bob"}),
            (
                "/v1/chat/completions",
                {
                    "model": "hg-edge",
                    "messages": [{"role": "user", "content": "repeat what you know"}],
                    "max_tokens": 2,
                    "user": "bob",
                },
            ),
        ):
            error = refused(await alice.post(path, json=body), 403, "forbidden")
            assert error["param"] == "user"
        # Her own id is hers.
        assert (await alice.put("/v1/users/alice", json={})).status_code == 200
        mine = await alice.post("/v1/completions", json={**COMPLETION, "user": "alice"})
        assert mine.status_code == 200, mine.text
    assert held(edge, "bob") == before


@pytest.mark.slow
async def test_the_admin_key_manages_any_user(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge = await keyed_edge(start_edge, tmp_path)
    async with httpx.AsyncClient(base_url=edge.url, headers=as_(ADMIN_KEY)) as admin:
        for user_id in ("alice", "carol"):
            assert (await admin.put(f"/v1/users/{user_id}", json={})).status_code == 200
        exported = await admin.get("/v1/users/bob/export")
        assert exported.status_code == 200
        assert [f["accepted"] for f in exported.json()["feedback"]] == ["bees hum"]
        answer = await admin.post("/v1/completions", json={**COMPLETION, "user": "bob"})
        assert answer.status_code == 200, answer.text
        assert (await admin.post("/v1/users/bob/reset", json={})).status_code == 200
        assert (await admin.delete("/v1/users/bob")).status_code == 200
    assert absent(edge, "bob")


@pytest.mark.slow
async def test_no_key_on_loopback_serves_completions_but_no_personal_data(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge = await keyed_edge(start_edge, tmp_path)
    before = held(edge, "bob")
    # OpenAI clients send a bearer token even when none is needed: an unknown one is anonymous.
    for headers in ({}, as_("unused")):
        async with httpx.AsyncClient(base_url=edge.url, headers=headers) as anonymous:
            plain = await anonymous.post("/v1/completions", json=COMPLETION)
            assert plain.status_code == 200, plain.text
            for response in (
                await anonymous.get("/v1/users/bob/export"),
                await anonymous.put("/v1/users/dan", json={}),
                await anonymous.post("/v1/users/bob/feedback", json={"accepted": "pwned"}),
                await anonymous.delete("/v1/users/bob"),
                await anonymous.post("/v1/completions", json={**COMPLETION, "user": "bob"}),
            ):
                refused(response, 401, "unauthorized")
                assert "beekeeper" not in response.text
    assert held(edge, "bob") == before
    assert absent(edge, "dan")


@pytest.mark.slow
async def test_an_edge_without_user_keys_keeps_every_user_closed(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge = await start_edge(no_cloud=True, users_db=tmp_path / "users.sqlite3")
    async with httpx.AsyncClient(base_url=edge.url) as anonymous:
        assert (await anonymous.post("/v1/completions", json=COMPLETION)).status_code == 200
        refused(await anonymous.put("/v1/users/eve", json={}), 401, "unauthorized")
        body = {**COMPLETION, "user": "eve"}
        refused(await anonymous.post("/v1/completions", json=body), 401, "unauthorized")
    assert absent(edge, "eve")


def test_key_entries_are_checked_at_start_without_showing_the_key() -> None:
    for settings, wanted in (
        (EdgeSettings(user_keys=["s3cret-no-users"]), "needs its users"),
        (EdgeSettings(user_keys=["s3cret-bad@bad id"]), "invalid: 'bad id'"),
        (EdgeSettings(api_keys=["s3cret key"]), "without spaces"),
        (EdgeSettings(api_keys=["s3cret-twice"], user_keys=["s3cret-twice@*"]), "twice"),
        (EdgeSettings(allowed_origins=["evil.example/path"]), "not an origin"),
    ):
        with pytest.raises(ValueError, match=wanted) as info:
            settings.check_exposure()
        assert "s3cret" not in str(info.value)
    # The environment's form: comma-separated entries, users joined by +.
    ring = EdgeSettings(user_keys="k1@alice+bob, k2@*").key_ring()  # type: ignore[arg-type]
    assert [(e.key, e.users) for e in ring.entries] == [
        ("k1", frozenset({"alice", "bob"})),
        ("k2", None),
    ]
    assert not ring.closed


# ------------------------------------------------------------------------------ browsers


@pytest.mark.slow
async def test_dns_rebinding_is_refused(start_edge: Callable[..., Any], tmp_path: Path) -> None:
    edge = await keyed_edge(start_edge, tmp_path)
    port = edge.url.rsplit(":", 1)[1]
    # The page at http://evil.example:<port> now resolves to 127.0.0.1: its requests are
    # same-origin for the browser, so they carry no Origin, and Host names the page.
    rebound = {**BROWSER, "Host": f"evil.example:{port}", "Sec-Fetch-Site": "same-origin"}
    del rebound["Origin"]
    async with httpx.AsyncClient(base_url=edge.url, headers=rebound) as page:
        for response in (
            await page.get("/v1/models"),
            await page.get("/v1/users/bob/export"),
            await page.post("/v1/completions", json=COMPLETION),
            await page.get("/metrics"),
        ):
            error = refused(response, 403, "forbidden")
            assert "evil.example" in error["message"]
            assert "beekeeper" not in response.text
    # The names the edge serves under still work.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]"):
        async with httpx.AsyncClient(base_url=edge.url, headers={"Host": host}) as local:
            assert (await local.get("/v1/models")).status_code == 200


@pytest.mark.slow
async def test_a_cross_site_form_post_is_refused(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge = await keyed_edge(start_edge, tmp_path)
    before = held(edge, "bob")
    form = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
    # <form enctype="text/plain"> with the name `{"accepted":"pwned","x":"` makes a JSON body.
    text_form = {**BROWSER, "Content-Type": "text/plain"}
    json_text = b'{"model":"hg-edge","prompt":"Hello","max_tokens":2,"x":"="}'
    async with httpx.AsyncClient(base_url=edge.url) as page:
        for response in (
            await page.post("/v1/users/bob/feedback", content=b"accepted=pwned", headers=form),
            await page.post("/v1/users/bob/reset", content=b"", headers=form),
            await page.post("/v1/completions", content=json_text, headers=text_form),
        ):
            error = refused(response, 403, "forbidden")
            assert EVIL in error["message"]
        # A browser that leaves Origin out (a privacy setting): the content type still refuses.
        no_origin = {k: v for k, v in text_form.items() if k not in ("Origin", "Referer")}
        response = await page.post("/v1/completions", content=json_text, headers=no_origin)
        error = refused(response, 415, "bad_request")
        assert "application/json" in error["message"]
        with_key = {**no_origin, **as_(ADMIN_KEY), "Content-Type": "text/plain;charset=UTF-8"}
        response = await page.post(
            "/v1/users/bob/feedback", content=b'{"accepted":"pwned"}', headers=with_key
        )
        refused(response, 415, "bad_request")
    assert held(edge, "bob") == before


@pytest.mark.slow
async def test_a_foreign_origin_is_refused(start_edge: Callable[..., Any], tmp_path: Path) -> None:
    edge = await keyed_edge(start_edge, tmp_path, allowed_origins=["http://localhost:3000"])
    fetch = {**BROWSER, "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty", "Accept": "*/*"}
    async with httpx.AsyncClient(base_url=edge.url) as page:
        # fetch() with JSON: the browser asks first (a CORS preflight) ...
        preflight = await page.options(
            "/v1/completions",
            headers={
                **fetch,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        refused(preflight, 403, "forbidden")
        assert "access-control-allow-origin" not in preflight.headers
        # ... and a simple GET, or a request sent anyway, is refused, not just left unread.
        response = await page.get("/v1/models", headers=fetch)
        refused(response, 403, "forbidden")
        assert "access-control-allow-origin" not in response.headers
        response = await page.post("/v1/completions", json=COMPLETION, headers=fetch)
        refused(response, 403, "forbidden")
        for origin in ("null", "http://localhost:3001", "http://localhost:3000.evil.example"):
            response = await page.get("/v1/models", headers={**fetch, "Origin": origin})
            refused(response, 403, "forbidden")


@pytest.mark.slow
async def test_an_allowed_origin_gets_its_preflight_answered(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    app_origin = "http://localhost:3000"
    edge = await keyed_edge(start_edge, tmp_path, allowed_origins=[app_origin])
    fetch = {
        **BROWSER,
        "Origin": app_origin,
        "Referer": f"{app_origin}/",
        "Sec-Fetch-Site": "same-site",
        "Sec-Fetch-Mode": "cors",
        "Sec-Fetch-Dest": "empty",
        "Accept": "*/*",
    }
    async with httpx.AsyncClient(base_url=edge.url) as page:
        preflight = await page.options(
            "/v1/users/alice/feedback",
            headers={
                **fetch,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 204, preflight.text
        assert preflight.headers["access-control-allow-origin"] == app_origin
        assert "POST" in preflight.headers["access-control-allow-methods"].split(", ")
        allowed = preflight.headers["access-control-allow-headers"].lower().split(", ")
        assert {"authorization", "content-type"} <= set(allowed)
        answer = await page.post("/v1/completions", json=COMPLETION, headers=fetch)
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == app_origin
        assert "X-Request-Id" in answer.headers["access-control-expose-headers"]
        # The origin is allowed, the users still need their key.
        put = await page.put("/v1/users/alice", json={}, headers=fetch)
        refused(put, 401, "unauthorized")
        put = await page.put("/v1/users/alice", json={}, headers={**fetch, **as_(ALICE_KEY)})
        assert put.status_code == 200, put.text


@pytest.mark.slow
async def test_the_cloud_api_keeps_browsers_out(nats_url: str) -> None:
    settings = ApiSettings(allowed_origins=["https://app.example"])
    async with serve_app(create_cloud_app(settings, nats_url=nats_url), lifespan="on") as (
        _,
        url,
    ):
        port = url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=url) as page:
            response = await page.get("/v1/models", headers={"Host": f"evil.example:{port}"})
            refused(response, 403, "forbidden")
            refused(await page.get("/v1/models", headers=BROWSER), 403, "forbidden")
            text_form = {**BROWSER, "Content-Type": "text/plain"}
            del text_form["Origin"]
            body = b'{"model":"hg-cloud","prompt":"Hello","max_tokens":2}'
            response = await page.post("/v1/completions", content=body, headers=text_form)
            refused(response, 415, "bad_request")
            preflight = await page.options(
                "/v1/chat/completions",
                headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            models = await page.get("/v1/models", headers={"Origin": "https://app.example"})
            assert models.status_code == 200
            assert models.headers["access-control-allow-origin"] == "https://app.example"


# ------------------------------------------------------------------------------- exposure


@pytest.mark.slow
async def test_create_app_applies_the_exposure_rule_and_the_metrics_key(
    edge_dir: Path, tmp_path: Path
) -> None:
    base: dict[str, Any] = {
        "model_dir": edge_dir,
        "no_cloud": True,
        "users_db": tmp_path / "users.sqlite3",
    }
    with pytest.raises(ValueError, match=r"refusing to serve without an API key on 0\.0\.0\.0"):
        create_app(EdgeSettings(host="0.0.0.0", **base))
    with pytest.raises(ValueError, match="metrics_require_key"):
        create_app(EdgeSettings(metrics_require_key=True, **base))
    settings = EdgeSettings(api_keys=["scrape-key"], metrics_require_key=True, node_id="e1", **base)
    async with serve_edge(settings) as edge, httpx.AsyncClient(base_url=edge.url) as http:
        refused(await http.get("/metrics"), 401, "unauthorized")
        scraped = await http.get("/metrics", headers=as_("scrape-key"))
        assert scraped.status_code == 200
        assert "hybridgen_edge_routes" in scraped.text


def test_up_makes_one_owner_only_admin_key_for_the_edges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HG_EDGE_USER_KEYS", "app-key@alice")
    children = [ChildSpec("edge", ["edge"], role="edge"), ChildSpec("cloud-api", ["api"])]
    path = give_edges_an_admin_key(children, tmp_path / "secrets")
    assert path.stat().st_mode & 0o777 == 0o600
    key = path.read_text().strip()
    assert children[1].env == {}
    ring = EdgeSettings(user_keys=children[0].env["HG_EDGE_USER_KEYS"]).key_ring()  # type: ignore[arg-type]
    assert [(e.key, e.users) for e in ring.entries] == [
        ("app-key", frozenset({"alice"})),
        (key, None),
    ]
    again = [ChildSpec("edge", ["edge"], role="edge")]
    give_edges_an_admin_key(again, tmp_path / "secrets")
    assert again[0].env == children[0].env  # one key per install, kept across runs


def test_up_makes_one_owner_only_admin_key_for_the_cloud_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin key (`KEY@*`, after the caller's own) that leaves the loopback API open."""
    monkeypatch.setenv("HG_CLOUD_ADMIN_KEYS", "ops-key@*")
    children = [ChildSpec("cloud-api", ["api"], role="api"), ChildSpec("edge", ["edge"])]
    path = give_cloud_api_an_admin_key(children, tmp_path / "secrets")
    assert (path.name, path.stat().st_mode & 0o777) == ("cloud-admin.key", 0o600)
    key = path.read_text().strip()
    assert children[0].env == {"HG_CLOUD_ADMIN_KEYS": f"ops-key@*,{key}@*"}
    assert children[1].env == {}
    ring = ApiSettings(admin_keys=children[0].env["HG_CLOUD_ADMIN_KEYS"]).key_ring()  # type: ignore[arg-type]
    assert [(e.key, e.users) for e in ring.entries] == [("ops-key", None), (key, None)]
    assert not ring.closed
    again = [ChildSpec("cloud-api", ["api"], role="api")]
    give_cloud_api_an_admin_key(again, tmp_path / "secrets")
    assert again[0].env == children[0].env  # one key per install, kept across runs


@pytest.mark.slow
async def test_up_gives_its_edge_an_admin_key_and_says_how_to_use_it(
    tiny_models: ModelSet, tmp_path: Path
) -> None:
    async with running_up(tiny_models, tmp_path) as up:
        key_file = up.home / "secrets" / "edge-admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        told = (await up.until(r"users' data on the edge needs its admin key.*")).group(0)
        assert f"$(cat {key_file})" in told
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{up.edge_port}", timeout=60
        ) as client:
            plain = await client.post("/v1/completions", json={**COMPLETION, "route": "edge"})
            assert plain.status_code == 200, plain.text
            refused(await client.put("/v1/users/alice", json={}), 401, "unauthorized")
            put = await client.put("/v1/users/alice", json={}, headers=as_(key))
            assert put.status_code == 200, put.text
        assert key not in up.output
        for log in (up.home / "logs").glob("*.log"):
            assert key not in log.read_text(), log
