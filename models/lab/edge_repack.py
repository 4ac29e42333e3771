"""The edge build holding a GGUF's own quantized blocks, not a second quantization of them.

onnxruntime-genai's builder quantizes the checkpoint it is given. When that checkpoint is a
dequantized GGUF, its weights already lie on the GGUF's 4- or 8-bit grid, and quantizing them
again (round to nearest, symmetric) moves most of them off it. This step rewrites the
builder's `MatMulNBits` weights (and the embedding's `GatherBlockQuantized` table) from the
GGUF's blocks as they are (`models.lab.gguf_blocks`: `w = scale * q + low`):

- `q` is stored as 4 bits when it fits (Q4_0, Q4_1, Q4_K), else 8 (Q5, Q6_K, Q8_0), in the
  GGUF's block size (32, or 16 for Q6_K);
- `low` becomes the operator's integer zero point where it is a whole number of steps
  (Q4_0, Q5_0, Q8_0, Q6_K);
- where it is not (the per-block minimum of Q4_1, Q5_1 and the K-quants), onnxruntime's fast
  kernels take no fractional zero point, so the remainder is added back exactly after the
  product: `y = A·W + Σ_block sum(A in block) * remainder`, one small `ReduceSum`, `MatMul`
  and `Add` per projection (`encode` keeps the remainder small).

Each rewritten matrix is checked against the checkpoint the cloud serves (the same weights,
dequantized by transformers); a projection whose source is missing, of another type, or does
not match exactly stays as the builder made it, and the report says which and why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.lab import gguf_blocks
from models.lab.gguf_blocks import Blocks

logger = logging.getLogger(__name__)

#: How the int4 edge build of a GGUF gets its weights (`hybridgen models build
#: --edge-weights`): the GGUF's own blocks (`repack_edge`), or the builder's requantization
#: of the dequantized checkpoint. The first is the default.
EDGE_WEIGHTS = ("gguf", "requantize")

#: Builder projection name -> (GGUF tensor suffixes, whether each is a q/k row permutation).
PROJECTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "attn/qkv_proj": (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "")),
    "attn/q_proj": (("attn_q", "q"),),
    "attn/k_proj": (("attn_k", "k"),),
    "attn/v_proj": (("attn_v", ""),),
    "attn/o_proj": (("attn_output", ""),),
    "mlp/gate_up_proj": (("ffn_gate", ""), ("ffn_up", "")),
    "mlp/gate_proj": (("ffn_gate", ""),),
    "mlp/up_proj": (("ffn_up", ""),),
    "mlp/down_proj": (("ffn_down", ""),),
}
#: The checkpoint's tensor for each GGUF suffix (layer `{i}`).
CHECKPOINT_NAMES = {
    "attn_q": "model.layers.{i}.self_attn.q_proj.weight",
    "attn_k": "model.layers.{i}.self_attn.k_proj.weight",
    "attn_v": "model.layers.{i}.self_attn.v_proj.weight",
    "attn_output": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down": "model.layers.{i}.mlp.down_proj.weight",
}


@dataclass
class RepackReport:
    """What the repack did: matrices from the GGUF's blocks, by type, and what it left."""

    #: `MatMulNBits` nodes now holding the GGUF's blocks (and the embedding table, if so).
    exact: int = 0
    #: Of those, the ones with a per-block offset added back (`correction`).
    corrected: int = 0
    #: GGUF block types used, with how many source tensors of each.
    types: dict[str, int] = field(default_factory=dict)
    #: Nodes left as the builder quantized them: node name -> why.
    kept: dict[str, str] = field(default_factory=dict)


@dataclass
class _Source:
    """A GGUF file's tensors, the checkpoint's weights, and the row order of q and k."""

    tensors: dict[str, Any]
    checkpoint: dict[str, np.ndarray]
    heads: dict[str, int]  # "q"/"k" -> heads whose rows llama.cpp permuted (empty: none)

    def blocks(self, name: str, permute: str) -> Blocks:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise LookupError(f"the GGUF has no tensor {name}")
        kind = tensor.tensor_type.name
        blocks = gguf_blocks.read_blocks(kind, np.asarray(tensor.data), int(tensor.shape[0]))
        heads = self.heads.get(permute)
        return blocks.rows(_unpermute(blocks.q.shape[0], heads)) if heads else blocks


def _unpermute(rows: int, heads: int) -> np.ndarray:
    """The row order transformers restores from llama.cpp's rotary layout of q and k."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)


def _gguf_source(gguf_path: Path, checkpoint: Path) -> _Source:
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    reader = GGUFReader(gguf_path)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")

    def count(key: str) -> int:
        found = reader.fields.get(f"{arch}.{key}")
        return int(found.parts[-1][0]) if found is not None else 0

    heads = {}
    if arch == "llama":  # transformers undoes llama.cpp's q/k permutation for llama only
        heads = {"q": count("attention.head_count"), "k": count("attention.head_count_kv")}
    weights: dict[str, np.ndarray] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return _Source({t.name: t for t in reader.tensors}, weights, heads)


def _matches(blocks: Blocks, expected: np.ndarray) -> bool:
    """Whether the blocks give exactly the checkpoint's weights (float32 round-off aside)."""
    got = blocks.dequantized()
    if got.shape != expected.shape:
        return False
    bound = 1e-6 * float(np.abs(expected).max() or 1.0)
    return bool(np.abs(got - expected.astype(np.float32)).max() <= bound)


@dataclass
class _Encoded:
    """Blocks as `MatMulNBits` inputs: packed `q`, scales, zero points, and a correction."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    correction: np.ndarray | None
    bits: int
    block: int


def encode(blocks: Blocks) -> _Encoded:
    """The operator's form of `blocks`: a zero point per block, and where it leaves a
    remainder of `low` (a fractional minimum), the remainder as a `correction`
    `[blocks, rows]` added back. Values that fill their storage (4 of 4 bits, 8 of 8) keep
    the operator's default, mid-range zero point; narrower ones (5 or 6 bits stored in 8)
    take the integer nearest to `-low / scale`, so the exact fp32 correction stays small
    beside the operator's int8 activations."""
    bits = 4 if blocks.bits <= 4 else 8
    rows, cols = blocks.q.shape
    q = blocks.q.reshape(rows, cols // blocks.block, blocks.block)
    scale = blocks.scale.astype(np.float32)
    default = 2 ** (bits - 1)
    if blocks.bits == bits:
        zero = np.full(scale.shape, default, np.float32)
    else:
        safe = np.where(scale == 0, np.float32(1), scale)
        zero = np.where(scale == 0, 0, np.rint(-blocks.low / safe)).clip(0, 2**bits - 1)
    remainder = (blocks.low + zero * scale).astype(np.float32)
    zero_points = None
    if not np.all(zero == default):
        zero_points = _pack(zero.astype(np.uint8), bits)  # along the blocks, as ORT reads
    correction = remainder.T.copy() if np.any(remainder != 0) else None
    return _Encoded(_pack(q, bits), scale, zero_points, correction, bits, blocks.block)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values `[..., n]` as bytes: two per byte (low nibble first) at 4 bits."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _layer_projection(node_name: str) -> tuple[int, str] | None:
    """(layer, projection) of a builder node named `/model/layers.<i>/<attn|mlp>/<proj>/...`."""
    parts = node_name.split("/")
    if len(parts) < 5 or not parts[2].startswith("layers."):
        return None
    return int(parts[2].split(".")[1]), f"{parts[3]}/{parts[4]}"


def _sources_of(node_name: str, tied: bool) -> Iterator[tuple[str, str, str]]:
    """(GGUF tensor, checkpoint tensor, permutation) of each part of a builder node."""
    if node_name.startswith("/lm_head/"):
        if tied:
            yield "token_embd.weight", "model.embed_tokens.weight", ""
        else:
            yield "output.weight", "lm_head.weight", ""
        return
    found = _layer_projection(node_name)
    if found is None or found[1] not in PROJECTIONS:
        raise LookupError(f"no GGUF tensor is known for {node_name}")
    layer, projection = found
    for suffix, permute in PROJECTIONS[projection]:
        yield f"blk.{layer}.{suffix}.weight", CHECKPOINT_NAMES[suffix].format(i=layer), permute


def source_blocks(source: _Source, node_name: str, tied: bool) -> tuple[Blocks, list[str]]:
    """The checked GGUF blocks of one builder node, and the block types they came from.

    Raises:
        LookupError, ValueError: no known source, another type, or weights that differ.
    """
    parts, kinds = [], []
    for gguf_name, checkpoint_name, permute in _sources_of(node_name, tied):
        blocks = source.blocks(gguf_name, permute)
        expected = source.checkpoint.get(checkpoint_name)
        if expected is None or not _matches(blocks, expected):
            raise ValueError(f"{gguf_name} does not give the checkpoint's {checkpoint_name}")
        parts.append(blocks)
        kinds.append(source.tensors[gguf_name].tensor_type.name)
    return gguf_blocks.concat(parts), kinds


def repack_edge(folder: Path, gguf_path: Path, checkpoint: Path) -> RepackReport:
    """Rewrite the builder's int4 build in `folder` from the blocks of `gguf_path` (the file
    `checkpoint`, the weights it must equal, was imported from)."""
    from models.lab.onnx_graph import Graph

    source = _gguf_source(gguf_path, checkpoint)
    graph = Graph.load(folder / "model.onnx")
    tied = "output.weight" not in source.tensors
    report = RepackReport()
    lm_head: tuple[_Encoded, str] | None = None
    for node in graph.nodes("MatMulNBits"):
        try:
            blocks, kinds = source_blocks(source, node.name, tied)
        except (LookupError, ValueError) as exc:
            report.kept[node.name] = str(exc)
            continue
        encoded = encode(blocks)
        _rewrite(graph, node, encoded)
        if node.name.startswith("/lm_head/") and tied:
            lm_head = encoded, node.input[1]
        report.exact += 1
        report.corrected += encoded.correction is not None
        for kind in kinds:
            report.types[kind] = report.types.get(kind, 0) + 1
    _rewrite_embedding(graph, source, report, lm_head)
    if report.exact:
        graph.save(folder / "model.onnx")
    logger.info("edge build %s: %d matrices from the GGUF's blocks (%s), %d kept", folder,
                report.exact, ", ".join(f"{k} {v}" for k, v in report.types.items()),
                len(report.kept))  # fmt: skip
    return report


def _rewrite(graph: Any, node: Any, encoded: _Encoded) -> None:
    """Put `encoded` into a `MatMulNBits` node (new names: a tied embedding may still read
    the old table)."""
    weight = graph.put(f"{node.name}/gguf_q", encoded.packed)
    graph.set_input(node, 1, weight)
    graph.set_input(node, 2, graph.put(f"{node.name}/gguf_scales", encoded.scales))
    if encoded.zero_points is not None:
        graph.set_input(node, 3, graph.put(f"{node.name}/gguf_zero_points", encoded.zero_points))
    graph.set_attribute(node, "bits", encoded.bits)
    graph.set_attribute(node, "block_size", encoded.block)
    if encoded.correction is not None:
        graph.add_block_correction(node, encoded.correction, encoded.block)


def _rewrite_embedding(
    graph: Any, source: _Source, report: RepackReport, lm_head: tuple[_Encoded, str] | None
) -> None:
    """The embedding's `GatherBlockQuantized` from `token_embd`'s blocks; a tied LM head
    (`lm_head`: its encoding and weight) shares its table. A table that needs a correction,
    or 4-bit zero points, stays as the builder made it."""
    gathers = graph.nodes("GatherBlockQuantized")
    if len(gathers) != 1:
        return
    gather = gathers[0]
    if lm_head is None:
        try:
            blocks, _ = source_blocks(source, "/lm_head/", tied=True)
        except (LookupError, ValueError) as exc:
            report.kept[gather.name] = str(exc)
            return
        encoded, weight = encode(blocks), ""
    else:
        encoded, weight = lm_head
    if encoded.correction is not None or (encoded.bits == 4 and encoded.zero_points is not None):
        report.kept[gather.name] = "its blocks need an offset the gather cannot add"
        return
    rows = encoded.packed.shape[0]
    if weight:
        table = graph.add_reshape(weight, [rows, -1])
    else:
        table = graph.put(f"{gather.name}/gguf_q", encoded.packed.reshape(rows, -1))
    graph.set_input(gather, 0, table)
    graph.set_input(gather, 2, graph.put(f"{gather.name}/gguf_scales", encoded.scales))
    if encoded.bits == 8:  # the gather's default zero point is not the operator's 128
        zero = encoded.zero_points
        if zero is None:
            zero = np.full(encoded.scales.shape, 128, np.uint8)
        graph.set_input(gather, 3, graph.put(f"{gather.name}/gguf_zero_points", zero))
    graph.set_attribute(gather, "bits", encoded.bits)
    graph.set_attribute(gather, "block_size", encoded.block)
    report.exact += 1
