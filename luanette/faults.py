"""Storage faults with names: the one table from a low-level storage failure to an error
code, and messages a person can act on.

The CAS and the job database fail in few ways that matter to a caller, and each has a
stable code (docs/protocol.md, docs/lua.md):

- ``cas_read_only``: a write to a CAS that cannot be written: ``HOOTENANNY_CAS_READONLY``,
  a filesystem mounted read-only, a directory the daemon may not write;
- ``storage_full``: the disk under the CAS, the job database or a job's temp directory is
  full (``ENOSPC``, ``EDQUOT``, a file-size limit's ``EFBIG``, ``SQLITE_FULL``);
- ``unavailable``: the job database cannot be used now: locked by another process past
  the busy timeout, an I/O error, read-only, closed.

Scripts also see ``read_only`` (a Lua error kind only, not a protocol code): an
``fs.write`` to a file root that cannot be written (a read-only mount, a directory the
daemon may not write); a full disk there is ``storage_full`` as everywhere.

The stores map their own exceptions once, where they touch the disk (as httpx maps its
transport's exceptions at the transport): :class:`luanette.cas.Cas` raises a
:class:`StorageFault` for an ``OSError`` of a write (:func:`cas_fault`),
:class:`luanette.store.Store` for a ``sqlite3.Error`` (:func:`database_fault`).  Above
them there is one mapping each: the dispatcher answers ``error {code: fault.code,
message: str(fault)}``, and the stdlib turns a fault into the Lua error
``"<code>: <fault.script_message>"``.

Two messages, because two audiences: ``str(fault)`` is for protocol clients and the
daemon log and names the daemon's own configured paths (the CAS root, the state
database), which tell an operator where to look; ``script_message`` is what a script
sees, and never holds a host path (a script sees paths relative to its own roots).
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Final

CAS_READ_ONLY: Final = "cas_read_only"
STORAGE_FULL: Final = "storage_full"
UNAVAILABLE: Final = "unavailable"

CODES: Final = (CAS_READ_ONLY, STORAGE_FULL, UNAVAILABLE)

READ_ONLY: Final = "read_only"
"""A write to a file root (``fs.write``) that cannot be written.  A kind of Lua error
only, never a protocol error code (scripts see it after ``fs.write: ``)."""


class StorageFault(Exception):
    """A storage failure with a protocol error code (the class's ``code``).

    ``str(fault)`` names the daemon's configured paths; ``script_message`` does not."""

    code: ClassVar[str] = UNAVAILABLE

    def __init__(self, message: str, script_message: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.script_message = message if script_message is None else script_message

    def lua_message(self) -> str:
        """The text of the Lua error for this fault: its code, then what to do."""
        return f"{self.code}: {self.script_message}"


class CasReadOnly(StorageFault):
    """A write to a CAS that cannot be written."""

    code = CAS_READ_ONLY


class StorageFull(StorageFault):
    """The disk (or quota, or file-size limit) under a store is exhausted."""

    code = STORAGE_FULL


class Unavailable(StorageFault):
    """The job database cannot be used at the moment."""

    code = UNAVAILABLE


class ReadOnly(StorageFault):
    """A write to a file root (``[fs.roots]``) that cannot be written."""

    code = READ_ONLY


# --- the table --------------------------------------------------------------------------

_FULL: Final = "full"
_READ_ONLY: Final = "read_only"
_UNAVAILABLE: Final = "unavailable"

ERRNO_FAULTS: Final[Mapping[int, tuple[str, str]]] = {
    errno.ENOSPC: (_FULL, "no space left on its disk"),
    errno.EDQUOT: (_FULL, "the disk quota is exhausted"),
    errno.EFBIG: (_FULL, "a file reached the size limit of the daemon's process"),
    errno.EROFS: (_READ_ONLY, "its filesystem is mounted read-only"),
    errno.EACCES: (_READ_ONLY, "the daemon has no permission to write there"),
    errno.EPERM: (_READ_ONLY, "the daemon is not permitted to write there"),
}
"""An ``OSError`` of a write, by errno: what it means for a store, and why in words."""

SQLITE_FAULTS: Final[Mapping[int, tuple[str, str]]] = {
    sqlite3.SQLITE_FULL: (_FULL, "the disk holding it is full"),
    sqlite3.SQLITE_BUSY: (_UNAVAILABLE, "another process holds its lock past the busy timeout"),
    sqlite3.SQLITE_LOCKED: (_UNAVAILABLE, "it is locked"),
    sqlite3.SQLITE_IOERR: (_UNAVAILABLE, "an I/O error"),
    sqlite3.SQLITE_READONLY: (_UNAVAILABLE, "it cannot be written"),
    sqlite3.SQLITE_CANTOPEN: (_UNAVAILABLE, "it cannot be opened"),
}
"""A ``sqlite3.Error``, by primary result code (extended codes, such as
``SQLITE_IOERR_WRITE``, are mapped by their primary code)."""


def os_reason(exc: BaseException) -> tuple[str, str] | None:
    """(meaning, reason) of an ``OSError`` in :data:`ERRNO_FAULTS`, else None."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return ERRNO_FAULTS.get(exc.errno)
    return None


def cas_read_only(root: Path, why: str) -> CasReadOnly:
    """The fault for a write to a CAS opened read-only; ``why`` says how it was
    (``HOOTENANNY_CAS_READONLY=1``)."""
    return CasReadOnly(
        f"the CAS at {root} is read-only ({why}): objects can be read but not stored; "
        "unset HOOTENANNY_CAS_READONLY and restart the daemon to store",
        f"the CAS is read-only ({why}): objects can be read but not stored",
    )


def cas_fault(exc: BaseException, root: Path) -> StorageFault | None:
    """The fault for an error of a write into the CAS at ``root``, or None when the
    table does not know it (then it is a bug or a one-off: raise it as it is)."""
    found = os_reason(exc)
    if found is None:
        return None
    meaning, reason = found
    if meaning == _FULL:
        return StorageFull(
            f"the CAS at {root} is full ({reason}); nothing was stored: free space there, or "
            "point --cas-root (HOOTENANNY_CAS_PATH) at a larger disk",
            f"the CAS is full ({reason}); nothing was stored",
        )
    return CasReadOnly(
        f"the CAS at {root} is read-only ({reason}); nothing was stored: make it writable "
        "for the daemon's user, or set HOOTENANNY_CAS_READONLY=1 to run read-only on purpose",
        f"the CAS is read-only ({reason}); objects can be read but not stored",
    )


def temp_fault(exc: BaseException) -> StorageFault | None:
    """The fault for an error of a write into a job's temp directory (under the state
    directory), or None.  Only a full disk is named: a read-only or forbidden temp
    directory is the daemon's misconfiguration, which the caller reports as it is."""
    found = os_reason(exc)
    if found is None or found[0] != _FULL:
        return None
    return StorageFull(
        f"the job's temp directory is full ({found[1]})",
        f"the disk holding the job's temp directory is full ({found[1]}); nothing was written",
    )


def fs_fault(exc: BaseException, shown: str, where: str) -> StorageFault | None:
    """The fault for an error of a write under a file root (``fs.write``), or None.

    ``shown`` is the file as the script named it (``samples:out/a.wav``), ``where`` the
    host directory for the daemon log; the script's message names only ``shown``."""
    found = os_reason(exc)
    if found is None:
        return None
    meaning, reason = found
    if meaning == _FULL:
        return StorageFull(
            f"the disk under {where} is full ({reason}); {shown} was not written",
            f"the disk holding {shown} is full ({reason}); nothing was written",
        )
    return ReadOnly(
        f"{where} cannot be written ({reason}); {shown} was not written",
        f"{shown} cannot be written ({reason}); nothing was written",
    )


def database_fault(
    exc: BaseException,
    path: Path | str,
    *,
    full: type[StorageFault] = StorageFull,
    unavailable: type[StorageFault] = Unavailable,
) -> StorageFault | None:
    """The fault for an error of the job database at ``path``, or None when the table
    does not know it.  ``full`` and ``unavailable`` are the classes to raise (the job
    store's keep ``sqlite3.OperationalError`` among their bases)."""
    if isinstance(exc, StorageFault):
        return exc
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc):
        return unavailable(closed_message(path))
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    found = SQLITE_FAULTS.get(code & 0xFF) if isinstance(code, int) else None
    if found is None and type(exc).__module__.startswith("psycopg"):
        # imported here: psycopg is only loaded by a daemon whose store is PostgreSQL
        from luanette.postgres import fault_reason

        found = fault_reason(exc)
    if found is None:
        found = os_reason(exc)  # creating the file or its directory
        if found is not None and found[0] == _READ_ONLY:
            found = (_UNAVAILABLE, found[1])
    if found is None:
        return None
    meaning, reason = found
    if meaning == _FULL:
        where = "the PostgreSQL server" if str(path).startswith("postgres") else "--state-dir"
        return full(
            f"the job database at {path} is full ({reason}); nothing was written: free space "
            f"on the disk of {where}",
        )
    return unavailable(
        f"the job database at {path} is unavailable ({reason}); try again shortly, and see "
        "the daemon log if it lasts",
    )


def closed_message(path: Path | str) -> str:
    """The message of a call to a closed job database."""
    return f"the job database at {path} is closed (the daemon is stopping)"


__all__ = [
    "CAS_READ_ONLY",
    "CODES",
    "ERRNO_FAULTS",
    "SQLITE_FAULTS",
    "STORAGE_FULL",
    "UNAVAILABLE",
    "READ_ONLY",
    "CasReadOnly",
    "ReadOnly",
    "StorageFault",
    "StorageFull",
    "Unavailable",
    "cas_fault",
    "cas_read_only",
    "closed_message",
    "database_fault",
    "fs_fault",
    "temp_fault",
]
