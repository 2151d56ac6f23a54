"""The opt-in JSON stats endpoint: PROXYPOOL_STATS_URL, guarded by PROXYPOOL_STATS_GUARD."""

from __future__ import annotations

import json
import typing as t

import pytest
from flask import Flask, abort, request

from flask_proxypool import ConfigError, db

SECRET = "s3cr3t-pw"
URL = "/_proxypool/stats"


def header_guard() -> bool:
    """Allow requests that carry the right token (a 'module:attr' guard)."""
    return request.headers.get("X-Token") == "let-me-in"


def _pools(conninfo: str) -> dict[str, t.Any]:
    return {
        "db": {"conninfo": f"{conninfo} password={SECRET}", "max_size": 2},
        # the password as its own libpq key, and in a URL
        "other": {"conninfo": f"postgresql://app:{SECRET}@127.0.0.1:1/app", "password": SECRET},
        "svc": {"kind": "factory", "factory": object, "check": lambda r: True},
    }


def test_off_by_default(make_app: t.Callable[..., Flask]) -> None:
    """Without PROXYPOOL_STATS_URL there is no endpoint."""
    app = make_app({"db": {"kind": "sqlite3"}})
    assert app.config["PROXYPOOL_STATS_URL"] is None
    assert app.test_client().get(URL).status_code == 404
    assert "proxypool_stats" not in app.view_functions


def test_guard_is_required(make_app: t.Callable[..., Flask]) -> None:
    """A URL without a guard is refused at init_app, naming the missing key."""
    with pytest.raises(ConfigError, match=r"PROXYPOOL_STATS_GUARD is required when PROXYPOOL_STATS_URL is set"):
        make_app({"db": {"kind": "sqlite3"}}, PROXYPOOL_STATS_URL=URL)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"PROXYPOOL_STATS_URL": "stats", "PROXYPOOL_STATS_GUARD": header_guard}, "PROXYPOOL_STATS_URL must be"),
        ({"PROXYPOOL_STATS_URL": URL, "PROXYPOOL_STATS_GUARD": 42}, "PROXYPOOL_STATS_GUARD must be a callable"),
        ({"PROXYPOOL_STATS_URL": URL, "PROXYPOOL_STATS_GUARD": "nowhere:guard"}, "PROXYPOOL_STATS_GUARD must be"),
    ],
)
def test_bad_settings(make_app: t.Callable[..., Flask], config: dict[str, t.Any], message: str) -> None:
    """A relative URL, a guard that is not callable or cannot be imported: ConfigError naming the key."""
    with pytest.raises(ConfigError, match=message):
        make_app({"db": {"kind": "sqlite3"}}, **config)


def test_guard_decides(make_app: t.Callable[..., Flask]) -> None:
    """403 when the guard says no; a 'module:attr' guard is imported; a guard may abort() itself."""
    app = make_app(
        {"db": {"kind": "sqlite3"}},
        PROXYPOOL_STATS_URL=URL,
        PROXYPOOL_STATS_GUARD="test_stats_endpoint:header_guard",
    )
    client = app.test_client()
    assert client.get(URL).status_code == 403
    ok = client.get(URL, headers={"X-Token": "let-me-in"})
    assert ok.status_code == 200 and ok.headers["Cache-Control"] == "no-store"

    def demand_auth() -> bool:
        abort(401)

    app2 = make_app({"db": {"kind": "sqlite3"}}, PROXYPOOL_STATS_URL=URL, PROXYPOOL_STATS_GUARD=demand_auth)
    assert app2.test_client().get(URL).status_code == 401


def test_body_counts_and_never_a_secret(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """The body is {app, pid, pools: PoolStats.to_dict()} with current counts; no password anywhere in it."""
    app = make_app(_pools(conninfo), PROXYPOOL_STATS_URL=URL, PROXYPOOL_STATS_GUARD=lambda: True)

    @app.get("/one")
    def one() -> dict[str, int]:
        return {"n": db.execute("SELECT 1").fetchone()[0]}

    client = app.test_client()
    for _ in range(7):
        assert client.get("/one").status_code == 200
    resp = client.get(URL)
    assert resp.status_code == 200
    text = resp.get_data(as_text=True)
    assert SECRET not in text
    body = json.loads(text)
    assert body["app"] == app.name and isinstance(body["pid"], int)
    pools = body["pools"]
    assert list(pools) == ["db", "other", "svc"]
    assert pools["db"]["checkouts"] == 7 and pools["db"]["in_use"] == 0
    assert pools["db"]["top_holders"][0]["holder"] == "one"
    assert pools["db"]["target"].endswith("password=***")
    assert pools["other"]["target"] == "postgresql://app:***@127.0.0.1:1/app"
    assert pools["other"]["config"]["password"] == "***"
    assert pools["svc"]["config"]["check"] == "_pools.<locals>.<lambda>"
    # the stats request itself took nothing from the pools
    assert app.extensions["proxypool"].stats()["db"].checkouts == 7


def test_stats_of_every_kind_are_strict_json(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """AppPools.stats() of every kind, with callables and None in the config, is strict JSON (no NaN)."""
    import psycopg
    from psycopg.rows import dict_row

    def configure(conn: t.Any) -> None:
        conn.execute("SET application_name = 'x'")

    app = make_app(
        {
            "pg": {
                "conninfo": f"{conninfo} password={SECRET}",
                "configure": configure,
                "reset": configure,
                "row_factory": dict_row,
                "cursor_factory": psycopg.ClientCursor,
                "prepare_threshold": None,
            },
            "lite": {"kind": "sqlite3", "isolation_level": None},
            "svc": {"kind": "factory", "factory": "test_stats_endpoint:header_guard", "close": "close"},
        }
    )
    stats = app.extensions["proxypool"].stats()
    data = json.loads(json.dumps({n: s.to_dict() for n, s in stats.items()}, allow_nan=False))
    assert data["pg"]["config"]["row_factory"] == "dict_row"
    assert data["pg"]["config"]["cursor_factory"] == "ClientCursor"
    assert data["lite"]["config"]["isolation_level"] is None
    assert data["svc"]["config"]["factory"] == "header_guard"
    assert SECRET not in json.dumps(data)
