"""A Flask app for gunicorn behind PgBouncer (tests/test_pgbouncer.py): one route per failure case of issue 14.

Environment: PGB_CONNINFO (PgBouncer), PGB_TABLE (an existing table `id int primary key, v text`),
PGB_MODE (the pools' `pgbouncer` setting; empty: not set), PGB_MAX_SIZE (each pool's max_size).
"""

from __future__ import annotations

import os
import typing as t

from flask import Flask

from flask_proxypool import ProxyPool, db, proxy

REPEAT = 10  # more than psycopg's prepare_threshold (5): each query would be prepared


def case_pools(conninfo: str, mode: str | None, max_size: int = 4) -> dict[str, dict[str, t.Any]]:
    """The two pools of the cases: `db` (committed on return) and `ac` (autocommit), `pgbouncer: mode` when set."""
    common: dict[str, t.Any] = {"conninfo": conninfo, "max_size": max_size, "timeout": 10.0}
    if mode:
        common["pgbouncer"] = mode
    return {"db": {**common, "on_return": "commit"}, "ac": {**common, "autocommit": True}}


def add_case_views(app: Flask, table: str) -> None:
    """One route per failure case of issue 14 (`CASES` in test_pgbouncer.py), on `table` (id int, v text)."""
    ac = proxy("ac")

    def repeat(conn: t.Any, n: int) -> int:
        """The same parameterised query REPEAT times; the number of distinct server backends that answered."""
        pids = set()
        for i in range(REPEAT):
            row = conn.execute("SELECT %s::int + 1, pg_backend_pid()", (n + i,)).fetchone()
            assert row[0] == n + i + 1
            pids.add(row[1])
        return len(pids)

    @app.get("/q/<int:n>")
    def repeated(n: int) -> dict[str, int]:
        """One transaction of repeated parameterised queries."""
        return {"backends": repeat(db, n)}

    @app.get("/ac/<int:n>")
    def autocommit(n: int) -> dict[str, int]:
        """Autocommit: each statement its own transaction, so each may run on another server connection."""
        return {"backends": repeat(ac, n)}

    @app.post("/many/<int:n>")
    def many(n: int) -> tuple[dict[str, int], int]:
        """executemany of a few rows, committed by the pool's on_return: commit."""
        with db.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} (id, v) VALUES (%s, %s)", [(n * 10 + i, "m") for i in range(5)])
        return {"rows": 5}, 201

    @app.get("/rb/<int:n>")
    def rollback_then_reuse(n: int) -> dict[str, int]:
        """Queries, a rollback (psycopg sends DEALLOCATE ALL after one when it prepared), then the same queries."""
        before = repeat(db, n)
        db.rollback()
        return {"backends": before + repeat(db, n)}


def create_app() -> Flask:
    """The gunicorn app, from the environment (see the module docstring)."""
    app = Flask(__name__)
    app.config["PROXYPOOL_POOLS"] = case_pools(
        os.environ["PGB_CONNINFO"], os.environ.get("PGB_MODE") or None, int(os.environ.get("PGB_MAX_SIZE", "4"))
    )
    ProxyPool(app)
    add_case_views(app, os.environ["PGB_TABLE"])
    app.add_url_rule("/health", "health", lambda: "ok")  # the test waits for it before the load
    return app
