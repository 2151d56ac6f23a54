"""Deployment warnings at run time (flask_proxypool.deployment_checks): real gunicorn, the real reloader, once each.

The server tests run tests/warn_app.py in subprocesses whose log lines start with ``[pid]``, read their
output through a pipe with bounded waits, stop them (process group killed whatever happens), and then
count each warning per process on the complete output.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from e2e import free_port
from flask_proxypool import db
from flask_proxypool.config import parse_pools
from flask_proxypool.deployment_checks import (
    Server,
    above_max_connections,
    gil_enabled,
    pool_below_threads,
)
from flask_proxypool.errors import ConfigError
from flask_proxypool.sizing import ServerLimits
from pgserver import PgServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent

BELOW_GTHREAD = "pool 'db' of app 'warn_app': max_size 2 is below the 4 threads of each gunicorn gthread worker"
ABOVE_LIMITS = "pool(s) 'db' of app 'warn_app' may open 2 worker(s) x 60 host(s) x (db 2) = 240 connections to"
INHERITED = "pool 'db' of app 'warn_app' had 1 connection(s) open in process {parent} when it forked this one"
RELOADER = "pool 'db' of app 'warn_app' has 1 connection(s) open in the Flask reloader's parent process ({parent})"
DEV_SERVER = "pool 'db' of app 'warn_app': the development server runs every request in a thread of its own"


class Served:
    """A server subprocess in its own process group; its output is read line by line in a thread."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="served-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                with self._changed:
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    def count(self, text: str, pid: int | None = None) -> int:
        with self._changed:
            return sum(text in line and (pid is None or line.startswith(f"[{pid}]")) for line in self.lines)

    def wait_for(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Until `text` was printed `count` times; TimeoutError (with the output) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(text in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "<EOF>"):
                    raise TimeoutError(f"{text!r} x{count} not seen; output:\n" + "\n".join(self.lines[-60:]))
                self._changed.wait(left)

    def get(self, port: int, path: str = "/") -> t.Any:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (resp.status, body[:500], self.output())
            return json.loads(body)
        finally:
            conn.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group, bounded wait, SIGKILL; then the rest of the output, up to EOF."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers of a master that died first
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reader.join(timeout)

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines[-80:])


@pytest.fixture
def serve(pg: PgServer, tmp_path: Path) -> Iterator[t.Callable[..., Served]]:
    """Start tests/warn_app.py under a command; every process group is killed at the end."""
    started: list[Served] = []

    def start(cmd: list[str], cwd: Path = tmp_path, **env: str) -> Served:
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
            "WARN_CONNINFO": pg.conninfo("app"),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        for key in ("GUNICORN_CMD_ARGS", "WEB_CONCURRENCY", "WERKZEUG_RUN_MAIN", "WERKZEUG_SERVER_FD"):
            if key not in env:
                full_env.pop(key, None)
        s = Served(cmd, full_env, cwd)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _gunicorn(port: int, *args: str) -> list[str]:
    return [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "2", *args, "warn_app:create_app()"]


def _every_worker(s: Served, port: int, workers: int = 2, timeout: float = 30.0) -> set[int]:
    """GET / until `workers` distinct processes answered, for at most `timeout` seconds.

    Bounded by time, not by a number of requests: on a loaded machine one worker can answer hundreds of
    requests before the other has finished booting (CI saw 200 of 200 go to one worker).
    """
    s.wait_for("Listening at: ", timeout=15)  # the master bound the port
    s.wait_for("Booting worker with pid", count=workers, timeout=15)  # forked; each accepts once booted
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids.add(s.get(port)["pid"])
        if len(pids) == workers:
            return pids
    raise AssertionError(f"only {len(pids)} of {workers} workers answered in {timeout} s; output:\n{s.output()}")


@pytest.mark.slow
def test_gunicorn_gthread_threads_and_limits(serve: t.Callable[..., Served]) -> None:
    """gthread 4 threads over max_size 2, and 2 workers x 60 hosts x 2 over max_connections: once per worker."""
    port = free_port()
    s = serve(_gunicorn(port, "--threads", "4", "--worker-class", "gthread"), WARN_HOSTS="60")
    pids = _every_worker(s, port)
    s.wait_for(ABOVE_LIMITS, count=2)  # read by each worker's first request thread, once its response is closed
    for _ in range(20):  # more requests: nothing more is said
        s.get(port)
    s.stop()
    for pid in pids:
        assert s.count(BELOW_GTHREAD, pid) == 1, s.output()
        assert s.count(ABOVE_LIMITS, pid) == 1, s.output()
    assert s.count(BELOW_GTHREAD) == 2 and s.count(ABOVE_LIMITS) == 2
    assert "more than the 197 it accepts (max_connections 200 - 3 reserved)" in s.output()
    assert "Set max_size to 4 (a request holds at most one resource per pool), or run gunicorn with --threads 2" in (
        s.output()
    )
    assert s.count("connection(s) open in process") == 0  # nothing inherited without --preload


@pytest.mark.slow
def test_the_limits_check_uses_the_first_requests_connection(serve: t.Callable[..., Served]) -> None:
    """The server's limits are read once the first response is closed, on the connection that request gave back:
    no connection made for the check in a thread about to end (on 3.13t one costs its next user more)."""
    port = free_port()
    s = serve(_gunicorn(port, "--workers", "1"), WARN_HOSTS="200")
    (pid,) = _every_worker(s, port, workers=1)
    s.wait_for("may open 1 worker(s) x 200 host(s) x (db 2) = 400 connections to")  # the check ran
    assert s.get(port, "/created") == {"pid": pid, "created": 1}, s.output()


@pytest.mark.slow
def test_gunicorn_preload_without_hooks(serve: t.Callable[..., Served], tmp_path: Path) -> None:
    """--preload whose app factory used a pool: each worker warns once, naming the master; the hooks silence it."""
    port = free_port()
    s = serve(_gunicorn(port, "--preload"), WARN_SETUP="1")
    pids = _every_worker(s, port)
    for _ in range(10):
        s.get(port)
    s.stop()
    master = s.proc.pid
    text = INHERITED.format(parent=master)
    for pid in pids:
        assert s.count(text, pid) == 1, s.output()
    assert s.count(text) == 2 and s.count(text, master) == 0
    assert "add `from flask_proxypool.gunicorn import when_ready, worker_exit` to gunicorn.conf.py" in s.output()
    # sync workers, 1 thread each: no pool is smaller than its threads
    assert s.count("is below the") == 0

    (tmp_path / "gunicorn.conf.py").write_text("from flask_proxypool.gunicorn import when_ready, worker_exit\n")
    port = free_port()
    fixed = serve(_gunicorn(port, "--preload"), WARN_SETUP="1")
    _every_worker(fixed, port)
    fixed.stop()
    assert fixed.count("when it forked this one") == 0, fixed.output()


@pytest.mark.slow
def test_reloader_parent_and_development_server(serve: t.Callable[..., Served], tmp_path: Path) -> None:
    """run_simple(use_reloader=True): the parent warns once (even after a reload); each server process once of threads.

    The stat reloader, as with watchdog installed `flask run --reload` watches whole trees with inotify.
    """
    app_file = tmp_path / "warn_app.py"
    app_file.write_text((HERE / "warn_app.py").read_text())
    port = free_port()
    s = serve(
        [sys.executable, str(app_file), str(port)],
        WARN_SETUP="1",
    )
    parent = s.proc.pid
    s.wait_for(" * Restarting with")
    first = {s.get(port)["pid"] for _ in range(3)}
    assert len(first) == 1 and parent not in first
    s.wait_for(RELOADER.format(parent=parent))
    # a change: the reloader starts a new server process; the parent says nothing new
    later = time.time() + 30
    os.utime(app_file, (later, later))
    s.wait_for(" * Restarting with", count=2, timeout=15)
    second = {s.get(port)["pid"] for _ in range(3)}
    assert len(second) == 1 and second != first
    s.stop()
    assert s.count(RELOADER.format(parent=parent), parent) == 1, s.output()
    assert s.count("reloader's parent process") == 1
    for pid in first | second:
        assert s.count(DEV_SERVER, pid) == 1, s.output()
    assert "start it without threads (flask run --without-threads, run_simple(threaded=False))" in s.output()


@pytest.mark.slow
def test_waitress_threads(serve: t.Callable[..., Served], tmp_path: Path) -> None:
    """waitress with 4 threads over max_size 2: one warning, naming waitress' threads=."""
    port = free_port()
    s = serve([sys.executable, str(HERE / "warn_app.py"), str(port), "waitress"])
    s.wait_for("Serving on http://127.0.0.1:")
    pids = {s.get(port)["pid"] for _ in range(10)}
    s.stop()
    (pid,) = pids
    text = "pool 'db' of app 'warn_app': max_size 2 is below the 4 threads of each waitress worker"
    assert s.count(text, pid) == 1 and s.count(text) == 1, s.output()
    assert "or serve with waitress' threads=2" in s.output()


# -- in process: the hook, the pure checks, the CLI ----------------------------------------


def test_first_request_hook_leaves(make_app: t.Callable[..., Flask], tmp_path: Path) -> None:
    """After the first request the hook is gone from before_request: later requests pay nothing."""
    app = make_app({"db": {"kind": "sqlite3", "database": str(tmp_path / "a.sqlite3")}})

    @app.get("/")
    def index() -> str:
        return str(db.execute("SELECT 1").fetchone()[0])

    hooks = app.before_request_funcs[None]
    assert any(getattr(f, "__name__", "") == "first_request" for f in hooks)
    client = app.test_client()
    assert client.get("/").text == "1"
    assert not any(getattr(f, "__name__", "") == "first_request" for f in app.before_request_funcs[None])
    assert client.get("/").text == "1"


def test_no_warning_under_the_test_client(
    make_app: t.Callable[..., Flask], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The test client is no server: no thread count to compare, nothing logged."""
    app = make_app({"db": {"kind": "sqlite3", "database": str(tmp_path / "a.sqlite3"), "max_size": 1}})
    app.add_url_rule("/", "index", lambda: "ok")
    with caplog.at_level(logging.WARNING, logger="flask_proxypool"):
        assert app.test_client().get("/").status_code == 200
    assert [r.message for r in caplog.records if r.name == "flask_proxypool"] == []


def test_pool_below_threads_texts() -> None:
    """Each server's warning names the numbers and what to change; a big enough pool says nothing."""
    configs = parse_pools({"db": {"kind": "sqlite3", "database": "x.sqlite3", "max_size": 2}}, None)
    (a,) = pool_below_threads("app", configs, Server("waitress", threads=8, hint="serve with threads={max_size}"))
    assert "max_size 2 is below the 8 threads of each waitress worker" in a.message
    assert "Set max_size to 8" in a.message and "then get HTTP 503" in a.message
    assert a.message.endswith("or serve with threads=2")
    assert pool_below_threads("app", configs, Server("gunicorn gthread", threads=2)) == []
    assert pool_below_threads("app", configs, Server("gunicorn gevent", threads=1, by_threads=False)) == []
    (dev,) = pool_below_threads("app", configs, Server("the development server", threads=None, hint="x"))
    assert "without limit: beyond 2 (max_size) requests" in dev.message


def test_above_max_connections_arithmetic() -> None:
    """workers x hosts x the sum of max_size against max_connections less reserved; unknown limits say nothing."""
    limits = ServerLimits(max_connections=100, reserved=3)
    assert above_max_connections("app", "h:5432", {"a": 10, "b": 6}, 6, 1, limits) == []  # 96 <= 97
    assert above_max_connections("app", "h:5432", {"a": 10, "b": 6}, 3, 2, limits) == []  # 96 again
    (w,) = above_max_connections("app", "h:5432", {"a": 10, "b": 6}, 4, 2, limits)
    assert "4 worker(s) x 2 host(s) x (a 10 + b 6) = 128 connections to h:5432, more than the 97" in w.message
    assert above_max_connections("app", "h", {"a": 500}, 9, 9, ServerLimits(error="down")) == []


def test_hosts_setting_checked(make_app: t.Callable[..., Flask], tmp_path: Path) -> None:
    """PROXYPOOL_HOSTS must be a positive int: the error names it."""
    with pytest.raises(ConfigError, match="PROXYPOOL_HOSTS must be an int >= 1"):
        make_app({"db": {"kind": "sqlite3", "database": str(tmp_path / "a.sqlite3")}}, PROXYPOOL_HOSTS=0)


def test_check_lists_the_warnings(
    make_app: t.Callable[..., Flask], conninfo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flask proxypool check prints the warnings for gunicorn's settings and the server's max_connections."""
    monkeypatch.chdir(tmp_path)  # no gunicorn.conf.py here
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 2 --threads 4")
    app = make_app({"db": {"conninfo": conninfo, "max_size": 2}}, PROXYPOOL_HOSTS=60)
    result = app.test_cli_runner().invoke(args=["proxypool", "check"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("OK      db  psycopg")
    warnings = [line for line in lines if line.startswith("WARNING ")]
    assert len(warnings) == 2, result.output
    assert "max_size 2 is below the 4 threads of each gunicorn gthread worker" in warnings[0]
    assert "2 worker(s) x 60 host(s) x (db 2) = 240 connections to" in warnings[1]
    assert "more than the 197 it accepts" in warnings[1]
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 2 --threads 2")
    app = make_app({"db": {"conninfo": conninfo, "max_size": 2}})
    result = app.test_cli_runner().invoke(args=["proxypool", "check"])
    assert result.exit_code == 0 and "WARNING" not in result.output, result.output


def test_check_preload_without_hooks(
    make_app: t.Callable[..., Flask], conninfo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check: gunicorn.conf.py preloads, no hook closes the master's pools, loading the app opened one: warned."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    app = make_app({"db": {"conninfo": conninfo, "max_size": 2}})
    with db.borrow(app) as conn:  # what an app factory does to set up
        conn.execute("SELECT 1")
    (tmp_path / "gunicorn.conf.py").write_text("preload_app = True\n")
    result = app.test_cli_runner().invoke(args=["proxypool", "check"])
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.output.splitlines() if line.startswith("WARNING ")]
    assert "pool 'db' of app 'app0' has 1 connection(s) open once the app is loaded" in warning
    assert "Add `from flask_proxypool.gunicorn import when_ready, worker_exit` to gunicorn.conf.py" in warning
    (tmp_path / "gunicorn.conf.py").write_text(
        "from flask_proxypool.gunicorn import when_ready, worker_exit\npreload_app = True\n"
    )
    result = app.test_cli_runner().invoke(args=["proxypool", "check"])
    assert result.exit_code == 0 and "WARNING" not in result.output, result.output


@pytest.mark.skipif(bool(sysconfig.get_config_var("Py_GIL_DISABLED")), reason="a build with a GIL")
def test_gil_check_on_this_build() -> None:
    """On a build with a GIL the check has nothing to say."""
    assert gil_enabled() == []


#: this interpreter when it is free-threaded (`make test-ft` runs the test there), else the one of
#: `make setup-ft` or another one named by PROXYPOOL_FT_PYTHON
FT_PYTHON = (
    Path(sys.executable)
    if sysconfig.get_config_var("Py_GIL_DISABLED")
    else Path(os.environ.get("PROXYPOOL_FT_PYTHON") or ROOT / ".venv-ft" / "bin" / "python")
)

_GIL_PROBE = """
import logging, os, sys
logging.basicConfig(format="[%(process)d] %(name)s %(levelname)s: %(message)s")
from flask import Flask
from flask_proxypool import ProxyPool, db
app = Flask("ft")
app.config["PROXYPOOL_POOLS"] = {"db": {"kind": "sqlite3", "database": sys.argv[1]}}
ProxyPool(app)
app.add_url_rule("/", "index", lambda: str(db.execute("SELECT 1").fetchone()[0]))
client = app.test_client()
for _ in range(3):
    assert client.get("/").text == "1"
print("gil", int(sys._is_gil_enabled()))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not FT_PYTHON.exists(), reason="no free-threaded interpreter yet: `make test-ft` (CI) runs this test on 3.13t"
)
def test_gil_turned_on(tmp_path: Path) -> None:
    """A free-threaded interpreter with the GIL on (PYTHON_GIL=1 here): one warning at the first request."""

    def probe(gil: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(FT_PYTHON), "-c", _GIL_PROBE, str(tmp_path / "ft.sqlite3")],
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHON_GIL": gil},
            capture_output=True,
            text=True,
            timeout=60,
        )

    out = probe("1")
    assert out.returncode == 0, out.stderr
    assert "gil 1" in out.stdout
    assert len(re.findall("runs with the GIL enabled", out.stderr)) == 1, out.stderr
    out = probe("0")
    assert out.returncode == 0 and "gil 0" in out.stdout and "GIL enabled" not in out.stderr, out.stderr
