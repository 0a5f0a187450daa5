"""structlog set-up: readable console lines for a person, JSON lines with --log-json.

Besides stderr, each event goes to the sinks added with :func:`add_sink` (the
daemon's OTLP log export, see luanette.telemetry): structlog is configured once per
process, while exporters belong to one server, so they subscribe here.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog

Sink = Callable[[str, Mapping[str, Any]], None]
"""Called with the log method's name ("info", "warning", ...) and the event dict;
it must not change the dict and should not block."""

_sinks: tuple[Sink, ...] = ()
_sinks_lock = threading.Lock()


def add_sink(sink: Sink) -> None:
    """Also hand every event to ``sink`` (until :func:`remove_sink`)."""
    global _sinks
    with _sinks_lock:
        _sinks = (*_sinks, sink)


def remove_sink(sink: Sink) -> None:
    """Stop handing events to ``sink`` (no error if it was not added)."""
    global _sinks
    with _sinks_lock:
        _sinks = tuple(s for s in _sinks if s != sink)


def to_sinks(_logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: hand the event to the sinks, then pass it on unchanged."""
    for sink in _sinks:  # a tuple swapped whole: no lock on the hot path
        try:
            sink(method, event)
        except Exception:  # a sink's failure must never cost the log line itself
            pass
    return event


def configure(*, json: bool = False, level: int = logging.INFO) -> None:
    """Configure structlog once for the process; logs go to stderr."""
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            to_sinks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
