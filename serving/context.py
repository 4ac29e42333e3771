"""The one context-fit rule: whether a prompt and its answer fit a model's context window.

Every server that generates answers the same overflow the same way: `ContextLengthExceeded`,
naming `max_tokens` when the answer would not fit, and the input field (`messages` or
`prompt`) when the prompt alone fills the window. An input longer than any tokenization of
it could fit is refused before the tokenizer runs (`too_long_for`).
"""

from __future__ import annotations

from broker.errors import ContextLengthExceeded

#: No token of a real vocabulary is longer than this many characters: an input with more
#: characters than this times a context window cannot fit it, and is refused before the
#: tokenizer spends time on it (`too_long_for`).
MAX_CHARS_PER_TOKEN = 64


def too_long_for(chars: int, context_length: int) -> bool:
    """Whether an input of `chars` characters certainly exceeds a `context_length` window
    (see `MAX_CHARS_PER_TOKEN`), so it can be refused without tokenizing it."""
    return chars > MAX_CHARS_PER_TOKEN * context_length


def overflow(
    prompt_tokens: int,
    max_tokens: int | None,
    window: int,
    *,
    input_field: str,
    why: str = "",
) -> ContextLengthExceeded | None:
    """The error when the prompt (and `max_tokens` of answer, when set) does not fit
    `window` tokens, else None. `why` ends the message (what else was tried)."""
    if prompt_tokens >= window:
        return ContextLengthExceeded(
            f"the prompt ({prompt_tokens} tokens) fills the context window of {window} tokens{why}",
            param=input_field,
        )
    if max_tokens is not None and prompt_tokens + max_tokens > window:
        return ContextLengthExceeded(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
            f"context window of {window} tokens{why}",
            param="max_tokens",
        )
    return None


def check_fits(
    prompt_tokens: int, max_tokens: int | None, window: int, *, input_field: str, why: str = ""
) -> None:
    """Raise `overflow`'s error, if any."""
    error = overflow(prompt_tokens, max_tokens, window, input_field=input_field, why=why)
    if error is not None:
        raise error
