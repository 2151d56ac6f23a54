"""gunicorn server hooks: `from flask_proxypool.gunicorn import when_ready, worker_exit` in gunicorn.conf.py.

Importing this module does not import gunicorn.
"""

from __future__ import annotations

import typing as t

from .state import close_all

__all__ = ["when_ready", "worker_exit"]


def when_ready(server: t.Any) -> None:
    """In the master, before any worker is forked: give back what loading the app opened.

    With `--preload` the app factory runs in the master, and anything it
    did with a pool (creating tables, warming a cache) left connections
    there that no worker may use. Closing them keeps the server's connection
    count at workers x max_size. Without `--preload` the master has no
    pools and this does nothing.
    """
    close_all(timeout=0)


def worker_exit(server: t.Any, worker: t.Any) -> None:
    """In a worker that is exiting, after its in-flight requests finished: close its pools cleanly."""
    close_all(timeout=float(getattr(getattr(server, "cfg", None), "graceful_timeout", 5.0) or 5.0))
