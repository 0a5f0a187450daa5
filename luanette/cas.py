"""Content-addressed store on a shared filesystem, byte-compatible with hootenanny's.

Luanette, hootenanny and chaosgarden read and write the same directory tree, so the
layout below is a contract, checked against the Rust original (tobert/hootenanny,
``crates/cas/src/{hash,store,metadata,config,staging}.rs``):

- Hash (``hash.rs``, ``ContentHash::from_data``): BLAKE3 of the content, first 16
  bytes, lowercase hex: 32 characters.  ``b"Concurrent Data"`` hashes to
  ``5c735d76fe3537a0f35cf4a4eb14a532`` there and here.
- Layout (``store.rs``, ``object_path`` / ``metadata_path``; ``config.rs``,
  ``objects_dir`` / ``metadata_dir``)::

      <root>/objects/<hash[:2]>/<hash[2:]>
      <root>/metadata/<hash[:2]>/<hash[2:]>.json

- Sidecar (``metadata.rs``, ``CasMetadata``): ``serde_json::to_string`` of
  ``{mime_type: String, size: u64}``, i.e. compact JSON with keys in that order, no
  trailing newline: ``{"mime_type":"text/plain","size":13}``.  A sidecar that exists is
  never rewritten; a missing one is written on the next store of that content.
- ``inspect`` (``CasReference``): ``{hash, mime_type, size_bytes, local_path}``; mime and
  size from the sidecar, else ``application/octet-stream`` and the file's size.
- Root (``config.rs``): ``HOOTENANNY_CAS_PATH``, else ``~/.hootenanny/cas`` (home dir
  via the ``directories`` crate, not an XDG data dir).  We use the same default so a
  daemon started without flags shares the store hootenanny uses.
  ``HOOTENANNY_CAS_READONLY`` = ``true`` (any case) or ``1`` turns on read-only mode.
- Upstream writes objects and sidecars in place (``fs::write``) and has no temp files;
  its ``staging/<2>/<30>`` directory holds in-progress recordings that chaosgarden
  may still be writing, so we never put or clean anything there.

Where we differ, on purpose: writes are atomic (a temp file under ``<root>/tmp/``,
fsynced, renamed into place, then the directory fsynced), so a crash never leaves a
torn object or sidecar; uppercase hashes are rejected rather than lower-cased, so one
object has exactly one spelling; an empty ``HOOTENANNY_CAS_PATH`` counts as unset; a
sidecar that cannot be parsed is treated as missing rather than an error.

Temp files are named ``luanette-<pid>-<16 hex>.tmp`` and live in ``<root>/tmp/``, the
same filesystem as the objects (rename is atomic there, also on NFS).  A writer keeps
touching its temp file while it copies, so ``clean_temp`` with a generous age only
removes files left by crashed writers.

Every method is plain blocking code with no shared mutable state; call it from any
thread (the daemon uses ``anyio.to_thread``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final

import blake3
import msgspec

from luanette import faults

ENV_PATH: Final = "HOOTENANNY_CAS_PATH"
ENV_READONLY: Final = "HOOTENANNY_CAS_READONLY"
DEFAULT_MIME: Final = "application/octet-stream"
HASH_PREFIX: Final = "cas:"
HASH_BYTES: Final = 16

_CHUNK: Final = 1 << 20
# A sidecar is a few dozen bytes; the cap stops a hostile file from being slurped.
_MAX_SIDECAR: Final = 64 * 1024
_HEX: Final = frozenset("0123456789abcdef")
_TEMP_NAME: Final = re.compile(r"luanette-[0-9]+-[0-9a-f]{16}\.tmp")
# Filesystems that cannot fsync a directory say so with one of these; that is not a
# failure of the write itself.
_DIR_FSYNC_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES})


# --- errors ---------------------------------------------------------------------------


class CasError(Exception):
    """Base class of every CAS failure."""


class InvalidHash(CasError, ValueError):
    """A hash string that is not 32 lowercase hex characters (after an optional ``cas:``)."""


class NotFound(CasError, LookupError):
    """No object with that hash is stored."""


class ReadOnly(CasError, faults.CasReadOnly):
    """A write was attempted on a store opened read-only (``HOOTENANNY_CAS_READONLY``).

    A write that the filesystem refuses (mounted read-only, no permission) raises the
    same code, :class:`luanette.faults.CasReadOnly`, and a full disk
    :class:`luanette.faults.StorageFull` (see :func:`luanette.faults.cas_fault`)."""


class TooLarge(CasError):
    """An object is bigger than the caller's ``max_bytes``."""

    def __init__(self, hash: str, size: int, limit: int) -> None:
        super().__init__(f"object {hash} is {size} bytes, over the limit of {limit}")
        self.hash = hash
        self.size = size
        self.limit = limit


class UnsafePath(CasError):
    """A path inside the store resolves outside the CAS root (a symlink points out)."""


# --- types ----------------------------------------------------------------------------


class CasMetadata(msgspec.Struct, frozen=True):
    """The JSON sidecar, field for field and in order as upstream's ``CasMetadata``."""

    mime_type: str
    size: int


class Inspection(msgspec.Struct, frozen=True):
    """What ``inspect`` reports; the shape of upstream's ``CasReference``."""

    hash: str
    mime_type: str
    size_bytes: int
    local_path: str


_SIDECAR_DECODER: Final = msgspec.json.Decoder(CasMetadata)


# --- hashes ---------------------------------------------------------------------------


def parse_hash(text: object) -> str:
    """Validate a hash string and return it as 32 lowercase hex characters.

    Accepts an optional ``cas:`` prefix (seed documents write ``cas:<hash>``).  Raises
    :class:`InvalidHash` naming the problem otherwise; only ASCII ``0-9a-f`` pass, so a
    validated hash can never carry a path separator, ``..``, NUL or a look-alike digit.
    """
    if not isinstance(text, str):
        raise InvalidHash(f"hash must be a string, got {type(text).__name__}")
    value = text.removeprefix(HASH_PREFIX)
    if len(value) != 2 * HASH_BYTES:
        raise InvalidHash(
            f"hash must be {2 * HASH_BYTES} hex characters, got {len(value)}: {text!r}"
        )
    for index, char in enumerate(value):
        if char in _HEX:
            continue
        if char in "ABCDEF":
            raise InvalidHash(f"hash must be lowercase hex, found {char!r} at {index}: {text!r}")
        raise InvalidHash(f"hash has a non-hex character {char!r} at {index}: {text!r}")
    return value


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """The CAS hash of ``data``: BLAKE3, first 16 bytes, lowercase hex."""
    return blake3.blake3(data).digest(length=HASH_BYTES).hex()


def encode_metadata(mime_type: str, size: int) -> bytes:
    """Sidecar bytes exactly as upstream's ``serde_json::to_string`` writes them."""
    return msgspec.json.encode(CasMetadata(mime_type=mime_type, size=size))


# --- root resolution ------------------------------------------------------------------


def default_root() -> Path:
    """Upstream's default root, ``~/.hootenanny/cas``."""
    return Path.home() / ".hootenanny" / "cas"


def resolve_root(cas_root: str | os.PathLike[str] | None) -> Path:
    """The CAS root: ``--cas-root`` if given, else ``$HOOTENANNY_CAS_PATH``, else the default."""
    if cas_root is not None and os.fspath(cas_root) != "":
        return Path(cas_root).expanduser()
    env = os.environ.get(ENV_PATH, "")
    if env:
        return Path(env).expanduser()
    return default_root()


def env_read_only() -> bool:
    """Upstream's rule for ``HOOTENANNY_CAS_READONLY``: ``true`` in any case, or ``1``."""
    value = os.environ.get(ENV_READONLY, "")
    return value.lower() == "true" or value == "1"


def env_read_only_why() -> str | None:
    """``"HOOTENANNY_CAS_READONLY=<value>"`` when that variable makes the CAS read-only
    (the reason a refused write names), else None."""
    return f"{ENV_READONLY}={os.environ.get(ENV_READONLY, '')}" if env_read_only() else None


# --- the store ------------------------------------------------------------------------


class Cas:
    """A content-addressed store rooted at one directory.

    Holds only its root and mode, so one instance may be used from many threads and many
    processes may share the directory: objects are write-once and every write is a
    rename of a complete, fsynced temp file.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, read_only: bool = False, read_only_why: str = "it was opened read-only"
    ) -> None:
        # Absolute but not symlink-resolved: ``local_path`` reads as configured, and the
        # containment check resolves the root afresh on every call.
        self.root = Path(root).expanduser().absolute()
        self.read_only = read_only
        self.read_only_why = read_only_why  # for the message of a refused write
        if not read_only:
            # Upstream creates these eagerly too; doing it here surfaces a bad root or a
            # permission problem at start-up instead of at the first store.
            for sub in ("objects", "metadata", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(
        cls, cas_root: str | None, *, read_only: bool | None = None, read_only_why: str | None = None
    ) -> Cas:
        """Open the store named by ``--cas-root``, else ``$HOOTENANNY_CAS_PATH``, else the default.

        ``read_only=None`` follows ``$HOOTENANNY_CAS_READONLY`` as upstream does;
        ``read_only_why`` is the reason a refused write names.
        """
        if read_only is None:
            read_only_why = env_read_only_why()
            read_only = read_only_why is not None
        if read_only:
            return cls(resolve_root(cas_root), read_only=True, read_only_why=read_only_why or "it was opened read-only")
        return cls(resolve_root(cas_root))

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"Cas({str(self.root)!r}, {mode})"

    # --- paths ---

    def object_path(self, hash: str) -> Path:
        """Where the object for ``hash`` lives (or would live); does not touch the disk."""
        h = parse_hash(hash)
        return self.root / "objects" / h[:2] / h[2:]

    def metadata_path(self, hash: str) -> Path:
        """Where the JSON sidecar for ``hash`` lives (or would live)."""
        h = parse_hash(hash)
        return self.root / "metadata" / h[:2] / f"{h[2:]}.json"

    def path(self, hash: str) -> Path:
        """The object's path for tools that read files directly; :class:`NotFound` if absent."""
        h = parse_hash(hash)
        if not self.exists(h):
            raise NotFound(f"no object {h} in {self.root}")
        return self.object_path(h)

    def relative_path(self, hash: str) -> str:
        """The object's path relative to the root, ``objects/<2>/<30>`` (what a script
        sees: a tool sharing the CAS joins it to its own root); :class:`NotFound` if absent."""
        return self.path(hash).relative_to(self.root).as_posix()

    def _contained(self, path: Path) -> Path:
        """``path`` with symlinks resolved, refusing anything that lands outside the root."""
        real_root = Path(os.path.realpath(self.root))
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(real_root):
            raise UnsafePath(f"{path} resolves to {real}, outside the CAS root {real_root}")
        return real

    # --- reads ---

    def exists(self, hash: str) -> bool:
        """True if an object with ``hash`` is stored (a regular file inside the root)."""
        real = self._contained(self.object_path(hash))
        try:
            return stat.S_ISREG(os.stat(real).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def retrieve(self, hash: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes.

        With ``max_bytes``, an object larger than that raises :class:`TooLarge` after a
        stat, before anything is read.
        """
        h = parse_hash(hash)
        with self._open_regular(self.object_path(h), h) as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise TooLarge(h, size, max_bytes)
            # Read one byte past the cap so a file that grew after the stat still fails.
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(h, len(data), max_bytes)
        return data

    def inspect(self, hash: str) -> Inspection:
        """Hash, MIME type, size and local path of a stored object; :class:`NotFound` if absent."""
        h = parse_hash(hash)
        obj = self.object_path(h)
        with self._open_regular(obj, h) as f:
            file_size = os.fstat(f.fileno()).st_size
        meta = self._read_metadata(h) or CasMetadata(mime_type=DEFAULT_MIME, size=file_size)
        return Inspection(
            hash=h, mime_type=meta.mime_type, size_bytes=meta.size, local_path=str(obj)
        )

    def _open_regular(self, path: Path, h: str) -> BinaryIO:
        """Open a file of the store for reading, refusing symlinks out and non-files."""
        real = self._contained(path)
        # O_NOFOLLOW: ``real`` has no symlinks, so one appearing now is a swap after the
        # check.  O_NONBLOCK: a FIFO planted at an object path must not hang the reader.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(real, flags)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no object {h} in {self.root}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{path} became a symlink while being opened") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CasError(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")

    def _read_metadata(self, h: str) -> CasMetadata | None:
        """The sidecar for ``h``, or None when it is missing or unreadable."""
        try:
            with self._open_regular(self.metadata_path(h), h) as f:
                raw = f.read(_MAX_SIDECAR + 1)
        except NotFound:
            return None
        if len(raw) > _MAX_SIDECAR:
            return None
        try:
            return _SIDECAR_DECODER.decode(raw)
        except msgspec.DecodeError:
            # A torn sidecar (upstream writes in place) must not make the object
            # uninspectable; the object itself is the truth.
            return None

    # --- writes ---

    def store(self, data: bytes | bytearray | memoryview, mime_type: str | None = None) -> str:
        """Store ``data`` and return its hash.

        Idempotent: if the object is already stored it is left untouched (only a missing
        sidecar is written).  ``mime_type`` defaults to ``application/octet-stream``.
        """
        self._check_writable()
        h = hash_bytes(data)
        obj = self.object_path(h)
        with self._writing():
            if not self.exists(h):
                tmp = self._new_temp()
                try:
                    tmp.write(data)
                    tmp.commit()
                    self._publish(tmp.path, obj)
                finally:
                    tmp.discard()
            self._ensure_metadata(h, mime_type, len(data))
        return h

    def store_file(self, path: str | os.PathLike[str], mime_type: str | None = None) -> str:
        """Store the contents of the file at ``path``, streaming; return the hash.

        The file is hashed while it is copied, so memory stays flat for any size.  A crash
        mid-copy leaves only a temp file under ``<root>/tmp/`` (see :meth:`clean_temp`).
        """
        self._check_writable()
        hasher = blake3.blake3()
        size = 0
        # (an error opening the source is the caller's, not a fault of the store)
        with open(path, "rb", buffering=0) as src, self._writing():
            tmp = self._new_temp()
            try:
                while chunk := src.read(_CHUNK):
                    hasher.update(chunk)
                    tmp.write(chunk)
                    size += len(chunk)
                tmp.commit()
                h = hasher.digest(length=HASH_BYTES).hex()
                if not self.exists(h):
                    self._publish(tmp.path, self.object_path(h))
            finally:
                tmp.discard()
            self._ensure_metadata(h, mime_type, size)
        return h

    def clean_temp(self, older_than_s: float) -> int:
        """Remove temp files not modified for ``older_than_s`` seconds; return how many.

        Active writers keep modifying their temp file, so pick an age well above the
        longest pause a live copy can have (an hour is safe); 0 removes every temp file,
        which is only right when no other writer is running.
        """
        self._check_writable()
        if older_than_s < 0:
            raise ValueError("older_than_s must be >= 0")
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in self._temp_entries():
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue  # another cleaner or the writer itself got there first
        return removed

    def _temp_entries(self) -> Iterator[os.DirEntry[str]]:
        tmp_dir = self._contained(self.root / "tmp")
        try:
            with os.scandir(tmp_dir) as it:
                yield from (e for e in it if _TEMP_NAME.fullmatch(e.name))
        except FileNotFoundError:
            return

    def _check_writable(self) -> None:
        if self.read_only:
            fault = faults.cas_read_only(self.root, self.read_only_why)
            raise ReadOnly(fault.message, fault.script_message)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Name the faults of a write (full disk, read-only filesystem): the one place
        the CAS maps an ``OSError`` to a :class:`luanette.faults.StorageFault`."""
        try:
            yield
        except OSError as exc:
            fault = faults.cas_fault(exc, self.root)
            if fault is None:
                raise
            raise fault from exc

    def _new_temp(self) -> _TempFile:
        tmp_dir = self._contained(self.root / "tmp")
        tmp_dir.mkdir(parents=True, exist_ok=True)
        return _TempFile.create(tmp_dir)

    def _publish(self, tmp: Path, dest: Path) -> None:
        """Atomically move a complete, fsynced temp file to ``dest`` and make it durable."""
        parent = self._ensure_dir(dest.parent)
        real_dest = self._contained(dest)
        try:
            # Replacing an identical object written concurrently by another writer is
            # harmless: readers holding the old inode keep identical bytes.
            os.rename(tmp, real_dest)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise CasError(f"{tmp.parent} and {parent} are on different filesystems") from exc
            raise
        _fsync_dir(parent)

    def _ensure_dir(self, directory: Path) -> Path:
        """Create a shard directory if needed (durably), refusing one that points outside."""
        real = self._contained(directory)
        if not real.is_dir():
            real.mkdir(parents=True, exist_ok=True)
            _fsync_dir(real.parent)  # make the new directory entry itself durable
        return self._contained(directory)

    def _ensure_metadata(self, h: str, mime_type: str | None, size: int) -> None:
        """Write the sidecar unless one exists; an existing sidecar is never rewritten."""
        meta = self.metadata_path(h)
        if os.path.isfile(self._contained(meta)):
            return
        tmp = self._new_temp()
        try:
            tmp.write(encode_metadata(mime_type or DEFAULT_MIME, size))
            tmp.commit()
            self._publish(tmp.path, meta)
        finally:
            tmp.discard()


class _TempFile:
    """A uniquely named, unbuffered temp file; ``commit`` makes its data durable."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def create(cls, directory: Path) -> _TempFile:
        while True:
            path = directory / f"luanette-{os.getpid()}-{secrets.token_hex(8)}.tmp"
            try:
                # 0o666 under the umask, as upstream's fs::write: other users' readers
                # (chaosgarden) must be able to open the object.  O_EXCL: never reuse.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue
            return cls(path, fd)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self._fd, view) :]

    def commit(self) -> None:
        """fsync and close, so the rename that publishes the file cannot outrun its data.

        Without this a crash just after the rename could leave a valid hash naming a
        file whose blocks never reached the disk: a torn object.
        """
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the temp file if still there (it is gone once published)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or mkdir in it survives a crash."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


__all__ = [
    "DEFAULT_MIME",
    "ENV_PATH",
    "ENV_READONLY",
    "Cas",
    "CasError",
    "CasMetadata",
    "Inspection",
    "InvalidHash",
    "NotFound",
    "ReadOnly",
    "TooLarge",
    "UnsafePath",
    "default_root",
    "encode_metadata",
    "env_read_only",
    "env_read_only_why",
    "hash_bytes",
    "parse_hash",
    "resolve_root",
]
