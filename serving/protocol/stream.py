"""The chunks of one streamed answer, chat or completion, in order: `StreamChunks`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from serving.protocol.builders import chat_chunk, completion_chunk
from serving.protocol.logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from serving.protocol.responses import ChatCompletionChunk, Completion, Usage
from serving.tools import CallStream
from serving.tools import finish_reason as tools_finish_reason


@dataclass
class StreamChunks:
    """Every chunk of one streamed answer, chat or completion, built the same way on the edge
    and the cloud: the first (the assistant role), text deltas, the last (`finish_reason`),
    and the usage-only chunk of `stream_options.include_usage`. `extra` fields (hybridgen's
    `served_by`, `route_reason`, ...) land next to OpenAI's.

    `model_version` (the `system_fingerprint`) may be set once known (the cloud tells it at
    the end); `offset` counts the characters streamed so far (completions' `text_offset`).
    `calls` (a chat that lets the model call tools): `deltas` and `ends` turn the calls in the
    text into tool-call deltas and the finish reason into `tool_calls`. `index`: the choice
    the chunks are of (a request with `n` choices has one `StreamChunks` per choice).
    """

    chat: bool
    request_id: str
    model: str
    created: int
    model_version: str | None = None
    offset: int = 0
    calls: CallStream | None = None
    index: int = 0

    def _chunk(
        self,
        text: str | None,
        *,
        first: bool = False,
        finish_reason: str | None = None,
        usage: Usage | tuple[int, int] | None = None,
        logprobs: Sequence[TokenLogprob] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> ChatCompletionChunk | Completion:
        common: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "created": self.created,
            "finish_reason": finish_reason,
            "usage": usage,
            "with_choice": usage is None,
            "model_version": self.model_version,
            "index": self.index,
        }
        if self.chat:
            role: Literal["assistant"] | None = "assistant" if first else None
            scores = chat_logprobs(logprobs) if logprobs else None
            return chat_chunk(
                content=text, role=role, logprobs=scores, tool_calls=tool_calls, **common, **extra
            )
        scores = completion_logprobs(logprobs, self.offset) if logprobs else None
        self.offset += len(text or "")
        return completion_chunk(text=text or "", logprobs=scores, **common, **extra)

    def first(self, text: str = "", **extra: Any) -> ChatCompletionChunk | Completion:
        """The opening chunk (the role; a completion's echoed prompt, if any)."""
        return self._chunk(text, first=True, **extra)

    def delta(
        self, text: str, logprobs: Sequence[TokenLogprob] | None = None, **extra: Any
    ) -> ChatCompletionChunk | Completion:
        """A piece of the answer's text, with its tokens' log-probabilities when asked for."""
        return self._chunk(text, logprobs=logprobs, **extra)

    def tool_calls(
        self, deltas: list[dict[str, Any]], **extra: Any
    ) -> ChatCompletionChunk | Completion:
        """A chat chunk of tool-call deltas (`serving.tools.CallStream`), no content."""
        return self._chunk(None, tool_calls=deltas, **extra)

    def finish(self, finish_reason: str, **extra: Any) -> ChatCompletionChunk | Completion:
        """The closing chunk, with the finish reason."""
        return self._chunk("", finish_reason=finish_reason, **extra)

    def deltas(
        self, text: str, logprobs: Sequence[TokenLogprob] | None = None, **extra: Any
    ) -> list[ChatCompletionChunk | Completion]:
        """The chunks a piece of the answer makes: one `delta`, or with `calls` its content
        and tool-call deltas (none while a call is still being written)."""
        if self.calls is None:
            return [self.delta(text, logprobs, **extra)]
        out = [
            self.delta(part, **extra) if isinstance(part, str) else self.tool_calls(part, **extra)
            for part in self.calls.feed(text)
        ]
        if logprobs:
            out.append(self.delta("", logprobs, **extra))
        return out

    def ends(self, finish_reason: str, **extra: Any) -> list[ChatCompletionChunk | Completion]:
        """The closing chunks: text still held back (a call cut short), then `finish`
        (`tool_calls` when the answer made calls and ended by itself)."""
        if self.calls is None:
            return [self.finish(finish_reason, **extra)]
        held = self.calls.close()
        out = [self.delta(held, **extra)] if held else []
        reason = tools_finish_reason(finish_reason, self.calls.calls)
        return [*out, self.finish(reason, **extra)]

    def usage(self, usage: Usage, **extra: Any) -> ChatCompletionChunk | Completion:
        """The usage-only chunk after the last one (no choices)."""
        return self._chunk(None, usage=usage, **extra)
