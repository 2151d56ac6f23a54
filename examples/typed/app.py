"""A typed proxy: to a type checker, ``db`` is a ``psycopg.Connection`` (mypy --strict passes on this file)."""

from __future__ import annotations

import psycopg
from flask import Flask

from flask_proxypool import ProxyPool, borrow, current, proxy

#: The pool named "db", typed: db.execute(...) is checked, db.exectue(...) is an error.
db = proxy("db", psycopg.Connection)


def create_app(conninfo: str) -> Flask:
    app = Flask(__name__)
    app.config["PROXYPOOL_POOLS"] = {"db": {"conninfo": conninfo}}
    ProxyPool(app)

    @app.get("/now")
    def now() -> dict[str, str]:
        row = db.execute("SELECT now()::text").fetchone()
        assert row is not None
        return {"now": str(row[0])}

    @app.get("/backend")
    def backend() -> dict[str, int]:
        conn: psycopg.Connection[tuple[int]] = current(db)  # the real object, for code that checks types
        return {"pid": conn.info.backend_pid}

    return app


def nightly_report(app: Flask) -> int:
    """Outside a request (a background job): a connection for this block only."""
    with borrow(db, app) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
        return int(row[0]) if row else 0
