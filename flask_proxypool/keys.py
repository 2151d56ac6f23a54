"""Every setting a pool accepts: its check, its default and its meaning.

The README's reference table is generated from these (`scripts/config_table.py`);
`config.parse_pool` runs the checks and names the pool and key when one fails.
Every duration (`timeout`, `max_lifetime`, `busy_timeout`...) is a finite
number of seconds, at most `MAX_SECONDS` (one day); where longer would make
sense, 0 means "never".
"""

from __future__ import annotations

import dataclasses
import importlib
import typing as t

from .conninfo import TARGETS
from .pool import LIVENESS, MAX_SECONDS

__all__ = ["COMMON_KEYS", "KINDS", "KIND_KEYS", "BadValue", "Check", "Key", "import_string"]

KINDS = ("psycopg", "sqlite3", "factory")


class BadValue(Exception):
    """A value check failed; `args[0]` says what was expected (`parse_pool` adds the pool and the key)."""


Check = t.Callable[[t.Any], t.Any]


@dataclasses.dataclass(frozen=True)
class Key:
    """One configuration key: its check, default and meaning (the README table comes from these)."""

    check: Check
    default: t.Any
    type: str
    doc: str
    required: bool = False


def _int_ge(low: int) -> Check:
    def check(v: t.Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise BadValue(f"an int >= {low}")
        return v

    return check


def _num_ge(low: float, *, strict: bool = False) -> Check:
    """A number of seconds from `low` to `MAX_SECONDS` (one day): inf, NaN and 1e10 are refused.

    Every duration ends up in a wait or a deadline; one beyond `threading.TIMEOUT_MAX`
    raises inside a lock acquire, at the first request, so the ceiling is checked here,
    where the error can name the pool and the key.
    """
    what = f"a number {'>' if strict else '>='} {low:g}"
    bounded = f"a finite number of seconds, at most {MAX_SECONDS:g} (one day)"

    def check(v: t.Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadValue(what)
        if v < low or (strict and v == low):
            raise BadValue(what)
        if not v <= MAX_SECONDS:  # NaN compares false both ways: refused here
            raise BadValue(bounded)
        return float(v)

    return check


def _choice(*options: str) -> Check:
    def check(v: t.Any) -> str:
        if v not in options:
            raise BadValue("one of " + ", ".join(repr(o) for o in options))
        return t.cast(str, v)

    return check


def _str(v: t.Any) -> str:
    if not isinstance(v, str):
        raise BadValue("a str")
    return v


def _bool(v: t.Any) -> bool:
    if not isinstance(v, bool):
        raise BadValue("a bool")
    return v


def _opt_int(v: t.Any) -> int | None:
    if v is None:
        return None
    return t.cast(int, _int_ge(0)(v))


def _int_between(low: int, high: int, what: str) -> Check:
    def check(v: t.Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise BadValue(f"an int from {low} to {high} ({what})")
        return v

    return check


_ISOLATION_LEVELS = ("", "DEFERRED", "IMMEDIATE", "EXCLUSIVE")


def _isolation_level(v: t.Any) -> str | None:
    """What `sqlite3.connect` takes (any case); anything else would fail at the first connect."""
    if v is None or (isinstance(v, str) and v.upper() in _ISOLATION_LEVELS):
        return v
    raise BadValue("None or one of " + ", ".join(repr(o) for o in _ISOLATION_LEVELS))


def import_string(path: str) -> t.Any:
    """`"package.module:attr"` (or `package.module.attr`) to the object it names."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise BadValue(f"a callable or a 'module:attr' string (cannot split {path!r})")
    try:
        obj: t.Any = importlib.import_module(module)
    except ImportError as e:
        raise BadValue(f"an importable 'module:attr' ({path!r} failed: {type(e).__name__}: {e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadValue(f"an importable 'module:attr' (module {module!r} has no {attr!r})") from None
    return obj


def _callable(v: t.Any) -> t.Any:
    """A callable, or a `"module:attr"` string naming one (imported now, not at first use)."""
    if isinstance(v, str):
        v = import_string(v)
    if not callable(v):
        raise BadValue("a callable or a 'module:attr' string naming one")
    return v


def _hook(v: t.Any) -> t.Any:
    """For the factory kind: a callable, a `"module:attr"` string, or a method name."""
    if v is None:
        return None
    if isinstance(v, str) and ":" not in v:
        if not v.isidentifier():
            raise BadValue("a callable, a 'module:attr' string or a method name")
        return v  # a method name of the resource
    return _callable(v)


def _psycopg_reset(v: t.Any) -> t.Any:
    """`"session"`, `"rollback"`, or a callable (`"module:attr"` too) run after the session reset."""
    if v is None:
        return "session"
    if v in ("session", "rollback"):
        return v
    if isinstance(v, str) and ":" not in v and "." not in v:
        raise BadValue("'session', 'rollback', or a callable (or 'module:attr' string) run after the session reset")
    return _callable(v)


def _opt_callable(v: t.Any) -> t.Any:
    return None if v is None else _callable(v)


def _pgbouncer(v: t.Any) -> str | None:
    """`None` (straight to PostgreSQL, or a pooler in session mode) or `"transaction"`."""
    if v is None or v == "transaction":
        return t.cast("str | None", v)
    hint = " (PgBouncer in session mode needs no setting: leave it None)" if v == "session" else ""
    raise BadValue(f"None or 'transaction'{hint}")


_GUARD = (
    f"None (the server's own setting) or a number of seconds from 0 (disabled) to {MAX_SECONDS:g} (one day); "
    "the server counts milliseconds, so a value above 0 must be at least 0.001"
)


def _guard(v: t.Any) -> float | None:
    """None, or seconds the server gets as whole milliseconds: a positive value rounding to 0 would disable it."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_SECONDS:  # NaN: refused
        raise BadValue(_GUARD)
    if 0 < v < 0.001:
        raise BadValue(_GUARD)
    return float(v)


#: Keys every pool accepts, whatever its kind.
COMMON_KEYS: dict[str, Key] = {
    "kind": Key(
        _choice(*KINDS),
        None,
        "str",
        "`psycopg`, `sqlite3` or `factory`; default: `psycopg` if `conninfo` is given, "
        "`factory` if `factory` is, else `sqlite3`",
    ),
    "min_size": Key(_int_ge(0), 0, "int", "resources kept ready, filled in the background"),
    "max_size": Key(_int_ge(1), 4, "int", "resources alive at most (in use + idle)"),
    "timeout": Key(
        _num_ge(0),
        10.0,
        "float",
        "longest wait for a resource, in seconds; then `PoolTimeout` (HTTP 503 in a request)",
    ),
    "max_waiting": Key(_int_ge(0), 0, "int", "callers allowed to queue; more get 503 at once (0: no bound)"),
    "fifo_after": Key(
        _num_ge(0),
        0.0005,
        "float",
        "a caller queued this long gets the next resource given back, before anyone else; until then a "
        "thread giving one back may take it again at once, saving a thread switch (0: strict FIFO)",
    ),
    "lifo": Key(
        _bool,
        False,
        "bool",
        "hand out the most recently returned idle resource first, so the others idle out through `max_idle` "
        "when load drops (default: the least recently used, cheaper under threads)",
    ),
    "max_use": Key(_int_ge(0), 0, "int", "close a resource after this many checkouts (0: never)"),
    "max_lifetime": Key(
        _num_ge(0), 3600.0, "float", "close a resource this many seconds after creation, 10% jitter (0: never)"
    ),
    "max_idle": Key(_num_ge(0), 600.0, "float", "close a resource unused this long, down to `min_size` (0: never)"),
    "liveness": Key(
        _choice(*LIVENESS),
        "poll",
        "str",
        "test of an idle resource on every checkout: `poll` (socket poll, no round trip; a full check only if "
        "the server sent something), `query` (the kind's full check, a round trip), `none` (opt-out: no test)",
    ),
    "liveness_after": Key(
        _num_ge(0),
        0.01,
        "float",
        "skip the `poll` test for a resource given back less than this many seconds ago (10 ms: a busy pool pays "
        "no system call, which under the GIL costs a thread switch; a backend that dies in that window is handed "
        "out once, like one dying mid-request; 0: test every checkout)",
    ),
    "health_check_interval": Key(
        _num_ge(0),
        60.0,
        "float",
        "seconds between background full checks of idle resources, but those in steady use by their thread (0: never)",
    ),
    "on_return": Key(
        _choice("rollback", "commit"),
        "rollback",
        "str",
        "work left open at the end of a request: always `rollback`, or `commit` if the request "
        "succeeded (no exception, status < 400)",
    ),
    "release": Key(
        _choice("teardown", "commit"),
        "teardown",
        "str",
        "when a request gives its connection back: at `teardown`, or (psycopg, sqlite3) as soon as a "
        "`commit()`/`rollback()` leaves it idle with no open cursor; the next access takes one again",
    ),
    "reconnect_delay": Key(
        _num_ge(0, strict=True), 0.1, "float", "first backoff after a failed create, doubling on each failure"
    ),
    "reconnect_max_delay": Key(_num_ge(0, strict=True), 1.0, "float", "longest backoff between create attempts"),
    "close_timeout": Key(_num_ge(0), 5.0, "float", "how long `close()` waits for resources still out"),
    "check_timeout": Key(
        _num_ge(0, strict=True), 5.0, "float", "longest a full check may take before the resource is discarded"
    ),
    "max_hold": Key(
        _num_ge(0), 0.0, "float", "log once (with the endpoint) and count a resource held longer than this (0: off)"
    ),
    "max_hold_action": Key(
        _choice("report", "reclaim"),
        "report",
        "str",
        "what happens past `max_hold`: `report` (log and count) or `reclaim` (also take it back: its slot is freed "
        "at once and its connection cut, so the holder's next use fails instead of holding locks; needs `max_hold`)",
    ),
}

#: psycopg.connect keywords beyond the conninfo; libpq parameters are accepted too.
_PSYCOPG_KEYS: dict[str, Key] = {
    "conninfo": Key(_str, "", "str", "libpq connection string or `postgresql://` URL", required=True),
    "configure": Key(_opt_callable, None, "callable", "run on each new connection"),
    "reset": Key(
        _psycopg_reset,
        "session",
        "str or callable",
        "what a returned connection goes through: `session` (roll back and reset the session: settings, role, "
        "temp tables, advisory locks, LISTEN, prepared statements, cursors; one round trip), `rollback` (roll back "
        "only: an opt-out for views that change no session state), or a callable run after the session reset, "
        "outside a transaction block; connection attributes always go back to the pool's values",
    ),
    "autocommit": Key(_bool, False, "bool", "`psycopg.connect(autocommit=...)`"),
    "prepare_threshold": Key(_opt_int, 5, "int or None", "`psycopg.connect(prepare_threshold=...)`"),
    "row_factory": Key(_opt_callable, None, "callable", "`psycopg.connect(row_factory=...)`"),
    "cursor_factory": Key(_opt_callable, None, "class", "`psycopg.connect(cursor_factory=...)`"),
    "pgbouncer": Key(
        _pgbouncer,
        None,
        "str or None",
        "`transaction`: the conninfo points at PgBouncer in transaction mode, so the pool keeps no session state: "
        "no prepared statements (`prepare_threshold` None), reset by rollback only, `configure`, `reset: session` "
        "and `liveness: query` refused; errors meaning the pooler lost the server give 503; "
        "`flask proxypool size` checks PgBouncer's client-side and server-side budgets",
    ),
    "pgbouncer_prepared_statements": Key(
        _bool,
        False,
        "bool",
        "with `pgbouncer`: keep psycopg's prepared statements (only PgBouncer >= 1.22 with "
        "`max_prepared_statements` > 0, and libpq >= 17)",
    ),
    "statement_timeout": Key(
        _guard,
        None,
        "float or None",
        "server-side guard, seconds (0: disabled; default: the server's own): the server cancels a statement "
        "running longer; sent at connect (libpq `options`), so the session reset restores it; behind `pgbouncer` "
        "a role setting the pool verifies on each new connection",
    ),
    "lock_timeout": Key(
        _guard,
        None,
        "float or None",
        "server-side guard, seconds (0: disabled): the server cancels a statement waiting longer for a lock; "
        "set as `statement_timeout` is",
    ),
    "idle_in_transaction_session_timeout": Key(
        _guard,
        None,
        "float or None",
        "server-side guard, seconds (0: disabled): the server ends a session left idle this long inside a "
        "transaction (the pool discards the connection); set as `statement_timeout` is",
    ),
    "target": Key(
        _choice(*TARGETS),
        "primary",
        "str",
        "the server role to connect to: `primary` (never a server in recovery: a standby is refused when connecting, "
        "read from its `in_hot_standby` status, no round trip; accepted if the server does not report it, as "
        "before PostgreSQL 14), `standby` (a read-replica pool: only servers in recovery; one promoted since is "
        "dropped when a connection comes back), `any` (no check); with several hosts (`host=a,b`) and no "
        "`target_session_attrs`, libpq is given the matching one",
    ),
}


def _sqlite_row_factory(v: t.Any) -> t.Any:
    """None (tuples), `"dict"` (plain dicts), or a callable / `"module:attr"` (`sqlite3.Row`, `"sqlite3:Row"`)."""
    if v is None:
        return None
    if v == "dict":
        from .kinds.sqlite3 import dict_row

        return dict_row
    if isinstance(v, str) and ":" not in v and "." not in v:
        raise BadValue("'dict', a callable such as sqlite3.Row, or a 'module:attr' string naming one")
    return _callable(v)


_SQLITE_KEYS: dict[str, Key] = {
    "database": Key(
        _str,
        None,
        "str",
        "database file; relative paths go under `app.instance_path`; default `<pool name>.sqlite3`",
    ),
    "busy_timeout": Key(_num_ge(0), 5.0, "float", "`sqlite3.connect(timeout=...)`: wait on a locked database"),
    "isolation_level": Key(_isolation_level, "", "str or None", "`sqlite3.connect(isolation_level=...)`"),
    "detect_types": Key(
        _int_between(0, 3, "sqlite3.PARSE_DECLTYPES | sqlite3.PARSE_COLNAMES"),
        0,
        "int",
        "`sqlite3.connect(detect_types=...)`",
    ),
    "uri": Key(_bool, False, "bool", "`sqlite3.connect(uri=...)`"),
    "row_factory": Key(
        _sqlite_row_factory,
        None,
        "callable or str",
        "set on each new connection and put back on return: `'dict'` (plain dicts, which a view can return as "
        "JSON), `sqlite3.Row` or `'sqlite3:Row'`, or any callable; default: tuples",
    ),
    "configure": Key(
        _opt_callable,
        None,
        "callable",
        "run on each new connection (`PRAGMA foreign_keys = ON`...); a connection whose pragmas differ from "
        "a new one's on return is replaced",
    ),
}

_FACTORY_KEYS: dict[str, Key] = {
    "factory": Key(
        _callable, None, "callable or str", "makes one resource: a callable or `'module:attr'`", required=True
    ),
    "close": Key(_hook, None, "callable or str", "closes one: a callable, `'module:attr'` or a method name"),
    "check": Key(_hook, None, "callable or str", "full check (raise or return False when bad)"),
    "reset": Key(_hook, None, "callable or str", "run on return; False discards the resource"),
    "commit": Key(_hook, None, "callable or str", "run on return under `on_return: commit`"),
    "alive": Key(_hook, None, "callable or str", "cheap liveness test on checkout (False discards)"),
}

KIND_KEYS: dict[str, dict[str, Key]] = {
    "psycopg": _PSYCOPG_KEYS,
    "sqlite3": _SQLITE_KEYS,
    "factory": _FACTORY_KEYS,
}
