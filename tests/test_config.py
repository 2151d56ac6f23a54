"""Configuration validation at init_app, and password masking."""

from __future__ import annotations

import math
import os
import re
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_proxypool import ConfigError, ProxyPool, UsageError
from flask_proxypool.config import COMMON_KEYS, KIND_KEYS, PoolConfig, parse_pools
from flask_proxypool.masking import mask_password
from flask_proxypool.pool import MAX_SECONDS

MakeApp = t.Callable[..., Flask]

SECRET = "s3cret"


def valid_keys(kind: str) -> str:
    """The valid keys of a kind, sorted and comma-separated, as the unknown-key message lists them."""
    return ", ".join(sorted(set(COMMON_KEYS) | set(KIND_KEYS[kind])))


def exact(message: str) -> str:
    """A ``match=`` pattern for this literal text."""
    return re.escape(message)


def config_error(make_app: MakeApp, pools: t.Any, **config: t.Any) -> ConfigError:
    """Build an app that must be refused; return the ConfigError."""
    with pytest.raises(ConfigError) as info:
        make_app(pools, **config)
    return info.value


def kind_options(app: Flask, name: str = "db") -> t.Mapping[str, t.Any]:
    """The validated kind options of one pool."""
    return app.extensions["proxypool"].configs[name].kind_options


def not_callable_resource() -> object:
    """A factory for tests that never make a resource."""
    return object()


NOT_CALLABLE = 42


# -- wrong types --------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_size", "eight", "PROXYPOOL_POOLS['db']['max_size'] must be an int >= 1, got 'eight'"),
        ("min_size", 1.5, "PROXYPOOL_POOLS['db']['min_size'] must be an int >= 0, got 1.5"),
        ("max_waiting", "3", "PROXYPOOL_POOLS['db']['max_waiting'] must be an int >= 0, got '3'"),
        ("max_use", None, "PROXYPOOL_POOLS['db']['max_use'] must be an int >= 0, got None"),
        ("timeout", "soon", "PROXYPOOL_POOLS['db']['timeout'] must be a number >= 0, got 'soon'"),
        ("max_lifetime", [1], "PROXYPOOL_POOLS['db']['max_lifetime'] must be a number >= 0, got [1]"),
        ("on_return", "maybe", "PROXYPOOL_POOLS['db']['on_return'] must be one of 'rollback', 'commit', got 'maybe'"),
        ("liveness", "ping", "PROXYPOOL_POOLS['db']['liveness'] must be one of 'poll', 'query', 'none', got 'ping'"),
        ("database", 5, "PROXYPOOL_POOLS['db']['database'] must be a str, got 5"),
        ("uri", "yes", "PROXYPOOL_POOLS['db']['uri'] must be a bool, got 'yes'"),
        (
            "isolation_level",
            0,
            "PROXYPOOL_POOLS['db']['isolation_level'] must be None or one of '', 'DEFERRED', 'IMMEDIATE', 'EXCLUSIVE', "
            "got 0",
        ),
        (
            "isolation_level",
            "SERIALIZABLE",
            "PROXYPOOL_POOLS['db']['isolation_level'] must be None or one of '', 'DEFERRED', 'IMMEDIATE', 'EXCLUSIVE', "
            "got 'SERIALIZABLE'",
        ),
        (
            "detect_types",
            4,
            "PROXYPOOL_POOLS['db']['detect_types'] must be an int from 0 to 3 "
            "(sqlite3.PARSE_DECLTYPES | sqlite3.PARSE_COLNAMES), got 4",
        ),
    ],
)
def test_wrong_type_names_pool_key_and_value(make_app: MakeApp, key: str, value: t.Any, message: str) -> None:
    """A value of the wrong type is refused with the pool, the key, what was expected and what was given."""
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {key: value}})


def test_config_error_is_a_value_error(make_app: MakeApp) -> None:
    """ConfigError is also a ValueError, for callers that catch that."""
    with pytest.raises(ValueError, match=exact("PROXYPOOL_POOLS['db']['max_size']")):
        make_app({"db": {"max_size": "eight"}})


def test_error_names_the_failing_pool_among_several(make_app: MakeApp) -> None:
    """With several pools, the message names the one that is wrong."""
    with pytest.raises(ConfigError, match=exact("PROXYPOOL_POOLS['cache']['timeout'] must be a number >= 0, got 'x'")):
        make_app({"db": {"max_size": 2}, "cache": {"factory": not_callable_resource, "timeout": "x"}})


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("max_size", "PROXYPOOL_POOLS['db']['max_size'] must be an int >= 1, got True"),
        ("min_size", "PROXYPOOL_POOLS['db']['min_size'] must be an int >= 0, got True"),
        ("max_use", "PROXYPOOL_POOLS['db']['max_use'] must be an int >= 0, got True"),
        ("detect_types", "PROXYPOOL_POOLS['db']['detect_types'] must be an int from 0 to 3"),
        ("timeout", "PROXYPOOL_POOLS['db']['timeout'] must be a number >= 0, got True"),
        ("busy_timeout", "PROXYPOOL_POOLS['db']['busy_timeout'] must be a number >= 0, got True"),
    ],
)
def test_bool_is_not_a_number(make_app: MakeApp, key: str, message: str) -> None:
    """True is refused where an int or a number is expected, though bool subclasses int."""
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {key: True}})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_size", 0, "PROXYPOOL_POOLS['db']['max_size'] must be an int >= 1, got 0"),
        ("max_size", -3, "PROXYPOOL_POOLS['db']['max_size'] must be an int >= 1, got -3"),
        ("min_size", -1, "PROXYPOOL_POOLS['db']['min_size'] must be an int >= 0, got -1"),
        ("max_waiting", -1, "PROXYPOOL_POOLS['db']['max_waiting'] must be an int >= 0, got -1"),
        ("timeout", -0.5, "PROXYPOOL_POOLS['db']['timeout'] must be a number >= 0, got -0.5"),
        ("reconnect_delay", 0, "PROXYPOOL_POOLS['db']['reconnect_delay'] must be a number > 0, got 0"),
    ],
)
def test_negative_or_zero_sizes_refused(make_app: MakeApp, key: str, value: t.Any, message: str) -> None:
    """Sizes and durations below their minimum are refused."""
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {key: value}})


def test_min_size_above_max_size(make_app: MakeApp) -> None:
    """min_size > max_size is refused, quoting both."""
    with pytest.raises(ConfigError, match=exact("PROXYPOOL_POOLS['db']['min_size'] must be <= max_size (2), got 3")):
        make_app({"db": {"min_size": 3, "max_size": 2}})


def test_min_size_equal_max_size_accepted(make_app: MakeApp) -> None:
    """min_size == max_size is fine."""
    app = make_app({"db": {"min_size": 2, "max_size": 2}})
    assert app.extensions["proxypool"].configs["db"].options["min_size"] == 2


def test_reconnect_max_delay_below_reconnect_delay(make_app: MakeApp) -> None:
    """reconnect_max_delay must not be below reconnect_delay."""
    message = "PROXYPOOL_POOLS['db']['reconnect_max_delay'] must be >= reconnect_delay (2), got 1"
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"reconnect_delay": 2, "reconnect_max_delay": 1}})


# -- unknown keys and kinds ---------------------------------------------------


def test_unknown_key_lists_valid_keys_and_suggests(make_app: MakeApp) -> None:
    """A misspelt key gets a 'did you mean' and the full list of valid keys for the kind."""
    message = (
        "PROXYPOOL_POOLS['db'] has unknown key 'max_szie' (did you mean 'max_size'?); "
        f"valid keys for kind 'sqlite3' are: {valid_keys('sqlite3')}"
    )
    with pytest.raises(ConfigError, match=exact(message) + "$"):
        make_app({"db": {"max_szie": 8}})
    listed = set(valid_keys("sqlite3").split(", "))
    assert {"max_size", "min_size", "timeout", "on_return", "database", "busy_timeout", "uri"} <= listed
    assert not listed & {"conninfo", "factory", "close"}


def test_unknown_key_without_close_match(make_app: MakeApp) -> None:
    """No 'did you mean' when nothing is close."""
    err = config_error(make_app, {"db": {"factory": not_callable_resource, "zzzzzz": 1}})
    assert str(err) == (
        f"PROXYPOOL_POOLS['db'] has unknown key 'zzzzzz'; valid keys for kind 'factory' are: {valid_keys('factory')}"
    )


def test_unknown_key_of_psycopg_mentions_libpq(make_app: MakeApp) -> None:
    """For psycopg, the list ends with the libpq parameters."""
    message = (
        "PROXYPOOL_POOLS['db'] has unknown key 'timeuot' (did you mean 'timeout'?); "
        f"valid keys for kind 'psycopg' are: {valid_keys('psycopg')} and any libpq connection parameter"
    )
    with pytest.raises(ConfigError, match=exact(message) + "$"):
        make_app({"db": {"conninfo": "dbname=app", "timeuot": 3}})


def test_key_of_another_kind_is_unknown(make_app: MakeApp) -> None:
    """A sqlite3 key on a factory pool is refused."""
    with pytest.raises(ConfigError, match=exact("PROXYPOOL_POOLS['db'] has unknown key 'database'")):
        make_app({"db": {"factory": not_callable_resource, "database": "x.sqlite3"}})


def test_unknown_kind(make_app: MakeApp) -> None:
    """An unknown kind lists the known ones."""
    message = "PROXYPOOL_POOLS['db']['kind'] must be one of 'psycopg', 'sqlite3', 'factory', got 'mysql'"
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"kind": "mysql"}})


# -- the PROXYPOOL_POOLS mapping itself ----------------------------------------


def test_missing_proxypool_pools(tmp_path: Path) -> None:
    """An app without PROXYPOOL_POOLS is refused with an example."""
    app = Flask("bare", instance_path=str(tmp_path))
    with pytest.raises(ConfigError, match=exact("PROXYPOOL_POOLS is not set: give each pool a name and settings")):
        ProxyPool(app)
    assert "proxypool" not in app.extensions


def test_empty_pools_dict(make_app: MakeApp) -> None:
    """An empty PROXYPOOL_POOLS is refused."""
    with pytest.raises(ConfigError, match=exact("PROXYPOOL_POOLS must be a non-empty dict of pool name to settings")):
        make_app({})


def test_pools_not_a_dict(make_app: MakeApp) -> None:
    """PROXYPOOL_POOLS must be a mapping."""
    with pytest.raises(ConfigError, match=exact("PROXYPOOL_POOLS must be a dict of pool name to settings, got list")):
        make_app([("db", {})])


@pytest.mark.parametrize(("value", "type_name"), [(None, "NoneType"), ([1], "list"), (b"dbname=app", "bytes")])
def test_pool_settings_not_a_dict(make_app: MakeApp, value: t.Any, type_name: str) -> None:
    """A pool's settings must be a dict (or a conninfo string), and the message says so."""
    message = (
        "PROXYPOOL_POOLS['db'] must be a dict of settings, or a conninfo string for a psycopg pool "
        f"(a 'postgresql://' URL or libpq 'key=value' pairs), got {type_name}"
    )
    with pytest.raises(ConfigError, match=exact(message) + "$"):
        make_app({"db": value})


def test_pool_name_not_identifier(make_app: MakeApp) -> None:
    """A pool name must be an identifier, as proxies are named by it."""
    with pytest.raises(ConfigError, match=exact("PROXYPOOL_POOLS keys must be identifiers (pool names), got 'my-db'")):
        make_app({"my-db": {}})


# -- factory ------------------------------------------------------------------


def test_factory_unimportable_module(make_app: MakeApp) -> None:
    """A 'module:attr' whose module cannot be imported is refused at init_app, naming the path."""
    message = (
        "PROXYPOOL_POOLS['db']['factory'] must be an importable 'module:attr' ('no_such_module_pp:connect' "
        "failed: ModuleNotFoundError: No module named 'no_such_module_pp'), got 'no_such_module_pp:connect'"
    )
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"factory": "no_such_module_pp:connect"}})


def test_factory_missing_attribute(make_app: MakeApp) -> None:
    """A 'module:attr' whose attribute is missing is refused, naming module and attribute."""
    message = (
        "PROXYPOOL_POOLS['db']['factory'] must be an importable 'module:attr' "
        "(module 'test_config' has no 'no_such_attr'), got 'test_config:no_such_attr'"
    )
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"factory": "test_config:no_such_attr"}})


def test_factory_importable_string_accepted(make_app: MakeApp) -> None:
    """A 'module:attr' naming a callable is imported at init_app."""
    app = make_app({"db": {"factory": "test_config:not_callable_resource"}})
    assert kind_options(app)["factory"].__name__ == "not_callable_resource"


@pytest.mark.parametrize(("value", "shown"), [(42, "42"), ("test_config:NOT_CALLABLE", "'test_config:NOT_CALLABLE'")])
def test_factory_not_callable(make_app: MakeApp, value: t.Any, shown: str) -> None:
    """A factory that is not callable (directly or by import) is refused."""
    message = f"PROXYPOOL_POOLS['db']['factory'] must be a callable or a 'module:attr' string naming one, got {shown}"
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"kind": "factory", "factory": value}})


def test_factory_kind_missing_factory(make_app: MakeApp) -> None:
    """kind 'factory' needs a factory."""
    message = (
        "PROXYPOOL_POOLS['db'] needs 'factory' for kind 'factory' (makes one resource: a callable or `'module:attr'`)"
    )
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"kind": "factory"}})


def test_factory_hook_bad_method_name(make_app: MakeApp) -> None:
    """A hook string that is neither a method name nor 'module:attr' is refused."""
    message = (
        "PROXYPOOL_POOLS['db']['close'] must be a callable, a 'module:attr' string or a method name, got 'not a name'"
    )
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"factory": not_callable_resource, "close": "not a name"}})


# -- psycopg ------------------------------------------------------------------


def test_psycopg_missing_conninfo(make_app: MakeApp) -> None:
    """kind 'psycopg' needs a conninfo."""
    message = (
        "PROXYPOOL_POOLS['db'] needs 'conninfo' for kind 'psycopg' (libpq connection string or `postgresql://` URL)"
    )
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"kind": "psycopg", "host": "localhost"}})


def test_libpq_parameters_accepted(make_app: MakeApp) -> None:
    """libpq parameters are accepted on a psycopg pool, as strings, and nothing connects at init_app."""
    app = make_app({"db": {"conninfo": "dbname=app", "application_name": "shop", "connect_timeout": 3}})
    opts = kind_options(app)
    assert opts["application_name"] == "shop"
    assert opts["connect_timeout"] == "3"
    assert app.extensions["proxypool"].opened() == {}


def test_libpq_parameter_bad_type(make_app: MakeApp) -> None:
    """A libpq parameter must be a str or an int."""
    message = "PROXYPOOL_POOLS['db']['connect_timeout'] must be a str or int (a libpq parameter), got 1.5"
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"conninfo": "dbname=app", "connect_timeout": 1.5}})


def test_libpq_parameter_not_accepted_on_sqlite(make_app: MakeApp) -> None:
    """libpq parameters are psycopg-only."""
    with pytest.raises(ConfigError, match=exact("PROXYPOOL_POOLS['db'] has unknown key 'application_name'")):
        make_app({"db": {"kind": "sqlite3", "application_name": "shop"}})


# -- passwords never in errors --------------------------------------------------


def assert_no_secret(err: BaseException) -> None:
    """Neither the message nor the repr of the error, nor a chained one, shows the secret."""
    assert SECRET not in str(err)
    assert SECRET not in repr(err)
    assert all(SECRET not in str(a) for a in err.args)
    cause = err.__cause__
    assert cause is None or SECRET not in str(cause)


@pytest.mark.parametrize("conninfo", [f"postgresql://u:{SECRET}@h/db", f"host=h user=u password={SECRET} dbname=db"])
def test_password_in_conninfo_not_in_bad_value_error(make_app: MakeApp, conninfo: str) -> None:
    """An invalid max_size on a pool with a password in its conninfo does not show the password."""
    err = config_error(make_app, {"db": {"conninfo": conninfo, "max_size": "eight"}})
    assert str(err) == "PROXYPOOL_POOLS['db']['max_size'] must be an int >= 1, got 'eight'"
    assert_no_secret(err)


@pytest.mark.parametrize("conninfo", [f"postgresql://u:{SECRET}@h/db", f"host=h user=u password={SECRET} dbname=db"])
def test_password_in_conninfo_not_in_unknown_key_error(make_app: MakeApp, conninfo: str) -> None:
    """An unknown key on a pool with a password in its conninfo does not show the password."""
    err = config_error(make_app, {"db": {"conninfo": conninfo, "passwrod": SECRET}})
    assert "unknown key 'passwrod' (did you mean 'password'?)" in str(err)
    assert_no_secret(err)


@pytest.mark.parametrize("conninfo", [f"postgresql://u:{SECRET}@h/db", f"host=h user=u password={SECRET} dbname=db"])
def test_password_in_conninfo_not_in_other_errors(make_app: MakeApp, conninfo: str) -> None:
    """min_size > max_size, a bad kind-specific value and a bad libpq value do not show the password."""
    for extra in ({"min_size": 5, "max_size": 1}, {"autocommit": "yes"}, {"connect_timeout": 1.5}):
        err = config_error(make_app, {"db": {"conninfo": conninfo, **extra}})
        assert str(err).startswith("PROXYPOOL_POOLS['db']")
        assert_no_secret(err)


def test_conninfo_of_wrong_type_is_masked(make_app: MakeApp) -> None:
    """A conninfo given as bytes is refused, shown with its password masked."""
    err = config_error(make_app, {"db": {"kind": "psycopg", "conninfo": f"postgresql://u:{SECRET}@h/db".encode()}})
    assert str(err) == "PROXYPOOL_POOLS['db']['conninfo'] must be a str, got b'postgresql://u:***@h/db'"
    assert_no_secret(err)


def test_pool_given_as_conninfo_string_not_shown(make_app: MakeApp) -> None:
    """A pool given as a conninfo string (the shorthand) keeps its password out of the config's repr and public()."""
    app = make_app({"db": f"postgresql://u:{SECRET}@h/db"})
    cfg = app.extensions["proxypool"].configs["db"]
    assert cfg.kind_options["conninfo"] == f"postgresql://u:{SECRET}@h/db"
    assert SECRET not in repr(cfg) and SECRET not in repr(cfg.public())
    assert cfg.public()["conninfo"] == "postgresql://u:***@h/db"


@pytest.mark.parametrize(
    "conninfo",
    [f"mysql://u:{SECRET}@h/db?x=y", f"postgresql+psycopg://u:{SECRET}@h/db", f"dbname=x password={SECRET}\x00"],
)
def test_conninfo_of_another_form_not_shown(make_app: MakeApp, conninfo: str) -> None:
    """A conninfo key that holds another scheme's URL, or a NUL, is refused without echoing any of it."""
    err = config_error(make_app, {"db": {"conninfo": conninfo}})
    assert str(err).startswith("PROXYPOOL_POOLS['db']['conninfo'] ")
    assert_no_secret(err)


@pytest.mark.parametrize("value", [[SECRET], 1.5, True, {"pw": SECRET}])
def test_password_key_bad_type_masked(make_app: MakeApp, value: t.Any) -> None:
    """A 'password' libpq key of a bad type is refused and shown as '***'."""
    err = config_error(make_app, {"db": {"conninfo": "dbname=app", "password": value}})
    assert str(err) == "PROXYPOOL_POOLS['db']['password'] must be a str or int (a libpq parameter), got '***'"
    assert_no_secret(err)


def test_password_key_accepted_and_masked_in_public(make_app: MakeApp) -> None:
    """A valid 'password' key is kept, and shown masked by PoolConfig.public()."""
    app = make_app({"db": {"conninfo": f"postgresql://u:{SECRET}@h/db", "password": SECRET}})
    cfg = app.extensions["proxypool"].configs["db"]
    assert cfg.kind_options["password"] == SECRET
    public = cfg.public()
    assert public["password"] == "***"
    assert public["conninfo"] == "postgresql://u:***@h/db"
    assert SECRET not in repr(public)


def test_sslpassword_key_bad_type_masked(make_app: MakeApp) -> None:
    """An 'sslpassword' libpq key of a bad type does not show its value."""
    err = config_error(make_app, {"db": {"conninfo": "dbname=app", "sslpassword": [SECRET]}})
    assert_no_secret(err)


# -- sqlite3 ------------------------------------------------------------------


def test_sqlite_memory_with_max_size_above_one_refused(make_app: MakeApp) -> None:
    """':memory:' gives each connection its own database, so max_size must be 1."""
    message = (
        "PROXYPOOL_POOLS['db']['database'] is an in-memory database: each connection would get its own, "
        "so max_size must be 1, got 4"
    )
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"database": ":memory:"}})


def test_sqlite_memory_uri_with_max_size_above_one_refused(make_app: MakeApp) -> None:
    """A 'mode=memory' URI is in-memory too."""
    message = "PROXYPOOL_POOLS['db']['database'] is an in-memory database"
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"database": "file:x?mode=memory", "uri": True, "max_size": 2}})


def test_sqlite_memory_with_max_size_one_accepted(make_app: MakeApp) -> None:
    """':memory:' with max_size 1 is kept as is."""
    app = make_app({"db": {"database": ":memory:", "max_size": 1}})
    assert kind_options(app)["database"] == ":memory:"


def test_sqlite_relative_path_under_instance_path(make_app: MakeApp) -> None:
    """A relative database path goes under app.instance_path."""
    app = make_app({"db": {"database": "data/app.sqlite3"}})
    assert kind_options(app)["database"] == os.path.join(app.instance_path, "data", "app.sqlite3")


def test_sqlite_default_database_named_after_pool(make_app: MakeApp) -> None:
    """Without 'database', the file is '<pool name>.sqlite3' under app.instance_path."""
    app = make_app({"store": {}})
    assert kind_options(app, "store")["database"] == os.path.join(app.instance_path, "store.sqlite3")


def test_sqlite_absolute_path_kept(make_app: MakeApp, tmp_path: Path) -> None:
    """An absolute database path is kept."""
    path = str(tmp_path / "abs.sqlite3")
    app = make_app({"db": {"database": path}})
    assert kind_options(app)["database"] == path


def test_sqlite_uri_not_rewritten(make_app: MakeApp) -> None:
    """A URI database is passed through unchanged."""
    app = make_app({"db": {"database": "file:app.sqlite3?mode=rwc", "uri": True}})
    assert kind_options(app)["database"] == "file:app.sqlite3?mode=rwc"


# -- kind defaulting ----------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        ({"conninfo": "dbname=app"}, "psycopg"),
        ({"factory": not_callable_resource}, "factory"),
        ({}, "sqlite3"),
        ({"database": "x.sqlite3"}, "sqlite3"),
        ({"max_size": 2}, "sqlite3"),
    ],
)
def test_kind_defaulting(make_app: MakeApp, settings: dict[str, t.Any], kind: str) -> None:
    """conninfo means psycopg, factory means factory, anything else sqlite3."""
    app = make_app({"db": settings})
    assert app.extensions["proxypool"].configs["db"].kind == kind


def test_explicit_kind_wins(make_app: MakeApp) -> None:
    """An explicit kind is used even when another kind's key is present (which is then refused)."""
    with pytest.raises(ConfigError, match=exact("PROXYPOOL_POOLS['db'] has unknown key 'conninfo'")):
        make_app({"db": {"kind": "sqlite3", "conninfo": "dbname=app"}})


def test_defaults_filled_in(make_app: MakeApp) -> None:
    """Keys not given take their documented defaults."""
    app = make_app({"db": {}})
    options = app.extensions["proxypool"].configs["db"].options
    assert options["max_size"] == 4
    assert options["min_size"] == 0
    assert options["timeout"] == 10.0
    assert options["on_return"] == "rollback"
    assert options["liveness"] == "poll"


# -- init_app -------------------------------------------------------------------


def test_init_app_twice_refused(make_app: MakeApp) -> None:
    """Registering twice on one app is a UsageError."""
    app = make_app({"db": {}})
    message = (
        f"flask_proxypool is already registered on app {app.name!r}: call ProxyPool(app) or init_app(app) once per app"
    )
    with pytest.raises(UsageError, match=exact(message)):
        ProxyPool(app)
    with pytest.raises(UsageError, match=exact(message)):
        ProxyPool().init_app(app)


def test_retry_after_default(make_app: MakeApp) -> None:
    """PROXYPOOL_RETRY_AFTER defaults to 1."""
    app = make_app({"db": {}})
    assert app.config["PROXYPOOL_RETRY_AFTER"] == 1
    assert app.extensions["proxypool"].retry_after == 1


@pytest.mark.parametrize("value", [0, 30])
def test_retry_after_accepted(make_app: MakeApp, value: int) -> None:
    """An int >= 0 is accepted."""
    app = make_app({"db": {}}, PROXYPOOL_RETRY_AFTER=value)
    assert app.extensions["proxypool"].retry_after == value


@pytest.mark.parametrize("value", ["soon", True, -1, 2.5, None])
def test_retry_after_invalid(make_app: MakeApp, value: t.Any) -> None:
    """PROXYPOOL_RETRY_AFTER must be an int >= 0."""
    message = f"PROXYPOOL_RETRY_AFTER must be an int >= 0 (seconds), got {value!r}"
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {}}, PROXYPOOL_RETRY_AFTER=value)


# -- mask_password ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"postgresql://u:{SECRET}@h:5432/db", "postgresql://u:***@h:5432/db"),
        (f"postgres://:{SECRET}@h/db", "postgres://:***@h/db"),
        (f"host=h user=u password={SECRET} dbname=d", "host=h user=u password=*** dbname=d"),
        (f"password={SECRET}", "password=***"),
        (f"host=h password = {SECRET}", "host=h password = ***"),
        (f"host=h PASSWORD={SECRET}", "host=h PASSWORD=***"),
        (f"host=h password='my {SECRET} words' dbname=d", "host=h password=*** dbname=d"),
        (f"host=h password='it\\'s {SECRET}' dbname=d", "host=h password=*** dbname=d"),
        (
            f"postgresql://h/db?user=u&password={SECRET}&sslmode=require",
            "postgresql://h/db?user=u&password=***&sslmode=require",
        ),
        (f"postgresql://u:{SECRET}@h/db?password={SECRET}", "postgresql://u:***@h/db?password=***"),
    ],
)
def test_mask_password(text: str, masked: str) -> None:
    """Passwords are replaced by '***' in URL and key=value forms."""
    assert mask_password(text) == masked
    assert SECRET not in mask_password(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host=h user=u dbname=d",
        "postgresql://u@h/db",
        "postgresql://h:5432/db",
        "postgresql:///db?host=/tmp&sslmode=require",
        "sqlite3:/var/lib/app.sqlite3",
        "factory:connect",
    ],
)
def test_mask_password_leaves_text_without_password(text: str) -> None:
    """Text without a password is returned unchanged."""
    assert mask_password(text) == text


def test_mask_password_ampersand_in_keyword_value() -> None:
    """A key=value password containing '&' is masked whole."""
    assert mask_password("host=h password=s3&cret dbname=d") == "host=h password=*** dbname=d"


def test_mask_password_sslpassword() -> None:
    """libpq's sslpassword (the client key passphrase) is masked too."""
    assert mask_password(f"host=h sslpassword={SECRET} sslkey=/k") == "host=h sslpassword=*** sslkey=/k"


def test_release_commit_refused_for_factory_kind(make_app: MakeApp) -> None:
    """release='commit' needs transactions: a factory pool is refused at init_app, naming pool and key."""
    with pytest.raises(ConfigError, match=re.escape("PROXYPOOL_POOLS['ldap']['release'] 'commit' needs a kind")):
        make_app({"ldap": {"factory": object, "release": "commit"}})


def test_release_value_checked(make_app: MakeApp) -> None:
    """release accepts only 'teardown' or 'commit'."""
    with pytest.raises(ConfigError, match=re.escape("PROXYPOOL_POOLS['db']['release'] must be one of")):
        make_app({"db": {"kind": "sqlite3", "release": "sometimes"}})


# -- property-based: every key x values of the wrong type, range or shape ------------------------------

_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters=":."), max_size=6)
#: strings without ':' or '.' (so no generated 'module:attr' is ever imported), often with a NUL or a lone surrogate
PLAIN_TEXT = st.one_of(_TEXT, st.builds("{}{}{}".format, _TEXT, st.sampled_from(["\x00", "\ud800", "\udcff"]), _TEXT))
NOT_A_NUMBER = st.one_of(
    st.booleans(),
    st.none(),
    PLAIN_TEXT,
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.decimals(allow_nan=False, places=2),
    st.complex_numbers(max_magnitude=5),
)
NOT_AN_INT = st.one_of(NOT_A_NUMBER, st.floats(allow_nan=True))
OTHER = st.one_of(st.integers(), st.floats(), st.none(), st.booleans(), st.binary(max_size=4), st.lists(st.none()))


def ints_from(low: int) -> tuple[st.SearchStrategy[t.Any], st.SearchStrategy[t.Any]]:
    """(valid, invalid) values of an int key with this minimum."""
    return st.integers(low, 10**12), st.one_of(NOT_AN_INT, st.integers(max_value=low - 1))


def seconds(*, zero: bool = True) -> tuple[st.SearchStrategy[t.Any], st.SearchStrategy[t.Any]]:
    """(valid, invalid) values of a duration: finite, at most a day, above 0 unless ``zero``."""
    valid = st.one_of(st.floats(0, MAX_SECONDS, exclude_min=not zero), st.integers(0 if zero else 1, int(MAX_SECONDS)))
    invalid = st.one_of(
        NOT_A_NUMBER,
        st.floats(max_value=0, exclude_max=zero),
        st.floats(min_value=MAX_SECONDS, exclude_min=True),
        st.just(math.nan),
        st.integers(min_value=int(MAX_SECONDS) + 1),
        st.integers(max_value=-1 if zero else 0),
    )
    return valid, invalid


def choices(*options: str) -> tuple[st.SearchStrategy[t.Any], st.SearchStrategy[t.Any]]:
    return st.sampled_from(options), st.one_of(OTHER, PLAIN_TEXT.filter(lambda v: v not in options))


#: a server-side guard: None, 0 (disabled) or whole milliseconds' worth of seconds up to a day
GUARD = (
    st.one_of(st.none(), st.just(0), st.floats(0.001, MAX_SECONDS), st.integers(0, int(MAX_SECONDS))),
    st.one_of(
        seconds()[1].filter(lambda v: v is not None),
        st.floats(0, 0.001, exclude_min=True, exclude_max=True),  # would round to 0 ms: disabled, not tiny
    ),
)
BOOL = (st.booleans(), st.one_of(st.integers(0, 1), st.none(), PLAIN_TEXT, st.floats()))
CALLABLE = st.sampled_from([len, dict, not_callable_resource])
OPT_CALLABLE = (st.one_of(st.none(), CALLABLE), st.one_of(PLAIN_TEXT, st.integers(), st.lists(st.none())))
HOOK = (
    st.one_of(st.none(), CALLABLE, st.sampled_from(["close", "ping", "is_alive"])),
    st.one_of(PLAIN_TEXT.filter(lambda v: not v.isidentifier()), st.integers(), st.floats(), st.lists(st.none())),
)

#: key -> (valid values, invalid values); one entry for every key of every kind (checked below)
VALUES: dict[str, tuple[st.SearchStrategy[t.Any], st.SearchStrategy[t.Any]]] = {
    "min_size": ints_from(0),
    "max_size": ints_from(1),
    "max_waiting": ints_from(0),
    "max_use": ints_from(0),
    "timeout": seconds(),
    "fifo_after": seconds(),
    "max_lifetime": seconds(),
    "max_idle": seconds(),
    "liveness_after": seconds(),
    "health_check_interval": seconds(),
    "close_timeout": seconds(),
    "max_hold": seconds(),
    "reconnect_delay": seconds(zero=False),
    "reconnect_max_delay": seconds(zero=False),
    "check_timeout": seconds(zero=False),
    "lifo": BOOL,
    "liveness": choices("poll", "query", "none"),
    "on_return": choices("rollback", "commit"),
    "max_hold_action": choices("report", "reclaim"),
    "release": choices("teardown", "commit"),
    # psycopg
    "conninfo": (
        st.sampled_from(["dbname=app", "host=h port=5433 user=u", "postgresql://u:pw@h/app", "postgres://h/app"]),
        st.one_of(
            OTHER,
            st.sampled_from(["sqlite:///x.db", "mysql://u:pw@h/db", "dbname=a\x00b", "host=\ud800", "hots=h", "x y"]),
        ),
    ),
    "configure": OPT_CALLABLE,
    "reset": (
        st.one_of(st.sampled_from(["session", "rollback", None]), CALLABLE),
        st.one_of(PLAIN_TEXT.filter(lambda v: v not in ("session", "rollback")), st.integers(), st.lists(st.none())),
    ),
    "autocommit": BOOL,
    "prepare_threshold": (
        st.one_of(st.none(), st.integers(0, 10**6)),
        st.one_of(
            st.integers(max_value=-1),
            OTHER.filter(lambda v: v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0)),
        ),
    ),
    "row_factory": OPT_CALLABLE,
    "cursor_factory": OPT_CALLABLE,
    "pgbouncer": (st.sampled_from([None, "transaction"]), st.one_of(OTHER.filter(lambda v: v is not None), PLAIN_TEXT)),
    "pgbouncer_prepared_statements": (st.just(False), BOOL[1]),
    "statement_timeout": GUARD,
    "lock_timeout": GUARD,
    "idle_in_transaction_session_timeout": GUARD,
    "target": choices("primary", "standby", "any"),
    # sqlite3
    "database": (
        st.sampled_from(["app.sqlite3", "data/app.db", "/tmp/pp-config-test.sqlite3"]),
        st.one_of(OTHER, st.sampled_from(["a\x00b", "\udcff.db"])),
    ),
    "busy_timeout": seconds(),
    "isolation_level": (
        st.sampled_from([None, "", "DEFERRED", "immediate", "Exclusive"]),
        st.one_of(
            OTHER.filter(lambda v: v is not None),
            PLAIN_TEXT.filter(lambda v: v.upper() not in ("", "DEFERRED", "IMMEDIATE", "EXCLUSIVE")),
        ),
    ),
    "detect_types": (st.integers(0, 3), st.one_of(NOT_AN_INT, st.integers(max_value=-1), st.integers(min_value=4))),
    "uri": BOOL,
    # factory
    "factory": (CALLABLE, st.one_of(PLAIN_TEXT, st.integers(), st.none(), st.lists(st.none()))),
    "close": HOOK,
    "check": HOOK,
    "commit": HOOK,
    "alive": HOOK,
}
#: the settings every pool of a kind needs, so a key under test is the only thing that can be wrong
BASE: dict[str, dict[str, t.Any]] = {
    "psycopg": {"conninfo": "dbname=app"},
    "sqlite3": {"kind": "sqlite3"},
    "factory": {"factory": not_callable_resource},
}
#: the keys in force between one another: an error may name the other key of a pair
PAIRS = {"min_size": "max_size", "max_size": "min_size", "reconnect_delay": "reconnect_max_delay"}


def kind_of(key: str) -> str:
    """A kind that accepts ``key`` (the common keys: any kind, psycopg here)."""
    return next((kind for kind, keys in KIND_KEYS.items() if key in keys), "psycopg")


def test_every_key_has_value_strategies() -> None:
    """The property tests below cover every key there is: a new key needs its valid and invalid values here."""
    assert set(VALUES) == (set(COMMON_KEYS) - {"kind"}) | {k for keys in KIND_KEYS.values() for k in keys}


def parsed_or_error(settings: dict[str, t.Any]) -> PoolConfig | ConfigError:
    """parse_pools of one pool 'db': its PoolConfig, or the ConfigError; any other exception fails the test."""
    try:
        return parse_pools({"db": settings}, "/nonexistent/instance")["db"]
    except ConfigError as e:
        return e


@settings(max_examples=400, deadline=None)
@given(data=st.data(), key=st.sampled_from(sorted(VALUES)))
def test_invalid_value_is_a_config_error_naming_pool_and_key(data: st.DataObject, key: str) -> None:
    """A value of the wrong type, range or shape for any key is a ConfigError naming the pool and that key."""
    kind = "factory" if key in ("close", "check", "commit", "alive", "factory") else kind_of(key)
    value = data.draw(VALUES[key][1], label="value")
    got = parsed_or_error({**BASE[kind], key: value})
    assert isinstance(got, ConfigError), f"{key}={value!r} was accepted"
    message = str(got)
    assert message.startswith("PROXYPOOL_POOLS['db']")
    assert key in message or PAIRS.get(key, key) in message


@settings(max_examples=400, deadline=None)
@given(data=st.data(), key=st.sampled_from(sorted(VALUES)), value=st.one_of(OTHER, PLAIN_TEXT, NOT_A_NUMBER))
def test_any_value_is_accepted_or_a_config_error(data: st.DataObject, key: str, value: t.Any) -> None:
    """Whatever the value, parse_pools gives a PoolConfig or a ConfigError naming the pool, never another exception."""
    kind = data.draw(st.sampled_from([k for k in KIND_KEYS if key in KIND_KEYS[k] or key in COMMON_KEYS]))
    got = parsed_or_error({**BASE[kind], key: value})
    if isinstance(got, ConfigError):
        assert str(got).startswith("PROXYPOOL_POOLS['db']")
        assert key in str(got) or PAIRS.get(key, key) in str(got)


LIBPQ = ("application_name", "connect_timeout", "port", "sslmode", "keepalives", "password", "sslpassword")


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(LIBPQ), value=st.one_of(OTHER, PLAIN_TEXT, NOT_A_NUMBER))
def test_libpq_parameter_any_value(key: str, value: t.Any) -> None:
    """A libpq parameter beside the conninfo: accepted, or a ConfigError naming it; a secret's value never shown.

    A string C would cut short or cannot encode (a NUL, a lone surrogate) is never accepted.
    """
    got = parsed_or_error({"conninfo": "dbname=app", key: value})
    if isinstance(value, str) and any(c in value for c in "\x00\ud800\udcff"):
        assert isinstance(got, ConfigError)
    if isinstance(got, ConfigError):
        assert str(got).startswith(f"PROXYPOOL_POOLS['db'][{key!r}] ")
        if "password" in key:
            assert str(got).endswith("got '***'") or "holds a" in str(got)


@st.composite
def valid_pools(draw: st.DrawFn) -> tuple[str, dict[str, t.Any]]:
    """A kind and a valid settings dict for it: any subset of its keys, each with a valid value."""
    kind = draw(st.sampled_from(sorted(KIND_KEYS)))
    keys = [k for k in VALUES if k in COMMON_KEYS or k in KIND_KEYS[kind]]
    if kind == "factory":
        keys = [k for k in keys if k not in ("release", "reset")]
        keys.append("reset")  # the factory's reset hook, not psycopg's
    optional = {k: HOOK[0] if (kind, k) == ("factory", "reset") else VALUES[k][0] for k in keys}
    settings_ = draw(st.fixed_dictionaries({}, optional=optional))
    settings_ = {**BASE[kind], **settings_}
    if settings_.get("min_size", 0) > settings_.get("max_size", 4):
        settings_["min_size"] = settings_.get("max_size", 4)
    if settings_.get("reconnect_max_delay", 1.0) < settings_.get("reconnect_delay", 0.1):
        settings_["reconnect_max_delay"] = settings_.get("reconnect_delay", 0.1)
    if settings_.get("pgbouncer"):  # what transaction mode refuses (tests/test_pgbouncer.py)
        for key, refused in (("configure", None), ("reset", "rollback"), ("prepare_threshold", None)):
            if settings_.get(key, refused) != refused:
                del settings_[key]
        if settings_.get("liveness") == "query":
            del settings_["liveness"]
    if settings_.get("max_hold_action") == "reclaim" and not settings_.get("max_hold"):
        settings_["max_hold"] = 1.0
    return kind, settings_


@settings(max_examples=300, deadline=None)
@given(pool=valid_pools())
def test_valid_settings_give_a_pool_config_keeping_each_value(pool: tuple[str, dict[str, t.Any]]) -> None:
    """Valid values for any subset of a kind's keys give a PoolConfig of that kind holding each value given."""
    kind, settings_ = pool
    got = parsed_or_error(settings_)
    assert isinstance(got, PoolConfig), str(got)
    assert got.kind == kind
    for key, value in settings_.items():
        if key == "release":
            assert got.release == value
        elif key in COMMON_KEYS and key != "kind":
            assert got.options[key] == value
        elif key == "database":
            under_instance = not settings_.get("uri") and not os.path.isabs(value)
            assert got.kind_options[key] == (os.path.join("/nonexistent/instance", value) if under_instance else value)
        elif key == "reset" and value is None:
            assert got.kind_options[key] == ("session" if kind == "psycopg" else None)
        elif key == "prepare_threshold" and value == 5:
            assert key not in got.kind_options  # psycopg's own default, left unpinned
        elif key in KIND_KEYS[kind]:
            assert got.kind_options[key] == value
