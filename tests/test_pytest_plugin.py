"""The pytest plugin (flask_proxypool.testing): test transactions and leak checks.

The plugin is loaded through its pytest11 entry point, here and in the inner
pytest runs made with pytester, exactly as in a user's project.
"""

from __future__ import annotations

import sqlite3
import typing as t
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from flask import Flask

from flask_proxypool import ProxyPool, UsageError, db
from flask_proxypool.testing import ProxyPoolTransaction, assert_all_returned
from flask_proxypool.testing.sqlite3 import _statements
from pgserver import PgServer

pytest_plugins = ["pytester"]

BACKENDS = ["psycopg", "sqlite3"]


def _count(conn: t.Any, table: str = "items") -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _closed(conn: t.Any) -> bool:
    if isinstance(conn, sqlite3.Connection):
        try:
            sqlite3.Connection.execute(conn, "SELECT 1")
        except sqlite3.ProgrammingError:
            return True
        return False
    return bool(conn.closed)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, t.Any], t.Any]]:
    """(kind, pool settings, a function opening an independent connection) with an empty table ``items``."""
    if request.param == "psycopg":
        pg: PgServer = request.getfixturevalue("pg")
        name = f"pt_{tmp_path.name.replace('-', '_').lower()}"[:60]
        pg.create_database(name)
        conninfo = pg.conninfo(name)

        def connect() -> t.Any:
            return psycopg.connect(conninfo, autocommit=True)

        settings: dict[str, t.Any] = {"conninfo": conninfo}
    else:
        path = str(tmp_path / "app.sqlite3")

        def connect() -> t.Any:
            return sqlite3.connect(path, isolation_level=None)

        settings = {"kind": "sqlite3", "database": path}
    c = connect()
    c.execute("CREATE TABLE items (x integer primary key)")
    c.close()
    yield request.param, settings, connect


# -- the emulation, driven directly ------------------------------------------------


@pytest.fixture
def tx_app(backend: tuple[str, dict[str, t.Any], t.Any], tmp_path: Path) -> Iterator[Flask]:
    """An app with one pool on the backend, its views committing in the ways apps do."""
    kind, settings, _ = backend
    app = Flask("txapp", instance_path=str(tmp_path / "instance"))
    app.config["PROXYPOOL_POOLS"] = {"db": {**settings, "max_size": 2}}
    ProxyPool(app)
    ph = "%s" if kind == "psycopg" else "?"

    @app.post("/commit/<int:x>")
    def commit(x: int) -> tuple[str, int]:
        db.execute(f"INSERT INTO items VALUES ({ph})", (x,))
        db.commit()
        return "", 201

    @app.post("/block/<int:x>")
    def block(x: int) -> tuple[str, int]:
        with db.transaction() if kind == "psycopg" else db:
            db.execute(f"INSERT INTO items VALUES ({ph})", (x,))
        return "", 201

    @app.post("/nocommit/<int:x>")
    def nocommit(x: int) -> tuple[str, int]:
        db.execute(f"INSERT INTO items VALUES ({ph})", (x,))
        return "", 201

    @app.post("/fail/<int:x>")
    def fail(x: int) -> str:
        db.execute(f"INSERT INTO items VALUES ({ph})", (x,))
        raise RuntimeError("boom")

    @app.post("/nested/<int:x>")
    def nested(x: int) -> tuple[str, int]:
        db.execute(f"INSERT INTO items VALUES ({ph})", (x,))
        with db.borrow() as conn:  # the same thread asks again: it shares the connection
            n = _count(conn)
        db.commit()
        return str(n), 201

    @app.get("/count")
    def count() -> str:
        return str(_count(db))

    yield app
    app.extensions["proxypool"].close(timeout=1.0)


def test_commits_stay_inside_the_test_transaction(tx_app: Flask, backend: t.Any) -> None:
    """Commits, transaction blocks and failures behave as outside a test; finish() leaves the database unchanged."""
    _, _, connect = backend
    app = tx_app
    client = app.test_client()
    tx = ProxyPoolTransaction(app, ["db"])
    try:
        assert client.post("/commit/1").status_code == 201
        assert client.post("/block/2").status_code == 201
        assert client.post("/nocommit/3").status_code == 201  # rolled back at teardown
        app.testing = False
        assert client.post("/fail/4").status_code == 500
        app.testing = True
        assert client.post("/nested/5").data == b"3"
        assert client.get("/count").data == b"3"
        assert _count(tx.connection("db")) == 3
        with app.app_context():
            assert [r[0] for r in db.execute("SELECT x FROM items ORDER BY x")] == [1, 2, 5]
        outside = connect()
        assert _count(outside) == 0  # nothing committed for real
        outside.close()
        assert app.extensions["proxypool"].stats()["db"].in_use == 0
    finally:
        tx.finish()
    outside = connect()
    assert _count(outside) == 0
    outside.close()
    assert app.extensions["proxypool"].pool("db") is not tx.pools["db"]  # the app's own pool is back
    assert _closed(tx.pools["db"].connection_)


def test_finish_waits_for_a_context_still_holding_the_connection(tx_app: Flask) -> None:
    """A context pushed before the swap and popped after finish() gives the connection back, then it ends."""
    app = tx_app
    ctx = app.app_context()
    ctx.push()
    tx = ProxyPoolTransaction(app, ["db"])
    db.execute("INSERT INTO items VALUES (7)")
    db.commit()
    tx.finish()
    assert not _closed(tx.pools["db"].connection_)  # still held by ctx
    assert app.extensions["proxypool"].pool("db") is tx.pools["db"]
    ctx.pop()
    assert _closed(tx.pools["db"].connection_)
    assert app.extensions["proxypool"].pool("db") is not tx.pools["db"]
    with app.app_context():
        assert _count(db) == 0


def test_psycopg_autocommit_and_transaction_state(pg: PgServer, tmp_path: Path) -> None:
    """An autocommit pool keeps each statement, drops a failed one; in-transaction state is the app's view."""
    name = f"pt_{tmp_path.name.replace('-', '_').lower()}"[:60]
    pg.create_database(name)
    conninfo = pg.conninfo(name)
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute("CREATE TABLE items (x integer primary key)")
    app = Flask("ac", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {
        "ac": {"conninfo": conninfo, "autocommit": True},
        "db": {"conninfo": conninfo, "release": "commit", "on_return": "commit"},
    }
    ProxyPool(app)
    tx = ProxyPoolTransaction(app, ["ac", "db"])
    try:
        state = app.extensions["proxypool"]
        conn = tx.connection("ac")
        pool = state.pool("ac")
        c = pool.getconn()
        c.execute("INSERT INTO items VALUES (1)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("INSERT INTO items VALUES (1)")
        c.execute("INSERT INTO items VALUES (2)")  # the failed statement did not poison the rest
        c.rollback()  # a no-op in autocommit mode
        with c.transaction():
            c.execute("INSERT INTO items VALUES (3)")
        pool.putconn(c)
        assert _count(conn) == 3
        c = pool.getconn()
        c.autocommit = False  # allowed: nothing open
        c.execute("INSERT INTO items VALUES (4)")
        with pytest.raises(psycopg.ProgrammingError, match="INTRANS"):
            c.autocommit = True
        with c.transaction():
            with pytest.raises(psycopg.ProgrammingError, match="forbidden"):
                c.commit()
        pool.putconn(c)  # reset rolls 4 back
        assert _count(conn) == 3
        c = pool.getconn()
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT 1/0")
        c.commit()  # COMMIT of a failed transaction rolls back, as the server does
        assert _count(c) == 3
        c.rollback()
        c.autocommit = True
        pool.putconn(c)
        # release: commit + on_return: commit
        with app.test_request_context():
            db.execute("INSERT INTO items VALUES (10)")
            assert state.pool("db").stats().in_use == 1
            db.commit()
            assert state.pool("db").stats().in_use == 0  # released at commit
            db.execute("INSERT INTO items VALUES (11)")
        with app.app_context():
            assert _count(db) == 2  # on_return: commit kept 11; each pool has its own transaction
    finally:
        tx.finish()
        state.close(timeout=1.0)
    with psycopg.connect(conninfo) as c:
        assert _count(c) == 0


def test_sqlite3_statements_and_scripts(tmp_path: Path) -> None:
    """sqlite3: BEGIN/COMMIT statements, executescript, in_transaction and autocommit DDL behave as outside a test."""
    path = str(tmp_path / "s.sqlite3")
    app = Flask("s", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {"db": {"kind": "sqlite3", "database": path}}
    ProxyPool(app)
    tx = ProxyPoolTransaction(app, ["db"])
    try:
        pool = app.extensions["proxypool"].pool("db")
        c = pool.getconn()
        c.executescript("CREATE TABLE a (x); -- a comment; with a semicolon\nINSERT INTO a VALUES (';');")
        assert not c.in_transaction
        c.execute("INSERT INTO a VALUES (1)")
        assert c.in_transaction
        c.rollback()
        assert not c.in_transaction
        c.execute("CREATE TABLE b (x)")  # DDL outside a transaction: autocommitted
        c.execute("BEGIN")
        c.execute("INSERT INTO b VALUES (1)")
        c.execute("COMMIT")
        c.execute("INSERT INTO b VALUES (2)")
        c.execute("ROLLBACK")
        with c:
            c.executemany("INSERT INTO b VALUES (?)", [(3,), (4,)])
        pool.putconn(c)
        c = pool.getconn()
        assert c.execute("SELECT x FROM a").fetchall() == [(";",)]
        assert c.execute("SELECT x FROM b ORDER BY x").fetchall() == [(1,), (3,), (4,)]
        c.close()  # ignored during the test
        pool.putconn(c)
    finally:
        tx.finish()
    outside = sqlite3.connect(path)
    assert outside.execute("SELECT name FROM sqlite_master").fetchall() == []
    outside.close()


def test_sqlite3_in_memory_database_is_copied(tmp_path: Path) -> None:
    """An in-memory sqlite3 pool runs the test on a copy of the app's database."""
    app = Flask("m", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {"db": {"kind": "sqlite3", "database": ":memory:", "max_size": 1}}
    ProxyPool(app)
    with app.app_context():
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (1)")
        db.commit()
    tx = ProxyPoolTransaction(app, ["db"])
    try:
        with app.app_context():
            db.execute("INSERT INTO t VALUES (2)")
            db.commit()
            assert _count(db, "t") == 2
    finally:
        tx.finish()
    with app.app_context():
        assert _count(db, "t") == 1
    app.extensions["proxypool"].close(timeout=1.0)


def test_only_transactional_pools(tmp_path: Path) -> None:
    """Naming a factory pool or an unknown one is a UsageError saying which pools can be used."""
    app = Flask("f", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {"ldap": {"factory": dict}, "db": {"kind": "sqlite3"}}
    ProxyPool(app)
    with pytest.raises(UsageError, match="'ldap' is a factory pool"):
        ProxyPoolTransaction(app, ["db", "ldap"])
    assert app.extensions["proxypool"].opened() == {}  # the db swap was undone
    with pytest.raises(UsageError, match="no pool 'nope'.*db, ldap"):
        ProxyPoolTransaction(app, ["nope"])


def test_split_statements() -> None:
    """Scripts split where SQLite would: not inside strings, comments or triggers."""
    script = """
        CREATE TABLE t (x); -- one; still a comment
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET x = 1; END;
        INSERT INTO t VALUES ('a;b');
        /* only a comment */
    """
    statements = list(_statements(script))
    assert [s.split("\n")[-1].split()[0] for s in statements] == ["CREATE", "CREATE", "INSERT"]
    assert statements[2].endswith("('a;b');")


def test_assert_all_returned_names_pool_and_holder(tmp_path: Path) -> None:
    """assert_all_returned passes when all is back and names the pool and holder when not."""
    app = Flask("leaky", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {"db": {"kind": "sqlite3"}}
    ProxyPool(app)
    assert_all_returned(app)
    pool = app.extensions["proxypool"].pool("db")
    conn = pool.getconn(holder="items.create")
    with pytest.raises(AssertionError, match=r"1 resource\(s\) still checked out:\n  pool 'db' of app 'leaky'") as e:
        assert_all_returned(app)
    assert "taken by request 'items.create'" in str(e.value)
    assert_all_returned(app, pools=["other"])
    pool.putconn(conn)
    assert_all_returned(app)
    app.extensions["proxypool"].close(timeout=1.0)


# -- the fixtures and markers, through inner pytest runs ----------------------------------

INNER_CONFTEST = """
import pytest
from flask import Flask, current_app
from flask_proxypool import ProxyPool, db

KIND = {kind!r}
SETTINGS = {settings!r}
PH = "%s" if KIND == "psycopg" else "?"


def create_app():
    app = Flask("inner")
    app.config["PROXYPOOL_POOLS"] = {{"db": {{**SETTINGS, "max_size": 4, "timeout": 2}}}}
    ProxyPool(app)

    @app.post("/items/<int:x>")
    def add(x):
        db.execute(f"INSERT INTO items VALUES ({{PH}})", (x,))
        db.commit()
        return {{"ok": True}}, 201

    @app.get("/items")
    def items():
        return {{"items": [r[0] for r in db.execute("SELECT x FROM items ORDER BY x")]}}

    @app.get("/leak")
    def leak():
        current_app.extensions["proxypool"].pool("db").getconn()
        return "leaked"

    return app


@pytest.fixture
def app():
    app = create_app()
    yield app
    app.extensions["proxypool"].close(timeout=0.05)
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, backend: tuple[str, dict[str, t.Any], t.Any]) -> pytest.Pytester:
    """A pytester project whose conftest gives an ``app`` on the backend."""
    kind, settings, _ = backend
    pytester.makeconftest(INNER_CONFTEST.format(kind=kind, settings=settings))
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    return pytester


def test_fixture_rolls_back_each_test(inner: pytest.Pytester, backend: t.Any) -> None:
    """A view's committed insert is visible in its test and gone in the next one and after the run."""
    _, _, connect = backend
    inner.makepyfile(
        test_tx="""
        import pytest
        from flask_proxypool import db

        def test_insert(client, proxypool_transaction):
            assert client.post("/items/1").status_code == 201
            assert client.get("/items").json == {"items": [1]}
            assert db.execute("SELECT count(*) FROM items").fetchone()[0] == 1
            assert proxypool_transaction.connection("db").execute("SELECT count(*) FROM items").fetchone()[0] == 1

        @pytest.mark.proxypool_transaction
        def test_marker(client):
            assert client.get("/items").json == {"items": []}
            assert client.post("/items/2").status_code == 201
            assert client.get("/items").json == {"items": [2]}

        @pytest.mark.proxypool_transaction("db")
        def test_marker_with_names(client):
            assert client.post("/items/3").status_code == 201

        def test_without_fixture(client):
            assert client.get("/items").json == {"items": []}
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=4)
    assert "ending the test transaction failed" not in result.stdout.str()
    conn = connect()
    assert _count(conn) == 0
    if isinstance(conn, psycopg.Connection):  # every connection of the run was closed
        others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        assert conn.execute(others).fetchone()[0] == 0
    conn.close()


def test_ini_selects_pools(inner: pytest.Pytester) -> None:
    """proxypool_transaction_pools names the pools to wrap; an unknown one fails with the app's pool names."""
    inner.makeini("[pytest]\nfilterwarnings = error\nproxypool_transaction_pools = db nope\n")
    inner.makepyfile(
        test_ini="""
        def test_names(proxypool_transaction):
            pass
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*UsageError: proxypool_transaction: app 'inner' has no pool 'nope'*"])


LEAKS = """
import threading
import pytest
from flask_proxypool import db, maintenance

@pytest.mark.proxypool_no_leaks
def test_getconn_never_returned(app):
    pool = app.extensions["proxypool"].pool("db")
    conn = pool.getconn()

@pytest.mark.proxypool_no_leaks
def test_view_leaks(app, client):
    assert client.get("/leak").status_code == 200

def test_thread_leaks(app, proxypool_leak_check):
    pool = app.extensions["proxypool"].pool("db")
    th = threading.Thread(target=lambda: pool.getconn(), name="worker-1")
    th.start()
    th.join()
    maintenance.run_round(pool)  # the pool takes back what the ended thread held: still this test's leak
    assert pool.stats().reclaimed == 1

@pytest.mark.proxypool_no_leaks
def test_leak_in_test_transaction(app, proxypool_transaction):
    app.extensions["proxypool"].pool("db").getconn()

@pytest.fixture
def hoarder(app):
    return app.extensions["proxypool"].pool("db").getconn()

@pytest.mark.proxypool_no_leaks
def test_fixture_leaks(app, hoarder):
    pass

@pytest.fixture
def borrowed(app):
    with db.borrow(app) as conn:
        yield conn

@pytest.mark.proxypool_no_leaks
def test_ok(app, client, borrowed):
    db.execute("SELECT 1")  # held by pytest-flask's request context until it is popped
    with db.borrow() as conn:
        conn.execute("SELECT 1")
    assert client.get("/items").status_code == 200

def test_ok_checked_mid_test(app, proxypool_leak_check):
    with app.app_context():
        db.execute("SELECT 1")
    proxypool_leak_check()  # everything is back now
"""


def test_leaks_fail_the_test_naming_pool_and_holder(inner: pytest.Pytester) -> None:
    """A leak fails its test, naming the pool, the holder, the thread and the line that took it."""
    inner.makepyfile(test_leaks=LEAKS)
    result = inner.runpytest()
    result.assert_outcomes(passed=3, failed=4, errors=1)  # test_fixture_leaks passes, then errors
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*_ test_getconn_never_returned _*",
            "flask_proxypool: the test left 1 resource(s) checked out:",
            "  pool 'db' of app 'inner' (*):",
            "    - taken by code outside a request in thread 'MainThread' during test call, "
            "at test_leaks.py:8 in test_getconn_never_returned: conn = pool.getconn() (out for *",
            "Give every resource back:*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_view_leaks _*",
            "    - taken by request 'leak' in thread 'MainThread' during test call, at conftest.py:* in leak: "
            "current_app.extensions*.getconn() (out for *",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*_ test_thread_leaks _*", "*in thread 'worker-1' during test call, at test_leaks.py:*"]
    )
    result.stdout.fnmatch_lines(
        ["*_ test_leak_in_test_transaction _*", "  pool 'db' of app 'inner' (*(test transaction)):"]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_fixture_leaks*",
            "*during test setup, at test_leaks.py:* in hoarder:*",
            "(still out after the test's fixtures were torn down)",
        ]
    )
    assert "test_ok" not in out.split("short test summary info")[1]


def test_ini_checks_every_app_test(inner: pytest.Pytester) -> None:
    """proxypool_leak_check = true checks every test that uses the app fixture."""
    inner.makeini("[pytest]\nfilterwarnings = error\nproxypool_leak_check = true\n")
    inner.makepyfile(
        test_all="""
        def test_leaks(app):
            app.extensions["proxypool"].pool("db").getconn()

        def test_no_app():
            pass
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_all.py::test_leaks - Failed: flask_proxypool: the test left 1*"])


def test_markers_need_an_app_fixture(pytester: pytest.Pytester) -> None:
    """The markers on a test without an ``app`` fixture fail with what is missing."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.proxypool_no_leaks
        def test_x():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*flask_proxypool markers need an 'app' fixture*"])


# -- apps made by tests and fixtures: closed when their test (or fixture) ends ------------

SCOPES_CONFTEST = """
import pytest
from flask import Flask
from flask_proxypool import ProxyPool


def make(name, tmp):
    app = Flask(name)
    app.config["PROXYPOOL_POOLS"] = {"db": {"kind": "sqlite3", "database": str(tmp / "db.sqlite3")}}
    ProxyPool(app)
    return app


@pytest.fixture(scope="session")
def seen():
    return {}


@pytest.fixture(scope="session")
def session_app(tmp_path_factory, seen):
    app = make("session_app", tmp_path_factory.mktemp("s"))
    yield app
    seen["session closed by its own teardown"] = app.extensions["proxypool"].pool("db").closed


@pytest.fixture(scope="module")
def module_app(tmp_path_factory):
    return make("module_app", tmp_path_factory.mktemp("m"))


@pytest.fixture
def own(tmp_path):
    \"\"\"A factory fixture that keeps the apps it made for the test and leaves closing them to the plugin.\"\"\"
    apps = []
    yield lambda name: apps.append(make(name, tmp_path)) or apps[-1]


def pytest_sessionfinish(session):
    import flask_proxypool.extension as ext

    left = sorted((r.app_name, sorted(r.opened())) for r in ext.registrations())
    print("\\nregistrations left with pools open:", [r for r in left if r[1]])
"""

SCOPES_A = """
def use(app):
    pool = app.extensions["proxypool"].pool("db")
    with pool.connection() as conn:
        conn.execute("SELECT 1")
    return pool


def test_first(session_app, module_app, own, seen):
    seen["session"] = use(session_app)
    seen["module"] = use(module_app)
    seen["own"] = use(own("own"))


def test_second(session_app, module_app, seen):
    assert seen["own"].closed  # made in test_first: closed when it ended
    assert seen["own"].stats().size == 0
    for key, app in (("session", session_app), ("module", module_app)):
        assert use(app) is seen[key] and not seen[key].closed
        assert seen[key].stats().created == 1  # the same connection, kept between tests
"""

SCOPES_B = """
def test_third(session_app, seen):
    assert seen["module"].closed  # test_a.py's module fixture was finalized
    assert not seen["session"].closed
"""


def test_apps_are_closed_with_the_test_or_fixture_that_made_them(pytester: pytest.Pytester) -> None:
    """A test's own apps are closed when it ends; a module or session fixture's when that fixture is finalized."""
    pytester.makeconftest(SCOPES_CONFTEST)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(test_a=SCOPES_A, test_b=SCOPES_B)
    result = pytester.runpytest("-s", "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["registrations left with pools open: []"])
    assert "pools closed with resources still checked out" not in result.stdout.str()


def test_leak_check_covers_apps_made_in_the_test(pytester: pytest.Pytester) -> None:
    """Under the leak check, a resource left out of an app the test made fails the test; without, it is reported."""
    pytester.makeconftest(SCOPES_CONFTEST)
    pytester.makepyfile(
        test_own="""
        import pytest

        @pytest.fixture
        def app(own):
            return own("fixture_app")

        def test_leaks(app, own):
            own("own_app").extensions["proxypool"].pool("db").getconn()
        """
    )
    for leak_check, outcome in (("true", {"errors": 1, "passed": 1}), ("false", {"passed": 1})):
        pytester.makeini(f"[pytest]\nfilterwarnings = error\nproxypool_leak_check = {leak_check}\n")
        result = pytester.runpytest()
        result.assert_outcomes(**outcome)
        lines = [
            "  pool 'db' of app 'own_app' (sqlite3: *db.sqlite3):",
            "    - taken by code outside a request (out for 0.2* s)",
        ]
        if leak_check == "true":
            lines.insert(0, "flask_proxypool: 1 resource(s) of apps made in the test still checked out when it ended:")
        else:
            title = "*= flask_proxypool: pools closed with resources still checked out =*"
            lines[:0] = [title, "test_own.py::test_leaks:"]
        result.stdout.fnmatch_lines(lines)


def test_a_session_app_keeps_nothing_of_finished_tests(pytester: pytest.Pytester) -> None:
    """With a session-wide app, each test's TransactionPool, connection and leak-check watch go with the test."""
    pytester.makeconftest(SCOPES_CONFTEST)
    pytester.makeini("[pytest]\nfilterwarnings = error\nproxypool_leak_check = true\n")
    pytester.makepyfile(
        test_session="""
        import gc
        import weakref

        import pytest
        from flask_proxypool import db
        from flask_proxypool.testing import records

        @pytest.fixture
        def app(session_app):
            return session_app

        @pytest.mark.parametrize("i", range(8))
        def test_tx(app, proxypool_transaction, seen, i):
            with app.app_context():
                db.execute("CREATE TABLE t (x)")  # rolled back after each test
            gc.collect()
            assert [what for what, ref in seen.get("refs", []) if ref() is not None] == []
            assert list(records._TEST_POOLS[app]) == [proxypool_transaction.pools["db"]]
            watch = records._WATCHES[app]
            seen["refs"] = [
                ("TransactionPool", weakref.ref(proxypool_transaction.pools["db"])),
                ("connection", weakref.ref(proxypool_transaction.connection("db"))),
                ("ProxyPoolTransaction", weakref.ref(proxypool_transaction)),
                ("_Watch", weakref.ref(watch)),
            ]
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=8)
