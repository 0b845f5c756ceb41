"""aenet_dist: distributed trainer for aenet-compatible neural-network interatomic potentials."""

import os

# OpenMP threads that wait for work by spinning (libgomp's default, "active") steal the cores
# of any other process on a shared node, and each of torch's many small operators then waits
# for a descheduled thread (training; the torch predictor of 2026-11 took 49 s instead of 4.6 s
# beside one busy process). Passive waiting costs nothing measurable on a quiet machine. It must be set
# before torch loads OpenMP, which is why it is here; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS starts one spinning thread per core for any large enough matrix product. Our
# numpy products (descriptors, inference networks) are thin and run inside one MPI rank per core:
# threads only contend (featurize on TiO2-1000: 11.1 CPU-s with them, 6.7 without, same wall time).
# It only takes effect if aenet_dist is imported before numpy (the commands always are; in your
# own script import aenet_dist first, or set the variable); a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
