"""The guest's idle states (experiments/machine/idle.py) and ``--idle poll``: read, disabled
for one run and restored whatever ends it; refused cleanly where they cannot be changed.
On a fake sysfs tree: the suite never changes the real machine's idle states."""

import json
import os

import pytest

from parallelnet.experiments.machine import idle


def fake_tree(root, states=(("POLL", "0"), ("haltpoll", "0")), cpus=2, gov="haltpoll",
              avail="ladder menu haltpoll"):
    (root / "cpuidle").mkdir(parents=True)
    (root / "cpuidle" / "current_governor").write_text(gov + "\n")
    (root / "cpuidle" / "available_governors").write_text(avail + " \n")
    for c in range(cpus):
        for k, (name, disable) in enumerate(states):
            d = root / f"cpu{c}" / "cpuidle" / f"state{k}"
            d.mkdir(parents=True)
            (d / "name").write_text(name + "\n")
            (d / "disable").write_text(disable + "\n")
            (d / "usage").write_text("100\n")
    return root


def disables(root):
    return {str(p.relative_to(root)): p.read_text().strip()
            for p in sorted(root.glob("cpu*/cpuidle/state*/disable")) if p.is_file()}


def test_poll_only_disables_every_state_but_poll_and_restores_each_as_it_was(tmp_path):
    root = fake_tree(tmp_path, states=(("POLL", "0"), ("C1", "0"), ("C6", "1")), gov="menu")
    before = disables(root)
    with idle.PollOnly(str(root)):
        during = disables(root)
        assert idle.describe(str(root)) == {"governor": "menu", "states": {
            f"cpu{c}": ["POLL", "C1 (disabled)", "C6 (disabled)"] for c in (0, 1)}}
    assert all(v == "1" for k, v in during.items() if "state0" not in k)
    assert all(during[k] == "0" for k in during if "state0" in k)
    assert disables(root) == before          # C6 was disabled before: it stays so


def test_the_haltpoll_governor_which_ignores_disable_is_swapped_for_menu_and_put_back(tmp_path):
    """Measured on this project's VM: with the haltpoll governor the halt state's usage
    count kept rising with it disabled; with menu only POLL was entered."""
    root = fake_tree(tmp_path)
    with idle.PollOnly(str(root)):
        assert idle.governor(str(root)) == "menu"
    assert idle.governor(str(root)) == "haltpoll"
    only_haltpoll = fake_tree(tmp_path / "b", avail="haltpoll")
    with pytest.raises(idle.IdleError, match="ignores disabled states"):
        idle.PollOnly(str(only_haltpoll)).check()


def test_a_state_still_entered_after_the_change_is_an_error_and_nothing_stays_changed(
        tmp_path, monkeypatch):
    root = fake_tree(tmp_path)
    before = disables(root)
    counts = iter([{"s": 5}, {"s": 9}])   # the halt state entered 4 more times while watched
    monkeypatch.setattr(idle, "_usage", lambda states: next(counts))
    monkeypatch.setattr(idle.PollOnly, "VERIFY_S", 0.0)
    monkeypatch.setattr(idle.PollOnly, "SETTLE_S", 0.0)
    with pytest.raises(idle.IdleError, match="still entered"):
        with idle.PollOnly(str(root)):
            pass
    assert disables(root) == before and idle.governor(str(root)) == "haltpoll"


def test_an_error_restores_the_states_and_a_tree_without_cpuidle_is_refused(tmp_path):
    root = fake_tree(tmp_path / "a")
    bad = root / "cpu1" / "cpuidle" / "state1" / "disable"
    bad.unlink()
    bad.mkdir()                               # cannot be written: the enter fails half-way
    before = disables(root)
    with pytest.raises(idle.IdleError, match="cannot write"):
        with idle.PollOnly(str(root)):
            pass
    assert disables(root) == before           # cpu0's state put back
    (tmp_path / "none").mkdir()
    with pytest.raises(idle.IdleError, match="no cpuidle"):
        idle.PollOnly(str(tmp_path / "none")).check()


def test_a_run_with_idle_poll_records_the_states_it_ran_under_and_restores_them(tmp_path, monkeypatch):
    from parallelnet.experiments import framework

    root = fake_tree(tmp_path / "sys")
    monkeypatch.setattr(idle, "SYSFS_CPU", str(root))
    seen = {}
    exp = framework.get("machine")

    def run_point(point, ctx):
        seen.update(disables(root))
        return {"probe": 1}

    monkeypatch.setattr(exp, "run_point", run_point)
    monkeypatch.setattr(exp, "summarize", lambda records, p, notes: framework.Summary())
    monkeypatch.setattr(exp, "figures", lambda *a: [])
    out = framework.run(exp, "smoke", str(tmp_path / "out"), allow_dirty=True,
                        stream=open(os.devnull, "w"), idle="poll")
    meta = json.loads(open(os.path.join(out, "meta.json")).read())
    assert meta["idle"] == {"mode": "poll", "governor": "menu",
                            "states": {"cpu0": ["POLL", "haltpoll (disabled)"],
                                       "cpu1": ["POLL", "haltpoll (disabled)"]}}
    assert seen["cpu0/cpuidle/state1/disable"] == "1"    # in effect while points ran
    assert set(disables(root).values()) == {"0"}          # and put back
    assert idle.governor(str(root)) == "haltpoll"
    with pytest.raises(ValueError, match="--idle"):
        framework.run(exp, "smoke", str(tmp_path / "out"), idle="halt")


def test_a_run_whose_idle_states_cannot_be_set_leaves_no_results_directory(tmp_path, monkeypatch):
    from parallelnet.experiments import framework

    root = fake_tree(tmp_path / "sys")
    monkeypatch.setattr(idle, "SYSFS_CPU", str(root))
    counts = iter([{"s": 1}, {"s": 2}])
    monkeypatch.setattr(idle, "_usage", lambda states: next(counts))
    out = tmp_path / "out"
    with pytest.raises(idle.IdleError, match="still entered"):
        framework.run(framework.get("machine"), "smoke", str(out), allow_dirty=True,
                      stream=open(os.devnull, "w"), idle="poll")
    assert not any(out.glob("*-machine-smoke")) and idle.governor(str(root)) == "haltpoll"


def test_the_cli_refuses_idle_poll_where_it_cannot_be_done_in_one_line(tmp_path, monkeypatch, capsys):
    from parallelnet.experiments import cli

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(idle, "SYSFS_CPU", str(tmp_path / "empty"))
    rc = cli.main(["machine", "--preset", "smoke", "--idle", "poll", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no cpuidle" in err[0], err
    assert not any((tmp_path / "out").glob("*machine*"))
