"""The one context-fit rule and the one `max_tokens` rule of every server that generates.

Fit: an overflow is answered the same way everywhere, `ContextLengthExceeded`, naming
`max_tokens` when the answer would not fit, and the input field (`messages` or `prompt`)
when the prompt alone fills the window. An input longer than any tokenization of it could
fit is refused before the tokenizer runs (`too_long_for`).

Length: a request without `max_tokens` is answered until the model stops or the context is
full, as OpenAI, vLLM and Ollama do, and never past the server's cap (`settle_max_tokens`).
The edge and the worker apply it where the prompt meets the model, so a fallback gets the
same answer length as a local answer.
"""

from __future__ import annotations

from broker.errors import BadRequest, ContextLengthExceeded

#: No token of a real vocabulary is longer than this many characters: an input with more
#: characters than this times a context window cannot fit it, and is refused before the
#: tokenizer spends time on it (`too_long_for`).
MAX_CHARS_PER_TOKEN = 64

#: Most tokens of an answer whose request sets no `max_tokens` (the edge's and the worker's
#: `max_tokens_cap`, by default): a guard against an answer that never ends, not a length.
MAX_TOKENS_CAP = 1024
MAX_TOKENS_CAP_HELP = (
    "Most tokens of an answer whose request sets no max_tokens (it otherwise runs until the "
    "model stops or the context is full)."
)


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


def token_limit(max_tokens: int | None, cap: int) -> int:
    """Most tokens an answer may have before the context window is counted: the request's
    own `max_tokens`, else the server's cap."""
    return cap if max_tokens is None else max_tokens


def settle_max_tokens(
    max_tokens: int | None, prompt_tokens: int, window: int, *, cap: int, input_field: str,
    why: str = "",
) -> int:  # fmt: skip
    """The `max_tokens` a request is served with: its own when it fits (else
    `ContextLengthExceeded`), or, when it sets none, what the window leaves after the
    prompt, at most `cap`."""
    if max_tokens is not None and max_tokens < 1:  # a bus request is not checked by HTTP
        raise BadRequest("max_tokens must be at least 1", param="max_tokens")
    check_fits(prompt_tokens, max_tokens, window, input_field=input_field, why=why)
    return min(token_limit(max_tokens, cap), window - prompt_tokens)
