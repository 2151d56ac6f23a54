"""Write endpoints: each runs in one transaction, committed explicitly."""

from __future__ import annotations

from flask import Blueprint, abort, request

from flask_proxypool import db, proxy

from .schema import sql

bp = Blueprint("orders", __name__)
pricing = proxy("pricing")


@bp.post("/items")
def create_item() -> tuple[dict[str, object], int]:
    data = request.get_json(force=True)
    db.execute(
        sql("INSERT INTO items (id, name, price) VALUES (%s, %s, %s)"), (data["id"], data["name"], data["price"])
    )
    db.commit()
    return {"id": data["id"]}, 201


@bp.post("/orders")
def create_order() -> tuple[dict[str, object], int]:
    """Insert an order and check stock in one transaction; ``fail`` aborts it half-way."""
    data = request.get_json(force=True)
    row = db.execute(sql("SELECT price FROM items WHERE id = %s"), (data["item_id"],)).fetchone()
    if row is None:
        abort(404)
    db.execute(
        sql("INSERT INTO orders (id, item_id, qty) VALUES (%s, %s, %s)"), (data["id"], data["item_id"], data["qty"])
    )
    if data.get("fail"):
        raise RuntimeError("failing mid-transaction on purpose: the insert must be rolled back")
    total = pricing.quote(row[0], data["qty"])
    db.commit()
    return {"id": data["id"], "total": total}, 201


@bp.get("/orders/<int:id>")
def get_order(id: int) -> dict[str, object]:
    row = db.execute(sql("SELECT id, item_id, qty FROM orders WHERE id = %s"), (id,)).fetchone()
    if row is None:
        abort(404)
    return {"id": row[0], "item_id": row[1], "qty": row[2]}
