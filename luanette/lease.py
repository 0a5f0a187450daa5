"""The lease: which one of several fronts sharing a PostgreSQL job store is active.

Fronts on several machines may be started with the same ``--state postgresql://...``
(see :mod:`luanette.postgres`). Only one of them may run jobs and answer clients: the
one holding the lease, a session-level advisory lock (``pg_try_advisory_lock``) taken
on a connection of its own and kept for as long as the front runs. Every other front is
a standby: it logs ``lease.waiting``, binds no socket, and tries the lock again every
:data:`POLL_S` seconds.

PostgreSQL releases a session's advisory locks when the session ends: at once when the
active front's process dies (its kernel closes the socket), and within about
:data:`KEEPALIVE_S` seconds when its machine or its network goes away (the lease
session asks the server for short TCP keepalives). The next poll of a standby then gets
the lock. A standby that takes over fails the jobs the lost front left pending or
running as ``worker_lost`` (their scripts may have been half way through) and serves.

Who holds the lease is written into the table ``luanette_lease`` (one row): a front
taking the lease over from a holder that never released it (:meth:`Lease.release`, on
a clean stop) knows the lost front by name, and says so in the jobs' errors.

The active front checks its lease every :data:`CHECK_S` seconds: the lease connection
must answer within :data:`CHECK_TIMEOUT_S`. When it does not (PostgreSQL restarted and
ended the session, the network is down), the lock may already be a standby's, so the
front stops at once (:class:`LeaseLost`; ``luanette serve`` exits with status 3) rather
than run jobs that another front is taking over.

The lock is a session lock: connect the fronts to PostgreSQL directly (or through a
pooler in session mode), never through a transaction-mode pooler.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import anyio
import structlog

from luanette import postgres

log = structlog.get_logger("luanette.lease")

LEASE_KEY = 0x6C75616E_6C656173  # "luanleas": any fixed 64-bit key, apart from migrations'
POLL_S = 0.5
"""How often a standby tries to take the lease."""
CHECK_S = 1.0
"""How often the active front checks that its lease connection is alive."""
CHECK_TIMEOUT_S = 5.0
"""How long that check may take before the lease counts as lost."""
KEEPALIVE_S = 11
"""About how long PostgreSQL takes to end the session of a front that vanished without
closing its connection: keepalives start after 5 s of silence, 3 probes 2 s apart."""

# the server side of the keepalives: they decide how soon a vanished front's lock is freed
_SESSION_SETTINGS = (
    "SET tcp_keepalives_idle = 5",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 3",
)


class LeaseUnavailable(RuntimeError):
    """The database the lease lives in cannot be reached at start-up."""


class LeaseLost(RuntimeError):
    """The active front lost its lease: it must stop serving."""


def holder_name(worker_name: str) -> str:
    """How a front names itself in the lease: ``'luanette' on host (pid 123)``."""
    return f"{worker_name!r} on {socket.gethostname()} (pid {os.getpid()})"


class Lease:
    """The lease of one front on the database at ``url``. Blocking methods are for a
    worker thread; :meth:`acquire` and :meth:`watch` are the async entry points."""

    def __init__(
        self,
        url: str,
        holder: str,
        *,
        key: int = LEASE_KEY,
        poll_s: float = POLL_S,
        check_s: float = CHECK_S,
        check_timeout_s: float = CHECK_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.location = postgres.redact(url)
        self.holder = holder
        self.key = key
        self.poll_s = poll_s
        self.check_s = check_s
        self.check_timeout_s = check_timeout_s
        self.held = False
        self.lost_front: str | None = None
        """The front that held the lease before and was lost (never released it); None
        when it stopped cleanly or there was none. Set when the lease is taken."""
        self._conn: Any = None

    # -- blocking parts

    def _connect(self) -> Any:
        conn = postgres.connect(self.url)  # with client keepalives: it notices a vanished server
        try:
            for statement in _SESSION_SETTINGS:
                conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def try_acquire(self) -> bool:
        """One try at the lock (connecting first when needed); True when it is held."""
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        (got,) = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        if got:
            self._claim()
            self.held = True
        return bool(got)

    def _claim(self) -> None:
        conn = self._conn
        # only the holder of the lock gets here, so creating the table never races
        conn.execute(
            "CREATE TABLE IF NOT EXISTS luanette_lease (key BIGINT PRIMARY KEY, holder TEXT NOT NULL,"
            " acquired_at DOUBLE PRECISION NOT NULL, released_at DOUBLE PRECISION)"
        )
        row = conn.execute("SELECT holder, released_at FROM luanette_lease WHERE key = %s", (self.key,)).fetchone()
        self.lost_front = row[0] if row is not None and row[1] is None else None
        conn.execute(
            "INSERT INTO luanette_lease (key, holder, acquired_at) VALUES (%s, %s, %s) ON CONFLICT (key)"
            " DO UPDATE SET holder = EXCLUDED.holder, acquired_at = EXCLUDED.acquired_at, released_at = NULL",
            (self.key, self.holder, time.time()),
        )

    def current_holder(self) -> str | None:
        """Who holds the lease, as it wrote itself down (None when unknown)."""
        try:
            row = self._conn.execute(
                "SELECT holder FROM luanette_lease WHERE key = %s AND released_at IS NULL", (self.key,)
            ).fetchone()
        except postgres.psycopg.Error:  # no table yet: the holder has not written itself down
            return None
        return None if row is None else row[0]

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless the lease session still answers (while it
        lives, the lock is held)."""
        try:
            self._conn.execute("SELECT 1").fetchone()
        except postgres.psycopg.Error as e:
            raise LeaseLost(f"the lease connection to {self.location} failed: {str(e).strip()}") from e

    def release(self) -> None:
        """Give the lease up on a clean stop: marked released (a standby taking it then
        fails no job as lost), unlocked, disconnected. Errors are only logged."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self.held and not conn.closed:
                conn.execute("UPDATE luanette_lease SET released_at = %s WHERE key = %s AND holder = %s",
                             (time.time(), self.key, self.holder))  # fmt: skip
                conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
                log.info("lease.released", holder=self.holder, state=self.location)
        except postgres.psycopg.Error as e:
            log.warning("lease.release_failed", error=str(e).strip(), state=self.location)
        finally:
            self.held = False
            conn.close()

    # -- async entry points

    async def acquire(self) -> None:
        """Return once the lease is held, trying every ``poll_s`` seconds.

        Raises :class:`LeaseUnavailable` when the first try cannot reach the database
        (a wrong URL or host: say so at start-up); later failures to reach it (a standby
        outliving a PostgreSQL restart) are logged and tried again."""
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                got = await anyio.to_thread.run_sync(self.try_acquire)
            except postgres.psycopg.Error as e:
                if tries == 1:
                    raise LeaseUnavailable(f"cannot reach the job store at {self.location}: {str(e).strip()}") from e
                log.warning("lease.unreachable", state=self.location, error=str(e).strip())
                if self._conn is not None:
                    self._conn.close()
                got = False
            if got:
                log.info("lease.acquired", holder=self.holder, state=self.location, took_over_from=self.lost_front,
                         waited_s=round(time.monotonic() - started, 3))  # fmt: skip
                return
            if tries == 1:
                holder = await anyio.to_thread.run_sync(self.current_holder)
                log.warning("lease.waiting", state=self.location, holder=holder, poll_s=self.poll_s,
                            reason="another front holds the lease: standing by until it is lost")  # fmt: skip
            await anyio.sleep(self.poll_s)

    async def watch(self) -> None:
        """Check the lease every ``check_s`` seconds; raise :class:`LeaseLost` when it is
        gone or does not answer within ``check_timeout_s``. Never returns otherwise."""
        while True:
            await anyio.sleep(self.check_s)
            try:
                with anyio.fail_after(self.check_timeout_s):
                    await anyio.to_thread.run_sync(self.check, abandon_on_cancel=True)
            except TimeoutError:
                raise LeaseLost(
                    f"the lease connection to {self.location} did not answer within {self.check_timeout_s:g} s"
                ) from None
