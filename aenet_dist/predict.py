"""Inference with aenet ``.nn`` potentials: energies, forces and stress of many structures at once.

``aenet-dist predict predict.in`` (aenet's ``predict.x`` input) or
``aenet-dist predict --potentials DIR structures/*.xsf --forces --json out.json``.

Engine. Structures are batched; one neighbour list (vesin) per batch, then per element one
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
dG/dR rows, as stored for training) and contracts with :func:`aenet_dist.model.forces_from_dEdG`;
it is kept as an independent cross-check (no stress).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .formats.predict_in import read_predict_input
from .config import DescriptorSetup
from .descriptors import PairTables, featurize, pair_gradient, pair_tables, pair_values, sub_batches
from .export import element_net_from_nn, setup_from_nn
from .formats.nn import read_nn
from .log import get_logger, setup_logging
from .files import atomic_write
from .model import AtomicModel, forces_from_dEdG
from .neighbors import neighbor_list
from .structures import Structure, from_ase, read_xsf

log = get_logger(__name__)

DTYPES = {"float64": torch.float64, "float32": torch.float32}
PAIR_BUDGET = {"cpu": 20_000, "cuda": 2_000_000}
"""Pairs per vectorized sub-batch: on CPU the temporaries then stay in cache; on GPU, large."""
SINGLE_THREAD_PAIRS = 100_000
"""CPU batches with fewer pairs run on one intra-op thread: their tensors are too small to gain
from threads, and on a busy machine waking idle OpenMP threads costs milliseconds per op
(measured 93 ms vs 4 ms for a 32-atom cell with 2 threads on 2 loaded cores)."""


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


def _element_pass(t: PairTables, net, row, env, r, vec, num_centers: int, with_grad: bool):
    """Atomic energies of one element's centers and, with ``with_grad``, ∂E/∂R_ij of its pairs.

    The descriptor side (values, and the adjoint ∂E/∂G -> ∂E/∂R_ij) is :mod:`aenet_dist.descriptors`';
    here only the network and its input gradient.

    Args:
        row: (P,) center row of each pair; env: (P,) ENV position of the neighbour;
        r: (P,) distances, vec: (P, 3) pair vectors R_ij (all pairs within the setup's cutoff).
    Returns:
        (energies (C,), pair gradient (P, 3) or None).
    """
    G, state = pair_values(t, row, env, r, vec, num_centers)
    if not with_grad:
        return net(G), None
    with torch.enable_grad():
        G.requires_grad_(True)
        energy = net(G)
        (dE_dG,) = torch.autograd.grad(energy.sum(), G)
    return energy.detach(), pair_gradient(t, row, env, r, vec, dE_dG, state)


@contextlib.contextmanager
def _intra_op_threads(num: int | None):
    """Run the block with ``num`` torch intra-op threads (None: unchanged), then restore."""
    before = torch.get_num_threads()
    if num is not None and num != before:
        torch.set_num_threads(num)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


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
    """Energies, forces and stress of structures with one network and descriptor setup per element.

    Args:
        model: the networks (:class:`~aenet_dist.model.AtomicModel`); moved to ``device``/``dtype``.
        setups: descriptor setup per element (the species of ``model``).
        species: element order (default: the model's).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: float64 (default, agrees with aenet to rounding) or float32.
        sources: element -> file name, used in error messages.
    """

    def __init__(self, model: AtomicModel, setups: Mapping[str, DescriptorSetup], species: Sequence[str] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                 sources: Mapping[str, str] | None = None):
        species = tuple(species) if species is not None else tuple(model.species)
        if set(species) != set(setups) or set(species) != set(model.species):
            raise ValueError(f"species {list(species)}, setups {list(setups)} and networks {list(model.species)} differ")
        check_setups({el: setups[el] for el in species}, sources)
        for el in species:
            if model.nets[el].num_features != setups[el].num_features:
                raise ValueError(f"{(sources or {}).get(el, el)}: network has {model.nets[el].num_features} inputs "
                                 f"but the descriptor setup gives {setups[el].num_features} features")
        self.species = species
        self.setups = {el: setups[el] for el in species}
        self.sources = dict(sources or {})
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cutoff = max(s.basis.max_cutoff for s in self.setups.values())
        self._tables = {el: pair_tables(self.setups[el], species, dtype, self.device) for el in species}
        self._e_atom = torch.tensor([float(self.model.nets[el].e_atom) for el in species], dtype=torch.float64)

    @classmethod
    def from_potentials(cls, potentials, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> "Predictor":
        """Build from aenet binary ``.nn`` files.

        Args:
            potentials: {element: path}, or a directory (all its ``*.nn`` files), or a list of
                files and directories; the element of a file is its atomtype record.
        Raises:
            ValueError naming the file for unreadable or truncated files, two files for one element,
            setups that disagree on the ENV species, or an ENV species without a file.
        """
        paths = potential_paths(potentials)
        files = {el: read_nn(p) for el, p in paths.items()}
        for el, nn in files.items():
            if nn.atomtype != el:
                raise ValueError(f"{paths[el]}: potential is for atom type {nn.atomtype!r}, but was given for {el!r}")
        sources = {el: str(p) for el, p in paths.items()}
        setups = {el: setup_from_nn(nn, sources[el]) for el, nn in files.items()}
        check_setups(setups, sources)
        nets = {el: element_net_from_nn(nn, dtype=dtype, source=sources[el]) for el, nn in files.items()}
        species = tuple(paths)
        return cls(AtomicModel(nets, species), setups, species, device=device, dtype=dtype, sources=sources)

    # ------------------------------------------------------------------ checks

    def check_structures(self, structures: Sequence[Structure]) -> None:
        """Every species of every structure needs a potential (error names the structure and species)."""
        known = set(self.species)
        for s in structures:
            unknown = sorted(set(s.species) - known)
            if unknown:
                raise ValueError(f"{s.name}: species {unknown} have no potential (potentials for {list(self.species)})")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict(self, structures: Sequence[Structure], forces: bool = True, stress: bool = False,
                batch_structures: int = 256, pair_budget: int | None = None, engine: str = "pairs") -> list[Prediction]:
        """Energies (and forces, stress) of ``structures``.

        Args:
            structures: any number; processed ``batch_structures`` at a time (one neighbour list each).
            forces: compute forces −∂E/∂R (eV/Å).
            stress: compute the stress (periodic structures only; None for isolated ones).
            pair_budget: pairs per vectorized sub-batch (default: 20k on CPU, 2M on GPU).
            engine: ``pairs`` (default) or ``rows`` (featurize + sparse dG rows; no stress).
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
        budget = pair_budget or PAIR_BUDGET.get(self.device.type, PAIR_BUDGET["cuda"])
        out: list[Prediction] = []
        for b0 in range(0, len(structures), batch_structures):
            chunk = structures[b0 : b0 + batch_structures]
            if engine == "pairs":
                energy, frc, virial = self._evaluate_pairs(chunk, forces, stress, budget)
            else:
                energy, frc, virial = self._evaluate_rows(chunk, forces, budget)
            out.extend(self._results(chunk, energy, frc, virial))
        return out

    def _species_index(self, structures: Sequence[Structure]) -> np.ndarray:
        """(A,) int64 index into ``self.species`` of every atom (species already checked)."""
        symbols = np.concatenate([np.asarray(s.species, dtype=str) for s in structures])
        names = np.array(sorted(self.species))
        return np.array([self.species.index(n) for n in names], dtype=np.int64)[np.searchsorted(names, symbols)]

    def _evaluate_pairs(self, structures, with_forces: bool, with_stress: bool, budget: int):
        """Atomic energies (A,), forces (A, 3) or None, per-structure virial Σ g⊗R (S, 3, 3) or None; CPU float64."""
        device, dtype = self.device, self.dtype
        num_atoms = np.array([s.num_atoms for s in structures], dtype=np.int64)
        atom_offset = np.r_[0, np.cumsum(num_atoms)]
        species_index = torch.from_numpy(self._species_index(structures)).to(device)
        nbr = neighbor_list([s.pos for s in structures], [s.cell for s in structures], [s.pbc for s in structures],
                            self.cutoff, dtype, device)
        pair_count = nbr.pair_count.numpy()
        pair_offset = np.r_[0, np.cumsum(pair_count)]
        with _intra_op_threads(1 if device.type == "cpu" and int(pair_offset[-1]) < SINGLE_THREAD_PAIRS else None):
            return self._pair_passes(structures, species_index, atom_offset, nbr, pair_offset, with_forces, with_stress, budget)

    def _pair_passes(self, structures, species_index, atom_offset, nbr, pair_offset, with_forces, with_stress, budget):
        """The per-element passes over sub-batches of about ``budget`` pairs (see :meth:`_evaluate_pairs`)."""
        device, dtype = self.device, self.dtype
        with_grad = with_forces or with_stress
        pair_count = nbr.pair_count.numpy()
        total = int(atom_offset[-1])
        energy = torch.zeros(total, dtype=dtype, device=device)
        forces = torch.zeros((total, 3), dtype=dtype, device=device) if with_forces else None
        virial = torch.zeros((len(structures), 9), dtype=dtype, device=device) if with_stress else None
        for s0, s1 in sub_batches(pair_count, budget):
            a0, a1, p0, p1 = (int(v) for v in (atom_offset[s0], atom_offset[s1], pair_offset[s0], pair_offset[s1]))
            center, neighbor = nbr.center[p0:p1], nbr.neighbor[p0:p1]
            vec, dist = nbr.vec[p0:p1], nbr.dist[p0:p1]
            center_species = species_index[center]
            neighbor_species = species_index[neighbor]
            for k, el in enumerate(self.species):
                t = self._tables[el]
                atoms = torch.nonzero(species_index[a0:a1] == k).squeeze(1) + a0  # shape (C,)
                if atoms.numel() == 0:
                    continue
                row_of_atom = torch.full((a1 - a0,), -1, dtype=torch.int64, device=device)
                row_of_atom[atoms - a0] = torch.arange(atoms.numel(), device=device)
                env = t.env_of_type[neighbor_species]
                sel = torch.nonzero((center_species == k) & (env >= 0) & (dist < t.setup.basis.max_cutoff)).squeeze(1)
                e, g = _element_pass(t, self.model.nets[el], row_of_atom[center[sel] - a0], env[sel], dist[sel],
                                     vec[sel], atoms.numel(), with_grad)
                energy[atoms] = e
                if g is None:
                    continue
                if with_forces:
                    forces.index_add_(0, center[sel], g).index_add_(0, neighbor[sel], g, alpha=-1.0)
                if with_stress:
                    pair_structure = torch.searchsorted(torch.as_tensor(pair_offset[1:], device=device), sel + p0, right=True)
                    virial.index_add_(0, pair_structure, (g[:, :, None] * vec[sel][:, None, :]).reshape(-1, 9))
        to_cpu = lambda x: None if x is None else x.to("cpu", torch.float64)  # noqa: E731
        return to_cpu(energy), to_cpu(forces), None if virial is None else to_cpu(virial).view(-1, 3, 3)

    def _evaluate_rows(self, structures, with_forces: bool, budget: int):
        """The same through featurize's sparse dG/dR rows and the model's force contraction."""
        species_index, feats = featurize(structures, self.setups, self.species, [with_forces] * len(structures),
                                         dtype=self.dtype, device=self.device, pair_budget=budget)
        total = species_index.numel()
        energy = torch.zeros(total, dtype=self.dtype, device=self.device)
        G, rows = {}, {}
        for el, f in feats.items():
            if f.atom_index.numel() == 0:
                continue
            G[el] = f.G.to(self.dtype).requires_grad_(with_forces)
            if with_forces and f.deriv_center.numel():
                row_of_atom = torch.full((total,), -1, dtype=torch.int64, device=self.device)
                row_of_atom[f.atom_index] = torch.arange(f.atom_index.numel(), device=self.device)
                rows[el] = (row_of_atom[f.deriv_center], f.deriv_neighbor, f.dG.to(self.dtype).transpose(1, 2))
        with torch.enable_grad():
            atomic = self.model(G)
            if with_forces:
                grads = torch.autograd.grad(sum(e.sum() for e in atomic.values()), list(G.values()))
        for el, e in atomic.items():
            energy[feats[el].atom_index] = e.detach()
        forces = None
        if with_forces:
            forces = forces_from_dEdG(dict(zip(G, grads)), rows, total)
        return energy.cpu().double(), None if forces is None else forces.cpu().double(), None

    def _results(self, structures, energy: torch.Tensor, forces, virial) -> list[Prediction]:
        """Split flat per-atom results into one :class:`Prediction` per structure."""
        e_atom_of = self._e_atom[torch.from_numpy(self._species_index(structures))]
        num_atoms = [s.num_atoms for s in structures]
        e_parts = torch.split(energy, num_atoms)
        coh_parts = torch.split(energy - e_atom_of, num_atoms)
        f_parts = torch.split(forces, num_atoms) if forces is not None else [None] * len(structures)
        out = []
        for k, s in enumerate(structures):
            stress = None
            if virial is not None and s.pbc:
                w = virial[k].numpy()
                stress = 0.5 * (w + w.T) / abs(float(np.linalg.det(s.cell)))
            out.append(Prediction(
                name=s.name, species=tuple(s.species), pos=s.pos, cell=s.cell, pbc=s.pbc,
                energy=float(e_parts[k].sum()), cohesive_energy=float(coh_parts[k].sum()),
                atomic_energies=e_parts[k].numpy().copy(),
                forces=None if f_parts[k] is None else f_parts[k].numpy().copy(), stress=stress,
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
    parser.add_argument("--quiet", action="store_true", help="no text report (with --json)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    parser.add_argument("--batch-structures", type=int, default=256, help="structures per batch (default 256)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads (default 1: as fast on a quiet machine and robust beside "
                             "other work; 0 = torch's choice, one per core)")


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
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
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
    predictor = Predictor.from_potentials(potentials, device=args.device, dtype=DTYPES[args.dtype])
    structures = [s for p, n in zip(paths, names) for s in read_for_prediction(p, n)]
    results = predictor.predict(structures, forces=forces, stress=args.stress, batch_structures=args.batch_structures)
    if not args.quiet:
        text = format_aenet(results, forces, atomic_energies)
        if args.out:
            atomic_write(args.out, text)
        else:
            sys.stdout.write(text)
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
