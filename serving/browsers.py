"""Browsers kept out of the APIs (edge and cloud): one ASGI middleware, `BrowserGuard`.

A web page can make a browser send requests to a loopback API. Three checks stop it:

- **Host**: the `Host` header must name an address the API serves (its bind host,
  localhost and loopback addresses, the advertised URL's host, an allow-list; any IP
  address when bound beyond loopback). A DNS-rebinding page sends its own name, and is
  refused (403 `forbidden`).
- **Origin**: a request that carries `Origin` (browsers add it to cross-site requests) is
  refused (403) unless the origin is on the allow-list (empty by default) or is the API's
  own (`http://<Host>`). CORS preflights (`OPTIONS` with `Access-Control-Request-Method`)
  are answered from the same list; answers to allowed origins carry the CORS headers.
- **Content-Type**: a POST or PUT must say `application/json` (415 otherwise): the
  content types an HTML form or a simple `fetch` can send without a preflight are refused.

Refusals come in OpenAI's error envelope, before the app sees the request.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.addresses import is_loopback
from broker.errors import BadRequest, Forbidden, HybridgenError
from serving.errors import error_response
from serving.headers import (
    HEADER_REQUEST_ID,
    HEADER_ROUTE_REASON,
    HEADER_SERVED_BY,
    HEADER_TIMEOUT,
    HEADER_TRACE_ID,
    HEADER_VARIANT,
    RATE_LIMIT_HEADERS,
)

#: Host names that are always the local machine.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
#: Methods whose body must be JSON.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: What an allowed origin may do (the preflight's answer).
CORS_METHODS = "GET, POST, PUT, DELETE"
CORS_HEADERS = f"Authorization, Content-Type, {HEADER_TIMEOUT}, traceparent, tracestate"
CORS_EXPOSE = ", ".join(
    (HEADER_REQUEST_ID, HEADER_SERVED_BY, HEADER_ROUTE_REASON, HEADER_VARIANT, HEADER_TRACE_ID,
     "Retry-After", *RATE_LIMIT_HEADERS)
)  # fmt: skip


class UnsupportedMediaType(BadRequest):
    """A body that is not declared `application/json`: `bad_request`, HTTP 415."""

    http_status: ClassVar[int] = 415


def host_name(value: str) -> str:
    """The host of a `Host` header or a URL netloc, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostRule:
    """The `Host` names an API answers to."""

    names: frozenset[str]
    any_ip: bool = False
    any_host: bool = False

    @classmethod
    def for_api(
        cls, bind_host: str, advertise_url: str | None = None, allowed: Iterable[str] = ()
    ) -> HostRule:
        """The bind host, loopback names, the advertised URL's host and `allowed` (`*`: any
        host; a wildcard bind also allows this machine's name and any IP address)."""
        names = set(LOOPBACK_NAMES)
        extra = [a.strip() for a in allowed if a.strip()]
        wildcard = bind_host in ("", "0.0.0.0", "::", "[::]")
        if wildcard:
            names.add(socket.gethostname().lower())
        else:
            names.add(host_name(bind_host))
        if advertise_url:
            names.add(host_name(urlsplit(advertise_url).netloc))
        names.update(host_name(a) for a in extra if a != "*")
        return cls(
            frozenset(n for n in names if n),
            any_ip=not is_loopback(bind_host),
            any_host="*" in extra,
        )

    def allows(self, host: str) -> bool:
        name = host_name(host)
        if self.any_host or name in self.names:
            return True
        if not _is_ip(name):
            return False
        return self.any_ip or ipaddress.ip_address(name).is_loopback


def parse_origins(entries: Iterable[str], *, setting: str) -> frozenset[str]:
    """Validated origins (`scheme://host[:port]`, lower case, no path).

    Raises:
        ValueError: an entry that is not an origin, named with the setting.
    """
    origins = set()
    for entry in entries:
        text = entry.strip().rstrip("/").lower()
        if not text:
            continue
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise ValueError(
                f"{setting}: {entry!r} is not an origin; give scheme://host[:port], "
                "e.g. http://localhost:3000"
            )
        origins.add(text)
    return frozenset(origins)


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


class BrowserGuard:
    """ASGI middleware: the Host, Origin and Content-Type checks (module docstring).

    Args:
        hosts: the Host names the API answers to.
        origins: the origins allowed cross-site (validated with `parse_origins`).
    """

    def __init__(self, app: ASGIApp, *, hosts: HostRule, origins: Sequence[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(origins)

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        return origin in self.origins or origin == f"http://{host.strip().lower()}"

    def _refusal(self, scope: Scope, headers: Headers) -> HybridgenError | None:
        host = headers.get("host")
        if host is not None and not self.hosts.allows(host):
            return Forbidden(
                f"Host {host_name(host)!r} is not an address this API serves (add it to "
                "the allowed hosts to reach the API under that name)"
            )
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host or ""):
            return Forbidden(
                f"requests from origin {origin!r} are not allowed (add it to the allowed "
                "origins to let that web page use the API)"
            )
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if scope["method"] in BODY_METHODS and not preflight:
            kind = _media_type(headers.get("content-type", ""))
            if kind != "application/json":
                return UnsupportedMediaType(
                    f"Content-Type must be application/json (got {kind or 'none'!r})"
                )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            response = error_response(refusal, headers={"Vary": "Origin"})
            await response(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            preflight = Response(status_code=204, headers=_cors(origin, preflight=True))
            await preflight(scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode(), v.encode()) for k, v in _cors(origin).items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_cors)


def _cors(origin: str, *, preflight: bool = False) -> dict[str, str]:
    """The CORS headers of an answer to an allowed `origin`."""
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if preflight:
        headers.update(
            {
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": "600",
            }
        )
    else:
        headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
    return headers


def install_browser_guard(
    app: ASGIApp,
    host: str,
    advertise_url: str | None,
    allowed_hosts: Iterable[str],
    allowed_origins: Iterable[str],
    *,
    setting: str,
) -> None:
    """Add `BrowserGuard` to a FastAPI app. Call it before `install_common`, so the body
    size limit and the metrics see the request first.

    Args:
        setting: the origins' setting, for the message (`HG_EDGE_ALLOWED_ORIGINS`).

    Raises:
        ValueError: an allowed origin that is not one.
    """
    app.add_middleware(  # type: ignore[attr-defined]
        BrowserGuard,
        hosts=HostRule.for_api(host, advertise_url, allowed_hosts),
        origins=parse_origins(allowed_origins, setting=setting),
    )
