"""Behler's atom-centred symmetry functions (aenet's ``SYMMFUNC type=Behler2011``), vectorized.

Definitions (J. Behler, J. Chem. Phys. 134, 074106 (2011)) as aenet's ``symmfunc.f90``
evaluates them, for a center atom i, neighbour images j, k at distances r_ij, r_ik,
cos θ = u_ij·u_ik, r_jk = |R_k − R_j| and the cosine cutoff fc(r; Rc):

* G1 = Σ_j fc(r_ij)
* G2 = Σ_j exp(−η (r_ij − Rs)²) fc(r_ij)
* G3 = Σ_j cos(κ r_ij) fc(r_ij)
* G4 = 2 Σ_{j<k} (½(1 + λ cos θ))^ζ · F(r_ij) F(r_ik) F(r_jk),   F(r) = exp(−η r²) fc(r)
* G5 = 2 Σ_{j<k} (½(1 + λ cos θ))^ζ · F(r_ij) F(r_ik)

Radial functions count neighbours of species ``type2``, angular ones neighbour pairs whose
species are {``type2``, ``type3``} (either way round). Note aenet's 2^(1−ζ) is written
as (½(1 + λ cos θ))^ζ.

Feature order is aenet's, not the file's: ``sf_build_index`` groups the functions by
environment species (ENV order): for species a, its G1s, G2s, G3s, then for each b >= a
the G4s and G5s of the pair (a, b); within a group, file order. :func:`aenet_order` gives it.

Angular terms are summed over the pairs of neighbours of each center (no Python loop:
index arithmetic enumerates them), processed in slices to bound memory. Derivatives are
taken with respect to the pair vectors R_ij and summed into (center, atom) rows exactly
as for the Chebyshev basis (:func:`aenet_dist.descriptors.atom_rows`).
"""

from __future__ import annotations

import torch

from .config import BehlerFunction, DescriptorSetup
from .descriptors import SpeciesFeatures, atom_rows, cutoff_fn
from .neighbors import Neighbors

TRIPLET_SLICE = 1 << 17  # triplets per slice: (slice x functions x 3) float64 temporaries of a few MB each


def aenet_order(setup: DescriptorSetup) -> list[int]:
    """File positions of the setup's functions in the order aenet's G vector holds them."""
    env = {e: k for k, e in enumerate(setup.env_species)}
    functions = setup.basis.functions
    order: list[int] = []
    for a in range(len(env)):
        for kind in (1, 2, 3):
            order += [n for n, f in enumerate(functions) if f.kind == kind and env[f.type2] == a]
        for b in range(a, len(env)):
            for kind in (4, 5):
                order += [n for n, f in enumerate(functions)
                          if f.kind == kind and sorted((env[f.type2], env[f.type3])) == [a, b]]
    return order


def _params(functions: list[BehlerFunction], names: tuple[str, ...], dtype, device) -> list[torch.Tensor]:
    return [torch.tensor([float(getattr(f, n)) for f in functions], dtype=dtype, device=device) for n in names]


def _radial(functions, columns, env_of_function, row, env, r, u, G, d_pair) -> None:
    """Add the radial functions' values to G and, if ``d_pair`` is given, their pair derivatives.

    One formula serves G1-G3: fc(r) exp(−η (r − Rs)²) cos(κ r), with η = 0 for G1/G3 and
    κ = 0 for G1/G2 (factors of exactly 1).
    """
    dtype, device = r.dtype, r.device
    rc, rs, eta, kappa = _params(functions, ("cutoff", "rs", "eta", "kappa"), dtype, device)
    match = (env[:, None] == env_of_function[None, :]).to(dtype)  # (P, Fr) neighbour has the function's species
    rr = r[:, None]
    fc, dfc = cutoff_fn(rr, rc[None, :])
    shift = rr - rs
    gauss = torch.exp(-eta * shift * shift)
    cos_k, sin_k = torch.cos(kappa * rr), torch.sin(kappa * rr)
    g = fc * gauss * cos_k * match
    G[:, columns] += torch.zeros((G.shape[0], len(columns)), dtype=dtype, device=device).index_add_(0, row, g)
    if d_pair is not None:
        dg = (dfc * gauss * cos_k + fc * gauss * (-2.0 * eta * shift * cos_k - kappa * sin_k)) * match
        d_pair[:, columns] += dg[:, :, None] * u[:, None, :]


def _triplets(row: torch.Tensor, num_centers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (j, k), j before k, of pair indices sharing a center, without a loop over centers."""
    order = torch.argsort(row, stable=True)
    sorted_row = row[order]
    count = torch.bincount(sorted_row, minlength=num_centers)
    start = torch.cumsum(count, 0) - count
    position = torch.arange(order.numel(), device=row.device)
    partners = count[sorted_row] - 1 - (position - start[sorted_row])  # pairs after this one in its center
    first = torch.repeat_interleave(position, partners)
    offsets = torch.arange(first.numel(), device=row.device) - torch.repeat_interleave(torch.cumsum(partners, 0) - partners, partners)
    return order[first], order[first + 1 + offsets]


def _angular(functions, columns, code_of_function, num_env, row, env, r, u, vec, G, d_pair) -> None:
    """Add G4/G5 values (and pair derivatives if ``d_pair`` is given) over all neighbour pairs."""
    dtype, device = r.dtype, r.device
    max_rc = max(f.cutoff for f in functions)
    near = torch.nonzero(r < max_rc).squeeze(1)
    j_all, k_all = _triplets(row[near], G.shape[0])
    j_all, k_all = near[j_all], near[k_all]
    code = torch.minimum(env[j_all], env[k_all]) * num_env + torch.maximum(env[j_all], env[k_all])
    for value in sorted(set(code_of_function)):
        picked = [n for n, c in enumerate(code_of_function) if c == value]
        fs = [functions[n] for n in picked]
        cols = [columns[n] for n in picked]
        rc, lam, zeta, eta = (p[None, :] for p in _params(fs, ("cutoff", "lam", "zeta", "eta"), dtype, device))
        with_jk = torch.tensor([f.kind == 4 for f in fs], device=device)[None, :]
        sel = torch.nonzero(code == value).squeeze(1)
        for s0 in range(0, sel.numel(), TRIPLET_SLICE):
            t = sel[s0 : s0 + TRIPLET_SLICE]
            j, k = j_all[t], k_all[t]
            uj, uk = u[j], u[k]
            rj, rk = r[j][:, None], r[k][:, None]
            cos = (uj * uk).sum(1).clamp(-1.0, 1.0)[:, None]
            vjk = vec[k] - vec[j]
            rjk = torch.linalg.vector_norm(vjk, dim=1)
            ujk = vjk / rjk[:, None]
            rjk = rjk[:, None]
            base = 0.5 * (1.0 + lam * cos)
            f1 = base**zeta
            df1 = 0.5 * zeta * lam * base ** (zeta - 1.0)  # d f1 / d cos
            f2j, df2j = _gauss_cut(rj, eta, rc)
            f2k, df2k = _gauss_cut(rk, eta, rc)
            f2jk, df2jk = _gauss_cut(rjk, eta, rc)
            f2jk = torch.where(with_jk, f2jk, 1.0)  # G5 has no r_jk factor
            df2jk = torch.where(with_jk, df2jk, 0.0)
            radial = f2j * f2k * f2jk
            G[:, cols] += torch.zeros((G.shape[0], len(cols)), dtype=dtype, device=device).index_add_(0, row[j], 2.0 * f1 * radial)
            if d_pair is None:
                continue
            # ∂g/∂R_ij and ∂g/∂R_ik as combinations of u_ij, u_ik and u_jk (R_jk = R_ik − R_ij).
            on_jk = 2.0 * f1 * f2j * f2k * df2jk
            dj = ((2.0 * (-df1 * cos / rj * radial + f1 * df2j * f2k * f2jk)))[:, :, None] * uj[:, None, :] \
                + (2.0 * df1 / rj * radial)[:, :, None] * uk[:, None, :] - on_jk[:, :, None] * ujk[:, None, :]
            dk = ((2.0 * (-df1 * cos / rk * radial + f1 * f2j * df2k * f2jk)))[:, :, None] * uk[:, None, :] \
                + (2.0 * df1 / rk * radial)[:, :, None] * uj[:, None, :] + on_jk[:, :, None] * ujk[:, None, :]
            block = torch.zeros((d_pair.shape[0], len(cols), 3), dtype=dtype, device=device)
            block.index_add_(0, j, dj).index_add_(0, k, dk)
            d_pair[:, cols] += block


def _gauss_cut(r: torch.Tensor, eta: torch.Tensor, rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """aenet's F2 = exp(−η r²) fc(r) and dF2/dr (``sf_F2_ij``)."""
    fc, dfc = cutoff_fn(r, rc)
    gauss = torch.exp(-eta * r * r)
    return gauss * fc, gauss * (dfc - 2.0 * eta * r * fc)


def behler_features(
    setup: DescriptorSetup,
    species_index: torch.Tensor,
    type_names: tuple[str, ...],
    nbr: Neighbors,
    center_atoms: torch.Tensor,
    deriv_atoms: torch.Tensor,
) -> SpeciesFeatures:
    """Behler2011 descriptors of ``center_atoms``; same contract as :func:`aenet_dist.descriptors.species_features`."""
    dtype, device = nbr.vec.dtype, nbr.vec.device
    num_atoms, num_centers = species_index.numel(), center_atoms.numel()
    env_position = {e: k for k, e in enumerate(setup.env_species)}
    env_of_type = torch.tensor([env_position.get(name, -1) for name in type_names], dtype=torch.int64, device=device)
    functions = [setup.basis.functions[n] for n in aenet_order(setup)]
    radial = [(c, f) for c, f in enumerate(functions) if not f.angular]
    angular = [(c, f) for c, f in enumerate(functions) if f.angular]

    row_of_atom = torch.full((num_atoms,), -1, dtype=torch.int64, device=device)
    row_of_atom[center_atoms] = torch.arange(num_centers, device=device)
    env = env_of_type[species_index[nbr.neighbor]]
    keep = torch.nonzero((row_of_atom[nbr.center] >= 0) & (env >= 0) & (nbr.dist < setup.basis.max_cutoff)).squeeze(1)
    centers, moved = nbr.center[keep], nbr.neighbor[keep]
    row, env, r, vec = row_of_atom[centers], env[keep], nbr.dist[keep], nbr.vec[keep]
    u = vec / r[:, None]
    want = deriv_atoms[centers]

    G = torch.zeros((num_centers, setup.num_features), dtype=dtype, device=device)
    d_pair = None
    # Centers without derivative rows need values only; the others values and pair derivatives.
    for derivatives in (False, True):
        part = torch.nonzero(want == derivatives).squeeze(1)
        if part.numel() == 0:
            continue
        d_part = torch.zeros((part.numel(), setup.num_features, 3), dtype=dtype, device=device) if derivatives else None
        args = (row[part], env[part], r[part], u[part])
        if radial:
            columns = [c for c, _ in radial]
            env_of_function = torch.tensor([env_position[f.type2] for _, f in radial], device=device)
            _radial([f for _, f in radial], columns, env_of_function, *args, G, d_part)
        if angular:
            n_env = len(setup.env_species)
            codes = [min(env_position[f.type2], env_position[f.type3]) * n_env + max(env_position[f.type2], env_position[f.type3])
                     for _, f in angular]
            _angular([f for _, f in angular], [c for c, _ in angular], codes, n_env, *args, vec[part], G, d_part)
        if derivatives:
            d_pair = d_part
            rows_centers, rows_moved = centers[part], moved[part]

    if d_pair is None:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return SpeciesFeatures(center_atoms, G, empty, empty, torch.zeros((0, setup.num_features, 3), dtype=dtype, device=device))
    wanted_centers = center_atoms[deriv_atoms[center_atoms]]
    deriv_center, deriv_neighbor, dG = atom_rows(d_pair, rows_centers, rows_moved, wanted_centers, num_atoms)
    return SpeciesFeatures(center_atoms, G, deriv_center, deriv_neighbor, dG)
