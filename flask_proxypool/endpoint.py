"""The opt-in JSON stats endpoint: `PROXYPOOL_STATS_URL` guarded by `PROXYPOOL_STATS_GUARD`.

Off by default. When on, every request runs the guard first (403 when it
says no) and the body is the stats of the worker that answered:

```json
{"app": "shop", "pid": 1234,
 "held": [{"pool": "db", "holder": "thread 'sync'", "age": 12.5, "thread": "sync", "where": "app/jobs.py:42"}],
 "pools": {"db": {"...": "PoolStats.to_dict()"}}}
```

`held` lists what is held right now in this worker, oldest first (each
pool's `held` too): the holder is the endpoint, or the thread for a take
outside a request, with the file and line that took it.

Passwords are masked in the targets and configurations; callables appear by
name. `flask proxypool size --stats FILE` reads this body.
"""

from __future__ import annotations

import os
import typing as t

from flask import Flask, Response, abort, current_app, jsonify

from .config import import_string
from .errors import ConfigError
from .state import app_state

__all__ = ["register_stats_endpoint"]

ENDPOINT = "proxypool_stats"


def _guard(app: Flask) -> t.Callable[[], t.Any]:
    guard = app.config.get("PROXYPOOL_STATS_GUARD")
    if guard is None:
        raise ConfigError(
            "PROXYPOOL_STATS_GUARD is required when PROXYPOOL_STATS_URL is set: a callable (or 'module:attr' "
            "naming one) taking no arguments that returns True to allow a request, e.g. one that checks "
            "request.remote_addr or an Authorization header"
        )
    if isinstance(guard, str):
        try:
            guard = import_string(guard)
        except Exception as e:  # config's own error type says what was expected
            raise ConfigError(f"PROXYPOOL_STATS_GUARD must be a callable or an importable 'module:attr': {e}") from None
    if not callable(guard):
        raise ConfigError(f"PROXYPOOL_STATS_GUARD must be a callable or a 'module:attr' string, got {guard!r}")
    return t.cast(t.Callable[[], t.Any], guard)


def register_stats_endpoint(app: Flask) -> None:
    """Add the stats view to `app` if `PROXYPOOL_STATS_URL` is set; validate its guard."""
    url = app.config.setdefault("PROXYPOOL_STATS_URL", None)
    if url is None:
        return
    if not isinstance(url, str) or not url.startswith("/"):
        raise ConfigError(f"PROXYPOOL_STATS_URL must be None (off) or a path starting with '/', got {url!r}")
    guard = _guard(app)
    name = app.name

    def proxypool_stats() -> Response:
        if not guard():
            abort(403)
        pools = app_state(current_app).stats()
        # every pool's held resources in one list, oldest first: what to look at when a pool runs dry
        held = sorted((h for s in pools.values() for h in s.held), key=lambda h: -float(h["age"]))
        resp = jsonify(app=name, pid=os.getpid(), held=held, pools={n: s.to_dict() for n, s in pools.items()})
        resp.headers["Cache-Control"] = "no-store"
        return resp

    app.add_url_rule(url, endpoint=ENDPOINT, view_func=proxypool_stats, methods=["GET"])
