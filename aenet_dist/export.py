"""Conversion between trained networks and aenet ``.nn`` files, and the export command.

The file format itself (records, binary and ASCII reading and writing) is
:mod:`aenet_dist.formats.nn`; this module turns an :class:`NNFile` into a descriptor setup and an
:class:`ElementNet` and back, and writes one ``.nn`` file per element from a training run.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DescriptorSetup
from .formats.nn import DESCRIPTION_LEN, NENV_MAX, NSFPARAM, PATH_LEN, NNFile, network_layout, write_nn, write_nn_ascii
from .model import ElementNet, NetworkConfig, model_from_facts
from .potential import ElementPotential, setup_from_nn  # setup_from_nn: re-exported (it lives there)

__all__ = ["TrainSetInfo", "setup_from_nn", "element_net_from_nn", "nn_from_element_net", "resolve_checkpoint",
           "load_run_model", "train_set_info", "export_run", "add_arguments", "run", "main"]


@dataclass(frozen=True)
class TrainSetInfo:
    """Training-set records of a ``.nn`` file (27-36) other than scale/shift (taken from the net).

    Attributes:
        type_names: all species of the training set, aenet TYPES order.
        atomic_energies: reference energy per type, eV (same order).
        train_file: name of the training-set file (kept for the record).
        normalized: whether energies were normalized (aenet writes .true.).
        num_atoms_total, num_structures: training-set size.
        e_min, e_max, e_avg: per-atom energy range and mean, eV/atom.
    """

    type_names: tuple[str, ...]
    atomic_energies: tuple[float, ...]
    train_file: str = ""
    normalized: bool = True
    num_atoms_total: int = 0
    num_structures: int = 0
    e_min: float = 0.0
    e_max: float = 0.0
    e_avg: float = 0.0

    def __post_init__(self):
        if len(self.type_names) != len(self.atomic_energies):
            raise ValueError(f"type_names {self.type_names} and atomic_energies {self.atomic_energies} differ in length")

    @classmethod
    def from_nn(cls, nn: NNFile) -> "TrainSetInfo":
        return cls(tuple(nn.type_names), tuple(float(e) for e in nn.e_atom), nn.train_file, nn.normalized,
                   nn.num_atoms_total, nn.num_structures, nn.e_min, nn.e_max, nn.e_avg)


def element_net_from_nn(nn: NNFile, dtype: torch.dtype = torch.float64, source: str = "") -> ElementNet:
    """Build the :class:`ElementNet` (weights, normalization, energy scaling) of a ``.nn`` file.

    The file's network records are checked, and its weights read, by
    :meth:`ElementPotential.from_nn <aenet_dist.potential.ElementPotential.from_nn>` (one place for
    those checks and messages); this adds the torch module.
    """
    potential = ElementPotential.from_nn(nn, np.float64, source)
    config = NetworkConfig(hidden=tuple(int(n) for n in nn.nnodes[1:-1]), activations=potential.activations[:-1],
                           output_activation=potential.activations[-1])
    net = ElementNet(potential.num_features, config, nn.atomtype, dtype=dtype)
    with torch.no_grad():
        for layer, (w, b) in zip(net.layers, potential.weights):
            layer.weight.copy_(torch.from_numpy(w.copy()))  # (a copy: the potential's arrays are read-only)
            layer.bias.copy_(torch.from_numpy(b.copy()))
    net.set_feature_stats(nn.sfval_min, nn.sfval_max, nn.sfval_avg, nn.sfval_cov, nn.neval)
    net.set_energy_scaling(nn.scale, nn.shift, nn.e_atom_of(nn.atomtype))
    return net


def _as_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().copy()


def nn_from_element_net(net: ElementNet, setup: DescriptorSetup, train_info: TrainSetInfo) -> NNFile:
    """The ``.nn`` file content for ``net`` with descriptor ``setup`` and training-set ``train_info``.

    Chebyshev setups are written as aenet does (``read_basis_chebyshev``): sfparam(1:4, 1) =
    (Rr, Nr, Ra, Na), everything else 0; sf and sfenv all 0. Behler2011 setups as
    ``read_symmfunc_Behler2011``: per function (file order) its kind, four parameters and the
    1-based ENV positions of type2/type3. Scale and shift come from the net.
    """
    if setup.element != net.element:
        raise ValueError(f"setup is for {setup.element!r} but the network is for {net.element!r}")
    if setup.num_features != net.num_features:
        raise ValueError(f"{setup.element}: setup has {setup.num_features} features, network {net.num_features}")
    if setup.element not in train_info.type_names:
        raise ValueError(f"{setup.element!r} is not among the training-set types {list(train_info.type_names)}")
    e_ref = train_info.atomic_energies[train_info.type_names.index(setup.element)]
    e_net = float(net.e_atom)
    if abs(e_net - e_ref) > 1e-6 * max(1.0, abs(e_ref)):
        raise ValueError(f"{setup.element}: network's atomic energy {e_net} differs from the training set's {e_ref}")
    nnodes = np.array([net.num_features, *net.config.hidden, 1], dtype=np.int32)
    nnodes_max, Wsize, nvalues, iw, iv = network_layout(nnodes)
    W = np.concatenate([
        np.concatenate([_as_f64(layer.weight), _as_f64(layer.bias)[:, None]], axis=1).ravel(order="F")
        for layer in net.layers])
    nsf = setup.num_features
    sfparam = np.zeros((NSFPARAM, nsf))
    sf = np.zeros(nsf, dtype=np.int32)
    sfenv = np.zeros((NENV_MAX, nsf), dtype=np.int32)
    b = setup.basis
    if setup.basis_type == "behler2011":  # read_symmfunc_Behler2011: functions in file order, ENV positions 1-based
        for n, f in enumerate(b.functions):
            sf[n] = f.kind
            sfparam[:, n] = f.sfparam
            sfenv[0, n] = setup.env_species.index(f.type2) + 1
            sfenv[1, n] = setup.env_species.index(f.type3) + 1 if f.angular else 0
    else:
        sfparam[:, 0] = (b.radial_cutoff, b.radial_order, b.angular_cutoff, b.angular_order)
    description = setup.description.encode("latin-1", "replace")[:DESCRIPTION_LEN].decode("latin-1")
    return NNFile(
        nnodes=nnodes, activations=np.array(net.config.activation_codes, dtype=np.int32), iw=iw, iv=iv, W=W,
        nnodes_max=nnodes_max, Wsize=Wsize, nvalues=nvalues,
        description=description, atomtype=setup.element, envtypes=tuple(setup.env_species),
        rc_min=float(setup.rmin), rc_max=float(b.max_cutoff), sftype="Behler2011" if setup.basis_type == "behler2011" else "Chebyshev",
        sf=sf, sfparam=sfparam, sfenv=sfenv,
        neval=int(net.neval), sfval_min=_as_f64(net.sfval_min), sfval_max=_as_f64(net.sfval_max),
        sfval_avg=_as_f64(net.sfval_avg), sfval_cov=_as_f64(net.sfval_cov),
        train_file=train_info.train_file, normalized=bool(train_info.normalized),
        scale=float(net.scale), shift=float(net.shift), type_names=tuple(train_info.type_names),
        e_atom=np.array(train_info.atomic_energies, dtype=np.float64), num_atoms_total=int(train_info.num_atoms_total),
        num_structures=int(train_info.num_structures), e_min=float(train_info.e_min), e_max=float(train_info.e_max),
        e_avg=float(train_info.e_avg),
    )


def resolve_checkpoint(run_dir: str | os.PathLike, checkpoint: str = "best") -> Path:
    """``best`` -> run_dir/checkpoints/best.pt, ``latest`` -> the newest checkpoint_NNNNNN.pt, else a path."""
    from .checkpoint import Checkpointer

    run_dir = Path(run_dir)
    if checkpoint == "best":
        path = run_dir / "checkpoints" / "best.pt"
    elif checkpoint == "latest":
        path = Checkpointer(run_dir).latest()
        if path is None:
            raise ValueError(f"{run_dir}: no checkpoint_NNNNNN.pt in {run_dir / 'checkpoints'} (was the run trained?)")
    else:
        path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"{path}: checkpoint not found (run directory {run_dir})")
    return path


def load_run_model(checkpoint_path: str | os.PathLike, store: str | os.PathLike | None = None):
    """The trained model of a checkpoint in float64, with the facts of its store and its config.

    Checkpoints carry their store's facts (setups, feature counts, float64 statistics, energy
    records: ``StoreReader.facts``), so the store is not needed; checkpoints from before that
    take them from the store (``store``, default the path in the checkpoint's config).

    The networks' normalization and energy scaling are the float64 statistics whenever the
    checkpoint's buffers agree with them to float32 precision (so a float32 run exports the
    exact statistics, not float32-rounded ones); otherwise (weights fine-tuned with another
    store's normalization) the checkpoint's own buffers are kept.

    Returns:
        (model (AtomicModel, float64, eval mode), store facts (dict), TrainConfig).
    Raises:
        ValueError: unreadable checkpoint; an older checkpoint whose store is gone (with the path
            it was looked for at) or whose store's fingerprint differs.
    """
    from . import checkpoint as ckpt
    from .config import TrainConfig

    checkpoint_path = Path(checkpoint_path)
    try:
        state = ckpt.load(checkpoint_path)
    except ValueError:
        if checkpoint_path.is_dir():
            raise ValueError(f"{checkpoint_path}: is a directory, not a checkpoint file; give a file such as "
                             f"{checkpoint_path / 'checkpoints' / 'best.pt'}") from None
        if not checkpoint_path.is_file():  # a path gone meanwhile: the reason as it is
            raise
        # torch's reason for a file ("[Errno 22] Invalid argument", a miniz error) does not help the user
        raise ValueError(f"{checkpoint_path}: not a readable aenet_dist checkpoint: the file ({checkpoint_path.stat().st_size} "
                         f"bytes) is truncated or damaged, or not a checkpoint; {_other_checkpoints(checkpoint_path)}") from None
    if "config" not in state or "model" not in state:
        raise ValueError(f"{checkpoint_path}: not an aenet_dist training checkpoint (no 'config'/'model')")
    config = TrainConfig.from_dict(state["config"], source=str(checkpoint_path))
    facts = state.get("store_facts")
    if facts is None:  # a checkpoint from before store facts: read them from the store
        from .store import StoreReader

        store_path = Path(store) if store is not None else Path(config.data.store)
        if not (store_path / "zarr.json").exists():
            raise ValueError(
                f"{checkpoint_path}: the feature store it was trained on, {store_path}, is gone; its descriptor setups and "
                f"training-set records are needed for the .nn files. Pass the store's current path with --store")
        reader = StoreReader(store_path)
        if state.get("store_fingerprint") not in (None, reader.fingerprint):
            raise ValueError(f"{checkpoint_path}: trained on a store with fingerprint {str(state['store_fingerprint'])[:12]}, "
                             f"but {store_path} has {reader.fingerprint[:12]} (a different store)")
        facts = reader.facts()
    model = model_from_facts(facts, config.model.network_for, torch.float64)
    exact = {k: v.clone() for k, v in model.state_dict().items()}
    mismatch = ckpt.weights_mismatch(model.state_dict(), state["model"])
    if mismatch:
        raise ValueError(f"{checkpoint_path}: weights do not fit the model of its config and store ({mismatch})")
    model.load_state_dict(state["model"])
    with torch.no_grad():
        for el, net in model.nets.items():
            names = ("sfval_min", "sfval_max", "sfval_avg", "sfval_cov", "scale", "shift", "e_atom")
            same = all(torch.allclose(getattr(net, n), exact[f"nets.{el}.{n}"], rtol=1e-6, atol=1e-30) for n in names)
            if same:
                net.set_feature_stats(*(exact[f"nets.{el}.{n}"] for n in names[:4]), int(net.neval))
                net.set_energy_scaling(*(float(exact[f"nets.{el}.{n}"]) for n in names[4:]))
    return model.eval(), facts, config


def _other_checkpoints(path: Path) -> str:
    """What to try instead of the unreadable checkpoint ``path``: the run's other checkpoints, as ``--checkpoint`` values."""
    from .checkpoint import Checkpointer

    if path.parent.name != "checkpoints":
        return "give another checkpoint with --checkpoint (best, latest or a path)"
    checkpoints = Checkpointer(path.parent.parent)
    best = path.parent / "best.pt"
    others = [p for p in reversed(checkpoints.all()) if p != path and p.stat().st_size]
    choices = []
    if path.name == "best.pt" and others:
        choices.append(f"--checkpoint latest ({others[0].name})")
    elif path.name != "best.pt" and best.exists() and best.stat().st_size:
        choices.append("--checkpoint best")
    choices += [f"--checkpoint {p}" for p in others[1 if path.name == "best.pt" else 0:][:2]]
    if not choices:
        return f"the run has no other checkpoint in {path.parent}"
    return "try another checkpoint of the run: " + ", or ".join(choices)


def train_set_info(facts: dict) -> TrainSetInfo:
    """The ``.nn`` training-set records of a store's facts: types, E_atom, sizes, cohesive energy per atom range."""
    energy = facts["energy_per_atom"]
    return TrainSetInfo(
        type_names=tuple(facts["species"]),
        atomic_energies=tuple(float(facts["atomic_energies"][el]) for el in facts["species"]),
        train_file=str(facts["store_path"])[:PATH_LEN],
        normalized=True,
        num_atoms_total=int(facts["num_atoms"]),
        num_structures=int(facts["num_structures"]),
        e_min=float(energy["min"]), e_max=float(energy["max"]), e_avg=float(energy["mean"]),
    )


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, checkpoint: str = "best", ascii: bool = False,
               store: str | os.PathLike | None = None) -> list[Path]:
    """Write one aenet ``<El>.nn`` per element (and ``<El>.nn.ascii`` with ``ascii``) from a training run.

    Args:
        run_dir: the run directory of ``aenet-dist train``.
        out_dir: where to write (created if needed).
        checkpoint: ``best``, ``latest`` or a checkpoint path.
        ascii: also write the ASCII form (aenet-PyTorch's ``nnASCII2bin`` input).
        store: the feature store, if it moved since training.
    Returns:
        The written paths, binary files first.
    """
    from .config import DescriptorSetup as _Setup

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # before the work, and not as "[Errno 17] File exists"
        raise ValueError(f"--out {out_dir}: exists and is not a directory; give a directory for the .nn files "
                         "(it is created if missing)")
    path = resolve_checkpoint(run_dir, checkpoint)
    model, facts, _ = load_run_model(path, store)
    untrained = [el for el in facts["species"] if int(facts["stats"][el]["count"]) == 0]
    if untrained:
        raise ValueError(f"{facts['store_path']}: no atoms of {', '.join(untrained)} in the store, so its network was never trained "
                         "and a .nn file for it would be random weights; featurize structures with it, or leave it out of TYPES")
    info = train_set_info(facts)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {el: nn_from_element_net(model.nets[el], _Setup.from_dict(facts["setups"][el]), info) for el in facts["species"]}
    written = []
    for el, nn in files.items():
        write_nn(out_dir / f"{el}.nn", nn)
        written.append(out_dir / f"{el}.nn")
    if ascii:
        for el, nn in files.items():
            write_nn_ascii(out_dir / f"{el}.nn.ascii", nn)
            written.append(out_dir / f"{el}.nn.ascii")
    return written


DESCRIPTION = "Write aenet .nn potential files (one per element) from a training run."
EPILOG: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aenet-dist export RUN_DIR --out DIR [--checkpoint best|latest|PATH] [--ascii] [--store PATH]``."""
    parser.add_argument("run_dir", help="run directory of aenet-dist train (holds checkpoints/)")
    parser.add_argument("--out", required=True, help="output directory for <El>.nn")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a checkpoint file")
    parser.add_argument("--ascii", action="store_true", help="also write <El>.nn.ascii (aenet-PyTorch's ASCII form)")
    parser.add_argument("--store", help="the feature store, if it is no longer where the run's config says")


def run(args: argparse.Namespace) -> int:
    """Export the run's networks and print the written paths."""
    for path in export_run(args.run_dir, args.out, args.checkpoint, args.ascii, args.store):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aenet_dist.export ...``, the same as ``aenet-dist export ...``."""
    from .cli import main as cli_main

    return cli_main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
