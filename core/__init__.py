"""parallelnet.core: the server (listeners, workers, pinning, stats, protocols, CLI).

The server never imports parallelnet.experiments; the CLI imports experiment code
lazily, only inside the subcommands that need it.
"""
