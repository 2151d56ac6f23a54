"""The psycopg kind against a real PostgreSQL that the suite starts itself."""

from __future__ import annotations

import logging
import threading
import time
import typing as t

import psycopg
import pytest
from flask import Flask
from flask import abort

from conftest import backends
from flask_proxypool import ConnectFailed
from flask_proxypool import db
from flask_proxypool import proxy
from pgserver import PgServer

MakeApp = t.Callable[..., Flask]


def _pool(app: Flask, name: str = "db") -> t.Any:
    return app.extensions["proxypool"].pool(name)


@pytest.fixture
def table(pg: PgServer, appname: str) -> str:
    """A fresh table for this test, named after it."""
    name = f"t_{appname}"
    pg.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)", dbname="app")
    return name


def _app(make_app: MakeApp, conninfo: str, **options: t.Any) -> Flask:
    app = make_app({"db": {"conninfo": conninfo, "max_size": 4, "timeout": 5.0, **options}})

    @app.get("/pid")
    def pid() -> dict[str, int]:
        first = db.execute("SELECT pg_backend_pid()").fetchone()[0]
        second = db.execute("SELECT pg_backend_pid()").fetchone()[0]
        return {"first": first, "second": second}

    @app.get("/nothing")
    def nothing() -> str:
        return "ok"

    return app


def _add_writer(app: Flask, table: str) -> None:
    @app.post("/write/<int:id>/<how>")
    def write(id: int, how: str) -> tuple[str, int]:
        db.execute(f"INSERT INTO {table} VALUES (%s, %s)", (id, how))
        if how == "raise":
            raise RuntimeError("boom after the insert")
        if how == "abort":
            abort(409)
        if how == "error-state":
            with pytest.raises(psycopg.errors.DivisionByZero):
                db.execute("SELECT 1/0")
        return "done", 200


def test_lazy_no_checkout_without_use(make_app: MakeApp, conninfo: str, pg: PgServer, appname: str) -> None:
    """A request that never touches the proxy opens and takes nothing."""
    app = _app(make_app, conninfo)
    assert app.test_client().get("/nothing").status_code == 200
    assert backends(pg, appname) == []
    assert _pool(app).stats().checkouts == 0


def test_same_connection_within_request(make_app: MakeApp, conninfo: str) -> None:
    """Every access in one request reaches the same backend; it is back in the pool afterwards."""
    app = _app(make_app, conninfo)
    r = app.test_client().get("/pid")
    assert r.status_code == 200
    assert r.json["first"] == r.json["second"]
    st = _pool(app).stats()
    assert (st.checkouts, st.in_use, st.idle) == (1, 0, 1)


def test_concurrent_requests_get_their_own(make_app: MakeApp, conninfo: str) -> None:
    """Two requests in flight at once use two different backends."""
    app = _app(make_app, conninfo)
    barrier = threading.Barrier(2, timeout=10)

    @app.get("/both")
    def both() -> dict[str, int]:
        pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
        barrier.wait()  # both requests hold their connection here
        return {"pid": pid}

    pids: list[int] = []

    def hit() -> None:
        pids.append(app.test_client().get("/both").json["pid"])

    threads = [threading.Thread(target=hit) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert len(pids) == 2 and pids[0] != pids[1]
    assert _pool(app).stats().in_use == 0


@pytest.mark.parametrize("how,status", [("ok", 200), ("raise", 500), ("abort", 409), ("error-state", 200)])
def test_rollback_policy(
    make_app: MakeApp, conninfo: str, pg: PgServer, appname: str, table: str, how: str, status: int
) -> None:
    """Default on_return=rollback: nothing a view left uncommitted is visible, whatever the outcome."""
    app = _app(make_app, conninfo)
    _add_writer(app, table)
    assert app.test_client().post(f"/write/1/{how}").status_code == status
    assert pg.psql(f"SELECT count(*) FROM {table}", dbname="app") == [(0,)]
    assert all(state == "idle" for _, state in backends(pg, appname))
    assert _pool(app).stats().in_use == 0


@pytest.mark.parametrize("how,status,kept", [("ok", 200, 1), ("raise", 500, 0), ("abort", 409, 0)])
def test_commit_policy(
    make_app: MakeApp, conninfo: str, pg: PgServer, appname: str, table: str, how: str, status: int, kept: int
) -> None:
    """on_return=commit: committed when the request succeeded, rolled back otherwise."""
    app = _app(make_app, conninfo, on_return="commit")
    _add_writer(app, table)
    assert app.test_client().post(f"/write/1/{how}").status_code == status
    assert pg.psql(f"SELECT count(*) FROM {table}", dbname="app") == [(kept,)]
    assert all(state == "idle" for _, state in backends(pg, appname))


def test_commit_policy_error_state_is_a_500(make_app: MakeApp, conninfo: str, pg: PgServer, table: str) -> None:
    """A transaction in error state cannot be committed: the request fails instead of losing the write silently."""
    app = _app(make_app, conninfo, on_return="commit")
    _add_writer(app, table)
    assert app.test_client().post("/write/1/error-state").status_code == 500
    assert pg.psql(f"SELECT count(*) FROM {table}", dbname="app") == [(0,)]


def test_commit_policy_outside_requests(make_app: MakeApp, conninfo: str, pg: PgServer, table: str) -> None:
    """In a plain app context (CLI, scripts) commit happens at teardown when no exception escaped."""
    app = _app(make_app, conninfo, on_return="commit")
    with app.app_context():
        db.execute(f"INSERT INTO {table} VALUES (1, 'ctx')")
    with pytest.raises(ZeroDivisionError):
        with app.app_context():
            db.execute(f"INSERT INTO {table} VALUES (2, 'ctx')")
            1 / 0  # noqa: B018
    assert pg.psql(f"SELECT id FROM {table}", dbname="app") == [(1,)]


def test_no_idle_in_transaction_after_many_failures(
    make_app: MakeApp, conninfo: str, pg: PgServer, appname: str, table: str
) -> None:
    """Many requests failing mid-transaction, from several threads, leave no backend idle in transaction."""
    app = _app(make_app, conninfo)
    _add_writer(app, table)
    errors: list[BaseException] = []

    def hammer(base: int) -> None:
        client = app.test_client()
        try:
            for i in range(25):
                how = ("raise", "error-state", "abort", "ok")[i % 4]
                client.post(f"/write/{base + i}/{how}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(1000 * n,)) for n in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    states = [s for _, s in backends(pg, appname)]
    assert 0 < len(states) <= 4
    assert "idle in transaction" not in states and "idle in transaction (aborted)" not in states
    st = _pool(app).stats()
    assert st.in_use == 0 and st.checkouts == 150


def test_exhaustion_gives_503_after_timeout(make_app: MakeApp, conninfo: str) -> None:
    """With every connection out, a request waits about `timeout`, then gets 503 + Retry-After."""
    app = _app(make_app, conninfo, max_size=1, timeout=0.3)
    held = _pool(app).getconn()
    try:
        t0 = time.monotonic()
        r = app.test_client().get("/pid")
        elapsed = time.monotonic() - t0
    finally:
        _pool(app).putconn(held)
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "1"
    assert r.json["pool"] == "db"
    assert 0.3 <= elapsed < 2.0
    assert app.test_client().get("/pid").status_code == 200
    assert _pool(app).stats().timeouts == 1


def test_32_threads_on_4_connections(make_app: MakeApp, conninfo: str, pg: PgServer, appname: str) -> None:
    """32 threads x 200 checkouts on max_size=4: never more than 4 backends, nobody starves, all returned."""
    app = _app(make_app, conninfo, timeout=30.0)
    done = [0] * 32
    errors: list[BaseException] = []
    stop = threading.Event()
    seen: list[int] = []

    def sample() -> None:
        with psycopg.connect(pg.conninfo("app"), autocommit=True) as c:
            while not stop.is_set():
                n = c.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (appname,)
                ).fetchone()
                seen.append(n[0] if n else -1)
                stop.wait(0.005)

    def work(i: int) -> None:
        try:
            for _ in range(200):
                with app.app_context():
                    db.execute("SELECT 1")
                done[i] += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    finally:
        stop.set()
        sampler.join(10)
    assert errors == []
    assert done == [200] * 32
    assert seen and max(seen) <= 4
    assert len(backends(pg, appname)) <= 4
    st = _pool(app).stats()
    assert st.in_use == 0 and st.waiting == 0
    assert st.checkouts == 32 * 200
    assert st.size <= 4 and st.created <= 4


def test_terminated_backend_is_discarded(make_app: MakeApp, conninfo: str, pg: PgServer, appname: str) -> None:
    """A backend killed with pg_terminate_backend is noticed at checkout (no round trip) and replaced."""
    app = _app(make_app, conninfo, liveness_after=0)
    client = app.test_client()
    old = client.get("/pid").json["first"]
    # with a timeout the server answers once the backend has exited (True), or after 10 s (False)
    assert pg.psql(f"SELECT pg_terminate_backend({old}, 10000)") == [(True,)]
    r = client.get("/pid")
    assert r.status_code == 200
    assert r.json["first"] != old
    st = _pool(app).stats()
    assert st.closed_by_reason.get("broken") == 1
    assert st.in_use == 0


def test_connection_broken_during_request_is_discarded(
    make_app: MakeApp, conninfo: str, pg: PgServer, appname: str
) -> None:
    """A connection that breaks while held is discarded at return; the next request gets a new one."""
    app = _app(make_app, conninfo)

    @app.get("/suicide")
    def suicide() -> str:
        pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pg.psql(f"SELECT pg_terminate_backend({pid}, 10000)") == [(True,)]  # once it has exited
        with pytest.raises(psycopg.OperationalError):
            db.execute("SELECT 1")
        return "ok"

    client = app.test_client()
    assert client.get("/suicide").status_code == 200
    st = _pool(app).stats()
    assert (st.size, st.in_use, st.closed_by_reason.get("broken")) == (0, 0, 1)
    assert client.get("/pid").status_code == 200


def test_max_use_recycles(make_app: MakeApp, conninfo: str) -> None:
    """max_use=2: every third request gets a fresh backend."""
    app = _app(make_app, conninfo, max_use=2, max_size=1)
    client = app.test_client()
    pids = [client.get("/pid").json["first"] for _ in range(4)]
    assert pids[0] == pids[1] != pids[2] == pids[3]
    assert _pool(app).stats().closed_by_reason == {"max_use": 2}


def test_configure_and_connect_kwargs(make_app: MakeApp, conninfo: str) -> None:
    """`configure` runs once per new connection; psycopg.connect keywords pass through."""
    seen: list[int] = []

    def configure(conn: psycopg.Connection[t.Any]) -> None:
        seen.append(conn.pgconn.backend_pid)
        conn.execute("SET search_path TO pg_catalog")

    app = _app(make_app, conninfo, configure=configure, autocommit=True, application_name="x_override")
    with app.app_context():
        assert db.autocommit is True
        assert db.execute("SHOW search_path").fetchone()[0] == "pg_catalog"
        assert db.execute("SHOW application_name").fetchone()[0] == "x_override"
    with app.app_context():
        db.execute("SELECT 1")
    assert len(seen) == 1


def test_borrow_in_background_thread(make_app: MakeApp, conninfo: str, pg: PgServer, table: str) -> None:
    """`with db.borrow(app)` in a thread with no context: returned at exit, committed by policy."""
    app = _app(make_app, conninfo, on_return="commit")
    errors: list[BaseException] = []

    def job() -> None:
        try:
            with db.borrow(app) as conn:
                conn.execute(f"INSERT INTO {table} VALUES (7, 'bg')")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=job)
    th.start()
    th.join(10)
    assert errors == []
    assert pg.psql(f"SELECT v FROM {table}", dbname="app") == [("bg",)]
    assert _pool(app).stats().in_use == 0


def test_password_never_logged_or_in_stats(make_app: MakeApp, pg: PgServer, caplog: pytest.LogCaptureFixture) -> None:
    """A password in the conninfo is masked in stats, config and the logs of a failed connect."""
    bad = "postgresql://postgres:s3cr3t-pw@127.0.0.1:1/app?connect_timeout=2"
    app = make_app({"db": {"conninfo": bad, "max_size": 1}, "ok": {"conninfo": pg.url("app") + "?password=s3cr3t-pw"}})
    caplog.set_level(logging.DEBUG, logger="flask_proxypool")
    with app.app_context():
        with pytest.raises(ConnectFailed) as info:
            db.execute("SELECT 1")
        proxy("ok").execute("SELECT 1")
    stats = app.extensions["proxypool"].stats()
    blob = " ".join(
        [str(info.value), repr(stats), caplog.text, str(app.extensions["proxypool"].configs["db"].public())]
    )
    assert "s3cr3t-pw" not in blob
    assert "***" in stats["db"].target and "***" in stats["ok"].target


def test_unreachable_server_fails_fast_then_backs_off(make_app: MakeApp) -> None:
    """Nothing listening: a 503 at once, and the next request within the backoff does not try again."""
    app = make_app(
        {
            "db": {
                "conninfo": "host=127.0.0.1 port=1 dbname=x connect_timeout=2",
                "reconnect_delay": 30.0,
                "reconnect_max_delay": 30.0,
            }
        }
    )

    @app.get("/q")
    def q() -> str:
        db.execute("SELECT 1")
        return "ok"

    client = app.test_client()
    t0 = time.monotonic()
    r1, r2 = client.get("/q"), client.get("/q")
    assert time.monotonic() - t0 < 3.0
    assert (r1.status_code, r2.status_code) == (503, 503)
    assert r1.headers["Retry-After"] == "1"
    st = _pool(app).stats()
    assert st.connect_failures == 1 and st.size == 0 and st.in_use == 0


def test_release_at_commit_gives_back_early(make_app: MakeApp, conninfo: str, pg: PgServer, table: str) -> None:
    """release='commit': the connection goes back at commit; a read after it takes one again and works."""
    app = _app(make_app, conninfo, release="commit", max_size=1)
    seen: dict[str, t.Any] = {}

    @app.post("/commit-then-read")
    def commit_then_read() -> dict[str, int]:
        db.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        db.commit()
        seen["in_use_after_commit"] = _pool(app).stats().in_use
        n = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        seen["in_use_after_read"] = _pool(app).stats().in_use
        return {"n": n}

    r = app.test_client().post("/commit-then-read")
    assert (r.status_code, r.json) == (200, {"n": 1})
    assert (seen["in_use_after_commit"], seen["in_use_after_read"]) == (0, 1)
    st = _pool(app).stats()
    assert (st.checkouts, st.in_use) == (2, 0)
    assert pg.psql(f"SELECT v FROM {table}", dbname="app") == [("x",)]


def test_release_at_commit_keeps_connection_with_open_cursor(make_app: MakeApp, conninfo: str) -> None:
    """release='commit': a cursor still open keeps the connection; a closed one lets it go at the next commit."""
    app = _app(make_app, conninfo, release="commit")
    seen: dict[str, t.Any] = {}

    @app.get("/cursor")
    def cursor() -> str:
        cur = db.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        db.commit()
        seen["kept"] = _pool(app).stats().in_use
        seen["same"] = db.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        cur.close()
        with db.cursor() as c2:
            c2.execute("SELECT 1")
        db.rollback()
        seen["released"] = _pool(app).stats().in_use
        return "ok"

    assert app.test_client().get("/cursor").status_code == 200
    assert seen == {"kept": 1, "same": True, "released": 0}
    assert _pool(app).stats().in_use == 0


def test_release_at_commit_under_threads(make_app: MakeApp, conninfo: str, pg: PgServer, table: str) -> None:
    """8 threads x 25 requests that commit then read, on max_size=2: every write lands, all returned."""
    app = _app(make_app, conninfo, release="commit", max_size=2, timeout=30.0)

    @app.post("/w/<int:id>")
    def w(id: int) -> dict[str, int]:
        db.execute(f"INSERT INTO {table} VALUES (%s, 'w')", (id,))
        db.commit()
        return {"n": db.execute(f"SELECT count(*) FROM {table} WHERE id = %s", (id,)).fetchone()[0]}

    bad: list[t.Any] = []

    def run(base: int) -> None:
        client = app.test_client()
        for i in range(25):
            r = client.post(f"/w/{base + i}")
            if r.status_code != 200 or r.json != {"n": 1}:
                bad.append((r.status_code, r.json))

    threads = [threading.Thread(target=run, args=(100 * n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert bad == []
    assert pg.psql(f"SELECT count(*) FROM {table}", dbname="app") == [(200,)]
    st = _pool(app).stats()
    assert (st.in_use, st.checkouts) == (0, 400) and st.size <= 2
