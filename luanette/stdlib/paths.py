"""Shared helpers of the stdlib namespaces: the one path check, safe file I/O, messages.

Every namespace function that takes a file path (``temp.*``, ``midi.read``/``write``,
``cas.store_file``) resolves it with :func:`check_path` against the job's temp directory
and nothing else, so no script can name a file it was not given.  The rules:

- the value is a string (UTF-8), not empty, without NUL, at most ``MAX_PATH_BYTES``
  long, with no component over ``MAX_NAME_BYTES``;
- relative values are taken inside the directory (the form ``temp.path`` and
  ``temp.list`` return: a script never sees a host path); an absolute value must lie
  under the directory's real path (a script can only know one if it was given it);
- no ``..`` component at all, even one that would stay inside;
- it must name something strictly inside the directory (not the directory itself);
- after resolving every symlink it must still lie strictly inside the directory: a
  symlink pointing out, dangling or not, is refused.

Failures raise :class:`~luanette.runtime.LuaCallError`, a Lua error the script can pcall;
no message names a host path (only the script's own value and names inside the
directory).

Opening uses ``O_NOFOLLOW`` on the resolved path (which has no symlinks left), so a
symlink swapped in after the check makes the call fail rather than follow it.  Scripts
have no ``io`` library, so only the daemon's own code writes into the directory.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, Final

from luanette.engine.api import LuaCallError
from luanette.faults import temp_fault

MAX_PATH_BYTES: Final = 1024
MAX_NAME_BYTES: Final = 255  # NAME_MAX of common filesystems


def lua_type(value: Any) -> str:
    """The Lua type name of a converted argument, for error messages."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (str, bytes)):
        return "string"
    if isinstance(value, (list, dict)):
        return "table"
    return type(value).__name__


def shown(value: Any, limit: int = 80) -> str:
    """A short rendering of a value for an error message."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = repr(value[:limit])
        return text[:-1] + "...'" if len(value) > limit else text
    if isinstance(value, (list, dict)):
        return "a table"
    return "nil" if value is None else repr(value)


def as_text(value: Any, what: str) -> str:
    """A string argument as str (binary Lua strings must be UTF-8)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise LuaCallError(f"{what} must be UTF-8 text") from None
    if not isinstance(value, str):
        raise LuaCallError(f"{what} must be a string, got {lua_type(value)}")
    return value


def path_text(value: Any, what: str = "path") -> str:
    """A path argument as text: a non-empty string without NUL, at most MAX_PATH_BYTES
    long; LuaCallError otherwise."""
    text = as_text(value, what)
    if not text:
        raise LuaCallError(f"{what} must not be empty")
    if "\x00" in text:
        raise LuaCallError(f"{what} contains a NUL byte")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise LuaCallError(f"{what} is too long (over {MAX_PATH_BYTES} bytes)")
    return text


def check_path(base: Path, value: Any, *, what: str = "path") -> Path:
    """Resolve ``value`` to a real path strictly inside ``base`` or raise LuaCallError.

    ``base`` must be an existing directory given as its real path (no symlinks).  The
    result has every symlink resolved, so it can be opened with ``O_NOFOLLOW``.
    """
    text = path_text(value, what)
    root = str(base)
    if text.startswith("/"):
        if not text.startswith(root + "/"):
            raise LuaCallError(
                f"{what} {shown(text)} is outside the job's temp directory: only paths from "
                "temp.path() are accepted (CAS content is addressed by its hash)"
            )
        text = text[len(root) + 1 :]
    parts = [part for part in text.split("/") if part not in ("", ".")]
    for part in parts:
        if part == "..":
            raise LuaCallError(f"{what} {shown(value)} must not contain '..'")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise LuaCallError(f"{what} has a name over {MAX_NAME_BYTES} bytes")
    if not parts:
        raise LuaCallError(f"{what} {shown(value)} names the temp directory itself, not a file in it")
    real = os.path.realpath(os.path.join(root, *parts))
    if not real.startswith(root + "/"):
        raise LuaCallError(
            f"{what} {shown(value)} leads outside the job's temp directory (through a symlink)"
        )
    return Path(real)


def relative(base: Path, path: Path) -> str:
    """``path`` (a real path strictly inside ``base``) as a script sees it: relative
    to ``base``, with ``/`` between names."""
    return path.relative_to(base).as_posix()


def read_regular(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file (already checked), refusing more than ``max_bytes``."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise LuaCallError(f"{what}: no file {path.name!r} in the temp directory") from None
    except OSError as exc:
        raise LuaCallError(f"{what}: cannot open {path.name!r}: {_reason(exc)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # (before fdopen, which refuses a directory itself)
        os.close(fd)
        raise LuaCallError(f"{what}: {path.name!r} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > max_bytes:
            raise LuaCallError(
                f"{what}: {path.name!r} is {st.st_size} bytes, over the read limit of {max_bytes} bytes"
            )
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LuaCallError(f"{what}: {path.name!r} is over the read limit of {max_bytes} bytes")
    return data


def write_regular(path: Path, data: bytes, what: str) -> None:
    """Create or replace the regular file at ``path`` (already checked) with ``data``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise _write_failure(exc, path, what) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise LuaCallError(f"{what}: {path.name!r} is not a regular file")
            f.write(data)
    except OSError as exc:  # a full disk, most likely (on write or on close)
        raise _write_failure(exc, path, what) from None


def _write_failure(exc: OSError, path: Path, what: str) -> LuaCallError:
    fault = temp_fault(exc)
    if fault is not None:
        return LuaCallError(fault.lua_message())
    return LuaCallError(f"{what}: cannot write {path.name!r}: {_reason(exc)}")


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symlink"
    return exc.strerror or type(exc).__name__
