"""Each app's pools, kept in `app.extensions["proxypool"]`: made on first use, per process.

Pools are made in the process that uses them, so a `gunicorn --preload`
master that never serves a request opens nothing; a pool the master did use
is rebuilt empty in each forked child (see `_fork`).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import threading
import time
import typing as t

from flask import Flask

from ._fork import Registry
from .config import PoolConfig
from .errors import UsageError
from .pool import Pool
from .stats import PoolStats

__all__ = ["EXTENSION_KEY", "AppPools", "Throttle", "app_state", "close_all", "registrations"]

logger = logging.getLogger("flask_proxypool")

#: The key of ``app.extensions`` that holds an app's `AppPools`.
EXTENSION_KEY = "proxypool"


class Throttle:
    """At most one log line per key every `interval` seconds; the next one counts those left out.

    An outage turns every request into a 503: one warning per request would
    bury the log (and slow the server) just when an operator reads it.
    """

    def __init__(self, interval: float = 10.0, clock: t.Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()  # guards _next and _skipped
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None: leave this one out. Else log it, saying how many were left out before it."""
        now = self.clock()
        with self._lock:
            if now < self._next.get(key, -math.inf):
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return None
            self._next[key] = now + self.interval
            return self._skipped.pop(key, 0)


class AppPools:
    """One app's pools: validated configs, and the pools made from them on first use."""

    def __init__(self, app_name: str, configs: dict[str, PoolConfig], retry_after: int) -> None:
        self.app_name = app_name
        #: validated configuration per pool name (immutable)
        self.configs = configs
        #: pools configured with ``release: "commit"`` (immutable)
        self.release_at_commit = frozenset(n for n, c in configs.items() if c.release == "commit")
        self.retry_after = retry_after
        #: at most one 503 warning per pool and cause every 10 s
        self.throttle_503 = Throttle()
        # _lock guards writes to _pools (a pool is made once per name, and
        # close() swaps the dict's content). Readers may read it without the
        # lock: a dict read is atomic on every build (the free-threaded one
        # locks each dict), and a pool read just before a close() raises
        # PoolClosed rather than misbehaving.
        self._pools: dict[str, Pool[t.Any]] = {}
        self._lock = threading.Lock()
        _REGISTRATIONS.add(self)

    def pool(self, name: str) -> Pool[t.Any]:
        """The pool named `name`, made now if this process has not used it yet."""
        p = self._pools.get(name)
        if p is not None:
            return p
        with self._lock:
            p = self._pools.get(name)
            if p is None:
                cfg = self.configs.get(name)
                if cfg is None:
                    raise UsageError(
                        f"flask_proxypool: no pool named {name!r} on app {self.app_name!r}; "
                        f"configured pools: {', '.join(sorted(self.configs))}. "
                        f"Add it to PROXYPOOL_POOLS or use one of those names."
                    )
                p = cfg.make_pool()
                self._pools[name] = p
                logger.debug("pool %r made in process %d: %r", name, os.getpid(), p)
            return p

    def opened(self) -> dict[str, Pool[t.Any]]:
        """The pools this process has made so far."""
        with self._lock:
            return dict(self._pools)

    def made(self, name: str) -> Pool[t.Any] | None:
        """The pool named `name` if this process made it already; never makes one."""
        return self._pools.get(name)

    def swap(self, name: str, pool: Pool[t.Any] | None) -> Pool[t.Any] | None:
        """Put `pool` in place of the pool named `name` (None: forget it); returns the one it replaced.

        For test tools (the pytest plugin's transaction pools): the next take
        in this process uses `pool`. The replaced pool is neither closed nor
        changed; resources out of it go back to it.
        """
        if name not in self.configs:
            raise UsageError(f"flask_proxypool: no pool named {name!r} on app {self.app_name!r}")
        with self._lock:
            old = self._pools.pop(name, None)
            if pool is not None:
                self._pools[name] = pool
            return old

    def stats(self) -> dict[str, PoolStats]:
        """Stats of every configured pool, with its configuration (password masked).

        Makes the pools this process has not used yet, which opens nothing.
        """
        return {
            name: dataclasses.replace(self.pool(name).stats(), config=cfg.public())
            for name, cfg in self.configs.items()
        }

    def close(self, timeout: float | None = None) -> None:
        """Close every pool made so far; a later use makes a new one."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for p in pools:
            p.close(timeout)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


#: every live AppPools of this process, held weakly
_REGISTRATIONS: Registry[AppPools] = Registry()


def close_all(timeout: float | None = None) -> None:
    """Close every pool of every app in this process (worker exit, a preloading master).

    Pools closed here are made again, empty, if an app uses them later.
    """
    for reg in _REGISTRATIONS.items():
        try:
            reg.close(timeout)
        except Exception:
            logger.exception("app %r: closing its pools failed", reg.app_name)


def registrations() -> list[AppPools]:
    """The `AppPools` of every app registered in this process and still alive.

    Held weakly here: an app that nothing else references is gone from the
    list. The pytest plugin compares two calls to find the apps a test made.
    """
    return _REGISTRATIONS.items()


atexit.register(close_all, 1.0)


def app_state(app: Flask) -> AppPools:
    """The `AppPools` of `app`, or a `UsageError` saying how to register."""
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise UsageError(
            f"flask_proxypool is not set up on app {app.name!r}: call ProxyPool(app) "
            "(or pools.init_app(app)) in your app factory before using the proxies"
        )
    return t.cast(AppPools, state)
