"""pytest plugin for apps that use flask-proxypool: test transactions and leak checks.

Installed with the package and loaded by pytest through the `pytest11`
entry point `flask_proxypool`; nothing to import. It expects an `app`
fixture returning your Flask app (the pytest-flask convention).

Fixtures
    `proxypool_transaction`
        Each psycopg and sqlite3 pool of `app` (or the ones named by the
        marker or the ini option below) is replaced, for this test only, by a
        pool of one connection that runs inside a transaction rolled back at
        the end of the test. Commits made by the code under test become
        savepoint releases, so they are visible for the rest of the test
        and gone afterwards. Gives a `ProxyPoolTransaction`.
    `proxypool_leak_check`
        Fails the test if a resource of `app`'s pools is still checked
        out when the test is over, naming the pool, who took the resource
        and the line that took it. Gives the function below, bound to the app.

Markers
    `@pytest.mark.proxypool_transaction` / `@pytest.mark.proxypool_transaction("db", ...)`
        use `proxypool_transaction` in this test (only for these pools).
    `@pytest.mark.proxypool_no_leaks`
        use `proxypool_leak_check` in this test.

ini options
    `proxypool_transaction_pools = db other`: the pools `proxypool_transaction` wraps.
    `proxypool_leak_check = true`: check every test that uses the `app` fixture.

Helper
    `assert_all_returned` fails (`AssertionError`) while any pool of
    an app has a resource checked out.

When a test ends
    The plugin keeps nothing of it (apps, pools, connections, threads), with
    or without the leak check. Apps registered with `ProxyPool` during the
    test (its body, its function-scoped fixtures) and still alive have their
    pools closed once its teardown is over; apps made by a class-, module-,
    package- or session-scoped fixture, once that fixture is finalized (a
    later use of a closed app makes its pools again). A resource still out
    is waited for 0.25 s, then taken back and closed, and reported: in a
    `flask_proxypool` section of the terminal summary, or, under the leak
    check of a test using `app`, as a failure of that test.

How the transaction works: the plugin opens one connection per pool with the
pool's own settings (`configure` hook included), starts a transaction and a
savepoint, and puts a `TransactionPool` handing out that connection in
place of the app's pool (`AppPools._pools[name]`) for the duration of the
test. The connection's `commit()` releases the savepoint and takes a new
one, `rollback()` rolls back to it; psycopg `transaction()` blocks,
`autocommit`, sqlite3's implicit transactions, `with conn:`,
`executescript()` and `BEGIN`/`COMMIT` statements behave as they would
outside a test. What cannot be emulated: code that reads the real server
transaction status (`conn.info.transaction_status` is always `INTRANS`),
psycopg `COMMIT` sent as SQL text, a `reset` hook of the configuration
(it is not run), statements that cannot run in a transaction (`VACUUM`,
`CREATE DATABASE`, `CREATE INDEX CONCURRENTLY`), and two connections
seeing each other's uncommitted work: every holder of the pool shares the
one connection (a holder in another thread waits for it; a nested holder in
the same thread, such as `borrow()` inside a request, shares it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import logging
import os
import re
import sqlite3
import sys
import threading
import time
import typing as t
import weakref
from collections.abc import Iterable, Iterator

import pytest
from flask import Flask

from .errors import UsageError
from .state import AppPools, app_state, registrations
from .pool import Pool
from .binding import HELD
from .contexts import app_ctx as _get_app_ctx
from .contexts import request_ctx as _get_req_ctx

__all__ = [
    "ProxyPoolTransaction",
    "TransactionPool",
    "assert_all_returned",
    "proxypool_leak_check",
    "proxypool_transaction",
]

logger = logging.getLogger("flask_proxypool")

#: The savepoint every test transaction rolls back to.
SAVEPOINT = "flask_proxypool_test"
_SP = SAVEPOINT.encode()

_TX_KINDS = ("psycopg", "sqlite3")

#: How long the end of a test waits for a resource still out of a pool it closes.
_CLOSE_TIMEOUT = 0.25
#: How long it waits for a closed pool's worker thread to exit (at once, unless it is stuck in a check).
_JOIN_TIMEOUT = 2.0


def _join_worker(pool: Pool[t.Any]) -> None:
    """Wait for a closed pool's worker to exit, so that a test's threads end with the test.

    `close()` wakes the worker but waits for it only as long as its own
    timeout, which is short here; the worker needs only a moment.
    """
    worker = pool._worker
    if worker is not None and worker is not threading.current_thread():
        worker.join(_JOIN_TIMEOUT)


# -- psycopg: a connection whose commit and rollback stay inside the test ------


def _psycopg_class_for(base: type) -> type:
    """`base` (a psycopg connection class) whose transactions stay inside the test's transaction."""

    class TestConnection(base):  # type: ignore[misc]
        """App-level transaction state is kept virtually: `_pp_dirty` says the
        code under test has work open (what `INTRANS` would say outside a
        test), `_pp_pending` that an autocommit statement ran and must be
        kept. The server itself stays inside the test's transaction throughout.
        """

        _pp_active = False
        _pp_dirty = False
        _pp_pending = False

        def _pp_gen(self, *commands: bytes) -> t.Iterator[t.Any]:
            for c in commands:
                yield from self._exec_command(c)

        def _pp_settle_gen(self) -> t.Iterator[t.Any]:
            """Keep (or, if it failed, drop) what autocommit statements did since the savepoint."""
            if self._pp_pending:
                self._pp_pending = False
                if self.pgconn.transaction_status == 3:  # INERROR: the last one failed
                    yield from self._pp_gen(b"ROLLBACK TO SAVEPOINT " + _SP)
                else:
                    yield from self._pp_gen(b"RELEASE SAVEPOINT " + _SP, b"SAVEPOINT " + _SP)

        def _pp_commit_gen(self) -> t.Iterator[t.Any]:
            yield from self._pp_settle_gen()
            if self._pp_dirty:
                self._pp_dirty = False
                if self.pgconn.transaction_status == 3:  # COMMIT of a failed transaction rolls back
                    yield from self._pp_gen(b"ROLLBACK TO SAVEPOINT " + _SP)
                else:
                    yield from self._pp_gen(b"RELEASE SAVEPOINT " + _SP, b"SAVEPOINT " + _SP)

        def _pp_rollback_gen(self) -> t.Iterator[t.Any]:
            yield from self._pp_settle_gen()
            if self._pp_dirty or self.pgconn.transaction_status == 3:
                self._pp_dirty = False
                yield from self._pp_gen(b"ROLLBACK TO SAVEPOINT " + _SP)

        # -- psycopg hooks -----------------------------------------------------------

        def _start_query(self) -> t.Iterator[t.Any]:
            if self._pp_active and not self._num_transactions:
                yield from self._pp_settle_gen()
                if self._autocommit:
                    self._pp_pending = True
                else:
                    self._pp_dirty = True
            yield from super()._start_query()

        def _check_intrans_gen(self, attribute: str) -> t.Iterator[t.Any]:
            if not self._pp_active:
                yield from super()._check_intrans_gen(attribute)
                return
            yield from self._pp_settle_gen()
            import psycopg

            if self._num_transactions:
                raise psycopg.ProgrammingError(
                    f"can't change {attribute!r} now: connection.transaction() context in progress"
                )
            if self._pp_dirty:
                raise psycopg.ProgrammingError(
                    f"can't change {attribute!r} now: connection in transaction status INTRANS"
                )

        def commit(self) -> None:
            if not self._pp_active or self._num_transactions:
                super().commit()  # raises inside transaction()
                return
            with self.lock:
                self.wait(self._pp_commit_gen())

        def rollback(self) -> None:
            if not self._pp_active or self._num_transactions:
                super().rollback()
                return
            with self.lock:
                self.wait(self._pp_rollback_gen())

        @contextlib.contextmanager
        def transaction(self, savepoint_name: str | None = None, force_rollback: bool = False) -> Iterator[t.Any]:
            if not self._pp_active:
                with super().transaction(savepoint_name, force_rollback) as tx:
                    yield tx
                return
            with self.lock:
                self.wait(self._pp_settle_gen())
            # Outside a test this block would be the whole transaction (BEGIN ... COMMIT):
            # here it is a savepoint, so commit it on exit as COMMIT would.
            outer = not self._num_transactions and not self._pp_dirty
            try:
                with super().transaction(savepoint_name, force_rollback) as tx:
                    yield tx
            except BaseException:
                if outer:
                    self._pp_dirty = False  # psycopg rolled the block back: nothing is open
                raise
            if outer:
                self._pp_dirty = True
                self.commit()

        def close(self) -> None:
            if not self._pp_active:
                super().close()
            # In a test the connection lives until the test ends: close() is ignored.

        # -- test life cycle -------------------------------------------------------------

        def _pp_begin(self) -> None:
            if self._autocommit:
                self.execute("BEGIN", prepare=False)
            self.execute("SAVEPOINT " + SAVEPOINT, prepare=False)
            self._pp_active = True
            self._pp_dirty = self._pp_pending = False

        def _pp_reset(self) -> bool:
            """What the pool does on return: roll back work left open, keep autocommitted work."""
            if self.closed or self.pgconn.transaction_status not in (2, 3):  # INTRANS, INERROR
                return False
            if self._num_transactions:
                return False
            with self.lock:
                self.wait(self._pp_rollback_gen())
            return True

        def _pp_in_transaction(self) -> bool:
            return bool(self._pp_dirty or self._num_transactions)

        def _pp_end(self) -> None:
            """Roll everything back for real and close."""
            self._pp_active = False
            try:
                if not self.closed and self.pgconn.transaction_status != 0:
                    self._num_transactions = 0  # a transaction() block left open by a leak
                    with self.lock:
                        self.wait(self._pp_gen(b"ROLLBACK"))
            finally:
                self.close()

    TestConnection.__name__ = TestConnection.__qualname__ = f"Test{base.__name__}"
    return TestConnection


_psycopg_classes: dict[type, type] = {}
_psycopg_classes_lock = threading.Lock()


def _psycopg_class(base: type) -> type:
    """`_psycopg_class_for`, made once per connection class."""
    with _psycopg_classes_lock:
        cls = _psycopg_classes.get(base)
        if cls is None:
            for attr in ("_start_query", "_check_intrans_gen", "_exec_command", "wait"):
                if not hasattr(base, attr):
                    raise UsageError(
                        f"proxypool_transaction: this psycopg version has no {base.__name__}.{attr}; "
                        "the test transaction cannot be emulated"
                    )
            cls = _psycopg_class_for(base)
            _psycopg_classes[base] = cls
        return cls


def _open_psycopg(pool: Pool[t.Any]) -> t.Any:
    conn = pool.kind.create()  # the pool's own settings and configure hook
    try:
        conn.__class__ = _psycopg_class(type(conn))
        conn._pp_begin()
    except BaseException:
        conn.close()
        raise
    return conn


# -- sqlite3 --------------------------------------------------------------------

_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*(\w+)", re.S)
_ROLLBACK_TO = re.compile(r"\bTO\b", re.I)
_DML = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})
_READS = frozenset({"SELECT", "VALUES", "EXPLAIN"})


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, split where SQLite itself would."""
    start = 0
    for i, ch in enumerate(script):
        if ch == ";" and sqlite3.complete_statement(script[start : i + 1]):
            stmt = script[start : i + 1].strip()
            start = i + 1
            if _FIRST_WORD.match(stmt):
                yield stmt
    rest = script[start:].strip()
    if rest and _FIRST_WORD.match(rest):
        yield rest


class _SavepointCursor(sqlite3.Cursor):
    def execute(self, sql: str, parameters: t.Any = (), /) -> t.Self:
        conn = t.cast("_SavepointSqlite3", self.connection)
        if not conn._pp_active:
            return super().execute(sql, parameters)
        if conn._pp_statement(sql):
            return super().execute(sql, parameters)
        return self

    def executemany(self, sql: str, seq_of_parameters: t.Any, /) -> t.Self:
        conn = t.cast("_SavepointSqlite3", self.connection)
        if conn._pp_active and not conn._pp_statement(sql):
            return self
        return super().executemany(sql, seq_of_parameters)

    def executescript(self, sql_script: str, /) -> sqlite3.Cursor:
        conn = t.cast("_SavepointSqlite3", self.connection)
        if not conn._pp_active:
            return super().executescript(sql_script)
        # Outside a test: COMMIT first, then each statement in autocommit mode.
        conn.commit()
        conn._pp_script = True
        try:
            for stmt in _statements(sql_script):
                self.execute(stmt)
        finally:
            conn._pp_script = False
        if not conn._pp_dirty:
            conn.commit()
        return self


class _SavepointSqlite3(sqlite3.Connection):
    """A sqlite3 connection whose transactions stay inside the test's transaction."""

    _pp_active = False
    _pp_dirty = False
    _pp_pending = False
    _pp_script = False

    def _pp_exec(self, *commands: str) -> None:
        for c in commands:
            super().execute(c)

    def _pp_settle(self) -> None:
        if self._pp_pending:
            try:
                self._pp_exec("RELEASE SAVEPOINT " + SAVEPOINT, "SAVEPOINT " + SAVEPOINT)
            except sqlite3.OperationalError:
                return  # a statement is still in progress: kept pending, settled later
            self._pp_pending = False

    def _pp_statement(self, sql: str) -> bool:
        """Track one statement about to run; False if it was handled here instead."""
        self._pp_settle()
        m = _FIRST_WORD.match(sql)
        word = m.group(1).upper() if m else ""
        if word == "BEGIN":
            if self._pp_dirty:
                raise sqlite3.OperationalError("cannot start a transaction within a transaction")
            self._pp_dirty = True
            return False
        if word in ("COMMIT", "END"):
            self.commit()
            return False
        if word == "ROLLBACK" and not _ROLLBACK_TO.search(sql):
            self.rollback()
            return False
        if self._pp_dirty or word in _READS:
            return True
        if word in _DML and self.isolation_level is not None and not self._pp_script:
            self._pp_dirty = True  # sqlite3 would BEGIN before it
        else:
            self._pp_pending = True  # runs in autocommit mode outside a test: keep it
        return True

    def cursor(self, factory: t.Any = None) -> t.Any:
        return super().cursor(factory or _SavepointCursor)

    def execute(self, sql: str, parameters: t.Any = (), /) -> sqlite3.Cursor:
        return t.cast(sqlite3.Cursor, self.cursor().execute(sql, parameters))

    def executemany(self, sql: str, parameters: t.Any, /) -> sqlite3.Cursor:
        return t.cast(sqlite3.Cursor, self.cursor().executemany(sql, parameters))

    def executescript(self, sql_script: str, /) -> sqlite3.Cursor:
        return t.cast(sqlite3.Cursor, self.cursor().executescript(sql_script))

    @property
    def in_transaction(self) -> bool:
        if self._pp_active:
            return self._pp_dirty
        return super().in_transaction

    def commit(self) -> None:
        if not self._pp_active:
            return super().commit()
        self._pp_settle()
        if self._pp_dirty:
            self._pp_exec("RELEASE SAVEPOINT " + SAVEPOINT, "SAVEPOINT " + SAVEPOINT)
            self._pp_dirty = False

    def rollback(self) -> None:
        if not self._pp_active:
            return super().rollback()
        self._pp_settle()
        if self._pp_dirty:
            self._pp_exec("ROLLBACK TO SAVEPOINT " + SAVEPOINT)
            self._pp_dirty = False

    def __exit__(self, exc_type: t.Any, exc: t.Any, tb: t.Any) -> t.Literal[False]:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        return False

    def close(self) -> None:
        if not self._pp_active:
            super().close()

    def _pp_begin(self) -> None:
        self._pp_exec("BEGIN", "SAVEPOINT " + SAVEPOINT)
        self._pp_active = True

    def _pp_reset(self) -> bool:
        self.rollback()
        self._pp_settle()
        return True

    def _pp_in_transaction(self) -> bool:
        return self._pp_dirty

    def _pp_end(self) -> None:
        self._pp_active = False
        try:
            if super().in_transaction:
                super().rollback()
        finally:
            super().close()


def _in_memory(database: str, uri: bool) -> bool:
    if database == ":memory:":
        return True
    return uri and "mode=memory" in database and "cache=shared" not in database


def _open_sqlite3(pool: Pool[t.Any], original: Pool[t.Any] | None) -> t.Any:
    from .kinds.sqlite3 import Sqlite3Kind

    base: t.Any = pool.kind
    kwargs = {**base.connect_kwargs, "factory": _SavepointSqlite3}
    conn: t.Any = Sqlite3Kind(base.database, kwargs).create()
    try:
        if _in_memory(base.database, bool(kwargs.get("uri"))) and original is not None:
            # Each in-memory connection has its own database: start from a copy of the app's.
            with original.connection() as src:
                src.backup(conn)
        conn._pp_begin()
    except BaseException:
        sqlite3.Connection.close(conn)
        raise
    return conn


# -- the pool a test uses ------------------------------------------------------------


class _SharedKind:
    """Hands out the one connection of a test transaction; closing it is left to the test's end."""

    def __init__(self, base: t.Any, conn: t.Any) -> None:
        self.base = base
        self.conn = conn
        self.name = base.name

    def create(self) -> t.Any:
        return self.conn

    def close(self, resource: t.Any) -> None:
        pass

    def alive(self, resource: t.Any) -> bool:
        return True

    def check(self, resource: t.Any) -> None:
        pass

    def reset(self, resource: t.Any) -> bool:
        return bool(resource._pp_reset())

    def in_transaction(self, resource: t.Any) -> bool:
        return bool(resource._pp_in_transaction())

    def commit(self, resource: t.Any) -> None:
        if self.name == "psycopg" and resource._pp_dirty and resource.pgconn.transaction_status == 3:
            raise RuntimeError("cannot commit: the transaction is in error state (an earlier statement failed)")
        resource.commit()

    def describe(self) -> str:
        return f"{self.base.describe()} (test transaction)"


class TransactionPool(Pool[t.Any]):
    """A pool of the one connection of a test transaction, standing in for an app's pool.

    One holder at a time, as in any pool of `max_size=1`; a thread that
    already holds the connection and asks again (a nested app context,
    `borrow()` inside a request that used the proxy) gets the same
    connection instead of waiting for itself. Made by `proxypool_transaction`.
    """

    def __init__(self, app_pools: AppPools, name: str, original: Pool[t.Any] | None, template: Pool[t.Any]) -> None:
        self._pp_lock = threading.Lock()
        self._pp_owner: int | None = None
        self._pp_depth = 0
        self._pp_finishing = False
        self._pp_done = False
        self.app_pools = app_pools
        self.original = original
        if template.kind.name == "psycopg":
            conn = _open_psycopg(template)
        else:
            conn = _open_sqlite3(template, original)
        #: the connection every holder of this pool shares during the test
        self.connection_ = conn
        super().__init__(
            _SharedKind(template.kind, conn),
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
        with state._lock:
            if state._pools.get(self.name) is self:
                if self.original is None:
                    del state._pools[self.name]
                else:
                    state._pools[self.name] = self.original
        try:
            self.close(0)
        finally:
            try:
                self.connection_._pp_end()
            except Exception:
                logger.exception("pool %r: ending the test transaction failed", self.name)
        _join_worker(self)


class ProxyPoolTransaction:
    """What `proxypool_transaction` gives: the app and its pools running in a test transaction."""

    def __init__(self, app: Flask, names: Iterable[str]) -> None:
        self.app = app
        #: pool name -> the `TransactionPool` standing in for it
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
                if cfg.kind not in _TX_KINDS:
                    raise UsageError(
                        f"proxypool_transaction: pool {name!r} is a {cfg.kind} pool; only psycopg and sqlite3 "
                        "pools can run in a test transaction"
                    )
                with state._lock:
                    original = state._pools.get(name)
                pool = TransactionPool(state, name, original, original or cfg.make_pool())
                with state._lock:
                    state._pools[name] = pool
                self.pools[name] = pool
                _track_test_pool(app, pool)
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


# -- leak checks ---------------------------------------------------------------------


@dataclasses.dataclass
class _Taken:
    resource: t.Any
    holder: str | None
    thread: str
    where: str
    phase: str
    at: float


_LIBRARY_DIRS: tuple[str, ...] = ()


def _library_dirs() -> tuple[str, ...]:
    global _LIBRARY_DIRS
    if not _LIBRARY_DIRS:
        import flask
        import werkzeug

        dirs = [os.path.dirname(os.path.abspath(m.__file__ or "")) for m in (flask, werkzeug)]
        dirs.append(os.path.dirname(os.path.abspath(__file__)))
        files = [os.path.abspath(m.__file__ or "") for m in (contextlib, threading)]
        _LIBRARY_DIRS = tuple(d + os.sep for d in dirs) + tuple(files)
    return _LIBRARY_DIRS


def _caller() -> str:
    """`file:line in function: source` of the first frame outside flask, werkzeug and this package."""
    skip = _library_dirs()
    f: t.Any = sys._getframe(2)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(skip):
        f = f.f_back
    if f is None:
        return "an unknown place"
    filename = f.f_code.co_filename
    try:
        shown = os.path.relpath(filename)
    except ValueError:
        shown = filename
    if shown.startswith(".."):
        shown = filename
    line = linecache.getline(filename, f.f_lineno).strip()
    return f"{shown}:{f.f_lineno} in {f.f_code.co_name}" + (f": {line}" if line else "")


class _Watch:
    """Records who takes what from an app's pools while a test runs (`proxypool_leak_check`)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.phase = "setup"
        self.pools: list[Pool[t.Any]] = []
        self.taken: dict[int, dict[int, list[_Taken]]] = {}  # id(pool) -> id(resource) -> stack
        self.reported = False
        self._lock = threading.Lock()
        state = app_state(app)
        for name in state.configs:
            self.add(state.pool(name))  # makes missing pools: that opens nothing

    def add(self, pool: Pool[t.Any]) -> None:
        with self._lock:
            if any(p is pool for p in self.pools):
                return
            self.pools.append(pool)
            self.taken[id(pool)] = {}
        getconn, putconn = pool.getconn, pool.putconn
        records = self.taken[id(pool)]

        def watched_getconn(*args: t.Any, **kwargs: t.Any) -> t.Any:
            resource = getconn(*args, **kwargs)
            holder = kwargs.get("holder", args[1] if len(args) > 1 else None)
            if holder is None:  # pool.getconn() called by hand: in a request?
                rctx = _get_req_ctx(None)
                if rctx is not None and rctx.request.url_rule is not None:  # not a bare test_request_context
                    holder = rctx.request.endpoint
            taken = _Taken(resource, holder, threading.current_thread().name, _caller(), self.phase, time.monotonic())
            with self._lock:
                records.setdefault(id(resource), []).append(taken)
            return resource

        def watched_putconn(resource: t.Any, *args: t.Any, **kwargs: t.Any) -> None:
            with self._lock:
                stack = records.get(id(resource))
                if stack:
                    stack.pop()
                    if not stack:
                        del records[id(resource)]
            putconn(resource, *args, **kwargs)

        pool.getconn = watched_getconn  # type: ignore[method-assign]
        pool.putconn = watched_putconn  # type: ignore[method-assign]

    def reclaim(self) -> None:
        """Give back what is still out once the test is over, so that later tests start clean."""
        for pool in self.pools:
            for stack in self.records(pool).values():
                for taken in reversed(stack):
                    try:
                        pool.putconn(taken.resource, failed=True)
                    except Exception:
                        logger.exception("pool %r: giving back a leaked resource failed", pool.name)

    def stop(self) -> None:
        for pool in self.pools:
            for attr in ("getconn", "putconn"):
                pool.__dict__.pop(attr, None)
        _WATCHES.pop(self.app, None)

    def records(self, pool: Pool[t.Any]) -> dict[int, list[_Taken]]:
        with self._lock:
            return {k: list(v) for k, v in self.taken.get(id(pool), {}).items()}


#: The watch of each app under a leak check, from the fixture's setup to the end of the test's teardown
#: (a watch references its app: the entry leaves with ``_Watch.stop``, not by itself).
_WATCHES: weakref.WeakKeyDictionary[Flask, _Watch] = weakref.WeakKeyDictionary()
#: TransactionPools of each app, still reported by assert_all_returned after they left AppPools
#: (an app fixture that closes its pools drops them from AppPools). Held weakly both ways: a
#: finished test's TransactionPool, its connection and a long-lived app must not pin each other.
_TEST_POOLS: weakref.WeakKeyDictionary[Flask, weakref.WeakSet[Pool[t.Any]]] = weakref.WeakKeyDictionary()


def _track_test_pool(app: Flask, pool: Pool[t.Any]) -> None:
    _TEST_POOLS.setdefault(app, weakref.WeakSet()).add(pool)
    watch = _WATCHES.get(app)
    if watch is not None:
        watch.add(pool)


def _stack_held() -> set[int]:
    """ids of the resources bound to the app contexts pushed in this thread (given back when popped)."""
    held: set[int] = set()
    seen: set[int] = set()
    todo: list[t.Any] = [_get_app_ctx(None)]
    while todo:
        ctx = todo.pop()
        if ctx is None or id(ctx) in seen or not hasattr(ctx, "app"):
            continue
        seen.add(id(ctx))
        for binding in (getattr(ctx, HELD, None) or {}).values():
            held.add(id(binding.resource))
        todo.extend(tok.old_value for tok in getattr(ctx, "_cv_tokens", ()))
    return held


def _checked_out(pool: Pool[t.Any]) -> list[tuple[int, str | None, float]]:
    """(id of the resource, holder, seconds held) of each resource out of `pool`."""
    with pool._lock:
        entries = list(pool._out.values())
    now = pool._clock()
    return [(e.key, e.holder, now - e.taken_at) for e in entries]


def _describe(taken: _Taken | None, holder: str | None, held: float | None) -> str:
    if taken is not None:
        holder = taken.holder
        held = time.monotonic() - taken.at
    who = f"request {holder!r}" if holder else "code outside a request"
    out = f"taken by {who}"
    if taken is not None:
        out += f" in thread {taken.thread!r} during test {taken.phase}, at {taken.where}"
    if held is not None:
        out += f" (out for {held:.2f} s)"
    return out


_HINT = (
    "Give every resource back: let the request or app context that took it end, use "
    "'with db.borrow(app) as conn:' rather than pool.getconn() without pool.putconn(), "
    "and join threads that hold one."
)


def _leak_lines(app_name: str, pool: Pool[t.Any], watch: _Watch | None, only: set[int] | None = None) -> list[str]:
    """Lines naming each resource out of `pool` (or only those whose id is in `only`)."""
    records = watch.records(pool) if watch is not None else {}
    lines = []
    for key, holder, held in _checked_out(pool):
        if only is not None and key not in only:
            continue
        # A TransactionPool's connection may have nested holders: one line each.
        stack: list[_Taken] | list[None] = records.get(key) or [None]
        for taken in stack:
            lines.append("    - " + _describe(taken, holder, held))
    if not lines:
        return []
    head = f"  pool {pool.name!r} of app {app_name!r} ({pool.kind.name}: {pool.kind.describe()}):"
    return [head, *lines]


def _app_pools(app: Flask, watch: _Watch | None) -> list[Pool[t.Any]]:
    pools: list[Pool[t.Any]] = list(app_state(app).opened().values())
    for p in [*_TEST_POOLS.get(app, []), *(watch.pools if watch is not None else [])]:
        if not any(p is q for q in pools):
            pools.append(p)
    return pools


def assert_all_returned(app: Flask, pools: Iterable[str] | None = None) -> None:
    """Fail (`AssertionError`) if a pool of `app` has a resource checked out.

    The message names each pool, who holds each resource (the request's
    endpoint, or code outside a request) and, under `proxypool_leak_check`,
    the thread and the line that took it.

    Args:
        pools: check only these pool names (default: every pool the
            process has made for `app`).
    """
    watch = _WATCHES.get(app)
    names = None if pools is None else set(pools)
    lines: list[str] = []
    count = 0
    for pool in _app_pools(app, watch):
        if names is not None and pool.name not in names:
            continue
        if pool.stats().in_use == 0:
            continue
        found = _leak_lines(app.name, pool, watch)
        count += sum(1 for line in found if line.startswith("    - "))
        lines += found
    if lines:
        raise AssertionError(
            f"flask_proxypool: {count} resource(s) still checked out:\n" + "\n".join(lines) + "\n" + _HINT
        )


def _call_leaks(watch: _Watch) -> str | None:
    """Resources taken while the test function ran, still out, and not bound to a pushed context."""
    bound = _stack_held()
    lines: list[str] = []
    for pool in watch.pools:
        leaked = {key for key, stack in watch.records(pool).items() if key not in bound and stack[-1].phase == "call"}
        if leaked:
            lines += _leak_lines(watch.app.name, pool, watch, only=leaked)
    if not lines:
        return None
    n = sum(1 for line in lines if line.startswith("    - "))
    return f"flask_proxypool: the test left {n} resource(s) checked out:\n" + "\n".join(lines) + "\n" + _HINT


# -- pytest wiring ---------------------------------------------------------------------

_ITEM_WATCHES = pytest.StashKey[list[_Watch]]()
_ITEM_TRANSACTIONS = pytest.StashKey[list[ProxyPoolTransaction]]()
#: the app registrations alive when the test's setup began
_ITEM_BEFORE = pytest.StashKey["weakref.WeakSet[AppPools]"]()


@dataclasses.dataclass
class _SessionState:
    """Per pytest session (`config.stash`): which fixture made which app, and what to report at the end."""

    #: registrations made while a fixture of a broader scope than "function" was set up; they are
    #: that fixture's, closed when it is finalized, not at the end of the test that set it up
    scoped: weakref.WeakSet[AppPools] = dataclasses.field(default_factory=weakref.WeakSet)
    by_fixture: dict[t.Any, weakref.WeakSet[AppPools]] = dataclasses.field(default_factory=dict)
    #: (test id or fixture, lines): pools closed with resources still out, for the terminal summary
    reports: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)


_STATE = pytest.StashKey[_SessionState]()
_V = t.TypeVar("_V")


def _pop(stash: pytest.Stash, key: pytest.StashKey[_V]) -> _V | None:
    value = stash.get(key, None)
    if key in stash:
        del stash[key]
    return value


def _state(config: pytest.Config) -> _SessionState:
    return config.stash.setdefault(_STATE, _SessionState())


def _made_since(before: weakref.WeakSet[AppPools], state: _SessionState) -> list[AppPools]:
    """Registrations alive now that were not in `before` and that no broader fixture claimed."""
    return [r for r in registrations() if r not in before and r not in state.scoped]


def _close_made(made: Iterable[AppPools]) -> list[str]:
    """Close the pools of app registrations a test (or fixture) made; lines naming what was still out.

    Waits `_CLOSE_TIMEOUT` at most per pool for a resource still out, then
    reports it and gives it back itself (closed, as the pool is): left out,
    it would live on in the pool's books, and a psycopg connection collected
    open warns in whichever later test the garbage collector runs.
    """
    lines: list[str] = []
    for reg in made:
        pools = reg.opened()
        try:
            reg.close(_CLOSE_TIMEOUT)
        except Exception:
            logger.exception("app %r: closing its pools at the end of the test failed", reg.app_name)
        for pool in pools.values():
            found = _leak_lines(reg.app_name, pool, None)
            if found:
                lines += found
                _reclaim_all(pool)
            _join_worker(pool)
    return lines


def _reclaim_all(pool: Pool[t.Any]) -> None:
    """Give back, as failed, every resource still out of a closed pool: each is closed."""
    with pool._lock:
        resources = [e.resource for e in pool._out.values()]
    for resource in resources:
        try:
            pool.putconn(resource, failed=True)
        except Exception:
            logger.exception("pool %r: giving back a leaked resource failed", pool.name)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "proxypool_transaction_pools",
        "flask_proxypool: the pools proxypool_transaction runs in a test transaction "
        "(default: every psycopg and sqlite3 pool of the app)",
        type="args",
        default=[],
    )
    parser.addini(
        "proxypool_leak_check",
        "flask_proxypool: fail every test using the 'app' fixture that leaves a pooled resource checked out",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "proxypool_transaction(*pools): run the app's pools (or these) in a transaction rolled back after the test",
    )
    config.addinivalue_line(
        "markers", "proxypool_no_leaks: fail the test if it leaves a flask_proxypool resource checked out"
    )


def _selected(request: pytest.FixtureRequest, app: Flask) -> list[str]:
    marker = request.node.get_closest_marker("proxypool_transaction")
    names = list(marker.args) if marker is not None and marker.args else []
    if not names:
        names = list(request.config.getini("proxypool_transaction_pools"))
    if not names:
        names = [n for n, c in app_state(app).configs.items() if c.kind in _TX_KINDS]
    return names


@pytest.fixture
def proxypool_transaction(request: pytest.FixtureRequest, app: Flask) -> Iterator[ProxyPoolTransaction]:
    """Run `app`'s psycopg and sqlite3 pools in one transaction per pool, rolled back after the test.

    Commits made by the code under test are kept until the end of the test
    (as savepoints) and then rolled back with the rest, so the database is
    unchanged. Pools: the marker's arguments, else the
    `proxypool_transaction_pools` ini option, else every psycopg and
    sqlite3 pool of the app.
    """
    tx = ProxyPoolTransaction(app, _selected(request, app))
    request.node.stash.setdefault(_ITEM_TRANSACTIONS, []).append(tx)
    yield tx
    tx.finish()


@pytest.fixture
def proxypool_leak_check(request: pytest.FixtureRequest, app: Flask) -> t.Callable[[], None]:
    """Fail the test if it leaves a resource of `app`'s pools checked out.

    A resource the test function took and still holds when it returns (and
    that no pushed app context will give back) fails the test itself; one
    still out after every fixture was torn down is an error at teardown.
    Gives `assert_all_returned` bound to `app`, to check mid-test.
    """
    stale = _WATCHES.pop(app, None)
    if stale is not None:
        stale.stop()
    watch = _WATCHES[app] = _Watch(app)
    request.node.stash.setdefault(_ITEM_WATCHES, []).append(watch)
    return lambda: assert_all_returned(app)


@pytest.fixture(autouse=True)
def _proxypool_markers(request: pytest.FixtureRequest) -> None:
    """Turn the markers and the ini option into fixture uses."""
    node = request.node
    leaks = node.get_closest_marker("proxypool_no_leaks") is not None
    tx = node.get_closest_marker("proxypool_transaction") is not None
    if not (leaks or tx or request.config.getini("proxypool_leak_check")):
        return
    if "app" not in request.fixturenames:
        if leaks or tx:
            pytest.fail("flask_proxypool markers need an 'app' fixture giving the Flask app", pytrace=False)
        return
    if leaks or request.config.getini("proxypool_leak_check"):
        request.getfixturevalue("proxypool_leak_check")
    if tx:
        request.getfixturevalue("proxypool_transaction")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> t.Iterator[None]:
    watches = item.stash.get(_ITEM_WATCHES, [])
    for w in watches:
        w.phase = "call"
    try:
        result = yield
    except BaseException:
        for w in watches:  # failed or skipped: no leak report on top of that
            w.phase, w.reported = "teardown", True
        raise
    for w in watches:
        w.phase = "teardown"
    for w in watches:
        msg = _call_leaks(w)
        if msg is not None:
            w.reported = True
            pytest.fail(msg, pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> t.Iterator[None]:
    """Note the apps alive before the test's fixtures run: those made after are the test's."""
    item.stash[_ITEM_BEFORE] = weakref.WeakSet(registrations())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[t.Any], request: pytest.FixtureRequest) -> t.Iterator[t.Any]:
    """Apps made by a fixture of a broader scope belong to it: closed when it is finalized."""
    if fixturedef.scope == "function":
        return (yield)
    before: weakref.WeakSet[AppPools] = weakref.WeakSet(registrations())
    try:
        return (yield)
    finally:
        state = _state(request.config)
        made = _made_since(before, state)  # a nested fixture's were claimed already
        if made:
            state.scoped.update(made)
            state.by_fixture.setdefault(fixturedef, weakref.WeakSet()).update(made)


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[t.Any], request: pytest.FixtureRequest) -> None:
    """After a fixture's own teardown: close the pools of the apps it made (if a broader-scoped one)."""
    state = _state(request.config)
    made = state.by_fixture.pop(fixturedef, None)
    if made:
        lines = _close_made(list(made))
        if lines:
            state.reports.append((f"fixture {fixturedef.argname!r} ({fixturedef.scope} scope)", lines))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> t.Iterator[None]:
    try:
        return (yield)
    finally:
        # Everything of the test leaves the item here: pytest keeps items (and their stash)
        # until the session ends.
        watches = _pop(item.stash, _ITEM_WATCHES) or []
        transactions = _pop(item.stash, _ITEM_TRANSACTIONS) or []
        before = _pop(item.stash, _ITEM_BEFORE)
        message = None
        for w in watches:
            if w.reported or message is not None:
                continue
            try:
                assert_all_returned(w.app)
            except AssertionError as e:
                message = f"{e}\n(still out after the test's fixtures were torn down)"
        for w in watches:
            w.reclaim()
        for tx in transactions:
            tx.finish(force=True)
        for w in watches:
            w.stop()
        state = _state(item.config)
        lines = _close_made(_made_since(before, state)) if before is not None else []
        if lines:
            if message is None and watches and not any(w.reported for w in watches):
                n = sum(1 for line in lines if line.startswith("    - "))
                message = (
                    f"flask_proxypool: {n} resource(s) of apps made in the test still checked out when it ended:\n"
                    + "\n".join(lines)
                    + "\n"
                    + _HINT
                )
            else:
                state.reports.append((item.nodeid, lines))
        if message is not None:
            pytest.fail(message, pytrace=False)


def pytest_terminal_summary(terminalreporter: t.Any, config: pytest.Config) -> None:
    """List the pools closed at the end of a test (or fixture) with resources still out."""
    reports = _state(config).reports
    if not reports:
        return
    terminalreporter.write_sep("=", "flask_proxypool: pools closed with resources still checked out")
    for where, lines in reports:
        terminalreporter.write_line(f"{where}:")
        for line in lines:
            terminalreporter.write_line(line)
    terminalreporter.write_line(
        "These pools belong to apps made during the test (or by the fixture) and were closed when it ended; "
        "the resources still out were taken back and closed. " + _HINT
    )
