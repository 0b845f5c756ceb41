"""Scale-out benchmark: featurize + train on synthetic EMT alloy sets of growing size.

    .venv/bin/python bench/scale.py [--sizes 1000,5000] [--epochs 3] [--allow-large] [--keep DIR] [--no-save]

Per size N (``--sizes``, default 1000,5000):

1. Generates ``python -m aenet_dist.datasets synth --structures N --force-percent 20`` (Cu/Au/Ni,
   32-128 atoms, EMT energies and forces) into ``bench/.cache/synth_N`` once (skipped when its
   ``generate.in`` exists; bench/.cache is git-ignored).
2. Featurizes it with ``mpiexec -n 2 python -m aenet_dist.featurize ... --chunk-mb C`` into
   ``bench/.cache/synth_N_chunkC.zarr`` (float64 derivatives; ``--chunk-mb``, default 32 =
   featurize's own default; with 8, the older ``synth_N.zarr``); a complete store is reused and
   the wall time of the run that made it is read from the store's ``.featurize.json`` beside it.
   The block size matters to ``stream``: each step gathers from every block it touches (synthetic
   5000, float32 store: 3.0-3.8 s/epoch with 32 MiB blocks against 5.2-5.4 s with 8 MiB ones). Records
   featurize wall time, store size on disk, atoms, derivative rows, and the in-memory shard
   size that ``aenet-dist plan`` computes; prints ``aenet-dist plan <store> --ranks 2``.
3. Trains ``--epochs`` epochs (float32, 2 x 10 tanh per element, batch 128, Adam lr 1e-3,
   force weight 0.1, CPU, 10 % test) with: ``data.cache=memory`` and ``stream`` on 1 rank,
   ``stream`` on 1 rank under ``data.memory_budget_gb=0.35`` (below the store's size from 5000
   structures on), and ``memory`` and ``stream`` on 2 ranks (``torchrun --standalone
   --nproc_per_node=2``). A memory-cache run is skipped when ``aenet-dist plan`` puts its host
   memory above 75 % of what is available. Reads run_dir/metrics.jsonl and reports the median
   of epochs 2..end of epoch_seconds, train_seconds, data_seconds, structures_per_second; peak
   RSS by polling the process tree with psutil every 0.1 s (largest rank, also from VmHWM, and
   the sum over ranks). The RSS of a bare ``import torch, aenet_dist.train`` is measured once
   so the part of the peak that the data adds can be compared with the store's size and with
   the stream budget.

Reports cost per 1000 structures (s/epoch per 1000 structures of the data set, test
evaluation included) against N, and a linear fit epoch_s = a + b N, for the memory and stream
caches. Sizes above 20000 (the issue's 45000) are skipped unless ``--allow-large``: on a
2-core machine generating and featurizing 45000 structures takes about 40 minutes.

Prints a markdown table, appends it to bench/RESULTS.md and one JSON line per measurement to
bench/results.jsonl. Not collected by pytest (testpaths = tests/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import RESULTS_JSONL, RESULTS_MD, TreeMemory, append_results, dir_bytes, load1, machine, read_metrics, train_command, write_train_toml

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("AENET_DIST_VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"
TORCHRUN = VENV / "bin" / "torchrun"
MPIEXEC = VENV / "bin" / "mpiexec"
CACHE = ROOT / "bench" / ".cache"
HEADING = "## scale (synthetic EMT alloys, 32-128 atoms, 20 % forces)"
LARGE = 20000  # sizes above this need --allow-large
ISSUE_SIZE = 45000  # the issue's full size, noted (with an extrapolation) when not run
STALL_S = 600.0
MiB = 2**20

SETTINGS = {
    "data": {"test_percent": 10},
    "model": {"hidden": [10, 10], "activations": ["tanh", "tanh"]},
    "optim": {"method": "adam", "lr": 1e-3},
    "schedule": {"kind": "none"},
    "loss": {"force_weight": 0.1},
    "run": {"batch_size": 128, "device": "cpu", "dtype": "float32"},
}
# (label, ranks, overrides)
STREAM_BUDGET_GB = 0.35  # below the store size from 5000 structures on (raised to plan's smallest + 5 % if needed)
RUNS = [
    ("memory", 1, ["data.cache=memory"]),
    ("stream", 1, ["data.cache=stream"]),
    (f"stream {STREAM_BUDGET_GB} GiB", 1, ["data.cache=stream", f"data.memory_budget_gb={STREAM_BUDGET_GB}"]),
    ("memory", 2, ["data.cache=memory"]),
    ("stream", 2, ["data.cache=stream"]),
]
# The same with data.batches = fixed (batches formed once; with stream kept on disk and read back each epoch).
FIXED_RUNS = [(f"{label} fixed", ranks, [*overrides, "data.batches=fixed"]) for label, ranks, overrides in RUNS]
MEMORY_FRACTION = 0.75  # memory-cache runs are skipped when plan's host memory exceeds this share of what is available


# ----------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- steps


def base_rss() -> int:
    """Peak RSS of a process that only imports torch and aenet_dist.train (the fixed part of a rank)."""
    code = "import aenet_dist.train, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([str(PY), "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
    try:
        return int(out.stdout.strip().splitlines()[-1]) * 1024
    except (ValueError, IndexError):
        return 0


def ensure_dataset(n: int) -> dict:
    out = CACHE / f"synth_{n}"
    if (out / "generate.in").exists():
        log(f"[{n}] data set {out.relative_to(ROOT)} exists; reused")
        return {"generate_in": out / "generate.in", "generate_wall_s": None}
    cmd = [str(PY), "-m", "aenet_dist.datasets", "synth", "--structures", str(n), "--out", str(out),
           "--workers", str(os.cpu_count() or 1), "--force-percent", "20", "--no-progress"]
    log(f"[{n}] generating {out.relative_to(ROOT)} ...")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"data set generation failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    log(f"[{n}]   generated in {wall:.1f} s")
    return {"generate_in": out / "generate.in", "generate_wall_s": wall}


def ensure_store(n: int, generate_in: Path, chunk_mb: float) -> dict:
    name = f"synth_{n}" if chunk_mb == 8 else f"synth_{n}_chunk{chunk_mb:g}"
    store = CACHE / f"{name}.zarr"
    sidecar = CACHE / f"{name}.featurize.json"
    cmd = [str(MPIEXEC), "-n", "2", str(PY), "-m", "aenet_dist.featurize", str(generate_in), "--out", str(store),
           "--chunk-mb", f"{chunk_mb:g}", "--no-progress"]
    log(f"[{n}] featurize (2 ranks) -> {store.relative_to(ROOT)} ...")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"featurize failed (exit {proc.returncode}); if {store} is from other inputs, remove it:\n{proc.stdout}\n{proc.stderr}")
    text = proc.stdout + proc.stderr
    reused = "already complete" in text
    inprocess = None
    for line in proc.stdout.splitlines():
        if line.startswith("wall time"):
            try:
                inprocess = float(line.split()[2])
            except (IndexError, ValueError):
                pass
    if reused and sidecar.exists():
        prev = json.loads(sidecar.read_text())
        wall, inprocess = prev.get("featurize_wall_s"), prev.get("featurize_inprocess_s")
        log(f"[{n}]   reused the complete store (featurized earlier in {wall if wall is None else f'{wall:.1f}'} s)")
    elif reused:
        wall = inprocess = None
        log(f"[{n}]   reused the complete store (its featurize time is unknown)")
    else:
        sidecar.write_text(json.dumps({"featurize_wall_s": wall, "featurize_inprocess_s": inprocess}) + "\n")
        log(f"[{n}]   featurized in {wall:.1f} s")
    from aenet_dist.plan import plan_rows
    from aenet_dist.store import StoreReader

    r = StoreReader(store)
    shard = plan_rows(r, 1, 4, 8, 128)[0]
    host_memory_ranks = {k: sum(row["host_memory"] for row in plan_rows(r, k, 4, 8, 128)) for k in (1, 2)}
    plan = subprocess.run([str(PY), "-m", "aenet_dist.plan", str(store), "--ranks", "2"], capture_output=True, text=True)
    plan_text = (plan.stdout + plan.stderr).strip()
    log(f"[{n}] aenet-dist plan {store.relative_to(ROOT)} --ranks 2:\n{plan_text}")
    return {
        "size": n, "store": str(store), "reused": reused, "featurize_wall_s": wall, "featurize_inprocess_s": inprocess,
        "structures": int(r.num_structures), "atoms": int(r.num_atoms.sum()),
        "force_structures": int(r.has_derivs.astype(bool).sum()), "deriv_rows": int(r.num_deriv_rows.sum()),
        "blocks": len(r.block_first) - 1, "store_bytes": dir_bytes(store)[0],
        "shard_bytes_float32": float(shard["shard_bytes"]), "plan_ranks2": plan_text,
        "host_memory_ranks": host_memory_ranks, "stream_min_budget_bytes": float(shard["host_stream"]),
    }


def write_config(where: Path, store: str) -> Path:
    return write_train_toml(where / "scale.toml", store, SETTINGS)


def train(config: Path, runs_dir: Path, n: int, label: str, ranks: int, overrides: list[str], epochs: int, data: dict, base: int) -> dict:
    name = f"synth{n}_{label.replace(' ', '').replace('=', '')}_{ranks}r"
    run_dir = runs_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [str(config), f"run.run_dir={run_dir}", f"run.epochs={epochs}", f"run.checkpoint_every={epochs}", *overrides]
    cmd = train_command(PY, TORCHRUN, ranks, args)
    log(f"[{n}] train {label}, {ranks} rank(s), {epochs} epochs ...")
    log_path = runs_dir / f"{name}.log"
    load_start = load1()
    metrics_path = run_dir / "metrics.jsonl"
    seen, progress = 0, time.perf_counter()
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        # cwd outside the checkout: ``-m`` puts the cwd first on sys.path.
        proc = subprocess.Popen(cmd, cwd=runs_dir, stdout=fh, stderr=subprocess.STDOUT)
        with TreeMemory(proc.pid, match="aenet_dist.train") as mem:
            while proc.poll() is None:
                time.sleep(0.2)
                k = len(read_metrics(metrics_path))
                if k > seen:
                    seen, progress = k, time.perf_counter()
                elif time.perf_counter() - progress > STALL_S:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    sys.exit(f"training run {name} stalled (no new epoch in {STALL_S:.0f} s):\n{log_path.read_text()[-4000:]}")
    wall = time.perf_counter() - t0
    text = log_path.read_text()
    if proc.returncode != 0:
        sys.exit(f"training run {name} failed (exit {proc.returncode}):\n{text[-4000:]}")
    ms = read_metrics(metrics_path)
    timed = ms[1:] if len(ms) >= 2 else ms
    med = {k: statistics.median(m[k] for m in timed) for k in ("epoch_seconds", "train_seconds", "data_seconds", "structures_per_second")}
    peak_max, peak_sum = mem.peak_max, max(mem.peak_sum, mem.peak_max)
    out = {
        "what": "train", "size": n, "cache": label.split()[0], "label": label, "ranks": ranks, "overrides": overrides,
        "epochs": len(ms), "epochs_timed": f"{timed[0]['epoch']}..{timed[-1]['epoch']}",
        "epoch_s_median": med["epoch_seconds"], "train_s_median": med["train_seconds"],
        "data_s_median": med["data_seconds"], "structures_per_s_median": med["structures_per_second"],
        "epoch_s_per_1000_structures": med["epoch_seconds"] / (data["structures"] / 1000),
        "peak_rss_max_rank_mb": peak_max / MiB, "peak_rss_sum_mb": peak_sum / MiB,
        "peak_rss_max_rank_over_store": peak_max / data["store_bytes"],
        "data_rss_max_rank_mb": max(peak_max - base, 0) / MiB,
        "data_rss_max_rank_over_store": max(peak_max - base, 0) / data["store_bytes"],
        "wall_s": wall, "loadavg_start": load_start, "loadavg_end": load1(),
        "last_test_rmse_energy_meV_atom": ms[-1]["test_rmse_energy_meV_atom"],
        "last_test_rmse_forces_eV_A": ms[-1]["test_rmse_forces_eV_A"],
    }
    log(f"[{n}]   median epoch {out['epoch_s_median']:.2f} s (data {out['data_s_median']:.2f} s), "
        f"{out['structures_per_s_median']:.0f} structures/s; peak RSS {out['peak_rss_max_rank_mb']:.0f} MB largest rank, "
        f"{out['peak_rss_sum_mb']:.0f} MB sum; wall {wall:.0f} s; load {out['loadavg_end']:.2f}")
    return out


# ----------------------------------------------------------------------------- report


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def report(info: dict, stores: list[dict], runs: list[dict], unfit: list[dict], skipped: list[int], base: int, epochs: int,
           chunk_mb: float) -> tuple[str, dict]:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [HEADING, "",
             f"{stamp}; {info['nproc']} CPU(s) usable of {info['host_cpus']} ({info['cpu_model']}), {info['memory_gib']} GiB, no GPU; "
             f"torch {info['torch']} ({info['torch_threads']} threads), numpy {info['numpy']}, zarr {info['zarr']}, Python {info['python']}; "
             f"commit {info['git_commit']}{' + local changes in aenet_dist' if info['git_dirty_aenet_dist'] else ''}; "
             f"load average at start {info['loadavg_1min_at_start']:.2f} (the machine is shared: other work slows every number). "
             f"`bench/scale.py`: `datasets synth` (Cu/Au/Ni, FORCESPERCENT 20), featurized with `mpiexec -n 2 ... --chunk-mb {chunk_mb:g}` "
             f"(float64 dG/dR); training {epochs} epochs, float32, 2 x 10 tanh, batch 128, Adam 1e-3, force weight 0.1, 10 % test, CPU; "
             f"median of epochs 2..{epochs}. s/epoch per 1000 = epoch time (test evaluation included) per 1000 structures of the set. "
             f"Peak RSS: psutil every 0.1 s + VmHWM; 'data part' = largest rank's peak minus a bare `import aenet_dist.train` "
             f"({base / MiB:.0f} MB).", "",
             "| structures | atoms | dG rows | featurize (s) | store MiB | cache | ranks | epoch (s) | train (s) | data wait (s) | structures/s | s/epoch per 1000 | peak RSS max rank (MB) | peak RSS sum (MB) | data part / store | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_size = {d["size"]: d for d in stores}
    for r in runs:
        d = by_size[r["size"]]
        feat = "-" if d["featurize_wall_s"] is None else f"{d['featurize_wall_s']:.1f}"
        lines.append(
            f"| {d['structures']} | {d['atoms']} | {d['deriv_rows']} | {feat} | {d['store_bytes'] / MiB:.0f} | {r['label']} | {r['ranks']} | "
            f"{r['epoch_s_median']:.2f} | {r['train_s_median']:.2f} | {r['data_s_median']:.2f} | {r['structures_per_s_median']:.0f} | "
            f"{r['epoch_s_per_1000_structures']:.2f} | {r['peak_rss_max_rank_mb']:.0f} | {r['peak_rss_sum_mb']:.0f} | "
            f"{r['data_rss_max_rank_over_store']:.2f} | {r['loadavg_start']:.2f} |")
    lines.append("")
    summary = {}
    one_rank = {label: [r for r in runs if r["label"] == label and r["ranks"] == 1] for label in ("memory", "stream")}
    for label, series in one_rank.items():
        fit = linear_fit([r["size"] for r in series], [r["epoch_s_median"] for r in series])
        if series:
            per = ", ".join(f"{r['size']}: {r['epoch_s_per_1000_structures']:.2f}" for r in series)
            lines.append(f"- **Cost per structure** ({label}, 1 rank; s/epoch per 1000 structures): {per}"
                         + (f"; fit epoch_s = {fit[0]:.2f} + {1000 * fit[1]:.2f} s x N/1000." if fit else "."))
            summary[f"fit_{label}_epoch_s"] = (fit[0], 1000 * fit[1]) if fit else None
    for d in stores:
        lines.append(f"- {d['structures']} structures: {d['force_structures']} with derivatives, {d['blocks']} blocks, store "
                     f"{d['store_bytes'] / MiB:.0f} MiB on disk, {d['shard_bytes_float32'] / MiB:.0f} MiB as a float32 cache; "
                     f"smallest stream budget (plan) {d['stream_min_budget_bytes'] / MiB:.0f} MiB.")
    for r in runs:
        if r["cache"] == "stream" and r["ranks"] == 1:
            d = by_size[r["size"]]
            mem = next((m for m in runs if m["cache"] == "memory" and m["ranks"] == 1 and m["size"] == r["size"]
                        and ("data.batches=fixed" in m["overrides"]) == ("data.batches=fixed" in r["overrides"])), None)
            budget = next((float(o.split("=")[1]) for o in r["overrides"] if o.startswith("data.memory_budget_gb=")), None)
            within = ""
            if budget is not None:
                within = (f"; budget {budget} GiB = {budget * 2**30 / d['store_bytes']:.2f} x the store: data part "
                          f"{'within' if r['data_rss_max_rank_mb'] * MiB <= budget * 2**30 else 'ABOVE'} the budget")
            lines.append(f"- {r['label']}, {r['size']}: peak RSS {r['peak_rss_max_rank_mb']:.0f} MB = "
                         f"{r['peak_rss_max_rank_over_store']:.2f} x the store ({d['store_bytes'] / MiB:.0f} MiB); data part "
                         f"{r['data_rss_max_rank_mb']:.0f} MB = {r['data_rss_max_rank_over_store']:.2f} x"
                         + (f" (memory: {mem['data_rss_max_rank_mb']:.0f} MB = {mem['data_rss_max_rank_over_store']:.2f} x)" if mem else "")
                         + f"; epoch {r['epoch_s_median']:.2f} s" + (f" vs {mem['epoch_s_median']:.2f} s in memory" if mem else "") + within + ".")
    for r in runs:
        if r["ranks"] > 1:
            single = next((m for m in runs if m["label"] == r["label"] and m["ranks"] == 1 and m["size"] == r["size"]), None)
            if single:
                lines.append(f"- {r['size']}, {r['label']}: 2 ranks {r['epoch_s_median']:.2f} s/epoch vs 1 rank {single['epoch_s_median']:.2f} s "
                             f"(speed-up {single['epoch_s_median'] / r['epoch_s_median']:.2f}x on 2 shared cores); peak RSS sum "
                             f"{r['peak_rss_sum_mb']:.0f} MB vs {single['peak_rss_sum_mb']:.0f} MB.")
    for u in unfit:
        lines.append(f"- {u['size']}, {u['label']} {u['ranks']} rank(s): not run, `plan` puts its host memory at "
                     f"{u['need_bytes'] / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of what this machine has available.")
    for n in skipped or ([ISSUE_SIZE] if ISSUE_SIZE not in by_size else []):
        lines.append(f"- {n} structures (the issue's full size): **not run** this time (`--sizes {n} --allow-large`).")
        summary.setdefault("not_run", []).append(n)
    if stores:
        last = stores[-1]
        lines += ["", f"`aenet-dist plan` for the largest store ({last['structures']} structures), 2 ranks:", "", "```",
                  last["plan_ranks2"], "```"]
    lines.append("")
    return "\n".join(lines), summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,5000", help="comma-separated data set sizes (default 1000,5000; 45000 needs --allow-large)")
    parser.add_argument("--chunk-mb", type=float, default=32.0, help="featurize's --chunk-mb (default 32, its own default; 8 reuses the older stores)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training run (default 3; median over 2..end)")
    parser.add_argument("--allow-large", action="store_true", help=f"run sizes above {LARGE} (hours on 2 cores)")
    parser.add_argument("--keep", type=Path, help="keep run directories and logs here (default: a temporary directory, removed)")
    parser.add_argument("--batches", nargs="+", default=["reshuffle", "fixed"], choices=["reshuffle", "fixed"],
                        help="data.batches of the training runs (default both: every run with each)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md / results.jsonl")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or min(sizes) < 20 or args.epochs < 2:
        sys.exit("--sizes must be >= 20 each and --epochs >= 2")
    for exe in (PY, TORCHRUN, MPIEXEC):
        if not exe.exists():
            sys.exit(f"{exe} not found: run `bash scripts/setup_env.sh` first")
    skipped = [n for n in sizes if n > LARGE and not args.allow_large]
    sizes = [n for n in sizes if n not in skipped]
    for n in skipped:
        log(f"[{n}] skipped: far too slow for this {os.cpu_count()}-core machine (pass --allow-large to run it anyway)")
    CACHE.mkdir(parents=True, exist_ok=True)
    info = machine()
    base = base_rss()
    log(f"bare `import aenet_dist.train`: {base / MiB:.0f} MB RSS")
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    runs_dir = args.keep.resolve() if args.keep else tmp
    runs_dir.mkdir(parents=True, exist_ok=True)
    stores, runs, unfit = [], [], []
    try:
        for n in sizes:
            gen = ensure_dataset(n)
            data = ensure_store(n, gen["generate_in"], args.chunk_mb)
            data["generate_wall_s"] = gen["generate_wall_s"]
            stores.append(data)
            config = write_config(runs_dir, data["store"])
            chosen = (RUNS if "reshuffle" in args.batches else []) + (FIXED_RUNS if "fixed" in args.batches else [])
            for label, ranks, overrides in chosen:
                if any(o.startswith("data.memory_budget_gb=") for o in overrides) and data["stream_min_budget_bytes"] > STREAM_BUDGET_GB * 2**30:
                    budget = round(1.05 * data["stream_min_budget_bytes"] / 2**30, 2)  # the plan's smallest, plus 5 %
                    label = label.replace(f"{STREAM_BUDGET_GB} GiB", f"{budget} GiB")
                    overrides = [o for o in overrides if not o.startswith("data.memory_budget_gb=")] + [f"data.memory_budget_gb={budget}"]
                need = data["host_memory_ranks"][ranks]
                if label.startswith("memory") and need > MEMORY_FRACTION * psutil.virtual_memory().available:
                    log(f"[{n}] train {label}, {ranks} rank(s): skipped, plan says {need / 2**30:.1f} GiB of host memory")
                    unfit.append({"size": n, "label": label, "ranks": ranks, "need_bytes": need})
                    continue
                runs.append(train(config, runs_dir, n, label, ranks, overrides, args.epochs, data, base))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text, summary = report(info, stores, runs, unfit, skipped, base, args.epochs, args.chunk_mb)
    print(text)
    if not args.no_save:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        head = {"bench": "scale", "dataset": "synth", "time": stamp, **info, "base_rss_mb": base / MiB, "chunk_mb": args.chunk_mb}
        by_size = {d["size"]: d for d in stores}
        records = [{**head, "what": "store", **{k: v for k, v in d.items() if k != "plan_ranks2"}} for d in stores]
        records += [{**head, **r, **{f"data_{k}": v for k, v in by_size[r["size"]].items() if k in ("structures", "atoms", "deriv_rows", "store_bytes", "featurize_wall_s")},
                     "settings": SETTINGS} for r in runs]
        records.append({**head, "what": "summary", **summary})
        append_results(text, records)
        log(f"appended to {RESULTS_MD.relative_to(ROOT)} and {RESULTS_JSONL.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
