"""ASE calculator: same numbers as the Predictor, forces and stress are derivatives of its energy,
and NVE molecular dynamics (VelocityVerlet, 1 fs) conserves the total energy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.md.verlet import VelocityVerlet

from aenet_dist.ase import AenetCalculator
from aenet_dist.export import export_run
from aenet_dist.predict import Predictor, structure_from_atoms
from test_export_cli import shared_emt_run  # the shared EMT training run (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def potentials(tmp_path_factory) -> Path:
    """aenet .nn files of a short EMT (Cu/Au/Ni) training run."""
    out = tmp_path_factory.mktemp("ase_pot")
    export_run(shared_emt_run(tmp_path_factory)["run_dir"], out)
    return out


def alloy(seed: int = 0):
    """A rattled periodic 32-atom fcc Cu cell with 8 Au and 4 Ni."""
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(seed)
    symbols = np.array(atoms.get_chemical_symbols())
    which = rng.permutation(len(atoms))
    symbols[which[:8]], symbols[which[8:12]] = "Au", "Ni"
    atoms.set_chemical_symbols(symbols.tolist())
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_calculator_equals_predictor(potentials):
    atoms = alloy()
    atoms.calc = AenetCalculator(potentials)
    (ref,) = Predictor.from_potentials(potentials).predict([structure_from_atoms(atoms, "x")], forces=True, stress=True)
    assert atoms.get_potential_energy() == ref.energy
    assert atoms.get_potential_energy(force_consistent=True) == ref.energy  # free_energy
    np.testing.assert_array_equal(atoms.get_forces(), ref.forces)
    np.testing.assert_array_equal(atoms.get_potential_energies(), ref.atomic_energies)
    assert atoms.get_stress(voigt=False) == pytest.approx(ref.stress, abs=1e-15)
    cluster = alloy()[:6]
    cluster.pbc = False
    cluster.calc = AenetCalculator({el: potentials / f"{el}.nn" for el in ("Cu", "Au", "Ni")})
    assert np.isfinite(cluster.get_forces()).all()
    with pytest.raises(PropertyNotImplementedError):
        cluster.get_stress()


def test_forces_and_stress_are_derivatives_of_the_energy(potentials):
    atoms = alloy(1)
    atoms.calc = AenetCalculator(potentials)
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    assert np.abs(forces).max() > 1e-2 and np.abs(stress).max() > 1e-4  # not trivially zero
    h = 1e-5
    for atom in (0, 5, 17):
        for d in range(3):
            e = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.calc = atoms.calc
                moved.positions[atom, d] += sign * h
                e.append(moved.get_potential_energy())
            assert forces[atom, d] == pytest.approx(-(e[0] - e[1]) / (2 * h), abs=1e-6)
    volume = atoms.get_volume()
    for a, b in ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)):
        e = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] += sign * h / 2
            eps[b, a] += sign * h / 2
            strained = atoms.copy()
            strained.calc = atoms.calc
            strained.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
            e.append(strained.get_potential_energy())
        assert stress[a, b] == pytest.approx((e[0] - e[1]) / (2 * h) / volume, abs=1e-7)  # eV/Å³


def test_nve_md_conserves_energy(potentials):
    """VelocityVerlet, 1 fs, 200 steps from 300 K: |E_tot(t) − E_tot(0)| < 1 meV/atom throughout
    (measured: 0.001 meV/atom; the kinetic energy is ~39 meV/atom)."""
    atoms = alloy(2)
    atoms.calc = AenetCalculator(potentials)
    # Maxwell-Boltzmann momenta at 300 K, centre-of-mass motion removed
    masses = atoms.get_masses()[:, None]
    momenta = np.random.default_rng(0).normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * 300.0)
    atoms.set_momenta(momenta - masses * momenta.sum(0) / masses.sum())
    start = atoms.positions.copy()
    totals = []
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.attach(lambda: totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy()), interval=1)
    dyn.run(200)
    totals = np.array(totals)
    drift = np.abs(totals - totals[0]).max() / len(atoms)
    assert len(totals) == 201
    assert drift < 1e-3, f"total energy drifted by {1000 * drift:.3f} meV/atom"
    assert abs(totals[-1] - totals[0]) / len(atoms) < 1e-3
    assert np.abs(atoms.positions - start).max() > 0.05  # the atoms moved (Å)


def test_removed_device_option_is_refused_not_ignored(potentials):
    """ASE keeps unknown keywords as parameters; a leftover device= (the torch era) must fail loudly."""
    with pytest.raises(ValueError, match="no device option"):
        AenetCalculator(potentials, device="cuda")
    with pytest.raises(ValueError, match="float64 or float32"):
        AenetCalculator(potentials, dtype="cpu")


def test_a_structure_gives_the_same_bits_alone_or_in_any_batch(potentials):
    """Forces, atomic energies and stress of a structure do not depend on what shares its batch,
    including elements with a single atom in it (BLAS kernels round a one-row product differently
    on some CPUs, e.g. OpenBLAS's AVX-512 ones)."""
    lone = alloy(1)
    symbols = np.array(lone.get_chemical_symbols())
    symbols[symbols == "Ni"] = "Cu"
    symbols[0] = "Ni"  # one Ni atom
    lone.set_chemical_symbols(symbols.tolist())
    structures = [structure_from_atoms(a, f"s{k}") for k, a in enumerate([alloy(0), lone, alloy(2)[:7], alloy(3)])]
    predictor = Predictor.from_potentials(potentials)
    together = predictor.predict(structures, forces=True, stress=True)
    for batch_structures, threads in [(1, 1), (2, 1), (3, 1), (1, 2)]:
        apart = predictor.predict(structures, forces=True, stress=True, batch_structures=batch_structures, threads=threads)
        for a, b in zip(together, apart):
            assert a.energy == b.energy, (a.name, batch_structures)
            assert np.array_equal(a.atomic_energies, b.atomic_energies) and np.array_equal(a.forces, b.forces), (a.name, batch_structures)
            assert np.array_equal(a.stress, b.stress), (a.name, batch_structures)
