"""The `fs` namespace: files under the roots of ``[fs.roots]``, as far as a run's grants go.

A script names a file ``ROOT:relative/path`` (``samples:drums/kick.wav``), where ROOT is
a name from the config file's ``[fs.roots]`` (``samples = "/srv/samples"``).  It never
sees, and no error message shows, where a root is on the host::

    fs.read(path)          -> string   the file's bytes (at most max_read_bytes)
    fs.write(path, data)   -> nil      create or replace the file (at most max_write_bytes);
                                       missing parent directories are created
    fs.list(dir)           -> {entry}  the entries of a directory the script may see,
                                       sorted by name: {name, path, type = "file"|"dir",
                                       size} (size for files only); "samples:" is the root
    fs.exists(path)        -> boolean

What a run may touch comes from its capabilities ``fs.read:<glob>`` and
``fs.write:<glob>``, passed here as the globs (the part after ``fs.read:``).  A glob is
``ROOTGLOB:PATHGLOB`` or ``*`` (everything under every root; ``**`` is the same):

- the path is matched component by component (``/`` separates them); within one
  component ``*`` matches any run of characters, ``?`` one character, ``[abc]`` /
  ``[!abc]`` a class (``fnmatch`` rules, case-sensitive, a leading ``.`` is not
  special), so ``*`` never crosses a ``/``;
- a component that is exactly ``**`` matches zero or more whole components:
  ``samples:**`` is everything in ``samples`` (and the root itself),
  ``samples:drums/**`` everything below ``drums/`` (and ``drums`` itself),
  ``samples:**/*.wav`` every ``.wav`` file at any depth;
- ROOTGLOB is matched against the root's name with the same component rules
  (``*:loops/*``: ``loops/*`` of every root);
- ``samples:`` (nothing after the colon) is the root directory itself.

Which grant a call needs:

- ``fs.read(p)``: ``p`` matches an ``fs.read`` glob;
- ``fs.write(p, data)``: ``p`` matches an ``fs.write`` glob;
- ``fs.list(d)``: some ``fs.read`` glob can match a path strictly below ``d``; the
  result holds only the entries that match an ``fs.read`` glob, or that are directories
  below which one can match (so ``fs.read:samples:drums/*`` lists ``samples:`` as just
  ``drums``, and ``samples:drums`` as its files);
- ``fs.exists(p)``: ``p`` matches an ``fs.read`` or ``fs.write`` glob, or one of them
  can match a path below it.

A call outside its grants is the Lua error ``permission_denied: fs.read:<path> is not
granted (this script may read <globs>); declare it in describe().capabilities`` (after
the ``fs.read: `` prefix the runtime adds); for ``fs.list(d)`` the capability named is
``fs.read:<d>/*``.

Walls (every path, before anything on disk is touched): a path is a UTF-8 string
``ROOT:relative``, without NUL, at most ``MAX_PATH_BYTES`` long (``MAX_NAME_BYTES`` a
component); the root must be configured; the relative part must not be absolute nor
hold a ``..`` component (``.`` and empty components are dropped, so
``samples:./a//b`` is ``samples:a/b``).  Then the path is resolved (every symlink) and
must lie inside the root's real path, or it is refused; a symlink that stays inside is
followed only if the place it leads to is granted too.  Files are then opened by walking
from the root one component at a time with ``O_NOFOLLOW`` (``openat``), so a symlink
swapped in after the check makes the call fail instead of leading out.

Writes go to a fresh file beside the target (``.luanette-*.tmp``) that is renamed over
it, so a reader never sees half a file and a full disk leaves the old file as it was.
New files are created with mode 0666 and directories 0777, less the daemon's umask; a
replaced file keeps its mode.  A full disk is ``storage_full: ...``, a root (or
directory) the daemon cannot write ``read_only: ...`` (luanette/faults.py).  fs writes
do not count against the run's CAS quota; each call is bounded by ``max_write_bytes``.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

import structlog

from luanette.engine.api import LuaCallError, RunContext
from luanette.faults import fs_fault
from luanette.stdlib.paths import MAX_NAME_BYTES, lua_type, path_text, shown

MAX_READ_BYTES: Final = 64 * 2**20
"""Largest file ``fs.read`` returns (as ``cas.get`` and ``temp``'s readers)."""
MAX_WRITE_BYTES: Final = 64 * 2**20
"""Largest ``data`` one ``fs.write`` accepts."""
MAX_LIST_ENTRIES: Final = 10_000
"""Most entries a directory may hold for ``fs.list`` (counted before filtering)."""

TEMP_PREFIX: Final = ".luanette-"
TEMP_SUFFIX: Final = ".tmp"

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_log = structlog.get_logger("luanette.stdlib.fs")


# --- globs -------------------------------------------------------------------------------


class FsGlob:
    """One grant, ``ROOTGLOB:PATHGLOB`` or ``*``; see the module's docstring."""

    __slots__ = ("parts", "root", "text")

    parts: tuple[str, ...]

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text:
            raise ValueError(f"an fs glob is a non-empty string, got {text!r}")
        if "\x00" in text:
            raise ValueError(f"fs glob {text!r} contains a NUL byte")
        if text in ("*", "**"):
            self.text, self.root, self.parts = text, "*", ("**",)
            return
        root, sep, rest = text.partition(":")
        if not sep or not root:
            raise ValueError(f"fs glob {text!r} must be ROOT:PATH (e.g. samples:drums/*), or * for everything")
        if "/" in root:
            raise ValueError(f"fs glob {text!r}: the root part must not contain '/'")
        if rest.startswith("/"):
            raise ValueError(f"fs glob {text!r}: the path after the root must be relative")
        parts = tuple(part for part in rest.split("/") if part not in ("", "."))
        if ".." in parts:
            raise ValueError(f"fs glob {text!r} must not contain '..'")
        self.text, self.root, self.parts = text, root, parts

    def __repr__(self) -> str:
        return f"FsGlob({self.text!r})"

    def _states(self, root: str, parts: Sequence[str]) -> list[set[int]] | None:
        """states[i]: how many leading components of ``parts`` the first ``i`` pattern
        components can match exactly (None when the root does not match)."""
        if not fnmatch.fnmatchcase(root, self.root):
            return None
        states = [{0}]
        for pattern in self.parts:
            current, following = states[-1], set()
            if pattern == "**":
                if current:
                    following = set(range(min(current), len(parts) + 1))
            else:
                following = {j + 1 for j in current if j < len(parts) and fnmatch.fnmatchcase(parts[j], pattern)}
            states.append(following)
        return states

    def matches(self, root: str, parts: Sequence[str]) -> bool:
        """Whether ``root:parts`` is matched by this glob."""
        states = self._states(root, parts)
        return states is not None and len(parts) in states[-1]

    def reaches_below(self, root: str, parts: Sequence[str]) -> bool:
        """Whether this glob can match some path strictly below ``root:parts``."""
        states = self._states(root, parts)
        if states is None:
            return False
        end = len(parts)
        for i, pattern in enumerate(self.parts):
            # the first i pattern components used up the whole path: the rest match below
            if end in states[i]:
                return True
            # a ** can swallow the rest of the path and go on below it
            if pattern == "**" and states[i]:
                return True
        return False


def check_glob(text: str) -> str:
    """``text`` if it is a valid fs glob; ValueError saying what is wrong otherwise (for
    whoever checks ``fs.read:<glob>`` capabilities before a run)."""
    FsGlob(text)
    return text


# --- paths -------------------------------------------------------------------------------


class FsPath:
    """A checked ``ROOT:relative`` path: its root's name and its components."""

    __slots__ = ("parts", "root")

    def __init__(self, root: str, parts: tuple[str, ...]) -> None:
        self.root = root
        self.parts = parts

    def __str__(self) -> str:
        return f"{self.root}:{'/'.join(self.parts)}"

    def child(self, name: str) -> FsPath:
        return FsPath(self.root, (*self.parts, name))


# --- the namespace ---------------------------------------------------------------------------


class FsNamespace:
    """Lua global `fs` over ``roots`` (name -> host directory), limited to the globs a
    run is granted: ``read`` from ``fs.read:<glob>``, ``write`` from ``fs.write:<glob>``."""

    name = "fs"

    def __init__(
        self,
        roots: Mapping[str, Path],
        read: Sequence[str],
        write: Sequence[str],
        max_read_bytes: int = MAX_READ_BYTES,
        max_write_bytes: int = MAX_WRITE_BYTES,
        max_list_entries: int = MAX_LIST_ENTRIES,
    ) -> None:
        self.roots = {name: Path(path).expanduser().absolute() for name, path in roots.items()}
        self.read_globs = tuple(FsGlob(text) for text in read)
        self.write_globs = tuple(FsGlob(text) for text in write)
        self.max_read_bytes = max_read_bytes
        self.max_write_bytes = max_write_bytes
        self.max_list_entries = max_list_entries

    @classmethod
    def from_capabilities(cls, roots: Mapping[str, Path], capabilities: Iterable[str], **limits: int) -> FsNamespace:
        """The namespace for a run granted ``capabilities`` (strings such as
        ``fs.read:samples:drums/*``; an unscoped ``fs.read`` means ``*``; others are ignored)."""
        read: list[str] = []
        write: list[str] = []
        for text in capabilities:
            name, sep, scope = text.partition(":")
            target = {"fs.read": read, "fs.write": write}.get(name)
            if target is not None:
                target.append(scope if sep and scope else "*")
        return cls(roots, read, write, **limits)

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return {"read": self.read, "write": self.write, "list": self.list, "exists": self.exists}

    # --- the Lua functions --------------------------------------------------------------

    def read(self, path: Any) -> bytes:
        target = self._parse(path)
        self._require(self.read_globs, target, "read")
        root_real, real = self._resolve(target, self.read_globs, "read")
        if not real.parts:
            raise LuaCallError(f"{target} is a directory, not a file")
        try:
            dir_fd = _open_dir(root_real, real.parts[:-1])
        except OSError as exc:
            raise _lookup_failure(exc, target) from None
        try:
            fd = os.open(real.parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise _lookup_failure(exc, target) from None
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # (before fdopen, which refuses a directory itself)
            os.close(fd)
            kind = "a directory, not a file" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise LuaCallError(f"{target} is {kind}")
        with os.fdopen(fd, "rb") as f:
            if st.st_size > self.max_read_bytes:
                raise LuaCallError(
                    f"{target} is {st.st_size} bytes, over the read limit of {self.max_read_bytes} bytes"
                )
            try:
                data = f.read(self.max_read_bytes + 1)
            except OSError as exc:
                raise LuaCallError(f"cannot read {target}: {_reason(exc)}") from None
        if len(data) > self.max_read_bytes:
            raise LuaCallError(f"{target} is over the read limit of {self.max_read_bytes} bytes")
        return data

    def write(self, path: Any, data: Any = None) -> None:
        target = self._parse(path)
        self._require(self.write_globs, target, "write")
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, bytes):
            raise LuaCallError(f"data must be a string, got {lua_type(data)}")
        if len(data) > self.max_write_bytes:
            raise LuaCallError(
                f"data is {len(data)} bytes, over the write limit of {self.max_write_bytes} bytes (nothing was written)"
            )
        root_real, real = self._resolve(target, self.write_globs, "write")
        if not real.parts:
            raise LuaCallError(f"{target} is the root directory itself, not a file")
        try:
            _write_beneath(root_real, real.parts, data, str(target))
        except LuaCallError:
            raise
        except OSError as exc:
            raise self._write_failure(exc, target, root_real) from None

    def list(self, path: Any) -> list[dict[str, Any]]:
        target = self._parse(path)
        if not any(g.reaches_below(target.root, target.parts) for g in self.read_globs):
            self._deny(f"fs.read:{_below(target)}", self.read_globs, "read")
        root_real, real = self._resolve(target, self.read_globs, "list")
        try:
            dir_fd = _open_dir(root_real, real.parts)
        except OSError as exc:
            raise _lookup_failure(exc, target, directory=True) from None
        entries: list[dict[str, Any]] = []
        try:
            scanned = 0
            with os.scandir(dir_fd) as it:
                for entry in it:
                    scanned += 1
                    if scanned > self.max_list_entries:
                        raise LuaCallError(
                            f"{target} has over {self.max_list_entries} entries, the most fs.list reads; "
                            "list a directory below it"
                        )
                    found = self._entry(root_real, target, real, entry)
                    if found is not None:
                        entries.append(found)
        except OSError as exc:
            raise LuaCallError(f"cannot list {target}: {_reason(exc)}") from None
        finally:
            os.close(dir_fd)
        entries.sort(key=lambda e: e["name"])
        return entries

    def exists(self, path: Any) -> bool:
        target = self._parse(path)
        globs = self.read_globs + self.write_globs
        if not self._visible(globs, target):
            self._deny(f"fs.read:{target}", self.read_globs, "read")
        root_real, real = self._resolve(target, globs, "exists")
        if not real.parts:
            return os.path.isdir(root_real)
        try:
            dir_fd = _open_dir(root_real, real.parts[:-1])
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise _lookup_failure(exc, target) from None
        try:
            os.stat(real.parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise _lookup_failure(exc, target) from None
        finally:
            os.close(dir_fd)
        return True

    # --- checks ------------------------------------------------------------------------

    def _parse(self, value: Any, what: str = "path") -> FsPath:
        text = path_text(value, what)
        root, sep, rest = text.partition(":")
        if not sep or "/" in root:
            raise LuaCallError(
                f"{what} {shown(text)} must be ROOT:relative/path, e.g. samples:drums/kick.wav ({self._known()})"
            )
        if root not in self.roots:
            raise LuaCallError(f"{what} {shown(text)}: unknown root {root!r} ({self._known()})")
        if rest.startswith("/"):
            raise LuaCallError(f"{what} {shown(text)} must be relative to its root, not absolute")
        parts = tuple(part for part in rest.split("/") if part not in ("", "."))
        for part in parts:
            if part == "..":
                raise LuaCallError(f"{what} {shown(text)} must not contain '..'")
            if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                raise LuaCallError(f"{what} has a name over {MAX_NAME_BYTES} bytes")
        return FsPath(root, parts)

    def _known(self) -> str:
        if not self.roots:
            return "no roots are configured: [fs.roots] in the config file"
        return f"roots: {', '.join(sorted(self.roots))}"

    @staticmethod
    def _visible(globs: Sequence[FsGlob], path: FsPath) -> bool:
        return any(g.matches(path.root, path.parts) or g.reaches_below(path.root, path.parts) for g in globs)

    def _require(self, globs: Sequence[FsGlob], path: FsPath, verb: str, via: FsPath | None = None) -> None:
        if not any(g.matches(path.root, path.parts) for g in globs):
            self._deny(f"fs.{verb}:{path}", globs, verb, via)

    @staticmethod
    def _deny(needed: str, globs: Sequence[FsGlob], verb: str, via: FsPath | None = None) -> NoReturn:
        held = ", ".join(g.text for g in globs)
        may = f"this script may {verb} {held}" if held else f"this script has no fs.{verb} capability"
        through = f"{via} leads there through a symlink; " if via is not None else ""
        raise LuaCallError(
            f"permission_denied: {needed} is not granted ({through}{may}); declare it in describe().capabilities"
        )

    def _resolve(self, path: FsPath, globs: Sequence[FsGlob], call: str) -> tuple[str, FsPath]:
        """(the root's real path, ``path`` with every symlink resolved) after checking it
        stays inside its root and, when a symlink moved it, that it is still granted."""
        root_real = os.path.realpath(self.roots[path.root])
        if not os.path.isdir(root_real):
            _log.warning("fs.root_missing", root=path.root, path=str(self.roots[path.root]))
            raise LuaCallError(f"root {path.root!r} is not available (its directory is missing)")
        real = os.path.realpath(os.path.join(root_real, *path.parts))
        if real == root_real:
            parts: tuple[str, ...] = ()
        elif real.startswith(root_real.rstrip("/") + "/"):
            parts = tuple(real[len(root_real.rstrip("/")) + 1 :].split("/"))
        else:
            raise LuaCallError(f"{path} leads outside its root (through a symlink)")
        resolved = FsPath(path.root, parts)
        if parts != path.parts:
            if call in ("read", "write"):
                self._require(globs, resolved, call, via=path)
            elif call == "list":
                if not any(g.reaches_below(path.root, parts) for g in globs):
                    self._deny(f"fs.read:{_below(resolved)}", globs, "read", via=path)
            elif not self._visible(globs, resolved):
                self._deny(f"fs.read:{resolved}", self.read_globs, "read", via=path)
        return root_real, resolved

    def _entry(
        self, root_real: str, listed: FsPath, real_dir: FsPath, entry: os.DirEntry[str]
    ) -> dict[str, Any] | None:
        """The entry as fs.list shows it, or None when the script may not see it (not
        granted, a symlink leading out or nowhere, not a file or directory)."""
        name = entry.name
        if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
            return None  # a write in progress
        shown_path = listed.child(name)
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(os.path.join(root_real, *real_dir.parts, name))
                if not real.startswith(root_real.rstrip("/") + "/"):
                    return None
                parts = tuple(real[len(root_real.rstrip("/")) + 1 :].split("/"))
                st = os.stat(real, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    return None  # a loop
                if not self._may_see(FsPath(listed.root, parts), stat.S_ISDIR(st.st_mode)):
                    return None
        except OSError:
            return None
        is_dir = stat.S_ISDIR(st.st_mode)
        if not (is_dir or stat.S_ISREG(st.st_mode)):
            return None
        if not self._may_see(shown_path, is_dir):
            return None
        if real_dir.parts != listed.parts and not self._may_see(real_dir.child(name), is_dir):
            return None  # listed through a symlinked directory: where it really is counts too
        found: dict[str, Any] = {"name": name, "path": str(shown_path), "type": "dir" if is_dir else "file"}
        if not is_dir:
            found["size"] = st.st_size
        return found

    def _may_see(self, path: FsPath, is_dir: bool) -> bool:
        return any(
            g.matches(path.root, path.parts) or (is_dir and g.reaches_below(path.root, path.parts))
            for g in self.read_globs
        )

    def _write_failure(self, exc: OSError, target: FsPath, root_real: str) -> LuaCallError:
        _log.warning("fs.write_failed", target=str(target), root=root_real, error=str(exc))
        fault = fs_fault(exc, str(target), root_real)
        if fault is not None:
            return LuaCallError(fault.lua_message())
        if exc.errno == errno.ELOOP:
            return LuaCallError(f"{target} leads through a symlink that changed or loops; refused")
        return LuaCallError(f"cannot write {target}: {_reason(exc)}")


# --- file I/O beneath a root ----------------------------------------------------------------


def _below(path: FsPath) -> str:
    """``path``'s entries as a glob, for the capability ``fs.list`` needs."""
    return f"{path.root}:{'/'.join((*path.parts, '*'))}"


def _open_dir(root_real: str, parts: Sequence[str], *, create: bool = False) -> int:
    """A descriptor of the directory ``parts`` below ``root_real``, opened one component
    at a time without following symlinks (creating missing ones when ``create``)."""
    fd = os.open(root_real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError:
                # O_NOFOLLOW | O_DIRECTORY on a symlink: say symlink, not "no such directory"
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
                raise
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_beneath(root_real: str, parts: Sequence[str], data: bytes, target: str) -> None:
    """Replace the file ``parts`` below ``root_real`` with ``data``, atomically
    (``target`` names it in messages)."""
    dir_fd = _open_dir(root_real, parts[:-1], create=True)
    name = parts[-1]
    try:
        try:
            old = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise LuaCallError(f"{target} is a directory, not a file")
        if old is not None and not stat.S_ISREG(old.st_mode):
            raise LuaCallError(f"{target} is not a regular file")
        temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                if old is not None:
                    os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
                f.write(data)
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
    finally:
        os.close(dir_fd)


def _lookup_failure(exc: OSError, target: FsPath, *, directory: bool = False) -> LuaCallError:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        kind = "directory" if directory else "file"
        if directory and isinstance(exc, NotADirectoryError):
            return LuaCallError(f"{target} is not a directory")
        return LuaCallError(f"no {kind} {target}")
    if exc.errno == errno.ELOOP:
        return LuaCallError(f"{target} leads through a symlink that changed or loops; refused")
    if isinstance(exc, PermissionError):
        return LuaCallError(f"cannot open {target}: the daemon may not read it")
    return LuaCallError(f"cannot open {target}: {_reason(exc)}")


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symlink"
    return exc.strerror or type(exc).__name__


__all__ = [
    "MAX_LIST_ENTRIES",
    "MAX_READ_BYTES",
    "MAX_WRITE_BYTES",
    "FsGlob",
    "FsNamespace",
    "FsPath",
    "check_glob",
]
