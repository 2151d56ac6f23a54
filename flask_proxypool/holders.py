"""Who took a resource, and how to cut its holder off: for the reclaim of resources nobody gives back.

Recorded at checkout outside a request only (`record_taker`: a bounded frame
walk, no traceback); `entries.where` turns the record into "file:line" when
it is reported. The max_hold reclaim cuts a holder's connection with
`shutdown_socket`, which is safe while the holder's thread still uses it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
import threading
import types
import typing as t

__all__ = ["record_taker", "shutdown_socket", "socket_id"]

#: Frames of these files are skipped when recording where a resource was taken (the first caller
#: outside flask_proxypool, through `borrow`'s and `connection`'s context managers).
_PKG_DIR = os.path.dirname(__file__) + os.sep
_CONTEXTLIB = contextlib.__file__
#: At most this many frames are walked: a bounded cost per checkout outside a request.
_WALK = 16


#: Each thread's own `threading.Thread`, found once per thread (cheaper than `current_thread()`).
_thread_of = threading.local()


def record_taker() -> tuple[threading.Thread, types.CodeType, int]:
    """The taking thread, and the code and instruction of its first caller outside flask_proxypool.

    Called on checkouts outside a request only (inside one, the endpoint
    names the holder and teardown gives it back). No traceback or inspect: a
    bounded walk of `sys._getframe` frames, starting at the caller of the
    caller. The line number is worked out only when reported (`where`).
    Measured (CPU per getconn+putconn, 3.11 / 3.13t): +0.5 us for a direct
    `getconn`, +1.0 us through `pool.connection()` (two more frames to
    walk); nothing measurable inside a request, which never calls this.
    """
    try:
        thread = _thread_of.thread
    except AttributeError:
        thread = _thread_of.thread = threading.current_thread()
    try:
        f: types.FrameType | None = sys._getframe(2)
    except ValueError:  # called from the top of a stack (no Python caller): nothing to name
        f = None
    for _ in range(_WALK):
        if f is None:
            break
        code = f.f_code
        filename = code.co_filename
        if not filename.startswith(_PKG_DIR) and filename != _CONTEXTLIB:
            return thread, code, f.f_lasti
        f = f.f_back
    return thread, record_taker.__code__, -1


def socket_id(resource: object) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the resource's socket if it has one (`fileno()`), else None.

    Read once, when the resource is made: the max_hold reclaim compares it
    with what the descriptor is when it cuts the connection, so it never shuts
    down a socket that reused the descriptor number of one closed meanwhile.
    """
    fileno = getattr(resource, "fileno", None)
    if not callable(fileno):
        return None
    try:
        st = os.fstat(fileno())
    except Exception:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def shutdown_socket(resource: t.Any, expected: tuple[int, int]) -> bool:
    """Shut down the resource's socket, both ways, through a duplicate of its descriptor.

    Safe while another thread uses the resource: the holder's own descriptor
    stays open (nothing is freed under libpq), but every read and write on it
    fails from now on (a blocked read returns at once, at end of file). The
    duplicate keeps the socket alive while its identity is compared, so a
    descriptor number reused by another socket is never touched.
    """
    try:
        dup = os.dup(resource.fileno())
    except Exception:
        return False  # closed meanwhile: nothing to cut
    try:
        st = os.fstat(dup)
        if (st.st_dev, st.st_ino) != expected:
            return False
        sock = socket.socket(fileno=dup)
        dup = -1  # the socket object owns it now
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()  # the duplicate only
        return True
    except OSError:
        return False
    finally:
        if dup >= 0:
            os.close(dup)
