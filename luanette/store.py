"""Persistent job records, results and the script index, in one SQLite file.

The file is ``<state_dir>/luanette.sqlite3``. It holds two tables: ``jobs`` (every job,
its params, result or structured error, and timestamps) and ``scripts`` (the index that
backs ``ScriptSearch``: name and description from ``describe()``, tags, creator). Script
sources themselves live in the CAS; this file only indexes them by hash.

Durability: WAL journal with ``synchronous=NORMAL``. A committed transaction survives the
process being killed at any moment (SIGKILL, OOM killer); only an OS crash or power
loss may lose the last few commits, which is the trade the design accepts for fast job
updates. Every change is one transaction (or part of one group: see
:meth:`Store.write_batch`), so a reader never sees half a job.

Threads: one connection, opened with ``check_same_thread=False`` and guarded by a lock,
so the event-loop thread and worker threads may all call in. Each call is short (a
single indexed statement or a small transaction), so callers on the event loop may call
directly; the only O(n) call is ``search`` with a vibe.

Times are float Unix seconds in the database; ``JobInfo`` shows them as whole seconds,
as the wire protocol specifies.

PostgreSQL: ``Store("postgresql://...")`` (``luanette serve --state URL``) keeps the same
tables in a PostgreSQL database instead, so fronts on several machines can share them
(one at a time: :mod:`luanette.lease`). The SQL here is written once, for SQLite;
:mod:`luanette.postgres` translates it. psycopg is only imported for such a store.
"""

from __future__ import annotations

import builtins  # Store.list shadows list in the class body's annotations
import contextlib
import math
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import msgspec

from hooteproto.types import JobInfo, JobStatus, JobStoreStats
from luanette import faults

DB_FILENAME = "luanette.sqlite3"

HASH_PATTERN = "^[0-9a-f]{32}$"
"""A CAS hash: BLAKE3, first 16 bytes, 32 lowercase hex characters (see DESIGN.md)."""

LUA_TAG = "type:lua"
"""Tag every indexed script carries, so a tag search can tell scripts from other CAS items."""

ACTIVE = (JobStatus.PENDING, JobStatus.RUNNING)
FINISHED = (JobStatus.COMPLETE, JobStatus.FAILED, JobStatus.CANCELLED)

BUSY_TIMEOUT_S = 5.0
"""How long a write waits for another process holding the file (two daemons sharing a
state dir by mistake, or an admin's sqlite3 shell) before it fails."""


# --- types ---------------------------------------------------------------------------

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], T]
"""One write to run inside a transaction (see :meth:`Store.write_batch`)."""

Hash = Annotated[str, msgspec.Meta(pattern=HASH_PATTERN)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Tag = Annotated[str, msgspec.Meta(min_length=1)]


class ScriptRecord(msgspec.Struct, kw_only=True):
    """One entry of the script index. ``name``, ``description`` and ``params_schema``
    come from the script's ``describe()`` and are None when it has none."""

    hash: Hash
    name: str | None = None
    description: str | None = None
    tags: list[Tag] = []
    creator: str | None = None
    params_schema: Any = None
    created_at: Seconds
    capabilities: list[str] | None = None
    """``describe().capabilities``; None when the script declares none (schema v2)."""
    emits: list[str] | None = None
    """``describe().emits``: the timeline event types the script may make chaosgarden
    send (luanette.triggers checks rules for cycles with it); None when it declares
    none (schema v3)."""
    shutdown_timeout: float | None = None
    """``describe().shutdown_timeout``: seconds the script's on_shutdown may run; None:
    the default (schema v4)."""
    execution_mode: str | None = None
    """``describe().execution_mode``: ``"session"`` or ``"autoCommit"``; None: session
    (schema v5)."""
    review: bool | None = None
    """``describe().review``: keep the overlay as a pending session at the end of main
    instead of committing it; None: false (schema v5)."""
    on_error: str | None = None
    """``describe().on_error``: ``"skip"`` or ``"abort"``; None: abort (schema v5)."""
    additional_params: bool | None = None
    """``describe().additional_params``: false refuses params the script does not
    declare; None: they are accepted with a warning (schema v6)."""
    declared_tags: list[str] | None = None
    """``describe().tags``: tags every job of the script carries (JobInfo.tags); None:
    none declared (schema v6)."""
    retry: str | None = None
    """``describe().retry``: ``"on_worker_loss"`` re-queues a job once when the worker
    running it is lost (for idempotent scripts); None: never (schema v8)."""
    group: str | None = None
    """``describe().group``: the worker group the script's runs must go to (say
    ``"gpu-host"``); None: any worker that has its capabilities (schema v8)."""


class JobRecord(msgspec.Struct, kw_only=True):
    """A job row as stored: everything ``JobInfo`` shows plus params, tags and exact
    float times. The dispatcher uses it where ``JobInfo`` is too coarse."""

    job_id: str
    script_hash: str
    params: Any
    tags: list[str]
    status: JobStatus
    result: Any = None
    error: Any = None
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    progress: Any = None
    """The job's last progress, kept with its final state (schema v6)."""

    def to_info(self) -> JobInfo:
        """The wire view: ``source`` is the script hash and times are whole seconds;
        ``tags`` only when there are some (an extension field, absent otherwise)."""
        return JobInfo(
            job_id=self.job_id,
            status=self.status,
            source=self.script_hash,
            result=self.result,
            error=self.error,
            created_at=math.floor(self.created_at),
            started_at=_whole(self.started_at),
            completed_at=_whole(self.completed_at),
            progress=self.progress,
            tags=self.tags if self.tags else msgspec.UNSET,
        )


class DatabaseFull(faults.StorageFull, sqlite3.OperationalError):
    """The job database cannot grow: its disk is full (``SQLITE_FULL``).  Error code
    ``storage_full``; still a ``sqlite3.OperationalError``."""


class DatabaseUnavailable(faults.Unavailable, sqlite3.OperationalError):
    """The job database cannot be used now: locked past the busy timeout, an I/O
    error, read-only.  Error code ``unavailable``; still a ``sqlite3.OperationalError``."""


class DatabaseClosed(faults.Unavailable, RuntimeError):
    """A call to a closed store (the daemon is stopping).  Error code ``unavailable``."""


class UnknownJob(LookupError):
    """Raised when a state change names a job id the store has never seen. Kept apart
    from a ``False`` return (job exists but is past that state) so that cancelling an
    unknown id can never be reported as success."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


# --- schema and migrations -----------------------------------------------------------

_STATUS_SQL = ", ".join(f"'{s.value}'" for s in JobStatus)
_ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in ACTIVE)
_FINISHED_SQL = ", ".join(f"'{s.value}'" for s in FINISHED)

_SCHEMA_V1 = (
    f"""
    CREATE TABLE jobs (
        job_id       TEXT PRIMARY KEY NOT NULL,
        script_hash  TEXT NOT NULL,
        params       TEXT NOT NULL,  -- JSON
        tags         TEXT NOT NULL,  -- JSON list of strings
        status       TEXT NOT NULL CHECK (status IN ({_STATUS_SQL})),
        result       TEXT,           -- JSON; NULL until the job completes
        error        TEXT,           -- JSON error dict {{kind, message, ...}} or NULL
        created_at   REAL NOT NULL,
        started_at   REAL,
        completed_at REAL,
        -- a finished job always has a completion time, an active one never does;
        -- prune and ordering rely on it
        CHECK ((status IN ({_ACTIVE_SQL})) = (completed_at IS NULL))
    )
    """,
    # (status, created_at) serves both "WHERE status = ?" and JobList's newest-first order
    "CREATE INDEX jobs_status ON jobs (status, created_at)",
    "CREATE INDEX jobs_completed ON jobs (completed_at)",
    "CREATE INDEX jobs_created ON jobs (created_at)",
    """
    CREATE TABLE scripts (
        hash          TEXT PRIMARY KEY NOT NULL,
        name          TEXT,
        description   TEXT,
        tags          TEXT NOT NULL,  -- JSON list of strings, always with 'type:lua'
        creator       TEXT,
        params_schema TEXT,           -- JSON from describe(), NULL when absent
        created_at    REAL NOT NULL
    )
    """,
    "CREATE INDEX scripts_creator ON scripts (creator)",
)

_SCHEMA_V2 = ("ALTER TABLE scripts ADD COLUMN capabilities TEXT",)  # JSON list, NULL: none declared

_SCHEMA_V3 = ("ALTER TABLE scripts ADD COLUMN emits TEXT",)  # JSON list, NULL: none declared

_SCHEMA_V4 = ("ALTER TABLE scripts ADD COLUMN shutdown_timeout REAL",)  # NULL: the default

# describe()'s session fields (luanette.scripts.declared_session; NULL: the defaults)
# and the sessions kept for review (luanette.sessions), which must survive a restart
_SCHEMA_V5 = (
    "ALTER TABLE scripts ADD COLUMN execution_mode TEXT",
    "ALTER TABLE scripts ADD COLUMN review INTEGER",
    "ALTER TABLE scripts ADD COLUMN on_error TEXT",
    """
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        job_id TEXT,
        script_hash TEXT,
        user TEXT,
        operations TEXT NOT NULL,
        created_at REAL NOT NULL
    )
    """,
    "CREATE INDEX sessions_job ON sessions (job_id)",
)

# a job's last progress kept with its end; describe()'s additional_params and tags;
# describe() of scripts run by hash without script_store (luanette.scripts), a bounded
# cache: the content under a hash never changes, so neither does what describe() says
_SCHEMA_V6 = (
    "ALTER TABLE jobs ADD COLUMN progress TEXT",
    "ALTER TABLE scripts ADD COLUMN additional_params INTEGER",
    "ALTER TABLE scripts ADD COLUMN declared_tags TEXT",
    """
    CREATE TABLE script_describes (
        hash TEXT PRIMARY KEY NOT NULL,
        described TEXT NOT NULL,
        created_at REAL NOT NULL
    )
    """,
    "CREATE INDEX script_describes_created ON script_describes (created_at)",
)

# flows (luanette.flows): definitions with the source of the module that defined them,
# instances and their transitions, which must all survive a restart
_SCHEMA_V7 = (
    """
    CREATE TABLE flow_definitions (
        flow_id TEXT PRIMARY KEY NOT NULL,
        definition TEXT NOT NULL,
        source TEXT NOT NULL,
        chunk TEXT NOT NULL,
        origin TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        registered_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE flow_instances (
        instance_id TEXT PRIMARY KEY NOT NULL,
        flow_id TEXT NOT NULL,
        current_state TEXT NOT NULL,
        context TEXT NOT NULL,
        subject TEXT NOT NULL,
        transitions INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )
    """,
    "CREATE INDEX flow_instances_subject ON flow_instances (subject)",
    "CREATE INDEX flow_instances_flow ON flow_instances (flow_id, current_state)",
    """
    CREATE TABLE flow_history (
        instance_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        from_state TEXT NOT NULL,
        to_state TEXT NOT NULL,
        action TEXT NOT NULL,
        user TEXT,
        timestamp INTEGER NOT NULL,
        data TEXT,
        PRIMARY KEY (instance_id, seq)
    )
    """,
)

# describe()'s retry and group (luanette.engine.pool: worker groups; luanette.jobs:
# a job re-queued once when its worker is lost)
_SCHEMA_V8 = (
    "ALTER TABLE scripts ADD COLUMN retry TEXT",
    "ALTER TABLE scripts ADD COLUMN worker_group TEXT",
)

MIGRATIONS: tuple[Sequence[str], ...] = (
    _SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4, _SCHEMA_V5, _SCHEMA_V6, _SCHEMA_V7, _SCHEMA_V8,
)  # fmt: skip
"""``MIGRATIONS[n]`` takes a database from ``user_version`` n to n + 1. Append, never
edit: a file written by an older build replays only the steps it has not seen."""

SCHEMA_VERSION = len(MIGRATIONS)


def newer_schema(version: int, known: int) -> RuntimeError:
    """The error of a database written by a newer build, which this one would misread."""
    return RuntimeError(
        f"the state database has schema version {version}, newer than this luanette understands ({known}); "
        "upgrade luanette"
    )


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema of ``conn`` (autocommit mode) up to :data:`SCHEMA_VERSION`.

    Each step runs in its own ``BEGIN IMMEDIATE`` transaction together with the
    ``user_version`` bump, so a crash mid-migration leaves the previous version intact,
    and a second process opening the same file waits rather than migrating twice.
    Returns the version the file is at. Raises ``RuntimeError`` for a file written by a
    newer build, which this one would misread.
    """
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # read inside the write lock: another process may have migrated meanwhile
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise newer_schema(version, SCHEMA_VERSION)
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            # PRAGMA takes no parameters; version is an int we computed
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


# --- validation and JSON helpers -----------------------------------------------------

_ENCODER = msgspec.json.Encoder()
_WORD = re.compile(r"\w+")


def parse_status(value: JobStatus | str) -> JobStatus:
    """A ``JobStatus`` from an enum member or its wire string (``JobList.status``).

    Raises ``ValueError`` naming the accepted values for anything else."""
    if isinstance(value, JobStatus):
        return value
    try:
        return JobStatus(value)
    except ValueError:
        accepted = ", ".join(s.value for s in JobStatus)
        raise ValueError(f"unknown job status {value!r} (expected one of: {accepted})") from None


def _to_json(what: str, value: Any) -> str:
    """Encode a value for a JSON column. msgspec keeps ints as ints and floats as floats
    (``1.0`` stays ``1.0``); NaN and infinities become null, as on the wire."""
    try:
        return _ENCODER.encode(value).decode()
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise ValueError(f"{what} is not JSON-encodable: {exc}") from None


def _from_json(text: str | None) -> Any:
    return None if text is None else msgspec.json.decode(text)


def _check_time(what: str, value: Any) -> float:
    # bool is an int subclass; True as a timestamp is a bug, not 1970-01-01T00:00:01
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be Unix seconds (a number), got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite, non-negative Unix seconds, got {value!r}")
    return float(value)


def _check_count(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _check_text(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _check_hash(what: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(HASH_PATTERN, value):
        raise ValueError(f"{what} must be a CAS hash (32 lowercase hex characters), got {value!r}")
    return value


def _check_tags(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"tags must be a list of non-empty strings, got {value!r}")
    return _unique(value)


def _check_error(value: Any) -> dict[str, Any]:
    """An error must be a dict with string ``kind`` and ``message`` (a runtime
    ``ErrorDetail`` struct is accepted and stored as its dict)."""
    if isinstance(value, msgspec.Struct):
        value = msgspec.to_builtins(value)
    if not isinstance(value, dict):
        raise ValueError(f"error must be a dict with 'kind' and 'message', got {value!r}")
    for key in ("kind", "message"):
        if not isinstance(value.get(key), str):
            raise ValueError(f"error[{key!r}] must be a string, got {value.get(key)!r}")
    return value


def _unique(items: Sequence[str]) -> list[str]:
    """Items without repeats, first occurrence order kept."""
    return list(dict.fromkeys(items))


def _whole(seconds: float | None) -> int | None:
    return None if seconds is None else math.floor(seconds)


def _words(text: str) -> set[str]:
    """Case-insensitive words; ``mood:dark`` yields ``mood`` and ``dark``."""
    return set(_WORD.findall(text.casefold()))


_JOB_COLUMNS = (
    "job_id, script_hash, params, tags, status, result, error, created_at, started_at, completed_at, progress"
)
_SCRIPT_COLUMNS = (
    "hash, name, description, tags, creator, params_schema, created_at, capabilities, emits, shutdown_timeout, "
    "execution_mode, review, on_error, additional_params, declared_tags, retry, worker_group"
)


_SESSION_COLUMNS = "session_id, job_id, script_hash, user, operations, created_at"


def _session_from_row(row: tuple) -> dict[str, Any]:
    session_id, job_id, script_hash, user, operations, created = row
    ops = _from_json(operations)
    return {
        "session_id": session_id,
        "job_id": job_id,
        "script_hash": script_hash,
        "user": user,
        "operations": ops,
        "operation_count": len(ops),
        "created_at": created,
    }


def _job_from_row(row: tuple) -> JobRecord:
    job_id, script_hash, params, tags, status, result, error, created, started, completed, progress = row
    return JobRecord(
        job_id=job_id,
        script_hash=script_hash,
        params=_from_json(params),
        tags=_from_json(tags),
        status=JobStatus(status),
        result=_from_json(result),
        error=_from_json(error),
        created_at=created,
        started_at=started,
        completed_at=completed,
        progress=_from_json(progress),
    )


def _script_from_row(row: tuple) -> ScriptRecord:
    hash_, name, description, tags, creator, params_schema, created, capabilities, emits, shutdown_timeout = row[:10]
    execution_mode, review, on_error, additional_params, declared_tags, retry, group = row[10:]
    return ScriptRecord(
        hash=hash_,
        name=name,
        description=description,
        tags=_from_json(tags),
        creator=creator,
        params_schema=_from_json(params_schema),
        created_at=created,
        capabilities=_from_json(capabilities),
        emits=_from_json(emits),
        shutdown_timeout=shutdown_timeout,
        execution_mode=execution_mode,
        review=None if review is None else bool(review),
        on_error=on_error,
        additional_params=None if additional_params is None else bool(additional_params),
        declared_tags=_from_json(declared_tags),
        retry=retry,
        group=group,
    )


def _check_script(record: Any) -> ScriptRecord:
    """A validated copy of ``record`` with ``type:lua`` among its tags."""
    if not isinstance(record, ScriptRecord):
        raise ValueError(f"expected a ScriptRecord, got {type(record).__name__}")
    try:
        # convert re-runs the field constraints (hash pattern, tag strings), which
        # constructing a Struct in Python does not
        checked = msgspec.convert(msgspec.structs.asdict(record), ScriptRecord)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid script record: {exc}") from None
    checked.created_at = _check_time("created_at", checked.created_at)
    if checked.params_schema is not None:
        _to_json("params_schema", checked.params_schema)
    checked.tags = _unique([*checked.tags, LUA_TAG])
    return checked


def _merge_scripts(old: ScriptRecord, new: ScriptRecord) -> ScriptRecord:
    """The index entry after storing the same content again: the first creator and
    creation time stay, tags accumulate, fresh describe() output replaces old."""
    return ScriptRecord(
        hash=old.hash,
        name=new.name if new.name is not None else old.name,
        description=new.description if new.description is not None else old.description,
        tags=_unique([*old.tags, *new.tags]),
        creator=old.creator if old.creator is not None else new.creator,
        params_schema=new.params_schema if new.params_schema is not None else old.params_schema,
        created_at=old.created_at,
        # the same content has the same describe(): the new reading is the current one
        capabilities=new.capabilities,
        emits=new.emits,
        shutdown_timeout=new.shutdown_timeout,
        execution_mode=new.execution_mode,
        review=new.review,
        on_error=new.on_error,
        additional_params=new.additional_params,
        declared_tags=new.declared_tags,
        retry=new.retry,
        group=new.group,
    )


# --- the store -----------------------------------------------------------------------


class Store:
    """Job records and the script index in one SQLite file (or a PostgreSQL database);
    safe to share across threads."""

    def __init__(self, path: Path | str) -> None:
        """Open (creating if needed) the database file at ``path`` and migrate it; a
        ``postgresql://`` URL opens that PostgreSQL database instead."""
        self._lock = threading.RLock()
        self._pg: Any = None  # the luanette.postgres module, for a PostgreSQL store
        # errors of the database itself, and the one a duplicate key raises
        self._db_errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
        self._duplicate: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
        if isinstance(path, str) and path.startswith(("postgresql://", "postgres://")):
            self._open_postgres(path)
            return
        db_file = Path(path)
        self.path: Path | None = db_file
        """The SQLite file; None for a PostgreSQL store."""
        self.location = str(db_file)
        """Where the database is, for messages: the file, or the URL without password."""
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction spans
        # exactly what _write() wraps and DDL is transactional too
        conn = sqlite3.connect(
            db_file, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    def _open_postgres(self, url: str) -> None:
        from luanette import postgres  # imported here: only such a store needs psycopg

        self._pg = postgres
        self.path = None
        self.location = postgres.redact(url)
        self._db_errors = (sqlite3.Error, OSError, postgres.psycopg.Error)
        self._duplicate = (sqlite3.IntegrityError, postgres.psycopg.errors.UniqueViolation)
        with self._faults():
            conn = postgres.Connection(url)
            try:
                postgres.migrate(conn, MIGRATIONS)
            except BaseException:
                conn.close()
                raise
        # the wrapper speaks the part of sqlite3.Connection the store uses (its SQL is
        # translated), so the store's writes take either
        self._conn = cast(sqlite3.Connection, conn)

    @property
    def is_postgres(self) -> bool:
        """Whether the database is PostgreSQL (else a SQLite file)."""
        return self._pg is not None

    @classmethod
    def open(cls, state_dir: Path | str, url: str | None = None) -> Store:
        """Open ``<state_dir>/luanette.sqlite3``, creating the directory (mode 0700, as it
        holds job params and results) when it does not exist; with ``url`` (a
        ``postgresql://`` URL, ``--state``) open that database instead, and only create
        the directory (it still holds the job temp directories and plugins.json)."""
        state_dir = Path(state_dir)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(url if url is not None else state_dir / DB_FILENAME)

    def close(self) -> None:
        """Close the database; later calls raise. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DatabaseClosed(faults.closed_message(self.location))
        if self._pg is not None:
            # PostgreSQL restarted: the call after the one that failed connects again
            cast(Any, self._conn).reopen_if_lost()
        return self._conn

    def _fault(self, exc: BaseException) -> faults.StorageFault | None:
        """``exc`` named by the table of :mod:`luanette.faults`, or None."""
        return faults.database_fault(exc, self.location, full=DatabaseFull, unavailable=DatabaseUnavailable)

    @contextmanager
    def _faults(self) -> Iterator[None]:
        """Raise a failure of the database as its :class:`~luanette.faults.StorageFault`
        (full disk, locked, I/O error, closed); the one place the store maps them."""
        try:
            yield
        except self._db_errors as exc:
            fault = self._fault(exc)
            if fault is None or fault is exc:
                raise
            raise fault from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock. IMMEDIATE takes the write lock up front,
        so two processes never deadlock upgrading read locks; any exception rolls back."""
        with self._lock, self._faults():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back itself (full disk)
                    conn.execute("ROLLBACK")
                raise

    def _apply(self, op: WriteOp[T]) -> T:
        with self._write() as conn:
            return op(conn)

    def write_batch(self, ops: Sequence[WriteOp[Any]]) -> builtins.list[Any]:
        """Run ``ops`` in order in one transaction (a group commit: one COMMIT for many
        job updates). Returns each op's result, or the exception it raised, in order.

        An op that raises changes nothing: each one writes with a single statement,
        which SQLite undoes by itself when it fails (PostgreSQL, which would abort the
        whole transaction, runs each op in a savepoint), so the others still commit. When
        the transaction itself is lost (SQLite rolls it back on a full disk or an I/O
        error) or COMMIT fails, nothing is written and the exception is raised.  Failures
        of the database itself are named (:mod:`luanette.faults`): a full disk is
        :class:`DatabaseFull`, a lock or I/O error :class:`DatabaseUnavailable`."""
        with self._lock, self._faults():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            results: builtins.list[Any] = []
            failures: tuple[type[BaseException], ...] = (*self._db_errors, ValueError, LookupError)
            try:
                for op in ops:
                    try:
                        with self._alone(conn):
                            results.append(op(conn))
                    except failures as e:
                        if not conn.in_transaction:
                            raise
                        results.append(self._fault(e) or e)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return results

    def _alone(self, conn: sqlite3.Connection) -> contextlib.AbstractContextManager[None]:
        """Where one op of a batch runs: in SQLite a failed statement undoes itself;
        PostgreSQL aborts the whole transaction, so there each op gets a savepoint."""
        return cast(Any, conn).savepoint() if self._pg is not None else contextlib.nullcontext()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock, self._faults():
            return self._db().execute(sql, args).fetchall()

    def _load_job(self, conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?"
        row = conn.execute(sql, (job_id,)).fetchone()
        return None if row is None else _job_from_row(row)

    @staticmethod
    def _require_job(conn: sqlite3.Connection, job_id: str) -> None:
        if conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone() is None:
            raise UnknownJob(job_id)

    # -- jobs

    def create_job(
        self,
        job_id: str,
        script_hash: str,
        params: Any,
        tags: Sequence[str] | None,
        created_at: float,
    ) -> JobInfo:
        """Record a new pending job. Raises ``ValueError`` (and writes nothing) for an id
        that already exists, a malformed hash, non-JSON params or bad tags."""
        return self._apply(self.create_job_op(job_id, script_hash, params, tags, created_at))

    def create_job_op(
        self,
        job_id: str,
        script_hash: str,
        params: Any,
        tags: Sequence[str] | None,
        created_at: float,
    ) -> WriteOp[JobInfo]:
        """:meth:`create_job` as a write for :meth:`write_batch`; the arguments are
        checked now (``ValueError``), the row is written when the batch runs."""
        _check_text("job_id", job_id)
        _check_hash("script_hash", script_hash)
        created = _check_time("created_at", created_at)
        row = (
            job_id,
            script_hash,
            _to_json("params", params),
            _to_json("tags", _check_tags(tags)),
            JobStatus.PENDING.value,
            created,
        )

        def write(conn: sqlite3.Connection) -> JobInfo:
            try:
                conn.execute(
                    "INSERT INTO jobs (job_id, script_hash, params, tags, status, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
            except self._duplicate:
                raise ValueError(f"a job with id {job_id!r} already exists") from None
            return JobInfo(
                job_id=job_id,
                status=JobStatus.PENDING,
                source=script_hash,
                created_at=math.floor(created),
            )

        return write

    def mark_running(self, job_id: str, at: float) -> bool:
        """Move a pending job to running. Returns False when it is not pending (e.g.
        cancelled before a worker picked it up: the worker must then not run it).
        Raises ``UnknownJob`` for an id never created."""
        return self._apply(self.mark_running_op(job_id, at))

    def mark_running_op(self, job_id: str, at: float) -> WriteOp[bool]:
        """:meth:`mark_running` as a write for :meth:`write_batch`."""
        started = _check_time("at", at)

        def write(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "UPDATE jobs SET status = ?, started_at = ? WHERE job_id = ? AND status = ?",
                (JobStatus.RUNNING.value, started, job_id, JobStatus.PENDING.value),
            ).rowcount
            if not changed:
                self._require_job(conn, job_id)
            return bool(changed)

        return write

    def finish(
        self,
        job_id: str,
        status: JobStatus | str,
        *,
        at: float,
        result: Any = None,
        error: Any = None,
        progress: Any = None,
    ) -> bool:
        """Finish a pending or running job as complete (with ``result``), failed (with
        ``error``) or cancelled (``error`` optional); ``progress`` is its last progress,
        kept with it.

        The first finish wins: a job already complete, failed or cancelled is left as it
        is and False is returned. The check and the update are one statement, so a
        cancel racing the job's own completion cannot be overwritten by it (the Rust
        version's bug). Raises ``UnknownJob`` for an unknown id and ``ValueError`` for a
        status that is not final or a result/error that does not fit it.
        """
        return self._apply(self.finish_op(job_id, status, at=at, result=result, error=error, progress=progress))

    def finish_op(
        self,
        job_id: str,
        status: JobStatus | str,
        *,
        at: float,
        result: Any = None,
        error: Any = None,
        progress: Any = None,
    ) -> WriteOp[bool]:
        """:meth:`finish` as a write for :meth:`write_batch`; the arguments are checked
        now (``ValueError``)."""
        status = parse_status(status)
        if status not in FINISHED:
            raise ValueError(
                f"finish() needs a final status (complete, failed, cancelled), got {status.value!r}"
            )
        completed = _check_time("at", at)
        if status is JobStatus.COMPLETE:
            if error is not None:
                raise ValueError("a complete job has a result, not an error")
            result_json, error_json = _to_json("result", result), None
        else:
            if result is not None:
                raise ValueError(f"a {status.value} job has an error, not a result")
            if status is JobStatus.FAILED and error is None:
                raise ValueError("a failed job needs an error")
            result_json = None
            error_json = None if error is None else _to_json("error", _check_error(error))
        final = status.value
        progress_json = None if progress is None else _to_json("progress", progress)

        def write(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                f"UPDATE jobs SET status = ?, result = ?, error = ?, completed_at = ?, progress = ?"
                f" WHERE job_id = ? AND status IN ({_ACTIVE_SQL})",
                (final, result_json, error_json, completed, progress_json, job_id),
            ).rowcount
            if not changed:
                self._require_job(conn, job_id)
            return bool(changed)

        return write

    def get(self, job_id: str) -> JobInfo | None:
        """The job as ``JobStatus`` reports it, or None when the id is unknown."""
        record = self.get_record(job_id)
        return None if record is None else record.to_info()

    def get_record(self, job_id: str) -> JobRecord | None:
        """The full stored job (params, tags, float times), or None when unknown."""
        with self._lock, self._faults():
            return self._load_job(self._db(), job_id)

    def list(self, status: JobStatus | str | None = None, limit: int = 100) -> list[JobInfo]:
        """Jobs newest first (by creation), optionally only those in ``status``
        (an enum or its wire string; unknown strings raise ``ValueError``)."""
        limit = _check_count("limit", limit)
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        args: Sequence[Any] = (limit,)
        if status is not None:
            sql += " WHERE status = ?"
            args = (parse_status(status).value, limit)
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        return [_job_from_row(row).to_info() for row in self._read(sql, args)]

    def stats(self) -> JobStoreStats:
        """How many jobs are in each state."""
        counts = dict(self._read("SELECT status, count(*) FROM jobs GROUP BY status"))
        return JobStoreStats(
            total=sum(counts.values()),
            pending=counts.get(JobStatus.PENDING.value, 0),
            running=counts.get(JobStatus.RUNNING.value, 0),
            completed=counts.get(JobStatus.COMPLETE.value, 0),
            failed=counts.get(JobStatus.FAILED.value, 0),
            cancelled=counts.get(JobStatus.CANCELLED.value, 0),
        )

    def recover_interrupted(self, at: float, *, lost_front: str | None = None) -> builtins.list[str]:
        """Mark every pending or running job failed with error kind ``interrupted``, or
        ``worker_lost`` when ``lost_front`` names the front that held them and was lost
        (a standby taking over: :mod:`luanette.lease`).

        Called once at startup, before any job runs: no job of a previous process can
        still make progress, so leaving them active would make pollers wait forever.
        Returns the ids changed, oldest first."""
        completed = _check_time("at", at)
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT job_id, status FROM jobs WHERE status IN ({_ACTIVE_SQL})"
                " ORDER BY created_at, rowid"
            ).fetchall()
            for job_id, state in rows:
                if lost_front is None:
                    message = f"the daemon stopped while this job was {state}"
                    error = {"kind": "interrupted", "message": message}
                else:
                    message = f"the front {lost_front} was lost while this job was {state}"
                    error = {"kind": "worker_lost", "message": message}
                conn.execute(
                    "UPDATE jobs SET status = ?, error = ?, completed_at = ? WHERE job_id = ?",
                    (JobStatus.FAILED.value, _to_json("error", error), completed, job_id),
                )
        return [job_id for job_id, _ in rows]

    def prune(self, max_age_s: float | None, max_count: int | None, now: float) -> int:
        """Delete finished jobs completed more than ``max_age_s`` before ``now``, then
        all but the ``max_count`` most recently completed finished jobs. Either limit
        may be None to skip it. Pending and running jobs are never deleted. Returns how
        many rows went."""
        now = _check_time("now", now)
        if max_age_s is not None:
            max_age_s = _check_time("max_age_s", max_age_s)
        if max_count is not None:
            max_count = _check_count("max_count", max_count)
        deleted = 0
        with self._write() as conn:
            if max_age_s is not None:
                deleted += conn.execute(
                    f"DELETE FROM jobs WHERE status IN ({_FINISHED_SQL}) AND completed_at < ?",
                    (now - max_age_s,),
                ).rowcount
            if max_count is not None:
                deleted += conn.execute(
                    f"DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs"
                    f" WHERE status IN ({_FINISHED_SQL})"
                    f" ORDER BY completed_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                    (max_count,),
                ).rowcount
        return deleted

    # -- script index

    def index_script(self, record: ScriptRecord) -> ScriptRecord:
        """Add a script to the index, or merge into its existing entry, and return what
        is now stored.

        Storing the same content again (same hash) merges the tags (old ones first),
        keeps the first creator and the first ``created_at``, and takes ``describe()``
        fields from the new record where it has them. ``type:lua`` is always added.
        Raises ``ValueError`` for a malformed record, writing nothing."""
        new = _check_script(record)
        with self._write() as conn:
            sql = f"SELECT {_SCRIPT_COLUMNS} FROM scripts WHERE hash = ?"
            row = conn.execute(sql, (new.hash,)).fetchone()
            merged = new if row is None else _merge_scripts(_script_from_row(row), new)
            schema = merged.params_schema
            capabilities = merged.capabilities
            conn.execute(
                f"INSERT OR REPLACE INTO scripts ({_SCRIPT_COLUMNS}) VALUES ({', '.join('?' * 17)})",
                (
                    merged.hash,
                    merged.name,
                    merged.description,
                    _to_json("tags", merged.tags),
                    merged.creator,
                    None if schema is None else _to_json("params_schema", schema),
                    merged.created_at,
                    None if capabilities is None else _to_json("capabilities", capabilities),
                    None if merged.emits is None else _to_json("emits", merged.emits),
                    merged.shutdown_timeout,
                    merged.execution_mode,
                    None if merged.review is None else int(merged.review),
                    merged.on_error,
                    None if merged.additional_params is None else int(merged.additional_params),
                    None if merged.declared_tags is None else _to_json("declared_tags", merged.declared_tags),
                    merged.retry,
                    merged.group,
                ),
            )
        return merged

    # -- pending sessions (luanette.sessions)

    def add_session(
        self,
        session_id: str,
        *,
        job_id: str | None,
        user: str | None,
        script_hash: str | None,
        operations: builtins.list[Any],
        created_at: float,
    ) -> None:
        """Keep a pending session (committed before this returns: it must survive a crash)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO sessions (session_id, job_id, script_hash, user, operations, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, job_id, script_hash, user, _to_json("operations", operations), created_at),
            )

    def count_sessions(self) -> int:
        """How many sessions are pending."""
        return int(self._read("SELECT COUNT(*) FROM sessions")[0][0])

    def list_sessions(self, job_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """Pending sessions, oldest first (all, or those of ``job_id``)."""
        sql = f"SELECT {_SESSION_COLUMNS} FROM sessions"
        args: builtins.list[Any] = []
        if job_id is not None:
            sql += " WHERE job_id = ?"
            args.append(job_id)
        return [_session_from_row(r) for r in self._read(sql + " ORDER BY created_at, session_id", args)]

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        """One pending session with its operations, or None."""
        rows = self._read(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,))
        return _session_from_row(rows[0]) if rows else None

    def remove_session(self, session_id: str) -> bool:
        """Forget a pending session (committed or discarded); whether it was there."""
        with self._write() as conn:
            return conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0

    def get_described(self, hash: str) -> Any:
        """The cached ``describe()`` outcome of a script run by hash (see
        :meth:`put_described`), or None."""
        rows = self._read("SELECT described FROM script_describes WHERE hash = ?", (hash,))
        return _from_json(rows[0][0]) if rows else None

    def put_described(self, hash: str, described: Any, at: float, keep: int) -> None:
        """Cache a script's ``describe()`` outcome (JSON) by hash, keeping the ``keep``
        newest entries: a bound, since any hash in the CAS may be asked for."""
        _check_hash("hash", hash)
        keep = _check_count("keep", keep)
        row = (hash, _to_json("described", described), _check_time("at", at))
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO script_describes (hash, described, created_at) VALUES (?, ?, ?)", row)
            conn.execute(
                "DELETE FROM script_describes WHERE hash IN (SELECT hash FROM script_describes"
                " ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                (keep,),
            )

    def get_script(self, hash: str) -> ScriptRecord | None:
        """The index entry for a script hash, or None."""
        rows = self._read(f"SELECT {_SCRIPT_COLUMNS} FROM scripts WHERE hash = ?", (hash,))
        return _script_from_row(rows[0]) if rows else None

    def find_script_by_name(self, name: str) -> ScriptRecord | None:
        """The newest indexed script whose describe() name is ``name``, or None."""
        rows = self._read(
            f"SELECT {_SCRIPT_COLUMNS} FROM scripts WHERE name = ? ORDER BY created_at DESC, hash LIMIT 1", (name,)
        )
        return _script_from_row(rows[0]) if rows else None

    def search(
        self,
        tag: str | None = None,
        creator: str | None = None,
        vibe: str | None = None,
        limit: int = 100,
    ) -> builtins.list[ScriptRecord]:
        """Scripts matching every given filter: ``tag`` exactly one of the script's tags,
        ``creator`` exactly, and ``vibe`` sharing at least one word (case-insensitive)
        with the script's name, description and tags.

        With a vibe, results rank by how many distinct vibe words match, then newest
        first; without one, newest first. A vibe with no words in it (blank or only
        punctuation) filters nothing."""
        limit = _check_count("limit", limit)
        where: list[str] = []
        args: list[Any] = []
        if tag is not None:
            # tags is a JSON array; json_each compares whole elements, so 'lua' does not
            # match 'type:lua'
            where.append("EXISTS (SELECT 1 FROM json_each(scripts.tags) WHERE value = ?)")
            args.append(_check_text("tag", tag))
        if creator is not None:
            where.append("creator = ?")
            args.append(creator)
        sql = f"SELECT {_SCRIPT_COLUMNS} FROM scripts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, hash"
        wanted = _words(vibe) if vibe is not None else set()
        if not wanted:
            return [_script_from_row(r) for r in self._read(sql + " LIMIT ?", [*args, limit])]
        # ranking by matched-word count is done here: the index is small (one row per
        # stored script) and SQLite has no cheap "count of shared words" without FTS
        ranked: list[tuple[int, int, ScriptRecord]] = []
        for position, row in enumerate(self._read(sql, args)):
            script = _script_from_row(row)
            have = _words(" ".join([script.name or "", script.description or "", *script.tags]))
            score = len(wanted & have)
            if score:
                ranked.append((-score, position, script))
        ranked.sort(key=lambda item: item[:2])
        return [script for _, _, script in ranked[:limit]]
