"""The `otel` namespace: read and annotate the run's ``luanette.script.execute`` span.

- ``otel.trace_id() -> string|nil``, ``otel.span_id() -> string|nil``: hex ids of the
  run's span (nil when there is no trace, which does not happen in the daemon).
- ``otel.traceparent() -> string|nil``: the W3C traceparent of the run's span, to hand
  to a service the script reaches some other way (backend and garden calls send it
  themselves).
- ``otel.event(name [, attributes])``: a timestamped event on the span.
- ``otel.set_attribute(key, value)``: an attribute on the span.
- ``otel.record_metric(name, value [, attributes])``: one measurement of the histogram
  ``name`` (exported as an OTLP metric when an endpoint is configured).

Attribute values are strings, numbers, booleans or arrays of one of those; keys and
names are at most 128 characters.  When the trace is not recorded (no exporter and an
unsampled caller) events and attributes cost nothing and go nowhere; scripts cannot tell
and need not care.  Limits per run: 128 events and 128 attributes; per daemon: 200
distinct metric names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from opentelemetry import trace

from luanette.engine.api import LuaCallError, RunContext
from luanette.stdlib.paths import as_text, lua_type
from luanette.telemetry import Telemetry, span_ids, traceparent_of

MAX_NAME: Final = 128
MAX_TEXT: Final = 4096
MAX_EVENTS: Final = 128
MAX_ATTRIBUTES: Final = 128
MAX_METRICS: Final = 200
# what a dashboard can chart: OTel instrument name syntax
_METRIC_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.\-/]{0,127}")
# set by the daemon on the span; a script must not overwrite them
RESERVED: Final = frozenset({"script.hash", "script.name", "job.id"})

_Scalar = str | bool | int | float


def _name(value: Any, what: str) -> str:
    text = as_text(value, what)
    if not text or len(text) > MAX_NAME:
        raise LuaCallError(f"{what} must be 1 to {MAX_NAME} characters")
    return text


def _scalar(value: Any, what: str) -> _Scalar:
    if isinstance(value, bytes):
        value = as_text(value, what)
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, float) and not math.isfinite(value):
        raise LuaCallError(f"{what} must be finite")
    if isinstance(value, (bool, int, float)):
        return value
    raise LuaCallError(f"{what} must be a string, number or boolean, got {lua_type(value)}")


def _value(value: Any, what: str) -> _Scalar | list[_Scalar]:
    if isinstance(value, list):
        items = [_scalar(item, f"{what}[{i}]") for i, item in enumerate(value, 1)]
        if len({type(item) for item in items}) > 1:
            raise LuaCallError(f"{what} must be an array of values of one type")
        return items
    return _scalar(value, what)


def _attributes(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LuaCallError(f"{what} must be a table, got {lua_type(value)}")
    if len(value) > MAX_ATTRIBUTES:
        raise LuaCallError(f"{what} has more than {MAX_ATTRIBUTES} keys")
    return {_name(k, f"{what} key"): _value(v, f"{what}.{k}") for k, v in value.items()}


class OtelNamespace:
    """Lua global `otel`.  One instance serves every run: each run binds the span that is
    current when it starts."""

    name = "otel"

    def __init__(self, telemetry: Telemetry | Any) -> None:
        # a Telemetry, or anything with its ``histograms`` and ``histogram(name)`` (a
        # worker's proxy that records in the front)
        self._telemetry = telemetry

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        # The run's span; else the span current where the run starts (the functions run
        # in a Lua thread, where that span is not current, so it is captured here).
        span = run.span if run.span is not None else trace.get_current_span()
        ids = span_ids(span)
        counts = {"events": 0, "attributes": 0}

        def count(kind: str, limit: int) -> None:
            counts[kind] += 1
            if counts[kind] > limit:
                raise LuaCallError(f"a run may add at most {limit} {kind}")

        def event(name: Any, attributes: Any = None) -> None:
            text = _name(name, "name")
            attrs = _attributes(attributes, "attributes")
            count("events", MAX_EVENTS)
            span.add_event(text, attrs)

        def set_attribute(key: Any, value: Any) -> None:
            text = _name(key, "key")
            if text in RESERVED:
                raise LuaCallError(f"{text!r} is set by the daemon")
            checked = _value(value, "value")
            count("attributes", MAX_ATTRIBUTES)
            span.set_attribute(text, checked)

        def record_metric(name: Any, value: Any, attributes: Any = None) -> None:
            text = as_text(name, "name")
            if not _METRIC_NAME.fullmatch(text):
                raise LuaCallError(
                    "name must start with a letter and hold only letters, digits and _ . - / (128 at most)"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LuaCallError(f"value must be a finite number, got {lua_type(value)}")
            attrs = _attributes(attributes, "attributes")
            if text not in self._telemetry.histograms and len(self._telemetry.histograms) >= MAX_METRICS:
                raise LuaCallError(f"the daemon already has {MAX_METRICS} metrics; reuse a name")
            self._telemetry.histogram(text).record(value, attrs)

        return {
            "trace_id": lambda: ids.get("trace_id"),
            "span_id": lambda: ids.get("span_id"),
            "traceparent": lambda: traceparent_of(span),
            "event": event,
            "set_attribute": set_attribute,
            "record_metric": record_metric,
        }
