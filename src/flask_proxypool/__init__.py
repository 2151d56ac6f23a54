"""flask_proxypool: per-request pooled resources for Flask, returned clean, always.

``from flask_proxypool import db`` anywhere; ``ProxyPool(app)`` in the app
factory; declare pools in ``app.config["PROXYPOOL_POOLS"]``.
"""

from __future__ import annotations

from .errors import ConfigError
from .errors import ConnectFailed
from .errors import PoolClosed
from .errors import PoolTimeout
from .errors import PoolUnavailable
from .errors import ProxyPoolError
from .errors import TooManyWaiting
from .errors import UsageError
from .extension import ProxyPool
from .pool import Pool
from .proxy import Proxy
from .proxy import proxy
from .stats import PoolStats

__all__ = [
    "ProxyPool",
    "Pool",
    "PoolStats",
    "Proxy",
    "proxy",
    "db",
    "ProxyPoolError",
    "ConfigError",
    "PoolUnavailable",
    "PoolTimeout",
    "TooManyWaiting",
    "ConnectFailed",
    "PoolClosed",
    "UsageError",
]

__version__ = "0.1.0"

#: The proxy for the pool named ``"db"``.
db: Proxy = proxy("db")
