"""psycopg in a test transaction, the statements: each one the code under test runs is shown to its connection first.

A cursor of a test connection (`psycopg.py`) becomes a subclass of its own
class whose `execute`, `executemany`, `copy` and `stream` call the
connection's `_pp_statement` before running (it notes that work is open,
or handles a `BEGIN`, `COMMIT` or `ROLLBACK` sent as SQL itself) and
its `_pp_guard` after (which refuses to go on if the server's transaction
ended under the test).
"""

from __future__ import annotations

import re
import threading
import typing as t

from psycopg import sql

from .base import first_word

__all__ = ["cursor_class", "verb_of"]

#: ROLLBACK TO, COMMIT PREPARED, ROLLBACK PREPARED: not the end of a transaction
_NOT_THE_END = re.compile(r"\b(?:TO|PREPARED)\b", re.I)


def verb_of(query: t.Any, conn: t.Any) -> str:
    """BEGIN, COMMIT or ROLLBACK for a statement that starts or ends a transaction, else ""."""
    if isinstance(query, str):
        text = query
    elif isinstance(query, (bytes, bytearray, memoryview)):
        text = bytes(query).decode("utf-8", "replace")
    elif isinstance(query, sql.Composable):
        text = query.as_string(conn)
    else:
        return ""
    word = first_word(text)
    if word in ("BEGIN", "START"):
        return "BEGIN"
    if word in ("COMMIT", "END") and not _NOT_THE_END.search(text):
        return "COMMIT"
    if word in ("ROLLBACK", "ABORT") and not _NOT_THE_END.search(text):
        return "ROLLBACK"
    return ""


def _cursor_class(base: t.Any) -> type:
    """`base` (the cursor's class: psycopg's or the app's) whose statements go past the connection first."""

    class TestCursor(base):  # type: ignore[misc]
        __slots__ = ()

        def execute(self, query: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
            conn = self.connection
            if not conn._pp_statement(query):
                return self
            try:
                return super().execute(query, *args, **kwargs)
            finally:
                conn._pp_guard()

        def executemany(self, query: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
            conn = self.connection
            if not conn._pp_statement(query):
                return None
            try:
                return super().executemany(query, *args, **kwargs)
            finally:
                conn._pp_guard()

        def copy(self, statement: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
            self.connection._pp_statement(statement)
            return super().copy(statement, *args, **kwargs)

        def stream(self, query: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
            if not self.connection._pp_statement(query):
                return iter(())
            return super().stream(query, *args, **kwargs)

    for name in ("copy", "stream"):  # a server-side cursor has neither
        if not hasattr(base, name):
            delattr(TestCursor, name)
    TestCursor.__name__ = TestCursor.__qualname__ = f"Test{base.__name__}"
    return TestCursor


_classes: dict[type, type] = {}
_classes_lock = threading.Lock()


def cursor_class(base: type) -> type:
    """The test class for a cursor of class `base` (psycopg's, or the app's `cursor_factory`), made once."""
    with _classes_lock:
        cls = _classes.get(base)
        if cls is None:
            cls = _classes[base] = _cursor_class(base)
        return cls
