"""Species-grouped batches: gather any set of structures of a shard into one :class:`Batch`.

A shard is a contiguous range of the store held as tensors (:class:`ShardData`). Within it
every per-structure quantity is addressed through offsets (CSR style), so building a batch
from a list of structure indices is a handful of vectorized gathers:

* per element, the descriptor rows of all batch atoms of that element are one contiguous
  tensor, so each element's network is called once per batch; the rows of structures with
  derivative rows come first, so the force work runs on a leading slice (:attr:`Batch.force_rows`);
* the sparse derivative rows keep their (center row, moved atom) indices, remapped to
  batch-local numbering, so forces are one sparse contraction per element;
* structures whose rows form the complete (atoms x atoms) grid — every structure whose cell
  is smaller than about twice the cutoff, i.e. most DFT data — or most of it (:data:`DENSE_FILL`,
  the missing pairs as zeros) are held per element as dense blocks D (3n, n_el·F) grouped by
  size, so their forces are one batched matmul per size group with no row gathers or scatters
  (:class:`DenseGroup`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .allocator import release_freed_memory
from .store import StructureRange


def ranges(starts: torch.Tensor, lengths: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Concatenation of arange(start, start + length) for each pair, without a Python loop.

    ``total``: the sum of ``lengths`` where the caller knows it (on a GPU, summing reads the device).
    Example: starts [5, 0], lengths [2, 3] -> [5, 6, 0, 1, 2].
    """
    total = int(lengths.sum()) if total is None else total
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=starts.device)
    group_start = torch.cumsum(lengths, 0) - lengths  # position of each range in the output
    shift = torch.repeat_interleave(starts - group_start, lengths, output_size=total)
    return torch.arange(total, device=starts.device) + shift


@dataclass
class ElementShard:
    """One element's rows in a shard (indices local to the shard)."""

    G: torch.Tensor  # (A_el, F) raw descriptors
    row_offset: torch.Tensor  # (S+1,) int64 first G row of each structure
    deriv_center: torch.Tensor  # (P,) int64 row of G
    deriv_neighbor: torch.Tensor  # (P,) int64 shard atom index
    dG: torch.Tensor  # (P, 3, F) x-major (the store's (P, F, 3) transposed once at load)
    deriv_offset: torch.Tensor  # (S+1,) int64 first derivative row of each structure (sparse rows only)
    dense_group: torch.Tensor  # (S,) int64 dense group of each structure, -1 if its rows are sparse
    dense_slot: torch.Tensor  # (S,) int64 position of the structure inside its dense group
    dense: list["DenseGroup"] = field(default_factory=list)


@dataclass
class DenseGroup:
    """Structures with the same (n_el centers, n atoms) whose derivative rows fill (most of) the grid
    (:func:`dense_layout`; a missing row is zero in D).

    ``D[s, 3a + x, F i + f] = ∂G_i,f/∂R_a,x``, so the force contribution of this element is
    F_s = −D_s · vec(dE/dG_s): one batched matrix-vector product for the whole group.

    With size buckets (:func:`bucket_size`) a group holds every structure whose sizes round up
    to (n_el, n): its D is zero-padded, and ``centers``/``atoms`` give each structure's own
    counts, so the padded rows and columns contribute exactly nothing.
    """

    num_centers: int  # n_el (the bucket's, with buckets)
    num_atoms: int  # n
    D: torch.Tensor  # (S_g, 3 n, n_el F)
    centers: torch.Tensor | None = None  # (S_g,) int64 each structure's own n_el (buckets only)
    atoms: torch.Tensor | None = None  # (S_g,) int64 each structure's own atom count (buckets only)


# Bucket sizes: each at most ~1.2x the one before, so a padded block is at most ~1.44x its data
# (rows x columns) and a batch has O(log) size groups, however many distinct sizes the data has.
_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 18, 20, 24, 28, 32, 36, 40, 48, 56, 64, 72, 80, 96, 112, 128)


def bucket_size(n: int) -> int:
    """The size bucket of a count ``n``: a fixed ladder (so every cache mode and rank buckets alike)."""
    for size in _BUCKETS:
        if n <= size:
            return size
    size = _BUCKETS[-1]
    while size < n:
        size = -(-size * 9 // 64) * 8  # beyond the table: +12.5 %, rounded up to a multiple of 8
    return size


# A structure's derivative rows become dense blocks when they fill at least this share of its
# (atoms x atoms) grid, the missing pairs (beyond the cutoff) held as zeros. Measured on TiO2 (one
# core, float32): a sparse row costs 2.2x a dense-block row, so a block wins from about 46 % full;
# at 75 % it holds at most 1.33x the bytes of the rows it replaces.
DENSE_FILL = 0.75


def dense_layout(num_atoms: np.ndarray, num_deriv_rows: np.ndarray) -> np.ndarray:
    """(S,) bool: which structures hold their derivative rows as dense blocks (see DENSE_FILL)."""
    grid = num_atoms.astype(np.int64) ** 2
    return (num_deriv_rows > 0) & (num_deriv_rows >= DENSE_FILL * grid)


@dataclass
class ShardCounts:
    """Host (numpy) copies of a shard's per-structure counts and offsets.

    :func:`gather_batch` takes every size it needs from here (how many atoms, rows and derivative
    rows a batch has, which dense groups it touches), never from the shard's tensors: on a GPU each
    such read waits for the device to finish its queued work, and a gather made dozens of them, so
    the CPU could not queue the next step while the GPU ran this one. On the CPU they are views.
    """

    num_atoms: np.ndarray  # (S,)
    has_derivs: np.ndarray  # (S,) bool
    row_offset: dict[str, np.ndarray]  # element -> (S+1,)
    deriv_offset: dict[str, np.ndarray]  # element -> (S+1,)
    dense_group: dict[str, np.ndarray]  # element -> (S,)


@dataclass
class ShardData:
    """A contiguous range of structures as tensors, ready for batch gathering."""

    store_index: torch.Tensor  # (S,) int64 store index of each structure (for messages)
    num_atoms: torch.Tensor  # (S,) int64
    atom_offset: torch.Tensor  # (S+1,) int64
    energy: torch.Tensor  # (S,) cohesive energy, eV
    has_derivs: torch.Tensor  # (S,) bool
    forces: torch.Tensor  # (A, 3) eV/Å
    elements: dict[str, ElementShard]
    host: ShardCounts | None = field(default=None, repr=False, compare=False)  # see counts()

    @property
    def num_structures(self) -> int:
        return int(self.num_atoms.numel())

    def counts(self) -> ShardCounts:
        """The shard's :class:`ShardCounts` (made once; a shard moved by :meth:`to` takes its source's)."""
        if self.host is None:
            host = lambda t: t.numpy() if t.device.type == "cpu" else t.cpu().numpy()  # noqa: E731
            els = self.elements.items()
            self.host = ShardCounts(host(self.num_atoms), host(self.has_derivs), {e: host(el.row_offset) for e, el in els},
                                    {e: host(el.deriv_offset) for e, el in els}, {e: host(el.dense_group) for e, el in els})
        return self.host

    def to(self, device, non_blocking: bool = False) -> "ShardData":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        elements = {}
        for e, el in self.elements.items():
            tensors = {f: move(getattr(el, f)) for f in ElementShard.__dataclass_fields__ if f != "dense"}
            groups = [DenseGroup(g.num_centers, g.num_atoms, move(g.D), None if g.centers is None else move(g.centers),
                                 None if g.atoms is None else move(g.atoms)) for g in el.dense]
            elements[e] = ElementShard(**tensors, dense=groups)
        return ShardData(
            move(self.store_index),
            move(self.num_atoms),
            move(self.atom_offset),
            move(self.energy),
            move(self.has_derivs),
            move(self.forces),
            elements,
            host=self.counts(),  # read here, where the tensors are (on the host, before a move to the device)
        )


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def numpy_dtype(dtype: torch.dtype):
    """The numpy float type of a torch training dtype (what the store's G and dG are read as)."""
    return _NUMPY_DTYPES[dtype]


def shard_from_range(
    data: StructureRange, dtype: torch.dtype, dense_blocks: bool = True, store_index: torch.Tensor | None = None,
    buckets: bool = False,
) -> ShardData:
    """Tensors of a :class:`~aenet_dist.store.StructureRange`; floats converted to ``dtype``.

    ``dense_blocks=False`` keeps every structure's rows sparse (for testing both paths);
    ``store_index`` names the structures when the range was put together from separate blocks;
    ``buckets`` pads dense blocks to size buckets (:func:`bucket_size`): fewer, larger batched
    products per step (kernel launches on a GPU), at the cost of the zero padding.
    """
    num_atoms = torch.from_numpy(data.num_atoms.astype(np.int64))
    num_structures = len(data.num_atoms)
    atom_offset = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(num_atoms, 0)])
    structure_of_atom = np.repeat(np.arange(num_structures), data.num_atoms)
    row_structure_of = {element: structure_of_atom[rows.atom] for element, rows in data.elements.items()}
    deriv_structure_of = {element: row_structure_of[element][rows.deriv_center] for element, rows in data.elements.items()}
    deriv_rows_of = {element: np.bincount(d, minlength=num_structures) for element, d in deriv_structure_of.items()}
    dense_structure = dense_layout(data.num_atoms, sum(deriv_rows_of.values())) & dense_blocks
    elements = {}
    for element, rows in data.elements.items():
        row_structure, deriv_structure = row_structure_of[element], deriv_structure_of[element]
        # Rows are in atom order and derivative rows in (center, atom) order, so both are grouped by structure.
        assert np.all(np.diff(row_structure) >= 0) and np.all(np.diff(deriv_structure) >= 0)
        centers = np.bincount(row_structure, minlength=num_structures)
        deriv_rows = deriv_rows_of[element]
        dense = (centers > 0) & dense_structure
        # The layout copies below are numpy's: its strided copies ran 2x (permuted dense blocks)
        # to 6x (the (P, F, 3) -> (P, 3, F) transposition) faster than torch's on a CPU core,
        # and they are most of a stream epoch's conversion work.
        stored = rows.dG.astype(numpy_dtype(dtype), copy=False)  # (P, F, 3) as stored
        deriv_start = np.r_[0, np.cumsum(deriv_rows)]
        row_start = np.r_[0, np.cumsum(centers)]  # first row of each structure (this element's)
        group_of = np.full(num_structures, -1, dtype=np.int64)
        slot_of = np.zeros(num_structures, dtype=np.int64)
        groups = []
        size_of = (lambda c, n: (bucket_size(c), bucket_size(n))) if buckets else (lambda c, n: (c, n))  # noqa: E731
        keys = {}
        for c, n in sorted({tuple(k) for k in np.stack([centers, data.num_atoms], axis=1)[dense].tolist()}):
            keys.setdefault(size_of(c, n), []).append((c, n))
        num_features = rows.dG.shape[1]
        for (n_el, n), sizes in sorted(keys.items()):  # loop over size classes
            in_group = np.zeros(num_structures, dtype=bool)
            for c, m in sizes:
                in_group |= dense & (centers == c) & (data.num_atoms == m)
            members = np.flatnonzero(in_group)
            padded = buckets and (len(sizes) > 1 or sizes[0] != (n_el, n))
            incomplete = bool(np.any(deriv_rows[members] < centers[members] * data.num_atoms[members]))
            block = (torch.zeros if padded or incomplete else torch.empty)(len(members), 3 * n, n_el * num_features, dtype=dtype)
            # D[s, (a, x), (i, f)] = dG of row (s, i, a), component x, feature f: one gather of each
            # structure's rows as stored, then one permuted copy into place (a block is most of a
            # stream epoch's conversion work, so no intermediate copies).
            place = block.numpy().reshape(len(members), n, 3, n_el, num_features)  # a view of block
            for c, m in sizes:  # each exact size into the corner of the (padded) block
                which = np.flatnonzero((centers[members] == c) & (data.num_atoms[members] == m))
                complete = deriv_rows[members[which]] == c * m
                if complete.all():
                    take = ranges(torch.from_numpy(deriv_start[members[which]]), torch.full((len(which),), c * m, dtype=torch.int64))
                    exact = stored[take.numpy()].reshape(len(which), c, m, num_features, 3).transpose(0, 2, 4, 1, 3)  # (s, a, x, i, f)
                    if padded:
                        place[which, :m, :, :c] = exact
                    else:  # one size: every member, in order
                        np.copyto(place, exact)
                    continue
                # Some rows missing (atom pairs beyond the cutoff): each row into its place, the rest stays zero.
                take = ranges(torch.from_numpy(deriv_start[members[which]]), torch.from_numpy(deriv_rows[members[which]])).numpy()
                slot = np.repeat(which, deriv_rows[members[which]])
                structure = members[slot]
                center = rows.deriv_center[take] - row_start[structure]
                atom = rows.deriv_neighbor[take] - atom_offset.numpy()[structure]
                place[slot, atom, :, center, :] = stored[take].transpose(0, 2, 1)  # (rows, x, f)
            groups.append(DenseGroup(n_el, n, block,
                                     torch.from_numpy(centers[members]) if padded else None,
                                     torch.from_numpy(data.num_atoms[members].astype(np.int64)) if padded else None))
            group_of[members] = len(groups) - 1
            slot_of[members] = np.arange(len(members))
        sparse_rows = ~dense[deriv_structure]
        sparse_counts = np.where(dense, 0, deriv_rows)
        elements[element] = ElementShard(
            G=torch.from_numpy(rows.G).to(dtype),
            row_offset=torch.from_numpy(np.r_[0, np.cumsum(centers)]),
            deriv_center=torch.from_numpy(rows.deriv_center[sparse_rows].astype(np.int64)),
            deriv_neighbor=torch.from_numpy(rows.deriv_neighbor[sparse_rows].astype(np.int64)),
            dG=torch.from_numpy(np.ascontiguousarray((stored if sparse_rows.all() else stored[sparse_rows]).transpose(0, 2, 1))),
            deriv_offset=torch.from_numpy(np.r_[0, np.cumsum(sparse_counts)]),
            dense_group=torch.from_numpy(group_of),
            dense_slot=torch.from_numpy(slot_of),
            dense=groups,
        )
    return ShardData(
        store_index=torch.arange(data.start, data.stop, dtype=torch.int64) if store_index is None else store_index,
        num_atoms=num_atoms,
        atom_offset=atom_offset,
        energy=torch.from_numpy(data.cohesive_energy).to(dtype),
        has_derivs=torch.from_numpy(data.has_derivs.astype(bool)),
        forces=torch.from_numpy(data.forces).to(dtype),
        elements=elements,
    )


def merge_shards(pieces: list[ShardData]) -> ShardData:
    """One shard of consecutive pieces (each a :func:`shard_from_range` of the next structures).

    The result is bitwise the shard :func:`shard_from_range` makes of the whole range at once:
    rows in order, indices shifted, dense groups of equal size joined and ordered by size. A
    batch gathered from one shard costs a fraction of one gathered from many pieces and merged
    (synthetic set, 25 pieces: 0.58 against 0.25 s an epoch), while loading piece by piece keeps
    the load's transient memory small. Each element's rows are dropped from ``pieces`` (and handed
    back to the kernel) as soon as they are joined, so the merge holds at most one element's rows twice.
    """
    if len(pieces) == 1:
        return pieces[0]
    counts = [p.num_structures for p in pieces]

    def take(get) -> list[torch.Tensor]:
        return [get(p) for p in pieces]

    def offsets(values: list[torch.Tensor]) -> torch.Tensor:
        """Concatenated (S+1,) offsets: each piece's shifted by the end of the ones before."""
        parts, shift = [], 0
        for v in values:
            parts.append(v[:-1] + shift)
            shift += int(v[-1])
        return torch.cat(parts + [torch.tensor([shift], dtype=values[0].dtype)])

    atom_offsets = take(lambda p: p.atom_offset)
    atom_shift = [int(v[-1]) for v in atom_offsets]
    elements = {}
    for element in pieces[0].elements:
        shards = [p.elements[element] for p in pieces]
        row_shift = np.cumsum([0] + [int(el.row_offset[-1]) for el in shards])
        atom_start = np.cumsum([0] + atom_shift)
        keys = sorted({(g.num_centers, g.num_atoms) for el in shards for g in el.dense})
        new_group = {key: k for k, key in enumerate(keys)}
        groups, group_of, slot_of = [], [], []
        filled = {key: 0 for key in keys}  # members of each merged group so far
        for el in shards:  # the pieces' group and slot numbers -> the merged ones
            remap = torch.tensor([new_group[(g.num_centers, g.num_atoms)] for g in el.dense] + [-1], dtype=torch.int64)
            start = torch.tensor([filled[(g.num_centers, g.num_atoms)] for g in el.dense] + [0], dtype=torch.int64)
            group_of.append(remap[el.dense_group])  # -1 indexes the appended -1
            slot_of.append(el.dense_slot + start[el.dense_group])
            for g in el.dense:
                filled[(g.num_centers, g.num_atoms)] += int(g.D.shape[0])
        for key in keys:
            members = [g for el in shards for g in el.dense if (g.num_centers, g.num_atoms) == key]
            # Padded (holding each structure's own sizes) if any piece's group is: a piece whose
            # structures all had the bucket's exact size kept no sizes, and they are the bucket's.
            padded = any(g.centers is not None for g in members)
            own = lambda g, k: g.centers if k == 0 else g.atoms  # noqa: E731
            sizes = [torch.cat([own(g, k) if g.centers is not None else torch.full((g.D.shape[0],), key[k], dtype=torch.int64)
                                for g in members]) if padded else None for k in (0, 1)]
            groups.append(DenseGroup(key[0], key[1], torch.cat([g.D for g in members]), sizes[0], sizes[1]))
            for g in members:
                g.D = None  # joined: free the piece's copy
        elements[element] = ElementShard(
            G=torch.cat([el.G for el in shards]),
            row_offset=offsets([el.row_offset for el in shards]),
            deriv_center=torch.cat([el.deriv_center + int(row_shift[k]) for k, el in enumerate(shards)]),
            deriv_neighbor=torch.cat([el.deriv_neighbor + int(atom_start[k]) for k, el in enumerate(shards)]),
            dG=torch.cat([el.dG for el in shards]),
            deriv_offset=offsets([el.deriv_offset for el in shards]),
            dense_group=torch.cat(group_of),
            dense_slot=torch.cat(slot_of),
            dense=groups,
        )
        for p in pieces:  # this element is joined: drop the pieces' rows before the next one
            p.elements[element] = None
        shards = el = members = None  # (no references left to the pieces' rows)
        release_freed_memory()  # else the freed pieces stay resident beside the joined rows (2x the peak)
    merged = ShardData(
        store_index=torch.cat(take(lambda p: p.store_index)),
        num_atoms=torch.cat(take(lambda p: p.num_atoms)),
        atom_offset=offsets(atom_offsets),
        energy=torch.cat(take(lambda p: p.energy)),
        has_derivs=torch.cat(take(lambda p: p.has_derivs)),
        forces=torch.cat(take(lambda p: p.forces)),
        elements=elements,
    )
    assert merged.num_structures == sum(counts)
    return merged


@dataclass
class Batch:
    """Structures gathered for one step; all indices are batch-local.

    ``deriv`` holds, per element, (center row in ``G[element]``, moved batch atom, dG rows
    (P, 3, F)) for structures with sparse rows; ``dense`` holds, per element, one
    :class:`DenseBlock` per size group present in the batch.
    """

    structure_index: torch.Tensor  # (B,) int64 store indices (for error messages)
    num_atoms: torch.Tensor  # (B,) atoms per structure
    energy: torch.Tensor  # (B,) reference cohesive energy, eV
    G: dict[str, torch.Tensor]  # element -> (A_el, F)
    atom_structure: dict[str, torch.Tensor]  # element -> (A_el,) batch structure of each row
    deriv: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, list["DenseBlock"]] = field(default_factory=dict)
    forces: torch.Tensor | None = None  # (A, 3) reference forces
    force_atoms: torch.Tensor | None = None  # (A,) bool: atom belongs to a structure with derivatives
    # element -> (G rows, atoms) of its sparse rows (``deriv``'s center, neighbor), then of its dense
    # blocks one after another (each block's flattened rows and atoms): the step gathers and scatters
    # all of an element's derivative rows at once, one gather and one scatter per direction.
    contract_index: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # element -> its sparse dG as a numpy array sharing the memory (CPU only), for the step's products,
    # made where the batch is put together (like DenseBlock.host).
    deriv_host: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    # element -> (the piece's dG, rows of it) while the sparse dG of ``deriv`` is left unread (None),
    # like a deferred DenseBlock: merge_batches copies each piece's rows once, into the merged tensor.
    deriv_source: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # 0-d int64: the real structures of a batch padded to a shape bucket (aenet_dist.graphs), whose
    # padded structures must not count in the energy RMSE; None: every structure is real.
    structure_count: torch.Tensor | None = None
    # element -> how many leading rows of G[element] belong to structures with derivative rows: a
    # batch gathered with forces lays out each element's rows with those first, so every derivative
    # row's center is one of them and the step's force work (dE/dG, its adjoint, the tangent pass)
    # runs on these rows only (a quarter of them for the paper's TiO2 settings). None: no such layout.
    force_rows: dict[str, int] | None = None
    # What the step derives from the batch alone (padded, centered rows), kept for the next step that
    # uses the batch: only for batches whose tensors never change (kept by data.batches='fixed'),
    # enabled by setting it to {}; None: nothing is kept.
    step_cache: dict | None = field(default=None, repr=False, compare=False)

    @property
    def total_atoms(self) -> int:
        return int(self.forces.shape[0]) if self.forces is not None else int(self.num_atoms.sum())

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that ``to(cuda, non_blocking=True)`` overlaps with compute."""
        return self.to_fn(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self.to_fn(lambda t: t.to(device, non_blocking=non_blocking))

    def to_fn(self, move) -> "Batch":
        moved = {e: tuple(move(t) for t in rows) for e, rows in self.deriv.items()}
        return Batch(
            move(self.structure_index),
            move(self.num_atoms),
            move(self.energy),
            {e: move(t) for e, t in self.G.items()},
            {e: move(t) for e, t in self.atom_structure.items()},
            moved,
            {e: [_moved_block(b, move) for b in blocks] for e, blocks in self.dense.items()},
            None if self.forces is None else move(self.forces),
            None if self.force_atoms is None else move(self.force_atoms),
            {e: (move(rows), move(atoms)) for e, (rows, atoms) in self.contract_index.items()},
            deriv_host={e: self.deriv_host[e] for e, rows in self.deriv.items()  # kept where dG did not move
                        if e in self.deriv_host and moved[e][2] is rows[2]},
            structure_count=None if self.structure_count is None else move(self.structure_count),
            force_rows=self.force_rows,
        )


@dataclass
class DenseBlock:
    """Batch structures of one dense size group: F[atoms] −= D @ dE/dG[rows].

    While a batch is put together from several pieces, ``D`` may be left unread (None) with
    ``source`` = (the group's D in the piece, slots of the structures): :func:`merge_batches`
    then copies every piece's rows once, straight into the merged block.
    """

    rows: torch.Tensor  # (B_g, n_el) batch rows of G[element] (centers of each structure)
    atoms: torch.Tensor  # (B_g, n) batch atom indices of each structure
    D: torch.Tensor | None  # (B_g, 3 n, n_el F)
    source: tuple[torch.Tensor, torch.Tensor] | None = None  # (group D, slots) while D is None
    # D as a numpy array sharing its memory (CPU only), for the step's products (aenet_dist.step):
    # made where the batch is put together, so the training thread does not convert it every step.
    host: np.ndarray | None = field(default=None, repr=False, compare=False)


def gather_batch(shard: ShardData, index: torch.Tensor, with_forces: bool = True, defer_dense: bool = False) -> Batch:
    """The batch of shard structures ``index`` (any order, no repeats), species-grouped.

    Every size comes from the host (:meth:`ShardData.counts`), so on a GPU the gather only queues
    work: it never waits for the device.

    Args:
        shard: the rank's shard.
        index: (B,) int64 shard-local structure indices, best on the host (a GPU shard's gather then
            sends them over without waiting).
        with_forces: gather derivative rows and reference forces.
        defer_dense: leave the dense blocks' D and the sparse rows' dG unread for :func:`merge_batches`
            (see :class:`DenseBlock` and :attr:`Batch.deriv_source`).
    """
    device = shard.num_atoms.device
    on_host = device.type == "cpu"
    counts = shard.counts()
    picked = index.numpy() if index.device.type == "cpu" else index.cpu().numpy()
    index = _sent(index, device)
    num_atoms = shard.num_atoms[index]
    batch_atom_start = torch.cumsum(num_atoms, 0) - num_atoms
    atoms = ranges(shard.atom_offset[index], num_atoms, int(counts.num_atoms[picked].sum()))  # shard atom of each batch atom
    G, atom_structure, deriv, dense, deferred, force_rows = {}, {}, {}, {}, {}, {}
    positions = torch.arange(index.numel(), device=device)
    # Each element's rows: those of the structures with derivative rows first, then the others, each
    # part in batch order (see Batch.force_rows); without forces, in batch order.
    layout = torch.argsort((~shard.has_derivs[index]).to(torch.uint8), stable=True) if with_forces else positions
    with_rows = counts.has_derivs[picked]
    for element, el in shard.elements.items():
        offsets = counts.row_offset[element]
        row_counts = offsets[picked + 1] - offsets[picked]
        if with_forces:
            force_rows[element] = int(row_counts[with_rows].sum())
        # on the CPU the host counts are the tensors' own memory: no second subtraction
        rows_of = torch.from_numpy(row_counts) if on_host else el.row_offset[index + 1] - el.row_offset[index]
        placed = rows_of[layout]
        rows = ranges(el.row_offset[index[layout]], placed, int(row_counts.sum()))
        G[element] = torch.index_select(el.G, 0, rows)  # row copies (faster than advanced indexing)
        atom_structure[element] = torch.repeat_interleave(layout, placed, output_size=rows.numel())
        if not with_forces:
            continue
        batch_row_start = torch.empty_like(rows_of)
        batch_row_start[layout] = torch.cumsum(placed, 0) - placed  # where each structure's rows begin
        groups = counts.dense_group[element][picked]
        blocks = _dense_blocks(el, index, groups, batch_row_start, batch_atom_start, defer_dense) if el.dense else []
        if blocks:  # like ``deriv``: only elements with rows in this batch
            dense[element] = blocks
        starts = counts.deriv_offset[element]
        deriv_row_counts = starts[picked + 1] - starts[picked]
        num_deriv_rows = int(deriv_row_counts.sum())
        if num_deriv_rows == 0:
            continue
        deriv_counts = torch.from_numpy(deriv_row_counts) if on_host else el.deriv_offset[index + 1] - el.deriv_offset[index]
        deriv_rows = ranges(el.deriv_offset[index], deriv_counts, num_deriv_rows)
        owner = torch.repeat_interleave(positions, deriv_counts, output_size=num_deriv_rows)
        # Shard-local -> batch-local: shift by where each structure starts in the batch.
        center = el.deriv_center[deriv_rows] - el.row_offset[index][owner] + batch_row_start[owner]
        neighbor = el.deriv_neighbor[deriv_rows] - shard.atom_offset[index][owner] + batch_atom_start[owner]
        if defer_dense:
            deriv[element] = (center, neighbor, None)
            deferred[element] = (el.dG, deriv_rows)
        else:
            deriv[element] = (center, neighbor, torch.index_select(el.dG, 0, deriv_rows))
    batch = Batch(shard.store_index[index], num_atoms, shard.energy[index], G, atom_structure, deriv, dense)
    batch.deriv_source = deferred
    if with_forces:
        batch.force_rows = force_rows
        batch.forces = torch.index_select(shard.forces, 0, atoms)
        batch.force_atoms = torch.repeat_interleave(shard.has_derivs[index], num_atoms, output_size=atoms.numel())
    return batch if defer_dense else index_derivatives(batch)


def _sent(values: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """Host values on ``device``: through page-locked memory and without waiting, for a GPU (a plain
    copy from pageable memory waits for the device's queued work); as they are on the host."""
    values = torch.from_numpy(values) if isinstance(values, np.ndarray) else values
    if device.type == "cuda" and values.device.type == "cpu":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)  # (no copy where they already are)


def _dense_blocks(el: ElementShard, index: torch.Tensor, groups: np.ndarray, batch_row_start: torch.Tensor,
                  batch_atom_start: torch.Tensor, defer: bool = False) -> list[DenseBlock]:
    """The dense size groups present among batch structures ``index`` (a loop over size classes);
    ``groups``: each batch structure's dense group (-1: sparse), on the host."""
    blocks = []
    in_groups = np.flatnonzero(groups >= 0)
    by_group = in_groups[np.argsort(groups[in_groups], kind="stable")]  # batch positions, group by group
    present, first = np.unique(groups[by_group], return_index=True)
    positions = _sent(by_group, index.device)  # one copy for every group
    ends = [*first[1:].tolist(), len(by_group)]
    for g, start, end in zip(present.tolist(), first.tolist(), ends):
        members = positions[start:end]  # batch positions of group g, in batch order
        dense = el.dense[g]
        slots = el.dense_slot[index[members]]
        center_pos = torch.arange(dense.num_centers, device=index.device)
        atom_pos = torch.arange(dense.num_atoms, device=index.device)
        if dense.centers is not None:  # padded: the padding points at the structure's last real row and atom,
            # where it adds exact zeros (its rows and columns of D are zero)
            center_pos = torch.minimum(center_pos, dense.centers[slots, None] - 1)
            atom_pos = torch.minimum(atom_pos, dense.atoms[slots, None] - 1)
        rows = batch_row_start[members, None] + center_pos
        atoms = batch_atom_start[members, None] + atom_pos
        # index_select, not D[slots]: a row copy, measured 1.6x faster for these blocks.
        blocks.append(DenseBlock(rows, atoms, None, (dense.D, slots)) if defer else
                      DenseBlock(rows, atoms, torch.index_select(dense.D, 0, slots)))
    return blocks


def merge_batches(parts: list[Batch]) -> Batch:
    """One batch of the structures of ``parts``, in order, with indices shifted.

    For parts gathered from consecutive pieces of a shard with sorted indices, the result is
    bitwise the batch :func:`gather_batch` makes from the whole shard with the same (sorted)
    indices: rows keep their order, and dense blocks of equal size are concatenated and
    ordered by size, as the whole shard's size groups are.
    """
    if len(parts) == 1:
        return index_derivatives(_read_dense(parts[0]))
    first = parts[0]
    structure_shift = np.cumsum([0] + [int(p.num_atoms.numel()) for p in parts])
    atom_shift = np.cumsum([0] + [p.total_atoms for p in parts])
    cat = torch.cat
    G, atom_structure, deriv, dense = {}, {}, {}, {}
    laid_out = all(p.force_rows is not None for p in parts)
    for element in first.G:
        if laid_out:  # the parts' leading rows (those with derivative rows) first, then the rest of each
            split = [int(p.force_rows[element]) for p in parts]
            pieces = [(k, slice(0, n)) for k, n in enumerate(split)] + [(k, slice(n, None)) for k, n in enumerate(split)]
            row_shift = np.cumsum([0] + split)  # derivative rows are leading rows: they move by the leading rows before them
        else:
            pieces = [(k, slice(None)) for k in range(len(parts))]
            row_shift = np.cumsum([0] + [int(p.G[element].shape[0]) for p in parts])
        G[element] = cat([parts[k].G[element][rows] for k, rows in pieces])
        atom_structure[element] = cat([parts[k].atom_structure[element][rows] + int(structure_shift[k]) for k, rows in pieces])
        with_rows = [(k, p.deriv[element]) for k, p in enumerate(parts) if element in p.deriv]
        if with_rows:
            deriv[element] = (
                cat([center + int(row_shift[k]) for k, (center, _, _) in with_rows]),
                cat([neighbor + int(atom_shift[k]) for k, (_, neighbor, _) in with_rows]),
                _concatenated([(dG, parts[k].deriv_source.get(element)) for k, (_, _, dG) in with_rows]),
            )
        groups: dict[tuple[int, int], list[DenseBlock]] = {}
        for k, p in enumerate(parts):
            for block in p.dense.get(element, []):
                key = (int(block.rows.shape[1]), int(block.atoms.shape[1]))
                groups.setdefault(key, []).append(DenseBlock(block.rows + int(row_shift[k]), block.atoms + int(atom_shift[k]), block.D, block.source))
        if groups:
            dense[element] = [
                DenseBlock(cat([b.rows for b in blocks]), cat([b.atoms for b in blocks]), _concatenated_D(blocks))
                for _, blocks in sorted(groups.items())
            ]
    batch = Batch(
        cat([p.structure_index for p in parts]),
        cat([p.num_atoms for p in parts]),
        cat([p.energy for p in parts]),
        G,
        atom_structure,
        deriv,
        dense,
    )
    if first.forces is not None:
        batch.forces = cat([p.forces for p in parts])
        batch.force_atoms = cat([p.force_atoms for p in parts])
    if laid_out:
        batch.force_rows = {element: sum(p.force_rows[element] for p in parts) for element in first.G}
    return index_derivatives(batch)


def index_derivatives(batch: Batch) -> Batch:
    """``batch`` with its :attr:`Batch.contract_index` (and, on the CPU, the numpy views of its blocks'
    D and sparse dG) filled in (in place)."""
    batch.contract_index = {element: contraction_index(batch, element) for element in derivative_elements(batch)}
    for blocks in batch.dense.values():
        for block in blocks:
            if block.D is not None and block.D.device.type == "cpu":
                block.host = block.D.numpy()
    batch.deriv_host = {element: dG.numpy() for element, (_, _, dG) in batch.deriv.items()
                        if dG is not None and dG.device.type == "cpu"}
    return batch


def _moved_block(block: DenseBlock, move) -> DenseBlock:
    """``block`` with its tensors moved; its numpy view stays if D did not move."""
    D = move(block.D)
    return DenseBlock(move(block.rows), move(block.atoms), D, host=block.host if D is block.D else None)


def derivative_elements(batch: Batch) -> list[str]:
    """The batch's elements with derivative rows (sparse or dense), in species order: the order in
    which the step sums their force contributions, the same in every process."""
    return [element for element in batch.G if element in batch.deriv or element in batch.dense]


def contraction_index(batch: Batch, element: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(G rows, atoms) of ``element``'s sparse rows, then of its dense blocks, each block's flattened
    (see :attr:`Batch.contract_index`)."""
    sparse = [batch.deriv[element][:2]] if element in batch.deriv else []
    pieces = sparse + [(b.rows.reshape(-1), b.atoms.reshape(-1)) for b in batch.dense.get(element, [])]
    return torch.cat([rows for rows, _ in pieces]), torch.cat([atoms for _, atoms in pieces])


def _concatenated_D(blocks: list[DenseBlock]) -> torch.Tensor:
    """The blocks' D one after another, each piece's rows copied once into the result."""
    return _concatenated([(b.D, b.source) for b in blocks])


def _concatenated(pieces: list[tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]]) -> torch.Tensor:
    """Pieces one after another along the first axis, each copied once into the result: a piece is
    a tensor, or None and the (source, rows) it is still to be read from (deferred)."""
    first = pieces[0][0] if pieces[0][0] is not None else pieces[0][1][0]
    sizes = [int(t.shape[0]) if t is not None else int(source[1].numel()) for t, source in pieces]
    out = torch.empty((sum(sizes), *first.shape[1:]), dtype=first.dtype, device=first.device)
    start = 0
    for (t, source), size in zip(pieces, sizes):
        if t is None:
            torch.index_select(source[0], 0, source[1], out=out[start : start + size])
        else:
            out[start : start + size].copy_(t)
        start += size
    return out


def _read_dense(batch: Batch) -> Batch:
    """``batch`` with every deferred dense block and sparse dG read (in place)."""
    for element, (dG_source, rows) in batch.deriv_source.items():
        center, neighbor, _ = batch.deriv[element]
        batch.deriv[element] = (center, neighbor, torch.index_select(dG_source, 0, rows))
    batch.deriv_source = {}
    for blocks in batch.dense.values():
        for k, b in enumerate(blocks):
            if b.D is None:
                blocks[k] = DenseBlock(b.rows, b.atoms, torch.index_select(b.source[0], 0, b.source[1]))
    return batch
