"""The PostgreSQL flavour of the job store: its URL, its SQL dialect, its schema version.

:class:`luanette.store.Store` writes its SQL once, for SQLite. With ``--state
postgresql://...`` it runs the same statements through :class:`Connection`, which
translates each one (once; translations are cached) into PostgreSQL:

- ``?`` placeholders become ``%s`` (a literal ``%`` becomes ``%%``);
- ``INSERT OR REPLACE`` becomes ``INSERT ... ON CONFLICT (key) DO UPDATE`` (the key of
  each table that is written that way is in :data:`CONFLICT_KEYS`), ``INSERT OR IGNORE``
  becomes ``ON CONFLICT DO NOTHING``;
- ``user`` (a reserved word in PostgreSQL) is quoted;
- in table definitions ``REAL`` becomes ``DOUBLE PRECISION`` and ``INTEGER`` becomes
  ``BIGINT`` (flows keep millisecond times), and every table gains a ``rowid BIGSERIAL``
  column, since the store orders by SQLite's implicit ``rowid`` to break ties in
  insertion order;
- ``LIMIT -1`` becomes ``LIMIT ALL``, ``json_each(x)`` becomes
  ``json_array_elements_text(x::json)``, ``BEGIN IMMEDIATE`` a plain ``BEGIN``.

The schema version SQLite keeps in ``PRAGMA user_version`` lives in the one-row table
``luanette_schema``; :func:`migrate` replays the store's ``MIGRATIONS`` like SQLite's
``migrate`` does, serialised between processes by a transaction-level advisory lock.

Which front may run jobs when several share one database is :mod:`luanette.lease`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.conninfo
from psycopg import pq

SCHEMES = ("postgresql://", "postgres://")

CONNECT_TIMEOUT_S = 5
"""How long opening a connection may take before the store reports the database
unavailable (libpq waits for ever by default)."""

CONFLICT_KEYS = {"scripts": "hash", "script_describes": "hash", "flow_definitions": "flow_id"}
"""The primary key of every table the store writes with ``INSERT OR REPLACE``."""

MIGRATE_LOCK = 0x6C75616E_6D696772  # "luanmigr": any fixed 64-bit key, apart from the lease's
"""Advisory lock that serialises migrations of one database between processes."""


class BadUrl(ValueError):
    """A ``--state`` value that is not a usable PostgreSQL URL."""


def is_url(text: object) -> bool:
    """Whether ``text`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return isinstance(text, str) and text.startswith(SCHEMES)


def check_url(url: str) -> str:
    """``url`` when it is a PostgreSQL URL libpq can parse; :class:`BadUrl` saying why
    not otherwise. Nothing is connected to."""
    if not is_url(url):
        raise BadUrl(f"--state must be a postgresql:// URL (e.g. postgresql://luanette@db:5432/luanette), got {url!r}")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as e:
        raise BadUrl(f"--state {redact(url)!r} is not a valid PostgreSQL URL: {e}") from None
    return url


def redact(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://<unparsable>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
"""libpq's TCP keepalives: a call to a server that vanished (machine or network gone)
fails within about 11 s instead of waiting for the kernel's two-hour default."""


def connect(url: str) -> psycopg.Connection:
    """A new autocommit connection (the store issues BEGIN and COMMIT itself)."""
    return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **KEEPALIVES)


# --- the dialect ---------------------------------------------------------------------

_CREATE_TABLE = re.compile(r"CREATE TABLE (\w+) \(")
_UPSERT = re.compile(r"INSERT OR REPLACE INTO (\w+) \(([^)]*)\)(.*)", re.S)
_INSERT_IGNORE = re.compile(r"INSERT OR IGNORE INTO (.*)", re.S)
_USER = re.compile(r'(?<!["\w.])user(?!["\w])')
_JSON_EACH = re.compile(r"json_each\(([^)]*)\)")


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """The PostgreSQL spelling of one statement the store writes for SQLite (see the
    module docstring for what changes)."""
    out = sql.replace("%", "%%").replace("?", "%s")
    if out.strip() == "BEGIN IMMEDIATE":
        return "BEGIN"
    out = _CREATE_TABLE.sub(r"CREATE TABLE \1 (rowid BIGSERIAL, ", out)
    if "CREATE TABLE" in out or "ADD COLUMN" in out:
        out = re.sub(r"\bREAL\b", "DOUBLE PRECISION", out)
        out = re.sub(r"\bINTEGER\b", "BIGINT", out)
    upsert = _UPSERT.fullmatch(out.strip())
    if upsert is not None:
        table, columns, rest = upsert.groups()
        key = CONFLICT_KEYS[table]
        names = [c.strip() for c in columns.split(",")]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in names if c != key)
        out = f"INSERT INTO {table} ({columns}){rest} ON CONFLICT ({key}) DO UPDATE SET {updates}"
    ignore = _INSERT_IGNORE.fullmatch(out.strip())
    if ignore is not None:
        out = f"INSERT INTO {ignore.group(1)} ON CONFLICT DO NOTHING"
    out = out.replace("LIMIT -1", "LIMIT ALL")
    out = _JSON_EACH.sub(r"json_array_elements_text(\1::json) AS json_each(value)", out)
    return _USER.sub('"user"', out)


class Connection:
    """A psycopg connection that takes the store's SQLite statements.

    It offers the part of ``sqlite3.Connection`` the store uses: :meth:`execute` (the
    cursor has ``fetchone``, ``fetchall`` and ``rowcount``) and :attr:`in_transaction`;
    plus :meth:`savepoint`, which SQLite does not need (there a failed statement undoes
    only itself, here it aborts the whole transaction). A connection found closed (the
    server restarted) is opened again at the start of the next call."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.raw = connect(url)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """Run one statement (translated); the cursor, as ``sqlite3`` returns one."""
        # always pass a sequence: without parameters psycopg would send '%%' as it is
        return self.raw.execute(translate(sql), tuple(args))

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (also one a failed statement aborted)."""
        return self.raw.info.transaction_status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)

    def reopen_if_lost(self) -> None:
        """Connect again when the connection was lost (only between transactions: the
        one a lost connection was in is gone with it, and the call in it has failed)."""
        if self.raw.closed:
            self.raw = connect(self.url)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A statement group that can fail alone inside the open transaction."""
        self.raw.execute("SAVEPOINT luanette_op")
        try:
            yield
        except BaseException:
            if not self.raw.closed:
                self.raw.execute("ROLLBACK TO SAVEPOINT luanette_op")
            raise
        self.raw.execute("RELEASE SAVEPOINT luanette_op")

    def close(self) -> None:
        self.raw.close()


def migrate(conn: Connection, migrations: Sequence[Sequence[str]]) -> int:
    """Bring the schema up to ``len(migrations)``, one step per transaction, each with
    its version bump; returns the version. Raises ``RuntimeError`` for a database a newer
    build migrated (as :func:`luanette.store.migrate` does for SQLite)."""
    latest = len(migrations)
    while True:
        conn.execute("BEGIN")
        try:
            # two fronts starting at once: the second waits here, then sees the new version
            conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            conn.raw.execute("CREATE TABLE IF NOT EXISTS luanette_schema (version BIGINT NOT NULL)")
            row = conn.raw.execute("SELECT version FROM luanette_schema").fetchone()
            if row is None:
                conn.raw.execute("INSERT INTO luanette_schema (version) VALUES (0)")
            version = 0 if row is None else int(row[0])
            if version > latest:
                from luanette.store import newer_schema  # (the store imports this module lazily)

                raise newer_schema(version, latest)
            if version == latest:
                conn.execute("COMMIT")
                return version
            for statement in migrations[version]:
                conn.execute(statement)
            conn.raw.execute("UPDATE luanette_schema SET version = %s", (version + 1,))
            conn.execute("COMMIT")
        except BaseException:
            if not conn.raw.closed:
                conn.execute("ROLLBACK")
            raise


# --- errors --------------------------------------------------------------------------

_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
"""SQLSTATE classes that mean "not now": connection exception, insufficient resources,
operator intervention (shutdown, cancel), system error (I/O)."""
_UNAVAILABLE_STATES = ("40001", "40P01", "55P03")
"""Serialization failure, deadlock, lock not available: try again."""


def fault_reason(exc: BaseException) -> tuple[str, str] | None:
    """``("full", why)`` or ``("unavailable", why)`` for a psycopg error that says the
    database cannot be written now; None for anything else (a bug, a constraint)."""
    if not isinstance(exc, psycopg.Error):
        return None
    state = exc.sqlstate
    if state == "53100":
        return "full", "the disk of the PostgreSQL server is full"
    if state is not None and (state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES):
        return "unavailable", f"PostgreSQL answered {state}: {str(exc).strip()}"
    if state is None and isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return "unavailable", f"the connection to PostgreSQL failed: {str(exc).strip()}"
    return None
