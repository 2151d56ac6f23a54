"""Throwaway PostgreSQL clusters for tests, built from the machine's own binaries.

Usage::

    basedir = make_basedir()
    server = PgServer(basedir)
    server.start()
    try:
        server.psql("select 1")
    finally:
        server.stop()
        shutil.rmtree(basedir, ignore_errors=True)

A streaming hot standby of a running server (``pg_basebackup -R``), and failover::

    standby = PgServer.standby_of(server, make_basedir())
    standby.start()
    standby.wait_replayed(server)   # what the primary committed is readable there
    standby.promote()               # now a primary of its own

The server binaries are located by :func:`find_bindir`.  When the tests run as
root (common in containers) ``initdb``/``postgres`` refuse to run, so the
binaries are run as the ``postgres`` system user (or a dedicated ``pgtest``
system user created on demand) and the base directory is chowned to it.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql as pgsql

__all__ = ["PgServer", "find_bindir", "make_basedir"]

INSTALL_HINT = (
    "PostgreSQL server binaries not found (initdb, pg_ctl). Install them: "
    "`apt-get install -y postgresql` (Debian/Ubuntu), or set PG_BINDIR"
)

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_FALLBACK_USER = "pgtest"
# sun_path is 108 bytes on Linux (104 on the BSDs); keep a margin.
_MAX_SOCKET_PATH = 100
_PG_CTL_TIMEOUT = 30  # seconds, passed as ``pg_ctl -t``
_SUBPROCESS_TIMEOUT = 90  # seconds, hard cap on any single subprocess


# --------------------------------------------------------------------------- #
# Locating binaries
# --------------------------------------------------------------------------- #


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name))


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def find_bindir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looked up, in order: ``$PG_BINDIR`` (must be valid if set), the highest
    ``/usr/lib/postgresql/<ver>/bin`` (Debian layout), ``pg_config --bindir``,
    and finally ``initdb`` on ``$PATH``.  Raises :class:`RuntimeError` with an
    installation hint when nothing usable is found.
    """
    env = os.environ.get("PG_BINDIR")
    if env:
        bindir = Path(env)
        if _has_server_binaries(bindir):
            return bindir
        raise RuntimeError(f"PG_BINDIR={env!r} does not contain {', '.join(_REQUIRED_BINARIES)}. " + INSTALL_HINT)

    candidates: list[Path] = []
    if _DEBIAN_ROOT.is_dir():
        versions = sorted(
            (p for p in _DEBIAN_ROOT.iterdir() if _version_key(p)),
            key=_version_key,
            reverse=True,
        )
        candidates.extend(p / "bin" for p in versions)
    from_pg_config = _pg_config_bindir()
    if from_pg_config is not None:
        candidates.append(from_pg_config)
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)

    for bindir in candidates:
        if _has_server_binaries(bindir):
            return bindir
    raise RuntimeError(INSTALL_HINT)


# --------------------------------------------------------------------------- #
# Running as an unprivileged user when we are root
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _RunAs:
    name: str
    uid: int
    gid: int


def _lookup_user(name: str) -> _RunAs | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    if entry.pw_uid == 0:
        return None
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _unprivileged_user() -> _RunAs | None:
    """``None`` when not root; else the account the server must run as."""
    if os.geteuid() != 0:
        return None
    user = _lookup_user("postgres")
    if user is not None:
        return user
    user = _lookup_user(_FALLBACK_USER)
    if user is not None:
        return user
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    proc = subprocess.run(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            _FALLBACK_USER,
        ],
        capture_output=True,
        text=True,
        timeout=_SUBPROCESS_TIMEOUT,
        check=False,
    )
    # A concurrent process may have created it meanwhile: re-check either way.
    user = _lookup_user(_FALLBACK_USER)
    if user is None:
        raise RuntimeError(
            "running as root and no 'postgres' user exists; creating "
            f"{_FALLBACK_USER!r} with useradd failed: {proc.stderr.strip()}"
        )
    return user


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _check_traversable(path: Path, user: _RunAs) -> None:
    """Fail early if ``user`` cannot reach ``path`` (e.g. /tmp/pytest-of-root)."""
    groups = {user.gid} | {g.gr_gid for g in grp.getgrall() if user.name in g.gr_mem}
    for ancestor in [*reversed(path.parents)]:
        st = ancestor.stat()
        if st.st_uid == user.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise RuntimeError(
                f"{ancestor} is not traversable by user {user.name!r} "
                f"(mode {stat.filemode(st.st_mode)}); put the PgServer basedir "
                "somewhere world-traversable, e.g. pgserver.make_basedir()"
            )


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def make_basedir(prefix: str = "pp-pg-") -> Path:
    """Create a short, world-traversable (0755) directory under /tmp.

    pytest's ``tmp_path`` lives under ``/tmp/pytest-of-<user>/`` (mode 0700)
    and can be too long for a unix socket path, so use this instead.  The
    caller removes it (``shutil.rmtree``).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _conninfo_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


# --------------------------------------------------------------------------- #
# The server
# --------------------------------------------------------------------------- #


class PgServer:
    """A disposable PostgreSQL cluster living in ``basedir``.

    ``basedir`` holds the data directory (``data/``), the log (``pg.log``) and
    the unix socket, so its path must be short (socket path < 100 bytes).
    """

    host: str = "127.0.0.1"
    user: str = "postgres"

    def __init__(self, basedir: Path, *, port: int | None = None) -> None:
        self.basedir: Path = Path(basedir).resolve()
        self.bindir: Path = find_bindir()
        self.datadir: Path = self.basedir / "data"
        self.logfile: Path = self.basedir / "pg.log"
        self._auto_port: bool = port is None
        self.port: int = _free_port(self.host) if port is None else port
        self._run_as: _RunAs | None = _unprivileged_user()
        self._atexit_registered: bool = False
        self._check_socket_path()

    def __repr__(self) -> str:
        return f"PgServer(basedir={str(self.basedir)!r}, port={self.port})"

    # -- lifecycle ---------------------------------------------------------- #

    def start(self) -> None:
        """initdb on first use, then start and wait until it accepts connections."""
        self.basedir.mkdir(parents=True, exist_ok=True)
        self._prepare_basedir()
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        if self.is_running():
            return
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            self._write_config()
            proc = self._pg_ctl("start", "-l", str(self.logfile))
            if proc.returncode == 0:
                break
            # Another process may have grabbed our (auto-picked) port.
            if attempt + 1 < attempts and self._port_in_use():
                self.port = _free_port(self.host)
                self._check_socket_path()
                continue
            raise RuntimeError(self._failure("pg_ctl start", proc))
        if not self._atexit_registered:
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (no-op if it is not running)."""
        if not self.is_running():
            return
        proc = self._pg_ctl("stop", "-m", mode)
        if proc.returncode != 0 and self.is_running():
            raise RuntimeError(self._failure("pg_ctl stop", proc))

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m mode -w`` (starts the server if it is stopped)."""
        if not self.is_running():
            self.start()
            return
        self._write_config()
        proc = self._pg_ctl("restart", "-m", mode, "-l", str(self.logfile))
        if proc.returncode != 0:
            raise RuntimeError(self._failure("pg_ctl restart", proc))

    def promote(self) -> None:
        """``pg_ctl promote -w``: a standby ends recovery and accepts writes (returns once it does)."""
        proc = self._pg_ctl("promote")
        if proc.returncode != 0:
            raise RuntimeError(self._failure("pg_ctl promote", proc))

    def in_recovery(self) -> bool:
        """``pg_is_in_recovery()``: True on a standby."""
        [(recovering,)] = self.psql("SELECT pg_is_in_recovery()")
        return bool(recovering)

    def wait_replayed(self, primary: PgServer, timeout: float = 10.0) -> None:
        """Wait (bounded) until this standby has replayed everything `primary` has written so far.

        The insert position, not the write position: with `synchronous_commit = off` a commit
        returns before its WAL is written, and the WAL writer sends it on within 200 ms. A
        transaction with an xid is committed first, so that position is the end of a record (right
        after a segment switch, as after a base backup, it is past the next page header, which
        replay never reaches).
        """
        primary.psql("SELECT txid_current()")
        [(lsn,)] = primary.psql("SELECT pg_current_wal_insert_lsn()::text")
        deadline = time.monotonic() + timeout
        while True:
            [(done,)] = self.psql(f"SELECT coalesce(pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn, false)")
            if done:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r} did not replay {primary!r} up to {lsn} within {timeout:g} sec")
            time.sleep(0.02)  # a bounded poll of the server's own progress

    def init(self) -> None:
        """initdb only, without starting: a template for `copy_of` (one initdb, many clusters)."""
        self.basedir.mkdir(parents=True, exist_ok=True)
        self._prepare_basedir()
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()

    @classmethod
    def copy_of(cls, template: PgServer, basedir: Path) -> PgServer:
        """A new cluster, not started, whose data directory is a copy of the stopped `template`'s."""
        if template.is_running():
            raise RuntimeError(f"{template!r} is running: copy a stopped cluster")
        server = cls(basedir)
        shutil.copytree(template.datadir, server.datadir, symlinks=True)
        return server  # start() chowns the copy to the server's user and writes its own port

    @classmethod
    def standby_of(cls, primary: PgServer, basedir: Path) -> PgServer:
        """A streaming hot standby of the running `primary`, made by ``pg_basebackup -R``; not started yet.

        ``-R`` writes ``standby.signal`` and the ``primary_conninfo`` pointing at
        `primary`; `start` then brings it up in recovery, streaming from it. The
        default pg_hba.conf of a cluster made by `initdb -A trust` lets the
        replication connection in from 127.0.0.1.
        """
        standby = cls(basedir)
        standby.basedir.mkdir(parents=True, exist_ok=True)
        standby._prepare_basedir()
        proc = standby._run(
            [
                str(standby.bindir / "pg_basebackup"),
                "-D",
                str(standby.datadir),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
                "-h",
                primary.host,
                "-p",
                str(primary.port),
                "-U",
                primary.user,
            ]
        )
        if proc.returncode != 0:
            raise RuntimeError(standby._failure("pg_basebackup", proc, with_log=False))
        return standby

    def is_running(self) -> bool:
        if not (self.datadir / "PG_VERSION").exists():
            return False
        # pg_ctl status: 0 = running, 3 = not running, 4 = no data directory.
        return self._pg_ctl("status", wait=False).returncode == 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- connecting --------------------------------------------------------- #

    def conninfo(self, dbname: str = "postgres", **extra: str) -> str:
        """libpq key=value string, e.g. ``host=127.0.0.1 port=5433 user=postgres dbname=postgres``."""
        params: dict[str, str] = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": dbname,
            **extra,
        }
        return " ".join(f"{k}={_conninfo_value(v)}" for k, v in params.items())

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/dbname``."""
        quoted = urllib.parse.quote(dbname, safe="")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{quoted}"

    @contextlib.contextmanager
    def connect(self, dbname: str = "postgres") -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A fresh autocommit connection, closed on exit."""
        with psycopg.connect(self.conninfo(dbname, connect_timeout="10"), autocommit=True) as conn:
            yield conn

    def psql(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run ``sql`` (may hold several statements) on a fresh autocommit
        connection; return the rows of the last statement returning rows, or ``[]``."""
        rows: list[tuple[Any, ...]] = []
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(sql.encode())
            while True:
                if cur.description is not None:
                    rows = cur.fetchall()
                if not cur.nextset():
                    break
        return rows

    def create_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))

    # -- internals ---------------------------------------------------------- #

    def _check_socket_path(self) -> None:
        sock = self.basedir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"unix socket path {sock} is longer than {_MAX_SOCKET_PATH} bytes; "
                "use a shorter basedir (e.g. pgserver.make_basedir())"
            )

    def _prepare_basedir(self) -> None:
        if self._run_as is None:
            return
        _check_traversable(self.basedir, self._run_as)
        _chown_tree(self.basedir, self._run_as.uid, self._run_as.gid)

    def _initdb(self) -> None:
        proc = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-A",
                "trust",
                "-U",
                self.user,
                "--no-sync",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
            ]
        )
        if proc.returncode != 0:
            raise RuntimeError(self._failure("initdb", proc, with_log=False))
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write("\n# added by tests/pgserver.py\ninclude_if_exists = 'pgserver.conf'\n")

    def _write_config(self) -> None:
        settings: Mapping[str, str] = {
            "listen_addresses": _conf_value(self.host),
            "port": str(self.port),
            "unix_socket_directories": _conf_value(str(self.basedir)),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "logging_collector": "off",
        }
        conf = self.datadir / "pgserver.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()), encoding="utf-8")
        if self._run_as is not None:
            os.chown(conf, self._run_as.uid, self._run_as.gid)

    def _pg_ctl(self, action: str, *args: str, wait: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / "pg_ctl"), action, "-D", str(self.datadir)]
        if wait:
            cmd += ["-w", "-t", str(_PG_CTL_TIMEOUT)]
        return self._run([*cmd, *args])

    def _run(self, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.uid, group=self._run_as.gid, extra_groups=[])
            env["HOME"] = str(self.basedir)
            env["USER"] = env["LOGNAME"] = self._run_as.name
        return subprocess.run(
            list(cmd),
            cwd=self.basedir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_SUBPROCESS_TIMEOUT,
            check=False,
            **kwargs,
        )

    def _port_in_use(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((self.host, self.port))
            except OSError:
                return True
            return False

    def _failure(
        self,
        what: str,
        proc: subprocess.CompletedProcess[str],
        *,
        with_log: bool = True,
    ) -> str:
        msg = f"{what} failed (exit {proc.returncode}) for {self!r}\n"
        msg += f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        if with_log and self.logfile.exists():
            tail = self.logfile.read_text(encoding="utf-8", errors="replace")[-4000:]
            msg += f"\n{self.logfile} (tail):\n{tail}"
        return msg

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
