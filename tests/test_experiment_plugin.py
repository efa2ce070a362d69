"""An experiment from another package, added by following docs/experiments.md "Adding an
experiment" alone: the toy module and the pyproject entry point are taken from the doc's own
code blocks, registered the way an install registers them (a ``*.dist-info`` with its
``entry_points.txt`` on the path: what importlib.metadata reads after ``pip install``, with
nothing installed into the project's venv), then run through the command line under its
smoke preset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib

from parallelnet.experiments import framework, provenance

DOC = os.path.join(provenance.REPO, "docs", "experiments.md")


def doc_blocks() -> tuple[str, str]:
    """(the toy module, the toy package's pyproject) from the doc's section."""
    text = open(DOC).read()
    section = text[text.index("## Adding an experiment"):]
    section = section[:section.index("\n## ", 1)]
    (py,), (toml,) = ([textwrap.dedent(b) for b in re.findall(rf"```{kind}\n(.*?)```", section, re.S)]
                      for kind in ("python", "toml"))
    return py, toml


def install_like_pip(root, py: str, toml: str) -> str:
    """The package's source and a dist-info with its entry points under ``root``; the
    folder to put on PYTHONPATH."""
    project = tomllib.loads(toml)["project"]
    first_line, _, module = py.partition("\n")
    assert first_line.strip() == "# toyexp/toy.py"
    pkg = root / "toyexp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "toy.py").write_text(module)
    info = root / f"{project['name']}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    eps = project["entry-points"]["parallelnet.experiments"]
    (info / "entry_points.txt").write_text(
        "[parallelnet.experiments]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return str(root)


def test_the_toy_experiment_from_the_doc_runs_under_its_smoke_preset(tmp_path):
    (tmp_path / "site").mkdir()
    site = install_like_pip(tmp_path / "site", *doc_blocks())
    env = {**os.environ, "PYTHONPATH": site + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cli = [sys.executable, "-m", "parallelnet.core.cli", "experiment"]
    listed = subprocess.run([*cli, "list"], capture_output=True, text=True, timeout=60, env=env)
    assert listed.returncode == 0 and "A toy: closed-loop echo per backend" in listed.stdout
    assert "toy" not in framework.names()         # nothing was installed here
    out = tmp_path / "results"
    res = subprocess.run([*cli, "toy", "--preset", "smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=100, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run,) = os.listdir(out)
    assert run.endswith("-toy-smoke")
    meta = json.loads((out / run / "meta.json").read_text())
    assert meta["outcome"] == "ok" and meta["points"] == meta["planned"] == 1
    assert meta["plan"]["ran"] == ["epoll"] and meta["params"]["backends"] == ["epoll"]
    (rec,) = framework.load_records(str(out / run))
    assert rec["config"] == "epoll" and rec["requests"] > 0 and rec["client"]["errors"] == 0
    summary = json.loads((out / run / "summary.json").read_text())
    (table,) = summary["tables"]
    assert table["key"] == "rps" and table["rows"][0][0] == "epoll" and float(table["rows"][0][1]) > 0
    assert (out / run / "pyperf.json").exists()


def test_a_toy_entry_point_that_cannot_load_is_one_line(tmp_path):
    py, toml = doc_blocks()
    site = install_like_pip(tmp_path, py.replace("from parallelnet.experiments.measure import Layout",
                                                 "from parallelnet.experiments.measure import Nope"),
                            toml)
    env = {**os.environ, "PYTHONPATH": site}
    res = subprocess.run([sys.executable, "-m", "parallelnet.core.cli", "experiment", "toy"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "experiment 'toy'" in res.stderr and "Nope" in res.stderr
