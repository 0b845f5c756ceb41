"""Helpers shared by the test modules: a small training configuration and in-process CLI runs."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path


def write_train_toml(path: Path, store, run_dir, epochs: int = 3, batch_size: int = 8, extra: str = "", data_extra: str = "") -> Path:
    """A small float64 CPU training configuration (2 x 6 tanh, Adam 0.01, α 0.3, 20 % test)."""
    path.write_text(
        f"""
[data]
store = "{store}"
test_percent = 20
cache = "memory"
{data_extra}
[model]
hidden = [6, 6]
[optim]
method = "adam"
lr = 0.01
[loss]
force_weight = 0.3
[run]
epochs = {epochs}
batch_size = {batch_size}
dtype = "float64"
device = "cpu"
run_dir = "{run_dir}"
{extra}
"""
    )
    return path


def run_in_process(main, args) -> subprocess.CompletedProcess:
    """Run a CLI ``main(argv)`` here, capturing stdout and stderr (no interpreter start-up)."""
    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
