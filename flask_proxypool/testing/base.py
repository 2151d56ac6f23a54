"""What a test connection offers the pool that hands it out: the interface both kinds implement.

A test connection (`psycopg.py`, `sqlite3.py` here) runs inside one
real transaction for the whole test and keeps the code under test's view
of its own transactions apart: "committed" work is a released savepoint,
"rolled back" work goes back to the last one. The `TransactionPool`
(`transaction.py`) talks to it only through `SavepointConnection`.
"""

from __future__ import annotations

import re
import typing as t

__all__ = ["SAVEPOINT", "SavepointConnection", "first_word"]

#: The savepoint every test transaction rolls back to; a "commit" releases it and takes it again.
SAVEPOINT = "flask_proxypool_test"

_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*(\w+)", re.S)


def first_word(sql: str) -> str:
    """The statement's first keyword, upper case, after blanks and comments ("" if there is none)."""
    m = _FIRST_WORD.match(sql)
    return m.group(1).upper() if m else ""


class SavepointConnection(t.Protocol):
    """The test side of a connection; the `_pp_` prefix keeps clear of the driver's own names."""

    def _pp_begin(self) -> None:
        """Open the test's transaction and its first savepoint; from now on commits stay inside it."""

    def _pp_reset(self) -> bool:
        """What the pool does on return: roll back work left open, keep "committed" work; False: unusable."""

    def _pp_in_transaction(self) -> bool:
        """Whether the code under test has work open, as the driver would say outside a test."""

    def _pp_pool_commit(self) -> None:
        """The pool's `on_return="commit"`: commit, or raise if the open work failed."""

    def _pp_end(self) -> None:
        """Roll everything back for real and close the connection (the end of the test)."""
