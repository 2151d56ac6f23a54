"""How a request's work ends: streamed responses, handled exceptions, a connection the view closed.

Real PostgreSQL; default configuration unless the test is about ``on_return``.
"""

from __future__ import annotations

import http.client
import logging
import threading
import typing as t
import urllib.request
import uuid

import psycopg
import pytest
from flask import Flask
from flask import Response
from flask import stream_with_context
from psycopg import sql
from werkzeug.serving import make_server

from flask_proxypool import UsageError
from flask_proxypool import db
from pgserver import PgServer

MakeApp = t.Callable[..., Flask]


@pytest.fixture
def table(pg: PgServer) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, pid int)", dbname="app")
    return name


def _rows(pg: PgServer, table: str) -> list[tuple[t.Any, ...]]:
    return pg.psql(f"SELECT id FROM {table} ORDER BY id", dbname="app")


def _insert(table: str, id: int) -> None:
    db.execute(sql.SQL("INSERT INTO {} VALUES (%s, pg_backend_pid())").format(sql.Identifier(table)), (id,))


def _stream_app(make_app: MakeApp, conninfo: str, table: str, on_return: str) -> Flask:
    app = make_app({"db": {"conninfo": conninfo, "max_size": 2, "on_return": on_return}})

    @app.get("/stream/<how>")
    def stream(how: str) -> Response:
        _insert(table, 1)
        pid = db.info.backend_pid

        def body() -> t.Iterator[str]:
            seen = db.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
            yield f"same-connection={db.info.backend_pid == pid} sees-view-insert={seen == 1}\n"
            _insert(table, 2)
            if how == "fail":
                raise RuntimeError("the stream fails half-way")
            if how == "bad-commit":
                db.execute("SET CONSTRAINTS ALL DEFERRED")
                db.execute(
                    sql.SQL("CREATE TEMP TABLE d (id int, CONSTRAINT u UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)")
                )
                db.execute("INSERT INTO d VALUES (1), (1)")  # fails at COMMIT only
            yield "end\n"

        return Response(stream_with_context(body()))

    return app


@pytest.mark.parametrize("on_return", ["rollback", "commit"])
def test_stream_uses_the_views_connection_and_transaction(
    make_app: MakeApp, conninfo: str, pg: PgServer, table: str, on_return: str
) -> None:
    """The generator sees the view's connection and its uncommitted insert; commit policy commits at the end."""
    app = _stream_app(make_app, conninfo, table, on_return)
    with app.test_client() as client:
        r = client.get("/stream/ok")
        assert r.get_data(as_text=True) == "same-connection=True sees-view-insert=True\nend\n"
        r.close()
    assert _rows(pg, table) == ([(1,), (2,)] if on_return == "commit" else [])
    st = app.extensions["proxypool"].pool("db").stats()
    assert (st.in_use, st.checkouts, st.created) == (0, 1, 1)


def test_stream_that_fails_is_rolled_back(make_app: MakeApp, conninfo: str, pg: PgServer, table: str) -> None:
    """Under the commit policy a stream that raises commits nothing, neither the view's part nor its own."""
    app = _stream_app(make_app, conninfo, table, "commit")
    client = app.test_client()
    with pytest.raises(RuntimeError, match="half-way"):
        client.get("/stream/fail").get_data()
    assert _rows(pg, table) == []
    assert app.extensions["proxypool"].pool("db").stats().in_use == 0


def test_stream_whose_commit_fails_is_cut_short(
    make_app: MakeApp, conninfo: str, pg: PgServer, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit that fails after the headers went out breaks the response off (the client sees an error)."""
    app = _stream_app(make_app, conninfo, table, "commit")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.ERROR, logger="flask_proxypool"):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/stream/bad-commit", timeout=10) as r:
                assert r.status == 200  # the headers went out before the commit
                with pytest.raises(http.client.IncompleteRead):  # no final chunk
                    r.read()
    finally:
        server.shutdown()
        thread.join(10)
    assert _rows(pg, table) == []
    assert "commit at the end of a streamed response failed" in caplog.text
    assert app.extensions["proxypool"].pool("db").stats().in_use == 0


@pytest.mark.parametrize("on_return", ["commit", "rollback"])
def test_handled_exception_rolls_back(
    make_app: MakeApp, conninfo: str, pg: PgServer, table: str, on_return: str
) -> None:
    """An exception the view raised and an errorhandler turned into a 200 is never committed."""
    app = make_app({"db": {"conninfo": conninfo, "max_size": 1, "on_return": on_return}})

    class Handled(Exception):
        pass

    @app.errorhandler(Handled)
    def handled(e: Handled) -> tuple[str, int]:
        return "handled", 200

    @app.post("/write/<how>")
    def write(how: str) -> str:
        _insert(table, 1 if how == "raise" else 2)
        if how == "raise":
            raise Handled()
        return "ok"

    client = app.test_client()
    assert client.post("/write/raise").status_code == 200
    assert client.post("/write/ok").status_code == 200
    assert _rows(pg, table) == ([(2,)] if on_return == "commit" else [])


@pytest.mark.parametrize("how", ["close", "with"])
def test_closed_by_the_view(make_app: MakeApp, conninfo: str, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """db.close() or 'with db:' in a view: counted apart, logged once, further use says what happened."""
    app = make_app({"db": {"conninfo": conninfo, "max_size": 1}})

    @app.get("/close")
    def close() -> str:
        db.execute("SELECT 1")
        if how == "close":
            db.close()
        else:
            with db:
                db.execute("SELECT 1")
        with pytest.raises(UsageError, match="closed by the code using it.*must not be closed"):
            db.execute("SELECT 1")
        with pytest.raises(UsageError, match="closed by the code using it"):
            db._get_current_object()
        return "ok"

    @app.get("/after")
    def after() -> dict[str, int]:
        return {"one": db.execute("SELECT 1").fetchone()[0]}

    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="flask_proxypool"):
        for _ in range(3):
            assert client.get("/close").status_code == 200
            assert client.get("/after").json == {"one": 1}
    st = app.extensions["proxypool"].pool("db").stats()
    assert st.closed_by_reason == {"closed_by_app": 3}
    assert (st.errors, st.in_use) == (0, 0)
    logged = [r for r in caplog.records if "closed by the code that held it" in r.getMessage()]
    assert len(logged) == 1
    assert "with conn.transaction()" in logged[0].getMessage()


def test_closed_through_the_real_object_is_counted(make_app: MakeApp, conninfo: str) -> None:
    """A connection closed behind the proxy's back is still counted as closed by the app, not as broken."""
    app = make_app({"db": {"conninfo": conninfo, "max_size": 1}})

    @app.get("/close-real")
    def close_real() -> str:
        conn: psycopg.Connection[t.Any] = db._get_current_object()
        conn.close()
        return "ok"

    assert app.test_client().get("/close-real").status_code == 200
    st = app.extensions["proxypool"].pool("db").stats()
    assert st.closed_by_reason == {"closed_by_app": 1}
    assert st.errors == 0
