"""The cloud worker's check before tokenizing: an input too long for any context window.

A worker tokenizes the whole input before it can count tokens; an input with more characters
than `MAX_CHARS_PER_TOKEN` times the context window cannot fit it whatever it says, so the
worker refuses it (`ContextLengthExceeded`) without spending tokenizer time on it.
"""

from __future__ import annotations

#: No token of a real vocabulary is longer than this many characters: an input with more
#: characters than this times a context window cannot fit it, and is refused before the
#: tokenizer spends time on it (`too_long_for`).
MAX_CHARS_PER_TOKEN = 64


def too_long_for(chars: int, context_length: int) -> bool:
    """Whether an input of `chars` characters certainly exceeds a `context_length` window
    (see `MAX_CHARS_PER_TOKEN`), so it can be refused without tokenizing it."""
    return chars > MAX_CHARS_PER_TOKEN * context_length
