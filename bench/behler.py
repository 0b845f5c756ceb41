"""Behler2011 symmetry functions against aenet's generate.x and predict.x, same machine, same run.

TiO2 structures from ../shared/data/tio2 (the first --structures of generate.in's FILES),
the test setups tests/data/behler/{O,Ti}.stp (14 and 9 functions: G1-G5, cutoffs 3.5-6.5 Å),
25 % of the structures with derivatives. Each repeat runs the peer and ours back to back
(alternating, medians reported):

* featurize: ``generate.x`` vs ``python -m aenet_dist.featurize`` (1 rank and 2 MPI ranks),
  end to end; ours also in-process (the command's own "wall time");
* the share of the angular functions: in-process descriptor time of the radial functions
  alone vs the full setups (values and derivatives; numpy, OpenBLAS on aenet_dist's default
  one thread);
* predict with forces: ``predict.x`` vs ``python -m aenet_dist.predict`` with the test
  potential tests/data/behler/potential, end to end.

    .venv/bin/python bench/behler.py [--structures 200] [--repeats 3] [--no-save]

``AENET_DIST_VENV`` overrides the virtualenv whose python and mpiexec run (default: .venv here).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import ROOT, SHARED, append_results, load1, machine

VENV = Path(os.environ.get("AENET_DIST_VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"
MPIEXEC = VENV / "bin" / "mpiexec"
DATA = ROOT / "tests" / "data" / "behler"
TIO2 = SHARED / "data" / "tio2"
HEADER = ["OUTPUT out.train", "", "TYPES", "2", "O -432.503149303", "Ti -1604.604515075", "", "SETUPS", "O O.stp", "Ti Ti.stp", "",
          "FORCES", "FORCESPERCENT 25", ""]


def prepare(work: Path, files: list[str]) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    for name in ("O.stp", "Ti.stp"):
        shutil.copy(DATA / name, work / name)
    for element in ("O", "Ti"):
        shutil.copy(DATA / "potential" / f"{element}.nn", work / f"{element}.nn")
    if not (work / "xsf").exists():
        (work / "xsf").symlink_to(TIO2 / "xsf")
    (work / "generate.in").write_text("\n".join(HEADER + ["FILES", str(len(files))] + files) + "\n")
    (work / "predict.in").write_text("\n".join(["TYPES", "2", "O", "Ti", "", "NETWORKS", "O O.nn", "Ti Ti.nn", "", "FORCES", "",
                                                "FILES", str(len(files))] + files) + "\n")
    return work


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace")
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "Error" in proc.stdout[-2000:]:
        sys.exit(f"{cmd[0]} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def angular_share(work: Path, files: list[str]) -> dict:
    """In-process descriptor seconds: radial functions only vs the full setups (values + derivatives).

    ``torch_imported``: whether featurize pulled torch in (the Behler functions before their numpy port).
    """
    from aenet_dist.formats.stp import read_setup
    from aenet_dist.config import BehlerBasis
    from aenet_dist.descriptors import featurize
    from aenet_dist.structures import read_xsf

    full = {e: read_setup(work / f"{e}.stp") for e in ("O", "Ti")}
    radial = {e: replace(s, basis=BehlerBasis(tuple(f for f in s.basis.functions if not f.angular))) for e, s in full.items()}
    structures = [read_xsf(work / f) for f in files]
    derivs = [n % 4 == 0 for n in range(len(structures))]
    out = {}
    for name, setups in (("radial", radial), ("full", full)):
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            featurize(structures, setups, ("O", "Ti"), derivs)
            runs.append(time.perf_counter() - t0)
        out[name] = statistics.median(runs)
    out["torch_imported"] = sys.modules.get("torch") is not None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--structures", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    build = subprocess.run(["bash", str(SHARED / "peers" / "build.sh")], capture_output=True, text=True)
    if build.returncode != 0:
        sys.exit(f"building the peers failed:\n{build.stderr[-3000:]}")
    peers = Path(build.stdout.strip().splitlines()[-1])
    lines = (TIO2 / "generate.in").read_text().splitlines()
    at = next(n for n, line in enumerate(lines) if line.strip().upper() == "FILES")
    files = [line.strip() for line in lines[at + 2 : at + 2 + args.structures]]
    info = machine(torch_info=False)
    rows: dict[str, list[float]] = {k: [] for k in ("generate.x", "featurize 1 rank", "featurize 1 rank in-process",
                                                      "featurize 2 ranks", "predict.x", "predict")}
    with tempfile.TemporaryDirectory() as tmp:
        work = prepare(Path(tmp) / "w", files)
        for _ in range(args.repeats):
            (work / "out.train").unlink(missing_ok=True)
            (work / "out.train.forces").unlink(missing_ok=True)
            rows["generate.x"].append(timed([str(peers / "generate.x"), "generate.in"], work)[0])
            for ranks in (1, 2):
                shutil.rmtree(work / "store.zarr", ignore_errors=True)
                cmd = ([str(MPIEXEC), "-n", "2"] if ranks == 2 else []) + [str(PY), "-m", "aenet_dist.featurize", "generate.in",
                                                                            "--out", "store.zarr", "--no-progress"]
                wall, out = timed(cmd, work)
                rows[f"featurize {ranks} rank{'s' if ranks > 1 else ''}"].append(wall)
                if ranks == 1:
                    rows["featurize 1 rank in-process"].append(float(re.search(r"wall time\s+([0-9.]+) s", out).group(1)))
            rows["predict.x"].append(timed([str(peers / "predict.x"), "predict.in"], work)[0])
            rows["predict"].append(timed([str(PY), "-m", "aenet_dist.predict", "predict.in", "--out", "report.txt", "--quiet"], work)[0])
            print({k: round(v[-1], 2) for k, v in rows.items()}, file=sys.stderr)
        share = angular_share(work, files)
    med = {k: statistics.median(v) for k, v in rows.items()}
    text = [f"## Behler2011 descriptors (TiO2, {args.structures} structures, 25 % forces; peers in this run)", "",
            f"Machine: {info['cpu_model']}, {info['nproc']} CPUs, load {info['loadavg_1min_at_start']} at start, "
            f"{load1()} at end; commit {info['git_commit']}. Setups tests/data/behler/O.stp (14 functions) and Ti.stp (9), "
            f"G1-G5, cutoffs up to 6.5 Å. Medians of {args.repeats} alternating repeats (s).", "",
            "| step | aenet | aenet_dist | aenet / aenet_dist |", "|---|---|---|---|"]
    for ours, peer in (("featurize 1 rank", "generate.x"), ("featurize 1 rank in-process", "generate.x"),
                       ("featurize 2 ranks", "generate.x"), ("predict", "predict.x")):
        text.append(f"| {ours} (end to end unless in-process) vs {peer} | {med[peer]:.2f} | {med[ours]:.2f} | {med[peer] / med[ours]:.2f}x |")
    text += ["", f"Descriptor time in-process (numpy, OPENBLAS_NUM_THREADS={info['openblas_num_threads']}"
                 f"{'; torch imported by featurize' if share['torch_imported'] else ''}): radial functions only "
                 f"{share['radial']:.2f} s, all functions {share['full']:.2f} s (the angular G4/G5, summed over pairs of "
                 f"neighbours, cost {share['full'] / share['radial']:.1f}x the radial ones)."]
    print("\n".join(text))
    if not args.no_save:
        append_results("\n".join(text) + "\n", [{"bench": "behler", "machine": info, "runs": rows, "angular_share": share,
                                                  "structures": args.structures}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
