"""Per-key limits, one rule for both HTTP APIs: every key has a name, and a key may have
limits on requests per minute (`rpm`), tokens per minute (`tpm`) and requests in flight
(`concurrent`).

Names and limits come from the API's `key_limits` setting and, live, from the `limits` key
of the fleet config (`hg_config`), whose entries replace the setting's of the same name:

    {"alice": {"key_sha256": "1a2b3c4d", "rpm": 60, "tpm": 10000, "concurrent": 4},
     "*": {"rpm": 600}}

A key is named by the first hex digits (8 or more) of its SHA-256, never by itself; a key
that no entry names is `key-<first 8 hex digits>` (an entry may use that name instead of
`key_sha256`), requests without a key are `anonymous`, and `*` gives its limits to every key
that has no entry of its own (each key its own budget).

Admission (`serving.admission.admit`, a route dependency) charges one request and the
request's estimated tokens (prompt characters / 4 + `max_tokens`, times `n`, as OpenAI
estimates) to token buckets that refill evenly over a minute; past a limit it answers 429 in
OpenAI's envelope (code `rate_limit_exceeded`) with `Retry-After` and the `x-ratelimit-*`
headers, before the request takes any place in a queue. The admitted request's `Ticket`
settles the estimate to the answer's real usage and counts it once in the `UsageBook`
(`serving.usage`), however the answer ends; `serving.admission.LimitHeaders` puts the
headers on every answer of a limited key and closes the ticket once the response is over (a
stream's last byte, or its client gone).

A token bucket is written here rather than taken from a rate-limit library: the estimate is
settled after the fact (refunds and extra charges), limits change live, and the clock is
injectable so window tests need no sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import Overloaded
from serving.usage import UsageBook

logger = logging.getLogger(__name__)

#: The fleet config key (`hg_config`) whose value is put in force live.
LIMITS_KEY = "limits"
#: The name of requests that present no key (an open API).
ANONYMOUS = "anonymous"
#: The entry whose limits every key without an entry of its own gets.
EVERY_KEY = "*"
#: Where the request's ticket waits for the answer (`request.state`).
TICKET = "limit_ticket"
#: OpenAI's estimate of a token, in characters, for the admission's estimate.
CHARS_PER_TOKEN = 4
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_AUTO_NAME = re.compile(r"key-([0-9a-f]{8,64})")


class KeyRule(BaseModel):
    """One key's name binding and limits (None: that limit is off)."""

    model_config = ConfigDict(extra="forbid")

    key_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{8,64}$",
        description="The first 8 or more hex digits of the key's SHA-256.",
    )
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens (input + output) per minute.")
    concurrent: int | None = Field(default=None, ge=1, description="Requests in flight.")

    def limits(self) -> dict[str, int]:
        """The limits that are on."""
        values = {"rpm": self.rpm, "tpm": self.tpm, "concurrent": self.concurrent}
        return {name: value for name, value in values.items() if value is not None}


def parse_rules(value: Any, *, where: str) -> dict[str, KeyRule]:
    """Key names and limits from a setting or the fleet config (a JSON object or its text).

    Raises:
        ValueError: the message names the entry (never a key) and says what to fix.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
    if not isinstance(value, Mapping):
        raise ValueError(f'{where}: expected a JSON object such as {{"alice": {{"rpm": 60}}}}')
    rules: dict[str, KeyRule] = {}
    for name, spec in value.items():
        if name != EVERY_KEY and not _NAME.fullmatch(str(name)):
            raise ValueError(f"{where}: key name {name!r}: 1 to 64 of A-Z a-z 0-9 . _ : -")
        try:
            rule = KeyRule.model_validate(spec)
        except ValidationError as exc:
            first = exc.errors()[0]
            place = ".".join(str(p) for p in first["loc"]) or "entry"
            raise ValueError(f"{where}: key {name!r}, {place}: {first['msg']}") from None
        if rule.key_sha256 is None and (auto := _AUTO_NAME.fullmatch(name)):
            rule = rule.model_copy(update={"key_sha256": auto.group(1)})
        if rule.key_sha256 is None and name not in (EVERY_KEY, ANONYMOUS):
            raise ValueError(
                f"{where}: key {name!r} names no key: give key_sha256, the first 8 or more hex "
                "digits of the key's SHA-256 (`printf %s KEY | sha256sum`), or name it "
                "key-<those digits> as /v1/usage shows it"
            )
        rules[str(name)] = rule
    prefixes = [rule.key_sha256 for rule in rules.values() if rule.key_sha256]
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"{where}: the same key_sha256 is given twice")
    return rules


def format_duration(seconds: float) -> str:
    """A wait as OpenAI's headers write it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{text}" if minutes else text


@dataclass
class Bucket:
    """A token bucket of `capacity` that refills evenly over a minute."""

    capacity: float
    level: float
    at: float

    def top_up(self, now: float) -> None:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + max(0.0, now - self.at) * rate)
        self.at = now

    def wait_s(self, cost: float) -> float:
        """Seconds until `cost` fits (0: now)."""
        return max(0.0, cost - self.level) / (self.capacity / 60.0)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, self.capacity - self.level) / (self.capacity / 60.0)

    def resize(self, capacity: int) -> None:
        """A limit changed: a raise is available at once, a cut takes away what is over."""
        self.level = min(capacity, self.level + max(0.0, capacity - self.capacity))
        self.capacity = capacity


@dataclass
class KeyState:
    """One key name's buckets and requests in flight."""

    requests: Bucket | None = None
    tokens: Bucket | None = None
    in_flight: int = 0

    def fit(self, rule: KeyRule | None, now: float) -> None:
        """Follow the rule in force (limits change live); top the buckets up to `now`."""
        self.requests = _fit(self.requests, rule.rpm if rule else None, now)
        self.tokens = _fit(self.tokens, rule.tpm if rule else None, now)


def _fit(bucket: Bucket | None, capacity: int | None, now: float) -> Bucket | None:
    if capacity is None:
        return None
    if bucket is None:
        return Bucket(capacity, capacity, now)
    bucket.top_up(now)
    if bucket.capacity != capacity:
        bucket.resize(capacity)
    return bucket


class RateLimited(Overloaded):
    """A key past one of its limits: 429, code `rate_limit_exceeded`, OpenAI's `type`
    (`requests` or `tokens`) and the key's `x-ratelimit-*` headers."""

    http_status: ClassVar[int] = 429
    openai_code: ClassVar[str] = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, kind: str, retry_after: float | None, headers: dict[str, str]
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.openai_type = kind
        self.headers = headers


class Limits:
    """An API's key names, limits and usage.

    Args:
        rules: the `key_limits` setting, parsed (`parse_rules`).
        usage: where answers are counted.
        clock: seconds, monotonic (injectable: a test's clock moves when it says).
    """

    def __init__(
        self,
        rules: dict[str, KeyRule],
        usage: UsageBook,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.configured = rules
        self.live: dict[str, KeyRule] = {}
        self.rules = dict(rules)
        self.usage = usage
        self.clock = clock
        self.states: dict[str, KeyState] = {}
        self._digests: dict[str, str] = {}
        #: Revisions of the fleet config's `limits` put in force (a test waits on it).
        self.live_updates = 0

    def set_live(self, value: Mapping[str, Any] | None) -> None:
        """Put the fleet config's `limits` in force (None: deleted). An invalid value is
        logged and leaves the last valid one in force."""
        try:
            live = parse_rules(value, where=f"hg_config key {LIMITS_KEY!r}")
        except ValueError as exc:
            logger.error("ignoring invalid key limits: %s", exc)
            return
        self.live = live
        self.rules = {**self.configured, **live}
        self.live_updates += 1

    def identify(self, key: str | None) -> tuple[str, KeyRule | None]:
        """The name of `key` (None: no key) and the rule it is under (None: unlimited)."""
        if key is None:
            return ANONYMOUS, self.rules.get(ANONYMOUS) or self.rules.get(EVERY_KEY)
        digest = self._digests.get(key)
        if digest is None:
            digest = self._digests[key] = hashlib.sha256(key.encode()).hexdigest()
        found: tuple[str, KeyRule] | None = None
        for name, rule in self.rules.items():  # the longest matching prefix wins
            prefix = rule.key_sha256 or ""
            longer = found is None or len(prefix) > len(found[1].key_sha256 or "")
            if prefix and digest.startswith(prefix) and longer:
                found = (name, rule)
        if found is not None:
            return found
        return f"key-{digest[:8]}", self.rules.get(EVERY_KEY)

    def admit(
        self, key: str | None, *, prompt_tokens: int, max_tokens: int, model: str | None = None
    ) -> Ticket:
        """Admit one request of `key` (its estimated tokens: `prompt_tokens` + `max_tokens`).

        Raises:
            RateLimited: past a limit (`Retry-After`: when it would fit; none when the
                request alone is more than the key's tokens per minute).
        """
        name, rule = self.identify(key)
        now = self.clock()
        state = self.states.setdefault(name, KeyState())
        state.fit(rule, now)
        cost = prompt_tokens + max_tokens
        if rule is not None:
            self._check(name, rule, state, cost)
            if state.requests is not None:
                state.requests.level -= 1
            if state.tokens is not None:
                state.tokens.level -= cost
        state.in_flight += 1
        return Ticket(self, name, rule, prompt_tokens, cost, model)

    def _check(self, name: str, rule: KeyRule, state: KeyState, cost: int) -> None:
        """Refuse a request past one of the key's limits (`admit`)."""
        who = f"key {name!r}"
        if rule.concurrent is not None and state.in_flight >= rule.concurrent:
            self._refuse(name, "concurrent", "requests", 1.0, state, rule,
                         f"{who} has {state.in_flight} requests in flight, its limit of "
                         "concurrent requests: send the next when one ends")  # fmt: skip
        if state.requests is not None and (wait := state.requests.wait_s(1)) > 0:
            self._refuse(name, "requests", "requests", wait, state, rule,
                         f"rate limit reached for {who} on requests per minute (RPM): limit "
                         f"{rule.rpm}; try again in {format_duration(wait)}")  # fmt: skip
        if state.tokens is not None:
            if cost > state.tokens.capacity:
                self._refuse(name, "tokens", "tokens", None, state, rule,
                             f"this request needs about {cost} tokens (prompt + max_tokens), "
                             f"more than the {rule.tpm} tokens per minute (TPM) of {who}: "
                             "lower max_tokens or shorten the prompt")  # fmt: skip
            if (wait := state.tokens.wait_s(cost)) > 0:
                self._refuse(name, "tokens", "tokens", wait, state, rule,
                             f"rate limit reached for {who} on tokens per minute (TPM): limit "
                             f"{rule.tpm}, remaining {max(0, int(state.tokens.level))}, "
                             f"requested {cost} (prompt + max_tokens); try again in "
                             f"{format_duration(wait)} or lower max_tokens")  # fmt: skip

    def _refuse(
        self,
        name: str,
        limit: str,
        kind: str,
        wait: float | None,
        state: KeyState,
        rule: KeyRule,
        message: str,
    ) -> None:
        self.usage.refused(name, limit)
        raise RateLimited(message, kind=kind, retry_after=wait, headers=rate_headers(state, rule))

    def headers(self, name: str, rule: KeyRule | None) -> dict[str, str]:
        """The key's `x-ratelimit-*` headers now (none for a key without rpm or tpm)."""
        state = self.states.get(name)
        if state is None or rule is None:
            return {}
        state.fit(rule, self.clock())
        return rate_headers(state, rule)

    def settle(self, ticket: Ticket, tokens: int) -> None:
        """A request's real `tokens` replace its estimate in the key's tokens per minute (a
        refund, or an extra charge)."""
        state = self.states[ticket.name]
        if state.tokens is not None:
            state.tokens.top_up(self.clock())
            extra = tokens - ticket.cost
            state.tokens.level = min(state.tokens.capacity, state.tokens.level - extra)

    def release(self, ticket: Ticket, input_tokens: int, output_tokens: int) -> None:
        """A request is over: it leaves the flight and its usage is counted."""
        self.states[ticket.name].in_flight -= 1
        self.usage.record(ticket.name, ticket.model or "none", input_tokens, output_tokens)

    def in_force(self) -> dict[str, dict[str, int]]:
        """Each named entry's limits (for `/v1/usage`; no key digits)."""
        return {name: rule.limits() for name, rule in sorted(self.rules.items())}

    async def watch(self, nc: Any, retry_s: float = 1.0) -> None:
        """Follow the fleet config's `limits` key for as long as it runs (cancel to stop);
        a bus without the bucket or the right to read it is retried every `retry_s`."""
        from broker.store import FleetConfig

        failures = 0
        while True:
            try:
                config = await FleetConfig.open(nc)
                self.set_live(await config.get(LIMITS_KEY))
                failures = 0
                async for _key, value in config.watch(LIMITS_KEY):
                    self.set_live(value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # said once, then quietly retried
                level = logging.DEBUG if failures else logging.WARNING
                logger.log(level, "key limits watch failed (%s); retrying", exc)
                failures += 1
            await asyncio.sleep(retry_s)


def rate_headers(state: KeyState, rule: KeyRule) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers of a key's buckets."""
    headers: dict[str, str] = {}
    for kind, bucket, limit in (
        ("requests", state.requests, rule.rpm),
        ("tokens", state.tokens, rule.tpm),
    ):
        if bucket is None or limit is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.reset_s())
    return headers


@dataclass
class Ticket:
    """One admitted request: what it was charged, and what it used once the answer ends."""

    limits: Limits
    name: str
    rule: KeyRule | None
    prompt_estimate: int
    cost: int
    #: The answer's model (set by `serving.answer.Answer`; None: no answer began).
    model: str | None = None
    #: Tokens streamed so far (what a cut-short answer counts).
    generated: int = 0
    usage: tuple[int, int] | None = None
    closed: bool = field(default=False)

    def finish(self, input_tokens: int, output_tokens: int) -> None:
        """The answer's real usage (its `Outcome`): settled now, so a whole answer's headers
        already show it; counted when the response is over (`close`)."""
        if self.usage is None and not self.closed:
            self.usage = (input_tokens, output_tokens)
            self.limits.settle(self, input_tokens + output_tokens)

    def close(self) -> None:
        """Settle and count the request once: its real usage, or for an answer cut short
        (client gone, error) the prompt's estimate and the tokens streamed, or nothing for a
        request refused before its answer began (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.usage is not None:
            input_tokens, output_tokens = self.usage
        else:
            if self.model is not None:  # an answer began: the prompt was read
                input_tokens, output_tokens = self.prompt_estimate, self.generated
            else:  # refused before any answer (a malformed body, an unknown model)
                input_tokens = output_tokens = 0
            self.limits.settle(self, input_tokens + output_tokens)
        self.limits.release(self, input_tokens, output_tokens)

    def header_items(self) -> list[tuple[bytes, bytes]]:
        return [
            (name.encode(), value.encode())
            for name, value in self.limits.headers(self.name, self.rule).items()
        ]
