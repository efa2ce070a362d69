"""``python -m parallelnet.experiments.machine``: the machine report (see the package)."""
import sys

from parallelnet.experiments.machine import main

sys.exit(main())
