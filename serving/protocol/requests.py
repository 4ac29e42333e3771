"""Request bodies of the OpenAI-compatible APIs: completions and chat completions.

Validated strictly (`"max_tokens": "5"` is a type error, not 5) so a client learns about a
wrong type instead of getting a silently coerced answer; unknown fields are ignored like
OpenAI does. Options neither API supports are refused with a 400 naming them rather than
ignored. `request.sampling(default)` gives the request's `serving.sampling.SamplingParams`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from pydantic_core import PydanticCustomError

from broker.errors import BadRequest
from serving.choices import MAX_CHOICES
from serving.grammar import Grammar, from_response_format
from serving.sampling import SamplingParams
from serving.tools import ToolRequest, check_tool_choice, check_tools

Route = Literal["auto", "edge", "cloud"]

#: How many stop sequences a request may carry (OpenAI allows 4; the bus allows 16).
MAX_STOP_SEQUENCES = 4

#: The largest count or seed a request may give: the engines take 32-bit integers
#: (onnxruntime-genai's `random_seed`, `max_length`, `top_k`), and a bigger value must be a
#: 400 naming the field, not an `OverflowError` when the request is encoded for the bus.
MAX_INT32 = 2**31 - 1
#: Integers msgpack carries (signed or unsigned 64-bit), for the free-form `tools`.
_WIRE_INTS = (-(2**63), 2**64 - 1)


def _wire_ints_only(value: Any) -> bool:
    """Whether every integer inside `value` (nested dicts and lists) fits msgpack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not _WIRE_INTS[0] <= item <= _WIRE_INTS[1]:
            return False
    return True


class _Request(BaseModel):
    """Base of the request bodies: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    """Fields common to completions and chat completions."""

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    #: Not in OpenAI's API (vLLM has it): 0 disables top-k.
    top_k: int = Field(default=0, ge=0, le=MAX_INT32)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_INT32)
    #: How many choices to answer, each its own sequence (`serving.choices`).
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    #: OpenAI's additive penalties (`serving.penalties`); None: 0, off.
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    #: Not in OpenAI's API (llama.cpp's, vLLM's, transformers'): None: 1, off.
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    #: Extension: draft tokens from the prompt, the conversation and the user's own text and
    #: check them in one forward pass (each token still the model's own choice); False: off.
    speculative: bool = True
    #: Extension shared with the edge: opaque user id (personalization on the edge).
    user: str | None = Field(default=None, max_length=256)
    #: Extension (edge): where to serve the request; the cloud ignores it.
    route: Route = "auto"
    #: Extension (edge): never leave the node; the cloud ignores it.
    local_only: bool = False
    #: OpenAI options neither API supports: refused (400 naming them) rather than ignored,
    #: since ignoring them would answer something the client did not ask for.
    logit_bias: Any = None
    best_of: Any = None
    #: OpenAI's legacy names of tools: refused (use `tools` and `tool_choice`).
    functions: Any = None
    function_call: Any = None
    #: Tool calling (`serving.tools`), chat only: refused on completions.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    #: Structured outputs: `text`, `json_object` or `json_schema` (`serving.grammar`);
    #: the answer is decoded under the grammar at whichever end serves it.
    response_format: Any = None

    #: Whether the request takes `tools` (chat) or refuses them (completions).
    _takes_tools: ClassVar[bool] = False

    @field_validator("logit_bias", "best_of", "functions", "function_call")
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: Any) -> Any:
        harmless = (
            value is None
            or value in ({}, [], "none")
            or (info.field_name == "best_of" and value == 1)
        )
        if not harmless:
            hint = "; use tools and tool_choice" if info.field_name.startswith("function") else ""
            raise PydanticCustomError(
                "unsupported",
                f"{info.field_name!r} is not supported by this API{hint}; remove it",
            )
        return value

    @field_validator("tools", "tool_choice", "parallel_tool_calls")
    @classmethod
    def _check_tools(cls, value: Any, info: Any) -> Any:
        if value is None or (not cls._takes_tools and value in ([], "none")):
            return value
        if not _wire_ints_only(value):
            raise PydanticCustomError(
                "out_of_range", f"an integer in {info.field_name!r} does not fit 64 bits"
            )
        if not cls._takes_tools:
            raise PydanticCustomError(
                "unsupported",
                f"{info.field_name!r} is only supported by /v1/chat/completions; remove it",
            )
        try:
            if info.field_name == "tools":
                check_tools(value)
            elif info.field_name == "tool_choice":
                check_tool_choice(value, check_tools(info.data.get("tools")))
        except BadRequest as exc:
            raise PydanticCustomError("tools", exc.message) from None
        return value

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, value: Any) -> Any:
        try:
            from_response_format(value)
        except BadRequest as exc:
            raise PydanticCustomError("response_format", exc.message) from None
        return value

    def grammar(self) -> Grammar | None:
        """The grammar `response_format` asks for (None: unconstrained); checked when the
        body was validated."""
        return from_response_format(self.response_format)

    @field_validator("n")
    @classmethod
    def _bounded_choices(cls, value: int) -> int:
        if not 1 <= value <= MAX_CHOICES:
            raise PydanticCustomError(
                "out_of_range",
                f"n must be between 1 and {MAX_CHOICES} (choices per request); send more "
                "requests for more",
            )
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        """`stop` as a list (OpenAI accepts a string or a list)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_request(self) -> tuple[bool, int]:
        """(whether log-probabilities are asked for, how many top tokens per step)."""
        return False, 0

    def sampling(self) -> SamplingParams:
        """This request's sampling parameters (`max_tokens` None where it sets none: the
        server that generates settles it, `serving.context.settle_max_tokens`)."""
        logprobs, top = self.logprob_request()
        return SamplingParams(
            max_tokens=self.requested_max_tokens(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=tuple(self.stop_list()),
            seed=self.seed,
            logprobs=logprobs,
            top_logprobs=top,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            speculative=self.speculative,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk (`stream_options`)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """`POST /v1/completions`. `prompt` is a string (or a list holding one string)."""

    prompt: str | list[str]
    echo: bool = False
    #: Log-probabilities of the generated tokens and of this many most likely tokens per step
    #: (0-5, as OpenAI's completions); None: none.
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("only one prompt per request is supported (a string or [string])")
        return value

    def prompt_text(self) -> str:
        """The prompt as one string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(_Request):
    """One part of a message's content. Only `text` parts are read: the models are text-only,
    so other parts (`image_url`, `input_audio`, `file`) are refused with a 400
    (`ChatMessage._text_parts_only`)."""

    type: Literal["text"]
    text: str


class ToolCallFunction(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    """A tool call of an assistant message in the history (as the API answered it)."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    #: `developer` is OpenAI's newer name of `system` (rendered as a system message); `tool`
    #: is a tool's result (`tool_call_id` names the call it answers).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    #: None only for an assistant message that holds `tool_calls`.
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        kinds = (
            [p.get("type") for p in value if isinstance(p, dict)] if isinstance(value, list) else []
        )
        other = next((k for k in kinds if k != "text"), None)
        if other is not None:
            raise PydanticCustomError(
                "unsupported",
                f"content parts of type {other!r} are not supported: the models read text "
                "only; send text parts",
            )
        return value

    def text(self) -> str:
        """The message's content as one string (text parts joined; "" for none)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, Any]:
        """`{"role", "content"}` (`developer` becomes `system`), with `tool_calls`,
        `tool_call_id` and a tool's `name` when the message has them."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name:
                out["name"] = self.name
        return out


class ChatCompletionRequest(_GenerationRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    #: Newer name of `max_tokens` in OpenAI's chat API; wins when both are set.
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    #: Log-probabilities of the generated tokens; `top_logprobs` (0-20, needs `logprobs`)
    #: adds the most likely tokens of each step.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    _takes_tools: ClassVar[bool] = True
    #: `tool_request()`, once built.
    _tool_request: ToolRequest | None = PrivateAttr(default=None)

    @field_validator("messages")
    @classmethod
    def _check_content(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(message.text() or message.tool_calls for message in value):
            raise ValueError("every message is empty; give some content")
        for index, message in enumerate(value):
            if message.content is None and not message.tool_calls:
                raise ValueError(f"messages[{index}] has no content")
            if message.role == "tool" and not message.tool_call_id:
                raise ValueError(f"messages[{index}]: a tool message needs tool_call_id")
        return value

    def tool_request(self) -> ToolRequest:
        """The request's tools, `tool_choice` and `parallel_tool_calls` (checked when the
        body was validated), built once per request."""
        if self._tool_request is None:
            tools = check_tools(self.tools) or []
            self._tool_request = ToolRequest(
                tools=tools,
                choice=check_tool_choice(self.tool_choice, tools),
                parallel=self.parallel_tool_calls is not False,
            )
        return self._tool_request

    def grammar(self) -> Grammar | None:
        """The grammar of the answer: a tool call's when tools are in play (`auto` keeps
        `response_format`'s for the plain answer), else `response_format`'s."""
        return self.tool_request().grammar(super().grammar())

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: Any) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def logprob_request(self) -> tuple[bool, int]:
        return bool(self.logprobs), (self.top_logprobs or 0) if self.logprobs else 0

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict[str, Any]]:
        """Messages as `{"role", "content"}` dicts (`developer` becomes `system`; tool
        turns keep `tool_calls`, `tool_call_id` and `name`: `ChatMessage.as_dict`)."""
        return [m.as_dict() for m in self.messages]
