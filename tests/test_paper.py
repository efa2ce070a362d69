"""The paper is generated from pinned results: it must be current, every figure it embeds and
every run it pins must exist, and a value it cannot find must fail the build."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

from parallelnet.experiments import analysis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_module():
    spec = importlib.util.spec_from_file_location("paper_build", os.path.join(ROOT, "paper", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _paper() -> str:
    with open(os.path.join(ROOT, "paper", "paper.md")) as f:
        return f.read()


def test_committed_paper_is_current():
    build = _build_module()
    assert build.main(["--check"]) == 0, "paper/paper.md is stale: run `make paper`"


def test_every_embedded_figure_and_every_pinned_run_exists():
    from parallelnet.experiments.paper_pins import read_pins

    text = _paper()
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", text)
    assert len(figures) >= 5
    for fig in figures:
        path = os.path.join(ROOT, "paper", fig)
        assert os.path.exists(path), fig
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    pins = read_pins()
    assert pins, "the template pins no run"
    for name, dirs in pins.items():
        for d in dirs:
            assert os.path.isdir(os.path.join(ROOT, d)), f"{name}: {d}"
            assert os.path.exists(os.path.join(ROOT, d, "meta.json")), f"{name}: {d}"
    for d in set(re.findall(r"`(results/\d{8}T[^`]+)`", text)):   # every cited run directory
        assert os.path.isdir(os.path.join(ROOT, d)), d
    assert os.path.exists(os.path.join(ROOT, "results", "index.md"))


def test_every_pinned_run_measured_one_commit_on_a_clean_tree():
    """`make reproduce` at that commit re-runs exactly the code the paper measured; the runs
    of another machine (pins ``EXPERIMENT@GROUP``) likewise share one commit per group."""
    import json

    from parallelnet.experiments.paper_pins import read_pins

    groups: dict[str, dict] = {}
    for name, dirs in read_pins().items():
        for d in dirs:
            with open(os.path.join(ROOT, d, "meta.json")) as f:
                groups.setdefault(name.partition("@")[2], {})[d] = json.load(f)["code"]
    assert groups.get("")
    for codes in groups.values():
        assert {c["commit"] for c in codes.values()} == {next(iter(codes.values()))["commit"]}, codes
        assert all(c["dirty"] is False for c in codes.values()), codes
        assert next(iter(codes.values()))["commit"][:12] in _paper()   # and the paper names it


def test_another_machines_pins_are_a_group_of_their_own():
    """A pin ``EXPERIMENT@GROUP`` (runs of a lent many-core machine, made at another commit)
    does not break the one-commit rule of this machine's pins, and reproduce leaves it out."""
    from parallelnet.experiments.paper_pins import cited_experiments

    build = _build_module()
    tpl = os.path.join(ROOT, "paper", "paper.in.md")
    with open(tpl) as f:
        pins = [line for line in f if line.startswith("<!-- pin ")]
    groups = {line.split()[2].rstrip(":").partition("@")[2] for line in pins}
    assert len(groups) >= 2, "the paper cites no other machine's runs"
    assert all("@" not in n for n in cited_experiments())
    with pytest.raises(build.BuildError, match="no pin of group 'x'"):
        build.build("".join(pins) + "{{pins:commit@x}}", regenerate_figures=False)


def test_pins_from_two_commits_or_a_dirty_tree_fail_the_build():
    build = _build_module()

    class Fake:
        def __init__(self, commit, dirty):
            self.rel, self.meta = f"results/{commit}", {"code": {"commit": commit, "dirty": dirty}}

    missing = []
    assert build.one_commit({"a": Fake("c1", False), "b": Fake("c1", False)}, missing) == "c1"
    assert missing == []
    assert build.one_commit({"a": Fake("c1", False), "b": Fake("c2", False)}, missing) is None
    assert "more than one commit" in missing[0]
    missing = []
    build.one_commit({"a": Fake("c1", True)}, missing)
    assert "differed from its commit" in missing[0]


def test_no_placeholder_or_missing_value_reaches_the_paper():
    text = _paper()
    assert "n/a" not in text        # a counter that cannot be observed says so in words
    assert "{{" not in text and "<!-- table:" not in text and "<!-- figure:" not in text
    assert "PENDING" not in text


def test_a_missing_value_fails_the_build():
    build = _build_module()
    with pytest.raises(build.BuildError, match="value nope:x"):
        build.build("{{nope:x}}", regenerate_figures=False)
    with pytest.raises(build.BuildError, match="pinned run results/does-not-exist"):
        build.build("<!-- pin herd: results/does-not-exist -->\n", regenerate_figures=False)


def test_values_are_looked_up_through_dotted_keys_and_formatted():
    build = _build_module()
    values = {"cpu.epoll.load=0.30": {"median": 12.5, "min": 12, "max": 13},
              "ratio.uring.vs.epoll.rate=40000": analysis.ratio_summary([0.65, 0.76, 0.82]),
              "ratio.8": analysis.ratio_summary([0.80, 0.82, 0.85, 0.86, 0.88, 0.90, 0.91, 0.95]),
              "share.epoll/exclusive.1.00": {"median": 0.78}}
    assert build.lookup(values, "cpu.epoll.load=0.30.median") == 12.5
    assert build.render_value(build.lookup(values, "ratio.uring.vs.epoll.rate=40000"), "ratio") == \
        "0.76× [range 0.65–0.82, n=3]"   # three pairs: a range, never called a 95% CI
    assert build.render_value(build.lookup(values, "ratio.8"), "ratio").startswith("0.87× [95% CI ")
    assert build.render_value(build.lookup(values, "share.epoll/exclusive.1.00.median"), "pct") == "78%"
    with pytest.raises(KeyError):
        build.lookup(values, "cpu.epoll.load=0.30.p99")
    with pytest.raises(build.BuildError):
        build.render_value(None, ".2f")
