"""Build the edge model for onnxruntime-genai with its model builder (int4, int8 or fp32).

The builder (`onnxruntime_genai.models.builder`) reads a Hugging Face checkpoint folder and
writes a folder onnxruntime-genai loads directly: `genai_config.json`, `model.onnx`
(+ `model.onnx.data`) and the tokenizer files. It supports Llama-family architectures (Llama,
Mistral, Qwen, Phi, Gemma, SmolLM, ...) but not GPT-2; `check_architecture` refuses an
unsupported checkpoint before any work with a message naming the architecture.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path

from broker.errors import BadRequest

logger = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "fp32")


@cache
def builder_architectures() -> frozenset[str]:
    """Architectures the installed builder accepts, read from its own dispatch table."""
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        raise BadRequest("onnxruntime-genai is not installed (pip install '.[models]')")
    source = Path(spec.origin).read_text(encoding="utf-8")
    return frozenset(re.findall(r'config\.architectures\[0\] == "([A-Za-z0-9_]+)"', source))


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


def build_edge(checkpoint: Path, out_dir: Path, precision: str = "int4") -> Path:
    """Convert `checkpoint` into an onnxruntime-genai folder at `out_dir`.

    The builder's own console output goes to the log (debug level), not to stdout.

    Raises:
        BadRequest: unknown precision or unsupported architecture.
    """
    if precision not in PRECISIONS:
        raise BadRequest(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    check_architecture(checkpoint)
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    # int8 cannot quantize a shared embedding's Gather (the builder logs an error and falls
    # back); exporting the tied matrix as embedding + LM head keeps the int8 build clean.
    extra = ["shared_embeddings=false"] if precision == "int8" else []
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="hg-builder-cache-"))
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            options = parse_extra_options(
                None, str(checkpoint), str(out_dir), precision, "cpu", str(cache_dir), extra
            )
            create_model(
                None, str(checkpoint), str(out_dir), precision, "cpu", str(cache_dir), **options
            )
    except Exception:
        logger.error("onnxruntime-genai builder failed; its output:\n%s", captured.getvalue())
        raise
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    logger.debug("builder output:\n%s", captured.getvalue())
    if not (out_dir / "genai_config.json").is_file():
        raise RuntimeError(f"the builder wrote no genai_config.json into {out_dir}")
    logger.info("edge %s build written to %s", precision, out_dir)
    return out_dir
