"""A CPU hog with a duty cycle: the "overloaded CPU" of the design's claim, as a dose.

    python -m parallelnet.experiments.hog --cpu 0 --duty 0.5 --seconds 10 [--delay 2]

One process pinned to one CPU that, every ``period`` (10 ms), spins for ``duty × period``
and sleeps the rest; ``duty`` 1.0 never sleeps.  It competes with whatever else runs on
that CPU through the ordinary scheduler (same nice level, so a 100% hog and a busy worker
get about half the CPU each under EEVDF/CFS), which is the situation the design's claim
is about: a worker whose CPU is also busy with something else.  ``--delay`` sleeps first,
so the hog can be started before a measurement and switch on in the middle of it (the
step experiment) without a process start-up inside the window.  It always stops by
itself after ``--seconds`` (bounded), and :class:`Hog` kills it by PID on exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

PERIOD = 0.010


def spin(duty: float, seconds: float, delay: float = 0.0, period: float = PERIOD) -> int:
    """The hog's loop; returns the number of periods it ran."""
    time.sleep(delay)
    end = time.monotonic() + seconds
    periods = 0
    now = time.monotonic()
    while now < end:
        t0 = now
        busy_until = t0 + duty * period
        while now < busy_until:
            now = time.monotonic()
        if duty < 1.0:
            time.sleep(max(0.0, t0 + period - time.monotonic()))
        now = time.monotonic()
        periods += 1
    return periods


class Hog:
    """Context manager: ``with Hog(cpu=0, duty=0.5, seconds=10): ...``.  ``duty`` 0 starts
    nothing (the control), so every point of a dose-response is measured the same way."""

    def __init__(self, cpu: int, duty: float, seconds: float, delay: float = 0.0) -> None:
        if not 0.0 <= duty <= 1.0:
            raise ValueError(f"duty must be in [0, 1], got {duty}")
        self.cpu, self.duty, self.seconds, self.delay = cpu, duty, seconds, delay
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> "Hog":
        if self.duty > 0:
            cpu = self.cpu
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "parallelnet.experiments.hog", "--cpu", str(cpu),
                 "--duty", str(self.duty), "--seconds", str(self.seconds),
                 "--delay", str(self.delay)],
                preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", type=int, required=True)
    p.add_argument("--duty", type=float, required=True, help="fraction of each 10 ms period spent busy")
    p.add_argument("--seconds", type=float, required=True, help="stop after this long (bounded)")
    p.add_argument("--delay", type=float, default=0.0, help="sleep this long first")
    a = p.parse_args(argv)
    if not 0.0 <= a.duty <= 1.0 or not 0 < a.seconds <= 3600:
        p.error("--duty must be in [0, 1] and --seconds in (0, 3600]")
    os.sched_setaffinity(0, {a.cpu})
    spin(a.duty, a.seconds, a.delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
