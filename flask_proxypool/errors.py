"""The few errors flask_proxypool raises, each saying what to do about it."""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ConfigError",
    "ConnectFailed",
    "PoolClosed",
    "PoolTimeout",
    "PoolUnavailable",
    "ProxyPoolError",
    "TooManyWaiting",
    "UsageError",
]


class ProxyPoolError(Exception):
    """Base of every error raised by flask_proxypool."""

    __module__ = "flask_proxypool"


class ConfigError(ProxyPoolError, ValueError):
    """A pool's configuration is invalid; the message names the pool and the key."""

    __module__ = "flask_proxypool"


class PoolUnavailable(ProxyPoolError):
    """No resource can be had right now; a request seeing it gets HTTP 503."""

    __module__ = "flask_proxypool"

    def __init__(self, message: str, *, pool: str | None = None) -> None:
        super().__init__(message)
        #: name of the pool that could not serve
        self.pool = pool


class PoolTimeout(PoolUnavailable, TimeoutError):
    """No resource became free within the pool's `timeout`."""

    __module__ = "flask_proxypool"


class TooManyWaiting(PoolUnavailable):
    """The queue of waiters is full (`max_waiting`): refused at once."""

    __module__ = "flask_proxypool"


class ConnectFailed(PoolUnavailable):
    """Creating a new resource failed (the server may be down); retried with backoff."""

    __module__ = "flask_proxypool"


class AuthenticationFailed(ConnectFailed):
    """The server refused the pool's credentials (wrong password, no such role, pg_hba.conf):
    a configuration problem rather than an outage, though it still gives HTTP 503."""

    __module__ = "flask_proxypool"


class PoolClosed(ProxyPoolError):
    """The pool was closed; nothing more can be taken from it."""

    __module__ = "flask_proxypool"


class UsageError(ProxyPoolError, RuntimeError):
    """The API was used in a way that cannot work (no app context, unknown pool, double return)."""

    __module__ = "flask_proxypool"
