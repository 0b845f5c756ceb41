"""Chebyshev descriptors and derivatives: aenet's own numbers, an independent brute-force
evaluation of the formulas, central finite differences, and invariances (all float64)."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from aenet_dist.config import ChebyshevBasis, DescriptorSetup
from aenet_dist.descriptors import featurize
from aenet_dist.structures import Structure, read_xsf
from helpers import moved

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFDATA = SHARED / "refdata" / "tio2_20_descriptors.npz"
XSF_DIR = SHARED / "data" / "tio2" / "xsf"

TIO2_BASIS = ChebyshevBasis(6.5, 20, 5.0, 6)
TIO2_SETUPS = {e: DescriptorSetup(e, ("Ti", "O"), "chebyshev", TIO2_BASIS, 0.35) for e in ("Ti", "O")}


def dense(structures, setups, types, derivs=True):
    """(G (A, F), dG (A, F, A, 3)) of the concatenated atoms, from the sparse rows."""
    species_index, feats = featurize(structures, setups, types, [derivs] * len(structures))
    num_atoms = species_index.size
    num_features = next(iter(setups.values())).num_features
    G = np.zeros((num_atoms, num_features))
    dG = np.zeros((num_atoms, num_features, num_atoms, 3))
    for f in feats.values():
        G[f.atom_index] = f.G
        dG[f.deriv_center, :, f.deriv_neighbor, :] = f.dG
    return G, dG


def brute_force_G(structure, setup, types):
    """Direct evaluation of aenet's formulas with an explicit triplet loop (slow, independent)."""
    basis = setup.basis
    spins = setup.typespin()
    rc = basis.max_cutoff
    cell = structure.cell
    if structure.pbc:
        heights = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
        reps = [int(np.ceil(rc / h)) + 1 for h in heights]
        shifts = np.array(list(itertools.product(*[range(-r, r + 1) for r in reps])), dtype=float) @ cell
    else:
        shifts = np.zeros((1, 3))
    fc = lambda r, c: 0.5 * (np.cos(np.pi * r / c) + 1) * (r < c)  # noqa: E731
    cheb = lambda x, n: np.polynomial.chebyshev.chebvander(x, n)  # noqa: E731
    nr, na = basis.radial_order + 1, basis.angular_order + 1
    out = np.zeros((structure.num_atoms, setup.num_features))
    for i in range(structure.num_atoms):
        vecs, s = [], []
        for j in range(structure.num_atoms):
            for v in structure.pos[j] + shifts - structure.pos[i]:
                r = np.linalg.norm(v)
                if 1e-12 < r < rc and structure.species[j] in spins:
                    vecs.append(v)
                    s.append(spins[structure.species[j]])
        vecs, s = np.array(vecs), np.array(s, dtype=float)
        r = np.linalg.norm(vecs, axis=1)
        rad = fc(r, basis.radial_cutoff)[:, None] * cheb(2 * r / basis.radial_cutoff - 1, basis.radial_order)
        out[i, :nr] = rad.sum(0)
        out[i, nr + na : 2 * nr + na] = (s[:, None] * rad).sum(0)
        for j, k in itertools.combinations(range(len(r)), 2):
            if r[j] < basis.angular_cutoff and r[k] < basis.angular_cutoff:
                cos = vecs[j] @ vecs[k] / (r[j] * r[k])
                t = fc(r[j], basis.angular_cutoff) * fc(r[k], basis.angular_cutoff) * cheb(np.array([cos]), basis.angular_order)[0]
                out[i, nr : nr + na] += t
                out[i, 2 * nr + na :] += s[j] * s[k] * t
    return out


def three_species():
    """A periodic ternary structure and ENV of three species (typespins -1, 0, +1)."""
    basis = ChebyshevBasis(4.0, 6, 3.2, 4)
    types = ("Cu", "Au", "Ni")
    setups = {e: DescriptorSetup(e, types, "chebyshev", basis) for e in types}
    rng = np.random.default_rng(7)
    cell = np.array([[3.6, 0.1, 0.0], [0.3, 3.4, 0.0], [0.2, -0.4, 3.9]])
    pos = rng.random((5, 3)) @ cell
    structure = Structure(("Cu", "Au", "Ni", "Cu", "Ni"), pos, cell, True, 0.0, np.zeros((5, 3)), "ternary")
    return structure, setups, types


def cluster():
    rng = np.random.default_rng(3)
    pos = rng.random((6, 3)) * 3.0
    return Structure(("Ti", "O", "O", "Ti", "O", "O"), pos, np.zeros((3, 3)), False, 0.0, np.zeros((6, 3)), "cluster")


def need_refdata():
    if not REFDATA.exists():
        pytest.skip(f"aenet reference descriptors not found at {REFDATA} (the shared/ folder beside the project is absent)")
    return np.load(REFDATA)


def test_equals_aenet_generate_x():
    ref = need_refdata()
    structures = [read_xsf(XSF_DIR / name) for name in ref["file_names"]]
    species_index, feats = featurize(structures, TIO2_SETUPS, ("O", "Ti"), [True] * len(structures))
    num_atoms = species_index.size
    G = np.zeros_like(ref["G"])
    for f in feats.values():
        G[f.atom_index] = f.G
    np.testing.assert_allclose(G, ref["G"], rtol=0, atol=1e-10)
    # Sparse rows: same (structure, center, atom) set, same values.
    offset = ref["atom_offset"][ref["dG_struct"]]
    ref_keys = (offset + ref["dG_center"]) * num_atoms + offset + ref["dG_neighbor"]
    keys = np.concatenate([(f.deriv_center * num_atoms + f.deriv_neighbor) for f in feats.values()])
    values = np.concatenate([f.dG for f in feats.values()])
    order, ref_order = np.argsort(keys), np.argsort(ref_keys)
    np.testing.assert_array_equal(keys[order], ref_keys[ref_order])
    np.testing.assert_allclose(values[order], ref["dG"][ref_order], rtol=0, atol=1e-10)


def test_equals_brute_force_formula_three_species():
    structure, setups, types = three_species()
    assert setups["Cu"].typespin() == {"Cu": -1, "Au": 0, "Ni": 1}
    G, _ = dense([structure], setups, types, derivs=False)
    np.testing.assert_allclose(G, brute_force_G(structure, setups["Cu"], types), rtol=0, atol=1e-11)


def test_equals_brute_force_formula_cluster():
    structure = cluster()
    G, _ = dense([structure], TIO2_SETUPS, ("O", "Ti"), derivs=False)
    np.testing.assert_allclose(G, brute_force_G(structure, TIO2_SETUPS["Ti"], ("O", "Ti")), rtol=0, atol=1e-11)


def small_cell_tio2():
    cell = np.array([[2.9, 0.0, 0.0], [0.4, 3.1, 0.0], [0.0, 0.3, 2.8]])  # well below the 6.5 Å cutoff
    # Irregular fractional positions (no symmetry), all pairs and images > RMIN apart.
    pos = np.array([[0.11, 0.23, 0.31], [0.57, 0.62, 0.44], [0.83, 0.14, 0.79]]) @ cell
    return Structure(("Ti", "O", "O"), pos, cell, True, 0.0, np.zeros((3, 3)), "small-cell")


def fd_cases():
    cases = {"small_cell": (small_cell_tio2(), TIO2_SETUPS, ("O", "Ti")), "cluster": (cluster(), TIO2_SETUPS, ("O", "Ti"))}
    cases["ternary"] = three_species()
    if (XSF_DIR / "structure1169.xsf").exists():
        cases["tio2_periodic"] = (read_xsf(XSF_DIR / "structure1169.xsf"), TIO2_SETUPS, ("O", "Ti"))
    return cases


@pytest.mark.parametrize("case", list(fd_cases()))
def test_derivatives_equal_central_differences(case):
    structure, setups, types = fd_cases()[case]
    _, dG = dense([structure], setups, types)
    h = 1e-5
    scale = np.abs(dG).max()
    for a in range(structure.num_atoms):
        for d in range(3):
            plus, minus = structure.pos.copy(), structure.pos.copy()
            plus[a, d] += h
            minus[a, d] -= h
            g_plus, _ = dense([moved(structure, plus)], setups, types, derivs=False)
            g_minus, _ = dense([moved(structure, minus)], setups, types, derivs=False)
            numeric = (g_plus - g_minus) / (2 * h)
            np.testing.assert_allclose(dG[:, :, a, d], numeric, rtol=0, atol=2e-7 * max(scale, 1.0))


def test_rotation_translation_invariance():
    structure, setups, types = three_species()
    G, dG = dense([structure], setups, types)
    angle = 0.7
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K
    shift = np.array([0.3, -1.2, 5.0])
    rotated = Structure(structure.species, structure.pos @ R.T + shift, structure.cell @ R.T, True, 0.0, None, "rotated")
    G2, dG2 = dense([rotated], setups, types)
    np.testing.assert_allclose(G2, G, rtol=0, atol=1e-11)
    # dG/dR' = dG/dR · Rᵀ for R' = R·R_old
    np.testing.assert_allclose(dG2, dG @ R.T, rtol=0, atol=1e-10)


def test_permutation_equivariance():
    structure, setups, types = three_species()
    G, dG = dense([structure], setups, types)
    perm = np.array([3, 0, 4, 1, 2])
    permuted = Structure(tuple(structure.species[k] for k in perm), structure.pos[perm], structure.cell, True, 0.0, None, "perm")
    G2, dG2 = dense([permuted], setups, types)
    np.testing.assert_allclose(G2, G[perm], rtol=0, atol=1e-11)
    np.testing.assert_allclose(dG2, dG[perm][:, :, perm], rtol=0, atol=1e-11)


def test_choice_of_periodic_image():
    structure, setups, types = three_species()
    G, dG = dense([structure], setups, types)
    pos = structure.pos.copy()
    pos[1] += 2 * structure.cell[0] - structure.cell[2]
    pos[4] -= structure.cell[1]
    G2, dG2 = dense([moved(structure, pos)], setups, types)
    np.testing.assert_allclose(G2, G, rtol=0, atol=1e-11)
    np.testing.assert_allclose(dG2, dG, rtol=0, atol=1e-10)


def test_batch_composition_does_not_change_bits():
    """A structure featurized alone or inside a batch gives bitwise equal numbers."""
    structure, setups, types = three_species()
    other = Structure(("Ni",) * 3, np.eye(3) * 1.1, np.eye(3) * 3.5, True, 0.0, None, "other")
    _, alone = featurize([structure], setups, types, [True])
    _, together = featurize([other, structure], setups, types, [False, True], pair_budget=10)
    for element in types:
        a, t = alone[element], together[element]
        mine = t.atom_index >= 3
        assert np.array_equal(t.G[mine], a.G)
        assert np.array_equal(t.dG, a.dG)
        assert np.array_equal(t.deriv_center - 3, a.deriv_center)


def test_unknown_species_names_structure():
    structure = Structure(("Ti", "Xx"), np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], np.zeros((3, 3)), False, 0.0, None, "bad.xsf")
    with pytest.raises(ValueError, match=r"bad\.xsf: species 'Xx' not in TYPES"):
        featurize([structure], TIO2_SETUPS, ("O", "Ti"), [False])


def test_rowwise_matmul_rows_do_not_depend_on_the_row_count():
    """A pair's derivative must not depend on how many pairs share its product (OpenBLAS computes left-over
    rows, e.g. the last of an odd count, with other kernels); every row must round as in a large product."""
    from aenet_dist.descriptors import rowwise_matmul

    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(5000, 84)), rng.normal(size=(84, 7))
    full = rowwise_matmul(a, b)
    for rows in (1, 2, 3, 5, 15, 16, 17, 40, 999, 1000):
        assert np.array_equal(rowwise_matmul(a[:rows], b), full[:rows]), rows
        assert np.array_equal(rowwise_matmul(a[-rows:], b), full[-rows:]), rows
        assert np.array_equal(rowwise_matmul(a[7 : 7 + rows], b), full[7 : 7 + rows]), rows


def test_atom_without_neighbours_keeps_its_own_row_in_any_batch():
    """A center with derivatives but no neighbour within the cutoff has one (zero) row (i, i), alone and
    beside other structures (it had none when its sub-batch held no pair to differentiate)."""
    isolated = Structure(name="iso", species=("Ti",), pos=np.zeros((1, 3)), cell=np.eye(3) * 20.0, pbc=False,
                         energy=0.0, forces=np.zeros((1, 3)))
    crowd = Structure(name="crowd", species=("Ti", "O", "O"), pos=np.array([[0.0, 0, 0], [1.9, 0, 0], [0, 1.9, 0]]),
                      cell=np.eye(3) * 20.0, pbc=False, energy=0.0, forces=np.zeros((3, 3)))
    for batch in ([isolated], [isolated, crowd], [crowd, isolated]):
        _, feats = featurize(batch, TIO2_SETUPS, ("O", "Ti"), [True] * len(batch))
        first = 0 if batch[0] is isolated else crowd.num_atoms
        ti = feats["Ti"]
        rows = ti.deriv_center == first
        assert ti.deriv_neighbor[rows].tolist() == [first] and not ti.dG[rows].any(), [s.name for s in batch]
