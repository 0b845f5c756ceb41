"""Benchmark of ``aenet_dist.featurize`` on the TiO2 reference data set, against aenet's generate.x.

    .venv/bin/python bench/featurize.py [--ranks 1 2] [--pairs 3] [--keep DIR] [--no-save]

Runs the featurize command line as a subprocess (``mpiexec -n N python -m
aenet_dist.featurize shared/data/tio2/generate.in ...``, float64 derivatives) with the
250 force structures that generate.x chose (``shared/refdata/full1000_force_structures_gfortran.txt``),
so both programs write the same derivatives. aenet's generate.x (built by ``shared/peers/build.sh``)
runs in the same invocation, alternating with ours (``--pairs`` times): speed-ups are per pair,
then the median, in wall time and in CPU-seconds. Measures, per rank count: end-to-end wall time
(interpreter, imports and MPI start-up included), the in-process time the command prints,
structures/s, atoms/s, store size on disk and peak resident memory. Also: the fixed start-up
cost of each rank, ``python -c "import aenet_dist.featurize"`` (and whether that imports torch),
vesin vs ASE neighbour lists on all 1000 structures, derivative bytes per force structure vs
its atom count, and a check of the stored descriptors against aenet's (refdata, 20 structures).
featurize is numpy on the CPU (no device option), OpenBLAS on one thread per rank (aenet_dist's
default OPENBLAS_NUM_THREADS=1).

Prints a markdown table, appends it to bench/RESULTS.md and one JSON line per
measurement to bench/results.jsonl. Not collected by pytest (testpaths = tests/).
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# common before numpy: it imports aenet_dist, which limits numpy's OpenBLAS to the command's threads
from common import TreeMemory, append_results, dir_bytes, import_cost, machine
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
VENV = Path(os.environ.get("AENET_DIST_VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"
MPIEXEC = VENV / "bin" / "mpiexec"
GENERATE_IN = SHARED / "data" / "tio2" / "generate.in"
FORCE_LIST = SHARED / "refdata" / "full1000_force_structures_gfortran.txt"
REF_DESCRIPTORS = SHARED / "refdata" / "tio2_20_descriptors.npz"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_JSONL = ROOT / "bench" / "results.jsonl"
HEADING = "## featurize (TiO2, 1000 structures, 25 % forces)"

PEERS_BUILD = SHARED / "peers" / "build.sh"
NUM_FEATURES = 56
CUTOFF = 6.5


# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- measurements


def write_force_list(tmp: Path) -> tuple[Path, int]:
    """The refdata force list (``xsf/structureNNNN.xsf`` per line) as basenames, one per line."""
    names = [line.strip() for line in FORCE_LIST.read_text().splitlines() if line.strip() and not line.startswith("#")]
    path = tmp / "force_structures.txt"
    path.write_text("".join(Path(n).name + "\n" for n in names))
    return path, len(names)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_generate_x(generate_x: Path, work: Path) -> dict:
    """aenet's generate.x on the same generate.in (in a copy of its directory); wall and CPU seconds, output size."""
    gen = work / "generate_x"
    shutil.rmtree(gen, ignore_errors=True)
    gen.mkdir(parents=True)
    for f in GENERATE_IN.parent.glob("*.stp"):
        shutil.copy(f, gen)
    shutil.copy(GENERATE_IN, gen)
    (gen / "xsf").symlink_to(GENERATE_IN.parent / "xsf")
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    proc = subprocess.run([str(generate_x), "generate.in"], cwd=gen, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    if proc.returncode != 0:
        sys.exit(f"generate.x failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    size = sum(p.stat().st_size for p in gen.iterdir() if p.is_file() and p.suffix not in (".stp", ".in"))
    shutil.rmtree(gen, ignore_errors=True)
    return {"wall_s": wall, "cpu_s": cpu, "output_bytes": size, "loadavg_end": round(os.getloadavg()[0], 2)}


def run_featurize(ranks: int, out: Path, force_list: Path) -> dict:
    """One featurize run under mpiexec; returns its timings, memory and store size."""
    cmd = [str(MPIEXEC), "-n", str(ranks), str(PY), "-m", "aenet_dist.featurize", str(GENERATE_IN),
           "--out", str(out), "--force-list", str(force_list), "--deriv-dtype", "float64", "--no-progress"]
    timed = ["/usr/bin/time", "-v"] + cmd if Path("/usr/bin/time").exists() else cmd
    cpu0 = _children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(timed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemory(proc.pid, match="aenet_dist.featurize") as mem:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    if proc.returncode != 0:
        sys.exit(f"featurize with {ranks} rank(s) failed (exit {proc.returncode}):\n{stdout}\n{stderr}")
    m = re.search(r"wall time\s+([0-9.]+) s", stdout)
    if not m:
        sys.exit(f"no 'wall time' line in the featurize output:\n{stdout}")
    # GNU time reports the largest single process of the tree (getrusage RUSAGE_CHILDREN semantics).
    t = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    size, files = dir_bytes(out)
    return {
        "ranks": ranks,
        "wall_s": wall,
        "cpu_s": cpu,
        "loadavg_end": round(os.getloadavg()[0], 2),
        "inprocess_s": float(m.group(1)),
        "store_bytes": size,
        "store_files": files,
        "peak_rss_max_rank_mb": (int(t.group(1)) / 1024 if t else mem.peak_max / 2**20),
        "peak_rss_sum_mb": mem.peak_sum / 2**20,
        "summary": stdout.strip(),
    }


def neighbor_comparison() -> dict:
    """vesin (aenet_dist.neighbors) vs ASE's primitive_neighbor_list, all 1000 structures, cutoff 6.5 Å."""
    from ase.neighborlist import primitive_neighbor_list

    from aenet_dist.formats.generate_in import read_generate_input
    from aenet_dist.neighbors import neighbor_list
    from aenet_dist.structures import read_structures

    config = read_generate_input(GENERATE_IN)
    structures = [s for f in config.files for s in read_structures(f)]
    pos = [s.pos for s in structures]
    cells = [s.cell for s in structures]
    pbcs = [s.pbc for s in structures]
    vesin_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        nb = neighbor_list(pos, cells, pbcs, CUTOFF)
        vesin_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ase_pairs = 0
    for s in structures:
        cell = s.cell if s.pbc else np.eye(3) * (np.ptp(s.pos, axis=0).max() + 2 * CUTOFF + 1.0)
        i, _ = primitive_neighbor_list("ij", [s.pbc] * 3, cell, s.pos, CUTOFF, self_interaction=False)
        ase_pairs += len(i)
    ase_time = time.perf_counter() - t0
    return {
        "structures": len(structures),
        "atoms": int(sum(s.num_atoms for s in structures)),
        "vesin_s": min(vesin_times),
        "ase_s": ase_time,
        "vesin_pairs": int(nb.center.size),
        "ase_pairs": int(ase_pairs),
    }


def derivative_storage(store: Path) -> dict:
    """Bytes of float64 derivative rows per force structure vs its atom count; fit bytes ~ atoms^k."""
    from aenet_dist.store import StoreReader

    r = StoreReader(store)
    sel = r.has_derivs.astype(bool)
    atoms = r.num_atoms[sel].astype(np.float64)
    rows = r.num_deriv_rows[sel].astype(np.float64)
    nbytes = rows * (NUM_FEATURES * 3 * 8 + 8)
    k, logc = np.polyfit(np.log(atoms), np.log(nbytes), 1)
    by_size = {}
    for n in (6, 23, 24, 46, 47, 95):
        hit = atoms == n
        if hit.any():
            by_size[int(n)] = float(nbytes[hit].mean())
    return {
        "force_structures": int(sel.sum()),
        "force_atoms": int(atoms.sum()),
        "deriv_rows": int(rows.sum()),
        "rows_per_atom": float(rows.sum() / atoms.sum()),
        "deriv_bytes_total": float(nbytes.sum()),
        "bytes_min": float(nbytes.min()),
        "bytes_max": float(nbytes.max()),
        "atoms_min": int(atoms.min()),
        "atoms_max": int(atoms.max()),
        "fit_k": float(k),
        "fit_c": float(np.exp(logc)),
        "mean_bytes_by_atoms": by_size,
    }


def check_descriptors(store: Path) -> dict:
    """Stored G of the 20 refdata structures vs aenet's generate.x (max abs difference)."""
    from aenet_dist.store import StoreReader

    ref = np.load(REF_DESCRIPTORS)
    r = StoreReader(store)
    index = {Path(n).name: s for s, n in enumerate(r.names())}
    worst = 0.0
    for k, name in enumerate(ref["file_names"]):
        s = index[str(name)]
        part = r.read_range(s, s + 1)
        num = int(part.num_atoms.sum())
        G = np.full((num, NUM_FEATURES), np.nan)
        for rows in part.elements.values():
            G[rows.atom] = rows.G
        a0, n = int(ref["atom_offset"][k]), int(ref["natoms"][k])
        if num != n:
            raise SystemExit(f"{name}: {num} atoms in the store, {n} in refdata")
        worst = max(worst, float(np.abs(G - ref["G"][a0 : a0 + n]).max()))
    return {"structures": len(ref["file_names"]), "max_abs_diff": worst, "ok": bool(worst <= 1e-10)}


# ----------------------------------------------------------------------------- report


def _join(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def report(info: dict, runs: list[dict], peers: list[dict], startup: dict, nbl: dict, deriv: dict, check: dict, num_atoms: int) -> str:
    num_structures = nbl["structures"]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        HEADING,
        "",
        f"{stamp}; {info['nproc']} CPU(s) ({info['cpu_model']}); numpy {info['numpy']} (OPENBLAS_NUM_THREADS="
        f"{info['openblas_num_threads']}), zarr {info['zarr']}, Python {info['python']}; load average at start {info['loadavg_1min_at_start']:.2f} "
        f"(other work on the machine slows every number). `bench/featurize.py`: `mpiexec -n N python -m aenet_dist.featurize "
        f"shared/data/tio2/generate.in --deriv-dtype float64 --force-list` (the 250 structures generate.x chose), "
        f"{num_structures} structures, {num_atoms} atoms. **aenet's generate.x ran in this invocation, {len(peers)} time(s), "
        "alternating with ours**; speed-ups are per pair (end-to-end wall; CPU-seconds of the whole process tree), then the median.",
        "",
        "| program | ranks | wall, end to end (s), median (per run) | CPU-s | speed-up vs generate.x, wall (per pair) | CPU-s / generate.x's | "
        "in-process (s) | output on disk (MB) | peak RSS, largest process (MB) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    med = statistics.median
    lines.append(
        f"| aenet generate.x | 1 | {med(p['wall_s'] for p in peers):.2f} ({_join(p['wall_s'] for p in peers)}) | "
        f"{med(p['cpu_s'] for p in peers):.2f} | 1 | 1 | – | {peers[0]['output_bytes'] / 1e6:.0f} | – | "
        f"{_join(p['loadavg_end'] for p in peers)} |"
    )
    for ranks in sorted({r["ranks"] for r in runs}):
        rs = [r for r in runs if r["ranks"] == ranks]
        ratios = [p["wall_s"] / r["wall_s"] for p, r in zip(peers, rs)]
        cpu_ratio = med(r["cpu_s"] for r in rs) / med(p["cpu_s"] for p in peers)
        lines.append(
            f"| aenet_dist | {ranks} | {med(r['wall_s'] for r in rs):.2f} ({_join(r['wall_s'] for r in rs)}) | "
            f"{med(r['cpu_s'] for r in rs):.2f} | **{med(ratios):.2f}x** ({_join(ratios)}) | {cpu_ratio:.2f} | "
            f"{med(r['inprocess_s'] for r in rs):.2f} | {rs[0]['store_bytes'] / 1e6:.0f} | {max(r['peak_rss_max_rank_mb'] for r in rs):.0f} | "
            f"{_join(r['loadavg_end'] for r in rs)} |"
        )
    lines += [
        "",
        "structures/s and atoms/s use the in-process time (aenet: its wall time). End-to-end includes interpreter, "
        f"import and MPI start-up; `python -c 'import aenet_dist.featurize'` takes {startup['import_featurize_s']:.2f} s per rank "
        f"({'**it imports torch**' if startup['featurize_imports_torch'] else 'torch not imported'}; `python -c pass`: "
        f"{startup['python_s']:.2f} s; medians of 3). Largest process: GNU time's maximum RSS "
        "(the largest single process of the tree); sum of ranks: psutil, polled every 20 ms, RSS of all Python "
        "processes added up (shared library pages counted once per rank).",
        "",
        f"- **Neighbour lists** (cutoff {CUTOFF} Å, all {num_structures} structures, in-process): vesin via "
        f"`aenet_dist.neighbors.neighbor_list` {nbl['vesin_s']:.2f} s (best of 3), ASE `primitive_neighbor_list` "
        f"{nbl['ase_s']:.1f} s ({nbl['ase_s'] / nbl['vesin_s']:.0f}x); pairs {nbl['vesin_pairs']} vs {nbl['ase_pairs']}.",
        f"- **Derivative storage** (float64, {deriv['force_structures']} force structures, {deriv['force_atoms']} atoms): "
        f"{deriv['deriv_rows']} rows (i, a) = {deriv['rows_per_atom']:.1f} per atom (periodic images summed; aenet keeps "
        f"94.1 image entries per atom), {deriv['deriv_bytes_total'] / 1e6:.0f} MB uncompressed at "
        f"{NUM_FEATURES}·3·8+8 B per row, against aenet's 665 MB `.forces`. Per structure "
        f"{deriv['bytes_min'] / 1e3:.0f} kB ({deriv['atoms_min']} atoms) to {deriv['bytes_max'] / 1e6:.2f} MB "
        f"({deriv['atoms_max']} atoms); fit bytes ≈ {deriv['fit_c']:.0f}·atoms^{deriv['fit_k']:.2f} "
        "(k = 2 while every atom sees every other atom's images, → 1 once the cell outgrows the cutoff).",
        f"- **Descriptors vs aenet** ({check['structures']} refdata structures): max |G − G_aenet| = "
        f"{check['max_abs_diff']:.1e} ({'within' if check['ok'] else 'OUTSIDE'} 1e-10).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="MPI rank counts (default 1 2)")
    parser.add_argument("--pairs", type=int, default=3, help="times generate.x and our runs alternate (default 3; medians)")
    parser.add_argument("--keep", type=Path, help="keep the stores in this directory (default: a temporary one, removed)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md / results.jsonl")
    args = parser.parse_args()
    if not GENERATE_IN.exists() or not FORCE_LIST.exists():
        sys.exit(f"shared data not found at {SHARED} (expected {GENERATE_IN} and {FORCE_LIST}); "
                 "it must sit beside the repository as ../shared")
    if not MPIEXEC.exists():
        sys.exit(f"{MPIEXEC} not found: run `bash scripts/setup_env.sh` first")

    info = machine(torch_info=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench_featurize_"))
    work = args.keep or tmp
    work.mkdir(parents=True, exist_ok=True)
    try:
        force_list, num_forces = write_force_list(tmp)
        print(f"force list: {num_forces} structures from {FORCE_LIST.name}", file=sys.stderr)
        featurize_import = import_cost(PY, "aenet_dist.featurize")
        startup = {"python_s": import_cost(PY, "sys")["seconds"], "import_featurize_s": featurize_import["seconds"],
                   "featurize_imports_torch": featurize_import["imports_torch"]}
        print(f"python start-up {startup['python_s']:.2f} s, import aenet_dist.featurize {startup['import_featurize_s']:.2f} s "
              f"(imports torch: {startup['featurize_imports_torch']})", file=sys.stderr)
        build = subprocess.run(["bash", str(PEERS_BUILD)], capture_output=True, text=True)
        if build.returncode != 0:
            sys.exit(f"building the peers failed:\n{build.stderr[-3000:]}")
        generate_x = Path(build.stdout.strip().splitlines()[-1]) / "generate.x"
        runs, peers = [], []
        for pair in range(args.pairs):  # generate.x, then ours: both see the same machine state
            peers.append(run_generate_x(generate_x, work))
            print(f"generate.x: {peers[-1]['wall_s']:.2f} s wall, {peers[-1]['cpu_s']:.2f} CPU-s", file=sys.stderr)
            for ranks in args.ranks:
                out = work / f"tio2_{ranks}ranks.zarr"
                shutil.rmtree(out, ignore_errors=True)
                print(f"featurize, {ranks} rank(s) ...", file=sys.stderr)
                runs.append(run_featurize(ranks, out, force_list))
                print(f"  {runs[-1]['wall_s']:.2f} s wall, {runs[-1]['cpu_s']:.2f} CPU-s", file=sys.stderr)
        store = work / f"tio2_{args.ranks[0]}ranks.zarr"
        from aenet_dist.store import StoreReader

        num_atoms = int(StoreReader(store).num_atoms.sum())
        print("neighbour lists: vesin vs ASE ...", file=sys.stderr)
        nbl = neighbor_comparison()
        deriv = derivative_storage(store)
        check = check_descriptors(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    text = report(info, runs, peers, startup, nbl, deriv, check, num_atoms)
    print(text)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    base = {"bench": "featurize", "dataset": "tio2", "time": stamp, **info, "force_structures": num_forces, "deriv_dtype": "float64"}
    records = [{**base, "what": "featurize", **{k: v for k, v in r.items() if k != "summary"},
                "structures_per_s": nbl["structures"] / r["inprocess_s"], "atoms_per_s": num_atoms / r["inprocess_s"]} for r in runs]
    records += [
        *({**base, "what": "aenet_generate_x", "ranks": 1, **p, "source": "shared/peers/build.sh, this run"} for p in peers),
        {**base, "what": "startup", **startup},
        {**base, "what": "neighbor_list", "cutoff": CUTOFF, **nbl},
        {**base, "what": "deriv_storage", **deriv},
        {**base, "what": "descriptor_check", **check},
    ]
    if not args.no_save:
        append_results(text, records)
        print(f"appended to {RESULTS_MD.relative_to(ROOT)} and {RESULTS_JSONL.relative_to(ROOT)}", file=sys.stderr)
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
