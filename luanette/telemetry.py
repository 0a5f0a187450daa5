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
(protobuf) to ``<endpoint>/v1/traces`` and ``/v1/metrics``, and the log events that
carry a trace (``trace_id``/``span_id``: a script's ``log.*`` lines, a request's or a
job's daemon lines) as OTLP log records to ``/v1/logs``.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
import time
import types
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.metrics import CallbackOptions, Observation
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

from luanette import logs
from luanette.cas import hash_bytes

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import LoggerProvider

_HASH: Final = re.compile(r"[0-9a-f]{32}")

__all__ = [
    "Span",
    "SpanKind",
    "StatusCode",
    "Telemetry",
    "otlp_url",
    "parent_context",
    "record_error",
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


PARAM_VALUE_MAX: Final = 256
"""Characters of a string param kept in its ``script.params.<name>`` attribute (longer
ones are cut and end in "…")."""
PARAM_ATTRIBUTES_MAX: Final = 32
"""``script.params.*`` attributes one span gets at most (the first names in sorted order)."""
PARAM_NAME_MAX: Final = 64
"""Longer param names are not recorded."""
_SECRET_WORDS: Final = frozenset({"auth", "pass", "pwd", "secret", "token", "credential", "credentials"})
_SECRET_PARTS: Final = ("password", "passwd", "passphrase", "apikey", "accesskey", "privatekey", "secretkey")
_NAME_WORDS: Final = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def looks_secret(name: str) -> bool:
    """Whether a param name looks like a credential's, so it is never recorded even when
    not declared ``secret`` (a second line of defence for a script that forgot to):
    one of its words (split at ``_``, ``-``, ``.``, camelCase) is auth, pass, pwd,
    secret, token or credential(s), or it contains password, passwd, passphrase,
    apikey, accesskey, privatekey or secretkey (ignoring case and separators).  Words,
    not substrings, so ``author``, ``passes`` and ``max_tokens`` are recorded."""
    words = {w.lower() for w in _NAME_WORDS.split(name) if w}
    squashed = re.sub(r"[^a-z0-9]", "", name.lower())
    return bool(words & _SECRET_WORDS) or any(part in squashed for part in _SECRET_PARTS)


def secret_params(schema: Any) -> frozenset[str]:
    """The params a ``describe().params`` table declares ``secret = true``."""
    if not isinstance(schema, Mapping):
        return frozenset()
    return frozenset(name for name, spec in schema.items() if isinstance(spec, Mapping) and spec.get("secret") is True)


def param_attributes(params: Any, secret: Iterable[str] = ()) -> dict[str, Any]:
    """``script.params.<name>`` attributes of a job's scalar params (strings, numbers,
    booleans; tables are left out), without the ``secret`` ones and names that look
    like credentials (:func:`looks_secret`), strings cut to :data:`PARAM_VALUE_MAX`."""
    if not isinstance(params, Mapping):
        return {}
    hidden = set(secret)
    attributes: dict[str, Any] = {}
    for name in sorted(k for k in params if isinstance(k, str)):
        if len(attributes) >= PARAM_ATTRIBUTES_MAX:
            break
        value = params[name]
        if name in hidden or not 0 < len(name) <= PARAM_NAME_MAX or looks_secret(name):
            continue
        if isinstance(value, str):
            if len(value) > PARAM_VALUE_MAX:
                value = value[: PARAM_VALUE_MAX - 1] + "…"
        elif not isinstance(value, bool | int | float) or (isinstance(value, int) and not -(2**63) <= value < 2**63):
            continue  # tables, null, and integers OTLP cannot carry
        attributes[f"script.params.{name}"] = value
    return attributes


def script_attributes(
    code_or_hash: str,
    name: str | None,
    job_id: str | None = None,
    *,
    creator: str | None = None,
    params: Any = None,
    schema: Any = None,
) -> dict[str, Any]:
    """Attributes of a ``luanette.script.execute`` span.  ``code_or_hash`` is a stored
    script's hash, or an eval's source (whose CAS hash is computed).  ``creator`` is the
    stored script's; ``params`` (a job's, pass None when the script's manifest is not
    known) become ``script.params.*`` unless ``schema`` (its ``describe().params``)
    declares them secret."""
    script_hash = code_or_hash if _HASH.fullmatch(code_or_hash) else hash_bytes(code_or_hash.encode())
    attributes: dict[str, Any] = {"script.hash": script_hash, "script.name": name or ""}
    if job_id is not None:
        attributes["job.id"] = job_id
    if creator:
        attributes["script.creator"] = creator
    attributes.update(param_attributes(params, secret_params(schema)))
    return attributes


ERROR_MESSAGE_MAX: Final = 1024
"""Characters of an error message kept in a ``luanette.script.error`` span event."""


def record_error(span: Span | None, detail: Any) -> None:
    """Add a failed run's ``luanette.script.error`` event to ``span``: ``error.kind``,
    ``error.cause`` (when known), ``error.message`` and ``error.line`` of ``detail`` (an
    engine ErrorDetail)."""
    if span is None or not span.is_recording():
        return
    attributes: dict[str, Any] = {"error.kind": detail.kind, "error.message": detail.message[:ERROR_MESSAGE_MAX]}
    if detail.cause:
        attributes["error.cause"] = detail.cause
    if detail.line is not None:
        attributes["error.line"] = detail.line
    span.add_event("luanette.script.error", attributes)


_SEVERITY: Final = {
    "debug": SeverityNumber.DEBUG,
    "info": SeverityNumber.INFO,
    "msg": SeverityNumber.INFO,
    "warning": SeverityNumber.WARN,
    "warn": SeverityNumber.WARN,
    "error": SeverityNumber.ERROR,
    "exception": SeverityNumber.ERROR,
    "critical": SeverityNumber.FATAL,
    "fatal": SeverityNumber.FATAL,
}
# the trace ids become the record's own fields; level and time are its severity and timestamp
_NOT_ATTRIBUTES: Final = frozenset({"trace_id", "span_id", "level", "timestamp", "event", "message"})


def _log_value(value: Any) -> Any:
    if isinstance(value, str | bool | int | float) and not (isinstance(value, int) and not -(2**63) <= value < 2**63):
        return value
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except ValueError:  # a circular structure
        return repr(value)


def log_record(method: str, event: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a structlog event carrying a trace becomes as an OTLP log record (the
    keyword arguments of the SDK's ``Logger.emit``), or None for one without a trace.

    The body is a script line's message (``lua.log``), else the event name; the event
    name is the record's ``event_name``; the other keys are attributes (strings, numbers
    and booleans as they are, a table's entries as ``<key>.<entry>``, e.g. a script
    line's ``fields.n``, anything else as JSON)."""
    trace_hex, span_hex = event.get("trace_id"), event.get("span_id")
    if not isinstance(trace_hex, str) or not isinstance(span_hex, str):
        return None
    try:
        span_context = SpanContext(int(trace_hex, 16), int(span_hex, 16), False, TraceFlags(TraceFlags.SAMPLED))
    except ValueError:
        return None
    if not span_context.is_valid:
        return None
    name = str(event.get("event", ""))
    message = event.get("message")
    level = event.get("level", method)
    return {
        "timestamp": time.time_ns(),
        "context": trace.set_span_in_context(NonRecordingSpan(span_context)),
        "severity_number": _SEVERITY.get(str(level), SeverityNumber.INFO),
        "severity_text": str(level).upper(),
        "body": message if isinstance(message, str) else name,
        "event_name": name or None,
        "attributes": _log_attributes(event),
    }


def _log_attributes(event: Mapping[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for key, value in event.items():
        if key in _NOT_ATTRIBUTES or value is None:
            continue
        if isinstance(value, Mapping):
            attributes.update((f"{key}.{k}", _log_value(v)) for k, v in value.items() if v is not None)
        else:
            attributes[key] = _log_value(value)
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

    ``otlp_endpoint`` exports spans, metrics and the log events that carry a trace
    (see :func:`log_record`) over OTLP/HTTP; ``span_exporter`` and ``metric_reader``
    add exporters of your own (tests use the SDK's in-memory ones).  With neither,
    spans carry ids but nothing is recorded unless the caller's trace is sampled.
    Call :meth:`shutdown` once at exit to flush.
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
        self._logger_provider: LoggerProvider | None = None
        if otlp_endpoint:
            # Imported here: the exporters pull in protobuf and requests, which a daemon
            # that exports nothing need not load.
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

            self._tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_url(otlp_endpoint, "traces")))
            )
            readers.append(
                PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_url(otlp_endpoint, "metrics")))
            )
            # shut down by shutdown(), which first stops the events coming
            self._logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
            self._logger_provider.add_log_record_processor(
                BatchLogRecordProcessor(OTLPLogExporter(endpoint=otlp_url(otlp_endpoint, "logs")))
            )
            self._otlp_logger = self._logger_provider.get_logger("luanette")
            logs.add_sink(self._export_log)
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

    def _export_log(self, method: str, event: Mapping[str, Any]) -> None:
        record = log_record(method, event)
        if record is not None:
            self._otlp_logger.emit(**record)

    def shutdown(self) -> None:
        """Flush and stop the exporters (blocking: call from a thread at exit)."""
        if self._logger_provider is not None:
            logs.remove_sink(self._export_log)
            self._logger_provider.shutdown()
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()


# --- the worker pool's gauges ------------------------------------------------------------

POOL_GAUGES: Final = (
    "luanette.workers.busy",
    "luanette.workers.idle",
    "luanette.pool.waiting_runs",
    "luanette.pool.oldest_waiting_age",
)
"""The gauges :func:`observe_pool` registers (docs/operations.md, "Scaling out")."""


def observe_pool(telemetry: Telemetry, stats: Callable[[], Mapping[str, Any]]) -> None:
    """Register the worker pool's observable gauges on ``telemetry``'s meter, read from
    ``stats`` (``luanette.poolview.pool_stats`` of the engine) at each collection:

    - ``luanette.workers.busy`` / ``luanette.workers.idle``: workers with a run / ready
      without one, one point per worker group (attribute ``group``);
    - ``luanette.pool.waiting_runs``: runs waiting for an eligible worker;
    - ``luanette.pool.oldest_waiting_age``: seconds the oldest of them has waited (0
      when none waits).

    An exporter collects on its own thread, while the event loop changes the pool: a
    read that meets a change (``RuntimeError``: a dict changed size) is tried again; one
    that still fails is logged and reports nothing rather than breaking the export of
    the other metrics."""

    def current() -> Mapping[str, Any] | None:
        error: Exception | None = None
        for _ in range(3):
            try:
                return stats()
            except RuntimeError as e:  # the pool changed while it was read: again
                error = e
            except Exception as e:  # a metrics callback must not raise
                error = e
                break
        structlog.get_logger("luanette.telemetry").warning("telemetry.pool_stats_failed", error=repr(error))
        return None

    def per_group(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            pool = current()
            groups = pool.get("groups") if pool else None
            if not isinstance(groups, Mapping):
                return []
            return [
                Observation(int(group.get(key, 0) or 0), {"group": str(name)})
                for name, group in sorted(groups.items())
                if isinstance(group, Mapping)
            ]

        return observe

    def waiting(options: CallbackOptions) -> Iterable[Observation]:
        pool = current()
        return [Observation(int(pool.get("waiting") or 0))] if pool else []

    def oldest(options: CallbackOptions) -> Iterable[Observation]:
        pool = current()
        return [Observation(float(pool.get("oldest_waiting_s") or 0.0))] if pool else []

    meter = telemetry.meter
    meter.create_observable_gauge("luanette.workers.busy", [per_group("busy")], unit="{worker}",
                                  description="Workers running at least one run, by worker group")  # fmt: skip
    meter.create_observable_gauge("luanette.workers.idle", [per_group("idle")], unit="{worker}",
                                  description="Ready workers running nothing, by worker group")  # fmt: skip
    meter.create_observable_gauge("luanette.pool.waiting_runs", [waiting], unit="{run}",
                                  description="Runs waiting for an eligible worker")  # fmt: skip
    meter.create_observable_gauge("luanette.pool.oldest_waiting_age", [oldest], unit="s",
                                  description="How long the oldest run waiting for a worker has waited")  # fmt: skip


# --- the job queue's gauges --------------------------------------------------------------

QUEUE_GAUGES: Final = (
    "luanette.jobs.queue_depth",
    "luanette.jobs.queue_depth_by_priority",
    "luanette.jobs.oldest_pending_age",
)
"""The gauges :func:`observe_queue` registers (docs/operations.md, docs/jobs.md)."""


def observe_queue(telemetry: Telemetry, stats: Callable[[], Mapping[str, Any]]) -> None:
    """Register the job queue's observable gauges on ``telemetry``'s meter, read from
    ``stats`` (``Jobs.queue_stats``) at each collection:

    - ``luanette.jobs.queue_depth``: jobs queued, waiting for a free job slot (one point,
      0 when none waits: what to scale on);
    - ``luanette.jobs.queue_depth_by_priority``: the same by priority, one point per
      priority with queued jobs (attribute ``priority``), so that summing it gives the
      depth without counting a job twice;
    - ``luanette.jobs.oldest_pending_age``: seconds the longest-queued job has waited
      (0 when none waits).

    A read of ``stats`` that fails is logged and reports nothing rather than breaking
    the export of the other metrics."""

    def current() -> Mapping[str, Any] | None:
        try:
            return stats()
        except Exception as e:  # a metrics callback must not raise
            structlog.get_logger("luanette.telemetry").warning("telemetry.queue_stats_failed", error=repr(e))
            return None

    def depth(options: CallbackOptions) -> Iterable[Observation]:
        queue = current()
        return [Observation(int(queue.get("queue_depth") or 0))] if queue else []

    def by_priority(options: CallbackOptions) -> Iterable[Observation]:
        queue = current()
        counts = queue.get("by_priority") if queue else None
        if not isinstance(counts, Mapping):
            return []
        return [Observation(int(n), {"priority": str(p)}) for p, n in counts.items()]

    def oldest(options: CallbackOptions) -> Iterable[Observation]:
        queue = current()
        return [Observation(float(queue.get("oldest_pending_s") or 0.0))] if queue else []

    meter = telemetry.meter
    meter.create_observable_gauge("luanette.jobs.queue_depth", [depth], unit="{job}",
                                  description="Jobs queued for a free job slot")  # fmt: skip
    meter.create_observable_gauge("luanette.jobs.queue_depth_by_priority", [by_priority], unit="{job}",
                                  description="Jobs queued for a free job slot, by priority")  # fmt: skip
    meter.create_observable_gauge("luanette.jobs.oldest_pending_age", [oldest], unit="s",
                                  description="How long the longest-queued job has waited")  # fmt: skip
