"""Neighbour lists against a brute-force enumeration of periodic images."""

import itertools

import numpy as np
import pytest

from aenet_dist.neighbors import neighbor_list


def brute_force(pos, cell, pbc, cutoff):
    """All (i, j, vec) with 0 < |vec| < cutoff by enumerating enough images."""
    n = len(pos)
    if pbc:
        # Images needed along each axis: cutoff over the distance between opposite faces.
        inv = np.linalg.inv(cell)
        heights = 1.0 / np.linalg.norm(inv, axis=0)
        reps = [int(np.ceil(cutoff / h)) + 1 for h in heights]
        shifts = np.array(list(itertools.product(*[range(-r, r + 1) for r in reps])), dtype=float)
    else:
        shifts = np.zeros((1, 3))
    out = []
    for i in range(n):
        for j in range(n):
            vec = pos[j] + shifts @ cell - pos[i]
            d = np.linalg.norm(vec, axis=1)
            for v in vec[(d > 1e-12) & (d < cutoff)]:
                out.append((i, j, *np.round(v, 9)))
    return sorted(out)


def as_sorted(nbr):
    rows = zip(nbr.center.tolist(), nbr.neighbor.tolist(), *np.round(nbr.vec, 9).T.tolist())
    return sorted(tuple(r) for r in rows)


CASES = {
    "cubic": (np.eye(3) * 4.0, True),
    "small_cell": (np.eye(3) * 1.7, True),  # much smaller than the cutoff: many images of every atom
    "skewed": (np.array([[3.0, 0.0, 0.0], [2.7, 1.2, 0.0], [2.5, 0.9, 1.1]]), True),
    "isolated": (np.zeros((3, 3)), False),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_brute_force(name):
    cell, pbc = CASES[name]
    rng = np.random.default_rng(1)
    frac = rng.random((4, 3))
    pos = frac @ cell if pbc else rng.random((4, 3)) * 3.0
    cutoff = 3.5
    nbr = neighbor_list([pos], [cell], [pbc], cutoff)
    assert as_sorted(nbr) == brute_force(pos, cell, pbc, cutoff)
    assert np.allclose(nbr.dist, np.linalg.norm(nbr.vec, axis=1))
    assert nbr.pair_count.tolist() == [nbr.center.size]


def test_batch_offsets_atoms_of_later_structures():
    cell = np.eye(3) * 3.0
    pos_a = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    pos_b = np.array([[0.5, 0.5, 0.5], [2.0, 2.0, 2.0], [0.0, 1.5, 0.0]])
    both = neighbor_list([pos_a, pos_b], [cell, cell], [True, True], 2.5)
    alone_b = neighbor_list([pos_b], [cell], [True], 2.5)
    count_a = int(both.pair_count[0])
    assert np.array_equal(both.center[count_a:] - 2, alone_b.center)
    assert np.array_equal(both.neighbor[count_a:] - 2, alone_b.neighbor)
    assert np.array_equal(both.vec[count_a:], alone_b.vec)


def test_batch_equals_structure_by_structure():
    """One call for a batch (shifts, filter and counts done once for all its pairs) gives, for each structure, exactly
    its own list: periodic, isolated, with coincident atoms (dropped, as aenet does) and with no pair at all."""
    rng = np.random.default_rng(5)
    cell = np.array([[4.0, 0.0, 0.0], [0.7, 3.5, 0.0], [0.2, 0.4, 3.8]])
    structures = [
        (rng.uniform(0, 3.5, (5, 3)), cell, True),
        (np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), np.zeros((3, 3)), False),
        (np.array([[0.0, 0.0, 0.0]]), np.zeros((3, 3)), False),  # no neighbour
        (rng.uniform(0, 3.5, (3, 3)), cell, True),
    ]
    batch = neighbor_list(*map(list, zip(*structures)), 3.2)
    offset, p0 = 0, 0
    for k, (pos, c, pbc) in enumerate(structures):
        alone = neighbor_list([pos], [c], [pbc], 3.2)
        p1 = p0 + int(batch.pair_count[k])
        assert int(alone.pair_count[0]) == p1 - p0
        assert np.array_equal(batch.center[p0:p1] - offset, alone.center)
        assert np.array_equal(batch.neighbor[p0:p1] - offset, alone.neighbor)
        assert np.array_equal(batch.vec[p0:p1], alone.vec) and np.array_equal(batch.dist[p0:p1], alone.dist)
        offset, p0 = offset + len(pos), p1
    assert p0 == batch.center.size
    empty = neighbor_list([], [], [], 3.2)
    assert empty.center.size == 0 and empty.pair_count.size == 0 and empty.vec.shape == (0, 3)
