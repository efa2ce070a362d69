"""The batching window's policy for a readiness loop (``--epoll-latency-budget-us``).

io_uring can wait for a batch of completions with a bound on the delay
(``io_uring_submit_and_wait_min_timeout``; the policy is uring/event_core.c's ``window_nr``).  So
that every io_uring figure can be read against epoll *at the same coalescing policy*, this
is the same policy for epoll, off by default:

* the batch is the number of events the measured rate (a time-weighted moving average,
  ``TAU`` s) predicts within the budget B, at most ``NR_MAX`` and at most two per open
  connection (a connection brings at most one request, and its answer's writability, per
  round trip), and there is no window below 2;
* no window while a connection has output queued (its next writable event releases more
  of a reply), while clients wait for our answers (a request arriving within B/2 after
  our answer to the same connection left; at least ``CLOSED_MAX`` of them), nor while the
  worker is busy (``UTIL_MAX`` of a CPU).

The mechanism differs, and that difference is what the comparison measures: epoll has no
"return after N events or after B": a wait returns at its first event.  The loop then, if
the wait took less than B and delivered fewer events than the batch, sleeps for the rest
of B and collects what arrived meanwhile with a non-blocking wait - one wake-up per
window, as io_uring's, but it always waits out B where io_uring returns as soon as the
batch is full.  A wait that took longer than B (an idle gap) is not held, as io_uring's
min_wait does not hold the first completion after one.
"""

from __future__ import annotations

import time

NR_MAX = 64
TAU = 0.004          # s: the moving averages' time constant
PERIOD = 0.001       # s: how often they are updated
UTIL_MAX = 0.6
CLOSED_MAX = 0.5


class LatencyWindow:
    """One worker's window: its measurements and its decision."""

    __slots__ = ("budget", "half", "rate", "util", "closed", "t0", "cpu0", "events",
                 "arrivals", "quick", "waits")

    def __init__(self, budget_us: int) -> None:
        self.budget = budget_us / 1e6
        self.half = self.budget / 2
        self.rate = self.util = self.closed = 0.0
        self.t0 = time.monotonic()
        self.cpu0 = time.thread_time()
        self.events = self.arrivals = self.quick = self.waits = 0

    def arrival(self, gap: float) -> None:
        """A request arrived ``gap`` s after our answer to the same connection left."""
        self.arrivals += 1
        self.quick += gap <= self.half

    def update(self, now: float, events: int) -> None:
        self.events += events
        dt = now - self.t0
        if dt < PERIOD:
            return
        cpu = time.thread_time()
        a = dt / (dt + TAU)
        self.rate += a * (self.events / dt - self.rate)
        self.util += a * ((cpu - self.cpu0) / dt - self.util)
        if self.arrivals:
            self.closed += a * (self.quick / self.arrivals - self.closed)
        self.t0, self.cpu0 = now, cpu
        self.events = self.arrivals = self.quick = 0

    def batch(self, nconns: int, queued: int) -> int:
        """The batch a wait should gather (0: return at the first event)."""
        if queued or self.util >= UTIL_MAX or self.closed >= CLOSED_MAX:
            return 0
        nr = min(NR_MAX, int(self.rate * self.budget), 2 * nconns)
        return nr if nr >= 2 else 0
