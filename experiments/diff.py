"""``parallelnet experiment diff RUN_A RUN_B``: the equal configurations of two runs, B / A.

Two runs are two independent samples: their repetitions are not paired (drift between the
runs does not cancel), so each configuration's figure is compared as an unpaired ratio of
geometric means - a Welch t interval when both runs have 8 repetitions or more, else the
widest ratio the values allow, labelled range (experiments/analysis.py).  The figure is
the experiment's pyperf value (server CPU per unit of work).  Warnings come first: a
different experiment refuses; a different preset, commit, dirty tree or machine is said
before any number, because it is the likelier cause of a difference than the code.
"""

from __future__ import annotations

import math
import statistics

from parallelnet.experiments import analysis, framework


def warnings(meta_a: dict, meta_b: dict) -> list[str]:
    out = []
    if meta_a.get("preset") != meta_b.get("preset"):
        out.append(f"presets differ: {meta_a.get('preset')} vs {meta_b.get('preset')} "
                   "(windows, grids and repetitions are not the same)")
    ca, cb = meta_a.get("code") or {}, meta_b.get("code") or {}
    if ca.get("commit") != cb.get("commit"):
        out.append(f"commits differ: {str(ca.get('commit'))[:12]} vs {str(cb.get('commit'))[:12]}")
    for name, c in (("A", ca), ("B", cb)):
        if c.get("dirty"):
            out.append(f"run {name} was measured on a dirty tree")
    ma, mb = meta_a.get("machine") or {}, meta_b.get("machine") or {}
    for key in ("cpu_model", "kernel", "cpus_allowed", "host"):
        if ma.get(key) != mb.get(key):
            out.append(f"machines differ ({key}): {ma.get(key)} vs {mb.get(key)}")
    for name, m in (("A", meta_a), ("B", meta_b)):
        if m.get("outcome") != framework.OK:
            out.append(f"run {name} did not end ok (outcome: {m.get('outcome')})")
    return out


def _values(exp, records: list[dict]) -> dict[str, list[float]]:
    by: dict[str, list[float]] = {}
    for r in records:
        if "error" in r:
            continue
        got = exp.pyperf_value(r) if exp.pyperf_value else None
        if got:
            name = exp.pyperf_name(r) if exp.pyperf_name else r["config"]
            if r["config"].endswith(framework.AA_SUFFIX) and not name.endswith(framework.AA_SUFFIX):
                name += framework.AA_SUFFIX
            by.setdefault(name, []).append(got[0])
    return by


def diff_runs(dir_a: str, dir_b: str, meta_a: dict, meta_b: dict) -> str:
    if meta_a.get("experiment") != meta_b.get("experiment"):
        return (f"not comparable: {dir_a} is {meta_a.get('experiment')}, "
                f"{dir_b} is {meta_b.get('experiment')}")
    exp = framework.get(meta_a["experiment"])
    a = _values(exp, framework.load_records(dir_a))
    b = _values(exp, framework.load_records(dir_b))
    lines = [f"{exp.name}: B = {dir_b} over A = {dir_a}; figure: server CPU per unit of work "
             "(lower is better), unpaired"]
    lines += [f"WARNING: {w}" for w in warnings(meta_a, meta_b)]
    common = sorted(set(a) & set(b))
    rows = [["configuration", "n A", "n B", "A median", "B median", "B / A"]]
    for cfg in common:
        s = analysis.unpaired_ratio_summary(a[cfg], b[cfg])
        rows.append([cfg, str(len(a[cfg])), str(len(b[cfg])), _us(statistics.median(a[cfg])),
                     _us(statistics.median(b[cfg])), analysis.fmt_ratio(s)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a:
        lines.append(f"only in A ({len(only_a)}): {', '.join(only_a[:12])}{' ...' if len(only_a) > 12 else ''}")
    if only_b:
        lines.append(f"only in B ({len(only_b)}): {', '.join(only_b[:12])}{' ...' if len(only_b) > 12 else ''}")
    if not common:
        lines.append("no configuration in common")
    return "\n".join(lines)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} µs" if math.isfinite(seconds) else "–"
