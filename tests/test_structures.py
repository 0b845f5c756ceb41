"""Tests of aenet_dist.structures: XSF parser against ASE, XSF round trips, extxyz via ASE, errors."""

from __future__ import annotations

import re
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator

from aenet_dist.structures import Structure, from_ase, read_structures, read_xsf, to_ase, write_xsf

SHARED = Path(__file__).resolve().parents[2] / "shared"
XSF_DIR = SHARED / "data" / "tio2" / "xsf"

PERIODIC = """# total energy = -19960.66173260 eV

CRYSTAL
PRIMVEC
        5.93400000     0.00000000     0.00000000
        0.00000000     9.29699974     0.00000000
        0.00000000     0.00000000     4.64899994
PRIMCOORD
3 1
Ti      4.42027297     7.02709599     2.24183899     0.07592985    -0.40427630     0.69417754
O       4.35577500     5.60886900     0.86034600     0.58757519    -0.05353964     0.16937123
O       1.46810602     5.53179502     0.85134899    -0.04318915     0.63411964     0.51066781
"""
# line numbers in PERIODIC: 1 energy, 5-7 PRIMVEC rows, 9 atom count, 10-12 atoms

ISOLATED = """# total energy = -2469.5 eV
ATOMS
Ti   0.0  0.0  0.0   0.1  0.2  0.3
O    1.6  0.0  0.0  -0.1 -0.2 -0.3
8    0.0  1.6  0.0   0.0  0.0  0.05
"""


def _where(path: Path, line: int | None = None) -> str:
    return re.escape(f"{path}:{line}:" if line is not None else f"{path}:")


def _shared_xsf(names=("structure0001.xsf", "structure0580.xsf", "structure7481.xsf")) -> list[Path]:
    paths = [XSF_DIR / n for n in names]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"shared TiO2 XSF files not found under {XSF_DIR} (sibling 'shared' of the project root)")
    return paths


def _energy_from_comment(path: Path) -> float:
    first = path.read_text().splitlines()[0]
    match = re.fullmatch(r"#\s*total energy\s*=\s*(\S+)\s*eV\s*", first)
    assert match, first
    return float(match.group(1))


def _write(tmp_path: Path, text: str, name: str = "s.xsf") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _assert_same(a: Structure, b: Structure, atol: float = 1e-9):
    assert a.species == b.species
    assert a.pbc == b.pbc
    np.testing.assert_allclose(a.pos, b.pos, atol=atol, rtol=0)
    np.testing.assert_allclose(a.cell, b.cell, atol=atol, rtol=0)
    assert a.energy == pytest.approx(b.energy, abs=atol)
    if a.forces is None:
        assert b.forces is None
    else:
        np.testing.assert_allclose(a.forces, b.forces, atol=atol, rtol=0)


# --------------------------------------------------------------------------- real data vs ASE


def test_real_xsf_matches_ase():
    for path in _shared_xsf():
        s = read_xsf(path)
        atoms = ase.io.read(path, format="xsf")
        assert s.name == str(path)
        assert s.pbc and atoms.pbc.all()
        assert s.species == tuple(atoms.get_chemical_symbols())
        assert s.pos.dtype == np.float64 and s.pos.shape == (s.num_atoms, 3)
        np.testing.assert_allclose(s.pos, atoms.positions, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s.cell, atoms.cell[:], rtol=0, atol=1e-12)
        # ASE takes XSF forces as Hartree/Å and converts to eV/Å; aenet writes eV/Å
        np.testing.assert_allclose(s.forces, atoms.get_forces() / units.Hartree, rtol=1e-12, atol=1e-12)
        assert s.energy == _energy_from_comment(path)


def test_real_xsf_through_read_structures():
    (path,) = _shared_xsf(("structure0001.xsf",))
    (s,) = read_structures(path)
    assert s.num_atoms == 24 and s.energy == pytest.approx(-19960.66173260)
    np.testing.assert_allclose(s.cell, np.diag([5.934, 9.29699974, 4.64899994]))


# --------------------------------------------------------------------------- hand-made XSF


def test_periodic_xsf(tmp_path):
    path = _write(tmp_path, PERIODIC)
    s = read_xsf(path)
    assert s.species == ("Ti", "O", "O") and s.pbc
    assert s.energy == -19960.66173260
    np.testing.assert_allclose(s.forces[0], [0.07592985, -0.40427630, 0.69417754])


def test_isolated_xsf(tmp_path):
    path = _write(tmp_path, ISOLATED)
    s = read_xsf(path)
    assert s.species == ("Ti", "O", "O")  # atomic number 8 -> O
    assert s.pbc is False
    np.testing.assert_array_equal(s.cell, np.zeros((3, 3)))
    assert s.energy == -2469.5
    np.testing.assert_allclose(s.pos[1], [1.6, 0.0, 0.0])
    np.testing.assert_allclose(s.forces[2], [0.0, 0.0, 0.05])
    atoms = ase.io.read(path, format="xsf")
    assert not atoms.pbc.any()
    assert s.species == tuple(atoms.get_chemical_symbols())
    np.testing.assert_allclose(s.pos, atoms.positions, atol=1e-12)
    np.testing.assert_allclose(s.forces, atoms.get_forces() / units.Hartree, atol=1e-12)


def test_xsf_fortran_exponents(tmp_path):
    text = "# total energy = -1.5D+01 eV\nATOMS\nH 0 0 0 0 0 0.5d-1\nH 7.4d-1 0 0 0 0 -5.0E-2\n"
    s = read_xsf(_write(tmp_path, text))
    assert s.energy == -15.0
    np.testing.assert_allclose(s.pos[1], [0.74, 0, 0])
    np.testing.assert_allclose(s.forces[:, 2], [0.05, -0.05])


def test_xsf_without_forces(tmp_path):
    text = "# total energy = -1.0 eV\nATOMS\nH 0 0 0\nH 0.74 0 0\n"
    s = read_xsf(_write(tmp_path, text))
    assert s.forces is None and s.num_atoms == 2


@pytest.mark.parametrize("text", [PERIODIC, ISOLATED])
def test_xsf_round_trip(tmp_path, text):
    s = read_xsf(_write(tmp_path, text, "in.xsf"))
    write_xsf(tmp_path / "out.xsf", s)
    _assert_same(s, read_xsf(tmp_path / "out.xsf"))


def test_xsf_round_trip_without_forces(tmp_path):
    s = read_xsf(_write(tmp_path, PERIODIC))
    s = Structure(s.species, s.pos, s.cell, s.pbc, s.energy, None, "noforces")
    write_xsf(tmp_path / "out.xsf", s)
    again = read_xsf(tmp_path / "out.xsf")
    assert again.forces is None
    _assert_same(s, again)


def test_write_xsf_needs_energy(tmp_path):
    s = read_xsf(_write(tmp_path, ISOLATED))
    s = Structure(s.species, s.pos, s.cell, s.pbc, None, s.forces, "noenergy")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "out.xsf")) + ".*noenergy.*no energy"):
        write_xsf(tmp_path / "out.xsf", s)


def test_ase_round_trip(tmp_path):
    s = read_xsf(_write(tmp_path, PERIODIC))
    _assert_same(s, from_ase(to_ase(s), "x"), atol=0)


# --------------------------------------------------------------------------- extended XYZ through ASE


def test_extxyz_read_structures(tmp_path):
    rng = np.random.default_rng(0)
    frames = []
    crystal = Atoms("TiO2", positions=rng.uniform(0, 4, (3, 3)), cell=np.diag([4.0, 4.5, 5.0]), pbc=True)
    crystal.calc = SinglePointCalculator(crystal, energy=-12.5, forces=rng.normal(size=(3, 3)))
    frames.append(crystal)
    cluster = Atoms("O2", positions=[[0, 0, 0], [1.2, 0, 0]], pbc=False)
    cluster.calc = SinglePointCalculator(cluster, energy=-3.25, forces=[[0.5, 0, 0], [-0.5, 0, 0]])
    frames.append(cluster)
    path = tmp_path / "frames.xyz"
    ase.io.write(path, frames, format="extxyz")

    structures = read_structures(path)
    assert [s.name for s in structures] == [f"{path}@0", f"{path}@1"]
    for s, atoms in zip(structures, frames):
        assert s.species == tuple(atoms.get_chemical_symbols())
        assert s.pbc == bool(atoms.pbc.all())
        assert s.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
        np.testing.assert_allclose(s.pos, atoms.positions, atol=1e-8)
        np.testing.assert_allclose(s.forces, atoms.get_forces(), atol=1e-8)
    np.testing.assert_allclose(structures[0].cell, crystal.cell[:], atol=1e-8)
    np.testing.assert_array_equal(structures[1].cell, np.zeros((3, 3)))


def test_extxyz_without_energy(tmp_path):
    path = tmp_path / "noenergy.xyz"
    ase.io.write(path, Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]]), format="extxyz")
    with pytest.raises(ValueError, match=re.escape(f"{path}@0") + ": no energy"):
        read_structures(path)


def test_from_ase_partial_pbc():
    atoms = Atoms("H", positions=[[0, 0, 0]], cell=np.eye(3) * 5, pbc=[True, True, False])
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0)
    with pytest.raises(ValueError, match="slab: partial periodicity"):
        from_ase(atoms, "slab")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "old, new, line, match",
    [
        ("4.42027297", "4.42O27297", 10, "cannot read coordinates/forces"),
        ("-19960.66173260", "-19960.6617x", 1, "cannot read the total energy"),
        ("9.29699974", "9.2969997.4", 6, "cannot read a lattice vector"),
        ("0.00000000     0.00000000     4.64899994", "0.0 4.64899994", 7, "lattice vector needs 3 numbers"),
        ("3 1\n", "4 1\n", 9, "PRIMCOORD announces 4 atoms but 3 atom lines follow"),
        ("3 1\n", "x 1\n", 9, "expected the atom count after PRIMCOORD"),
        ("3 1\n", "2 1\n", 12, "unexpected line"),  # one atom line more than announced
        ("     0.69417754\n", "\n", 10, "atom line needs .* got 6 fields"),
        ("    -0.05353964     0.16937123\n", "\n", 11, "got 5 fields"),
        ("CRYSTAL\n", "CRYSTAL\nBOGUS\n", 4, "unexpected line 'BOGUS'"),
    ],
)
def test_xsf_errors_with_line(tmp_path, old, new, line, match):
    assert old in PERIODIC
    path = _write(tmp_path, PERIODIC.replace(old, new, 1))
    with pytest.raises(ValueError, match=_where(path, line) + ".*" + match):
        read_xsf(path)


def test_xsf_atom_line_width_changes(tmp_path):
    path = _write(tmp_path, ISOLATED.replace("O    1.6  0.0  0.0  -0.1 -0.2 -0.3", "O    1.6  0.0  0.0"))
    with pytest.raises(ValueError, match=_where(path, 4) + ".*4 fields, earlier lines had 7"):
        read_xsf(path)


def test_xsf_bad_atomic_number(tmp_path):
    path = _write(tmp_path, ISOLATED.replace("8    0.0", "999  0.0"))
    with pytest.raises(ValueError, match=_where(path, 5) + " atomic number 999 out of range"):
        read_xsf(path)


@pytest.mark.parametrize(
    "text, match",
    [
        (PERIODIC.replace("# total energy = -19960.66173260 eV\n", ""), "missing energy line"),
        ("# total energy = -1.0 eV\nCRYSTAL\nPRIMVEC\n1 0 0\n0 1 0\n0 0 1\n", "no atoms"),
        ("", "no atoms"),
        ("# total energy = -1.0 eV\nCRYSTAL\nPRIMCOORD\n1 1\nH 0 0 0\n", "CRYSTAL without PRIMVEC"),
        (PERIODIC.replace("9.29699974", "0.0"), "linearly dependent"),
        (PERIODIC.replace("PRIMCOORD\n3 1\n", "PRIMCOORD\n"), "expected the atom count"),
        ("# total energy = -1.0 eV\nCRYSTAL\nPRIMVEC\n1 0 0\n", "PRIMVEC needs 3 lattice vectors"),
        ("# total energy = -1.0 eV\nCRYSTAL\nPRIMVEC\n1 0 0\n0 1 0\n0 0 1\nPRIMCOORD\n", "PRIMCOORD without an atom count"),
    ],
)
def test_xsf_errors_name_file(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=_where(path) + ".*" + match):
        read_xsf(path)


def test_xsf_primcoord_truncated(tmp_path):
    text = PERIODIC.rsplit("O       1.46810602", 1)[0]  # drop the last atom line
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=_where(path, 9) + " PRIMCOORD announces 3 atoms but 2"):
        read_xsf(path)


def test_unreadable_files(tmp_path):
    missing = tmp_path / "missing.xsf"
    with pytest.raises(ValueError, match=_where(missing) + " cannot read file"):
        read_xsf(missing)
    with pytest.raises(ValueError, match=_where(missing) + " cannot read file"):
        read_structures(missing)
    missing_xyz = tmp_path / "missing.xyz"
    with pytest.raises(ValueError, match=_where(missing_xyz) + " ASE cannot read"):
        read_structures(missing_xyz)
    binary = tmp_path / "binary.xsf"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match=_where(binary) + " cannot read file"):
        read_xsf(binary)
