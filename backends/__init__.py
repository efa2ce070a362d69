"""parallelnet.backends: one worker's event loop, swappable (see base.py)."""
