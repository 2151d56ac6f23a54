"""psycopg in a test transaction: a connection whose commits and rollbacks stay inside the test's transaction.

Public psycopg API only. The connection made by the pool's kind (settings and
`configure` hook applied) becomes a subclass overriding public methods and
properties (`commit`, `rollback`, `transaction`, `cursor`, `close`,
`info`, `autocommit`, `isolation_level`, `read_only`, `deferrable`,
`set_*`); its cursors show it each statement first (`psycopg_statements.py`). The test's
savepoint is plain SQL through a `psycopg.Cursor`; the app's `transaction()`
blocks are psycopg's own savepoints inside it. The server never leaves the
test's transaction, so the app's view is kept here: `_pp_dirty` (work open:
`INTRANS` outside a test), `_pp_pending` (an autocommit statement, kept
unless it failed), `_pp_settings` (characteristics set during the test: they
would apply to the next `BEGIN` only, and there is none).
"""

from __future__ import annotations

import contextlib
import threading
import typing as t
from collections.abc import Iterator

import psycopg
from psycopg import pq

from ..errors import UsageError
from .base import SAVEPOINT
from .psycopg_statements import cursor_class, verb_of

__all__ = ["open_connection"]

IDLE = pq.TransactionStatus.IDLE
INTRANS = pq.TransactionStatus.INTRANS
INERROR = pq.TransactionStatus.INERROR

_SAVE = "SAVEPOINT " + SAVEPOINT
_RELEASE = "RELEASE SAVEPOINT " + SAVEPOINT
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT " + SAVEPOINT
#: the transaction characteristics kept per connection during the test
_SETTINGS = ("autocommit", "isolation_level", "read_only", "deferrable")


def _setting(name: str, convert: t.Callable[[t.Any], t.Any]) -> tuple[t.Any, t.Any]:
    """A transaction characteristic's property and `set_` method, kept on the connection during the test."""

    def get(self: _Savepoints) -> t.Any:
        return self._pp_settings[name]

    def put(self: _Savepoints, value: t.Any) -> None:
        self._pp_settle()
        if self._pp_blocks:  # psycopg's refusals, word for word
            raise psycopg.ProgrammingError(f"can't change {name!r} now: connection.transaction() context in progress")
        if self._pp_dirty:
            status = self._pp_status().name
            raise psycopg.ProgrammingError(f"can't change {name!r} now: connection in transaction status {status}")
        self._pp_settings[name] = convert(value)

    return property(get, put, doc=f"psycopg's ``{name}``; in a test, kept on the connection."), put


def _optional_bool(value: t.Any) -> bool | None:
    return None if value is None else bool(value)


class _Savepoints(psycopg.Connection[t.Any]):
    """Connection side: the code under test's transactions, kept inside the test's transaction."""

    _pp_active = False
    _pp_dirty = False
    _pp_pending = False
    _pp_blocks = 0  # transaction() blocks of the code under test still open
    _pp_settings: dict[str, t.Any]

    # -- the test's savepoint ------------------------------------------------------

    def _pp_exec(self, *commands: str) -> None:
        """Run our own statements, unseen by the tracking (a plain psycopg cursor)."""
        with psycopg.Cursor(self) as cur:
            for command in commands:
                cur.execute(command, prepare=False)

    def _pp_open(self) -> None:
        """BEGIN (psycopg sends it itself unless the connection is in autocommit mode) and the savepoint."""
        if super().autocommit:
            self._pp_exec("BEGIN")
        self._pp_exec(_SAVE)

    def _pp_settle(self) -> None:
        """Keep (or, if it failed, drop) what the autocommit statements did since the savepoint."""
        if self._pp_pending:
            self._pp_pending = False
            if self.pgconn.transaction_status == INERROR:
                self._pp_exec(_ROLLBACK_TO)
            else:
                self._pp_exec(_RELEASE, _SAVE)

    def _pp_guard(self) -> None:
        """Refuse to go on if a statement ended the server's transaction (a COMMIT inside a longer string)."""
        if self._pp_active and self.pgconn.transaction_status == IDLE:
            self._pp_dirty = self._pp_pending = False
            self._pp_open()
            raise UsageError(
                "proxypool_transaction: a statement ended the test's transaction (a COMMIT or ROLLBACK sent "
                "with other statements in one string, or PREPARE TRANSACTION): the work before it was "
                "committed or rolled back for real. Send COMMIT and ROLLBACK on their own, or call "
                "commit() / rollback()"
            )

    def _pp_statement(self, query: t.Any) -> bool:
        """Note one statement of the code under test about to run; False if it was handled here instead."""
        if not self._pp_active:
            return True
        self._pp_guard()
        verb = verb_of(query, self)
        if verb == "COMMIT":
            self.commit()  # inside a transaction() block: psycopg refuses, as it refuses commit()
            return False
        if verb == "ROLLBACK":
            self.rollback()
            return False
        if self._pp_blocks:
            return True  # inside a transaction() block: psycopg's savepoint covers it
        self._pp_settle()
        if verb == "BEGIN":
            self._pp_dirty = True  # the server is in a transaction already: nothing to send
            return False
        if self._pp_dirty:
            return True
        if self._pp_settings["autocommit"]:
            self._pp_pending = True  # kept unless it fails, settled before the next statement
        else:
            self._pp_dirty = True  # psycopg would have sent BEGIN before it
        return True

    def _pp_status(self) -> pq.TransactionStatus:
        """The transaction status the code under test would see outside a test."""
        real = pq.TransactionStatus(self.pgconn.transaction_status)
        if not self._pp_active or real not in (INTRANS, INERROR) or self._pp_blocks or self._pp_dirty:
            return real
        return IDLE

    # -- SavepointConnection (base.py) ---------------------------------------------

    def _pp_begin(self) -> None:
        real = super()  # (not inside the comprehension: its own scope has no super())
        self._pp_settings = {name: getattr(real, name) for name in _SETTINGS}
        self._pp_open()
        self._pp_active = True

    def _pp_reset(self) -> bool:
        if self.closed or self.pgconn.transaction_status not in (INTRANS, INERROR) or self._pp_blocks:
            return False  # unusable, or a transaction() block left open: discarded, as outside a test
        self.rollback()
        return True

    def _pp_in_transaction(self) -> bool:
        return self._pp_status() != IDLE

    def _pp_pool_commit(self) -> None:
        if self._pp_status() == INERROR:
            raise RuntimeError("cannot commit: the transaction is in error state (an earlier statement failed)")
        self.commit()

    def _pp_end(self) -> None:
        self._pp_active = False
        try:
            if not self.closed and self.pgconn.transaction_status != IDLE:
                # A transaction() block left open (by a leak) makes psycopg refuse: close() discards it all.
                with contextlib.suppress(psycopg.ProgrammingError):
                    super().rollback()
        finally:
            super().close()

    # -- psycopg's public API ------------------------------------------------------

    def commit(self) -> None:
        if not self._pp_active or self._pp_blocks:
            super().commit()  # inside a transaction() block psycopg raises, as outside a test
            return
        self._pp_guard()
        self._pp_settle()
        if self._pp_dirty:
            self._pp_dirty = False
            if self.pgconn.transaction_status == INERROR:  # COMMIT of a failed transaction rolls back
                self._pp_exec(_ROLLBACK_TO)
            else:
                self._pp_exec(_RELEASE, _SAVE)

    def rollback(self) -> None:
        if not self._pp_active or self._pp_blocks:
            super().rollback()
            return
        self._pp_guard()
        self._pp_settle()
        if self._pp_dirty or self.pgconn.transaction_status == INERROR:
            self._pp_dirty = False
            self._pp_exec(_ROLLBACK_TO)

    @contextlib.contextmanager
    def transaction(self, savepoint_name: str | None = None, force_rollback: bool = False) -> Iterator[t.Any]:
        if not self._pp_active:
            with super().transaction(savepoint_name, force_rollback) as tx:
                yield tx
            return
        self._pp_guard()
        self._pp_settle()
        # Outside a test the outermost block is the whole transaction (BEGIN ... COMMIT); here it
        # is psycopg's savepoint inside the test's transaction, so commit it on exit as COMMIT would.
        outer = not self._pp_blocks and not self._pp_dirty
        self._pp_blocks += 1
        try:
            with super().transaction(savepoint_name, force_rollback) as tx:
                yield tx
        finally:
            self._pp_blocks -= 1
        if outer:
            self._pp_dirty = True
            self.commit()

    def cursor(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        cur = super().cursor(*args, **kwargs)
        if self._pp_active:
            cur.__class__ = cursor_class(type(cur))
        return cur

    def close(self) -> None:
        if not self._pp_active:
            super().close()
        # In a test the connection lives until the test ends: close() is ignored.

    @property
    def info(self) -> psycopg.ConnectionInfo:
        """psycopg's `info`, its `transaction_status` as the code under test would see it."""
        if not self._pp_active:
            return super().info
        return _Info(self.pgconn, self._pp_status())

    autocommit, set_autocommit = _setting("autocommit", bool)
    isolation_level, set_isolation_level = _setting(
        "isolation_level", lambda v: None if v is None else psycopg.IsolationLevel(v)
    )
    read_only, set_read_only = _setting("read_only", _optional_bool)
    deferrable, set_deferrable = _setting("deferrable", _optional_bool)


class _Info(psycopg.ConnectionInfo):
    """`ConnectionInfo` whose `transaction_status` is the one the code under test expects."""

    def __init__(self, pgconn: t.Any, status: pq.TransactionStatus) -> None:
        super().__init__(pgconn)
        self._pp_status = status

    @property
    def transaction_status(self) -> pq.TransactionStatus:
        return self._pp_status


_classes: dict[type, type] = {psycopg.Connection: _Savepoints}
_classes_lock = threading.Lock()


def _class_for(base: type) -> type:
    """The test class for a connection of class `base` (psycopg's, or a subclass), made once."""
    with _classes_lock:
        cls = _classes.get(base)
        if cls is None:
            # _Savepoints (a psycopg.Connection) first: the layout then allows the __class__ assignment
            cls = _classes[base] = type(f"Test{base.__name__}", (_Savepoints, base), {"__module__": __name__})
        return cls


def open_connection(kind: t.Any) -> SavepointConnection:
    """A connection made by `kind` (a `PsycopgKind`: the pool's settings and hook), in a test transaction."""
    conn = kind.create()
    try:
        conn.__class__ = _class_for(type(conn))
        conn._pp_begin()
    except BaseException:
        conn.close()
        raise
    return t.cast("SavepointConnection", conn)


if t.TYPE_CHECKING:
    from .base import SavepointConnection
