"""The `sqlite3` kind: the embedded default, no server needed."""

from __future__ import annotations

import sqlite3
import typing as t

__all__ = ["Sqlite3Kind"]

#: Session state a holder may leave: temp tables/views/triggers, and attached databases.
_SESSION_QUERY = "SELECT (SELECT count(*) FROM temp.sqlite_master), (SELECT count(*) FROM pragma_database_list)"


class Sqlite3Kind:
    """Connections to one SQLite file.

    `check_same_thread=False` is forced: a pooled connection is used by one
    holder at a time but moves between threads, which sqlite3 allows once
    that check is off.
    """

    name = "sqlite3"

    def __init__(self, database: str, connect_kwargs: t.Mapping[str, t.Any] | None = None) -> None:
        self.database = database
        self.connect_kwargs = dict(connect_kwargs or {})
        self.connect_kwargs["check_same_thread"] = False
        #: (isolation_level, row_factory, text_factory, databases attached) of a new connection
        self._defaults: tuple[t.Any, ...] | None = None

    def create(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = sqlite3.connect(self.database, **self.connect_kwargs)
        if self._defaults is None:
            (attached,) = conn.execute(_SESSION_QUERY).fetchone()[1:]
            self._defaults = (conn.isolation_level, conn.row_factory, conn.text_factory, attached)
        return conn

    def close(self, resource: sqlite3.Connection) -> None:
        resource.close()

    def alive(self, resource: sqlite3.Connection) -> bool:
        # An in-process library: nothing can break it behind our back.
        return True

    def check(self, resource: sqlite3.Connection) -> None:
        resource.execute("SELECT 1").fetchone()

    def reset(self, resource: sqlite3.Connection) -> bool:
        """Roll back and put the attributes back; False (discard) if the holder left temp objects or attachments.

        An in-process check costs a few microseconds, and a new connection
        little more: a connection with session state is replaced, not cleaned.
        """
        if resource.in_transaction:
            resource.rollback()
        defaults = self._defaults
        assert defaults is not None  # set by create()
        if resource.isolation_level != defaults[0]:
            resource.isolation_level = defaults[0]
        if resource.row_factory is not defaults[1]:
            resource.row_factory = defaults[1]
        if resource.text_factory is not defaults[2]:
            resource.text_factory = defaults[2]
        temp, attached = resource.execute(_SESSION_QUERY).fetchone()
        return not temp and attached == defaults[3] and not resource.in_transaction

    def closed(self, resource: sqlite3.Connection) -> bool:
        """Closed by its holder: nothing else closes an in-process connection."""
        try:
            resource.in_transaction  # noqa: B018 (raises once closed)
        except sqlite3.ProgrammingError:
            return True
        return False

    def in_transaction(self, resource: sqlite3.Connection) -> bool:
        return resource.in_transaction

    def commit(self, resource: sqlite3.Connection) -> None:
        resource.commit()

    def describe(self) -> str:
        return f"sqlite3:{self.database}"
