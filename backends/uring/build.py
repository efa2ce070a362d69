"""cffi builder for the io_uring core (API mode, compiled at install time).

``setup.py`` names ``backends/uring/build.py:ffibuilder``; setuptools compiles one
translation unit - ``event_core.c`` (which includes ``uring_api.h`` and
``kernel_abi.h``), then ``raw_api.c`` and ``cproto.c`` - into
``parallelnet.backends.uring._uring``.  One unit, so the compiler inlines across the
split exactly as it did when it was one file.  No liburing header or library is needed to
build: the C declares its own kernel-ABI structs and resolves liburing's functions with
dlsym at run time from the PyPI wheel's ``liburing/liburing.so`` (kernel_abi.h).  API
mode, not ABI: each call costs about 2.5x less, the compiler checks the declarations
against the source, and cffi releases the GIL around every call, so ``uc_wait`` blocks
in the kernel without holding it.

The cdef is not written here: it is ``uring_api.h``'s text between its cdef markers (the
header the C includes: one declaration of the structs and functions), with
``struct pol_limits`` from ``policy_core.h`` (``backends/cdef_build.py``, shared with
``native_build.py``) and the kernel constants Python reads.

Run this file directly to build the extension in place for a quick experiment.
"""

from __future__ import annotations

import importlib.util
import os

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.dirname(HERE)   # backends/: proto_core.h, policy_core.h, handoff_recv.h
SOURCES = ("event_core.c", "raw_api.c", "cproto.c")
HEADERS = ("uring_api.h", "kernel_abi.h")
SHARED_HEADERS = ("proto_core.h", "policy_core.h", "handoff_recv.h")

#: kernel_abi.h's macros that Python reads (their values come from the C at build time).
KERNEL_CONSTANTS = (
    "IORING_SETUP_SQPOLL", "IORING_SETUP_SUBMIT_ALL", "IORING_SETUP_COOP_TASKRUN",
    "IORING_SETUP_TASKRUN_FLAG", "IORING_SETUP_SINGLE_ISSUER", "IORING_SETUP_DEFER_TASKRUN",
    "IORING_SETUP_CQSIZE", "IORING_CQE_F_BUFFER", "IORING_CQE_F_MORE", "IORING_CQE_BUFFER_SHIFT",
)


def _cdef_build():
    """backends/cdef_build.py, loaded by path (nothing of parallelnet is importable here)."""
    spec = importlib.util.spec_from_file_location("_parallelnet_cdef_build", os.path.join(SHARED, "cdef_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cdef_text() -> str:
    """The cdef, derived mechanically from the headers the C itself includes."""
    cb = _cdef_build()
    consts = "".join(f"#define {name} ...\n" for name in KERNEL_CONSTANTS)
    return (consts + cb.struct(os.path.join(SHARED, "policy_core.h"), "pol_limits") + "\n"
            + cb.marked(os.path.join(HERE, "uring_api.h"), "uc_py_"))


ffibuilder = cffi.FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source("parallelnet.backends.uring._uring",
                      "".join(f'#include "{s}"\n' for s in SOURCES),
                      include_dirs=[HERE, SHARED],
                      depends=[os.path.join(HERE, f) for f in SOURCES + HEADERS]
                      + [os.path.join(SHARED, h) for h in SHARED_HEADERS],
                      libraries=["dl"], extra_compile_args=["-O2", "-std=gnu11"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
