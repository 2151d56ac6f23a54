"""Read endpoints."""

from __future__ import annotations

from flask import Blueprint, abort

from flask_proxypool import db

from .schema import sql

bp = Blueprint("items", __name__)


@bp.get("/items/<int:id>")
def get_item(id: int) -> dict[str, object]:
    row = db.execute(sql("SELECT id, name, price FROM items WHERE id = %s"), (id,)).fetchone()
    if row is None:
        abort(404)
    return {"id": row[0], "name": row[1], "price": row[2]}


@bp.get("/items")
def list_items() -> dict[str, object]:
    rows = db.execute("SELECT id, name, price FROM items ORDER BY id LIMIT 100").fetchall()
    return {"items": [{"id": r[0], "name": r[1], "price": r[2]} for r in rows]}


@bp.get("/health")
def health() -> dict[str, str]:
    """Touches no pool: takes no connection."""
    return {"status": "ok"}
