"""ProxyPool(pools=...) defaults merged key by key with app.config, and the conninfo-string shorthand."""

from __future__ import annotations

import copy
import re
import typing as t
import urllib.parse
from pathlib import Path

import pytest
from flask import Flask
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flask_proxypool import ConfigError, ProxyPool
from flask_proxypool.config import PoolConfig, merge_pools, parse_pools
from pgserver import PgServer

MakeApp = t.Callable[..., Flask]

SECRET = "s3cret-Pw"
SETTINGS = (
    "a dict of settings, or a conninfo string for a psycopg pool (a 'postgresql://' URL or libpq 'key=value' pairs)"
)


def exact(message: str) -> str:
    """A ``match=`` pattern for exactly this text."""
    return re.escape(message) + "$"


def as_dict(settings: t.Any) -> dict[str, t.Any]:
    """One pool's settings as the merge sees them: a conninfo string is ``{"conninfo": it}``."""
    return {"conninfo": settings} if isinstance(settings, str) else dict(settings)


def normal(pools: t.Mapping[str, t.Any]) -> dict[str, dict[str, t.Any]]:
    """Every pool as a dict, so merges can be compared whatever form each pool was written in."""
    return {name: as_dict(s) for name, s in pools.items()}


# -- merge_pools, directly -------------------------------------------------------------------------


def test_app_config_wins_per_key() -> None:
    """A key the app sets wins; a key only the defaults set is kept; a key only the app sets is added."""
    defaults = {"db": {"conninfo": "dbname=app", "max_size": 8, "timeout": 5.0}}
    configured = {"db": {"timeout": 2.0, "min_size": 1}}
    assert merge_pools(defaults, configured) == {
        "db": {"conninfo": "dbname=app", "max_size": 8, "timeout": 2.0, "min_size": 1}
    }


def test_pools_in_one_source_only_are_taken_as_they_are() -> None:
    """A pool only in the defaults is kept, one only in the app config is taken, defaults' pools first."""
    defaults = {"cache": {"factory": dict}, "db": {"max_size": 2}}
    configured = {"ro": "dbname=replica", "db": {"max_size": 3}}
    merged = merge_pools(defaults, configured)
    assert list(merged) == ["cache", "db", "ro"]
    assert merged == {"cache": {"factory": dict}, "db": {"max_size": 3}, "ro": "dbname=replica"}


@pytest.mark.parametrize(
    ("defaults", "configured", "merged"),
    [
        ({"db": "dbname=a"}, {"db": {"max_size": 2}}, {"conninfo": "dbname=a", "max_size": 2}),
        ({"db": {"max_size": 2, "conninfo": "dbname=a"}}, {"db": "dbname=b"}, {"max_size": 2, "conninfo": "dbname=b"}),
        ({"db": "dbname=a"}, {"db": "dbname=b"}, {"conninfo": "dbname=b"}),
    ],
)
def test_shorthand_merges_as_a_conninfo_key(
    defaults: dict[str, t.Any], configured: dict[str, t.Any], merged: dict[str, t.Any]
) -> None:
    """A conninfo string merged with the other source's settings counts as {'conninfo': string}."""
    assert merge_pools(defaults, configured) == {"db": merged}


def test_none_stands_for_not_given() -> None:
    """PROXYPOOL_POOLS unset (None) leaves the defaults; no defaults leaves the app config."""
    assert merge_pools({"db": {"max_size": 2}}, None) == {"db": {"max_size": 2}}
    assert merge_pools(None, {"db": "dbname=a"}) == {"db": "dbname=a"}
    assert merge_pools(None, None) == {}


def test_merge_copies_and_never_mutates() -> None:
    """The result owns its dicts: changing it changes neither source, and the sources are left as they were."""
    defaults = {"db": {"max_size": 2}, "cache": {"factory": dict}}
    configured = {"db": {"timeout": 1.0}}
    before = copy.deepcopy((defaults, configured))
    merged = merge_pools(defaults, configured)
    merged["db"]["max_size"] = 99
    merged["cache"]["max_size"] = 99
    assert (defaults, configured) == before


@pytest.mark.parametrize(
    ("defaults", "configured", "message"),
    [
        ([("db", {})], None, "ProxyPool(pools=...) must be a dict of pool name to settings, got list"),
        (None, "dbname=app", "PROXYPOOL_POOLS must be a dict of pool name to settings, got str"),
        ({"my-db": {}}, None, "ProxyPool(pools=...) keys must be identifiers (pool names), got 'my-db'"),
        (None, {3: {}}, "PROXYPOOL_POOLS keys must be identifiers (pool names), got 3"),
        ({"db": None}, {"db": {}}, f"ProxyPool(pools=...)['db'] must be {SETTINGS}, got NoneType"),
        ({"db": {}}, {"db": ["dbname=app"]}, f"PROXYPOOL_POOLS['db'] must be {SETTINGS}, got list"),
        (None, {"db": 5432}, f"PROXYPOOL_POOLS['db'] must be {SETTINGS}, got int"),
    ],
)
def test_bad_shapes_name_source_and_pool(defaults: t.Any, configured: t.Any, message: str) -> None:
    """A source, pool name or pool's settings of the wrong shape is refused, naming where it came from."""
    with pytest.raises(ConfigError, match=exact(message)):
        merge_pools(defaults, configured)


def test_bad_shorthand_in_defaults_names_the_defaults() -> None:
    """A string that is no conninfo is refused in either source, named by its source, never quoted."""
    with pytest.raises(ConfigError, match=re.escape("ProxyPool(pools=...)['db'] is a 'sqlite://' URL")) as info:
        merge_pools({"db": f"sqlite:///{SECRET}.db"}, {"db": {"max_size": 1}})
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError, match=re.escape("PROXYPOOL_POOLS['ro'] is an empty or blank string")):
        merge_pools({"db": "dbname=app"}, {"ro": ""})


# -- through parse_pools -----------------------------------------------------------------------------


def test_merged_config_parses_with_app_values_defaults_and_key_defaults() -> None:
    """parse_pools of a merge: the app's values, then the defaults', then each key's own default."""
    defaults = {"db": {"conninfo": "dbname=app", "max_size": 8, "timeout": 5.0}}
    configured = {"db": {"timeout": 2.0}}
    cfg = parse_pools(merge_pools(defaults, configured))["db"]
    assert cfg.kind == "psycopg"
    assert (cfg.options["max_size"], cfg.options["timeout"], cfg.options["min_size"]) == (8, 2.0, 0)
    assert cfg.kind_options["conninfo"] == "dbname=app"


def test_app_conninfo_string_over_default_settings() -> None:
    """The usual deployment: settings in code, the URL from the environment as a string."""
    defaults = {"db": {"max_size": 8, "on_return": "commit"}}
    cfg = parse_pools(merge_pools(defaults, {"db": "postgresql://app@db.internal/app"}))["db"]
    assert cfg.kind == "psycopg"
    assert cfg.kind_options["conninfo"] == "postgresql://app@db.internal/app"
    assert (cfg.options["max_size"], cfg.options["on_return"]) == (8, "commit")


def test_bad_value_from_the_defaults_is_named() -> None:
    """A bad value survives the merge and parse_pools names its pool and key."""
    with pytest.raises(ConfigError, match=re.escape("PROXYPOOL_POOLS['db']['max_size'] must be an int >= 1, got 0")):
        parse_pools(merge_pools({"db": {"max_size": 0}}, {"db": "dbname=app"}))


def test_kind_change_keeps_other_keys_of_the_defaults() -> None:
    """Merging is per key: a kind set by the app does not drop the defaults' keys of another kind."""
    with pytest.raises(ConfigError, match=re.escape("PROXYPOOL_POOLS['db'] has unknown key 'conninfo'")):
        parse_pools(merge_pools({"db": "dbname=app"}, {"db": {"kind": "sqlite3"}}))


# -- the shorthand, through parse_pools ------------------------------------------------------------------


@pytest.mark.parametrize(
    "conninfo",
    [
        "postgresql://app@db.internal:5432/app?sslmode=require",
        "postgres://db.internal/app",
        "host=db.internal dbname=app application_name=shop",
        "dbname=app",
    ],
)
def test_shorthand_is_a_psycopg_pool_with_defaults(conninfo: str) -> None:
    """A conninfo string (URL or key=value) is the same pool as {'conninfo': string}."""
    cfg = parse_pools({"db": conninfo})["db"]
    assert isinstance(cfg, PoolConfig)
    assert cfg == parse_pools({"db": {"conninfo": conninfo}})["db"]
    assert cfg.kind == "psycopg" and cfg.options["max_size"] == 4


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "sqlite:///instance/app.db",
            f"PROXYPOOL_POOLS['db'] is a 'sqlite://' URL, not a PostgreSQL conninfo: give {SETTINGS}; "
            "a sqlite3 pool is a dict: {'kind': 'sqlite3', 'database': 'app.sqlite3'}",
        ),
        (
            f"postgresql+psycopg://app:{SECRET}@h/app",
            f"PROXYPOOL_POOLS['db'] is a 'postgresql+psycopg://' URL, not a PostgreSQL conninfo: give {SETTINGS}; "
            "drop SQLAlchemy's '+psycopg'",
        ),
        (
            f"mysql://app:{SECRET}@h/app?charset=utf8",
            f"PROXYPOOL_POOLS['db'] is a 'mysql://' URL, not a PostgreSQL conninfo: give {SETTINGS}",
        ),
        (
            f"jdbc:postgresql://h/app?user=app&password={SECRET}",
            f"PROXYPOOL_POOLS['db'] is a URL, not a PostgreSQL conninfo: give {SETTINGS}",
        ),
        (
            "app.sqlite3",
            "PROXYPOOL_POOLS['db'] is a string that is neither a 'postgresql://' URL nor libpq 'key=value' pairs: "
            f"give {SETTINGS}",
        ),
        (
            " ",
            f"PROXYPOOL_POOLS['db'] is an empty or blank string: give {SETTINGS}; for libpq's defaults alone "
            "(the PG* environment variables), give {'conninfo': ''}",
        ),
    ],
)
def test_string_that_is_no_conninfo_says_what_is_accepted(value: str, message: str) -> None:
    """A string that is no conninfo is refused with the accepted forms, quoting nothing but a scheme."""
    with pytest.raises(ConfigError, match=exact(message)) as info:
        parse_pools({"db": value})
    assert SECRET not in str(info.value)


def test_shorthand_libpq_error_names_the_pool() -> None:
    """libpq's reading of a shorthand names the pool (there is no 'conninfo' key to name)."""
    message = "PROXYPOOL_POOLS['db'] has the unknown libpq keyword 'hots' (did you mean 'host'?)"
    with pytest.raises(ConfigError, match=exact(message)):
        parse_pools({"db": "hots=db.internal"})
    with pytest.raises(ConfigError, match=re.escape("PROXYPOOL_POOLS['db'] cannot be parsed by libpq: a '%'")):
        parse_pools({"db": "postgresql://app:p%zz@h/app"})


def test_shorthand_in_pools_defaults(tmp_path: Path) -> None:
    """ProxyPool(pools={'db': conninfo}) with no PROXYPOOL_POOLS gives a psycopg pool."""
    app = Flask("defaults_only", instance_path=str(tmp_path / "instance"))
    ProxyPool(app, pools={"db": "dbname=app"})
    try:
        assert app.extensions["proxypool"].configs["db"].kind_options["conninfo"] == "dbname=app"
    finally:
        app.extensions["proxypool"].close(timeout=1.0)


def test_shorthand_connects(pg: PgServer, make_app: MakeApp) -> None:
    """A pool given as a URL string serves real connections, with every other key at its default."""
    app = make_app({"db": pg.url("app")})
    pool = app.extensions["proxypool"].pool("db")
    with pool.connection() as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row == ("app",)
    assert pool.max_size == 4


def test_init_app_merges_defaults_key_by_key(tmp_path: Path) -> None:
    """Through init_app: ProxyPool(pools=...) keys the app does not set survive the app's config."""
    app = Flask("merged", instance_path=str(tmp_path / "instance"))
    app.config["PROXYPOOL_POOLS"] = {"db": "dbname=app"}
    ProxyPool(app, pools={"db": {"max_size": 8}, "cache": {"factory": dict}})
    try:
        configs = app.extensions["proxypool"].configs
        assert configs["db"].options["max_size"] == 8
        assert configs["db"].kind == "psycopg" and set(configs) == {"db", "cache"}
    finally:
        app.extensions["proxypool"].close(timeout=1.0)


# -- passwords never in a message -------------------------------------------------------------------

PASSWORDS = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S"), exclude_characters="\x00"),
    min_size=8,
    max_size=16,
)


SCHEMES = ("postgresql", "mysql", "sqlite", "postgresql+psycopg", "x")


def shown(password: str, scheme: str) -> list[str]:
    """What a shorthand URL with this password makes the library say: alone, and beside a bad key."""
    url = f"{scheme}://app:{urllib.parse.quote(password, safe='')}@h/app"
    texts = []
    for defaults in (None, {"db": {"max_size": "eight"}}):
        try:
            cfg = parse_pools(merge_pools(defaults, {"db": url}))["db"]
        except ConfigError as e:
            texts.append(f"{e} {e!r}")
        else:
            texts.append(f"{cfg!r} {cfg.public()!r}")
    return texts


CORPUS = " ".join(text for scheme in SCHEMES for text in shown("Dummy-Pw-1", scheme))


@settings(max_examples=150, deadline=None)
@given(password=PASSWORDS, scheme=st.sampled_from(SCHEMES))
def test_no_password_in_shorthand_errors(password: str, scheme: str) -> None:
    """Whatever the scheme and the password, a refused shorthand or a bad key beside it never shows the password."""
    forms = {password, urllib.parse.quote(password, safe="")}
    assume(not any(f in CORPUS for f in forms))  # a piece of what the library says anyway
    for text in shown(password, scheme):
        assert not any(f in text for f in forms), text


# -- the merge's laws, property-based ---------------------------------------------------------------

NAMES = st.sampled_from(["db", "cache", "ro"])
VALUES = st.one_of(st.integers(-2, 10), st.floats(0, 10), st.text(max_size=4), st.none(), st.booleans())
DICT_SETTINGS = st.dictionaries(st.sampled_from(["max_size", "timeout", "conninfo", "kind", "lifo", "x"]), VALUES)
SETTINGS_ANY = st.one_of(DICT_SETTINGS, st.sampled_from(["dbname=a", "dbname=b", "postgresql://h/c"]))
POOLS = st.dictionaries(NAMES, SETTINGS_ANY, max_size=3)


@given(pools=POOLS)
def test_merging_with_nothing_is_identity(pools: dict[str, t.Any]) -> None:
    """merge(p, {}) == merge({}, p) == merge(p, None) == p."""
    assert merge_pools(pools, {}) == merge_pools({}, pools) == merge_pools(pools, None) == merge_pools(None, pools)
    assert merge_pools(pools, {}) == pools


@given(defaults=POOLS, configured=POOLS)
def test_app_config_wins_every_key_it_sets(defaults: dict[str, t.Any], configured: dict[str, t.Any]) -> None:
    """Every pool of either source is there; per key, the app's value if it set one, else the defaults'."""
    merged = normal(merge_pools(defaults, configured))
    assert list(merged) == [*defaults, *(n for n in configured if n not in defaults)]
    for name, got in merged.items():
        under = as_dict(defaults.get(name, {}))
        over = as_dict(configured.get(name, {}))
        assert set(got) == set(under) | set(over)
        for key, value in got.items():
            assert value == (over[key] if key in over else under[key])


@given(pools=POOLS)
def test_merge_is_idempotent(pools: dict[str, t.Any]) -> None:
    """Merging a config with itself changes nothing (up to the shorthand's spelling)."""
    assert normal(merge_pools(pools, pools)) == normal(pools)


@given(a=POOLS, b=POOLS, c=POOLS)
def test_merge_is_associative(a: dict[str, t.Any], b: dict[str, t.Any], c: dict[str, t.Any]) -> None:
    """Layering three sources gives one result whichever pair is merged first."""
    assert normal(merge_pools(merge_pools(a, b), c)) == normal(merge_pools(a, merge_pools(b, c)))


@given(defaults=POOLS, configured=POOLS)
def test_merge_leaves_its_sources_alone(defaults: dict[str, t.Any], configured: dict[str, t.Any]) -> None:
    """The sources are not changed, and changing the result does not reach them."""
    before = copy.deepcopy((defaults, configured))
    merged = merge_pools(defaults, configured)
    for settings_ in merged.values():
        if isinstance(settings_, dict):
            settings_["changed"] = True
    assert (defaults, configured) == before


VALID_DEFAULTS = st.dictionaries(
    st.sampled_from(["max_size", "min_size", "timeout"]), st.integers(1, 3), min_size=0, max_size=3
)


@given(under=VALID_DEFAULTS, over=VALID_DEFAULTS, shorthand=st.booleans())
def test_parsed_merge_takes_each_key_from_the_app_then_the_defaults(
    under: dict[str, int], over: dict[str, int], shorthand: bool
) -> None:
    """Through parse_pools: each option is the app's value, else the defaults', else the key's own default."""
    over_settings: t.Any = "dbname=app" if shorthand and not over else {"conninfo": "dbname=app", **over}
    merged = merge_pools({"db": under}, {"db": over_settings})
    if merged["db"].get("min_size", 0) > merged["db"].get("max_size", 4):
        with pytest.raises(ConfigError, match=re.escape("PROXYPOOL_POOLS['db']['min_size'] must be <= max_size")):
            parse_pools(merged)
        return
    options = parse_pools(merged)["db"].options
    for key, default in (("max_size", 4), ("min_size", 0), ("timeout", 10.0)):
        assert options[key] == over.get(key, under.get(key, default))
