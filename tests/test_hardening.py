"""Faults and misuse: forks, long-held and leaked resources, checks that hang."""

from __future__ import annotations

import logging
import os
import threading
import time
import typing as t

import psycopg
import pytest
from flask import Flask

from conftest import wait_until
from flask_proxypool import Pool, db, maintenance
from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.kinds.psycopg import PsycopgKind

MakeApp = t.Callable[..., Flask]


def test_fork_recreates_pool_without_closing_parent_sockets(conninfo: str) -> None:
    """A pool used before fork() is rebuilt empty in the child; the parent's connection stays alive."""
    with Pool(PsycopgKind(conninfo), max_size=2) as pool:
        with pool.connection() as conn:
            parent_pid = conn.pgconn.backend_pid
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child, reports through the pipe
            code = 1
            try:
                import gc

                gc.collect()  # would close the inherited connection if the pool had let go of it
                st = pool.stats()
                with pool.connection() as c:
                    pid = c.pgconn.backend_pid
                os.write(write, f"{st.size} {st.idle} {pid}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(child, 0)
        report = os.read(read, 100).decode().split()
        os.close(read)
        assert os.waitstatus_to_exitcode(status) == 0
        size, idle, child_pid = (int(x) for x in report)
        assert (size, idle) == (0, 0)  # nothing inherited
        assert child_pid != parent_pid  # the child made its own
        with pool.connection() as conn:  # the parent's connection survived the child's exit
            assert conn.pgconn.backend_pid == parent_pid
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool.stats().closed == 0


def test_max_hold_logged_once_with_endpoint(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    """A resource held past max_hold is logged once, naming the pool and the endpoint, and counted."""
    app = make_app({"db": {"kind": "sqlite3", "database": ":memory:", "max_size": 1, "max_hold": 0.05}})
    caplog.set_level(logging.WARNING, logger="flask_proxypool")

    @app.get("/hold")
    def hold() -> str:
        db.execute("SELECT 1")
        pool = app.extensions["proxypool"].pool("db")
        wait_until(lambda: pool.stats().long_held > 0, 5, interval=0.01)  # the background worker reports it
        for _ in range(3):  # more rounds, driven here: it must not be reported again
            maintenance.run_round(pool)
        return str(pool.stats().long_held)

    assert app.test_client().get("/hold").text == "1"
    lines = [r.getMessage() for r in caplog.records if "held for" in r.getMessage()]
    assert len(lines) == 1
    assert "'db'" in lines[0] and "hold" in lines[0]
    assert app.extensions["proxypool"].pool("db").stats().in_use == 0


def test_borrow_in_dying_thread_is_returned(make_app: MakeApp) -> None:
    """A thread that dies inside `with db.borrow(app)` still gives the resource back."""
    app = make_app({"db": {"kind": "sqlite3", "database": "x.sqlite3", "max_size": 1}})
    died: list[BaseException] = []

    def job() -> None:
        try:
            with db.borrow(app) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
                raise SystemExit("thread dies")
        except BaseException as e:
            died.append(e)

    th = threading.Thread(target=job)
    th.start()
    th.join(10)
    assert len(died) == 1 and isinstance(died[0], SystemExit)
    st = app.extensions["proxypool"].pool("db").stats()
    assert (st.in_use, st.idle) == (0, 1)


class _Hanging:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = False

    def check(self) -> None:
        self.release.wait(30)  # hangs until the test lets it go

    def close(self) -> None:
        self.closed = True


def test_hanging_health_check_is_bounded() -> None:
    """A check that hangs is abandoned after check_timeout; the pool keeps serving."""
    made: list[_Hanging] = []

    def factory() -> _Hanging:
        made.append(_Hanging())
        return made[-1]

    kind = FactoryKind(factory, check="check", close="close")
    with Pool(kind, max_size=1, health_check_interval=0.01, check_timeout=0.1) as pool:
        with pool.connection():
            pass
        deadline = time.monotonic() + 5
        while pool.stats().closed_by_reason.get("check_timeout", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # bounded poll: the worker's health check times out
        assert pool.stats().closed_by_reason.get("check_timeout") == 1
        t0 = time.monotonic()
        with pool.connection() as r:
            assert r is not made[0]
        assert time.monotonic() - t0 < 1.0
        for h in made:
            h.release.set()
        deadline = time.monotonic() + 5
        while not made[0].closed and time.monotonic() < deadline:
            time.sleep(0.01)  # closed in the background once the check lets go
        assert made[0].closed


def test_hanging_checkout_query_is_bounded() -> None:
    """liveness='query' with a check that hangs: getconn discards it after check_timeout and makes a new one."""
    made: list[_Hanging] = []

    def factory() -> _Hanging:
        made.append(_Hanging())
        return made[-1]

    kind = FactoryKind(factory, check="check", close="close")
    with Pool(kind, max_size=1, liveness="query", liveness_after=0, check_timeout=0.1, health_check_interval=0) as pool:
        first = pool.getconn()
        pool.putconn(first)
        t0 = time.monotonic()
        second = pool.getconn()
        elapsed = time.monotonic() - t0
        pool.putconn(second)
        first.release.set()
        st = pool.stats()
    assert second is not first
    assert 0.1 <= elapsed < 1.0
    assert st.closed_by_reason == {"check_timeout": 1} and st.checkouts == 2


def test_returned_twice_from_teardown_keeps_pool_whole(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    """A view that stores the real connection and returns it itself: the teardown's return is refused, logged."""
    app = make_app({"db": {"kind": "sqlite3", "database": "x.sqlite3", "max_size": 2}})
    pool = app.extensions["proxypool"].pool("db")

    @app.get("/")
    def index() -> str:
        pool.putconn(db._get_current_object())  # misuse: gives back what the context holds
        return "ok"

    assert app.test_client().get("/").status_code == 200
    st = pool.stats()
    assert (st.size, st.idle, st.in_use) == (1, 1, 0)
    assert any("not checked out" in r.getMessage() for r in caplog.records)


def test_psycopg_check_on_checkout_query(conninfo: str) -> None:
    """liveness='query' costs a round trip but finds a backend killed behind our back."""
    with Pool(PsycopgKind(conninfo), max_size=1, liveness="query", liveness_after=0) as pool:
        with pool.connection() as c:
            pid = c.pgconn.backend_pid
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pool.connection() as c:
            assert c.pgconn.backend_pid != pid
        assert pool.stats().closed_by_reason == {"broken": 1}


def test_max_waiting_refuses_at_once(make_app: MakeApp) -> None:
    """With max_waiting waiters queued, the next request is refused with 503 at once, not after `timeout`."""
    app = make_app({"db": {"kind": "sqlite3", "database": "x.sqlite3", "max_size": 1, "max_waiting": 1, "timeout": 5}})
    pool = app.extensions["proxypool"].pool("db")

    @app.get("/")
    def index() -> str:
        db.execute("SELECT 1")
        return "ok"

    held = pool.getconn()
    queued: list[int] = []
    waiter = threading.Thread(target=lambda: queued.append(app.test_client().get("/").status_code))
    waiter.start()
    deadline = time.monotonic() + 5
    while pool.stats().waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # bounded poll until the first request is queued
    t0 = time.monotonic()
    r = app.test_client().get("/")
    elapsed = time.monotonic() - t0
    pool.putconn(held)
    waiter.join(10)
    assert (r.status_code, r.json["detail"]) == (503, "too many requests waiting for a resource")
    assert elapsed < 1.0
    assert queued == [200]
    st = pool.stats()
    assert (st.refused, st.in_use, st.waiting) == (1, 0, 0)


def test_failed_probe_is_not_asked_again() -> None:
    """A resource whose liveness probe says no once is discarded, even if a second probe would say yes."""

    class Flaky:
        def __init__(self) -> None:
            self.answers = [False]  # the first probe fails, any later one would pass

        def alive(self) -> bool:
            return self.answers.pop() if self.answers else True

    made: list[Flaky] = []

    def factory() -> Flaky:
        made.append(Flaky())
        return made[-1]

    with Pool(FactoryKind(factory, alive="alive"), max_size=1, liveness_after=0, health_check_interval=0) as pool:
        first = pool.getconn()
        pool.putconn(first)
        second = pool.getconn()
        pool.putconn(second)
        st = pool.stats()
    assert second is not first
    assert st.closed_by_reason == {"broken": 1} and st.errors == 1
