"""flask_proxypool: per-request pooled resources for Flask, returned clean, always.

`from flask_proxypool import db` anywhere; `ProxyPool(app)` in the app
factory; declare pools in `app.config["PROXYPOOL_POOLS"]`.
"""

from __future__ import annotations

from .errors import (
    AuthenticationFailed,
    ConfigError,
    ConnectFailed,
    PoolClosed,
    PoolTimeout,
    PoolUnavailable,
    ProxyPoolError,
    TooManyWaiting,
    UsageError,
)
from .extension import ProxyPool
from .pool import Pool
from .proxy import Proxy, borrow, current, proxy
from .state import close_all
from .stats import PoolStats

__all__ = [
    "AuthenticationFailed",
    "ConfigError",
    "ConnectFailed",
    "Pool",
    "PoolClosed",
    "PoolStats",
    "PoolTimeout",
    "PoolUnavailable",
    "Proxy",
    "ProxyPool",
    "close_all",
    "ProxyPoolError",
    "TooManyWaiting",
    "UsageError",
    "borrow",
    "current",
    "db",
    "proxy",
]

__version__ = "0.1.0"

#: The proxy for the pool named ``"db"`` (untyped: for a typed one,
#: ``db = proxy("db", psycopg.Connection)`` in your app).
db: Proxy = proxy("db")
