"""Run a call that may hang (a check against a dead peer, a query to a server that stopped answering) with a deadline.

Written once for the pool's bounded checks, the CLI's checks and the sizing
advice's server queries: the call runs in a daemon thread, so a caller that
gives up is never stuck with it; the thread is left to finish on its own.
"""

from __future__ import annotations

import threading
import typing as t

__all__ = ["DeadlineExceeded", "run_with_deadline"]

R = t.TypeVar("R")


class DeadlineExceeded(Exception):
    """The call did not finish in time; it may still be running in its thread."""


def run_with_deadline(fn: t.Callable[[], R], timeout: float, name: str) -> R:
    """`fn()`'s result, or its exception, if it finishes within `timeout` seconds.

    Args:
        name: the helper thread's name (it shows in thread dumps and py-spy).

    Raises:
        DeadlineExceeded: it did not; `fn` goes on in the background.
    """
    outcome: list[tuple[bool, t.Any]] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # handed to the caller below
            outcome.append((False, e))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise DeadlineExceeded(f"did not finish within {timeout:g} sec")
    ok, value = outcome[0]
    if not ok:
        raise value
    return t.cast(R, value)
