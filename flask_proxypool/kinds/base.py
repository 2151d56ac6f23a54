"""What a resource kind must provide so a `Pool` can manage it."""

from __future__ import annotations

import typing as t

T = t.TypeVar("T")


class Kind(t.Protocol[T]):
    """How to make, check, reset and close one kind of resource.

    The pool calls these outside its lock, from whichever thread needs them,
    so a kind must not keep per-resource state of its own.

    Optional: `closed(resource) -> bool`, True when the holder closed the
    resource itself, so the pool counts it apart from broken ones.
    """

    #: Short name used in logs and stats (``"psycopg"``, ``"sqlite3"``, ``"factory"``).
    name: str

    def create(self) -> T:
        """Make a new resource; raise if it cannot be had (the pool backs off)."""

    def close(self, resource: T) -> None:
        """Release the resource for good; errors are logged, never propagated."""

    def alive(self, resource: T) -> bool:
        """Cheap liveness test done on every checkout: it must not cost a round trip."""

    def check(self, resource: T) -> None:
        """Full check (a round trip): raise if the resource is unusable."""

    def reset(self, resource: T) -> bool:
        """Make the resource clean for the next holder (roll back); False means discard it."""

    def in_transaction(self, resource: T) -> bool:
        """True while work is open on the resource (`release: "commit"` waits for False)."""

    def commit(self, resource: T) -> None:
        """Commit the holder's work; raise if that failed."""

    def describe(self) -> str:
        """What this kind connects to, for logs and stats, with any password masked."""
