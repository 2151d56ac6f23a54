"""What the Flask app contexts of this thread still hold: resources they will give back when they end.

The only place in this package that knows how a context holds its
resources; the leak check asks it which resources are not leaks yet. It
learns which contexts took something from `binding.observe` (installed by
the plugin), so it needs no walk of Flask's private context stack.
"""

from __future__ import annotations

import threading
import typing as t
import weakref

from ..binding import Binding, held, observe

__all__ = ["held_by_pushed_contexts", "start"]

_local = threading.local()  # .contexts: this thread's app contexts that took something, held weakly


def _record(ctx: t.Any, binding: Binding) -> None:
    contexts = getattr(_local, "contexts", None)
    if contexts is None:
        contexts = _local.contexts = weakref.WeakSet()
    contexts.add(ctx)


def start() -> t.Callable[[], None]:
    """Record, from now on, which contexts take resources; returns the function that stops it."""
    return observe(_record)


def held_by_pushed_contexts() -> set[int]:
    """ids of the resources still bound to app contexts of this thread (given back when those end)."""
    contexts: weakref.WeakSet[t.Any] = getattr(_local, "contexts", None) or weakref.WeakSet()
    return {id(b.resource) for ctx in list(contexts) for b in (held(ctx) or {}).values() if b.pool is not None}
