"""The lock-free paths' bookkeeping: per-thread counters (`flask_proxypool.tally`) and the waiter backstop.

Checkouts of idle resources and returns while nobody waits take no lock; they count in a cell of
the calling thread. These tests check that nothing is lost or counted twice when threads end, that
a counter never goes down while threads come and go, and that a waiter sleeping next to an idle
resource (a return whose test missed it) is woken by the maintenance worker, not left to time out.
"""

from __future__ import annotations

import threading
import time
import typing as t
from collections.abc import Iterator

import pytest
from conftest import wait_until

from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.pool import Pool
from flask_proxypool.tally import THREAD_WINDOW, Tally


class _Thing:
    """A resource that can be referenced weakly."""


@pytest.fixture
def pool() -> Iterator[Pool[t.Any]]:
    p: Pool[t.Any] = Pool(FactoryKind(object), max_size=4, liveness="none")
    yield p
    p.close(timeout=1.0)


def _churn(pool: Pool[t.Any], n: int) -> None:
    for _ in range(n):
        pool.putconn(pool.getconn())


def test_checkouts_and_hold_time_of_ended_threads_are_kept(pool: Pool[t.Any]) -> None:
    """6 threads x 50: counted while they live and after they end (their cells folded into the pool's sums)."""
    done = threading.Barrier(7)
    go_on = threading.Event()

    def work() -> None:
        _churn(pool, 50)
        done.wait(10)
        go_on.wait(10)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for th in threads:
        th.start()
    done.wait(10)
    alive = pool.stats()
    assert alive.checkouts == 300
    assert len(pool._tally._cells) == 6
    go_on.set()
    for th in threads:
        th.join(10)
    assert wait_until(lambda: not pool._tally._cells, timeout=10.0), "the ended threads' cells were never folded"
    after = pool.stats()
    assert after.checkouts == 300
    assert after.hold_time_total == pytest.approx(alive.hold_time_total)
    assert after.hold_time_total > 0


def test_hold_window_keeps_the_last_returns_of_each_thread(pool: Pool[t.Any]) -> None:
    _churn(pool, THREAD_WINDOW + 40)
    s = pool.stats()
    assert s.checkouts == THREAD_WINDOW + 40
    assert sum(h["count"] for h in s.top_holders) == THREAD_WINDOW


def test_counters_never_go_down_while_threads_come_and_go(pool: Pool[t.Any]) -> None:
    """A reader sees checkouts only grow while 4 threads at a time churn and end, 40 in all."""
    seen: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(pool.stats().checkouts)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(10):
            batch = [threading.Thread(target=_churn, args=(pool, 200)) for _ in range(4)]
            for th in batch:
                th.start()
            for th in batch:
                th.join(10)
    finally:
        stop.set()
        reader.join(10)
    assert len(seen) > 10
    assert all(a <= b for a, b in zip(seen, seen[1:], strict=False)), "a counter went down"
    assert pool.stats().checkouts == 40 * 200


def test_an_ended_threads_cell_is_folded_and_counted_once() -> None:
    """The cell of a thread that ended is folded into the sums (and leaves the list of cells), so it counts once,
    next to a live thread's cell, which is its own."""
    tally = Tally()
    cells = []

    def bump() -> None:
        c = tally.cell()
        c.checkouts += 7
        cells.append(c)

    th = threading.Thread(target=bump)
    th.start()
    th.join(10)
    assert wait_until(lambda: not tally._cells, timeout=10.0)
    assert tally.read()[0] == 7
    # and a live thread's cell is its own: the main thread's is another
    tally.cell().checkouts += 1
    assert tally.cell() is not cells[0]
    assert tally.read()[0] == 8


def test_a_waiter_next_to_an_idle_resource_is_woken_by_the_worker() -> None:
    """A return that appended without seeing the waiter (as if its test were reordered): the worker's backstop
    wakes the waiter within about a second, far inside its 8 s timeout."""
    small: Pool[t.Any] = Pool(FactoryKind(object), max_size=1, liveness="none", timeout=8.0)
    try:
        held = small.getconn()
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(small.getconn()))
        waiter.start()
        assert wait_until(lambda: len(small._waiters) == 1, timeout=10.0)
        # the lock-free return's steps, without its test of the waiters
        entry = small._out.pop(id(held))
        entry.taken_at = float("-inf")
        small._idle.append(entry)
        start = time.monotonic()
        waiter.join(6.0)
        assert got == [held], "the waiter was not woken while a resource sat idle"
        assert time.monotonic() - start < 3.0
        small.putconn(held)
    finally:
        small.close(timeout=1.0)


def test_a_dropped_pool_leaves_nothing_in_a_thread_that_lives_on() -> None:
    """The per-thread cells die with their pool, even in a thread that goes on (the finalizer that folds a
    cell holds the pool's tally weakly), and a cell never keeps a resource alive."""
    import gc
    import weakref

    p: Pool[t.Any] = Pool(FactoryKind(_Thing), max_size=2, liveness="none")
    _churn(p, 10)
    r = p.getconn()
    p.putconn(r)
    tally, resource = weakref.ref(p._tally), weakref.ref(r)
    p.close(timeout=1.0)
    del p, r
    assert wait_until(lambda: gc.collect() >= 0 and tally() is None and resource() is None, timeout=10.0)
