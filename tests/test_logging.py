"""Logging review: one logger, every message names its pool, no password ever (caplog over failures)."""

from __future__ import annotations

import logging
import socket
import typing as t

import pytest
from flask import Flask

from flask_proxypool import db, proxy

SECRET = "s3cr3t-pw"
ldap = proxy("ldap")


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def failing_bind() -> object:
    """A factory that fails the way client libraries do: echoing its credentials."""
    raise RuntimeError(f"bind failed for cn=admin,dc=example password={SECRET}")


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("flask_proxypool")]


def _assert_clean(caplog: pytest.LogCaptureFixture, pools: t.Sequence[str]) -> None:
    records = _records(caplog)
    assert records, "expected log records"
    for r in records:
        message = r.getMessage()
        assert any(f"pool {p!r}" in message for p in pools), f"names no pool: {message!r}"
    assert SECRET not in caplog.text  # messages and any traceback


@pytest.mark.parametrize("form", ["keyword", "url"])
def test_failing_connect_logs_name_the_pool_and_no_password(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """A psycopg pool whose server is down: the create failure, backoff and 503 name the pool, mask the password."""
    port = _dead_port()
    conninfo = (
        f"host=127.0.0.1 port={port} user=app password={SECRET} connect_timeout=2"
        if form == "keyword"
        else f"postgresql://app:{SECRET}@127.0.0.1:{port}/app?connect_timeout=2"
    )
    app = make_app({"db": {"conninfo": conninfo, "timeout": 0.5}})

    @app.get("/q")
    def q() -> dict[str, int]:
        return {"n": db.execute("SELECT 1").fetchone()[0]}

    caplog.set_level(logging.DEBUG, logger="flask_proxypool")
    client = app.test_client()
    for _ in range(2):  # the first fails to connect, the second during the backoff
        assert client.get("/q").status_code == 503
    result = app.test_cli_runner().invoke(args=["proxypool", "check", "--timeout", "1"])
    assert result.exit_code == 1 and SECRET not in result.output
    _assert_clean(caplog, ["db"])
    messages = [r.getMessage() for r in _records(caplog)]
    assert any("creating a psycopg resource for" in m and "backing off" in m for m in messages)
    assert any("503: " in m for m in messages)


def test_failing_factory_logs_mask_echoed_credentials(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    """A factory whose error echoes a password: the logged create failure and 503 mask it."""
    app = make_app({"ldap": {"kind": "factory", "factory": failing_bind}})

    @app.get("/who")
    def who() -> str:
        return str(ldap.whoami())

    caplog.set_level(logging.DEBUG, logger="flask_proxypool")
    assert app.test_client().get("/who").status_code == 503
    _assert_clean(caplog, ["ldap"])
    assert any("password=***" in r.getMessage() for r in _records(caplog))


def test_one_logger() -> None:
    """Every module logs through the one 'flask_proxypool' logger."""
    import importlib
    import logging
    import pkgutil

    import flask_proxypool

    names = [m.name for m in pkgutil.walk_packages(flask_proxypool.__path__, "flask_proxypool.")]
    loggers = {
        name: logger.name
        for name in names
        if name != "flask_proxypool.pytest_plugin"  # a pytest plugin: imported by pytest itself
        for logger in [getattr(importlib.import_module(name), "logger", None)]
        if isinstance(logger, logging.Logger)
    }
    assert {"flask_proxypool.pool", "flask_proxypool.binding", "flask_proxypool.maintenance"} <= set(loggers)
    assert set(loggers.values()) == {"flask_proxypool"}


class Flaky:
    """A resource whose reset fails with a message that echoes a password."""

    def reset(self) -> bool:
        raise RuntimeError(f"server said: bad session for password={SECRET}")


def test_reset_failure_is_masked(make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture) -> None:
    """A reset error that echoes a password is logged masked."""
    app = make_app({"svc": {"kind": "factory", "factory": Flaky, "reset": "reset"}})
    caplog.set_level(logging.DEBUG, logger="flask_proxypool")
    with proxy("svc").borrow(app):
        pass
    _assert_clean(caplog, ["svc"])


def test_503_warnings_are_throttled_per_pool_and_cause(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    """An outage makes every request a 503: one warning per pool and cause every 10 s, then a count of the rest."""
    app = make_app(
        {
            "ldap": {"kind": "factory", "factory": failing_bind, "reconnect_delay": 60, "reconnect_max_delay": 60},
            "db": {"kind": "factory", "factory": failing_bind, "reconnect_delay": 60, "reconnect_max_delay": 60},
        }
    )
    now = [100.0]
    app.extensions["proxypool"].throttle_503.clock = lambda: now[0]

    @app.get("/who")
    def who() -> str:
        return str(ldap.whoami())

    @app.get("/db")
    def use_db() -> str:
        return str(db.whoami())

    caplog.set_level(logging.WARNING, logger="flask_proxypool")
    client = app.test_client()

    def warnings_503() -> list[str]:
        return [r.getMessage() for r in _records(caplog) if ": 503: " in r.getMessage()]

    assert [client.get("/who").status_code for _ in range(20)] == [503] * 20
    assert len(warnings_503()) == 1
    assert client.get("/db").status_code == 503  # another pool: its own line
    assert len(warnings_503()) == 2 and "pool 'db'" in warnings_503()[1]
    now[0] += 10.0
    assert client.get("/who").status_code == 503
    lines = warnings_503()
    assert len(lines) == 3 and "pool 'ldap'" in lines[2]
    assert "(19 more like it in the last 10 sec not logged)" in lines[2]
    assert SECRET not in caplog.text
