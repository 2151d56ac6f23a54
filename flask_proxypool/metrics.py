"""Prometheus metrics for the pools (`pip install 'flask-proxypool[prometheus]'`).

```python
from flask_proxypool import metrics
metrics.register(app)                    # into prometheus_client's default registry
metrics.register(app, path="/metrics")   # ... and serve it from the app
```

Metrics (labels `app` and `pool`; `app` is `app.name`):

| metric | type | meaning |
|---|---|---|
| `proxypool_size` | gauge | resources alive or being created |
| `proxypool_idle` | gauge | idle resources |
| `proxypool_in_use` | gauge | resources checked out |
| `proxypool_waiting` | gauge | callers waiting for a resource |
| `proxypool_max_size` / `_min_size` | gauge | configured bounds |
| `proxypool_checkouts_total` | counter | resources handed out |
| `proxypool_waits_total` | counter | checkouts that had to wait |
| `proxypool_timeouts_total` | counter | waits that timed out (HTTP 503) |
| `proxypool_refused_total` | counter | callers refused at once by `max_waiting` |
| `proxypool_errors_total` | counter | failed creates, resets, commits and checks |
| `proxypool_connect_failures_total` | counter | failed creates |
| `proxypool_created_total` | counter | resources created |
| `proxypool_closed_total` | counter | resources closed, label `reason` |
| `proxypool_long_held_total` | counter | resources held longer than `max_hold` |
| `proxypool_reclaimed_total` | counter | resources taken back: the taking thread ended, or `max_hold_action: reclaim` |
| `proxypool_oldest_hold_seconds` | gauge | age of the oldest resource still held (0: none) |
| `proxypool_wait_seconds_total` | counter | time spent waiting |
| `proxypool_hold_seconds_total` | counter | time resources were held |
| `proxypool_wait_quantile_seconds` | gauge | wait time, label `quantile` 0.5, 0.95, 0.99 |
| `proxypool_hold_quantile_seconds` | gauge | hold time, label `quantile` 0.5, 0.95, 0.99 |

The quantiles are gauges, one per quantile: the pool keeps its last 1,024
waits and holds (a window of samples, not of time) and computes them when
read. They are not a Prometheus histogram: bucket counts would have to be
kept on the hot path, and quantiles of different processes cannot be added
anyway. For a mean over time, divide the `_seconds_total` rates by the
`waits`/`checkouts` rates.

**One process** (`flask run`, a single gunicorn worker, waitress...): a
custom collector reads every registered app's `stats()` at scrape time,
so collecting costs the pools nothing between scrapes.

**Several gunicorn workers**: each worker has its own pools, and a scrape
reaches one worker at random, so a per-process collector would show a
different worker each time. Use prometheus_client's multiprocess mode:

1. set `PROMETHEUS_MULTIPROC_DIR` to an empty directory, in the
   environment of gunicorn itself (before anything imports prometheus_client);
2. in `gunicorn.conf.py`: `from flask_proxypool.metrics import child_exit`
   (it calls `multiprocess.mark_process_dead` for a worker that exited);
3. `metrics.register(app, path="/metrics")` (or serve a registry with a
   `MultiProcessCollector` yourself).

In that mode each worker copies its pools' stats into prometheus_client's
per-process files every `interval` seconds (a background thread; the
worker answering a scrape also copies its own right then), and the scrape
aggregates the files of all workers: gauges are summed over live workers
(`proxypool_max_size` is then workers x max_size: the connections the
server may see), counters over all workers that ever ran, and the quantile
gauges and `proxypool_oldest_hold_seconds` are the highest among live workers. Works with and without
`--preload`.
"""

from __future__ import annotations

import logging
import os
import threading
import typing as t
import weakref

from flask import Flask, Response

try:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, generate_latest
    from prometheus_client import values as _values
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(
        "flask_proxypool.metrics needs prometheus-client: pip install 'flask-proxypool[prometheus]'"
    ) from e

from ._fork import on_fork
from .errors import UsageError
from .state import AppPools, app_state
from .pool import Pool
from .stats import PoolStats

__all__ = ["PoolCollector", "child_exit", "multiprocess_mode", "register"]

logger = logging.getLogger("flask_proxypool")

LABELS = ("app", "pool")
QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))

_Get = t.Callable[[PoolStats], float]
GAUGES: dict[str, tuple[str, _Get]] = {
    "proxypool_size": ("Resources alive or being created.", lambda s: s.size),
    "proxypool_idle": ("Idle resources.", lambda s: s.idle),
    "proxypool_in_use": ("Resources checked out.", lambda s: s.in_use),
    "proxypool_waiting": ("Callers waiting for a resource.", lambda s: s.waiting),
    "proxypool_max_size": ("Configured max_size.", lambda s: s.max_size),
    "proxypool_min_size": ("Configured min_size.", lambda s: s.min_size),
}
#: family names; the samples end in _total
COUNTERS: dict[str, tuple[str, _Get]] = {
    "proxypool_checkouts": ("Resources handed out.", lambda s: s.checkouts),
    "proxypool_waits": ("Checkouts that had to wait.", lambda s: s.wait_count),
    "proxypool_timeouts": ("Waits that timed out (HTTP 503 in a request).", lambda s: s.timeouts),
    "proxypool_refused": ("Callers refused at once because max_waiting were queued.", lambda s: s.refused),
    "proxypool_errors": ("Failed creates, resets, commits and checks.", lambda s: s.errors),
    "proxypool_connect_failures": ("Failed creates.", lambda s: s.connect_failures),
    "proxypool_created": ("Resources created.", lambda s: s.created),
    "proxypool_long_held": ("Resources held longer than max_hold.", lambda s: s.long_held),
    "proxypool_reclaimed": (
        "Resources taken back from their holder: its thread ended, or held past max_hold with reclaim.",
        lambda s: s.reclaimed,
    ),
    "proxypool_wait_seconds": ("Time spent waiting for a resource.", lambda s: s.wait_time_total),
    "proxypool_hold_seconds": ("Time resources were held.", lambda s: s.hold_time_total),
}
#: gauges where the highest worker is the answer (multiprocess mode: livemax, not livesum)
MAX_GAUGES: dict[str, tuple[str, _Get]] = {
    "proxypool_oldest_hold_seconds": (
        "Age of the oldest resource still held, in seconds (0: none held).",
        lambda s: s.oldest_hold,
    ),
}
CLOSED = ("proxypool_closed", "Resources closed, by reason.")
QUANTILE_GAUGES = {
    "proxypool_wait_quantile_seconds": ("Wait time over the last 1024 waits, by quantile.", "wait_time"),
    "proxypool_hold_quantile_seconds": ("Hold time over the last 1024 returns, by quantile.", "hold_time"),
}

_lock = threading.Lock()  # guards everything below
#: app name -> its pools; a later app with the same name replaces the earlier one
_apps: dict[str, weakref.ref[AppPools]] = {}
_registered: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()
_publisher: _Publisher | None = None


def multiprocess_mode() -> bool:
    """True when prometheus_client writes to `PROMETHEUS_MULTIPROC_DIR` (set before it was imported)."""
    wanted = "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ
    active = bool(getattr(_values.ValueClass, "_multiprocess", False))
    if wanted and not active:
        raise UsageError(
            "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported, so its values are not "
            "written to the directory: set it in the environment of the server process (gunicorn) itself"
        )
    return active


def _live_apps() -> list[tuple[str, AppPools]]:
    with _lock:
        refs = list(_apps.items())
    return [(name, state) for name, ref in refs if (state := ref()) is not None]


def _pools(state: AppPools, opened_only: bool) -> list[tuple[str, Pool[t.Any]]]:
    if opened_only:
        return list(state.opened().items())
    return [(name, state.pool(name)) for name in state.configs]


class PoolCollector:
    """Reads the pools of every registered app at scrape time (one-process mode).

    Counters are kept monotonic per pool object: a count that dips for an
    instant (a checkout undone because the resource failed its test) is
    reported at its previous high, so `rate()` never sees a false reset.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._high: weakref.WeakKeyDictionary[Pool[t.Any], dict[str, float]] = weakref.WeakKeyDictionary()

    def _forget(self) -> None:
        """After a fork: the child's pools start their counts again."""
        self._lock = threading.Lock()
        self._high = weakref.WeakKeyDictionary()

    def describe(self) -> list[Metric]:
        return list(self._families().values())

    def _families(self) -> dict[str, Metric]:
        fams: dict[str, Metric] = {}
        for name, (doc, _) in {**GAUGES, **MAX_GAUGES}.items():
            fams[name] = GaugeMetricFamily(name, doc, labels=LABELS)
        for name, (doc, _) in COUNTERS.items():
            fams[name] = CounterMetricFamily(name, doc, labels=LABELS)
        fams[CLOSED[0]] = CounterMetricFamily(CLOSED[0], CLOSED[1], labels=(*LABELS, "reason"))
        for name, (doc, _) in QUANTILE_GAUGES.items():
            fams[name] = GaugeMetricFamily(name, doc, labels=(*LABELS, "quantile"))
        return fams

    def collect(self) -> t.Iterator[Metric]:
        fams = self._families()
        for app_name, state in _live_apps():
            for pool_name, pool in _pools(state, opened_only=False):
                s = pool.stats()
                labels = [app_name, pool_name]
                for name, (_, get) in {**GAUGES, **MAX_GAUGES}.items():
                    t.cast(GaugeMetricFamily, fams[name]).add_metric(labels, get(s))
                with self._lock:
                    high = self._high.setdefault(pool, {})
                    for name, (_, get) in COUNTERS.items():
                        high[name] = v = max(high.get(name, 0.0), get(s))
                        t.cast(CounterMetricFamily, fams[name]).add_metric(labels, v)
                    for reason, n in sorted(s.closed_by_reason.items()):
                        key = f"closed:{reason}"
                        high[key] = v = max(high.get(key, 0.0), n)
                        t.cast(CounterMetricFamily, fams[CLOSED[0]]).add_metric([*labels, reason], v)
                for name, (_, prefix) in QUANTILE_GAUGES.items():
                    for q, p in QUANTILES:
                        value = getattr(s, f"{prefix}_{p}")
                        t.cast(GaugeMetricFamily, fams[name]).add_metric([*labels, q], value)
        yield from fams.values()


_collector = PoolCollector()


class _Publisher:
    """Multiprocess mode: copies this process's stats into prometheus_client's per-process files."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.lock = threading.Lock()  # held while publishing, and across a fork
        self.gauges = {
            name: Gauge(name, doc, LABELS, registry=None, multiprocess_mode="livesum")
            for name, (doc, _) in GAUGES.items()
        }
        self.gauges.update(
            {
                name: Gauge(name, doc, LABELS, registry=None, multiprocess_mode="livemax")
                for name, (doc, _) in MAX_GAUGES.items()
            }
        )
        self.counters = {name: Counter(name, doc, LABELS, registry=None) for name, (doc, _) in COUNTERS.items()}
        self.closed = Counter(CLOSED[0], CLOSED[1], (*LABELS, "reason"), registry=None)
        self.quantiles = {
            name: Gauge(name, doc, (*LABELS, "quantile"), registry=None, multiprocess_mode="livemax")
            for name, (doc, _) in QUANTILE_GAUGES.items()
        }
        self._reset()

    def _reset(self) -> None:
        #: what was last added to each counter, per pool object (a pool made anew starts from 0)
        self.last: weakref.WeakKeyDictionary[Pool[t.Any], dict[str, float]] = weakref.WeakKeyDictionary()
        #: (app, pool) whose gauges this process has set
        self.shown: set[tuple[str, str]] = set()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        th = threading.Thread(target=self._run, name="proxypool-metrics", daemon=True)
        self.thread = th
        th.start()

    def _run(self) -> None:
        stop = self.stop
        while not stop.wait(self.interval):
            try:
                self.publish()
            except Exception:  # never let the thread die: the next round may work
                logger.exception(
                    "metrics: publishing the stats of every pool failed; next try in %g sec", self.interval
                )

    def publish(self) -> None:
        """Copy the stats of the pools this process opened into the multiprocess files."""
        with self.lock:
            seen: set[tuple[str, str]] = set()
            for app_name, state in _live_apps():
                for pool_name, pool in _pools(state, opened_only=True):
                    seen.add((app_name, pool_name))
                    try:
                        self._publish_pool(app_name, pool_name, pool)
                    except Exception:  # the other pools still get published
                        logger.exception("pool %r of app %r: publishing metrics failed", pool_name, app_name)
            for app_name, pool_name in self.shown - seen:  # closed since: no longer alive here
                for g in self.gauges.values():
                    g.labels(app_name, pool_name).set(0)
            self.shown = seen

    def _publish_pool(self, app_name: str, pool_name: str, pool: Pool[t.Any]) -> None:
        s = pool.stats()
        for name, (_, get) in {**GAUGES, **MAX_GAUGES}.items():
            self.gauges[name].labels(app_name, pool_name).set(get(s))
        for name, (_, prefix) in QUANTILE_GAUGES.items():
            for q, p in QUANTILES:
                self.quantiles[name].labels(app_name, pool_name, q).set(getattr(s, f"{prefix}_{p}"))
        last = self.last.setdefault(pool, {})
        for name, (_, get) in COUNTERS.items():
            v = get(s)
            delta = v - last.get(name, 0.0)
            if delta > 0:  # a count that dipped for an instant is caught up later
                self.counters[name].labels(app_name, pool_name).inc(delta)
                last[name] = v
        for reason, n in s.closed_by_reason.items():
            key = f"closed:{reason}"
            delta = n - last.get(key, 0.0)
            if delta > 0:
                self.closed.labels(app_name, pool_name, reason).inc(delta)
                last[key] = n

    # fork safety: the child must not inherit a lock held mid-publish, nor a dead thread
    def before_fork(self) -> None:
        self.lock.acquire()

    def after_fork_in_parent(self) -> None:
        self.lock.release()

    def after_fork_in_child(self) -> None:
        self.lock = threading.Lock()
        running = self.thread is not None
        self._reset()
        if running:
            self.start()


def _before_fork() -> None:
    p = _publisher
    if p is not None:
        p.before_fork()


def _after_fork_in_parent() -> None:
    p = _publisher
    if p is not None:
        p.after_fork_in_parent()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _collector._forget()
    p = _publisher
    if p is not None:
        p.after_fork_in_child()


on_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def register(
    app: Flask,
    registry: CollectorRegistry | None = None,
    *,
    path: str | None = None,
    interval: float = 5.0,
) -> None:
    """Export the pools of `app` to Prometheus; call after `ProxyPool(app)`.

    Safe to call for several apps, and again for the same one: the collector
    (or, in multiprocess mode, the publishing thread) exists once per process.

    Args:
        registry: where the one-process collector goes (default:
            prometheus_client's `REGISTRY`); unused in multiprocess mode, where
            values go to `PROMETHEUS_MULTIPROC_DIR`.
        path: also serve the metrics from the app at this path (e.g.
            `"/metrics"`); in multiprocess mode it aggregates all workers.
            Protect it like any internal endpoint (it holds no secrets).
        interval: multiprocess mode: seconds between copies of each
            worker's stats (the first call in a process sets it).
    """
    global _publisher
    state = app_state(app)
    multi = multiprocess_mode()
    reg = REGISTRY if registry is None else registry
    with _lock:
        _apps[state.app_name] = weakref.ref(state)
        if multi:
            if _publisher is None:
                _publisher = _Publisher(interval)
                _publisher.start()
        elif reg not in _registered:
            reg.register(_collector)
            _registered.add(reg)
    if path is not None:
        _add_view(app, path, reg, multi)


def _add_view(app: Flask, path: str, registry: CollectorRegistry, multi: bool) -> None:
    def proxypool_metrics() -> Response:
        if multi:
            from prometheus_client import multiprocess

            if _publisher is not None:
                _publisher.publish()  # this worker's numbers as of now
            registry_ = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry_)  # type: ignore[no-untyped-call]
            data = generate_latest(registry_)
        else:
            data = generate_latest(registry)
        return Response(data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.add_url_rule(path, endpoint="proxypool_metrics", view_func=proxypool_metrics, methods=["GET"])


def child_exit(server: t.Any, worker: t.Any) -> None:
    """gunicorn hook (`from flask_proxypool.metrics import child_exit` in gunicorn.conf.py).

    In the master, after a worker exited: drop its live gauges from the
    multiprocess directory (its counters stay, as they should). Does
    nothing outside multiprocess mode.
    """
    if multiprocess_mode():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
