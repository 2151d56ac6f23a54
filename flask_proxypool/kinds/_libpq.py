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
    """libpq's `PQtransactionStatus` and `PQpipelineStatus`, called straight through ctypes.

    On psycopg's pure-Python implementation (the one free-threaded 3.13t gets:
    there is no binary wheel for it) `pgconn.transaction_status` and
    `.pipeline_status` are a property around a ctypes call, the second with a
    libpq version test, and the reset reads both on every return. These are
    our own function objects for the same two symbols, without argument types:
    ctypes then passes psycopg's `PGconn` pointer as it is instead of
    converting it (measured on 3.13t with callgrind: 2,800 machine
    instructions a call against 4,600 with psycopg's prototype, the property
    around it not counted). A pointer is all they may be given: the kind
    checks on its first connection that psycopg still keeps one
    (`raw_status_usable`), as anything else would go to libpq as an int.

    None (use the properties) with the C implementation, where they cost
    0.04 µs, or if psycopg moved these (tests/test_clean.py checks that they
    still answer as the properties do).
    """
    from psycopg import pq

    if pq.__impl__ != "python" or pq.version() < 140000:
        return None
    try:
        import ctypes

        from psycopg.pq import _pq_ctypes

        lib = _pq_ctypes.pq  # type: ignore[attr-defined]  # the loaded libpq (ctypes.CDLL)
        funcs = lib["PQtransactionStatus"], lib["PQpipelineStatus"]  # new objects: psycopg's keep their argtypes
    except (ImportError, AttributeError):
        return None
    for f in funcs:
        f.argtypes, f.restype = None, ctypes.c_int
    return funcs


def raw_status_usable(pgconn: t.Any) -> bool:
    """True if `pgconn._pgconn_ptr` is a ctypes pointer, the only thing the functions of `_raw_status_functions`
    may be given."""
    import ctypes

    return isinstance(getattr(pgconn, "_pgconn_ptr", None), ctypes._Pointer)


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
