"""Tests for aenet_dist.datasets: EMT data sets round-trip, match EMT, and are deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aenet_dist.datasets import generate_emt_dataset, generate_synth_dataset, isolated_atom_energies
from aenet_dist.structures import read_xsf, to_ase


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_generate_input(path: Path):
    """(species, atomic energies, files) via formats.generate_in if present, else by text."""
    try:
        from aenet_dist.formats.generate_in import read_generate_input
    except ImportError:
        read_generate_input = None
    if read_generate_input is not None:
        config = read_generate_input(path)
        assert config.forces and config.force_percent == 25.0
        for element, setup in config.setups.items():
            assert setup.env_species == config.species
            assert (setup.basis.radial_cutoff, setup.basis.radial_order) == (6.0, 10)
            assert (setup.basis.angular_cutoff, setup.basis.angular_order) == (4.0, 4)
            assert setup.rmin == 0.75
        return config.species, config.atomic_energies, [Path(f) for f in config.files]
    lines = [line.split("!")[0].strip() for line in path.read_text().splitlines()]
    upper = [line.upper() for line in lines]
    i = upper.index("TYPES")
    num_types = int(lines[i + 1])
    types = [lines[i + 2 + k].split() for k in range(num_types)]
    assert "FORCES" in upper and "FORCESPERCENT 25" in upper
    j = upper.index("FILES")
    files = [path.parent / f for f in lines[j + 2 : j + 2 + int(lines[j + 1])]]
    for element, _ in types:
        assert (path.parent / f"{element}.fingerprint.stp").is_file()
    return tuple(t[0] for t in types), {t[0]: float(t[1]) for t in types}, files


@pytest.fixture(scope="module")
def emt_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emt")
    generate_emt_dataset(out, num_structures=20, seed=3, force_percent=25)
    return out


def test_emt_dataset_matches_emt(emt_dir):
    from ase.calculators.emt import EMT

    species, energies, files = _read_generate_input(emt_dir / "generate.in")
    assert species == ("Cu", "Au", "Ni")
    assert energies == pytest.approx(isolated_atom_energies(species), abs=1e-9)
    assert len(files) == 20 and all(f.is_file() for f in files)
    assert sorted(p.name for p in (emt_dir / "xsf").iterdir()) == sorted(f.name for f in files)

    present, pbcs = set(), set()
    for f in files:
        s = read_xsf(f)
        assert 4 <= s.num_atoms <= 32
        assert s.forces is not None
        present.update(s.species)
        pbcs.add(s.pbc)
        atoms = to_ase(s)
        atoms.calc = EMT()
        assert s.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(s.forces, atoms.get_forces(), atol=1e-6)
    assert len(present) >= 2
    assert pbcs == {True, False}
    assert read_xsf(files[6]).pbc is False  # index 6 of every 10 is a cluster
    assert (files[6].read_text().splitlines()[2]) == "ATOMS"


def test_emt_dataset_deterministic(emt_dir, tmp_path):
    generate_emt_dataset(tmp_path, num_structures=20, seed=3, force_percent=25)
    assert _tree(tmp_path) == _tree(emt_dir)
    other = tmp_path / "other_seed"
    generate_emt_dataset(other, num_structures=20, seed=4, force_percent=25)
    assert (other / "xsf" / "structure0001.xsf").read_bytes() != (emt_dir / "xsf" / "structure0001.xsf").read_bytes()


def test_synth_independent_of_workers(tmp_path):
    one = generate_synth_dataset(tmp_path / "w1", num_structures=4, seed=1, workers=1)
    two = generate_synth_dataset(tmp_path / "w2", num_structures=4, seed=1, workers=2)
    assert _tree(one.parent) == _tree(two.parent)
    sizes = [read_xsf(p).num_atoms for p in sorted((one.parent / "xsf").glob("*.xsf"))]
    assert len(sizes) == 4 and all(32 <= n <= 128 for n in sizes)
    assert "FORCESPERCENT 20" in one.read_text()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        generate_emt_dataset(tmp_path, num_structures=2, elements=("Cu", "Fe"))
    with pytest.raises(ValueError, match="force_percent"):
        generate_emt_dataset(tmp_path, num_structures=2, force_percent=150)
