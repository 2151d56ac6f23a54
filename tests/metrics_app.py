"""An app exporting pool metrics, served by gunicorn in tests/test_metrics.py (multiprocess mode).

``METRICS_APP_DB`` is the sqlite3 file of its ``db`` pool.
"""

from __future__ import annotations

import os

from flask import Flask

from flask_proxypool import ProxyPool, db, metrics


def create_app() -> Flask:
    app = Flask("metrics_app")
    app.config["PROXYPOOL_POOLS"] = {
        "db": {"kind": "sqlite3", "database": os.environ["METRICS_APP_DB"], "max_size": 2},
    }
    ProxyPool(app)
    metrics.register(app, path="/metrics", interval=0.1)

    @app.get("/one")
    def one() -> dict[str, int]:
        return {"worker": os.getpid(), "n": db.execute("SELECT 1").fetchone()[0]}

    return app
