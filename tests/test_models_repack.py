"""The edge build from a GGUF holds the GGUF's own blocks (`models.lab.gguf_blocks`,
`models.lab.edge_repack`): each block type read exactly, put into onnxruntime's operators
without a second rounding, and a real tiny build whose weights equal the checkpoint's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.lab import edge_build, edge_repack, gguf_blocks, pretrained
from models.lab.gguf_blocks import SUPPORTED
from tests.fixtures_gguf import layout, random_blocks, write_tiny_gguf


@pytest.mark.parametrize("kind", SUPPORTED)
def test_each_block_type_reads_as_ggufs_own_dequantization(kind: str) -> None:
    """`scale * q + low` gives, bit for bit, what gguf (and so transformers' import) makes of
    the same bytes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = random_blocks(kind, 3, 2, np.random.default_rng(0))
    cols = 2 * layout(kind)[0]
    expected = dequantize(raw, GGMLQuantizationType[kind]).reshape(3, cols)
    blocks = gguf_blocks.read_blocks(kind, raw, cols)
    assert np.array_equal(blocks.dequantized(), expected)
    assert int(blocks.q.max()) < 2**blocks.bits


def operator_weights(encoded: edge_repack._Encoded, cols: int) -> np.ndarray:
    """What `MatMulNBits` (and the added correction) computes as the weight matrix: the
    packed values less their zero point, times the scale, plus the block's correction."""
    rows = encoded.packed.shape[0]
    packed = encoded.packed.reshape(rows, -1)
    if encoded.bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)[:, :cols]
    else:
        q = packed[:, :cols]
    blocks = cols // encoded.block
    if encoded.zero_points is None:
        zero = np.full((rows, blocks), 2 ** (encoded.bits - 1), np.float32)
    elif encoded.bits == 4:
        z = encoded.zero_points.reshape(rows, -1)
        zero = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(rows, -1)[:, :blocks]
    else:
        zero = encoded.zero_points.reshape(rows, blocks)
    q = q.reshape(rows, blocks, encoded.block).astype(np.float32)
    w = (q - zero[..., None].astype(np.float32)) * encoded.scales[..., None]
    if encoded.correction is not None:
        w = w + encoded.correction.T[..., None]
    return w.reshape(rows, cols)


#: Types whose offset is a whole number of steps (an integer zero point); the others need
#: the added correction.
INTEGER_ZERO = {"Q4_0", "Q5_0", "Q8_0", "Q6_K"}


@pytest.mark.parametrize("kind", SUPPORTED)
def test_the_operators_form_gives_the_same_weights(kind: str) -> None:
    """Encoded for `MatMulNBits` (4 bits where q fits, else 8; the type's own block size),
    the weights are the GGUF's, with a correction only where the offset is not a whole
    number of steps."""
    raw = random_blocks(kind, 3, 2, np.random.default_rng(1))
    cols = 2 * layout(kind)[0]
    blocks = gguf_blocks.read_blocks(kind, raw, cols)
    encoded = edge_repack.encode(blocks)
    assert encoded.bits == (4 if blocks.bits <= 4 else 8)
    assert encoded.block == (16 if kind == "Q6_K" else 32)
    assert (encoded.correction is None) is (kind in INTEGER_ZERO)
    expected = blocks.dequantized()
    got = operator_weights(encoded, cols)
    assert np.allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def read_back(graph: Any, node: Any) -> edge_repack._Encoded:
    """A rewritten `MatMulNBits` or `GatherBlockQuantized` node's weights as they lie in the
    ONNX file (a gather's table may be the LM head's weights, reshaped)."""
    attributes = {a.name: a.i for a in node.attribute}
    zero = graph.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    name = f"{node.name}/correction"
    correction = graph.array(name) if name in graph.inits else None
    table = node.input[0 if node.op_type == "GatherBlockQuantized" else 1]
    weights = graph.array(table.removesuffix("/reshaped"))
    scales = graph.array(node.input[2])
    bits, block = attributes["bits"], attributes["block_size"]
    return edge_repack._Encoded(weights, scales, zero, correction, bits, block)


def teacher_forced_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """The build's logits at every position of `ids`, through onnxruntime-genai."""
    from models import ort_edge

    generator = ort_edge.new_generator(ort_edge.load_model(folder, 1), len(ids) + 1)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    return np.array(generator.get_output("logits")).reshape(len(ids), -1)


#: (layers' type, embedding's type): the bundled SmolLM2's pair first. An embedding's type
#: needs no per-block correction (the gather cannot add one).
TINY_TYPES = [("Q4_1", "Q8_0"), ("Q5_1", "Q8_0"), ("Q5_0", "Q4_0"), ("Q8_0", "Q8_0"),
              ("Q4_K", "Q6_K"), ("Q5_K", "Q8_0"), ("Q6_K", "Q6_K")]  # fmt: skip
#: The builder's embedding node.
GATHER = "/model/embed_tokens/GatherBlockQuantized"
#: Each builder node's checkpoint tensors, in its rows' order (layer `{i}`).
NODE_PARTS = {
    "attn/qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn/o_proj": ("self_attn.o_proj",),
    "mlp/gate_proj": ("mlp.gate_proj",),
    "mlp/up_proj": ("mlp.up_proj",),
    "mlp/down_proj": ("mlp.down_proj",),
}


def tiny_gguf_of(folder: Path, quant: str, embed_quant: str) -> tuple[Path, int]:
    """A tiny GGUF of the pair (on the `tiny-k` shape where a type's blocks are K-quant
    super-blocks, which gguf writes as random blocks), and its layer count."""
    from models.lab.random_model import PRESETS, make_random_llama

    preset = "tiny-k" if max(layout(quant)[0], layout(embed_quant)[0]) > 32 else "tiny"
    source = make_random_llama(folder / "source", preset=preset, context_length=128)
    path = write_tiny_gguf(source, folder / "tiny.gguf", quant=quant, embed_quant=embed_quant)
    return path, PRESETS[preset]["num_hidden_layers"]


@pytest.mark.parametrize(("quant", "embed_quant"), TINY_TYPES)
def test_a_tiny_gguf_build_holds_its_blocks_and_its_weights_are_the_checkpoints(
    tmp_path: Path, quant: str, embed_quant: str
) -> None:
    """A GGUF of each pair of types, imported and built: every projection, the LM head and
    the embedding hold its blocks; their weights, read back from the ONNX file, equal the
    imported checkpoint's; and the build's logits are far closer to the checkpoint's than
    the requantized build's."""
    import shutil

    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from models.lab.onnx_graph import Graph

    path, layers = tiny_gguf_of(tmp_path, quant, embed_quant)
    checkpoint = pretrained.checkpoint_from(path, tmp_path / "checkpoint")
    out = edge_build.build_edge(checkpoint, tmp_path / "edge-int4", "int4")
    requantized = shutil.copytree(out, tmp_path / "requantized")
    report = edge_repack.repack_edge(out, path, checkpoint)
    assert report.kept == {}
    assert report.types == (
        {quant: 7 * layers + 1} if quant == embed_quant else {quant: 7 * layers, embed_quant: 1}
    )
    assert report.exact == 5 * layers + 2  # qkv, o, gate, up, down; LM head; embedding
    weights = load_file(str(next(checkpoint.glob("*.safetensors"))))
    graph = Graph.load(out / "model.onnx")
    embedding = weights["model.embed_tokens.weight"]
    expected = {"/lm_head/MatMul_Q4": embedding, GATHER: embedding}
    for i in range(layers):
        for projection, parts in NODE_PARTS.items():
            tensors = [weights[f"model.layers.{i}.{part}.weight"] for part in parts]
            expected[f"/model/layers.{i}/{projection}/MatMul_Q4"] = np.concatenate(tensors)
    nodes = graph.nodes("MatMulNBits") + graph.nodes("GatherBlockQuantized")
    assert sorted(n.name for n in nodes) == sorted(expected)
    for node in nodes:
        want, encoded = expected[node.name], read_back(graph, node)
        got = operator_weights(encoded, want.shape[1])
        if encoded.correction is None:  # whole-step offsets: gguf's own products, exactly
            assert np.array_equal(got, want), node.name
        else:
            assert np.allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max()), node.name
    ids = list(range(3, 67))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    error = {
        name: float(np.abs(teacher_forced_logits(folder, ids) - reference).max())
        for name, folder in (("repacked", out), ("requantized", requantized))
    }
    assert error["repacked"] * 10 < error["requantized"], error


def test_the_build_keeps_a_ggufs_blocks_by_default_and_the_manifest_says_so(
    tmp_path: Path,
) -> None:
    """`hybridgen models build` from a GGUF: by default the manifest records the int4 build's
    weights as the GGUF's blocks, by type; `--edge-weights requantize` requantizes."""
    from models.lab.build import BuildOptions, build_model_set
    from models.lab.random_model import make_random_llama

    source = make_random_llama(tmp_path / "source", preset="tiny", context_length=128)
    path = write_tiny_gguf(source, tmp_path / "tiny.gguf", quant="Q4_0", embed_quant="Q8_0")
    builds = {}
    for weights in ("default", "requantize"):
        chosen = {} if weights == "default" else {"edge_weights": weights}
        options = BuildOptions(version=f"v-{weights}", home=tmp_path / "home", edge_from=path,
                               cloud_from=path, progress=False, **chosen)  # fmt: skip
        builds[weights] = build_model_set(options).manifest.edge_builds["int4"]
    kept = builds["default"]
    assert (kept.weights, kept.gguf_types, kept.requantized_nodes) == (
        "gguf_blocks",
        {"Q4_0": 14, "Q8_0": 1},
        {},
    )
    assert (builds["requantize"].weights, builds["requantize"].gguf_types) == ("requantized", {})


def test_a_type_not_read_stays_requantized_and_the_manifest_names_its_nodes(
    tmp_path: Path,
) -> None:
    """A GGUF whose layers are Q3_K, a type the repack does not read, still builds: those
    nodes stay as the builder quantized them, the manifest's `requantized_nodes` names each
    with the type, the embedding's Q8_0 blocks are held, and the build answers."""
    from models.lab.build import BuildOptions, build_model_set
    from models.lab.onnx_graph import Graph

    path, layers = tiny_gguf_of(tmp_path, "Q3_K", "Q8_0")
    options = BuildOptions(version="v-q3k", home=tmp_path / "home", edge_from=path,
                           cloud_from=path, progress=False)  # fmt: skip
    model_set = build_model_set(options)
    build = model_set.manifest.edge_builds["int4"]
    why = f"GGUF block type Q3_K is not read (supported: {', '.join(SUPPORTED)})"
    kept = [f"/model/layers.{i}/{p}/MatMul_Q4" for i in range(layers) for p in NODE_PARTS]
    assert (build.weights, build.gguf_types, build.requantized_nodes) == (
        "gguf_blocks",
        {"Q8_0": 1},
        dict.fromkeys(kept, why),
    )
    folder = model_set.edge_dir("int4")
    graph = Graph.load(folder / "model.onnx")
    nodes = graph.nodes("MatMulNBits") + graph.nodes("GatherBlockQuantized")
    held = {n.name for n in nodes if any("/gguf_q" in name for name in n.input)}
    assert held == {"/lm_head/MatMul_Q4", GATHER}
    logits = teacher_forced_logits(folder, list(range(3, 67)))
    assert logits.shape[0] == 64 and np.isfinite(logits).all()
