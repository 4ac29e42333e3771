"""Promises of docs/edge.md, "Personalized requests" and "Learning", no other test keeps.

The profile's `temperature`, `top_p` and penalties apply where the request sets none; a request with
`user` runs unpersonalized while the user store is unusable (a warning without the user's
text); and a learned state written back just after a reset is replaced by what the kept
feedback gives. A live edge (real uvicorn, the session's tiny int4 model) for the first
two; the personalizer on a real SQLite store for the last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.personal.adapt import NgramCache
from edge.personal.personalizer import Personalizer
from edge.personal.store import UserStore
from tests.fixtures_edge import ADMIN_HEADERS, LiveEdge

PROMPT = "The program prints"
SAMPLE = "the purple walrus sings quietly beneath seven frozen lanterns"


async def text(http: httpx.AsyncClient, **fields: Any) -> str:
    body = {"model": "hg-edge", "prompt": PROMPT, "max_tokens": 12, "route": "edge", **fields}
    answer = await http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["text"])


async def test_the_profiles_temperature_and_top_p_apply_where_the_request_sets_none(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge: LiveEdge = await start_edge(no_cloud=True, users_db=tmp_path / "users.sqlite3")
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS, timeout=60) as http:
        greedy = await text(http, temperature=0)
        # A seed whose sampled answer (the default temperature, 1) is not the greedy one.
        seed, sampled = 1, await text(http, seed=1)
        while sampled == greedy:
            seed += 1
            assert seed < 20, "every seed samples the greedy answer"
            sampled = await text(http, seed=seed)
        for user, profile in (("cold", {"temperature": 0}), ("narrow", {"top_p": 1e-6})):
            assert (await http.put(f"/v1/users/{user}", json=profile)).status_code == 200
            assert await text(http, seed=seed, user=user) == greedy  # the profile's value
            # The request's own value wins over the profile's.
            assert await text(http, seed=seed, user=user, temperature=1, top_p=1) == sampled


async def test_the_profiles_penalties_apply_where_the_request_sets_none(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge: LiveEdge = await start_edge(no_cloud=True, users_db=tmp_path / "users.sqlite3")
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS, timeout=60) as http:
        plain = await text(http, temperature=0)
        for field, value in (
            ("presence_penalty", 2.0),
            ("frequency_penalty", 2.0),
            ("repetition_penalty", 2.0),
        ):
            penalized = await text(http, temperature=0, **{field: value})
            assert penalized != plain, field
            stored = await http.put(f"/v1/users/{field}", json={field: value})
            assert stored.status_code == 200 and stored.json()[field] == value
            assert await text(http, temperature=0, user=field) == penalized  # the profile's
            # The request's own value wins over the profile's: off.
            off = 1.0 if field == "repetition_penalty" else 0.0
            assert await text(http, temperature=0, user=field, **{field: off}) == plain


async def test_a_request_with_user_runs_unpersonalized_while_the_store_is_unusable(
    start_edge: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "users.sqlite3"
    db.write_bytes(b"\x00not sqlite\xff" * 512)  # a corrupt file: every user call is a 503
    edge: LiveEdge = await start_edge(no_cloud=True, users_db=db)
    caplog.set_level(logging.WARNING)
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS, timeout=60) as http:
        assert (await http.get("/v1/users/ivy")).status_code == 503
        plain = await text(http, temperature=0)
        personal = await text(http, temperature=0, user="ivy")
    assert personal == plain  # served, as without a user
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("personalization off" in w for w in warnings), warnings
    assert not any(PROMPT in w or "ivy" in w for w in warnings), warnings


class ResetJustBeforeTheWrite(UserStore):
    """A real store on which a reset of `user_id` lands between the personalizer taking a
    state and storing it (the race docs/edge.md names), once."""

    racing: str | None = None

    def put_learned(self, user_id: str, state: bytes, feedback_id: int | None = None) -> None:
        if user_id == self.racing:
            self.racing = None
            self.reset(user_id)
        super().put_learned(user_id, state, feedback_id)


def test_a_write_back_that_lands_after_a_reset_is_replaced(tmp_path: Path) -> None:
    store = ResetJustBeforeTheWrite(tmp_path / "users.sqlite3")
    store.put_profile("ann")
    personalizer = Personalizer(store, lambda text: list(text.encode()), persist_s=3600)
    try:
        for _ in range(2):
            store.add_feedback("ann", SAMPLE)
        state = personalizer.prepare("ann", SAMPLE)
        assert state is not None and state.adapter is not None and state.adapter.samples == 2
        store.racing = "ann"
        assert personalizer.flush() == 1
        blob = store.get_learned("ann")
        assert blob is not None
        assert NgramCache.from_bytes(blob).samples == 0  # the reset kept no feedback
        assert not personalizer.resident("ann")  # the stale state is not kept in memory
    finally:
        personalizer.close()
        store.close()
