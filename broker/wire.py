"""Bus messages: typed, versioned (`"v": 3`), msgpack-encoded, validated on decode.

Both sides of every subject use these types. Encoding and decoding are pure functions.
Decoding never raises anything but `broker.errors.BadRequest`, whose message names the
field at fault, so a handler can answer a coded error instead of crashing.

Every message is a msgpack map with `"v"` (schema version) and `"type"` (the message kind,
so a stream of replies can mix `Chunk`, `Done` and `Error`). Unknown fields are ignored.

Version 2 carries a chat request as its `messages`, not as a rendered prompt: the edge and the
cloud may run different models with different tokenizers and chat templates, so each end
applies its own model's template. A completion still carries its raw `prompt`.

Version 3 adds `GenerateRequest.grammar`: a constrained request (`response_format`) may fall
back to the cloud, and the cloud must decode it under the same grammar (`serving.grammar`).
It also carries real log-probabilities: `GenerateRequest.top_logprobs`, and in each `Chunk`
the scored tokens' texts (`tokens`) and their steps' most likely tokens (`top_logprobs`).
Tool calling adds optional fields to version 3 (it had not been released yet):
`GenerateRequest.tools` and, in `ChatMessage`, `tool_calls`, `tool_call_id` and `name`.
Penalties add `GenerateRequest.presence_penalty`, `frequency_penalty` and
`repetition_penalty` to version 3 the same way (defaults: off).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from broker.errors import BadRequest, HybridgenError, error_for_code

VERSION: Literal[3] = 3
#: Largest message accepted on decode (NATS' default max_payload is 1 MiB).
MAX_MESSAGE_BYTES = 1024 * 1024
#: Largest `Grammar.data` on the bus, in characters (`serving.grammar.MAX_GRAMMAR_CHARS`,
#: the HTTP side's bound): compiling a grammar costs the worker time and memory.
MAX_GRAMMAR_CHARS = 64 * 1024

FinishReason = Literal["stop", "length", "cancelled"]


def new_request_id() -> str:
    """A fresh request id (uuid4 hex), also usable as a subject token."""
    return uuid.uuid4().hex


class Message(BaseModel):
    """Base of every bus message."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=False)

    v: Literal[3] = VERSION


class Usage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    #: Speculative decoding: tokens drafted, and how many the model accepted (0 from a peer
    #: that does not report them).
    draft_tokens: int = Field(default=0, ge=0)
    accepted_tokens: int = Field(default=0, ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatMessage(BaseModel):
    """One message of a chat request (`role`: system, user, assistant, tool, ...).

    Tool turns (optional, v3): an assistant's `tool_calls` (OpenAI's shape: `id`, `type`,
    `function.name`, `function.arguments` as JSON text), a `tool` message's `tool_call_id`
    and `name`.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    role: str = Field(min_length=1, max_length=64)
    content: str
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class Grammar(BaseModel):
    """A constraint on the whole output (`serving.grammar.Grammar`): `json_schema` (a JSON
    schema as JSON text), `lark` (llguidance's Lark dialect) or `regex`."""

    model_config = ConfigDict(extra="ignore", strict=True)

    kind: Literal["json_schema", "lark", "regex"]
    data: str = Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)


class GenerateRequest(Message):
    """`hg.gen.<model>`: answer a chat (`messages`) or continue a completion `prompt`.

    Exactly one of the two is set. The worker renders `messages` with its own model's chat
    template (opening the assistant's turn) and uses `prompt` as it is.
    """

    type: Literal["generate"] = "generate"
    request_id: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = None
    #: None: until the model stops or the window is full, at most the worker's cap.
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    #: 0 disables top-k.
    top_k: int = Field(default=0, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = None
    #: Return per-token log-probabilities in each `Chunk`.
    logprobs: bool = False
    #: With `logprobs`: also this many most likely tokens of each step (OpenAI's 0-20).
    top_logprobs: int = Field(default=0, ge=0, le=20)
    #: OpenAI's additive penalties on the tokens the answer already holds (0: off), and the
    #: multiplicative one on every token seen in the prompt or the answer (1: off); the rule
    #: is `serving.penalties`.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    #: Draft tokens and check them in one forward pass (the model still chooses each); False: off.
    speculative: bool = True
    #: Budget for the whole request, counted by each hop from when it receives it.
    timeout_ms: int | None = Field(default=None, gt=0)
    #: node_id of the caller, for logs and telemetry.
    origin: str | None = None
    #: Opaque user id, only present where the user consented to it leaving the edge.
    user: str | None = None
    #: Constrained decoding: the output must match this grammar (None: unconstrained).
    grammar: Grammar | None = None
    #: Tools shown to the model (OpenAI's `tools` list; the grammar forces the call format),
    #: rendered by the worker's chat template or its fallback (`serving.tools`).
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of 'messages' and 'prompt' must be set")
        return self

    def message_dicts(self) -> list[dict[str, Any]]:
        """`messages` as `{"role", "content"}` dicts (for a chat template), with the tool
        fields a message has."""
        return [m.model_dump(exclude_none=True) for m in self.messages or ()]


class TopLogprob(BaseModel):
    """One of the most likely tokens at a step: its text and log-probability."""

    model_config = ConfigDict(extra="ignore", strict=True)

    token: str
    logprob: float


class Chunk(Message):
    """One piece of a streamed answer. `seq` counts from 0 with no gaps.

    The first chunk (`seq` 0) may carry no text: a worker sends it as soon as it admits a
    request, so the caller's accept timeout measures admission, not prefill.
    """

    type: Literal["chunk"] = "chunk"
    request_id: str
    seq: int = Field(ge=0)
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] | None = None
    #: With `logprobs`: the text (decoded alone) of each scored token, so the caller needs no
    #: tokenizer of its own; `logprobs` are theirs. An end token is not scored, so these may
    #: be one shorter than `token_ids`.
    tokens: list[str] | None = None
    #: With `top_logprobs` > 0: the most likely tokens at each step, most likely first.
    top_logprobs: list[list[TopLogprob]] | None = None


class Done(Message):
    """The end of a successful stream."""

    type: Literal["done"] = "done"
    request_id: str
    seq: int = Field(ge=0)
    finish_reason: FinishReason
    usage: Usage
    #: node_id of the worker that served it.
    served_by: str | None = None
    model_version: str | None = None


class Error(Message):
    """The end of a failed request (or an immediate refusal such as `overloaded`)."""

    type: Literal["error"] = "error"
    request_id: str | None = None
    code: str
    message: str
    param: str | None = None
    retry_after: float | None = None
    seq: int | None = None

    @classmethod
    def from_exception(cls, exc: HybridgenError, request_id: str | None = None) -> Error:
        return cls(
            request_id=request_id,
            code=exc.code.value,
            message=exc.message,
            param=exc.param,
            retry_after=exc.retry_after,
        )

    def to_exception(self) -> HybridgenError:
        return error_for_code(
            self.code, self.message, param=self.param, retry_after=self.retry_after
        )


NodeStatus = Literal["starting", "loading", "ready", "degraded", "draining", "stopped"]


class Heartbeat(Message):
    """`hg.telemetry.<role>.<node_id>`, every second."""

    type: Literal["heartbeat"] = "heartbeat"
    role: str
    node_id: str
    ts: float = Field(default_factory=time.time)
    #: hybridgen software version.
    version: str = ""
    status: NodeStatus = "ready"
    model: str | None = None
    model_version: str | None = None
    queue_depth: int = 0
    in_flight: int = 0
    rps: float = 0.0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    tokens_per_s: float = 0.0
    #: Share of requests sent to the cloud, by route reason.
    fallback_ratio: dict[str, float] = Field(default_factory=dict)
    errors: int = 0
    #: Role-specific figures (cache sizes, breaker state, ...).
    extra: dict[str, Any] = Field(default_factory=dict)


class Event(Message):
    """`hg.events.<role>.<node_id>`: something worth a line in an operator's log."""

    type: Literal["event"] = "event"
    kind: str
    role: str
    node_id: str
    ts: float = Field(default_factory=time.time)
    request_id: str | None = None
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


ControlVerb = Literal["drain", "resume", "reload-model", "set-policy"]


class ControlRequest(Message):
    """`hg.ctl.<node_id>.<verb>`: steer one node. `args` depend on the verb."""

    type: Literal["control"] = "control"
    verb: ControlVerb
    args: dict[str, Any] = Field(default_factory=dict)


class ControlReply(Message):
    """Answer to a `ControlRequest`."""

    type: Literal["control_reply"] = "control_reply"
    ok: bool
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


Reply = Annotated[Chunk | Done | Error, Field(discriminator="type")]
_REPLY_ADAPTER: TypeAdapter[Chunk | Done | Error] = TypeAdapter(Reply)

M = TypeVar("M", bound=Message)


def encode(message: Message) -> bytes:
    """msgpack bytes of a message (fields left at `None` are omitted)."""
    return msgpack.packb(message.model_dump(exclude_none=True), use_bin_type=True)  # type: ignore[no-any-return]


def _refuse_ext(code: int, data: bytes) -> Any:
    """msgpack `ext_hook`: extension types are refused (no message field is one, and they
    would land, undecoded, in the free-form `dict[str, Any]` fields)."""
    raise BadRequest(f"msgpack extension type {code} is not accepted")


def _no_timestamp(obj: Any) -> Any:
    """msgpack `object_hook`/`list_hook`: the timestamp extension (-1) bypasses `ext_hook`,
    so maps and arrays are checked for it."""
    values = obj.values() if isinstance(obj, dict) else obj
    if any(isinstance(value, msgpack.Timestamp) for value in values):
        raise BadRequest("msgpack extension type -1 (timestamp) is not accepted")
    return obj


def _unpack(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadRequest(
            f"message of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"
        )
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            object_hook=_no_timestamp,
            list_hook=_no_timestamp,
        )
    except BadRequest:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadRequest(f"malformed msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"message must be a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != VERSION:
        raise BadRequest(
            f"unsupported message version {version!r} (this node speaks v{VERSION})", param="v"
        )
    return obj


def _describe(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "missing":
        return f"missing field {field!r}", field
    if field is None:  # a rule across fields (a model validator)
        return str(first["msg"]).removeprefix("Value error, "), None
    return f"invalid field {field!r}: {first['msg']}", field


def decode(data: bytes, cls: type[M]) -> M:
    """Decode and validate one message of type `cls`.

    Raises:
        BadRequest: malformed msgpack, not a map, wrong version, or a missing or mistyped
            field (the message names it).
    """
    obj = _unpack(data)
    expected = cls.model_fields["type"].default
    if obj.setdefault("type", expected) != expected:
        raise BadRequest(f"expected a {expected!r} message, got {obj['type']!r}", param="type")
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        message, field = _describe(exc)
        raise BadRequest(message, param=field) from None


def decode_reply(data: bytes) -> Chunk | Done | Error:
    """Decode one message of a generation stream (`Chunk`, `Done` or `Error`)."""
    obj = _unpack(data)
    try:
        return _REPLY_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        message, field = _describe(exc)
        raise BadRequest(message, param=field) from None


def error_reply(exc: HybridgenError, request_id: str | None = None) -> bytes:
    """Encoded `Error` reply for an exception."""
    return encode(Error.from_exception(exc, request_id))
