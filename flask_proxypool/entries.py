"""What the pool keeps per resource, per waiting caller and per checkout: records with no logic.

Ownership and locking rules are in the pool's module docstring: an entry has
one owner at a time, a waiter is handed a result only under the pool's lock.
"""

from __future__ import annotations

import math
import threading
import types
import typing as t
import weakref

__all__ = ["LOOK", "PERMIT", "Checkout", "Entry", "Waiter", "kept_by_another", "never", "where"]

T = t.TypeVar("T")


class Entry(t.Generic[T]):
    """A resource and its bookkeeping, for the resource's whole life."""

    __slots__ = (
        "resource",
        "created",
        "expires",
        "good_until",
        "probe",
        "probe_after",
        "last_used",
        "uses",
        "taken_at",
        "holder",
        "flagged",
        "key",
        "taker",
        "sock",
        "reclaim",
        "ref",
        "owner",
        "owner_used",
        "__weakref__",
    )

    def __init__(self, resource: T, now: float, expires: float, good_until: float) -> None:
        self.resource = resource
        self.created = now
        self.expires = expires  #: max_lifetime deadline (inf: none)
        #: idle past this, it is recycled on checkout: min(expires, last use + max_idle)
        self.good_until = good_until
        #: cheap liveness test made once for this resource (None: no test)
        self.probe: t.Callable[[], bool] | None = None
        #: before this, checkout skips the probe (given back less than liveness_after ago)
        self.probe_after = -math.inf
        self.last_used = now
        self.uses = 0
        #: when the current checkout began; -inf while idle and until the holder stamps it, once its
        #: checkout is complete (putconn sets it back): readers that do not own the entry skip it then
        self.taken_at = -math.inf
        self.holder: str | None = None
        #: the taken_at of the checkout reported as held longer than max_hold
        #: (compared, never reset: nothing to undo on return)
        self.flagged = -1.0
        self.key = id(resource)  #: key in Pool._out
        #: a weak reference to this entry, made once: what a thread's tally cell keeps of the last one it gave back
        self.ref = weakref.ref(self)
        #: the tally cell (`tally.Cell`) of the thread that keeps to it, the one that made it or adopted it;
        #: None if no thread does (made by the maintenance worker). Written only by a thread holding it.
        self.owner: t.Any = None
        #: when its owner last gave it back (or made it)
        self.owner_used = -math.inf
        #: who took it outside a request, as one tuple written in one store (a reader sees all of it or
        #: none): (thread, code, instruction offset) of the first caller outside flask_proxypool
        #: (`pool.where` makes "file:line" of it); None inside a request and once given back (the
        #: reclaim of dead threads reads it: a stale one would name a thread that ended)
        self.taker: tuple[threading.Thread, types.CodeType, int] | None = None
        #: (st_dev, st_ino) of its socket when it has one (`fileno()`), read once at creation: the
        #: max_hold reclaim shuts down that socket only, never one that reused the descriptor number
        self.sock: tuple[int, int] | None = None
        #: "" while normal; set under the pool lock once taken back from its holder by max_hold_action
        #: "reclaim": "severing" while its connection is cut, then "severed"; "returned" if the holder
        #: gave it back while it was being cut (then the cutting thread closes it)
        self.reclaim = ""


#: Seconds a thread keeps to its own resource after it last gave it back (see "Affinity" in `pool`).
KEEP = 1.0


def kept_by_another(entry: Entry[t.Any], cell: t.Any, now: float) -> bool:
    """Whether a live thread other than `cell`'s keeps to `entry`: it made or adopted it, it is still the one
    that thread prefers (a thread that made several keeps only its last), and it used it within `KEEP` seconds
    (a thread that warmed the pool at start-up and serves nothing lets go). See "Affinity" in `pool`."""
    owner = entry.owner
    return (
        owner is not None
        and owner is not cell
        and owner.alive
        and now - entry.owner_used < KEEP
        and owner.last() is entry
    )


class Checkout(t.NamedTuple):
    """One resource out of a pool (`Pool.checked_out`)."""

    resource: t.Any
    holder: str | None  #: who took it: the endpoint, or None outside a request
    held_for: float  #: seconds since it was taken
    thread: str | None = None  #: outside a request: the name of the thread that took it
    where: str | None = None  #: outside a request: "file:line" of the call that took it


#: What a waiter receives when a slot frees up but no resource comes with it:
#: the waiter must create one itself.
PERMIT: t.Final = object()
#: What a waiter receives when a resource went idle while it waited: it must
#: come and take it (someone may have been quicker; then it queues again, first).
LOOK: t.Final = object()


class Waiter:
    """One thread waiting for a resource, served in FIFO order.

    A pre-acquired lock is the cheapest blocking primitive: the pool releases
    it once the result is set. Not an Event, whose wait() takes the event's
    condition twice.
    """

    __slots__ = ("error", "ready", "result", "since")

    def __init__(self, since: float) -> None:
        self.since = since  #: when its caller started waiting (kept when it queues again)
        # Held from birth; released exactly once, by whoever sets result or
        # error (under the pool lock). The release orders those writes before
        # the waiter's reads.
        self.ready = threading.Lock()
        self.ready.acquire()
        self.result: object = None
        self.error: BaseException | None = None


def never() -> bool:
    """The checkout test of `liveness: "query"`: always take the slow path, where the check runs."""
    return False


def where(taker: tuple[threading.Thread, types.CodeType, int]) -> str:
    """ "file:line" of a recorded take (`Entry.taker`); "?" if the walk found no caller outside the package."""
    _, code, lasti = taker
    if lasti < 0:
        return "?"
    line = next((ln for start, stop, ln in code.co_lines() if start <= lasti < stop), None)
    return f"{code.co_filename}:{line if line is not None else code.co_firstlineno}"
