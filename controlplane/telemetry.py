"""OpenTelemetry set-up and W3C trace-context propagation across the queue.

The exporter is chosen by the standard variables: ``OTEL_TRACES_EXPORTER`` (``otlp`` or
``console``; ``none`` or unset with no ``OTEL_EXPORTER_OTLP_*ENDPOINT`` means no export).
OTLP goes over HTTP/protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces endpoint).

Redis commands are spans too (opentelemetry-instrumentation-redis), but only under a span
of ours — a request, an accept, a stage: their provider samples no root span, so the
heartbeats and polls of background loops export nothing.
"""

from __future__ import annotations

import os

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

_configured = False


def _exporter_name() -> str:
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name:
        return name
    has_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    return "otlp" if has_endpoint else "none"


def setup_tracing(service_name: str) -> None:
    """Install a tracer provider for this process when the environment asks for export."""
    global _configured
    if _configured:
        return
    _configured = True
    exporter_name = _exporter_name()
    if exporter_name == "none":
        return
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter()
    elif exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: use otlp, console or none")
    service = os.environ.get("OTEL_SERVICE_NAME", service_name)
    resource = Resource.create({"service.name": service})
    processor = BatchSpanProcessor(exporter, schedule_delay_millis=200)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    redis_provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
    redis_provider.add_span_processor(processor)
    RedisInstrumentor().instrument(tracer_provider=redis_provider)


def shutdown_tracing() -> None:
    """Flush spans that are still buffered (call at process exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_carrier() -> dict[str, str]:
    """The current span's W3C trace context, to put into a queue message."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def context_from(carrier: dict[str, str]) -> otel_context.Context:
    return extract(carrier)


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
