"""Chat formats: the lab models' role tags, and reading any model's own Jinja template.

Torch-free (the edge imports it). The same format is stored as the tokenizer's Jinja
`chat_template`, so `tokenizer.apply_chat_template` in transformers renders identical text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
#: Special tokens the tokenizer is trained with, in id order after the bytes.
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, END_OF_TURN, *ROLE_TOKENS.values()]

CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


#: Tokens that end an assistant turn in common chat templates (the lab's `<|end|>` too).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """A checkpoint's stop tokens: its end of text, then every end-of-turn token it has."""
    ids = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        token_id = vocab.get(token)
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


def render_chat(
    messages: Iterable[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """Render chat messages (`role`, `content`) as one prompt string.

    Raises:
        ValueError: unknown role (the message names it).
    """
    parts = []
    for index, message in enumerate(messages):
        role = message["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"messages[{index}].role {role!r} is not one of {', '.join(ROLES)}")
        parts.append(f"{ROLE_TOKENS[role]}\n{message['content']}{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{ROLE_TOKENS['assistant']}\n")
    return "".join(parts)


def read_chat_template(model_dir: Path) -> str | None:
    """The model's Jinja chat template: `chat_template.jinja` (what transformers 5 writes and
    the builder copies), else `tokenizer_config.json`'s `chat_template`; None without one."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) and template else None
