"""The root of the errors a request can end with: a stable ``code`` (docs/protocol.md),
a message, and the reply's structured ``details``.

Each part of the daemon raises its own subclass (JobError, SessionError, PluginError,
...), so callers can catch what they expect; the dispatcher maps the root to the error
reply in one place.
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request that cannot be honoured; ``code`` is the protocol error code and
    ``details`` the reply's structured details (None: none)."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
