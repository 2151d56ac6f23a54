"""The sqlite3 kind's `row_factory` and `configure`: set on each new connection, kept across returns."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask

from flask_proxypool import ConfigError, ConnectFailed, ProxyPool, db
from flask_proxypool.kinds.sqlite3 import Sqlite3Kind, dict_row
from flask_proxypool.testing import ProxyPoolTransaction

MakeApp = t.Callable[..., Flask]


def _app(make_app: MakeApp, **settings: t.Any) -> Flask:
    """A sqlite3 pool 'db' of one connection, holding items(id, name) with one row, and a parent/child pair."""
    app = make_app({"db": {"kind": "sqlite3", "database": "opts.sqlite3", "max_size": 1, **settings}})
    with db.borrow(app) as conn:
        conn.executescript(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);"
            "INSERT INTO items VALUES (1, 'pen');"
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
            "CREATE TABLE child (parent_id INTEGER REFERENCES parent(id));"
        )
    return app


def _fk_on(conn: sqlite3.Connection) -> None:
    """A configure hook: foreign keys enforced, and a SQL function registered."""
    conn.execute("PRAGMA foreign_keys = ON")
    conn.create_function("shout", 1, lambda s: s.upper(), deterministic=True)


def test_row_factory_dict_is_returned_as_json(make_app: MakeApp) -> None:
    """row_factory 'dict' makes plain dicts, which a view can return as JSON as they are."""
    app = _app(make_app, row_factory="dict")

    @app.get("/items/<int:id>")
    def item(id: int) -> t.Any:
        return db.execute("SELECT id, name FROM items WHERE id = ?", (id,)).fetchone()

    r = app.test_client().get("/items/1")
    assert (r.status_code, r.get_json()) == (200, {"id": 1, "name": "pen"})


@pytest.mark.parametrize("value", [sqlite3.Row, "sqlite3:Row", "sqlite3.Row"])
def test_row_factory_sqlite3_row(make_app: MakeApp, value: t.Any) -> None:
    """sqlite3.Row, given as the class or as a string naming it, gives rows indexed by name."""
    app = _app(make_app, row_factory=value)
    with app.app_context():
        row = db.execute("SELECT id, name FROM items").fetchone()
    assert type(row) is sqlite3.Row
    assert (row["name"], row[0]) == ("pen", 1)


def test_row_factory_put_back_after_a_view_changed_it(make_app: MakeApp) -> None:
    """A holder that changes row_factory leaves the pool's one to the next holder, on the same connection."""
    app = _app(make_app, row_factory="dict")
    with app.app_context():
        conn = db._get_current_object()
        conn.row_factory = None
        assert db.execute("SELECT name FROM items").fetchone() == ("pen",)
    with app.app_context():
        assert db._get_current_object() is conn  # kept, not replaced
        assert db.execute("SELECT name FROM items").fetchone() == {"name": "pen"}
    assert app.extensions["proxypool"].pool("db").stats().to_dict()["created"] == 1


def test_default_rows_are_tuples(make_app: MakeApp) -> None:
    """Without row_factory, rows are sqlite3's tuples, as before."""
    app = _app(make_app)
    with app.app_context():
        assert db.execute("SELECT id, name FROM items").fetchone() == (1, "pen")


def test_configure_runs_once_per_new_connection(make_app: MakeApp) -> None:
    """configure runs on each new connection only: its pragma and function hold in every request."""
    calls: list[int] = []

    def configure(conn: sqlite3.Connection) -> None:
        calls.append(1)
        _fk_on(conn)

    app = _app(make_app, configure=configure, max_use=2)
    client = app.test_client()

    @app.get("/fk")
    def fk() -> t.Any:
        (on,) = db.execute("PRAGMA foreign_keys").fetchone()
        (name,) = db.execute("SELECT shout(name) FROM items").fetchone()
        try:
            db.execute("INSERT INTO child VALUES (42)")
        except sqlite3.IntegrityError as e:
            return {"on": on, "name": name, "insert": str(e)}
        return {"on": on, "name": name, "insert": "accepted"}

    bodies = [client.get("/fk").get_json() for _ in range(3)]
    assert bodies == [{"on": 1, "name": "PEN", "insert": "FOREIGN KEY constraint failed"}] * 3
    # the schema connection, then max_use=2 retires each connection after two checkouts: 2 connections
    assert len(calls) == app.extensions["proxypool"].pool("db").stats().to_dict()["created"] == 2


def test_pragma_changed_by_a_view_does_not_reach_the_next(make_app: MakeApp) -> None:
    """A view turning foreign keys off gets its connection replaced: the next request has them on again."""
    app = _app(make_app, configure=_fk_on)
    with app.app_context():
        first = db._get_current_object()
        db.execute("PRAGMA foreign_keys = OFF")
    with app.app_context():
        assert db._get_current_object() is not first
        assert db.execute("PRAGMA foreign_keys").fetchone() == (1,)
    stats = app.extensions["proxypool"].pool("db").stats().to_dict()
    assert (stats["closed"], stats["closed_by_reason"]) == (1, {"broken": 1})


def test_configure_temp_objects_and_attachments_are_kept(make_app: MakeApp, tmp_path: Path) -> None:
    """What configure creates (a temp view, an attached database) is the baseline, not state to discard."""
    other = tmp_path / "other.sqlite3"
    with contextlib.closing(sqlite3.connect(other)) as c:
        c.execute("CREATE TABLE prices (item_id INTEGER, price INTEGER)")
        c.execute("INSERT INTO prices VALUES (1, 3)")
        c.commit()

    def configure(conn: sqlite3.Connection) -> None:
        conn.execute("ATTACH DATABASE ? AS other", (str(other),))
        conn.execute("CREATE TEMP VIEW priced AS SELECT name, price FROM items JOIN other.prices ON id = item_id")

    app = _app(make_app, configure=configure)
    with app.app_context():
        conn = db._get_current_object()
        assert db.execute("SELECT name, price FROM priced").fetchall() == [("pen", 3)]
    with app.app_context():
        assert db._get_current_object() is conn
        db.execute("CREATE TEMP TABLE scratch (x)")  # the holder's own temp object: discarded on return
    with app.app_context():
        assert db._get_current_object() is not conn
        assert db.execute("SELECT name, price FROM priced").fetchall() == [("pen", 3)]


def test_configure_transaction_is_committed(tmp_path: Path) -> None:
    """A transaction configure leaves open is committed before the connection is handed out."""
    path = str(tmp_path / "cfg.sqlite3")
    with contextlib.closing(sqlite3.connect(path)) as setup:
        setup.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")

    def configure(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR IGNORE INTO items VALUES (2, 'ink')")

    conn = Sqlite3Kind(path, configure=configure).create()
    try:
        assert not conn.in_transaction
        with contextlib.closing(sqlite3.connect(path)) as outside:
            assert outside.execute("SELECT name FROM items WHERE id = 2").fetchone() == ("ink",)
    finally:
        conn.close()


def test_configure_failure_closes_the_connection(make_app: MakeApp) -> None:
    """A configure that raises fails the checkout (ConnectFailed, the cause kept) and leaks no pool slot."""
    failing = threading.Event()

    def configure(conn: sqlite3.Connection) -> None:
        if failing.is_set():
            raise RuntimeError("configure failed")

    # max_use=1: every checkout makes a new connection, so configure runs each time
    app = _app(make_app, configure=configure, max_use=1, reconnect_delay=0.001, reconnect_max_delay=0.001)
    failing.set()
    with pytest.raises(ConnectFailed, match="RuntimeError: configure failed") as info, db.borrow(app):
        pass
    assert isinstance(info.value.__cause__, RuntimeError)
    pool = app.extensions["proxypool"].pool("db")
    assert pool.stats().to_dict()["in_use"] == 0
    failing.clear()
    deadline = time.monotonic() + 5.0
    while True:  # bounded: the backoff after the failure is 1 ms
        try:
            with db.borrow(app) as conn:
                assert conn.execute("SELECT name FROM items").fetchone() == ("pen",)
            break
        except ConnectFailed:
            assert time.monotonic() < deadline, "the pool never created a connection again"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("row_factory", "row", "'dict', a callable such as sqlite3.Row, or a 'module:attr' string naming one"),
        ("row_factory", 3, "a callable or a 'module:attr' string naming one"),
        ("row_factory", "sqlite3:Nope", "module 'sqlite3' has no 'Nope'"),
        ("configure", "not_a_module_xyz:f", "an importable 'module:attr'"),
        ("configure", 1, "a callable or a 'module:attr' string naming one"),
    ],
)
def test_bad_values_name_pool_and_key(make_app: MakeApp, key: str, value: t.Any, message: str) -> None:
    """A bad row_factory or configure is refused at init_app, naming the pool, the key and what is expected."""
    with pytest.raises(ConfigError) as info:
        make_app({"db": {"kind": "sqlite3", key: value}})
    text = str(info.value)
    assert f"PROXYPOOL_POOLS['db']['{key}']" in text
    assert message in text


def test_dict_row_helper() -> None:
    """dict_row maps column names to values, in column order."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.row_factory = dict_row
        row = conn.execute("SELECT 1 AS b, 2 AS a").fetchone()
    assert list(row.items()) == [("b", 1), ("a", 2)]


def test_testing_plugin_keeps_row_factory_and_configure(tmp_path: Path) -> None:
    """Inside a ProxyPoolTransaction, the test connection has the pool's row_factory and configure too."""
    app = Flask("p", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {
        "db": {"kind": "sqlite3", "database": str(tmp_path / "p.sqlite3"), "row_factory": "dict", "configure": _fk_on}
    }
    ProxyPool(app)
    with app.app_context():
        db.execute("CREATE TABLE t (x)")
        db.commit()
    tx = ProxyPoolTransaction(app, ["db"])
    try:
        with app.app_context():
            db.execute("INSERT INTO t VALUES (1)")
            assert db.execute("SELECT x, shout('a') AS s FROM t").fetchone() == {"x": 1, "s": "A"}
            assert db.execute("PRAGMA foreign_keys").fetchone() == {"foreign_keys": 1}
    finally:
        tx.finish()
        app.extensions["proxypool"].close(timeout=1.0)
