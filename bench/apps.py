"""The same tiny Flask app for every approach, served by gunicorn in bench/httpbench.py.

``gunicorn 'bench.apps:create_app()'`` with these environment variables:

``BENCH_APPROACH``  baseline | baseline_twin | flask_proxypool | flask_proxypool_release |
                    flask_proxypool_rollback | psycopg_pool | proxypatternpool | sqlalchemy | dbutils |
                    floor (a yardstick: a bare list, no pool)
``BENCH_DSN``       libpq conninfo of the benchmark database (its application_name
                    tells the approach apart in pg_stat_activity)
``BENCH_SIZE``      pool size (the worker's threads, or 4 in the mixed workload)
``BENCH_LAYOUT``    a seed: this process's own layout of the type cache (bench/layout.py)
``BENCH_FPP_OPTIONS``  more pool keys for the flask_proxypool approaches, as JSON (experiments)
``BENCH_MODE``      ``item``: autocommit connections, ``GET /item/<id>`` (one SELECT);
                    ``mixed``: transactions, ``GET /nodb`` (no database) and
                    ``GET /mixed/<id>`` (one SELECT, commit, then 2 ms of other work);
                    ``txn``: as ``item``, on connections with transactions (the library's default),
                    the transaction left open for the end of the request to roll back

Every approach runs exactly the same SQL through psycopg 3; only how a view
gets its connection differs.
"""

from __future__ import annotations

from . import layout  # noqa: F401  first: BENCH_LAYOUT shifts the type cache's layout before Flask's imports

import json
import os
import threading
import time
import typing as t

from flask import Flask, g

from .common import runtime

SQL = "SELECT name FROM items WHERE id = %s"
OTHER_WORK = 0.002  # seconds of non-database work in the mixed workload (a remote call, templating)

APPROACHES = (
    "baseline",
    "baseline_twin",
    "flask_proxypool",
    "flask_proxypool_release",
    "flask_proxypool_rollback",
    "psycopg_pool",
    "proxypatternpool",
    "sqlalchemy",
    "dbutils",
    "floor",
)


def create_app() -> Flask:
    approach = os.environ["BENCH_APPROACH"]
    dsn = os.environ["BENCH_DSN"]
    size = int(os.environ.get("BENCH_SIZE", "4"))
    mode = os.environ.get("BENCH_MODE", "item")
    autocommit = mode == "item"  # txn and mixed: transactions
    app = Flask(f"bench_{approach}")
    conn = _SETUPS[approach](app, dsn, size, autocommit)

    @app.get("/ping")
    def ping() -> str:
        return "ok"

    @app.get("/runtime")
    def runtime_info() -> dict[str, t.Any]:
        """The interpreter this worker runs on and whether its GIL is on (bench/ft.py asks after measuring)."""
        return runtime()

    @app.get("/item/<int:id>")
    def item(id: int) -> dict[str, t.Any]:
        row = conn().execute(SQL, (id,)).fetchone()
        return {"id": id, "name": row[0] if row else None}

    @app.get("/nodb")
    def nodb() -> dict[str, t.Any]:
        return {"ok": True}

    @app.get("/mixed/<int:id>")
    def mixed(id: int) -> dict[str, t.Any]:
        c = conn()
        row = c.execute(SQL, (id,)).fetchone()
        c.commit()
        time.sleep(OTHER_WORK)
        return {"id": id, "name": row[0] if row else None}

    return app


Getter = t.Callable[[], t.Any]


def _baseline(app: Flask, dsn: str, size: int, autocommit: bool) -> Getter:
    """One persistent connection per thread, never returned: the floor for a request."""
    import psycopg

    local = threading.local()

    def conn() -> t.Any:
        c = getattr(local, "conn", None)
        if c is None:
            c = local.conn = psycopg.connect(dsn, autocommit=autocommit)
        return c

    if not autocommit:

        @app.teardown_appcontext
        def end(exc: BaseException | None) -> None:
            """What any request with transactions needs: nothing left open for the next one."""
            c = getattr(local, "conn", None)
            if c is not None and c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                c.rollback()

    return conn


def _flask_proxypool(app: Flask, dsn: str, size: int, autocommit: bool, **extra: t.Any) -> Getter:
    from flask_proxypool import ProxyPool, db

    options = {"reset": os.environ.get("BENCH_FPP_RESET", "rollback"), **extra}
    options.update(json.loads(os.environ.get("BENCH_FPP_OPTIONS", "{}")))  # for experiments: pool keys as JSON
    app.config["PROXYPOOL_POOLS"] = {
        "db": {"conninfo": dsn, "autocommit": autocommit, "max_size": size, **options},
    }
    ProxyPool(app)
    return lambda: db  # the proxy itself: views use it as the connection


def _flask_proxypool_release(app: Flask, dsn: str, size: int, autocommit: bool) -> Getter:
    """The ``release: "commit"`` option: the connection goes back as soon as the transaction ends."""
    return _flask_proxypool(app, dsn, size, autocommit, release="commit")


def _flask_proxypool_rollback(app: Flask, dsn: str, size: int, autocommit: bool) -> Getter:
    """``reset: "rollback"``: the opt-out of the session reset, as every request was returned before it."""
    return _flask_proxypool(app, dsn, size, autocommit, reset="rollback")


def _psycopg_pool(app: Flask, dsn: str, size: int, autocommit: bool) -> Getter:
    """The usual recipe: getconn on first use into ``g``, putconn at teardown."""
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(dsn, min_size=size, max_size=size, kwargs={"autocommit": autocommit}, open=True)
    return in_g(app, pool.getconn, pool.putconn)


def in_g(app: Flask, take: t.Callable[[], t.Any], give: t.Callable[[t.Any], object]) -> Getter:
    """The Flask recipe for a plain pool: ``take()`` on first use into ``g``, ``give(conn)`` at teardown."""

    def conn() -> t.Any:
        c = g.get("db")
        if c is None:
            c = g.db = take()
        return c

    @app.teardown_appcontext
    def give_back(exc: BaseException | None) -> None:
        c = g.pop("db", None)
        if c is not None:
            give(c)

    return conn


def _floor(app: Flask, dsn: str, size: int, autocommit: bool) -> Getter:
    """The least any pool costs a request through Flask's hooks: connections in a bare list, `pop` into `g`,
    `append` at teardown. No reset, no waiting (an empty list raises), no bookkeeping: a yardstick for the
    instruction counts (bench/instructions.py), not a pool to deploy."""
    import psycopg

    free = [psycopg.connect(dsn, autocommit=autocommit) for _ in range(size)]
    return in_g(app, free.pop, free.append)


def _proxypatternpool(app: Flask, dsn: str, size: int, autocommit: bool) -> Getter:
    """ProxyPatternPool's Proxy (per-thread scope, pooled), returned at teardown (FlaskSimpleAuth's way)."""
    import psycopg
    import ProxyPatternPool as ppp

    proxy = ppp.Proxy(
        fun=lambda i: psycopg.connect(dsn, autocommit=autocommit),
        max_size=size,
        scope=ppp.Proxy.Scope.THREAD,
    )

    @app.teardown_request
    def give_back(exc: BaseException | None) -> None:
        proxy._ret_obj()

    return lambda: proxy


def _sqlalchemy(app: Flask, dsn: str, size: int, autocommit: bool) -> Getter:
    """An SQLAlchemy engine's pool: ``engine.raw_connection()`` into ``g``, closed (returned) at teardown."""
    import psycopg
    from sqlalchemy import create_engine

    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn, autocommit=autocommit),
        pool_size=size,
        max_overflow=0,
    )
    return in_g(app, engine.raw_connection, _close)


def _dbutils(app: Flask, dsn: str, size: int, autocommit: bool) -> Getter:
    """DBUtils PooledDB: ``pool.connection()`` into ``g``, closed (returned) at teardown.

    Its connection wraps psycopg's and has no ``execute``: views get the raw one.
    """
    import psycopg
    from dbutils.pooled_db import PooledDB

    pool = PooledDB(psycopg, maxcached=size, maxconnections=size, blocking=True, conninfo=dsn, autocommit=autocommit)
    pooled = in_g(app, pool.connection, _close)
    return lambda: pooled()._con._con  # PooledDedicatedDBConnection -> SteadyDBConnection -> psycopg.Connection


def _close(c: t.Any) -> None:
    """How SQLAlchemy's and DBUtils' pooled connections go back to their pool."""
    c.close()


_SETUPS: dict[str, t.Callable[[Flask, str, int, bool], Getter]] = {
    "baseline": _baseline,
    "baseline_twin": _baseline,  # the same code again: its ratio to the baseline is the run's noise
    "flask_proxypool": _flask_proxypool,
    "flask_proxypool_release": _flask_proxypool_release,
    "flask_proxypool_rollback": _flask_proxypool_rollback,
    "psycopg_pool": _psycopg_pool,
    "proxypatternpool": _proxypatternpool,
    "sqlalchemy": _sqlalchemy,
    "dbutils": _dbutils,
    "floor": _floor,
}
