"""Where ``require`` finds modules: the front resolves every module name.

A worker asks the front (service call ``module``) for a name and the directory of the
module that requires it; the front answers with the module's source and how to name it.
The front is the one place that resolves names, because it owns the script index and,
for workers on other machines, the only view of the modules directory.

Names:

- ``a/b`` is ``DIR/a/b.lua``; ``a`` is ``DIR/a.lua``, else ``DIR/a/init.lua`` (``DIR``:
  ``--modules``).
- ``./x`` and ``../x`` are relative to the directory of the requiring module; from the
  top-level script (or a stored script loaded as a module) they are relative to the
  root of ``DIR``.  Nothing resolves outside ``DIR``: ``..`` past the root, absolute
  paths and symbolic links leading out are refused.
- ``script:NAME`` is the newest stored script whose ``describe().name`` is NAME;
  ``script:<hash>`` a stored script by its CAS hash (32 hex digits).

Scripts never see host paths: a module of ``DIR`` is named ``modules:a/b.lua`` in
messages and ``a/b.lua`` as its chunk name (stack frames, error positions).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio

from luanette.cas import CasError, TooLarge, parse_hash

if TYPE_CHECKING:
    from luanette.scripts import Scripts

# Longest module name accepted (the worker refuses longer ones before asking).
MAX_NAME_BYTES: Final = 256
MAX_SEGMENTS: Final = 32
SCRIPT_PREFIX: Final = "script:"
_SEGMENT: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
_PATH: Final = re.compile(r"(?:\./|(?:\.\./)+)?[A-Za-z0-9_][A-Za-z0-9_-]{0,63}(?:/[A-Za-z0-9_][A-Za-z0-9_-]{0,63})*")
# A stored script's name, as a chunk name: anything else is named by its hash.
_PLAIN_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_HEX32: Final = re.compile(r"[0-9a-f]{32}")
_BAD: Final = "bad argument #1 to 'require'"
_SHAPE: Final = (
    "a module name is path segments of letters, digits, '_' and '-' separated by '/', "
    "optionally starting with './' or '../', or script:NAME"
)


class ModuleError(Exception):
    """A name ``require`` cannot load; the message is what the script sees."""


def show(name: str) -> str:
    """A module name quoted for a message (control characters escaped, cut at 80)."""
    shown = json.dumps(name[:80], ensure_ascii=False)
    return shown if len(name) <= 80 else shown[:-1] + '..."'


def _bad(name: str, why: str) -> ModuleError:
    return ModuleError(f"{_BAD} (invalid module name {show(name)}: {why})")


def check_name(name: Any) -> str:
    """``name`` if it has the shape of a module name; ModuleError (a bad argument) if not."""
    if not isinstance(name, str):
        raise ModuleError(f"{_BAD} (string expected, got {type(name).__name__})")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ModuleError(f"{_BAD} (module name too long: {len(name.encode())} bytes, at most {MAX_NAME_BYTES})")
    if not name:
        raise _bad(name, "it is empty")
    if "\0" in name:
        raise _bad(name, "it contains a NUL byte")
    if name.startswith(SCRIPT_PREFIX):
        rest = name[len(SCRIPT_PREFIX) :]
        if not rest or not rest.isprintable():
            raise _bad(name, "script:NAME needs a name of printable characters")
        return name
    if name.startswith("/"):
        raise _bad(name, "absolute paths are refused; " + _SHAPE)
    if name.endswith(".lua"):
        raise _bad(name, "leave out the .lua suffix; " + _SHAPE)
    if not _PATH.fullmatch(name) or name.count("/") >= MAX_SEGMENTS:
        raise _bad(name, _SHAPE)
    return name


def _check_base(base: Any) -> list[str]:
    # The requiring module's directory comes from a worker: checked like a name.
    if not isinstance(base, str) or len(base) > MAX_NAME_BYTES:
        raise ModuleError("require: invalid requiring module")
    parts = base.split("/") if base else []
    if any(not _SEGMENT.fullmatch(part) for part in parts):
        raise ModuleError("require: invalid requiring module")
    return parts


def _relative_parts(name: str, base: list[str]) -> list[str] | None:
    """The path segments of ``name`` under the root; None when it leaves the root."""
    if name.startswith("./"):
        return [*base, *name[2:].split("/")]
    if name.startswith("../"):
        parts = list(base)
        rest = name
        while rest.startswith("../"):
            if not parts:
                return None
            parts.pop()
            rest = rest[3:]
        return [*parts, *rest.split("/")]
    return name.split("/")


class Modules:
    """Resolves and reads modules for the front (see the module docstring)."""

    def __init__(self, root: Path | str | None, scripts: Scripts | None, *, max_bytes: int) -> None:
        self.root = Path(root) if root is not None else None
        self.scripts = scripts
        self.max_bytes = max_bytes
        self._files = anyio.CapacityLimiter(4)

    async def resolve(self, name: Any, base: Any) -> dict[str, Any]:
        """The module ``name`` required from the module directory ``base`` ("" for the
        root): ``{key, name, chunk, dir, source}``.  ``key`` identifies the module
        within a run (its cache key), ``name`` is how a cycle names it, ``chunk`` its
        chunk name, ``dir`` the directory its own relative requires start from.
        Raises ModuleError with the message the script sees."""
        name = check_name(name)
        if name.startswith(SCRIPT_PREFIX):
            return await self._script(name)
        parts = _relative_parts(name, _check_base(base))
        if parts is None:
            raise ModuleError(f"module refused: {show(name)} leads out of the modules directory")
        rel = "/".join(parts)
        candidates = [f"{rel}.lua", f"{rel}/init.lua"]
        if self.root is None:
            raise ModuleError(
                f"module not found: {show(name)} (no modules directory is configured; "
                "only stored scripts can be required, as script:NAME)"
            )
        root = self.root
        found = await anyio.to_thread.run_sync(
            lambda: _read_first(root, candidates, self.max_bytes, name), limiter=self._files
        )
        if found is None:
            tried = ", ".join(f"modules:{c}" for c in candidates)
            raise ModuleError(f"module not found: {show(name)} (tried {tried})")
        path, source = found
        directory = path.rsplit("/", 1)[0] if "/" in path else ""
        canonical = path.removesuffix("/init.lua").removesuffix(".lua")
        return {"key": f"modules:{path}", "name": canonical, "chunk": path, "dir": directory, "source": source}

    async def _script(self, name: str) -> dict[str, Any]:
        wanted = name[len(SCRIPT_PREFIX) :]
        if self.scripts is None:
            raise ModuleError(f"module not found: {show(name)} (stored scripts are not available here)")
        if _HEX32.fullmatch(wanted):
            script_hash = parse_hash(wanted)
            if self.scripts.record(script_hash) is None:
                raise ModuleError(f"module not found: {show(name)} (no stored script has that hash)")
            shown = f"script:{script_hash}"
        else:
            record = self.scripts.store.find_script_by_name(wanted)
            if record is None:
                raise ModuleError(f"module not found: {show(name)} (no stored script has that name)")
            script_hash = record.hash
            shown = name if _PLAIN_NAME.fullmatch(wanted) else f"script:{script_hash}"
        try:
            source = await self.scripts.source(script_hash)
        except TooLarge as exc:
            raise ModuleError(
                f"require: module_too_large: {show(name)} is {exc.size} bytes; a module may be at most {exc.limit}"
            ) from None
        except CasError:
            raise ModuleError(f"module not found: {show(name)} (its source is not in the CAS)") from None
        return {"key": f"script:{script_hash}", "name": shown, "chunk": shown, "dir": "", "source": source.encode()}


def _read_first(root: Path, candidates: list[str], max_bytes: int, name: str) -> tuple[str, bytes] | None:
    """(relative path, bytes) of the first candidate that is a file inside ``root``."""
    try:
        real_root = os.path.realpath(root, strict=True)
    except OSError:
        return None  # a modules directory that went away has no modules
    for rel in candidates:
        path = os.path.join(real_root, rel)
        if not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ModuleError(f"module refused: {show(name)} (modules:{rel} leads out of the modules directory)")
        try:
            # O_NOFOLLOW: the checked path's last step cannot have become a link since
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                continue
            if info.st_size > max_bytes:
                raise ModuleError(
                    f"require: module_too_large: {show(name)} (modules:{rel}) is {info.st_size} bytes; "
                    f"a module may be at most {max_bytes}"
                )
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # it grew since fstat
            raise ModuleError(f"require: module_too_large: {show(name)} (modules:{rel}) is over {max_bytes} bytes")
        return rel, data
    return None
