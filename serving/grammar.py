"""Constrained decoding: the grammar a request's output must match, one language at both ends.

Torch-free and model-runtime-free (only `llguidance`'s grammar compiler, to check a grammar
early). A `Grammar` is what a request asks for (`response_format` today; a forced tool call
later); each engine turns it into its own decoder's constraint:

* both ends: an `llguidance.LLMatcher(tokenizer, grammar.llguidance())` per request (the edge,
  `edge.runtime.guided`) or per batch row (the cloud, `cloud.sampling`).

Both ends therefore run the same llguidance grammar on the same text, and a grammar that
travels on the bus (`wire.GenerateRequest.grammar`, a request that falls back to the cloud)
constrains the cloud exactly as it would have constrained the edge.

Kinds:

* `json_schema`: a JSON schema (as JSON text). `json_schema_grammar` adds
  `"x-guidance": {"whitespace_flexible": false}` unless the schema sets it: with free
  whitespace a small model fills its budget with newlines and spaces.
* `lark`: a Lark grammar in llguidance's dialect (`%json {...}` embeds a JSON schema; a tool
  call is `"<tool_call>" %json {...}` and `auto` is `start: text | call`).
* `regex`: a regular expression the whole output matches.

`from_response_format` maps OpenAI's `response_format`: `text` -> no grammar, `json_object`
-> any JSON object, `json_schema` -> its `schema` (constrained whether `strict` is set or
not: a guarantee costs nothing extra here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import llguidance

from broker import wire
from broker.errors import BadRequest

GrammarKind = Literal["json_schema", "lark", "regex"]

#: Largest grammar accepted (characters of its text): a schema is small, and the grammar
#: travels on the bus inside a 1 MiB message with the rest of the request.
MAX_GRAMMAR_CHARS = wire.MAX_GRAMMAR_CHARS

#: The schema of `response_format: {"type": "json_object"}`: any JSON object.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Grammar:
    """A constraint on a request's whole output.

    Attributes:
        kind: `json_schema` (a JSON schema as JSON text), `lark` (llguidance's Lark dialect)
            or `regex`.
        data: the grammar's text.
    """

    kind: GrammarKind
    data: str

    def llguidance(self) -> str:
        """The grammar for `llguidance.LLMatcher(tokenizer, ...)` (both ends' matchers)."""
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.data)
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.data)
        return llguidance.LLMatcher.grammar_from_regex(self.data)

    def check(self, param: str = "response_format") -> Grammar:
        """Compile the grammar once (no tokenizer needed) and return it.

        Raises:
            BadRequest: too long, not valid JSON (a schema), or a grammar llguidance refuses;
                the message says what is wrong and `param` names the request field.
        """
        if len(self.data) > MAX_GRAMMAR_CHARS:
            raise BadRequest(
                f"the {self.kind} grammar is {len(self.data)} characters; at most "
                f"{MAX_GRAMMAR_CHARS} are accepted",
                param=param,
            )
        try:
            error = llguidance.LLMatcher.validate_grammar(self.llguidance())
        except (ValueError, TypeError) as exc:
            error = str(exc) or type(exc).__name__
        if error:
            raise BadRequest(f"invalid {self.kind} grammar: {error.strip()}", param=param)
        return self

    def to_wire(self) -> wire.Grammar:
        """The bus form (`wire.GenerateRequest.grammar`)."""
        return wire.Grammar(kind=self.kind, data=self.data)

    @classmethod
    def from_wire(cls, grammar: wire.Grammar | None) -> Grammar | None:
        """The grammar a bus request carries (None: unconstrained)."""
        return None if grammar is None else cls(kind=grammar.kind, data=grammar.data)


def json_schema_grammar(schema: dict[str, Any] | bool) -> Grammar:
    """A grammar for output valid against `schema`, whitespace-free unless the schema's own
    `x-guidance` says otherwise (a small model pads with whitespace when allowed to)."""
    if isinstance(schema, dict):
        guidance = schema.get("x-guidance")
        options = dict(guidance) if isinstance(guidance, dict) else {}
        options.setdefault("whitespace_flexible", False)
        schema = {**schema, "x-guidance": options}
    return Grammar("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))


def from_response_format(value: Any, param: str = "response_format") -> Grammar | None:
    """The grammar OpenAI's `response_format` asks for (None: `text` or unset), checked.

    Raises:
        BadRequest: an unknown `type`, a `json_schema` without a `schema` object, or a
            schema llguidance cannot compile; `param` is `response_format`.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(
            'response_format must be an object such as {"type": "json_object"}', param=param
        )
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar(JSON_OBJECT_SCHEMA)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
            raise BadRequest(
                'response_format of type "json_schema" needs "json_schema": {"name": ..., '
                '"schema": {...}}',
                param=param,
            )
        return json_schema_grammar(spec["schema"]).check(param)
    raise BadRequest(
        f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
        param=param,
    )
