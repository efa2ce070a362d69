"""cffi builder for the ``native`` backend's C event loop (API mode, compiled at install).

``setup.py`` names ``backends/native_build.py:ffibuilder``; setuptools compiles
``native_core.c`` into ``parallelnet.backends._native``.  API mode: the compiler checks
the declarations against the source, and cffi releases the GIL around every call,
so ``nc_serve`` runs the whole event loop without holding it; the ``extern "Python"``
callbacks (protocols not written in C, rare events) take it back when called.

The cdef is not written here: it is ``native_api.h``'s text between its cdef markers (the
header native_core.c includes: one declaration of the constants, structs, callbacks and
functions), with ``struct pol_limits`` from ``policy_core.h`` (``cdef_build.py``, shared
with ``uring/build.py``).

Run this file directly to build the extension in place for a quick experiment.
"""

from __future__ import annotations

import importlib.util
import os

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef_build():
    """backends/cdef_build.py, loaded by path (nothing of parallelnet is importable here)."""
    spec = importlib.util.spec_from_file_location("_parallelnet_cdef_build", os.path.join(HERE, "cdef_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cdef_text() -> str:
    """The cdef, derived mechanically from the headers native_core.c itself includes."""
    cb = _cdef_build()
    return (cb.struct(os.path.join(HERE, "policy_core.h"), "pol_limits") + "\n"
            + cb.marked(os.path.join(HERE, "native_api.h"), "nc_py_"))


ffibuilder = cffi.FFI()
ffibuilder.cdef(cdef_text())
with open(os.path.join(HERE, "native_core.c")) as _f:
    ffibuilder.set_source("parallelnet.backends._native", _f.read(), include_dirs=[HERE],
                          depends=[os.path.join(HERE, h) for h in ("native_api.h", "proto_core.h", "policy_core.h", "handoff_recv.h")],
                          extra_compile_args=["-O2", "-std=gnu11", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
