"""Pools behind a real PgBouncer 1.18 in transaction mode: the `pgbouncer` setting, end to end.

The session fixture `pgb` serves most tests; a test that needs other PgBouncer settings (a tiny
pool, a client budget) or restarts PostgreSQL starts its own (`bouncer`).
"""

from __future__ import annotations

import http.client
import logging
import signal
import os
import shutil
import subprocess
import threading
import time
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from flask import Flask

from e2e import GUNICORN, drive, free_port, send, statuses
from flask_proxypool import ConfigError, db
from pgb_app import add_case_views, case_pools
from pgbouncer import PgBouncer
from pgserver import PgServer, make_basedir
from test_psycopg import _add_writer, _app

MakeApp = t.Callable[..., Flask]
TESTS = Path(__file__).resolve().parent
PGB = {"pgbouncer": "transaction"}


def _pool(app: Flask, name: str = "db") -> t.Any:
    return app.extensions["proxypool"].pool(name)


@pytest.fixture
def bouncer(pg: PgServer) -> Iterator[Callable[..., PgBouncer]]:
    """Start a PgBouncer of this test's own (settings over the harness defaults); stopped at the end."""
    started: list[tuple[PgBouncer, Path]] = []

    def start(**settings: str | int) -> PgBouncer:
        basedir = make_basedir("pp-pgb-")
        b = PgBouncer(basedir, pg, **settings)
        started.append((b, basedir))
        b.start()
        return b

    yield start
    for b, basedir in started:
        b.stop()
        shutil.rmtree(basedir, ignore_errors=True)


@pytest.fixture
def table(pg: PgServer, appname: str) -> str:
    name = f"t_{appname}"
    pg.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)", dbname="app")
    return name


# -- configuration: what transaction mode refuses, and its defaults ----------------------------------------------


@pytest.mark.parametrize(
    "extra,keys",
    [
        ({"prepare_threshold": 5}, ["prepare_threshold", "pgbouncer_prepared_statements"]),
        ({"prepare_threshold": 0}, ["prepare_threshold", "pgbouncer"]),
        ({"configure": print}, ["configure", "ALTER ROLE"]),
        ({"reset": "session"}, ["reset", "'rollback'"]),
        ({"reset": len}, ["reset", "a callable"]),
        ({"liveness": "query"}, ["liveness", "'poll'"]),
    ],
)
def test_refused_in_transaction_mode(make_app: MakeApp, extra: dict[str, t.Any], keys: list[str]) -> None:
    """Settings that leave or need session state fail at init_app, naming the pool and the keys to change."""
    with pytest.raises(ConfigError) as info:
        make_app({"main": {"conninfo": "dbname=app", **PGB, **extra}})
    message = str(info.value)
    assert message.startswith("PROXYPOOL_POOLS['main']")
    for key in keys:
        assert key in message


def test_refused_without_pgbouncer(make_app: MakeApp) -> None:
    """pgbouncer_prepared_statements alone is a mistake; 'session' mode is not a value, with a hint."""
    with pytest.raises(ConfigError, match=r"\['pgbouncer_prepared_statements'\] is True but .*\['pgbouncer'\] is None"):
        make_app({"db": {"conninfo": "dbname=app", "pgbouncer_prepared_statements": True}})
    with pytest.raises(ConfigError, match=r"\['pgbouncer'\] must be None or 'transaction' \(PgBouncer in session"):
        make_app({"db": {"conninfo": "dbname=app", "pgbouncer": "session"}})


def test_transaction_mode_defaults(make_app: MakeApp) -> None:
    """No prepared statements and a rollback-only reset, unless prepared statements are declared supported."""
    prepared_pool = {"conninfo": "dbname=app", **PGB, "pgbouncer_prepared_statements": True}
    if psycopg.pq.version() < 170000:  # pure-Python psycopg on 3.13t uses the system's libpq (15 on Debian 12)
        with pytest.raises(ConfigError, match=r"\['prepared'\]\['pgbouncer_prepared_statements'\] needs libpq >= 17"):
            make_app({"prepared": prepared_pool})
        prepared_pool = {}
    app = make_app(
        {
            "plain": {"conninfo": "dbname=app", **PGB, "reset": "rollback", "prepare_threshold": None},
            **({"prepared": prepared_pool} if prepared_pool else {}),
            "direct": {"conninfo": "dbname=app"},
        }
    )
    configs = app.extensions["proxypool"].configs
    plain, direct = configs["plain"], configs["direct"]
    assert (plain.kind_options["prepare_threshold"], plain.kind_options["reset"]) == (None, "rollback")
    if prepared_pool:
        prepared = configs["prepared"]
        assert "prepare_threshold" not in prepared.kind_options  # psycopg's own (5)
        assert prepared.kind_options["reset"] == "rollback"
    assert direct.kind_options["reset"] == "session" and direct.kind_options["pgbouncer"] is None
    kind = plain.make_kind()
    assert (kind.pgbouncer, kind.reset_mode, kind.connect_kwargs["prepare_threshold"]) == (
        "transaction",
        "rollback",
        None,
    )


# -- the issue's failures, in one process: 0 errors ------------------------------------------------------------------


def _hammer(app: Flask, paths: list[str], threads: int) -> list[tuple[str, int, t.Any]]:
    """Every path from `threads` threads at once (a Barrier start); (path, status, json) of each request."""
    out: list[tuple[str, int, t.Any]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads, timeout=10)

    def run(k: int) -> None:
        client = app.test_client()
        barrier.wait()
        mine = []
        for path in paths[k::threads]:
            r = client.open(path, method="POST" if path.startswith(("/many", "/w/")) else "GET")
            mine.append((path, r.status_code, r.get_json(silent=True)))
        with lock:
            out.extend(mine)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return out


def _case_app(make_app: MakeApp, conninfo: str, table: str, mode: str | None) -> Flask:
    """The gunicorn test's app (tests/pgb_app.py), in process."""
    app = make_app(case_pools(conninfo, mode))
    add_case_views(app, table)
    return app


CASES = ("q", "ac", "many", "rb")


@pytest.mark.parametrize("case", CASES)
def test_issue_cases_no_errors(make_app: MakeApp, pgb: PgBouncer, appname: str, table: str, case: str) -> None:
    """Repeated parameterised queries, autocommit, executemany, rollback then reuse: 0 errors on 8 threads."""
    app = _case_app(make_app, pgb.conninfo("app", application_name=appname), table, "transaction")
    results = _hammer(app, [f"/{case}/{n}" for n in range(1, 81)], threads=8)
    assert len(results) == 80
    assert [r for r in results if r[1] not in (200, 201)] == []
    if case == "ac":  # autocommit statements did run on several server connections: the test could fail
        assert max(r[2]["backends"] for r in results) >= 2
    if case == "many":
        assert pgb.server.psql(f"SELECT count(*) FROM {table}", dbname="app") == [(400,)]
    st = _pool(app, "ac" if case == "ac" else "db").stats()
    assert st.in_use == 0 and st.closed_by_reason.get("broken", 0) == 0


def test_without_the_setting_prepared_statements_break(make_app: MakeApp, pgb: PgBouncer, appname: str) -> None:
    """The control: psycopg's defaults behind PgBouncer fail as the issue says, so the test above can fail."""
    app = _case_app(make_app, pgb.conninfo("app", application_name=appname), "unused", None)
    results = _hammer(app, [f"/ac/{n}" for n in range(1, 81)], threads=8)
    assert len(results) == 80
    assert [r for r in results if r[1] == 500], statuses_of(results)
    print(f"without pgbouncer: 'transaction', autocommit, 80 requests on 8 threads: {statuses_of(results)}")


def statuses_of(results: list[tuple[str, int, t.Any]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for _, status, _ in results:
        out[status] = out.get(status, 0) + 1
    return out


# -- the psycopg kind's own tests that make sense through PgBouncer ----------------------------------------------


@pytest.fixture
def via_pgb(pgb: PgBouncer, appname: str) -> str:
    return pgb.conninfo("app", application_name=appname)


def test_same_server_connection_within_request(make_app: MakeApp, via_pgb: str) -> None:
    """A request is one transaction: every query of it runs on one server backend; back in the pool after."""
    app = _app(make_app, via_pgb, **PGB)
    r = app.test_client().get("/pid")
    assert r.status_code == 200 and r.json["first"] == r.json["second"]
    st = _pool(app).stats()
    assert (st.checkouts, st.in_use, st.idle) == (1, 0, 1)


@pytest.mark.parametrize("on_return,how,status,kept", [
    ("rollback", "ok", 200, 0),
    ("rollback", "raise", 500, 0),
    ("rollback", "error-state", 200, 0),
    ("commit", "ok", 200, 1),
    ("commit", "raise", 500, 0),
    ("commit", "abort", 409, 0),
])  # fmt: skip
def test_return_policies(
    make_app: MakeApp, via_pgb: str, pgb: PgBouncer, table: str, on_return: str, how: str, status: int, kept: int
) -> None:
    """on_return rollback/commit behind PgBouncer: exactly the work that should be kept is, no server left in a txn."""
    app = _app(make_app, via_pgb, on_return=on_return, **PGB)
    _add_writer(app, table)
    assert app.test_client().post(f"/write/1/{how}").status_code == status
    assert pgb.server.psql(f"SELECT count(*) FROM {table}", dbname="app") == [(kept,)]
    assert all(row["cl_waiting"] == 0 for row in pgb.pools("app"))
    states = pgb.server.psql("SELECT state FROM pg_stat_activity WHERE datname = 'app' AND pid <> pg_backend_pid()")
    assert ("idle in transaction",) not in states and ("idle in transaction (aborted)",) not in states
    assert _pool(app).stats().in_use == 0


def test_release_at_commit_under_threads(make_app: MakeApp, via_pgb: str, pgb: PgBouncer, table: str) -> None:
    """release='commit' behind PgBouncer: 8 threads x 20 commit-then-read requests, every write lands."""
    app = _app(make_app, via_pgb, release="commit", max_size=2, timeout=30.0, **PGB)

    @app.post("/w/<int:id>")
    def w(id: int) -> dict[str, int]:
        db.execute(f"INSERT INTO {table} VALUES (%s, 'w')", (id,))
        db.commit()
        return {"n": db.execute(f"SELECT count(*) FROM {table} WHERE id = %s", (id,)).fetchone()[0]}

    results = _hammer(app, [f"/w/{n}" for n in range(160)], threads=8)
    assert [r for r in results if (r[1], r[2]) != (200, {"n": 1})] == []
    assert pgb.server.psql(f"SELECT count(*) FROM {table}", dbname="app") == [(160,)]
    st = _pool(app).stats()
    assert (st.in_use, st.checkouts) == (0, 320) and st.size <= 2


# -- detection ------------------------------------------------------------------------------------------------------


def test_pooler_detected_once(make_app: MakeApp, via_pgb: str, conninfo: str, caplog: pytest.LogCaptureFixture) -> None:
    """A pool without `pgbouncer` behind PgBouncer logs one warning (first connection); direct or set: none."""
    caplog.set_level(logging.WARNING, "flask_proxypool")
    app = make_app(
        {
            "unset": {"conninfo": via_pgb, "max_size": 2},
            "direct": {"conninfo": conninfo, "max_size": 2},
            "declared": {"conninfo": via_pgb, "max_size": 2, **PGB},
        }
    )
    for name in ("unset", "direct", "declared"):
        pool = _pool(app, name)
        conns = [pool.getconn() for _ in range(2)]  # two new connections each: the probe runs on the first only
        for c in conns:
            pool.putconn(c)
    warnings = [r.getMessage() for r in caplog.records if "connection pooler" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("pool 'unset': ") and "'pgbouncer': 'transaction'" in warnings[0]
    assert "pg_backend_pid()" in warnings[0]


# -- errors that mean "the pooler lost the server": 503, connection discarded ----------------------------------------


def test_query_wait_timeout_is_503_and_discarded(make_app: MakeApp, bouncer: Callable[..., PgBouncer]) -> None:
    """PgBouncer's query_wait_timeout (its one server taken): 503 + Retry-After, the dropped connection discarded."""
    b = bouncer(default_pool_size=1, query_wait_timeout=1)
    app = _app(make_app, b.conninfo("app"), **PGB)
    with psycopg.connect(b.conninfo("app")) as holder:
        holder.execute("SELECT 1")  # holds PgBouncer's only server connection in a transaction
        t0 = time.monotonic()
        r = app.test_client().get("/pid")
        elapsed = time.monotonic() - t0
        holder.rollback()
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json["detail"] == "the connection pooler lost the database server"
    assert 0.9 <= elapsed < 3.0
    st = _pool(app).stats()
    assert st.in_use == 0 and st.closed_by_reason.get("broken") == 1
    assert app.test_client().get("/pid").status_code == 200  # the next request gets a new connection


def test_server_lost_mid_transaction_is_503(make_app: MakeApp, via_pgb: str, pgb: PgBouncer) -> None:
    """The server backend under a request's transaction is terminated: 503 (not 500), connection discarded."""
    app = _app(make_app, via_pgb, **PGB)

    @app.get("/die")
    def die() -> str:
        pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
        pgb.server.psql(f"SELECT pg_terminate_backend({pid}, 5000)")  # returns once it is gone
        db.execute("SELECT 1")
        return "unreachable"

    r = app.test_client().get("/die")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    st = _pool(app).stats()
    assert st.in_use == 0 and st.closed_by_reason.get("broken") == 1
    assert app.test_client().get("/pid").status_code == 200


@pytest.mark.parametrize("user_handler", [False, True])
def test_non_operational_error_on_lost_connection(make_app: MakeApp, via_pgb: str, user_handler: bool) -> None:
    """psycopg's InternalError('received 2 results from command BEGIN') raised as PgBouncer dropped the connection:
    503, unless the app has its own handler for it, which then wins; an InternalError on a good connection: 500."""
    app = _app(make_app, via_pgb, **PGB)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    if user_handler:
        app.register_error_handler(psycopg.InternalError, lambda e: ("mine", 418))

    @app.get("/lost/<int:broken>")
    def lost(broken: int) -> str:
        if broken:
            pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
            with psycopg.connect(via_pgb, autocommit=True) as other:
                # with a timeout it returns once the backend is gone: the next query then finds it dead (without,
                # the query could reach the backend first and come back as its FATAL, the client left open)
                other.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            with pytest.raises(psycopg.OperationalError):
                db.execute("SELECT 1")
            assert db.broken
        else:
            db.execute("SELECT 1")
        # what psycopg raises when PgBouncer's error and the closed connection come back as two results
        raise psycopg.InternalError("received 2 results from command 'BEGIN'")

    client = app.test_client()
    r = client.get("/lost/1")
    assert r.status_code == (418 if user_handler else 503)
    if not user_handler:
        assert r.headers["Retry-After"] == "1"
    assert client.get("/lost/0").status_code == (418 if user_handler else 500)
    st = _pool(app).stats()
    assert st.in_use == 0 and st.closed_by_reason.get("broken") == 1


# -- PostgreSQL restart behind PgBouncer: recovery time -------------------------------------------------------------


@pytest.mark.slow
def test_restart_recovery_within_2s(make_app: MakeApp, pg: PgServer, bouncer: Callable[..., PgBouncer]) -> None:
    """pg_ctl restart -m fast behind PgBouncer (server_login_retry 1): only 503s meanwhile, none hung past the
    pool timeout, first success <= 2 s after the server is back, everything after that succeeds."""
    timeout = 2.0
    b = bouncer(server_login_retry=1, query_wait_timeout=int(timeout))
    app = _app(make_app, b.conninfo("app"), timeout=timeout, **PGB)
    stop = threading.Event()
    out: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def load() -> None:
        client = app.test_client()
        while not stop.is_set():
            t0 = time.monotonic()
            status = client.get("/pid").status_code
            with lock:
                out.append((t0, time.monotonic(), status))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for th in threads:
        th.start()
    try:
        deadline = time.monotonic() + 10
        while len(out) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)  # bounded poll: the load is running
        t_down = time.monotonic()
        pg.restart("fast")
        t_back = time.monotonic()
        deadline = t_back + 10
        while not any(s == 200 and t0 > t_back for t0, _, s in list(out)) and time.monotonic() < deadline:
            time.sleep(0.01)
        settle = time.monotonic() + 2.5
        while time.monotonic() < settle:
            time.sleep(0.05)  # load keeps running after recovery
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    results = sorted(out)
    bad = [(t0, t1, s) for t0, t1, s in results if s != 200]
    assert {s for _, _, s in bad} <= {503}, statuses_of([("", s, None) for _, _, s in bad])
    longest = max(t1 - t0 for t0, t1, _ in results)
    assert longest < timeout + 0.5  # nothing hung past the pool timeout (query_wait_timeout = timeout)
    first_ok = min(t1 for t0, t1, s in results if s == 200 and t0 >= t_back)
    recovery = first_ok - t_back
    assert recovery <= 2.0
    late = [r for r in bad if r[0] > t_back + 2.0]
    assert late == []
    assert sum(1 for t0, _, _ in results if t0 > t_back + 2.0) > 20
    print(
        f"restart behind PgBouncer: {len(results)} requests, {statuses_of([('', s, None) for *_, s in results])}, "
        f"restart took {t_back - t_down:.2f} s, first success {recovery:.2f} s after, "
        f"{first_ok - t_down:.2f} s after it began; longest request {longest:.2f} s"
    )


# -- gunicorn gthread, several workers, through PgBouncer: 0 errors within the connection budget ------------------

WORKERS, THREADS, MAX_SIZE, POOLS = 2, 4, 4, 2  # tests/pgb_app.py has two pools (db, ac)


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], int]]:
    """Start ``gunicorn -k gthread`` on tests/pgb_app.py with the given environment; returns its port."""
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "gunicorn.log"

    def start(env: dict[str, str]) -> int:
        port = free_port()
        cmd = [str(GUNICORN), "-k", "gthread", "-w", str(WORKERS), "--threads", str(THREADS)]
        cmd += ["-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", "pgb_app:create_app()"]
        with open(log, "ab") as logf:
            procs.append(
                subprocess.Popen(
                    cmd, cwd=TESTS, env={**os.environ, **env}, stdout=logf, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert procs[-1].poll() is None, log.read_text(errors="replace")[-3000:]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                if send(conn, "GET", "/health")[0] == 200:
                    return port
            except OSError:
                time.sleep(0.05)  # not listening yet
            finally:
                conn.close()
        raise TimeoutError(f"gunicorn not ready in 30 s: {log.read_text(errors='replace')[-3000:]}")

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Budget:
    """Samples PgBouncer's SHOW CLIENTS / SHOW POOLS for one database in a thread: the most clients and servers."""

    def __init__(self, bouncer: PgBouncer, dbname: str) -> None:
        self.bouncer, self.dbname = bouncer, dbname
        self.clients: list[int] = []
        self.servers: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            clients = [c for c in self.bouncer.admin("SHOW CLIENTS") if c["database"] == self.dbname]
            pools = self.bouncer.pools(self.dbname)
            self.clients.append(len(clients))
            self.servers.append(
                sum(p[k] for p in pools for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
            )
            self._stop.wait(0.02)

    def __enter__(self) -> Budget:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _plan(i: int, rng: t.Any) -> tuple[str, str, str, t.Any, int]:
    case = CASES[i % len(CASES)]
    return case, "POST" if case == "many" else "GET", f"/{case}/{i}", None, i


@pytest.mark.slow
def test_gunicorn_gthread_load_within_budget(
    bouncer: Callable[..., PgBouncer], gunicorn: Callable[[dict[str, str]], int], table: str
) -> None:
    """gunicorn gthread 2 workers x 4 threads, 16 clients, the four failure cases x 200: 0 errors; PgBouncer saw
    at most workers x pools x max_size clients (its max_client_conn leaves room only for the sampler) and at
    most default_pool_size servers."""
    budget = WORKERS * POOLS * MAX_SIZE
    b = bouncer(default_pool_size=4, max_client_conn=budget + 2)  # + the sampler's admin connection
    port = gunicorn(
        {"PGB_CONNINFO": b.conninfo("app"), "PGB_TABLE": table, "PGB_MODE": "transaction", "PGB_MAX_SIZE": "4"}
    )
    with Budget(b, "app") as seen:
        results = drive(port, _plan, requests=800, clients=16)
    assert len(results) == 800
    wrong = [(r.kind, r.status, r.data) for r in results if r.status != (201 if r.kind == "many" else 200)]
    assert wrong == [], statuses(results)
    assert b.server.psql(f"SELECT count(*) FROM {table}", dbname="app") == [(5 * 200,)]
    assert seen.clients and 0 < max(seen.clients) <= budget
    assert 2 <= max(seen.servers) <= 4  # spread over several server connections: the issue's errors were possible
    assert max(r.data["backends"] for r in results if r.kind == "ac") >= 2
    assert "no more connections allowed" not in b.log_tail(100_000)
    print(
        f"gunicorn gthread {WORKERS}x{THREADS} via PgBouncer: {statuses(results)}, "
        f"{(max(r.end for r in results) - min(r.start for r in results)):.2f} s, "
        f"max clients {max(seen.clients)} (budget {budget}), max servers {max(seen.servers)} (default_pool_size 4)"
    )


def test_kind_api_refuses_session_state() -> None:
    """PsycopgKind used without app config refuses the same things, with a ValueError."""
    from flask_proxypool.kinds.psycopg import PsycopgKind

    with pytest.raises(ValueError, match="configure is refused"):
        PsycopgKind("dbname=app", configure=print, pgbouncer="transaction")
    with pytest.raises(ValueError, match="reset must be 'rollback'"):
        PsycopgKind("dbname=app", reset="session", pgbouncer="transaction")
    with pytest.raises(ValueError, match="prepare_threshold must be None"):
        PsycopgKind("dbname=app", {"prepare_threshold": 5}, pgbouncer="transaction")
    with pytest.raises(ValueError, match="pgbouncer must be None or 'transaction'"):
        PsycopgKind("dbname=app", pgbouncer="session")
    kind = PsycopgKind(
        "dbname=app", {"prepare_threshold": 3}, pgbouncer="transaction", pgbouncer_prepared_statements=True
    )
    assert (kind.reset_mode, kind.connect_kwargs["prepare_threshold"]) == ("rollback", 3)
