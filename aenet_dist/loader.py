"""Per-rank data: split, cost-balanced chunk-aligned shards, epoch plans, and batch sources.

Everything that decides *what* is trained on is a pure function of (store, number of shards,
seed, epoch), so every rank computes the same plan without communication, a restarted job
the same again, and every cache mode trains on bitwise the same batches:

* Split: ``test_percent`` of all structures, chosen by a permutation seeded with ``split_seed``.
* Shards: ``num_shards`` contiguous ranges of whole store blocks (chunk-aligned, so a rank
  reads only its own chunks) with about equal cost — descriptor rows plus derivative rows,
  not structure counts. A rank owns ``num_shards / world_size`` consecutive shards.
* Plan: each epoch has ``ceil(train structures / batch_size)`` global steps. Each shard
  permutes its blocks, takes them ``shuffle_window_blocks`` at a time, permutes the training
  structures inside each window (generator seeded by (seed, epoch, shard)), and cuts the
  result into that many near-equal parts; global step k is the union of every shard's part k.
  The union does not depend on how shards are spread over ranks (a 2-rank run equals a
  1-rank run with 2 shards), and a step touches at most two windows, which is what lets the
  ``stream`` cache read the store window by window.

How batches reach the model (``data.cache``):

* ``gpu``: the shard lives on the device; batches are gathered there.
* ``memory``: the shard lives in host RAM; a background thread gathers the next batches.
* ``pinned``: as ``memory``, but batches are gathered into page-locked memory and copied with
  ``non_blocking=True``, overlapping the copy with the previous step's compute.
* ``stream``: nothing is held; a background thread reads the blocks of the coming steps
  from the store (a bounded cache of two shuffle windows) and gathers batches from them.
* ``auto``: ``gpu`` if the shard fits in free device memory with a margin, else ``pinned``
  (or ``memory`` on CPU) if it fits in available host memory, else ``stream``; logged.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from .batching import Batch, ShardData, gather_batch, shard_from_range
from .log import get_logger
from .store import StoreReader, StructureRange, concat_ranges

log = get_logger(__name__)
CACHE_SAFETY = 1.3  # tensors, indices and allocator slack over the raw payload
DEVICE_MARGIN_BYTES = 2 * 2**30  # left free on a GPU for activations and the CUDA context


def split_test(num_structures: int, test_percent: float, seed: int) -> np.ndarray:
    """Boolean mask of the test structures."""
    count = int(round(num_structures * test_percent / 100.0))
    mask = np.zeros(num_structures, dtype=bool)
    mask[np.random.default_rng(seed).permutation(num_structures)[:count]] = True
    return mask


def structure_costs(reader: StoreReader) -> np.ndarray:
    """Relative work per structure: descriptor rows plus 3x the derivative rows."""
    return reader.num_atoms.astype(np.float64) + 3.0 * reader.num_deriv_rows.astype(np.float64)


def structure_bytes(reader: StoreReader, itemsize: int) -> np.ndarray:
    """Bytes a structure occupies in a cache: descriptors, derivative rows, indices, targets."""
    features = max(reader.attrs["num_features"].values())
    per_atom = features * itemsize + 4 * itemsize + 3 * 8
    per_row = 3 * features * itemsize + 2 * 8
    return reader.num_atoms * per_atom + reader.num_deriv_rows * per_row


def balanced_cuts(costs: np.ndarray, parts: int) -> np.ndarray:
    """(parts + 1,) boundaries of contiguous, non-empty runs of ``costs`` minimizing the largest sum.

    Bisection on the largest sum; each probe fills runs greedily with ``searchsorted`` on the
    cumulative cost (``parts`` vectorized steps, no loop over items).
    """
    num = len(costs)
    if parts > num:
        raise ValueError(f"cannot cut {num} items into {parts} non-empty parts")
    cumulative = np.r_[0.0, np.cumsum(costs, dtype=np.float64)]

    def greedy(limit: float) -> np.ndarray | None:
        bounds = [0]
        for _ in range(parts):
            if bounds[-1] == num:
                break
            end = int(np.searchsorted(cumulative, cumulative[bounds[-1]] + limit, side="right")) - 1
            if end <= bounds[-1]:
                return None  # one item alone exceeds the limit
            bounds.append(min(end, num))
        return np.array(bounds) if bounds[-1] == num else None

    low, high = max(costs.max(), cumulative[-1] / parts), cumulative[-1]
    for _ in range(60):
        mid = 0.5 * (low + high)
        if greedy(mid) is None:
            low = mid
        else:
            high = mid
    bounds = greedy(high)
    # Fewer runs than parts (few large items): split the longest runs until every part exists.
    while len(bounds) - 1 < parts:
        lengths = np.diff(bounds)
        k = int(np.argmax(lengths))
        bounds = np.insert(bounds, k + 1, bounds[k] + lengths[k] // 2)
    return bounds.astype(np.int64)


def shard_bounds(reader: StoreReader, num_shards: int) -> np.ndarray:
    """Structure boundaries of the shards: at block boundaries when there are enough blocks."""
    costs = structure_costs(reader)
    blocks = reader.block_first
    num_blocks = len(blocks) - 1
    if num_shards > reader.num_structures:
        raise ValueError(f"{num_shards} shards for {reader.num_structures} structures: use fewer ranks or shards")
    if num_blocks >= num_shards:
        block_costs = np.add.reduceat(costs, blocks[:-1])
        return blocks[balanced_cuts(block_costs, num_shards)]
    log.warning(
        "%s has %d blocks for %d shards: shards cut inside blocks (featurize with a smaller --chunk-mb for chunk-aligned shards)",
        reader.path,
        num_blocks,
        num_shards,
    )
    return balanced_cuts(costs, num_shards)


@dataclass
class RankData:
    """This rank's part of the store: ranges, blocks and train/test indices (rank-local)."""

    start: int  # first store structure of the rank
    stop: int
    shard_ids: list[int]
    shard_blocks: list[list[tuple[int, int]]]  # per owned shard: rank-local [a, b) of each store block in it
    train_local: np.ndarray  # (n,) bool mask over the rank's structures
    test_local: np.ndarray  # rank-local indices of test structures
    num_train_global: int
    num_test_global: int


def rank_data(reader: StoreReader, rank: int, world_size: int, num_shards: int | None, test_percent: float, split_seed: int) -> RankData:
    """Which structures and blocks this rank owns (reads nothing but the structure table)."""
    num_shards = num_shards or world_size
    if num_shards % world_size:
        raise ValueError(f"data.num_shards={num_shards} must be a multiple of the number of ranks ({world_size})")
    bounds = shard_bounds(reader, num_shards)
    per_rank = num_shards // world_size
    shard_ids = list(range(rank * per_rank, (rank + 1) * per_rank))
    start, stop = int(bounds[shard_ids[0]]), int(bounds[shard_ids[-1] + 1])
    test = split_test(reader.num_structures, test_percent, split_seed)
    edges = np.unique(np.r_[reader.block_first, bounds])  # store blocks, cut at shard bounds
    shard_blocks = []
    for s in shard_ids:
        inside = edges[(edges >= bounds[s]) & (edges <= bounds[s + 1])]
        shard_blocks.append([(int(a) - start, int(b) - start) for a, b in zip(inside[:-1], inside[1:])])
    return RankData(start, stop, shard_ids, shard_blocks, ~test[start:stop], np.flatnonzero(test[start:stop]), int((~test).sum()), int(test.sum()))


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


def epoch_plan(data: RankData, seed: int, epoch: int, steps: int, window_blocks: int) -> list[np.ndarray]:
    """This rank's structure indices (rank-local) for each global step of ``epoch``."""
    parts_per_shard = []
    for shard_id, blocks in zip(data.shard_ids, data.shard_blocks):
        rng = np.random.default_rng([seed, epoch, shard_id])
        block_order = rng.permutation(len(blocks))
        order = []
        for w in range(0, len(block_order), window_blocks):
            members = np.concatenate([np.arange(*blocks[b]) for b in block_order[w : w + window_blocks]])
            order.append(rng.permutation(members[data.train_local[members]]))
        parts_per_shard.append(np.array_split(np.concatenate(order), steps))
    return [np.concatenate([parts[k] for parts in parts_per_shard]) for k in range(steps)]


def eval_chunks(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Fixed-order chunks of ``indices`` for evaluation."""
    return [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)] if len(indices) else []


# ---------------------------------------------------------------------------- caches


def choose_cache(requested: str, shard_bytes: float, device: torch.device) -> tuple[str, str]:
    """(mode, reason). ``gpu`` that cannot fit is an error before any data is read."""
    need = shard_bytes * CACHE_SAFETY
    host = psutil.virtual_memory().available
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits_device = need + DEVICE_MARGIN_BYTES < free
    else:
        free, fits_device = 0, False
    if requested == "gpu":
        if device.type != "cuda":
            raise ValueError("data.cache='gpu' needs a CUDA device (run.device); use 'memory' on CPU")
        if not fits_device:
            raise ValueError(
                f"data.cache='gpu': this rank's shard needs ~{need / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free "
                f"(minus a {DEVICE_MARGIN_BYTES / 2**30:.0f} GiB margin); use data.cache='pinned' or 'stream', or more ranks"
            )
        return "gpu", "requested"
    if requested != "auto":
        return requested, "requested"
    if fits_device:
        return "gpu", f"shard ~{need / 2**30:.2f} GiB fits in {free / 2**30:.1f} GiB free on {device}"
    if need < 0.8 * host:
        mode = "pinned" if device.type == "cuda" else "memory"
        return mode, f"shard ~{need / 2**30:.2f} GiB fits in {host / 2**30:.1f} GiB available host memory"
    return "stream", f"shard ~{need / 2**30:.2f} GiB exceeds 80% of {host / 2**30:.1f} GiB available host memory"


class ShardSource:
    """Batches from a shard held in memory (host or device)."""

    def __init__(self, shard: ShardData, device: torch.device, pin: bool):
        self.shard, self.device, self.pin = shard, device, pin

    def batch(self, local_index: np.ndarray, with_forces: bool) -> Batch:
        index = torch.from_numpy(local_index).to(self.shard.num_atoms.device)
        batch = gather_batch(self.shard, index, with_forces=with_forces)
        if self.pin:
            batch = batch.pin_memory()
        return batch


class StreamSource:
    """Batches read from the store block by block, keeping at most ``capacity`` blocks."""

    def __init__(self, reader: StoreReader, data: RankData, dtype: torch.dtype, capacity: int):
        self.reader, self.data, self.dtype, self.capacity = reader, data, dtype, max(capacity, 2)
        blocks = sorted({b for shard in data.shard_blocks for b in shard})
        self.block_start = np.array([a for a, _ in blocks], dtype=np.int64)
        self.blocks = blocks
        self.cache: OrderedDict[int, StructureRange] = OrderedDict()
        self.lock = threading.Lock()
        self.blocks_read = 0

    def _block(self, k: int) -> StructureRange:
        with self.lock:
            if k in self.cache:
                self.cache.move_to_end(k)
                return self.cache[k]
        a, b = self.blocks[k]
        part = self.reader.read_range(self.data.start + a, self.data.start + b, _numpy_dtype(self.dtype))
        check_finite(part, self.reader)
        with self.lock:
            self.cache[k] = part
            self.blocks_read += 1
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return part

    def batch(self, local_index: np.ndarray, with_forces: bool) -> Batch:
        which = np.searchsorted(self.block_start, local_index, side="right") - 1
        needed = sorted(set(which.tolist()))
        parts = [self._block(k) for k in needed]
        merged = concat_ranges(parts, self.reader.species)
        store_index = torch.from_numpy(np.concatenate([np.arange(p.start, p.stop) for p in parts]))
        shard = shard_from_range(merged, self.dtype, store_index=store_index)
        # rank-local index -> index inside the merged blocks
        offsets = np.cumsum([0] + [p.stop - p.start for p in parts])
        slot = np.searchsorted(needed, which)
        inside = local_index - self.block_start[which] + offsets[slot]
        return gather_batch(shard, torch.from_numpy(inside), with_forces=with_forces)


_END = object()  # the prefetch thread's end-of-plan marker


class Prefetcher:
    """Runs a source's ``batch`` for the coming steps in a background thread (bounded queue).

    torch and zarr release the GIL in their kernels, so gathering or reading the next batches
    overlaps with the current step. The order of batches is the order of ``plan``.
    """

    def __init__(self, source, plan: list[np.ndarray], with_forces: bool, depth: int = 3):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(source, plan, with_forces), daemon=True)
        self.stopped = threading.Event()
        self.thread.start()

    def _run(self, source, plan, with_forces):
        for local_index in plan:
            if self.stopped.is_set():
                return
            try:
                item = source.batch(local_index, with_forces)
            except BaseException as err:  # hand the error to the consumer
                self.queue.put(err)
                return
            self.queue.put(item)
        self.queue.put(_END)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        item = self.queue.get()
        if item is _END:
            self.queue.put(_END)  # later calls stop too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()
        while self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.05)


def _numpy_dtype(dtype: torch.dtype):
    return np.float32 if dtype == torch.float32 else np.float64


def make_source(reader: StoreReader, data: RankData, mode: str, dtype: torch.dtype, device: torch.device, window_blocks: int):
    """The batch source of a cache mode (reads the rank's shard now unless streaming)."""
    if mode == "stream":
        return StreamSource(reader, data, dtype, capacity=2 * window_blocks)
    part = reader.read_range(data.start, data.stop, _numpy_dtype(dtype))
    check_finite(part, reader)
    shard = shard_from_range(part, dtype)
    del part  # the shard holds its own copies; free the numpy range before moving to a device
    if mode == "gpu":
        return ShardSource(shard.to(device), device, pin=False)
    return ShardSource(shard, device, pin=(mode == "pinned" and device.type == "cuda"))
