"""aenet_dist: distributed trainer for aenet-compatible neural-network interatomic potentials."""

__version__ = "0.1.0"
