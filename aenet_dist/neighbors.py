"""Neighbour lists for many structures at once: every periodic image within a cutoff.

We use vesin (a compiled cell-list library, O(N), correct for any cell shape including
cells smaller than the cutoff and strongly skewed ones). On the 1000 TiO2 structures it
takes ~0.85 s against ~34 s for ASE's ``primitive_neighbor_list`` (see README); writing
our own vectorized cell list would not beat it. vesin is called once per structure (a
loop over calls into compiled code, never over atoms or pairs), and the per-structure
results are concatenated into one flat pair list with global atom indices.
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
        sum of the earlier structures' atom counts). Pair vectors are recomputed in
        float64 from positions and integer image shifts, so they do not depend on
        vesin's internal arithmetic.
    """
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)
    centers, neighbors, vectors = [], [], []
    offset = 0
    for pos, cell, pbc in zip(positions, cells, pbcs):
        pos = np.ascontiguousarray(pos, dtype=np.float64)
        cell = np.asarray(cell, dtype=np.float64) if pbc else np.zeros((3, 3))
        i, j, shifts = calculator.compute(pos, cell, bool(pbc), "ijS")
        vec = pos[j] - pos[i] + shifts.astype(np.float64) @ cell
        centers.append(i.astype(np.int64) + offset)
        neighbors.append(j.astype(np.int64) + offset)
        vectors.append(vec)
        offset += len(pos)
    center = torch.from_numpy(np.concatenate(centers)) if centers else torch.zeros(0, dtype=torch.int64)
    neighbor = torch.from_numpy(np.concatenate(neighbors)) if neighbors else torch.zeros(0, dtype=torch.int64)
    vec = torch.from_numpy(np.concatenate(vectors)) if vectors else torch.zeros((0, 3), dtype=torch.float64)
    # Sort by (center, neighbor) so that sums over pairs have one fixed order whatever
    # the batch composition: structures featurized alone or together give equal bits.
    order = torch.from_numpy(np.lexsort((vec[:, 2].numpy(), vec[:, 1].numpy(), vec[:, 0].numpy(), neighbor.numpy(), center.numpy())))
    center, neighbor, vec = center[order], neighbor[order], vec[order]
    dist = torch.linalg.vector_norm(vec, dim=1)
    keep = dist > 1e-12  # aenet excludes only the atom itself (r > 1e-12)
    return Neighbors(
        center=center[keep].to(device),
        neighbor=neighbor[keep].to(device),
        vec=vec[keep].to(device=device, dtype=dtype),
        dist=dist[keep].to(device=device, dtype=dtype),
    )
