"""The structure read from the imports: folders are layers, no circles.

    experiments  ->  backends  ->  core        (an arrow: "may import")
    experiments  ------------->  core

Every ``import`` of every module of ``core/``, ``backends/`` and ``experiments/`` counts,
at module level or inside a function (a lazy import is still a dependency).  The core
finds backends and the commands of other packages by entry point at run time, never by
import.  And ``serve --backend X`` imports X's module alone (docs/architecture.md).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "backends", "experiments")
#: layer -> the layers it may import (itself included).
ALLOWED = {"core": {"core"}, "backends": {"core", "backends"},
           "experiments": {"core", "backends", "experiments"}}


def modules() -> dict[str, Path]:
    """parallelnet.LAYER.a.b -> its file, for every module of the three folders."""
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["parallelnet", *parts])] = path
    return out


def compiled(module: str) -> bool:
    """Whether ``module`` is one of our compiled extensions (``_native``, ``_loadgen``...)."""
    parts = module.split(".")
    if parts[0] != "parallelnet" or len(parts) < 3:
        return False
    folder = ROOT.joinpath(*parts[1:-1])
    return any(folder.glob(parts[-1] + ".*.so")) or any(folder.glob(parts[-1] + ".so"))


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (``from pkg import mod``
    counts as ``pkg.mod`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        else:
            continue
        for target in targets:
            if compiled(target):
                continue   # a cffi extension (a leaf: it imports nothing of ours)
            # the module itself, or the nearest enclosing project module (a package)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer(module: str) -> str:
    return module.split(".")[1]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(g)))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The reader sees what is there (else the checks below would pass on nothing)."""
    g = graph()
    assert {"parallelnet.core.server", "parallelnet.backends.readiness",
            "parallelnet.experiments.measure"} <= set(g)
    assert "parallelnet.core.workers" in g["parallelnet.core.server"]
    assert "parallelnet.core.procfs" in g["parallelnet.experiments.measure"]   # from X import mod
    assert "parallelnet.core.backend" in g["parallelnet.backends.epoll"]
    # the cycle finder: a 3-cycle found, the module that only leads into it not
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert cycles(graph()) == []


def test_folders_are_layers():
    wrong = sorted(f"{m} -> {d}" for m, deps in graph().items() for d in deps
                   if layer(d) not in ALLOWED[layer(m)])
    assert wrong == [], "imports against the layers (core <- backends <- experiments):\n" + "\n".join(wrong)


SERVE = """
import json, sys
from parallelnet.core.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def test_serve_imports_only_the_chosen_backend():
    res = subprocess.run([sys.executable, "-c", SERVE, "serve", "--backend", "select", "--port", "0",
                          "--workers", "1", "--duration", "0.2"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["status"] == 0
    loaded = set(out["modules"])
    assert "parallelnet.backends.select_" in loaded
    other = sorted(m for m in loaded if m.startswith(("parallelnet.backends.", "parallelnet.experiments"))
                   and m not in ("parallelnet.backends.select_", "parallelnet.backends.readiness"))
    assert other == []
    libraries = sorted(m for m in loaded if m.split(".")[0] in
                       ("uvloop", "rloop", "cffi", "_cffi_backend", "liburing", "asyncio"))
    assert libraries == []
