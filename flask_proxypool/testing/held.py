"""What the Flask app contexts pushed in this thread hold: resources they will give back when popped.

The only place in this package that knows how a context holds its
resources; the leak check asks it which resources are not leaks yet.
"""

from __future__ import annotations

import typing as t

from flask import has_app_context
from flask.globals import app_ctx

from ..binding import held

__all__ = ["held_by_pushed_contexts"]


def _bound(ctx: t.Any) -> t.Iterable[t.Any]:
    """The resources bound to one app context (read off the binding's layout: one line to change with it)."""
    return [binding.resource for binding in (held(ctx) or {}).values()]


def _pushed() -> t.Iterator[t.Any]:
    """The app contexts pushed in this thread, innermost first.

    Flask has no public way to walk down its stack of contexts: each one
    keeps the tokens of its pushes, whose `old_value` is the context under
    it (`_cv_tokens`, Flask 2.2 to 3.1).
    """
    if not has_app_context():
        return
    seen: set[int] = set()
    todo: list[t.Any] = [t.cast(t.Any, app_ctx)._get_current_object()]  # the context itself, not the proxy
    while todo:
        ctx = todo.pop()
        if ctx is None or id(ctx) in seen or not hasattr(ctx, "app"):
            continue
        seen.add(id(ctx))
        yield ctx
        todo.extend(token.old_value for token in getattr(ctx, "_cv_tokens", ()))


def held_by_pushed_contexts() -> set[int]:
    """ids of the resources bound to the app contexts pushed in this thread (given back when they pop)."""
    return {id(resource) for ctx in _pushed() for resource in _bound(ctx)}
