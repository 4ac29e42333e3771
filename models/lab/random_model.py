"""Random-weight Llama checkpoints for benchmarks and tests (no training, no downloads).

`hybridgen bench cloud-batching --model random-90m` and `hybridgen bench edge-decode
--model gpt2-small` measure models of a realistic size without waiting for training; tests
use `tiny` (`tiny-k` for a GGUF's K-quants). The tokenizer is the project's own byte-level BPE
(`models.lab.tokenizer`) trained in well under a second on CPython's help topics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Llama shapes by name: hidden, layers, heads, kv heads, intermediate.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128),
    # Rows of whole K-quant super-blocks (256 weights), for a tiny GGUF of those types.
    "tiny-k": dict(hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=512),
    # ~90M parameters (with a small vocabulary).
    "90m": dict(hidden_size=768, num_hidden_layers=14, num_attention_heads=12,
                num_key_value_heads=4, intermediate_size=2048),
    # GPT-2 small's size (124M parameters with GPT-2's vocabulary size).
    "gpt2-small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, intermediate_size=2048, vocab_size=50304),
    # ~1B parameters (for a GPU).
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=5632),
}  # fmt: skip


def make_tokenizer(out_dir: Path, *, vocab_size: int = 2048, max_length: int = 512) -> Path:
    """Train and save a small byte-level BPE tokenizer on local text (well under a second)."""
    from models.lab.corpus import iter_python_topics
    from models.lab.tokenizer import train_tokenizer

    texts = [doc.text for _, doc in zip(range(200), iter_python_topics(), strict=False)]
    return train_tokenizer(
        texts or ["hello world"] * 10, vocab_size, out_dir, max_length=max_length
    )


def make_random_llama(
    out_dir: Path,
    *,
    preset: str = "tiny",
    tokenizer_dir: Path | None = None,
    context_length: int = 512,
    seed: int = 0,
    tokenizer_vocab: int = 2048,
) -> Path:
    """Save a random-weight Llama checkpoint (with its tokenizer) to `out_dir`.

    Args:
        preset: a key of `PRESETS`.
        tokenizer_dir: tokenizer to use (copied into the checkpoint); a fresh small one
            is trained when None.
        context_length: `max_position_embeddings`.
        seed: torch seed of the weights.
        tokenizer_vocab: vocabulary of the fresh tokenizer (a preset may size the model's
            embedding larger, as `gpt2-small` does to match GPT-2's parameter count).

    Returns:
        `out_dir`, loadable with `from_pretrained`.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = make_tokenizer(
            out_dir, vocab_size=tokenizer_vocab, max_length=context_length
        )
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    shape: dict[str, Any] = {"vocab_size": len(tokenizer), **PRESETS[preset]}
    config = LlamaConfig(
        max_position_embeddings=context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # keep random logits well-behaved (no overflow in low precision)
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    count = sum(p.numel() for p in model.parameters())
    logger.info("random Llama %s: %.1fM parameters in %s", preset, count / 1e6, out_dir)
    return out_dir
