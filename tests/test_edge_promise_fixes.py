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
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edge.routing import EdgeState, PolicySettings, Reason, RequestFacts, Target, decide
from tests.fixtures_edge import LiveEdge

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
