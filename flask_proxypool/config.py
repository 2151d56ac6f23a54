"""`PROXYPOOL_POOLS` validated into one frozen `PoolConfig` per pool.

Every error names the pool, the key and what was expected, so a bad
deployment fails at `init_app` instead of at the first request. The keys
themselves (checks, defaults, meanings) are in `keys.py`.

A pool's settings are a dict, or a conninfo string standing for
`{"conninfo": the string}` (a psycopg pool, every other key at its default).
`merge_pools` lays `app.config` over the `ProxyPool(pools=...)` defaults
key by key, before `parse_pools` validates the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing as t

from .errors import ConfigError
from .guards import GUARD_KEYS, Guards
from .keys import COMMON_KEYS, KIND_KEYS, BadValue, Key, import_string
from .kinds.base import Kind
from .masking import conninfo_keys, is_secret_key, mask_conninfo, mask_password, register_secrets
from .pool import Pool

# the key table is re-exported: scripts/config_table.py and endpoint.py read it here
__all__ = ["COMMON_KEYS", "KIND_KEYS", "Key", "PoolConfig", "import_string", "merge_pools", "parse_pools"]

_POOL_ARGS = tuple(k for k in COMMON_KEYS if k != "kind")


def _libpq_keywords() -> frozenset[str]:
    from .conninfo import libpq_keywords

    try:
        return libpq_keywords()
    except ImportError:  # no psycopg: parse_pool says so for a psycopg pool
        return frozenset()


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """One pool's validated configuration; all other code reads this, never raw config."""

    name: str
    kind: str
    options: t.Mapping[str, t.Any]  #: keyword arguments of `Pool`
    kind_options: t.Mapping[str, t.Any]
    release: str = "teardown"  #: when the Flask extension gives a request's resource back

    def make_kind(self) -> Kind[t.Any]:
        o = dict(self.kind_options)
        if self.kind == "psycopg":
            from .kinds.psycopg import PsycopgKind

            guards = Guards.from_config(self.name, self.kind_options)
            for key in GUARD_KEYS:
                o.pop(key, None)  # pool keys, not psycopg.connect() arguments
            conninfo = o.pop("conninfo")
            configure = o.pop("configure")
            reset = o.pop("reset")
            pgbouncer = o.pop("pgbouncer", None)
            prepared = o.pop("pgbouncer_prepared_statements", False)
            target = o.pop("target", "primary")
            return PsycopgKind(
                conninfo,
                o,
                configure=configure,
                reset=reset,
                pgbouncer=pgbouncer,
                pgbouncer_prepared_statements=prepared,
                pool_name=self.name,
                guards=guards,
                target=target,
                # PgBouncer forwards the in_hot_standby of its first login, not of the server behind each transaction
                trust_in_hot_standby=pgbouncer is None,
            )
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


# -- the conninfo shorthand, and defaults merged with app.config ---------------------------------

_CONNINFO = "a 'postgresql://' URL or libpq 'key=value' pairs"
_SETTINGS = f"a dict of settings, or a conninfo string for a psycopg pool ({_CONNINFO})"
_DEFAULTS = "ProxyPool(pools=...)"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")


def _foreign_url(text: str) -> str | None:
    """The scheme of a URL libpq does not take (`sqlite:///x`, `postgresql+psycopg://...`), else None.

    Only the first word counts: in `key=value` form a value may hold `://`
    (`sslrootcert=file:///ca.pem`). The scheme is the only piece of the text
    ever shown (empty if it looks odd): the rest of a URL may hold a password.
    """
    if text.startswith(("postgresql://", "postgres://")):
        return None
    head = re.split(r"[\s=]", text, maxsplit=1)[0]
    if "://" not in head:
        return None
    scheme = head.split("://", 1)[0]
    return scheme if _SCHEME.fullmatch(scheme) else ""


def _foreign_url_error(where: str, scheme: str, accepted: str) -> ConfigError:
    what = f"a {scheme + '://'!r} URL" if scheme else "a URL"
    hint = ""
    if scheme.startswith(("postgresql+", "postgres+")):  # SQLAlchemy's dialect+driver spelling
        hint = f"; drop SQLAlchemy's {scheme[scheme.index('+') :]!r}"
    elif scheme.startswith("sqlite"):
        hint = "; a sqlite3 pool is a dict: {'kind': 'sqlite3', 'database': 'app.sqlite3'}"
    return ConfigError(f"{where} is {what}, not a PostgreSQL conninfo: give {accepted}{hint}")


def _check_shorthand(where: str, text: str) -> None:
    """A pool given as a string must look like a conninfo; libpq reads it in full later (`_check_conninfo`)."""
    if not text.strip():  # most likely an unset environment variable
        raise ConfigError(
            f"{where} is an empty or blank string: give {_SETTINGS}; for libpq's defaults alone (the PG* environment "
            "variables), give {'conninfo': ''}"
        )
    foreign = _foreign_url(text)
    if foreign is not None:
        raise _foreign_url_error(where, foreign, _SETTINGS)
    if not text.startswith(("postgresql://", "postgres://")) and conninfo_keys(text) is None:
        raise ConfigError(
            f"{where} is a string that is neither a 'postgresql://' URL nor libpq 'key=value' pairs: give {_SETTINGS}"
        )


def _settings(where: str, value: t.Any) -> t.Mapping[t.Any, t.Any]:
    """One pool's settings as a mapping: a conninfo string stands for `{"conninfo": string}`."""
    if isinstance(value, str):
        _check_shorthand(where, value)
        return {"conninfo": value}
    if not isinstance(value, t.Mapping):
        raise ConfigError(f"{where} must be {_SETTINGS}, got {type(value).__name__}")
    return value


def _pools_of(where: str, pools: t.Any) -> t.Mapping[str, t.Any]:
    """`pools` checked to be a mapping of pool names; None (not given) is empty."""
    if pools is None:
        return {}
    if not isinstance(pools, t.Mapping):
        raise ConfigError(f"{where} must be a dict of pool name to settings, got {type(pools).__name__}")
    for name in pools:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{where} keys must be identifiers (pool names), got {name!r}")
    return pools


def merge_pools(defaults: t.Mapping[str, t.Any] | None, configured: t.Mapping[str, t.Any] | None) -> dict[str, t.Any]:
    """Lay `configured` (`app.config["PROXYPOOL_POOLS"]`) over `defaults` (`ProxyPool(pools=...)`).

    Pool by pool, key by key, as Flask-SQLAlchemy's `engine_options` sit
    under the app's config: a pool in one source only is taken as it is; a
    pool in both gets the defaults' keys with the app's on top (the app wins
    per key). A conninfo string counts as `{"conninfo": string}` when merged
    with the other source's settings. None stands for "not given". Only the
    shapes are checked here, each error naming the source and the pool;
    `parse_pools` checks the values of the result.
    """
    base = _pools_of(_DEFAULTS, defaults)
    top = _pools_of("PROXYPOOL_POOLS", configured)
    merged: dict[str, t.Any] = {}
    for name in [*base, *(n for n in top if n not in base)]:
        if name in base and name in top:
            under = _settings(f"{_DEFAULTS}[{name!r}]", base[name])
            merged[name] = {**under, **_settings(f"PROXYPOOL_POOLS[{name!r}]", top[name])}
            continue
        source, value = ("PROXYPOOL_POOLS", top[name]) if name in top else (_DEFAULTS, base[name])
        settings = _settings(f"{source}[{name!r}]", value)  # the shape is checked either way
        merged[name] = value if isinstance(value, str) else dict(settings)
    return merged


def _unencodable(text: str) -> str | None:
    """Why libpq or sqlite3 would misread `text` (C truncates at a NUL), or None; never quotes it."""
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "holds a character UTF-8 cannot encode (a lone surrogate)"
    return None


def parse_pool(name: str, raw: t.Any, instance_path: str | None = None) -> PoolConfig:
    """Validate one pool's settings (a mapping, or a conninfo string); raise `ConfigError` naming the pool and key."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"PROXYPOOL_POOLS keys must be identifiers (pool names), got {name!r}")
    shorthand = isinstance(raw, str)
    raw = _settings(_where(name), raw)
    kind = raw.get("kind")
    if kind is None:
        kind = "psycopg" if "conninfo" in raw else "factory" if "factory" in raw else "sqlite3"
    else:
        try:
            kind = COMMON_KEYS["kind"].check(kind)
        except BadValue as e:
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
                problem = _unencodable(str(value))
                if problem is not None:
                    raise ConfigError(f"{_where(name, key)} {problem}, which libpq cannot take")
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
        except BadValue as e:
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
    if options["max_hold_action"] == "reclaim" and not options["max_hold"]:
        raise ConfigError(f"{_where(name, 'max_hold_action')} 'reclaim' needs max_hold > 0 (seconds), got max_hold 0")
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
        problem = _unencodable(db)
        if problem is not None:
            raise ConfigError(f"{_where(name, 'database')} {problem}, which sqlite3 cannot take")
        kind_options["database"] = db
    secrets: tuple[str, ...] = ()
    if kind == "psycopg":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"{_where(name)} is a psycopg pool but psycopg is not installed: pip install 'flask-proxypool[psycopg]'"
            ) from None
        _check_pgbouncer(name, raw, options, kind_options)
        if kind_options["prepare_threshold"] == 5:
            del kind_options["prepare_threshold"]  # psycopg's own default: do not pin it
        secrets = _check_conninfo(name, kind_options, libpq, shorthand=shorthand)
        Guards.from_config(name, kind_options)  # the user's own options must not set a guard too
        _check_target(name, kind_options, libpq, shorthand=shorthand)
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


def _check_pgbouncer(
    name: str, raw: t.Mapping[str, t.Any], options: t.Mapping[str, t.Any], kind_options: dict[str, t.Any]
) -> None:
    """`pgbouncer: "transaction"`: refuse what would put session state on a server connection PgBouncer shares.

    In transaction mode each transaction (each statement, in autocommit) may
    run on another server connection, one that other clients use too: a
    prepared statement, a `SET` made by `configure`, or the session reset's
    `DISCARD ALL` lands on a connection this client may never see again.
    The defaults change (no prepared statements, reset by rollback only);
    what the user set explicitly against them is an error naming both keys.
    """
    mode = kind_options["pgbouncer"]
    prepared = kind_options["pgbouncer_prepared_statements"]
    if mode is None:
        if prepared:
            raise ConfigError(
                f"{_where(name, 'pgbouncer_prepared_statements')} is True but {_where(name, 'pgbouncer')} is None: "
                "set pgbouncer: 'transaction' for a pool behind PgBouncer in transaction mode, or drop "
                "pgbouncer_prepared_statements"
            )
        return
    why = f"behind PgBouncer in transaction mode ({_where(name, 'pgbouncer')} is {mode!r})"
    if prepared:
        import psycopg

        libpq = psycopg.pq.version()
        if libpq < 170000:
            raise ConfigError(
                f"{_where(name, 'pgbouncer_prepared_statements')} needs libpq >= 17 (psycopg closes prepared "
                f"statements through it; this psycopg uses libpq {libpq // 10000}.{libpq % 100}): install a psycopg "
                "binary wheel with libpq 17+ or set pgbouncer_prepared_statements: False"
            )
    elif "prepare_threshold" in raw and kind_options["prepare_threshold"] is not None:
        raise ConfigError(
            f"{_where(name, 'prepare_threshold')} is {kind_options['prepare_threshold']!r} {why}: PgBouncer < 1.22 "
            "sends a prepared statement's uses to other server connections ('prepared statement \"_pg3_0\" does "
            "not exist'); drop prepare_threshold (it becomes None), or, with PgBouncer >= 1.22 and "
            f"max_prepared_statements > 0, set {_where(name, 'pgbouncer_prepared_statements')}: True"
        )
    else:
        kind_options["prepare_threshold"] = None
    if kind_options["configure"] is not None:
        raise ConfigError(
            f"{_where(name, 'configure')} is refused {why}: a SET it runs lands on one server connection that "
            "PgBouncer shares with other clients, and this pool's later transactions may run on others; set "
            "per-role or per-database defaults instead (ALTER ROLE ... IN DATABASE ... SET ...), or SET LOCAL "
            "inside each transaction"
        )
    if raw.get("reset") is not None:
        reset = kind_options["reset"]
        if reset != "rollback":
            shown = repr(reset) if isinstance(reset, str) else "a callable"
            raise ConfigError(
                f"{_where(name, 'reset')} is {shown} {why}: a session reset (DISCARD ALL, or a hook's statements) "
                "would run on whichever server connection PgBouncer picks, another client's perhaps, while "
                "PgBouncer resets server connections itself; drop reset (it becomes 'rollback')"
            )
    kind_options["reset"] = "rollback"
    if options["liveness"] == "query":
        raise ConfigError(
            f"{_where(name, 'liveness')} 'query' is refused {why}: it would take a server connection from "
            "PgBouncer on every checkout; use 'poll' (the default: no round trip; PgBouncer keeps the client "
            "connection when a server connection dies) or 'none'"
        )


def _check_conninfo(
    name: str, kind_options: t.Mapping[str, t.Any], libpq: frozenset[str], *, shorthand: bool = False
) -> tuple[str, ...]:
    """Read the conninfo and the libpq parameters beside it as libpq will; return their secrets.

    A conninfo libpq cannot parse, an unknown keyword in it, or a value libpq
    would refuse only when connecting (`connect_timeout=abc`) fails here,
    at `init_app`, naming the pool and key but never quoting the value. A
    pool given as a conninfo string (`shorthand`) is named without a key.
    """
    from .conninfo import BadConninfo, inspect_conninfo

    conninfo = kind_options["conninfo"]
    where = _where(name) if shorthand else _where(name, "conninfo")
    foreign = _foreign_url(conninfo)
    if foreign is not None:  # read as key=value, its first word would be echoed as an unknown keyword
        raise _foreign_url_error(where, foreign, _CONNINFO)  # (a shorthand's was refused by _check_shorthand)
    problem = _unencodable(conninfo)
    if problem is not None:
        raise ConfigError(f"{where} {problem}, which libpq cannot take")
    bad: BadConninfo | None = None
    try:
        info = inspect_conninfo(conninfo, {k: v for k, v in kind_options.items() if k in libpq})
    except BadConninfo as e:
        bad = e
    if bad is not None:  # raised outside the handler, so nothing chains to it
        raise ConfigError(f"{where if bad.key == 'conninfo' else _where(name, bad.key)} {bad.reason}")
    return info.secrets


def _check_target(name: str, kind_options: t.Mapping[str, t.Any], libpq: frozenset[str], *, shorthand: bool) -> None:
    """A `target_session_attrs` contradicting the pool's `target` fails here, naming both keys."""
    from .conninfo import BadConninfo, session_attrs_for

    bad: BadConninfo | None = None
    try:
        session_attrs_for(
            kind_options["target"], kind_options["conninfo"], {k: v for k, v in kind_options.items() if k in libpq}
        )
    except BadConninfo as e:
        bad = e
    if bad is not None:
        where = _where(name) if shorthand and bad.key == "conninfo" else _where(name, bad.key)
        raise ConfigError(f"{where} {bad.reason} ({_where(name, 'target')} is {kind_options['target']!r})")


def parse_pools(raw: t.Any, instance_path: str | None = None) -> dict[str, PoolConfig]:
    """Validate the whole `PROXYPOOL_POOLS` mapping."""
    if not isinstance(raw, t.Mapping) or not raw:
        raise ConfigError(
            "PROXYPOOL_POOLS must be a non-empty dict of pool name to settings, e.g. "
            "{'db': {'conninfo': 'postgresql://app@localhost/app', 'max_size': 4}}; "
            f"got {'an empty ' if isinstance(raw, t.Mapping) else 'a '}{type(raw).__name__}"
        )
    return {name: parse_pool(name, spec, instance_path) for name, spec in raw.items()}
