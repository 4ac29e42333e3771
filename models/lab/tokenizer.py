"""The shared byte-level BPE tokenizer, saved as a transformers fast tokenizer.

Both models use it. The special tokens of `models.chat` come first (ids 0..6: `<|endoftext|>`
is 0 and doubles as BOS and EOS, `<|pad|>` is 1), then the 256 byte tokens, then the merges.
Saved with `save_pretrained`, so `tokenizer.json` loads with plain `tokenizers` (the edge) and
`AutoTokenizer.from_pretrained` (the cloud) alike, with the chat template set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from models.chat import CHAT_TEMPLATE_JINJA, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

logger = logging.getLogger(__name__)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path, *, max_length: int
) -> Path:
    """Train a byte-level BPE on `texts` and save it as a transformers fast tokenizer.

    Args:
        texts: training documents.
        vocab_size: total vocabulary (special + byte tokens + merges), at least 512.
        out_dir: folder to write (`tokenizer.json`, `tokenizer_config.json`, ...).
        max_length: `model_max_length` recorded in the tokenizer config.

    Returns:
        `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 512:
        raise ValueError(f"vocab_size {vocab_size} is too small (at least 512)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
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
    logger.info("tokenizer: %d tokens saved to %s", tokenizer.get_vocab_size(), out_dir)
    return out_dir
