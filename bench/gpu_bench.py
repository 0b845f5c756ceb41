"""GPU benchmark (see bench/gpu.sh): featurize TiO2 on the node's CPUs, train the aenet-PyTorch
example on the GPU with each cache mode, measure the force contraction against its bandwidth
floor, and time to the paper's accuracy. Writes OUT/gpu_results.json and OUT/gpu_results.md.

featurize is numpy on the CPU (it has no device): the stores are made by ``mpiexec -n <cores>
python -m aenet_dist.featurize`` (one process where mpiexec or mpi4py is missing), as a GPU node
would make them; only training runs on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aenet_dist.report import parse_metrics_line
from aenet_dist.store import StoreReader
from aenet_dist.train import main as train_main

DEVICE = "cuda"


def toml(store, run_dir, cache, epochs, batch=128, method="adamw", lr=1e-4, weight_decay=1e-3, schedule="none", dtype="float32",
         cuda_graphs="auto", batches="reshuffle"):
    return f"""
[data]
store = "{store}"
test_percent = 10
cache = "{cache}"
batches = "{batches}"
[model]
hidden = [5, 5]
activations = ["tanh", "tanh"]
[optim]
method = "{method}"
lr = {lr}
weight_decay = {weight_decay}
[schedule]
kind = "{schedule}"
patience = 20
factor = 0.5
min_lr = 1e-5
[loss]
force_weight = 0.1
[run]
epochs = {epochs}
batch_size = {batch}
dtype = "{dtype}"
device = "{DEVICE}"
run_dir = "{run_dir}"
checkpoint_every = 100000
cuda_graphs = "{cuda_graphs}"
"""


def cpu_cores() -> int:
    """Cores this process may run on (a batch job's allotment, not the whole host)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def mpiexec() -> str | None:
    """The mpiexec beside this python (the venv's, matching its mpi4py), else on PATH; None without mpi4py."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def featurize_cpu(generate_in: Path, store: Path, force_list: Path | None = None, chunk_mb: float | None = None) -> dict:
    """``python -m aenet_dist.featurize`` on all cores (MPI), or one process without mpiexec; a fresh store.

    Returns end-to-end wall seconds, the in-process seconds the command prints, and its rank count
    (checked: an mpiexec of another MPI than mpi4py's would start independent single-rank copies).
    """
    shutil.rmtree(store, ignore_errors=True)  # a rerun measures a full featurize, not a resumed one
    launcher = mpiexec()
    ranks = cpu_cores() if launcher else 1
    cmd = ([launcher, "-n", str(ranks)] if launcher and ranks > 1 else []) + [
        sys.executable, "-m", "aenet_dist.featurize", str(generate_in), "--out", str(store), "--no-progress"]
    if force_list is not None:
        cmd += ["--force-list", str(force_list)]
    if chunk_mb is not None:
        cmd += ["--chunk-mb", str(chunk_mb)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"featurize failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    m = re.search(r"wall time\s+([0-9.]+) s on (\d+) rank", proc.stdout)
    if not m or int(m.group(2)) != ranks:
        raise SystemExit(f"featurize ran on {m.group(2) if m else '?'} rank(s), not {ranks}: {' '.join(cmd)}\n{proc.stdout[-2000:]}")
    return {"wall_s": wall, "inprocess_s": float(m.group(1)), "ranks": ranks}


def train(out: Path, name: str, text: str) -> list[dict]:
    shutil.rmtree(out / "runs" / name, ignore_errors=True)  # a rerun of the benchmark starts each run afresh
    cfg = out / f"{name}.toml"
    cfg.write_text(text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train_main([str(cfg)])
    print(err.getvalue()[-1500:])
    assert code == 0, err.getvalue()
    run_dir = out / "runs" / name
    return [parse_metrics_line(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_bandwidth(nbytes: float) -> float:
    """Bytes/s of a plain reduction over ``nbytes`` on the device (the floor's bandwidth)."""
    x = torch.empty(max(1, int(nbytes // 4)), device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    x.sum()
    sync()
    t = time.perf_counter()
    for _ in range(20):
        x.sum()
    sync()
    return 20 * nbytes / (time.perf_counter() - t)


def synth_scale(out: Path, n: int, quick: bool) -> dict:
    """Synthetic Cu/Au/Ni set (32-128 atoms, 20 % forces): generate and featurize on all cores,
    train 2 x 10 tanh (bench/scale.py's settings) per cache mode; epoch time vs the floor."""
    from aenet_dist.datasets import generate_synth_dataset

    res: dict = {"structures": n}
    start = time.perf_counter()
    generate_in = generate_synth_dataset(out / f"synth_{n}", n, workers=os.cpu_count())
    res["generate_s"] = time.perf_counter() - start
    store = out / f"synth_{n}.zarr"
    feat = featurize_cpu(Path(generate_in), store, chunk_mb=8)
    res["featurize_s"], res["featurize_ranks"] = feat["wall_s"], feat["ranks"]
    reader = StoreReader(store)
    features = max(reader.attrs["num_features"].values())
    dG_bytes = float(reader.num_deriv_rows.sum() * 0.9 * 3 * features * 4)
    res["dG_bytes_per_epoch_float32"] = dG_bytes
    res["floor_s_per_epoch"] = 2 * dG_bytes / read_bandwidth(dG_bytes)
    print(f"synth {n}: generated in {res['generate_s']:.1f} s, featurized in {res['featurize_s']:.1f} s "
          f"({res['featurize_ranks']} CPU rank(s)); floor {res['floor_s_per_epoch'] * 1e3:.2f} ms/epoch")
    epochs = 3 if quick else 5
    # "stream+workers": data.workers processes convert the blocks instead of the rank's reader threads
    # (on a 2-core CPU box they were slower; a GPU node's spare cores are where they should pay).
    workers = min(4, max(1, (os.cpu_count() or 2) - 2))
    for cache in ("gpu", "pinned", "stream", "stream+workers") if DEVICE == "cuda" else ("memory", "stream", "stream+workers"):
        text = toml(store, out / "runs" / f"synth_{cache}", cache.split("+")[0], epochs, batch=128, method="adam", lr=1e-3, weight_decay=0.0)
        text = text.replace("hidden = [5, 5]", "hidden = [10, 10]")
        if cache.endswith("+workers"):
            text = text.replace('cache = "stream"', f'cache = "stream"\nworkers = {workers}')
        metrics = train(out, f"synth_{cache}", text)
        timed = metrics[1:]
        epoch_s = statistics.median(m["epoch_seconds"] for m in timed)
        train_s = statistics.median(m["train_seconds"] for m in timed)
        res[cache] = {"epoch_s": epoch_s, "train_s": train_s, "data_s": statistics.median(m["data_seconds"] for m in timed),
                      "structures_per_s": 0.9 * n / train_s, "train_over_floor": train_s / res["floor_s_per_epoch"]}
        print(f"synth {n} {cache}: epoch {epoch_s:.2f} s (train {train_s:.2f} s), {0.9 * n / train_s:.0f} structures/s, "
              f"{train_s / res['floor_s_per_epoch']:.0f}x the floor")
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--force-list")
    parser.add_argument("--refdata")
    parser.add_argument("--tta-epochs", type=int, default=600)
    parser.add_argument("--device", default="cuda", help="training device (featurize always runs on the CPU); cpu for a dry run")
    parser.add_argument("--quick", action="store_true", help="few epochs (dry run)")
    parser.add_argument("--skip-tta", action="store_true", help="leave out the time-to-accuracy run")
    parser.add_argument("--synth", type=int, default=0, help="also generate, featurize and train this many synthetic EMT structures")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__, "cpu_count": os.cpu_count(), "cpu_cores_allowed": cpu_cores()}
    print(results)

    # 1. featurize on the CPU (numpy; all cores under MPI), float64 store.
    force_list = None
    if args.force_list:
        names = [line.split()[-1] for line in Path(args.force_list).read_text().splitlines() if line.strip() and not line.startswith("#")]
        force_list = out / "force_structures.txt"  # basenames, one per line: what featurize --force-list matches
        force_list.write_text("".join(Path(n).name + "\n" for n in names))
    store = out / "tio2.zarr"
    feat = featurize_cpu(Path(args.data) / "generate.in", store, force_list)
    results["featurize_cpu_s"] = feat["wall_s"]
    results["featurize_cpu_inprocess_s"] = feat["inprocess_s"]
    results["featurize_cpu_ranks"] = feat["ranks"]
    print(f"featurize on the CPU, {feat['ranks']} rank(s): {feat['wall_s']:.2f} s end to end ({feat['inprocess_s']:.2f} s in-process)")
    reader = StoreReader(store)
    if args.refdata:
        ref = np.load(args.refdata)
        names = reader.names()
        data = reader.read_range(0, reader.num_structures)
        G = np.zeros((len(data.species), 56))
        for el, rows in data.elements.items():
            G[rows.atom] = rows.G
        offsets = np.r_[0, np.cumsum(data.num_atoms)]
        worst = 0.0
        for k, fname in enumerate(ref["file_names"]):
            s = next(i for i, n in enumerate(names) if n.endswith(str(fname)))
            mine = G[offsets[s] : offsets[s + 1]]
            worst = max(worst, float(np.abs(mine - ref["G"][ref["atom_offset"][k] : ref["atom_offset"][k] + ref["natoms"][k]]).max()))
        results["G_max_abs_diff_vs_aenet"] = worst
        print(f"featurized G vs aenet generate.x: max |diff| {worst:.2e}")

    # 2. training throughput per cache mode (paper settings, float32).
    features = 56
    train_rows = reader.num_deriv_rows.sum() * 0.9  # 10 % test
    dG_bytes = float(train_rows * 3 * features * 4)
    results["dG_bytes_per_epoch_float32"] = dG_bytes
    # (label, cache mode, epochs, run.cuda_graphs, data.batches): the gpu cache with CUDA graphs (auto = on for a
    # GPU) and without; with batches formed once and kept on the device (fixed: nothing is gathered in training)
    modes = ((("gpu", "gpu", 40, "auto", "reshuffle"), ("gpu_eager", "gpu", 40, "off", "reshuffle"),
              ("gpu_fixed", "gpu", 40, "auto", "fixed"), ("gpu_fixed_eager", "gpu", 40, "off", "fixed"),
              ("pinned", "pinned", 15, "auto", "reshuffle"), ("pinned_fixed", "pinned", 15, "auto", "fixed"),
              ("stream", "stream", 15, "auto", "reshuffle"))
             if DEVICE == "cuda" else (("memory", "memory", 5, "auto", "reshuffle"), ("memory_fixed", "memory", 5, "auto", "fixed"),
                                       ("stream", "stream", 5, "auto", "reshuffle")))
    if args.quick:
        modes = tuple((label, m, 5, graphs, batches) for label, m, _, graphs, batches in modes)
    steps = math.ceil(900 / 128)
    for label, cache, epochs, graphs, batches in modes:
        metrics = train(out, f"paper_{label}", toml(store, out / "runs" / f"paper_{label}", cache, epochs, cuda_graphs=graphs,
                                                     batches=batches))
        epoch_s = statistics.median(m["epoch_seconds"] for m in metrics[3:])
        train_s = statistics.median(m["train_seconds"] for m in metrics[3:])
        results[f"{label}_epoch_s"] = epoch_s
        results[f"{label}_train_s"] = train_s
        results[f"{label}_ms_per_step"] = 1e3 * train_s / steps
        results[f"{label}_structures_per_s"] = 900 / train_s
        results[f"{label}_cuda_graphs"] = metrics[-1].get("cuda_graphs", 0)
        results[f"{label}_eager_steps"] = metrics[-1].get("eager_steps", 0)
        # The force contraction reads dG once forward and once backward: the floor is 2 reads.
        results[f"{label}_dG_read_GBps"] = 2 * dG_bytes / train_s / 1e9
        print(f"{label}: epoch {epoch_s * 1e3:.1f} ms (train {train_s * 1e3:.1f} ms, {1e3 * train_s / steps:.2f} ms/step), "
              f"{900 / train_s:.0f} structures/s; CUDA graphs {results[f'{label}_cuda_graphs']}, eager steps {results[f'{label}_eager_steps']}")
    # bandwidth floor: 2 reads of dG at the device's copy bandwidth
    x = torch.empty(int(dG_bytes // 4), device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(20):
        x.sum()
    sync()
    read_bw = 20 * dG_bytes / (time.perf_counter() - t)
    results["device_read_GBps"] = read_bw / 1e9
    results["floor_s_per_epoch"] = 2 * dG_bytes / read_bw
    first = modes[0][0]  # the label of the first row
    results["train_over_floor"] = results[f"{first}_train_s"] / results["floor_s_per_epoch"]
    print(f"read bandwidth {read_bw / 1e9:.0f} GB/s; floor {results['floor_s_per_epoch'] * 1e3:.2f} ms/epoch; {first} mode at {results['train_over_floor']:.1f}x the floor")

    if args.synth:
        results["synth"] = synth_scale(out, args.synth, quick=args.quick)
        (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=float))
    if args.skip_tta:
        (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=float))
        print(json.dumps(results, indent=1, default=float))
        return

    # 3. time to the paper's accuracy (7.8 meV/atom, 0.388 eV/Å) with faster settings.
    tta = train(
        out,
        "tta",
        toml(store, out / "runs" / "tta", modes[0][1], args.tta_epochs, batch=32, method="adam", lr=5e-3, weight_decay=0.0, schedule="plateau"),
    )
    hit = next((m for m in tta if m["test_rmse_energy_meV_atom"] <= 7.8 and m["test_rmse_forces_eV_A"] <= 0.388), None)
    best = min(tta, key=lambda m: m["loss"])
    results["tta_settings"] = "adam lr 5e-3, plateau(patience 20, factor 0.5), batch 32, 2x5 tanh, alpha 0.1, float32"
    results["tta_hit"] = hit
    results["tta_best"] = best
    print("time to accuracy:", hit if hit else f"not reached in {args.tta_epochs} epochs; best {best}")
    (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=float))
    print(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
