"""API keys: `Authorization: Bearer <key>` checked in constant time, and the users a key may
act for.

A key entry is `KEY` (no user), `KEY@alice+bob` (those user ids) or `KEY@*` (admin: any
user). User ids may hold `@`, so an entry splits at its first `@`; `+` never occurs in an id.
`KeyRing` holds two lists: API keys, required on every request once there is one, and user
keys, which grant access to personal data without closing the API to anonymous requests (an
open loopback edge keeps plain completions open, its users' data never).
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from fastapi import Request

from broker.addresses import is_loopback
from broker.errors import Forbidden, Unauthorized

logger = logging.getLogger(__name__)

#: The scope of an admin entry: every user.
ALL_USERS = "*"
_KEY = re.compile(r"[^\s@,]{1,512}")
#: A user id: 1 to 128 characters, letters, digits and `._@:-`, starting with a letter or
#: digit (the keys' user scopes here, the edge's user store in `edge.personal`).
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


@dataclass(frozen=True)
class KeyEntry:
    """One accepted key and the users it covers (None: every user; empty: none)."""

    key: str
    users: frozenset[str] | None = frozenset()

    def covers(self, user_id: str) -> bool:
        return self.users is None or user_id in self.users


def parse_key_entry(text: str, *, where: str, need_users: bool = False) -> KeyEntry:
    """Parse `KEY`, `KEY@alice+bob` or `KEY@*`.

    Args:
        where: the setting, for the message (`HG_EDGE_API_KEYS entry 2`).
        need_users: refuse an entry without users (a user key).

    Raises:
        ValueError: a message that names the entry by position, never the key itself.
    """
    key, at, scope = text.strip().partition("@")
    if not _KEY.fullmatch(key):
        raise ValueError(
            f"{where}: a key is 1 to 512 characters without spaces, `@` or `,` "
            "(then optionally @user1+user2 or @*)"
        )
    if not at:
        if need_users:
            raise ValueError(f"{where}: a user key needs its users: KEY@alice+bob or KEY@* (admin)")
        return KeyEntry(key)
    if scope == ALL_USERS:
        return KeyEntry(key, None)
    users = scope.split("+")
    bad = [u for u in users if not USER_ID_PATTERN.fullmatch(u)]
    if not users or bad:
        raise ValueError(
            f"{where}: after @ give user ids joined by + (e.g. KEY@alice+bob) or * for every "
            f"user; invalid: {', '.join(repr(b) for b in bad) or 'none given'}"
        )
    return KeyEntry(key, frozenset(users))


def parse_key_entries(
    entries: Iterable[str], *, setting: str, need_users: bool = False
) -> list[KeyEntry]:
    """Every non-empty entry parsed (see `parse_key_entry`); the same key twice is refused."""
    parsed: list[KeyEntry] = []
    for i, text in enumerate(entries, 1):
        if text.strip():
            parsed.append(
                parse_key_entry(text, where=f"{setting} entry {i}", need_users=need_users)
            )
    if len({e.key for e in parsed}) != len(parsed):
        raise ValueError(f"{setting}: the same key is given twice")
    return parsed


@dataclass(frozen=True)
class Credential:
    """Who a request is: the key entry it presented (None: anonymous)."""

    entry: KeyEntry | None = None

    def covers(self, user_id: str) -> bool:
        return self.entry is not None and self.entry.covers(user_id)


ANONYMOUS = Credential()


class KeyRing:
    """The keys an API accepts.

    Args:
        api_keys: required on every request once there is one (an entry may carry users).
        user_keys: accepted too; they grant users without closing the API.
    """

    def __init__(self, api_keys: Sequence[KeyEntry] = (), user_keys: Sequence[KeyEntry] = ()):
        self.entries = [*api_keys, *user_keys]
        if len({e.key for e in self.entries}) != len(self.entries):
            raise ValueError("the same key is given twice: as an API key and as a user key")
        #: Whether a request needs a key (there are API keys).
        self.closed = bool(api_keys)
        #: The bare API keys (what /metrics accepts when it is protected).
        self.api_keys = [e.key for e in api_keys]
        self._encoded = [(e.key.encode(), e) for e in self.entries]

    def match(self, token: str) -> KeyEntry | None:
        """The entry of `token`, compared with every key in constant time (None: no match)."""
        given = token.encode()
        found: KeyEntry | None = None
        for key, entry in self._encoded:  # no early exit: the time says nothing of the match
            if hmac.compare_digest(given, key):
                found = entry
        return found

    def identify(self, request: Request) -> Credential:
        """The request's credential.

        Raises:
            Unauthorized: (401) no or a wrong key where the API is closed; a bearer token
                that is no key of an open API is anonymous (OpenAI clients always send one).
        """
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            if self.closed:
                raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
            return ANONYMOUS
        entry = self.match(token)
        if entry is None:
            if self.closed:
                raise Unauthorized("invalid API key")
            return ANONYMOUS
        return Credential(entry)


def authenticate(ring: KeyRing) -> Callable[[Request], Awaitable[None]]:
    """FastAPI dependency: the request's credential into `request.state.credential` (401
    where the ring is closed and no key matches)."""

    async def dependency(request: Request) -> None:
        request.state.credential = ring.identify(request)

    return dependency


def authorize_user(request: Request, user_id: str, *, param: str | None = None) -> None:
    """Allow acting for `user_id` only with a key that covers it. Call it before anything
    reads or changes the user's data.

    Raises:
        Unauthorized: (401) no key: personal data is never open.
        Forbidden: (403) a key that does not cover `user_id`.
    """
    credential: Credential = getattr(request.state, "credential", ANONYMOUS)
    if credential.covers(user_id):
        return
    if credential.entry is None:
        raise Unauthorized(
            "personal data needs a key bound to the user: send `Authorization: Bearer <key>` "
            "with a key given as KEY@<user id> (or KEY@* for every user)",
            param=param,
        )
    raise Forbidden(f"this key may not act for user {user_id!r}", param=param)


def require_api_key(keys: Sequence[str] | None) -> Callable[[Request], Awaitable[None]]:
    """FastAPI dependency checking `Authorization: Bearer <key>` in constant time.

    Args:
        keys: accepted keys; empty or None leaves the API open (dev mode).

    Raises:
        Unauthorized: (401 envelope) missing or wrong key.
    """
    ring = KeyRing([KeyEntry(k) for k in (keys or []) if k])

    async def dependency(request: Request) -> None:
        ring.identify(request)

    return dependency


def check_exposure(
    host: str,
    api_keys: Sequence[str],
    *,
    allow_open: bool,
    metrics_require_key: bool,
    set_key: str,
    allow: str,
) -> None:
    """The rule both APIs start under: no open API (no keys) beyond loopback unless allowed
    explicitly, and no key-protected /metrics without keys.

    Args:
        set_key: how to set a key, for the message (e.g. `--api-key KEY or HG_EDGE_API_KEYS`).
        allow: how to accept the risk, for the message.

    Raises:
        ValueError: the message says how to set a key.
    """
    if not api_keys and not is_loopback(host) and not allow_open:
        raise ValueError(
            f"refusing to serve without an API key on {host} (beyond loopback): set one with "
            f"{set_key} (or {allow} to accept the risk)"
        )
    if metrics_require_key and not api_keys:
        raise ValueError(
            f"metrics_require_key (a key-protected /metrics) needs API keys: set {set_key}"
        )
