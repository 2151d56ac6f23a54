"""Live objects that must be rebuilt in a forked child (a `gunicorn --preload` worker), written once.

A child inherits its parent's locks (possibly held by a thread that no
longer exists there) and its sockets (which the child must neither use nor
close). Each kind of object that cares keeps a `Registry`; after a
fork every registry swaps in a fresh lock and tells each of its live objects
to forget what was the parent's.
"""

from __future__ import annotations

import os
import threading
import typing as t
import weakref

__all__ = ["Registry", "on_fork"]


class ForkAware(t.Protocol):
    def _after_fork_in_child(self) -> None:
        """Forget the parent's state (locks, threads, resources) without touching it."""


F = t.TypeVar("F", bound=ForkAware)


class Registry(t.Generic[F]):
    """A thread-safe weak set of live objects, each rebuilt in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _items (a WeakSet is not thread-safe)
        self._items: weakref.WeakSet[F] = weakref.WeakSet()
        with _registries_lock:
            _registries.append(self)

    def add(self, item: F) -> None:
        with self._lock:
            self._items.add(item)

    def items(self) -> list[F]:
        """The live objects, as a list (a snapshot: safe to iterate while others add)."""
        with self._lock:
            return list(self._items)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        for item in list(self._items):
            item._after_fork_in_child()


_registries: list[Registry[t.Any]] = []
_registries_lock = threading.Lock()


def on_fork(
    *,
    before: t.Callable[[], object] | None = None,
    after_in_parent: t.Callable[[], object] | None = None,
    after_in_child: t.Callable[[], object] | None = None,
) -> None:
    """`os.register_at_fork` where the platform has it (not on Windows: nothing forks there)."""
    if hasattr(os, "register_at_fork"):
        given = {"before": before, "after_in_parent": after_in_parent, "after_in_child": after_in_child}
        os.register_at_fork(**{k: v for k, v in given.items() if v is not None})


def _after_fork_in_child() -> None:
    global _registries_lock
    _registries_lock = threading.Lock()
    for registry in list(_registries):
        registry._after_fork_in_child()


on_fork(after_in_child=_after_fork_in_child)
