"""A small REST service on flask_proxypool: two blueprints sharing ``db``, and a factory pool.

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

from flask import Flask, request

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
    _schema_once(app)

    from .items import bp as items_bp
    from .orders import bp as orders_bp

    app.register_blueprint(items_bp)
    app.register_blueprint(orders_bp)
    if os.environ.get("SHOP_DEBUG") == "1":
        from .debug import bp as debug_bp

        app.register_blueprint(debug_bp)
    return app


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
        if request.endpoint != "items.health":  # health checks touch no pool
            ensure()
