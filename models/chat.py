"""The chat format of the bundled models: simple role tags, shared by cloud and edge.

Torch-free (the edge imports it). The same format is stored as the tokenizer's Jinja
`chat_template`, so `tokenizer.apply_chat_template` in transformers renders identical text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
