#!/usr/bin/env bash
# The whole pipeline on the small embedded EMT data set (Cu/Au/Ni, 200 structures):
# generate -> featurize (MPI) -> train (torchrun) -> export .nn -> predict -> plots.
#   bash scripts/demo.sh
# Rerunnable: the data set is generated once, and featurize resumes an interrupted store
# or reuses a complete one made from the same inputs. Outputs go to work/ (git-ignored).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
VENV="${AENET_DIST_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
NP="${AENET_DIST_DEMO_RANKS:-2}"

echo "== 1. data set: work/emt (EMT energies and forces, aenet XSF + generate.in)"
if [ -f work/emt/generate.in ]; then
    echo "work/emt/generate.in exists; reusing it"
else
    "$PY" -m aenet_dist.datasets emt --out work/emt
fi

echo "== 2. featurize: work/emt.zarr ($NP MPI ranks)"
# Small blocks (1 MiB), so that each training rank's shard is whole blocks of this 5 MB store.
"$VENV/bin/mpiexec" -n "$NP" "$PY" -m aenet_dist.featurize work/emt/generate.in --out work/emt.zarr --chunk-mb 1

echo "== 3. train: work/runs/emt (torchrun, $NP CPU ranks, gloo)"
# --resume continues from the last checkpoint if a previous demo run was interrupted.
OMP_NUM_THREADS=1 "$VENV/bin/torchrun" --standalone --nproc_per_node="$NP" -m aenet_dist.train launch/emt_demo.toml run.device=cpu --resume

echo "== 4. export: work/potentials (aenet binary .nn files, one per element)"
"$VENV/bin/aenet-dist" export work/runs/emt --out work/potentials

echo "== 5. predict: energies and forces of three structures with the exported potentials"
"$VENV/bin/aenet-dist" predict --potentials work/potentials --forces --json work/predictions.json \
    work/emt/xsf/structure0001.xsf work/emt/xsf/structure0002.xsf work/emt/xsf/structure0003.xsf > work/predictions.txt
head -n 40 work/predictions.txt
echo "... (all of it in work/predictions.txt and work/predictions.json)"

echo "== 6. plots: work/runs/emt/*.png"
"$VENV/bin/aenet-dist" plot work/runs/emt

cat <<SUMMARY

== Done. What you have:
  work/potentials/{Au,Cu,Ni}.nn   the trained potential, in aenet's binary .nn format
                                   (aenet's predict.x, LAMMPS with aenet, or aenet_dist's ASE calculator)
  work/runs/emt/metrics.jsonl     train/test errors of every epoch (one JSON object per line)
  work/runs/emt/*.png             learning curves, parity plots and force-angle distribution
  work/runs/emt/checkpoints/      checkpoints; continue training with the same command (--resume)
  work/predictions.txt, .json     energies and forces of three structures

Use the potential from Python (ASE):
  from aenet_dist.ase import AenetCalculator
  atoms.calc = AenetCalculator("work/potentials")
  atoms.get_potential_energy(), atoms.get_forces()
SUMMARY
