"""No exception path loses a slot: durations are refused unless finite and sane, and an exception raised at
any point of a checkout (KeyboardInterrupt, a gevent Timeout, an OverflowError) leaves the pool's accounts whole.
"""

from __future__ import annotations

import math
import re
import typing as t

import pytest
from flask import Flask

from flask_proxypool import ConfigError
from flask_proxypool import db
from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.pool import DURATIONS
from flask_proxypool.pool import MAX_SECONDS
from flask_proxypool.pool import Pool

MakeApp = t.Callable[..., Flask]

BAD_SECONDS = [pytest.param(math.inf, id="inf"), pytest.param(math.nan, id="nan"), pytest.param(1e10, id="1e10")]


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


# -- durations refused where they are given ------------------------------------------------------------------


def test_the_duration_keys_are_the_documented_ones() -> None:
    """Every duration the issue names is checked, and the ceiling is one day, far below threading.TIMEOUT_MAX."""
    import threading

    assert set(DURATIONS) == {
        "timeout",
        "fifo_after",
        "max_lifetime",
        "max_idle",
        "liveness_after",
        "health_check_interval",
        "reconnect_delay",
        "reconnect_max_delay",
        "close_timeout",
        "check_timeout",
        "max_hold",
    }
    assert MAX_SECONDS == 86400 < threading.TIMEOUT_MAX


@pytest.mark.parametrize("value", BAD_SECONDS)
@pytest.mark.parametrize("key", [*DURATIONS, "busy_timeout"])
def test_init_app_refuses_unbounded_durations(make_app: MakeApp, key: str, value: float) -> None:
    """inf, NaN and 1e10 are refused at init_app, naming the pool, the key and the ceiling."""
    message = (
        f"PROXYPOOL_POOLS['db']['{key}'] must be a finite number of seconds, at most 86400 (one day), got {value!r}"
    )
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"kind": "sqlite3", "database": "x.sqlite3", key: value}})


def test_init_app_accepts_the_ceiling(make_app: MakeApp) -> None:
    """Exactly one day is accepted."""
    app = make_app({"db": {"kind": "sqlite3", "database": "x.sqlite3", "timeout": 86400, "max_lifetime": 86400.0}})
    assert app.extensions["proxypool"].pool("db").timeout == 86400.0


@pytest.mark.parametrize("value", [*BAD_SECONDS, pytest.param(-1.0, id="negative")])
@pytest.mark.parametrize("key", DURATIONS)
def test_pool_refuses_unbounded_durations(key: str, value: float) -> None:
    """Pool() itself refuses the same values with a ValueError naming the argument."""
    with pytest.raises(ValueError, match=f"^{key} must be "):
        Pool(FactoryKind(object), **{key: value})


@pytest.mark.parametrize("value", BAD_SECONDS)
def test_per_call_timeouts_refused_and_nothing_taken(make_app: MakeApp, value: float) -> None:
    """getconn, connection, borrow and close refuse a bad timeout before taking or waiting for anything."""
    app = make_app({"db": {"kind": "sqlite3", "database": "x.sqlite3", "max_size": 1}})
    pool = app.extensions["proxypool"].pool("db")
    held = pool.getconn()
    message = f"pool 'db': getconn timeout must be a number of seconds from 0 to 86400 (one day), got {value!r}"
    with pytest.raises(ValueError, match=exact(message)):
        pool.getconn(timeout=value)
    with pytest.raises(ValueError, match=exact(message)), pool.connection(timeout=value):
        pass
    with pytest.raises(ValueError, match=exact(message)), db.borrow(app, timeout=value):
        pass
    with pytest.raises(ValueError, match="^pool 'db': close timeout must be "):
        pool.close(timeout=value)
    st = pool.stats()
    assert (st.size, st.in_use, st.idle, st.waiting, st.timeouts) == (1, 1, 0, 0, 0)
    assert not pool.closed
    pool.putconn(held)
    assert pool.stats().idle == 1
