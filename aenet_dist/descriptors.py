"""aenet's Chebyshev descriptors and their sparse derivatives, vectorized over many structures.

Definition (aenet ``sfbasis.f90``; Artrith, Urban, Ceder, PRB 96, 014112 (2017)), for a
center atom i with neighbour images j at distance r_ij and unit vector u_ij:

* cutoff  fc(r; Rc) = ½[cos(π r/Rc) + 1] for r < Rc, else 0
* radial  R_n(i) = Σ_j fc(r_ij; Rr) T_n(2 r_ij/Rr − 1),                n = 0..Nr
* angular A_n(i) = Σ_{j<k} fc(r_ij; Ra) fc(r_ik; Ra) T_n(cos θ_ijk),     n = 0..Na
* with more than one ENV species, a second copy of both blocks weighted by the
  "typespin" s_j (radial) and s_j s_k (angular).

Feature order: [R_0..R_Nr, A_0..A_Na, R̃_0..R̃_Nr, Ã_0..Ã_Na].

The angular sum is not done over triplets. T_n(c) is a polynomial Σ_m a_nm c^m, and
(u_j·u_k)^m = Σ_{|α|=m} (m!/α!) u_j^α u_k^α, so with per-atom moments
M_α(i) = Σ_j w_j u_j^α (w_j = fc(r_ij; Ra), times s_j for the weighted block)

    Σ_{j<k} w_j w_k T_n(u_j·u_k) = ½ [Σ_α C_nα M_α² − Σ_j w_j²],   C_nα = a_n|α| |α|!/α!

(the j = k terms have cos θ = 1 and T_n(1) = 1). Cost is linear in the number of pairs.

Derivatives are taken per pair with respect to the pair vector R_ij = R_j − R_i, then
summed into one row per (center i, atom a): ∂G_i/∂R_a = Σ_{images of a} ∂G_i/∂R_ij − δ_ia Σ_j ∂G_i/∂R_ij,
which equals aenet's ``sfderiv_i`` + Σ ``sfderiv_j`` over the images of a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .config import DescriptorSetup
from .neighbors import Neighbors, neighbor_list


@dataclass
class SpeciesFeatures:
    """Descriptors of one center species over a batch, plus optional derivative rows.

    Attributes:
        atom_index: (A_s,) int64 batch-global indices of this species' atoms, ascending.
        G: (A_s, F) raw descriptors (aenet's unnormalized G), float64.
        deriv_center: (P,) int64 batch-global index of center atom i of each row.
        deriv_neighbor: (P,) int64 batch-global index of the atom a that moves G_i.
        dG: (P, F, 3) ∂G_i/∂R_a (positive sign, Å⁻¹ units of G), images summed.
    """

    atom_index: torch.Tensor
    G: torch.Tensor
    deriv_center: torch.Tensor
    deriv_neighbor: torch.Tensor
    dG: torch.Tensor


def cutoff_fn(r: torch.Tensor, rc: float) -> tuple[torch.Tensor, torch.Tensor]:
    """aenet's cosine cutoff and its derivative d fc/dr; zero beyond rc."""
    inside = r < rc
    arg = math.pi * r / rc
    fc = torch.where(inside, 0.5 * (torch.cos(arg) + 1.0), torch.zeros_like(r))
    dfc = torch.where(inside, -0.5 * (math.pi / rc) * torch.sin(arg), torch.zeros_like(r))
    return fc, dfc


def chebyshev(x: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T_0..T_order at x and their derivatives dT_n/dx = n U_{n-1}(x). Shapes (P, order+1)."""
    t = [torch.ones_like(x), x]
    u = [torch.ones_like(x), 2 * x]  # Chebyshev polynomials of the second kind
    for _ in range(2, order + 1):
        t.append(2 * x * t[-1] - t[-2])
        u.append(2 * x * u[-1] - u[-2])
    dt = [torch.zeros_like(x)] + [n * u[n - 1] for n in range(1, order + 1)]
    return torch.stack(t[: order + 1], dim=1), torch.stack(dt[: order + 1], dim=1)


@lru_cache(maxsize=None)
def _moment_tables(order: int) -> tuple[np.ndarray, np.ndarray]:
    """Exponents α (K, 3) with |α| <= order and coefficients C (order+1, K) of the moment identity."""
    exps = np.array(
        [(a, b, m - a - b) for m in range(order + 1) for a in range(m, -1, -1) for b in range(m - a, -1, -1)],
        dtype=np.int64,
    )
    # Power-series coefficients a[n, m] of T_n via the recurrence T_n = 2x T_{n-1} - T_{n-2}.
    cheb = np.zeros((order + 1, order + 1))
    cheb[0, 0] = 1.0
    if order >= 1:
        cheb[1, 1] = 1.0
    for n in range(2, order + 1):
        cheb[n, 1:] = 2 * cheb[n - 1, :-1]
        cheb[n] -= cheb[n - 2]
    degree = exps.sum(axis=1)
    multinomial = np.array([math.factorial(m) // (math.factorial(a) * math.factorial(b) * math.factorial(c)) for (a, b, c), m in zip(exps, degree)])
    coeff = cheb[:, degree] * multinomial[None, :]
    return exps, coeff


def _monomials(u: torch.Tensor, exps: torch.Tensor, order: int, with_grad: bool):
    """u^α for all α (P, K) and, if asked, ∂u^α/∂u (P, K, 3) for unit vectors u (P, 3)."""
    powers = [torch.ones_like(u)]
    for _ in range(order):
        powers.append(powers[-1] * u)
    pw = torch.stack(powers, dim=2)  # shape (P, 3, order+1): pw[p, d, k] = u_d^k
    px, py, pz = pw[:, 0, exps[:, 0]], pw[:, 1, exps[:, 1]], pw[:, 2, exps[:, 2]]  # (P, K) each
    mono = px * py * pz
    if not with_grad:
        return mono, None
    # d(u_d^k)/du_d = k u_d^(k-1); exponent 0 gives 0.
    dpw = torch.cat([torch.zeros_like(pw[:, :, :1]), pw[:, :, :-1] * torch.arange(1, order + 1, dtype=u.dtype, device=u.device)], dim=2)
    dx, dy, dz = dpw[:, 0, exps[:, 0]], dpw[:, 1, exps[:, 1]], dpw[:, 2, exps[:, 2]]
    dmono = torch.stack([dx * py * pz, px * dy * pz, px * py * dz], dim=2)  # shape (P, K, 3)
    return mono, dmono


def species_features(
    setup: DescriptorSetup,
    species_index: torch.Tensor,
    type_names: tuple[str, ...],
    nbr: Neighbors,
    center_atoms: torch.Tensor,
    deriv_atoms: torch.Tensor,
) -> SpeciesFeatures:
    """Descriptors of the atoms ``center_atoms`` (all of one species, using ``setup``).

    Args:
        setup: the center species' descriptor setup.
        species_index: (A,) int64 type index (into ``type_names``) of every batch atom.
        type_names: element symbols, the order ``species_index`` refers to.
        nbr: neighbour pairs of the batch with a cutoff >= the setup's cutoffs.
        center_atoms: (A_s,) ascending batch-global indices of the atoms to describe.
        deriv_atoms: (A,) bool, True for atoms whose derivative rows are wanted.

    Returns:
        :class:`SpeciesFeatures`; derivative rows only for centers with ``deriv_atoms``.
    """
    basis = setup.basis
    dtype, device = nbr.vec.dtype, nbr.vec.device
    num_atoms = species_index.numel()
    num_centers = center_atoms.numel()
    # Map batch atom -> row of this species (-1 for other species).
    row_of_atom = torch.full((num_atoms,), -1, dtype=torch.int64, device=device)
    row_of_atom[center_atoms] = torch.arange(num_centers, device=device)

    spin_by_type = torch.zeros(len(type_names), dtype=dtype, device=device)
    in_env = torch.zeros(len(type_names), dtype=torch.bool, device=device)
    for element, spin in setup.typespin().items():
        spin_by_type[type_names.index(element)] = spin
        in_env[type_names.index(element)] = True
    multi = len(setup.env_species) > 1

    # Pairs whose center is one of ours and whose neighbour species is in ENV, within cutoff.
    neighbor_type = species_index[nbr.neighbor]
    keep = (row_of_atom[nbr.center] >= 0) & in_env[neighbor_type] & (nbr.dist < basis.max_cutoff)
    pair_row = row_of_atom[nbr.center[keep]]  # shape (P,)
    r = nbr.dist[keep]
    vec = nbr.vec[keep]
    u = vec / r[:, None]
    spin = spin_by_type[neighbor_type[keep]]
    want = deriv_atoms[nbr.center[keep]]  # pairs that need derivatives

    nr, na = basis.radial_order + 1, basis.angular_order + 1
    block = nr + na
    num_features = setup.num_features
    G = torch.zeros((num_centers, num_features), dtype=dtype, device=device)

    # Radial block.
    fc_r, dfc_r = cutoff_fn(r, basis.radial_cutoff)
    t, dt = chebyshev(2.0 * r / basis.radial_cutoff - 1.0, basis.radial_order)
    radial = fc_r[:, None] * t  # shape (P, nr)
    G[:, :nr].index_add_(0, pair_row, radial)
    if multi:
        G[:, block : block + nr].index_add_(0, pair_row, spin[:, None] * radial)

    # Angular block through moments; only pairs inside the angular cutoff.
    ang = r < basis.angular_cutoff
    a_row, a_r, a_u, a_spin = pair_row[ang], r[ang], u[ang], spin[ang]
    exps_np, coeff_np = _moment_tables(basis.angular_order)
    exps = torch.from_numpy(exps_np).to(device)
    coeff = torch.from_numpy(coeff_np).to(device=device, dtype=dtype)  # shape (na, K)
    w, dw = cutoff_fn(a_r, basis.angular_cutoff)
    mono, _ = _monomials(a_u, exps, basis.angular_order, with_grad=False)  # shape (Pa, K)
    channels = [(0, torch.ones_like(w))] + ([(block, a_spin)] if multi else [])
    moments = []
    for start, weight in channels:
        ww = weight * w
        m = torch.zeros((num_centers, exps.shape[0]), dtype=dtype, device=device).index_add_(0, a_row, ww[:, None] * mono)
        self_sum = torch.zeros(num_centers, dtype=dtype, device=device).index_add_(0, a_row, ww * ww)
        G[:, start + nr : start + block] = 0.5 * ((m * m) @ coeff.T - self_sum[:, None])
        moments.append(m)

    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if not bool(want.any()):
        return SpeciesFeatures(center_atoms, G, empty, empty, torch.zeros((0, num_features, 3), dtype=dtype, device=device))

    # Per-pair derivatives ∂G_i/∂R_ij, shape (Pd, F, 3), for pairs of wanted centers.
    d_pair = torch.zeros((int(want.sum()), num_features, 3), dtype=dtype, device=device)
    wp = want
    radial_d = (dfc_r[wp, None] * t[wp] + fc_r[wp, None] * dt[wp] * (2.0 / basis.radial_cutoff))[:, :, None] * u[wp, None, :]
    d_pair[:, :nr] = radial_d
    if multi:
        d_pair[:, block : block + nr] = spin[wp, None, None] * radial_d
    # Angular pairs among the wanted pairs.
    want_ang = want[ang]
    slot = torch.cumsum(want.to(torch.int64), 0)[ang][want_ang] - 1  # row in d_pair of each angular pair
    if bool(want_ang.any()):
        wa, dwa, ua, ra, rowa, spa = w[want_ang], dw[want_ang], a_u[want_ang], a_r[want_ang], a_row[want_ang], a_spin[want_ang]
        mono_d, dmono = _monomials(ua, exps, basis.angular_order, with_grad=True)
        degree = exps.sum(dim=1).to(dtype)
        # ∂(u^α)/∂R = (∂u^α/∂u − |α| u^α u)/r  (projection onto the sphere, Euler's identity)
        dmono_dvec = (dmono - (degree[None, :] * mono_d)[:, :, None] * ua[:, None, :]) / ra[:, None, None]
        # ∂(w u^α)/∂R = w' u^α u + w ∂(u^α)/∂R
        dphi = dwa[:, None, None] * mono_d[:, :, None] * ua[:, None, :] + wa[:, None, None] * dmono_dvec  # (Pa, K, 3)
        for (start, weight), m in zip(channels, moments):
            sw = weight[want_ang]
            b = coeff[None, :, :] * m[rowa][:, None, :]  # shape (Pa, na, K): C_nα M_α(i)
            d_ang = torch.bmm(b, sw[:, None, None] * dphi)  # shape (Pa, na, 3)
            d_ang = d_ang - (sw * sw * wa * dwa)[:, None, None] * ua[:, None, :]
            d_pair[slot, start + nr : start + block] = d_ang

    # Sum pair derivatives into (center, atom) rows: + on the image's atom, − on the center.
    centers = nbr.center[keep][want]
    atoms_moved = nbr.neighbor[keep][want]
    wanted_centers = center_atoms[deriv_atoms[center_atoms]]
    key_pair = centers * num_atoms + atoms_moved
    key_self = wanted_centers * num_atoms + wanted_centers
    keys, inverse = torch.unique(torch.cat([key_pair, key_self]), return_inverse=True)
    self_slot_of_pair = torch.searchsorted(keys, centers * num_atoms + centers)
    dG = torch.zeros((keys.numel(), num_features, 3), dtype=dtype, device=device)
    dG.index_add_(0, inverse[: key_pair.numel()], d_pair)
    dG.index_add_(0, self_slot_of_pair, -d_pair)
    return SpeciesFeatures(center_atoms, G, keys // num_atoms, keys % num_atoms, dG)


def featurize(
    structures,
    setups: dict[str, DescriptorSetup],
    type_names: tuple[str, ...],
    with_derivatives,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, SpeciesFeatures]]:
    """Descriptors (and derivative rows where asked) of a batch of structures.

    Args:
        structures: sequence of :class:`~aenet_dist.structures.Structure`.
        setups: descriptor setup per element.
        type_names: element order that the returned species indices refer to.
        with_derivatives: per structure, whether to compute dG/dR rows.

    Returns:
        (species_index (A,) int64 over the concatenated atoms, features per element).
        Elements with no atoms in the batch get empty tensors.
    """
    type_of = {name: k for k, name in enumerate(type_names)}
    species_parts, deriv_parts = [], []
    for s, structure in enumerate(structures):
        try:
            species_parts.append(np.fromiter((type_of[e] for e in structure.species), dtype=np.int64, count=structure.num_atoms))
        except KeyError as err:
            raise ValueError(f"{structure.name}: species {err.args[0]!r} not in TYPES {list(type_names)}") from None
        deriv_parts.append(np.full(structure.num_atoms, bool(with_derivatives[s])))
    species_index = torch.from_numpy(np.concatenate(species_parts)).to(device)
    deriv_atoms = torch.from_numpy(np.concatenate(deriv_parts)).to(device)
    cutoff = max(setup.basis.max_cutoff for setup in setups.values())
    nbr = neighbor_list(
        [s.pos for s in structures], [s.cell for s in structures], [s.pbc for s in structures], cutoff, dtype=dtype, device=device
    )
    features = {}
    for k, element in enumerate(type_names):
        center_atoms = torch.nonzero(species_index == k).flatten()
        features[element] = species_features(setups[element], species_index, type_names, nbr, center_atoms, deriv_atoms)
    return species_index, features
