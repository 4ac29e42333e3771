"""Two promises of docs/edge.md that a live edge broke at the edge of its inputs.

- "Routing": every answer's `route_reason` is one of the documented reasons, and
  `hybridgen_edge_routes_total` counts it under that label. A one-token completion prompt
  has nothing the perplexity can score; with a threshold in force it is served at the edge
  as `edge_default` (no quality signal could be measured), not under an internal placeholder.
- "Learning": learning applies to the very next request. A feedback sample given while the
  user is not in memory (it left the LRU, or the edge restarted) is learned by that user's
  next load exactly as a resident user learns it.

A live edge (real uvicorn, the session's tiny int4 model, real SQLite users' file).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edge.personal.adapt import NgramCache
from edge.personal.personalizer import Personalizer
from edge.personal.store import UserStore
from edge.route.rules import EdgeState, PolicySettings, Reason, RequestFacts, Target, decide
from edge.settings import EdgeSettings
from tests.fixtures_edge import ADMIN_HEADERS, ADMIN_KEY, LiveEdge, serve_edge

# ----------------------------------------------------------- routing (docs/edge.md)

#: A finite threshold from the policy (any prompt that can be scored is `in_domain`).
POLICY_THRESHOLD = {"perplexity_threshold": 1e9}


def one_token_prompt(edge: LiveEdge) -> str:
    """A completion prompt the edge model reads as one token: nothing the perplexity scores."""
    for prompt in ("a", "The", "x", " "):
        if len(edge.node.runtime.encode(prompt)) == 1:
            return prompt
    raise AssertionError("no one-token prompt found for the tiny tokenizer")


def route_counts(scraped: str) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["served_by"], sample.labels["route_reason"]): sample.value
        for family in text_string_to_metric_families(scraped)
        if family.name == "hybridgen_edge_routes"
        for sample in family.samples
        if sample.name == "hybridgen_edge_routes_total"
    }


async def one_token_answer(edge: LiveEdge) -> tuple[dict[str, Any], dict[tuple[str, str], float]]:
    """A one-token prompt's answer, and the route counter after it."""
    body = {"model": "hg-edge", "prompt": one_token_prompt(edge), "max_tokens": 3}
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        answer = await http.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        scraped = (await http.get("/metrics")).text
    return answer.json(), route_counts(scraped)


async def test_a_one_token_prompt_under_a_policy_threshold_is_served_as_edge_default(
    start_edge: Callable[..., Any],
) -> None:
    edge: LiveEdge = await start_edge(no_cloud=True, policy=POLICY_THRESHOLD)
    assert edge.node.threshold_source == "policy"
    answer, counts = await one_token_answer(edge)
    assert (answer["served_by"], answer["route_reason"]) == ("edge", "edge_default")
    assert counts == {("edge", "edge_default"): 1.0}


async def test_a_one_token_prompt_under_the_model_sets_threshold_is_served_as_edge_default(
    start_edge: Callable[..., Any],
) -> None:
    edge: LiveEdge = await start_edge(no_cloud=True)
    assert edge.node.threshold_source == "model_set"  # the tiny set is calibrated
    answer, counts = await one_token_answer(edge)
    assert (answer["served_by"], answer["route_reason"]) == ("edge", "edge_default")
    assert counts == {("edge", "edge_default"): 1.0}


async def test_a_one_token_prompt_still_gets_the_second_stage(
    start_edge: Callable[..., Any],
) -> None:
    """With a second stage set, the drafted tokens are judged as for any prompt: a draft
    threshold every draft passes gives `confident_draft`."""
    policy = {**POLICY_THRESHOLD, "second_stage_k": 2, "draft_logprob_threshold": -1e9}
    edge: LiveEdge = await start_edge(no_cloud=True, policy=policy)
    answer, counts = await one_token_answer(edge)
    assert (answer["served_by"], answer["route_reason"]) == ("edge", "confident_draft")
    assert counts == {("edge", "confident_draft"): 1.0}


def test_decide_after_a_prefill_with_nothing_scored_is_edge_default() -> None:
    """The rule itself (pure): before the prefill it asks for one; after it, a perplexity
    of None (nothing scored) is `edge_default` on the edge, never a second prefill."""
    facts = RequestFacts(prompt_tokens=1, max_tokens=3)
    state = EdgeState(context_length=128)
    policy = PolicySettings(perplexity_threshold=10.0)
    first = decide(facts, state, policy, cloud_available=True)
    assert (first.target, first.reason) == (Target.PREFILL, Reason.PENDING)
    after = decide(facts, state, policy, cloud_available=True, prefilled=True)
    assert (after.target, after.reason, after.max_tokens) == (Target.EDGE, Reason.EDGE_DEFAULT, 3)


# ---------------------------------------------------------- learning (docs/edge.md)

FIRST = "the purple walrus sings quietly beneath seven frozen lanterns"
SECOND = "the copper heron hums softly above eleven sleeping harbours"
#: The start of SECOND: a user who learned it continues it differently from one who did not.
PROMPT = "the copper heron hums"
#: No samples in context (the gate would add a second effect): the n-gram cache alone.
LEARNING: dict[str, Any] = {"personalize_samples": 0, "personalize_persist_s": 3600}
#: An LRU that holds the largest user these caps allow (~1.4 MiB, estimated), and no more:
#: four fillers, each with 1000 bytes of feedback (~0.45 MiB each), overflow it, so the
#: least recently used users leave it.
SMALL_LRU = {
    **LEARNING,
    "personalize_memory_mb": 1.39,
    "personalize_max_contexts": 1000,
    "personalize_max_user_bytes": 1024,
}
FILLERS = [f"filler{i}" for i in range(4)]
FILLER_TEXT = " ".join(f"x{i}" for i in range(300))[:1000]


async def new_user(http: httpx.AsyncClient, user_id: str, *samples: str) -> None:
    assert (await http.put(f"/v1/users/{user_id}", json={})).status_code == 200
    for sample in samples:
        await give_feedback(http, user_id, sample)


async def give_feedback(http: httpx.AsyncClient, user_id: str, sample: str) -> None:
    answer = await http.post(f"/v1/users/{user_id}/feedback", json={"accepted": sample})
    assert answer.status_code == 200, answer.text


async def answer_for(http: httpx.AsyncClient, user_id: str) -> tuple[str, list[float]]:
    """A greedy completion of PROMPT for the user: its text and its tokens' logprobs."""
    body = {
        "model": "hg-edge",
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": 1,
        "user": user_id,
    }
    answer = await http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def learned(edge: LiveEdge, user_id: str) -> tuple[int, bytes]:
    """The user's n-gram cache as the next request takes it: samples learned, and its bytes."""
    got = edge.app.state.service.personalizer.prepare(user_id, PROMPT)
    assert got is not None and got.adapter is not None
    return got.adapter.samples, got.adapter.to_bytes()


def resident(edge: LiveEdge, user_id: str) -> bool:
    return bool(edge.app.state.service.personalizer.resident(user_id))


async def test_feedback_to_a_user_who_left_the_lru_is_learned_by_the_next_request(
    start_edge: Callable[..., Any],
) -> None:
    """`ann` leaves the LRU (its learned blob written); `bea`, its twin, stays resident. The
    same second sample to both: the next request of each learns it the same way."""
    edge: LiveEdge = await start_edge(no_cloud=True, **SMALL_LRU)
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS, timeout=60) as http:
        for user_id in ("ann", "bea"):
            await new_user(http, user_id, FIRST)
        for user_id in FILLERS:
            await new_user(http, user_id, FILLER_TEXT)
        for user_id in ("ann", *FILLERS, "bea"):  # ann is the least recently used
            await answer_for(http, user_id)
        assert not resident(edge, "ann") and resident(edge, "bea")
        await give_feedback(http, "ann", SECOND)
        await give_feedback(http, "bea", SECOND)
        twin = await answer_for(http, "bea")
        assert await answer_for(http, "ann") == twin
    assert learned(edge, "ann")[0] == 2
    assert learned(edge, "ann") == learned(edge, "bea")


async def test_feedback_after_an_edge_restart_is_learned_by_the_next_request(
    start_edge: Callable[..., Any], edge_dir: Path, tmp_path: Path
) -> None:
    """The first edge learns FIRST for `ann` and `bea` and stops (their blobs written). A
    new edge on the same users' file: `bea` is loaded before its second sample, `ann` after;
    the next request of each learns it the same way."""
    users_db = tmp_path / "users.sqlite3"
    settings = EdgeSettings(
        model_dir=edge_dir,
        users_db=users_db,
        no_cloud=True,
        threads=1,
        user_keys=[f"{ADMIN_KEY}@*"],
        **LEARNING,
    )
    async with (
        serve_edge(settings) as first,
        httpx.AsyncClient(base_url=first.url, headers=ADMIN_HEADERS, timeout=60) as http,
    ):
        for user_id in ("ann", "bea"):
            await new_user(http, user_id, FIRST)
            await answer_for(http, user_id)
    edge: LiveEdge = await start_edge(no_cloud=True, users_db=users_db, **LEARNING)
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS, timeout=60) as http:
        await answer_for(http, "bea")
        assert resident(edge, "bea") and not resident(edge, "ann")
        await give_feedback(http, "ann", SECOND)
        await give_feedback(http, "bea", SECOND)
        twin = await answer_for(http, "bea")
        assert await answer_for(http, "ann") == twin
    assert learned(edge, "ann")[0] == 2
    assert learned(edge, "ann") == learned(edge, "bea")


def byte_encode(text: str) -> list[int]:
    return list(text.encode())


def learned_samples(store: UserStore, user_id: str) -> int:
    """How many samples a new personalizer's first request for the user has learned."""
    personalizer = Personalizer(store, byte_encode, persist_s=3600)
    try:
        got = personalizer.prepare(user_id, PROMPT)
        assert got is not None and got.adapter is not None
        return got.adapter.samples
    finally:
        personalizer.close()


def test_a_sample_learned_while_resident_is_not_learned_again_after_a_restart(
    tmp_path: Path,
) -> None:
    """The written state records the newest sample it holds, so the next load learns only
    what is newer: nothing, here."""
    store = UserStore(tmp_path / "users.sqlite3")
    try:
        store.put_profile("ann")
        store.add_feedback("ann", FIRST)
        assert learned_samples(store, "ann") == 1  # rebuilt, written at close
        personalizer = Personalizer(store, byte_encode, persist_s=3600)
        try:
            assert personalizer.prepare("ann", PROMPT) is not None  # resident
            store.add_feedback("ann", SECOND)
            got = personalizer.prepare("ann", PROMPT)
            assert got is not None and got.adapter is not None and got.adapter.samples == 2
        finally:
            personalizer.close()  # written with SECOND's id
        assert learned_samples(store, "ann") == 2
    finally:
        store.close()


def test_a_state_written_before_the_ids_were_kept_holds_the_stored_samples(
    tmp_path: Path,
) -> None:
    """A blob with no feedback id (schema 2) counts as holding every stored sample."""
    store = UserStore(tmp_path / "users.sqlite3")
    try:
        store.put_profile("ann")
        store.add_feedback("ann", FIRST)
        store.put_learned("ann", NgramCache.from_samples([byte_encode(FIRST)]).to_bytes())
        assert store.get_learned_state("ann") is not None
        assert store.get_learned_state("ann")[1] is None  # type: ignore[index]
        assert learned_samples(store, "ann") == 1
    finally:
        store.close()
