"""No dead backend is handed out, whatever the delay since its return: the checkout test runs every time."""

from __future__ import annotations

import time
import typing as t

import pytest
from flask import Flask

from conftest import backends
from flask_proxypool import db
from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.pool import Pool
from pgserver import PgServer

MakeApp = t.Callable[..., Flask]

#: the liveness setting under test: the default (key absent) and the round-trip check
MODES = [pytest.param({}, id="default-poll"), pytest.param({"liveness": "query"}, id="query")]


def _pid_app(make_app: MakeApp, conninfo: str, **options: t.Any) -> Flask:
    app = make_app({"db": {"conninfo": conninfo, "max_size": 1, **options}})

    @app.get("/pid")
    def pid() -> dict[str, int]:
        return {"pid": db.execute("SELECT pg_backend_pid()").fetchone()[0]}

    return app


def _wait_gone(pg: PgServer, appname: str, pids: set[int]) -> None:
    """Bounded poll until the server no longer lists ``pids``: each backend has exited, so its
    FATAL message and the end of the stream are in our socket's receive queue."""
    deadline = time.monotonic() + 10
    while {pid for pid, _ in backends(pg, appname)} & pids:
        assert time.monotonic() < deadline, f"backends {pids} still listed after 10 s"
        time.sleep(0.005)


@pytest.mark.parametrize("delay", [0.05, 0.5])
@pytest.mark.parametrize("mode", MODES)
def test_backend_terminated_after_return_is_not_handed_out(
    make_app: MakeApp, conninfo: str, pg: PgServer, appname: str, mode: dict[str, str], delay: float
) -> None:
    """A backend terminated `delay` s after its connection was returned: the next request gets a working one."""
    app = _pid_app(make_app, conninfo, **mode)
    client = app.test_client()
    r = client.get("/pid")
    returned = time.monotonic()  # the teardown gave the connection back before the response was complete
    assert r.status_code == 200
    old = r.json["pid"]
    time.sleep(delay)  # the scenario itself: the backend dies this long after the return, not a wait for a result
    # with a timeout the server answers once the backend has exited (True: its FATAL and the end of the
    # stream are in our socket's receive queue), or after 10 s (False)
    assert pg.psql(f"SELECT pg_terminate_backend({old}, 10000)") == [(True,)]
    # the case the former default (liveness_after=1 s) skipped: back less than a second ago
    assert time.monotonic() - returned < 1.0, "too slow to test the window"
    r = client.get("/pid")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.json["pid"] != old
    st = app.extensions["proxypool"].pool("db").stats()
    assert st.closed_by_reason == {"broken": 1}
    assert (st.size, st.idle, st.in_use, st.waiting) == (1, 1, 0, 0)


@pytest.mark.parametrize("mode", MODES)
def test_server_restart_every_idle_connection_replaced(
    make_app: MakeApp, conninfo: str, pg: PgServer, appname: str, mode: dict[str, str]
) -> None:
    """After a server restart, the next 4 checkouts from a pool of 4 idle connections all work."""
    app = make_app({"db": {"conninfo": conninfo, "max_size": 4, **mode}})
    pool = app.extensions["proxypool"].pool("db")
    held = [pool.getconn() for _ in range(4)]
    old = {c.pgconn.backend_pid for c in held}
    for c in held:
        pool.putconn(c)
    assert pool.stats().idle == 4
    pg.restart()  # fast shutdown: every backend is told to terminate, then the server starts again
    _wait_gone(pg, appname, old)
    held = [pool.getconn() for _ in range(4)]
    try:
        for c in held:
            assert c.execute("SELECT 1").fetchone() == (1,)
        assert not {c.pgconn.backend_pid for c in held} & old
    finally:
        for c in held:
            pool.putconn(c)
    st = pool.stats()
    assert st.closed_by_reason == {"broken": 4}
    assert (st.size, st.idle, st.in_use, st.waiting) == (4, 4, 0, 0)


@pytest.mark.parametrize("liveness_after", [0.0, 5.0])
def test_query_checks_every_checkout_whatever_liveness_after(liveness_after: float) -> None:
    """liveness 'query' runs the full check on every checkout of an idle resource; liveness_after is for 'poll'."""
    checks: list[object] = []
    clock = [1000.0]
    kind = FactoryKind(object, check=checks.append)
    options: dict[str, t.Any] = {"health_check_interval": 0, "clock": lambda: clock[0]}
    with Pool(kind, max_size=1, liveness="query", liveness_after=liveness_after, **options) as pool:
        r = pool.getconn()
        for n in range(1, 4):
            pool.putconn(r)
            clock[0] += 0.01  # well within liveness_after
            assert pool.getconn() is r
            assert len(checks) == n
        pool.putconn(r)


def test_poll_skipped_only_within_10_ms_of_the_return_by_default() -> None:
    """The default pool polls a resource idle 10 ms or more, skips one back sooner; liveness_after=0 polls always."""
    polls: list[object] = []
    clock = [1000.0]

    def alive(r: object) -> bool:
        polls.append(r)
        return True

    options: dict[str, t.Any] = {"max_size": 1, "health_check_interval": 0, "clock": lambda: clock[0]}
    with Pool(FactoryKind(object, alive=alive), **options) as pool:
        assert pool.liveness == "poll" and pool.liveness_after == 0.01
        r = pool.getconn()
        pool.putconn(r)
        assert pool.getconn() is r and polls == []  # back a moment ago: no system call
        pool.putconn(r)
        clock[0] += 0.01
        assert pool.getconn() is r and polls == [r]  # idle 10 ms: polled
        pool.putconn(r)
    with Pool(FactoryKind(object, alive=alive), liveness_after=0, **options) as pool:
        r = pool.getconn()
        for n in range(1, 4):
            pool.putconn(r)
            assert pool.getconn() is r  # not even a clock tick since the return
            assert len(polls) == 1 + n
        pool.putconn(r)
