"""The `sqlite3` kind: the embedded default, no server needed."""

from __future__ import annotations

import sqlite3
import typing as t

__all__ = ["Sqlite3Kind", "dict_row"]

#: Session state a holder may leave: temp tables/views/triggers, attached databases, and the
#: connection-level pragmas that change what later statements do (`PRAGMA foreign_keys = OFF` must not
#: reach the next holder). Each pragma costs about 1.5 us per return; the list keeps to those.
_PRAGMAS = ("foreign_keys", "query_only", "ignore_check_constraints", "recursive_triggers", "busy_timeout")
_SESSION_QUERY = (
    "SELECT (SELECT count(*) FROM temp.sqlite_master), (SELECT count(*) FROM pragma_database_list), "
    + ", ".join(f"(SELECT * FROM pragma_{p})" for p in _PRAGMAS)
)

Hook = t.Callable[[sqlite3.Connection], object]


def dict_row(cursor: sqlite3.Cursor, row: tuple[t.Any, ...]) -> dict[str, t.Any]:
    """A row as a plain dict keyed by column name (`row_factory: "dict"`): a Flask view can return it as JSON."""
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


class Sqlite3Kind:
    """Connections to one SQLite file.

    `check_same_thread=False` is forced: a pooled connection is used by one
    holder at a time but moves between threads, which sqlite3 allows once
    that check is off.

    Args:
        connect_kwargs: `sqlite3.connect` keywords; `row_factory` and
            `configure` may be given here too (the pool configuration does).
        row_factory: set on each new connection (`sqlite3.Row`, `dict_row`,
            any callable); None keeps sqlite3's tuples.
        configure: run on each new connection, after `row_factory` is set
            (`PRAGMA foreign_keys = ON`, `create_function`...). A transaction
            it leaves open is committed.

    On return the connection is rolled back and its attributes
    (`isolation_level`, `row_factory`, `text_factory`) and the pragmas in
    `_PRAGMAS` must match what a new connection had after `configure`:
    the attributes are put back; a connection whose pragmas, temp objects
    or attached databases differ is replaced.
    """

    name = "sqlite3"

    def __init__(
        self,
        database: str,
        connect_kwargs: t.Mapping[str, t.Any] | None = None,
        *,
        row_factory: t.Callable[..., t.Any] | None = None,
        configure: Hook | None = None,
    ) -> None:
        self.database = database
        #: every option as given (a copy of the kind, as the testing plugin makes, keeps them all)
        self.connect_kwargs = dict(connect_kwargs or {})
        self.connect_kwargs["check_same_thread"] = False
        self._connect_kwargs = dict(self.connect_kwargs)
        self.row_factory = self._connect_kwargs.pop("row_factory", None) or row_factory
        self.configure = self._connect_kwargs.pop("configure", None) or configure
        #: (isolation_level, row_factory, text_factory, session query row) of a new connection, after configure
        self._defaults: tuple[t.Any, ...] | None = None

    def create(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = sqlite3.connect(self.database, **self._connect_kwargs)
        try:
            if self.row_factory is not None:
                conn.row_factory = self.row_factory
            if self.configure is not None:
                self.configure(conn)
                if conn.in_transaction:
                    conn.commit()
            if self._defaults is None:
                self._defaults = (conn.isolation_level, conn.row_factory, conn.text_factory, _session(conn))
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self, resource: sqlite3.Connection) -> None:
        resource.close()

    def alive(self, resource: sqlite3.Connection) -> bool:
        # An in-process library: nothing can break it behind our back.
        return True

    def check(self, resource: sqlite3.Connection) -> None:
        resource.execute("SELECT 1").fetchone()

    def reset(self, resource: sqlite3.Connection) -> bool:
        """Roll back and put the attributes back; False (discard) if the holder left session state.

        Session state is a temp object, an attachment or a pragma other than
        a new connection's. An in-process check costs a few microseconds, and
        a new connection little more: a connection with session state is
        replaced, not cleaned.
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
        return _session(resource) == defaults[3] and not resource.in_transaction

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


def _session(conn: sqlite3.Connection) -> tuple[t.Any, ...]:
    """The session state a holder could change, as a tuple whatever the connection's row factory."""
    cur = conn.cursor()
    try:
        cur.row_factory = None
        row: tuple[t.Any, ...] = cur.execute(_SESSION_QUERY).fetchone()
    finally:
        cur.close()
    return row
