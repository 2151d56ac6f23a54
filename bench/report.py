"""Markdown tables, the targets verdicts, the PNG chart and docs/performance.md from one results dict."""

from __future__ import annotations

import math
import typing as t
from statistics import fmean
from pathlib import Path

from .common import ROOT, median

# -- formatting ---------------------------------------------------------------


def _f(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}"


def _x(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}×"


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    seps = [":--" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(seps) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# -- tables ---------------------------------------------------------------------


def micro_single_table(micro: dict[str, t.Any]) -> str:
    single = micro["single"]
    ref = single.get("psycopg_pool", {}).get("best_us")
    rows = []
    for key, r in single.items():
        label = r["label"] + (" *(reference)*" if r.get("info") else "")
        if "skip" in r:
            rows.append([label, r["skip"], "", ""])
            continue
        ratio = r["best_us"] / ref if ref else None
        rows.append([label, _f(r["best_us"], 3), _f(r["median_us"], 3), _x(ratio) if key != "select1" else "—"])
        for base, what in (
            ("flask_ctx_bare", "net of a bare Flask app's context push/pop: what the extension adds, hooks included"),
            ("flask_ctx", "net of the same app's context push/pop (our idle teardown hook excluded)"),
        ):
            net = proxy_net(single, base) if key == "fpp_proxy" else None
            if net is not None:
                rows.append(
                    [f"↳ the same, {what} (difference of the best figures)", _f(net[0], 3), _f(net[1], 3),
                     _x(net[0] / ref if ref else None)]
                )  # fmt: skip
    return _table(["one thread, no query", "best µs/op", "median µs/op", "best ÷ psycopg_pool getconn/putconn"], rows)


def proxy_net(single: dict[str, t.Any], base: str = "flask_ctx_bare") -> tuple[float, float] | None:
    """The proxy path (first access + teardown return) minus an app context push/pop alone: (best, median) µs.

    ``flask_ctx_bare`` (an app without the extension) is the strict base: the difference is everything the
    extension costs a context, its teardown hook included.
    """
    p, c = single.get("fpp_proxy", {}), single.get(base, {})
    if "best_us" not in p or "best_us" not in c:
        return None
    return p["best_us"] - c["best_us"], p["median_us"] - c["median_us"]


def micro_multi_table(micro: dict[str, t.Any]) -> str:
    multi = micro["multi"]
    ref = multi.get("psycopg_pool", {}).get("ops_s")
    floor = multi.get("lifoqueue", {}).get("ops_s")
    rows = []
    for _key, r in multi.items():
        if "skip" in r:
            rows.append([r["label"], r["skip"], "", "", "", ""])
            continue
        rows.append(
            [
                r["label"],
                _f(r["ops_s"], 0),
                _x(r["ops_s"] / ref if ref else None),
                _x(r["ops_s"] / floor if floor else None),
                _f(r["fairness"], 2),
                _f(r.get("foreign_cores"), 2),
            ]
        )
    head = [
        f"{micro['threads']} threads on a pool of {micro['pool_size']}",
        "ops/s (median)",
        "÷ psycopg_pool",
        "÷ LifoQueue",
        "fairness (min/max per thread)",
        "other load (cores)",
    ]
    return _table(head, rows)


def http_table(phase: dict[str, t.Any]) -> str:
    """Throughput and cost per approach (saturated pass)."""
    rows = []
    for _key, r in phase["approaches"].items():
        if "skip" in r:
            rows.append([r["label"], r["skip"]] + [""] * 7)
            continue
        m, q = r["median"], r.get("ratio", {})
        rows.append(
            [
                r["label"],
                _f(m["rps"], 0),
                _x(q.get("rps")),
                _f(m["server_connections"], 0),
                _f(m["cpu_us_per_req"], 0),
                _x(q.get("cpu_us_per_req")),
                _f(m.get("db_cpu_us_per_req"), 0),
                _f(m.get("foreign_cores"), 2),
                str(r["errors"] + (_get(r, "paced", "errors") or 0)),
            ]
        )
    head = ["approach", "req/s", "÷ baseline", "max server conns", "app CPU µs/req", "÷ baseline",
            "PG CPU µs/req", "other load (cores)", "errors"]  # fmt: skip
    return _table(head, rows)


def latency_table(phase: dict[str, t.Any]) -> str:
    """Latency per approach: saturated, and at half the baseline's req/s when measured."""
    paced = any("paced" in r for r in phase["approaches"].values())
    rows = []
    for _key, r in phase["approaches"].items():
        if "skip" in r:
            rows.append([r["label"], r["skip"]] + [""] * (5 if paced else 2))
            continue
        m, q = r["median"], r.get("ratio", {})
        row = [r["label"], _f(m["p50_ms"], 1), _f(m["p99_ms"], 1), _x(q.get("p99_ms"))]
        if paced:
            pm, pq = _get(r, "paced", "median") or {}, _get(r, "paced", "ratio") or {}
            row += [_f(pm.get("p50_ms"), 2), _f(pm.get("p99_ms"), 1), _x(pq.get("p99_ms"))]
        rows.append(row)
    head = ["approach", "p50 ms, saturated", "p99 ms, saturated", "p99 ÷ baseline"]
    if paced:
        head += ["p50 ms, half load", "p99 ms, half load", "p99 ÷ baseline, half load"]
    return _table(head, rows)


# -- targets ----------------------------------------------------------------------


def _get(d: t.Any, *path: str) -> t.Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def targets(res: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    """Each target: what, goal, measured text, verdict (pass / FAIL / n/a). Never fails the run."""
    out: list[dict[str, t.Any]] = []

    def add(what: str, goal: str, value: float | None, ok: bool | None, shown: str | None = None) -> None:
        verdict = "n/a" if ok is None else ("pass" if ok else "FAIL")
        out.append({"target": what, "goal": goal, "value": value, "measured": shown or _f(value, 2),
                    "verdict": verdict})  # fmt: skip

    s = _get(res, "micro", "single") or {}
    m = _get(res, "micro", "multi") or {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    r = ratio(_get(s, "fpp_pool", "best_us"), _get(s, "psycopg_pool", "best_us"))
    add("pool checkout + return, 1 thread (÷ psycopg_pool getconn/putconn)", "≤ 0.50", r,
        None if r is None else r <= 0.5, _x(r))
    pw = _get(s, "psycopg_pool_with", "best_us")
    gross = ratio(_get(s, "fpp_proxy", "best_us"), pw)
    net = proxy_net(s)
    r = ratio(net[0], pw) if net else None
    recipe = _get(s, "psycopg_pool_flask", "best_us")
    bare = _get(s, "flask_ctx_bare", "best_us")
    like = ""
    if net and recipe is not None and bare is not None and recipe > bare:
        like = f"; like for like, ÷ psycopg_pool's Flask recipe net of the same context: {_x(net[0] / (recipe - bare))}"
    add("full proxy path: first access + teardown return, net of a bare Flask app context "
        "(÷ psycopg_pool `with pool.connection()`)", "≤ 0.60", r, None if r is None else r <= 0.6,
        f"{_x(r)} (gross, with Flask's push/pop: {_x(gross)}{like})")
    v = _get(s, "fpp_attr", "best_us")
    add("proxied attribute access, bound (µs)", "< 0.25 µs", v, None if v is None else v < 0.25,
        None if v is None else f"{v:.3f} µs")
    r = ratio(_get(m, "fpp_pool", "ops_s"), _get(m, "psycopg_pool", "ops_s"))
    add("8 threads on 4: throughput ÷ psycopg_pool", "≥ 2.00", r, None if r is None else r >= 2.0, _x(r))
    r = ratio(_get(m, "fpp_pool", "ops_s"), _get(m, "lifoqueue", "ops_s"))
    add("8 threads on 4: throughput ÷ bare LifoQueue", "≥ 1.00", r, None if r is None else r >= 1.0, _x(r))
    v = _get(m, "fpp_pool", "fairness")
    add("8 threads on 4: fairness (min/max ops per thread)", "≥ 0.80", v, None if v is None else v >= 0.8)
    for key in ("1x8", "2x4"):
        ph = _get(res, "http", "phases", key, "approaches") or {}
        fpp = ph.get("flask_proxypool", {})
        r = _get(fpp, "ratio", "rps")
        twin = _get(ph, "baseline_twin", "ratio", "rps")
        noise = "" if twin is None else f" (the baseline's identical twin: {_x(twin)})"
        add(f"http {key}: req/s ÷ per-thread baseline", "≥ 0.98", r, None if r is None else r >= 0.98,
            f"{_x(r)}{noise}")  # fmt: skip
        mine_or_ref = ("baseline", "baseline_twin", "flask_proxypool")
        others = {a: _get(row, "median", "rps") for a, row in ph.items()
                  if a not in mine_or_ref and _get(row, "median", "rps")}  # fmt: skip
        mine = _get(fpp, "median", "rps")
        if others and mine:
            best = max(others, key=lambda a: others[a])
            r = mine / others[best]
            add(f"http {key}: req/s ÷ best other pool ({best})", "≥ 1.00", r, r >= 1.0, _x(r))
        else:
            add(f"http {key}: req/s ÷ best other pool", "≥ 1.00", None, None)
        r = _get(fpp, "ratio", "p99_ms")
        add(f"http {key}: p99 ÷ per-thread baseline, saturated (wrk as fast as it can)", "≤ 1.10", r,
            None if r is None else r <= 1.10, _x(r))
        r = _get(fpp, "paced", "ratio", "p99_ms")
        if r is not None:
            add(f"http {key}: p99 ÷ per-thread baseline, at half the baseline's req/s", "≤ 1.10", r, r <= 1.10, _x(r))
    mixed = _get(res, "http", "phases", "mixed", "approaches") or {}
    for key, what in (("flask_proxypool_release", 'max_size=4, `release: "commit"`'),
                      ("flask_proxypool", "max_size=4, default release (teardown)")):  # fmt: skip
        row = mixed.get(key, {})
        r = _get(row, "ratio", "rps")
        if "skip" in row:
            add(f"mixed workload, {what}: req/s ÷ per-thread baseline (16 conns)", "≥ 0.95", None, None,
                row["skip"].split(":")[0])
        else:
            add(f"mixed workload, {what}: req/s ÷ per-thread baseline (16 conns)", "≥ 0.95", r,
                None if r is None else r >= 0.95, _x(r))
    return out


def targets_table(ts: list[dict[str, t.Any]]) -> str:
    rows = [[x["target"], x["goal"], x["measured"], "**FAIL**" if x["verdict"] == "FAIL" else x["verdict"]]
            for x in ts]  # fmt: skip
    return _table(["target", "goal", "measured", "result"], rows, "lrrl")


# -- whole report ------------------------------------------------------------------


def machine_table(mach: dict[str, t.Any], res: dict[str, t.Any] | None = None) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in mach["packages"].items() if v)
    missing = [k for k, v in mach["packages"].items() if not v]
    rows = [
        ["CPUs (nproc)", str(mach["nproc"])],
        ["CPU model", mach["cpu"]],
        ["Python", f"{mach['implementation']} {mach['python']}"],
        ["PostgreSQL", mach["postgresql"]],
        ["OS", mach["os"]],
        ["load generator", mach.get("wrk") or "wrk missing"],
        ["packages", pk + (f"; not installed: {', '.join(missing)}" if missing else "")],
    ]
    if mach.get("source"):
        rows.append(["flask-proxypool measured", f"commit {mach['source']}"])
    noise = (res or {}).get("noise")
    if noise:
        phases = list((_get(res, "http", "phases") or {}).values())
        rows_of = [r for ph in phases for r in ph["approaches"].values()]
        for hkey in ("http", "http_2x4"):
            rows_of += [c for r in (_get(res, "ft", hkey, "approaches") or {}).values() for c in r["by"].values()]
        loads = [m.get("foreign_cores") for r in rows_of for m in r.get("rounds", [])]
        loads = [x for x in loads if x is not None and not math.isnan(x)]
        typical = ""
        if loads:
            mid = sorted(loads)[len(loads) // 2]
            typical = f"; other processes' CPU during HTTP measurements: median {mid:.2f}, max {max(loads):.2f} cores"
        rows.append(["noise", f"{noise['retries']} measurement(s) taken again, {noise['waited_s']:.0f} s spent "
                              f"waiting for a quiet machine{typical}"])  # fmt: skip
    return _table(["", ""], rows, "ll")


def markdown(res: dict[str, t.Any], with_targets: bool = True) -> str:
    """The results as markdown (bench/results/latest.md, and the middle of docs/performance.md).

    The page leaves the targets out (`with_targets=False`): they are the project's own goals, and
    `performance_doc` puts them last.
    """
    parts = [f"Run of {res['started']} ({res['mode']} mode, {res['elapsed_s']:.0f} s).", "", "### Machine", "",
             machine_table(res["machine"], res), ""]  # fmt: skip
    if "targets" in res and with_targets:
        parts += ["### Targets", "", targets_table(res["targets"]), ""]
    if "micro" in res:
        mi = res["micro"]
        meth = mi["method"]
        sel = _get(mi, "single", "select1", "best_us")
        parts += [
            "### Micro: checkout + return, one thread",
            "",
            f"Real psycopg connections, no query; pools of {mi['pool_size']}, all connections made before timing. "
            f"Best and median of {meth['repeats']} repeats of about {meth['seconds_per_repeat']:g} s each, "
            "contenders taking turns."
            + (f" A `SELECT 1` round trip costs {_f(sel, 1)} µs on this machine." if sel else ""),
            "",
            micro_single_table(mi),
            "",
            f"### Micro: {mi['threads']} threads on a pool of {mi['pool_size']}",
            "",
            f"Each thread takes and returns as fast as it can for {meth['duration_s']:g} s; median of "
            f"{meth['rounds']} rounds. Fairness is the fewest operations one thread did divided by the most.",
            "",
            micro_multi_table(mi),
            "",
        ]
    if "http" in res:
        h = res["http"]
        meth = h["method"]
        parts += [
            "### HTTP: `GET /item/<random id>`, one SELECT by primary key",
            "",
            f"`gunicorn -k gthread`, wrk on loopback (2 threads), {meth['duration_s']} s per measurement after a "
            f"{meth['warmup_s']} s warm-up, median of {meth['rounds']} rounds with the approaches taking turns; "
            "ratios are to the per-thread baseline of the same round. Pools hold as many connections as a "
            "worker has threads. *req/s*, *p50* and *p99* are at saturation (each wrk connection sends its "
            "next request as soon as the answer arrives). The *half load* columns come from a second pass "
            f"({meth.get('paced_duration_s', '?')} s per measurement) where wrk offers "
            f"{int(meth.get('paced_load', 0.5) * 100)}% of the baseline's saturated req/s (random, exponential "
            "gaps): latency without the queueing of an overloaded server. *Max server conns* is the most "
            "connections PostgreSQL saw from the approach (all workers); *app CPU* is user + system time of "
            "the gunicorn master and workers per request; *PG CPU* the same for the PostgreSQL server; "
            "*other load* is CPU that processes outside the benchmark used meanwhile (a measurement with "
            f"more than {res.get('noise', {}).get('threshold_cores', 0.25)} cores of it is taken again).",
            "",
        ]
        for key, ph in h["phases"].items():
            if key == "mixed":
                continue
            extra = f", gunicorn {' '.join(ph['gunicorn_args'])}" if ph.get("gunicorn_args") else ""
            half = f", half load = {ph['paced_rps']:,.0f} req/s" if ph.get("paced_rps") else ""
            parts += [f"#### {ph['title']} (wrk {ph['wrk_connections']} connections{extra}{half})", "",
                      http_table(ph), "", latency_table(ph), ""]  # fmt: skip
        mx = h["phases"].get("mixed")
        if mx:
            parts += [
                "### Mixed workload: 16 threads, half the requests without the database",
                "",
                f"`gunicorn -k gthread` 1 worker × {mx['threads']} threads, wrk {mx['wrk_connections']} "
                "connections. Half the requests (`GET /nodb`) never touch the database; the others "
                "(`GET /mixed/<id>`) run one SELECT in a transaction, commit, then spend 2 ms on "
                "non-database work (`time.sleep(0.002)`). The baseline keeps one connection per thread (16); "
                f"the pools have {mx['pool_size']}.",
                "",
                http_table(mx),
                "",
                latency_table(mx),
                "",
            ]
    return "\n".join(parts)


# -- free-threaded Python next to 3.11 (bench/ft.py) ---------------------------------------


def _round_ratio(a: dict[str, t.Any], b: dict[str, t.Any], key: str) -> float | None:
    """Median over rounds of a[key] / b[key], the two measured in the same round."""
    ra, rb = a.get("rounds", []), b.get("rounds", [])
    vals = sorted(x[key] / y[key] for x, y in zip(ra, rb, strict=False) if y.get(key))
    return vals[len(vals) // 2] if vals else None


def clean_markdown(res: dict[str, t.Any]) -> str:
    """``bench/run --only clean``: the session reset (the default) against ``reset: "rollback"``, same run."""
    parts = [f"Run of {res['started']} ({res['mode']} mode, {res['elapsed_s']:.0f} s).", "", "### Machine", "",
             machine_table(res["machine"], res), ""]  # fmt: skip
    for ph in res["http"]["phases"].values():
        ap = ph["approaches"]
        parts += [f"### {ph['title']}", "", http_table(ph), ""]
        new, old = ap.get("flask_proxypool", {}), ap.get("flask_proxypool_rollback", {})
        if "rounds" in new and "rounds" in old:
            twin = _get(ap, "baseline_twin", "ratio", "rps")
            parts += [
                'Session reset (default) ÷ `reset: "rollback"`, round by round, median: '
                f"req/s {_x(_round_ratio(new, old, 'rps'))}, app CPU per request "
                f"{_x(_round_ratio(new, old, 'cpu_us_per_req'))}, PostgreSQL CPU per request "
                f"{_x(_round_ratio(new, old, 'db_cpu_us_per_req'))} (the baseline twin's req/s ratio, this run's "
                f"noise: {_x(twin)}).",
                "",
            ]
    return "\n".join(parts)


def ft_runtime_table(res: dict[str, t.Any]) -> str:
    """Each interpreter: version, psycopg's wrapper, package versions, and the GIL check of every process."""
    f = res["ft"]
    labels = [i["label"] for i in f["interpreters"]]

    def gil(rt: dict[str, t.Any]) -> str:
        if not rt["free_threaded_build"]:
            return "GIL build (always on)"
        return f"`{rt['gil_enabled']}`"

    def cells(fn: t.Callable[[dict[str, t.Any]], str]) -> list[str]:
        return [fn(i) for i in f["interpreters"]]

    def impl(rt: dict[str, t.Any]) -> str:
        kind = {"binary": "C (psycopg-binary)", "c": "C (compiled locally)",
                "python": "pure Python, libpq through ctypes"}.get(rt.get("psycopg_impl") or "", "?")  # fmt: skip
        return f"{rt['packages'].get('psycopg')}, {kind}"

    def servers(interp: dict[str, t.Any]) -> str:
        rts = [rt for key, got in _get(f, "http", "runtime_after").items() if key.endswith(interp["tag"])
               for rt in got]  # fmt: skip
        if not rts:
            return "—"
        return ", ".join(sorted({gil(rt) for rt in rts})) + f" (all {len(rts)} gunicorn workers)"

    rows = [
        ["interpreter", *cells(lambda i: f"CPython {i['runtime']['python']}"
                                         + (" free-threaded build" if i["runtime"]["free_threaded_build"] else "")
                                         + f" (`{_rel(i['python'])}`)")],  # fmt: skip
        ["psycopg", *cells(lambda i: impl(i["runtime"]))],
        ["psycopg_pool, ProxyPatternPool, Flask, gunicorn",
         *cells(lambda i: ", ".join(str(i["runtime"]["packages"].get(p) or "not installed")
                                    for p in ("psycopg-pool", "ProxyPatternPool", "Flask", "gunicorn")))],
        ["`sys._is_gil_enabled()`, micro worker, pools built", *cells(lambda i: gil(i["runtime"]))],
        ["the same, after measuring", *[gil(f["micro"]["runtime_after"][lb]) for lb in labels]],
        ["the same in each gunicorn worker, after the HTTP runs", *cells(servers)],
    ]  # fmt: skip
    return _table(["", *labels], rows, "l" * (len(labels) + 1))


def _rel(path: str) -> str:
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


def ft_micro_table(res: dict[str, t.Any]) -> str:
    """ops/s per pool, interpreter and shape, with the speedup over one thread."""
    mi, labels = res["ft"]["micro"], [i["label"] for i in res["ft"]["interpreters"]]
    shapes, last = mi["shapes"], mi["shapes"][-1]
    rows = []
    for row in mi["contenders"].values():
        for lb in labels:
            c = row["by"][lb]
            if "skip" in c:
                rows.append([row["label"], lb, c["skip"]] + [""] * (len(shapes) + 2))
                continue
            cs = [c[sh["key"]] for sh in shapes]
            rows.append([row["label"], lb]
                        + [_f(x["ops_s"], 0) + ("" if i == 0 else f" ({_x(x['speedup'])})") for i, x in enumerate(cs)]
                        + [_f(cs[-1]["fairness"], 2), _f(cs[-1]["cpu_us_per_op"], 1),
                           _f(max(x["foreign_cores"] for x in cs), 2)])  # fmt: skip
    head = ["checkout + return", "Python"] + [_shape(sh) for sh in shapes]
    head += [f"fairness, {_shape(last, True)}", f"CPU µs/op, {_shape(last, True)}", "other load (cores, max)"]
    return _table(head, rows, "ll" + "r" * (len(head) - 2))


def _shape(sh: dict[str, t.Any], short: bool = False) -> str:
    n, size = sh["threads"], sh["pool_size"]
    if short:
        return f"{n} t" + (f" on {size}" if n > size else "")
    if n == 1:
        return "1 thread, ops/s"
    return f"{n} threads on {size}" + (" (contention)" if n > size else "")


def ft_ratio_table(res: dict[str, t.Any]) -> str:
    """Each pool ÷ psycopg_pool on the same interpreter, and ÷ the same pool on the first interpreter."""
    mi, labels = res["ft"]["micro"], [i["label"] for i in res["ft"]["interpreters"]]
    shapes, ref = mi["shapes"], mi["ref"]
    rows = []
    for row in mi["contenders"].values():
        for lb in labels:
            c = row["by"][lb]
            if "skip" in c:
                continue
            cs = [c[sh["key"]] for sh in shapes]
            rows.append([row["label"], lb]
                        + [_x(x["vs_ref"]) for x in cs]
                        + [_x(x["vs_first"]) for x in cs])  # fmt: skip
    head = ["checkout + return", "Python"] + [f"÷ {_short(ref)}, {_shape(sh, True)}" for sh in shapes]
    head += [f"÷ {labels[0]}, {_shape(sh, True)}" for sh in shapes]
    return _table(head, rows, "ll" + "r" * (len(head) - 2))


def _round_ratios(num: list[float], den: list[float]) -> float | None:
    pairs = [a / b for a, b in zip(num, den, strict=False) if b]
    return median(pairs) if pairs else None


def ft_goals_table(res: dict[str, t.Any]) -> str:
    """Issue 12's goals, each as one ratio taken within rounds then the median, against its target."""
    f = res["ft"]
    mi, labels = f["micro"], [i["label"] for i in f["interpreters"]]
    if len(labels) < 2:
        return ""
    ref, ft = labels[0], labels[-1]
    cs = mi["contenders"]

    def cpu(key: str, lb: str, shape: str) -> list[float] | None:
        cell = _get(cs, key, "by", lb, shape)
        return None if not cell or "rounds" not in cell else [m["cpu_us_per_op"] for m in cell["rounds"]]

    def net(lb: str) -> list[float] | None:  # what the extension adds to a context that takes and returns
        a, b = cpu("fpp_proxy", lb, "1on1"), cpu("flask_ctx_bare", lb, "1on1")
        return None if a is None or b is None else [x - y for x, y in zip(a, b, strict=False)]

    rows: list[list[str]] = []

    def add(goal: str, value: float | None, target: str, ok: bool | None, spread: str = "", noise: str = "") -> None:
        verdict = "—" if ok is None or value is None else ("pass" if ok else "FAIL")
        rows.append([goal, _x(value), spread, noise, target, verdict])

    n_ft, n_ref = net(ft), net(ref)
    v = None if n_ft is None or n_ref is None else _round_ratios(n_ft, n_ref)
    add(f"{ft}, 1 thread: what flask_proxypool adds to `with app.app_context(): db.pgconn` net of a bare app's "
        f"context, ÷ the same on {ref}", v, "≤ 2×", None if v is None else v <= 2.0)  # fmt: skip
    for workload, what, noise in (
        ("context", "`with app.app_context(): db.pgconn`, net of a bare app's context", "no noise"),
        ("request", "a whole request (`GET /item`, through WSGI)", "its query's wait moves it by up to 1%"),
    ):
        cells = _instructions(f, workload)
        if cells and ft in cells and ref in cells:
            a_ft, a_ref = cells[ft]["flask_proxypool"]["added"], cells[ref]["flask_proxypool"]["added"]
            v = a_ft / a_ref if a_ref > 0 else None
            add(f"{ft}, 1 thread: what flask_proxypool adds to {what}, in machine instructions (callgrind: "
                f"{noise}), ÷ the same on {ref}", v, "≤ 2×", None if v is None else v <= 2.0)  # fmt: skip
    cells = _instructions(f, "request")
    if cells:
        for lb in (ft, ref):
            if lb in cells:
                add(f"{lb}: a request through flask_proxypool ÷ the per-thread baseline's, machine instructions",
                    cells[lb]["flask_proxypool"]["ratio"], "(info)", None)  # fmt: skip
                if "floor" in cells[lb]:
                    add(f"{lb}: the same through the floor of any pool (`list.pop` into `g`, `list.append` at "
                        "teardown: no reset, no waiting, no stats) ÷ the baseline's, machine instructions",
                        cells[lb]["floor"]["ratio"], "(info)", None)  # fmt: skip
    for lb, (base, fpp) in _layout_misses(f).items():
        add(f"{lb}: type-cache misses per request (a request in a thread, mean of {len(base)} layouts), "
            "flask_proxypool ÷ the per-thread baseline's", fmean(fpp) / fmean(base) if fmean(base) else None,
            "(info)", None)  # fmt: skip
    cells = _instructions(f, "http")
    if cells:
        for lb in (ft, ref):
            if lb in cells:
                add(f"{lb}: an HTTP request (gunicorn 1 worker x 8 threads, its whole worker process) through "
                    "flask_proxypool ÷ the per-thread baseline's, machine instructions",
                    cells[lb]["flask_proxypool"]["ratio"], "(info)", None)  # fmt: skip
    for lb in (ft, ref):
        for key, what in (("fpp_proxy", "full proxy path"), ("fpp_pool", "`Pool` getconn/putconn alone")):
            one, eight = cpu(key, lb, "1on1"), cpu(key, lb, "8on8")
            v = None if one is None or eight is None else _round_ratios(eight, one)
            goal = key == "fpp_proxy"
            add(f"{lb}, 8 threads on 8: {what}, CPU per operation ÷ 1 thread", v, "≤ 1.5×" if goal else "(info)",
                (None if v is None else v <= 1.5) if goal else None)  # fmt: skip
    for hkey in ("http", "http_2x4"):
        h = f.get(hkey)
        if not h:
            continue
        for lb in (ft, ref):
            c = _get(h, "approaches", "flask_proxypool", "by", lb) or {}
            q = c.get("ratio", {})
            strict = lb == ft
            rps, cpu_ = q.get("rps"), q.get("cpu_us_per_req")
            base = (_get(h, "approaches", "baseline", "by", lb) or {}).get("rounds", [])
            twin = _get(h, "approaches", "baseline_twin", "by", lb, "ratio") or {}

            mine = c.get("rounds", [])

            def spread(key: str, mine: list[dict[str, t.Any]] = mine, base: list[dict[str, t.Any]] = base) -> str:
                return _median_interval([m[key] / b[key] for m, b in zip(mine, base, strict=False) if b[key]])

            add(f"{lb}, HTTP {h['title']}: flask_proxypool req/s ÷ the per-thread baseline", rps,
                "≥ 0.95×" if strict else "(within noise)", (None if rps is None else rps >= 0.95) if strict else None,
                spread("rps"), _x(twin.get("rps")) if twin else "")
            add(f"{lb}, HTTP {h['title']}: flask_proxypool app CPU per request ÷ the baseline", cpu_,
                "≤ 1.05×" if strict else "(within noise)",
                (None if cpu_ is None else cpu_ <= 1.05) if strict else None,
                spread("cpu_us_per_req"), _x(twin.get("cpu_us_per_req")) if twin else "")  # fmt: skip
    for shape in ("2on2", "4on4", "8on8"):
        a, b = _get(cs, "fpp_pool", "by", ft, shape), _get(cs, "lifoqueue", "by", ft, shape)
        v = None if not a or not b or "speedup" not in a or "speedup" not in b else a["speedup"] / b["speedup"]
        add(f"{ft}, `Pool` checkout + return, {shape.replace('on', ' threads on ')}: speedup over 1 thread ÷ a bare "
            "`queue.LifoQueue`'s", v, "≥ 1×", None if v is None else v >= 1.0)  # fmt: skip
    head = ["goal (issue 12)", "measured", "90% interval of the median", "the baseline's twin (noise)", "target", ""]
    return _table(head, rows, "lrrrrl")


def _median_interval(xs: list[float], level: float = 0.90) -> str:
    """Where the median of the round-by-round ratios lies, at ``level`` confidence, as "0.97-1.04×".

    Distribution-free (order statistics: the k-th smallest and k-th largest round, k the largest with
    P(Binomial(n, 1/2) < k) ≤ (1 - level) / 2), because a round's ratio is no normal variable: a dear
    process or a noisy second pulls single rounds far out. Empty when the rounds are too few for ``level``.
    """
    n = len(xs)
    tail, k = 0.0, 0  # tail = P(Binomial(n, 1/2) <= k - 1)
    while True:
        nxt = tail + math.comb(n, k) / 2**n
        if nxt > (1 - level) / 2:
            break
        tail, k = nxt, k + 1
    if k == 0:
        return ""
    xs = sorted(xs)
    return f"{xs[k - 1]:.2f}-{xs[n - k]:.2f}×"


_INSTRUCTION_LABELS = {
    "request": {
        "baseline": "per-thread connection (`threading.local`), the baseline",
        "flask_proxypool": "flask_proxypool proxy",
        "psycopg_pool": "psycopg_pool, getconn into `g`, putconn at teardown",
        "floor": "the floor of any pool: `list.pop` into `g`, `list.append` at teardown (no reset, no waiting)",
    },
    "http": {
        "baseline": "per-thread connection (`threading.local`), the baseline",
        "flask_proxypool": "flask_proxypool proxy",
    },
    "context": {
        "baseline": "`with app.app_context(): pass`, an app without flask_proxypool (the baseline)",
        "flask_proxypool": "`with app.app_context(): db.pgconn` (flask_proxypool)",
        "psycopg_pool": "`with app.app_context(): conn().pgconn` (psycopg_pool: getconn into `g`, putconn at teardown)",
        "floor": "`with app.app_context(): conn().pgconn` (the floor: `list.pop` into `g`, `list.append` at teardown)",
    },
}


def _instructions(f: dict[str, t.Any], workload: str) -> dict[str, t.Any] | None:
    """{interpreter: {approach: {per_op, added, ratio}}} of one workload of bench/instructions.py, or None."""
    ins = f.get("instructions")
    if not ins:
        return None
    return t.cast("dict[str, t.Any] | None", ins.get(workload))


def _layout_misses(f: dict[str, t.Any]) -> dict[str, tuple[list[float], list[float]]]:
    """{interpreter: (baseline's, flask_proxypool's type-cache misses per request, one per layout)} of
    bench/instructions.py, for the interpreters that have both."""
    layouts = (f.get("instructions") or {}).get("layouts") or {}
    pairs = {lb: (per.get("baseline") or [], per.get("flask_proxypool") or []) for lb, per in layouts.items()}
    return {lb: (base, fpp) for lb, (base, fpp) in pairs.items() if base and fpp}


def ft_instructions_table(res: dict[str, t.Any], workload: str = "request") -> str:
    """Machine instructions per operation (bench/instructions.py), per approach and interpreter."""
    cells = _instructions(res["ft"], workload)
    if not cells:
        return ""
    labels = [i["label"] for i in res["ft"]["interpreters"] if i["label"] in cells]
    head = ["approach"] + [f"{lb}: {what}" for lb in labels for what in ("instructions/op", "÷ baseline", "added")]
    if len(labels) == 2:
        head.append(f"added, {labels[1]} ÷ {labels[0]}")
    rows = []
    names = _INSTRUCTION_LABELS[workload]
    for a in cells[labels[0]]:
        row = [names.get(a, a)]
        for lb in labels:
            c = cells[lb][a]
            row += [_f(c["per_op"], 0), _x(c["ratio"]), "—" if a == "baseline" else _f(c["added"], 0)]
        if len(labels) == 2:
            x, y = cells[labels[1]][a]["added"], cells[labels[0]][a]["added"]
            row.append("—" if a == "baseline" or y <= 0 else _x(x / y))
        rows.append(row)
    return _table(head, rows, "l" + "r" * (len(head) - 1))


def ft_http_table(res: dict[str, t.Any], key: str = "http") -> str:
    h, labels = res["ft"][key], [i["label"] for i in res["ft"]["interpreters"]]
    rows = []
    for row in h["approaches"].values():
        for lb in labels:
            c = row["by"][lb]
            if "skip" in c:
                rows.append([row["label"], lb, c["skip"]] + [""] * 11)
                continue
            m, q, v = c["median"], c.get("ratio", {}), c.get("vs_ref", {})
            rows.append([row["label"], lb, _f(m["rps"], 0), _x(q.get("rps")), _x(v.get("rps")),
                         _f(m["p50_ms"], 1), _f(m["p99_ms"], 1), _f(m["cpu_us_per_req"], 0),
                         _x(q.get("cpu_us_per_req")), _x(v.get("cpu_us_per_req")), _f(m["db_cpu_us_per_req"], 0),
                         _f(m["server_connections"], 0),
                         _f(m["foreign_cores"], 2), str(c["errors"])])  # fmt: skip
    head = ["approach", "Python", "req/s", "÷ baseline, same Python", f"÷ {labels[0]}, same approach",
            "p50 ms", "p99 ms", "app CPU µs/req", "÷ baseline", f"÷ {labels[0]}", "PG CPU µs/req", "max server conns",
            "other load (cores)", "errors"]  # fmt: skip
    return _table(head, rows, "ll" + "r" * (len(head) - 2))


def ft_markdown(res: dict[str, t.Any]) -> str:
    """The free-threaded comparison as markdown (bench/results/ft.md, and its section of docs/performance.md)."""
    f = res["ft"]
    labels = [i["label"] for i in f["interpreters"]]
    mi, h = f["micro"], f["http"]
    return "\n".join([
        f"Run of {res['started']} ({res['mode']} mode, {res['elapsed_s']:.0f} s), "
        f"`bench/run --only ft`: {' and '.join(labels)} measured in turn in the same run, against the same "
        "PostgreSQL.",
        "",
        "### Machine",
        "",
        machine_table(res["machine"], res),
        "",
        "### Interpreters, and the GIL check",
        "",
        "Every process that measured reports `sys._is_gil_enabled()`: the micro benchmark's worker once its "
        "pools were built (flask, werkzeug, psycopg, psycopg_pool, ProxyPatternPool and flask_proxypool "
        "imported) and again at the end, and each gunicorn worker after serving the HTTP runs "
        "(`GET /runtime` of bench/apps.py). A C extension without free-threading support would have turned "
        "the GIL back on when imported.",
        "",
        ft_runtime_table(res),
        "",
        "### Checkout + return: does it scale with threads?",
        "",
        "Real psycopg connections, no query. *N threads on N*: each pool holds as many connections as there "
        "are threads (all made before timing), so no thread ever waits for one: this measures how the pool "
        "itself scales. *4 threads on 2*: contention. Each thread takes and returns as fast as it can for "
        f"{mi['method']['duration_s']:g} s; ops/s is the total, the median of {mi['method']['rounds']} rounds; "
        "in parentheses, the speedup over one thread on the same interpreter (ratio within each round, then "
        f"the median). The machine has {res['machine']['nproc']} CPUs. Each pool and interpreter ran in its "
        "own worker process; in each round every measurement ran on both interpreters back to back, the "
        "first one alternating from round to round.",
        "",
        ft_micro_table(res),
        "",
        f"The same as ratios, within each round then the median (*t* = threads): each pool ÷ {_short(mi['ref'])} "
        f"on the same interpreter, and each pool on {' / '.join(labels[1:])} ÷ the same pool on {labels[0]}. "
        "*CPU µs/op* above is the worker process's user + system time (all threads) per checkout + return.",
        "",
        ft_ratio_table(res),
        "",
        *_ft_instructions(res),
        f"### HTTP: {h['title']}, `GET /item/<random id>`",
        "",
        f"As in the HTTP benchmark above (`gunicorn -k gthread`, wrk {h['wrk_connections']} connections on "
        f"loopback, pools of {h['pool_size']}), with each approach served once by each interpreter: "
        f"{h['method']['duration_s']} s per measurement after a {h['method']['warmup_s']} s warm-up (of all the "
        f"round's servers at once), median of "
        f"{h['method']['rounds']} rounds; every server is started afresh for each round (on 3.13t one process of "
        "the same code ran 10-14% dearer than another for as long as both ran) with its own layout of CPython's "
        "type cache (bench/layout.py: which lookups collide there, and so how often 3.13t's threads spin on its "
        "lock, is otherwise the same in every process of the same code), and within a round each "
        "interpreter's servers run back to back (in the orders of a Williams square: each server first, last and "
        "right after every other one equally often; the first interpreter alternating), so each "
        "ratio compares measurements seconds apart. "
        "The baseline runs twice (its twin is the same code: its ratio is the run's noise). *÷ "
        f"baseline* compares with the per-thread connection on the same interpreter, *÷ {labels[0]}* with the "
        "same approach on the other interpreter, round by round. psycopg differs between the two (see the "
        "table above), and so does everything else in the request path (Flask, Werkzeug, gunicorn): the "
        "interpreter column compares whole stacks, the *÷ baseline* column compares pools.",
        "",
        ft_http_table(res),
        "",
        *_ft_http_2x4(res),
        *(["### Issue 12's goals, from the tables above", "",
           "Each ratio is taken within a round, then the median over rounds. *CPU per operation* is the worker "
           "process's user + system time (all threads) per operation. For the HTTP goals, *90% interval of the "
           "median* is where the median of the round-by-round ratios lies at 90% confidence (from the rounds "
           "themselves, by order statistics: a goal whose target lies inside it is one this run cannot tell from "
           "its noise), and *the baseline's twin* the same ratio for a second server running the baseline's code: "
           "how far this run's noise alone moves it.", "", goals, ""]
          if (goals := ft_goals_table(res)) else []),
    ])


def _ft_instructions(res: dict[str, t.Any]) -> list[str]:
    ins = res["ft"].get("instructions")
    if not ins:
        return []
    out = [
        "### Counted in machine instructions",
        "",
        f"One thread, {ins['requests']} operations counted by callgrind in the Python process, on each interpreter "
        "(bench/instructions.py). A count barely moves with the host's load (an app context not at all; a request "
        "by up to about 1%, as its query's wait for the server loops a number of times that depends on timing), "
        "so it shows what a change to the code path is worth where timings cannot; it is not time (cache "
        "misses, atomics and contention between threads cost no instruction). *Added*: instructions per operation "
        "over the baseline's.",
        "",
        "A request: the HTTP tables' app (`GET /item/<id>`, one SELECT), called through WSGI (no server, no "
        "socket).",
        "",
        ft_instructions_table(res, "request"),
        "",
    ]
    if _instructions(res["ft"], "http"):
        n1, n2 = ins.get("http_requests", (0, 0))
        out += [
            "The same request served over HTTP by `gunicorn -k gthread`, 1 worker x 8 threads, 16 keep-alive client "
            "connections, counted in the worker process (gunicorn, the sockets' calls on the Python side, the "
            "threads' hand-offs, Flask, the pool, psycopg: what the timed app CPU covers but the kernel). Each "
            f"server ran twice, with {n1} and {n2} requests after the same warm-up: per request is the difference "
            "over the difference (start-up varies by about 20 million instructions: about 0.5% of a request). "
            "`liveness_after` is 1 s there: callgrind slows the server about 50 times, and the 10 ms default "
            "would have every checkout polled, which a loaded server does not (bench/instructions.py).",
            "",
            ft_instructions_table(res, "http"),
            "",
        ]
    for lb, (base, fpp) in _layout_misses(res["ft"]).items():
        out += [
            f"Type-cache misses per request on {lb}, the same request run in a thread other than the main one (as "
            "gunicorn's are), in each of several layouts of CPython's type cache (bench/layout.py; counted by "
            "callgrind as the cache's calls to `find_name_in_mro`, one per miss: two runs, of "
            f"{ins['requests']} and {2 * ins['requests']} requests, and the difference). On 3.13t each miss "
            "takes a process-wide lock, on which a served worker's threads spin: about a third of its CPU in "
            "`perf`, the baseline's as much as a pool's. Which lookups collide depends on the layout (and, with "
            "the pool's own thread running beside the request, on timing), so each column is one draw; the mean "
            "is what the code costs there.",
            "",
            _table(
                ["approach", *[f"layout {i + 1}" for i in range(len(base))], "mean"],
                [[_INSTRUCTION_LABELS["request"].get(a, a), *[_f(v, 0) for v in vs], _f(fmean(vs), 0)]
                 for a, vs in (("baseline", base), ("flask_proxypool", fpp))],  # fmt: skip
                "l" + "r" * (len(base) + 1),
            ),
            "",
        ]
    if _instructions(res["ft"], "context"):
        out += [
            "An app context that takes and returns a connection (no query), issue 12's one-thread figure:",
            "",
            ft_instructions_table(res, "context"),
            "",
        ]
    return out


def _ft_http_2x4(res: dict[str, t.Any]) -> list[str]:
    h = res["ft"].get("http_2x4")
    if not h:
        return []
    return [
        f"### HTTP: {h['title']}, `GET /item/<random id>`",
        "",
        f"The same with {h['title']} (`--worker-connections 8`, so each worker takes 8 of wrk's "
        f"{h['wrk_connections']} connections), pools of {h['pool_size']} per worker.",
        "",
        ft_http_table(res, "http_2x4"),
        "",
    ]


def chart(res: dict[str, t.Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    ours = "#1f77b4"
    others = "#aaaaaa"
    ref_c = "#dddddd"

    def color(key: str, info: bool = False) -> str:
        return ours if key.startswith("fpp") or key.startswith("flask_proxypool") else (ref_c if info else others)

    ax = axes[0][0]
    single = {k: v for k, v in _get(res, "micro", "single").items()
              if "best_us" in v and k not in ("select1", "attr_plain")}  # fmt: skip
    keys = list(single)
    ax.barh([_short(k) for k in keys], [single[k]["best_us"] for k in keys],
            color=[color(k, single[k].get("info", False)) for k in keys])  # fmt: skip
    ax.invert_yaxis()
    ax.set_xlabel("µs per checkout + return (best), lower is better")
    sel = _get(res, "micro", "single", "select1", "best_us")
    ax.set_title("One thread" + (f" (SELECT 1 round trip: {sel:.0f} µs)" if sel else ""))

    ax = axes[0][1]
    multi = {k: v for k, v in _get(res, "micro", "multi").items() if "ops_s" in v}
    keys = list(multi)
    ax.barh([_short(k) for k in keys], [multi[k]["ops_s"] / 1000 for k in keys], color=[color(k) for k in keys])
    ax.invert_yaxis()
    for i, k in enumerate(keys):
        ax.text(multi[k]["ops_s"] / 1000, i, f" fairness {multi[k]['fairness']:.2f}", va="center", fontsize=8)
    ax.set_xlabel("thousand checkouts + returns / s (median); higher is better")
    ax.set_title(f"{_get(res, 'micro', 'threads')} threads on a pool of {_get(res, 'micro', 'pool_size')}")
    ax.set_xlim(right=max([v["ops_s"] for v in multi.values()] + [1]) / 1000 * 1.35)

    for ax, phase_keys, title in (
        (axes[1][0], ("1x8", "2x4"), "GET /item/<id>: req/s ÷ per-thread baseline"),
        (axes[1][1], ("mixed",), "Mixed workload, 16 threads: req/s ÷ baseline"),
    ):
        phs = [(k, _get(res, "http", "phases", k)) for k in phase_keys if _get(res, "http", "phases", k)]
        if not phs:
            ax.set_visible(False)
            continue
        approaches: list[str] = []
        for _, ph in phs:
            approaches += [a for a, r in ph["approaches"].items() if "ratio" in r and a not in approaches]
        width = 0.8 / max(len(phs), 1)
        for j, (_key, ph) in enumerate(phs):
            vals = [_get(ph, "approaches", a, "ratio", "rps") or 0 for a in approaches]
            ys = [i + j * width for i in range(len(approaches))]
            bars = ax.barh(ys, vals, height=width, label=ph["title"],
                           color=["#1f77b4", "#ff7f0e", "#2ca02c"][j])  # fmt: skip
            for b, a in zip(bars, approaches, strict=True):
                conns = _get(ph, "approaches", a, "median", "server_connections")
                ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                        f" {b.get_width():.2f}" + (f" ({conns:.0f} conns)" if conns else ""),
                        va="center", fontsize=8)  # fmt: skip
        ax.set_yticks([i + width * (len(phs) - 1) / 2 for i in range(len(approaches))])
        ax.set_yticklabels([_short(a) for a in approaches])
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlim(0, max([_get(ph, "approaches", a, "ratio", "rps") or 0 for _, ph in phs
                            for a in approaches] + [1.0]) * 1.3)  # fmt: skip
        ax.set_xlabel("req/s ÷ baseline of the same round (median); higher is better")
        ax.set_title(title)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)

    m = res["machine"]
    fig.suptitle(
        f"flask-proxypool benchmarks — {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"PostgreSQL {m['postgresql']}, {res['started'][:10]}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


# -- what a user gains and pays, first on the page ---------------------------------------


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def summary(res: dict[str, t.Any], ft: dict[str, t.Any] | None = None, clean: dict[str, t.Any] | None = None) -> str:
    """The page's opening: per-request cost against the alternatives, connections saved, what 3.13t changes.

    Every figure comes from the results files, so a new run rewrites the text with its own numbers; a
    bullet whose figures are missing (a smoke run, a part not run) is left out.
    """
    out: list[str] = []
    s = _get(res, "micro", "single") or {}
    best = {k: v["best_us"] for k, v in s.items() if "best_us" in v}
    net = proxy_net(s)
    sel = best.get("select1")
    if net and sel:
        line = (
            f"- **Per request, the extension costs about {net[0]:.1f} µs** (one thread, best of the "
            "micro benchmark): the first `db.` in a request takes a connection, the request's end gives it "
            f"back, net of Flask's own context push/pop. One `SELECT 1` round trip costs {sel:.0f} µs on the "
            f"same machine: the extension adds {_pct(net[0] / sel)} of it."
        )
        recipe, bare = best.get("psycopg_pool_flask"), best.get("flask_ctx_bare")
        if recipe is not None and bare is not None and recipe > bare:
            line += (
                " The usual psycopg_pool recipe in Flask (getconn into `g`, putconn in a teardown hook) costs "
                f"{recipe - bare:.1f} µs measured the same way."
            )
        pools = [(k, best.get(k)) for k in ("fpp_pool", "psycopg_pool", "dbutils", "ppp", "sqlalchemy")]
        shown = ", ".join(f"{_short(k)} {v:.1f}" for k, v in pools if v is not None)
        if shown:
            line += f" A checkout + return alone, in µs: {shown}."
        out.append(line)
    phases = _get(res, "http", "phases") or {}
    shapes = [(k, phases[k]) for k in ("1x8", "2x4") if k in phases]
    rows = [(k, ph["approaches"]) for k, ph in shapes if _get(ph, "approaches", "flask_proxypool", "ratio", "rps")]
    if rows:
        def r(ap: dict[str, t.Any], key: str, what: str = "rps") -> float | None:
            return t.cast("float | None", _get(ap, key, "ratio", what))

        def both(key: str, what: str = "rps") -> str:
            return " and ".join(_x(r(ap, key, what)) for _, ap in rows)

        where = " and ".join(f"{phases[k]['title']}" for k, _ in rows)
        others = [
            a for a in ("psycopg_pool", "proxypatternpool", "dbutils", "sqlalchemy") if all(a in ap for _, ap in rows)
        ]
        line = (
            f"- **Over HTTP, a request with one SELECT** ({where}) is served at {both('flask_proxypool')} the "
            f"requests per second of a connection kept per thread, for {both('flask_proxypool', 'cpu_us_per_req')} "
            "its application CPU per request"
        )
        if all("baseline_twin" in ap for _, ap in rows):
            line += f"; the baseline's identical twin, this run's noise, measured {both('baseline_twin')}"
        line += "."
        if others:
            line += " The other pools, the same way: " + "; ".join(f"{_short(a)} {both(a)}" for a in others) + "."
        paced = [
            (_get(ap, "flask_proxypool", *half), _get(ap, "baseline_twin", *half))
            for half in [("paced", "ratio", "p99_ms")]
            for _, ap in rows
        ]
        if all(p is not None for p, _ in paced):
            line += (
                " p99 latency at half load: " + " and ".join(_x(p) for p, _ in paced) + " the baseline's"
                + (" (the twin: " + " and ".join(_x(q) for _, q in paced) + ")"
                   if all(q is not None for _, q in paced) else "")  # fmt: skip
                + "."
            )
        out.append(line)
    mixed = _get(phases, "mixed", "approaches") or {}
    base_conns = _get(mixed, "baseline", "median", "server_connections")
    if base_conns and _get(mixed, "flask_proxypool", "ratio", "rps"):
        mx = phases["mixed"]
        line = (
            f"- **Connections saved.** One worker with {mx['threads']} threads, half the requests never touching "
            f"the database, the others a transaction then 2 ms of other work: a connection per thread holds "
            f"{base_conns:.0f} server connections; flask_proxypool with a pool of {mx['pool_size']} holds "
            f"{_get(mixed, 'flask_proxypool', 'median', 'server_connections'):.0f} and serves "
            f"{_x(_get(mixed, 'flask_proxypool', 'ratio', 'rps'))} the requests per second"
        )
        rel = _get(mixed, "flask_proxypool_release", "ratio", "rps")
        if rel is not None:
            line += f" ({_x(rel)} with `release: \"commit\"`, which gives the connection back at the transaction's end)"
        pp = _get(mixed, "psycopg_pool", "ratio", "rps")
        if pp is not None:
            line += f"; psycopg_pool on the same {mx['pool_size']} connections, {_x(pp)}"
        line += (
            f". Per gunicorn worker the server sees `max_size` connections, not one per thread: "
            f"{_pct(1 - mx['pool_size'] / base_conns)} fewer here, for PostgreSQL's `max_connections` and for "
            "every PgBouncer in front of it."
        )
        out.append(line)
    fh = _get(ft, "ft", "http", "approaches") or {}
    labels = [i["label"] for i in _get(ft, "ft", "interpreters") or []]
    if len(labels) == 2 and _get(fh, "flask_proxypool", "by", labels[1], "ratio", "rps"):
        first, free = labels

        def c(a: str, *path: str) -> float | None:
            return t.cast("float | None", _get(fh, a, "by", free, *path))

        rts = [rt for key, got in (_get(ft, "ft", "http", "runtime_after") or {}).items()
               if key.endswith(free.replace(".", "")) for rt in got]  # fmt: skip
        gil = ""
        if rts and not any(rt.get("gil_enabled") for rt in rts):
            gil = " The GIL stayed off in every process that measured (imports included)."
        line = (
            f"- **Free-threaded Python ({free}).** One worker with {ft['ft']['http']['threads']} threads uses "
            f"every CPU: the per-thread baseline serves {_x(c('baseline', 'vs_ref', 'rps'))} the requests per "
            f"second of {first}. flask_proxypool serves {_x(c('flask_proxypool', 'ratio', 'rps'))} the baseline "
            f"there, at {_x(c('flask_proxypool', 'ratio', 'cpu_us_per_req'))} its CPU per request"
        )
        if c("psycopg_pool", "ratio", "rps") is not None:
            line += (
                f" (psycopg_pool: {_x(c('psycopg_pool', 'ratio', 'rps'))} at "
                f"{_x(c('psycopg_pool', 'ratio', 'cpu_us_per_req'))})"
            )
        meth = ft["ft"]["http"]["method"]
        line += (
            f".{gil} That run is its own ({meth['rounds']} rounds of {meth['duration_s']} s, both interpreters in "
            f"turn): read its notes below, and the full HTTP tables for {first}."
        )
        out.append(line)
    phs = _get(clean, "http", "phases") or {}
    txn = phs.get("clean-txn", {}).get("approaches", {})
    auto = phs.get("clean-item", {}).get("approaches", {})
    if "rounds" in txn.get("flask_proxypool", {}) and "rounds" in txn.get("flask_proxypool_rollback", {}):
        line = (
            "- **Every connection comes back clean** (rolled back, settings, role, temp tables, locks reset) "
            "in the rollback's own round trip: on transactions, the default served "
            f"{_x(_round_ratio(txn['flask_proxypool'], txn['flask_proxypool_rollback'], 'rps'))} the requests per "
            'second of `reset: "rollback"` (a rollback only)'
        )
        if "rounds" in auto.get("flask_proxypool", {}) and "rounds" in auto.get("flask_proxypool_rollback", {}):
            line += (
                "; on autocommit connections the reset is a round trip of its own: "
                f"{_x(_round_ratio(auto['flask_proxypool'], auto['flask_proxypool_rollback'], 'rps'))} on a "
                'one-SELECT request, which `reset: "rollback"` gives back where no view changes session state'
            )
        out.append(line + " ([The session reset](#the-session-reset)).")
    if not out:
        return ""
    started = [res.get("started", "?")] + [x["started"] for x in (ft, clean) if x]
    head = (
        "From the runs below (" + ", ".join(sorted(set(started))) + ") on a small shared 2-CPU machine: "
        "read ratios within a run, not absolute numbers across runs."
    )
    return "\n".join([head, "", *out])


_SHORT = {
    "fpp_pool": "flask_proxypool Pool",
    "fpp_proxy": "flask_proxypool proxy path",
    "fpp_pool_with": "flask_proxypool with connection()",
    "fpp_pool_nolive": "flask_proxypool Pool, liveness none",
    "fpp_pool_strict": "flask_proxypool Pool, fifo_after 0",
    "flask_ctx": "Flask app context alone",
    "flask_ctx_bare": "Flask app context, bare app",
    "fpp_attr": "flask_proxypool attribute access",
    "psycopg_pool": "psycopg_pool",
    "psycopg_pool_with": "psycopg_pool with connection()",
    "psycopg_pool_flask": "psycopg_pool Flask recipe",
    "ppp": "ProxyPatternPool",
    "proxypatternpool": "ProxyPatternPool",
    "dbutils": "DBUtils PooledDB",
    "sqlalchemy": "SQLAlchemy",
    "lifoqueue": "bare LifoQueue",
    "baseline": "per-thread connection",
    "baseline_twin": "per-thread connection (twin)",
    "flask_proxypool": "flask_proxypool",
    "flask_proxypool_release": "flask_proxypool release=commit",
}


def _short(key: str) -> str:
    return _SHORT.get(key, key)


def _notes(name: str) -> str:
    f = ROOT / "bench" / name
    return f.read_text(encoding="utf-8").strip() if f.exists() else ""


def performance_doc(
    res: dict[str, t.Any],
    chart_name: str | None,
    ft: dict[str, t.Any] | None = None,
    clean: dict[str, t.Any] | None = None,
) -> str:
    """The whole page: ``res`` from the last full run, ``ft`` and ``clean`` from the last ``--only`` runs."""
    notes = _notes("notes.md")
    reproduce = [
        "## Reproduce",
        "",
        "```sh",
        "bench/run            # everything (or: .venv/bin/python -m bench); rewrites this page",
        "bench/run --smoke    # 10-15 s: proves the harness works; the numbers mean nothing",
        "bench/run --only ft  # free-threaded 3.13t next to 3.11, about 11 minutes; rewrites its section only",
        "bench/run --only clean  # what the session reset costs over HTTP, about 5 minutes; its section only",
        "bench/run --docs-only   # measures nothing: rewrites this page from bench/results/*.json",
        "```",
        "",
        "A full run takes about 9 minutes on a quiet 2-CPU machine, and up to 4 minutes more when other "
        "processes load it (it waits for a quiet moment and measures again, within that budget).",
        "",
        "`bench/run` installs what it needs (`bench/requirements.txt` into `.venv`, `wrk` via apt-get when "
        "root), starts its own PostgreSQL (as the tests do), fills `items(id int primary key, name text)` "
        "with 10,000 rows, and writes `bench/results/latest.md` and `.json`, this page and its chart. "
        "See [bench/README.md](../bench/README.md).",
        "",
    ]
    parts = [
        "# Performance",
        "",
        "<!-- Generated by bench/run from bench/results/latest.json; edit bench/report.py or bench/notes.md. -->",
        "",
        "How flask-proxypool compares with what you would use instead — psycopg_pool, ProxyPatternPool, "
        "DBUtils, SQLAlchemy's pool, and one persistent connection per thread — measured in one run on "
        "one machine against one PostgreSQL.",
        "",
    ]
    lead = summary(res, ft, clean)
    if lead:
        parts += ["## What you gain, and what it costs", "", lead, ""]
    parts += ["## Latest results", ""]
    if chart_name:
        parts += [f"![benchmark chart]({chart_name})", ""]
    parts += [markdown(res, with_targets=False), ""]
    if notes:
        parts += ["## Notes", "", notes, ""]
    if ft:
        parts += ["## Free-threaded Python (3.13t) vs 3.11", "",
                  "<!-- From bench/results/ft.json (`bench/run --only ft`); a full run keeps it as it is. -->", "",
                  ft_markdown(ft), ""]  # fmt: skip
        ft_notes = _notes("notes-ft.md")
        if ft_notes:
            parts += ["### What the free-threaded figures show", "", ft_notes, ""]
    if clean:
        parts += ["## The session reset", "",
                  "<!-- From bench/results/clean.json (`bench/run --only clean`); a full run keeps it as it is. -->",
                  "", _notes("notes-clean.md"), "", clean_markdown(clean).replace("\n### ", "\n### "), ""]  # fmt: skip
    parts += reproduce
    if "targets" in res:
        parts += [
            "## Project targets",
            "",
            "The goals the project set itself against the alternatives, for its maintainers: a **FAIL** is a "
            "goal not met yet (often by less than the run's noise, see the notes), not a malfunction.",
            "",
            targets_table(res["targets"]),
            "",
        ]
    return "\n".join(parts)
