"""The example service (examples/shop), driven through pytest-flask's ``client`` fixture."""

from __future__ import annotations

import sys
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from pgserver import PgServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(params=["sqlite3", "psycopg"])
def app(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """The shop app on sqlite3 (no server) and on the test PostgreSQL."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import shop

    url = None
    overrides: dict[str, t.Any] = {}
    if request.param == "psycopg":
        pg: PgServer = request.getfixturevalue("pg")
        name = f"shop_{tmp_path.name.replace('-', '_').lower()}"[:60]
        pg.create_database(name)
        url = pg.url(name)
    else:
        monkeypatch.delenv("SHOP_DATABASE_URL", raising=False)
        overrides["database"] = str(tmp_path / "shop.sqlite3")
    app = shop.create_app(url, **overrides)
    yield app
    app.extensions["proxypool"].close(timeout=1.0)
    sys.modules.pop("shop", None)


def _stats(app: Flask) -> t.Any:
    return app.extensions["proxypool"].stats()


def test_write_read_and_failed_transaction(app: Flask, client: FlaskClient) -> None:
    """Writes commit, a failure mid-transaction leaves nothing, and every resource is back after each request."""
    assert client.post("/items", json={"id": 1, "name": "pen", "price": 3}).status_code == 201
    assert client.get("/items/1").json == {"id": 1, "name": "pen", "price": 3}
    r = client.post("/orders", json={"id": 10, "item_id": 1, "qty": 12})
    assert (r.status_code, r.json["total"]) == (201, 33)
    assert client.post("/orders", json={"id": 11, "item_id": 1, "qty": 1, "fail": True}).status_code == 500
    assert client.get("/orders/11").status_code == 404
    assert client.get("/orders/10").json == {"id": 10, "item_id": 1, "qty": 12}
    assert client.get("/health").status_code == 200
    stats = _stats(app)
    assert stats["db"].in_use == 0 and stats["pricing"].in_use == 0
    assert stats["pricing"].checkouts == 1  # only the successful order asked for a quote
