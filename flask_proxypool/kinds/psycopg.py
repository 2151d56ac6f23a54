"""The `psycopg` kind: PostgreSQL connections through psycopg 3."""

from __future__ import annotations

import logging
import select
import sys
import typing as t

from ..conninfo import BadConninfo, inspect_conninfo, sanitized, session_attrs_for
from ..errors import ConfigError
from ..masking import register_secrets
from ._connstate import (
    _ATTRS,
    Reader,
    _forget_notifies,
    _forget_prepared,
    _handlers,
    _put_back,
    _read_attrs,
    _state_reader,
)
from ._libpq import (
    _IDLE,
    _INERROR,
    _INTRANS,
    _POLL_MASK,
    RESET_TIMEOUT,
    _pipeline,
    _raw_status_functions,
    _simple,
    raw_status_usable,
)
from ._topology import WrongServerRole, _pgbouncer_defaults, _role_refusal, _warn_if_pooled, pooler_lost_server

if t.TYPE_CHECKING:
    import psycopg

    from ..guards import Guards

__all__ = ["RESET_TIMEOUT", "PsycopgKind", "WrongServerRole", "pooler_lost_server"]

logger = logging.getLogger("flask_proxypool")

Hook = t.Callable[["psycopg.Connection[t.Any]"], object]


def _warn_if_blocking_under_gevent() -> None:
    """psycopg picks its socket wait function once, at import: imported before
    gevent patched `select`, it blocks the whole event loop on every query."""
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


#: What a holder may leave on a session is undone by ``DISCARD ALL``: settings, role and session
#: authorization, held cursors, prepared statements, LISTEN, session advisory locks, cached plans,
#: temp tables, sequence state; one statement, so one pass of the server's statement machinery.
#: It cannot run inside a transaction block (not even the implicit one of a multi-statement
#: message), so when a transaction is open the rollback goes first in a libpq pipeline: two
#: messages, one round trip. PgBouncer's ``server_reset_query`` is the same statement.
_DISCARD = b"DISCARD ALL"
_ROLLBACK = b"ROLLBACK"
#: With a transaction open: the rollback and what `DISCARD ALL` does, statement by statement (`DISCARD
#: PLANS` left out: nothing a holder can observe), in one simple-query message: one round trip and one
#: transaction after the rollback, where a pipeline `ROLLBACK | DISCARD ALL` measured dearer on the server
#: (its second segment is a transaction and a sync of its own).
_ROLLBACK_AND_RESET = (
    b"ROLLBACK; CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *; "
    b"SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
)
RESET_MODES = ("session", "rollback")


class PsycopgKind:
    """PostgreSQL connections made with `psycopg.connect(conninfo, **connect_kwargs)`.

    Args:
        configure: run on each new connection (set search_path, register
            adapters...). A transaction it leaves open is committed. The settings
            it makes (`SET`, `SET ROLE`) are put back after every reset.
        reset: what a returned connection goes through. `"session"` (the
            default): roll back and reset the session (settings, role, temp
            tables, advisory locks, LISTEN, SQL prepared statements, cursors) in
            the same round trip. `"rollback"`: roll back only, for those who
            measured and know their views change no session state. A callable
            runs after the session reset, outside any transaction block, e.g.
            `lambda c: c.execute("DISCARD ALL")`; raising discards the
            connection. In every mode the connection's attributes (autocommit,
            isolation_level, read_only, deferrable, row_factory, ...) go back to
            the pool's values.
        pgbouncer: `"transaction"` when `conninfo` points at PgBouncer in
            transaction mode: no prepared statements (unless
            `pgbouncer_prepared_statements`), `reset` is `"rollback"`, and
            `configure` is refused. None: the first connection made checks
            once (one query) whether a pooler sits in between, and logs a
            warning if so.
        pgbouncer_prepared_statements: the PgBouncer is >= 1.22 with
            `max_prepared_statements` > 0 (and libpq >= 17): psycopg may
            prepare statements as it does direct.
        pool_name: named in the log messages of this kind.
        guards: the server-side timeouts (`guards.Guards`): sent at connect
            in libpq `options`, or, behind PgBouncer, verified on each new
            connection.
        target: the server role its connections must reach: `"primary"`,
            `"standby"` or `"any"`; see `_role_refusal` for what is checked when.
            With several hosts and no `target_session_attrs`, libpq is given the
            matching one, so that it tries the hosts until one has that role.
        trust_in_hot_standby: False behind PgBouncer, which forwards the
            `in_hot_standby` of its first login to the server, not of the server
            behind each transaction: the role is then not checked (libpq's
            `target_session_attrs` still is, on the same stale value).
    """

    name = "psycopg"

    def __init__(
        self,
        conninfo: str,
        connect_kwargs: t.Mapping[str, t.Any] | None = None,
        *,
        configure: Hook | None = None,
        reset: str | Hook | None = None,
        pgbouncer: str | None = None,
        pgbouncer_prepared_statements: bool = False,
        pool_name: str | None = None,
        guards: Guards | None = None,
        target: str = "primary",
        trust_in_hot_standby: bool = True,
    ) -> None:
        import psycopg  # the extra may be missing: fail where it is asked for

        _warn_if_blocking_under_gevent()

        self._connect = psycopg.Connection.connect
        self._raw_status = _raw_status_functions()
        self.conninfo = conninfo
        self.connect_kwargs = dict(connect_kwargs or {})
        self._guards = guards
        self._verify = self._apply_guards(guards)
        self._configure = configure
        #: the pool mode of the PgBouncer in between (`"transaction"`), or None
        self.pgbouncer = pgbouncer
        self._pool_name = pool_name
        #: look for an unannounced pooler on the first connection made (once)
        self._probe_pooler = pgbouncer is None
        if pgbouncer is not None:
            reset = _pgbouncer_defaults(pgbouncer, self.connect_kwargs, configure, reset, pgbouncer_prepared_statements)
        if reset is None:
            reset = "session"
        if isinstance(reset, str) and reset not in RESET_MODES:
            raise ValueError(f"reset must be one of {RESET_MODES} or a callable, got {reset!r}")
        self.reset_mode = reset if isinstance(reset, str) else "session"
        self._reset_hook: Hook | None = None if isinstance(reset, str) else reset
        #: `reset: "rollback"` without a hook: a connection found idle and as the pool made it needs nothing
        #: sent and nothing put back (`reset`'s fast path, one attribute read for all the tests below it)
        self._idle_is_clean = self.reset_mode == "rollback" and self._reset_hook is None
        #: the pool's attribute values, read off the first connection made (after configure)
        self._defaults: tuple[t.Any, ...] | None = None
        #: how the reset tests for anything to put back, what that must read, and whether it covers the
        #: notification state (`_state_reader`); set before `_defaults`, in one piece: a reset that read
        #: them apart would see a change and put back
        self._reader: tuple[Reader, tuple[t.Any, ...] | None, bool] = (_read_attrs, None, False)
        #: the notice and notify handlers a new connection has (configure's included)
        self._handlers: tuple[list[t.Any], list[t.Any]] = ([], [])
        #: a SELECT putting back what configure set (empty: nothing), found on the first connection
        self._restore = ""
        #: what the session reset sends, when idle / when a transaction is open (restore SQL appended later)
        self._reset_idle: list[bytes] = [_DISCARD]
        self._reset_intrans = _ROLLBACK_AND_RESET
        bad: BadConninfo | None = None
        try:
            info = inspect_conninfo(conninfo, self.connect_kwargs)
            attrs = session_attrs_for(target, conninfo, self.connect_kwargs)
        except BadConninfo as e:
            bad = e
        if bad is not None:  # raised outside the handler, so nothing chains to it
            raise ConfigError(f"psycopg {bad}")
        if attrs is not None:
            self.connect_kwargs["target_session_attrs"] = attrs
        self.target = target
        #: the role check at connect: off for "any" and when the server's report cannot be trusted
        self._check_role = target != "any" and trust_in_hot_standby
        if self._check_role and target == "standby":
            # A standby can be promoted under an open connection: checked again after each return's
            # reset and each full check (see _role_refusal). The primary target needs no such pass.
            self.reset = self._reset_standby  # type: ignore[method-assign]
            self.check = self._check_standby  # type: ignore[method-assign]
        register_secrets(self, info.secrets)  # scrubbed from every masked text while this kind lives
        self._target = info.display or "(libpq defaults)"

    def create(self) -> psycopg.Connection[t.Any]:
        """A new connection; a failure is re-raised masked, as `AuthenticationFailed`
        if the server refused the credentials."""
        failed: Exception | None = None
        try:
            conn = self._connect(self.conninfo, **self.connect_kwargs)
        except Exception as e:
            failed = sanitized(e)
        if failed is not None:  # raised outside the handler: libpq's own error is not its context
            raise failed if self._guards is None else self._guards.explain(failed)
        try:
            if self._probe_pooler:
                self._probe_pooler = False
                _warn_if_pooled(conn, self._pool_name, self._target)
            if self._verify is not None:
                self._verify(conn)
            if self._check_role:
                refused = _role_refusal(conn, self.target)
                if refused is not None:
                    raise refused  # the pool logs it once (with the server, never the password) and backs off
            if self._configure is not None:
                authorization = conn.pgconn.parameter_status(b"session_authorization")
                self._configure(conn)
                if conn.pgconn.transaction_status == _INTRANS:
                    conn.commit()
                if self._defaults is None:
                    self._restore = _configured_settings(conn, authorization)
                    if self._restore:
                        self._reset_idle = [_DISCARD, self._restore.encode()]
                        self._reset_intrans = _ROLLBACK_AND_RESET + b"; " + self._restore.encode()
            if self._defaults is None:
                handlers = _handlers(conn)
                self._reader = _state_reader(conn, handlers)
                self._defaults = tuple(getattr(conn, a) for a in _ATTRS)
                self._handlers = handlers
                if self._raw_status is not None and not raw_status_usable(conn.pgconn):
                    self._raw_status = None  # psycopg no longer keeps a ctypes pointer: use its properties
        except BaseException:
            conn.close()
            raise
        return conn

    def _apply_guards(self, guards: Guards | None) -> Hook | None:
        """Put the guards in the startup `options`; behind PgBouncer, return the check run on each new connection."""
        if guards is None:
            return None
        if guards.startup_options is not None:
            self.connect_kwargs["options"] = guards.startup_options
            return None
        return guards.verify

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
        """`alive` for one connection, with its poller registered once (the pool's hot path)."""
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
        """Make the connection as the pool made it; False (discard) if that cannot be done.

        One round trip in the default mode: with a transaction open, the
        rollback and the reset statements go in one simple-query message; a
        connection found idle gets `DISCARD ALL` (committed work, or
        autocommit, may have changed the session: there is no cheap test
        that could prove it clean).
        """
        pgconn = resource.pgconn
        raw = self._raw_status
        if raw is None:
            status = pgconn.transaction_status  # UNKNOWN once closed or broken
            piped = pgconn.pipeline_status
        else:  # pure-Python psycopg: the same two libpq calls, without the properties around them
            ptr = pgconn._pgconn_ptr  # type: ignore[attr-defined]  # None once closed: libpq answers UNKNOWN, OFF
            status = raw[0](ptr)
            piped = raw[1](ptr)
        if (status != _IDLE and status != _INTRANS and status != _INERROR) or piped:
            return False  # a query or COPY still running, a pipeline left open, or unusable
        # One C call reads them all (and the notification state, if `whole`): nothing to put back,
        # the common case, costs that only.
        read, expected, whole = self._reader
        changed = read(resource) != expected
        if status == _IDLE and not changed and whole and self._idle_is_clean:
            return True  # what the steps below conclude for this case, without their nine tests
        defaults = self._defaults
        assert defaults is not None  # set by create()
        if changed:
            # Attributes that any state allows, first: the reset runs with the pool's
            # cursor factory and prepared-statement bookkeeping, whatever the holder set.
            _put_back(resource, defaults, range(4, 9))
        sent = True
        if self.reset_mode == "session":
            ok = _pipeline(pgconn, self._reset_idle) if status == _IDLE else _simple(pgconn, self._reset_intrans)
            if not ok:
                return False
            _forget_prepared(resource)
        elif status != _IDLE:
            resource.rollback()
            whole = False  # psycopg ran it: a notification that came with it is in the backlog now
        else:
            sent = False
        if self._reset_hook is not None:
            if not resource.autocommit:
                resource.autocommit = True  # outside a transaction block: DISCARD ALL works
            threshold = resource.prepare_threshold
            resource.prepare_threshold = None  # a hook's statements are never prepared behind our back
            try:
                self._reset_hook(resource)
            finally:
                resource.prepare_threshold = threshold
        if (sent or self._reset_hook is not None) and pgconn.transaction_status != _IDLE:
            return False
        if changed or not whole or self._reset_hook is not None:  # (the raw round trip feeds psycopg nothing)
            _forget_notifies(resource, self._handlers)
        if changed or self._reset_hook is not None:
            # Transaction characteristics last: psycopg refuses them inside a transaction.
            _put_back(resource, defaults, range(4))
        return True

    def _reset_standby(self, resource: psycopg.Connection[t.Any]) -> bool:
        """`reset`, then the role check on what the server reported during the holder's work and the reset."""
        ok = PsycopgKind.reset(self, resource)
        if ok:
            refused = _role_refusal(resource, "standby")
            if refused is not None:
                raise refused  # the pool logs it once and discards the connection
        return ok

    def _check_standby(self, resource: psycopg.Connection[t.Any]) -> None:
        """`check` (a round trip, which brings the server's current `in_hot_standby`), then the role check."""
        PsycopgKind.check(self, resource)
        refused = _role_refusal(resource, "standby")
        if refused is not None:
            raise refused

    def closed(self, resource: psycopg.Connection[t.Any]) -> bool:
        """Closed by its holder (`close()`, `with conn:`), as opposed to lost."""
        return bool(resource.closed and not resource.broken)

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
        """The conninfo as written, each password (`password`, `sslpassword`...) as `***`."""
        return self._target


def _configured_settings(conn: psycopg.Connection[t.Any], authorization: bytes | None) -> str:
    """SQL that puts back what a `configure` hook set on the session, to follow the reset.

    `RESET ALL` and `SET SESSION AUTHORIZATION DEFAULT` return a session to
    its login state; settings made on a new connection by `configure` (a
    `search_path`, a `SET ROLE`) are the pool's, so they are set again.
    """
    from psycopg import sql
    from psycopg.rows import tuple_row

    pairs: list[tuple[str, str]] = []
    now = conn.pgconn.parameter_status(b"session_authorization")
    if now is not None and now != authorization:
        pairs.append(("session_authorization", now.decode()))
    cur = conn.cursor(row_factory=tuple_row)
    cur.execute(
        "SELECT name, setting FROM pg_settings WHERE source = 'session' AND name <> 'session_authorization' "
        "UNION ALL SELECT 'role', current_setting('role') WHERE current_setting('role') <> 'none'"
    )
    pairs.extend((str(name), str(value)) for name, value in cur.fetchall())
    if conn.pgconn.transaction_status != _IDLE:
        conn.rollback()
    if not pairs:
        return ""
    calls = sql.SQL(", ").join(
        sql.SQL("set_config({}, {}, false)").format(sql.Literal(n), sql.Literal(v)) for n, v in pairs
    )
    return sql.SQL("SELECT {}").format(calls).as_string(conn)
