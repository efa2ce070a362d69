"""Figures (matplotlib, optional): one function per kind of figure the experiments draw.

Only imported once the runner has checked that matplotlib is installed.  The Agg backend
(no display), fixed sizes and no timestamp in the PNG metadata: the same records give the
same bytes, so the paper's figures rebuild deterministically.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

PNG_META = {"Software": None}
#: one colour and marker per name, stable across figures
_STYLE_CYCLE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "black", "gold"]
_MARKERS = "osD^v<>pPhX*"
_ORDER = ["native", "native-uring", "uring", "uring-py", "epoll", "poll", "select", "uvloop",
          "asyncio", "rloop", "shared", "exclusive", "exclusive-rotate", "reuseport",
          "reuseport-cpu", "dispatch"]


def style(name: str, names=None) -> dict:
    key = name.split("/")[0]
    order = list(_ORDER) + sorted(set(names or []) - set(_ORDER))
    i = order.index(key) if key in order else hash(key) % len(_STYLE_CYCLE)
    return {"color": _STYLE_CYCLE[i % len(_STYLE_CYCLE)], "marker": _MARKERS[i % len(_MARKERS)]}


def save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)
    return path


def load_curves(series: dict[str, list[dict]], path: str, title: str = "") -> str:
    """Two panels against achieved req/s: server CPU µs/request, and p99 latency.

    ``series[name]`` = points ``{"x", "cpu": {"median","min","max"}, "p99", "sat",
    "rankable"}``; open-loop points are joined by a line, saturation is a separate large
    marker, and a point that is not rankable (client-bound) is drawn hollow."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in series.items():
        st = style(name, series)
        for ax, key in ((ax1, "cpu"), (ax2, "p99")):
            line = [q for q in pts if not q["sat"] and q[key] is not None]
            ys = [q[key]["median"] if key == "cpu" else q[key] for q in line]
            ax.plot([q["x"] for q in line], ys, color=st["color"], marker=st["marker"],
                    label=name, linewidth=1.3, markersize=5)
            if key == "cpu":
                for q in line:
                    ax.vlines(q["x"], q["cpu"]["min"], q["cpu"]["max"], color=st["color"], linewidth=0.8)
            for q in pts:
                if q["sat"] and q[key] is not None:
                    y = q[key]["median"] if key == "cpu" else q[key]
                    ax.plot([q["x"]], [y], color=st["color"], marker=st["marker"], markersize=10,
                            markerfacecolor=st["color"] if q["rankable"] else "none")
    ax1.set_xlabel("achieved requests/s")
    ax1.set_ylabel("server CPU µs per request")
    ax1.set_ylim(bottom=0)
    ax2.set_xlabel("achieved requests/s")
    ax2.set_ylabel("p99 latency (µs, log)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7, ncol=2)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title + "  (big marker: saturation; hollow: client-bound, not ranked)", fontsize=9)
    return save(fig, path)


def lines(series: dict[str, list[tuple[float, float, float, float]]], path: str, xlabel: str,
          ylabel: str, title: str = "", ylim0: bool = True, logy: bool = False,
          hline: float | None = None, panels: list[str] | None = None, logx: bool = False,
          ncols: int = 3) -> str:
    """Simple line plot(s): ``series[name]`` = [(x, median, lo, hi)]; with ``panels``,
    names are "PANEL|LINE" and each panel gets its own axes, ``ncols`` to a row."""
    panels = panels or [""]
    ncols = max(1, min(ncols, len(panels)))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(flat, panels):
        for name, pts in series.items():
            pname, _, lname = name.rpartition("|")
            if pname != panel:
                continue
            st = style(lname, [n.rpartition("|")[2] for n in series])
            xs = [q[0] for q in pts]
            ax.plot(xs, [q[1] for q in pts], color=st["color"], marker=st["marker"], label=lname,
                    linewidth=1.3, markersize=5)
            ax.fill_between(xs, [q[2] for q in pts], [q[3] for q in pts], color=st["color"], alpha=0.12)
        if hline is not None:
            ax.axhline(hline, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        elif ylim0:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if panel:
            ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path)


def grouped_bars(groups: list[str], series: dict[str, list[tuple[float, float, float] | None]],
                 path: str, ylabel: str, title: str = "") -> str:
    """One group of bars per entry of ``groups``, one bar per series (median with a
    min-max whisker); a missing value leaves a gap."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(series)) / 2), 3.4))
    n = max(1, len(series))
    width = 0.8 / n
    for k, (name, vals) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i, v in enumerate(vals) if v is not None]
        med = [v[0] for v in vals if v is not None]
        err = [[v[0] - v[1] for v in vals if v is not None], [v[2] - v[0] for v in vals if v is not None]]
        ax.bar(xs, med, width, yerr=err, capsize=2, label=name, color=_STYLE_CYCLE[k % len(_STYLE_CYCLE)])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)


def cdf(series: dict[str, list[float]], path: str, xlabel: str, title: str = "") -> str:
    """Empirical CDFs (x on a log scale), one line per series (values sorted ascending)."""
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for k, (name, xs) in enumerate(series.items()):
        if not xs:
            continue
        n = len(xs)
        ax.step(xs, [(i + 1) / n for i in range(n)], where="post", label=f"{name} (n={n})",
                color=_STYLE_CYCLE[k % len(_STYLE_CYCLE)])
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of wake-ups")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)
