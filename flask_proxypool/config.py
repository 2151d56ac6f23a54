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
        if kind_options["prepare_threshold"] == 5:
            del kind_options["prepare_threshold"]  # psycopg's own default: do not pin it
        secrets = _check_conninfo(name, kind_options, libpq, shorthand=shorthand)
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


def parse_pools(raw: t.Any, instance_path: str | None = None) -> dict[str, PoolConfig]:
    """Validate the whole `PROXYPOOL_POOLS` mapping."""
    if not isinstance(raw, t.Mapping) or not raw:
        raise ConfigError(
            "PROXYPOOL_POOLS must be a non-empty dict of pool name to settings, e.g. "
            "{'db': {'conninfo': 'postgresql://app@localhost/app', 'max_size': 4}}; "
            f"got {'an empty ' if isinstance(raw, t.Mapping) else 'a '}{type(raw).__name__}"
        )
    return {name: parse_pool(name, spec, instance_path) for name, spec in raw.items()}
