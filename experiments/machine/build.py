"""cffi builder for the machine probes (API mode, compiled at install time).

``setup.py`` names ``experiments/machine/build.py:ffibuilder``; setuptools compiles
``wakeup.c`` into ``parallelnet.experiments.machine._wakeup``.  cffi releases the GIL
around each call, so the probe's two threads run without Python in the way.
"""

from __future__ import annotations

import os

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = cffi.FFI()
ffibuilder.cdef("""
int wake_latency(int waker_cpu, int sleeper_cpu, int n, int gap_us, unsigned seed, int64_t *out);
int timer_overshoot(int cpu, int n, int sleep_us, int64_t *out);
int wake_cpu_cost(int cpu, int n, int sleep_us, int64_t *cpu_ns);
""")
with open(os.path.join(HERE, "wakeup.c")) as f:
    ffibuilder.set_source("parallelnet.experiments.machine._wakeup", f.read(),
                          extra_compile_args=["-O2", "-Wall"], libraries=["pthread"])

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=HERE, verbose=True)
