"""What was taken where: who took each resource from an app's pools during a test, in which thread, at which line.

A `Watch` (one per app under `proxypool_leak_check`) records every
take and give-back of the app's pools, so that a leak report can name the
line that took the resource. Until `Pool` offers a public hook for this,
the watch wraps `getconn`/`putconn` on each pool instance (an instance
attribute, removed when the watch stops).
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import logging
import os
import sys
import threading
import time
import typing as t
import weakref

from flask import Flask, has_request_context, request

from ..state import app_state
from ..pool import Pool

__all__ = ["Taken", "Watch", "start_watch", "stand_ins", "track_test_pool", "watch_of"]

logger = logging.getLogger("flask_proxypool")


@dataclasses.dataclass
class Taken:
    """One take of a resource, as a leak report names it."""

    resource: t.Any
    holder: str | None
    thread: str
    where: str
    phase: str
    at: float


_LIBRARY_DIRS: tuple[str, ...] = ()


def _library_dirs() -> tuple[str, ...]:
    """Where the frames to skip come from: flask, werkzeug, this package, contextlib and threading."""
    global _LIBRARY_DIRS
    if not _LIBRARY_DIRS:
        import flask
        import werkzeug

        dirs = [os.path.dirname(os.path.abspath(m.__file__ or "")) for m in (flask, werkzeug)]
        dirs.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # flask_proxypool/
        files = [os.path.abspath(m.__file__ or "") for m in (contextlib, threading)]
        _LIBRARY_DIRS = tuple(d + os.sep for d in dirs) + tuple(files)
    return _LIBRARY_DIRS


def _caller() -> str:
    """`file:line in function: source` of the first frame outside flask, werkzeug and this package."""
    skip = _library_dirs()
    f: t.Any = sys._getframe(2)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(skip):
        f = f.f_back
    if f is None:
        return "an unknown place"
    filename = f.f_code.co_filename
    try:
        shown = os.path.relpath(filename)
    except ValueError:
        shown = filename
    if shown.startswith(".."):
        shown = filename
    line = linecache.getline(filename, f.f_lineno).strip()
    return f"{shown}:{f.f_lineno} in {f.f_code.co_name}" + (f": {line}" if line else "")


class Watch:
    """Records who takes what from an app's pools while a test runs (`proxypool_leak_check`)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.phase = "setup"
        self.pools: list[Pool[t.Any]] = []
        self.taken: dict[int, dict[int, list[Taken]]] = {}  # id(pool) -> id(resource) -> stack
        self.reported = False
        self._lock = threading.Lock()
        state = app_state(app)
        for name in state.configs:
            self.add(state.pool(name))  # makes missing pools: that opens nothing

    def add(self, pool: Pool[t.Any]) -> None:
        with self._lock:
            if any(p is pool for p in self.pools):
                return
            self.pools.append(pool)
            self.taken[id(pool)] = {}
        getconn, putconn = pool.getconn, pool.putconn
        records = self.taken[id(pool)]

        def watched_getconn(*args: t.Any, **kwargs: t.Any) -> t.Any:
            resource = getconn(*args, **kwargs)
            holder = kwargs.get("holder", args[1] if len(args) > 1 else None)
            # pool.getconn() called by hand in a request (not a bare test_request_context): its endpoint
            if holder is None and has_request_context() and request.url_rule is not None:
                holder = request.endpoint
            taken = Taken(resource, holder, threading.current_thread().name, _caller(), self.phase, time.monotonic())
            with self._lock:
                records.setdefault(id(resource), []).append(taken)
            return resource

        def watched_putconn(resource: t.Any, *args: t.Any, **kwargs: t.Any) -> None:
            with self._lock:
                stack = records.get(id(resource))
                if stack:
                    stack.pop()
                    if not stack:
                        del records[id(resource)]
            putconn(resource, *args, **kwargs)

        pool.getconn = watched_getconn  # type: ignore[method-assign]
        pool.putconn = watched_putconn  # type: ignore[method-assign]

    def reclaim(self) -> None:
        """Give back what is still out once the test is over, so that later tests start clean."""
        for pool in self.pools:
            for stack in self.records(pool).values():
                for taken in reversed(stack):
                    try:
                        pool.putconn(taken.resource, failed=True)
                    except Exception:
                        logger.exception("pool %r: giving back a leaked resource failed", pool.name)

    def stop(self) -> None:
        """Unwrap the pools (the class's getconn/putconn again) and forget the app."""
        for pool in self.pools:
            for attr in ("getconn", "putconn"):
                vars(pool).pop(attr, None)
        _WATCHES.pop(self.app, None)

    def records(self, pool: Pool[t.Any]) -> dict[int, list[Taken]]:
        """id of each resource out of `pool` -> its takes, oldest first (a shared connection may have several)."""
        with self._lock:
            return {k: list(v) for k, v in self.taken.get(id(pool), {}).items()}


#: The watch of each app under a leak check, from the fixture's setup to the end of the test's teardown
#: (a watch references its app: the entry leaves with ``Watch.stop``, not by itself).
_WATCHES: weakref.WeakKeyDictionary[Flask, Watch] = weakref.WeakKeyDictionary()
#: TransactionPools of each app, still reported by assert_all_returned after they left AppPools
#: (an app fixture that closes its pools drops them from AppPools). Held weakly both ways: a
#: finished test's TransactionPool, its connection and a long-lived app must not pin each other.
_TEST_POOLS: weakref.WeakKeyDictionary[Flask, weakref.WeakSet[Pool[t.Any]]] = weakref.WeakKeyDictionary()


def start_watch(app: Flask) -> Watch:
    """Record the takes of `app`'s pools from now on (a watch left by an earlier test is stopped first)."""
    stale = _WATCHES.pop(app, None)
    if stale is not None:
        stale.stop()
    watch = _WATCHES[app] = Watch(app)
    return watch


def watch_of(app: Flask) -> Watch | None:
    """The watch recording `app`'s pools, if a leak check runs."""
    return _WATCHES.get(app)


def stand_ins(app: Flask) -> list[Pool[t.Any]]:
    """The pools put in place of `app`'s for a test and still alive (even once they left the app)."""
    return list(_TEST_POOLS.get(app, ()))


def track_test_pool(app: Flask, pool: Pool[t.Any]) -> None:
    """A pool put in place of one of `app`'s for a test: watched and checked like the app's own."""
    _TEST_POOLS.setdefault(app, weakref.WeakSet()).add(pool)
    watch = _WATCHES.get(app)
    if watch is not None:
        watch.add(pool)
