# Scratch wrapper: logs (and optionally forces) the order in which workers add the listener to their epoll.
import os, sys, threading, time
from parallelnet.backends.epoll import EpollBackend
LOG = os.environ.get("HR_LOG", "/dev/null")
ORDER = os.environ.get("HR_ORDER", "")   # "01": worker 0 registers first; "10": worker 1 first
evs = {0: threading.Event(), 1: threading.Event()}
orig = EpollBackend._register
def reg(self, fd, events, exclusive=False):
    is_l = fd in getattr(self, "_listeners", {}) and not getattr(self, "_hr_done", False)
    idx = self.ctx.index
    if is_l and ORDER:
        first = int(ORDER[0])
        if idx != first:
            evs[first].wait(5); time.sleep(0.02)
    tb = time.monotonic_ns()
    orig(self, fd, events, exclusive)
    ta = time.monotonic_ns()
    if is_l:
        self._hr_done = True
        with open(LOG, "a") as f:
            f.write(f"{ta} {idx} {threading.get_native_id()} {fd} {exclusive} {tb} {ta}\n")
        evs[idx].set()
EpollBackend._register = reg
FLIP_AT = float(os.environ.get("HR_FLIP_AT", "0")); FLIP_WHO = int(os.environ.get("HR_FLIP_WHO", "0"))
objs = {}
orig_setup = EpollBackend._setup
def setup(self):
    orig_setup(self); objs[self.ctx.index] = self
    if FLIP_AT and len(objs) == 1:
        def flip():
            time.sleep(FLIP_AT)
            b = objs[FLIP_WHO]
            for fd in b._listeners:
                b._ep.unregister(fd); b._ep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            with open(LOG + ".flip", "w") as f: f.write(f"{time.monotonic_ns()} moved worker {FLIP_WHO} to tail\n")
        threading.Thread(target=flip, daemon=True).start()
EpollBackend._setup = setup
import select
from parallelnet.core.cli import main
sys.exit(main(sys.argv[1:]))
