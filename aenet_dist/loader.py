"""Per-rank data: split, cost-balanced chunk-aligned shards, epoch plans, and batch sources.

Everything that decides *what* is trained on is a pure function of (store, number of shards,
seed, epoch), so every rank computes the same plan without communication, a restarted job
the same again, and every cache mode trains on bitwise the same batches:

* Split: ``test_percent`` of the structures with derivative rows and of those without
  (stratified), chosen by permutations seeded with ``split_seed``.
* Shards: ``num_shards`` contiguous ranges of whole store blocks (chunk-aligned, so a rank
  reads only its own chunks) with about equal cost — descriptor rows plus derivative rows,
  not structure counts. A rank owns ``num_shards / world_size`` consecutive shards.
* Plan: each epoch has ``ceil(train structures / batch_size)`` global steps. Each shard
  permutes its blocks, takes them ``shuffle_window_blocks`` at a time, permutes the training
  structures inside each window (generator seeded by (seed, epoch, shard)), and cuts the
  result into that many near-equal parts; global step k is the union of every shard's part k.
  The union does not depend on how shards are spread over ranks (a 2-rank run equals a
  1-rank run with 2 shards), and a step draws from a few consecutive windows, which bounds
  the blocks the ``stream`` cache must hold at once.

How batches reach the model (``data.cache``):

* ``gpu``: the shard lives on the device as one tensor set; batches are gathered there.
* ``memory``: the shard lives in host RAM as pieces of consecutive blocks (:class:`BlockSource`,
  read by ``data.readers`` threads); a background thread gathers the next batches.
* ``pinned``: as ``memory``, but batches are gathered into page-locked memory and copied with
  ``non_blocking=True``, overlapping the copy with the previous step's compute.
* ``stream``: the training blocks are read ahead of the plan within ``data.memory_budget_gb``
  and dropped after their last step; the test set is kept in memory if it fits in half of
  what the budget leaves, else streamed too.
* ``auto``: ``gpu`` if the shard fits in free device memory with a margin, else ``pinned``
  (or ``memory`` on CPU) if it fits in available host memory and the budget, else ``stream``;
  logged.

Every step's indices are sorted and each source gathers block by block and merges, so all
modes see the same rows in the same order (bitwise-identical training on CPU).

Blocks are read and converted (:mod:`aenet_dist.block_loading`) by ``data.readers`` threads of
the rank, or by ``data.workers`` worker processes that hand each block over in shared memory;
both give the same batches bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from .batching import Batch, ShardData, dense_layout, gather_batch, merge_batches, merge_shards, numpy_dtype, shard_from_range
from .block_loading import BlockTask, BlockWorkers, check_finite, load_block
from .cores import local_ranks, usable_cores
from .log import get_logger
from .store import StoreReader, without_derivatives

log = get_logger(__name__)
FIXED_ORDER_STREAM = 0xF1CED  # third seed word of fixed_batch_order, apart from epoch_plan's shard ids
KEEP_EVAL_SHARE = 0.25  # largest share of a memory-cached shard whose gathered test batches are kept
CACHE_SAFETY = 1.3  # tensors, indices and allocator slack over the raw payload
DEVICE_MARGIN_BYTES = 2 * 2**30  # left free on a GPU for activations and the CUDA context
PREFETCH_DEPTH = 3  # batches gathered ahead of the training step (stream: 1, its blocks are read ahead instead)
STREAM_PREFETCH_DEPTH = 1
# What a stream budget must cover besides the blocks read ahead, in units of the largest batch:
# the queued batches, one being gathered, one being trained on, and autograd's working set
# for the force terms (about one batch's derivative rows, twice).
STREAM_BATCHES_IN_FLIGHT = STREAM_PREFETCH_DEPTH + 2 + 2
# ... and per reader thread, in units of the largest block: the float64 arrays as read, their
# float32 cast, and the gathered and permuted copies that make the dense blocks.
CONVERT_COPIES = 5
# Share of a stream budget kept free for what the accounting above does not see: the allocator's
# retained free blocks, per-thread arenas, decode buffers (measured ~8 % over at 5000 structures).
ALLOCATOR_RESERVE = 0.15
# The blocks a step needs at once change with each epoch's block order (up to ~1.2x the first
# epoch's in simulations); the first epoch's need is checked with this margin.
LIVE_MARGIN = 1.25
RESIDENT_PIECE_BYTES = 64 * 2**20  # blocks kept in memory are joined into pieces of this size


def split_test(has_derivs: np.ndarray, test_percent: float, seed: int) -> np.ndarray:
    """Boolean mask of the test structures, stratified: ``test_percent`` of the structures with
    derivative rows and the same share of those without.

    Stratified, so that training keeps its share of force-labelled structures whatever the
    split. The generator has its own stream, (seed, 1): featurize chooses the force structures
    with a plain permutation of the same default seed, and an unstratified split drawn from
    that same permutation would put the whole test set among the force structures.
    """
    has_derivs = np.asarray(has_derivs, dtype=bool)
    mask = np.zeros(len(has_derivs), dtype=bool)
    rng = np.random.default_rng([seed, 1])
    for group in (np.flatnonzero(has_derivs), np.flatnonzero(~has_derivs)):  # two groups
        count = int(round(len(group) * test_percent / 100.0))
        mask[rng.permutation(group)[:count]] = True
    return mask


def force_subset(has_derivs: np.ndarray, test: np.ndarray, force_percent: float, seed: int) -> np.ndarray:
    """Boolean mask over the store: training structures whose forces enter the loss.

    ``force_percent`` of the training structures with derivatives, the first ones of one seeded
    permutation (its own stream, (seed, 2)): the subsets for different percentages are nested.
    """
    mask = np.zeros(len(has_derivs), dtype=bool)
    candidates = np.flatnonzero(np.asarray(has_derivs, dtype=bool) & ~test)
    count = int(round(len(candidates) * force_percent / 100.0))
    mask[np.random.default_rng([seed, 2]).permutation(candidates)[:count]] = True
    return mask


# A training step's time, fitted over 40 random TiO2 batches of 8-128 structures (one core, residual
# 1.5-2 %): float32 0.91 ms + 0.17 µs an atom + 0.058 µs a derivative row of a dense block + 0.125 µs
# a sparse row; float64 0.98 ms + 0.26 + 0.107 + 0.236 µs. In dense-block rows:
ATOM_COST, SPARSE_ROW_COST = 2.7, 2.2


def structure_costs(reader: StoreReader) -> np.ndarray:
    """Relative training work per structure, in dense-block derivative rows (see ATOM_COST).

    A structure whose derivative rows fill (most of) the (atoms x atoms) grid becomes dense blocks
    (:func:`~aenet_dist.batching.dense_layout`), which cost their whole grid; the others' rows stay
    sparse, and a sparse row costs twice a dense one (it is gathered and scattered, and read by a
    slower product). The former model (atoms + 3x the rows, all alike)
    gave TiO2's rank with the sparse rows 19 % more work than the other; every step waited for it.
    """
    atoms = reader.num_atoms.astype(np.float64)
    rows = reader.num_deriv_rows.astype(np.float64)
    return ATOM_COST * atoms + np.where(dense_layout(reader.num_atoms, reader.num_deriv_rows), atoms * atoms, SPARSE_ROW_COST * rows)


def structure_bytes(reader: StoreReader, itemsize: int) -> np.ndarray:
    """Bytes a structure occupies in a cache: descriptors, derivative rows, indices, targets."""
    features = max(reader.attrs["num_features"].values())
    per_atom = features * itemsize + 4 * itemsize + 3 * 8
    per_row = 3 * features * itemsize + 2 * 8
    # Dense blocks hold the whole grid, missing pairs included (batching.dense_layout).
    held_rows = np.where(dense_layout(reader.num_atoms, reader.num_deriv_rows), reader.num_atoms.astype(np.int64) ** 2,
                         reader.num_deriv_rows)
    return reader.num_atoms * per_atom + held_rows * per_row


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
    split_digest: str  # of the global train/test split (checkpoints record it)
    with_rows: np.ndarray | None = None  # (n,) bool: the structure has derivative rows (steps get equal shares of them)


def rank_data(reader: StoreReader, rank: int, world_size: int, num_shards: int | None, test_percent: float, split_seed: int) -> RankData:
    """Which structures and blocks this rank owns (reads nothing but the structure table)."""
    num_shards = num_shards or world_size
    if num_shards % world_size:
        raise ValueError(f"data.num_shards={num_shards} must be a multiple of the number of ranks ({world_size})")
    bounds = shard_bounds(reader, num_shards)
    per_rank = num_shards // world_size
    shard_ids = list(range(rank * per_rank, (rank + 1) * per_rank))
    start, stop = int(bounds[shard_ids[0]]), int(bounds[shard_ids[-1] + 1])
    test = split_test(reader.has_derivs, test_percent, split_seed)
    edges = np.unique(np.r_[reader.block_first, bounds])  # store blocks, cut at shard bounds
    shard_blocks = []
    for s in shard_ids:
        inside = edges[(edges >= bounds[s]) & (edges <= bounds[s + 1])]
        shard_blocks.append([(int(a) - start, int(b) - start) for a, b in zip(inside[:-1], inside[1:])])
    digest = hashlib.sha256(np.packbits(test).tobytes()).hexdigest()[:16]
    return RankData(start, stop, shard_ids, shard_blocks, ~test[start:stop], np.flatnonzero(test[start:stop]), int((~test).sum()),
                    int(test.sum()), digest, reader.num_deriv_rows[start:stop] > 0)


def steps_per_epoch(num_train_global: int, batch_size: int) -> int:
    return max(1, math.ceil(num_train_global / batch_size))


def split_steps(order: np.ndarray, with_rows: np.ndarray | None, parts: int) -> list[np.ndarray]:
    """``order`` cut into ``parts`` steps: its structures with derivative rows and those without
    each cut into equal counts, in order (plain equal counts without ``with_rows``).

    Derivative rows are most of a step's work, so every rank's share of every step then holds
    about the same work: cut by count alone, one rank's share of a step of the synthetic set
    differed from the other's by 30 % (median), and every step waited for the slower rank (16-18 %
    of a 2-rank epoch; stratified, 8 %). Each step keeps ``batch_size`` structures (±1 per shard)
    and the same number of structures with forces.
    """
    if with_rows is None:
        return np.array_split(order, parts)
    heavy = with_rows[order]
    return [np.concatenate([a, b]) for a, b in zip(np.array_split(order[heavy], parts), np.array_split(order[~heavy], parts))]


def epoch_plan(data: RankData, seed: int, epoch: int, steps: int, window_blocks: int) -> list[np.ndarray]:
    """This rank's structure indices (rank-local) for each global step of ``epoch``: each shard's
    training structures in a seeded order (blocks shuffled, then structures within windows of
    blocks), cut into ``steps`` parts (:func:`split_steps`)."""
    parts_per_shard = []
    for shard_id, blocks in zip(data.shard_ids, data.shard_blocks):
        rng = np.random.default_rng([seed, epoch, shard_id])
        block_order = rng.permutation(len(blocks))
        order = []
        for w in range(0, len(block_order), window_blocks):
            members = np.concatenate([np.arange(*blocks[b]) for b in block_order[w : w + window_blocks]])
            order.append(rng.permutation(members[data.train_local[members]]))
        parts_per_shard.append(split_steps(np.concatenate(order), data.with_rows, steps))
    # A step is a set: sorted, so that every cache mode gathers its rows in the same order.
    return [np.sort(np.concatenate([parts[k] for parts in parts_per_shard])) for k in range(steps)]


def fixed_batch_order(seed: int, epoch: int, steps: int) -> np.ndarray:
    """``data.batches='fixed'``: the order in which epoch ``epoch`` (0-based) takes the kept batches
    (those of :func:`epoch_plan` for epoch 0): as formed in the first epoch, then a seeded
    permutation each epoch, the same on every rank (a step is a global batch)."""
    if epoch == 0:
        return np.arange(steps)
    return np.random.default_rng([seed, epoch, FIXED_ORDER_STREAM]).permutation(steps)


def eval_chunks(indices: np.ndarray, batch_size: int, sizes: np.ndarray | None = None, max_bytes: float = math.inf) -> list[np.ndarray]:
    """Fixed-order chunks of ``indices`` for evaluation: at most ``batch_size`` structures and,
    when ``sizes`` (bytes per index) is given, at most ``max_bytes`` (or one structure)."""
    if not len(indices):
        return []
    if sizes is None or not math.isfinite(max_bytes):
        return [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)]
    cumulative = np.r_[0.0, np.cumsum(sizes[indices])]
    chunks, start = [], 0
    while start < len(indices):  # a loop over chunks
        stop = int(np.searchsorted(cumulative, cumulative[start] + max_bytes, side="right")) - 1
        stop = min(max(stop, start + 1), start + batch_size, len(indices))
        chunks.append(indices[start:stop])
        start = stop
    return chunks


# ---------------------------------------------------------------------------- caches


def choose_cache(requested: str, shard_bytes: float, device: torch.device, budget_bytes: float | None = None,
                 ranks_on_node: int | None = None) -> tuple[str, str]:
    """(mode, reason). ``gpu`` that cannot fit is an error before any data is read.

    ``budget_bytes`` (the user's ``data.memory_budget_gb``) caps the host memory ``auto`` may fill;
    the node's available memory is shared by ``ranks_on_node`` ranks (default: this node's).
    """
    need = shard_bytes * CACHE_SAFETY
    sharing = ranks_on_node or local_ranks()
    host = psutil.virtual_memory().available / sharing
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
    limit, limit_text = 0.8 * host, f"80% of {host / 2**30:.1f} GiB available host memory" + (f" per rank ({sharing} on this node)" if sharing > 1 else "")
    if budget_bytes is not None and budget_bytes < limit:
        limit, limit_text = budget_bytes, f"the budget of {budget_bytes / 2**30:.2f} GiB (data.memory_budget_gb)"
    if need < limit:
        mode = "pinned" if device.type == "cuda" else "memory"
        return mode, f"shard ~{need / 2**30:.2f} GiB fits in {limit_text}"
    return "stream", f"shard ~{need / 2**30:.2f} GiB exceeds {limit_text}"


class ShardSource:
    """Batches from one shard tensor set held on the training device (``gpu`` mode)."""

    def __init__(self, shard: ShardData):
        self.shard = shard

    def check_budget(self, plan: list[np.ndarray], what: str, first_step: int = 0, strict: bool = True) -> None:
        """Nothing to check: the shard is resident."""

    def iterate(self, plan: list[np.ndarray], with_forces: bool):
        for local_index in plan:
            # the index from the host: a GPU shard's gather sends it over without waiting for the device
            yield gather_batch(self.shard, torch.from_numpy(local_index), with_forces=with_forces)


class BlockSource:
    """Batches gathered from the rank's store blocks, each converted to tensors once per read.

    A block holds the ``members`` (sorted rank-local structure indices) of one store block of
    the rank: all its structures, or only its training or test structures. A step's batch is
    one :func:`gather_batch` per block it touches, merged (bitwise what one gather from the
    whole shard gives, since steps are sorted).

    * ``resident=True`` (``memory``, ``pinned``, and the test set of ``stream`` when it fits):
      every block is read once, by ``readers`` threads, and kept.
    * ``resident=False`` (``stream``): for each plan, blocks are read ahead in the order the
      plan first needs them, as far as ``budget_bytes`` allows, and dropped after the last step
      that needs them; each block is read once per plan. A plan whose single step needs more
      than the budget is refused before anything is read (:meth:`check_budget`).
    """

    def __init__(self, reader: StoreReader, data: RankData, members: np.ndarray, dtype: torch.dtype,
                 resident: bool, budget_bytes: float = math.inf, readers: int = 2, pin: bool = False,
                 piece_bytes: float = 0.0, buckets: bool = False, derivs_used: np.ndarray | None = None,
                 workers: BlockWorkers | None = None, dense_blocks: bool = True):
        """``piece_bytes`` > 0 joins consecutive store blocks into pieces of about that many bytes
        of members (fewer, larger gathers per step; for resident sources). ``workers``: load
        blocks in those processes instead of ``readers`` threads (``data.workers``). ``dense_blocks=False``:
        every derivative row sparse (the layout CUDA graphs replay)."""
        self.reader, self.data, self.dtype, self.pin, self.buckets = reader, data, dtype, pin, buckets
        self.dense_blocks = dense_blocks
        self.derivs_used = derivs_used  # (store,) bool, or None for all: data.force_percent
        self.resident, self.budget_bytes, self.readers = resident, budget_bytes, max(1, readers)
        self.workers = workers
        self.converters = workers.count if workers is not None else self.readers  # blocks being converted at once
        bounds = sorted({b for shard in data.shard_blocks for b in shard})
        members = np.asarray(members, dtype=np.int64)
        per_structure = structure_bytes(reader, dtype.itemsize)[data.start : data.stop]
        cut = np.searchsorted(members, [a for a, _ in bounds] + [bounds[-1][1]])
        self.bounds, self.members, sizes = [], [], []
        for k, (a, b) in enumerate(bounds):  # a loop over blocks, once
            if cut[k + 1] == cut[k]:
                continue  # no members in this block
            held = members[cut[k] : cut[k + 1]]
            size = float(per_structure[held].sum())
            if self.bounds and self.bounds[-1][1] == a and sizes[-1] + size <= piece_bytes:
                self.bounds[-1] = (self.bounds[-1][0], b)
                self.members[-1] = np.r_[self.members[-1], held]
                sizes[-1] += size
            else:
                self.bounds.append((a, b))
                self.members.append(held)
                sizes.append(size)
        self.block_start = np.array([m[0] for m in self.members], dtype=np.int64)
        self.block_bytes = np.array(sizes)
        self.budget_total: float | None = None  # the whole budget, of which budget_bytes is for blocks (messages)
        self.blocks_read = 0
        self.peak_held_bytes = 0.0  # most block bytes held at once while streaming (a statistic)
        self.blocks: list[ShardData] | None = None
        if resident:
            if workers is not None:
                loading = [self._submit(None, k) for k in range(len(self.bounds))]
                self.blocks = [block.result() for block in loading]
            else:
                with ThreadPoolExecutor(self.readers) as pool:
                    self.blocks = list(pool.map(self._load, range(len(self.bounds))))
                self.blocks_read = len(self.bounds)
            if len(self.blocks) > 1:  # read piece by piece, kept as one: a batch is then one gather, not one per piece and a merge
                self.blocks = [merge_shards(self.blocks)]
                self.bounds = [(self.bounds[0][0], self.bounds[-1][1])]
                self.members = [np.concatenate(self.members)]
                self.block_start = self.block_start[:1]
                self.block_bytes = np.array([self.block_bytes.sum()])

    def _task(self, k: int) -> BlockTask:
        """What loading block k takes (store indices)."""
        a, b = self.bounds[k]
        members = self.data.start + self.members[k]
        used = None if self.derivs_used is None else self.derivs_used[members]
        return BlockTask(str(self.reader.path), self.data.start + a, self.data.start + b, members, self.dtype, self.buckets, used,
                         self.dense_blocks)

    def _load(self, k: int) -> ShardData:
        """Block k as tensors, loaded in this process."""
        return load_block(self.reader, self._task(k))

    def _submit(self, pool: ThreadPoolExecutor | None, k: int):
        """Start loading block k: in a worker process if there are workers, else in ``pool``'s threads."""
        self.blocks_read += 1  # only a statistic
        return self.workers.submit(self._task(k)) if self.workers is not None else pool.submit(self._load, k)

    def _steps(self, plan: list[np.ndarray]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Per step: the blocks it touches and, for each, the positions inside that block."""
        steps = []
        for local_index in plan:
            which = np.searchsorted(self.block_start, local_index, side="right") - 1
            blocks, first = np.unique(which, return_index=True)
            pieces = np.split(local_index, first[1:])
            positions = [np.searchsorted(self.members[k], piece) for k, piece in zip(blocks, pieces)]
            for k, piece, pos in zip(blocks, pieces, positions):
                if k < 0 or np.any(self.members[k][np.minimum(pos, len(self.members[k]) - 1)] != piece):
                    raise IndexError(f"structures {piece[:5].tolist()} are not held by this source")
            steps.append((blocks, positions))
        return steps

    def _use_spans(self, steps: list[tuple[np.ndarray, list[np.ndarray]]]) -> tuple[np.ndarray, np.ndarray]:
        """(first step, last step) that uses each block; (len(steps), -1) for blocks no step uses."""
        first = np.full(len(self.bounds), len(steps))
        last = np.full(len(self.bounds), -1)
        for k, (blocks, _) in enumerate(steps):
            first[blocks] = np.minimum(first[blocks], k)
            last[blocks] = k
        return first, last

    def live_bytes(self, plan: list[np.ndarray]) -> np.ndarray:
        """Bytes of blocks that must be held at each step when every block is read once."""
        steps = self._steps(plan)
        first, last = self._use_spans(steps)
        change = np.zeros(len(steps) + 1)
        used = last >= 0
        np.add.at(change, first[used], self.block_bytes[used])
        np.add.at(change, last[used] + 1, -self.block_bytes[used])
        return np.cumsum(change)[:-1]

    def check_budget(self, plan: list[np.ndarray], what: str, first_step: int = 0, strict: bool = True) -> None:
        """Refuse (``strict``) or warn about a plan whose blocks, with :data:`LIVE_MARGIN`, exceed the budget.

        The first epoch is checked strictly before training; later epochs' plans differ a little
        (other block orders), so they only warn: ``iterate`` still reads what a step needs.
        """
        if self.resident or not len(plan):
            return
        live = self.live_bytes(plan)
        k = int(np.argmax(live))
        if live[k] * LIVE_MARGIN <= self.budget_bytes:
            return
        message = (
            f"data.cache='stream': step {first_step + k + 1} of the {what} needs {live[k] / 2**30:.2f} GiB of store blocks in memory at once "
            f"(x{LIVE_MARGIN} for other epochs' orders), more than the {self.budget_bytes / 2**30:.2f} GiB left for them of this rank's budget"
            f"{'' if self.budget_total is None else f' of {self.budget_total / 2**30:.2f} GiB'} (data.memory_budget_gb); lower "
            "data.shuffle_window_blocks or run.batch_size, raise the budget, or featurize with a smaller --chunk-mb"
        )
        if strict:
            raise ValueError(message)
        log.warning("%s (going on: the budget may be exceeded this epoch)", message)

    def _gather(self, blocks: np.ndarray, positions: list[np.ndarray], shard_of, with_forces: bool) -> Batch:
        if not len(blocks):  # this rank has no structures in the step (few structures per rank)
            return empty_batch(self.reader, self.dtype, with_forces)
        parts = [gather_batch(shard_of(k), torch.from_numpy(pos), with_forces=with_forces, defer_dense=True) for k, pos in zip(blocks, positions)]
        batch = merge_batches(parts)
        return batch.pin_memory() if self.pin else batch

    def iterate(self, plan: list[np.ndarray], with_forces: bool):
        """The batches of ``plan`` in order."""
        steps = self._steps(plan)
        if self.resident:
            for blocks, positions in steps:
                yield self._gather(blocks, positions, self.blocks.__getitem__, with_forces)
            return
        first_use, last_use = self._use_spans(steps)
        order = [b for b in np.argsort(first_use, kind="stable").tolist() if last_use[b] >= 0]  # blocks in order of first use
        pending: dict[int, Future] = {}
        held = 0.0
        next_read = 0
        # Reader threads, or none: with worker processes, blocks are submitted to the workers.
        with ThreadPoolExecutor(self.readers) if self.workers is None else contextlib.nullcontext() as pool:
            try:
                for k, (blocks, positions) in enumerate(steps):
                    needed = set(blocks.tolist())
                    # Read ahead in first-use order while the budget allows; this step's blocks always.
                    while next_read < len(order):
                        b = order[next_read]
                        if b not in needed and held + self.block_bytes[b] > self.budget_bytes:
                            break
                        pending[b] = self._submit(pool, b)
                        held += self.block_bytes[b]
                        next_read += 1
                    self.peak_held_bytes = max(self.peak_held_bytes, held)
                    batch = self._gather(blocks, positions, lambda b: pending[b].result(), with_forces)
                    for b in needed:
                        if last_use[b] == k:
                            del pending[b]
                            held -= self.block_bytes[b]
                    yield batch
            finally:
                for future in pending.values():
                    future.cancel()


_END = object()  # the prefetch thread's end-of-plan marker


class Prefetcher:
    """Runs a source's ``batch`` for the coming steps in a background thread (bounded queue).

    torch and zarr release the GIL in their kernels, so gathering or reading the next batches
    overlaps with the current step. The order of batches is the order of ``plan``.
    """

    def __init__(self, source, plan: list[np.ndarray], with_forces: bool, depth: int = PREFETCH_DEPTH):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(source, plan, with_forces), daemon=True)
        self.stopped = threading.Event()
        self.thread.start()

    def _run(self, source, plan, with_forces):
        batches = source.iterate(plan, with_forces)
        try:
            for item in batches:
                if self.stopped.is_set():
                    return
                self.queue.put(item)
                if self.stopped.is_set():  # closed while this batch waited for room: gather no more
                    return
        except BaseException as err:  # hand the error to the consumer
            self.queue.put(err)
            return
        finally:
            batches.close()
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


def empty_batch(reader: StoreReader, dtype: torch.dtype, with_forces: bool) -> Batch:
    """The batch of no structures (what :func:`gather_batch` gives for an empty index)."""
    none = torch.zeros(0, dtype=torch.int64)
    features = reader.attrs["num_features"]
    batch = Batch(none, none, torch.zeros(0, dtype=dtype), {e: torch.zeros(0, features[e], dtype=dtype) for e in reader.species},
                  {e: none for e in reader.species})
    if with_forces:
        batch.forces, batch.force_atoms = torch.zeros(0, 3, dtype=dtype), torch.zeros(0, dtype=torch.bool)
    return batch


@dataclass
class TrainingData:
    """The data side of a run on one rank, as :func:`make_training_data` decided it."""

    rank_data: RankData
    cache_mode: str  # memory, gpu, pinned or stream (data.cache=auto resolved)
    prefetch: bool  # batches gathered ahead in a thread (else in the training thread)
    steps: int  # optimizer steps per epoch
    eval_plan: list[np.ndarray]  # this rank's test-set chunks
    source: "BlockSource | ShardSource"  # training batches
    eval_source: "BlockSource | ShardSource"  # evaluation batches
    workers: BlockWorkers | None = None  # data.workers processes, if any
    keep_eval_batches: bool = False  # gather the evaluation batches once and keep them (see KEEP_EVAL_SHARE)
    fixed_batches: bool = False  # data.batches='fixed': the trainer gathers the first epoch's batches once and keeps them
                                 # (in memory, or with stream in a file it reads back each epoch)

    def close(self) -> None:
        """Stop the worker processes (the sources cannot read blocks afterwards)."""
        if self.workers is not None:
            self.workers.close()


def make_training_data(reader: StoreReader, config, batch_size: int, seed: int, dtype: torch.dtype, info,
                       dense_blocks: bool = True) -> TrainingData:
    """Every data decision of a training run, in one place: the rank's shard and split, the cache
    mode (``data.cache``) within the memory budget (``data.memory_budget_gb``), whether a thread
    gathers batches ahead, the evaluation chunks, the force subset (``data.force_percent``) and
    the sources, read now where the mode keeps data; a budget too small for the first epoch or
    the evaluation stops here, before any training.

    Args:
        config: the run's :class:`~aenet_dist.config.DataConfig`.
        info: the rank's :class:`~aenet_dist.dist.DistInfo` (rank, world size, device).
        dense_blocks: False lays every derivative row out sparse (CUDA graphs, ``run.cuda_graphs``).
    Raises:
        ValueError: no training structures, or a budget that does not hold what the plan needs.
    """
    data = rank_data(reader, info.rank, info.world_size, config.num_shards, config.test_percent, config.split_seed)
    local_bytes = structure_bytes(reader, dtype.itemsize)[data.start : data.stop]
    user_budget = None if config.memory_budget_gb is None else config.memory_budget_gb * 2**30
    mode, reason = choose_cache(config.cache, float(local_bytes.sum()), info.device, user_budget)
    # Batches are gathered by a background thread for every host cache, even with a CPU rank on
    # every core: the thread gathers while its rank waits in the step's all-reduce (2 ranks on 2
    # cores, memory cache: synthetic 5000 0.98-1.08 against 1.07-1.19 s/epoch gathering inline;
    # TiO2 no different, 90-118 against 91-113 ms).
    fixed = config.batches == "fixed"
    # Batches kept in memory (data.batches='fixed' with a resident cache) are never gathered during
    # training: no thread. Kept on disk (with stream), a thread reads the coming ones back.
    prefetch = mode != "gpu" and not (fixed and mode != "stream")
    if info.is_main:
        log.info("data.cache=%s -> %s (%s)", config.cache, mode, reason)
        stored = reader.attrs.get("deriv_dtype", "float64")
        if mode == "stream" and not fixed:
            log.info("stream decodes and converts the store's blocks again every epoch; data.batches=fixed does it once and "
                     "keeps the batches on disk (45,000 synthetic structures on 2 cores: 6.2 against 39.9 s an epoch)")
        if mode == "stream" and dtype == torch.float32 and stored == "float64" and not fixed:
            log.info("stream reads the store's float64 dG/dR every epoch: a store featurized with --deriv-dtype float32 "
                     "trains float32 bit for bit the same and is half as much to read and decode")
        if dtype == torch.float64 and stored == "float32":
            log.warning("float64 training from dG/dR stored in float32: forces carry float32 rounding (~1e-7 relative); "
                        "featurize with --deriv-dtype float64 for float64-exact forces")
    if data.num_train_global == 0:
        raise ValueError(
            f"no structures left to train on: {reader.num_structures} in {config.store}, "
            f"{data.num_test_global} of them held out by data.test_percent={config.test_percent:g}; lower data.test_percent"
        )
    steps = steps_per_epoch(data.num_train_global, batch_size)
    first_plan = epoch_plan(data, seed, 0, steps, config.shuffle_window_blocks)
    # Evaluation chunks are no larger than the largest training step, in structures and bytes.
    eval_plan, batch_bytes = eval_plan_and_batch_bytes(data, local_bytes, first_plan, batch_size)
    # data.force_percent: the derivative rows of training structures outside the (nested, seeded)
    # subset are dropped when the data are read, so those structures train on energies alone.
    derivs_used = None
    if config.force_percent < 100:
        test = split_test(reader.has_derivs, config.test_percent, config.split_seed)
        used = force_subset(reader.has_derivs, test, config.force_percent, config.split_seed)
        derivs_used = used | test  # test metrics use every test structure
        if info.is_main:
            log.info("data.force_percent=%g: forces of %d of the %d training structures with derivatives enter the loss",
                     config.force_percent, int(used.sum()), int((reader.has_derivs.astype(bool) & ~test).sum()))
    buckets = dense_blocks and (config.dense_buckets == "on" or (config.dense_buckets == "auto" and info.device.type == "cuda"))
    readers = reader_threads(config.readers, mode)
    workers = BlockWorkers(config.workers) if config.workers and mode != "gpu" else None
    if info.is_main and workers is not None:
        log.info("data.workers=%d: worker processes read and convert store blocks", config.workers)
    elif info.is_main and mode == "stream":
        log.info("stream: %d reader thread(s) per rank (data.readers%s)", readers, "" if config.readers else ", auto")
    try:
        options = dict(buckets=buckets, derivs_used=derivs_used, workers=workers, dense_blocks=dense_blocks)
        if fixed and mode != "stream":
            source, eval_source = read_once_sources(reader, data, dtype, readers, first_plan, eval_plan, pin=mode == "pinned" and info.device.type == "cuda",
                                                    **options)
        else:
            source, eval_source = make_sources(reader, data, mode, dtype, info.device, user_budget or default_budget_bytes(), readers,
                                               batch_bytes, first_plan, test_read_once=fixed, **options)
        source.check_budget(first_plan, "first epoch")
        eval_source.check_budget(eval_plan, "evaluation")
    except BaseException:
        if workers is not None:
            workers.close()
        raise
    # The test set of a resident host cache is the same every epoch: gathered once and kept, its batches
    # cost a copy of the test rows (at most KEEP_EVAL_SHARE of the shard) instead of a gather, a thread
    # and ~3.5 ms an epoch (TiO2: a tenth of an epoch).
    test_bytes = float(local_bytes[data.test_local].sum())
    keep_eval = mode == "memory" and test_bytes <= KEEP_EVAL_SHARE * float(local_bytes.sum())  # (fixed: kept from the start)
    return TrainingData(data, mode, prefetch, steps, eval_plan, source, eval_source, workers, keep_eval, fixed)


def reader_threads(requested: int | None, mode: str) -> int:
    """Reader threads for ``data.readers`` (None = auto): 2 to load a resident cache (nothing else
    runs yet); for ``stream``, the cores this rank has beyond its training thread, 1 or 2, since
    readers on the training thread's core slow its steps more than they speed up reading."""
    if requested is not None:
        return requested
    if mode != "stream":
        return 2
    return max(1, min(2, usable_cores() // local_ranks() - 1))


def default_budget_bytes() -> float:
    """Half of the host memory available now, shared by the ranks of this node."""
    return 0.5 * psutil.virtual_memory().available / local_ranks()


def eval_plan_and_batch_bytes(data: RankData, local_bytes: np.ndarray, first_plan: list[np.ndarray], batch_size: int) -> tuple[list[np.ndarray], float]:
    """Evaluation chunks of the rank's test set, no larger than the largest step of ``first_plan``
    in structures and bytes, and the bytes of the largest batch of either (+10 % for other epochs).

    ``local_bytes`` is :func:`structure_bytes` of the rank's structures.
    """
    largest_step = max((float(local_bytes[index].sum()) for index in first_plan), default=0.0)
    chunks = eval_chunks(data.test_local, batch_size, local_bytes, largest_step)
    largest_chunk = max((float(local_bytes[index].sum()) for index in chunks), default=0.0)
    return chunks, 1.1 * max(largest_step, largest_chunk)


def stream_overheads(train: "BlockSource", batch_bytes: float) -> tuple[float, float]:
    """(batches in flight, blocks being converted): the bytes a stream budget covers besides blocks read ahead.

    A worker process converts one block at a time, as a reader thread does (its shared-memory
    result replaces the converted block, which it frees).
    """
    return STREAM_BATCHES_IN_FLIGHT * batch_bytes, train.converters * CONVERT_COPIES * float(train.block_bytes.max(initial=0.0))


def smallest_stream_budget(live_bytes: float, train: "BlockSource", batch_bytes: float) -> float:
    """The smallest ``data.memory_budget_gb`` (bytes) that holds ``live_bytes`` of blocks at once."""
    return (LIVE_MARGIN * live_bytes + sum(stream_overheads(train, batch_bytes))) / (1 - ALLOCATOR_RESERVE)


def stream_training_source(reader: StoreReader, data: RankData, dtype: torch.dtype, **options) -> BlockSource:
    """``stream``'s training source, as training and ``aenet-dist plan`` build it: the rank's training
    structures, blocks read as the plan first needs them; ``options`` go to :class:`BlockSource`.

    (Holding each block's test structures too, to save the copy that leaves them out, was measured
    slower: synthetic 5000, 2.91 / 3.42 s against 2.79 / 3.23 s an epoch, interleaved.)"""
    return BlockSource(reader, data, np.flatnonzero(data.train_local), dtype, resident=False, **options)


def read_once_sources(reader: StoreReader, data: RankData, dtype: torch.dtype, readers: int, first_plan: list[np.ndarray],
                      eval_plan: list[np.ndarray], **options) -> tuple[BlockSource, BlockSource]:
    """(training, evaluation) sources of ``data.batches='fixed'``: each reads every block it needs
    once, for the first epoch's batches and the test batches, which the trainer keeps. Neither keeps
    a block past its last use, so the data are held once, as batches (a resident cache beside them
    would hold them twice). Read-ahead is bounded by twice the blocks a step needs at once."""

    def bounded(source: BlockSource, plan: list[np.ndarray]) -> BlockSource:
        source.budget_bytes = 2 * LIVE_MARGIN * float(source.live_bytes(plan).max(initial=0.0))
        return source

    train = bounded(stream_training_source(reader, data, dtype, readers=readers, **options), first_plan)
    if len(data.test_local) == 0:
        return train, train
    test = bounded(BlockSource(reader, data, data.test_local, dtype, resident=False, readers=readers, **options), eval_plan)
    return train, test


def make_sources(reader: StoreReader, data: RankData, mode: str, dtype: torch.dtype, device: torch.device,
                 budget_bytes: float, readers: int, batch_bytes: float, first_plan: list[np.ndarray] | None = None,
                 buckets: bool = False, derivs_used: np.ndarray | None = None, workers: BlockWorkers | None = None,
                 dense_blocks: bool = True, test_read_once: bool = False):
    """(training source, evaluation source) of a cache mode; reads now what the mode keeps.

    ``test_read_once``: ``stream`` never keeps the test set (its batches are kept on disk instead,
    ``data.batches='fixed'``).

    ``stream`` splits ``budget_bytes`` between the batches in flight, the blocks being converted
    by the readers, the test set (kept resident when it takes at most half of what is left and
    leaves room for the blocks ``first_plan`` needs at once, so evaluation does not read the
    store a second time each epoch), and the blocks read ahead.
    """
    everything = np.arange(data.stop - data.start)
    if mode == "gpu":
        part = reader.read_range(data.start, data.stop, numpy_dtype(dtype))
        check_finite(part, reader)
        if derivs_used is not None:
            part = without_derivatives(part, ~derivs_used[data.start : data.stop])
        shard = shard_from_range(part, dtype, dense_blocks=dense_blocks, buckets=buckets)
        del part  # the shard holds its own copies; free the numpy range before moving to the device
        source = ShardSource(shard.to(device))
        return source, source
    if mode != "stream":
        pin = mode == "pinned" and device.type == "cuda"
        source = BlockSource(reader, data, everything, dtype, resident=True, readers=readers, pin=pin, piece_bytes=RESIDENT_PIECE_BYTES,
                             buckets=buckets, derivs_used=derivs_used, workers=workers, dense_blocks=dense_blocks)
        return source, source
    per_structure = structure_bytes(reader, dtype.itemsize)[data.start : data.stop]
    train = stream_training_source(reader, data, dtype, readers=readers, buckets=buckets, derivs_used=derivs_used, workers=workers,
                                   dense_blocks=dense_blocks)
    queued, converting = stream_overheads(train, batch_bytes)
    test_bytes = float(per_structure[data.test_local].sum())
    avail = (1 - ALLOCATOR_RESERVE) * budget_bytes - queued - converting
    # Keep the test set only where the blocks the first epoch needs at once (+10 % for later
    # epochs' plans) still fit beside it.
    blocks_needed = LIVE_MARGIN * float(train.live_bytes(first_plan).max(initial=0.0)) if first_plan else 0.0
    test_resident = len(data.test_local) > 0 and test_bytes <= 0.5 * avail and test_bytes + blocks_needed <= avail and not test_read_once
    left = avail - (test_bytes if test_resident else 0.0)
    if left <= 0:
        raise ValueError(
            f"data.cache='stream': a budget of {budget_bytes / 2**30:.2f} GiB per rank (data.memory_budget_gb), less a "
            f"{ALLOCATOR_RESERVE:.0%} reserve for allocator slack, does not cover "
            f"the batches in flight ({queued / 2**30:.2f} GiB) and the blocks being converted "
            f"({converting / 2**30:.2f} GiB); raise the budget or lower run.batch_size"
        )
    train.budget_bytes, train.budget_total = left, budget_bytes
    if len(data.test_local) == 0:
        return train, train
    test = BlockSource(reader, data, data.test_local, dtype, resident=test_resident, budget_bytes=left, readers=readers,
                       piece_bytes=RESIDENT_PIECE_BYTES if test_resident else 0.0, buckets=buckets, derivs_used=derivs_used,
                       workers=workers, dense_blocks=dense_blocks)
    test.budget_total = budget_bytes
    log.info(
        "stream: budget %.2f GiB per rank: %.2f GiB for blocks read ahead, test set (%.2f GiB) %s",
        budget_bytes / 2**30, left / 2**30, test_bytes / 2**30,
        "kept in memory" if test_resident else "read once, its batches kept on disk (data.batches=fixed)" if test_read_once else
        "streamed too: each evaluation reads the store's blocks again (run.eval_every N evaluates every N epochs)",
    )
    return train, test
