"""Server-side guards of a psycopg pool: `statement_timeout`, `lock_timeout`, `idle_in_transaction_session_timeout`.

They must be in force on every connection the pool hands out, whatever a
holder did to the session before. How depends on what the pool talks to:

- Direct to PostgreSQL they travel in the startup packet (libpq `options`,
  `-c name=value`, merged with the user's own `options`). A startup setting
  is the session's reset value: the session reset (`RESET ALL` inside
  `DISCARD ALL`) puts it back after a holder's `SET`, and it costs no round
  trip. A `SET` on a new connection would not survive that reset.
- Behind PgBouncer in transaction mode (`pgbouncer: "transaction"`), which
  refuses `options` and where any `SET` would reach other clients' server
  connections, they must be settings of the role in the database
  (`ALTER ROLE ... IN DATABASE ... SET`). The pool cannot set them, so it
  verifies them: one query on each new connection, refused with the exact
  statements to run when they do not match.
"""

from __future__ import annotations

import logging
import os
import threading
import typing as t

from .errors import ConfigError

if t.TYPE_CHECKING:
    import psycopg

__all__ = ["GUARD_KEYS", "Guards", "GuardsMismatch", "split_options"]

logger = logging.getLogger("flask_proxypool")

#: The pool keys, which are also the PostgreSQL settings they set (all counted in milliseconds there).
GUARD_KEYS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")

_SPACE = " \t\n\r\f\v"  # what PostgreSQL's pg_split_opts splits on (C isspace)
#: one row per guard, even one the server does not know (its setting NULL)
_VERIFY = (
    "SELECT session_user, current_database(), k.name, s.setting FROM (VALUES "
    + ", ".join(f"('{k}')" for k in GUARD_KEYS)
    + ") AS k(name) LEFT JOIN pg_settings AS s USING (name)"
)
#: what PgBouncer answers a startup packet carrying libpq `options`
_REFUSED = "unsupported startup parameter: options"


class GuardsMismatch(ConfigError):
    """Behind PgBouncer, the server's settings for the pool's role differ from the pool's guards.

    Raised by the create of a connection, so a caller sees it as the cause
    of `ConnectFailed` (HTTP 503 in a request).
    """


def _where(pool: str, key: str) -> str:
    return f"PROXYPOOL_POOLS[{pool!r}][{key!r}]"


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _shown(ms: int) -> str:
    return "0 (disabled)" if ms == 0 else f"{ms}ms"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def split_options(options: str) -> list[str] | None:
    """libpq `options` split as the server splits them (whitespace, backslash escapes); None if it ends in a
    lone backslash, which would escape the space before anything appended to it."""
    args: list[str] = []
    i, n = 0, len(options)
    while True:
        while i < n and options[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        word: list[str] = []
        while i < n and options[i] not in _SPACE:
            if options[i] == "\\":
                i += 1
                if i >= n:
                    return None
            word.append(options[i])
            i += 1
        args.append("".join(word))


def _settings_named(args: list[str]) -> set[str]:
    """Names set by `-c name=value`, `-cname=value` or `--name=value`, as the server reads them."""
    names: set[str] = set()
    for i, arg in enumerate(args):
        if arg == "-c":
            value = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith(("-c", "--")):
            value = arg[2:]
        else:
            continue
        name = value.split("=", 1)[0]
        names.add(name.strip().lower().replace("-", "_"))
    return names


def _user_options(kind_options: t.Mapping[str, t.Any]) -> tuple[str | None, str]:
    """The `options` libpq would send without the guards, and where it is set (for an error message)."""
    given = kind_options.get("options")
    if given is not None:
        return str(given), "options"
    from psycopg.conninfo import conninfo_to_dict

    parsed = conninfo_to_dict(kind_options.get("conninfo") or "")  # checked by now: parses
    if parsed.get("options") is not None:
        return str(parsed["options"]), "conninfo"
    env = os.environ.get("PGOPTIONS")
    return (env, "PGOPTIONS") if env else (None, "")


class Guards:
    """One pool's guards: the startup `options` that carry them, or the check that verifies them."""

    __slots__ = ("_lock", "_logged", "pgbouncer", "pool", "startup_options", "values")

    def __init__(self, pool: str, values: t.Mapping[str, float], *, pgbouncer: bool, user_options: str | None) -> None:
        self.pool = pool
        #: (setting, milliseconds) for each guard set
        self.values: tuple[tuple[str, int], ...] = tuple((k, _ms(values[k])) for k in GUARD_KEYS if k in values)
        self.pgbouncer = pgbouncer
        #: the libpq `options` to connect with (direct mode): the user's own, then the guards
        self.startup_options: str | None = None
        if not pgbouncer:
            ours = " ".join(f"-c {k}={ms}" for k, ms in self.values)
            self.startup_options = f"{user_options} {ours}" if user_options and user_options.strip() else ours
        self._lock = threading.Lock()
        self._logged: set[tuple[object, ...]] = set()

    @classmethod
    def from_config(cls, pool: str, kind_options: t.Mapping[str, t.Any]) -> Guards | None:
        """The guards of a psycopg pool's validated options (None if it sets none).

        Raises:
            ConfigError: the user's own `options` (beside the conninfo, in it,
                or in PGOPTIONS) already set one of them: two values, one
                silently winning, is a mistake to fix, not to guess.
        """
        values = {k: kind_options[k] for k in GUARD_KEYS if kind_options.get(k) is not None}
        if not values:
            return None
        pgbouncer = kind_options.get("pgbouncer") == "transaction"
        user: str | None = None
        if not pgbouncer:
            user, source = _user_options(kind_options)
            if user is not None:
                args = split_options(user)
                where = {"options": _where(pool, "options"), "conninfo": f"the 'options' of {_where(pool, 'conninfo')}"}
                shown = where.get(source, "the PGOPTIONS environment variable")
                if args is None:
                    raise ConfigError(
                        f"{shown} ends in a lone backslash: the guards ({', '.join(values)}) are appended to it; "
                        "drop it or escape it as \\\\"
                    )
                for key in GUARD_KEYS:
                    if key in values and key in _settings_named(args):
                        raise ConfigError(
                            f"{_where(pool, key)} is set, and {shown} already sets {key} (-c {key}=...): "
                            f"keep one of the two"
                        )
        return cls(pool, values, pgbouncer=pgbouncer, user_options=user)

    def verify(self, conn: psycopg.Connection[t.Any]) -> None:
        """Behind PgBouncer: one query reading the server's values on a new connection; raise if they differ.

        Raises:
            GuardsMismatch: with the `ALTER ROLE` statements that fix it. The
                pool counts a failed create and backs off; a request gets 503
                (the server's state is wrong, not the request). The full
                explanation is logged once per pool and mismatch, not on every
                retry.
        """
        from psycopg.rows import tuple_row

        autocommit = conn.autocommit
        if not autocommit:
            conn.autocommit = True  # no BEGIN: behind PgBouncer, one statement is one server transaction
        try:
            rows = conn.cursor(row_factory=tuple_row).execute(_VERIFY, prepare=False).fetchall()
        finally:
            if not autocommit and not conn.closed:
                conn.autocommit = False
        got = {str(name): None if setting is None else int(setting) for _, _, name, setting in rows}
        wrong = [(k, got.get(k), ms) for k, ms in self.values if got.get(k) != ms]
        if not wrong:
            return
        role, database = str(rows[0][0]), str(rows[0][1])
        raise self._mismatch(role, database, wrong)

    def explain(self, exc: Exception) -> Exception:
        """A connect error, with what to do if PgBouncer refused the `options` that carry the guards."""
        message = str(exc)
        if self.startup_options is None or _REFUSED not in message:
            return exc
        hint = (
            f"{message} (pool {self.pool!r} sends its {', '.join(k for k, _ in self.values)} in libpq 'options', "
            "which PgBouncer refuses: behind PgBouncer in transaction mode set pgbouncer: 'transaction' and make "
            "them settings of the role: ALTER ROLE ... IN DATABASE ... SET)"
        )
        try:
            return type(exc)(hint)
        except Exception:  # a constructor wanting other arguments: keep the original
            return exc

    def _mismatch(self, role: str, database: str, wrong: list[tuple[str, int | None, int]]) -> GuardsMismatch:
        found = ", ".join(
            f"{k} is {'not set' if have is None else _shown(have)} instead of {_shown(want)}" for k, have, want in wrong
        )
        alter = "; ".join(
            f"ALTER ROLE {_ident(role)} IN DATABASE {_ident(database)} SET {k} = '{want}ms'" for k, _, want in wrong
        )
        message = (
            f"pool {self.pool!r} (pgbouncer: 'transaction'): the server-side guards are not in force for role "
            f"{role!r} in database {database!r}: {found}; run {alter}; then RECONNECT on PgBouncer's admin console"
        )
        key = (role, database, tuple(wrong))
        with self._lock:
            first = key not in self._logged
            self._logged.add(key)
        if first:
            logger.error(
                "%s. Behind PgBouncer the guards cannot travel at connect (it refuses libpq 'options') and a SET "
                "would reach other clients, so they must be settings of the role in the database, which the pool "
                "checks on each new connection. PgBouncer's server connections opened before the ALTER ROLE keep "
                "the old values until they close: RECONNECT on the admin console closes them once released. "
                "Until the values match, new connections are refused (HTTP 503) and retried with backoff; this "
                "explanation is logged once per process",
                message,
            )
        return GuardsMismatch(message)
