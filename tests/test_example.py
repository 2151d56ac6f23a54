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
    assert (r.status_code, r.json) == (201, {"id": 10, "total": 33})
    assert client.post("/orders", json={"id": 11, "item_id": 1, "qty": 1, "fail": True}).status_code == 500
    assert client.get("/orders/11").status_code == 404
    assert client.get("/orders/10").json == {"id": 10, "item_id": 1, "qty": 12}
    assert client.get("/health").status_code == 200
    stats = _stats(app)
    assert stats["db"].in_use == 0 and stats["pricing"].in_use == 0
    assert stats["pricing"].checkouts == 1  # only the successful order asked for a quote


# -- bad input: a JSON 4xx that says what to fix, and nothing written ------------------------------------------------


def _tables(app: Flask) -> tuple[list[tuple[t.Any, ...]], list[tuple[t.Any, ...]]]:
    """Every row of both tables, read outside any request."""
    from flask_proxypool import db

    with db.borrow(app) as conn:
        items = conn.execute("SELECT id, name, price FROM items ORDER BY id").fetchall()
        orders = conn.execute("SELECT id, item_id, qty FROM orders ORDER BY id").fetchall()
    return [tuple(r) for r in items], [tuple(r) for r in orders]


def _error(r: t.Any, status: int) -> str:
    """The ``detail`` of a JSON error answer with this status."""
    assert r.status_code == status, r.data
    assert r.is_json and set(r.json) == {"error", "detail"}, r.data
    detail: str = r.json["detail"]
    assert detail
    return detail


@pytest.fixture
def stocked(app: Flask, client: FlaskClient) -> Flask:
    """The shop with one item (1, pen, 3) and one order (10) of it."""
    assert client.post("/items", json={"id": 1, "name": "pen", "price": 3}).status_code == 201
    assert client.post("/orders", json={"id": 10, "item_id": 1, "qty": 2}).status_code == 201
    return app


BAD_BODIES: list[dict[str, t.Any]] = [
    {"data": "not json"},
    {"data": ""},
    {"data": b"\xff\xfe{"},
    {"json": None},
    {"json": [1, 2]},
    {"json": "a string"},
    {"json": 3},
]


def test_body_not_a_json_object(stocked: Flask, client: FlaskClient) -> None:
    """A body that is not a JSON object is a 400 naming the fields expected, on both write endpoints."""
    before = _tables(stocked)
    for path, field in (("/items", "price"), ("/orders", "qty")):
        for body in BAD_BODIES:
            detail = _error(client.post(path, **body), 400)
            assert "must be a JSON object" in detail and field in detail, (path, body)
            assert _tables(stocked) == before, (path, body)


BAD_ITEMS: list[tuple[dict[str, t.Any], str]] = [
    ({"id": 2, "name": "pen"}, "missing field 'price'"),
    ({}, "missing field 'id'; missing field 'name'; missing field 'price'"),
    ({"id": 2, "name": "pen", "price": 3, "colour": "red"}, "unknown field 'colour'"),
    ({"id": "2", "name": "pen", "price": 3}, 'id must be an integer from 1 to 2147483647, got "2"'),
    ({"id": True, "name": "pen", "price": 3}, "id must be an integer from 1 to 2147483647, got true"),
    ({"id": 2.0, "name": "pen", "price": 3}, "got 2.0"),
    ({"id": 0, "name": "pen", "price": 3}, "got 0"),
    ({"id": -2, "name": "pen", "price": 3}, "got -2"),
    ({"id": 2**31, "name": "pen", "price": 3}, "got 2147483648"),
    ({"id": 2**70, "name": "pen", "price": 3}, "got 1180591620717411303424"),
    ({"id": None, "name": "pen", "price": 3}, "got null"),
    ({"id": 2, "name": "", "price": 3}, "name must be a non-blank printable string of at most 100 characters"),
    ({"id": 2, "name": "   ", "price": 3}, "name must be"),
    ({"id": 2, "name": "x" * 101, "price": 3}, 'got "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'),
    ({"id": 2, "name": 5, "price": 3}, "name must be"),
    ({"id": 2, "name": ["pen"], "price": 3}, "name must be"),
    ({"id": 2, "name": "pen\x00", "price": 3}, "name must be"),  # PostgreSQL text cannot hold NUL
    ({"id": 2, "name": "pen\ud800", "price": 3}, "name must be"),  # a lone surrogate is not UTF-8
    ({"id": 2, "name": "line\nbreak", "price": 3}, "name must be"),
    ({"id": 2, "name": "pen", "price": -1}, "price must be an integer from 0 to 2147483647, got -1"),
    ({"id": 2, "name": "pen", "price": 2.5}, "got 2.5"),
    ({"id": 2, "name": "pen", "price": "3"}, "price must be"),
    ({"id": 2, "name": "pen", "price": False}, "got false"),
    ({"id": 2, "name": "pen", "price": float("nan")}, "got NaN"),
    ({"id": "x", "name": "", "price": -1, "extra": 1}, "unknown field 'extra'; id must be"),
]


def test_bad_item_fields(stocked: Flask, client: FlaskClient) -> None:
    """Each missing, unknown or invalid field of POST /items is a 400 that names it; nothing is written."""
    before = _tables(stocked)
    for body, expected in BAD_ITEMS:
        detail = _error(client.post("/items", json=body), 400)
        assert expected in detail, (body, detail)
        assert _tables(stocked) == before, body
    # every problem at once, so the client fixes them in one go
    detail = _error(client.post("/items", json=BAD_ITEMS[-1][0]), 400)
    assert detail.count(";") == 3 and "name must be" in detail and "price must be" in detail


BAD_ORDERS: list[tuple[dict[str, t.Any], str]] = [
    ({"id": 11, "item_id": 1}, "missing field 'qty'"),
    ({"id": 11, "item_id": 1, "quantity": 1}, "unknown field 'quantity'; missing field 'qty'"),
    ({"id": 11, "item_id": 1, "qty": 0}, "qty must be an integer from 1 to 2147483647, got 0"),
    ({"id": 11, "item_id": 1, "qty": True}, "got true"),
    ({"id": 11, "item_id": 1, "qty": 1.5}, "got 1.5"),
    ({"id": 11, "item_id": "1", "qty": 1}, "item_id must be"),
    ({"id": 11, "item_id": 0, "qty": 1}, "item_id must be"),
    ({"id": [11], "item_id": 1, "qty": 1}, "id must be"),
    ({"id": 11, "item_id": 1, "qty": 1, "fail": "yes"}, 'fail must be true or false, got "yes"'),
    ({"id": 11, "item_id": 1, "qty": 1, "fail": 1}, "fail must be true or false, got 1"),
]


def test_bad_order_fields(stocked: Flask, client: FlaskClient) -> None:
    """Each missing, unknown or invalid field of POST /orders is a 400 that names it; nothing is written or priced."""
    before = _tables(stocked)
    quotes = _stats(stocked)["pricing"].checkouts
    for body, expected in BAD_ORDERS:
        detail = _error(client.post("/orders", json=body), 400)
        assert expected in detail, (body, detail)
        assert _tables(stocked) == before, body
    assert _stats(stocked)["pricing"].checkouts == quotes


def test_not_found_is_json(stocked: Flask, client: FlaskClient) -> None:
    """Unknown items, orders and URLs are JSON 404s; an order for an unknown item is one too, and writes nothing."""
    before = _tables(stocked)
    assert _error(client.get("/items/2"), 404) == "item 2 not found"
    assert _error(client.get("/orders/11"), 404) == "order 11 not found"
    assert _error(client.get("/items/0"), 404) == "item 0 not found"
    # beyond any integer column (sqlite3 would raise OverflowError): refused before a query
    assert _error(client.get(f"/items/{2**70}"), 404) == f"item {2**70} not found"
    assert _error(client.get(f"/orders/{2**31}"), 404) == f"order {2**31} not found"
    detail = _error(client.post("/orders", json={"id": 11, "item_id": 2, "qty": 1}), 404)
    assert detail == "item 2 not found: create it first with POST /items"
    assert "not found" in _error(client.get("/no/such/page"), 404)
    r = client.delete("/items/1")
    assert "not allowed" in _error(r, 405) and "GET" in r.headers["Allow"]
    assert _tables(stocked) == before


def test_duplicate_id_is_409(stocked: Flask, client: FlaskClient) -> None:
    """An id already taken is a 409 naming it; the row already there is left as it was."""
    before = _tables(stocked)
    assert _error(client.post("/items", json={"id": 1, "name": "ink", "price": 9}), 409) == "item 1 already exists"
    r = client.post("/orders", json={"id": 10, "item_id": 1, "qty": 5})
    assert _error(r, 409) == "order 10 already exists"
    assert _tables(stocked) == before
    assert client.get("/items/1").json == {"id": 1, "name": "pen", "price": 3}


def test_unexpected_error_is_json_500(stocked: Flask, client: FlaskClient) -> None:
    """An exception in a view is a JSON 500 with a short message, no traceback; its writes are rolled back."""
    before = _tables(stocked)
    r = client.post("/orders", json={"id": 11, "item_id": 1, "qty": 1, "fail": True})
    assert _error(r, 500) == "unexpected server error; the details are in the server log"
    assert "Traceback" not in r.text and "RuntimeError" not in r.text and "mid-transaction" not in r.text
    assert _tables(stocked) == before
    stats = _stats(stocked)
    assert stats["db"].in_use == 0 and stats["pricing"].in_use == 0


def test_valid_edges_accepted(stocked: Flask, client: FlaskClient) -> None:
    """The limits themselves pass, on both engines: the largest id, price 0, a 100-character non-ASCII name."""
    name = "é" * 99 + "🖊"
    assert client.post("/items", json={"id": 2**31 - 1, "name": name, "price": 0}).status_code == 201
    assert client.get(f"/items/{2**31 - 1}").json == {"id": 2**31 - 1, "name": name, "price": 0}
    r = client.post("/orders", json={"id": 2**31 - 1, "item_id": 2**31 - 1, "qty": 2**31 - 1, "fail": False})
    assert (r.status_code, r.json) == (201, {"id": 2**31 - 1, "total": 0})


def test_schema_refuses_what_validation_would(stocked: Flask) -> None:
    """Defence in depth: rows that skip the app's checks are refused by the schema (sqlite3 STRICT, CHECKs)."""
    import sqlite3

    import psycopg

    from flask_proxypool import db

    before = _tables(stocked)
    bad = [
        ("INSERT INTO items (id, name, price) VALUES (%s, %s, %s)", (2, "pen", "cheap")),
        ("INSERT INTO items (id, name, price) VALUES (%s, %s, %s)", (2, "pen", -1)),
        ("INSERT INTO items (id, name, price) VALUES (%s, %s, %s)", (2, "", 3)),
        ("INSERT INTO items (id, name, price) VALUES (%s, %s, %s)", (0, "pen", 3)),
        ("INSERT INTO items (id, name, price) VALUES (%s, %s, %s)", (2, "x" * 101, 3)),
        ("INSERT INTO orders (id, item_id, qty) VALUES (%s, %s, %s)", (11, 1, 0)),
        ("INSERT INTO orders (id, item_id, qty) VALUES (%s, %s, %s)", (11, "one", 1)),
    ]
    with db.borrow(stocked) as conn:
        sqlite = isinstance(conn, sqlite3.Connection)
    if sqlite:  # PostgreSQL rounds a float into an integer column (an assignment cast); STRICT sqlite3 refuses it
        bad.append(("INSERT INTO items (id, name, price) VALUES (%s, %s, %s)", (2, "pen", 2.5)))
    for query, params in bad:
        with db.borrow(stocked) as conn, pytest.raises((sqlite3.IntegrityError, psycopg.DatabaseError)):
            conn.execute(query.replace("%s", "?") if sqlite else query, params)
        assert _tables(stocked) == before, params


def test_index_lists_endpoints(app: Flask, client: FlaskClient) -> None:
    """``/`` gives a curl line for this host per endpoint, every endpoint, and takes no connection."""
    checkouts = _stats(app)["db"].checkouts
    r = client.get("/", base_url="http://shop.example:8000")
    assert r.status_code == 200 and r.json is not None and _stats(app)["db"].checkouts == checkouts
    endpoints = r.json["endpoints"]
    served = {
        f"{method} {rule.rule}".replace("<int:id>", "<id>")
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in ("static", "items.index")
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    assert set(endpoints) == served
    assert all(line.startswith("curl ") and " http://shop.example:8000/" in line for line in endpoints.values())
