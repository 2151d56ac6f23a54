"""The ``psycopg`` kind: PostgreSQL connections through psycopg 3."""

from __future__ import annotations

import logging
import select
import sys
import typing as t

from ..masking import mask_password

if t.TYPE_CHECKING:
    import psycopg

__all__ = ["PsycopgKind"]

logger = logging.getLogger("flask_proxypool")

_POLL_MASK = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)
# libpq's PGTransactionStatusType, as plain ints to keep the hot path cheap
_IDLE, _ACTIVE, _INTRANS, _INERROR, _UNKNOWN = range(5)

Hook = t.Callable[["psycopg.Connection[t.Any]"], object]


def _warn_if_blocking_under_gevent() -> None:
    """psycopg picks its socket wait function once, at import: imported before
    gevent patched ``select``, it blocks the whole event loop on every query."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return
    from psycopg import waiting

    if getattr(waiting, "wait", None) is getattr(waiting, "wait_c", object()):
        logger.warning(
            "psycopg was imported before gevent patched 'select': every query will block the whole "
            "worker. Patch first (gunicorn -k gevent without --preload does; with --preload, call "
            "gevent.monkey.patch_all() at the top of gunicorn.conf.py)"
        )


class PsycopgKind:
    """PostgreSQL connections made with ``psycopg.connect(conninfo, **connect_kwargs)``.

    :param configure: run on each new connection (set search_path, register
        adapters...). A transaction it leaves open is committed.
    :param reset: run on each connection given back, after the rollback
        (e.g. ``lambda c: c.execute("DISCARD ALL")``); raising discards it.
    """

    name = "psycopg"

    def __init__(
        self,
        conninfo: str,
        connect_kwargs: t.Mapping[str, t.Any] | None = None,
        *,
        configure: Hook | None = None,
        reset: Hook | None = None,
    ) -> None:
        import psycopg  # the extra may be missing: fail where it is asked for

        _warn_if_blocking_under_gevent()

        self._connect = psycopg.Connection.connect
        self.conninfo = conninfo
        self.connect_kwargs = dict(connect_kwargs or {})
        self._configure = configure
        self._reset = reset
        self._target = mask_password(conninfo) or "(libpq defaults)"

    def create(self) -> psycopg.Connection[t.Any]:
        conn = self._connect(self.conninfo, **self.connect_kwargs)
        if self._configure is not None:
            try:
                self._configure(conn)
                if conn.pgconn.transaction_status == _INTRANS:
                    conn.commit()
            except BaseException:
                conn.close()
                raise
        return conn

    def close(self, resource: psycopg.Connection[t.Any]) -> None:
        resource.close()

    def alive(self, resource: psycopg.Connection[t.Any]) -> bool:
        """No round trip: a healthy idle connection has nothing to read.

        A backend that was terminated, or a server that restarted, leaves the
        socket readable (an error message, then EOF) or hung up. Only then,
        or for a notification, do we pay for a real check.
        """
        pgconn = resource.pgconn
        if pgconn.status != 0 or pgconn.transaction_status != _IDLE:  # 0 is CONNECTION_OK
            return False
        poller = select.poll()
        poller.register(pgconn.socket, _POLL_MASK)
        if not poller.poll(0):
            return True
        try:
            self.check(resource)
        except Exception:
            return False
        return True

    def prober(self, resource: psycopg.Connection[t.Any]) -> t.Callable[[], bool]:
        """:meth:`alive` for one connection, with its poller registered once (the pool's hot path)."""
        pgconn = resource.pgconn
        poller = select.poll()
        poller.register(pgconn.socket, _POLL_MASK)
        poll = poller.poll
        check = self.check

        def alive() -> bool:
            # libpq reports UNKNOWN for a closed or broken connection, so this
            # also guards against polling a socket number reused since.
            if pgconn.transaction_status != _IDLE:
                return False
            if not poll(0):
                return True
            try:
                check(resource)
            except Exception:
                return False
            return True

        return alive

    def check(self, resource: psycopg.Connection[t.Any]) -> None:
        """One round trip (an empty query), leaving no transaction open."""
        if resource.closed or resource.broken:
            raise RuntimeError("connection is closed or broken")
        autocommit = resource.autocommit
        if not autocommit:
            resource.autocommit = True
        try:
            resource.execute("")
        finally:
            if not autocommit and not resource.closed:
                resource.autocommit = False

    def reset(self, resource: psycopg.Connection[t.Any]) -> bool:
        """Roll back what the holder left open; False (discard) if that cannot be done."""
        status = resource.pgconn.transaction_status  # UNKNOWN once closed or broken
        if status == _IDLE and self._reset is None:
            return True
        if status in (_INTRANS, _INERROR):
            resource.rollback()
            status = resource.pgconn.transaction_status
        if status != _IDLE:  # a query still running (ACTIVE), or UNKNOWN: unusable
            return False
        if self._reset is not None:
            self._reset(resource)
            if resource.pgconn.transaction_status == _INTRANS:
                resource.commit()
        return True

    def in_transaction(self, resource: psycopg.Connection[t.Any]) -> bool:
        return bool(resource.pgconn.transaction_status != _IDLE)

    def commit(self, resource: psycopg.Connection[t.Any]) -> None:
        status = resource.pgconn.transaction_status
        if status == _INERROR:
            # COMMIT here would silently roll back: say so instead
            raise RuntimeError("cannot commit: the transaction is in error state (an earlier statement failed)")
        if status != _IDLE:
            resource.commit()

    def describe(self) -> str:
        return self._target
