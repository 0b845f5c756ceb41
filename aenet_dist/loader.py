"""Per-rank data: train/test split, cost-balanced contiguous shards, per-epoch batch plans.

Everything here is a pure function of (store, number of shards, seed, epoch), so every
rank computes the same plan without communication, and a restarted job the same again.

* Split: ``test_percent`` of all structures, chosen by a permutation seeded with ``split_seed``.
* Shards: ``num_shards`` contiguous structure ranges of about equal cost (descriptor bytes
  plus derivative bytes); a rank owns ``num_shards / world_size`` consecutive shards and
  reads exactly that range of the store.
* Batches: each epoch has ``ceil(train structures / batch_size)`` global steps. Each shard
  permutes its training structures with a generator seeded by (seed, epoch, shard) and
  cuts them into that many near-equal parts; global step k is the union of every shard's
  part k. The union does not depend on how shards are spread over ranks, so a 2-rank run
  and a 1-rank run with 2 shards take the same global batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .batching import ShardData, shard_from_range
from .store import StoreReader, StructureRange


def split_test(num_structures: int, test_percent: float, seed: int) -> np.ndarray:
    """Boolean mask of the test structures."""
    count = int(round(num_structures * test_percent / 100.0))
    mask = np.zeros(num_structures, dtype=bool)
    mask[np.random.default_rng(seed).permutation(num_structures)[:count]] = True
    return mask


def structure_costs(reader: StoreReader) -> np.ndarray:
    """Relative work per structure: descriptor rows plus 3x the derivative rows."""
    return reader.num_atoms.astype(np.float64) + 3.0 * reader.num_deriv_rows.astype(np.float64)


def shard_bounds(costs: np.ndarray, num_shards: int) -> np.ndarray:
    """(num_shards + 1,) boundaries of contiguous ranges with near-equal summed cost."""
    num = len(costs)
    if num_shards > num:
        raise ValueError(f"{num_shards} shards for {num} structures: use fewer ranks or shards")
    cumulative = np.cumsum(costs)
    targets = cumulative[-1] * np.arange(1, num_shards) / num_shards
    # Cut after the structure that brings the cumulative cost closest to each target.
    cuts = np.searchsorted(cumulative, targets, side="left")
    closer_before = (cuts > 0) & (np.abs(cumulative[np.maximum(cuts - 1, 0)] - targets) < np.abs(cumulative[cuts] - targets))
    cuts = np.where(closer_before, cuts, cuts + 1)
    bounds = np.r_[0, cuts, num].astype(np.int64)
    # Every shard gets at least one structure.
    for k in range(1, num_shards + 1):
        bounds[k] = max(bounds[k], bounds[k - 1] + 1)
    for k in range(num_shards - 1, 0, -1):
        bounds[k] = min(bounds[k], bounds[k + 1] - 1)
    return bounds


@dataclass
class RankData:
    """What one rank holds: its shards as one contiguous range, and its train/test indices."""

    shard: ShardData
    shard_ids: list[int]
    shard_ranges: list[tuple[int, int]]  # rank-local [start, stop) of each owned shard
    train_local: list[np.ndarray]  # per owned shard: rank-local indices of training structures
    test_local: np.ndarray  # rank-local indices of test structures
    num_train_global: int
    num_test_global: int


def load_rank_data(
    reader: StoreReader,
    rank: int,
    world_size: int,
    num_shards: int | None,
    test_percent: float,
    split_seed: int,
    dtype: torch.dtype,
) -> RankData:
    """Read this rank's contiguous range of the store and index its train/test structures."""
    num_shards = num_shards or world_size
    if num_shards % world_size:
        raise ValueError(f"data.num_shards={num_shards} must be a multiple of the number of ranks ({world_size})")
    bounds = shard_bounds(structure_costs(reader), num_shards)
    per_rank = num_shards // world_size
    shard_ids = list(range(rank * per_rank, (rank + 1) * per_rank))
    start, stop = int(bounds[shard_ids[0]]), int(bounds[shard_ids[-1] + 1])
    test = split_test(reader.num_structures, test_percent, split_seed)
    data = reader.read_range(start, stop)
    check_finite(data, reader)
    shard = shard_from_range(data, dtype)
    local = np.arange(start, stop)
    train_local, ranges = [], []
    for s in shard_ids:
        a, b = int(bounds[s]) - start, int(bounds[s + 1]) - start
        ranges.append((a, b))
        train_local.append(np.flatnonzero(~test[local[a:b]]) + a)
    return RankData(shard, shard_ids, ranges, train_local, np.flatnonzero(test[local]), int((~test).sum()), int(test.sum()))


def check_finite(data: StructureRange, reader: StoreReader) -> None:
    """Reference energies and forces must be finite; name the first offending structures."""
    bad = ~np.isfinite(data.energy)
    atom_bad = ~np.isfinite(data.forces).all(axis=1)
    if atom_bad.any():
        bad |= np.add.reduceat(atom_bad.astype(np.int64), np.r_[0, np.cumsum(data.num_atoms)[:-1]]) > 0
    if bad.any():
        names = reader.names()
        which = [names[data.start + k] for k in np.flatnonzero(bad)[:5]]
        raise ValueError(f"{reader.path}: reference energy or forces not finite in {int(bad.sum())} structure(s): {which}")


def steps_per_epoch(num_train_global: int, batch_size: int) -> int:
    return max(1, math.ceil(num_train_global / batch_size))


def epoch_plan(data: RankData, seed: int, epoch: int, steps: int) -> list[np.ndarray]:
    """This rank's structure indices (rank-local) for each global step of ``epoch``."""
    parts_per_shard = []
    for shard_id, train in zip(data.shard_ids, data.train_local):
        order = np.random.default_rng([seed, epoch, shard_id]).permutation(train)
        parts_per_shard.append(np.array_split(order, steps))
    return [np.concatenate([parts[k] for parts in parts_per_shard]) for k in range(steps)]


def eval_chunks(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Fixed-order chunks of ``indices`` for evaluation."""
    return [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)] if len(indices) else []
