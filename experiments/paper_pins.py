"""Which results the paper is built from: the pins in ``paper/paper.in.md``.

A pin is one line of the template::

    <!-- pin load-curve: results/20261127T150000-load-curve-standard -->

naming, per experiment, the run directory (or directories, space-separated) every
table, figure and number of the paper comes from.  Pinned, not "the newest": a new run
changes the paper only when it is pinned, which ``parallelnet reproduce`` does for the
runs it has just produced before it rebuilds the paper.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from parallelnet.experiments.provenance import REPO

TEMPLATE = os.path.join(REPO, "paper", "paper.in.md")
#: ``EXPERIMENT`` or ``EXPERIMENT@GROUP`` (runs of another machine: paper/build.py).
PIN = re.compile(r"^<!-- pin ([\w.@-]+): (.*?) -->$", re.M)


def read_pins(template: str = TEMPLATE) -> dict[str, list[str]]:
    try:
        with open(template) as f:
            text = f.read()
    except OSError:
        return {}
    return {m.group(1): m.group(2).split() for m in PIN.finditer(text)}


def cited_experiments(template: str = TEMPLATE) -> list[str]:
    """The experiments the paper cites from this machine, in the order the template pins
    them (``EXPERIMENT@GROUP`` pins are another machine's runs: left out); without any
    pin, every registered experiment marked ``cited``."""
    pins = read_pins(template)
    if pins:
        return [name for name in pins if "@" not in name]
    from parallelnet.experiments import framework

    return [n for n in framework.names() if getattr(framework.get(n), "cited", False)]


def repin(produced: dict[str, list[str]], template: str = TEMPLATE) -> None:
    """Point the pins of the experiments in ``produced`` at the directories just made
    (paths relative to the repository); add a pin for one that had none."""
    with open(template) as f:
        text = f.read()
    for name, dirs in produced.items():
        rel = " ".join(os.path.relpath(os.path.abspath(d), REPO) for d in dirs)
        line = f"<!-- pin {name}: {rel} -->"
        pattern = re.compile(rf"^<!-- pin {re.escape(name)}: .*? -->$", re.M)
        if pattern.search(text):
            text = pattern.sub(line, text)
        else:
            text = line + "\n" + text
    with open(template, "w") as f:
        f.write(text)


def build_paper() -> int:
    return subprocess.call([sys.executable, os.path.join(REPO, "paper", "build.py")], cwd=REPO)
