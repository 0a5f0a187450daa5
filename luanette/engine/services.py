"""How a service call's failure crosses the channel: the front turns the exception of
its backends or garden client into ``Answer.error``; the worker turns that back into the
exception the namespaces already handle.  Both halves of the table stand here.
"""

from __future__ import annotations

from typing import Any

import structlog

from luanette.backends import BackendError, UnknownBackend
from luanette.garden import GardenError, GardenUnavailable
from luanette.modules import ModuleError
from luanette.sessions import SessionError


def error_to_wire(exc: Exception) -> dict[str, Any]:
    """A service call's failure in the front as an ``Answer.error``."""
    if isinstance(exc, BackendError):
        return {
            "type": "backend",
            "message": str(exc),
            "code": exc.code,
            "name": exc.name,
            "url": exc.url,
            "reason": exc.reason,
        }
    if isinstance(exc, UnknownBackend):
        return {"type": "unknown_backend", "message": str(exc.args[0]), "name": exc.name}
    if isinstance(exc, GardenUnavailable):
        return {"type": "garden_unavailable", "message": str(exc)}
    if isinstance(exc, SessionError):
        return {"type": "session", "code": exc.code, "message": exc.message}
    if isinstance(exc, GardenError):
        return {"type": "garden_error", "message": str(exc), "traceback": exc.traceback}
    if isinstance(exc, ModuleError):
        return {"type": "module", "message": str(exc)}
    structlog.get_logger("luanette.engine").exception("engine.service_failed")
    return {"type": "internal", "message": "internal error in the daemon; see its log"}


class _RemoteBackendError(BackendError):
    """A backend error that happened in the front, with its code and text kept."""

    def __init__(self, error: dict[str, Any]) -> None:
        Exception.__init__(self, error.get("message", "backend error"))
        self.code = error.get("code", "backend_unavailable")
        self.name = error.get("name", "")
        self.url = error.get("url", "")
        self.reason = error.get("reason", "")


class _RemoteUnknownBackend(UnknownBackend):
    def __init__(self, error: dict[str, Any]) -> None:
        LookupError.__init__(self, error.get("message", "unknown backend"))
        self.name = error.get("name", "")


def error_from_wire(error: dict[str, Any]) -> Exception:
    """The exception a namespace expects for an ``Answer.error`` (the inverse of
    :func:`error_to_wire`)."""
    kind = error.get("type")
    message = str(error.get("message", "internal error"))
    if kind == "backend":
        return _RemoteBackendError(error)
    if kind == "unknown_backend":
        return _RemoteUnknownBackend(error)
    if kind == "garden_unavailable":
        return GardenUnavailable(message)
    if kind == "session":
        return SessionError(str(error.get("code", "commit_failed")), message)
    if kind == "garden_error":
        return GardenError(message, error.get("traceback"))
    if kind == "module":
        return ModuleError(message)
    return RuntimeError(message)
