"""aenet's Chebyshev descriptors and their sparse derivatives, vectorized over many structures, in numpy.

No torch: featurize, predict and the ASE calculator run without importing it (2+ s per process).

(Behler2011 symmetry functions live in :mod:`aenet_dist.symmetry_functions`; :func:`featurize`
and :func:`species_features` serve both.)

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

from .config import DescriptorSetup
from .neighbors import Neighbors, neighbor_list


@dataclass
class SpeciesFeatures:
    """Descriptors of one center species over a batch, plus optional derivative rows.

    Attributes:
        atom_index: (A_s,) int64 batch-global indices of this species' atoms, ascending.
        G: (A_s, F) raw descriptors (aenet's unnormalized G), in :func:`featurize`'s dtype (float64 for stores).
        deriv_center: (P,) int64 batch-global index of center atom i of each row.
        deriv_neighbor: (P,) int64 batch-global index of the atom a that moves G_i.
        dG: (P, F, 3) ∂G_i/∂R_a (positive sign, Å⁻¹ units of G), images summed.
    """

    atom_index: np.ndarray
    G: np.ndarray
    deriv_center: np.ndarray
    deriv_neighbor: np.ndarray
    dG: np.ndarray


def scatter_add(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """out[k] = Σ_{p: index[p] = k} values[p], shape (size,) + values.shape[1:], in ``values``' dtype.

    One ``np.bincount`` over the flattened values: 4x faster than ``np.add.at``, and it adds in the
    order of ``index`` (so sums do not depend on what else shares the batch). bincount adds in
    float64 whatever the values' dtype; the result has the values' dtype.
    """
    tail = values.shape[1:]
    width = math.prod(tail)
    if width == 1:
        flat_index = index
    else:
        flat_index = (index[:, None] * width + np.arange(width)).ravel()
    out = np.bincount(flat_index, weights=values.reshape(-1), minlength=size * width)
    return out.astype(values.dtype, copy=False).reshape((size,) + tail)


def segment_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the first entry of each run of equal keys in ``sorted_keys`` (for ``np.add.reduceat``)."""
    if sorted_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def sum_by_key(key: np.ndarray, values: np.ndarray, size: int, key_sorted: bool) -> np.ndarray:
    """:func:`scatter_add`, or with ``key_sorted`` (ascending keys) one segmented sum: ``np.add.reduceat``
    reads the values once, without an index per element (2x faster for (pairs, 84) moments). Either way
    a key's sum depends only on its own values, in their order (reduceat adds in the values' dtype,
    bincount in float64: float32 prediction rounds its sums per path, float64 is the same either way)."""
    if not key_sorted or key.size == 0:
        return scatter_add(key, values, size)
    starts = segment_starts(key)
    out = np.zeros((size,) + values.shape[1:], dtype=values.dtype)
    out[key[starts]] = np.add.reduceat(values, starts, axis=0)
    return out


def sort_pairs_by_key(row: np.ndarray, env: np.ndarray, num_env: int) -> np.ndarray:
    """The stable order of pairs by (center row, neighbour's ENV position), the order :func:`pair_terms` sums fastest."""
    return np.argsort(row * num_env + env, kind="stable")


def cutoff_fn(r: np.ndarray, rc: float, with_grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """aenet's cosine cutoff and (with ``with_grad``) its derivative d fc/dr; zero beyond rc."""
    outside = r >= rc
    arg = math.pi * r / rc
    fc = np.cos(arg)
    fc += 1.0
    fc *= 0.5
    dfc = None
    if with_grad:
        dfc = np.sin(arg)
        dfc *= -0.5 * (math.pi / rc)
    if outside.any():  # (prediction's pairs are all inside: no masking pass then)
        fc[outside] = 0.0
        if dfc is not None:
            dfc[outside] = 0.0
    return fc, dfc


def chebyshev(x: np.ndarray, order: int, with_grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """T_0..T_order at x (P, order+1) and, if asked, dT_n/dx = n U_{n-1}(x) (P, order+1).

    Filled row by row in an (order+1, P) buffer (contiguous, no stacking copies), returned transposed.
    """
    t = np.empty((order + 1, x.size), dtype=x.dtype)
    t[0] = 1.0
    if order >= 1:
        t[1] = x
    two_x = 2 * x
    for n in range(2, order + 1):
        np.multiply(two_x, t[n - 1], out=t[n])
        t[n] -= t[n - 2]
    if not with_grad:
        return t.T, None
    u = np.empty((max(order, 1), x.size), dtype=x.dtype)  # second kind U_0..U_{order-1}
    u[0] = 1.0
    if order >= 2:
        u[1] = two_x
    for n in range(2, order):
        np.multiply(two_x, u[n - 1], out=u[n])
        u[n] -= u[n - 2]
    dt = np.empty_like(t)
    dt[0] = 0.0
    if order >= 1:
        np.multiply(u[:order], np.arange(1, order + 1, dtype=x.dtype)[:, None], out=dt[1:])
    return t.T, dt.T


@lru_cache(maxsize=None)
def moment_tables(order: int) -> tuple[np.ndarray, np.ndarray]:
    """Exponents α (K, 3) with |α| <= order, in :func:`monomials` order, and C (order+1, K).

    C[n, α] = a_n|α| · |α|!/α! where a_nm are the power-series coefficients of T_n.
    """
    exps = np.array(
        [(a, b, m - a - b) for m in range(order + 1) for a in range(m, -1, -1) for b in range(m - a, -1, -1)],
        dtype=np.int64,
    )
    cheb = np.zeros((order + 1, order + 1))  # T_n = 2x T_{n-1} - T_{n-2}
    cheb[0, 0] = 1.0
    if order >= 1:
        cheb[1, 1] = 1.0
    for n in range(2, order + 1):
        cheb[n, 1:] = 2 * cheb[n - 1, :-1]
        cheb[n] -= cheb[n - 2]
    degree = exps.sum(axis=1)
    multinomial = np.array([math.factorial(m) // (math.factorial(a) * math.factorial(b) * math.factorial(c)) for (a, b, c), m in zip(exps, degree)])
    coeff = cheb[:, degree] * multinomial[None, :]
    exps.flags.writeable = coeff.flags.writeable = False  # cached and shared by every caller
    return exps, coeff


def monomials(u: np.ndarray, order: int) -> np.ndarray:
    """u^α for all |α| <= order, shape (P, K), in :func:`moment_tables` order.

    Built degree by degree into one preallocated buffer: degree m = [x · (all of degree
    m-1), y · (those without x), z · z^(m-1)]. The buffer is (K, P) and the result its
    transposed view (column-major): each product then writes one contiguous row of P values,
    6-8x faster than strided (P, K) columns (a transposed copy would cost more than it saves).
    The values are the same products either way. (Their derivatives need no table of their own:
    ∂u^α/∂u_d = α_d u^(α−e_d), see :func:`lowering_tables`.)
    """
    num = u.shape[0]
    sizes = [(m + 1) * (m + 2) // 2 for m in range(order + 1)]
    starts = np.r_[0, np.cumsum(sizes)]
    mono = np.empty((int(starts[-1]), num), dtype=u.dtype)
    mono[0] = 1.0
    x, y, z = (np.ascontiguousarray(u[:, d]) for d in range(3))
    for m in range(1, order + 1):
        p0, p1, c0 = int(starts[m - 1]), int(starts[m]), int(starts[m])
        # Degree m from degree m-1 (rows p0:p1): x·all (m(m+1)/2), y·the last m (no x), z·the last one (z^(m-1)).
        nx = p1 - p0
        for factor, s0, s1, t0 in ((x, p0, p1, c0), (y, p1 - m, p1, c0 + nx), (z, p1 - 1, p1, c0 + nx + m)):
            np.multiply(factor, mono[s0:s1], out=mono[t0 : t0 + s1 - s0])
    return mono.T


@dataclass
class PairTerms:
    """G of a set of centers from their pairs, and the per-pair pieces derivatives need.

    Shapes: P pairs, Pa of them inside the angular cutoff, C centers, K monomials.
    """

    G: np.ndarray  # (C, F) raw descriptors
    fc: np.ndarray  # (P,) radial cutoff function and its derivative (None without with_grad)
    dfc: np.ndarray | None
    x: np.ndarray  # (P,) 2r/Rr − 1, the Chebyshev argument
    T: np.ndarray  # (P, Nr+1)
    ang: np.ndarray  # (P,) bool: inside the angular cutoff
    w: np.ndarray  # (Pa,) angular cutoff function and its derivative (None without with_grad)
    dw: np.ndarray | None
    mono: np.ndarray  # (Pa, K) u^α
    coeff: np.ndarray  # (Na+1, K) C_nα
    m_plain: np.ndarray  # (C, K) moments Σ_j w_j u_j^α
    m_spin: np.ndarray | None  # (C, K) typespin-weighted moments (None with one ENV species)


def env_tables(setup: DescriptorSetup, type_names: tuple[str, ...], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(ENV position of each type, -1 if not in ENV) and the typespin of each ENV species."""
    env_of_type = np.full(len(type_names), -1, dtype=np.int64)
    for k, element in enumerate(setup.env_species):
        env_of_type[type_names.index(element)] = k
    spins = setup.typespin()
    return env_of_type, np.array([float(spins[e]) for e in setup.env_species], dtype=dtype)


def pair_terms(setup: DescriptorSetup, spin_of_env: np.ndarray, row: np.ndarray, env: np.ndarray, r: np.ndarray, u: np.ndarray,
               num_centers: int, with_grad: bool = True) -> PairTerms:
    """aenet's G for ``num_centers`` centers from their pairs (center row, ENV position, r, unit vector u);
    without ``with_grad`` the cutoff derivatives (``dfc``, ``dw``) are left out (None)."""
    basis = setup.basis
    dtype = r.dtype
    num_env = spin_of_env.size
    multi = num_env > 1
    key = row * num_env + env  # (center row, neighbour ENV species): one sum serves both channels
    key_sorted = key.size < 2 or bool((key[1:] >= key[:-1]).all())  # see sort_pairs_by_key
    nr, na = basis.radial_order + 1, basis.angular_order + 1
    block = nr + na
    G = np.empty((num_centers, setup.num_features), dtype=dtype)
    spin = spin_of_env[None, :, None]

    fc, dfc = cutoff_fn(r, basis.radial_cutoff, with_grad)
    x = 2.0 * r / basis.radial_cutoff - 1.0
    t, _ = chebyshev(x, basis.radial_order, with_grad=False)
    radial = sum_by_key(key, fc[:, None] * t, num_centers * num_env, key_sorted).reshape(num_centers, num_env, nr)
    G[:, :nr] = radial.sum(1)
    if multi:
        G[:, block : block + nr] = (radial * spin).sum(1)

    ang = r < basis.angular_cutoff
    w, dw = cutoff_fn(r[ang], basis.angular_cutoff, with_grad)
    mono = monomials(u[ang], basis.angular_order)
    coeff = moment_tables(basis.angular_order)[1].astype(dtype, copy=False)  # shape (na, K)
    num_mono = coeff.shape[1]
    key_a = key[ang]
    moments = sum_by_key(key_a, w[:, None] * mono, num_centers * num_env, key_sorted).reshape(num_centers, num_env, num_mono)
    self_sum = sum_by_key(key_a, w * w, num_centers * num_env, key_sorted).reshape(num_centers, num_env)
    m_plain = moments.sum(1)
    # Contractions over the monomials are einsum, not BLAS: OpenBLAS rounds a product of 1-3 rows differently
    # from the same rows inside a larger one, and a structure's bits must not depend on its batch.
    G[:, nr:block] = 0.5 * (np.einsum("ck,nk->cn", m_plain * m_plain, coeff) - self_sum.sum(1)[:, None])
    m_spin = None
    if multi:
        m_spin = (moments * spin).sum(1)
        G[:, block + nr : 2 * block] = 0.5 * (np.einsum("ck,nk->cn", m_spin * m_spin, coeff) - (self_sum * spin_of_env**2).sum(1)[:, None])
    return PairTerms(G, fc, dfc, x, t, ang, w, dw, mono, coeff, m_plain, m_spin)


def species_features(
    setup: DescriptorSetup,
    species_index: np.ndarray,
    type_names: tuple[str, ...],
    nbr: Neighbors,
    center_atoms: np.ndarray,
    deriv_atoms: np.ndarray,
) -> SpeciesFeatures:
    """Descriptors of the atoms ``center_atoms`` (all of one species, using ``setup``).

    Args:
        setup: the center species' descriptor setup.
        species_index: (A,) int64 type index (into ``type_names``) of every batch atom.
        type_names: element symbols, the order ``species_index`` refers to.
        nbr: neighbour pairs of the batch with a cutoff >= the setup's cutoffs.
        center_atoms: (A_s,) ascending batch-local indices of the atoms to describe.
        deriv_atoms: (A,) bool, True for atoms whose derivative rows are wanted.

    Returns:
        :class:`SpeciesFeatures`; derivative rows only for centers with ``deriv_atoms``.
    """
    if setup.basis_type == "behler2011":
        from .symmetry_functions import behler_features  # imported here: it builds on this module's pieces

        return behler_features(setup, species_index, type_names, nbr, center_atoms, deriv_atoms)
    dtype = nbr.vec.dtype
    num_atoms = species_index.size
    num_centers = center_atoms.size
    env_of_type, spin_of_env = env_tables(setup, type_names, dtype)
    keep, pair_row, env = center_pairs(setup, env_of_type, species_index, nbr, center_atoms)
    kept = np.flatnonzero(keep)
    order = sort_pairs_by_key(pair_row, env, spin_of_env.size)
    kept, pair_row, env = kept[order], pair_row[order], env[order]
    r = nbr.dist[kept]
    u = nbr.vec[kept] / r[:, None]
    terms = pair_terms(setup, spin_of_env, pair_row, env, r, u, num_centers)

    kept_center, kept_neighbor = nbr.center[kept], nbr.neighbor[kept]
    want = deriv_atoms[kept_center]
    # The wanted pairs in (center, atom) order: the images of one atom are then adjacent, and atom_rows
    # sums them with one segmented sum.
    wanted = np.flatnonzero(want)
    wanted = wanted[np.argsort(kept_center[wanted] * num_atoms + kept_neighbor[wanted], kind="stable")]
    d_pair = pair_derivatives(setup, terms, wanted, spin_of_env[env[wanted]], u, r, pair_row)
    centers = kept_center[wanted]
    atoms_moved = kept_neighbor[wanted]
    wanted_centers = center_atoms[deriv_atoms[center_atoms]]
    return SpeciesFeatures(center_atoms, terms.G, *atom_rows(d_pair, centers, atoms_moved, wanted_centers, num_atoms))


def center_pairs(setup: DescriptorSetup, env_of_type: np.ndarray, species_index: np.ndarray, nbr: Neighbors,
                 center_atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs that enter the descriptors of ``center_atoms``: (pair mask over ``nbr``, center row of each
    kept pair, ENV position of its neighbour). A pair is kept when its center is one of ``center_atoms``,
    its neighbour's species is in ENV and it lies within the setup's largest cutoff."""
    row_of_atom = np.full(species_index.size, -1, dtype=np.int64)
    row_of_atom[center_atoms] = np.arange(center_atoms.size)
    env = env_of_type[species_index[nbr.neighbor]]
    keep = (row_of_atom[nbr.center] >= 0) & (env >= 0) & (nbr.dist < setup.basis.max_cutoff)
    return keep, row_of_atom[nbr.center[keep]], env[keep]


def pair_derivatives(setup: DescriptorSetup, terms: PairTerms, want: np.ndarray, spin: np.ndarray, u: np.ndarray,
                     r: np.ndarray, pair_row: np.ndarray) -> np.ndarray:
    """Per-pair derivatives ∂G_i/∂R_ij of the Chebyshev descriptors for the wanted pairs.

    Args:
        setup: the center species' Chebyshev setup.
        terms: :func:`pair_terms` of all P pairs.
        want: (Pw,) int64 indices of the pairs (of centers with derivative rows) to differentiate.
        spin: (Pw,) typespin of the neighbour of each wanted pair.
        u, r, pair_row: (P, 3) unit vectors, (P,) distances (Å) and center rows of all pairs.

    Returns:
        (Pw, F, 3) derivatives with respect to R_ij = R_j − R_i, in the order of the wanted pairs.
    """
    uw, rw, roww = u[want], r[want], pair_row[want]
    d_pair = np.zeros((rw.size, setup.num_features, 3), dtype=r.dtype)
    _radial_derivatives(setup, terms, want, spin, uw, d_pair)
    ang_w = terms.ang[want]
    if ang_w.any():
        _angular_derivatives(setup, terms, want, ang_w, spin, uw, rw, roww, d_pair)
    return d_pair


def _radial_derivatives(setup: DescriptorSetup, terms: PairTerms, want: np.ndarray, spin: np.ndarray, uw: np.ndarray,
                        d_pair: np.ndarray) -> None:
    """Write the radial columns of ``d_pair`` (Pw, F, 3): ∂(fc T_n)/∂R = d(fc T_n)/dr u, typespin-weighted in the second block."""
    basis = setup.basis
    nr = basis.radial_order + 1
    block = nr + basis.angular_order + 1
    _, dt = chebyshev(terms.x[want], basis.radial_order, with_grad=True)
    t_w = terms.T[want]
    g = terms.dfc[want, None] * t_w + terms.fc[want, None] * dt * (2.0 / basis.radial_cutoff)  # d(fc T_n)/dr, shape (Pw, nr)
    # Written straight into the columns of d_pair (no temporary of the product).
    np.multiply(g[:, :, None], uw[:, None, :], out=d_pair[:, :nr])
    if len(setup.env_species) > 1:
        np.multiply((spin[:, None] * g)[:, :, None], uw[:, None, :], out=d_pair[:, block : block + nr])


def _angular_derivatives(setup: DescriptorSetup, terms: PairTerms, want: np.ndarray, ang_w: np.ndarray, spin: np.ndarray,
                         uw: np.ndarray, rw: np.ndarray, roww: np.ndarray, d_pair: np.ndarray) -> None:
    """Write the angular columns of ``d_pair`` (Pw, F, 3) for the wanted pairs inside the angular cutoff (``ang_w``).

    ``want``: (Pw,) indices of the wanted pairs among all; ``uw``, ``rw``, ``roww``: their unit vectors, distances
    and center rows. With λ_nα(i) = C_nα M_α(i) and φ_α = w u^α (w the angular cutoff function),

        ∂A_n(i)/∂R_ij = u [Σ_α λ_nα (w' − |α| w/r) u^α − w w'] + (w/r) Σ_α λ_nα ∇_u u^α,

    the last term from ∂u/∂R = (I − u uᵀ)/r, Euler's u·∇_u u^α = |α| u^α and the j = k self term
    −½ ∂(w²)/∂R. ∇_u u^α has the components α_d u^(α−e_d): monomials the pair already has, so
    every term is a product of the pair's monomials (from :func:`pair_terms`) with per-center
    moments, and all sums over α are one GEMM with the fixed (K, Na+1) matrix Cᵀ.
    """
    basis = setup.basis
    nr, na = basis.radial_order + 1, basis.angular_order + 1
    block = nr + na
    coeff_t = np.ascontiguousarray(terms.coeff.T)  # shape (K, na)
    lower, order_d = lowering_tables(basis.angular_order)
    degree = order_d.sum(axis=0).astype(rw.dtype)
    among_ang = (np.cumsum(terms.ang) - 1)[want[ang_w]]  # positions of the wanted angular pairs in the angular arrays
    mono = terms.mono[among_ang]  # shape (Pa, K)
    wa, dwa = terms.w[among_ang], terms.dw[among_ang]
    ua, ra, rowa = uw[ang_w], rw[ang_w], roww[ang_w]
    num_pairs, num_mono = mono.shape
    w_over_r = wa / ra
    # pair_part[p, 0] = (w' − |α| w/r) u^α, pair_part[p, 1 + d] = α_d u^(α−e_d) (0 where α_d = 0): the pair's part of
    # each term, shared by both channels; shape (Pa, 4, K).
    pair_part = np.empty((num_pairs, 4, num_mono), dtype=rw.dtype)
    np.multiply(mono, dwa[:, None] - w_over_r[:, None] * degree[None, :], out=pair_part[:, 0])
    for d in range(3):
        np.multiply(np.take(mono, lower[d], axis=1), order_d[d].astype(rw.dtype), out=pair_part[:, 1 + d])
    multi = len(setup.env_species) > 1
    channels = [(0, terms.m_plain, None)] + ([(block, terms.m_spin, spin[ang_w])] if multi else [])
    rows = np.flatnonzero(ang_w)
    weighted = np.empty_like(pair_part)
    for start, m, sw in channels:
        m_pair = np.take(m, rowa, axis=0)  # M_α(i) of each pair's center, shape (Pa, K)
        if sw is not None:
            m_pair *= sw[:, None]
        np.multiply(m_pair[:, None, :], pair_part, out=weighted)
        # Σ_α C_nα M_α(i) pair_part[p, c, α] for the four parts at once: shape (Pa, 4, na).
        sums = rowwise_matmul(weighted.reshape(-1, num_mono), coeff_t).reshape(num_pairs, 4, na)
        radial = sums[:, 0] - ((wa * dwa) if sw is None else (sw * sw * wa * dwa))[:, None]
        d_ang = np.empty((rows.size, na, 3), dtype=rw.dtype)
        for d in range(3):
            np.multiply(radial, ua[:, d : d + 1], out=d_ang[:, :, d])
            d_ang[:, :, d] += w_over_r[:, None] * sums[:, 1 + d]
        d_pair[rows, start + nr : start + block] = d_ang


GEMM_ROW_BLOCK = 16


def rowwise_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b with each row's result independent of how many rows ``a`` has.

    OpenBLAS computes rows left over from its row blocking (e.g. the last row of an odd count)
    with other kernels, which round differently; a structure's descriptors must not depend on
    which other structures share its batch. So the rows are multiplied in whole blocks of
    :data:`GEMM_ROW_BLOCK` (a multiple of the row unrolling of OpenBLAS's x86 GEMM kernels), and
    the rest padded with zero rows to one more block. This is a property of the BLAS, not a
    promise of numpy: tests/test_descriptors.py checks it on the machine that runs the tests.
    """
    whole = a.shape[0] - a.shape[0] % GEMM_ROW_BLOCK
    if whole == a.shape[0]:
        return a @ b
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    if whole:
        np.matmul(a[:whole], b, out=out[:whole])
    padded = np.zeros((GEMM_ROW_BLOCK, a.shape[1]), dtype=a.dtype)
    padded[: a.shape[0] - whole] = a[whole:]
    out[whole:] = (padded @ b)[: a.shape[0] - whole]
    return out


@lru_cache(maxsize=None)
def lowering_tables(order: int) -> tuple[np.ndarray, np.ndarray]:
    """For the monomials of :func:`moment_tables`: (3, K) column of u^(α−e_d) (0 where α_d = 0) and (3, K) α_d."""
    exps, _ = moment_tables(order)
    index = {tuple(e): k for k, e in enumerate(exps.tolist())}
    lower = np.zeros((3, len(exps)), dtype=np.int64)
    for k, e in enumerate(exps.tolist()):
        for d in range(3):
            if e[d] > 0:
                lower[d, k] = index[tuple(e[:d] + [e[d] - 1] + e[d + 1 :])]
    order_d = np.ascontiguousarray(exps.T)
    lower.flags.writeable = order_d.flags.writeable = False  # cached and shared by every caller
    return lower, order_d


def atom_rows(d_pair: np.ndarray, centers: np.ndarray, atoms_moved: np.ndarray, wanted_centers: np.ndarray,
              num_atoms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum pair derivatives ∂G_i/∂R_ij into one row per (center i, atom a): + on the image's atom, − on the center.

    Args:
        d_pair: (P, F, 3) derivatives with respect to the pair vectors R_ij = R_j − R_i.
        centers, atoms_moved: (P,) batch-global center i and atom a (of which j is an image) of each pair.
        wanted_centers: all centers that get rows (each gets its own (i, i) row, even without pairs).

    Returns:
        (row center, row atom, dG (R, F, 3)), rows sorted by (center, atom).
    """
    pair_keys = centers * num_atoms + atoms_moved
    self_keys = wanted_centers * num_atoms + wanted_centers
    if pair_keys.size > 1 and not (pair_keys[1:] >= pair_keys[:-1]).all():  # featurize passes them sorted
        order = np.argsort(pair_keys, kind="stable")
        pair_keys, d_pair = pair_keys[order], d_pair[order]
    # Small cells put several images of one atom within the cutoff (TiO2: 3.7 pairs per row): one
    # segmented sum over the sorted pairs, in pair order.
    first = segment_starts(pair_keys)
    keys = np.unique(np.concatenate([pair_keys[first], self_keys]))
    dG = np.zeros((keys.size,) + d_pair.shape[1:], dtype=d_pair.dtype)
    if keys.size == 0:
        return keys, keys, dG
    if first.size:
        dG[np.searchsorted(keys, pair_keys[first])] = np.add.reduceat(d_pair, first, axis=0)
    # The center's own row gets −Σ of all its pair terms: rows are sorted by center, so one segmented
    # sum gives every center's total (every center with rows is a wanted center: it has its own row).
    row_center = keys // num_atoms
    starts = segment_starts(row_center)
    totals = np.add.reduceat(dG, starts, axis=0)  # one per center with rows, ascending
    dG[np.searchsorted(keys, self_keys)] -= totals[np.searchsorted(row_center[starts], wanted_centers)]
    return row_center, keys % num_atoms, dG


def sub_batches(pair_count: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive structure ranges with about ``budget`` pairs each (at least one structure)."""
    bounds, acc = [0], 0
    for s, c in enumerate(pair_count.tolist()):
        if acc and acc + c > budget:
            bounds.append(s)
            acc = 0
        acc += c
    bounds.append(len(pair_count))
    return list(zip(bounds[:-1], bounds[1:]))


def _check_min_distance(structures, setups, type_names, species_index, nbr: Neighbors, pair_offset, atom_offset) -> None:
    """Refuse atoms closer than their setup's RMIN (coincident or nearly so).

    aenet sizes its neighbour lists from RMIN, the smallest distance a setup expects; closer
    atoms are a broken structure (a duplicated line, wrong units) and would give descriptors
    far outside anything trained on.
    """
    rmin = np.array([setups[e].rmin for e in type_names], dtype=nbr.dist.dtype)
    close = np.flatnonzero(nbr.dist < rmin[species_index[nbr.center]])
    if close.size == 0:
        return
    p = int(close[0])
    s = int(np.searchsorted(pair_offset, p, side="right")) - 1
    i, j = int(nbr.center[p]) - int(atom_offset[s]), int(nbr.neighbor[p]) - int(atom_offset[s])
    element = type_names[int(species_index[nbr.center[p]])]
    raise ValueError(f"{structures[s].name}: atoms {i + 1} and {j + 1} (counting from 1) are {float(nbr.dist[p]):.4g} Å apart, "
                     f"closer than RMIN {setups[element].rmin:g} Å of the {element} setup; check the structure")


def featurize(
    structures,
    setups: dict[str, DescriptorSetup],
    type_names: tuple[str, ...],
    with_derivatives,
    dtype=np.float64,
    pair_budget: int = 24_000,
) -> tuple[np.ndarray, dict[str, SpeciesFeatures]]:
    """Descriptors (and derivative rows where asked) of a batch of structures.

    Args:
        structures: sequence of :class:`~aenet_dist.structures.Structure`.
        setups: descriptor setup per element.
        type_names: element order that the returned species indices refer to.
        with_derivatives: per structure, whether to compute dG/dR rows.
        pair_budget: pairs per vectorized sub-batch: temporaries of ~1-10 MB stay in cache and
            avoid page-faulting fresh memory (4-5x faster than one huge batch).

    Returns:
        (species_index (A,) int64 over the concatenated atoms, features per element,
        with batch-global atom indices). Elements absent from the batch get empty arrays.
    """
    type_of = {name: k for k, name in enumerate(type_names)}
    species_parts = []
    for structure in structures:
        try:
            species_parts.append(np.fromiter((type_of[e] for e in structure.species), dtype=np.int64, count=structure.num_atoms))
        except KeyError as err:
            raise ValueError(f"{structure.name}: species {err.args[0]!r} not in TYPES {list(type_names)}") from None
    num_atoms = np.array([s.num_atoms for s in structures], dtype=np.int64)
    atom_offset = np.r_[0, np.cumsum(num_atoms)]
    species_index = np.concatenate(species_parts)
    deriv_atoms = np.repeat(np.asarray(with_derivatives, dtype=bool), num_atoms)
    cutoff = max(setup.basis.max_cutoff for setup in setups.values())
    nbr = neighbor_list([s.pos for s in structures], [s.cell for s in structures], [s.pbc for s in structures], cutoff, dtype)
    pair_offset = np.r_[0, np.cumsum(nbr.pair_count)]
    _check_min_distance(structures, setups, type_names, species_index, nbr, pair_offset, atom_offset)

    parts: dict[str, list[SpeciesFeatures]] = {e: [] for e in type_names}
    for s0, s1 in sub_batches(nbr.pair_count, pair_budget):
        a0, a1, p0, p1 = int(atom_offset[s0]), int(atom_offset[s1]), int(pair_offset[s0]), int(pair_offset[s1])
        sub = Neighbors(nbr.center[p0:p1] - a0, nbr.neighbor[p0:p1] - a0, nbr.vec[p0:p1], nbr.dist[p0:p1], nbr.pair_count[s0:s1])
        sub_species = species_index[a0:a1]
        for k, element in enumerate(type_names):
            center_atoms = np.flatnonzero(sub_species == k)
            f = species_features(setups[element], sub_species, type_names, sub, center_atoms, deriv_atoms[a0:a1])
            parts[element].append(SpeciesFeatures(f.atom_index + a0, f.G, f.deriv_center + a0, f.deriv_neighbor + a0, f.dG))
    features = {
        e: SpeciesFeatures(*(np.concatenate([getattr(f, name) for f in fs]) for name in ("atom_index", "G", "deriv_center", "deriv_neighbor", "dG")))
        for e, fs in parts.items()
    }
    return species_index, features


# ----------------------------------------------------------------------------- inference: per-pair values and adjoint


@dataclass
class PairTables:
    """Per-element constants of the descriptor for pair passes (:func:`pair_values`, :func:`pair_gradient`)."""

    setup: DescriptorSetup
    env_of_type: np.ndarray  # (T,) int64 ENV position of each type, -1 if not in ENV
    spin_of_env: np.ndarray  # (num_env,) typespin
    coeff: np.ndarray | None = None  # Chebyshev: (Na+1, K) C_nα of the moment form
    lift: np.ndarray | None = None  # Chebyshev: (K, 4K) [I | D_x | D_y | D_z], D_d[α, α−e_d] = α_d


def pair_tables(setup: DescriptorSetup, type_names: tuple[str, ...], dtype) -> PairTables:
    """The :class:`PairTables` of ``setup`` for structures whose species index ``type_names``."""
    env_of_type, spin_of_env = env_tables(setup, type_names, dtype)
    if setup.basis_type == "behler2011":
        return PairTables(setup, env_of_type, spin_of_env)
    _, coeff = moment_tables(setup.basis.angular_order)
    lower, order_d = lowering_tables(setup.basis.angular_order)
    num_mono = coeff.shape[1]
    lift = np.zeros((num_mono, 4 * num_mono))
    lift[:, :num_mono] = np.eye(num_mono)
    for d in range(3):  # D_d[α, α−e_d] = α_d, for the α with α_d > 0
        raised = np.flatnonzero(order_d[d])
        lift[raised, (d + 1) * num_mono + lower[d, raised]] = order_d[d, raised]
    return PairTables(setup, env_of_type, spin_of_env, coeff.astype(dtype), lift.astype(dtype))


def pair_values(t: PairTables, row, env, r, vec, num_centers: int, with_grad: bool = True):
    """(G (C, F), what :func:`pair_gradient` reuses) of ``num_centers`` centers from their pairs.

    Args:
        row: (P,) center row of each pair; env: (P,) ENV position of the neighbour;
        r: (P,) distances, vec: (P, 3) pair vectors R_ij (all pairs within the setup's cutoff).
        with_grad: keep what :func:`pair_gradient` needs (False: energies only).
    """
    if t.setup.basis_type == "behler2011":
        from .symmetry_functions import pair_features  # imported here: it builds on this module's pieces

        return pair_features(t.setup, row, env, r, vec, num_centers, with_grad=False)[0], None
    terms = pair_terms(t.setup, t.spin_of_env, row, env, r, vec / r[:, None], num_centers, with_grad)
    return terms.G, terms


def pair_gradient(t: PairTables, row, env, r, vec, dE_dG: np.ndarray, terms) -> np.ndarray:
    """∂E/∂R_ij (P, 3) per pair from ∂E/∂G (C, F), without forming ∂G/∂R (the adjoint of :func:`pair_values`)."""
    if t.setup.basis_type == "behler2011":
        from .symmetry_functions import pair_gradient as behler_pair_gradient

        return behler_pair_gradient(t.setup, row, env, r, vec, dE_dG)
    u = vec / r[:, None]
    basis = t.setup.basis
    num_env = len(t.setup.env_species)
    multi = num_env > 1
    nr, na = basis.radial_order + 1, basis.angular_order + 1
    block = nr + na
    key = row * num_env + env
    fc, dfc, T, mono, m_plain, m_spin = terms.fc, terms.dfc, terms.T, terms.mono, terms.m_plain, terms.m_spin
    ang = np.flatnonzero(terms.ang)
    ra, ua, key_a, w, dw = r[ang], u[ang], key[ang], terms.w, terms.dw
    num_mono = mono.shape[1]

    # Per (center, ENV species) key: the plain channel plus typespin s times the weighted channel,
    # so each pair gathers one row. Radial: ∂E/∂r_p = Σ_n (g_n + s g̃_n) (fc' T_n + fc T_n' 2/Rr).
    def per_key(plain: np.ndarray, weighted: np.ndarray | None, s: np.ndarray) -> np.ndarray:
        if not multi:  # one ENV species: key == row
            return plain
        return (plain[:, None, :] + s[None, :, None] * weighted[:, None, :]).reshape(-1, plain.shape[1])

    spin_env = t.spin_of_env
    g_rad = per_key(dE_dG[:, :nr], dE_dG[:, block : block + nr] if multi else None, spin_env)[key]
    _, dT = chebyshev(terms.x, basis.radial_order, with_grad=True)
    scalar = dfc * np.einsum("pn,pn->p", g_rad, T) + (fc * (2.0 / basis.radial_cutoff)) * np.einsum("pn,pn->p", g_rad, dT)  # shape (P,)
    grad = scalar[:, None] * u

    # Angular, through the moments: λ_α(i) = ∂E/∂M_α(i) = Σ_n ∂E/∂A_n C_nα M_α, σ(i) = ∂E/∂(Σ_j w_j²) = −½ Σ_n ∂E/∂A_n.
    g_ang = dE_dG[:, nr:block]
    g_spin = dE_dG[:, block + nr :] if multi else None
    lam = per_key(rowwise_matmul(g_ang, t.coeff) * m_plain, rowwise_matmul(g_spin, t.coeff) * m_spin if multi else None, spin_env)  # (C*num_env, K)
    sig_p = per_key(-0.5 * g_ang.sum(1, keepdims=True), -0.5 * g_spin.sum(1, keepdims=True) if multi else None,
                    spin_env * spin_env)[key_a, 0]
    # Per key, [λ, λ D_x, λ D_y, λ D_z] (one small GEMM over centers), then per pair one gather and one
    # batched dot with u^β: Σ_α λ_α u^α and ∇_u Σ_α λ_α u^α = Σ_α λ_α α_d u^(α−e_d).
    lifted = rowwise_matmul(lam, t.lift)[key_a].reshape(-1, 4, num_mono)  # shape (Pa, 4, K)
    dots = np.einsum("pck,pk->pc", lifted, mono)  # shape (Pa, 4)
    tangential = dots[:, 1:]
    # Euler: u · ∇_u Σ λ_α u^α = Σ λ_α |α| u^α, so ∂/∂R = [dw Σλu^α − (w/r)(u·∇)] u + (w/r) ∇ + self-sum term.
    along = (tangential * ua).sum(1)
    radial_a = dw * dots[:, 0] - (w / ra) * along + 2.0 * sig_p * w * dw
    grad[ang] += radial_a[:, None] * ua + (w / ra)[:, None] * tangential  # ang: distinct pairs
    return grad
