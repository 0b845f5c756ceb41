"""Plots of a training run: ``aenet-dist plot RUN_DIR`` -> learning_curves.png, parity.png.

* ``learning_curves.png``: train and test RMSE of energies (meV/atom) and forces (eV/Å) per
  epoch from ``run_dir/metrics.jsonl``, log y axis.
* ``parity.png``: reference (DFT) vs predicted cohesive energy per atom, reference vs
  predicted force components, and the distribution of the angle between predicted and
  reference force per atom (|F_ref| > ``run.angle_min_force``; the aenet-PyTorch paper's
  Figs. 6c and 7c), train and test structures apart (the run's split:
  :func:`aenet_dist.loader.split_test` with its ``data.test_percent``/``data.split_seed``),
  evaluated with a checkpoint (default ``best``) on the run's store.

matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .batching import gather_batch, shard_from_range
from .export import load_run_model, resolve_checkpoint
from .loader import split_test
from .store import StoreReader
from .files import atomic_write
from .step import forward

FIGSIZE = {"learning_curves": (9.0, 4.0), "parity": (15.0, 4.5)}
DPI = 100
"""Images are FIGSIZE * DPI pixels: learning_curves.png 900x400, parity.png 1500x450."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The epoch records of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{path}: no metrics (has the run finished an epoch?)")
    records = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{k}: not JSON: {err}") from None
    if not records:
        raise ValueError(f"{path}: empty")
    return records


def plot_learning_curves(metrics: list[dict], out: str | os.PathLike) -> Path:
    """Train/test energy and force RMSE vs epoch (log y) -> PNG."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE["learning_curves"], dpi=DPI)
    epochs = [m["epoch"] for m in metrics]
    panels = (("energy", "meV_atom", "RMSE energy (meV/atom)"), ("forces", "eV_A", "RMSE forces (eV/Å)"))
    for ax, (what, unit, label) in zip(axes, panels):
        for split, style in (("train", "-"), ("test", "--")):
            values = [m.get(f"{split}_rmse_{what}_{unit}", float("nan")) for m in metrics]
            # Only the finite points: with run.eval_every > 1 the test errors of the epochs between
            # evaluations are NaN, and a line broken at every NaN would show nothing.
            points = [(e, v) for e, v in zip(epochs, values) if v is not None and math.isfinite(v) and v > 0]
            if points:
                ax.plot(*zip(*points), style, marker="o" if len(points) < 30 else None, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        if ax.lines:
            ax.set_yscale("log")
            ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def evaluate_run(run_dir: str | os.PathLike, checkpoint: str = "best", store: str | None = None,
                 device: str = "cpu") -> dict[str, np.ndarray]:
    """Predictions of a checkpoint on every structure of the run's store.

    Returns:
        dict: ``energy_ref``/``energy_pred`` (S,) cohesive eV/atom, ``test`` (S,) bool,
        ``force_ref``/``force_pred`` (A_f, 3) eV/Å for the structures with derivatives,
        ``force_test`` (A_f,) bool.
    """
    model, facts, config = load_run_model(resolve_checkpoint(run_dir, checkpoint), store)
    model = model.to(device)
    reader = StoreReader(store or facts.get("store_path") or config.data.store)  # the parity plot evaluates the data
    test = split_test(reader.has_derivs, config.data.test_percent, config.data.split_seed)
    e_ref, e_pred, f_ref, f_pred, f_test = [], [], [], [], []
    for b in range(len(reader.block_first) - 1):  # one store block at a time bounds the memory
        data = reader.read_block(b)
        shard = shard_from_range(data, torch.float64).to(device)
        batch = gather_batch(shard, torch.arange(shard.num_structures, device=device), with_forces=True)
        fwd = forward(model, batch, with_forces=True, for_training=False)
        energy, forces = fwd.energy, fwd.forces
        num_atoms = batch.num_atoms.double()
        e_ref.append((batch.energy / num_atoms).cpu().numpy())
        e_pred.append((energy.detach() / num_atoms).cpu().numpy())
        if forces is not None:
            mask = batch.force_atoms
            f_ref.append(batch.forces[mask].cpu().numpy())
            f_pred.append(forces.detach()[mask].cpu().numpy())
            structure_test = torch.from_numpy(test[data.start : data.stop]).to(device)
            f_test.append(torch.repeat_interleave(structure_test, batch.num_atoms)[mask].cpu().numpy())
    cat = lambda parts, shape: np.concatenate(parts) if parts else np.zeros(shape)  # noqa: E731
    return {
        "energy_ref": np.concatenate(e_ref), "energy_pred": np.concatenate(e_pred), "test": test,
        "force_ref": cat(f_ref, (0, 3)), "force_pred": cat(f_pred, (0, 3)), "force_test": cat(f_test, (0,)).astype(bool),
        "angle_min_force": np.float64(config.run.angle_min_force),
    }


def plot_parity(results: dict[str, np.ndarray], out: str | os.PathLike) -> Path:
    """Reference vs predicted energy per atom and force components, train and test -> PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE["parity"], dpi=DPI)
    panels = (
        (axes[0], results["energy_ref"], results["energy_pred"], results["test"], 1000.0, "meV/atom",
         "cohesive energy per atom (eV/atom)"),
        (axes[1], results["force_ref"].reshape(-1), results["force_pred"].reshape(-1),
         np.repeat(results["force_test"], 3), 1.0, "eV/Å", "force components (eV/Å)"),
    )
    for ax, ref, pred, test, factor, unit, label in panels:
        for name, mask, color in (("train", ~test, "tab:blue"), ("test", test, "tab:orange")):
            if mask.any():
                rmse = math.sqrt(float(np.mean((pred[mask] - ref[mask]) ** 2))) * factor
                ax.scatter(ref[mask], pred[mask], s=6, alpha=0.6, color=color, label=f"{name} (RMSE {rmse:.3g} {unit})")
        if ref.size:
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k-", lw=0.8)
            ax.legend(loc="upper left", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no structures with forces", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.grid(True, alpha=0.3)
    _angle_panel(axes[2], results)
    fig.tight_layout()
    return _save(fig, out)


def _angle_panel(ax, results: dict[str, np.ndarray]) -> None:
    """Histogram of the angle between predicted and reference force (degrees), train and test."""
    from .loss import ANGLE_BINS, force_angle_histogram, histogram_quantile

    threshold = float(results.get("angle_min_force", 0.1))
    merge = 4  # shown in 2° bins (the metric's are 0.5°)
    edges = np.linspace(0.0, 180.0, ANGLE_BINS // merge + 1)
    shown, widest = False, 0.0
    for name, mask, color in (("train", ~results["force_test"], "tab:blue"), ("test", results["force_test"], "tab:orange")):
        hist = force_angle_histogram(torch.from_numpy(results["force_pred"]), torch.from_numpy(results["force_ref"]),
                                     torch.from_numpy(mask), threshold).numpy()
        if hist.sum() == 0:
            continue
        median, p90 = histogram_quantile(hist, 0.5), histogram_quantile(hist, 0.9)
        ax.stairs(hist.reshape(-1, merge).sum(1) / hist.sum(), edges, color=color,
                  label=f"{name}: median {median:.1f}°, 90 % below {p90:.1f}°")
        shown, widest = True, max(widest, p90)
    if shown:
        ax.set_xlim(0, 90 if widest < 60 else 180)
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no atoms with forces above the threshold", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"angle to the reference force (°), atoms with |F_ref| > {threshold:g} eV/Å")
    ax.set_ylabel("fraction of atoms")
    ax.grid(True, alpha=0.3)


def _save(fig, out) -> Path:
    """Save atomically (temp file in the same directory, then rename) and close the figure."""
    try:
        return atomic_write(out, lambda fh: fig.savefig(fh, dpi=DPI, format="png"))
    finally:
        _pyplot().close(fig)


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, checkpoint: str = "best",
             store: str | None = None, device: str = "cpu", parity: bool = True) -> list[Path]:
    """learning_curves.png and (with ``parity``) parity.png of a run, in ``out_dir`` (default: the run directory)."""
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_learning_curves(read_metrics(run_dir), out_dir / "learning_curves.png")]
    if parity:
        written.append(plot_parity(evaluate_run(run_dir, checkpoint, store, device), out_dir / "parity.png"))
    return written


DESCRIPTION = "Learning curves and parity plots of a training run."
EPILOG: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aenet-dist plot``."""
    parser.add_argument("run_dir", help="run directory of aenet-dist train")
    parser.add_argument("--out", help="output directory (default: the run directory)")
    parser.add_argument("--checkpoint", default="best", help="checkpoint for the parity plot: best (default), latest or a path")
    parser.add_argument("--store", help="the feature store, if it is no longer where the run's config says")
    parser.add_argument("--device", default="cpu", help="device of the parity evaluation (default cpu)")
    parser.add_argument("--no-parity", action="store_true", help="only the learning curves")


def run(args: argparse.Namespace) -> int:
    """Write the plots of ``args.run_dir`` and print their paths."""
    for path in plot_run(args.run_dir, args.out, args.checkpoint, args.store, args.device, not args.no_parity):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aenet_dist.plot ...``, the same as ``aenet-dist plot ...``."""
    from .cli import main as cli_main

    return cli_main(["plot", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
