"""The ``sqlite3`` kind: the embedded default, no server needed."""

from __future__ import annotations

import sqlite3
import typing as t

__all__ = ["Sqlite3Kind"]


class Sqlite3Kind:
    """Connections to one SQLite file.

    ``check_same_thread=False`` is forced: a pooled connection is used by one
    holder at a time but moves between threads, which sqlite3 allows once
    that check is off.
    """

    name = "sqlite3"

    def __init__(self, database: str, connect_kwargs: t.Mapping[str, t.Any] | None = None) -> None:
        self.database = database
        self.connect_kwargs = dict(connect_kwargs or {})
        self.connect_kwargs["check_same_thread"] = False

    def create(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = sqlite3.connect(self.database, **self.connect_kwargs)
        return conn

    def close(self, resource: sqlite3.Connection) -> None:
        resource.close()

    def alive(self, resource: sqlite3.Connection) -> bool:
        # An in-process library: nothing can break it behind our back.
        return True

    def check(self, resource: sqlite3.Connection) -> None:
        resource.execute("SELECT 1").fetchone()

    def reset(self, resource: sqlite3.Connection) -> bool:
        if resource.in_transaction:
            resource.rollback()
        return True

    def in_transaction(self, resource: sqlite3.Connection) -> bool:
        return resource.in_transaction

    def commit(self, resource: sqlite3.Connection) -> None:
        resource.commit()

    def describe(self) -> str:
        return f"sqlite3:{self.database}"
