"""sqlite3 in a test transaction: a connection whose commits stay inside the test's transaction, and a script splitter.

The connection is a `sqlite3.Connection` subclass (sqlite3's public
`factory=` argument) that overrides public methods only. sqlite3 opens
transactions itself (before `INSERT`/`UPDATE`/`DELETE`/`REPLACE`
unless `isolation_level` is None) and `executescript()` commits first,
then runs each statement in autocommit mode: each statement is looked at
before it runs, to keep the app's view of its transaction (`_pp_dirty`) and
of its autocommitted work (`_pp_pending`, kept at the next statement), while
the database stays inside the test's transaction. `BEGIN`, `COMMIT` and
`ROLLBACK` statements become the savepoint operations they stand for.
"""

from __future__ import annotations

import re
import sqlite3
import typing as t
from collections.abc import Iterator

from .base import SAVEPOINT, first_word

if t.TYPE_CHECKING:
    from ..pool import Pool
    from .base import SavepointConnection

__all__ = ["open_connection"]

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
            if first_word(stmt):
                yield stmt
    rest = script[start:].strip()
    if rest and first_word(rest):
        yield rest


class _SavepointCursor(sqlite3.Cursor):
    """Each statement goes past the connection first, which may handle it itself (BEGIN, COMMIT...)."""

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
        word = first_word(sql)
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

    # -- SavepointConnection (base.py) ---------------------------------------------

    def _pp_begin(self) -> None:
        self._pp_exec("BEGIN", "SAVEPOINT " + SAVEPOINT)
        self._pp_active = True

    def _pp_reset(self) -> bool:
        self.rollback()
        self._pp_settle()
        return True

    def _pp_in_transaction(self) -> bool:
        return self._pp_dirty

    def _pp_pool_commit(self) -> None:
        self.commit()

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


def open_connection(pool: Pool[t.Any], original: Pool[t.Any] | None) -> SavepointConnection:
    """A connection to `pool`'s database, with its settings, in a test transaction.

    An in-memory database is a copy of the one `original` (the app's pool) holds.
    """
    from ..kinds.sqlite3 import Sqlite3Kind

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
    return t.cast("SavepointConnection", conn)
