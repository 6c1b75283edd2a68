"""OpenTelemetry traces: one SERVER span per request, a child per stage (classify, decide, redact,
each dispatch attempt, restore), with the GenAI semantic-convention attributes.

Off by default, at no cost: without an OTLP endpoint no provider is built, OpenTelemetry's SDK is
not even imported, and each hook in the request path is one `is None` test. On, spans go to an
OTLP/HTTP collector through a batch processor (a background thread; a request never waits on
the export).

What a span may carry: names of models, targets, rules and entity types, counts, levels, status
codes, error kinds. Never request or answer text, and so never a detected value: attributes are
only ever set from those typed fields, never from the body.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

SCOPE = "hybrid-gateway"
AttrValue = str | int | float | bool | Sequence[str]


def endpoint_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The OTLP/HTTP traces URL the standard variables name, or None: tracing off.
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used as is; OTEL_EXPORTER_OTLP_ENDPOINT gets /v1/traces."""
    env = env if env is not None else os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if url := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return url
    if url := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return url.rstrip("/") + "/v1/traces"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class RequestTrace:
    """The spans of one request. Stages open children of the root; `end` closes the root with the
    outcome."""

    def __init__(self, tracer: Tracer, endpoint: str, body: Mapping[str, Any], request_id: str,
                 client: str | None, started_ns: int | None = None) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        self._tracer = tracer
        attrs: dict[str, AttrValue] = {
            "http.request.method": "POST",
            "url.path": endpoint,
            "gen_ai.operation.name": "embeddings" if endpoint.endswith("/embeddings") else "chat",
            "hybrid.request_id": request_id,
        }
        model = body.get("model")
        if isinstance(model, str):
            attrs["gen_ai.request.model"] = model[:256]
        for key, attr in (("max_tokens", "gen_ai.request.max_tokens"),
                          ("max_completion_tokens", "gen_ai.request.max_tokens"),
                          ("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
                          ("seed", "gen_ai.request.seed")):
            if _number(body.get(key)):
                attrs[attr] = body[key]
        if body.get("stream") is True:
            attrs["hybrid.stream"] = True
        if client:
            attrs["hybrid.client"] = client
        self.root: Span = tracer.start_span(f"POST {endpoint}", kind=SpanKind.SERVER, attributes=attrs,
                                            start_time=started_ns)
        self._context = set_span_in_context(self.root)
        self._attempts = 0
        self._ended = False

    @contextlib.contextmanager
    def stage(self, name: str, **attrs: AttrValue) -> Iterator[Span]:
        with self._tracer.start_as_current_span(name, context=self._context, attributes=attrs,
                                                end_on_exit=True, record_exception=False,
                                                set_status_on_exception=True) as span:
            yield span

    def open(self, name: str, **attrs: AttrValue) -> Span:
        """A stage span the caller ends itself (one that outlives a block: a streamed restore)."""
        return self._tracer.start_span(name, context=self._context, attributes=attrs)

    @contextlib.contextmanager
    def attempt(self, target: str, model: str | None, api_base: str | None, provider: str) -> Iterator[Span]:
        """One call to one target (a retry is another attempt). Ends when its answer (or a stream's
        first part) is there."""
        from opentelemetry.trace import SpanKind

        self._attempts += 1
        attrs: dict[str, AttrValue] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
                                       "hybrid.target": target, "hybrid.attempt": self._attempts}
        if model:
            attrs["gen_ai.request.model"] = model
        if api_base:
            parts = urlsplit(api_base)
            if parts.hostname:
                attrs["server.address"] = parts.hostname
            if parts.port:
                attrs["server.port"] = parts.port
        with self._tracer.start_as_current_span(f"chat {model or target}", context=self._context, kind=SpanKind.CLIENT,
                                                attributes=attrs, record_exception=False,
                                                set_status_on_exception=False) as span:
            yield span

    @staticmethod
    def failed(span: Span, error_type: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR))

    def set(self, **attrs: AttrValue | None) -> None:
        self.root.set_attributes({k.replace("__", "."): v for k, v in attrs.items() if v is not None})

    def end(self, status: int, attrs: Mapping[str, AttrValue | None], error: str | None = None) -> None:
        if self._ended:  # a request is recorded once; be safe if two paths end it
            return
        self._ended = True
        root = self.root
        root.set_attribute("http.response.status_code", status)
        root.set_attributes({k: v for k, v in attrs.items() if v is not None})
        if status >= 500:
            from opentelemetry.trace import Status, StatusCode

            root.set_attribute("error.type", error or str(status))
            root.set_status(Status(StatusCode.ERROR))
        root.end()


class Tracing:
    """The process's tracer: built once from the server settings (not the policy: a reload must
    not tear down the exporter with spans in flight)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer(SCOPE)

    def request(self, endpoint: str, body: Mapping[str, Any], request_id: str, client: str | None,
                started: float | None = None) -> RequestTrace:
        """`started`: the request's time.monotonic() start, so the root span covers reading the body."""
        started_ns = time.time_ns() - int((time.monotonic() - started) * 1e9) if started is not None else None
        return RequestTrace(self._tracer, endpoint, body, request_id, client, started_ns)

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what the batch processor still holds


def build_tracing(endpoint: str | None, exporter: SpanExporter | None = None) -> Tracing | None:
    """None (off) without an endpoint or exporter. `exporter`: tests pass an in-memory one."""
    if endpoint is None and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "hybrid-gateway"})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5)))
    return Tracing(provider)
