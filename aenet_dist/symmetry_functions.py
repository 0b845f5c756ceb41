"""Behler's atom-centred symmetry functions (aenet's ``SYMMFUNC type=Behler2011``), vectorized, in numpy.

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

No torch: featurize, predict and the ASE calculator run without importing it (2+ s per process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import BehlerFunction, DescriptorSetup
from .descriptors import SpeciesFeatures, atom_rows, center_pairs, env_tables, scatter_add
from .neighbors import Neighbors

TRIPLET_SLICE = 1 << 13  # triplets per slice (never splitting a center): (functions x slice) float64 temporaries stay in cache (1.2x faster than 1 << 15)


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


def _params(functions: list[BehlerFunction], names: tuple[str, ...], dtype) -> list[np.ndarray]:
    return [np.array([float(getattr(f, n)) for f in functions], dtype=dtype) for n in names]


def _cutoff(r: np.ndarray, rc: np.ndarray, with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """aenet's cosine cutoff fc(r; rc) (zero from rc on) and, if asked, dfc/dr; broadcasts r against rc."""
    inside = (r < rc).astype(r.dtype)
    arg = (math.pi / rc) * r
    fc = 0.5 * (np.cos(arg) + 1.0) * inside
    return fc, (-0.5 * math.pi / rc) * np.sin(arg) * inside if with_grad else None


def _gauss_cut(r: np.ndarray, eta: np.ndarray, rc: np.ndarray, with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """aenet's F2 = exp(−η r²) fc(r) and, if asked, dF2/dr (``sf_F2_ij``)."""
    fc, dfc = _cutoff(r, rc, with_grad)
    gauss = np.exp(-eta * r * r)
    return gauss * fc, gauss * (dfc - 2.0 * eta * r * fc) if with_grad else None


@dataclass
class _Outputs:
    """What a pass over the pairs produces: values G, and either the derivatives ∂G_i/∂R_ij per
    pair (``d_pair``, for stored rows) or, given ∂E/∂G (``adjoint``), ∂E/∂R_ij per pair (``grad``)."""

    G: np.ndarray  # (C, F)
    add_values: bool = True
    d_pair: np.ndarray | None = None  # (P, F, 3)
    adjoint: np.ndarray | None = None  # (C, F)
    grad: np.ndarray | None = None  # (P, 3)

    @property
    def with_grad(self) -> bool:
        return self.d_pair is not None or self.adjoint is not None


def _radial(functions, columns, env_of_function, row, env, r, u, out: _Outputs) -> None:
    """Radial functions' values and pair derivatives (see :class:`_Outputs`).

    One formula serves G1-G3: fc(r) exp(−η (r − Rs)²) cos(κ r), with η = 0 for G1/G3 and
    κ = 0 for G1/G2 (factors of exactly 1, so skipped). Each function touches only the pairs
    whose neighbour has its species and lies inside its cutoff (the others add exact zeros):
    exp, cos and sin are the bulk of the time (numpy's float64 ones are 3-4x slower than vectorized ones).
    """
    dtype = r.dtype
    num_centers = out.G.shape[0]
    if out.adjoint is not None:
        weighted = np.zeros(r.size, dtype=dtype)  # Σ_f ∂E/∂G_if dg_f/dr per pair
    for f, column, species in zip(functions, columns, env_of_function):
        rc = dtype.type(f.cutoff)
        idx = np.flatnonzero((env == species) & (r < rc))
        rr = np.take(r, idx)
        fc, dfc = _cutoff(rr, rc, out.with_grad)
        eta, kappa = dtype.type(f.eta), dtype.type(f.kappa)
        shift = rr - dtype.type(f.rs)
        gauss = np.exp(-eta * shift * shift) if eta else None
        cos_k = np.cos(kappa * rr) if kappa else None
        value = fc
        for factor in (gauss, cos_k):
            if factor is not None:
                value = value * factor
        if out.add_values:
            out.G[:, column] += scatter_add(np.take(row, idx), value, num_centers)
        if not out.with_grad:
            continue
        # dg = dfc gauss cos_k + fc gauss (−2η (r − Rs) cos_k − κ sin(κ r))
        dg = dfc
        for factor in (gauss, cos_k):
            if factor is not None:
                dg = dg * factor
        if eta or kappa:
            inner = -2.0 * eta * shift
            if kappa:
                inner = inner * cos_k - kappa * np.sin(kappa * rr)
            dg = dg + (fc if gauss is None else fc * gauss) * inner
        if out.d_pair is not None:
            out.d_pair[idx, column] += dg[:, None] * u[idx]
        else:
            weighted[idx] += dg * out.adjoint[np.take(row, idx), column]
    if out.adjoint is not None:
        out.grad += weighted[:, None] * u


def _spread_index(key_of_function: list[int], num_keys: int) -> np.ndarray | None:
    """The row of each function in a table with one row per distinct parameter set; None when
    that table already has one row per function, in order (decided once per pair of species, so
    the triplet loop skips the copy)."""
    if num_keys == len(key_of_function) and key_of_function == list(range(num_keys)):
        return None
    return np.array(key_of_function, dtype=np.int64)


def _spread(per_key: np.ndarray, index: np.ndarray | None) -> np.ndarray:
    """Rows per function from rows per distinct parameter set (see :func:`_spread_index`): a row copy, exact."""
    return per_key if index is None else np.take(per_key, index, axis=0)


def _power(base: np.ndarray, exponent: float) -> np.ndarray:
    """base ** exponent, a new array. Integer exponents (ζ is 1, 2, 4, 8, 16 in practice) by repeated
    squaring: numpy's float ``**`` calls libm pow per element, 20-40x slower than a multiplication."""
    if not (float(exponent).is_integer() and 0 <= exponent <= 64):
        return base ** exponent
    n = int(exponent)
    if n == 0:
        return np.ones_like(base)
    result, square = None, base
    while True:
        if n & 1:
            result = square.copy() if result is None else np.multiply(result, square, out=result)
        n >>= 1
        if not n:
            return result
        square = square * square


def _jk_factors(rjk: np.ndarray, keys: list[tuple[float, float]], ones_row: bool, with_grad: bool):
    """F(r_jk) = exp(−η r²) fc(r; Rc) per distinct (η, Rc) (rows) and triplet (columns) and, if asked, dF/dr;
    with ``ones_row`` a last row of ones (derivative zeros) for G5, which has no r_jk factor.

    exp, cos and sin (the bulk of the time: numpy's float64 ones are 3-4x slower than vectorized ones)
    are evaluated only where r_jk < Rc, about half the triplets, and exp not at all for η = 0.
    """
    dtype = rjk.dtype
    f = np.zeros((len(keys) + ones_row, rjk.size), dtype=dtype)
    df = np.zeros_like(f) if with_grad else None
    if ones_row:
        f[-1] = 1.0
    for q, (eta, rc) in enumerate(keys):
        inside = np.flatnonzero(rjk < dtype.type(rc))
        r = np.take(rjk, inside)
        fc, dfc = _cutoff(r, dtype.type(rc), with_grad)
        if eta == 0.0:  # exp(0) = 1 exactly
            f[q, inside] = fc
            if with_grad:
                df[q, inside] = dfc
            continue
        eta = dtype.type(eta)
        gauss = np.exp(-eta * r * r)
        f[q, inside] = gauss * fc
        if with_grad:
            df[q, inside] = gauss * (dfc - 2.0 * eta * r * fc)
    return f, df


def _triplets(sorted_row: np.ndarray, num_centers: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (j, k), j < k, of positions in ``sorted_row`` (pairs sorted by center) that share a
    center, without a loop over centers; j is nondecreasing, so triplets come grouped by center."""
    count = np.bincount(sorted_row, minlength=num_centers)
    end = np.cumsum(count)
    position = np.arange(sorted_row.size)
    partners = end[sorted_row] - 1 - position  # pairs after this one in its center
    first = np.repeat(position, partners)
    offsets = np.arange(first.size) - np.repeat(np.cumsum(partners) - partners, partners)
    return first, first + 1 + offsets


def _slices(center_of_triplet: np.ndarray, size: int):
    """(start, end) of slices of about ``size`` triplets (sorted by center) that never split a center:
    each center's sums then depend on its own triplets only, not on where a slice boundary fell, so
    a structure gets the same bits alone or in any batch. A center with more triplets is one slice."""
    total, s0 = center_of_triplet.size, 0
    while s0 < total:
        s1 = s0 + size
        if s1 < total:
            c = center_of_triplet[s1]
            s1 = int(np.searchsorted(center_of_triplet, c, side="left"))
            if s1 == s0:
                s1 = int(np.searchsorted(center_of_triplet, c, side="right"))
        else:
            s1 = total
        yield s0, s1
        s0 = s1


def _scatter_pairs(acc: np.ndarray, j: np.ndarray, k: np.ndarray, terms_j: np.ndarray, terms_k: np.ndarray) -> None:
    """acc[:, p] += Σ of terms_j[:, t] over j[t] = p, plus Σ of terms_k[:, t] over k[t] = p.

    j is nondecreasing: its sums are one ``np.add.reduceat`` over runs (3x faster than a bincount);
    k is not: one bincount per row, over the slice's range of pairs only (k > j[0]).
    """
    starts = np.r_[0, np.flatnonzero(j[1:] != j[:-1]) + 1]
    acc[:, j[starts]] += np.add.reduceat(terms_j, starts, axis=1)
    p0, p1 = int(j[0]), int(k.max()) + 1
    k = k - p0
    for q in range(acc.shape[0]):
        acc[q, p0:p1] += np.bincount(k, weights=terms_k[q], minlength=p1 - p0)


def _angular(functions, columns, code_of_function, num_env, row, env, r, u, vec, out: _Outputs) -> None:
    """G4/G5 values and pair derivatives over all pairs of neighbours (see :class:`_Outputs`).

    Per pair of neighbour species: the pairs of neighbours of those species within the
    largest cutoff are enumerated. The radial factors F(r_ij), F(r_ik) are per pair, so
    computed once per pair and function; F(r_jk) once per triplet and distinct (η, Rc); the
    angular factor once per triplet and distinct (λ, ζ), copied to the functions' rows
    unless already one per function.

    Arrays are (function, triplet) and (function, pair): numpy's elementwise loops and
    gathers are fast along a long last axis and slow along a short one (2-5 functions,
    3 coordinates). The pairs are taken sorted by center, so the triplets come grouped by
    center; slices never split a center (:func:`_slices`) and each slice's sums run over its
    own pairs and centers only (``np.add.reduceat`` over runs, bincounts over its range).
    """
    dtype = r.dtype
    with_grad, G = out.with_grad, out.G
    for value in sorted(set(code_of_function)):
        picked = [n for n, c in enumerate(code_of_function) if c == value]
        fs = [functions[n] for n in picked]
        cols = _columns([columns[n] for n in picked])
        a, b = divmod(value, num_env)
        pairs = np.flatnonzero(((env == a) | (env == b)) & (r < max(f.cutoff for f in fs)))
        pairs = pairs[np.argsort(row[pairs], kind="stable")]
        center = row[pairs]
        j_all, k_all = _triplets(center, G.shape[0])  # positions in `pairs`
        if a != b:  # one neighbour of each species
            env_p = env[pairs]
            mixed = np.flatnonzero(np.take(env_p, j_all) != np.take(env_p, k_all))
            j_all, k_all = np.take(j_all, mixed), np.take(k_all, mixed)
        center_all = np.take(center, j_all)  # nondecreasing
        eta_f, rc_f, lam_f, zeta_f = (p[:, None] for p in _params(fs, ("eta", "cutoff", "lam", "zeta"), dtype))
        rp = r[pairs]
        f2_pair, df2_pair = _gauss_cut(rp[None, :], eta_f, rc_f, with_grad)  # (function, pair)
        jk_keys = sorted({(f.eta, f.cutoff) for f in fs if f.kind == 4})
        angle_keys = sorted({(f.lam, f.zeta) for f in fs})
        has_g5 = any(f.kind == 5 for f in fs)
        # G5 takes the last row of F(r_jk), a row of ones: no r_jk factor.
        spread_jk = _spread_index([jk_keys.index((f.eta, f.cutoff)) if f.kind == 4 else len(jk_keys) for f in fs], len(jk_keys) + has_g5)
        spread_angle = _spread_index([angle_keys.index((f.lam, f.zeta)) for f in fs], len(angle_keys))
        # One contiguous vector per coordinate: per-triplet dot products and norms gather 1-D.
        u_xyz = np.ascontiguousarray(u[pairs].T)
        v_xyz = np.ascontiguousarray(vec[pairs].T)
        num_f = len(fs)
        values = np.zeros((num_f, G.shape[0]), dtype=dtype)
        # Per pair (in `pairs`): the factor of its own unit vector (row 0) and the vector along its
        # partners' (rows 1-3), per function for d_pair, contracted with ∂E/∂G first for the adjoint.
        if out.d_pair is not None:
            acc = np.zeros((4, num_f, pairs.size), dtype=dtype)
        elif out.adjoint is not None:
            acc = np.zeros((4, pairs.size), dtype=dtype)
            adjoint = np.ascontiguousarray(out.adjoint[:, cols].T)  # (function, center)
        for s0, s1 in _slices(center_all, TRIPLET_SLICE):
            j, k, center_j = j_all[s0:s1], k_all[s0:s1], center_all[s0:s1]
            cos = _dot(u_xyz, j, k)
            np.clip(cos, -1.0, 1.0, out=cos)
            if jk_keys:
                rjk = _distance(v_xyz, j, k)
                f2jk, df2jk = _jk_factors(rjk, jk_keys, has_g5, with_grad)
                f2jk = _spread(f2jk, spread_jk)
            else:  # G5 only: no r_jk factor
                f2jk = rjk = df2jk = None
            bases = {lam: 0.5 * (1.0 + lam * cos) for lam in {lam for lam, _ in angle_keys}}
            if with_grad:
                power = _spread(np.stack([_power(bases[lam], zeta - 1.0) for lam, zeta in angle_keys]), spread_angle)
                f1 = power * _spread(np.stack([bases[lam] for lam, _ in angle_keys]), spread_angle)
            else:
                f1 = _spread(np.stack([_power(bases[lam], zeta) for lam, zeta in angle_keys]), spread_angle)
            f2j, f2k = np.take(f2_pair, j, axis=1), np.take(f2_pair, k, axis=1)
            radial = f2j * f2k if f2jk is None else f2j * f2k * f2jk
            if out.add_values:
                starts = np.r_[0, np.flatnonzero(center_j[1:] != center_j[:-1]) + 1]  # one segment per center
                values[:, center_j[starts]] = np.add.reduceat(2.0 * f1 * radial, starts, axis=1)  # centers are in one slice
            if not with_grad:
                continue
            df1 = (0.5 * zeta_f * lam_f) * power  # d f1 / d cos
            df2j, df2k = np.take(df2_pair, j, axis=1), np.take(df2_pair, k, axis=1)
            rj, rk = np.take(rp, j), np.take(rp, k)
            uj, uk = np.take(u_xyz, j, axis=1), np.take(u_xyz, k, axis=1)
            n = j.size
            # ∂g/∂R_ij = α_j u_ij + β_j u_ik and ∂g/∂R_ik = α_k u_ik + β_k u_ij, the r_jk term split by
            # u_jk = (r_ik u_ik − r_ij u_ij)/r_jk: the α terms are summed per pair before meeting a vector.
            two_f1 = 2.0 * f1 if f2jk is None else 2.0 * f1 * f2jk
            if out.d_pair is not None:
                angle = 2.0 * df1 * radial
                across_j, across_k = angle / rj, angle / rk
                alpha_j = two_f1 * df2j * f2k - across_j * cos
                alpha_k = two_f1 * f2j * df2k - across_k * cos
                beta_j, beta_k = across_j, across_k
                if f2jk is not None:
                    on_jk = 2.0 * f1 * f2j * f2k * _spread(df2jk, spread_jk) / rjk
                    alpha_j, alpha_k = alpha_j + on_jk * rj, alpha_k + on_jk * rk
                    beta_j, beta_k = beta_j - on_jk * rk, beta_k - on_jk * rj
                terms_j, terms_k = np.empty((4, num_f, n), dtype=dtype), np.empty((4, num_f, n), dtype=dtype)
                terms_j[0], terms_k[0] = alpha_j, alpha_k
                np.multiply(beta_j[None], uk[:, None, :], out=terms_j[1:])
                np.multiply(beta_k[None], uj[:, None, :], out=terms_k[1:])
                _scatter_pairs(acc.reshape(4 * num_f, -1), j, k, terms_j.reshape(4 * num_f, n), terms_k.reshape(4 * num_f, n))
                continue
            # Adjoint: the same terms weighted by ∂E/∂G of the center and summed over the functions
            # first (four sums per triplet), so no (function, 3, triplet) array is formed.
            weight = np.take(adjoint, center_j, axis=1)
            angle = (2.0 * df1 * weight * radial).sum(0)
            weighted_f1 = weight * two_f1
            on_j, on_k = (weighted_f1 * df2j * f2k).sum(0), (weighted_f1 * f2j * df2k).sum(0)
            across_j, across_k = angle / rj, angle / rk
            alpha_j, alpha_k = on_j - cos * across_j, on_k - cos * across_k
            if f2jk is not None:
                on_jk = (2.0 * weight * f1 * f2j * f2k * _spread(df2jk, spread_jk)).sum(0) / rjk
                alpha_j, alpha_k = alpha_j + on_jk * rj, alpha_k + on_jk * rk
                across_j, across_k = across_j - on_jk * rk, across_k - on_jk * rj
            terms_j, terms_k = np.empty((4, n), dtype=dtype), np.empty((4, n), dtype=dtype)
            terms_j[0], terms_k[0] = alpha_j, alpha_k
            np.multiply(across_j, uk, out=terms_j[1:])
            np.multiply(across_k, uj, out=terms_k[1:])
            _scatter_pairs(acc, j, k, terms_j, terms_k)
        if out.add_values:
            G[:, cols] += values.T
        if out.d_pair is not None:  # (3, function, pair) -> (pair, function, 3); `pairs` are distinct
            target = (pairs, cols) if isinstance(cols, slice) else (pairs[:, None], np.asarray(cols)[None, :])
            out.d_pair[target] += (acc[0][None] * u_xyz[:, None, :] + acc[1:]).transpose(2, 1, 0)
        elif out.adjoint is not None:
            out.grad[pairs] += (acc[0] * u_xyz + acc[1:]).T


def _dot(xyz: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Dot products of the vectors j and k (coordinates as the three contiguous rows of ``xyz``)."""
    x, y, z = (np.take(c, j) * np.take(c, k) for c in xyz)
    return x + y + z


def _distance(xyz: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """|v_k − v_j| (coordinates as the three contiguous rows of ``xyz``)."""
    x, y, z = (np.take(c, k) - np.take(c, j) for c in xyz)
    return np.sqrt(x * x + y * y + z * z)


def _columns(columns: list[int]):
    """A slice for a run of consecutive columns (aenet's order makes each group one), else the list."""
    if columns == list(range(columns[0], columns[0] + len(columns))):
        return slice(columns[0], columns[0] + len(columns))
    return columns


def pair_features(setup: DescriptorSetup, row: np.ndarray, env: np.ndarray, r: np.ndarray, vec: np.ndarray,
                  num_centers: int, with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """G of ``num_centers`` centers from their pairs and, if asked, ∂G_i/∂R_ij per pair.

    Args:
        row: (P,) int64 center row of each pair; env: (P,) int64 ENV position of the neighbour;
        r: (P,) distances; vec: (P, 3) pair vectors R_j − R_i (pairs within the setup's cutoff).
    Returns:
        (G (C, F) in aenet's order, d_pair (P, F, 3) or None), in ``r``'s dtype.
    """
    out = _Outputs(G=np.zeros((num_centers, setup.num_features), dtype=r.dtype))
    if with_grad:
        out.d_pair = np.zeros((r.size, setup.num_features, 3), dtype=r.dtype)
    _pass(setup, row, env, r, vec, out)
    return out.G, out.d_pair


def pair_gradient(setup: DescriptorSetup, row: np.ndarray, env: np.ndarray, r: np.ndarray, vec: np.ndarray,
                  dE_dG: np.ndarray) -> np.ndarray:
    """∂E/∂R_ij = Σ_f ∂E/∂G_if ∂G_if/∂R_ij per pair (P, 3), contracted per triplet without forming ∂G/∂R.

    Arguments as :func:`pair_features`; ``dE_dG`` is (C, F) in aenet's order.
    """
    out = _Outputs(G=dE_dG, add_values=False, adjoint=dE_dG, grad=np.zeros((r.size, 3), dtype=r.dtype))
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
        env_of_function = [env_position[f.type2] for _, f in radial]
        _radial([f for _, f in radial], [c for c, _ in radial], env_of_function, row, env, r, u, out)
    if angular:
        n_env = len(setup.env_species)
        codes = [min(env_position[f.type2], env_position[f.type3]) * n_env + max(env_position[f.type2], env_position[f.type3])
                 for _, f in angular]
        _angular([f for _, f in angular], [c for c, _ in angular], codes, n_env, row, env, r, u, vec, out)


def behler_features(
    setup: DescriptorSetup,
    species_index: np.ndarray,
    type_names: tuple[str, ...],
    nbr: Neighbors,
    center_atoms: np.ndarray,
    deriv_atoms: np.ndarray,
) -> SpeciesFeatures:
    """Behler2011 descriptors of ``center_atoms``; same contract as :func:`aenet_dist.descriptors.species_features`."""
    dtype = nbr.vec.dtype
    num_atoms, num_centers = species_index.size, center_atoms.size
    env_of_type, _ = env_tables(setup, type_names, dtype)
    keep, row, env = center_pairs(setup, env_of_type, species_index, nbr, center_atoms)
    centers, moved, r, vec = nbr.center[keep], nbr.neighbor[keep], nbr.dist[keep], nbr.vec[keep]
    want = deriv_atoms[centers]

    # Centers without derivative rows need values only; the others values and pair derivatives.
    plain = np.flatnonzero(~want)
    G, _ = pair_features(setup, row[plain], env[plain], r[plain], vec[plain], num_centers, with_grad=False)
    wanted = np.flatnonzero(want)
    G_wanted, d_pair = pair_features(setup, row[wanted], env[wanted], r[wanted], vec[wanted], num_centers, with_grad=True)
    G += G_wanted  # each center's pairs are all in one of the two parts
    wanted_centers = center_atoms[deriv_atoms[center_atoms]]
    deriv_center, deriv_neighbor, dG = atom_rows(d_pair, centers[wanted], moved[wanted], wanted_centers, num_atoms)
    return SpeciesFeatures(center_atoms, G, deriv_center, deriv_neighbor, dG)
