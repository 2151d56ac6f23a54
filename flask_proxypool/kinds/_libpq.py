"""libpq at the wire: the few exchanges the psycopg kind makes without psycopg's cursor machinery.

They run on every return (the session reset) or once per new connection (the
pooler probe), so they talk to libpq directly: no cursor, no Python per
result, and a bounded wait with `select` (which gevent patches).
"""

from __future__ import annotations

import select
import time
import typing as t

# libpq's ExecStatusType values the reset reads
_COMMAND_OK, _TUPLES_OK, _PIPELINE_SYNC = 1, 2, 10
_POLL_MASK = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)
# libpq's PGTransactionStatusType, as plain ints to keep the hot path cheap
_IDLE, _ACTIVE, _INTRANS, _INERROR, _UNKNOWN = range(5)

#: Longest a reset may wait on the server before the connection is discarded instead.
RESET_TIMEOUT = 10.0


def _raw_status_functions() -> tuple[t.Callable[[t.Any], int], t.Callable[[t.Any], int]] | None:
    """libpq's `PQtransactionStatus` and `PQpipelineStatus` as psycopg's pure-Python implementation calls them.

    On that implementation (the one free-threaded 3.13t gets: there is no
    binary wheel for it) `pgconn.transaction_status` and `.pipeline_status`
    are a property around a ctypes call, the second with a libpq version test:
    0.5 and 0.7 µs a read on 3.13t, against 0.3 µs for the call alone, and the
    reset reads both on every return. None (use the properties) with the C
    implementation, where they cost 0.04 µs, or if psycopg moved these
    (tests/test_clean.py checks that they still answer as the properties do).
    """
    from psycopg import pq

    if pq.__impl__ != "python" or pq.version() < 140000:
        return None
    try:
        from psycopg.pq import _pq_ctypes

        return _pq_ctypes.PQtransactionStatus, _pq_ctypes.PQpipelineStatus
    except (ImportError, AttributeError):
        return None


def _pipeline(pgconn: t.Any, queries: list[bytes], timeout: float = RESET_TIMEOUT) -> bool:
    """Send `queries` each in its own implicit transaction, in one round trip; True if all succeeded.

    Straight to libpq (no cursor, no Python per result): this runs on every
    return. Waits with `select`, which gevent patches, and gives up after
    `timeout` seconds (a server that stopped answering: the caller discards).
    """
    pgconn.enter_pipeline_mode()
    try:
        for q in queries:
            pgconn.send_query_params(q, None)
            pgconn.pipeline_sync()
        deadline = time.monotonic() + timeout
        while pgconn.flush():
            if not select.select([], [pgconn.socket], [], _left(deadline))[1]:
                raise TimeoutError(f"session reset: could not send within {timeout:g} sec")
        ok, syncs, want = True, 0, len(queries)
        while syncs < want:
            pgconn.consume_input()
            while syncs < want and not pgconn.is_busy():
                res = pgconn.get_result()
                if res is None:
                    continue  # the end of one query's results
                status = res.status
                if status == _PIPELINE_SYNC:
                    syncs += 1
                elif status != _COMMAND_OK and status != _TUPLES_OK:
                    ok = False  # an error, or a query skipped after one (PIPELINE_ABORTED)
            if syncs < want and not select.select([pgconn.socket], [], [], _left(deadline))[0]:
                raise TimeoutError(f"session reset: no answer within {timeout:g} sec")
    finally:
        if pgconn.status == 0:  # CONNECTION_OK; a broken connection is discarded anyway
            pgconn.exit_pipeline_mode()
    return ok


def _simple(pgconn: t.Any, query: bytes, timeout: float = RESET_TIMEOUT) -> bool:
    """Send one simple-query message (several statements), wait for its results; True if all succeeded."""
    return _simple_query(pgconn, query, timeout, "session reset")[0]


def _simple_query(pgconn: t.Any, query: bytes, timeout: float, what: str) -> tuple[bool, bytes | None]:
    """One simple-query message, waited for at most `timeout`: (all succeeded, the value of a one-row result)."""
    pgconn.send_query(query)
    deadline = time.monotonic() + timeout
    while pgconn.flush():
        if not select.select([], [pgconn.socket], [], _left(deadline))[1]:
            raise TimeoutError(f"{what}: could not send within {timeout:g} sec")
    ok, value = True, None
    while True:
        pgconn.consume_input()
        while not pgconn.is_busy():
            res = pgconn.get_result()
            if res is None:
                return ok, value
            status = res.status
            if status == _TUPLES_OK:
                if res.ntuples == 1 and res.nfields == 1:
                    value = res.get_value(0, 0)
            elif status != _COMMAND_OK:
                ok = False
        if not select.select([pgconn.socket], [], [], _left(deadline))[0]:
            raise TimeoutError(f"{what}: no answer within {timeout:g} sec")


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)
