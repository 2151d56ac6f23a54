"""``BENCH_LAYOUT=<seed>``: a random layout of CPython's type cache for the app a benchmark server loads.

Why: on free-threaded 3.13t a miss in the type-attribute cache (4,096 slots,
direct-mapped: a slot is ``(type's version tag ^ name's address >> 3) % 4096``)
takes a process-wide lock, and with 8 threads on 2 cores the threads that find
it held spin on it (``sched_yield``): about a third of a gunicorn worker's CPU
in ``perf``, the per-thread baseline's as much as a pool's. Which lookups
collide is set by the order types get their version tags and where names
are allocated, so it is much the same in every process of the same code, and
a few lines added anywhere move it: counted with gdb (one thread, the request of
bench/apps.py), misses per request were 40, 48, 58 and 65 for the baseline and
70-79 for flask_proxypool in four layouts. One layout per approach is one draw
of that lottery, the same draw in every round of a run; this module makes each
server process draw its own, so a median over rounds measures the code, not
its luck (the layout bias of Mytkowicz et al., "Producing wrong data without
doing anything obviously wrong!", ASPLOS 2009).

Imported by bench/apps.py before Flask, psycopg and the extension: it makes a
seeded number of classes and gives each a version tag (an attribute lookup),
so every type looked up later gets another tag, and allocates a seeded number
of small objects, so the names interned later sit elsewhere. Without the
variable it does nothing.
"""

from __future__ import annotations

import os
import random

_kept: list[object] = []  #: alive for the process's life: what they took stays taken


def shift(seed: str | None = os.environ.get("BENCH_LAYOUT")) -> None:
    if not seed:
        return
    rng = random.Random(int(seed))
    for i in range(rng.randrange(256)):
        cls = type(f"_Layout{i}", (), {"tag": i})
        _kept.append(cls.tag)  # a lookup through the type: it takes the next version tag
        _kept.append(cls)
    _kept.extend(f"{i}-{rng.random()}" for i in range(rng.randrange(512)))


shift()
