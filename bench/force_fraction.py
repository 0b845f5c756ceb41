"""The aenet-PyTorch paper's force-fraction study on TiO2: accuracy against the share of force structures.

    .venv/bin/python bench/force_fraction.py [--percents 0 5 10 20 50] [--epochs 120] [--no-save]

1. Featurizes ``shared/data/tio2`` once with derivatives for **all** 1000 structures into
   ``bench/.cache/tio2_allforces.zarr`` (FORCESPERCENT 100); later runs reuse it.
2. For each percentage, trains with ``data.force_percent`` = that share of the training set's force
   structures (a nested, seeded subset: every smaller set lies inside the larger ones) and
   α = 0.1, on the same 2 x 5 tanh networks, split and seed; energies of all training
   structures are used in every run.
3. Reports, at the epoch of the lowest test loss: test RMSE of energies and forces, and the
   median and 90th percentile of the angle between predicted and reference forces (test atoms
   with |F_ref| > 0.1 eV/Å), as a table and a plot (``bench/force_fraction.png``), appended to
   bench/RESULTS.md and bench/results.jsonl.

Optimizer: Adam 1e-2, batch 32, plateau schedule (the time-to-accuracy settings of
bench/train_tio2.py), for ``--epochs`` epochs: the study compares force shares, not optimizers.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_JSONL, RESULTS_MD, ROOT, SHARED, append_results, load1, machine, read_metrics, write_train_toml

PY = ROOT / ".venv" / "bin" / "python"
GENERATE_IN = SHARED / "data" / "tio2" / "generate.in"
CACHE = ROOT / "bench" / ".cache"
STORE = CACHE / "tio2_allforces.zarr"
HEADING = "## force fraction (TiO2, α = 0.1, the aenet-PyTorch paper's Figs. 3, 5, 6c)"
SETTINGS = {
    "data": {"test_percent": 10, "cache": "memory"},
    "model": {"hidden": [5, 5], "activations": ["tanh", "tanh"]},
    "optim": {"method": "adam", "lr": 1e-2, "weight_decay": 0.0},
    "schedule": {"kind": "plateau", "patience": 10, "factor": 0.5, "min_lr": 1e-5},
    "loss": {"force_weight": 0.1},
    "run": {"batch_size": 32, "device": "cpu", "dtype": "float32"},
}


def ensure_store() -> None:
    """Featurize all 1000 structures with derivatives (once; a complete store is reused)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / "tio2_allforces_inputs"
    work.mkdir(exist_ok=True)
    for stp in GENERATE_IN.parent.glob("*.stp"):
        shutil.copy(stp, work)
    if not (work / "xsf").exists():
        (work / "xsf").symlink_to(GENERATE_IN.parent / "xsf")
    lines = [line for line in GENERATE_IN.read_text().splitlines() if not line.strip().upper().startswith("FORCESPERCENT")]
    (work / "generate.in").write_text("\n".join(lines) + "\nFORCESPERCENT 100\n")
    print(f"featurize (all forces) -> {STORE.relative_to(ROOT)} ...", file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run([str(PY), "-m", "aenet_dist.featurize", str(work / "generate.in"), "--out", str(STORE), "--no-progress"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"featurize failed:\n{proc.stdout}\n{proc.stderr}")
    print(f"  {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def train(config: Path, percent: float, epochs: int, runs: Path, seed: int = 0) -> dict:
    run_dir = runs / f"p{percent:g}_s{seed}"
    cmd = [str(PY), "-m", "aenet_dist.train", str(config), f"run.run_dir={run_dir}", f"run.epochs={epochs}",
           f"run.checkpoint_every={epochs}", f"data.force_percent={percent}", f"run.seed={seed}"]
    print(f"force_percent {percent:g}, seed {seed}: {epochs} epochs ...", file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=runs)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"training with force_percent={percent} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    best = min(metrics, key=lambda m: m["loss"] if math.isfinite(m["loss"]) else math.inf)
    out = {"force_percent": percent, "seed": seed, "epochs": len(metrics), "best_epoch": best["epoch"], "wall_s": wall, "loadavg_end": load1()}
    for key in ("test_rmse_energy_meV_atom", "test_rmse_forces_eV_A", "test_force_angle_median_deg", "test_force_angle_p90_deg",
                "train_rmse_energy_meV_atom", "train_rmse_forces_eV_A"):
        out[key] = best[key]
    print(f"  best epoch {best['epoch']}: test E {best['test_rmse_energy_meV_atom']:.2f} meV/atom, F "
          f"{best['test_rmse_forces_eV_A']:.4f} eV/Å, angle {best['test_force_angle_median_deg']:.1f}° (p90 "
          f"{best['test_force_angle_p90_deg']:.1f}°); {wall:.0f} s", file=sys.stderr)
    return out


KEYS = ("test_rmse_energy_meV_atom", "test_rmse_forces_eV_A", "test_force_angle_median_deg", "test_force_angle_p90_deg",
        "train_rmse_energy_meV_atom", "train_rmse_forces_eV_A")


def _summary(runs: list[dict]) -> dict:
    """Median over seeds of every figure, with the range (min, max) of each."""
    import statistics

    out = {"force_percent": runs[0]["force_percent"], "seeds": len(runs), "best_epoch": int(statistics.median(r["best_epoch"] for r in runs)),
           "wall_s": statistics.median(r["wall_s"] for r in runs), "loadavg_end": runs[-1]["loadavg_end"], "runs": runs}
    for key in KEYS:
        values = [r[key] for r in runs]
        out[key] = statistics.median(values)
        out[key + "_range"] = (min(values), max(values))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["force_percent"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    panels = ((axes[0], "test_rmse_energy_meV_atom", "test RMSE energy (meV/atom)"),
              (axes[1], "test_rmse_forces_eV_A", "test RMSE forces (eV/Å)"))
    for ax, key, label in panels:
        lo = [r[key] - r[key + "_range"][0] for r in rows]
        hi = [r[key + "_range"][1] - r[key] for r in rows]
        ax.errorbar(x, [r[key] for r in rows], yerr=[lo, hi], fmt="o-", capsize=3)
        ax.set_ylabel(label)
    axes[2].plot(x, [r["test_force_angle_median_deg"] for r in rows], "o-", label="median")
    axes[2].plot(x, [r["test_force_angle_p90_deg"] for r in rows], "s--", label="90th percentile")
    axes[2].set_ylabel("angle to the reference force (°)")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("force structures trained on (% of the training set)")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--percents", type=float, nargs="+", default=[0, 5, 10, 20, 50])
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per share (run.seed 0..N-1): medians and ranges")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    info = machine()
    ensure_store()
    runs = Path(tempfile.mkdtemp(prefix="bench_force_fraction_"))
    try:
        config = write_train_toml(runs / "train.toml", STORE, SETTINGS)
        runs_all = [train(config, p, args.epochs, runs, seed) for p in args.percents for seed in range(args.seeds)]
        rows = [_summary([r for r in runs_all if r["force_percent"] == p]) for p in args.percents]
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    figure = ROOT / "bench" / "force_fraction.png"
    plot(rows, figure)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        HEADING, "",
        f"{stamp}; {info['nproc']} CPU(s), torch {info['torch']}; commit {info['git_commit']}; `bench/force_fraction.py`: "
        f"all 1000 TiO2 structures featurized with forces; α = 0.1, 2 x 5 tanh, Adam 1e-2, batch 32, plateau schedule, "
        f"{args.epochs} epochs, float32, 1 rank, {args.seeds} training seed(s) per share (median, range in brackets); "
        "`data.force_percent` = the share of the training set's structures whose "
        "forces enter the loss (nested subsets); figures at the epoch of the lowest test loss; angles over test atoms with "
        "|F_ref| > 0.1 eV/Å. Plot: `bench/force_fraction.png` (bars: the range over seeds).", "",
        "| forces trained on | best epoch | test RMSE E (meV/atom) | test RMSE F (eV/Å) | angle median (°) | angle p90 (°) | "
        "train RMSE E | train RMSE F | wall (s) | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def cell(r, key, fmt):
        lo, hi = r[key + "_range"]
        return f"{r[key]:{fmt}}" + (f" ({lo:{fmt}}–{hi:{fmt}})" if r["seeds"] > 1 else "")

    for r in rows:
        lines.append(
            f"| {r['force_percent']:g} % | {r['best_epoch']} | {cell(r, 'test_rmse_energy_meV_atom', '.2f')} | "
            f"{cell(r, 'test_rmse_forces_eV_A', '.4f')} | {cell(r, 'test_force_angle_median_deg', '.1f')} | "
            f"{cell(r, 'test_force_angle_p90_deg', '.1f')} | {cell(r, 'train_rmse_energy_meV_atom', '.2f')} | "
            f"{cell(r, 'train_rmse_forces_eV_A', '.4f')} | {r['wall_s']:.0f} | {r['loadavg_end']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        stamp_iso = datetime.datetime.now().isoformat(timespec="seconds")
        append_results(text, [{"bench": "force_fraction", "dataset": "tio2_allforces", "time": stamp_iso, **info, **run,
                               "settings": SETTINGS} for r in rows for run in r["runs"]], RESULTS_MD, RESULTS_JSONL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
