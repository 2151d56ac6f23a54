"""The pool's background work, as named tasks run by one worker thread per pool (psycopg_pool's model).

Each task receives the pool it works on and returns how long it may wait
before it is due again; the worker sleeps until the soonest (at most a
second), or until woken (a pool closed, or dropped). The worker holds the
pool only weakly, so an abandoned pool can be collected, and a task that
fails is logged and the others carry on. Tasks follow the pool's locking
rules (its module docstring): containers and counters only under
`pool._lock`; creating, checking and closing outside it.
"""

from __future__ import annotations

import logging
import math
import typing as t
import weakref

from ._deadline import DeadlineExceeded
from .entries import kept_by_another, where
from .masking import describe_exception

if t.TYPE_CHECKING:
    from .entries import Entry
    from .kinds.base import Kind
    from .pool import Pool

__all__ = [
    "TASKS",
    "Expire",
    "Fill",
    "HealthCheck",
    "MaintenanceTask",
    "ReclaimAbandoned",
    "ReportLongHeld",
    "close_abandoned",
    "run_worker",
]

logger = logging.getLogger("flask_proxypool")

#: The longest the worker sleeps between rounds, in seconds.
MAX_SLEEP = 1.0


class MaintenanceTask:
    """One named piece of background work on a pool."""

    name = "task"

    def run(self, pool: Pool[t.Any], now: float) -> float:
        """Do the work due at `now`; return the seconds until it may be due again."""
        raise NotImplementedError


class Fill(MaintenanceTask):
    """Keep `min_size` resources: create them one at a time, respecting the backoff after failures."""

    name = "fill"

    def run(self, pool: Pool[t.Any], now: float) -> float:
        while True:
            with pool._lock:
                if pool._closed or pool._size >= pool.min_size or now < pool._backoff_until:
                    short = pool._size < pool.min_size and pool._backoff_until > now
                    return pool._backoff_until - now if short else MAX_SLEEP
                pool._size += 1
            try:
                entry = pool._new_entry()  # gives the slot back if it raises
            except Exception:
                return MAX_SLEEP  # logged and backed off by the pool
            pool._place_or_discard(entry)
            now = pool._clock()


class Expire(MaintenanceTask):
    """Close idle resources past `max_lifetime`, or unused for `max_idle` (down to `min_size`)."""

    name = "expire"

    def run(self, pool: Pool[t.Any], now: float) -> float:
        stale: list[tuple[Entry[t.Any], str]] = []
        with pool._lock:
            if pool._closed:
                return MAX_SLEEP
            extra = pool._size - pool.min_size
            # Looked at in place and each stale one claimed, not drained and put back: a checkout meanwhile
            # would find nothing and take another thread's resource (see "Affinity" in pool.py).
            for e in pool._idle_in_place():  # least recently used first
                if now >= e.expires:
                    reason = "max_lifetime"
                elif extra > 0 and pool.max_idle and now - e.last_used >= pool.max_idle:
                    reason = "max_idle"
                else:
                    continue
                try:
                    pool._idle.remove(e)  # fails if a checkout took it meanwhile
                except ValueError:
                    continue
                stale.append((e, reason))
                if reason == "max_idle":
                    extra -= 1
        pool._close_entries(stale)
        return MAX_SLEEP


class HealthCheck(MaintenanceTask):
    """Every `health_check_interval`, a full check (bounded by `check_timeout`) of each idle resource, but those
    a live thread keeps to (used within `entries.KEEP`) and used within the interval: in steady use.

    Such a one proved itself in that use (and its checkout probe runs
    anyway): checking it would cost a round trip and a helper thread for
    nothing, and taking it out of the idle queue, even briefly, would send
    its thread's next checkout to another thread's resource (see
    "Affinity" in `pool`).
    """

    name = "health_check"

    def run(self, pool: Pool[t.Any], now: float) -> float:
        interval = pool.health_check_interval
        if not interval:
            return MAX_SLEEP
        due: list[Entry[t.Any]] = []
        with pool._lock:
            if pool._closed:
                return MAX_SLEEP
            if now < pool._next_health_check:
                return pool._next_health_check - now
            pool._next_health_check = now + interval
            for e in pool._idle_in_place():
                if now - e.last_used >= interval or not kept_by_another(e, None, now):
                    due.append(e)
        for e in due:
            try:
                pool._idle.remove(e)  # claimed; fails if a checkout took it meanwhile (that use checks it)
            except ValueError:
                continue
            try:
                pool._bounded_check(e.resource)
            except DeadlineExceeded as exc:
                logger.warning("pool %r: health check failed, discarding: %s", pool.name, describe_exception(exc))
                pool._abandon(e, was_out=False)
                continue
            except Exception as exc:
                logger.warning("pool %r: health check failed, discarding: %s", pool.name, describe_exception(exc))
                pool._close_entry(e, "health_check")
                continue
            except BaseException:
                # interrupted: this one may still be checked in its thread; the others were never taken out
                pool._abandon(e, was_out=False, reason="interrupted")
                raise
            pool._place_or_discard(e)
        return interval


class ReportLongHeld(MaintenanceTask):
    """Log (once per checkout) and count a resource held longer than `max_hold`, naming who holds it.

    With `max_hold_action="reclaim"` the resource is also taken back: its
    slot freed at once, its connection cut so the holder's next use fails
    (see "taking back" in `pool`).
    """

    name = "report_long_held"

    def run(self, pool: Pool[t.Any], now: float) -> float:
        if not pool.max_hold:
            return MAX_SLEEP
        reclaim = pool.max_hold_action == "reclaim"
        late: list[tuple[Entry[t.Any], str, float, bool]] = []
        with pool._lock:
            for e in pool._out.copy().values():  # copy: returns pop from _out without the lock
                # The holder stamps taken_at once its checkout is complete, after
                # the lock is released; until then it is -inf (set on return):
                # skip the entry this round. Claiming a checkout in progress
                # could free its slot twice (its checkout test may discard it).
                if e.taken_at == -math.inf:
                    continue
                if e.flagged != e.taken_at and now - e.taken_at > pool.max_hold:
                    e.flagged = e.taken_at
                    pool._long_held += 1
                    taken = reclaim and pool._claim_long_held(e)
                    late.append((e, _holder(e), now - e.taken_at, taken))
        for e, holder, age, taken in late:
            if not taken:
                logger.warning(
                    "pool %r: a %s resource has been held for %.1f sec (max_hold=%g) by %s",
                    pool.name,
                    pool.kind.name,
                    age,
                    pool.max_hold,
                    holder,
                )
                continue
            how = pool._sever(e)
            logger.warning(
                "pool %r: took back a %s resource held for %.1f sec (max_hold=%g, max_hold_action='reclaim') by %s: "
                "%s; its slot is free for others and the holder's next use of it fails",
                pool.name,
                pool.kind.name,
                age,
                pool.max_hold,
                holder,
                how,
            )
        return pool.max_hold / 2


def _holder(e: Entry[t.Any]) -> str:
    """Who holds an entry, for a log line: the endpoint, or the thread and the line that took it."""
    if e.holder is not None:
        return e.holder
    taker = e.taker
    if taker is None:
        return "code outside a request"
    return f"thread {taker[0].name!r} (taken at {where(taker)})"


class ReclaimAbandoned(MaintenanceTask):
    """Take back what a thread took outside a request and did not give back before it ended.

    Such a resource would stay out forever (the pool keeps it referenced, and
    so alive): it is rolled back and closed, counted (`reclaimed`, and
    `closed_by_reason["abandoned"]`), and logged once with the thread and
    the line that took it. Takes inside a request are not watched: teardown
    gives them back.
    """

    name = "reclaim_abandoned"

    def run(self, pool: Pool[t.Any], now: float) -> float:
        with pool._lock:
            if pool._closed:
                return MAX_SLEEP
            gone, ended = pool._claim_abandoned()
        for e in ended:  # taken back after max_hold; the holder's thread ended without giving it back
            pool._close_resource(e.resource)
        for e in gone:
            pool._reclaim_abandoned(e, now)
        return MAX_SLEEP


class WakeWaiters(MaintenanceTask):
    """A backstop for the lock-free return (see `pool`): wake waiters while something is idle.

    The return and a queueing caller each see the other by the order of their
    writes and reads; should a build ever reorder them, a waiter would sleep
    next to an idle resource until this round, not until its timeout.
    """

    name = "wake_waiters"

    def run(self, pool: Pool[t.Any], now: float) -> float:
        if pool._waiters and pool._idle:
            with pool._lock:
                pool._recheck_idle()
        return MAX_SLEEP


#: What the worker runs each round, in this order.
TASKS: tuple[MaintenanceTask, ...] = (
    WakeWaiters(),
    ReclaimAbandoned(),
    Fill(),
    Expire(),
    HealthCheck(),
    ReportLongHeld(),
)


def run_round(pool: Pool[t.Any]) -> float:
    """One round of every task; the seconds until the next one is due (at least 10 ms)."""
    waits = [MAX_SLEEP]
    for task in TASKS:
        if pool._closed:
            return 0.0
        try:
            waits.append(task.run(pool, pool._clock()))
        except Exception:
            logger.exception("pool %r: background task %r failed; carrying on", pool.name, task.name)
    return max(min(waits), 0.01)


def run_worker(ref: weakref.ref[Pool[t.Any]]) -> None:
    """The worker thread's loop; it holds the pool only weakly, so an abandoned pool can be collected."""
    while True:
        pool = ref()
        if pool is None or pool._closed:
            return
        wake = pool._wake
        delay = run_round(pool)
        del pool
        if wake.wait(delay):
            wake.clear()


def close_abandoned(kind: Kind[t.Any], box: list[t.Any]) -> None:
    """Finalizer of a pool nobody references any more: close its idle resources, wake its worker."""
    idle, wake = box
    while idle:
        try:
            kind.close(idle.pop().resource)
        except Exception:
            pass  # at collection time there is nobody to tell
    wake.set()
