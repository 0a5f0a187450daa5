"""A real PostgreSQL server for tests: ``initdb`` into a temp directory, ``pg_ctl start``.

Debian's ``postgresql`` package puts the binaries in ``/usr/lib/postgresql/<v>/bin``
(not on PATH); both places are looked in. The server listens on a free port of
127.0.0.1 and on a unix socket in its directory, trusts every local connection, and
runs with ``fsync=off`` (tests never survive a power loss). initdb refuses to run as
root, so as root the server runs as ``nobody`` (``runuser``) in a directory it owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

SKIP_REASON = "PostgreSQL binaries (initdb, pg_ctl) not found: install Debian's postgresql package"


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None when there is none."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):  # newest first
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


class PostgresServer:
    """One PostgreSQL server in a temp directory; :meth:`stop` removes it."""

    def __init__(self, bin_dir: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.port = port
        # not under pytest's tmp_path: that is 0700 root's, and the server may run as nobody
        self.root = Path(tempfile.mkdtemp(prefix="luanette-pg-"))
        self.data = self.root / "data"
        self.user = "nobody" if os.geteuid() == 0 else None
        if self.user is not None:
            shutil.chown(self.root, self.user)

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        argv = [str(self.bin_dir / tool), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.root, check=False)

    def start(self) -> PostgresServer:
        """initdb (the first time) and start; raises RuntimeError with the tool's output."""
        if not self.data.exists():
            done = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                             "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        options = (f"-k {self.root} -h 127.0.0.1 -p {self.port} -c fsync=off"
                   " -c full_page_writes=off -c max_connections=200")  # fmt: skip
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60",
                         "-o", options, "start")  # fmt: skip
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}{log[-2000:]}")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # a name we made: nothing to quote
        return self.url(name)

    def restart(self) -> None:
        """Stop at once (every session is cut, as in a crash) and start again."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.start()

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
