"""Batches (aenet_dist.batching) against the store they come from: for random subsets in any
order, gather_batch gives exactly the store's descriptor rows, energies, forces and
derivative entries, in the order asked for; so does merge_batches of pieces gathered from
separate shards (deferred dense blocks included); padding of size-bucketed dense blocks adds
exactly nothing; with_forces=False and structures without derivatives drop their rows.

The oracle rebuilds, per element, the full (rows x atoms x 3 x F) derivative tensor from a
batch's sparse rows and dense blocks alike, and from the store's rows directly.
Model-level equivalences (dense vs sparse forces, buckets vs none, block pieces vs the whole
shard bit for bit) are in test_train.py, test_step.py and test_loader.py.
"""

import numpy as np
import pytest
import torch

from aenet_dist import batching
from aenet_dist.batching import gather_batch, merge_batches, ranges, shard_from_range
from aenet_dist.store import StoreReader, without_derivatives
from helpers import featurized_emt

F64 = torch.float64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """All 12 structures of a small EMT store (4 to 30 atoms, 3 elements, ~60 % with derivatives)."""
    _, store = featurized_emt(tmp_path_factory.mktemp("batching"), 12, seed=3, force_percent=60.0, chunk_bytes=2**16)
    reader = StoreReader(store)
    return reader.read_range(0, reader.num_structures)


def _expected(data, index, keep_derivs=None, with_forces=True):
    """What a batch of store structures ``index`` must hold, built from the store's rows with numpy:
    (G, atom_structure, derivative tensor, leading rows with derivatives) per element, and the
    per-structure/atom fields. With forces, each element's rows of structures with derivatives come
    first, then the others, each part in the order asked."""
    index = np.asarray(index)
    keep = data.has_derivs.astype(bool) if keep_derivs is None else keep_derivs
    atom_offset = np.r_[0, np.cumsum(data.num_atoms)]
    structure_of_atom = np.repeat(np.arange(len(data.num_atoms)), data.num_atoms)
    batch_atoms = np.concatenate([np.arange(atom_offset[s], atom_offset[s + 1]) for s in index])
    atom_map = np.full(atom_offset[-1], -1)
    atom_map[batch_atoms] = np.arange(len(batch_atoms))
    out = {"energy": data.cohesive_energy[index], "forces": data.forces[batch_atoms],
           "force_atoms": np.repeat(keep[index], data.num_atoms[index]), "elements": {}}
    for element, rows in data.elements.items():
        row_structure = structure_of_atom[rows.atom]
        layout = sorted(range(len(index)), key=lambda k: not keep[index[k]]) if with_forces else range(len(index))
        order = [np.flatnonzero(row_structure == index[k]) for k in layout]
        taken = np.concatenate(order)
        leading = sum(len(o) for k, o in zip(layout, order) if keep[index[k]])
        row_map = np.full(len(rows.atom), -1)
        row_map[taken] = np.arange(len(taken))
        full = np.zeros((len(taken), len(batch_atoms), 3, rows.G.shape[1]))
        use = (row_map[rows.deriv_center] >= 0) & keep[row_structure[rows.deriv_center]]
        np.add.at(full, (row_map[rows.deriv_center[use]], atom_map[rows.deriv_neighbor[use]]), rows.dG[use].transpose(0, 2, 1))
        position = np.concatenate([np.full(len(o), k) for k, o in zip(layout, order)])
        out["elements"][element] = (rows.G[taken], position, full, leading)
    return out


def _derivatives(batch, element, num_features):
    """The (rows x atoms x 3 x F) tensor of a batch element's sparse rows plus its dense blocks."""
    full = torch.zeros(batch.G[element].shape[0], batch.total_atoms, 3, num_features, dtype=F64)
    if element in batch.deriv:
        center, neighbor, dG = batch.deriv[element]
        full.index_put_((center, neighbor), dG, accumulate=True)
    for block in batch.dense.get(element, []):
        s, n_el, n = block.rows.shape[0], block.rows.shape[1], block.atoms.shape[1]
        # D[s, 3a + x, F i + f] -> (s, i, a, x, f)
        values = block.D.view(s, n, 3, n_el, num_features).permute(0, 3, 1, 2, 4)
        full.index_put_((block.rows[:, :, None].expand(s, n_el, n), block.atoms[:, None, :].expand(s, n_el, n)), values, accumulate=True)
    return full


def _check(batch, data, index, keep_derivs=None, with_forces=True):
    want = _expected(data, index, keep_derivs, with_forces)
    assert torch.equal(batch.structure_index, torch.as_tensor(index, dtype=torch.int64))
    assert torch.equal(batch.num_atoms, torch.from_numpy(data.num_atoms[index]).long())
    assert torch.equal(batch.energy, torch.from_numpy(want["energy"]))
    for element, (G, position, full, leading) in want["elements"].items():
        assert torch.equal(batch.G[element], torch.from_numpy(G).to(F64)), element
        assert torch.equal(batch.atom_structure[element], torch.from_numpy(position)), element
        if with_forces:
            assert torch.equal(_derivatives(batch, element, G.shape[1]), torch.from_numpy(full).to(F64)), element
            assert batch.force_rows[element] == leading, element
    assert (batch.force_rows is None) == (not with_forces)
    if with_forces:
        assert torch.equal(batch.forces, torch.from_numpy(want["forces"]))
        assert torch.equal(batch.force_atoms, torch.from_numpy(want["force_atoms"]))
    else:
        assert batch.forces is None and batch.force_atoms is None and not batch.deriv and not batch.dense


def _subsets(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.permutation(n)[:8], np.array([5]), np.array([n - 1, 0])]


def test_ranges_concatenates_aranges():
    assert ranges(torch.tensor([5, 0, 9]), torch.tensor([2, 3, 0])).tolist() == [5, 6, 0, 1, 2]
    assert ranges(torch.tensor([4]), torch.tensor([0])).numel() == 0


@pytest.mark.parametrize("layout", ["dense", "complete grids dense", "sparse", "buckets"])
def test_gather_batch_equals_the_store_rows_in_the_order_asked(data, layout, monkeypatch):
    """Every layout gives the store's rows: dense blocks (structure 2 misses 2 of its 729 atom pairs: a
    block with zeros), dense blocks for complete grids only (structure 2's rows sparse), all rows
    sparse, and dense blocks padded to size buckets."""
    if layout == "complete grids dense":
        monkeypatch.setattr(batching, "DENSE_FILL", 1.0)
    shard = shard_from_range(data, F64, dense_blocks=layout != "sparse", buckets=layout == "buckets")
    structure_of_atom = np.repeat(np.arange(len(data.num_atoms)), data.num_atoms)
    rows_of_2 = sum(np.count_nonzero(structure_of_atom[el.atom[el.deriv_center]] == 2) for el in data.elements.values())
    assert (rows_of_2, data.num_atoms[2]) == (727, 27)
    with_sparse_rows = any(el.deriv_center.numel() for el in shard.elements.values())
    if layout == "complete grids dense":
        assert any(el.dense for el in shard.elements.values()) and with_sparse_rows, "the store must have dense and sparse structures"
    elif layout != "sparse":
        assert not with_sparse_rows and all(el.dense_group[2] >= 0 for el in shard.elements.values() if el.row_offset[3] > el.row_offset[2])
    if layout == "buckets":
        assert any(g.centers is not None for el in shard.elements.values() for g in el.dense), "some dense group must be padded"
    for index in _subsets(len(data.num_atoms), seed=0):
        _check(gather_batch(shard, torch.from_numpy(index)), data, index)


@pytest.mark.parametrize("layout", ["dense", "sparse", "buckets"])
def test_a_shard_on_a_device_is_gathered_without_reading_the_device(data, layout):
    """Every size the gather needs comes from the host (ShardData.counts): on a GPU a read of the device
    waits for its queued work. A shard on the ``meta`` device has no values to read (any read raises,
    as one on a GPU would wait), and gathers batches of the shapes the CPU shard gives."""
    shard = shard_from_range(data, F64, dense_blocks=layout != "sparse", buckets=layout == "buckets")
    elsewhere = shard.to("meta")

    def shapes(batch):
        tensors = [batch.num_atoms, batch.forces, batch.force_atoms, *batch.G.values(), *batch.atom_structure.values()]
        tensors += [t for rows in batch.deriv.values() for t in rows] + [t for rows in batch.contract_index.values() for t in rows]
        tensors += [t for blocks in batch.dense.values() for b in blocks for t in (b.rows, b.atoms, b.D)]
        return [tuple(t.shape) for t in tensors]

    for index in _subsets(len(data.num_atoms), seed=1):
        here, there = gather_batch(shard, torch.from_numpy(index)), gather_batch(elsewhere, torch.from_numpy(index))
        assert there.G[next(iter(there.G))].device.type == "meta"
        assert shapes(there) == shapes(here) and there.force_rows == here.force_rows
        assert not gather_batch(elsewhere, torch.from_numpy(index), with_forces=False).deriv


def test_without_forces_only_descriptors_are_gathered(data):
    shard = shard_from_range(data, F64)
    index = _subsets(len(data.num_atoms), seed=1)[0]
    _check(gather_batch(shard, torch.from_numpy(index), with_forces=False), data, index, with_forces=False)


def test_structures_without_derivatives_lose_their_rows_in_the_batch(data):
    drop = np.zeros(len(data.num_atoms), dtype=bool)
    drop[np.flatnonzero(data.has_derivs)[::2]] = True  # every other structure with derivative rows in the store
    assert drop.sum() >= 2
    keep = data.has_derivs.astype(bool) & ~drop
    for buckets in (False, True):
        shard = shard_from_range(without_derivatives(data, drop), F64, buckets=buckets)
        index = np.random.default_rng(2).permutation(len(data.num_atoms))[:8]
        _check(gather_batch(shard, torch.from_numpy(index)), data, index, keep_derivs=keep)


@pytest.mark.parametrize("buckets", [False, True])
def test_merge_batches_of_separate_shards_equals_the_store(data, buckets):
    """Pieces from two shards (structures [0, 7) and [7, 12)), unsorted, some with deferred dense blocks:
    the merged batch holds the store's rows in the pieces' order."""
    from aenet_dist.store import select_structures

    first = np.arange(7)
    second = np.arange(7, len(data.num_atoms))
    shards = [shard_from_range(select_structures(data, part), F64, store_index=torch.from_numpy(part), buckets=buckets)
              for part in (first, second)]
    pieces = [np.array([4, 0, 6, 2]), np.array([4, 1, 3, 0]), np.array([3])]  # local to shard 0, 1, 0
    owner = [0, 1, 0]
    for defer in (False, True):
        parts = [gather_batch(shards[o], torch.from_numpy(p), defer_dense=defer) for o, p in zip(owner, pieces)]
        if defer:
            assert any(b.D is None for part in parts for blocks in part.dense.values() for b in blocks)
        merged = merge_batches(parts)
        index = np.concatenate([p + (0, 7)[o] for o, p in zip(owner, pieces)])
        _check(merged, data, index)
        assert all(b.D is not None for blocks in merged.dense.values() for b in blocks)
    alone = merge_batches([gather_batch(shards[1], torch.from_numpy(pieces[1]), defer_dense=True)])
    _check(alone, data, pieces[1] + 7)


def _assert_same_shard(a, b):
    """Every tensor of two ShardData equal bit for bit (dense groups included)."""
    for name in ("store_index", "num_atoms", "atom_offset", "energy", "has_derivs", "forces"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert list(a.elements) == list(b.elements)
    for element in a.elements:
        ea, eb = a.elements[element], b.elements[element]
        for name in ("G", "row_offset", "deriv_center", "deriv_neighbor", "dG", "deriv_offset", "dense_group", "dense_slot"):
            x, y = getattr(ea, name), getattr(eb, name)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), (element, name)
        assert [(g.num_centers, g.num_atoms) for g in ea.dense] == [(g.num_centers, g.num_atoms) for g in eb.dense]
        for ga, gb in zip(ea.dense, eb.dense):
            assert torch.equal(ga.D, gb.D)
            assert (ga.centers is None) == (gb.centers is None)
            if ga.centers is not None:
                assert torch.equal(ga.centers, gb.centers) and torch.equal(ga.atoms, gb.atoms)


@pytest.mark.parametrize("layout", ["dense", "buckets", "sparse only"])
@pytest.mark.parametrize("cuts", [[5], [2, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
def test_merged_pieces_equal_the_whole_range_bit_for_bit(data, layout, cuts):
    """merge_shards of consecutive pieces is the shard shard_from_range makes of the whole range
    (dense groups joined, padded or not; elements without any dense group)."""
    from aenet_dist.batching import merge_shards
    from aenet_dist.store import select_structures

    n = len(data.num_atoms)
    edges = [0, *cuts, n]
    kw = {"buckets": layout == "buckets", "dense_blocks": layout != "sparse only"}
    pieces = [shard_from_range(select_structures(data, np.arange(a, b)), F64, store_index=torch.arange(a, b), **kw)
              for a, b in zip(edges[:-1], edges[1:])]
    whole = shard_from_range(data, F64, **kw)
    assert (sum(len(el.dense) for el in whole.elements.values()) > 0) == (layout != "sparse only")
    _assert_same_shard(merge_shards(pieces), whole)
