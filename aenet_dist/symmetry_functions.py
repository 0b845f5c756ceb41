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
species are {``type2``, ``type3``} (either way round). 2 Σ_{j<k} (½(1 + λ cos θ))^ζ is
Behler's prefactor form 2^(1−ζ) Σ_{j<k} (1 + λ cos θ)^ζ, over unordered pairs as aenet sums.

Feature order is aenet's, not the file's: ``sf_build_index`` groups the functions by
environment species (ENV order): for species a, its G1s, G2s, G3s, then for each b >= a
the G4s and G5s of the pair (a, b); within a group, file order. :func:`aenet_order` gives it.

Angular terms are summed over the pairs of neighbours of each center (no Python loop:
index arithmetic enumerates them), processed in slices to bound memory. Derivatives are
taken with respect to the pair vectors R_ij and summed into (center, atom) rows exactly
as for the Chebyshev basis (:func:`aenet_dist.descriptors.atom_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import BehlerFunction, DescriptorSetup
from .descriptors import SpeciesFeatures, atom_rows, center_pairs, env_tables
from .neighbors import Neighbors

TRIPLET_SLICE = 1 << 15  # triplets per slice: (slice x functions) float64 temporaries stay in cache (1.3x faster than 1 << 17)


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


def aenet_numbering_problems(setups: dict[str, DescriptorSetup], types: tuple[str, ...]) -> list[str]:
    """Behler2011 setups that aenet's own programs would evaluate wrongly with this TYPES order.

    generate.x and predict.x register each species' functions under its TYPES position but
    look them up under its position in its own ENV list (``symmfunc.f90``/``sfsetup.f90``);
    where the two differ aenet applies another species' functions. aenet_dist computes the
    intended ones either way; the message says how to make the files work in aenet too.
    """
    problems = []
    for element, setup in setups.items():
        if setup.basis_type != "behler2011" or element not in types:
            continue
        in_types, in_env = types.index(element) + 1, setup.env_species.index(element) + 1
        if in_types != in_env:
            problems.append(f"{setup.source or element}: {element} is number {in_types} in TYPES but number {in_env} in its ENV list; "
                            f"aenet's generate.x/predict.x would evaluate {element} atoms with another species' symmetry functions "
                            f"(aenet_dist is not affected). To use these setups in aenet as well, list ENV in TYPES order "
                            f"({', '.join(types)}).")
    return problems


def _params(functions: list[BehlerFunction], names: tuple[str, ...], dtype, device) -> list[torch.Tensor]:
    return [torch.tensor([float(getattr(f, n)) for f in functions], dtype=dtype, device=device) for n in names]


def _cutoff(r: torch.Tensor, rc: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """aenet's cosine cutoff fc(r; rc) (zero from rc on) and, if asked, dfc/dr; broadcasts r against rc."""
    inside = (r < rc).to(r.dtype)
    arg = (math.pi / rc) * r
    fc = 0.5 * (torch.cos(arg) + 1.0) * inside
    return fc, (-0.5 * math.pi / rc) * torch.sin(arg) * inside if with_grad else None


def _gauss_cut(r: torch.Tensor, eta: torch.Tensor, rc: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """aenet's F2 = exp(−η r²) fc(r) and, if asked, dF2/dr (``sf_F2_ij``)."""
    fc, dfc = _cutoff(r, rc, with_grad)
    gauss = torch.exp(-eta * r * r)
    return gauss * fc, gauss * (dfc - 2.0 * eta * r * fc) if with_grad else None


@dataclass
class _Outputs:
    """What a pass over the pairs produces: values G, and either the derivatives ∂G_i/∂R_ij per
    pair (``d_pair``, for stored rows) or, given ∂E/∂G (``adjoint``), ∂E/∂R_ij per pair (``grad``)."""

    G: torch.Tensor  # (C, F)
    add_values: bool = True
    d_pair: torch.Tensor | None = None  # (P, F, 3)
    adjoint: torch.Tensor | None = None  # (C, F)
    grad: torch.Tensor | None = None  # (P, 3)

    @property
    def with_grad(self) -> bool:
        return self.d_pair is not None or self.adjoint is not None


def _radial(functions, columns, env_of_function, row, env, r, u, out: _Outputs) -> None:
    """Radial functions' values and pair derivatives (see :class:`_Outputs`).

    One formula serves G1-G3: fc(r) exp(−η (r − Rs)²) cos(κ r), with η = 0 for G1/G3 and
    κ = 0 for G1/G2 (factors of exactly 1).
    """
    dtype, device = r.dtype, r.device
    rc, rs, eta, kappa = _params(functions, ("cutoff", "rs", "eta", "kappa"), dtype, device)
    match = (env[:, None] == env_of_function[None, :]).to(dtype)  # (P, Fr) neighbour has the function's species
    rr = r[:, None]
    fc, dfc = _cutoff(rr, rc, out.with_grad)
    shift = rr - rs
    gauss = torch.exp(-eta * shift * shift) * match
    cos_k = torch.cos(kappa * rr)
    if out.add_values:
        out.G[:, columns] += torch.zeros((out.G.shape[0], len(functions)), dtype=dtype, device=device).index_add_(0, row, fc * gauss * cos_k)
    if not out.with_grad:
        return
    dg = dfc * gauss * cos_k + fc * gauss * (-2.0 * eta * shift * cos_k - kappa * torch.sin(kappa * rr))
    if out.d_pair is not None:
        out.d_pair[:, columns] += dg[:, :, None] * u[:, None, :]
    else:
        weight = torch.index_select(out.adjoint[:, columns], 0, row)
        out.grad += (dg * weight).sum(1, keepdim=True) * u


def _spread_matrix(key_of_function: list[int], num_keys: int, dtype, device) -> torch.Tensor | None:
    """The 0/1 matrix (keys, functions) that copies each distinct parameter set's column to its
    functions' columns; None when they are already one column per function, in order (decided once
    per pair of species, on the host, so the triplet loop never asks the device)."""
    if num_keys == len(key_of_function) and key_of_function == list(range(num_keys)):
        return None
    spread = torch.zeros((num_keys, len(key_of_function)), dtype=dtype, device=device)
    spread[key_of_function, list(range(len(key_of_function)))] = 1.0
    return spread


def _spread(per_key: torch.Tensor, spread: torch.Tensor | None) -> torch.Tensor:
    """Columns per function from columns per distinct parameter set (see :func:`_spread_matrix`)."""
    return per_key if spread is None else per_key @ spread


def _triplets(row: torch.Tensor, num_centers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (j, k), j before k, of pair indices sharing a center, without a loop over centers."""
    order = torch.argsort(row, stable=True)
    sorted_row = torch.index_select(row, 0, order)
    count = torch.bincount(sorted_row, minlength=num_centers)
    start = torch.cumsum(count, 0) - count
    position = torch.arange(order.numel(), device=row.device)
    partners = torch.index_select(start + count, 0, sorted_row) - 1 - position  # pairs after this one in its center
    first = torch.repeat_interleave(position, partners)
    offsets = torch.arange(first.numel(), device=row.device) - torch.repeat_interleave(torch.cumsum(partners, 0) - partners, partners)
    return torch.index_select(order, 0, first), torch.index_select(order, 0, first + 1 + offsets)


def _angular(functions, columns, code_of_function, num_env, row, env, r, u, vec, out: _Outputs) -> None:
    """G4/G5 values and pair derivatives over all pairs of neighbours (see :class:`_Outputs`).

    Per pair of neighbour species: the pairs of neighbours of those species within the
    largest cutoff are enumerated. The radial factors F(r_ij), F(r_ik) are per pair, so
    computed once per pair and function; F(r_jk) once per triplet and distinct (η, Rc); the
    angular factor once per triplet and distinct (λ, ζ), spread to the functions' columns by
    a 0/1 matrix product (exact) unless already one per function.
    """
    dtype, device = r.dtype, r.device
    with_grad, G = out.with_grad, out.G
    for value in sorted(set(code_of_function)):
        picked = [n for n, c in enumerate(code_of_function) if c == value]
        fs = [functions[n] for n in picked]
        cols = _columns([columns[n] for n in picked])
        a, b = divmod(value, num_env)
        pairs = torch.nonzero(((env == a) | (env == b)) & (r < max(f.cutoff for f in fs))).squeeze(1)
        j_all, k_all = _triplets(torch.index_select(row, 0, pairs), G.shape[0])  # positions in `pairs`
        if a != b:  # one neighbour of each species
            env_p = torch.index_select(env, 0, pairs)
            mixed = torch.nonzero(torch.index_select(env_p, 0, j_all) != torch.index_select(env_p, 0, k_all)).squeeze(1)
            j_all, k_all = j_all[mixed], k_all[mixed]
        eta_f, rc_f, lam_f, zeta_f = _params(fs, ("eta", "cutoff", "lam", "zeta"), dtype, device)
        f2_pair, df2_pair = _gauss_cut(torch.index_select(r, 0, pairs)[:, None], eta_f, rc_f, with_grad)
        jk_keys = sorted({(f.eta, f.cutoff) for f in fs if f.kind == 4})
        angle_keys = sorted({(f.lam, f.zeta) for f in fs})
        has_g5 = any(f.kind == 5 for f in fs)
        # G5 takes the last column of F(r_jk), a column of ones: no r_jk factor.
        spread_jk = _spread_matrix([jk_keys.index((f.eta, f.cutoff)) if f.kind == 4 else len(jk_keys) for f in fs],
                                   len(jk_keys) + has_g5, dtype, device)
        spread_angle = _spread_matrix([angle_keys.index((f.lam, f.zeta)) for f in fs], len(angle_keys), dtype, device)
        eta_jk = torch.tensor([e for e, _ in jk_keys], dtype=dtype, device=device)
        rc_jk = torch.tensor([c for _, c in jk_keys], dtype=dtype, device=device)
        up, rp = torch.index_select(u, 0, pairs), torch.index_select(r, 0, pairs)[:, None]
        # One contiguous vector per coordinate: per-triplet dot products and norms gather 1-D (fastest on CPU).
        u_xyz = [torch.index_select(u[:, d].contiguous(), 0, pairs) for d in range(3)]
        v_xyz = [torch.index_select(vec[:, d].contiguous(), 0, pairs) for d in range(3)]
        center = torch.index_select(row, 0, pairs)
        values = torch.zeros((G.shape[0], len(fs)), dtype=dtype, device=device)
        if out.d_pair is not None:  # per function
            along = torch.zeros((r.numel(), len(fs)), dtype=dtype, device=device)
            across = torch.zeros((r.numel(), len(fs), 3), dtype=dtype, device=device)
        elif out.adjoint is not None:  # contracted with ∂E/∂G first
            along = torch.zeros(r.numel(), dtype=dtype, device=device)
            across = torch.zeros((r.numel(), 3), dtype=dtype, device=device)
            adjoint = out.adjoint[:, cols]
        for s0 in range(0, j_all.numel(), TRIPLET_SLICE):
            j, k = j_all[s0 : s0 + TRIPLET_SLICE], k_all[s0 : s0 + TRIPLET_SLICE]
            cos = _dot(u_xyz, j, k).clamp(-1.0, 1.0)
            if jk_keys:
                rjk = _distance(v_xyz, j, k)[:, None]
                f2jk, df2jk = _gauss_cut(rjk, eta_jk, rc_jk, with_grad)
                if has_g5:
                    f2jk = torch.cat([f2jk, torch.ones_like(rjk)], 1)
                    df2jk = torch.cat([df2jk, torch.zeros_like(rjk)], 1) if with_grad else None
                f2jk = _spread(f2jk, spread_jk)
            else:  # G5 only: no r_jk factor
                f2jk = rjk = df2jk = None
            bases = {lam: 0.5 * (1.0 + lam * cos) for lam in {lam for lam, _ in angle_keys}}
            if with_grad:
                power = _spread(torch.stack([bases[lam] ** (zeta - 1.0) for lam, zeta in angle_keys], 1), spread_angle)
                f1 = power * _spread(torch.stack([bases[lam] for lam, _ in angle_keys], 1), spread_angle)
            else:
                f1 = _spread(torch.stack([bases[lam] ** zeta for lam, zeta in angle_keys], 1), spread_angle)
            f2j, f2k = torch.index_select(f2_pair, 0, j), torch.index_select(f2_pair, 0, k)
            radial = f2j * f2k if f2jk is None else f2j * f2k * f2jk
            center_j = torch.index_select(center, 0, j)
            if out.add_values:
                values.index_add_(0, center_j, 2.0 * f1 * radial)
            if not with_grad:
                continue
            df1 = (0.5 * zeta_f * lam_f) * power  # d f1 / d cos
            df2j, df2k = torch.index_select(df2_pair, 0, j), torch.index_select(df2_pair, 0, k)
            rj, rk = torch.index_select(rp, 0, j), torch.index_select(rp, 0, k)
            uj, uk = torch.index_select(up, 0, j), torch.index_select(up, 0, k)
            pj, pk = torch.index_select(pairs, 0, j), torch.index_select(pairs, 0, k)
            # ∂g/∂R_ij = α_j u_ij + β_j u_ik and ∂g/∂R_ik = α_k u_ik + β_k u_ij, the r_jk term split by
            # u_jk = (r_ik u_ik − r_ij u_ij)/r_jk: the α terms are summed per pair before meeting a vector.
            two_f1 = 2.0 * f1 if f2jk is None else 2.0 * f1 * f2jk
            if out.d_pair is not None:
                c = cos[:, None]
                across_j, across_k = 2.0 * df1 * radial / rj, 2.0 * df1 * radial / rk
                alpha_j = two_f1 * df2j * f2k - across_j * c
                alpha_k = two_f1 * f2j * df2k - across_k * c
                beta_j, beta_k = across_j, across_k
                if f2jk is not None:
                    on_jk = 2.0 * f1 * f2j * f2k * _spread(df2jk, spread_jk) / rjk
                    alpha_j, alpha_k = alpha_j + on_jk * rj, alpha_k + on_jk * rk
                    beta_j, beta_k = beta_j - on_jk * rk, beta_k - on_jk * rj
                along.index_add_(0, pj, alpha_j).index_add_(0, pk, alpha_k)
                across.index_add_(0, pj, beta_j[:, :, None] * uk[:, None, :]).index_add_(0, pk, beta_k[:, :, None] * uj[:, None, :])
                continue
            # Adjoint: the same terms weighted by ∂E/∂G of the center and summed over the functions
            # first (four sums per triplet), so no (triplet, function, 3) array is formed.
            weight = torch.index_select(adjoint, 0, center_j)
            ones = torch.ones(len(fs), dtype=dtype, device=device)
            angle = (2.0 * df1 * weight * radial) @ ones
            weighted_f1 = weight * two_f1
            on_j, on_k = (weighted_f1 * df2j * f2k) @ ones, (weighted_f1 * f2j * df2k) @ ones
            rj, rk = rj.squeeze(1), rk.squeeze(1)
            across_j, across_k = angle / rj, angle / rk
            alpha_j, alpha_k = on_j - cos * across_j, on_k - cos * across_k
            if f2jk is not None:
                on_jk = ((2.0 * weight * f1 * f2j * f2k * _spread(df2jk, spread_jk)) @ ones) / rjk.squeeze(1)
                alpha_j, alpha_k = alpha_j + on_jk * rj, alpha_k + on_jk * rk
                across_j, across_k = across_j - on_jk * rk, across_k - on_jk * rj
            along.index_add_(0, pj, alpha_j).index_add_(0, pk, alpha_k)
            across.index_add_(0, pj, across_j[:, None] * uk).index_add_(0, pk, across_k[:, None] * uj)
        if out.add_values:
            G[:, cols] += values
        if out.d_pair is not None:
            out.d_pair[:, cols] += along[:, :, None] * u[:, None, :] + across
        elif out.adjoint is not None:
            out.grad += along[:, None] * u + across


def _dot(xyz: list[torch.Tensor], j: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dot products of the vectors j and k (coordinates as three 1-D tensors)."""
    x, y, z = (torch.index_select(c, 0, j) * torch.index_select(c, 0, k) for c in xyz)
    return x + y + z


def _distance(xyz: list[torch.Tensor], j: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """|v_k − v_j| (coordinates as three 1-D tensors)."""
    x, y, z = (torch.index_select(c, 0, k) - torch.index_select(c, 0, j) for c in xyz)
    return torch.sqrt(x * x + y * y + z * z)


def _columns(columns: list[int]):
    """A slice for a run of consecutive columns (aenet's order makes each group one), else the list."""
    if columns == list(range(columns[0], columns[0] + len(columns))):
        return slice(columns[0], columns[0] + len(columns))
    return columns


def pair_features(setup: DescriptorSetup, row: torch.Tensor, env: torch.Tensor, r: torch.Tensor, vec: torch.Tensor,
                  num_centers: int, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """G of ``num_centers`` centers from their pairs and, if asked, ∂G_i/∂R_ij per pair.

    Args:
        row: (P,) center row of each pair; env: (P,) ENV position of the neighbour;
        r: (P,) distances; vec: (P, 3) pair vectors R_j − R_i (pairs within the setup's cutoff).
    Returns:
        (G (C, F) in aenet's order, d_pair (P, F, 3) or None).
    """
    out = _Outputs(G=torch.zeros((num_centers, setup.num_features), dtype=r.dtype, device=r.device))
    if with_grad:
        out.d_pair = torch.zeros((r.numel(), setup.num_features, 3), dtype=r.dtype, device=r.device)
    _pass(setup, row, env, r, vec, out)
    return out.G, out.d_pair


def pair_gradient(setup: DescriptorSetup, row: torch.Tensor, env: torch.Tensor, r: torch.Tensor, vec: torch.Tensor,
                  dE_dG: torch.Tensor) -> torch.Tensor:
    """∂E/∂R_ij = Σ_f ∂E/∂G_if ∂G_if/∂R_ij per pair (P, 3), contracted per triplet without forming ∂G/∂R.

    Arguments as :func:`pair_features`; ``dE_dG`` is (C, F) in aenet's order.
    """
    out = _Outputs(G=dE_dG, add_values=False, adjoint=dE_dG, grad=torch.zeros((r.numel(), 3), dtype=r.dtype, device=r.device))
    _pass(setup, row, env, r, vec, out)
    return out.grad


def _pass(setup: DescriptorSetup, row, env, r, vec, out: _Outputs) -> None:
    """One pass of the radial and angular functions of ``setup`` over the pairs into ``out``."""
    env_position = {e: k for k, e in enumerate(setup.env_species)}
    functions = [setup.basis.functions[n] for n in aenet_order(setup)]
    radial = [(c, f) for c, f in enumerate(functions) if not f.angular]
    angular = [(c, f) for c, f in enumerate(functions) if f.angular]
    u = vec / r[:, None]
    if radial:
        env_of_function = torch.tensor([env_position[f.type2] for _, f in radial], device=r.device)
        _radial([f for _, f in radial], _columns([c for c, _ in radial]), env_of_function, row, env, r, u, out)
    if angular:
        n_env = len(setup.env_species)
        codes = [min(env_position[f.type2], env_position[f.type3]) * n_env + max(env_position[f.type2], env_position[f.type3])
                 for _, f in angular]
        _angular([f for _, f in angular], [c for c, _ in angular], codes, n_env, row, env, r, u, vec, out)


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
    env_of_type, _ = env_tables(setup, type_names, dtype, device)
    keep, row, env = center_pairs(setup, env_of_type, species_index, nbr, center_atoms)
    centers, moved, r, vec = nbr.center[keep], nbr.neighbor[keep], nbr.dist[keep], nbr.vec[keep]
    want = deriv_atoms[centers]

    # Centers without derivative rows need values only; the others values and pair derivatives.
    plain = torch.nonzero(~want).squeeze(1)
    G, _ = pair_features(setup, row[plain], env[plain], r[plain], vec[plain], num_centers, with_grad=False)
    wanted = torch.nonzero(want).squeeze(1)
    if wanted.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return SpeciesFeatures(center_atoms, G, empty, empty, torch.zeros((0, setup.num_features, 3), dtype=dtype, device=device))
    G_wanted, d_pair = pair_features(setup, row[wanted], env[wanted], r[wanted], vec[wanted], num_centers, with_grad=True)
    G += G_wanted  # each center's pairs are all in one of the two parts
    wanted_centers = center_atoms[deriv_atoms[center_atoms]]
    deriv_center, deriv_neighbor, dG = atom_rows(d_pair, centers[wanted], moved[wanted], wanted_centers, num_atoms)
    return SpeciesFeatures(center_atoms, G, deriv_center, deriv_neighbor, dG)
