"""core/procfs.py, the one reader of /proc: stat lines (real and synthetic), schedstat,
status, /proc/stat."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest

from parallelnet.core import procfs

# A real line's shape: 52 fields (Linux 5.x/6.x); the values are arbitrary but distinct.
TAIL = ("S 4321 4321 4321 0 -1 4194560 120 0 0 0 345 67 0 0 20 0 3 0 1000 "
        "123456789 2048 18446744073709551615 1 1 0 0 0 0 0 16781312 17410 0 0 0 17 5 0 0 "
        "0 0 0 0 0 0 0 0 0 0 0")


def line(comm: str, pid: int = 1234) -> bytes:
    return f"{pid} ({comm}) {TAIL}\n".encode()


@pytest.mark.parametrize("comm", [
    "python3",
    "a b",                 # spaces
    "x) S 1 2 3",          # a ')' followed by what looks like the fields
    "((",                  # unbalanced parentheses
    ")",                   # only the trap
    "",                    # empty (PR_SET_NAME "")
    "iou-sqp-4321",
])
def test_stat_fields_are_counted_after_the_last_parenthesis(comm):
    st = procfs.parse_stat(line(comm))
    assert st.comm == comm and st.pid == 1234
    assert (st.state, st.ppid, st.flags) == ("S", 4321, 4194560)
    assert (st.utime, st.stime, st.processor) == (345, 67, 5)
    assert (st.minflt, st.majflt) == (120, 0)
    assert st.user_s == pytest.approx(345 / procfs.CLK_TCK)
    assert not st.kthread


def test_stat_kernel_thread_flag():
    tail = TAIL.replace("4194560", str(procfs.PF_KTHREAD | 0x40), 1)
    assert procfs.parse_stat(f"2 (kthreadd) {tail}").kthread


@pytest.mark.parametrize("bad", [b"", b"1234 python3 S 1", b"1234 (short) S 1 2 3"])
def test_stat_refuses_what_is_not_a_stat_line(bad):
    with pytest.raises(ValueError):
        procfs.parse_stat(bad)


def test_real_stat_of_this_process_and_a_thread_named_with_the_trap():
    """The kernel's own lines: a thread renamed to ``a) b (c`` is still read right."""
    me = procfs.read_stat(os.getpid())
    assert me is not None and me.pid == os.getpid() and me.ppid == os.getppid()
    assert me.processor in range(os.cpu_count() or 1)

    named, done = threading.Event(), threading.Event()
    tids = []

    def body():
        tids.append(threading.get_native_id())
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(15, b"a) b (c", 0, 0, 0) == 0   # PR_SET_NAME
        named.set()
        end = time.monotonic() + 0.05
        while time.monotonic() < end:   # some CPU of its own
            pass
        done.wait(5)

    t = threading.Thread(target=body)
    t.start()
    try:
        assert named.wait(5)
        st = procfs.read_stat(os.getpid(), tids[0])
        assert st is not None and st.comm == "a) b (c" and st.pid == tids[0]
        assert st.state in "RSD" and st.ppid == os.getppid()
        assert tids[0] in procfs.tasks(os.getpid())
    finally:
        done.set()
        t.join()
    # gone (the task entry outlives join() by a moment): None and zeros, not an error
    end = time.monotonic() + 5
    while procfs.read_stat(os.getpid(), tids[0]) is not None and time.monotonic() < end:
        time.sleep(0.01)
    assert procfs.read_stat(os.getpid(), tids[0]) is None
    assert procfs.schedstat_ns(os.getpid(), tids[0]) == 0
    assert procfs.ctx_switches(os.getpid(), tids[0]) == (0, 0)


def test_schedstat_and_process_cpu():
    assert procfs.parse_schedstat("123456789 2000 17\n") == 123456789
    tid = threading.get_native_id()
    a = procfs.schedstat_ns(os.getpid(), tid)
    sum(i * i for i in range(300_000))
    b = procfs.schedstat_ns(os.getpid(), tid)
    assert b > a > 0
    assert procfs.process_cpu_ns(os.getpid()) >= b
    assert procfs.process_cpu_ns(2 ** 22 + 7) == 0           # no such process


def test_status_context_switches():
    text = ["Name:\tx\n", "voluntary_ctxt_switches:\t12\n", "nonvoluntary_ctxt_switches:\t3\n"]
    assert procfs.parse_ctx_switches(text) == (12, 3)
    vol, inv = procfs.ctx_switches(os.getpid(), threading.get_native_id())
    time.sleep(0.001)
    assert procfs.ctx_switches(os.getpid(), threading.get_native_id())[0] > vol >= 0 and inv >= 0


def test_cpu_jiffies():
    text = ["cpu  10 0 20 300 4 0 5 0 0 0\n", "cpu0 10 0 20 300 4 0 5 0 0 0\n",
            "intr 12345\n", "ctxt 99\n"]
    assert procfs.parse_cpu_jiffies(text) == {"cpu": [10, 0, 20, 300, 4, 0, 5, 0, 0, 0],
                                              "cpu0": [10, 0, 20, 300, 4, 0, 5, 0, 0, 0]}
    real = procfs.cpu_jiffies()
    assert "cpu" in real and "cpu0" in real and len(real["cpu0"]) >= 8


def test_all_processes_and_descendants_find_a_child():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        procs = procfs.all_processes()
        assert procs[child.pid].ppid == os.getpid()
        assert {os.getpid(), child.pid} <= procfs.descendants([os.getpid()], procs)
        assert child.pid not in procfs.descendants([child.pid + 10 ** 7], procs)
    finally:
        child.kill()
        child.wait()


def test_minor_faults_count_fresh_pages_of_the_whole_process():
    """/proc/PID/stat's minflt is the process's (all threads): touching 8 MiB of fresh
    anonymous memory takes at least one fault per 4 KiB page not yet mapped."""
    import mmap

    before = procfs.read_stat(os.getpid()).minflt
    m = mmap.mmap(-1, 8 << 20)
    for off in range(0, 8 << 20, 4096):
        m[off] = 1
    after = procfs.read_stat(os.getpid()).minflt
    m.close()
    # Transparent huge pages may map 2 MiB at a time: at least 4 faults, not 2,048.
    assert after - before >= 4
