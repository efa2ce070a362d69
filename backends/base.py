"""The backend interface, as backends import it.

The types live in the core (``parallelnet.core.backend``: ``Backend``, ``WorkerContext``,
``Limits``, ``StopSignal``, ``Availability``, the registry; ``parallelnet.core.accept``:
the accept rule and its back-off), so that the core never imports a backend package.
This module re-exports them under the names backends have always used.

How to add a backend - one module and one entry point, tested by the conformance and
fault suites the moment it is registered - is ``docs/adding-a-backend.md``; the design
is ``docs/architecture.md``.
"""

from __future__ import annotations

from parallelnet.core.accept import (  # noqa: F401
    ACCEPT_BACKOFF_MAX, ACCEPT_ONE_LOST, ACCEPT_RESOURCE_ERRORS, AcceptPacer, accept_pending,
)
from parallelnet.core.backend import (  # noqa: F401
    DISPATCH, ENTRY_POINT_GROUP, EXCLUSIVE, EXCLUSIVE_ROTATE, KINDS, REUSEPORT, ROTATE_EVERY,
    SHARED, Availability, Backend, BackendError, Limits, StopSignal, WorkerContext,
    get_backend, registry,
)

_ACCEPT_ONE_LOST = ACCEPT_ONE_LOST   # the name this module once had for it
