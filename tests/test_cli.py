"""``flask proxypool stats|check|size`` through Flask's CliRunner, and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask

from flask_proxypool import db
from pgbouncer import running
from pgserver import PgServer, make_basedir

SECRET = "s3cr3t-pw"
TESTS = Path(__file__).resolve().parent


class Client:
    """A pretend service client for a factory pool."""

    def __init__(self) -> None:
        self.closed = False

    def ping(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def _app(make_app: t.Callable[..., Flask], conninfo: str, **db_options: t.Any) -> Flask:
    app = make_app(
        {
            "db": {"conninfo": f"{conninfo} password={SECRET}", "max_size": 3, **db_options},
            "cache": {"kind": "sqlite3", "database": "cache.sqlite3"},
            "svc": {"kind": "factory", "factory": Client, "close": "close", "check": "ping", "max_size": 2},
        }
    )

    @app.get("/one")
    def one() -> dict[str, int]:
        return {"n": db.execute("SELECT 1").fetchone()[0]}

    return app


def _load(app: Flask, n: int) -> None:
    client = app.test_client()
    for _ in range(n):
        assert client.get("/one").status_code == 200


def test_stats_table(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """The table shows sizes, counters, percentiles in ms and top holders, password masked."""
    app = _app(make_app, conninfo)
    _load(app, 20)
    result = app.test_cli_runner().invoke(args=["proxypool", "stats"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"process {os.getpid()}: the pools of this process only" in out
    assert "pool 'db'  psycopg  host=" in out and "password=***" in out
    assert "size        1 of max 3 (min 0): 0 in use, 1 idle, 0 waiting" in out
    assert "checkouts   20   waited 0 (0.0%)   timeouts 0   refused 0   errors 0" in out
    assert "hold ms     p50 " in out and "(last 20 returns)" in out
    assert "top holders (longest hold in the window):" in out
    assert "    one  " in out  # the endpoint that held it
    assert "pool 'cache'  sqlite3" in out and "pool 'svc'  factory" in out
    assert SECRET not in out


def test_stats_json(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """--json prints {pool: PoolStats.to_dict()} on stdout: valid JSON, password masked; --pool narrows it."""
    app = _app(make_app, conninfo)
    _load(app, 5)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["proxypool", "stats", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == ["db", "cache", "svc"]
    assert data["db"]["checkouts"] == 5 and data["db"]["hold_time_p99"] > 0
    assert data["db"]["config"]["conninfo"].endswith("password=***")
    assert data["db"]["config"]["max_size"] == 3
    assert data["svc"]["config"]["factory"] == "Client"
    assert SECRET not in result.output
    only = runner.invoke(args=["proxypool", "stats", "--json", "--pool", "svc"])
    assert list(json.loads(only.stdout)) == ["svc"]


def test_unknown_pool_is_a_usage_error(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """--pool with a name the app does not have exits 2, listing the configured pools."""
    app = _app(make_app, conninfo)
    for cmd in ("stats", "check"):
        result = app.test_cli_runner().invoke(args=["proxypool", cmd, "--pool", "nope"])
        assert result.exit_code == 2
        assert "no pool named 'nope'; configured pools: db, cache, svc" in result.output


def test_check_ok(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """Every pool gives one resource that passes its full check: OK lines, exit 0."""
    app = _app(make_app, conninfo)
    result = app.test_cli_runner().invoke(args=["proxypool", "check"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[:2] for line in lines] == [["OK", "db"], ["OK", "cache"], ["OK", "svc"]]
    assert "password=***" in lines[0] and SECRET not in result.output
    assert app.extensions["proxypool"].stats()["db"].in_use == 0


def test_check_failed_names_the_pool(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """A pool whose server is down: FAILED with the masked target and the error, exit 1 naming it."""
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    app = make_app(
        {
            "db": {"conninfo": f"{conninfo} password={SECRET}"},
            "down": {"conninfo": f"host=127.0.0.1 port={port} user=app password={SECRET} connect_timeout=2"},
        }
    )
    result = app.test_cli_runner().invoke(args=["proxypool", "check"])
    assert result.exit_code == 1
    out = result.output
    assert out.splitlines()[0].startswith("OK      db  psycopg")
    failed = out.splitlines()[1]
    assert failed.startswith(f"FAILED  down  psycopg  host=127.0.0.1 port={port} user=app password=***")
    assert "ConnectFailed: pool 'down' cannot create a psycopg resource" in failed
    assert "Error: proxypool check failed for pool(s): down" in result.stderr
    assert SECRET not in out


def test_check_is_bounded_by_timeout(make_app: t.Callable[..., Flask]) -> None:
    """A check that hangs is reported FAILED after --timeout, not waited for."""
    release = threading.Event()

    def hung_check(res: Client) -> bool:
        release.wait(30)
        return True

    app = make_app({"slow": {"kind": "factory", "factory": Client, "check": hung_check}})
    try:
        start = time.monotonic()
        result = app.test_cli_runner().invoke(args=["proxypool", "check", "--timeout", "0.3"])
        took = time.monotonic() - start
    finally:
        release.set()
    assert result.exit_code == 1
    assert "FAILED  slow  factory  factory:" in result.output and "no answer within 0.3 sec" in result.output
    assert took < 5


def test_check_runs_every_pool_at_once(make_app: t.Callable[..., Flask]) -> None:
    """Two hung checks end together after one --timeout (and its grace), not one after the other."""
    release = threading.Event()

    def hung_check(res: Client) -> bool:
        release.wait(30)
        return True

    app = make_app({name: {"kind": "factory", "factory": Client, "check": hung_check} for name in ("a", "b")})
    try:
        start = time.monotonic()
        result = app.test_cli_runner().invoke(args=["proxypool", "check", "--timeout", "1"])
        took = time.monotonic() - start
    finally:
        release.set()
    assert result.exit_code == 1
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [["FAILED", "a"], ["FAILED", "b"]]
    assert took < 2.5  # one after the other: 2 x (1 + 0.5) s


def test_size_reads_gunicorn_settings(
    make_app: t.Callable[..., Flask], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--gunicorn-config and GUNICORN_CMD_ARGS are read as gunicorn reads them, --threads last; text and JSON."""
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("workers = 4\nthreads = 2\n")
    app = make_app({"db": {"kind": "sqlite3", "max_size": 2}})
    runner = app.test_cli_runner()
    args = ["proxypool", "size", "--no-server", "--gunicorn-config", str(conf)]
    result = runner.invoke(args=args, env={"GUNICORN_CMD_ARGS": "--workers 3 --bind :80"})
    assert result.exit_code == 0, result.output
    assert f"deployment: 3 worker(s) x 2 thread(s), from {conf}, GUNICORN_CMD_ARGS" in result.output
    result = runner.invoke(args=[*args, "--threads", "6", "--json"], env={"GUNICORN_CMD_ARGS": "--workers 3"})
    deployment = json.loads(result.stdout)["deployment"]
    assert (deployment["workers"], deployment["threads"], deployment["worker_class"]) == (3, 6, "gthread")
    assert deployment["source"] == f"{conf}, GUNICORN_CMD_ARGS, options"


def test_size_text_and_json(make_app: t.Callable[..., Flask], conninfo: str, pg: PgServer) -> None:
    """size: per-pool verdicts from this process's stats, and workers x max_size against max_connections."""
    app = _app(make_app, conninfo, max_size=8)
    _load(app, 150)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["proxypool", "size", "--workers", "3", "--threads", "4"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "deployment: 3 worker(s) x 4 thread(s), from options" in out
    assert "pool 'db' (psycopg): TOO LARGE: max_size 8 -> 1" in out  # one at a time: never grew past 1
    assert "max_size 8 is above the 4 threads per worker" in out
    assert f"server {pg.host}:{pg.port} (pools: db): OK" in out
    assert "3 worker(s) x (db 8) = 24 connections" in out and "max_connections 200" in out
    result = runner.invoke(args=["proxypool", "size", "--workers", "3", "--threads", "4", "--json"])
    data = json.loads(result.stdout)
    # 151: the first run read max_connections through the pool
    assert data["pools"]["db"]["suggested_max_size"] == 1 and data["pools"]["db"]["checkouts"] == 151
    (server,) = data["servers"]
    assert (server["max_connections"], server["connections"], server["suggested_connections"]) == (200, 24, 3)
    assert SECRET not in result.output


def test_size_from_a_stats_file(make_app: t.Callable[..., Flask], conninfo: str, tmp_path: Path) -> None:
    """--stats reads a server's stats JSON (the endpoint body); --no-server skips max_connections."""
    app = _app(make_app, conninfo)
    _load(app, 3)
    runner = app.test_cli_runner()
    body = {"app": "x", "pid": 1, "pools": json.loads(runner.invoke(args=["proxypool", "stats", "--json"]).stdout)}
    body["pools"]["db"].update(checkouts=5000, wait_count=900, timeouts=7, wait_time_p95=0.3)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(body))
    result = runner.invoke(args=["proxypool", "size", "--stats", str(path), "--threads", "8", "--no-server"])
    assert result.exit_code == 0, result.output
    assert "pool 'db' (psycopg): TOO SMALL: max_size 3 -> 8" in result.output
    assert "7 checkout(s) timed out" in result.output
    assert "max_connections unknown (--no-server)" in result.output
    rated = runner.invoke(args=["proxypool", "size", "--stats", str(path), "--no-server", "--json", "--rate", "10"])
    assert json.loads(rated.stdout)["rates"] == {"db": 10.0, "cache": 10.0, "svc": 10.0}
    rated = runner.invoke(
        args=["proxypool", "size", "--stats", str(path), "--no-server", "--json", "--rate", "db=50", "--rate", "10"]
    )
    assert json.loads(rated.stdout)["rates"] == {"db": 50.0, "cache": 10.0, "svc": 10.0}
    bad_rate = runner.invoke(args=["proxypool", "size", "--no-server", "--rate", "nope=3"])
    assert bad_rate.exit_code == 2 and "POOL one of db, cache, svc" in bad_rate.output
    path.write_text("[1, 2]")
    bad = runner.invoke(args=["proxypool", "size", "--stats", str(path)])
    assert bad.exit_code == 2 and "not pool stats JSON" in bad.output


def test_stats_json_in_a_real_subprocess(conninfo: str) -> None:
    """``flask --app cli_app proxypool stats --json`` in its own process: the stats of that process."""
    env = {
        **os.environ,
        "CLI_APP_CONNINFO": f"{conninfo} password={SECRET}",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    flask = Path(sys.executable).parent / "flask"
    proc = subprocess.run(
        [str(flask), "--app", "cli_app:create_app", "proxypool", "stats", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TESTS,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert list(data) == ["db"]
    assert data["db"]["checkouts"] == 1 and data["db"]["size"] == 1  # the app factory's one query
    assert data["db"]["target"].endswith("password=***")
    assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.parametrize("cmd", ["stats", "check", "size"])
def test_help(make_app: t.Callable[..., Flask], cmd: str) -> None:
    """Each command documents itself; stats says whose pools it shows."""
    app = make_app({"db": {"kind": "sqlite3"}})
    result = app.test_cli_runner().invoke(args=["proxypool", cmd, "--help"])
    assert result.exit_code == 0
    if cmd == "stats":
        assert "A CLI process has its own pools" in result.output


def test_size_behind_pgbouncer_budgets_match_show_pools(make_app: t.Callable[..., Flask], pg: PgServer) -> None:
    """Behind a real PgBouncer, size counts the client and server connections SHOW POOLS shows under load."""
    with running(make_basedir("pp-pgb-"), pg, default_pool_size=3, max_client_conn=9) as bouncer:
        conninfo = bouncer.conninfo("app") + f" password={SECRET}"
        app = make_app(
            {"db": {"conninfo": conninfo, "max_size": 8, "pgbouncer": "transaction", "prepare_threshold": None}}
        )
        entered, release = threading.Semaphore(0), threading.Event()
        errors: list[BaseException] = []

        def hold() -> None:
            try:
                with db.borrow(app) as conn:
                    entered.release()
                    conn.execute("SELECT 1")  # opens a transaction: holds a server connection until the rollback
                    release.wait(30)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=hold) for _ in range(8)]
        for th in threads:
            th.start()
        try:
            for _ in threads:
                assert entered.acquire(timeout=30)
            deadline = time.monotonic() + 20
            while True:  # bounded poll: every client in PgBouncer, three of them on a server connection
                (row,) = bouncer.pools("app")
                if row["cl_active"] + row["cl_waiting"] == 8 and row["sv_active"] == 3:
                    break
                assert time.monotonic() < deadline, row
                time.sleep(0.02)
            assert row["cl_waiting"] == 5  # beyond default_pool_size, requests wait inside PgBouncer
        finally:
            release.set()
            for th in threads:
                th.join(30)
        assert errors == []
        runner = app.test_cli_runner()
        result = runner.invoke(args=["proxypool", "size", "--workers", "1", "--threads", "8", "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["servers"] == []
        (b,) = data["pgbouncers"]
        assert b["bouncer"] == f"{bouncer.host}:{bouncer.port}" and b["settings_from"] == "admin console"
        assert (b["clients"], b["max_client_conn"], b["client_verdict"]) == (8, 9, "tight")
        assert (b["servers"], b["max_connections"], b["server_verdict"]) == (3, 200, "ok")
        assert b["assumed"] == ["1 host (--hosts N: every host runs its own workers and pools)"]
        text = runner.invoke(args=["proxypool", "size", "--workers", "1", "--threads", "8", "--hosts", "2"]).output
        assert f"pgbouncer {bouncer.host}:{bouncer.port} (pools: db): clients OVER, servers OK" in text
        assert "2 host(s) x 1 worker(s) x (db 8) = 16 client connections" in text
        assert "raise max_client_conn to at least 16" in text
        assert "(PgBouncer 1." in text  # SHOW VERSION
        assert "put PgBouncer in front" not in text and SECRET not in text
        assert "assumed" not in text
        app.config["PROXYPOOL_HOSTS"] = 2  # the app's own count of hosts, as the run-time warnings use it
        text = runner.invoke(args=["proxypool", "size", "--workers", "1", "--threads", "8"]).output
        assert "2 host(s) x 1 worker(s) x (db 8) = 16 client connections" in text and "assumed" not in text


def test_size_behind_pgbouncer_without_the_console(make_app: t.Callable[..., Flask], pg: PgServer) -> None:
    """The app's user may not read the admin console: the numbers come from the options, the rest is named assumed."""
    user = "pp_cli_bounced"
    pg.psql(f"DROP ROLE IF EXISTS {user}; CREATE ROLE {user} LOGIN")
    with running(make_basedir("pp-pgb-"), pg, default_pool_size=3) as bouncer:
        bouncer.add_user(user)
        conninfo = bouncer.conninfo("app", user=user) + f" password={SECRET}"
        app = make_app({"db": {"conninfo": conninfo, "max_size": 4, "pgbouncer": "transaction"}})
        runner = app.test_cli_runner()
        args = ["proxypool", "size", "--workers", "2", "--threads", "4", "--hosts", "3"]
        result = runner.invoke(args=[*args, "--max-client-conn", "500", "--pgbouncer-pool-size", "10"])
        assert result.exit_code == 0, result.output
        out = result.output
        assert "clients OK, servers OK (settings from options and defaults (admin console: " in out
        assert "not allowed" in out and SECRET not in out
        assert "3 host(s) x 2 worker(s) x (db 4) = 24 client connections" in out
        assert f"app/{user} 10 = 10 server connections" in out
        assert "read through PgBouncer" in out  # PostgreSQL's own max_connections, from a server connection
        assert "assumed: reserve_pool_size 0 (PgBouncer's default); 1 database/user pair(s)" in out
        bare = runner.invoke(args=[*args, "--no-server", "--json"])
        (b,) = json.loads(bare.stdout)["pgbouncers"]
        assert (b["max_client_conn"], b["servers"], b["server_verdict"]) == (100, 20, "unknown")
        assert len(b["assumed"]) == 4
