"""aenet_dist: distributed trainer for aenet-compatible neural-network interatomic potentials."""

import os

# OpenMP threads that wait for work by spinning (libgomp's default, "active") steal the cores
# of any other process on a shared node, and each of torch's many small operators then waits
# for a descheduled thread: predict on 1000 TiO2 structures took 49 s instead of 4.6 s beside
# one busy process. Passive waiting costs nothing measurable on a quiet machine. It must be set
# before torch loads OpenMP, which is why it is here; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
