"""Logging set-up: INFO on rank 0, WARNING on the other ranks, one format everywhere."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Configure the ``aenet_dist`` logger for this process and return it."""
    logger = logging.getLogger("aenet_dist")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """Child logger of ``aenet_dist`` for module ``name``."""
    return logging.getLogger("aenet_dist").getChild(name.rsplit(".", 1)[-1])
