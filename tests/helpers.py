"""Helpers shared by the test modules: a small training configuration and in-process CLI runs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
from pathlib import Path


def write_train_toml(path: Path, store, run_dir, epochs: int = 3, batch_size: int = 8, extra: str = "", data_extra: str = "") -> Path:
    """A small float64 CPU training configuration (2 x 6 tanh, Adam 0.01, α 0.3, 20 % test)."""
    path.write_text(
        f"""
[data]
store = "{store}"
test_percent = 20
cache = "memory"
{data_extra}
[model]
hidden = [6, 6]
[optim]
method = "adam"
lr = 0.01
[loss]
force_weight = 0.3
[run]
epochs = {epochs}
batch_size = {batch_size}
dtype = "float64"
device = "cpu"
run_dir = "{run_dir}"
{extra}
"""
    )
    return path


def featurized_emt(base: Path, num_structures: int, seed: int, force_percent: float, chunk_bytes: int = 2**18) -> tuple[Path, Path]:
    """(generate.in, store) of an EMT data set made in ``base/data`` and featurized to ``base/emt.zarr``."""
    from aenet_dist.formats.generate_in import read_generate_input
    from aenet_dist.config import StoreOptions
    from aenet_dist.datasets import generate_emt_dataset
    from aenet_dist.store import featurize_to_store

    generate_in = generate_emt_dataset(base / "data", num_structures=num_structures, seed=seed, force_percent=force_percent)
    store = base / "emt.zarr"
    featurize_to_store(read_generate_input(generate_in), store, StoreOptions(chunk_bytes=chunk_bytes), progress=False)
    return generate_in, store


FAULTS = Path(__file__).resolve().parent / "faults"


def fault_env(base: dict | None = None, step_delay: float = 0.0, block_delay: float = 0.0, nan_at: tuple[int, int] | None = None) -> dict:
    """An environment for subprocesses with tests/faults/sitecustomize.py injecting delays
    (seconds before each training step / after each featurize block), or a NaN into the batch of
    one (rank, step)."""
    import os

    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH", "")) if p)
    env["AENET_DIST_FAULT_STEP_DELAY"] = str(step_delay)
    env["AENET_DIST_FAULT_BLOCK_DELAY"] = str(block_delay)
    env["AENET_DIST_FAULT_NAN"] = "" if nan_at is None else f"{nan_at[0]}:{nan_at[1]}"
    return env


def run_in_process(main, args) -> subprocess.CompletedProcess:
    """Run a CLI ``main(argv)`` here, capturing stdout and stderr (no interpreter start-up)."""
    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def read_metrics(run_dir) -> list[dict]:
    """metrics.jsonl, strictly parsed (NaN is not JSON), with null (no forces, no test) as NaN: the same
    object each time, so that lists of records compare equal."""
    return [{k: math.nan if v is None else v for k, v in json.loads(line, parse_constant=_not_json).items()}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _not_json(name: str):
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


def predict(model, batch, with_forces: bool, create_graph: bool):
    """The autograd reference the lean step is checked against: cohesive structure energies (B,)
    and, if asked, forces (A, 3) of a batch, through ``torch.autograd.grad`` of the energies with
    respect to the descriptors, then the sparse rows and the dense size groups."""
    import torch

    from aenet_dist.model import forces_from_dEdG

    with_forces = with_forces and (bool(batch.deriv) or bool(batch.dense))
    G = {el: g.requires_grad_(with_forces) for el, g in batch.G.items()}
    atomic = model(G, cohesive=True)
    energy = torch.zeros(batch.num_atoms.numel(), dtype=next(iter(atomic.values())).dtype, device=batch.num_atoms.device)
    for el, e in atomic.items():
        energy = energy.index_add(0, batch.atom_structure[el], e)
    if not with_forces:
        return energy, None
    elements = sorted(set(batch.deriv) | set(batch.dense))
    with torch.enable_grad():
        grads = torch.autograd.grad(energy.sum(), [G[el] for el in elements], create_graph=create_graph, allow_unused=True)
    dE_dG = {el: (g if g is not None else torch.zeros_like(G[el])) for el, g in zip(elements, grads)}
    forces = forces_from_dEdG(dE_dG, batch.deriv, batch.total_atoms)
    for el, blocks in batch.dense.items():
        g = dE_dG[el]
        for block in blocks:
            contrib = torch.bmm(block.D, g[block.rows].flatten(1).unsqueeze(-1))  # shape (B_g, 3n, 1)
            forces = forces.index_add(0, block.atoms.flatten(), contrib.view(-1, 3), alpha=-1.0)
    return energy, forces


def moved(structure, pos=None, cell=None):
    """``structure`` with other positions and/or cell (the rest unchanged)."""
    import dataclasses

    return dataclasses.replace(structure, pos=structure.pos if pos is None else pos, cell=structure.cell if cell is None else cell)


def fd_force(predictor, structure, atom: int, d: int, h: float = 1e-5) -> float:
    """−∂E/∂R_(atom, d) by a central difference of the predictor's energies."""
    energies = []
    for sign in (1, -1):
        pos = structure.pos.copy()
        pos[atom, d] += sign * h
        energies.append(predictor.predict([moved(structure, pos)], forces=False)[0].energy)
    return -(energies[0] - energies[1]) / (2 * h)


def fd_stress(predictor, structure, a: int, b: int, h: float = 1e-5) -> float:
    """(1/V) ∂E/∂ε_ab (ASE's sign) by a central difference over a symmetric strain of cell and positions."""
    import numpy as np

    energies = []
    for sign in (1, -1):
        strain = np.eye(3)
        strain[a, b] += sign * h / (2 if a != b else 1)
        strain[b, a] += sign * h / 2 if a != b else 0
        strained = moved(structure, structure.pos @ strain, structure.cell @ strain)
        energies.append(predictor.predict([strained], forces=False)[0].energy)
    return (energies[0] - energies[1]) / (2 * h) / abs(np.linalg.det(structure.cell))
