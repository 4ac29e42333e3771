"""Build the edge model for onnxruntime-genai with its model builder (int4, int8 or fp32).

The builder (`onnxruntime_genai.models.builder`) reads a Hugging Face checkpoint folder and
writes a folder onnxruntime-genai loads directly: `genai_config.json`, `model.onnx`
(+ `model.onnx.data`) and the tokenizer files. It supports Llama-family architectures (Llama,
Mistral, Qwen, Phi, Gemma, SmolLM, ...) but not GPT-2; `check_architecture` refuses an
unsupported checkpoint before any work with a message naming the architecture.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from broker.errors import BadRequest

logger = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "fp32")


#: Architectures onnxruntime-genai 0.18's model builder converts (its `create_model` dispatch).
#: The builder offers no public list; onnxruntime-genai is pinned to 0.18.x and
#: `test_builder_architectures_match_the_installed_builder` fails loudly when an upgrade
#: changes the dispatch, so this table is reviewed then.
BUILDER_ARCHITECTURES: frozenset[str] = frozenset(
    (
        "ChatGLMForConditionalGeneration",
        "ChatGLMModel",
        "Ernie4_5ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Gemma3ForConditionalGeneration",
        "Gemma4ForConditionalGeneration",
        "Gemma4UnifiedForConditionalGeneration",
        "GemmaForCausalLM",
        "GptOssForCausalLM",
        "GraniteForCausalLM",
        "GraniteMoeHybridForCausalLM",
        "HunYuanDenseV1ForCausalLM",
        "InternLM2ForCausalLM",
        "Lfm2AudioForConditionalGeneration",
        "Lfm2ForCausalLM",
        "Lfm2MoeForCausalLM",
        "Lfm2VlForConditionalGeneration",
        "LlamaForCausalLM",
        "Mistral3ForConditionalGeneration",
        "MistralForCausalLM",
        "NemotronForCausalLM",
        "OlmoForCausalLM",
        "Phi3ForCausalLM",
        "Phi3SmallForCausalLM",
        "Phi3VForCausalLM",
        "Phi4MMForCausalLM",
        "PhiForCausalLM",
        "PhiMoEForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3ForCausalLM",
        "Qwen3VLForConditionalGeneration",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration",
        "SmolLM3ForCausalLM",
        "VideoChatFlashQwenForCausalLM",
        "WhisperForConditionalGeneration",
    )
)


def builder_architectures() -> frozenset[str]:
    """Architectures the pinned onnxruntime-genai builder accepts."""
    return BUILDER_ARCHITECTURES


def checkpoint_architecture(checkpoint: Path) -> str:
    """The first architecture named in `checkpoint/config.json`.

    Raises:
        BadRequest: no folder, no config.json, or no architecture in it.
    """
    config_path = checkpoint / "config.json"
    if not checkpoint.is_dir():
        raise BadRequest(f"checkpoint folder {checkpoint} does not exist")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadRequest(
            f"{checkpoint} is not a Hugging Face checkpoint: config.json missing"
        ) from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{config_path} is not valid JSON: {exc}") from None
    architectures = config.get("architectures") or []
    if not architectures:
        raise BadRequest(f"{config_path} names no architecture ('architectures' is empty)")
    return str(architectures[0])


#: onnxruntime's CPU GroupQueryAttention kernel needs a head size that is a multiple of 16.
HEAD_SIZE_MULTIPLE = 16


def check_head_size(hidden_size: int, num_heads: int, head_dim: int | None = None) -> None:
    """Refuse a shape whose attention head size the edge runtime cannot run.

    Raises:
        BadRequest: head size not a multiple of HEAD_SIZE_MULTIPLE.
    """
    head_size = head_dim or hidden_size // max(1, num_heads)
    if head_size % HEAD_SIZE_MULTIPLE:
        raise BadRequest(
            f"attention head size {head_size} (hidden {hidden_size} / {num_heads} heads) is not a "
            f"multiple of {HEAD_SIZE_MULTIPLE}; onnxruntime's CPU attention kernel cannot run it"
        )


def check_architecture(checkpoint: Path) -> str:
    """Refuse a checkpoint the onnxruntime-genai builder cannot convert.

    Returns:
        The architecture name.

    Raises:
        BadRequest: unsupported architecture (the message names it and lists supported
            causal-LM ones).
    """
    architecture = checkpoint_architecture(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    supported = builder_architectures()
    if architecture not in supported:
        causal = sorted(a for a in supported if a.endswith("ForCausalLM"))
        raise BadRequest(
            f"checkpoint {checkpoint} has architecture {architecture}, which the "
            f"onnxruntime-genai model builder cannot convert for the edge; use a Llama-family "
            f"checkpoint (supported: {', '.join(causal)})",
            param="edge_from",
        )
    if config.get("hidden_size") and config.get("num_attention_heads"):
        check_head_size(
            int(config["hidden_size"]), int(config["num_attention_heads"]), config.get("head_dim")
        )
    return architecture


#: Builder options of the int4 build unless `build_edge` is given others (see its docstring).
INT4_OPTIONS: dict[str, str] = {"block_size": "32", "accuracy_level": "4"}
#: int8 cannot quantize a shared embedding's Gather (the builder logs an error and falls
#: back); exporting the tied matrix as embedding + LM head keeps the int8 build clean.
INT8_OPTIONS: dict[str, str] = {"shared_embeddings": "false"}


def builder_options(
    precision: str, options: Mapping[str, str | int | bool] | None = None
) -> list[str]:
    """The builder's `--extra_options` (KEY=VALUE) for `precision`: the defaults, then `options`."""
    merged: dict[str, str] = dict(
        INT4_OPTIONS if precision == "int4" else INT8_OPTIONS if precision == "int8" else {}
    )
    for key, value in (options or {}).items():
        merged[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return [f"{key}={value}" for key, value in merged.items()]


def build_edge(
    checkpoint: Path,
    out_dir: Path,
    precision: str = "int4",
    *,
    options: Mapping[str, str | int | bool] | None = None,
) -> Path:
    """Convert `checkpoint` into an onnxruntime-genai folder at `out_dir`.

    The builder's own console output goes to the log (debug level), not to stdout.

    Args:
        checkpoint: Hugging Face checkpoint folder (Llama family).
        out_dir: the folder to write.
        precision: int4, int8 or fp32.
        options: builder `--extra_options` over the defaults (`INT4_OPTIONS`, `INT8_OPTIONS`),
            e.g. `{"block_size": 64, "accuracy_level": 4, "is_symmetric": False,
            "shared_embeddings": False, "op_types_to_quantize": "MatMul/Gather",
            "algo_config": "k_quant"}`; see `onnxruntime_genai.models.builder`.

    int4 defaults: block 32, accuracy level 4 (int8 activations x int4 weights in
    MatMulNBits), symmetric; a tied model shares one int4 table between the embedding's
    GatherBlockQuantized and the LM head. `hybridgen bench edge-decode --sweep --quick` on
    SmolLM2-135M-Instruct (2-core AVX-512 VNNI EPYC, shared with other jobs, load ~2-3;
    top-1 agreement with fp32 torch under teacher forcing on 512 tokens, standard error ~2
    points; decode / prefill (256 tokens) as ratios to the default, 1 thread; 2 threads
    alike)::

        variant                              MB   top-1   decode  prefill
        block 32, level 4 (default)        90.0   0.691   127 t/s  378 t/s
        block 16                          106.8   0.744   0.68x    0.85x
        block 64                           81.6   0.613   1.20x    1.07x
        block 128                          83.8   0.602   1.31x    1.27x
        level 1 (fp32) / 2 (fp16)          90.0   0.699   0.59x    0.91x
        untied, int4 embedding            107.7   0.691   1.03x    1.01x
        untied, fp32 embedding            203.3   0.695   1.05x    1.01x
        untied, asymmetric                110.3   0.678   1.05x    0.97x
        untied, k_quant                   205.4   0.674   0.98x    0.99x
        untied, lm_head int8              121.9   0.736   0.94x    1.02x
        untied, lm_head + mixed int8      132.0   0.789   0.92x    1.05x
        int8 build (reference)            270.5   0.977   0.80x    1.10x

    No option is faster at the same agreement: bigger blocks buy speed with 8-9 points of
    agreement, fp32/fp16 activations are slower, and the rest are within noise in speed
    (untied variants double the table on disk and in memory). The builder cannot share an
    asymmetric, k_quant or int8 table between embedding and LM head (the model fails to load
    or is invalid), hence "untied". So the defaults stay the builder's own.

    Raises:
        BadRequest: unknown precision or unsupported architecture.
    """
    if precision not in PRECISIONS:
        raise BadRequest(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    check_architecture(checkpoint)
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    extra = builder_options(precision, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="hg-builder-cache-"))
    captured = io.StringIO()
    # The quantizer logs every node at INFO (and configures the root logger when imported).
    quantizer_log = logging.getLogger("onnxruntime.quantization")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            parsed = parse_extra_options(
                None, str(checkpoint), str(out_dir), precision, "cpu", str(cache_dir), extra
            )
            create_model(
                None, str(checkpoint), str(out_dir), precision, "cpu", str(cache_dir), **parsed
            )
    except Exception:
        logger.error("onnxruntime-genai builder failed; its output:\n%s", captured.getvalue())
        raise
    finally:
        quantizer_log.setLevel(level)
        shutil.rmtree(cache_dir, ignore_errors=True)
    logger.debug("builder output:\n%s", captured.getvalue())
    if not (out_dir / "genai_config.json").is_file():
        raise RuntimeError(f"the builder wrote no genai_config.json into {out_dir}")
    logger.info("edge %s build written to %s (%s)", precision, out_dir, " ".join(extra))
    return out_dir
