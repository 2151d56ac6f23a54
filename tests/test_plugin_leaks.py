"""The pytest plugin keeps nothing of a finished test alive: apps, pools, connections, threads, file handles.

Each check runs a few hundred tests through the plugin in a pytest
subprocess (``runpytest_subprocess``): the fd and thread counts and the
garbage collector are then the inner session's alone. In-process, the outer
suite's own pool workers (which exit up to a second after their pool is
collected) and its PostgreSQL fixture would move the counts, and the
plugin's module state would be shared between the two sessions.
"""

from __future__ import annotations

import json
import typing as t
import uuid
from pathlib import Path

import pytest

from pgserver import PgServer

pytest_plugins = ["pytester"]

#: clean tests per backend and kind, and leaking ones (each leak costs the plugin's close timeout)
ROUNDS = 30
LEAKY = 3
WARMUP = 20

INNER_CONFTEST = """
import gc
import json
import os
import tempfile
import threading
import time
import weakref

import pytest
from flask import Flask
from flask_proxypool import ProxyPool, db

CONNINFO = {conninfo!r}
OUT = {out!r}
PH = {{"psycopg": "%s", "sqlite3": "?"}}

#: (nodeid, what, weakref) of everything a test made that must not outlive it
MADE = []
SAMPLES = []
ALIVE = []
_done = set()


def open_fds():
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{{fd}}"))
        except OSError:
            pass  # the fd listdir itself used
    return fds


@pytest.fixture(params=["sqlite3", "psycopg"])
def settings(request):
    if request.param == "psycopg":
        yield {{"conninfo": CONNINFO}}
        return
    fd, path = tempfile.mkstemp(suffix=".sqlite3")
    os.close(fd)
    yield {{"kind": "sqlite3", "database": path}}
    os.unlink(path)  # what a tmp-file fixture does; a handle kept past here points to a deleted file


def make_app(settings, name="inner"):
    app = Flask(name)
    app.config["PROXYPOOL_POOLS"] = {{"db": {{**settings, "max_size": 2, "timeout": 2}}}}
    ProxyPool(app)
    kind = "sqlite3" if "database" in settings else "psycopg"
    ph = PH[kind]
    with app.app_context():
        db.execute("CREATE TABLE IF NOT EXISTS items (x integer)")
        db.commit()

    @app.post("/items/<int:x>")
    def add(x):
        db.execute(f"INSERT INTO items VALUES ({{ph}})", (x,))
        db.commit()
        return {{"ok": True}}, 201

    @app.get("/items/<int:x>")
    def count(x):
        return {{"n": db.execute(f"SELECT count(*) FROM items WHERE x = {{ph}}", (x,)).fetchone()[0]}}

    return app


def track(request, app):
    \"\"\"Keep weak references to what the test made: the app, its registration, pools, connections.\"\"\"
    nodeid = request.node.nodeid
    state = app.extensions["proxypool"]
    MADE.append((nodeid, "app", weakref.ref(app)))
    MADE.append((nodeid, "AppPools", weakref.ref(state)))
    for pool in state.opened().values():
        MADE.append((nodeid, type(pool).__name__, weakref.ref(pool)))
        conn = getattr(pool, "connection_", None)
        if conn is not None:
            MADE.append((nodeid, type(conn).__name__, weakref.ref(conn)))
        for entry in list(pool._idle) + list(pool._out.values()):
            try:
                MADE.append((nodeid, type(entry.resource).__name__, weakref.ref(entry.resource)))
            except TypeError:
                pass  # a plain sqlite3.Connection takes no weak reference: its fd is watched instead
        if pool._worker is not None:
            MADE.append((nodeid, "worker thread", weakref.ref(pool._worker)))


@pytest.fixture
def app(settings, request):
    app = make_app(settings)
    yield app
    track(request, app)


@pytest.fixture
def tx(proxypool_transaction, request):
    \"\"\"proxypool_transaction, its TransactionPools and their connections tracked.\"\"\"
    yield proxypool_transaction
    for pool in proxypool_transaction.pools.values():
        MADE.append((request.node.nodeid, "TransactionPool", weakref.ref(pool)))
        MADE.append((request.node.nodeid, type(pool.connection_).__name__, weakref.ref(pool.connection_)))


@pytest.fixture
def own_app(settings, request):
    \"\"\"Made in the test body's stead: the plugin, not this fixture, is what closes its pools.\"\"\"
    apps = []
    yield lambda: apps.append(make_app(settings, "own")) or apps[-1]
    for a in apps:
        track(request, a)


def pytest_runtest_logstart(nodeid, location):
    if len(SAMPLES) % 50 == 0 and SAMPLES:
        check_collected()


def os_threads():
    \"\"\"Threads of the process as the OS sees them, once those Python has joined are gone.

    join() returns when the thread's Python state is released, a moment before the OS thread
    exits: poll (bounded) until /proc agrees with threading.enumerate().
    \"\"\"
    deadline = time.monotonic() + 2.0
    while True:
        tasks = len(os.listdir("/proc/self/task"))
        if tasks <= len(threading.enumerate()) or time.monotonic() > deadline:
            return tasks
        time.sleep(0.001)


def pytest_runtest_logfinish(nodeid, location):
    _done.add(nodeid)
    fds = open_fds()
    SAMPLES.append(
        {{
            "fds": len(fds),
            "deleted": sum(1 for f in fds if f.endswith(".sqlite3 (deleted)")),
            "threads": len(threading.enumerate()),
            "tasks": os_threads(),
        }}
    )


def check_collected():
    gc.collect()
    for nodeid, what, ref in MADE:
        if nodeid in _done and ref() is not None:
            ALIVE.append(f"{{nodeid}}: {{what}}")
    MADE[:] = [m for m in MADE if m[2]() is not None]


def pytest_sessionfinish(session):
    check_collected()
    with open(OUT, "w") as f:
        json.dump({{"samples": SAMPLES, "alive": sorted(set(ALIVE))}}, f)
"""

INNER_TESTS = f"""
import threading

import pytest
from flask_proxypool import db

ROUNDS = range({ROUNDS})
LEAKY = range({LEAKY})


@pytest.mark.parametrize("i", ROUNDS)
def test_request(app, client, i):
    assert client.post(f"/items/{{i}}").status_code == 201
    assert client.get(f"/items/{{i}}").json == {{"n": 1}}


@pytest.mark.parametrize("i", ROUNDS)
def test_transaction(app, client, tx, i):
    assert client.post(f"/items/{{1000 + i}}").status_code == 201
    assert client.get(f"/items/{{1000 + i}}").json == {{"n": 1}}


@pytest.mark.parametrize("i", ROUNDS)
def test_app_made_in_the_test(own_app, i):
    app = own_app()
    with app.app_context():
        assert db.execute("SELECT 1").fetchone()[0] == 1


@pytest.mark.parametrize("i", ROUNDS)
def test_thread(app, i):
    got = []

    def work():
        with db.borrow(app) as conn:
            got.append(conn.execute("SELECT 2").fetchone()[0])

    th = threading.Thread(target=work)
    th.start()
    th.join()
    assert got == [2]


@pytest.mark.parametrize("i", LEAKY)
def test_leaks_from_its_own_app(own_app, i):
    own_app().extensions["proxypool"].pool("db").getconn()


@pytest.mark.parametrize("i", LEAKY)
def test_leaks_from_app(app, i):
    app.extensions["proxypool"].pool("db").getconn()
"""


def _run(pytester: pytest.Pytester, pg: PgServer, leak_check: bool) -> tuple[pytest.RunResult, dict[str, t.Any]]:
    out = pytester.path / "leaks.json"
    dbname = f"leaks_{uuid.uuid4().hex[:12]}"  # commits of test_request must not meet another run's
    pg.create_database(dbname)
    pytester.makeconftest(INNER_CONFTEST.format(conninfo=pg.conninfo(dbname), out=str(out)))
    pytester.makeini(f"[pytest]\nfilterwarnings = error\nproxypool_leak_check = {str(leak_check).lower()}\n")
    pytester.makepyfile(test_many=INNER_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=300)
    data: dict[str, t.Any] = json.loads(Path(out).read_text())
    return result, data


def _flat(samples: list[dict[str, int]], key: str) -> tuple[int, int]:
    """(count after the warm-up, highest count afterwards)."""
    later = [s[key] for s in samples[WARMUP:]]
    return later[0], max(later)


@pytest.mark.slow
@pytest.mark.parametrize("leak_check", [False, True], ids=["leak_check_off", "leak_check_on"])
def test_nothing_outlives_its_test(pytester: pytest.Pytester, pg: PgServer, leak_check: bool) -> None:
    """Hundreds of tests (sqlite3 tmp-file and psycopg pools): fds and threads stay flat, nothing stays alive."""
    result, data = _run(pytester, pg, leak_check)
    clean = 2 * 4 * ROUNDS
    leaky = 2 * LEAKY
    if leak_check:
        result.assert_outcomes(passed=clean + leaky, failed=leaky)
    else:
        result.assert_outcomes(passed=clean + 2 * leaky)
    samples = data["samples"]
    assert len(samples) == clean + 2 * leaky
    for key in ("fds", "threads", "tasks"):
        first, top = _flat(samples, key)
        assert top <= first, f"{key}: {first} after {WARMUP} tests, up to {top} later: {[s[key] for s in samples]}"
    assert max(s["deleted"] for s in samples) == 0  # no handle on a deleted sqlite3 file
    assert data["alive"] == []
    # Leaks are reported, then taken back: a test's own app always in the summary, the app fixture's
    # in the summary too unless the leak check failed the test for it.
    summary = result.stdout.str().split("flask_proxypool: pools closed with resources still checked out")[1]
    reported = [line for line in summary.splitlines() if line.startswith("test_many.py::")]
    leakers = ["test_leaks_from_its_own_app"] + ([] if leak_check else ["test_leaks_from_app"])
    expected = [f"test_many.py::{f}[{b}-{i}]:" for f in leakers for b in ("sqlite3", "psycopg") for i in range(LEAKY)]
    assert sorted(reported) == sorted(expected)
