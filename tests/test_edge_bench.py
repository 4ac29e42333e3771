"""Edge benchmarks: the edge's fields of `hybridgen bench hop`, and `hybridgen bench
edge-decode` (bytes and bandwidth helpers, the JSON it prints, the builder-option sweep), plus
the per-token log-probabilities the decode bench's runtime figure depends on."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.runtime import (
    EdgeRuntime,
    Prefill,
    SamplingParams,
    Token,
)
from hybridgen.benches import edge_decode as decode_bench
from hybridgen.benches import edge_decode_sweep as bench_sweep
from hybridgen.benches.edge_hop import hop_measurement
from models.lab import edge_build
from models.logits import log_softmax
from models.registry import ModelSet
from models.scoring import prompt_perplexity


@pytest.mark.slow
async def test_hop_measurement(
    tiny_models: ModelSet, tiny_models_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HG_HOME", str(tiny_models_home))
    figures = await hop_measurement(SimpleNamespace(quick=True))
    # Every figure measured (none missing or failed); their values, and the goals, are the
    # benchmark's to report (docs/edge.md, "Edge figures in hybridgen bench hop").
    keys = {"no_responders_decision_ms", "fallback_added_p50_ms", "edge_rss_mb"}
    assert keys <= set(figures) and "edge_error" not in figures, figures
    assert all(figures[key] is not None for key in keys), figures


@pytest.mark.slow
async def test_hop_measurement_without_a_model_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HG_HOME", str(tmp_path))
    figures = await hop_measurement(SimpleNamespace(quick=True))
    assert "hybridgen models build" in figures["edge_error"]


# ---------------------------------------------------------------- edge-decode helpers


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _graph_folder(folder: Path) -> Path:
    """A graph shaped like the builder's int4 output for a tied model (not runnable).

    Tied table `lm` (2048 B) + scales (512 B): reshaped into a GatherBlockQuantized and read
    whole by the LM head's MatMulNBits. A layer matmul (1024 + 256 B), a norm (32 B), the
    reshape's shape (16 B). Left out: an untied int4 embedding (2048 + 512 B, lookup only)
    and an fp32 table behind a plain Gather (2048 B).
    """
    inits = [
        _init("lm_q4", np.zeros((64, 2, 16), np.uint8)),
        _init("lm_scales", np.zeros((64, 2), np.float32)),
        _init("shape", np.array([64, 32], np.int64)),
        _init("layer_q4", np.zeros((32, 2, 16), np.uint8)),
        _init("layer_scales", np.zeros((32, 2), np.float32)),
        _init("norm", np.zeros(8, np.float32)),
        _init("embed_q4", np.zeros((64, 2, 16), np.uint8)),
        _init("embed_scales", np.zeros((64, 2), np.float32)),
        _init("table", np.zeros((64, 8), np.float32)),
    ]
    ms = "com.microsoft"
    nodes = [
        helper.make_node("Reshape", ["lm_q4", "shape"], ["lm_2d"]),
        helper.make_node("GatherBlockQuantized", ["lm_2d", "ids", "lm_scales"], ["e1"], domain=ms),
        helper.make_node(
            "GatherBlockQuantized", ["embed_q4", "ids", "embed_scales"], ["e2"], domain=ms
        ),
        helper.make_node("Gather", ["table", "ids"], ["e3"]),
        helper.make_node("SimplifiedLayerNormalization", ["x", "norm"], ["h"], domain=ms),
        helper.make_node("MatMulNBits", ["h", "layer_q4", "layer_scales"], ["y"], domain=ms),
        helper.make_node("MatMulNBits", ["y", "lm_q4", "lm_scales"], ["logits"], domain=ms),
    ]
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                         ["batch", 3, "past", "kv_dim"])  # fmt: skip
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 64])
    graph = helper.make_graph(nodes, "g", [ids, x, past], [out], inits)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    decoder = {"num_hidden_layers": 2, "num_key_value_heads": 3, "num_attention_heads": 6,
               "head_size": 4}  # fmt: skip
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": decoder}}))
    return folder


def test_weight_bytes_count_a_tied_lm_head_and_skip_lookup_only_tables(tmp_path: Path) -> None:
    folder = _graph_folder(tmp_path / "m")
    assert decode_bench.weight_bytes_per_token(folder) == 2048 + 512 + 1024 + 256 + 32 + 16


def test_kv_bytes_per_position(tmp_path: Path) -> None:
    folder = _graph_folder(tmp_path / "m")
    # keys and values x 2 layers x 3 KV heads x head size 4 x float32
    assert decode_bench.kv_bytes_per_position(folder) == 2 * 2 * 3 * 4 * 4


def test_read_bandwidth_adds_concurrent_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_bench, "measure_read_bandwidth", lambda: 5.0)
    assert decode_bench.read_bandwidth(1) == 5.0
    assert decode_bench.read_bandwidth(2) == 10.0


def test_builder_options_defaults_and_overrides() -> None:
    assert edge_build.builder_options("int4") == [
        f"{k}={v}" for k, v in edge_build.INT4_OPTIONS.items()
    ]
    assert "shared_embeddings=false" in edge_build.builder_options("int8")
    assert edge_build.builder_options("fp32") == []
    options = edge_build.builder_options("int4", {"block_size": 64, "is_symmetric": False})
    assert "block_size=64" in options and "is_symmetric=false" in options
    assert "block_size=32" not in options


def test_threads_must_be_a_list_of_positive_counts(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("one", "0"):
        with pytest.raises(SystemExit):
            decode_bench.main(["--threads", bad])
    assert "--threads" in capsys.readouterr().err


def test_agreement_is_the_share_of_matching_argmax(tiny_models: ModelSet) -> None:
    """Against the build's own teacher-forced argmax, agreement is 1; with the reference
    changed at 3 of 16 positions (a token no model predicts), 13/16."""
    from models import ort_edge

    folder = tiny_models.edge_dir("int4")
    tokens = list(range(5, 21))
    own = ort_edge.teacher_forced_argmax(ort_edge.load_model(folder, 1), tokens)
    assert bench_sweep.agreement(folder, tokens, own, 1) == 1.0
    changed = [-1, -1, -1, *own[3:]]
    assert bench_sweep.agreement(folder, tokens, changed, 1) == 13 / 16


# ---------------------------------------------------------------- log-probabilities


def test_log_softmax_of_one_entry_matches_the_full_one() -> None:
    logits = np.random.default_rng(0).normal(0, 4, 1000).astype(np.float32)
    full = log_softmax(logits.astype(np.float64))
    assert isinstance(full, np.ndarray)
    for index in (0, 17, int(logits.argmax())):
        value = log_softmax(logits, index)
        assert isinstance(value, float)
        assert math.isclose(value, float(full[index]), abs_tol=1e-5)


def test_prompt_perplexity_matches_a_float64_reference() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (40, 3000)).astype(np.float32)
    ids = [int(t) for t in rng.integers(0, 3000, 40)]
    full = np.asarray(log_softmax(logits.astype(np.float64)))
    for span in (None, (5, 20), (0, 1)):
        start, end = span or (0, 40)
        positions = range(max(1, start), end)
        expected = (
            math.exp(-np.mean([full[i - 1, ids[i]] for i in positions])) if positions else None
        )
        value = prompt_perplexity(logits, ids, span)
        if expected is None:
            assert value is None
        else:
            assert value is not None and math.isclose(value, expected, rel_tol=1e-5)


@pytest.mark.slow
async def test_token_logprobs_score_the_chosen_token(tiny_models: ModelSet) -> None:
    """Each Token's logprob is log p(token | everything before it): checked against feeding
    the same tokens one at a time (the logits read *before* sampling, not after)."""
    runtime = EdgeRuntime(tiny_models.edge_dir("int4"), threads=1, max_active=1)
    try:
        ids = runtime.encode("Permission is hereby granted, free of charge, to any person")
        greedy = SamplingParams(max_tokens=10, temperature=0)
        events = [e async for e in runtime.submit(ids, greedy)]
        tokens = [e for e in events if isinstance(e, Token)]
        assert tokens
        params = og.GeneratorParams(runtime._model)
        params.set_search_options(max_length=len(ids) + len(tokens) + 1)
        generator = og.Generator(runtime._model, params)
        generator.append_tokens(ids)
        for token in tokens:
            logits = np.array(generator.get_logits()[0, 0], dtype=np.float64)
            assert token.token_id == int(logits.argmax())  # greedy
            expected = float(np.asarray(log_softmax(logits))[token.token_id])
            assert math.isclose(token.logprob, expected, abs_tol=1e-4)
            generator.append_tokens([token.token_id])
    finally:
        await runtime.close()


@pytest.mark.slow
async def test_chunked_prefill_perplexity_matches_one_pass(tiny_models: ModelSet) -> None:
    """A prompt longer than the runtime's 64-token prefill chunks, scored whole and over a
    span across chunk boundaries, gives the perplexity of the one-pass logits."""
    runtime = EdgeRuntime(tiny_models.edge_dir("int4"), threads=1, max_active=1)
    try:
        text = "Permission is hereby granted, free of charge, to any person obtaining a copy. "
        ids = (runtime.encode(text) * 40)[: min(150, runtime.context_length - 2)]
        assert len(ids) > 100  # two chunks at least
        params = og.GeneratorParams(runtime._model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(runtime._model, params)
        generator.append_tokens(ids)
        logits = np.array(generator.get_output("logits")[0])
        for span in (None, (10, len(ids) - 3), (63, 66), (0, 1)):
            generation = runtime.submit(ids, SamplingParams(max_tokens=1), score_span=span)
            prefill = await generation.next_event()
            assert isinstance(prefill, Prefill)
            async for _ in generation:
                pass
            expected = prompt_perplexity(logits, ids, span)
            if expected is None:
                assert prefill.perplexity is None
            else:
                assert prefill.perplexity is not None
                assert math.isclose(prefill.perplexity, expected, rel_tol=1e-4)
    finally:
        await runtime.close()


# ---------------------------------------------------------------- edge-decode on the tiny set


@pytest.mark.slow
def test_edge_decode_json_has_both_thread_counts_side_by_side(
    tiny_models: ModelSet,
    tiny_models_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HG_HOME", str(tiny_models_home))
    monkeypatch.setattr(decode_bench, "measure_read_bandwidth", lambda: 10.0)
    assert decode_bench.main(["--json", "--runs", "1", "--threads", "1,2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["threads"] for row in result["by_threads"]] == [1, 2]
    assert result["bytes_per_token"] == (
        result["weight_bytes_per_token"] + result["kv_bytes_per_token"]
    )
    # Each derived figure is its measured rates' ratio (one run: the medians are that run's),
    # up to the rounding of each (ratios to 2 or 3 decimals, rates to 0.1).
    for row, bandwidth in zip(result["by_threads"], (10.0, 20.0), strict=True):
        assert row["bandwidth_gb_s"] == bandwidth
        assert row["roofline_tok_s"] == pytest.approx(
            bandwidth * 1e9 / result["bytes_per_token"], abs=0.05
        )
        assert row["roofline_fraction"] == pytest.approx(
            row["raw_tok_s"] * result["bytes_per_token"] / (bandwidth * 1e9), rel=0.02, abs=6e-4
        )
        assert row["ratio_int4"] == pytest.approx(
            row["edge_int4_tok_s"] / row["torch_fp32_tok_s"], rel=0.02, abs=6e-3
        )
        assert row["ratio_int8"] == pytest.approx(
            row["edge_int8_tok_s"] / row["torch_fp32_tok_s"], rel=0.02, abs=6e-3
        )
        assert row["runtime_vs_raw"] == pytest.approx(
            row["runtime_tok_s"] / row["raw_tok_s"], rel=0.02, abs=6e-4
        )
        assert row["runtime_tokens"] >= 1  # the runtime answered
    assert result["threads"] == 1 and result["raw_tok_s"] == result["by_threads"][0]["raw_tok_s"]
    assert set(result["cpu"]["flags"]) >= {"avx2", "avx512f", "amx_tile"}
    assert len(result["load_average_start"]) == 3
    assert result["prefill_tokens"] == min(256, tiny_models.edge_context_length - 2)


@pytest.mark.slow
def test_sweep_builds_measures_and_reports_a_failed_variant(
    tiny_models: ModelSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    variants = {
        "b32-a4 (default)": {},
        "b16-a4": {"block_size": "16"},
        "broken": {"precision": "int3"},
    }
    result = bench_sweep.run_sweep(
        tiny_models.edge_checkpoint_dir, threads=[1], runs=1, variants=variants,
        work_dir=tmp_path,
    )  # fmt: skip
    rows = {row["variant"]: row for row in result["variants"]}
    assert "int3" in rows["broken"]["error"]
    default, small_blocks = rows["b32-a4 (default)"], rows["b16-a4"]
    assert default["decode_vs_default_1t"] == 1.0 and default["prefill_vs_default_1t"] == 1.0
    assert small_blocks["bytes"] > default["bytes"]  # twice the scales
    assert "block_size=16" in small_blocks["options"]
    # One run: each variant's speed against the default is the ratio of its rates.
    for key in ("decode", "prefill"):
        assert small_blocks[f"{key}_vs_default_1t"] == pytest.approx(
            small_blocks[f"{key}_tok_s_1t"] / default[f"{key}_tok_s_1t"], rel=0.02, abs=6e-4
        )
    bench_sweep.print_sweep(result)
    assert "build failed" in capsys.readouterr().out
