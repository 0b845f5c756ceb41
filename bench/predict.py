"""Benchmark of ``aenet-dist predict`` on all 1000 TiO2 structures, against aenet's predict.x.

    .venv/bin/python bench/predict.py [--repeats 3] [--no-rows] [--no-save] [--save-to DIR]

``AENET_DIST_SHARED`` overrides the location of ``shared/`` (default: beside the repository).

Potentials: ``shared/refdata/{Ti,O}.pytorch.nn``; structures: the 1000 XSF files of
``shared/data/tio2/xsf`` (21,285 atoms), listed in a predict.in. Measures, energies only and with
forces, from the XSF files to the results:

* end to end: the command line as a subprocess (``aenet-dist predict predict.in --out report.txt``,
  or ``python -m aenet_dist.predict`` where the dispatcher has no ``predict`` yet), interpreter
  start-up included, text report written like predict.x's; with ``--threads 1`` and with the
  default (one thread per usable core), wall and CPU-seconds each, so that the per-core
  comparison with the serial predict.x stays visible;
* in-process: Predictor.from_potentials + reading the XSF files + predict (one thread), after one warm-up run;
* the ``rows`` engine (featurize's sparse dG/dR rows contracted with dE/dG) with forces, once;
* the agreement with predict.x on the 20 refdata structures;
* start-up: ``python -c pass``, ``python -c "import aenet_dist.cli, aenet_dist.predict"`` (and whether
  that imports torch: it should not), and, for comparison only, ``import torch``, which a
  torch-based predictor would add to every run.

predict is numpy on the CPU, float64, OpenBLAS on one thread (aenet_dist sets OPENBLAS_NUM_THREADS=1
unless it is set); its ``--threads`` N above 1 reads and predicts chunks of files in N forked worker processes.

aenet's predict.x (serial Fortran, built by ``shared/peers/build.sh``) runs in the same invocation,
alternating with our end-to-end runs on the same input: speed-ups are per pair, then the median.
Prints a markdown table, appends it to bench/RESULTS.md under
"## predict (TiO2, 1000 structures)" and one JSON line per measurement to bench/results.jsonl.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# common before numpy: it imports aenet_dist, which limits numpy's OpenBLAS to the command's threads
from common import RESULTS_JSONL, RESULTS_MD, append_results, import_cost, load1, machine
from aenet_dist.predict import default_threads
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AENET_DIST_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VENV = Path(os.environ.get("AENET_DIST_VENV", ROOT / ".venv"))
PY = Path(sys.executable)  # the interpreter running this script (the venv's, as documented above)
XSF_DIR = SHARED / "data" / "tio2" / "xsf"
REFDATA = SHARED / "refdata"
POTENTIALS = {"Ti": REFDATA / "Ti.pytorch.nn", "O": REFDATA / "O.pytorch.nn"}
HEADING = "## predict (TiO2, 1000 structures)"
PEERS_BUILD = SHARED / "peers" / "build.sh"


def command_prefix() -> list[str]:
    """``aenet-dist predict`` if the dispatcher knows it, else ``python -m aenet_dist.predict`` (same start-up)."""
    cli = VENV / "bin" / "aenet-dist"
    if cli.exists() and subprocess.run([str(cli), "predict", "--help"], capture_output=True).returncode == 0:
        return [str(cli), "predict"]
    return [str(PY), "-m", "aenet_dist.predict"]


def write_predict_in(tmp: Path, files: list[Path], forces: bool) -> Path:
    path = tmp / f"predict_{'forces' if forces else 'energies'}.in"
    lines = ["TYPES", "2", "Ti", "O", "", "NETWORKS"] + [f"{el}  {p}" for el, p in POTENTIALS.items()] + [""]
    lines += (["FORCES", ""] if forces else []) + ["FILES", str(len(files))] + [str(f) for f in files]
    path.write_text("\n".join(lines) + "\n")
    return path


def children_cpu_s() -> float:
    """CPU-seconds (user + system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def end_to_end(prefix: list[str], predict_in: Path, out: Path, threads: int | None = None) -> tuple[float, float]:
    """(wall, CPU-seconds) of one ``predict`` command (``--threads`` if given)."""
    extra = [] if threads is None else ["--threads", str(threads)]
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    proc = subprocess.run(prefix + [str(predict_in), "--out", str(out), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"predict failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return wall, children_cpu_s() - cpu0


def peer_end_to_end(predict_x: Path, tmp: Path, files: list[Path], forces: bool) -> tuple[float, float]:
    """aenet's predict.x on the same structures; it wants the .nn files by short names in its directory."""
    work = tmp / "predict_x"
    work.mkdir(exist_ok=True)
    for el, path in POTENTIALS.items():
        link = work / path.name
        if not link.exists():
            link.symlink_to(path)
    lines = ["TYPES", "2", "Ti", "O", "", "NETWORKS"] + [f"  {el}  {p.name}" for el, p in POTENTIALS.items()] + [""]
    lines += (["FORCES", ""] if forces else []) + ["FILES", str(len(files))] + [str(f) for f in files]
    (work / "predict.in").write_text("\n".join(lines) + "\n")
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    proc = subprocess.run([str(predict_x), "predict.in"], cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "Error" in proc.stdout:
        sys.exit(f"predict.x failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return wall, children_cpu_s() - cpu0


def in_process(files: list[Path], forces: bool, repeats: int, engine: str = "pairs") -> tuple[list[float], dict]:
    """Wall of potentials + reading + predict, after a warm-up; also the split of the last run."""
    from aenet_dist.predict import Predictor
    from aenet_dist.structures import read_xsf

    def once():
        t0 = time.perf_counter()
        predictor = Predictor.from_potentials(POTENTIALS)
        t1 = time.perf_counter()
        structures = [read_xsf(f) for f in files]
        t2 = time.perf_counter()
        results = predictor.predict(structures, forces=forces, engine=engine)
        t3 = time.perf_counter()
        assert len(results) == len(files)
        return t3 - t0, {"load_potentials_s": t1 - t0, "read_xsf_s": t2 - t1, "predict_s": t3 - t2}

    once()  # warm-up: lazy imports, allocator, page cache of the XSF files
    runs = [once() for _ in range(repeats)]
    return [r[0] for r in runs], runs[-1][1]


def check_reference() -> dict:
    from aenet_dist.predict import Predictor
    from aenet_dist.structures import read_xsf

    ref = np.load(REFDATA / "tio2_20_predict.npz")
    structures = [read_xsf(XSF_DIR / n) for n in ref["file_names"]]
    results = Predictor.from_potentials(POTENTIALS).predict(structures, forces=True)
    de = np.abs(np.array([r.energy for r in results]) - ref["energy_total"]) / ref["natoms"]
    df = np.abs(np.concatenate([r.forces for r in results]) - ref["forces"])
    return {"structures": 20, "max_abs_energy_eV_atom": float(de.max()), "max_abs_force_eV_A": float(df.max())}


def startup() -> dict:
    """Interpreter start-up, predict's imports, and (for comparison only) ``import torch``: medians of 3."""
    return {"python_s": import_cost(PY, "sys")["seconds"], "predict": import_cost(PY, "aenet_dist.cli, aenet_dist.predict"),
            "import_torch_s": import_cost(PY, "torch")["seconds"]}


def report(info: dict, rows: list[dict], check: dict, start: dict, num_atoms: int, num_structures: int, prefix: list[str]) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = " ".join(Path(prefix[0]).name if k == 0 else a for k, a in enumerate(prefix))
    predict_import = start["predict"]
    lines = [
        HEADING, "",
        f"{stamp}; {info['nproc']} CPU(s) ({info['cpu_model']}); numpy {info['numpy']} (OpenBLAS threads: "
        f"OPENBLAS_NUM_THREADS={info['openblas_num_threads']}), float64, Python {info['python']}; load average at start "
        f"{info['loadavg_1min_at_start']} (other work on the machine slows every number). `bench/predict.py`: "
        f"{num_structures} XSF files, {num_atoms} atoms, `shared/refdata/{{Ti,O}}.pytorch.nn`; end to end = `{command} "
        f"predict.in --out report.txt` as a subprocess; in-process = potentials + XSF reading + predict (median of the "
        f"repeats after a warm-up). **aenet's predict.x ran in this invocation**, alternating with our end-to-end runs; "
        f"speed-up = predict.x's median wall / this wall (end to end: the median of the per-pair ratios).", "",
        "| program | measure | forces | wall (s) | CPU-s | structures/s | atoms/s | speed-up vs predict.x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    peer = {r["forces"]: r for r in rows if r["program"] == "aenet predict.x"}
    for r in rows:
        if r["program"] == "aenet predict.x":
            speed = "1"
        elif "pair_ratios" in r:
            speed = f"**{statistics.median(r['pair_ratios']):.2f}x** ({', '.join(f'{x:.2f}' for x in r['pair_ratios'])})"
        else:
            speed = f"{peer[r['forces']]['wall_s'] / r['wall_s']:.2f}x"
        cpu = f"{r['cpu_s']:.2f}" if "cpu_s" in r else ""
        lines.append(f"| {r['program']} | {r['measure']} | {'yes' if r['forces'] else 'no'} | {r['wall_s']:.2f} | {cpu} | "
                     f"{num_structures / r['wall_s']:.0f} | {num_atoms / r['wall_s']:.0f} | {speed} |")
    lines += ["", f"- Start-up (medians of 3): `python -c 'import sys'` {start['python_s']:.2f} s; `import aenet_dist.cli, "
              f"aenet_dist.predict` {predict_import['seconds']:.2f} s, "
              f"{'**which imports torch**' if predict_import['imports_torch'] else 'torch not imported'}. "
              f"For comparison only: `import torch` takes {start['import_torch_s']:.2f} s, what a torch-based predictor adds to each run.",
              "- In-process split (last run): " + "; ".join(
                  f"{r['program']} {r['measure']} {'forces' if r['forces'] else 'energies'}: potentials {r['split']['load_potentials_s']:.2f} s, "
                  f"XSF {r['split']['read_xsf_s']:.2f} s, predict {r['split']['predict_s']:.2f} s" for r in rows if "split" in r),
              f"- Agreement with predict.x on the 20 refdata structures: max |ΔE| {check['max_abs_energy_eV_atom']:.1e} eV/atom, "
              f"max |ΔF| {check['max_abs_force_eV_A']:.1e} eV/Å.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median; default 3)")
    parser.add_argument("--no-rows", action="store_true", help="skip the rows-engine measurement")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md / results.jsonl")
    parser.add_argument("--save-to", type=Path, help="append to RESULTS.md / results.jsonl in this directory instead of bench/")
    args = parser.parse_args()
    files = sorted(XSF_DIR.glob("*.xsf"))
    if len(files) != 1000 or not all(p.exists() for p in POTENTIALS.values()):
        sys.exit(f"need the 1000 TiO2 XSF files in {XSF_DIR} and {list(POTENTIALS.values())}")
    from aenet_dist.structures import read_xsf

    num_atoms = sum(read_xsf(f).num_atoms for f in files)
    info = machine(torch_info=False)
    prefix = command_prefix()
    build = subprocess.run(["bash", str(PEERS_BUILD)], capture_output=True, text=True)
    if build.returncode != 0:
        sys.exit(f"building the peers failed:\n{build.stderr[-3000:]}")
    predict_x = Path(build.stdout.strip().splitlines()[-1]) / "predict.x"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cores = default_threads()  # what the command uses by default
        for forces in (False, True):
            predict_in = write_predict_in(tmp, files, forces)
            theirs, ours = [], {1: [], cores: []}
            for _ in range(args.repeats):  # alternating: all see the same machine state
                theirs.append(peer_end_to_end(predict_x, tmp, files, forces))
                for threads in ours:
                    ours[threads].append(end_to_end(prefix, predict_in, tmp / "report.txt", None if threads == cores else threads))
            peer_walls = [w for w, _ in theirs]
            rows.append({"program": "aenet predict.x", "measure": "end to end, this run", "forces": forces,
                         "wall_s": statistics.median(peer_walls), "cpu_s": statistics.median(c for _, c in theirs),
                         "runs_s": peer_walls, "loadavg": load1()})
            for threads, runs in ours.items():
                walls = [w for w, _ in runs]
                # --threads N above 1: N forked worker processes (aenet-dist predict imports no torch, so it forks)
                measure = ("end to end, 1 thread" if threads == 1 else f"end to end, {threads} worker processes") + (" (default)" if threads == cores else "")
                rows.append({"program": "aenet_dist", "measure": measure, "forces": forces, "threads": threads,
                             "wall_s": statistics.median(walls), "cpu_s": statistics.median(c for _, c in runs), "runs_s": walls,
                             "pair_ratios": [t / o for t, o in zip(peer_walls, walls)], "loadavg": load1()})
            print(f"end to end, forces={forces}: predict.x {theirs}, ours {ours}", file=sys.stderr)
            report_bytes = (tmp / "report.txt").stat().st_size
        for forces in (False, True):
            times, split = in_process(files, forces, args.repeats)
            rows.append({"program": "aenet_dist", "measure": "in-process, 1 thread", "forces": forces, "wall_s": statistics.median(times),
                         "runs_s": times, "split": split})
            print(f"in-process, forces={forces}: {times}", file=sys.stderr)
        if not args.no_rows:
            times, split = in_process(files, True, 1, engine="rows")
            rows.append({"program": "aenet_dist (rows engine)", "measure": "in-process", "forces": True, "wall_s": times[0],
                         "runs_s": times, "split": split})
    check = check_reference()
    start = startup()
    text = report(info, rows, check, start, num_atoms, len(files), prefix)
    print(text)
    if not args.no_save:
        results_md, results_jsonl = (RESULTS_MD, RESULTS_JSONL) if args.save_to is None else \
            (args.save_to / "RESULTS.md", args.save_to / "results.jsonl")
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        base = {"bench": "predict", "dataset": "tio2", "time": stamp, **info, "structures": len(files), "atoms": num_atoms}
        records = [{**base, "what": "throughput", **r, "structures_per_s": len(files) / r["wall_s"],
                    "atoms_per_s": num_atoms / r["wall_s"]} for r in rows]
        records.append({**base, "what": "reference_check", **check})
        records.append({**base, "what": "startup", "python_s": start["python_s"], "import_predict_s": start["predict"]["seconds"],
                        "predict_imports_torch": start["predict"]["imports_torch"], "import_torch_s": start["import_torch_s"],
                        "report_bytes": report_bytes})
        append_results(text, records, results_md, results_jsonl)
        print(f"appended to {results_md} and {results_jsonl}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
