"""The cloud engine's step-level batching (tiny random Llama, fp32, one thread)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from broker.errors import BadRequest, ContextLengthExceeded, Internal, Unavailable
from cloud.engine import (
    Delta,
    Engine,
    EngineConfig,
    IncrementalDetokenizer,
    SamplingParams,
    pick_device,
)
from cloud.sampling import RowSampling, sample_rows
from tests.waits import eventually

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.lab.random_model import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("engine_model"), context_length=256)


async def start_engine(model_dir: Path, **config: Any) -> Engine:
    values: dict[str, Any] = {"threads": 1, "cache_tokens": 4096, "dtype": "float32", **config}
    loaded = await asyncio.to_thread(Engine.load, model_dir, config=EngineConfig(**values))
    loaded.start()
    return loaded


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[Engine]:
    loaded = await start_engine(model_dir)
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


def idle(engine: Engine) -> bool:
    """The engine holds nothing: no request, no row, no admitted token."""
    stats = engine.stats()
    return stats["requests"] == stats["running"] == stats["admitted_tokens"] == 0


async def start_long(engine: Engine, request_id: str, tokens: int = 60) -> asyncio.Task[Any]:
    """A long greedy request, returned once it is decoding in the running batch."""
    started = asyncio.Event()

    async def long_request() -> list[int]:
        ids: list[int] = []
        sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        async for delta in engine.generate(request_id, engine.encode("hello there"), sampling):
            ids += delta.token_ids
            if len(ids) >= 3:
                started.set()
        return ids

    task = asyncio.create_task(long_request())
    await started.wait()
    return task


async def test_greedy_batch_matches_sequential_generate(engine: Engine) -> None:
    prompts = ["abc def ghi", "The quick brown fox", "import os\nimport sys", "x"]
    results = await asyncio.gather(
        *(run(engine, f"g{i}", p, GREEDY) for i, p in enumerate(prompts))
    )
    for prompt, (_, ids, last) in zip(prompts, results, strict=True):
        input_ids = torch.tensor([engine.encode(prompt)])
        reference = engine.model.generate(
            input_ids, max_new_tokens=12, do_sample=False, eos_token_id=engine.eos_ids
        )
        assert reference[0, input_ids.shape[1] :].tolist() == ids
        assert last.completion_tokens == len(ids)
        assert last.finish_reason == ("stop" if ids[-1] in engine.eos_ids else "length")


async def test_chunked_prefill_and_merges_keep_greedy_outputs(model_dir: Path) -> None:
    engine = await start_engine(model_dir, max_batch_tokens=3)  # chunks of 1-3 columns
    try:
        prompts = ["abc def ghi jkl", "The quick brown fox jumps", "x", "import os\nimport sys"]
        long_task = await start_long(engine, "long")
        results = await asyncio.gather(
            *(run(engine, f"c{i}", p, GREEDY) for i, p in enumerate(prompts))
        )
        await long_task
        for prompt, (_, ids, _) in zip(prompts, results, strict=True):
            input_ids = torch.tensor([engine.encode(prompt)])
            reference = engine.model.generate(
                input_ids, max_new_tokens=12, do_sample=False, eos_token_id=engine.eos_ids
            )
            assert reference[0, input_ids.shape[1] :].tolist() == ids
        assert engine.stats()["prefill_chunks"] > len(prompts) + 1
    finally:
        await asyncio.to_thread(engine.close)


async def test_joining_a_running_batch_keeps_greedy_outputs(engine: Engine) -> None:
    sampling = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    _, alone, _ = await run(engine, "alone", "The quick brown fox", sampling)
    _, long_alone, _ = await run(
        engine, "long-alone", "hello there", SamplingParams(max_tokens=60, temperature=0,
                                                            ignore_eos=True)
    )  # fmt: skip
    long_task = await start_long(engine, "long")
    _, joined, _ = await run(engine, "joined", "The quick brown fox", sampling)
    assert not long_task.done(), "the short request waited for the long one"
    assert joined == alone
    assert await long_task == long_alone


async def test_seeded_sampling_repeats_alone_and_in_a_batch(engine: Engine) -> None:
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.9, seed=11)
    first, _, _ = await run(engine, "s1", "abc def", seeded)
    again, _, _ = await run(engine, "s2", "abc def", seeded)
    long_task = await start_long(engine, "busy")
    in_batch, _, _ = await run(engine, "s3", "abc def", seeded)
    await long_task
    other, _, _ = await run(engine, "s4", "abc def", SamplingParams(max_tokens=20, seed=12))
    assert first == again == in_batch
    assert first != other


async def test_seed_repeats_and_stop_sequences_cut(engine: Engine) -> None:
    seeded = SamplingParams(max_tokens=30, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first, _, _ = await run(engine, "s1", "abc def", seeded)
    stop = first[12:15]
    cut, _, last = await run(
        engine, "s4", "abc def", SamplingParams(max_tokens=30, seed=7, top_k=50, top_p=0.95,
                                               stop=(stop,)),
    )  # fmt: skip
    assert cut == first[: first.find(stop)] and last.finish_reason == "stop"


async def test_stop_string_ends_a_greedy_request_and_frees_it(engine: Engine) -> None:
    sampling = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full, _, _ = await run(engine, "full", "import os", sampling)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    stopped = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop, "@@@"))
    cut, ids, last = await run(engine, "cut", "import os", stopped)
    assert cut == full[: full.find(stop)]
    assert last.finish_reason == "stop" and len(ids) < 40
    await eventually(lambda: idle(engine), "the stopped request left the engine")


async def test_eos_stops_without_its_text(engine: Engine) -> None:
    _, ids, _ = await run(engine, "probe", "abc def", GREEDY)
    engine.eos_ids = [ids[3]]  # the model's 4th greedy token now ends the request
    text, stopped, last = await run(engine, "eos", "abc def", GREEDY)
    assert stopped == ids[: ids.index(ids[3]) + 1]
    assert last.finish_reason == "stop" and last.completion_tokens == len(stopped)
    assert text == engine.tokenizer.decode(stopped[:-1], skip_special_tokens=True)
    _, ignored, last = await run(
        engine, "ign", "abc def", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    assert ignored == ids and last.finish_reason == "length"


async def test_cancel_frees_the_row(engine: Engine) -> None:
    _, before, _ = await run(engine, "before", "hello", GREEDY)
    decoded = engine.stats()["decode_live_rows"]  # tokens decoded so far, all rows
    budget = SamplingParams(max_tokens=200, ignore_eos=True)
    stream = engine.generate("c1", engine.encode("hello"), budget)
    async for _ in stream:
        break
    await stream.aclose()
    await eventually(lambda: idle(engine), "the cancelled row left the engine")
    assert engine.stats()["decode_live_rows"] - decoded < 199  # it left early, not at 200
    engine.cancel("unknown-id")  # no-op
    _, ids, _ = await run(engine, "after", "hello", GREEDY)
    assert ids == before


async def test_failing_prefill_fails_only_its_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = engine.encode("zebra")[0]
    forward = engine.model.forward

    def faulty(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and bool((ids == marker).any()):
            raise RuntimeError("injected prefill fault")
        return forward(*args, **kwargs)

    _, long_alone, _ = await run(
        engine, "la", "hello there", SamplingParams(max_tokens=60, temperature=0,
                                                    ignore_eos=True)
    )  # fmt: skip
    _, good_before, _ = await run(engine, "good-before", "abc def", GREEDY)
    monkeypatch.setattr(engine.model, "forward", faulty)
    long_task = await start_long(engine, "long")
    with pytest.raises(Internal, match="injected prefill fault"):
        await run(engine, "bad", "zebra zebra", GREEDY)
    assert await long_task == long_alone
    assert engine.healthy
    _, ids, _ = await run(engine, "good", "abc def", GREEDY)
    assert ids == good_before


async def test_failing_decode_step_fails_its_rows_and_the_loop_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = engine.model.forward
    broken = {"on": False}

    def faulty(*args: Any, **kwargs: Any) -> Any:
        if broken["on"] and kwargs["input_ids"].shape[1] == 1:
            raise RuntimeError("injected decode fault")
        return forward(*args, **kwargs)

    _, good_before, _ = await run(engine, "d0", "abc def", GREEDY)
    monkeypatch.setattr(engine.model, "forward", faulty)
    sampling = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    with pytest.raises(Internal, match="injected decode fault"):
        async for _ in engine.generate("d1", engine.encode("hello"), sampling):
            broken["on"] = True
    broken["on"] = False
    assert engine.healthy
    await eventually(lambda: idle(engine), "the failed rows left the engine")
    _, ids, _ = await run(engine, "d2", "abc def", GREEDY)
    assert ids == good_before


async def test_rows_beyond_the_limits_wait_in_fifo_order(model_dir: Path) -> None:
    engine = await start_engine(model_dir, max_batch_requests=1)
    try:
        order: list[str] = []

        async def one(name: str) -> None:
            async for delta in engine.generate(name, engine.encode("hi"), GREEDY):
                order.append(name)
                if delta.finish_reason:
                    order.append(f"{name}-done")

        await asyncio.gather(one("a"), one("b"))
        assert order.index("a-done") < order.index("b")
    finally:
        await asyncio.to_thread(engine.close)
    engine = await start_engine(model_dir, cache_tokens=30)
    try:
        order = []
        await asyncio.gather(one("x"), one("y"), one("z"))  # ~14 tokens each: two at a time
        # z waits for room: its first token comes after the first of x and y has finished.
        assert order.index("z") > min(order.index("x-done"), order.index("y-done"))
    finally:
        await asyncio.to_thread(engine.close)


async def test_bad_requests_and_lifecycle(model_dir: Path) -> None:
    engine = await start_engine(model_dir)
    with pytest.raises(ContextLengthExceeded, match="context window"):
        await run(engine, "w", "hi", SamplingParams(max_tokens=engine.context_length))
    with pytest.raises(BadRequest, match="empty"):
        async for _ in engine.generate("e", [], GREEDY):
            pass
    # ignore_eos: a sampled end token must not finish it before the engine closes.
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    stream = engine.generate("inflight", engine.encode("hello"), long)
    await stream.__anext__()
    await asyncio.to_thread(engine.close)
    with pytest.raises(Unavailable):
        async for _ in stream:
            pass
    engine.close()  # idempotent
    assert not engine.healthy
    with pytest.raises(Unavailable):
        await run(engine, "late", "hi", GREEDY)


def test_eos_ids_come_from_the_generation_config_and_tokenizer(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model.generation_config.eos_token_id = [5, 6]
    engine = Engine(model, tokenizer, EngineConfig(threads=1))
    assert engine.eos_ids == sorted({5, 6, tokenizer.eos_token_id})
    assert engine.context_length == 256 and engine.vocab_size == model.config.vocab_size


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        line = next(line for line in cpuinfo if line.startswith("flags"))
    return set(line.split(":", 1)[1].split())


def test_pick_device_dtype() -> None:
    assert pick_device("cpu", "float32") == (torch.device("cpu"), torch.float32)
    assert pick_device("cpu", "bfloat16")[1] == torch.bfloat16
    # docs/cloud.md: on CPU bf16 where the processor computes it natively (AVX512_BF16 or
    # AMX), fp32 otherwise.
    amx = "amx" in str(torch.backends.cpu.get_cpu_capability()).lower()
    native = amx or bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    assert pick_device("cpu")[1] == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError):
        pick_device("cpu", "float16")


def test_sampling_rows() -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    greedy = RowSampling.create(temperature=0, top_k=0, top_p=1.0, seed=None)
    top1 = RowSampling.create(temperature=1.0, top_k=1, top_p=1.0, seed=1)
    nucleus = RowSampling.create(temperature=1.0, top_k=0, top_p=1e-6, seed=2)
    tokens = sample_rows(logits, [greedy, top1, nucleus, greedy])
    assert tokens == logits.argmax(dim=-1).tolist()

    def draws(seed: int, top_p: float, row: torch.Tensor) -> list[int]:
        sampler = RowSampling.create(temperature=1.0, top_k=0, top_p=top_p, seed=seed)
        return [sample_rows(row, [sampler])[0] for _ in range(20)]

    flat = torch.zeros(1, 1000)  # top-p over a flat distribution: beyond the candidates
    assert draws(3, 0.9, flat) == draws(3, 0.9, flat)
    assert len(set(draws(3, 0.9, flat))) > 10
    peaked = torch.full((1, 1000), -20.0)
    peaked[0, 7], peaked[0, 9] = 5.0, 5.0
    assert set(draws(4, 0.9, peaked)) == {7, 9}  # both halves of the nucleus, nothing else


def test_detokenizer_never_splits_characters(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = "naïve café — 日本語 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push([i]) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
