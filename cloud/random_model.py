"""Random-weight Llama checkpoints for benchmarks and tests (no training, no downloads).

`hybridgen bench cloud-batching --model random-90m` measures batching on a model of a
realistic size without waiting for training; tests use `tiny` when no model set is at hand.
The tokenizer is a byte-level BPE with the chat special tokens of `models.chat`, trained
in well under a second on text found in this package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.chat import CHAT_TEMPLATE_JINJA, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

logger = logging.getLogger(__name__)

#: Llama shapes by name: hidden, layers, heads, kv heads, intermediate.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128),
    # ~90M parameters (with a small vocabulary).
    "90m": dict(hidden_size=768, num_hidden_layers=14, num_attention_heads=12,
                num_key_value_heads=4, intermediate_size=2048),
    # ~1B parameters (for a GPU).
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=5632),
}  # fmt: skip


def _training_text() -> list[str]:
    """Some English-like text to train a throwaway tokenizer on (docstrings of this repo)."""
    root = Path(__file__).resolve().parent.parent
    texts = []
    for path in sorted(root.glob("*/*.py"))[:200]:
        if ".venv" not in path.parts:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts or ["hello world " * 100]


def make_tokenizer(out_dir: Path, *, vocab_size: int = 2048, max_length: int = 512) -> Path:
    """Train and save a small byte-level BPE tokenizer (transformers fast format)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE_JINJA
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def make_random_llama(
    out_dir: Path,
    *,
    preset: str = "tiny",
    tokenizer_dir: Path | None = None,
    context_length: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random-weight Llama checkpoint (with its tokenizer) to `out_dir`.

    Args:
        preset: a key of `PRESETS`.
        tokenizer_dir: tokenizer to use (copied into the checkpoint); a fresh small one
            is trained when None.
        context_length: `max_position_embeddings`.

    Returns:
        `out_dir`, loadable with `from_pretrained`.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = make_tokenizer(out_dir, max_length=context_length)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    shape: dict[str, Any] = dict(PRESETS[preset])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    count = sum(p.numel() for p in model.parameters())
    logger.info("random Llama %s: %.1fM parameters in %s", preset, count / 1e6, out_dir)
    return out_dir
