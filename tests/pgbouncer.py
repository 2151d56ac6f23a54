"""A throwaway PgBouncer in front of a test :class:`~pgserver.PgServer`, from the machine's binary.

Usage::

    bouncer = PgBouncer(make_basedir("pp-pgb-"), server, pool_mode="transaction", default_pool_size=4)
    bouncer.start()
    try:
        psycopg.connect(bouncer.conninfo("app"))
        bouncer.admin("SHOW POOLS")
    finally:
        bouncer.stop()

PgBouncer refuses to run as root, so when the tests run as root it runs as the same
unprivileged account as the PostgreSQL server. It runs in the foreground as a child
process (stopped with SIGTERM, killed after a bounded wait). Authentication is ``trust``
like the server's, so ``auth_file`` only lists the user names (:meth:`add_user`).
A missing binary is a loud failure with the install hint, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from pgserver import PgServer, _conninfo_value, _free_port, _unprivileged_user

__all__ = ["PgBouncer", "find_pgbouncer"]

INSTALL_HINT = (
    "PgBouncer not found. Install it: `apt-get install -y pgbouncer` (Debian/Ubuntu; `make setup` does it "
    "as root), or set PGBOUNCER to its path"
)
_START_TIMEOUT = 20.0  # seconds to wait for the listening socket
_STOP_TIMEOUT = 10.0


def find_pgbouncer() -> Path:
    """The ``pgbouncer`` binary: $PGBOUNCER, PATH, or /usr/sbin (Debian puts it there, off a user's PATH)."""
    for candidate in (os.environ.get("PGBOUNCER"), shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise RuntimeError(INSTALL_HINT)


class PgBouncer:
    """A PgBouncer process for the test suite; ``settings`` override the ``[pgbouncer]`` section."""

    host = "127.0.0.1"

    def __init__(self, basedir: Path, server: PgServer, **settings: str | int) -> None:
        self.binary = find_pgbouncer()
        self.basedir = Path(basedir).resolve()
        self.server = server
        self.port = _free_port(self.host)
        self.users: set[str] = {server.user}
        self.settings: dict[str, str | int] = {
            "pool_mode": "transaction",
            "default_pool_size": 4,
            "max_client_conn": 200,
            "server_login_retry": 1,
            "server_lifetime": 3600,
            "server_idle_timeout": 600,
            "query_wait_timeout": 120,
            **settings,
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as = _unprivileged_user()

    def __repr__(self) -> str:
        return f"PgBouncer(port={self.port}, server_port={self.server.port})"

    # -- lifecycle ---------------------------------------------------------- #

    def start(self) -> None:
        """Write the configuration and start; returns once PgBouncer accepts connections."""
        self.basedir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.uid, group=self._run_as.gid, extra_groups=[])
        self._proc = subprocess.Popen(
            [str(self.binary), str(self.basedir / "pgbouncer.ini")],
            cwd=self.basedir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._accepts():
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self._proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not listen within {_START_TIMEOUT} s\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (immediate shutdown), then SIGKILL after a bounded wait."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def reload(self, **settings: str | int) -> None:
        """Change settings and apply them with the admin console's RELOAD (no client is disconnected)."""
        self.settings.update(settings)
        self._write_config()
        self.admin("RELOAD")

    def add_user(self, name: str) -> None:
        """Let ``name`` log in (trust authentication still needs the name in ``auth_file``)."""
        self.users.add(name)
        if self.is_running():
            self.reload()

    # -- connecting --------------------------------------------------------- #

    def conninfo(self, dbname: str = "app", **extra: str) -> str:
        """libpq key=value string for a client of PgBouncer."""
        params = {"host": self.host, "port": str(self.port), "user": self.server.user, "dbname": dbname, **extra}
        return " ".join(f"{k}={_conninfo_value(v)}" for k, v in params.items())

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run an admin console command (``SHOW POOLS``, ``RELOAD``...); rows as dicts."""
        with (
            psycopg.connect(self.conninfo("pgbouncer"), autocommit=True, connect_timeout=10) as conn,
            conn.cursor() as cur,
        ):
            # The console speaks the simple query protocol only: psycopg uses it for a query without parameters.
            cur.execute(command.encode())
            if cur.description is None:
                return []
            names = [col.name for col in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def pools(self, dbname: str = "app") -> list[dict[str, Any]]:
        """``SHOW POOLS`` rows for ``dbname`` (cl_active, cl_waiting, sv_active, sv_idle, maxwait...)."""
        return [row for row in self.admin("SHOW POOLS") if row["database"] == dbname]

    def log_tail(self, chars: int = 4000) -> str:
        log = self.basedir / "pgbouncer.log"
        return log.read_text(encoding="utf-8", errors="replace")[-chars:] if log.exists() else "(no log)"

    # -- internals ---------------------------------------------------------- #

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((self.host, self.port)) == 0

    def _write_config(self) -> None:
        base = {
            "listen_addr": self.host,
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.basedir / "userlist.txt"),
            "admin_users": self.server.user,
            "logfile": str(self.basedir / "pgbouncer.log"),
            "pidfile": "",
        }
        target = f"host={self.server.host} port={self.server.port}"
        lines = ["[databases]", f"* = {target}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in {**base, **self.settings}.items()]
        self._write("pgbouncer.ini", "\n".join(lines) + "\n")
        self._write("userlist.txt", "".join(f'"{user}" ""\n' for user in sorted(self.users)))

    def _write(self, name: str, text: str) -> None:
        path = self.basedir / name
        path.write_text(text, encoding="utf-8")
        if self._run_as is not None:
            os.chown(self.basedir, self._run_as.uid, self._run_as.gid)
            os.chown(path, self._run_as.uid, self._run_as.gid)


@contextlib.contextmanager
def running(basedir: Path, server: PgServer, **settings: str | int) -> Iterator[PgBouncer]:
    """A started PgBouncer, stopped on exit."""
    bouncer = PgBouncer(basedir, server, **settings)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()
