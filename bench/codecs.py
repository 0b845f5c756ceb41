"""Store options against streaming speed: ``featurize --deriv-dtype float64|float32 --compressor zstd|lz4|none``.

    .venv/bin/python bench/codecs.py [--structures 5000] [--epochs 4] [--no-save]

Uses ``bench/.cache/synth_N`` (made by bench/scale.py or here with ``aenet-dist datasets synth``),
featurizes it once per store variant into ``bench/.cache/synth_N_<dtype>_<codec>.zarr`` (2 MPI
ranks, 8 MiB blocks, as bench/scale.py does): float64 zstd (the default), float32 with zstd, lz4
and none. Then trains ``--epochs`` epochs on 1 rank, float32, with ``data.cache=stream`` on each,
``data.cache=memory`` on the default store and again last on the uncompressed one for reference, and ``stream`` with ``data.workers=2``
(worker processes instead of reader threads) on the float32 zstd store. A float32 store trains
float32 bit for bit like the float64 one (tests/test_loader.py), so the comparison is of speed only.
Reports store size, featurize wall time, and the median epoch and data-wait seconds over epochs
2..end. Appends to bench/RESULTS.md and bench/results.jsonl. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_JSONL, RESULTS_MD, ROOT, append_results, dir_bytes, load1, machine, read_metrics, write_train_toml

PY = ROOT / ".venv" / "bin" / "python"
MPIEXEC = ROOT / ".venv" / "bin" / "mpiexec"
CACHE = ROOT / "bench" / ".cache"
SETTINGS = {
    "data": {"test_percent": 10},
    "model": {"hidden": [10, 10], "activations": ["tanh", "tanh"]},
    "optim": {"method": "adam", "lr": 1e-3},
    "loss": {"force_weight": 0.1},
    "run": {"batch_size": 128, "device": "cpu", "dtype": "float32"},
}


def run(cmd: list[str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--structures", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    info = machine()
    n = args.structures
    data = CACHE / f"synth_{n}"
    if not (data / "generate.in").exists():
        run([str(PY), "-m", "aenet_dist.datasets", "synth", "--out", str(data), "--structures", str(n), "--force-percent", "20", "--no-progress"])
    rows = []
    runs = Path(tempfile.mkdtemp(prefix="bench_codecs_"))
    try:
        variants = [("float64", "zstd", [("memory", 0), ("stream", 0)]), ("float32", "zstd", [("stream", 0), ("stream", 2)]),
                    ("float32", "lz4", [("stream", 0)]), ("float32", "none", [("stream", 0), ("memory", 0)])]
        for deriv, codec, trainings in variants:
            store = CACHE / f"synth_{n}_{deriv}_{codec}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            print(f"featurize ({deriv}, {codec}) ...", file=sys.stderr)
            featurize_s = run([str(MPIEXEC), "-n", "2", str(PY), "-m", "aenet_dist.featurize", str(data / "generate.in"), "--out",
                               str(store), "--chunk-mb", "8", "--compressor", codec, "--deriv-dtype", deriv, "--no-progress"])
            size, _ = dir_bytes(store)
            config = write_train_toml(runs / f"{deriv}_{codec}.toml", store, SETTINGS)
            for cache, workers in trainings:
                run_dir = runs / f"{deriv}_{codec}_{cache}_{workers}"
                print(f"  train {cache}, data.workers={workers}, {args.epochs} epochs ...", file=sys.stderr)
                wall = run([str(PY), "-m", "aenet_dist.train", str(config), f"data.cache={cache}", f"data.workers={workers}",
                            f"run.epochs={args.epochs}", f"run.run_dir={run_dir}", f"run.checkpoint_every={args.epochs}"], cwd=runs)
                ms = read_metrics(run_dir / "metrics.jsonl")[1:] or read_metrics(run_dir / "metrics.jsonl")
                row = {"deriv_dtype": deriv, "codec": codec, "cache": cache, "workers": workers, "store_bytes": size,
                       "featurize_s": featurize_s, "wall_s": wall, "epoch_s": statistics.median(m["epoch_seconds"] for m in ms),
                       "data_s": statistics.median(m["data_seconds"] for m in ms), "loadavg_end": load1()}
                print(f"  {row['epoch_s']:.2f} s/epoch, data {row['data_s']:.2f} s, store {size / 2**20:.0f} MiB", file=sys.stderr)
                rows.append(row)
            shutil.rmtree(store, ignore_errors=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    # The memory cache ran first and last (both train bitwise alike): its reference is their median,
    # so a machine that slows or speeds up during the bench does not tilt the ratios one way.
    memory = statistics.median(r["epoch_s"] for r in rows if r["cache"] == "memory")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## store options against streaming ({n} synthetic EMT structures, 20 % forces)", "",
        f"{stamp}; {info['nproc']} CPU(s), torch {info['torch']}, commit {info['git_commit']}; `bench/codecs.py`: featurize "
        f"(2 MPI ranks, 8 MiB blocks) with each `--deriv-dtype` and `--compressor`, then {args.epochs} epochs on 1 rank, "
        "float32 (bitwise the same training from either store dtype), 2 x 10 tanh, batch 128; medians over epochs 2..end; "
        "data.workers 0 = reader threads in the rank (data.readers auto: 1 on 2 cores), 2 = two worker processes instead; "
        f"'epoch / memory epoch' divides by the median of the two memory-cache runs ({memory:.2f} s), the first and the last.", "",
        "| dG/dR stored as | codec | cache | data.workers | store (MiB) | featurize (s) | epoch (s) | of it waiting for data (s) | epoch / memory epoch | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['deriv_dtype']} | {r['codec']} | {r['cache']} | {r['workers']} | {r['store_bytes'] / 2**20:.0f} | "
                     f"{r['featurize_s']:.1f} | {r['epoch_s']:.2f} | {r['data_s']:.2f} | {r['epoch_s'] / memory:.2f} | {r['loadavg_end']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        stamp_iso = datetime.datetime.now().isoformat(timespec="seconds")
        append_results(text, [{"bench": "codecs", "time": stamp_iso, "structures": n, **info, **r} for r in rows], RESULTS_MD, RESULTS_JSONL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
