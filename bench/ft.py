"""Free-threaded CPython (3.13t) next to 3.11: does checkout + return scale with threads, and the HTTP benchmark.

``python -m bench --only ft [--ft-python PATH]`` (or ``bench/run --only ft``) runs this part alone; the
interpreter running the harness (.venv, 3.11) is the reference, ``--ft-python`` (default
``.venv-ft/bin/python``, made by scripts/setup-ft.sh) the other one.

**micro**: one worker process per interpreter (``python -m bench.ft worker DSN``: one JSON command per
line on stdin, one JSON answer per line on stdout) builds the pools of ``micro.SCALING`` (flask_proxypool's
``Pool``, psycopg_pool, ProxyPatternPool and the bare LifoQueue) with micro.Setup and times them with
micro.threaded_once: N threads on a pool of N for N = 1, 2, 4 (nobody ever waits for a connection: this
measures how the pool itself scales), and 4 threads on a pool of 2 (contention). Per round the contenders
rotate; each (contender, shape) runs on both interpreters back to back, the first one alternating from
round to round. Speedup (÷ 1 thread), ÷ psycopg_pool and 3.13t ÷ 3.11 are taken within a round, then the
median over rounds.

**http**: the 1 worker × 8 threads and the 2 workers × 4 threads phases of bench/httpbench.py, each approach
served by one gunicorn per interpreter, the baseline twice (``baseline_twin``: the same code, whose ratio to
the baseline is the run's noise, shown next to each goal). Many short rounds: within a round each
interpreter's servers run back to back, in the orders of a Williams square (``williams``), and the
interpreter that goes first alternates, so a ratio to the baseline compares measurements seconds apart (a
noisy host moved whole minutes by ±15%). Every round starts every server afresh: on 3.13t one process of
the same code ran 10-14% dearer than another for as long as both ran, so ratios from one set of processes
measured the processes as much as the code. Each server also draws its own layout of CPython's type cache
(``BENCH_LAYOUT``, bench/layout.py): which attribute lookups collide there, and so how often 3.13t's threads
spin on its lock, is much the same in every process of the same code.

**instructions**: the request of bench/apps.py counted in machine instructions by callgrind on each
interpreter (bench/instructions.py): what the extension adds per request, without the host's noise.

**GIL**: every worker process and every gunicorn worker reports ``sys._is_gil_enabled()`` (common.runtime)
after its imports and pools are set up and again after measuring.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import traceback
import typing as t
from dataclasses import dataclass, replace
from pathlib import Path

from . import httpbench, instructions
from .common import ROOT, Database, Quiet, log, median, runtime
from .micro import SCALING, Contender, Setup, threaded_once

#: (threads, pool size): no thread ever waits at N on N (8 on 8: issue 12's goal); 4 on a pool of 2 is contention
SHAPES = ((1, 1), (2, 2), (4, 4), (8, 8), (4, 2))
#: what the pools are compared with, on the same interpreter
REF = "psycopg_pool"

#: the 1 worker x 8 threads phase: the per-thread baseline and two pools (more with --http-approaches)
HTTP_APPROACHES = ("baseline", "baseline_twin", "flask_proxypool", "psycopg_pool")
#: full mode: rounds x seconds per measurement, the servers started afresh for each round, and the seconds of
#: their warm-up (all at once: a fifth less time a round than one warm-up per server). 5 x 6 s on one set of
#: processes moved the ratios by ±10% from run to run; on 3.13t two 2 s measurements of one process in a row
#: differ by about ±7% in CPU per request (2 x 4, the baseline against itself, alternating or side by side
#: alike), so a round's ratio to the baseline moves by ±10% and more, and the 90% interval of the median of 12
#: rounds was about ±8% wide: too coarse for goals of 5%. 24 rounds: about ±5%, and a run of 30 min, not 20.
HTTP_ROUNDS, HTTP_SECONDS, HTTP_WARMUP = 24, 2, 2
#: seeds the type-cache layouts the HTTP rounds' servers draw (bench/layout.py): a run can be repeated
LAYOUT_SEED = "ft-http-"


def shape_key(threads: int, size: int) -> str:
    return f"{threads}on{size}"


@dataclass(frozen=True)
class Interp:
    """One interpreter of the comparison, named after what it reports (``3.11``, ``3.13t``)."""

    label: str
    python: str
    runtime: dict[str, t.Any]  #: common.runtime() in its worker process, once the pools are built
    missing: tuple[str, ...]  #: modules of httpbench.NEEDS it does not have

    @property
    def tag(self) -> str:  # for keys and application_name
        return "_py" + self.label.replace(".", "")


# -- the worker process -------------------------------------------------------------


def worker(dsn: str) -> None:
    """Serve commands from stdin until ``quit``: ``prepare`` (build the pools), ``measure``, ``runtime``."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    setups: dict[int, tuple[Setup, dict[str, Contender]]] = {}

    def contenders(size: int) -> dict[str, Contender]:
        if size not in setups:
            s = Setup(dsn, size)
            setups[size] = (s, {})  # closed at exit even if building fails halfway
            setups[size][1].update((c.key, c) for c in s.scaling_contenders())
        return setups[size][1]

    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            out: dict[str, t.Any]
            try:
                if cmd["cmd"] == "prepare":
                    built = [contenders(size) for size in cmd["sizes"]][0]
                    out = {
                        "contenders": {k: {"label": c.label, "skip": c.skip} for k, c in built.items()},
                        "missing": sorted(
                            m for m in set(httpbench.NEEDS.values()) if importlib.util.find_spec(m) is None
                        ),
                        "runtime": runtime(),
                    }
                elif cmd["cmd"] == "measure":
                    c = contenders(cmd["size"])[cmd["key"]]
                    out = threaded_once(c, cmd["duration"], cmd["threads"])
                elif cmd["cmd"] == "runtime":
                    out = runtime()
                else:
                    out = {}
            except Exception:
                out = {"error": traceback.format_exc()}
            proto.write(json.dumps(out) + "\n")
            if cmd["cmd"] == "quit":
                break
    finally:
        for s, _ in setups.values():
            s.close()


class Worker:
    """A worker process on one interpreter, spoken to one JSON line at a time."""

    def __init__(self, python: str, dsn: str) -> None:
        self.python = python
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("PYTHON_GIL", None)  # the build's default, not an override
        self.proc = subprocess.Popen([python, "-m", "bench.ft", "worker", dsn], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, cmd: str, **args: t.Any) -> dict[str, t.Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.ft worker on {self.python} exited ({self.proc.wait(10)}) during {cmd}")
        out = t.cast(dict[str, t.Any], json.loads(line))
        if "error" in out:
            raise RuntimeError(f"bench.ft worker on {self.python}, {cmd} {args}:\n{out['error']}")
        return out

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("quit")
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)


# -- micro ---------------------------------------------------------------------------


def _ratio(num: list[dict[str, t.Any]], den: list[dict[str, t.Any]], key: str = "ops_s") -> float:
    """The median of round-by-round ratios (both lists hold one measurement per round)."""
    return median([a[key] / b[key] for a, b in zip(num, den, strict=True) if b[key]])


def micro(db: Database, pythons: list[str], smoke: bool, quiet: Quiet) -> tuple[list[Interp], dict[str, t.Any]]:
    rounds, duration = (1, 0.1) if smoke else (3, 1.0)
    workers = [Worker(py, db.dsn(f"bench_ft_micro_{i}")) for i, py in enumerate(pythons)]
    try:
        prepared = [w.call("prepare", sizes=sorted({size for _, size in SHAPES})) for w in workers]
        interps = [Interp(_label(p["runtime"]), w.python, p["runtime"], tuple(p["missing"]))
                   for w, p in zip(workers, prepared, strict=True)]  # fmt: skip
        if len({i.label for i in interps}) < len(interps):
            raise RuntimeError(f"two of {pythons} are the same interpreter ({[i.label for i in interps]})")
        keys = [k for k in SCALING if all(not p["contenders"][k]["skip"] for p in prepared)]
        log(f"ft micro: {len(keys)} contenders x {len(SHAPES)} shapes x {len(interps)} interpreters, "
            f"{rounds} round(s) of {duration:g} s each")  # fmt: skip
        pids = lambda: [w.pid for w in workers]  # noqa: E731
        samples: dict[str, dict[str, dict[str, list[dict[str, t.Any]]]]] = {
            i.label: {k: {shape_key(*s): [] for s in SHAPES} for k in keys} for i in interps
        }
        for r in range(rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                for threads, size in SHAPES:
                    order = list(zip(interps, workers, strict=True))
                    for interp, w in order if r % 2 == 0 else order[::-1]:
                        one = lambda w=w, key=key, threads=threads, size=size: w.call(  # noqa: E731
                            "measure", key=key, threads=threads, size=size, duration=duration
                        )
                        m = quiet.run(f"ft micro {interp.label} {key} {threads} on {size}", one, pids)
                        del m["per_thread"]  # fairness says it; keeps the json small
                        samples[interp.label][key][shape_key(threads, size)].append(m)
            log(f"ft micro: round {r + 1}/{rounds} done")
        after = {i.label: w.call("runtime") for i, w in zip(interps, workers, strict=True)}
    finally:
        for w in workers:
            w.close()

    first, ref = interps[0].label, REF if REF in keys else None
    rows: dict[str, t.Any] = {}
    for key in SCALING:
        row: dict[str, t.Any] = {"label": prepared[0]["contenders"][key]["label"], "by": {}}
        for interp, p in zip(interps, prepared, strict=True):
            if key not in keys:
                skip = p["contenders"][key]["skip"]
                row["by"][interp.label] = {"skip": skip or "not installed on another interpreter"}
                continue
            mine = samples[interp.label][key]
            row["by"][interp.label] = {
                sk: {
                    "ops_s": median([m["ops_s"] for m in rs]),
                    "cpu_us_per_op": median([m["cpu_us_per_op"] for m in rs]),
                    "fairness": median([m["fairness"] for m in rs]),
                    "foreign_cores": max(m["foreign_cores"] for m in rs),
                    "speedup": _ratio(rs, mine[shape_key(*SHAPES[0])]),
                    "vs_ref": None if ref is None else _ratio(rs, samples[interp.label][ref][sk]),
                    "cpu_vs_ref": None if ref is None else _ratio(rs, samples[interp.label][ref][sk], "cpu_us_per_op"),
                    "vs_first": None if interp.label == first else _ratio(rs, samples[first][key][sk]),
                    "rounds": rs,
                }
                for sk, rs in mine.items()
            }
        rows[key] = row
    return interps, {
        "method": {"rounds": rounds, "duration_s": duration},
        "ref": ref,
        "shapes": [{"key": shape_key(*sh), "threads": sh[0], "pool_size": sh[1]} for sh in SHAPES],
        "runtime_after": after,
        "contenders": rows,
    }


def _label(rt: dict[str, t.Any]) -> str:
    return ".".join(rt["python"].split(".")[:2]) + ("t" if rt["free_threaded_build"] else "")


# -- http ------------------------------------------------------------------------------


def williams(n: int) -> list[list[int]]:
    """Orders of n servers in which each comes first, last and right after every other one equally often.

    A plain rotation (a b c d, b c d a, ...) put the baseline's twin right after the baseline in three
    rounds of four: over 36 rounds of two runs on 3.13t (2 x 4) the twin, the same code, cost 1.05x the
    baseline's CPU per request (90% interval 1.02-1.09x), an effect of the order, not of the code. A Williams
    square balances what ran just before (n rows for an even n, 2n for an odd one).
    """
    first = [0]
    lo, hi = 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def http(db: Database, interps: list[Interp], approaches: t.Sequence[str], smoke: bool, quiet: Quiet,
         logdir: Path, shape: str = "1x8") -> dict[str, t.Any]:  # fmt: skip
    """One HTTP phase of httpbench (``shape``: ``1x8``, 1 worker x 8 threads, or ``2x4``) on every interpreter."""
    rounds, duration, warmup = (1, 1, 0) if smoke else (HTTP_ROUNDS, HTTP_SECONDS, HTTP_WARMUP)
    phase = next(p for p in httpbench.phases(approaches) if p.key == shape)
    phase = replace(phase, key="ft" + shape)  # pools sized to a worker's threads, as in httpbench
    skips: dict[str, str] = {}
    servers = []
    for a in approaches:
        for i in interps:
            module = httpbench.NEEDS.get(a)
            if module in i.missing:
                skips[a + i.tag] = f"not installed on {i.label} ({module})"
            else:
                servers.append(httpbench.Server(phase, a, db, logdir, python=i.python, tag=i.tag))
    log(f"ft http: {phase.title}, {len(servers)} servers, {rounds} x {duration} s")
    groups = [[s for s in servers if s.tag == i.tag] for i in interps]

    def order_of(r: int) -> list[httpbench.Server]:
        """Each interpreter's servers back to back in the order of a Williams square (below); the first
        interpreter alternates."""
        out = []
        for g in groups if r % 2 == 0 else groups[::-1]:
            if g:
                rows = williams(len(g))
                out += [g[i] for i in rows[(r // 2) % len(rows)]]
        return out

    samples: dict[str, list[dict[str, t.Any]]] = {s.key: [] for s in servers}
    after: dict[str, t.Any] = {}
    layouts = random.Random(LAYOUT_SEED + shape)
    for r in range(rounds):
        # Fresh servers every round: on 3.13t two servers running the same code differed by 10-14% in CPU
        # per request for as long as they ran (the baseline and its twin, round after round), more than the
        # goals' 5%; a median over rounds of fresh processes averages that out. Each draws its own layout
        # of the type cache (bench/layout.py): one layout is the same draw in every round.
        for s in servers:
            s.env["BENCH_LAYOUT"] = str(layouts.randrange(1, 1 << 30))
        with httpbench.serving(phase, servers, warmup, together=True):
            got = httpbench.measure_rounds(
                phase, servers, 1, duration, db, smoke, quiet, order_of=lambda _, r=r: order_of(r)
            )
            if r == rounds - 1:
                after = {s.key: s.runtime() for s in servers}
        for key, ms in got.items():
            samples[key] += ms
        log(f"ft http {phase.key}: round {r + 1}/{rounds} done (servers started afresh for each)")
    ref = interps[0]
    out: dict[str, t.Any] = {
        "title": phase.title,
        "threads": phase.threads,
        "pool_size": phase.pool_size,
        "wrk_connections": phase.wrk_connections,
        "method": {"rounds": rounds, "duration_s": duration, "warmup_s": warmup, "parallel": smoke},
        "runtime_after": after,
        "approaches": {},
    }
    for a in approaches:
        row: dict[str, t.Any] = {"label": httpbench.LABELS[a], "by": {}}
        for i in interps:
            key = a + i.tag
            if key in skips:
                row["by"][i.label] = {"skip": skips[key]}
                continue
            cell = httpbench.summarize(samples[key], samples.get("baseline" + i.tag, []), httpbench.RATIO_KEYS)
            if i is not ref and a + ref.tag in samples:
                cell["vs_ref"] = {k: _ratio(samples[key], samples[a + ref.tag], k)
                                  for k in ("rps", "cpu_us_per_req")}  # fmt: skip
            row["by"][i.label] = cell
        out["approaches"][a] = row
    return out


def run(db: Database, smoke: bool, quiet: Quiet, ft_python: str,
        approaches: t.Sequence[str] = HTTP_APPROACHES) -> dict[str, t.Any]:  # fmt: skip
    """Both parts; the harness's interpreter is the reference, ``ft_python`` the other."""
    if not Path(ft_python).exists():
        raise RuntimeError(f"{ft_python} not found: run scripts/setup-ft.sh (bench/run --only ft does)")
    interps, mi = micro(db, [sys.executable, ft_python], smoke, quiet.part(60.0))
    free = [i.label for i in interps if not i.runtime.get("gil_enabled", True)]
    ins = instructions.run(db, {i.label: i.python for i in interps}, smoke, free)
    logdir = Path(tempfile.mkdtemp(prefix="ppbench-ft-logs-"))
    try:
        ht = http(db, interps, approaches, smoke, quiet.part(60.0), logdir)
        ht2 = http(db, interps, approaches, smoke, quiet.part(60.0), logdir, "2x4")
    except BaseException:
        log(f"server logs kept in {logdir}")
        raise
    shutil.rmtree(logdir, ignore_errors=True)
    return {
        "interpreters": [{"label": i.label, "tag": i.tag, "python": i.python, "runtime": i.runtime} for i in interps],
        "micro": mi,
        "instructions": ins,
        "http": ht,
        "http_2x4": ht2,
    }


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.ft worker DSN  (started by python -m bench --only ft)")
    worker(sys.argv[2])
