"""Read endpoints, and the index."""

from __future__ import annotations

from flask import Blueprint, abort, request

from flask_proxypool import db

from .checks import path_id
from .schema import sql

bp = Blueprint("items", __name__)


@bp.get("/items/<int:id>")
def get_item(id: int) -> dict[str, object]:
    row = db.execute(sql("SELECT id, name, price FROM items WHERE id = %s"), (path_id(id, "item"),)).fetchone()
    if row is None:
        abort(404, f"item {id} not found")
    return {"id": row[0], "name": row[1], "price": row[2]}


@bp.get("/items")
def list_items() -> dict[str, object]:
    rows = db.execute("SELECT id, name, price FROM items ORDER BY id LIMIT 100").fetchall()
    return {"items": [{"id": r[0], "name": r[1], "price": r[2]} for r in rows]}


@bp.get("/health")
def health() -> dict[str, str]:
    """Touches no pool: takes no connection."""
    return {"status": "ok"}


@bp.get("/")
def index() -> dict[str, object]:
    """What this service answers, one curl line each; touches no pool."""
    base = request.host_url.rstrip("/")
    return {
        "endpoints": {
            "POST /items": f"""curl -XPOST {base}/items -d '{{"id": 1, "name": "pen", "price": 3}}'""",
            "GET /items": f"curl {base}/items",
            "GET /items/<id>": f"curl {base}/items/1",
            "POST /orders": f"""curl -XPOST {base}/orders -d '{{"id": 1, "item_id": 1, "qty": 12}}'""",
            "GET /orders/<id>": f"curl {base}/orders/1",
            "GET /health": f"curl {base}/health",
        }
    }
