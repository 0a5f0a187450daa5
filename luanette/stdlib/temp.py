"""The `temp` namespace: one scratch directory per job, removed when the job ends.

Paths are relative to the job's directory: a script never sees where on the host it
is.  Every ``path`` argument goes through :func:`luanette.stdlib.paths.check_path`: a
relative name inside the job's directory (``./`` in front is fine, so
``temp.dir() .. "/x"`` works); ``..``, absolute paths, NUL, over-long names and
symlinks leading out are Lua errors::

    temp.dir()            -> "."      the job's directory, as the paths below are relative to it
    temp.path([name])     -> string   the path of a file named `name` inside it, normalised
                                      ("./a//b" -> "a/b"; a fresh unique name when
                                      omitted); parent directories of "sub/name" are
                                      created, the file is not
    temp.list()           -> {string} paths of the files in it, recursively, sorted
    temp.exists(path)     -> boolean
    temp.remove(path)     -> boolean  true if a file (or directory, with its contents) was
                                      removed, false if nothing was there

A full disk under the directory is the Lua error ``storage_full: ...`` (after the
function's prefix).

Scripts have no ``io`` library: a path is only useful to hand to other namespace
functions that accept temp paths (``midi.read``, ``midi.write``, ``cas.store_file``).

Lifecycle (Python): ``TempNamespace(root)`` is made per job; the directory is created
under ``root`` (mode 0700, unique name ``job-*``) on first use, so jobs that never touch
``temp`` cost nothing.  ``close()`` (or leaving ``with TempNamespace(root) as temp:``)
removes it whatever happened; the job runner calls it in a ``finally``.  After close
every ``temp`` call is a Lua error and nothing is created again, so a worker thread that
outlives its job (abandoned after a timeout) cannot leave files behind.  ``close`` does
blocking file I/O; run it in a thread if the directory may be large.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import structlog

from luanette.engine.api import LuaCallError, RunContext
from luanette.faults import temp_fault
from luanette.stdlib.paths import check_path, read_regular, relative, write_regular

DIR_PREFIX: Final = "job-"
DIR_AS_SEEN: Final = "."
"""What ``temp.dir()`` returns: the paths a script sees are relative to its directory."""

_log = structlog.get_logger("luanette.stdlib.temp")


class TempNamespace:
    """Lua global `temp`, bound to one job's directory under ``root``."""

    name = "temp"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        path = root if isinstance(root, Path) else Path(root)
        # (every job makes one of these: skip the normalising a toolbox's root needs not)
        self.root = path if path.is_absolute() else path.expanduser().absolute()
        self._dir: Path | None = None
        self._closed = False
        self._lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The job's directory (real path), created on first access."""
        with self._guard() as directory:
            return directory

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def created(self) -> bool:
        """Whether the directory exists yet (most jobs never make it)."""
        return self._dir is not None

    def close(self) -> None:
        """Remove the directory and everything in it; idempotent, never raises."""
        with self._lock:
            self._closed = True
            directory, self._dir = self._dir, None
        if directory is None:
            return
        _rmtree(directory)

    def __enter__(self) -> TempNamespace:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def clean_root(root: str | os.PathLike[str], older_than_s: float) -> int:
        """Remove job directories under ``root`` untouched for ``older_than_s`` seconds
        (left by a crashed daemon); return how many.  Call at start-up."""
        cutoff = time.time() - older_than_s
        removed = 0
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.startswith(DIR_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                _rmtree(Path(entry.path))
                removed += 1
        return removed

    @contextlib.contextmanager
    def _guard(self) -> Iterator[Path]:
        """Hold the lock with the directory in existence; refuse once closed."""
        with self._lock:
            if self._closed:
                raise LuaCallError("the job's temp directory is gone (the job has ended)")
            if self._dir is None:
                try:
                    self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self._dir = Path(os.path.realpath(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=self.root)))
                except OSError as exc:
                    _log.error("temp.mkdir_failed", root=str(self.root), error=str(exc))
                    fault = temp_fault(exc)
                    if fault is not None:
                        raise LuaCallError(fault.lua_message()) from None
                    raise LuaCallError("cannot create the job's temp directory") from None
            yield self._dir

    # --- helpers for other namespaces ---------------------------------------------

    def resolve(self, value: Any, what: str = "path") -> Path:
        """The checked real path of ``value`` inside the directory (see paths.check_path)."""
        with self._guard() as directory:
            return check_path(directory, value, what=what)

    def read_bytes(self, value: Any, max_bytes: int, what: str = "path") -> bytes:
        """Contents of the temp file ``value``, at most ``max_bytes``; Lua errors otherwise."""
        with self._guard() as directory:
            return read_regular(check_path(directory, value, what=what), max_bytes, what)

    def write_bytes(self, value: Any, data: bytes, what: str = "path") -> Path:
        """Create or replace the temp file ``value`` with ``data``; its path."""
        with self._guard() as directory:
            path = check_path(directory, value, what=what)
            _make_parents(directory, path, what)
            write_regular(path, data, what)
            return path

    # --- the Lua functions ----------------------------------------------------------

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return {
            "dir": self.dir,
            "path": self.path,
            "list": self.list,
            "exists": self.exists,
            "remove": self.remove,
        }

    def dir(self) -> str:
        self.directory  # noqa: B018 - refuses once the job has ended, like the others
        return DIR_AS_SEEN

    def path(self, name: Any = None) -> str:
        with self._guard() as directory:
            if name is None:
                name = f"tmp-{secrets.token_hex(8)}"
            path = check_path(directory, name, what="name")
            _make_parents(directory, path, "name")
            return relative(directory, path)

    def list(self) -> list[str]:
        with self._guard() as directory:
            found: list[str] = []
            for parent, dirs, files in os.walk(directory):  # does not follow symlinks
                dirs.sort()
                found.extend(relative(directory, Path(parent, f)) for f in files)
            return sorted(found)

    def exists(self, path: Any) -> bool:
        with self._guard() as directory:
            return os.path.lexists(check_path(directory, path))

    def remove(self, path: Any) -> bool:
        with self._guard() as directory:
            real = check_path(directory, path)
            try:
                if real.is_dir():  # a real path: never a symlink
                    shutil.rmtree(real)
                else:
                    real.unlink()
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise LuaCallError(f"cannot remove {real.name!r}: {exc.strerror}") from None
            return True


def _make_parents(directory: Path, path: Path, what: str) -> None:
    """Create the directories between ``directory`` and ``path`` (both real paths)."""
    parent = path.parent
    if parent == directory:
        return
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        fault = temp_fault(exc)
        if fault is not None:
            raise LuaCallError(fault.lua_message()) from None
        raise LuaCallError(f"{what}: cannot create directory {parent.name!r}: {exc.strerror}") from None
    # A parent created just now is inside: check_path resolved it before it existed and
    # nothing else writes here; re-check anyway in case a component was a file/symlink.
    if not os.path.realpath(parent).startswith(str(directory) + "/"):
        raise LuaCallError(f"{what} leads outside the job's temp directory")


def _rmtree(directory: Path) -> None:
    """Remove a tree, logging (not raising) what cannot be removed.  rmtree does not
    follow symlinks (on Linux it walks by file descriptor)."""

    def failed(function: Any, path: str, error: Any) -> None:
        if isinstance(error, tuple):  # onerror's exc_info
            error = error[1]
        if not isinstance(error, FileNotFoundError):
            _log.warning("temp.remove_failed", path=path, error=str(error))

    if sys.version_info >= (3, 12):
        shutil.rmtree(directory, onexc=failed)
    else:
        shutil.rmtree(directory, onerror=failed)
