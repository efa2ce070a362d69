"""The server's stats records (``parallelnet serve --stats-json PATH``): read them, and
difference the interval records of a measured window.

One record per line: ``{"type": "interval" | "final", "t": seconds since the server
started, "workers": [WorkerStats snapshots], "totals": ...}`` (core/cli.py writes them).
"""

from __future__ import annotations

import json

from parallelnet.core.stats import add_observable, delta_observable


def read_records(stats_path: str) -> list[dict]:
    try:
        with open(stats_path) as f:
            return [json.loads(x) for x in f if x.strip()]
    except FileNotFoundError:
        return []


def window(stats_path: str, t0: float, t1: float) -> dict:
    """Per-worker and total deltas between the first and last interval records in [t0, t1]
    (server clock: seconds since it started)."""
    recs = [r for r in read_records(stats_path) if r["type"] == "interval" and t0 <= r["t"] <= t1]
    if len(recs) < 2:
        raise RuntimeError(f"fewer than two stats records in the window [{t0:.2f}, {t1:.2f}] s")
    first, last = recs[0], recs[-1]
    keys = ("requests", "accepted", "lost_races", "wakeups", "listen_wakeups", "bytes_in",
            "bytes_out", "cpu_ns", "user_s", "sys_s")
    workers = []
    for a, b in zip(first["workers"], last["workers"]):
        d = {k: delta_observable(a[k], b[k]) for k in keys}   # lost_races may be n/a (None)
        d["index"], d["cpu"] = b["index"], b["cpu"]
        ea, eb = a.get("extra", {}), b.get("extra", {})
        d["extra"] = {k: eb[k] - ea[k] for k in eb
                      if isinstance(eb[k], (int, float)) and isinstance(ea.get(k), (int, float))}
        workers.append(d)
    total = {k: add_observable(w[k] for w in workers) for k in keys}
    req = max(total["requests"], 1)
    total.update(seconds=last["t"] - first["t"],
                 cpu_us_per_req=total["cpu_ns"] / 1e3 / req,
                 user_us_per_req=total["user_s"] * 1e6 / req,
                 sys_us_per_req=total["sys_s"] * 1e6 / req)
    return {"workers": workers, "total": total}
