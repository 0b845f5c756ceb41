"""CUDA graph replay of the lean step (``run.cuda_graphs``): batches padded to shape buckets.

On a GPU the lean step's ~150 operators are ~110 kernel launches of tiny kernels, so a step is
bound by launch latency, not by the GPU. A CUDA graph records the kernels of a step once and
replays them with one launch, but only for fixed tensor shapes and fixed memory. So:

* every batch is copied into the static tensors of a **shape bucket** that holds it: the
  structure count, each element's descriptor and derivative rows, and the atom count. A new
  bucket rounds a batch's counts (+5 %) up a size ladder (:func:`~aenet_dist.batching.bucket_size`);
  later batches reuse the cheapest bucket that holds them at no more than 1.4x their own cost, or
  widen the nearest one (:func:`choose_bucket`), so shuffled batches share a handful of graphs;
* the padding adds exact zeros: padded structures have no atoms, a zero reference energy and
  one "atom" to divide by (their error is 0, and :attr:`Batch.structure_count` keeps them out of
  the RMSE's count); padded descriptor rows belong to the step's dummy structure, whose energy is
  dropped and whose adjoint is 0; padded derivative rows are zero; padded atoms carry no force
  reference (``force_atoms`` False);
* only derivative rows in the sparse layout are graphed (shards without dense blocks): dense
  size groups would multiply the bucket keys by the size groups present in each batch.

What is captured is the step's local part (forward, error sums, adjoints, backward into the
gradient buffer). The all-reduce (several ranks), gradient clipping and the fused optimizer
stay outside: a fused optimizer is a few kernels, and a collective must not be replayed blind.

Each graph is checked once, when it is captured: refilled with the batch's *probe* (the same
structures with zero reference energies and forces), its replay must give, entry by entry, the
error sums and gradients of the eager step on the probe unpadded. The probe's errors are the
predictions themselves: with the real references, a well-fitted float32 model's error is a small
difference of large energies, and the order of atomic adds (which differs between any two runs on
a GPU) changed the error sums by more than 1e-4 in 38 % of batches at 2 meV/atom, 83 % at
0.5 meV/atom, so a correct graph would fail the check. The references only enter through
:func:`fill_static`, which the check runs too. With ``auto`` a capture that fails or disagrees
turns graphs off for the run (with a warning) and training goes on eagerly; with ``on`` it is
an error.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .batching import Batch, bucket_size, index_derivatives

log = logging.getLogger(__name__)

MAX_GRAPHS = 48  # beyond this many shape buckets, a batch runs in the cheapest one that holds it (else eagerly)
SLACK = 1.05  # a new bucket holds counts 5 % above the batch that opens it
REUSE = 1.4  # a batch runs in a bucket that costs at most this many times its own counts
WARMUP_STEPS = 2  # eager runs on a side stream before a capture (lazy initialisation, cuBLAS workspaces)


def use_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether ``run.cuda_graphs`` (auto | on | off) replays the step on ``device``.

    Raises:
        ValueError: ``on`` for a device that is not a CUDA GPU.
    """
    if mode == "on" and device.type != "cuda":
        raise ValueError(f"run.cuda_graphs='on' needs a CUDA device, but this run trains on {device}; use 'auto' or 'off'")
    return mode != "off" and device.type == "cuda"


@dataclass(frozen=True)
class BucketKey:
    """The padded shape of a batch (or a batch's own counts): one captured graph per key."""

    structures: int
    atoms: int  # total atoms (0 without forces: the force arrays are absent)
    rows: tuple[int, ...]  # descriptor rows per element (species order)
    deriv_rows: tuple[int, ...]  # derivative rows per element (empty without forces)
    elements: tuple[str, ...] = ()  # the elements of rows and deriv_rows, in order

    def holds(self, counts: "BucketKey") -> bool:
        """Whether a batch of ``counts`` fits this shape."""
        return (self.elements == counts.elements and self.structures >= counts.structures and self.atoms >= counts.atoms
                and all(a >= b for a, b in zip(self.rows + self.deriv_rows, counts.rows + counts.deriv_rows)))

    def cost(self) -> int:
        """What a step of this shape moves, roughly: descriptor rows, and derivative rows 3x (3 components)."""
        return sum(self.rows) + 3 * sum(self.deriv_rows)

    def envelope(self, other: "BucketKey") -> "BucketKey":
        """The smallest shape that holds both."""
        if self.elements != other.elements:
            raise ValueError(f"buckets of different elements: {self.elements} and {other.elements}")
        return BucketKey(max(self.structures, other.structures), max(self.atoms, other.atoms),
                         tuple(map(max, self.rows, other.rows)), tuple(map(max, self.deriv_rows, other.deriv_rows)), self.elements)


def batch_counts(batch: Batch) -> BucketKey:
    """The exact counts of a batch with sparse derivative rows only."""
    if batch.dense:
        raise ValueError("CUDA graph batches take sparse derivative rows only (the shard was built with dense blocks)")
    with_forces = batch.forces is not None
    return BucketKey(
        structures=int(batch.num_atoms.numel()),
        atoms=int(batch.forces.shape[0]) if with_forces else 0,
        rows=tuple(int(g.shape[0]) for g in batch.G.values()),
        deriv_rows=tuple(int(batch.deriv[e][0].numel()) if e in batch.deriv else 0 for e in batch.G) if with_forces else (),
        elements=tuple(batch.G),
    )


def bucket_key(batch: Batch, slack: float = 1.0) -> BucketKey:
    """The batch's own bucket: every count times ``slack``, rounded up by :func:`bucket_size` (at least 1
    row and derivative row per element, so that every step runs the same operators)."""
    counts = batch_counts(batch)
    size = lambda n: bucket_size(math.ceil(n * slack))  # noqa: E731
    return BucketKey(size(counts.structures), size(counts.atoms) if batch.forces is not None else 0,
                     tuple(map(size, counts.rows)), tuple(map(size, counts.deriv_rows)), counts.elements)


def choose_bucket(batch: Batch, keys: list[BucketKey], slack: float = SLACK, reuse: float = REUSE) -> BucketKey:
    """The shape to run ``batch`` in: the cheapest of ``keys`` that holds it at no more than ``reuse``
    times its own cost; else a new one, the envelope of its own bucket (with ``slack``) and the nearest
    key, if that stays within ``reuse``.

    Batches vary in every count at once (structures, atoms, each element's rows and derivative
    rows), so one bucket per batch's own rounded counts gave a new graph for nearly every batch
    (TiO2, 20 epochs: 88 for 160 steps). Reusing and widening keys: 8 keys at +18 % padding
    (TiO2), 21 at +22 % (5000 synthetic structures, three elements); a launch-bound GPU step
    hardly notices the padding.
    """
    counts = batch_counts(batch)
    limit = reuse * max(counts.cost(), 1)
    fitting = [key for key in keys if key.holds(counts) and key.cost() <= limit]
    if fitting:
        return min(fitting, key=BucketKey.cost)
    own = bucket_key(batch, slack)
    widened = [key.envelope(own) for key in keys if key.elements == own.elements]
    widened = [key for key in widened if key.cost() <= limit]
    return min(widened, key=BucketKey.cost) if widened else own


def _padded_fields(batch: Batch, key: BucketKey) -> list[tuple[Tensor | None, tuple, int | float | bool, torch.dtype]]:
    """(real tensor or None, padded shape, padding value, dtype) of every static tensor, in a fixed order.

    Of a padded batch of bucket ``key`` itself, the real tensors are its static tensors, in that order.
    """
    if tuple(batch.G) != key.elements:
        raise ValueError(f"a batch of elements {tuple(batch.G)} does not fit a bucket of {key.elements}")
    fields = [
        (batch.structure_index, (key.structures,), -1, torch.int64),
        (batch.num_atoms, (key.structures,), 1, batch.num_atoms.dtype),  # padded structures: divide 0 by 1
        (batch.energy, (key.structures,), 0.0, batch.energy.dtype),
    ]
    for (element, G), rows in zip(batch.G.items(), key.rows):
        fields.append((G, (rows, G.shape[1]), 0.0, G.dtype))
        # padded rows belong to the dummy structure (index = number of structures), whose energy is dropped
        fields.append((batch.atom_structure[element], (rows,), key.structures, torch.int64))
    if key.atoms:
        fields.append((batch.forces, (key.atoms, 3), 0.0, batch.forces.dtype))
        fields.append((batch.force_atoms, (key.atoms,), False, torch.bool))
        for (element, G), deriv_rows in zip(batch.G.items(), key.deriv_rows):
            center, neighbor, dG = batch.deriv.get(element, (None, None, None))
            # padded derivative rows: zero dG/dR from row 0 to atom 0, exact zeros both ways
            fields += [(center, (deriv_rows,), 0, torch.int64), (neighbor, (deriv_rows,), 0, torch.int64),
                       (dG, (deriv_rows, 3, G.shape[1]), 0.0, G.dtype)]
    return fields


def _static_bytes(batch: Batch, key: BucketKey) -> int:
    """Bytes of the static tensors of bucket ``key`` (for ``batch``'s dtypes)."""
    return sum(math.prod(shape) * dtype.itemsize for _, shape, _, dtype in _padded_fields(batch, key))


def fill_static(static: Batch, batch: Batch, key: BucketKey) -> None:
    """Copy ``batch`` into the padded tensors of ``static`` (of bucket ``key``) and reset their padding.

    Two operators per tensor at most, and no allocation: the padding is written every time, since
    the batch replayed before may have had more real rows.
    """
    targets = [target for target, *_ in _padded_fields(static, key)]
    for target, (real, _, value, _) in zip(targets, _padded_fields(batch, key), strict=True):
        n = 0 if real is None else int(real.shape[0])
        if n:
            target[:n].copy_(real, non_blocking=True)
        if n < target.shape[0]:
            target[n:].fill_(value)
    static.structure_count.fill_(int(batch.num_atoms.numel()))


def padded_batch(batch: Batch, key: BucketKey | None = None) -> Batch:
    """A new batch of bucket ``key`` (default: the batch's own bucket) holding ``batch``; its step
    results equal ``batch``'s (the padding adds exact zeros, see the module docstring)."""
    key = bucket_key(batch) if key is None else key
    device = next(iter(batch.G.values())).device
    empty = [torch.empty(shape, dtype=dtype, device=device) for _, shape, _, dtype in _padded_fields(batch, key)]
    it = iter(empty)
    structure_index, num_atoms, energy = next(it), next(it), next(it)
    G, atom_structure = {}, {}
    for element in batch.G:
        G[element], atom_structure[element] = next(it), next(it)
    static = Batch(structure_index, num_atoms, energy, G, atom_structure)
    if key.atoms:
        static.forces, static.force_atoms = next(it), next(it)
        static.deriv = {element: (next(it), next(it), next(it)) for element in batch.G}
    static.structure_count = torch.zeros((), dtype=torch.int64, device=energy.device)
    fill_static(static, batch, key)
    index_derivatives(static)
    # The contraction index is the derivative rows' own (center, neighbor) tensors, not a copy, so
    # that fill_static updates it too.
    static.contract_index = {element: rows[:2] for element, rows in static.deriv.items()}
    return static


def probe_batch(batch: Batch) -> Batch:
    """``batch`` with zero reference energies and forces: the step's errors are then its predictions,
    which no cancellation makes sensitive to the order of sums (what the capture check compares)."""
    probe = copy.copy(batch)
    probe.energy = torch.zeros_like(batch.energy)
    if batch.forces is not None:
        probe.forces = torch.zeros_like(batch.forces)
    probe.step_cache = None  # nothing derived from the batch is shared with it
    return probe


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    static: Batch  # the input tensors the graph reads
    output: Tensor  # what the graph's step returns (its memory, rewritten by each replay)


class GraphedStep:
    """Runs ``step`` (batch -> a tensor, writing ``checked`` buffers in place) from one CUDA graph
    per shape bucket.

    Args:
        step: the step's local part; it must read nothing but the batch's tensors and parameters
            and buffers that keep their memory (optimizer updates are in place), and must not read
            a value back to the host.
        checked: tensors ``step`` writes (the gradient buffers), compared with the eager step's
            when a graph is captured.
        strict: raise when a capture fails or disagrees (``run.cuda_graphs='on'``); otherwise
            (``auto``) warn and run every later step eagerly.
        still_valid: says whether the memory the graphs read (the parameters' stacks) is still
            where it was at capture; when it says no, the graphs are dropped and captured again.
        max_static_share: the batches' static copies (one per bucket) may take at most this share
            of the device's memory; further buckets reuse the cheapest one that holds the batch.
    """

    def __init__(self, step: Callable[[Batch], Tensor], checked: list[Tensor], strict: bool = False,
                 max_graphs: int = MAX_GRAPHS, still_valid: Callable[[], bool] = lambda: True, max_static_share: float = 0.1):
        self.step, self.checked, self.strict, self.max_graphs = step, checked, strict, max_graphs
        self.still_valid, self.max_static_share = still_valid, max_static_share
        self.graphs: dict[BucketKey, _Graph] = {}
        self.pool = None  # one memory pool for every graph: replays never overlap, outputs are copied out at once
        self.static_bytes = 0  # of every bucket's static batch
        self.enabled = True
        self.eager_steps = 0  # steps run eagerly (graphs off, or no bucket that holds the batch)

    def __call__(self, batch: Batch) -> Tensor:
        if not self.enabled:
            self.eager_steps += 1
            return self.step(batch)
        if self.graphs and not self.still_valid():
            log.warning("run.cuda_graphs: the parameters moved in memory; capturing the step again")
            self.graphs.clear()
            self.static_bytes = 0
        key = choose_bucket(batch, list(self.graphs))
        if key not in self.graphs and not self._room_for(key, batch):  # no new graph: any bucket that holds the batch
            counts = batch_counts(batch)
            key = min((k for k in self.graphs if k.holds(counts)), key=BucketKey.cost, default=None)
            if key is None:
                self.eager_steps += 1
                return self.step(batch)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(batch, key)
            if entry is None:  # turned off (auto): this step eagerly
                self.eager_steps += 1
                return self.step(batch)
            return entry.output.clone()  # the capture already ran this batch (checked)
        fill_static(entry.static, batch, key)
        entry.graph.replay()
        return entry.output.clone()  # the next replay of any graph may reuse this memory

    def _room_for(self, key: BucketKey, batch: Batch) -> bool:
        """Whether one more graph fits: at most ``max_graphs``, and static copies within their share of the device."""
        if len(self.graphs) >= self.max_graphs:
            return False
        added = _static_bytes(batch, key)
        try:
            total = torch.cuda.get_device_properties(self.checked[0].device).total_memory
        except (AssertionError, RuntimeError, ValueError):  # not a CUDA device: the capture will say so
            return True
        return self.static_bytes + added <= self.max_static_share * total

    def _capture(self, batch: Batch, key: BucketKey) -> _Graph | None:
        """Capture the step for ``key`` on ``batch`` and check it: refilled with the batch's probe
        (:func:`probe_batch`), its replay must match the eager step on the probe unpadded (so the check
        covers the padding and the refill too); then replay it on ``batch``, whose results it returns."""
        stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
        try:
            static = padded_batch(batch, key)
            probe = probe_batch(batch)
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            with torch.cuda.stream(side):  # warm-up runs, as the capture rules ask, off the default stream
                for _ in range(WARMUP_STEPS):
                    self.step(static)
                expected = self.step(probe).clone()
                expected_checked = [t.clone() for t in self.checked]
            stream.wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the gathering thread may pin host memory meanwhile; only this thread's calls must not sync
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = self.step(static)
            fill_static(static, probe, key)
            graph.replay()
            mismatch = _mismatch([output, *self.checked], [expected, *expected_checked])
            if mismatch:
                raise RuntimeError(f"the replayed step differs from the eager step ({mismatch})")
            fill_static(static, batch, key)
            graph.replay()  # this step's own results, in the graph's output and the gradient buffers
        except Exception as err:  # a capture failure: a bug here or an operator that cannot be captured
            if stream is not None:  # a capture that raised may leave its stream current
                with contextlib.suppress(Exception):
                    torch.cuda.set_stream(stream)
                    torch.cuda.synchronize()
            if self.strict:
                raise RuntimeError(f"run.cuda_graphs='on': capturing the step for a batch of shape {key} failed: {err}") from err
            log.warning("run.cuda_graphs: capturing the step failed (%s); training goes on without CUDA graphs (its shards "
                        "stay all-sparse this run; run.cuda_graphs='off' lays complete rows out as dense blocks)", err)
            self.enabled = False
            self.graphs.clear()
            return None
        entry = _Graph(graph, static, output)
        self.graphs[key] = entry
        self.static_bytes += _static_bytes(static, key)
        log.info("run.cuda_graphs: captured the step for bucket %d (%s)", len(self.graphs), key)
        return entry


def _mismatch(got: list[Tensor], expected: list[Tensor]) -> str:
    """'' when every pair agrees to rounding, entry by entry (a replay may sum atomic adds in another
    order, and padding changes the order of sums), else which differs."""
    for k, (a, b) in enumerate(zip(got, expected)):
        if not a.numel():
            continue
        finite = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), finite):
            return f"output {k}: not finite in other places"
        a, b = torch.where(finite, a, 0), torch.where(finite, b, 0)
        # each entry to its own size; gradient entries (k > 0) no smaller than a share of their largest, since
        # some are sums that cancel; the step's own output (error sums and counts) entry by entry
        floor = 1e-3 * float(b.abs().max()) if k else 0.0
        tol = 1e-4 if a.dtype == torch.float32 else 1e-9
        excess = float(((a - b).abs() - tol * b.abs().clamp(min=floor)).max())
        if excess > 0:
            return f"output {k}: max |difference| {float((a - b).abs().max()):.3g} beyond the tolerance"
    return ""
