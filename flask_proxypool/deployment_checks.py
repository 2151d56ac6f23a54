"""Deployment warnings at run time: what in the way the app is served will hurt, said once per process.

Each check names the pool and says what to change; each warning is logged
once per process at WARNING through the ``flask_proxypool`` logger:

* `POOL_BELOW_THREADS`: a pool smaller than the threads that can use it
  (gunicorn gthread ``threads``, waitress ``threads``, the threaded
  development server);
* `INHERITED_AFTER_FORK`: a pool that had connections open in a parent
  process when it forked this one (``gunicorn --preload`` without
  `flask_proxypool.gunicorn`'s hooks): the parent keeps them, unused;
* `RELOADER_PARENT`: pools opened by the Flask reloader's parent process,
  which only watches files;
* `ABOVE_MAX_CONNECTIONS`: workers x ``max_size`` (x ``PROXYPOOL_HOSTS``)
  above what the PostgreSQL server accepts (``max_connections`` less the
  reserved slots); pools with ``pgbouncer`` set are left to `flask proxypool size`;
* `GIL_ENABLED`: a free-threaded interpreter running with the GIL back on.

When they run, so that the hot path pays nothing after the first time:

* at the app's first request in each process, through a ``before_request``
  hook that takes itself out of the app once it ran (and is put back in a
  forked child): threads, fork, GIL; the server's limits are read there
  too, by the first request's thread once its response is closed (the
  query in a helper thread, bounded), through the pool (one checkout per
  server and process: the pool's own budget, never a connection more than
  ``max_size``; that thread's own, the one the first request used, if it
  used one), and only under a real server (not the test client);
* in the reloader's parent, when werkzeug announces " * Restarting with"
  (a filter on the ``werkzeug`` logger, installed by `init_app` only
  where ``WERKZEUG_RUN_MAIN`` is unset);
* `flask proxypool check` runs the same checks in its own process, reading
  workers and threads from gunicorn's settings (`collect`).

Why this module is a little over 500 lines: the checks and the three
moments they run at (first request, reloader, fork) share the once-per-process
bookkeeping (`_said`, the watches); split, each half would reach into it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import sysconfig
import threading
import typing as t
import weakref

from flask import Flask, after_this_request, request

from ._fork import on_fork
from .config import PoolConfig
from .sizing import ServerLimits, query_server_limits, server_key
from .state import AppPools, app_state, registrations

__all__ = [
    "ABOVE_MAX_CONNECTIONS",
    "GIL_ENABLED",
    "INHERITED_AFTER_FORK",
    "POOL_BELOW_THREADS",
    "RELOADER_PARENT",
    "Advisory",
    "Server",
    "above_max_connections",
    "collect",
    "gil_enabled",
    "inherited_after_fork",
    "install",
    "pool_below_threads",
    "preload_without_hooks",
    "reloader_parent",
    "say",
    "serving",
]

logger = logging.getLogger("flask_proxypool")

POOL_BELOW_THREADS = "pool-below-threads"
INHERITED_AFTER_FORK = "inherited-after-fork"
RELOADER_PARENT = "reloader-parent"
ABOVE_MAX_CONNECTIONS = "above-max-connections"
GIL_ENABLED = "gil-enabled"

#: seconds the background read of a server's max_connections may take
LIMITS_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class Advisory:
    """One deployment warning: which check, which pool (or None for the process), and what to change."""

    code: str
    pool: str | None
    message: str


@dataclasses.dataclass(frozen=True)
class Server:
    """What serves the app in this process: how many processes, and how many requests each runs at once."""

    name: str  #: e.g. ``gunicorn gthread``, ``waitress``, ``the development server``
    workers: int = 1
    threads: int | None = 1  #: None: a thread per request, without a limit
    #: False for gevent/eventlet workers: their concurrency is worker_connections, sized by rate
    by_threads: bool = True
    #: how to lower the threads, in that server's words; ``{max_size}`` is the pool's
    hint: str = "run fewer threads ({max_size})"


# -- the checks: pure functions of what they are given --------------------------------


def pool_below_threads(app_name: str, configs: t.Mapping[str, PoolConfig], server: Server) -> list[Advisory]:
    """Pools whose `max_size` is below the threads that may use them at once."""
    out = []
    for name, cfg in configs.items():
        m = int(cfg.options["max_size"])
        timeout = float(cfg.options["timeout"])
        if not server.by_threads or (server.threads is not None and m >= server.threads):
            continue
        wait = f"the rest wait up to timeout ({timeout:g} s), then get HTTP 503"
        if server.threads is None:
            text = (
                f"pool {name!r} of app {app_name!r}: {server.name} runs every request in a thread of its own, "
                f"without limit: beyond {m} (max_size) requests using it at once, {wait}. Fine while developing; "
                f"serve real traffic with gunicorn (--threads <= max_size), or {server.hint.format(max_size=m)}"
            )
        else:
            text = (
                f"pool {name!r} of app {app_name!r}: max_size {m} is below the {server.threads} threads of "
                f"each {server.name} worker: beyond {m} requests using it at once, {wait}. Set max_size to "
                f"{server.threads} (a request holds at most one resource per pool), or "
                f"{server.hint.format(max_size=m)}"
            )
        out.append(Advisory(POOL_BELOW_THREADS, name, text))
    return out


@dataclasses.dataclass(frozen=True)
class _Inherited:
    """A pool that had connections open when this process was forked from its parent."""

    registration: int  #: id() of the AppPools, the same object in parent and child
    pool: str
    connections: int
    parent: int  #: the parent's pid


def inherited_after_fork(app_name: str, state: AppPools) -> list[Advisory]:
    """Pools of `state` that had connections open in the parent when it forked this process."""
    pid = os.getpid()
    return [
        Advisory(
            INHERITED_AFTER_FORK,
            i.pool,
            f"pool {i.pool!r} of app {app_name!r} had {i.connections} connection(s) open in process {i.parent} "
            f"when it forked this one ({pid}): the parent keeps them open and unused for as long as it runs, on "
            "top of the workers' own (this process opens new ones). With gunicorn --preload, add "
            "`from flask_proxypool.gunicorn import when_ready, worker_exit` to gunicorn.conf.py (it closes the "
            "master's pools before forking); otherwise close the pools in the parent once set-up is done: "
            "pools.close(app)",
        )
        for i in _INHERITED
        if i.registration == id(state) and i.parent != pid
    ]


def preload_without_hooks(app_name: str, opened: t.Mapping[str, int], preload: bool, when_ready: str) -> list[Advisory]:
    """For `flask proxypool check`: gunicorn set to preload, no closing hook, and loading the app opened pools.

    `opened` is pool name -> connections open once the app was loaded
    (before the check took any); `when_ready` is gunicorn's hook as
    ``module.qualname``.
    """
    if not preload or when_ready == "flask_proxypool.gunicorn.when_ready":
        return []
    return [
        Advisory(
            INHERITED_AFTER_FORK,
            name,
            f"pool {name!r} of app {app_name!r} has {n} connection(s) open once the app is loaded, and gunicorn "
            "is set to preload it without flask_proxypool's when_ready hook: the master will keep them open and "
            "unused while every worker opens its own. Add `from flask_proxypool.gunicorn import when_ready, "
            "worker_exit` to gunicorn.conf.py (or call flask_proxypool.close_all() in your own when_ready)",
        )
        for name, n in opened.items()
        if n
    ]


def reloader_parent(app_name: str, opened: t.Mapping[str, int]) -> list[Advisory]:
    """Pools with connections open in the reloader's parent; `opened` is pool name -> connections."""
    pid = os.getpid()
    return [
        Advisory(
            RELOADER_PARENT,
            name,
            f"pool {name!r} of app {app_name!r} has {n} connection(s) open in the Flask reloader's parent process "
            f"({pid}), which only watches files and restarts the server: they stay open, unused, until it stops "
            "(the server process opens its own). Open nothing at import or in the app factory under the "
            "reloader: move set-up to a CLI command, run it only when os.environ.get('WERKZEUG_RUN_MAIN') == "
            "'true', or call pools.close(app) once it is done",
        )
        for name, n in opened.items()
        if n
    ]


def above_max_connections(
    app_name: str,
    server: str,
    pools: t.Mapping[str, int],
    workers: int,
    hosts: int,
    limits: ServerLimits,
) -> list[Advisory]:
    """All workers' pools to one server (pool name -> max_size) against what the server accepts."""
    available = limits.available
    if available is None:
        return []
    total = workers * hosts * sum(pools.values())
    if total <= available:
        return []
    names = ", ".join(map(repr, pools))
    shape = f"{workers} worker(s)" + (f" x {hosts} host(s)" if hosts > 1 else "")
    sizes = " + ".join(f"{n} {m}" for n, m in pools.items())
    return [
        Advisory(
            ABOVE_MAX_CONNECTIONS,
            ", ".join(pools),
            f"pool(s) {names} of app {app_name!r} may open {shape} x ({sizes}) = {total} connections to {server}, "
            f"more than the {available} it accepts (max_connections {limits.max_connections} - {limits.reserved} "
            "reserved): once they fill up, new connections fail with 'too many clients'. Lower max_size "
            "(`flask proxypool size` suggests one), run fewer workers, raise max_connections, or put PgBouncer "
            'in front (pgbouncer: "transaction")',
        )
    ]


def gil_enabled() -> list[Advisory]:
    """A free-threaded build whose GIL is on: an extension module without free-threading support turned it on."""
    if not sysconfig.get_config_var("Py_GIL_DISABLED"):
        return []
    enabled = getattr(sys, "_is_gil_enabled", None)
    if enabled is None or not enabled():
        return []
    return [
        Advisory(
            GIL_ENABLED,
            None,
            "this free-threaded Python runs with the GIL enabled: an imported C extension module that does not "
            "declare free-threading support turned it back on (Python named it in a RuntimeWarning at import), "
            "or PYTHON_GIL=1 is set; threads now take turns. Upgrade or replace that module (on 3.13t psycopg "
            "needs no binary: its pure-Python build is free-threaded), or run with PYTHON_GIL=0 only if you "
            "know it is safe, or use the default build",
        )
    ]


# -- what serves this process -----------------------------------------------------------


def serving(environ: t.Mapping[str, t.Any]) -> Server | None:
    """The server running this request, from the calling frames and the WSGI environ; None when unknown.

    gunicorn and waitress do not put their thread counts in the environ;
    their worker objects are on the stack of the thread serving the request,
    so it is read once from there (the first request only).
    """
    frame = sys._getframe(1)
    depth = 0
    while frame is not None and depth < 100:
        module = frame.f_globals.get("__name__", "")
        if isinstance(module, str) and module.startswith(("gunicorn.workers.", "waitress.")):
            found = _server_of(frame.f_locals.get("self"))
            if found is not None:
                return found
        frame = frame.f_back  # type: ignore[assignment]
        depth += 1
    if "werkzeug.socket" in environ:  # werkzeug.serving, not the test client
        if environ.get("wsgi.multithread"):
            return Server(
                "the development server",
                threads=None,
                hint="start it without threads (flask run --without-threads, run_simple(threaded=False))",
            )
        return None
    return None


def _server_of(obj: object) -> Server | None:
    cfg = getattr(obj, "cfg", None)
    if cfg is not None and hasattr(cfg, "worker_class_str"):  # a gunicorn Worker
        kind = str(cfg.worker_class_str)
        if any(a in kind for a in ("gevent", "eventlet", "tornado")):
            # concurrency is worker_connections: sized by rate (flask proxypool size), not by threads
            return Server(f"gunicorn {kind}", workers=int(cfg.workers), by_threads=False)
        threads = int(cfg.threads) if kind == "gthread" else 1
        return Server(
            f"gunicorn {kind}", workers=int(cfg.workers), threads=threads, hint="run gunicorn with --threads {max_size}"
        )
    running = getattr(obj, "threads", None)
    if type(obj).__name__ == "ThreadedTaskDispatcher" and isinstance(running, (set, dict)):  # waitress
        return Server("waitress", threads=max(len(running), 1), hint="serve with waitress' threads={max_size}")
    return None


# -- running them: once per process ----------------------------------------------------

_said_lock = threading.Lock()
_said: set[tuple[str, str, str | None]] = set()


def say(app_name: str, advisories: t.Iterable[Advisory]) -> None:
    """Log each advisory at WARNING, unless this process said it already."""
    for a in advisories:
        key = (app_name, a.code, a.pool)
        with _said_lock:
            if key in _said:
                continue
            _said.add(key)
        logger.warning("%s", a.message)


def _groups(configs: t.Mapping[str, PoolConfig], state: AppPools) -> dict[str, dict[str, int]]:
    """Server key -> {pool name: max_size} of the psycopg pools that connect straight to PostgreSQL."""
    out: dict[str, dict[str, int]] = {}
    for name, cfg in configs.items():
        if cfg.kind != "psycopg" or cfg.kind_options.get("pgbouncer"):
            continue  # behind PgBouncer the budgets are the pooler's: flask proxypool size
        stats = dataclasses.replace(state.pool(name).stats(), config=cfg.public())
        key = server_key(stats)
        if key is not None:
            out.setdefault(key, {})[name] = int(cfg.options["max_size"])
    return out


def collect(
    app_name: str,
    state: AppPools,
    server: Server | None,
    *,
    hosts: int = 1,
    limits: t.Mapping[str, ServerLimits] | None = None,
) -> list[Advisory]:
    """Every warning that applies to this process, for `flask proxypool check` (it passes `limits` it read)."""
    found = list(gil_enabled())
    if server is not None:
        found += pool_below_threads(app_name, state.configs, server)
    found += inherited_after_fork(app_name, state)
    if limits:
        workers = server.workers if server is not None else 1
        for key, pools in _groups(state.configs, state).items():
            if key in limits:
                found += above_max_connections(app_name, key, pools, workers, hosts, limits[key])
    return found


class _Watch:
    """One app's first-request checks: a `before_request` hook that takes itself out after running once."""

    def __init__(self, app: Flask, hosts: int) -> None:
        self.app = weakref.ref(app)
        self.app_name = app.name
        self.hosts = hosts
        self._lock = threading.Lock()
        self._done = False
        self._arm()

    def _arm(self) -> None:
        app = self.app()
        if app is not None:
            funcs = app.before_request_funcs.setdefault(None, [])
            if self.first_request not in funcs:
                funcs.insert(0, self.first_request)  # first: before any hook that uses a pool

    def _disarm(self, app: Flask) -> None:
        # A new list, not a removal: Flask may be iterating the old one in another thread.
        funcs = app.before_request_funcs.get(None, [])
        app.before_request_funcs[None] = [f for f in funcs if f != self.first_request]

    def first_request(self) -> None:
        """The checks of this process's first request; never raises into the request."""
        with self._lock:
            if self._done:
                return
            self._done = True
            app = self.app()
            if app is not None:
                self._disarm(app)
        if app is None:
            return
        try:
            server = serving(request.environ)
            state = app_state(app)
            say(self.app_name, collect(self.app_name, state, server))
            if server is not None:
                groups = _groups(state.configs, state)
                if groups:
                    _after_response(lambda: self._limits(state, server, groups))
        except Exception:
            logger.debug("app %r: deployment checks failed", self.app_name, exc_info=True)

    def _limits(self, state: AppPools, server: Server, groups: dict[str, dict[str, int]]) -> None:
        """Read each server's limits; never raises (it runs as the first response is closed)."""
        try:
            for key, pools in groups.items():
                limits = query_server_limits(state.pool(next(iter(pools))), LIMITS_TIMEOUT)
                if limits.error:
                    logger.debug("app %r: max_connections of %s unknown: %s", self.app_name, key, limits.error)
                say(self.app_name, above_max_connections(self.app_name, key, pools, server.workers, self.hosts, limits))
        except Exception:
            logger.debug("app %r: the limits check failed", self.app_name, exc_info=True)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._arm()


def _after_response(fn: t.Callable[[], None]) -> None:
    """Run `fn` in the request's thread once its response is closed, when what it took is back in its pools.

    The limits check then takes that thread's own connection, and no other
    thread's connection moves: a check in a thread of its own took the
    connection the first request gave back, and that request's thread, wanting
    it meanwhile, made a second one, which left another thread to use one it
    did not make (on 3.13t with gunicorn 2 x 4, 16-20% of one worker's
    checkouts in about a third of processes; see "Affinity" in `pool`). It
    costs that thread a query once per process (at most `LIMITS_TIMEOUT`
    when the server does not answer), after its response has been sent.
    """

    def on_response(response: t.Any) -> t.Any:
        response.call_on_close(fn)
        return response

    try:
        after_this_request(on_response)
    except Exception:  # no request context to wait for: now
        fn()


_WATCHES: weakref.WeakKeyDictionary[Flask, _Watch] = weakref.WeakKeyDictionary()


class _ReloaderParent(logging.Filter):
    """On the ``werkzeug`` logger: its reloader's parent says " * Restarting with" before starting the server."""

    def __init__(self) -> None:
        super().__init__()
        self.done = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not self.done and isinstance(msg, str) and msg.startswith(" * Restarting with"):
            self.done = True
            logging.getLogger("werkzeug").removeFilter(self)
            # Python 3.13 drops a record logged by a thread that is already inside logging (a filter or
            # handler), whatever the logger: say it from a thread of its own. No handler lock is held yet
            # (filters run before handlers), so waiting for it here cannot deadlock.
            th = threading.Thread(target=self._check, name="flask_proxypool reloader check", daemon=True)
            th.start()
            th.join(timeout=5)
        return True

    @staticmethod
    def _check() -> None:
        try:
            for state in registrations():
                opened = {n: p.stats().size for n, p in state.opened().items() if not p.closed}
                say(state.app_name, reloader_parent(state.app_name, opened))
        except Exception:
            logger.debug("reloader check failed", exc_info=True)


_reloader_filter: _ReloaderParent | None = None


def install(app: Flask, hosts: int = 1) -> None:
    """Arm the run-time checks for `app` (called by `init_app`)."""
    global _reloader_filter
    _WATCHES[app] = _Watch(app, hosts)
    if os.environ.get("WERKZEUG_RUN_MAIN") != "true" and _reloader_filter is None:
        _reloader_filter = _ReloaderParent()
        logging.getLogger("werkzeug").addFilter(_reloader_filter)


# -- fork: what the parent had open, and a fresh start in the child ---------------------

_INHERITED: list[_Inherited] = []


def _before_fork() -> None:
    """In the parent, just before a fork: note the pools with connections open (the child reads it)."""
    try:
        pid = os.getpid()
        found = []
        for state in registrations():
            for name, p in state.opened().items():
                if not p.closed:
                    size = p.stats().size
                    if size:
                        found.append(_Inherited(id(state), name, size, pid))
        _INHERITED[:] = found
    except Exception:  # never in the way of a fork
        _INHERITED.clear()


def _after_fork_in_parent() -> None:
    _INHERITED.clear()


def _after_fork_in_child() -> None:
    global _said_lock
    _said_lock = threading.Lock()
    _said.clear()
    for watch in list(_WATCHES.values()):
        watch._after_fork_in_child()


on_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
