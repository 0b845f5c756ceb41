"""SLURM: slurm/featurize.sbatch (MPI ranks through srun) and slurm/train.sbatch (preempted by a
signal, requeued, resumed to the uninterrupted run's numbers) on a running cluster.

Needs a SLURM cluster that runs jobs on this machine's file system, e.g. the one-node cluster of
`bash launch/local_slurm.sh` (root, Debian). Skipped when `sinfo` does not answer. The jobs use
the venv of this interpreter and write into pytest's tmp_path, or into AENET_DIST_SLURM_TMPDIR
(a directory the compute nodes see) when that is set.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fault_env, read_metrics, write_train_toml
from aenet_dist.formats.generate_in import read_generate_input
from aenet_dist.checkpoint import load as load_checkpoint
from aenet_dist.config import StoreOptions
from aenet_dist.datasets import generate_emt_dataset
from aenet_dist.store import StoreReader, featurize_to_store
from aenet_dist.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CHUNK_MB = 0.0625  # the smallest block size featurize accepts: 24 structures make several blocks
KEYS = ("train_rmse_energy_meV_atom", "train_rmse_forces_eV_A", "test_rmse_energy_meV_atom", "test_rmse_forces_eV_A", "loss", "lr")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _slurm_answers() -> str | None:
    """None when a cluster answers with a usable node, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (no sinfo/sbatch); `bash launch/local_slurm.sh` starts a one-node cluster"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo does not answer ({err}); `bash launch/local_slurm.sh` starts a one-node cluster"
    states = result.stdout.split()
    if result.returncode != 0 or not any(s.rstrip("*~#!%$@^-") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable SLURM node (sinfo: {(result.stdout + result.stderr).strip() or 'nothing'}); `bash launch/local_slurm.sh` starts one"
    return None


_WHY_NOT = _slurm_answers()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")]


# ------------------------------------------------------------------ helpers


def _job_env(**extra: str) -> dict:
    """The environment the jobs get (sbatch exports it): this venv, no stray torch/SLURM settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "TORCHELASTIC_", "AENET_DIST_FAULT_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "NPROC", "AENET_DIST_LAUNCH"):
        env.pop(key, None)
    if (Path(sys.prefix) / "bin" / "torchrun").exists():
        env["AENET_DIST_VENV"] = sys.prefix
    env.update(extra)
    return env


def _sbatch(script: str, args: list, out_dir: Path, options: list[str], env: dict, wait: bool = False) -> tuple[int, str]:
    """Submit slurm/<script> (absolute path, so the job finds the repository); (job id, sbatch output)."""
    cmd = ["sbatch", "--parsable", f"--output={out_dir}/%x-%j.out", f"--chdir={out_dir}", "--time=10", *options]
    if wait:
        cmd.append("--wait")
    cmd += [str(ROOT / "slurm" / script), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    match = re.search(r"^(\d+)", result.stdout.strip())
    assert match, f"sbatch failed ({result.returncode}): {result.stdout}{result.stderr}"
    return int(match.group(1)), result.stdout + result.stderr


def _job(job_id: int) -> dict:
    """`scontrol show job` fields of a job (finished jobs stay listed for MinJobAge)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
    return fields


def _log(out_dir: Path, job_id: int) -> str:
    logs = list(out_dir.glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no log yet)"


def _wait_for(condition, what: str, job_id: int, out_dir: Path, timeout: float, stop_when_done: bool = True) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = _job(job_id)
        if condition(job):
            return job
        if stop_when_done and job.get("JobState") in FINAL_STATES:
            raise AssertionError(f"job {job_id} ended ({job.get('JobState')}, exit {job.get('ExitCode')}) before {what}:\n{_log(out_dir, job_id)[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: no {what} after {timeout:.0f} s (state {job.get('JobState')}):\n{_log(out_dir, job_id)[-4000:]}")
        time.sleep(0.25)


def _wait_for_epoch(run_dir: Path, epoch: int, job_id: int, out_dir: Path, timeout: float = 120.0) -> None:
    path = run_dir / "metrics.jsonl"

    def reached(job):
        return path.exists() and len(path.read_text().splitlines()) >= epoch

    _wait_for(reached, f"epoch {epoch} in {path}", job_id, out_dir, timeout)


def _scancel(*args: str) -> None:
    subprocess.run(["scancel", *args], capture_output=True, text=True, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_metrics = read_metrics


def _write_toml(path: Path, store: Path, run_dir: Path) -> Path:
    return write_train_toml(path, store, run_dir, epochs=4, batch_size=4, extra="checkpoint_every = 1")


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    base = os.environ.get("AENET_DIST_SLURM_TMPDIR")
    if base:
        path = Path(base) / f"test_slurm_{os.getpid()}"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def featurized(workdir):
    """A 24-structure EMT set featurized by slurm/featurize.sbatch with 2 tasks (sbatch --wait)."""
    generate_in = generate_emt_dataset(workdir / "data", num_structures=24, seed=1, force_percent=50.0)
    store = workdir / "emt.zarr"
    logs = workdir / "featurize_logs"
    logs.mkdir()
    start = time.monotonic()
    job_id, _ = _sbatch(
        "featurize.sbatch", [generate_in, store, "--chunk-mb", CHUNK_MB], logs, ["--nodes=1", "--ntasks-per-node=2"], _job_env(), wait=True
    )
    return generate_in, store, job_id, _log(logs, job_id), _job(job_id), time.monotonic() - start


# ------------------------------------------------------------------ tests


def test_featurize_job_runs_two_mpi_ranks_and_equals_serial(featurized, workdir):
    generate_in, store, job_id, log, job, seconds = featurized
    assert job.get("JobState") == "COMPLETED" and job.get("ExitCode") == "0:0", f"job {job_id}: {job}\n{log}"
    assert "srun --mpi=pmi2, 2 rank(s)" in log and "on 2 rank(s)" in log, log
    reader = StoreReader(store)
    assert reader.num_structures == 24 and len(reader.block_first) - 1 >= 2, log  # several blocks: both ranks had work
    serial = workdir / "serial.zarr"
    featurize_to_store(read_generate_input(generate_in), serial, StoreOptions(chunk_bytes=int(CHUNK_MB * 2**20)), progress=False)
    ref = StoreReader(serial)
    assert reader.fingerprint == ref.fingerprint
    a, b = reader.read_range(0, 24), ref.read_range(0, 24)
    assert np.array_equal(a.energy, b.energy) and np.array_equal(a.forces, b.forces)
    for element in ref.species:
        assert np.array_equal(a.elements[element].G, b.elements[element].G), element
        assert np.array_equal(a.elements[element].dG, b.elements[element].dG), element
    assert seconds < 120


def _preempted_run(featurized, workdir: Path, name: str, tasks: int, launch: str, reference_overrides: list[str]):
    """Submit train.sbatch, SIGUSR1 its batch shell after epoch 1 (as --signal=B:USR1@120 does),
    and wait until the requeued job has finished. Returns (job, log, run_dir, reference run_dir)."""
    _, store, *_ = featurized
    case = workdir / name
    case.mkdir()
    run_dir = case / "run"
    config = _write_toml(case / "train.toml", store, run_dir)
    reference = _write_toml(case / "reference.toml", store, case / "reference")
    assert train_main([str(reference), *reference_overrides]) == 0  # uninterrupted, in this process

    env = fault_env(_job_env(AENET_DIST_LAUNCH=launch, AENET_DIST_RDZV_PORT=str(_free_port())), step_delay=0.3)
    job_id, _ = _sbatch("train.sbatch", [config], case, ["--nodes=1", f"--ntasks-per-node={tasks}"], env)
    try:
        _wait_for_epoch(run_dir, 1, job_id, case)
        _scancel("--signal=USR1", "--batch", str(job_id))
        _wait_for(lambda j: int(j.get("Restarts", 0)) >= 1, "requeue", job_id, case, 60)
        job = _wait_for(lambda j: j.get("JobState") in FINAL_STATES, "end", job_id, case, 150, stop_when_done=False)
    finally:
        if _job(job_id).get("JobState") not in FINAL_STATES:
            _scancel(str(job_id))
    return job, _log(case, job_id), run_dir, case / "reference"


def _check_resumed(job: dict, log: str, run_dir: Path, reference: Path, rel: float, exact_weights: bool) -> None:
    assert job.get("JobState") == "COMPLETED" and job.get("ExitCode") == "0:0" and job.get("Restarts") == "1", f"{job}\n{log}"
    assert "SIGUSR1 received" in log and "requeueing job" in log, log
    assert re.search(r"resumed from \S+checkpoint_000001\.\d+\.pt \(epoch 2, after step \d+\)", log), log
    assert "(restart 1)" in log, log
    m_ref, m_run = _metrics(reference), _metrics(run_dir)
    assert [m["epoch"] for m in m_run] == [1, 2, 3, 4]
    for a, b in zip(m_ref, m_run):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-14), (a["epoch"], key)
    w_ref = load_checkpoint(reference / "checkpoints" / "checkpoint_000004.pt")["model"]
    w_run = load_checkpoint(run_dir / "checkpoints" / "checkpoint_000004.pt")["model"]
    for name in w_ref:
        if exact_weights:
            assert torch.allclose(w_ref[name], w_run[name], rtol=1e-12, atol=1e-14), name
        else:
            assert torch.allclose(w_ref[name], w_run[name], rtol=0, atol=1e-8), name


def test_train_job_preempted_requeued_resumes_exactly(featurized, workdir):
    """One rank (torchrun --standalone in the batch shell): signal, checkpoint inside epoch 2,
    exit 75, scontrol requeue, --resume: the metrics equal the uninterrupted run to 1e-12."""
    job, log, run_dir, reference = _preempted_run(featurized, workdir, "single", 1, "single", [])
    assert "torchrun --standalone, 1 rank(s)" in log, log
    _check_resumed(job, log, run_dir, reference, rel=1e-12, exact_weights=True)


def test_train_job_multinode_path_two_ranks_resumes(featurized, workdir):
    """The multi-node path (srun, one torchrun per node, c10d rendezvous) forced on one node with
    2 CPU ranks: the signal goes sbatch -> train.sh -> srun -> per-node train.sh -> workers. A
    2-rank run equals a 1-rank run with data.num_shards=2 to 1e-8."""
    job, log, run_dir, reference = _preempted_run(featurized, workdir, "multi", 2, "multi", ["data.num_shards=2"])
    assert "1 node(s) via srun, rendezvous" in log and "torchrun 2 rank(s)" in log, log
    _check_resumed(job, log, run_dir, reference, rel=1e-8, exact_weights=False)


def test_scancel_checkpoints_but_does_not_requeue(featurized, workdir):
    """A plain scancel (SIGTERM to everything) leaves a checkpoint of the position, and the job
    stays cancelled."""
    _, store, *_ = featurized
    case = workdir / "cancel"
    case.mkdir()
    run_dir = case / "run"
    config = _write_toml(case / "train.toml", store, run_dir)
    job_id, _ = _sbatch("train.sbatch", [config], case, ["--nodes=1", "--ntasks-per-node=1"], fault_env(_job_env(), step_delay=0.3))
    try:
        _wait_for_epoch(run_dir, 1, job_id, case)
        _scancel(str(job_id))
        job = _wait_for(lambda j: j.get("JobState") in FINAL_STATES, "end", job_id, case, 90, stop_when_done=False)
        log = _log(case, job_id)
        # The batch shell may still be writing; give it the seconds the checkpoint takes.
        deadline = time.monotonic() + 30
        while "not requeued" not in log and time.monotonic() < deadline:
            time.sleep(0.25)
            log = _log(case, job_id)
    finally:
        if _job(job_id).get("JobState") not in FINAL_STATES:
            _scancel(str(job_id))
    assert job.get("JobState") == "CANCELLED" and job.get("Restarts") == "0", f"{job}\n{log}"
    assert "not requeued" in log, log
    assert list((run_dir / "checkpoints").glob("checkpoint_000001.*.pt")), log
    time.sleep(2)
    assert _job(job_id).get("Restarts") == "0"
