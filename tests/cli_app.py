"""An app for ``flask --app cli_app proxypool ...`` run as a real subprocess (tests/test_cli.py).

``CLI_APP_CONNINFO`` is the conninfo of its ``db`` pool; the factory takes
and returns one connection, so that the CLI process has something to show.
"""

from __future__ import annotations

import os

from flask import Flask

from flask_proxypool import ProxyPool, db


def create_app() -> Flask:
    app = Flask("cli_app")
    app.config["PROXYPOOL_POOLS"] = {
        "db": {"kind": "psycopg", "conninfo": os.environ["CLI_APP_CONNINFO"], "max_size": 2, "timeout": 5.0},
    }
    ProxyPool(app)
    with db.borrow(app) as conn:
        conn.execute("SELECT 1")
    return app
