"""Nothing is held forever: resources of threads that ended, max_hold_action "reclaim", the held report."""

from __future__ import annotations

import json
import logging
import threading
import time
import typing as t
import uuid
from pathlib import Path

import psycopg
import pytest
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest

from conftest import backends, wait_until
from flask_proxypool import ConfigError, Pool, db, metrics
from flask_proxypool import maintenance
from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.kinds.psycopg import PsycopgKind
from pgbouncer import PgBouncer
from pgserver import PgServer

MakeApp = t.Callable[..., Flask]
HERE = Path(__file__)


def _line(marker: str) -> int:
    """The line of this file that carries `marker` (where a test takes a resource)."""
    lines = HERE.read_text().splitlines()
    found = [i for i, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(found) == 1, marker
    return found[0]


def _until(cond: t.Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `cond` for at most `timeout` seconds (the background worker or the server acts meanwhile)."""
    assert wait_until(cond, timeout, interval=0.01), "condition not met in time"


def _table(pool: Pool[t.Any]) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with pool.connection() as conn:
        conn.execute(f"CREATE TABLE {name} (x int)")
        conn.commit()
    return name


def _gone(pg: PgServer, appname: str, pid: int) -> bool:
    return pid not in [p for p, _ in backends(pg, appname)]


class Clock:
    """An injectable clock: max_hold passes when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _reclaim_logs(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if what in r.getMessage()]


def test_thread_ended_holding_getconn_is_reclaimed(
    make_app: MakeApp, pg: PgServer, appname: str, conninfo: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread that ended holding a pool.getconn() connection: rolled back, closed, counted, logged once."""
    caplog.set_level(logging.WARNING, logger="flask_proxypool")
    app = make_app({"db": {"kind": "psycopg", "conninfo": conninfo, "max_size": 2}})
    pool = app.extensions["proxypool"].pool("db")
    table = _table(pool)
    seen: dict[str, int] = {}

    def job() -> None:
        conn = pool.getconn()  # TAKE-GETCONN
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        seen["pid"] = conn.pgconn.backend_pid

    th = threading.Thread(target=job, name="leaky-getconn")
    th.start()
    th.join(10)
    assert not th.is_alive() and "pid" in seen
    maintenance.run_round(pool)  # the worker's round, driven here (the worker may have been first)
    _until(lambda: pool.stats().in_use == 0)
    _until(lambda: _gone(pg, appname, seen["pid"]))  # the server connection is closed
    st = pool.stats()
    assert st.reclaimed == 1 and st.closed_by_reason.get("abandoned") == 1
    with pool.connection() as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)  # rolled back
    maintenance.run_round(pool)  # a later round finds nothing more
    logs = _reclaim_logs(caplog, "reclaimed a psycopg resource")
    assert len(logs) == 1
    assert f"{HERE}:{_line('TAKE-GETCONN')}" in logs[0] and "'leaky-getconn'" in logs[0]
    assert pool.stats().reclaimed == 1


def test_thread_ended_inside_borrow_is_reclaimed(
    make_app: MakeApp, pg: PgServer, appname: str, conninfo: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread that entered db.borrow() and ended without leaving it: reclaimed; the late exit is quiet."""
    caplog.set_level(logging.WARNING, logger="flask_proxypool")
    app = make_app({"db": {"kind": "psycopg", "conninfo": conninfo, "max_size": 1}})
    pool = app.extensions["proxypool"].pool("db")
    table = _table(pool)
    kept: list[t.Any] = []  # the borrow block outlives its thread (as a generator kept somewhere would)
    seen: dict[str, int] = {}

    def job() -> None:
        block = db.borrow(app)
        kept.append(block)
        conn = block.__enter__()  # TAKE-BORROW
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        seen["pid"] = conn.pgconn.backend_pid

    th = threading.Thread(target=job, name="leaky-borrow")
    th.start()
    th.join(10)
    assert not th.is_alive() and "pid" in seen
    maintenance.run_round(pool)
    _until(lambda: pool.stats().in_use == 0)
    _until(lambda: _gone(pg, appname, seen["pid"]))
    with pool.connection(timeout=5) as conn:  # max_size 1: the slot came back
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    logs = _reclaim_logs(caplog, "reclaimed a psycopg resource")
    assert len(logs) == 1
    assert f"{HERE}:{_line('TAKE-BORROW')}" in logs[0] and "'leaky-borrow'" in logs[0]
    before = pool.stats()
    kept[0].__exit__(None, None, None)  # the block's late exit gives back what was reclaimed: quiet, no double free
    after = pool.stats()
    assert (after.size, after.in_use, after.closed, after.reclaimed) == (
        before.size,
        before.in_use,
        before.closed,
        1,
    )
    assert not _reclaim_logs(caplog, "not checked out")


def test_thread_ended_with_a_pushed_app_context_is_reclaimed(
    make_app: MakeApp, conninfo: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A background thread that used db in an app context it never popped: reclaimed, logged with its line."""
    caplog.set_level(logging.WARNING, logger="flask_proxypool")
    app = make_app({"db": {"kind": "psycopg", "conninfo": conninfo, "max_size": 1}})
    pool = app.extensions["proxypool"].pool("db")

    def job() -> None:
        app.app_context().push()  # never popped: no teardown will give the connection back
        db.execute("SELECT 1")  # TAKE-PROXY

    th = threading.Thread(target=job, name="leaky-context")
    th.start()
    th.join(10)
    assert not th.is_alive()
    maintenance.run_round(pool)
    _until(lambda: pool.stats().in_use == 0)
    with pool.connection(timeout=5) as conn:  # max_size 1: the slot came back
        assert conn.execute("SELECT 1").fetchone() == (1,)
    logs = _reclaim_logs(caplog, "reclaimed a psycopg resource")
    assert len(logs) == 1 and f"{HERE}:{_line('TAKE-PROXY')}" in logs[0] and "'leaky-context'" in logs[0]


def _hold_past_max_hold(pool: Pool[t.Any], clock: Clock, table: str, i: int) -> dict[str, t.Any]:
    """Start a thread that takes a connection, writes, and uses it again once told; take it back meanwhile."""
    took, go = threading.Event(), threading.Event()
    out: dict[str, t.Any] = {"go": go}

    def holder() -> None:
        conn = pool.getconn()
        conn.execute(f"INSERT INTO {table} VALUES ({i})")
        out["pid"] = conn.pgconn.backend_pid
        took.set()
        go.wait(10)
        try:
            conn.execute("SELECT 1")
            out["use"] = None
        except Exception as e:
            out["use"] = e
        try:
            pool.putconn(conn)
            out["put"] = None
        except Exception as e:
            out["put"] = e

    th = threading.Thread(target=holder, name=f"holder-{i}")
    out["thread"] = th
    th.start()
    assert took.wait(10)
    clock.now += 10  # held past max_hold
    maintenance.ReportLongHeld().run(pool, clock())
    return out


def test_max_hold_reclaim_twenty_times(
    pg: PgServer, appname: str, conninfo: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Past max_hold the holder's next use fails, its slot is free at once, no slot is lost or freed twice."""
    caplog.set_level(logging.WARNING, logger="flask_proxypool")
    clock = Clock()
    pool = Pool(
        PsycopgKind(conninfo), name="held", max_size=1, max_hold=5, max_hold_action="reclaim", timeout=5, clock=clock
    )
    try:
        table = _table(pool)
        for i in range(20):
            out = _hold_past_max_hold(pool, clock, table, i)
            other = pool.getconn(timeout=5)  # max_size 1: free only because the slot was freed at once
            try:
                assert other.pgconn.backend_pid != out["pid"]
                want, pid = i + 1, out["pid"]
                _until(lambda: len(_reclaim_logs(caplog, "took back a psycopg resource")) == want)  # noqa: B023
                out["go"].set()
                out["thread"].join(10)
                assert isinstance(out["use"], psycopg.OperationalError), out.get("use")
                assert out["put"] is None  # the late give-back is quiet
                _until(lambda: _gone(pg, appname, pid))  # noqa: B023
                assert other.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)  # its work rolled back
            finally:
                pool.putconn(other)
            st = pool.stats()
            assert (st.size, st.in_use, st.idle, st.waiting) == (1, 0, 1, 0)
            assert st.reclaimed == i + 1 and st.closed_by_reason.get("max_hold") == i + 1
        logs = _reclaim_logs(caplog, "took back a psycopg resource")
        assert len(logs) == 20 and "thread 'holder-0'" in logs[0] and "its connection shut down" in logs[0]
        assert not _reclaim_logs(caplog, "not checked out")
    finally:
        pool.close()


def test_max_hold_reclaim_through_pgbouncer(pgb: PgBouncer) -> None:
    """Through PgBouncer (transaction mode) the holder fails, its transaction is rolled back, the pooler serves on."""
    clock = Clock()
    kind = PsycopgKind(pgb.conninfo("app"), {"prepare_threshold": None})
    pool = Pool(kind, max_size=1, max_hold=5, max_hold_action="reclaim", timeout=5, clock=clock)
    try:
        table = _table(pool)
        out = _hold_past_max_hold(pool, clock, table, 1)
        with pool.connection() as other:  # the freed slot, at once
            out["go"].set()
            out["thread"].join(10)
            assert isinstance(out["use"], psycopg.OperationalError) and out["put"] is None
            _until(lambda: other.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,))
        _until(lambda: all(row["sv_active"] == 0 for row in pgb.pools("app")))  # no server left in its transaction
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        st = pool.stats()
        assert (st.size, st.in_use, st.reclaimed) == (1, 0, 1)
    finally:
        pool.close()


def test_max_hold_reclaim_stops_a_running_query(pg: PgServer, appname: str, conninfo: str) -> None:
    """A holder stuck in a long query is cut off: it fails within seconds, with a note why; its backend ends."""
    clock = Clock()
    pool = Pool(PsycopgKind(conninfo), max_size=1, max_hold=5, max_hold_action="reclaim", clock=clock)
    try:
        out: dict[str, t.Any] = {}
        took = threading.Event()

        def holder() -> None:
            start = time.monotonic()
            try:
                with pool.connection() as conn:
                    out["pid"] = conn.pgconn.backend_pid
                    took.set()
                    start = time.monotonic()
                    conn.execute("SELECT pg_sleep(60)")
            except Exception as e:
                out["error"] = e
            out["took"] = time.monotonic() - start

        th = threading.Thread(target=holder)
        th.start()
        assert took.wait(10)
        _until(lambda: (out["pid"], "active") in backends(pg, appname))
        clock.now += 10
        maintenance.ReportLongHeld().run(pool, clock())
        th.join(20)
        error = out.get("error")
        assert isinstance(error, psycopg.OperationalError)
        assert "took this psycopg resource back" in " ".join(getattr(error, "__notes__", []))
        assert out["took"] < 15
        _until(lambda: _gone(pg, appname, out["pid"]))
        st = pool.stats()
        assert (st.size, st.in_use, st.reclaimed) == (0, 0, 1)
    finally:
        pool.close()


def test_max_hold_reclaim_in_a_request(make_app: MakeApp, conninfo: str, caplog: pytest.LogCaptureFixture) -> None:
    """A request past max_hold (configured, real worker) fails on its next query; teardown raises nothing."""
    caplog.set_level(logging.WARNING, logger="flask_proxypool")
    app = make_app(
        {"db": {"kind": "psycopg", "conninfo": conninfo, "max_size": 1, "max_hold": 0.2, "max_hold_action": "reclaim"}}
    )
    pool = app.extensions["proxypool"].pool("db")

    @app.get("/slow")
    def slow() -> str:
        db.execute("SELECT 1")
        _until(lambda: pool.stats().reclaimed == 1)  # the background worker takes it back
        _until(lambda: bool(_reclaim_logs(caplog, "took back")))
        try:
            db.execute("SELECT 1")
        except psycopg.OperationalError:
            return "failed fast"
        return "still usable"

    assert app.test_client().get("/slow").text == "failed fast"
    logs = _reclaim_logs(caplog, "took back")
    assert len(logs) == 1 and "by slow" in logs[0]
    with pool.connection(timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    st = pool.stats()
    assert (st.in_use, st.reclaimed) == (0, 1) and st.size <= 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_held_report_everywhere(make_app: MakeApp, conninfo: str, tmp_path: Path) -> None:
    """What is held right now, with holder and where: pool stats, the stats endpoint, the CLI, the metrics."""
    app = make_app(
        {"db": {"kind": "psycopg", "conninfo": conninfo, "max_size": 2}},
        PROXYPOOL_STATS_URL="/_pools",
        PROXYPOOL_STATS_GUARD=lambda: True,
    )
    pool = app.extensions["proxypool"].pool("db")
    took, done = threading.Event(), threading.Event()

    def job() -> None:
        conn = pool.getconn()  # TAKE-HELD
        took.set()
        done.wait(10)
        pool.putconn(conn)

    th = threading.Thread(target=job, name="reporter")
    th.start()
    try:
        assert took.wait(10)
        where = f"{HERE}:{_line('TAKE-HELD')}"
        held = pool.stats().held
        assert [(h["pool"], h["holder"], h["thread"], h["where"]) for h in held] == [
            ("db", "thread reporter", "reporter", where)
        ]
        assert held[0]["age"] >= 0

        @app.get("/in-request")
        def in_request() -> str:
            db.execute("SELECT 1")
            return json.dumps(sorted(h["holder"] for h in pool.stats().held))

        assert json.loads(app.test_client().get("/in-request").text) == ["in_request", "thread reporter"]
        body = app.test_client().get("/_pools").get_json()
        assert [(h["holder"], h["where"]) for h in body["held"]] == [("thread reporter", where)]
        assert body["pools"]["db"]["held"][0]["thread"] == "reporter"
        cli = app.test_cli_runner().invoke(args=["proxypool", "held"])
        assert cli.exit_code == 0, cli.output
        assert "thread reporter" in cli.output and where in cli.output
        listed = json.loads(app.test_cli_runner().invoke(args=["proxypool", "held", "--json"]).output)
        assert [h["where"] for h in listed] == [where]
        served = tmp_path / "stats.json"  # a server worker's numbers, as its stats endpoint gave them
        served.write_text(json.dumps(body))
        from_server = app.test_cli_runner().invoke(args=["proxypool", "held", "--stats", str(served)])
        assert from_server.exit_code == 0 and where in from_server.output and "this process" not in from_server.output
        registry = CollectorRegistry()
        metrics.register(app, registry)
        text = generate_latest(registry).decode()
        oldest = [ln for ln in text.splitlines() if ln.startswith("proxypool_oldest_hold_seconds{")]
        assert len(oldest) == 1 and float(oldest[0].split()[-1]) >= 0
        assert 'proxypool_reclaimed_total{app="app0",pool="db"} 0.0' in text
    finally:
        done.set()
        th.join(10)
    assert pool.stats().held == [] and pool.stats().oldest_hold == 0.0
    out = app.test_cli_runner().invoke(args=["proxypool", "held"]).output
    assert "nothing held" in out


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_hold": 1, "max_hold_action": "kill"}, "PROXYPOOL_POOLS['db']['max_hold_action'] must be one of"),
        ({"max_hold_action": "reclaim"}, "PROXYPOOL_POOLS['db']['max_hold_action'] 'reclaim' needs max_hold > 0"),
    ],
)
def test_max_hold_action_is_validated(make_app: MakeApp, settings: dict[str, t.Any], message: str) -> None:
    """A bad max_hold_action, or reclaim without max_hold, is a ConfigError naming the pool and the key."""
    with pytest.raises(ConfigError) as info:
        make_app({"db": {"kind": "sqlite3", "database": ":memory:", "max_size": 1, **settings}})
    assert message in str(info.value)


class _Res:
    """A resource that counts its closes (a second close would be a slot freed twice)."""

    def __init__(self) -> None:
        self.closes = 0


def test_reclaims_racing_returns_lose_nothing() -> None:
    """8 threads take and give back while max_hold reclaims and ended threads race them: every slot is accounted."""
    made: list[_Res] = []
    made_lock = threading.Lock()

    def factory() -> _Res:
        r = _Res()
        with made_lock:
            made.append(r)
        return r

    def close(r: _Res) -> None:
        r.closes += 1

    clock = Clock()
    kind = FactoryKind(factory, close=close)
    pool = Pool(kind, max_size=4, max_hold=1, max_hold_action="reclaim", timeout=86400, clock=clock)  # fake time races
    errors: list[BaseException] = []
    leakers: list[threading.Thread] = []

    def worker(n: int) -> None:
        try:
            for i in range(300):
                r = pool.getconn()
                if i % 50 == 7:
                    leak = threading.Thread(target=pool.getconn, name=f"leak-{n}-{i}")  # takes, ends, never returns
                    leakers.append(leak)
                    leak.start()
                pool.putconn(r)  # quiet even when taken back meanwhile
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    rounds = 0
    while any(th.is_alive() for th in threads):
        clock.now += 2  # everything out is now past max_hold
        maintenance.run_round(pool)
        rounds += 1
    for th in threads + leakers:
        th.join(10)
    assert errors == [] and rounds > 0 and len(leakers) == 8 * 6

    def settled() -> bool:
        maintenance.run_round(pool)  # reclaims the ended threads' resources, closes what they were taken back from
        return sum(r.closes for r in made) == len(made) - pool.stats().idle

    _until(settled)  # nothing lost: what is not idle was closed
    st = pool.stats()
    assert st.in_use == 0 and st.size == st.idle <= 4
    assert all(r.closes <= 1 for r in made)  # nothing closed twice
    assert st.reclaimed == st.closed_by_reason.get("max_hold", 0) + st.closed_by_reason.get("abandoned", 0)
    assert st.reclaimed >= 8 * 6 and st.closed_by_reason.get("abandoned", 0) > 0
    pool.close()
    assert all(r.closes == 1 for r in made)
