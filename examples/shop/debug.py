"""Endpoints for the end-to-end tests (registered only with SHOP_DEBUG=1)."""

from __future__ import annotations

import os
import time

from flask import Blueprint, current_app, request

from flask_proxypool import db

bp = Blueprint("debug", __name__, url_prefix="/_debug")


@bp.get("/whoami")
def whoami() -> dict[str, object]:
    """Which worker answered, and which PostgreSQL backend its connection is."""
    backend = db.execute("SELECT pg_backend_pid()").fetchone()[0]
    return {
        "worker": os.getpid(),
        "backend": backend,
        "master_backend": current_app.config.get("SHOP_SCHEMA_BACKEND_PID"),
    }


@bp.get("/stats")
def stats() -> dict[str, object]:
    pools = current_app.extensions["proxypool"].stats()
    return {"worker": os.getpid(), "pools": {name: s.to_dict() for name, s in pools.items()}}


@bp.get("/slow")
def slow() -> dict[str, object]:
    """Hold a connection for ``?s=`` seconds."""
    seconds = float(request.args.get("s", "1"))
    if type(db._get_current_object()).__module__.startswith("psycopg"):
        db.execute("SELECT pg_sleep(%s)", (seconds,))
    else:
        db.execute("SELECT 1")
        time.sleep(seconds)
    return {"slept": seconds}
