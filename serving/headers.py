"""The HTTP header names hybridgen's APIs answer with and read, written once.

The edge tags every answer with where and why it was served (`X-Hybridgen-Served-By`,
`X-Hybridgen-Route-Reason`), its request id and, under an A/B experiment, its variant; a
client may set its own deadline (`X-Request-Timeout`); a key with limits gets OpenAI's
`x-ratelimit-*` figures. The APIs, their CORS rules and the
console's test prompt all name them from here.
"""

from __future__ import annotations

HEADER_SERVED_BY = "X-Hybridgen-Served-By"
HEADER_ROUTE_REASON = "X-Hybridgen-Route-Reason"
HEADER_REQUEST_ID = "X-Request-Id"
HEADER_VARIANT = "X-Hybridgen-Variant"
#: The client's own deadline, in seconds (`serving.deadlines`).
HEADER_TIMEOUT = "X-Request-Timeout"
#: The trace id (32 hex digits) of the answer's OpenTelemetry trace (`serving.tracing`).
HEADER_TRACE_ID = "X-Trace-Id"
#: OpenAI's rate-limit headers, on every answer to a key with limits (`serving.limits`).
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{figure}-{kind}"
    for kind in ("requests", "tokens")
    for figure in ("limit", "remaining", "reset")
)
