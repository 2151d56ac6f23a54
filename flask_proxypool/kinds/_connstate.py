"""What psycopg keeps on a connection in Python, which the reset reads and puts back on every return.

The session on the server is the reset's other half (`psycopg.PsycopgKind.reset`,
`_libpq`); this is the client side: the connection's attributes (autocommit,
row factory, prepared-statement settings...), the notification handlers and
backlog, and the prepared-statement cache. Some live only in psycopg's private
attributes; each is read tolerating its absence, and tests/test_clean.py fails
if psycopg moves one.
"""

from __future__ import annotations

import operator
import sys
import typing as t

if t.TYPE_CHECKING:
    import psycopg

#: Python-side connection attributes put back to the pool's values on every return.
_ATTRS = (
    "autocommit",
    "isolation_level",
    "read_only",
    "deferrable",
    "row_factory",
    "cursor_factory",
    "server_cursor_factory",
    "prepare_threshold",
    "prepared_max",
)

_read_attrs = operator.attrgetter(*_ATTRS)

#: The same, read where psycopg keeps them: its properties are Python functions around these (reading them
#: through the properties cost the reset 10,000 machine instructions on 3.13t; this way, with the test for a
#: change, 6,500). Only ever compared with what the same getter read on a new connection; `_attr_reader`
#: falls back to the properties if psycopg moved one, and tests/test_clean.py fails if it did.
_RAW_ATTRS = (
    "_autocommit",
    "_isolation_level",
    "_read_only",
    "_deferrable",
    "row_factory",
    "cursor_factory",
    "server_cursor_factory",
    "_prepared.prepare_threshold",
    "_prepared.prepared_max",
)
_read_raw = operator.attrgetter(*_RAW_ATTRS)


def _attr_reader(conn: t.Any) -> t.Callable[[t.Any], tuple[t.Any, ...]]:
    """`_read_raw` if it reads on `conn` what the properties read (a missing prepared_max is sys.maxsize
    inside psycopg), else `_read_attrs`."""
    try:
        raw = _read_raw(conn)
    except AttributeError:
        return _read_attrs
    public = _read_attrs(conn)
    if raw[:-1] != public[:-1] or raw[-1] != (sys.maxsize if public[-1] is None else public[-1]):
        return _read_attrs
    return _read_raw


Reader = t.Callable[[t.Any], tuple[t.Any, ...]]


def _state_reader(conn: t.Any, handlers: tuple[list[t.Any], list[t.Any]]) -> tuple[Reader, tuple[t.Any, ...], bool]:
    """How the reset tests a returned connection for anything to put back: (read, expected, whole).

    Read on a new connection (after `configure`). `whole`: `read` also covers
    the notification state (`_read_state`, one C call for the lot: on 3.13t
    the separate notification test cost every return 5,300 machine
    instructions), so a connection it finds as expected needs no
    `_forget_notifies`. Not whole if psycopg moved one of those attributes:
    then only the attributes are read here, and `_forget_notifies` runs on
    every return as before.
    """
    read = _attr_reader(conn)
    if read is _read_raw:
        try:
            backlog = _read_notifies(conn)[0]
        except AttributeError:
            pass
        else:
            # What a connection nobody listened on holds: an empty backlog (a snapshot, not the live deque,
            # which fills as this connection is used), and the handlers a new connection has.
            empty = None if backlog is None else type(backlog)()
            return _read_state, read(conn) + (empty, list(handlers[0]), list(handlers[1])), True
    return read, read(conn), False


def _put_back(resource: t.Any, defaults: tuple[t.Any, ...], which: range) -> None:
    for i in which:
        value = defaults[i]
        if getattr(resource, _ATTRS[i]) != value:
            setattr(resource, _ATTRS[i], value)


def _handlers(conn: psycopg.Connection[t.Any]) -> tuple[list[t.Any], list[t.Any]]:
    return list(getattr(conn, "_notice_handlers", ())), list(getattr(conn, "_notify_handlers", ()))


def _forget_notifies(conn: psycopg.Connection[t.Any], handlers: tuple[list[t.Any], list[t.Any]]) -> None:
    """Drop notifications psycopg holds for a holder's LISTEN, and handlers the holder added.

    psycopg keeps both on the connection, where no public API lists them
    (`notifies()` would wait on the socket to drain them): read its
    attributes, tolerating their absence (tests/test_clean.py fails if
    psycopg moves them). One C call reads the three: this runs on every return.
    """
    try:
        backlog, notice, notify = _read_notifies(conn)
    except AttributeError:  # psycopg moved one: each that is still there
        backlog, notice, notify = (getattr(conn, a, None) for a in _NOTIFY_ATTRS)
    if backlog:
        backlog.clear()
    if notice is not None and notice != handlers[0]:
        notice[:] = handlers[0]
    if notify is not None and notify != handlers[1]:
        notify[:] = handlers[1]


_NOTIFY_ATTRS = ("_notifies_backlog", "_notice_handlers", "_notify_handlers")
_read_notifies = operator.attrgetter(*_NOTIFY_ATTRS)
#: `_RAW_ATTRS` and `_NOTIFY_ATTRS` in one getter: the reset's test (see `_state_reader`)
_read_state = operator.attrgetter(*_RAW_ATTRS, *_NOTIFY_ATTRS)


def _forget_prepared(conn: psycopg.Connection[t.Any]) -> None:
    """`DISCARD ALL` dropped psycopg's prepared statements: make psycopg forget them too.

    psycopg forgets them itself when it sees `DISCARD ALL` in a result it
    processes, but only for a query it has not seen before, and the reset
    goes around it. Clear its cache as its own rollback does, and drop the
    `DEALLOCATE ALL` it would then send (nothing is left to deallocate).
    tests/test_clean.py fails if psycopg renames these.
    """
    prepared = getattr(conn, "_prepared", None)
    if prepared is None or not (getattr(prepared, "_names", None) or getattr(prepared, "_counts", None)):
        return
    prepared.clear()
    to_flush = getattr(prepared, "_to_flush", None)
    if to_flush is not None:
        to_flush.clear()
