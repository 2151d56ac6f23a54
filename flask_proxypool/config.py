"""``PROXYPOOL_POOLS`` validated into one frozen :class:`PoolConfig` per pool.

Every error names the pool, the key and what was expected, so a bad
deployment fails at ``init_app`` instead of at the first request. Every
duration (``timeout``, ``max_lifetime``, ``busy_timeout``...) is a finite
number of seconds, at most ``MAX_SECONDS`` (one day); where longer would make
sense, 0 means "never".
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import typing as t

from .errors import ConfigError
from .kinds.base import Kind
from .masking import is_secret_key, mask_conninfo, mask_password, register_secrets
from .pool import LIVENESS, MAX_SECONDS, Pool

__all__ = ["COMMON_KEYS", "KIND_KEYS", "Key", "PoolConfig", "parse_pools"]

KINDS = ("psycopg", "sqlite3", "factory")


class _Bad(Exception):
    """A value check failed; ``args[0]`` says what was expected."""


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
            raise _Bad(f"an int >= {low}")
        return v

    return check


def _num_ge(low: float, *, strict: bool = False) -> Check:
    """A number of seconds from ``low`` to ``MAX_SECONDS`` (one day): inf, NaN and 1e10 are refused.

    Every duration ends up in a wait or a deadline; one beyond ``threading.TIMEOUT_MAX``
    raises inside a lock acquire, at the first request, so the ceiling is checked here,
    where the error can name the pool and the key.
    """
    what = f"a number {'>' if strict else '>='} {low:g}"
    bounded = f"a finite number of seconds, at most {MAX_SECONDS:g} (one day)"

    def check(v: t.Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(what)
        if v < low or (strict and v == low):
            raise _Bad(what)
        if not v <= MAX_SECONDS:  # NaN compares false both ways: refused here
            raise _Bad(bounded)
        return float(v)

    return check


def _choice(*options: str) -> Check:
    def check(v: t.Any) -> str:
        if v not in options:
            raise _Bad("one of " + ", ".join(repr(o) for o in options))
        return t.cast(str, v)

    return check


def _str(v: t.Any) -> str:
    if not isinstance(v, str):
        raise _Bad("a str")
    return v


def _bool(v: t.Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("a bool")
    return v


def _opt_int(v: t.Any) -> int | None:
    if v is None:
        return None
    return t.cast(int, _int_ge(0)(v))


def _opt_str(v: t.Any) -> str | None:
    return None if v is None else _str(v)


def import_string(path: str) -> t.Any:
    """``"package.module:attr"`` (or ``package.module.attr``) to the object it names."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise _Bad(f"a callable or a 'module:attr' string (cannot split {path!r})")
    try:
        obj: t.Any = importlib.import_module(module)
    except ImportError as e:
        raise _Bad(f"an importable 'module:attr' ({path!r} failed: {type(e).__name__}: {e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _Bad(f"an importable 'module:attr' (module {module!r} has no {attr!r})") from None
    return obj


def _callable(v: t.Any) -> t.Any:
    """A callable, or a ``"module:attr"`` string naming one (imported now, not at first use)."""
    if isinstance(v, str):
        v = import_string(v)
    if not callable(v):
        raise _Bad("a callable or a 'module:attr' string naming one")
    return v


def _hook(v: t.Any) -> t.Any:
    """For the factory kind: a callable, a ``"module:attr"`` string, or a method name."""
    if v is None:
        return None
    if isinstance(v, str) and ":" not in v:
        if not v.isidentifier():
            raise _Bad("a callable, a 'module:attr' string or a method name")
        return v  # a method name of the resource
    return _callable(v)


def _psycopg_reset(v: t.Any) -> t.Any:
    """``"session"``, ``"rollback"``, or a callable (``"module:attr"`` too) run after the session reset."""
    if v is None:
        return "session"
    if v in ("session", "rollback"):
        return v
    if isinstance(v, str) and ":" not in v and "." not in v:
        raise _Bad("'session', 'rollback', or a callable (or 'module:attr' string) run after the session reset")
    return _callable(v)


def _opt_callable(v: t.Any) -> t.Any:
    return None if v is None else _callable(v)


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
        0.0,
        "float",
        "opt-out trading safety for one system call: skip the `poll` test for a resource given back less than "
        "this many seconds ago, which may then be handed out dead (0: test every checkout)",
    ),
    "health_check_interval": Key(
        _num_ge(0), 60.0, "float", "seconds between background full checks of idle resources (0: never)"
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
}

_SQLITE_KEYS: dict[str, Key] = {
    "database": Key(
        _str,
        None,
        "str",
        "database file; relative paths go under `app.instance_path`; default `<pool name>.sqlite3`",
    ),
    "busy_timeout": Key(_num_ge(0), 5.0, "float", "`sqlite3.connect(timeout=...)`: wait on a locked database"),
    "isolation_level": Key(_opt_str, "", "str or None", "`sqlite3.connect(isolation_level=...)`"),
    "detect_types": Key(_int_ge(0), 0, "int", "`sqlite3.connect(detect_types=...)`"),
    "uri": Key(_bool, False, "bool", "`sqlite3.connect(uri=...)`"),
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

_POOL_ARGS = tuple(k for k in COMMON_KEYS if k != "kind")


def _libpq_keywords() -> frozenset[str]:
    try:
        from psycopg import pq
    except ImportError:
        return frozenset()
    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """One pool's validated configuration; all other code reads this, never raw config."""

    name: str
    kind: str
    options: t.Mapping[str, t.Any]  #: keyword arguments of :class:`~flask_proxypool.pool.Pool`
    kind_options: t.Mapping[str, t.Any]
    release: str = "teardown"  #: when the Flask extension gives a request's resource back

    def make_kind(self) -> Kind[t.Any]:
        o = dict(self.kind_options)
        if self.kind == "psycopg":
            from .kinds.psycopg import PsycopgKind

            conninfo = o.pop("conninfo")
            configure = o.pop("configure")
            reset = o.pop("reset")
            return PsycopgKind(conninfo, o, configure=configure, reset=reset)
        if self.kind == "sqlite3":
            from .kinds.sqlite3 import Sqlite3Kind

            database = o.pop("database")
            if database != ":memory:" and not o.get("uri"):
                parent = os.path.dirname(database)
                if parent:
                    os.makedirs(parent, exist_ok=True)
            o["timeout"] = o.pop("busy_timeout")
            return Sqlite3Kind(database, o)
        from .kinds.factory import FactoryKind

        return FactoryKind(**o)

    def make_pool(self) -> Pool[t.Any]:
        return Pool(self.make_kind(), name=self.name, **self.options)

    def __repr__(self) -> str:
        # kind_options hold the conninfo and any password as given: show them the way public() does
        shown = {k: v for k, v in self.public().items() if k in self.kind_options}
        return (
            f"PoolConfig(name={self.name!r}, kind={self.kind!r}, options={dict(self.options)!r}, "
            f"kind_options={shown!r}, release={self.release!r})"
        )

    def public(self) -> dict[str, t.Any]:
        """The configuration as JSON-ready data, password masked, callables by name."""
        out: dict[str, t.Any] = {"kind": self.kind, **self.options, "release": self.release}
        for k, v in self.kind_options.items():
            if is_secret_key(k):
                v = "***"
            elif k == "conninfo" and isinstance(v, str):
                v = mask_conninfo(v)
            elif isinstance(v, str):
                v = mask_password(v)
            elif callable(v):
                v = getattr(v, "__qualname__", repr(v))
            out[k] = v
        return out


def _where(name: str, key: str | None = None) -> str:
    return f"PROXYPOOL_POOLS[{name!r}]" + (f"[{key!r}]" if key is not None else "")


def _shown(key: str, value: t.Any) -> str:
    if is_secret_key(key):
        return "'***'"
    return mask_password(repr(value))


def parse_pool(name: str, raw: t.Any, instance_path: str | None = None) -> PoolConfig:
    """Validate one pool's mapping; raise :class:`ConfigError` naming the pool and key."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"PROXYPOOL_POOLS keys must be identifiers (pool names), got {name!r}")
    if not isinstance(raw, t.Mapping):
        raise ConfigError(f"{_where(name)} must be a dict of settings, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind is None:
        kind = "psycopg" if "conninfo" in raw else "factory" if "factory" in raw else "sqlite3"
    else:
        try:
            kind = COMMON_KEYS["kind"].check(kind)
        except _Bad as e:
            raise ConfigError(f"{_where(name, 'kind')} must be {e.args[0]}, got {kind!r}") from None
    specific = KIND_KEYS[kind]
    libpq = _libpq_keywords() if kind == "psycopg" else frozenset()
    options: dict[str, t.Any] = {}
    kind_options: dict[str, t.Any] = {}
    for key, value in raw.items():
        if key == "kind":
            continue
        spec = COMMON_KEYS.get(key) or specific.get(key)
        if spec is None:
            if key in libpq:
                if not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise ConfigError(
                        f"{_where(name, key)} must be a str or int (a libpq parameter), got {_shown(key, value)}"
                    )
                kind_options[key] = str(value)
                continue
            valid = sorted(set(COMMON_KEYS) | set(specific))
            close = difflib.get_close_matches(str(key), valid + sorted(libpq), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            extra = " and any libpq connection parameter" if libpq else ""
            raise ConfigError(
                f"{_where(name)} has unknown key {key!r}{hint}; valid keys for kind {kind!r} are: "
                + ", ".join(valid)
                + extra
            )
        try:
            checked = spec.check(value)
        except _Bad as e:
            raise ConfigError(f"{_where(name, key)} must be {e.args[0]}, got {_shown(key, value)}") from None
        (options if key in COMMON_KEYS else kind_options)[key] = checked
    for key, spec in specific.items():
        if key in kind_options:
            continue
        if spec.required:
            raise ConfigError(f"{_where(name)} needs {key!r} for kind {kind!r} ({spec.doc})")
        kind_options[key] = spec.default
    for key in _POOL_ARGS:
        options.setdefault(key, COMMON_KEYS[key].default)
    if options["min_size"] > options["max_size"]:
        raise ConfigError(
            f"{_where(name, 'min_size')} must be <= max_size ({options['max_size']}), got {options['min_size']}"
        )
    if options["reconnect_max_delay"] < options["reconnect_delay"]:
        raise ConfigError(
            f"{_where(name, 'reconnect_max_delay')} must be >= reconnect_delay "
            f"({options['reconnect_delay']:g}), got {options['reconnect_max_delay']:g}"
        )
    if kind == "sqlite3":
        db = kind_options["database"] or f"{name}.sqlite3"
        if db == ":memory:" or (kind_options["uri"] and "mode=memory" in db):
            if options["max_size"] > 1:
                raise ConfigError(
                    f"{_where(name, 'database')} is an in-memory database: each connection would get its "
                    f"own, so max_size must be 1, got {options['max_size']}"
                )
        elif not kind_options["uri"] and not os.path.isabs(db) and instance_path:
            db = os.path.join(instance_path, db)
        kind_options["database"] = db
    secrets: tuple[str, ...] = ()
    if kind == "psycopg":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"{_where(name)} is a psycopg pool but psycopg is not installed: pip install 'flask-proxypool[psycopg]'"
            ) from None
        if kind_options["prepare_threshold"] == 5:
            del kind_options["prepare_threshold"]  # psycopg's own default: do not pin it
        secrets = _check_conninfo(name, kind_options, libpq)
    release = options.pop("release")
    if release == "commit" and kind == "factory":
        raise ConfigError(
            f"{_where(name, 'release')} 'commit' needs a kind with transactions (psycopg, sqlite3), "
            "got kind 'factory'; use 'teardown'"
        )
    cfg = PoolConfig(name=name, kind=kind, options=options, kind_options=kind_options, release=release)
    if secrets:
        register_secrets(cfg, secrets)  # scrubbed from every masked text while this configuration lives
    return cfg


def _check_conninfo(name: str, kind_options: t.Mapping[str, t.Any], libpq: frozenset[str]) -> tuple[str, ...]:
    """Read the conninfo and the libpq parameters beside it as libpq will; return their secrets.

    A conninfo libpq cannot parse, an unknown keyword in it, or a value libpq
    would refuse only when connecting (``connect_timeout=abc``) fails here,
    at ``init_app``, naming the pool and key but never quoting the value.
    """
    from .conninfo import BadConninfo, inspect_conninfo

    bad: BadConninfo | None = None
    try:
        info = inspect_conninfo(kind_options["conninfo"], {k: v for k, v in kind_options.items() if k in libpq})
    except BadConninfo as e:
        bad = e
    if bad is not None:  # raised outside the handler, so nothing chains to it
        raise ConfigError(f"{_where(name, bad.key)} {bad.reason}")
    return info.secrets


def parse_pools(raw: t.Any, instance_path: str | None = None) -> dict[str, PoolConfig]:
    """Validate the whole ``PROXYPOOL_POOLS`` mapping."""
    if not isinstance(raw, t.Mapping) or not raw:
        raise ConfigError(
            "PROXYPOOL_POOLS must be a non-empty dict of pool name to settings, e.g. "
            "{'db': {'conninfo': 'postgresql://app@localhost/app', 'max_size': 4}}; "
            f"got {'an empty ' if isinstance(raw, t.Mapping) else 'a '}{type(raw).__name__}"
        )
    return {name: parse_pool(name, spec, instance_path) for name, spec in raw.items()}
