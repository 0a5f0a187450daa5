"""OpenTelemetry for the daemon: one tracer and one meter per server, never global.

Spans (see docs/operations.md):

- ``luanette.dispatch``: one per request, parented on the caller's ``traceparent``
  (Envelope field or HOOT01 frame);
- ``luanette.script.execute``: one per script run (eval or job), with ``script.hash``,
  ``script.name`` and ``job.id``; a job's span is a child of the dispatch span of the
  ``job_execute`` that queued it;
- ``luanette.backend.call`` / ``luanette.garden.call``: one per outgoing call, whose
  ``traceparent`` travels with the request.

Sampling follows the caller: a request whose traceparent is sampled is recorded.  With
no exporter configured a request without a sampled parent is not recorded (its span
still has ids, so logs and outgoing traceparents carry them); with an exporter every
root span is recorded.  ``Telemetry(otlp_endpoint=...)`` exports OTLP over HTTP
(protobuf) to ``<endpoint>/v1/traces`` and ``/v1/metrics``.
"""

from __future__ import annotations

import contextlib
import random
import re
import threading
import types
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from luanette.cas import hash_bytes

_HASH: Final = re.compile(r"[0-9a-f]{32}")

__all__ = [
    "Span",
    "SpanKind",
    "StatusCode",
    "Telemetry",
    "otlp_url",
    "parent_context",
    "script_attributes",
    "span_ids",
    "traceparent_of",
]

SERVICE_NAME: Final = "luanette"
_propagator: Final = TraceContextTextMapPropagator()


def otlp_url(endpoint: str, signal: str) -> str:
    """The OTLP/HTTP URL of ``signal`` ("traces", "metrics") at ``endpoint``: a base URL
    gets ``/v1/<signal>`` appended; a URL with a path is used as it is."""
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"OTLP endpoint must be an http(s) URL, got {endpoint!r}")
    if parsed.path in ("", "/"):
        return endpoint.rstrip("/") + f"/v1/{signal}"
    return endpoint


def parent_context(traceparent: str | None) -> otel_context.Context | None:
    """The context a W3C ``traceparent`` names, or None if there is none or it is invalid."""
    if not traceparent:
        return None
    ctx = _propagator.extract({"traceparent": traceparent})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def traceparent_of(span: Span) -> str | None:
    """W3C traceparent of ``span`` (None for an invalid span)."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def span_ids(span: Span) -> dict[str, str]:
    """``{trace_id, span_id}`` of ``span`` as hex, for log records ({} if invalid)."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return {}
    return {"trace_id": f"{sc.trace_id:032x}", "span_id": f"{sc.span_id:016x}"}


def script_attributes(code_or_hash: str, name: str | None, job_id: str | None = None) -> dict[str, str]:
    """Attributes of a ``luanette.script.execute`` span.  ``code_or_hash`` is a stored
    script's hash, or an eval's source (whose CAS hash is computed)."""
    script_hash = code_or_hash if _HASH.fullmatch(code_or_hash) else hash_bytes(code_or_hash.encode())
    attributes = {"script.hash": script_hash, "script.name": name or ""}
    if job_id is not None:
        attributes["job.id"] = job_id
    return attributes


def _child_context(parent: SpanContext) -> SpanContext:
    """A new span's context under ``parent`` (a new trace if ``parent`` is invalid)."""
    span_id = random.getrandbits(64) or 1
    if parent.is_valid:
        return SpanContext(parent.trace_id, span_id, False, parent.trace_flags, parent.trace_state)
    return SpanContext(random.getrandbits(128) or 1, span_id, False, TraceFlags(TraceFlags.DEFAULT))


class _Current:
    """Makes a span current for a ``with`` block (what ``trace.use_span`` does, for spans
    that record nothing)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, *exc_info: object) -> None:
        otel_context.detach(self._token)


class Telemetry:
    """The daemon's tracer and meter.

    ``otlp_endpoint`` exports spans and metrics over OTLP/HTTP; ``span_exporter`` and
    ``metric_reader`` add exporters of your own (tests use the SDK's in-memory ones).
    With neither, spans carry ids but nothing is recorded unless the caller's trace is
    sampled.  Call :meth:`shutdown` once at exit to flush.
    """

    def __init__(
        self,
        *,
        otlp_endpoint: str | None = None,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
        service_name: str = SERVICE_NAME,
    ) -> None:
        resource = Resource.create({"service.name": service_name})
        exporting = bool(otlp_endpoint or span_exporter)
        self.exporting = exporting
        sampler = ParentBased(ALWAYS_ON if exporting else ALWAYS_OFF)
        self._tracer_provider = TracerProvider(resource=resource, sampler=sampler)
        if span_exporter is not None:
            self._tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        readers: list[MetricReader] = [metric_reader] if metric_reader is not None else []
        if otlp_endpoint:
            # Imported here: the exporters pull in protobuf and requests, which a daemon
            # that exports nothing need not load.
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )

            self._tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_url(otlp_endpoint, "traces")))
            )
            readers.append(
                PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_url(otlp_endpoint, "metrics")))
            )
        self._meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.tracer = self._tracer_provider.get_tracer("luanette")
        self.meter = self._meter_provider.get_meter("luanette.script")
        self._histograms: dict[str, Any] = {}
        self._lock = threading.Lock()

    def span(
        self,
        name: str,
        *,
        parent: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[Span]:
        """A span made current for the ``with`` block; child of ``parent`` if given, else
        of the current span.  An exception escaping the block is recorded on it."""
        if not self.exporting:
            # Nothing records this span unless the caller's trace is sampled: make the
            # non-recording span here, at a fifth of the SDK's cost (every request has one).
            parent_context = trace.get_current_span(parent).get_span_context()
            if not parent_context.trace_flags.sampled:
                return _Current(NonRecordingSpan(_child_context(parent_context)))
        return self.tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes)

    def histogram(self, name: str) -> Any:
        """The histogram instrument ``name`` (made on first use; any thread)."""
        instrument = self._histograms.get(name)
        if instrument is None:
            with self._lock:
                instrument = self._histograms.get(name) or self.meter.create_histogram(name)
                self._histograms[name] = instrument
        return instrument

    @property
    def histograms(self) -> Mapping[str, Any]:
        """The histograms made so far, by name (read-only view)."""
        return types.MappingProxyType(self._histograms)

    def shutdown(self) -> None:
        """Flush and stop the exporters (blocking: call from a thread at exit)."""
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()
