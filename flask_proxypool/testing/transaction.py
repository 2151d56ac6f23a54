"""The transaction pool: an app's pool replaced, for one test, by one connection in a transaction rolled back after.

`ProxyPoolTransaction` (what the `proxypool_transaction` fixture gives)
puts a `TransactionPool` in place of each chosen pool of the app, through
`AppPools.swap`, and puts the app's own pool back when the test ends. The
connection comes from `psycopg.py` or `sqlite3.py` here; this module
sees it only as a `SavepointConnection` (`base.py`). What a test
transaction cannot reproduce is listed in docs/testing.md ("Not emulated").
"""

from __future__ import annotations

import logging
import threading
import typing as t
from collections.abc import Iterable

from flask import Flask

from ..errors import UsageError
from ..state import AppPools, app_state
from ..pool import Pool
from .leaks import JOIN_TIMEOUT
from .records import track_test_pool

if t.TYPE_CHECKING:
    from .base import SavepointConnection

__all__ = ["ProxyPoolTransaction", "TransactionPool"]

logger = logging.getLogger("flask_proxypool")

#: The kinds whose pools can run in a test transaction.
KINDS = ("psycopg", "sqlite3")


class _SharedKind:
    """Hands out the one connection of a test transaction; closing it is left to the test's end."""

    def __init__(self, base: t.Any, conn: SavepointConnection) -> None:
        self.base = base
        self.conn = conn
        self.name = base.name

    def create(self) -> SavepointConnection:
        return self.conn

    def close(self, resource: SavepointConnection) -> None:
        pass

    def alive(self, resource: SavepointConnection) -> bool:
        return True

    def check(self, resource: SavepointConnection) -> None:
        pass

    def reset(self, resource: SavepointConnection) -> bool:
        return resource._pp_reset()

    def in_transaction(self, resource: SavepointConnection) -> bool:
        return resource._pp_in_transaction()

    def commit(self, resource: SavepointConnection) -> None:
        resource._pp_pool_commit()

    def describe(self) -> str:
        return f"{self.base.describe()} (test transaction)"


def _open(template: Pool[t.Any], original: Pool[t.Any] | None) -> SavepointConnection:
    """The test's connection, opened with `template`'s settings (psycopg is imported only if used)."""
    if template.kind.name == "psycopg":
        from . import psycopg

        return psycopg.open_connection(template.kind)
    from . import sqlite3

    return sqlite3.open_connection(template, original)


class TransactionPool(Pool[t.Any]):
    """A pool of the one connection of a test transaction, standing in for an app's pool.

    One holder at a time, as in any pool of `max_size=1`; a thread that
    already holds the connection and asks again (a nested app context,
    `borrow()` inside a request that used the proxy) gets the same
    connection instead of waiting for itself. Made by `proxypool_transaction`.
    """

    def __init__(self, app_pools: AppPools, name: str, original: Pool[t.Any] | None, template: Pool[t.Any]) -> None:
        self._pp_lock = threading.Lock()  # guards the four fields below
        self._pp_owner: int | None = None
        self._pp_depth = 0
        self._pp_finishing = False
        self._pp_done = False
        self.app_pools = app_pools
        self.original = original
        #: the connection every holder of this pool shares during the test
        self.connection_ = _open(template, original)
        super().__init__(
            _SharedKind(template.kind, self.connection_),
            name=name,
            max_size=1,
            timeout=template.timeout,
            max_lifetime=0,
            max_idle=0,
            liveness="none",
            health_check_interval=0,
            on_return=template.on_return,
            max_hold=template.max_hold,
        )

    def getconn(self, timeout: float | None = None, holder: str | None = None) -> t.Any:
        me = threading.get_ident()
        with self._pp_lock:
            if self._pp_owner == me:
                self._pp_depth += 1
                return self.connection_
        conn = super().getconn(timeout, holder)
        with self._pp_lock:
            self._pp_owner = me
            self._pp_depth = 0
        return conn

    def putconn(self, resource: t.Any, *, failed: bool = False) -> None:
        with self._pp_lock:
            if self._pp_owner is not None and self._pp_depth > 0 and resource is self.connection_:
                self._pp_depth -= 1  # a nested holder: the outer one still has it
                return
            self._pp_owner = None
        super().putconn(resource, failed=failed)
        if self._pp_finishing:
            self.finish()

    def finish(self, *, force: bool = False) -> None:
        """End the test transaction: roll back, close, put the app's own pool back.

        Waits for the connection to come back (a context pushed by a fixture
        set up earlier gives it back after this fixture's teardown) unless
        `force`.
        """
        with self._pp_lock:
            if self._pp_done:
                return
            self._pp_finishing = True
            if self._pp_owner is not None and not force:
                return  # putconn() finishes
            self._pp_done = True
        state = self.app_pools
        if state.made(self.name) is self:  # not if the app closed its pools meanwhile
            replaced = state.swap(self.name, self.original)
            if replaced is not self:  # swapped by someone else in between: theirs stays
                state.swap(self.name, replaced)
        try:
            self.close(0)
        finally:
            try:
                self.connection_._pp_end()
            except Exception:
                logger.exception("pool %r: ending the test transaction failed", self.name)
        self.join(JOIN_TIMEOUT)


class ProxyPoolTransaction:
    """What `proxypool_transaction` gives: the app and its pools running in a test transaction.

    Usable without pytest too: `tx = ProxyPoolTransaction(app, ["db"])`,
    then `tx.finish()` when the test is over.
    """

    def __init__(self, app: Flask, names: Iterable[str]) -> None:
        self.app = app
        #: pool name -> the ``TransactionPool`` standing in for it
        self.pools: dict[str, TransactionPool] = {}
        state = app_state(app)
        try:
            for name in names:
                cfg = state.configs.get(name)
                if cfg is None:
                    raise UsageError(
                        f"proxypool_transaction: app {app.name!r} has no pool {name!r}; "
                        f"its pools are: {', '.join(sorted(state.configs))}"
                    )
                if cfg.kind not in KINDS:
                    raise UsageError(
                        f"proxypool_transaction: pool {name!r} is a {cfg.kind} pool; only psycopg and sqlite3 "
                        "pools can run in a test transaction"
                    )
                original = state.made(name)
                pool = TransactionPool(state, name, original, original or cfg.make_pool())
                state.swap(name, pool)
                self.pools[name] = pool
                track_test_pool(app, pool)
        except BaseException:
            self.finish(force=True)
            raise

    def connection(self, name: str = "db") -> t.Any:
        """The connection that pool `name` hands out in this test (the real object)."""
        return self.pools[name].connection_

    def finish(self, *, force: bool = False) -> None:
        """Roll back and give the app its pools back (done for you at the end of the test)."""
        for pool in self.pools.values():
            pool.finish(force=force)
