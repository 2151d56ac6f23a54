"""Write endpoints: each runs in one transaction, committed explicitly."""

from __future__ import annotations

from flask import Blueprint, abort

from flask_proxypool import db, proxy

from .checks import ITEM, ORDER, ORDER_OPTIONAL, json_body, path_id
from .schema import sql

bp = Blueprint("orders", __name__)
pricing = proxy("pricing")


@bp.post("/items")
def create_item() -> tuple[dict[str, object], int]:
    data = json_body(ITEM)
    # ON CONFLICT rather than a SELECT first: two requests racing with the same id cannot both pass
    cur = db.execute(
        sql("INSERT INTO items (id, name, price) VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING"),
        (data["id"], data["name"], data["price"]),
    )
    if cur.rowcount == 0:
        abort(409, f"item {data['id']} already exists")
    db.commit()
    return {"id": data["id"]}, 201


@bp.post("/orders")
def create_order() -> tuple[dict[str, object], int]:
    """Insert an order and price it in one transaction; ``fail`` aborts it half-way."""
    data = json_body(ORDER, ORDER_OPTIONAL)
    row = db.execute(sql("SELECT price FROM items WHERE id = %s"), (data["item_id"],)).fetchone()
    if row is None:
        abort(404, f"item {data['item_id']} not found: create it first with POST /items")
    cur = db.execute(
        sql("INSERT INTO orders (id, item_id, qty) VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING"),
        (data["id"], data["item_id"], data["qty"]),
    )
    if cur.rowcount == 0:
        abort(409, f"order {data['id']} already exists")
    if data.get("fail"):
        raise RuntimeError("failing mid-transaction on purpose: the insert must be rolled back")
    total = pricing.quote(row[0], data["qty"])
    db.commit()
    return {"id": data["id"], "total": total}, 201


@bp.get("/orders/<int:id>")
def get_order(id: int) -> dict[str, object]:
    row = db.execute(sql("SELECT id, item_id, qty FROM orders WHERE id = %s"), (path_id(id, "order"),)).fetchone()
    if row is None:
        abort(404, f"order {id} not found")
    return {"id": row[0], "item_id": row[1], "qty": row[2]}
