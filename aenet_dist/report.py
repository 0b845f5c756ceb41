"""What a training run tells its user: a progress bar, periodic log lines, metrics.jsonl (and
TensorBoard), and warnings when ranks wait for data or for a slower rank.

Only rank 0 writes; :meth:`RunReport.warn_about_waiting` is collective (every rank calls it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

from .dist import DistInfo, all_gather_objects
from .files import atomic_write
from .log import get_logger

log = get_logger(__name__)

PRINTED_LINES = 25  # epoch lines a run prints by default (run.print_every = epochs / this)
WAIT_FLOOR_S = 0.05  # per step: waiting less than this on average is not worth a warning
WARN_EVERY = 10  # a recurring warning is repeated every this many epochs it recurs


def metrics_line(metrics: dict) -> str:
    """One line of metrics.jsonl: strict JSON, a value that is not a number (no forces, no test on
    this epoch: NaN in the run) written as null (json.dumps would write NaN, which JSON has not)."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()},
                      allow_nan=False)


def parse_metrics_line(line: str) -> dict:
    """A line of metrics.jsonl as the run had it: null back to NaN (older files hold NaN itself)."""
    return {k: math.nan if v is None else v for k, v in json.loads(line).items()}


def force_rmse_text(rmse: float, digits: int = 4) -> str:
    """A force RMSE as the user reads it; a run without forces (NaN) says so rather than print nan,
    which reads like the NaN-loss failure."""
    return f"{rmse:.{digits}f} eV/Å" if math.isfinite(rmse) else "– (no forces)"


def _angle_text(median: float, p90: float) -> str:
    return f", angle {median:.1f}° (p90 {p90:.1f}°)" if math.isfinite(median) else ""


def format_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class RunReport:
    """The output of one training run (see the module docstring).

    Args:
        run: the run's :class:`~aenet_dist.config.RunConfig`.
        steps: optimizer steps per epoch (the waiting warnings' floor scales with it).
        prefetch: batches are gathered ahead in a thread (waiting for them is then worth a warning).
    """

    def __init__(self, run, info: DistInfo, run_dir: Path, steps: int, prefetch: bool):
        self.run, self.info, self.steps, self.prefetch = run, info, steps, prefetch
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.progress = None  # tqdm bar over the epochs (rank 0 on a terminal)
        self.tensorboard = None  # SummaryWriter (rank 0 with run.tensorboard)
        self.warning_counts: dict[str, int] = {}  # recurring warnings given so far (data wait, straggler)

    @contextlib.contextmanager
    def open(self, epoch: int):
        """While training runs: on rank 0 with a terminal, a progress bar over the epochs (ETA,
        test errors) below the log; without one (a pipe, a SLURM log) only the periodic lines."""
        with contextlib.ExitStack() as stack:
            if self.info.is_main and self.run.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ValueError("run.tensorboard = true needs the tensorboard package: "
                                     "pip install 'aenet_dist[tensorboard]' (or set run.tensorboard = false)") from None
                self.tensorboard = stack.enter_context(SummaryWriter(str(self.run_dir / "tensorboard")))
            if self.info.is_main and sys.stderr.isatty():
                from tqdm import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm

                stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger("aenet_dist")]))
                self.progress = stack.enter_context(
                    tqdm(total=self.run.epochs, initial=epoch, unit="epoch", desc="train", dynamic_ncols=True))
            try:
                yield self
            finally:
                self.progress = self.tensorboard = None

    def start(self, epoch: int) -> dict:
        """Rank 0, before the first epoch: metrics.jsonl keeps the lines up to ``epoch`` (a resumed run
        rewrites the rest); returns the last kept line (the report of a resumed, finished run)."""
        if not self.metrics_path.exists():
            return {}
        rows = [parse_metrics_line(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keep = [row for row in rows if row["epoch"] <= epoch]
        # written again as this version writes them: lines of an older version (bare NaN) become strict JSON
        atomic_write(self.metrics_path, "".join(metrics_line(row) + "\n" for row in keep))
        return keep[-1] if keep else {}

    def epoch_done(self, last: dict, epochs_done: int, seconds: float, due: bool) -> None:
        """Rank 0: the metrics line in metrics.jsonl (and TensorBoard), the progress bar, and every
        ``run.print_every`` epochs (and the first, the last and before a stop: ``due``) a log line.

        Args:
            last: the epoch's metrics (``epoch`` is the number of completed epochs).
            epochs_done: epochs completed in this process (for the ETA), ``seconds`` the time they took.
        """
        epoch = last["epoch"]
        with open(self.metrics_path, "a") as fh:
            fh.write(metrics_line(last) + "\n")
        if self.tensorboard is not None:
            for key, value in last.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, epoch)
        test_e, test_f = last["test_rmse_energy_meV_atom"], last["test_rmse_forces_eV_A"]
        tested = math.isfinite(test_e) or math.isfinite(test_f)  # not on epochs between evaluations (run.eval_every)
        if self.progress is not None:
            if tested:
                self.progress.set_postfix_str(f"test E {test_e:.2f} meV/atom F {force_rmse_text(test_f, 3)}", refresh=False)
            self.progress.update(1)
        every = self.run.print_every or max(1, self.run.epochs // PRINTED_LINES)
        if not (due or epoch % every == 0 or epochs_done == 1 or epoch == self.run.epochs):
            return
        eta = seconds / epochs_done * (self.run.epochs - epoch)
        test = (f"test E {test_e:.2f} meV/atom F {force_rmse_text(test_f)}"
                f"{_angle_text(last['test_force_angle_median_deg'], last['test_force_angle_p90_deg'])}") if tested else "test -"
        log.info(
            "epoch %d/%d | train E %.2f meV/atom F %s | %s | lr %.2e | %.0f struct/s | data %.2fs of %.2fs | ETA %s",
            epoch, self.run.epochs, last["train_rmse_energy_meV_atom"], force_rmse_text(last["train_rmse_forces_eV_A"]), test,
            last["lr"], last["structures_per_second"], last["data_seconds"], last["train_seconds"], format_time(eta),
        )

    def warn_about_waiting(self, data_seconds: float, compute_seconds: float, train_seconds: float) -> None:
        """Rank 0 warns when ranks wait on data, or on a slower rank (a straggler), when it matters.

        Collective: every rank passes its own seconds waiting for data and computing this epoch.
        Only a loss of at least ``WAIT_FLOOR_S`` per step on average counts (short steps jitter by
        more than any imbalance), and each warning is given once, then every ``WARN_EVERY``
        epochs it recurs, with the count, so that a long run's log stays readable.
        """
        timings = all_gather_objects((data_seconds, compute_seconds), self.info)
        if not self.info.is_main:
            return
        floor = WAIT_FLOOR_S * self.steps
        waits = [d for d, _ in timings]
        work = [w for _, w in timings]
        worst = int(np.argmax(waits))
        if self.prefetch and waits[worst] > 0.2 * train_seconds and waits[worst] > floor:  # (inline gathering is not waiting)
            self._warn_now("data", "rank %d waited %.2f s of %.2f s for data this epoch: use a faster cache (data.cache) or "
                           "fewer ranks per node", worst, waits[worst], train_seconds)
        slowest = int(np.argmax(work))
        median = float(np.median(work))
        if len(work) > 1 and work[slowest] > 1.25 * median and work[slowest] - median > floor:
            self._warn_now("straggler", "straggler: rank %d computed for %.2f s against a median of %.2f s; the others waited "
                           "for it (shards are balanced by stored rows; check that rank's device and its neighbours' load)",
                           slowest, work[slowest], median)

    def _warn_now(self, kind: str, message: str, *args) -> None:
        """Log a recurring warning the first time and every WARN_EVERY-th time after, with the count."""
        count = self.warning_counts[kind] = self.warning_counts.get(kind, 0) + 1
        if count == 1 or count % WARN_EVERY == 0:
            log.warning(message + (" (%d epochs so far)" if count > 1 else ""), *args, *((count,) if count > 1 else ()))
