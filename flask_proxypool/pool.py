"""A small, fair, thread-safe resource pool: the hand-off core. No Flask here: usable on its own.

Why this module is long: checkout, waiting, creation and return share one
lock, the lock-free protocol and the invariants below, and every path must
hand back what it holds if interrupted; split further, each half would reach
into the other's state.
What does not share them lives elsewhere: the records (`entries`), the
background tasks (`maintenance`), who took a resource and how to cut it off
(`holders`), the stats windows (`stats`), the
deadline thread (`_deadline`) and the fork registry (`_fork`).

Thread safety comes from explicit locks, never from the GIL: the same code is
correct on free-threaded Python. The rules, which every method below follows:

* `Pool._lock` guards every mutable container and counter of the pool
  (`_waiters`, `_size`, the counters and the waits window, `_closed`, the
  backoff state) except `_idle` and `_out`, which the lock-free paths
  below also change, and the per-thread `tally`. Invariants, true whenever
  the lock is free and no lock-free path is halfway: `_size` = idle +
  checked out + being created or checked by the worker <= `max_size`;
  waiters are queued only while nothing is idle; `_idle` is empty once
  `_closed`. Nothing slow runs under it: resources are created, checked,
  reset and closed outside it.
* The lock-free paths: the checkout of an idle resource and the return of
  one while nobody waits take no lock. Why: with several threads, a lock
  taken twice per request was the pool's whole cost (on 3.11 a lock convoy
  behind the GIL, 9x the CPU per checkout with 8 threads; on 3.13t CPUs
  spinning on it). They rely on `deque.pop`/`popleft`/`append` and
  `dict` item set/pop being atomic on every CPython build (the
  free-threaded build locks each deque and dict): so every take from
  `_idle`, with or without the lock, is one pop that may find nothing
  (`_pop_idle`), and nothing copies `_idle` then clears it (`_drain_idle`).
  A return appends to `_idle`, then tests `_waiters` and `_closed`; a
  caller queues under the lock, then tests `_idle` (`_recheck_idle`);
  `close` sets `_closed` under the lock, then drains `_idle`. Each side
  writes then reads, each operation a sequentially consistent atomic one,
  so at least one of the two sees the other, and that one wakes a waiter
  or closes the resource, under the lock (`_settle`). The maintenance
  worker also wakes waiters for idle resources each round, as a backstop.
  What is lost: a checkout racing `close` may still get a resource, closed
  when it comes back.
* Affinity: a checkout first tries its thread's own entry (a weak
  reference in the thread's tally cell: the one it made, or adopted),
  claimed by one atomic `deque.remove` that fails if it is not idle.
  A thread that made a resource prefers that one for as long as it lives,
  even after it used another meanwhile (its own was being checked, or
  out). And a thread's first checkout inside a request (`holder` given)
  makes a new resource while the pool has room, rather than take one
  another thread made. Why: on free-threaded Python, a connection's objects are
  cheaper to use from the thread that made them (their reference counts
  stay that thread's; others' are atomic, and objects one thread made and
  another frees are handed back to the first): measured on 3.13t with 8
  threads and a query per checkout, connections handed round cost about
  1.3-1.4x the client CPU of one connection per thread, and one made by
  another thread still about 1.1x. With as many resources as request
  threads (gunicorn gthread), each thread keeps to one it made. Outside
  requests (CLI commands, helper threads) nothing is made early: those
  threads are often short-lived.
  Each entry records its owner (`Entry.owner`, the tally cell of the
  thread that keeps to it) and when the owner last gave it back. A live
  thread keeps to its own while it is still its preference and it used it
  within `KEEP` seconds (a thread that warmed the pool at start-up and
  serves nothing lets go of it). A thread whose own is not idle takes
  first one that no live thread keeps to (made by the maintenance worker,
  by a thread that ended, or let go), else any; it adopts one nobody keeps
  to, and never keeps to another's: two threads that both preferred one resource
  traded it back and forth, and each trade costs both (measured: 7% of
  checkouts on another thread's connection, from one connection made by a
  helper thread that ended, cost gunicorn 2x4 on 3.13t about 10% more CPU
  per request).
* An `Entry` has one owner at a time: the pool while it is idle, else its
  holder, who alone writes its fields. Ownership changes by an atomic
  operation (idle pop/append, `_out` set, or under `_lock` a hand-over to
  a waiter), which orders the holder's writes before the next owner's
  reads. Readers of an entry they do not own: the max_hold report reads under
  `_lock` and tolerates a holder's write in flight (see
  `maintenance.ReportLongHeld`); the affinity test (`kept_by_another`) reads
  `owner` and `owner_used` without it: a stale read only makes one checkout
  prefer or skip a resource.
* `Pool._out` maps `id(resource)` to its entry for every resource checked
  out. Entries go in by one item set (under `_lock`, except on the
  lock-free checkout); a return claims its entry with one
  `dict.pop`, which is atomic on every CPython build (the free-threaded
  build guards each dict with its own lock), so exactly one of two racing
  returns of the same resource wins, and the loser is refused.
* The pool may take an entry back from its holder (its taking thread ended,
  or `max_hold_action="reclaim"`): the worker claims it with the same
  `_out` pop under `_lock`, only once the holder has stamped `taken_at`
  (a checkout in progress is never claimed: its test may still discard
  it). One taken back from a live holder waits in `_reclaimed`, outside
  `_size`, and is closed only by a thread not using it (see "taking back").
* A `Waiter` is handed a result only under `_lock` and only while it is
  still queued; a waiter that times out or is interrupted removes itself
  under `_lock`, or gives back what it was handed meanwhile (`_leave`),
  so nothing stays with a waiter that has gone.
* Bounded barging: a resource given back while callers wait goes straight to
  the oldest one once it has waited `fifo_after`; before that it is made
  idle and the oldest waiter is woken to come and take it (`LOOK`), so the
  thread that gave it back may take it again first (no thread switch per
  checkout). Woken waiters leave the queue and are counted in `_wakened`;
  one that finds nothing goes back to the head of the queue. The invariant,
  true whenever `_lock` is free and no lock-free return is between its append and its test:
  `_wakened >= min(len(_idle), len(_waiters))`,
  so no waiter sleeps while a resource it could take sits idle.
* No exception on checkout loses a slot. Whatever a caller was handed and
  has not passed on (its queued `Waiter`, a `LOOK` wake, a `PERMIT`
  slot, an entry taken for it: `owed` in `_getconn_slow`) is given back
  whole if anything raises before `getconn` returns, BaseException
  included (KeyboardInterrupt, a gevent Timeout): `_give_back_locked`
  undoes each under `_lock` and passes it on to the next waiter. A
  resource whose checkout test was cut short is in an unknown state: it is
  closed and its slot freed (reason `interrupted`); so is one made by an
  interrupted create. Covered: every call that can raise (lock acquires,
  the clock, the kind's hooks, a check thread's join); not an asynchronous
  exception landing between two bytecodes of the pool's own bookkeeping.
  Every duration is refused unless finite and at most `MAX_SECONDS`, so no
  lock wait can overflow.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import math
import random
import sys
import threading
import time
import typing as t
import weakref

from ._deadline import DeadlineExceeded, run_with_deadline
from ._fork import Registry
from .errors import AuthenticationFailed, ConnectFailed, PoolClosed, PoolTimeout, TooManyWaiting, UsageError
from . import maintenance
from .entries import LOOK, PERMIT, Checkout, Entry, Waiter, kept_by_another, never, where
from .holders import record_taker, shutdown_socket, socket_id
from .kinds.base import Kind
from .masking import describe_exception
from .stats import WINDOW, WINDOW_MASK, PoolStats, percentile, top_holders
from .tally import RING, Cell, Tally

__all__ = ["Checkout", "Pool"]

T = t.TypeVar("T")

logger = logging.getLogger("flask_proxypool")

_counter = itertools.count(1)

#: Resources a forked child inherited from its parent. They are kept referenced
#: forever so that garbage collection in the child never closes (and so
#: breaks) the parent's sockets.
_FORK_ORPHANS: list[object] = []

LIVENESS = ("poll", "query", "none")
#: What the worker does with a resource held longer than `max_hold`.
MAX_HOLD_ACTIONS = ("report", "reclaim")

#: `Entry.taken_at` of a resource not stamped by a holder (idle, or its checkout in progress).
_UNSTAMPED: t.Final = -math.inf

#: Ceiling of every duration, in seconds: one day. Far below ``threading.TIMEOUT_MAX``
#: (about 49 days on Windows, centuries elsewhere), so no wait can overflow a lock
#: acquire; and for each setting where more than a day would make sense, 0 means "never".
MAX_SECONDS = 86400.0
#: The Pool arguments that are durations in seconds (each 0 <= value <= MAX_SECONDS).
DURATIONS = (
    "timeout",
    "fifo_after",
    "max_lifetime",
    "max_idle",
    "liveness_after",
    "health_check_interval",
    "reconnect_delay",
    "reconnect_max_delay",
    "close_timeout",
    "check_timeout",
    "max_hold",
)


def _check_seconds(what: str, value: object) -> None:
    """Refuse a duration that is not a finite number of seconds from 0 to MAX_SECONDS (NaN included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"{what} must be a number of seconds from 0 to {MAX_SECONDS:g} (one day), got {value!r}")


class Pool(t.Generic[T]):
    """A pool of resources of one `Kind`.

    Resources are taken with `getconn` (or the `connection`
    context manager) and given back with `putconn`. When every
    resource is out, callers queue and are served first come, first served;
    one that waits longer than `timeout` gets `PoolTimeout`.

    Args:
        min_size: resources kept ready; filled in the background.
        max_size: resources alive at most, in use or idle.
        timeout: longest wait for a resource, in seconds.
        max_waiting: callers allowed to queue; more are refused at once
            with `TooManyWaiting`. 0 means no bound.
        max_use: close a resource after this many checkouts (0: never).
        max_lifetime: close a resource this many seconds after it was
            made (with up to 10% jitter, so they do not all go at once).
        max_idle: close a resource unused for this long, down to `min_size`.
        liveness: test on every checkout of an idle resource: `"poll"`
            (the kind's cheap test: for psycopg one non-blocking `poll()` of the
            socket, no round trip, with a full check only if the server sent
            something), `"query"` (the kind's full check, a round trip, bounded
            by `check_timeout`) or `"none"` (an explicit opt-out: no test, a
            connection that died while idle fails its next holder).
        liveness_after: skip the `poll` test for a resource given back
            less than this many seconds ago (10 ms by default, like PgBouncer's
            `server_check_delay`, 30 s there). Under the GIL the poll's system
            call lets another thread run: with 8 threads on 4 connections,
            testing every checkout measured 3.4x slower (77,600 against
            262,800 checkouts/s). A backend that dies within the window is
            handed out once, as one that dies while its request runs. 0: test
            every checkout. `"query"` ignores it: it checks every checkout.
        health_check_interval: seconds between full checks of idle
            resources by the background worker, but those in steady use by
            the thread that keeps to them (that use proves them; 0: never).
        on_return: `"rollback"` or `"commit"`: what `putconn`
            does with work left open when the holder did not fail.
        reconnect_delay: first wait after a failed create; doubles up to
            `reconnect_max_delay`. While it runs, callers that would create a
            resource get `ConnectFailed` at once instead of hammering a
            server that is down.
        close_timeout: how long `close` waits for resources still out.
        check_timeout: longest a full check (health check, `liveness="query"`)
            may take; a check that hangs longer discards the resource.
        max_hold: log (once) and count a resource held longer than this,
            with who took it (0: off).
        max_hold_action: `"report"` (log and count only) or `"reclaim"`:
            also take the resource back from its holder, its connection cut
            so the holder's next use fails, and its slot freed at once (see
            `_sever`). Needs `max_hold`.
        fifo_after: a caller queued this long gets the next resource given
            back, before anyone else. Until then a thread that gives a resource
            back and asks again at once may keep it (the oldest waiter is woken
            to compete for it), which saves a thread switch per checkout when
            every resource is busy. 0: strict first come, first served.
        lifo: hand out the most recently returned idle resource first, so
            that the others stay idle and `max_idle` closes them when load
            drops. The default hands out the least recently used one (like
            SQLAlchemy's QueuePool and psycopg_pool), which measured cheaper
            with many threads in one process (see docs/how-it-works.md).
            Either way, a thread first gets back the resource it gave back
            last, if that one is still idle (see "Affinity" above).

    Every duration is in seconds, finite, from 0 to `MAX_SECONDS` (a
    day); anything else raises `ValueError` naming the argument.
    """

    def __init__(
        self,
        kind: Kind[T],
        *,
        name: str | None = None,
        min_size: int = 0,
        max_size: int = 4,
        timeout: float = 10.0,
        max_waiting: int = 0,
        max_use: int = 0,
        max_lifetime: float = 3600.0,
        max_idle: float = 600.0,
        liveness: str = "poll",
        liveness_after: float = 0.01,
        health_check_interval: float = 60.0,
        on_return: str = "rollback",
        reconnect_delay: float = 0.1,
        reconnect_max_delay: float = 1.0,
        close_timeout: float = 5.0,
        check_timeout: float = 5.0,
        max_hold: float = 0.0,
        max_hold_action: str = "report",
        fifo_after: float = 0.0005,
        lifo: bool = False,
        clock: t.Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size!r}")
        if not 0 <= min_size <= max_size:
            raise ValueError(f"min_size must be between 0 and max_size ({max_size}), got {min_size!r}")
        if liveness not in LIVENESS:
            raise ValueError(f"liveness must be one of {LIVENESS}, got {liveness!r}")
        if fifo_after < 0:
            raise ValueError(f"fifo_after must be >= 0, got {fifo_after!r}")
        if on_return not in ("rollback", "commit"):
            raise ValueError(f"on_return must be 'rollback' or 'commit', got {on_return!r}")
        if max_hold_action not in MAX_HOLD_ACTIONS:
            raise ValueError(f"max_hold_action must be 'report' or 'reclaim', got {max_hold_action!r}")
        if max_hold_action == "reclaim" and not max_hold:
            raise ValueError("max_hold_action='reclaim' needs max_hold > 0: the seconds after which to take back")
        given = locals()
        for key in DURATIONS:
            _check_seconds(key, given[key])
        self.kind = kind
        self.name = name or f"pool-{next(_counter)}"
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.max_use = max_use
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.liveness = liveness
        self.liveness_after = liveness_after
        self.health_check_interval = health_check_interval
        self.on_return = on_return
        self.reconnect_delay = reconnect_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.close_timeout = close_timeout
        # precomputed for the hot paths: no branches on "0 means off" there
        self._max_use = max_use or sys.maxsize
        self._max_idle = max_idle or math.inf
        self._commit_on_return = on_return == "commit"
        # what putconn adds to a return's time to skip the checkout test: only the poll may be skipped
        self._probe_delay = liveness_after if liveness == "poll" else 0.0
        self._reset = kind.reset
        self.check_timeout = check_timeout
        self.max_hold = max_hold
        self.max_hold_action = max_hold_action
        self.fifo_after = fifo_after
        self.lifo = lifo
        self._clock = clock
        self._abandon_box: list[t.Any] = []
        self._init_state()
        # A pool dropped without close(): close what sits idle (psycopg would warn of connections
        # deleted while open) and wake the worker, which then finds the pool gone and stops.
        # Resources still out keep the pool alive through their holders, so none are missed.
        # Not at interpreter exit: it would close the idle resources of a live pool behind its back (its
        # `_size` still counting them), and the exit-time `close()` then waited its whole grace for them.
        # Live pools are closed at exit by `_close_at_exit` (apps' pools first, by `state.close_all`).
        weakref.finalize(self, maintenance.close_abandoned, self.kind, self._abandon_box).atexit = False
        _POOLS.add(self)

    def _init_state(self) -> None:
        """(Re)build every piece of mutable state: at creation and in a forked child."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified while closing
        self._idle: collections.deque[Entry[T]] = collections.deque()  # least recently used on the left
        self._take_idle = self._idle.pop if self.lifo else self._idle.popleft
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._wakened = 0  # waiters woken with LOOK that have not looked yet
        self._out: dict[int, Entry[T]] = {}
        # Taken back by max_hold_action "reclaim" while their holder may still use them: no longer
        # counted in _size, closed when the holder gives them back (or its thread is found ended).
        self._reclaimed: dict[int, Entry[T]] = {}
        # Reclaimed from threads that ended (closed by the pool), held weakly: an object that outlived its
        # thread (a `borrow` block's generator, collected later) may still give one back; that is quiet.
        self._abandoned: weakref.WeakValueDictionary[int, t.Any] = weakref.WeakValueDictionary()
        self._size = 0  # alive or being created, idle + out + in maintenance
        self._closed = False
        self._opened = False
        self._worker: threading.Thread | None = None
        self._wake = threading.Event()
        # What the finalizer (see __init__) closes: this state's idle deque and worker wake-up.
        self._abandon_box[:] = [self._idle, self._wake]
        # backoff after failed creates
        self._backoff_until = 0.0
        self._backoff = 0.0
        self._last_connect_error: str = ""
        self._closed_by_app_logged = False
        self._last_connect_auth = False  # the last failed create was a refused login
        self._next_health_check = 0.0
        # counters
        self._created = 0
        self._closed_count = 0
        self._closed_by: collections.Counter[str] = collections.Counter()
        self._checkouts = 0
        self._timeouts = 0
        self._refused = 0
        self._errors = 0
        self._connect_failures = 0
        self._wait_count = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        # The lock-free paths count in per-thread cells (checkouts, holds and their window): see `tally`.
        self._tally = Tally()
        self._cell = self._tally.cell
        self._cells = self._tally.local  # `cells.cell` is the calling thread's, once `_cell()` made it
        # Sliding window of the last WINDOW waits, for percentiles computed when stats are read.
        # NaN marks a slot not yet written.
        self._waits = [math.nan] * WINDOW
        self._wait_i = 0
        self._long_held = 0
        self._reclaimed_count = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.kind.name} {self.kind.describe()}>"

    # -- life cycle ---------------------------------------------------------

    def open(self) -> None:
        """Start the background worker (min_size fill, health checks, max_idle).

        Called by the first `getconn`; call it yourself to fill
        `min_size` early. Never blocks on creating resources.
        """
        with self._lock:
            if self._opened or self._closed:
                return
            self._opened = True
            self._next_health_check = self._clock() + self.health_check_interval
            worker = threading.Thread(
                target=maintenance.run_worker, args=(weakref.ref(self),), name=f"{self.name}-worker", daemon=True
            )
            # Started before it is published, both under the lock: close() only
            # ever sees a started worker, which it can join. (Starting a thread
            # is quick and happens once; its first step waits for this lock.)
            worker.start()
            self._worker = worker

    def close(self, timeout: float | None = None) -> None:
        """Close the pool: idle resources now, resources still out when they come back.

        Waits up to `timeout` (default `close_timeout`) for resources
        still out; those not back by then are closed when returned. Queued
        callers get `PoolClosed`.
        """
        if timeout is not None:
            _check_seconds(f"pool {self.name!r}: close timeout", timeout)
        grace = self.close_timeout if timeout is None else timeout
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = self._drain_idle()
            waiters = list(self._waiters)
            self._waiters.clear()
            for w in waiters:
                w.error = PoolClosed(f"the pool {self.name!r} was closed while waiting")
                w.ready.release()
        self._wake.set()
        self._close_entries([(entry, "pool_closed") for entry in idle])
        # Real time here, not the injectable clock: this is a wait, not an expiry.
        deadline = time.monotonic() + grace
        with self._lock:
            while self._size > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning(
                        "pool %r closed with %d resource(s) still out; they are closed when returned",
                        self.name,
                        len(self._out),
                    )
                    break
                self._changed.wait(left)
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(grace)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Pool[T]:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _after_fork_in_child(self) -> None:
        """Forget what the parent had, without closing it: those sockets are the parent's."""
        _FORK_ORPHANS.extend(e.resource for e in self._idle)
        _FORK_ORPHANS.extend(e.resource for e in self._out.values())
        _FORK_ORPHANS.extend(e.resource for e in self._reclaimed.values())
        was_open = self._opened
        self._init_state()
        if was_open:
            logger.debug("pool %r re-created in forked child %d", self.name, os.getpid())

    # -- checkout -----------------------------------------------------------

    def getconn(self, timeout: float | None = None, holder: str | None = None) -> T:
        """Take a resource, waiting up to `timeout` seconds (default: the pool's).

        Args:
            holder: who takes it (for logs and stats), e.g. the endpoint.

        Raises:
            PoolTimeout: nothing became free in time.
            TooManyWaiting: `max_waiting` callers are already queued.
            ConnectFailed: a new resource was needed and could not be made.
            PoolClosed: the pool is closed.
            ValueError: `timeout` is not a number of seconds from 0 to
                `MAX_SECONDS`.
        """
        if timeout is not None:
            _check_seconds(f"pool {self.name!r}: getconn timeout", timeout)
        # Fast path: an idle resource, no lock (see "The lock-free paths"), one clock read, one probe.
        # Calls are inlined here and in putconn where they were measured: free-threaded 3.13 does not
        # specialise, and a call to a Python function costs 600 machine instructions there before its
        # first line (callgrind), more with the lookups that reach it.
        try:
            cell: Cell = self._cells.cell
        except AttributeError:
            cell = self._cell()  # this thread's first call
        mine: Entry[T] | None = cell.last()  # its own, or the one it used last (see "Affinity")
        if not cell.pinned and holder is not None and self._size < self.max_size and not self._backoff:
            # a request thread without its own, and room: it makes one (see "Affinity")
            try:
                return self._getconn_slow(timeout, holder, own=True)
            except ConnectFailed:
                if not self._idle:
                    raise
                # the server refuses a new connection (max_connections?): one already made will do
        entry: Entry[T] | None
        if mine is not None:
            try:
                self._idle.remove(mine)  # _pop_idle's first step
                entry = mine
            except ValueError:
                entry = self._pop_idle()
        else:
            entry = self._pop_idle()
        if entry is not None:
            self._out[entry.key] = entry
            # From here until it is returned, ``entry`` is ours to give back if anything raises.
            try:
                cell.checkouts += 1  # before the clock: a give-back counts one less
                now = self._clock()
            except BaseException:
                self._give_back(entry)  # untouched: as good as it was
                raise
            probe = entry.probe
            probed = False  # a probe that said no is not asked again
            try:
                fresh = now < entry.good_until and (
                    now < entry.probe_after or probe is None or ((probed := True) and probe())
                )
            except Exception as e:
                logger.warning("pool %r: liveness poll failed: %s", self.name, describe_exception(e))
                fresh = False
            except BaseException:
                self._drop_interrupted(entry, checking=False)
                raise
            if fresh or self._usable(entry, now, probed=probed):  # _usable accounts for entry if it raises
                entry.taken_at = now
                entry.holder = holder
                if holder is None:  # outside a request: who and where, for the reclaim of dead threads
                    entry.taker = record_taker()
                return entry.resource
        return self._getconn_slow(timeout, holder)

    def _getconn_slow(self, timeout: float | None, holder: str | None, *, own: bool = False) -> T:
        """Wait, create, or retry after a discarded resource: everything but the fast path.

        `own`: a request thread without its own resource; create rather
        than take an idle one while the pool has room (see "Affinity").

        `owed` is what this caller holds that the pool must get back if
        anything raises before it returns: an `Entry` taken for it, a
        `PERMIT`, a `LOOK` not yet counted down. While queued, the
        waiter is `_wait`'s to clean up.
        """
        if not self._opened:
            self.open()
        clock = self._clock
        start = clock()
        deadline = start + (self.timeout if timeout is None else timeout)
        last = self._cell().last  # affinity here too: a thread that waited keeps to its own when it is back
        waiter: Waiter | None = None  # our place in the queue, kept when we queue again
        owed: object = None
        try:
            while True:
                # read before the lock: a clock that raises there would leave a taken entry unaccounted
                woken_at = clock() if waiter is not None else 0.0
                with self._lock:
                    if owed is LOOK:
                        self._wakened -= 1
                        owed = None
                    if self._closed:
                        raise PoolClosed(f"the pool {self.name!r} is closed")
                    taken = None if own and self._size < self.max_size else self._pop_idle(last())
                    if taken is not None:
                        owed = taken
                        self._checkouts += 1
                        self._out[taken.key] = taken
                    elif self._size < self.max_size:
                        if start < self._backoff_until:
                            raise self._connect_failed(start)
                        self._size += 1
                        owed = PERMIT
                    elif waiter is None:
                        if self.max_waiting and len(self._waiters) + self._wakened >= self.max_waiting:
                            self._refused += 1
                            raise TooManyWaiting(
                                f"the pool {self.name!r} has {len(self._waiters) + self._wakened} callers "
                                f"waiting (max_waiting={self.max_waiting}); refused at once",
                                pool=self.name,
                            )
                        waiter = Waiter(start)
                        self._waiters.append(waiter)
                        self._recheck_idle()
                    else:  # woken, but someone was quicker: first in line again
                        waiter.result = None
                        self._waiters.appendleft(waiter)
                        self._recheck_idle()
                    if waiter is not None and owed is not None:  # woken, and took or may create one
                        self._record_wait(woken_at - start)
                        waiter = None
                if waiter is not None:  # queued
                    owed = self._wait(waiter, deadline, start)
                    if owed is LOOK:
                        continue
                    self._record_wait_locked(clock() - start)
                    waiter = None  # served: a retry after a discarded resource queues anew
                if owed is PERMIT:
                    owed = None  # the slot is _create_for_caller's from here, whatever happens
                    return self._create_for_caller(holder)
                entry = t.cast("Entry[T]", owed)
                now = clock()
                owed = None  # _usable gives the entry back itself if it raises
                if self._usable(entry, now, probed=False):
                    entry.taken_at = now
                    entry.holder = holder
                    if holder is None:
                        entry.taker = record_taker()
                    return entry.resource
                # discarded; the loop tries again with the same deadline
        except BaseException:
            self._give_back(owed)
            raise

    def _wait(self, waiter: Waiter, deadline: float, start: float) -> object:
        """Block until `waiter` is served or woken, or the deadline passes.

        If anything raises meanwhile (the acquire itself: a KeyboardInterrupt,
        a gevent Timeout), the waiter leaves the queue, or gives back what it
        was handed in the meantime, before the exception goes on.
        """
        try:
            left = deadline - self._clock()
            served = waiter.ready.acquire(timeout=max(left, 0.0))
        except BaseException:
            self._leave(waiter)
            raise
        if not served:
            with self._lock:
                # Served or woken between the timeout and now? Then that is ours.
                if waiter.result is None and waiter.error is None:
                    self._waiters.remove(waiter)
                    self._timeouts += 1
                    waited = self._clock() - start
                    raise PoolTimeout(
                        f"couldn't get a resource from pool {self.name!r} after {waited:.2f} sec "
                        f"(max_size={self.max_size}, {len(self._out)} in use, "
                        f"{len(self._waiters) + self._wakened} waiting)",
                        pool=self.name,
                    ) from None
            # released by whoever served us, so this returns at once: held again, as a queued waiter's is
            try:
                waiter.ready.acquire()
            except BaseException:
                self._leave(waiter)
                raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    def _leave(self, waiter: Waiter) -> None:
        """A waiter interrupted: out of the queue, or what it was handed meanwhile goes back."""
        with self._lock:
            if waiter.result is None and waiter.error is None:  # still queued
                self._waiters.remove(waiter)
                return
            owed, waiter.result = waiter.result, None  # None when it was handed an error
            drop = self._give_back_locked(owed)
        if drop is not None:
            self._discard(drop, "pool_closed", was_out=True, handed=False)

    def _give_back(self, owed: object) -> None:
        """Give back what an interrupted checkout holds (an entry, PERMIT, LOOK or None)."""
        if owed is None:
            return
        with self._lock:
            drop = self._give_back_locked(owed)
        if drop is not None:
            self._discard(drop, "pool_closed", was_out=True, handed=False)

    def _give_back_locked(self, owed: object) -> Entry[T] | None:
        """Under the lock: undo what handing `owed` to a caller did, and pass it on.

        Returns an entry to discard outside the lock (the pool closed meanwhile).
        No clock is read: it may be what raised.
        """
        if owed is LOOK:
            self._wakened -= 1
            if self._waiters and self._wakened < len(self._idle):
                self._wake_waiters()  # the wake we drop was someone's way to an idle resource
        elif owed is PERMIT:
            self._size -= 1
            self._pass_slot()
        elif owed is not None:
            entry = t.cast("Entry[T]", owed)
            if self._out.get(entry.key) is not entry:
                return None  # already given back or discarded
            if self._closed:
                self._out.pop(entry.key)
                return entry
            del self._out[entry.key]
            self._checkouts -= 1  # never handed out
            # math.inf: the oldest waiter, if any, gets it at once
            self._place(entry, math.inf, was_out=True)
        return None

    def _drop_interrupted(self, entry: Entry[T], *, checking: bool) -> None:
        """The checkout test of `entry` was cut short: its state is unknown, so close it and free its slot.

        `checking`: a bounded check may still be running on it in its
        thread, so it is closed in the background (as a hung check is).
        """
        if self._out.pop(entry.key, None) is not entry:
            return
        if checking:
            self._abandon(entry, was_out=True, handed=False, reason="interrupted")
        else:
            self._discard(entry, "interrupted", was_out=True, handed=False)

    def _record_wait_locked(self, waited: float) -> None:
        with self._lock:
            self._record_wait(waited)

    def _record_wait(self, waited: float) -> None:
        """Under the lock: one caller's wait, from its first try to being served."""
        self._wait_count += 1
        self._wait_total += waited
        self._wait_max = max(self._wait_max, waited)
        self._waits[self._wait_i] = waited
        self._wait_i = (self._wait_i + 1) & WINDOW_MASK

    def _wake_waiters(self) -> None:
        """Under the lock: wake waiters (oldest first) until each idle resource has one coming."""
        ws = self._waiters
        while ws and self._wakened < len(self._idle):
            w = ws.popleft()
            w.result = LOOK
            self._wakened += 1
            w.ready.release()

    def _usable(self, entry: Entry[T], now: float, *, probed: bool) -> bool:
        """Recycle or liveness-check an idle resource just taken; False if discarded.

        `probed`: the checkout's poll already said no; it is not asked again
        (a second answer could hand out a resource that just failed). If the
        test itself is interrupted (a BaseException), the resource is dropped,
        its slot freed, and the exception goes on.
        """
        reason = None
        if now >= entry.expires:
            reason = "max_lifetime"
        elif now - entry.last_used >= self._max_idle:
            reason = "max_idle"
        elif probed and self.liveness == "poll":
            reason = "broken"
        elif self.liveness == "poll":
            try:
                if entry.probe is not None and not entry.probe():
                    reason = "broken"
            except Exception as e:
                logger.warning("pool %r: liveness poll failed: %s", self.name, describe_exception(e))
                reason = "broken"
            except BaseException:
                self._drop_interrupted(entry, checking=False)
                raise
        elif self.liveness == "query":
            try:
                self._bounded_check(entry.resource)
            except DeadlineExceeded as e:
                logger.warning("pool %r: checkout check failed: %s", self.name, describe_exception(e))
                self._out.pop(id(entry.resource), None)
                self._abandon(entry, was_out=True, handed=False)
                return False
            except Exception as e:
                logger.warning("pool %r: checkout check failed: %s", self.name, describe_exception(e))
                reason = "broken"
            except BaseException:
                self._drop_interrupted(entry, checking=True)
                raise
        if reason is None:
            return True
        if reason == "broken":
            logger.warning("pool %r: discarding a broken %s resource", self.name, self.kind.name)
        self._out.pop(id(entry.resource), None)
        self._discard(entry, reason, was_out=True, handed=False)
        return False

    def _connect_failed(self, now: float) -> ConnectFailed:
        """The error for a caller that needed a new resource while creates fail (under the lock)."""
        left = max(self._backoff_until - now, 0.0)
        if self._last_connect_auth:
            return AuthenticationFailed(
                f"pool {self.name!r} cannot log in to {self.kind.describe()}: authentication failed, check the "
                f"user and password: {self._last_connect_error} (next attempt in {left:.2f} sec)",
                pool=self.name,
            )
        return ConnectFailed(
            f"pool {self.name!r} cannot create a {self.kind.name} resource for {self.kind.describe()}: "
            f"{self._last_connect_error} (next attempt in {left:.2f} sec)",
            pool=self.name,
        )

    def _new_entry(self) -> Entry[T]:
        """Create a resource (outside the lock) for a slot already reserved in `_size`.

        The slot is given back if this raises, whatever the exception: a
        failed create backs off; an interrupted one (KeyboardInterrupt, a
        gevent Timeout) does not, it says nothing about the server.
        """
        made_before = -1
        try:
            # a create that succeeds meanwhile makes this one's failure stale (an int read: atomic, no lock)
            made_before = self._created
            resource = self.kind.create()
        except Exception as e:
            self._create_failed(e, made_before)
            raise
        except BaseException:
            with self._lock:
                self._size -= 1
                self._pass_slot()
            raise
        try:
            now = self._clock()
            expires = now + self.max_lifetime * random.uniform(0.9, 1.0) if self.max_lifetime else math.inf
            entry = Entry(resource, now, expires, min(expires, now + self._max_idle))
            entry.probe = self._make_probe(resource)
            entry.sock = socket_id(resource)
        except Exception as e:  # made, but its probe cannot be built: as good as a failed create
            try:
                self._close_resource(resource)
            finally:
                self._create_failed(e, made_before)
            raise
        except BaseException:  # made, then interrupted: close it, free the slot
            try:
                self._close_resource(resource)
            finally:
                with self._lock:
                    self._created += 1
                    self._free_slot("interrupted", was_out=False, handed=True)
            raise
        with self._lock:
            self._created += 1
            self._backoff = 0.0
            self._backoff_until = 0.0
        return entry

    def _make_probe(self, resource: T) -> t.Callable[[], bool] | None:
        """The checkout test for one resource, built once (a poller registered once, say)."""
        if self.liveness == "none":
            return None
        if self.liveness == "query":
            return never  # always take the slow path, where the bounded check runs
        prober = getattr(self.kind, "prober", None)
        if prober is not None:
            return t.cast("t.Callable[[], bool] | None", prober(resource))
        alive = self.kind.alive
        return lambda: alive(resource)

    def _create_for_caller(self, holder: str | None) -> T:
        """Create a resource for the caller in a slot reserved for it; the slot is freed if this raises."""
        try:
            entry = self._new_entry()  # gives the slot back if it raises
        except Exception as e:
            with self._lock:
                err = self._connect_failed(self._clock())
            raise err from e
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._checkouts += 1
                self._out[entry.key] = entry
        if closed:
            self._discard(entry, "pool_closed", was_out=False)
            raise PoolClosed(f"the pool {self.name!r} is closed")
        entry.taken_at = entry.created  # just now (no clock read that could raise here)
        cell = self._cell()  # made by this thread: the one it prefers while it lives (see "Affinity")
        cell.last, cell.pinned = entry.ref, True
        entry.owner, entry.owner_used = cell, entry.created
        entry.holder = holder
        if holder is None:
            entry.taker = record_taker()
        return entry.resource

    def _create_failed(self, exc: Exception, made_before: int) -> None:
        """Give back the reserved slot and back off; the next waiter may try itself.

        A failure is stale when another create succeeded while this one was
        trying (`_created` moved past `made_before`): in a failover, an
        attempt that began on the old primary fails after the new one took
        connections. It says nothing about the server now, so it does not
        back off: that would refuse the next callers for the delay.
        """
        msg = describe_exception(exc)
        auth = isinstance(exc, AuthenticationFailed)
        with self._lock:
            self._errors += 1
            self._connect_failures += 1
            stale = self._created != made_before
            if not stale:
                self._backoff = min(max(self._backoff * 2, self.reconnect_delay), self.reconnect_max_delay)
                self._backoff_until = self._clock() + self._backoff
            self._last_connect_error = msg
            self._last_connect_auth = auth
            self._size -= 1
            self._pass_slot()
            backoff = self._backoff
        if stale:
            logger.warning(
                "pool %r: creating a %s resource for %s failed: %s; not backing off: another create "
                "succeeded meanwhile",
                self.name,
                self.kind.name,
                self.kind.describe(),
                msg,
            )
            return
        if auth:  # a configuration problem, not an outage: say so
            logger.warning(
                "pool %r: authentication failed for %s: the server refused the user or password: %s; "
                "backing off %.2f sec",
                self.name,
                self.kind.describe(),
                msg,
                backoff,
            )
            return
        logger.warning(
            "pool %r: creating a %s resource for %s failed: %s; backing off %.2f sec",
            self.name,
            self.kind.name,
            self.kind.describe(),
            msg,
            backoff,
        )

    def _pass_slot(self) -> None:
        """Under the lock, after `_size` dropped: let the oldest waiter create one.

        While creates are backing off, that waiter fails at once with
        `ConnectFailed` instead (one waiter per freed slot; the others
        keep waiting for a resource to come back), so an outage gives fast
        errors rather than waits until `timeout`.
        """
        if self._waiters and not self._closed and self._size < self.max_size:
            w = self._waiters.popleft()
            now = self._clock()
            if now < self._backoff_until:
                w.error = self._connect_failed(now)
            else:
                self._size += 1
                w.result = PERMIT
            w.ready.release()
        if self._closed:
            self._changed.notify_all()

    # -- return -------------------------------------------------------------

    def putconn(self, resource: T, *, failed: bool = False) -> None:
        """Give a resource back, reset (rolled back, or committed by policy) first.

        Args:
            failed: the holder's work failed: never commit it.

        Raises:
            UsageError: the resource is not out of this pool (returned
                twice, or to the wrong pool). The pool is left untouched.
        """
        entry = self._out.pop(id(resource), None)
        if entry is None or entry.resource is not resource:
            if entry is not None:  # an id reused by another object: put it back
                self._out[id(resource)] = entry
            if self._taken_back(resource):
                return
            logger.warning(
                "pool %r: refused a resource that is not checked out from it "
                "(returned twice, or to the wrong pool): %r",
                self.name,
                type(resource).__name__,
            )
            raise UsageError(
                f"this {type(resource).__name__} is not checked out from pool {self.name!r}: "
                "it was returned twice or belongs to another pool; return each resource "
                "once, to the pool it came from"
            )
        if entry.taker is not None:  # cleared before it can be handed out again: it would name a thread that ended
            entry.taker = None
        # _clean, inlined (see getconn): commit by policy, reset, then whether to keep it.
        try:
            if self._commit_on_return and not failed:
                self._commit(entry)
            try:
                ok = self._reset(resource)
            except Exception as e:
                ok = False
                if not self._closed_by_holder(entry):
                    logger.warning("pool %r: reset on return failed, discarding: %s", self.name, describe_exception(e))
            now = self._clock()
        except BaseException:
            # interrupted (KeyboardInterrupt, a gevent Timeout) while cleaning: never reuse it, free its slot
            self._discard(entry, "interrupted", was_out=True)
            raise
        uses = entry.uses = entry.uses + 1
        reason: str | None = None
        if not ok:
            reason = "closed_by_app" if self._closed_by_holder(entry) else "broken"
        elif uses >= self._max_use:
            reason = "max_use"
        elif now >= entry.expires:
            reason = "max_lifetime"
        else:
            entry.last_used = now
            entry.probe_after = now + self._probe_delay
            idle_until = now + self._max_idle
            entry.good_until = idle_until if idle_until < entry.expires else entry.expires
        hold = now - entry.taken_at
        # Unstamped again before anyone else can take it: until its next holder stamps it, it is
        # skipped by the max_hold check (which must never claim a checkout still in progress: the
        # checkout test may yet discard it, and that would free its slot twice).
        entry.taken_at = _UNSTAMPED
        try:
            cell: Cell = self._cells.cell
        except AttributeError:
            cell = self._cell()  # a thread that never took from this pool returns a resource
        i = cell.i  # the hold window's ring (see `Cell.holds`)
        cell.holds[i] = hold
        cell.holders[i] = entry.holder
        cell.i = (i + 1) & RING
        cell.hold_total += hold
        if entry.owner is cell:
            entry.owner_used = now
        elif not cell.pinned or (own := cell.last()) is None or own.owner is not cell:
            # this thread has no own resource (or its own is gone, or another thread adopted it)
            if kept_by_another(entry, cell, now):  # preferred while idle, never kept: it may make its own
                cell.last, cell.pinned = entry.ref, False
            else:  # nobody else keeps to this one: adopt it (see "Affinity")
                entry.owner, entry.owner_used = cell, now
                cell.last, cell.pinned = entry.ref, True
        if reason is None:
            if not self._waiters and not self._closed:
                self._idle.append(entry)  # no lock: see "The lock-free paths"
                if self._waiters or self._closed:  # a caller queued, or close() ran, since the test above
                    self._settle()
                return
            with self._lock:
                if self._place(entry, now, was_out=True):
                    return
            reason = "pool_closed"
        self._discard(entry, reason, was_out=True)

    def _settle(self) -> None:
        """An append to `_idle` without the lock raced a caller queueing or `close`: put things right.

        Under the lock, a closed pool's idle resources are drained (and
        closed here), else waiters are woken for what is idle.
        """
        with self._lock:
            if self._closed:
                drop = self._drain_idle()
            else:
                drop = []
                self._recheck_idle()
        self._close_entries([(entry, "pool_closed") for entry in drop])

    def _recheck_idle(self) -> None:
        """Under the lock, after a caller queued: wake waiters for what is idle (appended without the lock)."""
        if self._waiters and self._wakened < len(self._idle):
            self._wake_waiters()

    def _pop_idle(self, mine: Entry[T] | None = None) -> Entry[T] | None:
        """`mine` if it is idle (the caller's own or last, see "Affinity"), else the next idle entry, else None:
        `_idle` may empty between a test and a pop (the fast path takes without the lock), so every take
        is a pop that may find nothing."""
        if mine is not None:
            try:
                self._idle.remove(mine)
                return mine
            except ValueError:
                pass
        # Not its own: one no other live thread keeps to, if any (see "Affinity"), in the pool's order.
        now = self._clock()
        for e in self._idle_in_place(newest_first=self.lifo):
            if not kept_by_another(e, None, now):
                try:
                    self._idle.remove(e)
                    return e
                except ValueError:
                    pass  # taken meanwhile
        try:
            return self._take_idle()
        except IndexError:
            return None

    def _idle_in_place(self, *, newest_first: bool = False) -> t.Iterator[Entry[T]]:
        """The idle entries, least recently used first (or last), each read by its index as the scan goes.

        For scans of `_idle` (the affinity choice, the maintenance tasks): checkouts take from it without
        the lock, and no copy of a deque is atomic on 3.13t (`deque.copy()` raised "deque mutated during
        iteration" under load). Whoever acts on an entry claims it with an atomic `_idle.remove`, which
        fails if a checkout took it meanwhile. When the entry just yielded has left its place (claimed by
        the caller, or taken), the scan reads that place again, so the next one is not skipped.
        """
        idle = self._idle
        i, step = (-1, -1) if newest_first else (0, 1)
        while True:
            try:
                e = idle[i]
            except IndexError:
                return
            yield e
            try:
                if idle[i] is e:  # still there: on to the next place
                    i += step
            except IndexError:
                return

    def _drain_idle(self) -> list[Entry[T]]:
        """Every idle entry, least recently used first, each taken by its own pop: a copy then a clear
        could hand one out twice (and no copy of a deque is atomic on 3.13t)."""
        taken = []
        pop = self._idle.popleft
        while True:
            try:
                taken.append(pop())
            except IndexError:
                return taken

    def _closed_by_holder(self, entry: Entry[T]) -> bool:
        """True if the holder closed the resource itself; logged once per pool, with the fix."""
        closed = getattr(self.kind, "closed", None)
        try:
            if closed is None or not closed(entry.resource):
                return False
        except Exception:
            return False
        with self._lock:
            first, self._closed_by_app_logged = not self._closed_by_app_logged, True
        if first:
            logger.warning(
                "pool %r: a %s resource came back closed by the code that held it (%s); a pooled "
                "resource must not be closed: end the work with commit() or rollback() instead (for psycopg, "
                "'with conn:' closes the connection: use 'with conn.transaction():'). Counted in "
                "stats().closed_by_reason['closed_by_app']; not logged again for this pool",
                self.name,
                self.kind.name,
                entry.holder or "code outside a request",
            )
        return True

    def _commit(self, entry: Entry[T]) -> None:
        try:
            self.kind.commit(entry.resource)
        except Exception as e:
            logger.warning("pool %r: commit on return failed, rolling back: %s", self.name, describe_exception(e))
            with self._lock:
                self._errors += 1

    def _place(self, entry: Entry[T], now: float, *, was_out: bool) -> bool:
        """Under the lock: hand `entry` to the oldest waiter if it waited `fifo_after`, else make it idle.

        An idle entry with callers waiting wakes the oldest to come and take
        it (see the module docstring: bounded barging). Returns False, leaving
        the entry to the caller to discard, when the pool is closed.
        """
        if self._closed:
            return False
        ws = self._waiters
        if ws and now - ws[0].since >= self.fifo_after:
            w = ws.popleft()
            self._checkouts += 1
            self._out[entry.key] = entry
            w.result = entry
            w.ready.release()
        else:
            self._idle.append(entry)
            if ws and self._wakened < len(self._idle):
                self._wake_waiters()
        return True

    def _place_or_discard(self, entry: Entry[T]) -> None:
        """Put a resource the pool held itself (filled, health-checked) where it belongs."""
        try:
            now = self._clock()
        except BaseException:
            self._place_all([entry])
            raise
        with self._lock:
            if self._place(entry, now, was_out=False):
                return
        self._discard(entry, "pool_closed", was_out=False)

    def _discard(self, entry: Entry[T], reason: str, *, was_out: bool, handed: bool = True) -> None:
        """Close a resource that left the pool's containers, and free its slot (even if closing raises).

        `handed=False`: it was taken for a caller but failed its checkout
        test, so that checkout did not happen.
        """
        try:
            self._close_resource(entry.resource)
        finally:
            with self._lock:
                self._free_slot(reason, was_out=was_out, handed=handed)

    def _free_slot(self, reason: str, *, was_out: bool, handed: bool) -> None:
        """Under the lock: account for a resource gone for `reason`, and pass its slot on."""
        if not handed:
            self._checkouts -= 1
        self._size -= 1
        self._closed_count += 1
        self._closed_by[reason] += 1
        if reason in ("broken", "health_check", "check_timeout"):
            self._errors += 1
        self._pass_slot()

    def _close_entry(self, entry: Entry[T], reason: str) -> None:
        self._discard(entry, reason, was_out=False)

    def _close_entries(self, entries: list[tuple[Entry[T], str]]) -> None:
        """Close resources the pool took out of `_idle`: every slot is freed, even if one close raises."""
        for i, (entry, reason) in enumerate(entries):
            try:
                self._close_entry(entry, reason)
            except BaseException:
                self._close_entries(entries[i + 1 :])
                raise

    def _place_all(self, entries: list[Entry[T]]) -> None:
        """Put back resources the pool took out of `_idle` itself and did not touch (no clock read:
        this runs while an exception unwinds, maybe the clock's own)."""
        with self._lock:
            closed = [(e, "pool_closed") for e in entries if not self._place(e, math.inf, was_out=False)]
        self._close_entries(closed)

    def _close_resource(self, resource: T) -> None:
        try:
            self.kind.close(resource)
        except Exception as e:
            logger.warning(
                "pool %r: closing a %s resource failed: %s", self.name, self.kind.name, describe_exception(e)
            )

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> t.Iterator[T]:
        """`with pool.connection() as conn:`: taken now, returned at block exit, even on error.

        With `on_return="commit"` the work is committed when the block exits
        normally (a failed commit raises here), rolled back otherwise. An
        error raised because the pool took the resource back (`max_hold_action`)
        gets a note saying so: the driver's own words blame the server.
        """
        resource = self.getconn(timeout)
        try:
            yield resource
        except BaseException as e:
            self._note_taken_back(resource, e)
            self.putconn(resource, failed=True)
            raise
        else:
            if self.on_return == "commit":
                try:
                    self.kind.commit(resource)
                except BaseException as e:
                    self._note_taken_back(resource, e)
                    self.putconn(resource, failed=True)
                    raise
            # failed=True: already committed above if the policy wanted it, never twice
            self.putconn(resource, failed=True)

    # -- maintenance (background worker) ------------------------------------

    def _bounded_check(self, resource: T) -> None:
        """The kind's full check, given at most `check_timeout` seconds.

        It runs in a helper thread so that a check stuck on a dead peer cannot
        stall the caller; `DeadlineExceeded` says the helper is still stuck.
        """
        try:
            run_with_deadline(lambda: self.kind.check(resource), self.check_timeout, f"{self.name}-check")
        except DeadlineExceeded:
            msg = f"check did not finish within check_timeout={self.check_timeout:g} sec"
            raise DeadlineExceeded(msg) from None

    def _abandon(self, entry: Entry[T], *, was_out: bool, handed: bool = True, reason: str = "check_timeout") -> None:
        """Free the slot of a resource stuck in a check now; close it in the background."""
        with self._lock:
            self._free_slot(reason, was_out=was_out, handed=handed)
        threading.Thread(
            target=self._close_resource, args=(entry.resource,), name=f"{self.name}-close", daemon=True
        ).start()

    # -- taking back (maintenance.ReclaimAbandoned, maintenance.ReportLongHeld) --
    #
    # Two ways a resource leaves its holder without a putconn:
    #
    # * Its taker, outside a request, is a thread that has ended (`entry.taker`).
    #   Nobody can use it any more (but see below), so the pool claims it from
    #   `_out` (the one atomic pop that also decides a racing putconn) and runs
    #   the kind's reset (a rollback) and close from the worker. It is closed,
    #   not reused: an object that outlived the thread (a cursor kept somewhere,
    #   a connection handed to another thread) would otherwise share it with the
    #   next holder. The reset is bounded by `check_timeout`.
    # * It is held past `max_hold` with `max_hold_action="reclaim"`: its holder
    #   may be using it right now, and closing a psycopg connection from another
    #   thread frees libpq's state under the holder's feet. So the worker never
    #   closes it. The invariant: a taken-back resource is closed only by a thread
    #   that is not using it while it is used: by its holder's own putconn (or
    #   teardown), by the worker once the holder's thread has ended, or by the
    #   worker when the holder gave it back while the connection was being cut.
    #   What the worker does instead: claim it from `_out` and park it in
    #   `_reclaimed` (under `_lock`), free its slot at once (the pool may make a
    #   new one: for a moment the server sees one more connection), then cut the
    #   connection without touching the holder's objects: the kind's `sever` if
    #   it has one, else a cancel request (psycopg's `cancel_safe`, made to be
    #   called from another thread; sqlite3's `interrupt`) and a shutdown of the
    #   socket through a duplicate of its descriptor (`shutdown_socket`). The
    #   server ends the session and rolls its work back; the holder's next use
    #   fails at once. Its later putconn finds the entry in `_reclaimed`, closes
    #   it and returns quietly: no slot is freed twice, no error is raised.

    def _taken_back(self, resource: T) -> bool:
        """putconn of a resource the pool took back: close it (or leave that to the cutting thread); True if so.

        Runs only when the resource was not found out of the pool, so it costs
        nothing on an ordinary return.
        """
        with self._lock:
            entry = self._reclaimed.get(id(resource))
            if entry is None or entry.resource is not resource:
                if self._abandoned.get(id(resource)) is not resource:
                    return False
                del self._abandoned[id(resource)]
                logger.debug(
                    "pool %r: a resource reclaimed from a thread that ended came back; closed already", self.name
                )
                return True
            del self._reclaimed[entry.key]
            if entry.reclaim == "severing":  # the worker is cutting it: it closes it when done
                entry.reclaim = "returned"
                return True
        logger.debug("pool %r: a resource taken back after max_hold came back from its holder; closed", self.name)
        self._close_resource(resource)
        return True

    def _note_taken_back(self, resource: T, exc: BaseException) -> None:
        """Add a note to `exc` if the pool took `resource` back: say why its connection is gone."""
        entry = self._reclaimed.get(id(resource))  # one dict read: atomic, no lock needed to look
        if entry is not None and entry.resource is resource:
            exc.add_note(
                f"flask_proxypool: pool {self.name!r} took this {self.kind.name} resource back: it was held longer "
                f"than max_hold={self.max_hold:g} sec (max_hold_action='reclaim'), so its connection was cut on "
                "purpose; give it back sooner, or raise max_hold"
            )

    def _claim_long_held(self, entry: Entry[T]) -> bool:
        """Under the lock: take `entry` back from its holder (max_hold reclaim) and free its slot; False if returned."""
        if self._out.pop(entry.key, None) is not entry:
            return False  # given back (or discarded) meanwhile: nothing to take
        entry.reclaim = "severing"
        self._reclaimed[entry.key] = entry
        self._reclaimed_count += 1
        self._free_slot("max_hold", was_out=True, handed=True)
        return True

    def _sever(self, entry: Entry[T]) -> str:
        """Cut the connection of a resource taken back from a holder that may be using it; says how.

        Never closes it and never frees what the holder's thread may be
        using (see the invariant above). If the holder gave it back
        meanwhile, it is closed here, once cut.
        """
        resource = entry.resource
        how: list[str] = []
        try:
            sever = getattr(self.kind, "sever", None)
            if sever is not None:
                sever(resource)
                how.append("severed by the kind")
            else:
                cancel = getattr(resource, "cancel_safe", None)
                interrupt = getattr(resource, "interrupt", None)
                if callable(cancel):
                    try:
                        cancel(timeout=self.check_timeout)
                        how.append("a cancel request sent")
                    except Exception as e:
                        logger.debug("pool %r: cancel before taking back failed: %s", self.name, e)
                elif callable(interrupt):
                    interrupt()
                    how.append("its statement interrupted")
                if entry.sock is not None and shutdown_socket(resource, entry.sock):
                    how.append("its connection shut down")
        except Exception as e:
            logger.warning("pool %r: cutting a resource taken back failed: %s", self.name, describe_exception(e))
        finally:
            with self._lock:
                returned = entry.reclaim == "returned"
                entry.reclaim = "severed"
            if returned:
                self._close_resource(resource)
        return ", ".join(how) or "not cut (the kind has no way to: it is closed when given back)"

    def _claim_abandoned(self) -> tuple[list[Entry[T]], list[Entry[T]]]:
        """Under the lock: resources out to threads that ended, and taken-back ones whose holder ended."""
        gone: list[Entry[T]] = []
        for e in self._out.copy().values():  # copy: returns pop from _out without the lock
            taker = e.taker
            if taker is not None and not taker[0].is_alive() and self._out.pop(e.key, None) is e:
                self._reclaimed_count += 1
                gone.append(e)
                with contextlib.suppress(TypeError):  # a resource that takes no weak reference: not remembered
                    self._abandoned[e.key] = e.resource
        ended: list[Entry[T]] = []
        for e in list(self._reclaimed.values()):
            taker = e.taker
            if e.reclaim == "severed" and taker is not None and not taker[0].is_alive():
                del self._reclaimed[e.key]
                ended.append(e)
        return gone, ended

    def _reclaim_abandoned(self, entry: Entry[T], now: float) -> None:
        """A resource whose taking thread ended: reset it (roll back) and close it, free its slot, log once."""
        taker = entry.taker
        entry.taker = None
        resource = entry.resource
        try:
            ok = run_with_deadline(lambda: self._reset(resource), self.check_timeout, f"{self.name}-reclaim")
            outcome = "rolled back and closed" if ok else "could not be reset, closed"
        except DeadlineExceeded:
            outcome = f"its reset did not finish within check_timeout={self.check_timeout:g} sec; closed"
        except Exception as e:
            outcome = f"its reset failed ({describe_exception(e)}); closed"
        logger.warning(
            "pool %r: reclaimed a %s resource taken at %s by thread %r, which ended without giving it back "
            "(held %.1f sec); %s. Give back what you take outside a request: 'with pool.connection()', "
            "'with db.borrow()', or pool.putconn() in a finally block",
            self.name,
            self.kind.name,
            where(taker) if taker is not None else "?",
            taker[0].name if taker is not None else "?",
            max(now - entry.taken_at, 0.0),
            outcome,
        )
        if outcome.startswith("its reset did not finish"):
            self._abandon(entry, was_out=True, reason="abandoned")  # may still be stuck: closed in the background
        else:
            self._discard(entry, "abandoned", was_out=True)

    # -- stats --------------------------------------------------------------

    def checked_out(self) -> list[Checkout]:
        """What is out of the pool right now: each resource, who took it, since when, where (oldest first).

        A resource whose checkout is still in progress (the holder has not
        stamped its time yet) shows a hold of 0.
        """
        with self._lock:
            entries = list(self._out.values())
        now = self._clock()
        out = []
        for e in entries:
            taken_at, taker = e.taken_at, e.taker
            held_for = max(now - taken_at, 0.0) if taken_at > -math.inf else 0.0
            thread = place = None
            if taker is not None:
                thread, place = taker[0].name, where(taker)
            out.append(Checkout(e.resource, e.holder, held_for, thread, place))
        out.sort(key=lambda c: -c.held_for)
        return out

    def held(self) -> list[dict[str, t.Any]]:
        """What is held right now, oldest first, JSON-ready: holder (endpoint or thread), age, where taken."""
        return [
            {
                "pool": self.name,
                "holder": c.holder or (f"thread {c.thread}" if c.thread else "outside a request"),
                "age": c.held_for,
                "thread": c.thread,
                "where": c.where,
            }
            for c in self.checked_out()
        ]

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background worker of a closed pool to stop; True if it has (or never ran)."""
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)
            return not worker.is_alive()
        return True

    def stats(self) -> PoolStats:
        """A consistent snapshot of sizes and counters, with percentiles over the recent window.

        Only copies are made under the locks (the waits window, each thread's
        hold window); sorting and grouping happen outside them, so reading
        stats never holds up a checkout or a return for long.
        """
        checkouts, hold_total, hold_pairs = self._tally.read()
        with self._lock:
            raw_waits = self._waits[:]
            idle = len(self._idle)
            snapshot = PoolStats(
                name=self.name,
                kind=self.kind.name,
                target=self.kind.describe(),
                min_size=self.min_size,
                max_size=self.max_size,
                size=self._size,
                idle=idle,
                # the lock-free paths move entries between _idle and _out meanwhile: one read in both is
                # counted once, so that idle + in_use <= size holds in every snapshot
                in_use=max(0, min(len(self._out), self._size - idle)),
                waiting=len(self._waiters) + self._wakened,
                created=self._created,
                closed=self._closed_count,
                closed_by_reason=dict(self._closed_by),
                checkouts=self._checkouts + checkouts,
                timeouts=self._timeouts,
                refused=self._refused,
                errors=self._errors,
                connect_failures=self._connect_failures,
                wait_count=self._wait_count,
                wait_time_total=self._wait_total,
                wait_time_max=self._wait_max,
                hold_time_total=hold_total,
                hold_time_max=0.0,
                long_held=self._long_held,
                reclaimed=self._reclaimed_count,
            )
        waits = sorted(w for w in raw_waits if w == w)
        holds = sorted(h for h, _ in hold_pairs)
        held = self.held()
        return dataclasses.replace(
            snapshot,
            hold_time_max=holds[-1] if holds else 0.0,
            wait_time_p50=percentile(waits, 50),
            wait_time_p95=percentile(waits, 95),
            wait_time_p99=percentile(waits, 99),
            hold_time_p50=percentile(holds, 50),
            hold_time_p95=percentile(holds, 95),
            hold_time_p99=percentile(holds, 99),
            top_holders=top_holders(hold_pairs),
            held=held,
            oldest_hold=held[0]["age"] if held else 0.0,
        )


#: every live pool of this process, rebuilt empty in a forked child
_POOLS: Registry[Pool[t.Any]] = Registry()


def _close_at_exit() -> None:
    """Interpreter exit: close every pool still open. Registered before `state.close_all` (which closes
    the apps' pools), so it runs after it: what is left are pools made by hand."""
    for pool in _POOLS.items():
        with contextlib.suppress(Exception):
            pool.close(timeout=1.0)


atexit.register(_close_at_exit)
