"""The cdef of a C core's cffi extension, derived from the header its C includes.

Shared by the build scripts (``backends/native_build.py``, ``backends/uring/build.py``),
which load this file by path (importlib): setuptools runs them with the repo root as
the working directory and nothing of ``parallelnet`` importable yet.

An API header (``native_api.h``, ``uring/uring_api.h``) holds, between
``/* ---- cdef begin ---- */`` and ``/* ---- cdef end ---- */``, what Python sees of its
core: integer #defines, enums, structs, typedefs and prototypes.  The C includes that
header, so the compiler checks each prototype against its definition, and the cdef is
the very same text with one rewrite: the callbacks' ``static`` (declared for the C that
calls them before cffi defines them) becomes ``extern "Python"``.  ``struct pol_limits``
comes from ``policy_core.h``, where both cores take it from.
"""

from __future__ import annotations

import os
import re

BEGIN = "/* ---- cdef begin ---- */"
END = "/* ---- cdef end ---- */"


def read(*parts: str) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read()


def marked(path: str, callback_prefix: str) -> str:
    """``path``'s text between the cdef markers; ``static T <callback_prefix>name(`` turned
    into ``extern "Python" T <callback_prefix>name(``, nothing else rewritten."""
    m = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), read(path), re.S)
    if not m:
        raise RuntimeError(f"{os.path.basename(path)}: cdef markers not found")
    return re.sub(rf"^static (\w[\w \*]*?\b{re.escape(callback_prefix)}\w+\()",
                  r'extern "Python" \1', m.group(1), flags=re.M)


def struct(path: str, name: str) -> str:
    """``struct name { ... };`` as ``path`` declares it (at the start of a line)."""
    m = re.search(rf"^struct {re.escape(name)} \{{.*?^\}};", read(path), re.S | re.M)
    if not m:
        raise RuntimeError(f"{os.path.basename(path)}: struct {name} not found")
    return m.group(0)

