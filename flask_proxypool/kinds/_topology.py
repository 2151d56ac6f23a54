"""Where a psycopg connection leads: a pooler in between (PgBouncer), and the server's role.

Split from `psycopg.py` to keep that module about one connection's life; both
parts are checked at connect (the pooler probe once per pool, the role on
every new connection) and never on the checkout path.
"""

from __future__ import annotations

import logging
import typing as t

from ._libpq import _IDLE, _simple_query

if t.TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("flask_proxypool")

Hook = t.Callable[["psycopg.Connection[t.Any]"], object]


class WrongServerRole(RuntimeError):
    """A connection reached a server whose role (primary or standby) the pool's `target` refuses."""


def _role_refusal(conn: psycopg.Connection[t.Any], target: str) -> WrongServerRole | None:
    """Why `conn` must not serve a pool whose `target` is "primary" or "standby"; None if it may.

    No round trip: PostgreSQL >= 14 reports `in_hot_standby` at login and again,
    when it changes, at the end of the next statement (a promotion sends nothing
    to an idle connection). Not reported (PostgreSQL < 14): unknown, accepted.
    `default_transaction_read_only` is no substitute: a hot standby reports it off.

    When it runs: at connect for both targets, since a primary cannot become a
    standby under an open connection (that takes a restart, which ends it). A
    standby can be promoted, so a standby pool checks again after each return's
    reset (the holder's statements or the reset brought the news) and in each
    full check; a connection idle across the promotion serves one more checkout.
    """
    status = conn.pgconn.parameter_status(b"in_hot_standby")
    if status is None:
        return None
    standby = status == b"on"
    if standby == (target == "standby"):
        return None
    info = conn.info
    what = "in recovery (a standby" if standby else "not in recovery (a primary"
    what += f", in_hot_standby={status.decode()})"
    return WrongServerRole(
        f"the server at host={info.host} port={info.port} is {what} and the pool's target is {target!r}: "
        "connection closed, not handed out"
    )


# -- PgBouncer --------------------------------------------------------------------------------------

#: SQLSTATE PgBouncer sends with its own errors (protocol_violation), before closing the client connection.
PGBOUNCER_SQLSTATE = "08P01"
#: Beginnings of the errors with which PgBouncer (1.18-1.23) drops a client because it has no server
#: connection to give it: the server is down or restarting, or none freed up in time.
POOLER_LOST_SERVER = (
    "query_wait_timeout",  # no server connection came free (or could be made) in time
    "server login has been failing",  # server_login_retry: logins refused after a failed one
    "pgbouncer cannot connect to server",  # the last login failed and no server connection is left
    "server conn crashed?",  # the server connection died under the client's transaction
    "no more connections allowed",  # max_client_conn / max_db_connections reached
)


def pooler_lost_server(exc: BaseException) -> bool:
    """True for an error PgBouncer sent because it lost (or could not reach) the server, not one from PostgreSQL."""
    if getattr(exc, "sqlstate", None) != PGBOUNCER_SQLSTATE:
        return False
    text = str(exc)
    return text.startswith(POOLER_LOST_SERVER)


def _pgbouncer_defaults(
    mode: str,
    connect_kwargs: dict[str, t.Any],
    configure: Hook | None,
    reset: str | Hook | None,
    prepared_statements: bool,
) -> str | Hook:
    """Defaults for a pool behind PgBouncer in `mode`; the reset to use. (config.py words the errors for app config.)

    In transaction mode consecutive transactions of one client run on
    different server connections, shared with other clients: nothing may
    rely on, or leave, session state there.
    """
    if mode != "transaction":
        raise ValueError(f"pgbouncer must be None or 'transaction', got {mode!r}")
    if not prepared_statements:
        # psycopg prepares a query after `prepare_threshold` executions, and deallocates after a
        # rollback: PgBouncer < 1.22 routes both to any server connection
        if connect_kwargs.get("prepare_threshold") is not None:
            raise ValueError("behind PgBouncer (< 1.22) prepare_threshold must be None")
        connect_kwargs["prepare_threshold"] = None
    if configure is not None:
        raise ValueError("behind PgBouncer in transaction mode, configure is refused: its SET reaches other clients")
    if reset is not None and reset != "rollback":
        raise ValueError("behind PgBouncer in transaction mode, reset must be 'rollback': a session reset hits others")
    return "rollback"


def _warn_if_pooled(conn: psycopg.Connection[t.Any], pool: str | None, target: str) -> None:
    """Log a warning if a connection pooler sits between this pool and PostgreSQL; one round trip.

    Neither PgBouncer nor the others announce themselves to clients (their
    parameter statuses are the server's, `SHOW VERSION` answers on the admin
    console only), but a pooler must send its own BackendKeyData, so that a
    cancel request comes to it: the backend pid libpq saw at login is not
    the server backend's `pg_backend_pid()`. What this cannot tell: the pool
    mode (session or transaction), the pooler's version and settings.
    """
    pgconn = conn.pgconn
    if pgconn.transaction_status != _IDLE:
        return
    value = _server_pid(pgconn)  # a server that cannot answer in time: TimeoutError, the connection is closed
    if value is None:
        return
    server_pid = int(value)
    announced = pgconn.backend_pid
    if server_pid and server_pid != announced:
        logger.warning(
            "pool %r: %s answers through a connection pooler (the backend pid announced at login, %d, is not "
            "the server's pg_backend_pid(), %d). If it is PgBouncer in transaction mode, set 'pgbouncer': "
            "'transaction' on this pool: without it, prepared statements and session state break ('prepared "
            'statement "_pg3_0" does not exist\'). A pooler in session mode needs no setting.',
            pool,
            target,
            announced,
            server_pid,
        )


#: Longest the pooler probe waits for `SELECT pg_backend_pid()` on a new connection.
PROBE_TIMEOUT = 5.0


def _server_pid(pgconn: t.Any, timeout: float = PROBE_TIMEOUT) -> bytes | None:
    """`SELECT pg_backend_pid()` as one simple query (no transaction left open), waited for at most `timeout`."""
    return _simple_query(pgconn, b"SELECT pg_backend_pid()", timeout, "pooler probe")[1]
