"""Behler2011 symmetry functions: aenet's generate.x numbers (tests/data/behler, made by
make_reference.py there), an independent brute-force evaluation, central finite
differences, invariances, aenet's feature order and the ``.stp`` parser (all float64)."""

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from aenet_dist.formats.stp import read_setup, write_setup
from aenet_dist.descriptors import featurize
from aenet_dist.structures import Structure, read_xsf
from aenet_dist.symmetry_functions import aenet_order
from helpers import fd_force, fd_stress, moved

DATA = Path(__file__).resolve().parent / "data" / "behler"
RUNS = {
    "two_species": (("O", "Ti"), {"O": "O.stp", "Ti": "Ti.stp"}),
    "three_species": (("O", "Ti", "N"), {"O": "O3.stp", "Ti": "Ti3.stp", "N": "N3.stp"}),
}


def setups_of(run):
    types, files = RUNS[run]
    return types, {e: read_setup(DATA / f) for e, f in files.items()}


def features(structures, setups, types, derivs=True):
    """(G per atom as a list of arrays, {(atom, atom): dG (F, 3)}) over the concatenated atoms."""
    species_index, feats = featurize(structures, setups, types, [derivs] * len(structures))
    G = [None] * species_index.size
    rows = {}
    for f in feats.values():
        for a, g in zip(f.atom_index.tolist(), f.G):
            G[a] = g
        for c, n, d in zip(f.deriv_center.tolist(), f.deriv_neighbor.tolist(), f.dG):
            rows[(c, n)] = d
    return G, rows


@pytest.mark.parametrize("run", sorted(RUNS))
def test_equals_aenet_generate_x(run):
    ref = np.load(DATA / f"reference_{run}.npz")
    types, setups = setups_of(run)
    structures = [read_xsf(DATA / str(name)) for name in ref["file_names"]]
    G, rows = features(structures, setups, types)
    for a, g in enumerate(G):
        assert len(g) == ref["num_features"][a]
        np.testing.assert_allclose(g, ref["G"][a, : len(g)], rtol=0, atol=1e-10)
    offset = np.r_[0, np.cumsum(ref["natoms"])]
    ref_rows = {(offset[s] + c, offset[s] + n): d for s, c, n, d in zip(ref["dG_struct"], ref["dG_center"], ref["dG_neighbor"], ref["dG"])}
    assert set(rows) == set(ref_rows)
    for key, d in rows.items():
        np.testing.assert_allclose(d, ref_rows[key][: d.shape[0]], rtol=0, atol=1e-10)


def brute_force_G(structure, setup):
    """Direct evaluation of Behler's formulas with explicit loops over images and triplets, in file order."""
    rc_max = setup.basis.max_cutoff
    if structure.pbc:
        heights = 1.0 / np.linalg.norm(np.linalg.inv(structure.cell), axis=0)
        reps = [int(np.ceil(rc_max / h)) + 1 for h in heights]
        shifts = np.array(list(itertools.product(*[range(-r, r + 1) for r in reps])), dtype=float) @ structure.cell
    else:
        shifts = np.zeros((1, 3))
    fc = lambda r, c: 0.5 * (np.cos(np.pi * r / c) + 1) * (r < c)  # noqa: E731
    out = np.zeros((structure.num_atoms, setup.num_features))
    for i in range(structure.num_atoms):
        nb = [(v, structure.species[j]) for j in range(structure.num_atoms) for v in structure.pos[j] + shifts - structure.pos[i]
              if 1e-12 < np.linalg.norm(v) < rc_max]
        for n, f in enumerate(setup.basis.functions):
            total = 0.0
            if not f.angular:
                for v, s in nb:
                    r = np.linalg.norm(v)
                    if s == f.type2:
                        total += fc(r, f.cutoff) * np.exp(-f.eta * (r - f.rs) ** 2) * np.cos(f.kappa * r)
            else:
                for (vj, sj), (vk, sk) in itertools.permutations(nb, 2):  # ordered pairs j != k: the factor 2
                    if sorted((sj, sk)) != sorted((f.type2, f.type3)):
                        continue
                    rj, rk, rjk = np.linalg.norm(vj), np.linalg.norm(vk), np.linalg.norm(vk - vj)
                    radial = [np.exp(-f.eta * x * x) * fc(x, f.cutoff) for x in (rj, rk, rjk)]
                    if f.kind == 5:
                        radial[2] = 1.0
                    total += (0.5 * (1 + f.lam * vj @ vk / (rj * rk))) ** f.zeta * np.prod(radial)
            out[i, n] = total
    return out


def test_equals_brute_force_formulas_three_species():
    types, setups = setups_of("three_species")
    structure = read_xsf(DATA / "xsf" / "tion_bulk.xsf")
    G, _ = features([structure], setups, types, derivs=False)
    for element, setup in setups.items():
        want = brute_force_G(structure, setup)[:, aenet_order(setup)]
        for a, s in enumerate(structure.species):
            if s == element:
                np.testing.assert_allclose(G[a], want[a], rtol=0, atol=1e-11)


def dense_dG(G, rows, num_atoms):
    width = max(len(g) for g in G)
    out = np.zeros((num_atoms, width, num_atoms, 3))
    for (c, n), d in rows.items():
        out[c, : d.shape[0], n] = d
    return out


@pytest.mark.parametrize("name", ["tio2_small_triclinic", "tio2_molecule"])
def test_derivatives_equal_central_differences(name):
    types, setups = setups_of("two_species")
    structure = read_xsf(DATA / "xsf" / f"{name}.xsf")
    G, rows = features([structure], setups, types)
    dG = dense_dG(G, rows, structure.num_atoms)
    h = 1e-5
    for a in range(structure.num_atoms):
        for x in range(3):
            plus, minus = structure.pos.copy(), structure.pos.copy()
            plus[a, x] += h
            minus[a, x] -= h
            Gp, _ = features([moved(structure, plus)], setups, types, derivs=False)
            Gm, _ = features([moved(structure, minus)], setups, types, derivs=False)
            for i in range(structure.num_atoms):
                fd = (Gp[i] - Gm[i]) / (2 * h)
                np.testing.assert_allclose(dG[i, : len(fd), a, x], fd, rtol=0, atol=2e-8 * max(1.0, np.abs(fd).max()))


def test_rotation_translation_permutation_invariance():
    types, setups = setups_of("two_species")
    structure = read_xsf(DATA / "xsf" / "tio2_bulk.xsf")
    G, _ = features([structure], setups, types, derivs=False)
    rot = torch.linalg.matrix_exp(torch.tensor([[0, -0.3, 0.5], [0.3, 0, -0.2], [-0.5, 0.2, 0]], dtype=torch.float64)).numpy()
    turned = Structure(structure.species, structure.pos @ rot.T + [0.7, -1.1, 2.3], structure.cell @ rot.T, True,
                       structure.energy, structure.forces, "turned")
    Gt, _ = features([turned], setups, types, derivs=False)
    perm = np.random.default_rng(1).permutation(structure.num_atoms)
    shuffled = Structure(tuple(structure.species[p] for p in perm), structure.pos[perm], structure.cell, True,
                         structure.energy, structure.forces, "shuffled")
    Gp, _ = features([shuffled], setups, types, derivs=False)
    for a in range(structure.num_atoms):
        np.testing.assert_allclose(Gt[a], G[a], rtol=0, atol=1e-11)
    for new, old in enumerate(perm):
        np.testing.assert_allclose(Gp[new], G[old], rtol=0, atol=1e-11)


def test_batch_composition_does_not_change_bits(monkeypatch):
    """A structure featurized alone or after another in one sub-batch gives bitwise equal numbers,
    also with triplet slices small enough that a fixed-size cut would fall inside its centers."""
    import aenet_dist.symmetry_functions as sf

    monkeypatch.setattr(sf, "TRIPLET_SLICE", 100)
    types, setups = setups_of("two_species")
    structure = read_xsf(DATA / "xsf" / "tio2_small_triclinic.xsf")
    other = read_xsf(DATA / "xsf" / "tio2_molecule.xsf")
    _, alone = featurize([structure], setups, types, [True])
    _, together = featurize([other, structure], setups, types, [True, True])
    n = other.num_atoms
    for element in types:
        a, t = alone[element], together[element]
        assert np.array_equal(t.G[t.atom_index >= n], a.G)
        rows = t.deriv_center >= n
        assert np.array_equal(t.deriv_neighbor[rows] - n, a.deriv_neighbor) and np.array_equal(t.dG[rows], a.dG)


def test_aenet_feature_order_groups_by_environment():
    _, setups = setups_of("two_species")
    setup = setups["Ti"]  # ENV O, Ti; file: G2(O) G2(Ti) G1(O) G4(O,O) G4(O,O) G5(O,Ti) G3(Ti) G5(Ti,Ti) G4(Ti,O)
    # O: G1, G2 | (O,O): G4, G4 | (O,Ti): G4, G5 | Ti: G2, G3 | (Ti,Ti): G5
    assert aenet_order(setup) == [2, 0, 3, 4, 8, 5, 1, 6, 7]


def test_setup_round_trips_through_write_setup(tmp_path):
    _, setups = setups_of("two_species")
    write_setup(tmp_path / "O.stp", setups["O"])
    again = read_setup(tmp_path / "O.stp")
    assert again.basis == setups["O"].basis and again.env_species == setups["O"].env_species


STP_HEAD = "ATOM O\nENV 2\nO\nTi\nRMIN 0.5\nSYMMFUNC type=Behler2011\n"


@pytest.mark.parametrize("body, message", [
    ("1\nG=4 type2=O type3=O Rc=5.0 lambda=1 zeta=2.0 eta=0.1\n", "aenet would read eta"),
    ("1\nG=2 type2=O eta=0.1 Rc=5.0 kappa=2\n", "unknown: kappa"),
    ("1\nG=2 type2=N eta=0.1 Rc=5.0\n", "type2=N is not among the ENV species"),
    ("2\nG=2 type2=O eta=0.1 Rc=5.0\n", "announces 2 functions but 1 follow"),
    ("1\nG=6 type2=O Rc=5.0\n", "G=6 does not exist"),
    ("1\nG=4 type2=O type3=O eta=0.1 lambda=0.5 zeta=1 Rc=5\n", "lambda must be +1 or -1"),
    ("1\nG=5 type2=O type3=Ti eta=0.1 lambda=1 Rc=5\n", "missing zeta"),
])
def test_bad_behler_setup_is_refused_with_file_and_line(tmp_path, body, message):
    path = tmp_path / "O.stp"
    path.write_text(STP_HEAD + body)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        read_setup(path)
    assert str(path) in str(err.value)


def test_center_missing_from_env_is_refused(tmp_path):
    path = tmp_path / "O.stp"
    path.write_text("ATOM O\nENV 1\nTi\nRMIN 0.5\nSYMMFUNC type=Behler2011\n1\nG=1 type2=Ti Rc=5.0\n")
    with pytest.raises(ValueError, match="central species O must be listed in ENV"):
        read_setup(path)


# ----------------------------------------------------------------------------- potentials


@pytest.mark.parametrize("engine", ["pairs", "rows"])
def test_behler_potential_equals_aenet_predict_x(engine):
    """potential/*.nn were written by our exporter; reference_predict.npz is what aenet's predict_hp.x computed with them."""
    from aenet_dist.predict import Predictor

    ref = np.load(DATA / "reference_predict.npz")
    structures = [read_xsf(DATA / str(name)) for name in ref["file_names"]]
    results = Predictor.from_potentials(DATA / "potential").predict(structures, forces=True, engine=engine)
    for res, energy, n in zip(results, ref["energy_total"], ref["natoms"]):
        assert abs(res.energy - energy) / n < 1e-8
    np.testing.assert_allclose(np.concatenate([r.forces for r in results]), ref["forces"], rtol=0, atol=1e-8)


def test_behler_nn_files_round_trip_byte_identical(tmp_path):
    from aenet_dist.export import element_net_from_nn, nn_from_element_net, setup_from_nn, TrainSetInfo
    from aenet_dist.formats.nn import nn_to_bytes, read_nn, read_nn_ascii, write_nn_ascii

    for element in ("O", "Ti"):
        path = DATA / "potential" / f"{element}.nn"
        nn = read_nn(path)
        setup = setup_from_nn(nn, str(path))
        assert setup.basis_type == "behler2011" and setup.basis == read_setup(DATA / f"{element}.stp").basis
        again = nn_from_element_net(element_net_from_nn(nn), setup, TrainSetInfo.from_nn(nn))
        assert nn_to_bytes(again) == path.read_bytes()
        write_nn_ascii(tmp_path / f"{element}.ascii", nn)
        assert nn_to_bytes(read_nn_ascii(tmp_path / f"{element}.ascii")) == path.read_bytes()


def test_behler_forces_and_stress_are_derivatives_of_the_energy():
    from aenet_dist.predict import Predictor

    predictor = Predictor.from_potentials(DATA / "potential")
    s = read_xsf(DATA / "xsf" / "tio2_small_triclinic.xsf")
    (res,) = predictor.predict([s], forces=True, stress=True)
    for atom in range(s.num_atoms):
        for d in range(3):
            assert res.forces[atom, d] == pytest.approx(fd_force(predictor, s, atom, d), abs=1e-6)
    for a, b in ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)):
        assert res.stress[a, b] == pytest.approx(fd_stress(predictor, s, a, b), abs=1e-7)


def test_types_order_that_aenet_would_misread_is_reported():
    from aenet_dist.symmetry_functions import aenet_numbering_problems

    _, setups = setups_of("two_species")  # ENV O, Ti in both setups
    assert aenet_numbering_problems(setups, ("O", "Ti")) == []
    problems = aenet_numbering_problems(setups, ("Ti", "O"))
    assert len(problems) == 2 and "list ENV in TYPES order" in problems[0]


def test_behler_setups_featurize_train_export_predict(tmp_path):
    """generate.in with Behler2011 setups -> store -> 3 float64 epochs -> .nn files -> predictions equal the trained model."""
    from helpers import run_in_process, write_train_toml

    from aenet_dist.formats.generate_in import read_generate_input
    from aenet_dist.batching import gather_batch, shard_from_range
    from aenet_dist.config import BehlerBasis, BehlerFunction, DescriptorSetup, StoreOptions
    from aenet_dist.datasets import generate_emt_dataset
    from aenet_dist.export import export_run, load_run_model, resolve_checkpoint
    from aenet_dist.formats.nn import read_nn
    from aenet_dist.predict import Predictor
    from aenet_dist.store import StoreReader, featurize_to_store
    from aenet_dist.structures import read_structures
    from aenet_dist.train import main as train_main
    from aenet_dist.step import forward

    generate_in = generate_emt_dataset(tmp_path / "data", num_structures=16, seed=4, force_percent=50.0)
    config = read_generate_input(generate_in)
    types = config.species
    for n, element in enumerate(types):
        other = types[(n + 1) % len(types)]
        functions = (BehlerFunction(2, element, cutoff=4.8, eta=0.5, rs=2.5), BehlerFunction(2, other, cutoff=5.0, eta=0.3),
                     BehlerFunction(1, types[(n + 2) % len(types)], cutoff=4.5),
                     BehlerFunction(4, element, other, cutoff=4.6, eta=0.01, lam=-1.0, zeta=2.0),
                     BehlerFunction(5, other, other, cutoff=4.2, eta=0.02, lam=1.0, zeta=1.0))[: 3 + n % 3]
        setup = DescriptorSetup(element, types, "behler2011", BehlerBasis(functions), rmin=1.0)
        write_setup(config.setups[element].source, setup)
    config = read_generate_input(generate_in)
    assert all(s.basis_type == "behler2011" for s in config.setups.values())
    store = tmp_path / "store.zarr"
    featurize_to_store(config, store, StoreOptions(chunk_bytes=2**16), progress=False)
    toml = write_train_toml(tmp_path / "train.toml", store, tmp_path / "run", epochs=3)
    result = run_in_process(train_main, [toml])
    assert result.returncode == 0, result.stdout + result.stderr
    export_run(tmp_path / "run", tmp_path / "pot")
    assert read_nn(tmp_path / "pot" / f"{types[0]}.nn").sftype.strip() == "Behler2011"

    model, _, _ = load_run_model(resolve_checkpoint(tmp_path / "run", "best"))
    reader = StoreReader(store)
    batch = gather_batch(shard_from_range(reader.read_range(0, reader.num_structures), torch.float64), torch.arange(reader.num_structures))
    with torch.enable_grad():
        energy = forward(model, batch, with_forces=False, for_training=False).energy
    structures = [s for f in config.files for s in read_structures(f)]
    for engine in ("pairs", "rows"):
        results = Predictor.from_potentials(tmp_path / "pot").predict(structures, forces=True, engine=engine)
        np.testing.assert_allclose([r.cohesive_energy for r in results], energy.detach().numpy(), rtol=0, atol=1e-10)
