"""Deterministic multi-element EMT data sets in aenet's format (XSF files + generate.in + .stp).

Energies and forces come from ASE's effective-medium-theory calculator
(:class:`ase.calculators.emt.EMT`), which is cheap and supports the fcc metals Al, Cu,
Ag, Au, Ni, Pd and Pt. Structures are small alloys (default Cu/Au/Ni):

- ``bulk``: fcc cells (conventional or primitive, repeated), random occupation, lattice
  constant from Vegard's law over the atoms present, random symmetric strain within ±3%;
- ``rattled``: the same with Gaussian displacements (σ drawn from 0.05–0.15 Å);
- ``vacancy``: rattled bulk with one or more atoms removed;
- ``slab``: rattled (100)/(110)/(111) slabs, periodic in all three directions with vacuum;
- ``cluster``: rattled compact fcc fragments, isolated (XSF ``ATOMS``).

Each structure is a pure function of (seed, data-set kind, index), so the output does not
depend on the number of worker processes and the same seed gives byte-identical files.
Files are written atomically; ``generate.in`` is written last, so a directory without it
is visibly incomplete.

Command line::

    python -m aenet_dist.datasets emt --out DIR [--structures 200] [--seed 0] [--force-percent 25]
    python -m aenet_dist.datasets synth --structures N --out DIR [--seed 0] [--workers K] [--force-percent 20]

Units: Å, eV, eV/Å.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


from .config import ChebyshevBasis, DescriptorSetup, FeaturizeConfig
from .formats.generate_in import write_generate_input
from .log import get_logger, setup_logging
from .structures import from_ase, write_xsf

logger = get_logger(__name__)

DEFAULT_ELEMENTS = ("Cu", "Au", "Ni")
EMT_ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
"""The fcc metals that EMT parameterizes properly (its H, C, N, O are for adsorbates only)."""

DEFAULT_BASIS = ChebyshevBasis(radial_cutoff=6.0, radial_order=10, angular_cutoff=4.0, angular_order=4)
DEFAULT_RMIN = 0.75

KIND_SCHEDULE = ("bulk", "rattled", "slab", "vacancy", "rattled", "bulk", "cluster", "rattled", "slab", "vacancy")
"""Structure kind of index i is ``KIND_SCHEDULE[i % 10]``: every 10 structures hold 1 cluster."""

_MODE_TAGS = {"emt": 0, "synth": 1}
_MAX_STRAIN = 0.03
_RATTLE_SIGMA = (0.05, 0.15)
_VACUUM = (4.0, 7.0)


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs to build structure ``index``; picklable."""

    mode: str
    seed: int
    min_atoms: int
    max_atoms: int
    elements: tuple[str, ...]
    xsf_dir: str
    name_width: int


@dataclass(frozen=True)
class _Summary:
    """What a worker reports back about one written structure."""

    kind: str
    num_atoms: int
    pbc: bool
    elem_counts: tuple[int, ...]


# ----------------------------------------------------------------------------- geometry


@functools.lru_cache(maxsize=None)
def _repeat_candidates(atoms_per_cell: int, min_atoms: int, max_atoms: int, max_aspect: float) -> tuple[tuple[int, int, int], ...]:
    """Sorted repeats (a <= b <= c) with atoms_per_cell*a*b*c in range and c/a <= max_aspect."""
    out = []
    for a in range(1, 9):
        for b in range(a, 9):
            for c in range(b, 9):
                n = atoms_per_cell * a * b * c
                if min_atoms <= n <= max_atoms and c <= max_aspect * a:
                    out.append((a, b, c))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _slab_candidates(min_atoms: int, max_atoms: int) -> tuple[tuple[int, int, int], ...]:
    """In-plane repeats and layer counts (nx, ny, layers) with nx*ny*layers in range."""
    out = []
    for nx in range(1, 7):
        for ny in range(nx, 7):
            for layers in range(3, 9):
                if min_atoms <= nx * ny * layers <= max_atoms:
                    out.append((nx, ny, layers))
    return tuple(out)


def _lattice_constants(elements: tuple[str, ...]) -> np.ndarray:
    """(E,) ASE reference fcc lattice constants, Å."""
    from ase.data import atomic_numbers, reference_states

    return np.array([reference_states[atomic_numbers[e]]["a"] for e in elements], dtype=np.float64)


def _draw_species(rng: np.random.Generator, num_atoms: int, num_elements: int) -> np.ndarray:
    """(A,) element indices: 1-3 elements per structure, Dirichlet-random composition."""
    k = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    k = min(k, num_elements)
    chosen = rng.choice(num_elements, size=k, replace=False)
    frac = rng.dirichlet(np.ones(k))
    return chosen[rng.choice(k, size=num_atoms, p=frac)]


def _random_strain(rng: np.random.Generator, in_plane_only: bool = False) -> np.ndarray:
    """(3, 3) deformation I + eps, eps symmetric with entries in [-3%, 3%]."""
    eps = rng.uniform(-_MAX_STRAIN, _MAX_STRAIN, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    if in_plane_only:
        eps[2, :] = 0.0
        eps[:, 2] = 0.0
    return np.eye(3) + eps


def _rattle(atoms, rng: np.random.Generator) -> None:
    sigma = rng.uniform(*_RATTLE_SIGMA)
    atoms.positions = atoms.positions + rng.normal(0.0, sigma, size=atoms.positions.shape)


def _bulk(rng: np.random.Generator, spec: _Spec, lat: np.ndarray, min_atoms: int):
    """Random-occupation fcc supercell, strained; returns (atoms, elem_idx)."""
    from ase.build import bulk

    cubic = bool(rng.integers(2))
    per_cell = 4 if cubic else 1
    candidates = _repeat_candidates(per_cell, min_atoms, spec.max_atoms, 2.0)
    if not candidates:  # e.g. a range that no primitive repeat hits
        cubic = not cubic
        per_cell = 4 if cubic else 1
        candidates = _repeat_candidates(per_cell, min_atoms, spec.max_atoms, 2.0)
    reps = np.asarray(candidates[rng.integers(len(candidates))])[rng.permutation(3)]
    num_atoms = per_cell * int(np.prod(reps))
    elem_idx = _draw_species(rng, num_atoms, len(spec.elements))
    a = float(lat[elem_idx].mean())
    atoms = bulk("Cu", "fcc", a=a, cubic=cubic).repeat(tuple(int(r) for r in reps))
    atoms.set_cell(atoms.cell[:] @ _random_strain(rng), scale_atoms=True)
    return atoms, elem_idx


def _build(index: int, spec: _Spec):
    """Build structure ``index`` (ASE Atoms without calculator) and its kind."""
    from ase import Atoms
    from ase.build import fcc100, fcc110, fcc111

    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _MODE_TAGS[spec.mode], index]))
    kind = KIND_SCHEDULE[index % len(KIND_SCHEDULE)]
    lat = _lattice_constants(spec.elements)

    if kind in ("bulk", "rattled"):
        atoms, elem_idx = _bulk(rng, spec, lat, spec.min_atoms)
        if kind == "rattled":
            _rattle(atoms, rng)
    elif kind == "vacancy":
        atoms, elem_idx = _bulk(rng, spec, lat, spec.min_atoms + 1)
        n = len(atoms)
        num_vac = int(rng.integers(1, min(n - spec.min_atoms, max(1, n // 16)) + 1))
        keep = np.sort(rng.permutation(n)[num_vac:])
        atoms, elem_idx = atoms[keep], elem_idx[keep]
        _rattle(atoms, rng)
    elif kind == "slab":
        candidates = _slab_candidates(spec.min_atoms, spec.max_atoms)
        nx, ny, layers = candidates[rng.integers(len(candidates))]
        elem_idx = _draw_species(rng, nx * ny * layers, len(spec.elements))
        a = float(lat[elem_idx].mean())
        builder = (fcc100, fcc110, fcc111)[rng.integers(3)]
        atoms = builder("Cu", size=(nx, ny, layers), a=a, vacuum=float(rng.uniform(*_VACUUM)), periodic=False)
        atoms.pbc = True
        atoms.set_cell(atoms.cell[:] @ _random_strain(rng, in_plane_only=True), scale_atoms=True)
        _rattle(atoms, rng)
    elif kind == "cluster":
        num_atoms = int(rng.integers(spec.min_atoms, spec.max_atoms + 1))
        elem_idx = _draw_species(rng, num_atoms, len(spec.elements))
        a = float(lat[elem_idx].mean()) * (1.0 + rng.uniform(-_MAX_STRAIN, _MAX_STRAIN))
        # fcc block big enough for ~3x the atoms; keep the num_atoms nearest a random centre
        reps = int(np.ceil((3.0 * num_atoms / 4.0) ** (1.0 / 3.0)))
        from ase.build import bulk

        block = bulk("Cu", "fcc", a=a, cubic=True).repeat((reps, reps, reps)).positions  # shape (4 reps^3, 3)
        centre = block.mean(axis=0) + rng.uniform(-0.5 * a, 0.5 * a, size=3)
        order = np.argsort(np.linalg.norm(block - centre, axis=1), kind="stable")[:num_atoms]
        pos = block[np.sort(order)]
        atoms = Atoms(numbers=np.full(num_atoms, 29), positions=pos - pos.mean(axis=0), pbc=False)
        _rattle(atoms, rng)
    else:  # pragma: no cover - KIND_SCHEDULE is fixed
        raise AssertionError(kind)

    atoms.set_chemical_symbols(np.asarray(spec.elements)[elem_idx].tolist())
    assert spec.min_atoms <= len(atoms) <= spec.max_atoms, (kind, len(atoms))
    return atoms, kind, elem_idx


def _structure_name(index: int, width: int) -> str:
    return f"structure{index + 1:0{width}d}.xsf"


def _make_one(index: int, spec: _Spec) -> _Summary:
    """Build, evaluate with EMT and write structure ``index``; return its summary."""
    from ase.calculators.emt import EMT

    atoms, kind, elem_idx = _build(index, spec)
    atoms.calc = EMT()
    name = _structure_name(index, spec.name_width)
    structure = from_ase(atoms, f"xsf/{name}")
    write_xsf(Path(spec.xsf_dir) / name, structure)
    counts = np.bincount(elem_idx, minlength=len(spec.elements))
    return _Summary(kind=kind, num_atoms=len(atoms), pbc=structure.pbc, elem_counts=tuple(int(c) for c in counts))


def isolated_atom_energies(elements: tuple[str, ...]) -> dict[str, float]:
    """EMT energy of one isolated atom of each element, eV (aenet's TYPES reference energies)."""
    from ase import Atoms
    from ase.calculators.emt import EMT

    out = {}
    for element in elements:
        atoms = Atoms(element, positions=[[0.0, 0.0, 0.0]], pbc=False)
        atoms.calc = EMT()
        out[element] = float(atoms.get_potential_energy())
    return out


# ----------------------------------------------------------------------------- aenet inputs


# ----------------------------------------------------------------------------- driver


def _generate(mode: str, out_dir, num_structures: int, seed: int, workers: int | None, force_percent: float,
              min_atoms: int, max_atoms: int, elements, basis: ChebyshevBasis | None, rmin: float,
              progress: bool) -> Path:
    elements = tuple(elements)
    if num_structures < 1:
        raise ValueError(f"number of structures must be >= 1, got {num_structures}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= force_percent <= 100.0:
        raise ValueError(f"force_percent must be within [0, 100], got {force_percent}")
    if not elements or len(set(elements)) != len(elements):
        raise ValueError(f"elements must be distinct and non-empty, got {list(elements)}")
    bad = [e for e in elements if e not in EMT_ELEMENTS]
    if bad:
        raise ValueError(f"elements {bad} not supported by the EMT generator (choose from {list(EMT_ELEMENTS)})")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    basis = basis or DEFAULT_BASIS

    out_dir = Path(out_dir)
    xsf_dir = out_dir / "xsf"
    xsf_dir.mkdir(parents=True, exist_ok=True)
    generate_in = out_dir / "generate.in"
    generate_in.unlink(missing_ok=True)  # the directory is incomplete until we are done

    spec = _Spec(mode=mode, seed=int(seed), min_atoms=min_atoms, max_atoms=max_atoms, elements=elements,
                 xsf_dir=str(xsf_dir), name_width=max(4, len(str(num_structures))))
    logger.info("%s data set: %d structures (%d-%d atoms, %s) -> %s, %d worker(s)",
                mode, num_structures, min_atoms, max_atoms, "/".join(elements), out_dir, workers)

    from tqdm import tqdm

    start = time.perf_counter()
    work = functools.partial(_make_one, spec=spec)
    summaries: list[_Summary] = []
    bar = tqdm(total=num_structures, unit="struct", desc=mode, disable=not progress, mininterval=0.5)
    if workers == 1:
        for i in range(num_structures):
            summaries.append(work(i))
            bar.update()
    else:
        chunksize = max(1, min(64, num_structures // (workers * 8)))
        # spawn, not fork: forking a process that already runs threads (torch, zarr's event
        # loop, a test runner's) can deadlock the children on a lock held by a dead thread.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for summary in pool.imap_unordered(work, range(num_structures), chunksize=chunksize):
                summaries.append(summary)
                bar.update()
    bar.close()
    elapsed = time.perf_counter() - start

    setups = {element: DescriptorSetup(element=element, env_species=elements, basis_type="chebyshev", basis=basis, rmin=rmin,
                                       description=f"Descriptor for {element} ({mode} EMT data set)") for element in elements}
    config = FeaturizeConfig(species=elements, atomic_energies=isolated_atom_energies(elements), setups=setups,
                             files=tuple(str(xsf_dir / _structure_name(i, spec.name_width)) for i in range(num_structures)),
                             output=f"{mode}.train", forces=force_percent > 0, force_percent=force_percent)
    write_generate_input(generate_in, config, {e: f"{e}.fingerprint.stp" for e in elements})  # the setups, then generate.in

    num_atoms = np.array([s.num_atoms for s in summaries])
    counts = np.sum([s.elem_counts for s in summaries], axis=0)
    kinds = {k: sum(s.kind == k for s in summaries) for k in dict.fromkeys(KIND_SCHEDULE)}
    logger.info(
        "wrote %d structures (%d periodic, %d isolated; %s), %d atoms (%d-%d per structure; %s) in %.1f s (%.0f structures/s)",
        len(summaries), sum(s.pbc for s in summaries), sum(not s.pbc for s in summaries),
        ", ".join(f"{k} {v}" for k, v in kinds.items()), num_atoms.sum(), num_atoms.min(), num_atoms.max(),
        ", ".join(f"{e} {c}" for e, c in zip(elements, counts)), elapsed, len(summaries) / max(elapsed, 1e-9),
    )
    logger.info("aenet input: %s", generate_in)
    return generate_in


def generate_emt_dataset(out_dir, num_structures: int = 200, seed: int = 0, force_percent: float = 25.0, *,
                         workers: int = 1, elements=DEFAULT_ELEMENTS, basis: ChebyshevBasis | None = None,
                         rmin: float = DEFAULT_RMIN, progress: bool = False) -> Path:
    """Write the small default EMT data set (4-32 atoms per structure) into ``out_dir``.

    Args:
        out_dir: output directory; gets ``xsf/structureNNNN.xsf``, ``<El>.fingerprint.stp``
            and, last, ``generate.in``.
        num_structures: number of structures.
        seed: non-negative integer; the same seed gives byte-identical files.
        force_percent: aenet ``FORCESPERCENT`` (0 omits ``FORCES``).
        workers: worker processes (the output does not depend on it).
        elements: TYPES/ENV species, from :data:`EMT_ELEMENTS`.
        basis: Chebyshev basis of every setup (default radial 6.0 Å/10, angular 4.0 Å/4).
        rmin: aenet RMIN, Å.
        progress: show a tqdm progress bar.

    Returns:
        Path of the written ``generate.in``.
    """
    return _generate("emt", out_dir, num_structures, seed, workers, force_percent, 4, 32,
                     elements, basis, rmin, progress)


def generate_synth_dataset(out_dir, num_structures: int, seed: int = 0, workers: int | None = None,
                           force_percent: float = 20.0, *, elements=DEFAULT_ELEMENTS,
                           basis: ChebyshevBasis | None = None, rmin: float = DEFAULT_RMIN,
                           progress: bool = False) -> Path:
    """Write a large EMT benchmark data set (32-128 atoms per structure) into ``out_dir``.

    Same arguments as :func:`generate_emt_dataset`; ``workers`` None uses all CPUs.

    Returns:
        Path of the written ``generate.in``.
    """
    return _generate("synth", out_dir, num_structures, seed, workers, force_percent, 32, 128,
                     elements, basis, rmin, progress)


DESCRIPTION = __doc__.split("\n")[0]
EPILOG = "example: aenet-dist datasets emt --out emt --structures 200"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands ``emt`` and ``synth`` of ``aenet-dist datasets`` and their options."""
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, n_default, fp_default, workers_default in (
        ("emt", "small default data set, 4-32 atoms per structure", 200, 25.0, 1),
        ("synth", "large benchmark data set, 32-128 atoms per structure", None, 20.0, None),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, type=Path, help="output directory")
        p.add_argument("--structures", type=int, default=n_default, required=n_default is None,
                       help="number of structures" + (f" (default {n_default})" if n_default else ""))
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument("--workers", type=int, default=workers_default,
                       help=f"worker processes (default {workers_default or 'all CPUs'})")
        p.add_argument("--force-percent", type=float, default=fp_default,
                       help=f"aenet FORCESPERCENT (default {fp_default:g})")
        p.add_argument("--elements", default=",".join(DEFAULT_ELEMENTS),
                       help=f"comma-separated elements, from {','.join(EMT_ELEMENTS)} (default %(default)s)")
        p.add_argument("--radial-rc", type=float, default=DEFAULT_BASIS.radial_cutoff, help="radial cutoff, Å")
        p.add_argument("--radial-n", type=int, default=DEFAULT_BASIS.radial_order, help="radial Chebyshev order")
        p.add_argument("--angular-rc", type=float, default=DEFAULT_BASIS.angular_cutoff, help="angular cutoff, Å")
        p.add_argument("--angular-n", type=int, default=DEFAULT_BASIS.angular_order, help="angular Chebyshev order")
        p.add_argument("--rmin", type=float, default=DEFAULT_RMIN, help="aenet RMIN, Å")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Write the data set ``args.command`` (emt or synth) and print the path of its generate.in."""
    setup_logging()
    basis = ChebyshevBasis(args.radial_rc, args.radial_n, args.angular_rc, args.angular_n)
    kwargs = dict(elements=tuple(e.strip() for e in args.elements.split(",") if e.strip()), basis=basis,
                  rmin=args.rmin, progress=not args.no_progress)
    try:
        if args.command == "emt":
            path = generate_emt_dataset(args.out, args.structures, args.seed, args.force_percent,
                                        workers=args.workers, **kwargs)
        else:
            path = generate_synth_dataset(args.out, args.structures, args.seed, args.workers, args.force_percent,
                                          **kwargs)
    except OSError as err:  # e.g. --out names a file, or a directory that is not writable: say which
        raise OSError(f"cannot write the data set to {args.out}: {err.strerror or err}") from err
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aenet_dist.datasets {emt,synth} --out DIR ...``, the same as ``aenet-dist datasets ...``."""
    from .cli import main as cli_main

    return cli_main(["datasets", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
