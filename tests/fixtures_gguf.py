"""A tiny real GGUF file, written with the `gguf` package from a random tiny Llama.

It goes through the same import path as the bundled SmolLM2 GGUF (`models.lab.pretrained`), in
a second: tensors named and laid out as llama.cpp's converter writes them (q/k rows permuted
for its rotary layout, which transformers' GGUF loader undoes), a byte-level BPE tokenizer
("gpt2" model) with its merges, and a ChatML template. Its matrices may be quantized blocks of
any type: random valid blocks (`random_blocks`) where gguf has no quantizer for the type.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


#: Where each block type keeps its float16 scale (and min) inside a block, and the size that
#: `random_blocks` gives them: weights of order 0.1, a min near the mean of `scale * q`.
HALVES: dict[str, tuple[tuple[int, float], ...]] = {
    "Q4_0": ((0, 0.02),),
    "Q4_1": ((0, 0.02), (2, 0.02)),
    "Q5_0": ((0, 0.02),),
    "Q5_1": ((0, 0.02), (2, 0.02)),
    "Q8_0": ((0, 0.02),),
    "Q2_K": ((80, 1e-2), (82, 1.5e-2)),
    "Q3_K": ((108, 3e-3),),
    "Q4_K": ((0, 5e-4), (2, 4e-3)),
    "Q5_K": ((0, 2.5e-4), (2, 4e-3)),
    "Q6_K": ((208, 1e-4),),  # its int8 scales reach 128, its values 32 from the middle
}


def layout(kind: str) -> tuple[int, int]:
    """(weights, bytes) of one block of `kind`, as gguf defines them."""
    import gguf

    weights, width = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return weights, width


def random_blocks(kind: str, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes laid out as `rows` rows of `blocks` blocks of `kind` (`[rows, bytes]`
    uint8), with positive float16 scales of the size `HALVES` gives (any other byte pattern
    is a valid block)."""
    _, width = layout(kind)
    raw = rng.integers(0, 256, size=(rows, blocks, width), dtype=np.uint8)
    for offset, size in HALVES[kind]:
        halves = (size * rng.uniform(0.5, 1.5, size=(rows, blocks))).astype(np.float16)
        raw[..., offset : offset + 2] = halves.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, -1)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved per head)."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_gguf(
    checkpoint: Path,
    out: Path,
    *,
    architecture: str = "llama",
    quant: str | None = None,
    embed_quant: str | None = None,
) -> Path:
    """Write the HF Llama checkpoint `checkpoint` (with its tokenizer) as a GGUF file `out`.

    `architecture` is written as `general.architecture` (tests pass an unsupported one);
    `quant` / `embed_quant` store the layers' matrices / the embedding as blocks of that type
    (a name such as "Q4_1"; None: float32): quantized from the checkpoint with gguf's own
    quantizer, or, for a type it cannot quantize (the K-quants), random blocks of the type
    (`random_blocks`, the same on each call), whose weights the GGUF then defines: the checkpoint
    imported from it (`pretrained.checkpoint_from`) holds them, not `checkpoint`'s.
    """
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    config = model.config
    tokenizer_json = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    for added in tokenizer_json.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    specials = {a["content"] for a in tokenizer_json.get("added_tokens", []) if a["special"]}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    # The ChatML markers must exist: reuse two special tokens' ids under ChatML names.
    names = {"<|endoftext|>": "<|endoftext|>", "<|user|>": "<|im_start|>", "<|end|>": "<|im_end|>"}
    tokens = [names.get(t, t) for t in tokens]
    specials = {names.get(t, t) for t in specials}

    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_name("tiny-test-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(CHATML)

    rng = np.random.default_rng(0)

    def add(name: str, array: np.ndarray, kind: str | None) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if kind is None or array.ndim != 2:
            writer.add_tensor(name, array)
            return
        qtype = gguf.GGMLQuantizationType[kind]
        try:
            raw = gguf.quants.quantize(array, qtype)
        except NotImplementedError:
            (rows, cols), weights = array.shape, layout(kind)[0]
            if cols % weights:
                raise ValueError(f"{name}: {cols} columns are not whole {kind} blocks") from None
            raw = random_blocks(kind, rows, cols // weights, rng)
        writer.add_tensor(name, raw, raw_dtype=qtype)

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    add("token_embd.weight", state["model.embed_tokens.weight"], embed_quant)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        layer = {
            "attn_norm": state[prefix + "input_layernorm.weight"],
            "attn_q": _permute(state[prefix + "self_attn.q_proj.weight"], heads),
            "attn_k": _permute(state[prefix + "self_attn.k_proj.weight"], kv_heads),
            "attn_v": state[prefix + "self_attn.v_proj.weight"],
            "attn_output": state[prefix + "self_attn.o_proj.weight"],
            "ffn_norm": state[prefix + "post_attention_layernorm.weight"],
            "ffn_gate": state[prefix + "mlp.gate_proj.weight"],
            "ffn_up": state[prefix + "mlp.up_proj.weight"],
            "ffn_down": state[prefix + "mlp.down_proj.weight"],
        }
        for name, array in layer.items():
            add(f"blk.{i}.{name}.weight", array, quant)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(GGUF file, the random HF checkpoint it was written from)."""
    from models.lab.random_model import make_random_llama

    root = tmp_path_factory.mktemp("gguf")
    checkpoint = make_random_llama(root / "checkpoint", preset="tiny", context_length=256)
    return write_tiny_gguf(checkpoint, root / "tiny.gguf"), checkpoint
