"""A small REST service on flask_proxypool: two blueprints sharing ``db``, and a factory pool.

``SHOP_DATABASE_URL`` (a libpq conninfo or postgresql:// URL) selects
PostgreSQL; without it the app uses an embedded sqlite3 file under its
instance folder, so it runs with no server at all.
"""

from __future__ import annotations

import os

from flask import Flask

from flask_proxypool import ProxyPool, db

from .schema import create_schema


def create_app(database_url: str | None = None, **pool_overrides: object) -> Flask:
    """App factory: ``gunicorn 'shop:create_app()'``."""
    app = Flask(__name__)
    url = database_url or os.environ.get("SHOP_DATABASE_URL")
    if url:
        db_pool: dict[str, object] = {"kind": "psycopg", "conninfo": url, "max_size": 4, "timeout": 5.0}
    else:
        db_pool = {"kind": "sqlite3", "database": "shop.sqlite3", "max_size": 4}
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
    with db.borrow(app) as conn:
        create_schema(conn)

    from .items import bp as items_bp
    from .orders import bp as orders_bp

    app.register_blueprint(items_bp)
    app.register_blueprint(orders_bp)
    return app
