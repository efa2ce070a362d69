"""Smoke test of experiments/uring_window.py (the batching-window sweep): it runs end to
end on a small grid and writes its raw records and paired summary.  Not a timing test:
the figures themselves are the experiment's business."""

from __future__ import annotations

import json

from conftest import require_backend
from parallelnet.experiments import uring_window


def test_uring_window_smoke(tmp_path):
    require_backend("uring")
    assert uring_window.main(["--reps", "2", "--duration", "0.6", "--warmup", "0.3",
                              "--rate", "4000", "--configs", "epoll", "--budgets", "0", "100",
                              "--out", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    data = json.loads((run_dir / "uring_window.json").read_text())
    assert {r["label"] for r in data["runs"]} == {"epoll", "uring/b0", "uring/b100"}
    assert all(r["requests"] > 0 and r["errors"] == 0 and r["cpu_us_per_req"] > 0
               for r in data["runs"])
    rows = {r["label"]: r for r in data["summary"]}
    assert rows["uring/b100"]["n"] >= 1 and "vs_epoll" in rows["uring/b100"]
    assert json.loads((run_dir / "meta.json").read_text())["kernel"]
