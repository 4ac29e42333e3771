"""Tool calling (OpenAI's `tools` / `tool_choice`), the same at the edge and in the cloud.

Torch-free. A request's tools become three things:

* a grammar (`ToolRequest.grammar`, llguidance's Lark dialect, `serving.grammar`), so the
  model's output is well-formed at whichever end serves it:

  - `none`: no grammar (and the tools are not shown to the model);
  - a named function or `required`: one call (or up to `MAX_CALLS` with
    `parallel_tool_calls`), each `<tool_call>` then `{"name": ..., "arguments": ...}` with
    the arguments valid against that tool's `parameters` schema;
  - `auto`: `start: text | calls`, where the text can never contain the marker (the model
    answers or calls, never both);

* the prompt: the tools and any tool turns of the history rendered with the model's own chat
  template when it handles tools (`template_supports_tools`), else with the fallback of
  `fallback_messages` (documented in docs/api.md);
* the answer: `split_calls` (whole) and `CallStream` (streamed) turn the generated text back
  into OpenAI's `tool_calls` with `call_...` ids, and `finish_reason` becomes `tool_calls`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.errors import BadRequest
from serving.grammar import Grammar

#: What opens each tool call in the output (Hermes/Qwen's convention; neither bundled
#: model's template has one of its own).
CALL_MARKER = "<tool_call>"
#: Most calls in one answer with `parallel_tool_calls` (a bound, so a rambling model stops).
MAX_CALLS = 4
#: Longest tool name (OpenAI's limit).
MAX_NAME_CHARS = 64

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def check_tools(value: Any) -> list[dict[str, Any]] | None:
    """`tools` validated: a list of `{"type": "function", "function": {"name", ...}}`.

    Raises:
        BadRequest: naming `tools`, with what is wrong.
    """
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise BadRequest("tools must be a list of function tools", param="tools")
    names: set[str] = set()
    for index, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise BadRequest(
                f'tools[{index}] must be {{"type": "function", "function": {{...}}}}; only '
                "function tools are supported",
                param="tools",
            )
        name = function.get("name") if isinstance(function, dict) else None
        valid = isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS
        if not valid or set(str(name)) - _NAME_CHARS:
            raise BadRequest(
                f"tools[{index}].function.name must be 1-{MAX_NAME_CHARS} characters of a-z, "
                "A-Z, 0-9, _ and -",
                param="tools",
            )
        if name in names:
            raise BadRequest(f"tools[{index}]: the name {name!r} is used twice", param="tools")
        names.add(str(name))
        parameters = function.get("parameters") if isinstance(function, dict) else None
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(
                f"tools[{index}].function.parameters must be a JSON schema object", param="tools"
            )
    return value


def check_tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str:
    """`tool_choice` as `none`, `auto`, `required` or the forced function's name.

    Unset: `auto` with tools, `none` without (OpenAI's defaults).

    Raises:
        BadRequest: naming `tool_choice`: an unknown value, or a function not in `tools`.
    """
    if value is None:
        return "auto" if tools else "none"
    if value in ("none", "auto", "required"):
        if value != "none" and not tools:
            raise BadRequest(f"tool_choice {value!r} needs tools", param="tool_choice")
        return str(value)
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise BadRequest(
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            '"function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in {t["function"]["name"] for t in tools or []}:
        raise BadRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return name


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call of `tool`: its name, and arguments valid against its
    `parameters` (any object when it has none)."""
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }


def _json_rule(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ToolRequest:
    """A chat request's tools: what to show the model, and how to constrain its output.

    Attributes:
        tools: the request's function tools (empty: none).
        choice: `none`, `auto`, `required` or the forced function's name.
        parallel: whether one answer may hold several calls (`parallel_tool_calls`).
    """

    tools: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "none"
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether the model may call a tool (there are tools and the choice is not none)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the answer must be a call (`required` or a named function)."""
        return self.active and self.choice != "auto"

    def shown(self) -> list[dict[str, Any]] | None:
        """The tools the model is shown (None with `tool_choice: none`)."""
        return self.tools if self.active else None

    def grammar(self, text: Grammar | None = None) -> Grammar | None:
        """The Lark grammar of the answer (None: unconstrained, no tools in play).

        `text` constrains the plain answer `auto` allows (`response_format`'s JSON schema);
        ignored when a call is forced.
        """
        if not self.active:
            return text
        tools = self.tools
        if self.choice not in ("auto", "required"):
            tools = [t for t in tools if t["function"]["name"] == self.choice]
        calls = [f'"{CALL_MARKER}" {_json_rule(_call_schema(tool))}' for tool in tools]
        repeat = " ".join(["call"] + ["call?"] * (MAX_CALLS - 1)) if self.parallel else "call"
        lines = [f"calls: {repeat}", "call: " + " | ".join(calls)]
        if self.forced:
            lines.insert(0, "start: calls")
        else:
            if text is None:
                answer = "TEXT"
                lines.append(f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{_lark_regex(CALL_MARKER)}(.|\\n)*/")
            elif text.kind == "json_schema":
                answer = "%json " + text.data
            else:  # no other kind comes from response_format
                raise BadRequest(
                    "tools with tool_choice auto take a json_schema response_format only",
                    param="response_format",
                )
            lines.insert(0, f"start: {answer} | calls")
        return Grammar("lark", "\n".join(lines) + "\n").check("tools")


def _lark_regex(literal: str) -> str:
    """`literal` escaped for a Lark `/regex/`."""
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\/" else c for c in literal)


def new_call_id() -> str:
    """A fresh tool call id (`call_<24 hex>`)."""
    return "call_" + uuid.uuid4().hex[:24]


def _call(index: int, name: str, arguments: Any) -> dict[str, Any]:
    return {
        "index": index,
        "id": new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _parse_call(text: str) -> tuple[str, Any] | None:
    """`(name, arguments)` of one call's JSON text (None: not a whole, well-formed call)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return value["name"], value.get("arguments", {})


def split_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """An answer's text as `(content, tool_calls)` (OpenAI's message shape, without `index`).

    Text without the marker is plain content. With it, every call must parse (the grammar
    makes sure, unless the answer was cut short): then the content is what came before the
    first marker (None when empty); otherwise the text stays content, with no calls.
    """
    if CALL_MARKER not in text:
        return text, []
    head, *bodies = text.split(CALL_MARKER)
    calls = []
    for index, body in enumerate(bodies):
        parsed = _parse_call(body)
        if parsed is None:
            return text, []
        call = _call(index, *parsed)
        del call["index"]
        calls.append(call)
    return head or None, calls


def finish_reason(reason: str, calls: Sequence[Any]) -> str:
    """OpenAI's finish reason: `tool_calls` when an answer that ended by itself holds calls."""
    return "tool_calls" if calls and reason == "stop" else reason


class CallStream:
    """Splits a streamed answer into content and OpenAI tool-call deltas.

    `feed` takes each piece of text and returns what can be sent: content up to a possible
    marker, and each call once its JSON is whole (its first delta with `index`, `id`, `type`
    and `function.name`, then one with `function.arguments`). Text after a marker is held back
    until then. `close` returns what is left (a call cut short comes back as content).
    """

    def __init__(self) -> None:
        self._held = ""
        self._calling = False
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> list[str | list[dict[str, Any]]]:
        """What `text` lets through: content strings and lists of tool-call deltas."""
        self._held += text
        out: list[str | list[dict[str, Any]]] = []
        while True:
            if not self._calling:
                at = self._held.find(CALL_MARKER)
                if at < 0:
                    # Keep a tail that may be the start of a marker.
                    keep = next(
                        (n for n in range(len(CALL_MARKER) - 1, 0, -1)
                         if self._held.endswith(CALL_MARKER[:n])),
                        0,
                    )  # fmt: skip
                    cut = len(self._held) - keep
                    if cut:
                        out.append(self._held[:cut])
                        self._held = self._held[cut:]
                    return out
                if at:
                    out.append(self._held[:at])
                self._held = self._held[at + len(CALL_MARKER) :]
                self._calling = True
            try:
                value, end = json.JSONDecoder().raw_decode(self._held)
            except ValueError:
                return out
            name = value.get("name") if isinstance(value, dict) else None
            if not isinstance(name, str):
                return out
            out.append(self._deltas(name, value.get("arguments", {})))
            self._held = self._held[end:]
            self._calling = False

    def _deltas(self, name: str, arguments: Any) -> list[dict[str, Any]]:
        call = _call(len(self.calls), name, arguments)
        self.calls.append(call)
        head = {**call, "function": {"name": name, "arguments": ""}}
        tail = {"index": call["index"], "function": {"arguments": call["function"]["arguments"]}}
        return [head, tail]

    def close(self) -> str:
        """Held-back text at the end of the answer (a partial marker or a cut-short call)."""
        held = (CALL_MARKER if self._calling else "") + self._held
        self._held, self._calling = "", False
        return held


# ------------------------------------------------------------------------------- prompts


def template_supports_tools(template: str | None) -> bool:
    """Whether a Jinja chat template renders tools itself (it reads a `tools` variable)."""
    return template is not None and "tools" in template


def native_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that handles tools: Hugging Face's convention, where an
    assistant's `tool_calls[].function.arguments` is an object, not JSON text."""
    out = []
    for message in messages:
        item = dict(message)
        if item.get("tool_calls"):
            item["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": _arguments(call)}}
                for call in item["tool_calls"]
            ]
        out.append(item)
    return out


def _arguments(call: Mapping[str, Any]) -> Any:
    text = call.get("function", {}).get("arguments", "{}")
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


def tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The fallback's system text: each tool as `name(parameters): description`, and the call
    format. Kept short (a small edge model's window is small): the parameters' schemas are
    not shown, the grammar enforces them."""
    signatures = []
    for tool in tools:
        function = tool["function"]
        names = ", ".join((function.get("parameters") or {}).get("properties") or {})
        description = function.get("description")
        signatures.append(
            f"{function['name']}({names})" + (f": {description}" if description else "")
        )
    return (
        f"Tools: {'; '.join(signatures)}. To call one, write "
        f'{CALL_MARKER}{{"name": ..., "arguments": {{...}}}}.'
    )


def fallback_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, str]]:
    """Plain `{"role", "content"}` messages for a template without tool support.

    * the tools: described in the system message (`tools_prompt`; added to the first system
      message, or a new one first);
    * an assistant's `tool_calls`: its content followed by each call as the model writes one
      (`<tool_call>{"name": ..., "arguments": ...}`);
    * a `tool` message: a user turn `Tool result (<name>): <content>` (the name from the
      message, else from the call its `tool_call_id` answers).
    """
    names: dict[str, str] = {}
    out: list[dict[str, str]] = []
    for message in messages:
        role, content = str(message["role"]), str(message.get("content") or "")
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                function = call.get("function", {})
                names[str(call.get("id"))] = str(function.get("name"))
                body = {"name": function.get("name"), "arguments": _arguments(call)}
                content += CALL_MARKER + json.dumps(body, ensure_ascii=False)
        elif role == "tool":
            name = message.get("name") or names.get(str(message.get("tool_call_id")), "tool")
            role, content = "user", f"Tool result ({name}): {content}"
        out.append({"role": role, "content": content})
    if tools:
        text = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def template_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    native: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """`(messages, tools)` for a chat template: as they are when the template handles tools
    (`native`), else the fallback's plain messages and no tools."""
    if native:
        return native_messages(messages), [dict(t) for t in tools] if tools else None
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return [dict(m) for m in messages], None
    return list(fallback_messages(messages, tools)), None
