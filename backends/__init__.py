"""parallelnet.backends: one worker's event loop, swappable.  The interface they implement
is ``parallelnet.core.backend`` (backends import the core, never the reverse);
``readiness.py`` is the shared loop of select/poll/epoll; how to add one:
docs/adding-a-backend.md."""
