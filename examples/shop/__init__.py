"""A small REST service on flask_proxypool: two blueprints sharing ``db``, and a factory pool.

Every error answer is JSON, ``{"error": ..., "detail": ...}``, the shape of the
extension's 503s: 400 for a body or field that is not valid (``checks.py``), 404 for an
unknown item or order (also an order for an unknown item), 409 for an id already taken,
500 for an unexpected error (its traceback goes to the log, never to the client).

Environment:

``SHOP_DATABASE_URL``
    a libpq conninfo or postgresql:// URL selects PostgreSQL; without it the
    app uses an embedded sqlite3 file under its instance folder, so it runs
    with no server at all.
``SHOP_DB_MAX_SIZE``, ``SHOP_DB_TIMEOUT``, ``SHOP_DB_MAX_HOLD``
    override the ``db`` pool's ``max_size`` (4), ``timeout`` (5 s) and ``max_hold`` (off).
``SHOP_DEBUG=1``
    adds ``/_debug/*`` endpoints (worker and backend pids, pool stats, a slow
    view) that the end-to-end tests use. Never in production.
"""

from __future__ import annotations

import logging
import os
import threading
import typing as t

from flask import Flask, json, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from flask_proxypool import ProxyPool, db

from .schema import create_schema

log = logging.getLogger(__name__)


def _env_number(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def create_app(database_url: str | None = None, **pool_overrides: t.Any) -> Flask:
    """App factory: ``gunicorn 'shop:create_app()'``."""
    app = Flask(__name__)
    url = database_url or os.environ.get("SHOP_DATABASE_URL")
    db_pool: dict[str, t.Any] = {
        "max_size": int(_env_number("SHOP_DB_MAX_SIZE", 4)),
        "timeout": _env_number("SHOP_DB_TIMEOUT", 5.0),
        "max_hold": _env_number("SHOP_DB_MAX_HOLD", 0.0),
    }
    if url:
        db_pool.update(kind="psycopg", conninfo=url, connect_timeout=2)
    else:
        db_pool.update(kind="sqlite3", database="shop.sqlite3")
    db_pool.update(pool_overrides)
    app.config["PROXYPOOL_POOLS"] = {
        "db": db_pool,
        # a non-database resource: a client for a (pretend) pricing service
        "pricing": {
            "kind": "factory",
            "factory": "shop.pricing:connect",
            "max_size": 4,
            "close": "close",
            "check": "ping",
        },
    }
    ProxyPool(app)
    app.register_error_handler(HTTPException, _json_error)
    _schema_once(app)

    from .items import bp as items_bp
    from .orders import bp as orders_bp

    app.register_blueprint(items_bp)
    app.register_blueprint(orders_bp)
    if os.environ.get("SHOP_DEBUG") == "1":
        from .debug import bp as debug_bp

        app.register_blueprint(debug_bp)
    return app


def _json_error(e: HTTPException) -> Response:
    """Any HTTP error as JSON, headers kept (``Allow`` on a 405).

    An exception no view handled arrives here as a 500 after Flask has logged it.
    """
    response = e.get_response()
    detail = "unexpected server error; the details are in the server log" if e.code == 500 else e.description
    response.data = json.dumps({"error": e.name.lower(), "detail": detail})
    response.content_type = "application/json"
    return response


def _schema_once(app: Flask) -> None:
    """Create the tables now if the database is up, else on the first request that finds it up.

    The app must start even while its database is down: it answers 503
    until the server is back.
    """
    done = threading.Event()
    lock = threading.Lock()

    def ensure() -> None:
        if done.is_set():
            return
        with lock:
            if done.is_set():
                return
            with db.borrow(app) as conn:
                create_schema(conn)
                if type(conn).__module__.startswith("psycopg"):
                    app.config["SHOP_SCHEMA_BACKEND_PID"] = conn.pgconn.backend_pid
            done.set()

    try:
        ensure()
    except Exception as e:  # the database may be down at start: retried per request
        log.warning("shop: schema not created at start (%s); will retry on first request", e)

    @app.before_request
    def ensure_before_request() -> None:
        if request.endpoint not in ("items.health", "items.index"):  # they touch no pool
            ensure()
