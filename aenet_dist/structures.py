"""Atomic structures in: aenet XSF files (strict hand parser) and any ASE-readable format.

A :class:`Structure` holds one configuration with its DFT total energy and forces.
Units: positions and cell in Å, energy in eV, forces in eV/Å.

The XSF parser is ours rather than ASE's because aenet puts the total energy in a
comment line (``# total energy = E eV``) that ASE does not read, and because we want
errors that name the file and line. ``tests/test_structures.py`` checks it against ASE.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import atomic_write

_ENERGY_RE = re.compile(r"#\s*total\s+energy\s*=\s*(\S+)", re.IGNORECASE)


@dataclass(frozen=True)
class Structure:
    """One atomic configuration.

    Attributes:
        species: (A,) chemical symbols.
        pos: (A, 3) float64 Cartesian positions, Å.
        cell: (3, 3) float64 lattice vectors as rows, Å; all zeros if not periodic.
        pbc: True for a periodic crystal (XSF ``CRYSTAL``), False for an isolated cluster.
        energy: DFT total energy, eV (None if the source has none).
        forces: (A, 3) float64 DFT forces, eV/Å (None if the source has none).
        name: where it came from (file path, or ``path@index`` for multi-frame files).
    """

    species: tuple[str, ...]
    pos: np.ndarray
    cell: np.ndarray
    pbc: bool
    energy: float | None
    forces: np.ndarray | None
    name: str

    @property
    def num_atoms(self) -> int:
        return len(self.species)


# Largest |coordinate|, |lattice component| (Å) and |force| (eV/Å) accepted. Beyond it the input
# is broken (1e300 once reached the neighbour search and ended the process with SIGFPE).
MAX_LENGTH = 1e6


def _parse_floats(tokens: list[str], path: Path, line_no: int, what: str, limit: float = MAX_LENGTH) -> list[float]:
    """Numbers of one line (Fortran 'd' exponents too), each finite and within ``limit``."""
    try:
        values = [float(t.lower().replace("d", "e")) for t in tokens]
    except ValueError:
        raise ValueError(f"{path}:{line_no}: cannot read {what} from {' '.join(tokens)!r}") from None
    for token, value in zip(tokens, values):
        if not math.isfinite(value):
            raise ValueError(f"{path}:{line_no}: {what} has a value that is not finite ({token})")
        if abs(value) > limit:
            raise ValueError(f"{path}:{line_no}: {what} has a value out of range ({token}; |x| must be <= {limit:g})")
    return values


def read_xsf(path: str | os.PathLike, species: tuple[str, ...] | None = None) -> Structure:
    """Read one aenet XSF file (periodic ``CRYSTAL``/``PRIMVEC``/``PRIMCOORD`` or isolated ``ATOMS``).

    The total energy comes from the ``# total energy = E eV`` comment, forces from
    columns 5-7 of the coordinate lines. ``species`` (generate.in's TYPES), if given, refuses
    any other element, naming its line: found while reading, not when featurizing.

    Raises:
        ValueError: naming the file and line for any malformed or missing content.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read file: {err}") from None
    parts = _read_xsf_blocks(path, text.splitlines())
    if species is not None and not set(parts.species) <= set(species):
        k = next(k for k, symbol in enumerate(parts.species) if symbol not in species)
        raise ValueError(f"{path}:{parts.atom_lines[k]}: species {parts.species[k]!r} not in TYPES {list(species)}")
    species, cell, pbc, energy = parts.species, parts.cell, parts.pbc, parts.energy
    if not species:
        raise ValueError(f"{path}: no atoms (expected a PRIMCOORD or ATOMS section)")
    if pbc is None:
        pbc = cell is not None
    if pbc and cell is None:
        raise ValueError(f"{path}: CRYSTAL without PRIMVEC lattice vectors")
    if energy is None:
        raise ValueError(f"{path}: missing energy line '# total energy = <E> eV'")
    data = np.array(parts.coords, dtype=np.float64)
    if pbc and abs(np.linalg.det(cell)) < 1e-10:
        raise ValueError(f"{path}: PRIMVEC lattice vectors are linearly dependent (cell volume 0)")
    forces = data[:, 3:6] if data.shape[1] == 6 else None
    return Structure(
        species=tuple(species),
        pos=np.ascontiguousarray(data[:, :3]),
        cell=cell if pbc else np.zeros((3, 3)),
        pbc=bool(pbc),
        energy=energy,
        forces=None if forces is None else np.ascontiguousarray(forces),
        name=str(path),
    )


@dataclass
class _XsfBlocks:
    """What the blocks of an XSF file say; ``None`` where the file does not say it."""

    energy: float | None = None  # eV, from the '# total energy' comment
    cell: np.ndarray | None = None  # (3, 3) PRIMVEC rows, Å
    pbc: bool | None = None  # CRYSTAL -> True; ATOMS alone -> False
    species: list[str] = field(default_factory=list)
    coords: list[list[float]] = field(default_factory=list)  # per atom: x y z [fx fy fz]
    atom_lines: list[int] = field(default_factory=list)  # per atom: its line number (from 1)


def _read_xsf_blocks(path: Path, lines: list[str]) -> _XsfBlocks:
    """The line pass: energy comments, CRYSTAL/PRIMVEC/CONVVEC headers and the atom sections."""
    out = _XsfBlocks()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped:
            i += 1
            continue
        if stripped.startswith("#"):
            energy = _energy_comment(path, i + 1, stripped)
            if energy is not None:  # the last energy comment wins
                out.energy = energy
            i += 1
            continue
        keyword = stripped.split()[0].upper()
        if keyword == "CRYSTAL":
            out.pbc = True
            i += 1
        elif keyword == "PRIMVEC":
            out.cell, i = _read_primvec(path, lines, i)
        elif keyword in ("CONVVEC",):
            i += 4  # conventional cell: not used by aenet
        elif keyword == "PRIMCOORD":
            i = _read_primcoord(path, lines, i, out)
        elif keyword == "ATOMS":
            out.pbc = False if out.pbc is None else out.pbc
            i = _read_atom_lines(lines, i + 1, None, path, out)
        else:
            raise ValueError(f"{path}:{i + 1}: unexpected line {stripped!r}")
    return out


def _next_content(lines: list[str], start: int) -> int:
    """Index of the first line from ``start`` on that is neither blank nor a comment (``len(lines)`` if none)."""
    while start < len(lines) and (not lines[start].strip() or lines[start].lstrip().startswith("#")):
        start += 1
    return start


def _energy_comment(path: Path, line_no: int, stripped: str) -> float | None:
    """The total energy (eV) of a ``# total energy = E eV`` comment; None for any other comment."""
    match = _ENERGY_RE.search(stripped)
    if not match:
        return None
    return _parse_floats([match.group(1)], path, line_no, "the total energy", limit=1e12)[0]


def _read_primvec(path: Path, lines: list[str], i: int) -> tuple[np.ndarray, int]:
    """Read ``PRIMVEC`` at line index ``i`` and its 3 lattice vectors; return the (3, 3) cell (Å) and the next index."""
    rows = []
    for _ in range(3):
        i = _next_content(lines, i + 1)
        if i >= len(lines):
            raise ValueError(f"{path}: PRIMVEC needs 3 lattice vectors, file ended")
        tokens = lines[i].split()
        if len(tokens) != 3:
            raise ValueError(f"{path}:{i + 1}: lattice vector needs 3 numbers, got {lines[i].strip()!r}")
        rows.append(_parse_floats(tokens, path, i + 1, "a lattice vector"))
    return np.array(rows, dtype=np.float64), i + 1


def _read_primcoord(path: Path, lines: list[str], i: int, out: _XsfBlocks) -> int:
    """Read ``PRIMCOORD`` at line index ``i``, its atom count and atom lines (appended); return the next index."""
    i = _next_content(lines, i + 1)
    if i >= len(lines):
        raise ValueError(f"{path}: PRIMCOORD without an atom count line")
    tokens = lines[i].split()
    try:
        count = int(tokens[0])
    except (ValueError, IndexError):
        raise ValueError(f"{path}:{i + 1}: expected the atom count after PRIMCOORD, got {lines[i].strip()!r}") from None
    return _read_atom_lines(lines, i + 1, count, path, out)


def _read_atom_lines(lines: list[str], start: int, count: int | None, path: Path, out: _XsfBlocks) -> int:
    """Read atom lines ``symbol x y z [fx fy fz]`` into ``out``; ``count`` None reads until a non-atom line."""
    i = start
    width = None
    read = 0
    fields, line_numbers = [], []  # the numbers' tokens and line of each atom, parsed together below
    while i < len(lines) and (count is None or read < count):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        tokens = stripped.split()
        if count is None and not (tokens[0][0].isalpha() or tokens[0].isdigit()):
            break
        if count is None and tokens[0].upper() in ("CRYSTAL", "PRIMVEC", "PRIMCOORD", "CONVVEC", "ATOMS"):
            break
        if len(tokens) not in (4, 7):
            raise ValueError(
                f"{path}:{i + 1}: atom line needs 'species x y z' or 'species x y z fx fy fz', "
                f"got {len(tokens)} fields: {stripped!r}"
            )
        if width is None:
            width = len(tokens)
        elif len(tokens) != width:
            raise ValueError(f"{path}:{i + 1}: atom line has {len(tokens)} fields, earlier lines had {width}")
        symbol = tokens[0]
        if symbol.isdigit():
            from ase.data import chemical_symbols

            if not 0 < int(symbol) < len(chemical_symbols):
                raise ValueError(f"{path}:{i + 1}: atomic number {symbol} out of range")
            symbol = chemical_symbols[int(symbol)]
        out.species.append(symbol)
        fields.append(tokens[1:])
        line_numbers.append(i + 1)
        read += 1
        i += 1
    if count is not None and read != count:
        raise ValueError(f"{path}:{start}: PRIMCOORD announces {count} atoms but {read} atom lines follow")
    out.coords.extend(_parse_rows(fields, line_numbers, path, "coordinates/forces"))
    out.atom_lines.extend(line_numbers)
    return i


def _parse_rows(rows: list[list[str]], line_numbers: list[int], path: Path, what: str) -> list[list[float]]:
    """:func:`_parse_floats` of each row, in one pass when all are plain numbers within range (the
    usual case: a third of the time of one call per line); otherwise line by line (Fortran 'd'
    exponents, and the message that names the line)."""
    try:
        values = [float(t) for row in rows for t in row]
    except ValueError:
        values = None
    if values is not None and all(-MAX_LENGTH <= v <= MAX_LENGTH for v in values):  # (False for NaN, infinities)
        width = len(rows[0]) if rows else 0
        return [values[k : k + width] for k in range(0, len(values), width)]
    return [_parse_floats(row, path, line_no, what) for row, line_no in zip(rows, line_numbers)]


def write_xsf(path: str | os.PathLike, structure: Structure) -> None:
    """Write ``structure`` as an aenet XSF file (energy comment; forces in columns 5-7 if it has any), atomically."""
    path = Path(path)
    if structure.energy is None:
        raise ValueError(f"{path}: cannot write {structure.name} as XSF: it has no energy")
    out = [f"# total energy = {structure.energy:.10f} eV", ""]
    if structure.pbc:
        out += ["CRYSTAL", "PRIMVEC"]
        out += ["  " + "  ".join(f"{x:16.10f}" for x in row) for row in structure.cell]
        out += ["PRIMCOORD", f"{structure.num_atoms} 1"]
    else:
        out += ["ATOMS"]
    forces = structure.forces if structure.forces is not None else np.zeros((structure.num_atoms, 0))
    for symbol, p, f in zip(structure.species, structure.pos, forces):
        out.append(f"{symbol:<3s}" + "".join(f"{x:16.10f}" for x in p) + "".join(f"{x:16.10f}" for x in f))
    atomic_write(path, "\n".join(out) + "\n")


def read_structures(path: str | os.PathLike, species: tuple[str, ...] | None = None) -> list[Structure]:
    """Read all structures from a file: XSF through :func:`read_xsf`, anything else through ASE.

    Non-XSF files must carry energies and forces (e.g. extended XYZ written with a
    calculator attached, or with ``energy=`` in the comment line and a ``forces`` column).
    ``species``, if given, refuses atoms of any other element (see :func:`read_xsf`).
    """
    path = Path(path)
    if path.suffix.lower() == ".xsf":
        return [read_xsf(path, species)]
    structures = [from_ase(atoms, f"{path}@{k}") for k, atoms in enumerate(_ase_read_all(path))]
    for s in structures if species is not None else ():
        if not set(s.species) <= set(species):
            k = next(k for k, symbol in enumerate(s.species) if symbol not in species)
            raise ValueError(f"{s.name}: atom {k + 1}: species {s.species[k]!r} not in TYPES {list(species)}")
    return structures


def _ase_read_all(path: Path):
    import ase.io

    try:
        return ase.io.read(path, index=":")
    except Exception as err:  # ASE raises many exception types for bad files
        raise ValueError(f"{path}: ASE cannot read this file: {err}") from None


def from_ase(atoms, name: str, require_energy: bool = True) -> Structure:
    """Convert an ``ase.Atoms`` with a calculator or info carrying energy and forces.

    ``require_energy=False`` accepts bare geometries (for prediction): energy and forces None.
    """
    try:
        energy = float(atoms.get_potential_energy())
    except Exception:
        energy = atoms.info.get("energy")
        if energy is None and require_energy:
            raise ValueError(f"{name}: no energy (need a calculator result or info['energy'])") from None
    try:
        forces = np.asarray(atoms.get_forces(), dtype=np.float64)
    except Exception:
        forces = atoms.arrays.get("forces")
        forces = None if forces is None else np.asarray(forces, dtype=np.float64)
    pbc = bool(np.all(atoms.pbc))
    for what, values in (("positions", atoms.positions), ("cell", atoms.cell[:] if pbc else np.zeros(1)),
                         ("forces", np.zeros(1) if forces is None else forces)):
        if not np.all(np.isfinite(values)) or np.abs(values).max() > MAX_LENGTH:
            raise ValueError(f"{name}: {what} not finite or out of range (|x| must be <= {MAX_LENGTH:g})")
    if energy is not None and not math.isfinite(energy):
        raise ValueError(f"{name}: energy {energy} is not finite")
    if np.any(atoms.pbc) and not pbc:
        raise ValueError(f"{name}: partial periodicity {atoms.pbc.tolist()} is not supported by aenet (all or none)")
    return Structure(
        species=tuple(atoms.get_chemical_symbols()),
        pos=np.array(atoms.positions, dtype=np.float64),
        cell=np.array(atoms.cell[:], dtype=np.float64) if pbc else np.zeros((3, 3)),
        pbc=pbc,
        energy=None if energy is None else float(energy),
        forces=forces,
        name=name,
    )


def to_ase(structure: Structure):
    """Build an ``ase.Atoms`` (with a single-point calculator holding energy and forces)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = Atoms(
        symbols=list(structure.species),
        positions=structure.pos,
        cell=structure.cell if structure.pbc else None,
        pbc=structure.pbc,
    )
    if structure.energy is not None:
        atoms.calc = SinglePointCalculator(atoms, energy=structure.energy, forces=structure.forces)
    return atoms
