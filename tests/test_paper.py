"""The paper is generated from results/: it must build, and the committed copy must be current."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_module():
    spec = importlib.util.spec_from_file_location("paper_build", os.path.join(ROOT, "paper", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tables_and_values_come_from_the_newest_run(tmp_path):
    build = _build_module()
    for stamp, cpu in (("20260101T000000", 9.0), ("20260202T000000", 5.0)):
        run = tmp_path / f"{stamp}-bench_uring"
        run.mkdir()
        # Raw runs only: the builder recomputes the summary with the experiment's own code.
        runs = [{"backend": b, "connections": 16, "rep": rep, "noisy": False, "cpu_us_per_req": c,
                 "user_us_per_req": 0.5, "sys_us_per_req": c - 0.5, "rps": 1e5}
                for rep in range(3) for b, c in (("uring", cpu), ("epoll", 10.0))]
        (run / "bench_uring.json").write_text(json.dumps(
            {"meta": {"kernel": "k", "micro": {"cffi_call_ns": 70}}, "runs": runs, "summary": []}))
    tables, values = {}, {}
    build.bench_uring(str(tmp_path), tables, values)
    assert values["bench_uring.uring.c16.cpu"] == "5.00"  # the newer run wins
    assert "20260202T000000-bench_uring" in tables["bench_uring"]
    text = build.render("a <!-- table:bench_uring --> b {{bench_uring.uring.c16.vs_epoll}} "
                        "<!-- table:missing --> {{nope}}", tables, values)
    assert "| uring | 16 |" in text and " 0.500 " in text   # paired: uring / epoll per rep
    assert "no `missing` results yet" in text and "n/a" in text


def test_committed_paper_is_current():
    build = _build_module()
    assert build.main(["--check"]) == 0, "paper/paper.md is stale: run python paper/build.py"
