"""The `cas` namespace: the content-addressed store, addressed by hash.

Lua API (a ``hash`` is 32 lowercase hex characters, optionally prefixed ``cas:``; any
other value is a Lua error naming the problem)::

    cas.store(data [, mime_type]) -> hash      data is a string (binary is fine);
                                                mime_type defaults to application/octet-stream
    cas.get(hash)                 -> string    the content; objects over the read cap
                                                (``max_read_bytes``) are a Lua error naming it
    cas.inspect(hash)             -> {hash, mime_type, size_bytes}
    cas.exists(hash)              -> boolean
    cas.path(hash)                -> string    the object's path relative to the CAS root,
                                                ``objects/<2>/<30>`` (never a host path)
    cas.store_file(path [, mime_type]) -> hash  store a file of the job's temp directory
                                                (the path goes through the temp path check)
    cas.read(hash)                -> string|nil upstream's: cas.get, nil when missing
    cas.size(hash)                -> integer|nil upstream's: size in bytes, nil when missing
    cas.base_path()               -> ""        upstream's: the CAS root as a script sees it
                                                (cas.path is relative to it; no host path)

Wherever a hash is taken, an object path (``objects/ab/<30 hex>``, as ``cas.path``
gives it, with an optional leading ``/``) is taken too.

A missing object is a Lua error for ``get``, ``inspect`` and ``path`` (test with
``cas.exists`` first, or pcall).  ``cas.inspect`` leaves out hootenanny's ``local_path``:
a script has no ``io`` library and no namespace function takes a CAS path (they take the
hash), so ``cas.path`` exists only to hand the path on to something outside the sandbox
(a backend, the garden, a result), which joins it to its own CAS root.  No value or
error message a script sees holds a host path.

Storage faults are Lua errors whose message, after the ``"cas.<function>: "`` prefix,
starts with their code (see luanette/faults.py): ``cas_read_only`` (a read-only CAS:
``HOOTENANNY_CAS_READONLY``, a read-only filesystem), ``storage_full`` (its disk is full).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import structlog

from luanette.cas import Cas, CasError, NotFound, TooLarge, UnsafePath, parse_hash
from luanette.engine.api import LuaCallError, RunContext, charge_cas_write
from luanette.faults import StorageFault
from luanette.stdlib.paths import as_text, lua_type

if TYPE_CHECKING:
    from luanette.stdlib.temp import TempNamespace

DEFAULT_MAX_READ_BYTES: Final = 64 * 2**20
MAX_MIME_LENGTH: Final = 255
# RFC 6838 type/subtype with optional RFC 2045 parameters ("text/plain; charset=utf-8").
_TOKEN: Final = r"[A-Za-z0-9!#$&^_.+-]+"
_MIME: Final = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|\"[^\"\\\x00-\x1f\x7f]*\"))*"
)


OBJECT_PATH: Final = re.compile(r"/?objects/([0-9a-f]{2})/([0-9a-f]{30})")
"""An object's path as a script sees it (``cas.path``, ``hootenanny.cas_inspect``'s
``local_path``): relative to the CAS root, whose script-visible form ``cas.base_path()``
is ``""`` (so ``cas.base_path() .. "/" .. cas.path(h)`` is one too)."""
BASE_PATH: Final = ""


def check_hash(value: Any, what: str = "hash") -> str:
    """A hash argument (or an object path, :data:`OBJECT_PATH`) as 32 lowercase hex, or a
    Lua error naming the problem."""
    if isinstance(value, bytes):
        raise LuaCallError(f"{what} must be 32 lowercase hex characters, got a binary string")
    if not isinstance(value, str):
        raise LuaCallError(f"{what} must be a string, got {lua_type(value)}")
    path = OBJECT_PATH.fullmatch(value)
    if path:
        return path[1] + path[2]
    try:
        return parse_hash(value)
    except CasError as exc:
        raise LuaCallError(f"{what}: {exc}") from None


def check_mime(value: Any, what: str = "mime_type") -> str | None:
    """A MIME type argument (nil allowed), or a Lua error."""
    if value is None:
        return None
    text = as_text(value, what)
    if len(text) > MAX_MIME_LENGTH or not _MIME.fullmatch(text):
        raise LuaCallError(f"{what} must be a MIME type like 'audio/midi', got {text[:80]!r}")
    return text


_log = structlog.get_logger("luanette.stdlib.cas")


def cas_failure(exc: Exception, what: str, hash: str | None = None) -> LuaCallError:
    """The Lua error for a CAS failure while serving argument ``what`` (about ``hash``).

    A storage fault is ``"<code>: <what to do>"`` (``cas_read_only``, ``storage_full``).
    No message names a host path: what only the daemon's operator can use goes to the
    daemon log.  Anything that is not a CAS or OS error is raised again (an internal
    error)."""
    if isinstance(exc, StorageFault):
        return LuaCallError(exc.lua_message())
    if isinstance(exc, NotFound):
        return LuaCallError(f"{what}: no object {hash} in the CAS")
    if isinstance(exc, TooLarge):
        return LuaCallError(
            f"{what}: object {exc.hash} is {exc.size} bytes, over the read limit of {exc.limit} bytes"
        )
    if isinstance(exc, (CasError, OSError)):
        _log.warning("cas.failure", what=what, hash=hash, error=str(exc))
        if isinstance(exc, UnsafePath):
            reason = "its file leads outside the CAS (a symlink)"
        elif isinstance(exc, OSError):
            reason = exc.strerror or type(exc).__name__
        else:
            reason = "see the daemon log"
        subject = f"object {hash}" if hash else "the CAS"
        return LuaCallError(f"{what}: CAS failure reading or writing {subject}: {reason}")
    raise exc


class CasNamespace:
    """Lua global `cas`.  ``temp`` (the job's TempNamespace) enables ``cas.store_file``."""

    name = "cas"

    def __init__(
        self, cas: Cas, max_read_bytes: int = DEFAULT_MAX_READ_BYTES, *, temp: TempNamespace | None = None
    ) -> None:
        if max_read_bytes < 0:
            raise ValueError("max_read_bytes must be >= 0")
        self.cas = cas
        self.max_read_bytes = max_read_bytes
        self.temp = temp

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return {
            "store": self.store,
            "store_file": self.store_file,
            "get": self.get,
            "inspect": self.inspect,
            "exists": self.exists,
            "path": self.path,
            "read": self.read,
            "size": self.size,
            "base_path": self.base_path,
        }

    def store(self, data: Any, mime_type: Any = None) -> str:
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, bytes):
            raise LuaCallError(f"data must be a string, got {lua_type(data)}")
        mime = check_mime(mime_type)
        charge_cas_write(len(data))
        try:
            return self.cas.store(data, mime)
        except Exception as exc:
            raise cas_failure(exc, "data") from None

    def store_file(self, path: Any, mime_type: Any = None) -> str:
        if self.temp is None:
            raise LuaCallError("this job has no temp directory")
        mime = check_mime(mime_type)
        data = self.temp.read_bytes(path, self.max_read_bytes, "path")
        charge_cas_write(len(data))
        try:
            return self.cas.store(data, mime)
        except Exception as exc:
            raise cas_failure(exc, "path") from None

    def get(self, hash: Any) -> bytes:
        h = check_hash(hash)
        try:
            return self.cas.retrieve(h, max_bytes=self.max_read_bytes)
        except Exception as exc:
            raise cas_failure(exc, "hash", h) from None

    def inspect(self, hash: Any) -> dict[str, Any]:
        h = check_hash(hash)
        try:
            info = self.cas.inspect(h)
        except Exception as exc:
            raise cas_failure(exc, "hash", h) from None
        return {"hash": info.hash, "mime_type": info.mime_type, "size_bytes": info.size_bytes}

    def exists(self, hash: Any) -> bool:
        h = check_hash(hash)
        try:
            return self.cas.exists(h)
        except Exception as exc:
            raise cas_failure(exc, "hash", h) from None

    def path(self, hash: Any) -> str:
        h = check_hash(hash)
        try:
            return self.cas.relative_path(h)
        except Exception as exc:
            raise cas_failure(exc, "hash", h) from None

    def read(self, hash: Any) -> bytes | None:
        """Upstream's ``cas.read``: ``cas.get``, but nil for a missing object."""
        h = check_hash(hash)
        try:
            return self.cas.retrieve(h, max_bytes=self.max_read_bytes)
        except NotFound:
            return None
        except Exception as exc:
            raise cas_failure(exc, "hash", h) from None

    def size(self, hash: Any) -> int | None:
        """Upstream's ``cas.size``: the object's size in bytes, nil when it is missing."""
        h = check_hash(hash)
        try:
            return self.cas.inspect(h).size_bytes
        except NotFound:
            return None
        except Exception as exc:
            raise cas_failure(exc, "hash", h) from None

    def base_path(self) -> str:
        """Upstream's ``cas.base_path``: the CAS root as scripts see it (never the host's)."""
        return BASE_PATH
