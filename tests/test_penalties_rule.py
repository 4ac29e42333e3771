"""The penalties' one rule (`serving.penalties`) and how each end applies it.

The rule on numpy and torch gives the same exact values; the cloud's batch penalizes each
row by its own history and parameters and leaves the logits the log-probabilities read; the
repetition penalty of each end equals its engine's own, as an independent reference
(onnxruntime-genai's `repetition_penalty` search option at the edge, transformers'
`generate(repetition_penalty=...)` in the cloud); an answer the edge finishes goes on as if
never cut; a seeded penalized answer repeats.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.engine import Engine, SamplingParams
from cloud.sampling import RowSampling, penalize_rows, sample_rows
from edge.runtime import EdgeRuntime, Token
from models.ort_edge import new_generator
from models.registry import ModelSet
from serving.penalties import TokenCounts, penalize
from tests.test_cloud_engine import model_dir, run, start_engine  # noqa: F401 (fixture)

PROMPT = "<|user|>\nPermission is hereby granted, free of charge<|end|>\n<|assistant|>\n"
#: logits of tokens 0..4; token 0 is in the answer twice, 1 in the prompt only, 3 once.
LOGITS = [2.0, -1.0, 1.0, 3.0, 0.0]
HISTORY = {"prompt": [1, 0], "answer": [0, 3, 0]}


def counts(**penalties: float) -> TokenCounts:
    return TokenCounts(SamplingParams(**penalties), HISTORY["prompt"], HISTORY["answer"])


def test_the_rule_gives_the_same_values_on_numpy_and_torch() -> None:
    history = counts(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    ids, seen = history.entries()
    assert (ids, seen) == ([1, 0, 3], [0, 2, 1])
    # 1: -1 x 2 (prompt only); 0: 2 / 2 - 0.5 - 2 x 0.25; 3: 3 / 2 - 0.5 - 0.25.
    want = [-2.0, 0.0, 0.75]
    values = np.array(LOGITS, dtype=np.float32)[ids]
    args = (history.presence, history.frequency, history.repetition)
    assert penalize(values, np.array(seen), *args).tolist() == want
    tensor = torch.tensor(LOGITS)[ids]
    assert penalize(tensor, torch.tensor(seen), *args).tolist() == want
    # Off (the defaults): no history is kept.
    assert TokenCounts.of(SamplingParams(), [1, 2]) is None
    # Without a repetition penalty the prompt is not read: only the answer's tokens.
    assert counts(frequency_penalty=1.0).entries() == ([0, 3], [2, 1])


def test_the_cloud_batch_penalizes_each_row_by_its_own() -> None:
    logits = torch.tensor([LOGITS, LOGITS, LOGITS])
    rows = [
        RowSampling(
            penalties=counts(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
        ),
        RowSampling(),
        RowSampling(penalties=counts(frequency_penalty=2.5)),
    ]
    out = penalize_rows(logits, rows)
    assert out.tolist() == [
        [0.0, -2.0, 1.0, 0.75, 0.0],
        LOGITS,
        [-3.0, -1.0, 1.0, 0.5, 0.0],
    ]
    assert logits.tolist() == [LOGITS] * 3  # what the log-probabilities read is untouched
    # Each row chooses from its penalized logits, and its choice joins its history.
    assert sample_rows(logits, rows) == [2, 3, 2]
    assert rows[0].penalties is not None and rows[2].penalties is not None
    assert rows[0].penalties.count(2) == 1 and rows[2].penalties.count(2) == 1
    assert penalize_rows(logits, [RowSampling(), RowSampling()]) is logits  # no copy


@pytest.fixture
async def runtime(tiny_models: ModelSet) -> AsyncIterator[EdgeRuntime]:
    rt = EdgeRuntime(tiny_models.edge_dir("int4"), threads=1, max_active=2, max_queue=4)
    try:
        yield rt
    finally:
        await rt.close()


async def edge_tokens(
    runtime: EdgeRuntime, ids: list[int], options: SamplingParams, **submit: int
) -> list[int]:
    events = [event async for event in runtime.submit(ids, options, **submit)]
    return [event.token_id for event in events if isinstance(event, Token)]


async def test_the_edge_repetition_penalty_is_onnxruntime_genais(runtime: EdgeRuntime) -> None:
    ids = runtime.encode(PROMPT)
    for penalty in (1.5, 2.0):
        options = SamplingParams(max_tokens=20, temperature=0, repetition_penalty=penalty)
        ours = await edge_tokens(runtime, ids, options)
        generator = new_generator(
            runtime._model, len(ids) + 20, do_sample=False, repetition_penalty=penalty
        )
        generator.append_tokens(ids)
        theirs: list[int] = []
        while len(theirs) < len(ours):
            generator.generate_next_token()
            theirs.append(int(generator.get_next_tokens()[0]))
        assert ours == theirs
    plain = await edge_tokens(runtime, ids, SamplingParams(max_tokens=20, temperature=0))
    assert plain != ours  # the penalty changed the answer: the comparison means something


async def test_an_edge_answer_finished_later_goes_on_as_if_never_cut(
    runtime: EdgeRuntime,
) -> None:
    """The router finishes a cloud answer cut mid-stream from the prompt and the part
    streamed (`answer_tokens`): its penalties count that part as the answer's own."""
    ids = runtime.encode(PROMPT)
    options = SamplingParams(
        max_tokens=16, temperature=0, frequency_penalty=2.0, presence_penalty=0.5
    )
    whole = await edge_tokens(runtime, ids, options)
    head = whole[:6]
    rest = await edge_tokens(runtime, ids + head, options.with_max_tokens(10), answer_tokens=6)
    assert head + rest == whole
    # Read as prompt instead, the same tokens give another answer.
    as_prompt = await edge_tokens(runtime, ids + head, options.with_max_tokens(10))
    assert as_prompt != rest


async def test_a_seeded_penalized_edge_answer_repeats(runtime: EdgeRuntime) -> None:
    ids = runtime.encode(PROMPT)
    options = SamplingParams(
        max_tokens=16, temperature=1.0, seed=3, frequency_penalty=1.0, repetition_penalty=1.3
    )
    first, second = [await edge_tokens(runtime, ids, options) for _ in range(2)]
    assert first == second
    assert first != await edge_tokens(runtime, ids, SamplingParams(max_tokens=16, seed=3))


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[Engine]:  # noqa: F811
    loaded = await start_engine(model_dir)
    try:
        yield loaded
    finally:
        await asyncio.to_thread(loaded.close)


async def test_the_cloud_repetition_penalty_is_transformers_alone_and_in_a_batch(
    engine: Engine,
) -> None:
    prompt = "import os\nimport sys"  # its greedy first token is in it: the penalty reads it
    input_ids = torch.tensor([engine.encode(prompt)])

    def reference(**penalty: float) -> list[int]:
        out = engine.model.generate(
            input_ids, max_new_tokens=12, do_sample=False, eos_token_id=engine.eos_ids, **penalty
        )
        return list(out[0, input_ids.shape[1] :].tolist())

    penalized = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.8)
    _, alone, _ = await run(engine, "alone", prompt, penalized)
    assert alone == reference(repetition_penalty=1.8)
    # Beside rows with other penalties or none, each row keeps its own.
    others = [
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=12, temperature=0, frequency_penalty=2.0),
        penalized,
    ]
    batch = await asyncio.gather(
        *(run(engine, f"b{i}", prompt, sampling) for i, sampling in enumerate(others))
    )
    plain, frequency, again = (ids for _, ids, _ in batch)
    assert (plain, again) == (reference(), alone)
    assert len({tuple(plain), tuple(frequency), tuple(alone)}) == 3
