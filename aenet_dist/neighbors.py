"""Neighbour lists for many structures at once: every periodic image within a cutoff.

We use vesin (a compiled cell-list library, O(N), correct for any cell shape including
cells smaller than the cutoff and strongly skewed ones). On the 1000 TiO2 structures it
takes ~0.85 s against ~34 s for ASE's ``primitive_neighbor_list`` (see README); writing
our own vectorized cell list would not beat it. vesin is called once per structure (a
loop over calls into compiled code, never over atoms or pairs), and the per-structure
results are concatenated into one flat pair list with global atom indices. Pair vectors
are vesin's R_j + S·cell − R_i in float64.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import vesin


class Neighbors(NamedTuple):
    """Flat pair list over a batch of structures (a full list: both i->j and j->i).

    ``center`` and ``neighbor`` are global atom indices into the concatenated atoms of
    the batch; ``neighbor`` is the unit-cell atom of which the pair's image is a copy.
    """

    center: torch.Tensor  # shape (P,), int64
    neighbor: torch.Tensor  # shape (P,), int64
    vec: torch.Tensor  # shape (P, 3), R_image(j) - R_i, Å
    dist: torch.Tensor  # shape (P,), |vec|, Å
    pair_count: torch.Tensor  # shape (S,), pairs of each structure (pairs are grouped by structure, in order)


def neighbor_list(
    positions: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    pbcs: Sequence[bool],
    cutoff: float,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Neighbors:
    """All pairs (i, image of j) with 0 < |R_image(j) - R_i| < cutoff, for every structure.

    Args:
        positions: per structure, (A_s, 3) float64 Cartesian positions, Å.
        cells: per structure, (3, 3) lattice vectors as rows, Å (ignored if not periodic).
        pbcs: per structure, periodic in all three directions or not at all.
        cutoff: Å.

    Returns:
        :class:`Neighbors` with global atom indices (structure s's atoms start at
        the sum of the earlier structures' atom counts).
    """
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)
    centers, neighbors, vectors, counts = [], [], [], []
    offset = 0
    for pos, cell, pbc in zip(positions, cells, pbcs):
        pos = np.ascontiguousarray(pos, dtype=np.float64)
        cell = np.asarray(cell, dtype=np.float64) if pbc else np.zeros((3, 3))
        i, j, vec = calculator.compute(pos, cell, bool(pbc), "ijD")
        keep = np.einsum("pd,pd->p", vec, vec) > 1e-24  # aenet excludes only the atom itself (r > 1e-12)
        centers.append(i[keep].astype(np.int64) + offset)
        neighbors.append(j[keep].astype(np.int64) + offset)
        vectors.append(vec[keep])
        counts.append(int(keep.sum()))
        offset += len(pos)
    # vesin's order is a deterministic function of the structure alone, so sums over
    # pairs do not depend on which other structures share the batch.
    center = torch.from_numpy(np.concatenate(centers)) if centers else torch.zeros(0, dtype=torch.int64)
    neighbor = torch.from_numpy(np.concatenate(neighbors)) if neighbors else torch.zeros(0, dtype=torch.int64)
    vec = torch.from_numpy(np.concatenate(vectors)) if vectors else torch.zeros((0, 3), dtype=torch.float64)
    vec = vec.to(device=device, dtype=dtype)
    return Neighbors(
        center=center.to(device),
        neighbor=neighbor.to(device),
        vec=vec,
        dist=torch.linalg.vector_norm(vec, dim=1),
        pair_count=torch.tensor(counts, dtype=torch.int64),
    )
