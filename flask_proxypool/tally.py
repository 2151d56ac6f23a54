"""Per-thread counters for the pool's lock-free paths: each thread writes only its own.

Why not counters on the pool: on free-threaded Python an `int` or `float`
attribute that every thread bumps is a new object per bump, made by one
thread and freed by another, so each bump also queues a reference-count
merge to the thread that made the old one (measured: about 5% of the CPU of
8 threads taking and returning resources), and the attribute's cache line
moves between CPUs. Here each thread writes a `Cell` that it made and only
it writes, found through a `threading.local` (one lookup, about 50 ns).

Readers (`Tally.read`) sum the cells of live threads and what the cells of
ended threads left behind (folded in when the thread's local is released).
A reader may miss a bump in flight, never count one twice; each cell only
grows, so a counter read later is never smaller.
"""

from __future__ import annotations

import math
import threading
import typing as t
import weakref

__all__ = ["NOTHING", "RING", "THREAD_WINDOW", "Cell", "Tally"]

#: Returns kept per thread for the hold percentiles and top holders (a power of two).
THREAD_WINDOW = 256
#: `Cell.i`'s mask: the ring's next place is ``(i + 1) & RING``.
RING = THREAD_WINDOW - 1


class Cell:
    """One thread's counters, its window of recent holds, and the resource it prefers; written only by that
    thread."""

    __slots__ = ("alive", "checkouts", "hold_total", "holds", "holders", "i", "last", "pinned")

    def __init__(self) -> None:
        self.checkouts = 0
        self.hold_total = 0.0
        #: the last THREAD_WINDOW holds and their holders, a ring: a return writes its hold and holder at `i`,
        #: then ``i = (i + 1) & RING``, and adds its hold to `hold_total` (`Pool.putconn`, its one writer,
        #: inline). NaN: a place not written yet
        self.holds: list[float] = [math.nan] * THREAD_WINDOW
        self.holders: list[str | None] = [None] * THREAD_WINDOW
        self.i = 0
        #: a weak reference to what this thread gave back last (the pool's `Entry`): its next checkout
        #: takes that one first if it is still idle. Weak: a cell never keeps a closed resource alive.
        self.last: t.Callable[[], t.Any] = NOTHING
        #: `last` is this thread's own (it made or adopted it): kept until that one is closed, whatever the
        #: thread used since
        self.pinned = False
        #: False once the thread ended: what it owned is anyone's to adopt
        self.alive = True


def NOTHING() -> None:  # noqa: N802 (a constant that is called)
    """`Cell.last` before the thread gave anything back: a dead reference."""
    return None


class _Owner:
    """Kept in the thread's local next to its cell: freed when the thread ends, which folds the cell."""

    __slots__ = ("__weakref__",)


class Tally:
    """The cells of one pool: `cell()` for the calling thread, `read()` for everyone's sums."""

    def __init__(self) -> None:
        #: per thread: ``local.cell``, the thread's `Cell` once `cell()` made it (hot paths read it inline)
        self.local = threading.local()
        self._lock = threading.Lock()  # guards _cells and the folded sums; never taken by a thread's own bump
        self._cells: list[Cell] = []
        self._checkouts = 0
        self._hold_total = 0.0

    def cell(self) -> Cell:
        """The calling thread's cell (made on its first call)."""
        try:
            return self.local.cell  # type: ignore[no-any-return]  # (no t.cast: a call, on every checkout)
        except AttributeError:
            return self._new_cell()

    def _new_cell(self) -> Cell:
        c = Cell()
        owner = _Owner()
        with self._lock:
            self._cells.append(c)
        # The local holds the only strong reference to `owner`: when the thread ends, its locals go,
        # and the finalizer folds the cell's sums in (its window goes: those holds are history).
        # Weakly: a finalizer holding the tally would keep it (and so each thread's cell) alive as long as
        # the thread, after its pool is gone.
        weakref.finalize(owner, _fold, weakref.ref(self), c).atexit = False
        self.local.owner = owner
        self.local.cell = c
        return c

    def fold(self, c: Cell) -> None:
        """A thread ended: keep its sums, drop its cell."""
        with self._lock:
            self._checkouts += c.checkouts
            self._hold_total += c.hold_total
            self._cells.remove(c)

    def read(self) -> tuple[int, float, list[tuple[float, str | None]]]:
        """(checkouts, total hold time, [(hold, holder)] of each live thread's window)."""
        with self._lock:
            checkouts, hold_total = self._checkouts, self._hold_total
            cells = list(self._cells)
        pairs: list[tuple[float, str | None]] = []
        for c in cells:
            checkouts += c.checkouts
            hold_total += c.hold_total
            # a return in flight may have written its hold and not yet its holder (that pair names the holder
            # of the return THREAD_WINDOW earlier: stats, not accounts); NaN: a place not written yet
            pairs.extend((h, who) for h, who in zip(c.holds[:], c.holders[:], strict=True) if h == h)
        return checkouts, hold_total, pairs


def _fold(ref: weakref.ref[Tally], c: Cell) -> None:
    c.alive = False
    tally = ref()
    if tally is not None:
        tally.fold(c)
