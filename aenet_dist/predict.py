"""Inference with aenet ``.nn`` potentials: energies, forces and stress of many structures at once.

``aenet-dist predict predict.in`` (aenet's ``predict.x`` input) or
``aenet-dist predict --potentials DIR structures/*.xsf --forces --json out.json``.

Engine (numpy on the CPU; no torch is imported, which alone would cost 2+ s). Structures are batched; one neighbour list (vesin) per batch, then per element one
vectorized descriptor evaluation over all of the batch's pairs (the per-atom-moment form of
:mod:`aenet_dist.descriptors`), one network call, and, for forces, one *backward* pass over
the pairs. The backward pass contracts dE/dG with the descriptor derivative pair by pair,

    g_p = ∂E/∂R_ij = Σ_f ∂E_i/∂G_if · ∂G_if/∂R_ij                         (p = pair i -> image of j)
    F_j −= g_p,  F_i += g_p,   virial W = Σ_p g_p ⊗ R_ij,   stress = W_sym / V

so the (pairs, F, 3) derivative rows that training stores are never built: with forces it
costs 1.5-2 times the energy-only pass. Radial part (fc T_n)' = fc' T_n + fc T_n' · 2/Rr; angular
part through the moments M_α(i) = Σ_j w_j u_j^α: λ_α(i) = ∂E/∂M_α(i) = Σ_n ∂E/∂A_n(i) C_nα M_α(i),
and ∂(w u^α)/∂R = w' u^α u + w (∇_u u^α − |α| u^α u)/r, where Σ_α λ_α ∇_u u^α = Σ_α λ_α α_d u^(α−e_d)
is a product of per-center coefficients λ D_d with the pair's monomials. Stress comes from the
same g_p. Agrees with aenet's predict.x to 1e-11 eV and 1e-13 eV/Å on the TiO2 reference
(tests/test_predict.py); benchmarks in bench/RESULTS.md.

``engine="rows"`` instead featurizes with :func:`aenet_dist.descriptors.featurize` (sparse
dG/dR rows, as stored for training) and contracts them with ∂E/∂G; it is kept as an independent
cross-check (no stress).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats.predict_in import read_predict_input
from .config import DescriptorSetup
from .cores import usable_cores
from .descriptors import (PairTables, featurize, pair_gradient, pair_tables, pair_values, scatter_add, sort_pairs_by_key,
                          sub_batches)
from .formats.nn import read_nn
from .log import get_logger, setup_logging
from .files import atomic_write
from .neighbors import neighbor_list
from .potential import ElementPotential, setup_from_nn
from .structures import Structure, from_ase, read_xsf

log = get_logger(__name__)

DTYPES = {"float64": np.float64, "float32": np.float32}
PAIR_BUDGET = 20_000
"""Pairs per vectorized sub-batch: the temporaries then stay in cache."""
DEFAULT_MAX_THREADS = 4
"""At most this many workers (forked processes, or threads) by default: beyond a few, on the core
counts of a workstation, they add only smaller batches and more memory."""


# ----------------------------------------------------------------------------- results


@dataclass
class Prediction:
    """Energies (eV), forces (eV/Å) and stress (eV/Å³) of one structure.

    Attributes:
        name: the structure's source (file path or ``path@index``).
        species: (A,) chemical symbols.
        pos: (A, 3) Cartesian positions, Å; cell (3, 3) rows = lattice vectors; pbc.
        energy: total energy Σ_i E_i, eV.
        cohesive_energy: total minus Σ_i E_atom(t_i) of the potentials, eV.
        atomic_energies: (A,) E_i including E_atom, eV.
        forces: (A, 3) −∂E/∂R, eV/Å, or None.
        stress: (3, 3) (1/V) ∂E/∂ε (ASE's sign: positive under tension), eV/Å³, or None.
    """

    name: str
    species: tuple[str, ...]
    pos: np.ndarray
    cell: np.ndarray
    pbc: bool
    energy: float
    cohesive_energy: float
    atomic_energies: np.ndarray
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None

    @property
    def num_atoms(self) -> int:
        return len(self.species)

    def to_dict(self) -> dict:
        """JSON-ready dict (the README's ``--json`` schema): name, num_atoms, species, energy,
        cohesive_energy, energy_per_atom (energy / num_atoms), atomic_energies (the E_i, a list),
        and forces/stress when computed."""
        d = {
            "name": self.name,
            "num_atoms": self.num_atoms,
            "species": list(self.species),
            "energy": self.energy,
            "cohesive_energy": self.cohesive_energy,
            "energy_per_atom": self.energy / self.num_atoms,
            "atomic_energies": self.atomic_energies.tolist(),
        }
        if self.forces is not None:
            d["forces"] = self.forces.tolist()
        if self.stress is not None:
            d["stress"] = self.stress.tolist()
        return d


# ----------------------------------------------------------------------------- engine


def _element_pass(t: PairTables, net: ElementPotential, row, env, r, vec, num_centers: int, with_grad: bool):
    """Atomic energies of one element's centers and, with ``with_grad``, ∂E/∂R_ij of its pairs.

    The descriptor side (values, and the adjoint ∂E/∂G -> ∂E/∂R_ij) is :mod:`aenet_dist.descriptors`';
    here only the network and its input gradient.

    Args:
        row: (P,) center row of each pair; env: (P,) ENV position of the neighbour;
        r: (P,) distances, vec: (P, 3) pair vectors R_ij (all pairs within the setup's cutoff).
    Returns:
        (energies (C,), pair gradient (P, 3) or None).
    """
    G, state = pair_values(t, row, env, r, vec, num_centers, with_grad)
    if not with_grad:
        return net.energies(G), None
    energy, dE_dG = net.energies_and_gradient(G)
    return energy, pair_gradient(t, row, env, r, vec, dE_dG, state)


# ----------------------------------------------------------------------------- predictor


def check_setups(setups: Mapping[str, DescriptorSetup], sources: Mapping[str, str] | None = None) -> None:
    """All setups must use the same ENV species (in the same order), and each ENV species needs a setup.

    Raises:
        ValueError naming the two files (or elements) that disagree.
    """
    where = lambda el: (sources or {}).get(el) or setups[el].source or f"the {el} potential"  # noqa: E731
    elements = list(setups)
    if not elements:
        raise ValueError("no potentials given")
    first = elements[0]
    for el in elements:
        if setups[el].element != el:
            raise ValueError(f"{where(el)}: potential is for atom type {setups[el].element!r}, but was given for {el!r}")
        if tuple(setups[el].env_species) != tuple(setups[first].env_species):
            raise ValueError(f"{where(el)} and {where(first)}: descriptor setups disagree on the ENV species: "
                             f"{list(setups[el].env_species)} vs {list(setups[first].env_species)}")
    missing = [e for e in setups[first].env_species if e not in setups]
    if missing:
        raise ValueError(f"{where(first)}: ENV species {missing} have no potential (have {elements})")


class Predictor:
    """Energies, forces and stress of structures with one network and descriptor setup per element (numpy, CPU).

    Args:
        networks: {element: :class:`~aenet_dist.potential.ElementPotential`}.
        setups: descriptor setup per element (the species of ``networks``).
        species: element order (default: that of ``networks``).
        dtype: float64 (default, agrees with aenet to rounding) or float32.
        sources: element -> file name, used in error messages.
    """

    def __init__(self, networks: Mapping[str, ElementPotential], setups: Mapping[str, DescriptorSetup],
                 species: Sequence[str] | None = None, dtype=np.float64, sources: Mapping[str, str] | None = None):
        species = tuple(species) if species is not None else tuple(networks)
        if set(species) != set(setups) or set(species) != set(networks):
            raise ValueError(f"species {list(species)}, setups {list(setups)} and networks {list(networks)} differ")
        check_setups({el: setups[el] for el in species}, sources)
        for el in species:
            if networks[el].num_features != setups[el].num_features:
                raise ValueError(f"{(sources or {}).get(el, el)}: network has {networks[el].num_features} inputs "
                                 f"but the descriptor setup gives {setups[el].num_features} features")
            if networks[el].dtype != np.dtype(dtype):
                raise ValueError(f"{(sources or {}).get(el, el)}: network is {networks[el].dtype}, predictor {np.dtype(dtype)}")
        self.species = species
        self.setups = {el: setups[el] for el in species}
        self.sources = dict(sources or {})
        self.dtype = np.dtype(dtype)
        self.networks = {el: networks[el] for el in species}
        self.cutoff = max(s.basis.max_cutoff for s in self.setups.values())
        self._tables = {el: pair_tables(self.setups[el], species, self.dtype) for el in species}
        self._e_atom = np.array([float(self.networks[el].e_atom) for el in species], dtype=np.float64)

    @classmethod
    def from_potentials(cls, potentials, dtype=np.float64) -> "Predictor":
        """Build from aenet binary ``.nn`` files.

        Args:
            potentials: {element: path}, or a directory (all its ``*.nn`` files), or a list of
                files and directories; the element of a file is its atomtype record.
            dtype: float64 (default) or float32 (numpy dtype or its name).
        Raises:
            ValueError naming the file for unreadable or truncated files, two files for one element,
            setups that disagree on the ENV species, or an ENV species without a file.
        """
        try:
            dtype = np.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
        except TypeError:
            raise ValueError(f"dtype must be float64 or float32, got {dtype!r}") from None
        if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise ValueError(f"dtype must be float64 or float32, got {dtype}")
        paths = potential_paths(potentials)
        files = {el: read_nn(p) for el, p in paths.items()}
        for el, nn in files.items():
            if nn.atomtype != el:
                raise ValueError(f"{paths[el]}: potential is for atom type {nn.atomtype!r}, but was given for {el!r}")
        sources = {el: str(p) for el, p in paths.items()}
        setups = {el: setup_from_nn(nn, sources[el]) for el, nn in files.items()}
        check_setups(setups, sources)
        nets = {el: ElementPotential.from_nn(nn, dtype=dtype, source=sources[el]) for el, nn in files.items()}
        return cls(nets, setups, tuple(paths), dtype=dtype, sources=sources)

    # ------------------------------------------------------------------ checks

    def check_structures(self, structures: Sequence[Structure]) -> None:
        """Every species of every structure needs a potential (error names the structure and species)."""
        known = set(self.species)
        for s in structures:
            unknown = sorted(set(s.species) - known)
            if unknown:
                raise ValueError(f"{s.name}: species {unknown} have no potential (potentials for {list(self.species)})")

    # ------------------------------------------------------------------ evaluation

    def predict(self, structures: Sequence[Structure], forces: bool = True, stress: bool = False,
                batch_structures: int = 256, pair_budget: int | None = None, engine: str = "pairs",
                threads: int = 1) -> list[Prediction]:
        """Energies (and forces, stress) of ``structures``.

        Args:
            structures: any number; processed ``batch_structures`` at a time (one neighbour list each).
            forces: compute forces −∂E/∂R (eV/Å).
            stress: compute the stress (periodic structures only; None for isolated ones).
            pair_budget: pairs per vectorized sub-batch (default :data:`PAIR_BUDGET`).
            engine: ``pairs`` (default) or ``rows`` (featurize + sparse dG rows; no stress).
            threads: batches evaluated at once. numpy and vesin release the interpreter lock in
                their loops, so a second thread gains 1.25x (energies) to 1.5x (forces) on TiO2;
                with more than one, batches are cut smaller (at least four per thread) so that
                the threads finish together. Results do not depend on it: a structure's numbers
                do not depend on what shares its batch.
        Returns:
            One :class:`Prediction` per structure, in order.
        """
        if engine not in ("pairs", "rows"):
            raise ValueError(f"engine must be 'pairs' or 'rows', got {engine!r}")
        if stress and engine == "rows":
            raise ValueError("engine='rows' does not compute stress; use engine='pairs'")
        if batch_structures < 1:
            raise ValueError(f"batch_structures must be >= 1, got {batch_structures}")
        structures = list(structures)
        self.check_structures(structures)
        budget = pair_budget or PAIR_BUDGET

        def evaluate(chunk: list[Structure]) -> list[Prediction]:
            if engine == "pairs":
                energy, frc, virial = self._evaluate_pairs(chunk, forces, stress, budget)
            else:
                energy, frc, virial = self._evaluate_rows(chunk, forces, budget)
            return self._results(chunk, energy, frc, virial)

        return _side_by_side(evaluate, structures, threads, batch_structures)

    def _species_index(self, structures: Sequence[Structure]) -> np.ndarray:
        """(A,) int64 index into ``self.species`` of every atom (species already checked)."""
        symbols = np.concatenate([np.asarray(s.species, dtype=str) for s in structures])
        names = np.array(sorted(self.species))
        return np.array([self.species.index(n) for n in names], dtype=np.int64)[np.searchsorted(names, symbols)]

    def _evaluate_pairs(self, structures, with_forces: bool, with_stress: bool, budget: int):
        """Atomic energies (A,), forces (A, 3) or None, per-structure virial Σ g⊗R (S, 3, 3) or None; float64.

        Per sub-batch of about ``budget`` pairs and per element: the element's pairs, one descriptor
        pass, one network call, and for forces one adjoint pass over the pairs.
        """
        num_atoms = np.array([s.num_atoms for s in structures], dtype=np.int64)
        atom_offset = np.r_[0, np.cumsum(num_atoms)]
        species_index = self._species_index(structures)
        nbr = neighbor_list([s.pos for s in structures], [s.cell for s in structures], [s.pbc for s in structures],
                            self.cutoff, self.dtype)
        pair_offset = np.r_[0, np.cumsum(nbr.pair_count)]
        with_grad = with_forces or with_stress
        total = int(atom_offset[-1])
        energy = np.zeros(total, dtype=np.float64)
        forces = np.zeros((total, 3), dtype=np.float64) if with_forces else None
        virial = np.zeros((len(structures), 9), dtype=np.float64) if with_stress else None
        for s0, s1 in sub_batches(nbr.pair_count, budget):
            a0, a1, p0, p1 = (int(v) for v in (atom_offset[s0], atom_offset[s1], pair_offset[s0], pair_offset[s1]))
            center, neighbor = nbr.center[p0:p1], nbr.neighbor[p0:p1]
            vec, dist = nbr.vec[p0:p1], nbr.dist[p0:p1]
            center_species = species_index[center]
            neighbor_species = species_index[neighbor]
            for k, el in enumerate(self.species):
                t = self._tables[el]
                atoms = np.flatnonzero(species_index[a0:a1] == k) + a0  # shape (C,)
                if atoms.size == 0:
                    continue
                row_of_atom = np.full(a1 - a0, -1, dtype=np.int64)
                row_of_atom[atoms - a0] = np.arange(atoms.size)
                env = t.env_of_type[neighbor_species]
                sel = np.flatnonzero((center_species == k) & (env >= 0) & (dist < t.setup.basis.max_cutoff))
                row, pair_env = row_of_atom[center[sel] - a0], env[sel]
                order = sort_pairs_by_key(row, pair_env, t.spin_of_env.size)  # the order pair_terms sums fastest
                sel, row, pair_env = sel[order], row[order], pair_env[order]
                e, g = _element_pass(t, self.networks[el], row, pair_env, dist[sel], vec[sel], atoms.size, with_grad)
                energy[atoms] = e
                if g is None:
                    continue
                if with_forces:
                    # F_i += g, F_j −= g: one sum over the pair list (centers, then the atoms of the images).
                    both = np.concatenate([center[sel], neighbor[sel]])
                    forces += scatter_add(both, np.concatenate([g, -g]).astype(np.float64), total)
                if with_stress:
                    pair_structure = np.searchsorted(pair_offset[1:], sel + p0, side="right")
                    virial += scatter_add(pair_structure, (g[:, :, None] * vec[sel][:, None, :]).reshape(-1, 9).astype(np.float64),
                                          len(structures))
        return energy, forces, None if virial is None else virial.reshape(-1, 3, 3)

    def _evaluate_rows(self, structures, with_forces: bool, budget: int):
        """The same through featurize's sparse dG/dR rows: F_a = −Σ_rows ∂E_i/∂G_i · ∂G_i/∂R_a (no stress)."""
        species_index, feats = featurize(structures, self.setups, self.species, [with_forces] * len(structures),
                                         dtype=self.dtype, pair_budget=budget)
        total = species_index.size
        energy = np.zeros(total, dtype=np.float64)
        forces = np.zeros((total, 3), dtype=np.float64) if with_forces else None
        for el, f in feats.items():
            if f.atom_index.size == 0:
                continue
            e, dE_dG = self.networks[el].energies_and_gradient(f.G.astype(self.dtype, copy=False))
            energy[f.atom_index] = e
            if with_forces and f.deriv_center.size:
                row_of_atom = np.full(total, -1, dtype=np.int64)
                row_of_atom[f.atom_index] = np.arange(f.atom_index.size)
                contribution = np.einsum("rf,rfd->rd", dE_dG[row_of_atom[f.deriv_center]], f.dG.astype(self.dtype, copy=False))
                forces -= scatter_add(f.deriv_neighbor, contribution.astype(np.float64), total)
        return energy, forces, None

    def _results(self, structures, energy: np.ndarray, forces, virial) -> list[Prediction]:
        """Split flat per-atom results into one :class:`Prediction` per structure."""
        e_atom_of = self._e_atom[self._species_index(structures)]
        bounds = np.cumsum([s.num_atoms for s in structures])[:-1]
        e_parts = np.split(energy, bounds)
        coh_parts = np.split(energy - e_atom_of, bounds)
        f_parts = np.split(forces, bounds) if forces is not None else [None] * len(structures)
        out = []
        for k, s in enumerate(structures):
            stress = None
            if virial is not None and s.pbc:
                w = virial[k]
                stress = 0.5 * (w + w.T) / abs(float(np.linalg.det(s.cell)))
            out.append(Prediction(
                name=s.name, species=tuple(s.species), pos=s.pos, cell=s.cell, pbc=s.pbc,
                energy=float(e_parts[k].sum()), cohesive_energy=float(coh_parts[k].sum()),
                atomic_energies=e_parts[k].copy(),
                forces=None if f_parts[k] is None else f_parts[k].copy(), stress=stress,
            ))
        return out


# ----------------------------------------------------------------------------- inputs


def potential_paths(potentials) -> dict[str, Path]:
    """{element: .nn path} from a dict, a directory, a file, or a list of files/directories.

    Files given without an element are keyed by their atomtype record (read from the file).
    """
    if isinstance(potentials, Mapping):
        paths = {str(el): Path(p) for el, p in potentials.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise ValueError(f"{missing[0]}: no such potential file" + (f" (nor {missing[1:]})" if missing[1:] else ""))
        return paths
    items = [potentials] if isinstance(potentials, (str, os.PathLike)) else list(potentials)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.nn"))
            if not found:
                raise ValueError(f"{path}: no *.nn potential files in this directory")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such potential file or directory")
    out: dict[str, Path] = {}
    for path in files:
        element = read_nn(path).atomtype
        if element in out:
            raise ValueError(f"{path} and {out[element]}: two potentials for {element!r}")
        out[element] = path
    return out


def structure_from_atoms(atoms, name: str) -> Structure:
    """An ``ase.Atoms`` as a :class:`Structure` for prediction (reference energy and forces not needed)."""
    return from_ase(atoms, name, require_energy=False)


def read_for_prediction(path: str | os.PathLike, name: str | None = None) -> list[Structure]:
    """Structures of one file: XSF by the strict reader (energy line optional here), others by ASE."""
    path = Path(path)
    name = name or str(path)
    if not path.exists():
        raise ValueError(f"{path}: structure file not found")
    if path.suffix.lower() == ".xsf":
        try:
            return [dataclasses.replace(read_xsf(path), name=name)]
        except ValueError as err:
            if "missing energy line" not in str(err):
                raise
    import ase.io

    try:
        frames = ase.io.read(path, index=":")
    except Exception as err:  # ASE raises many exception types for bad files
        raise ValueError(f"{path}: ASE cannot read this file: {err}") from None
    if len(frames) == 1:
        return [structure_from_atoms(frames[0], name)]
    return [structure_from_atoms(a, f"{name}@{k}") for k, a in enumerate(frames)]


def _side_by_side(work, items: list, threads: int, largest: int, processes: bool = False) -> list:
    """``work(chunk)`` over ``items`` cut into chunks of at most ``largest``, ``threads`` chunks at once;
    the results joined in order. With more than one worker the chunks are cut smaller, at least
    four per worker, so that the workers finish together. ``processes``: the workers are forked
    processes (``work`` then a module-level function), else threads."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    size = largest if threads == 1 else max(1, min(largest, math.ceil(len(items) / (4 * threads))))
    chunks = [items[k : k + size] for k in range(0, len(items), size)]
    if threads == 1 or len(chunks) < 2:
        return [r for chunk in chunks for r in work(chunk)]
    if processes:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(min(threads, len(chunks)), mp_context=multiprocessing.get_context("fork"))
    else:
        pool = ThreadPoolExecutor(min(threads, len(chunks)), thread_name_prefix="predict")
    with pool:
        return [r for part in pool.map(work, chunks) for r in part]


def default_threads() -> int:
    """Threads ``predict`` uses unless told: the cores this process may use, at most :data:`DEFAULT_MAX_THREADS`."""
    return min(usable_cores(), DEFAULT_MAX_THREADS)


def predict_files(predictor: Predictor, paths: Sequence[Path], names: Sequence[str], threads: int = 1,
                  **options) -> list[Prediction]:
    """Read the structure files ``paths`` (shown as ``names``) and predict them: ``Predictor.predict``'s
    results, in file order. ``options`` go to :meth:`Predictor.predict`.

    With ``threads`` above 1 the files are cut into chunks (at least four per worker), each read
    and predicted by one worker: a forked process where :func:`_can_fork`, else a thread. Reading
    files and a batch's many small numpy calls hold the interpreter lock about two thirds of the
    time, so processes do better than threads: TiO2-1000 on 2 cores, 0.74-0.79 against
    1.05-1.22 s (energies) and 1.57-1.88 against 2.13-2.36 s (forces). Results are bitwise the
    same either way. A file that cannot be read raises for the first such file in order.
    """
    if not (threads > 1 and _can_fork()):
        return _side_by_side(functools.partial(_read_and_predict, predictor, options), list(zip(paths, names)),
                             threads, max(1, len(paths)))
    from concurrent.futures.process import BrokenProcessPool

    global _FORKED
    _FORKED = (predictor, options)
    try:
        return _side_by_side(_predict_chunk, list(zip(paths, names)), threads, max(1, len(paths)), processes=True)
    except BrokenProcessPool:
        raise OSError("a predict worker process ended abruptly (killed by a signal, e.g. by the out-of-memory killer); "
                      "rerun with fewer --threads or --threads 1") from None
    finally:
        _FORKED = None


def _read_and_predict(predictor: Predictor, options: dict, chunk: list[tuple[Path, str]]) -> list[Prediction]:
    """Read one chunk of (path, name) files and predict their structures."""
    return predictor.predict([s for p, n in chunk for s in read_for_prediction(p, n)], **options)


def _can_fork() -> bool:
    """Whether worker processes may be forked from this one: Linux (on macOS a fork after the system's
    frameworks ran is unsafe, which is why Python spawns there), no other Python thread, and no
    torch loaded (its OpenMP threads, if it started them, do not survive a fork).

    ``aenet-dist predict`` qualifies (it imports no torch); a program that loaded torch or runs
    threads gets threads instead.
    """
    import multiprocessing
    import threading

    return (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and threading.active_count() == 1 and "torch" not in sys.modules)


_FORKED: tuple | None = None  # (predictor, options) that forked workers inherit (nothing is pickled to them)


def _predict_chunk(chunk: list[tuple[Path, str]]) -> list[Prediction]:
    """In a forked worker: :func:`_read_and_predict` with the inherited predictor and options."""
    return _read_and_predict(*_FORKED, chunk)


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths or globs (sorted per glob); a pattern that matches nothing is an error."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ValueError(f"{pattern}: no files match")
        out.extend(Path(m) for m in matches)
    return out


# ----------------------------------------------------------------------------- output


def format_aenet(predictions: Sequence[Prediction], forces: bool, atomic_energies: bool = False) -> str:
    """predict.x-like text: per structure the file, atom count, lattice, coordinates (and forces,
    atomic energies), then cohesive and total energy (and force statistics)."""
    out = []
    for k, p in enumerate(predictions):
        if k:
            out.append(" " + "+" * 70 + "\n")
        out.append(f" Structure number  : {k + 1}\n File name         : {p.name}\n"
                   f" Number of atoms   : {p.num_atoms}\n Number of species : {len(set(p.species))}\n\n")
        if p.pbc:
            out.append(" Lattice vectors (Angstrom):\n\n")
            for label, v in zip("abc", p.cell):
                out.append(f"   {label} = ( " + "".join(f"  {x:15.8f}" for x in v) + " )\n")
            out.append("\n")
        show_f = forces and p.forces is not None
        header = " Cartesian atomic coordinates (input)" + (" and corresponding atomic forces" if show_f else "") + ":\n\n"
        cols = "         x               y               z       "
        units = "       (Ang)           (Ang)           (Ang)     "
        if show_f:
            cols += "       Fx              Fy              Fz      "
            units += "     (eV/Ang)        (eV/Ang)        (eV/Ang)   "
        if atomic_energies:
            cols += "    E_atom    "
            units += "     (eV)     "
        out.append(header + cols + "\n" + units + "\n " + "-" * (len(cols) - 1) + "\n")
        table = [p.pos] + ([p.forces] if show_f else []) + ([p.atomic_energies[:, None]] if atomic_energies else [])
        values = np.concatenate(table, axis=1)
        fmt = " {:<2s}" + "  {:14.6f}" * values.shape[1] + "\n"
        out.extend(fmt.format(el, *row) for el, row in zip(p.species, values.tolist()))
        out.append("\n")
        out.append(f" Cohesive energy            :  {p.cohesive_energy:20.8f} eV\n")
        out.append(f" Total energy               :  {p.energy:20.8f} eV\n")
        if show_f and p.num_atoms:
            f = p.forces
            norm2 = (f * f).sum(1)
            imax = int(norm2.argmax())
            vec = lambda v: "".join(f"  {x:12.6f}" for x in v)  # noqa: E731
            out.append(f" Mean force (must be zero)  :{vec(f.mean(0))}\n Mean absolute force        :{vec(np.abs(f).mean(0))}\n"
                       f" Maximum force              :{vec(f[imax])}\n RMS force                  :  {math.sqrt(norm2.mean()):12.6f}\n"
                       f" The maximum force is acting on atom {imax + 1}.\n All forces are given in eV/Angstrom.\n")
        if p.stress is not None:
            out.append(" Stress (eV/Ang^3), rows xyz :" + "".join(f"  {x:12.6f}" for x in p.stress.ravel()) + "\n")
        out.append("\n")
    return "".join(out)


def write_json(path: str | os.PathLike, predictions: Sequence[Prediction]) -> None:
    """A JSON list with one :meth:`Prediction.to_dict` per structure (written atomically)."""
    atomic_write(path, json.dumps([p.to_dict() for p in predictions]))


# ----------------------------------------------------------------------------- command line


DESCRIPTION = "Energies (and forces) of structures with aenet .nn potentials, like aenet's predict.x."
EPILOG = ("examples:\n  aenet-dist predict predict.in\n"
          "  aenet-dist predict --potentials pots/ structures/*.xsf --forces --json out.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aenet-dist predict``."""
    parser.add_argument("inputs", nargs="*", help="predict.in, or structure files/globs (any ASE-readable format) with "
                        "--potentials; after a predict.in, structure files replace its FILES")
    parser.add_argument("--potentials", action="append", default=[], metavar="DIR|FILE[,FILE...]",
                        help="a directory (all *.nn) or .nn files (comma-separated or repeated); element from each file")
    parser.add_argument("--forces", action="store_true", help="compute forces (predict.in: its FORCES keyword also does)")
    parser.add_argument("--stress", action="store_true", help="compute the stress of periodic structures (eV/Å³)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--out", metavar="FILE", help="write the text report here instead of stdout")
    parser.add_argument("--quiet", action="store_true", help="no text report on stdout (needs --json or --out)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                        help="precision of the descriptors and networks: float64 (default; agrees with aenet to rounding) or float32")
    parser.add_argument("--batch-structures", type=int, default=256, help="structures per batch (default 256)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"structure files read and predicted side by side, by forked worker processes (threads where the "
                        f"process cannot fork) (default: the cores this process may use, at most {DEFAULT_MAX_THREADS}); 1 = in this process")


def _check_writable(option: str, target: str | None) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    if not target:
        return
    path = Path(target)
    if path.exists() and path.is_dir():
        raise ValueError(f"{option} {target}: is a directory")
    if path.exists() and not path.is_file():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option} {target}: not writable")
        return  # a device or FIFO, written through
    parent = Path(os.path.realpath(path)).parent
    if not parent.is_dir():
        raise ValueError(f"{option} {target}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {target}: directory {parent} is not writable")


def run(args: argparse.Namespace) -> int:
    """Predict as ``args`` say: the text report (stdout or ``--out``) and ``--json``."""
    setup_logging(0)
    start = time.perf_counter()
    if args.quiet and not (args.json or args.out):
        raise ValueError("--quiet leaves out the text report on stdout, and without --json FILE or --out FILE nothing "
                         "would be written; add one of them, or leave out --quiet")
    for option, target in (("--out", args.out), ("--json", args.json)):
        _check_writable(option, target)  # before the computation, not after it
    forces, atomic_energies = args.forces, False
    inputs = list(args.inputs)
    if args.potentials:
        if not inputs:
            raise ValueError("no structure files given")
        potentials = [p for item in args.potentials for p in item.split(",") if p]
        names = [str(p) for p in expand_inputs(inputs)]
        paths = [Path(n) for n in names]
    else:
        if not inputs or not inputs[0].endswith(".in"):
            raise ValueError("give a predict.in file, or --potentials with structure files")
        inp = read_predict_input(inputs[0])
        potentials = inp.networks
        forces = forces or inp.forces
        atomic_energies = inp.print_atomic_energies
        if inputs[1:]:
            paths = expand_inputs(inputs[1:])
            names = [str(p) for p in paths]
        else:
            paths, names = list(inp.files), list(inp.file_names)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads or default_threads()
    predictor = Predictor.from_potentials(potentials, dtype=args.dtype)
    results = predict_files(predictor, paths, [str(n) for n in names], threads, forces=forces, stress=args.stress,
                            batch_structures=args.batch_structures)
    if args.out:  # asked for by name: --quiet only silences stdout
        atomic_write(args.out, format_aenet(results, forces, atomic_energies))
    elif not args.quiet:
        sys.stdout.write(format_aenet(results, forces, atomic_energies))
    if args.json:
        write_json(args.json, results)
    atoms = sum(p.num_atoms for p in results)
    log.info("predicted %d structures (%d atoms)%s in %.2f s", len(results), atoms, " with forces" if forces else "",
             time.perf_counter() - start)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aenet_dist.predict ...``, the same as ``aenet-dist predict ...``."""
    from .cli import main as cli_main

    return cli_main(["predict", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from .cli import exit_process

    exit_process(main())
