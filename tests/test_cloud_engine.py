"""The cloud engine on transformers' continuous batching (tiny random Llama, one thread)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud.engine import (
    Delta,
    Engine,
    EngineConfig,
    IncrementalDetokenizer,
    SamplingParams,
    StopMatcher,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.random_model import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("engine_model"), context_length=256)


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[Engine]:
    loaded = await asyncio.to_thread(
        Engine.load, model_dir, config=EngineConfig(threads=1, cache_tokens=4096)
    )
    loaded.start()
    try:
        yield loaded
    finally:
        await asyncio.to_thread(loaded.close)


async def run(
    engine: Engine, request_id: str, prompt: str, sampling: SamplingParams
) -> tuple[str, list[int], Delta]:
    text, ids, last = [], [], None
    async for delta in engine.generate(request_id, engine.encode(prompt), sampling):
        text.append(delta.text)
        ids += delta.token_ids
        last = delta
    assert last is not None and last.finish_reason is not None
    return "".join(text), ids, last


async def test_greedy_batch_matches_sequential_generate(engine: Engine) -> None:
    prompts = ["abc def ghi", "The quick brown fox", "import os\nimport sys", "x"]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    results = await asyncio.gather(
        *(run(engine, f"g{i}", p, greedy) for i, p in enumerate(prompts))
    )
    import torch

    for prompt, (_, ids, last) in zip(prompts, results, strict=True):
        input_ids = torch.tensor([engine.encode(prompt)])
        reference = engine.model.generate(
            input_ids, max_new_tokens=12, do_sample=False, eos_token_id=engine.eos_ids
        )
        assert reference[0, input_ids.shape[1] :].tolist() == ids
        assert last.completion_tokens == len(ids)
        assert last.finish_reason == ("stop" if ids[-1] in engine.eos_ids else "length")


async def test_seed_repeats_and_stop_sequences_cut(engine: Engine) -> None:
    seeded = SamplingParams(max_tokens=30, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first, _, _ = await run(engine, "s1", "abc def", seeded)
    again, _, _ = await run(engine, "s2", "abc def", seeded)
    other, _, _ = await run(engine, "s3", "abc def", SamplingParams(max_tokens=30, seed=8))
    assert first == again and first != other
    stop = first[12:15]
    cut, _, last = await run(
        engine, "s4", "abc def", SamplingParams(max_tokens=30, seed=7, top_k=50, top_p=0.95,
                                               stop=(stop,)),
    )  # fmt: skip
    assert cut == first[: first.find(stop)] and last.finish_reason == "stop"


async def test_cancel_frees_the_sequence(engine: Engine) -> None:
    stream = engine.generate("c1", engine.encode("hello"), SamplingParams(max_tokens=200))
    async for _ in stream:
        break
    await stream.aclose()
    manager = engine._manager
    for _ in range(100):
        active = manager.batch_processor.scheduler.active_requests if manager else {}
        if not active:
            break
        await asyncio.sleep(0.01)
    assert not active
    assert not manager.output_router.result_handlers


async def test_context_window_is_checked(engine: Engine) -> None:
    with pytest.raises(Exception, match="context window"):
        await run(engine, "w", "hi", SamplingParams(max_tokens=engine.context_length))


def test_stop_matcher_holds_back_partial_matches() -> None:
    matcher = StopMatcher(("END",))
    out = [matcher.push(piece) for piece in ("abc E", "N", "D tail")]
    assert "".join(text for text, _ in out) == "abc " and out[-1][1]
    matcher = StopMatcher(("END",))
    out = [matcher.push(piece) for piece in ("abc EN", "x")]
    assert not any(hit for _, hit in out)
    assert "".join(text for text, _ in out) + matcher.flush() == "abc ENx"
    assert StopMatcher(()).push("anything") == ("anything", False)


def test_detokenizer_never_splits_characters(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = "naïve café — 日本語 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push([i]) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


async def test_new_request_joins_the_running_batch(engine: Engine) -> None:
    long_done = asyncio.Event()
    greedy = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    started = asyncio.Event()

    async def long_request() -> None:
        count = 0
        async for delta in engine.generate("long", engine.encode("hello"), greedy):
            count += len(delta.token_ids)
            if count >= 5:
                started.set()
        long_done.set()

    task = asyncio.create_task(long_request())
    await started.wait()
    _, ids, _ = await run(engine, "short", "hi", SamplingParams(max_tokens=4, temperature=0))
    assert len(ids) == 4
    assert not long_done.is_set(), "the short request waited for the long one"
    await task
