"""The C load generator, in one package.

* ``loadgen.c``: the C core (pthreads, epoll, closed/open/churn loops, HDR-style histograms);
* ``loadgen_build.py``: its cffi build (``setup.py`` names it; compiled at install into
  ``parallelnet.experiments.loadgen._loadgen``);
* ``loadgen.py``: the Python face - :class:`LoadSpec`, :func:`run`, :class:`LoadResult`, the
  ``parallelnet loadgen`` command line (docs/loadgen.md);
* ``netns.py``: running a generator inside a network namespace over a veth pair.

The package's names are the wrapper's (``from parallelnet.experiments.loadgen import
LoadSpec, run``; private state such as ``_fd_reserved`` lives in
``parallelnet.experiments.loadgen.loadgen``); nothing here imports the experiments above it.
"""

from parallelnet.experiments.loadgen.loadgen import *  # noqa: F401,F403 - the package's API
