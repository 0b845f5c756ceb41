"""What the benchmark scripts share: paths, machine description, process-tree memory, results files."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import threading
from pathlib import Path

# Imported before numpy by any script that imports this module first: aenet_dist sets
# OPENBLAS_NUM_THREADS (default 1) before numpy loads, so in-process measurements run numpy as the
# commands do.
import aenet_dist

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AENET_DIST_SHARED", ROOT.parent / "shared"))
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_JSONL = ROOT / "bench" / "results.jsonl"


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def _git(*args: str) -> str:  # read-only queries
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(device: str = "cpu", torch_info: bool = True) -> dict:
    """CPU model, core counts, memory, versions, git state and load average, for each results table.

    ``torch_info=False`` for the benchmarks of the torch-free commands (featurize, predict): torch is
    then neither imported here nor named in their tables, and ``device`` must be "cpu".
    """
    import numpy as np
    import psutil
    import zarr

    model = "?"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    package = Path(aenet_dist.__file__).resolve().parent
    if package.is_relative_to(ROOT):
        dirty = [line[3:] for line in _git("status", "--porcelain", "--", "aenet_dist").splitlines()]
    else:  # e.g. PYTHONPATH pointing at an exported commit; the subprocesses import the same
        dirty = [f"(aenet_dist imported from {package}, not this checkout)"]
    info = {
        "host_cpus": os.cpu_count(),
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "zarr": zarr.__version__,
        "device": device,
        "git_commit": _git("rev-parse", "--short", "HEAD").strip(),
        "git_dirty_aenet_dist": dirty,
        "loadavg_1min_at_start": load1(),
    }
    if torch_info:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(0)
    elif device != "cpu":
        raise ValueError(f"device {device!r} needs torch_info=True")
    return info


def import_cost(python: Path, modules: str, repeats: int = 3) -> dict:
    """Start-up of ``python -c "import <modules>"`` (median of ``repeats`` runs, s), and whether it imports torch.

    The torch check is a separate run that looks at ``sys.modules`` after the import, so it also
    sees torch pulled in indirectly (``-X importtime`` would not do: aenet_dist.neighbors imports
    vesin with torch blocked, and that blocked attempt is listed too). The subprocesses inherit
    this environment (PYTHONPATH).
    """
    import statistics
    import time

    code = f"import {modules}"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([str(python), "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    probe = f"{code}; import sys; print(sys.modules.get('torch') is not None)"
    torch_imported = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout.split()[-1] == "True"
    return {"modules": modules, "seconds": statistics.median(times), "runs_s": times, "imports_torch": torch_imported}


def dir_bytes(path: Path) -> tuple[int, int]:
    """Total apparent size of the files below ``path`` and their number."""
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


class TreeMemory:
    """Polls the RSS of the worker processes below a launched process every ``interval`` s (psutil).

    Workers: the process itself and its descendants whose command line contains ``match``,
    launchers (torchrun, mpiexec and its proxies) left out. Keeps the peak of the sum over workers
    and the largest single worker's peak (polled RSS or the kernel's VmHWM, whichever is larger).
    Shared library pages count once per worker, so the sum overstates what they take together.
    """

    LAUNCHERS = ("torchrun", "mpiexec", "hydra_pmi_proxy")

    def __init__(self, pid: int, match: str = "aenet_dist", interval: float = 0.05):
        import psutil

        self.root = psutil.Process(pid)
        self.match = match
        self.interval = interval
        self.peak_sum = 0
        self.peak_max = 0
        self.last_sum = 0  # summed RSS at the last poll: the steady state
        self.launcher_peak = 0  # RSS of the root when it is a launcher (torchrun, mpiexec), not a worker
        self.hwm: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _vmhwm(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return 0

    def _workers(self):
        import psutil

        out = []
        for p in [self.root] + self.root.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if self.match in cmd and not any(name in cmd for name in self.LAUNCHERS):
                out.append(p)
        return out

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = self._workers()
            except psutil.Error:
                break
            if self.root not in procs:
                try:
                    self.launcher_peak = max(self.launcher_peak, self.root.memory_info().rss)
                except psutil.Error:
                    pass
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                    self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), self._vmhwm(p.pid))
                except psutil.Error:
                    pass
            if rss and all(rss):
                self.last_sum = sum(rss)
                self.peak_sum = max(self.peak_sum, sum(rss))
                self.peak_max = max(self.peak_max, max(rss), max(self.hwm.values(), default=0))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def read_metrics(path: Path) -> list[dict]:
    """The JSON lines of a run's metrics file (a line still being written is left out); null (no
    forces, no test on that epoch) read as NaN, as the run had it."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append({k: math.nan if v is None else v for k, v in json.loads(line).items()})
        except json.JSONDecodeError:
            break
    return out


def append_results(text: str, records: list[dict], results_md: Path = RESULTS_MD, results_jsonl: Path = RESULTS_JSONL) -> None:
    """Append a markdown section to bench/RESULTS.md and records to bench/results.jsonl (or the given files)."""
    results_md.parent.mkdir(parents=True, exist_ok=True)
    if not results_md.exists():
        results_md.write_text("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n\n")
    with open(results_md, "a") as fh:
        fh.write(text + "\n")
    with open(results_jsonl, "a") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


def write_train_toml(path: Path, store, settings: dict[str, dict]) -> Path:
    """A train.toml with ``[data] store`` and the given sections (key -> JSON-compatible value)."""
    lines = ["[data]", f'store = "{store}"']
    for section, values in settings.items():
        if section != "data":
            lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def train_command(python: Path, torchrun: Path, ranks: int, args: list[str]) -> list[str]:
    """``python -m aenet_dist.train`` for one rank, ``torchrun --standalone`` for more."""
    if ranks == 1:
        return [str(python), "-m", "aenet_dist.train", *args]
    return [str(torchrun), "--standalone", f"--nproc_per_node={ranks}", "-m", "aenet_dist.train", *args]
