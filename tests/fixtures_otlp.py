"""A real OTLP/HTTP trace receiver in the test process: `otlp` names it to the services.

The receiver (`OtlpReceiver`) is a plain HTTP server on a free loopback port that decodes
each `ExportTraceServiceRequest` with `opentelemetry-proto`. The `otlp` fixture sets
`OTEL_EXPORTER_OTLP_ENDPOINT` to it (and `OTEL_BSP_SCHEDULE_DELAY` short, so spans leave
soon) for every service started after it; `OtlpReceiver.trace` waits, with the suite's one
bound, until the spans a test expects have come.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.waits import eventually

#: OTLP's span kinds.
INTERNAL, SERVER, CLIENT = 1, 2, 3
#: OTLP's status code of an error.
STATUS_ERROR = 2


@dataclass(frozen=True)
class Got:
    """One span as the receiver decoded it."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    status: int
    trace_state: str
    attributes: dict[str, Any]


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on a free loopback port (`POST /v1/traces`)."""

    def __init__(self) -> None:
        self.spans: list[Got] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.take(self.path, request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def take(self, path: str, request: ExportTraceServiceRequest) -> None:
        assert path == "/v1/traces", path
        got = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    got.append(
                        Got(
                            service=resource["service.name"],
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            status=span.status.code,
                            trace_state=span.trace_state,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(got)

    def of_trace(self, trace_id: str) -> list[Got]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    async def trace(self, trace_id: str, *wanted: tuple[str, str]) -> Trace:
        """The spans of `trace_id`, once every (service, name) of `wanted` is among them."""

        def complete() -> Trace | None:
            found = Trace(self.of_trace(trace_id))
            have = {(s.service, s.name) for s in found.spans}
            return found if set(wanted) <= have else None

        found: Trace = await eventually(complete, f"spans {wanted} of trace {trace_id}")
        return found


@dataclass
class Trace:
    """The spans of one trace, looked up by service and name (and parent)."""

    spans: list[Got]

    def all(self, service: str, name: str) -> list[Got]:
        return [s for s in self.spans if (s.service, s.name) == (service, name)]

    def one(self, service: str, name: str, parent: Got | None = None) -> Got:
        found = [
            s for s in self.all(service, name) if parent is None or s.parent_id == parent.span_id
        ]
        assert len(found) == 1, (service, name, [(s.name, s.parent_id) for s in self.spans])
        return found[0]

    def children(self, parent: Got) -> list[Got]:
        return sorted(
            (s for s in self.spans if s.parent_id == parent.span_id), key=lambda s: s.start_ns
        )


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A running OTLP/HTTP receiver (not yet named to the services)."""
    found = OtlpReceiver()
    found.thread.start()
    try:
        yield found
    finally:
        found.server.shutdown()
        found.server.server_close()


@pytest.fixture
def otlp(otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> OtlpReceiver:
    """The receiver, named by `OTEL_EXPORTER_OTLP_ENDPOINT` to every service started after."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("HG_TRACE_CONTENT", raising=False)
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    return otlp_receiver
