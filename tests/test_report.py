"""Tests for aenet_dist.report: metrics.jsonl is strict JSON (null where a value is missing), and the
log line of a run without forces says so."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from aenet_dist import cli
from aenet_dist.config import RunConfig
from aenet_dist.dist import DistInfo
from aenet_dist.report import RunReport
from helpers import featurized_emt, read_metrics, run_in_process, write_train_toml


def _strict(line: str) -> dict:
    """A line parsed as JSON proper: Python's json takes NaN and Infinity unless told not to."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def _epoch(epoch: int, train_f: float, test_e: float, test_f: float, angle: float) -> dict:
    return {"epoch": epoch, "step": 2 * epoch, "train_rmse_energy_meV_atom": 10.0, "train_rmse_forces_eV_A": train_f,
            "test_rmse_energy_meV_atom": test_e, "test_rmse_forces_eV_A": test_f, "test_force_angle_median_deg": angle,
            "test_force_angle_p90_deg": angle, "loss": test_e / 1000, "lr": 0.01, "epoch_seconds": 0.1, "train_seconds": 0.1,
            "data_seconds": 0.0, "structures_per_second": 100.0, "wall_seconds": 0.1 * epoch}


def test_missing_values_are_null_and_read_back_as_nan(tmp_path, caplog):
    """metrics.jsonl had bare NaN (not JSON: strict parsers and jq refuse it) for force errors without
    forces and for test errors between evaluations; the log line said "F nan eV/Å, angle nan°",
    which reads like the NaN-loss failure."""
    report = RunReport(RunConfig(epochs=3, print_every=1), DistInfo(0, 1, 0, torch.device("cpu")), tmp_path, steps=2, prefetch=False)
    nan = math.nan
    with caplog.at_level(logging.INFO, logger="aenet_dist"):
        report.epoch_done(_epoch(1, nan, nan, nan, nan), 1, 0.1, due=False)  # no forces, no evaluation this epoch
        report.epoch_done(_epoch(2, nan, 12.0, nan, nan), 2, 0.2, due=False)  # evaluated, no forces
        report.epoch_done(_epoch(3, 0.25, 11.0, 0.5, 30.0), 3, 0.3, due=False)  # forces
    lines = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["test_rmse_energy_meV_atom"] for m in lines] == [None, 12.0, 11.0]
    assert [m["train_rmse_forces_eV_A"] for m in lines] == [None, None, 0.25]
    assert lines[0]["loss"] is None and lines[1]["test_force_angle_median_deg"] is None
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert "train E 10.00 meV/atom F – (no forces) | test - |" in printed[0]
    assert "test E 12.00 meV/atom F – (no forces) | lr" in printed[1]
    assert "test E 11.00 meV/atom F 0.5000 eV/Å, angle 30.0° (p90 30.0°)" in printed[2]
    assert not any("nan" in line for line in printed)
    # a resumed run keeps the lines up to its epoch and gets its last one back as the run had it (NaN)
    last = RunReport(RunConfig(epochs=3), DistInfo(0, 1, 0, torch.device("cpu")), tmp_path, steps=2, prefetch=False).start(2)
    assert last["epoch"] == 2 and last["test_rmse_energy_meV_atom"] == 12.0 and math.isnan(last["train_rmse_forces_eV_A"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.fixture(scope="module")
def no_forces_store(tmp_path_factory):
    return featurized_emt(tmp_path_factory.mktemp("report_store"), num_structures=12, seed=5, force_percent=0.0)[1]


def test_run_without_forces_writes_strict_json_and_plots(no_forces_store, tmp_path):
    """The whole train command on a store without derivatives, test set every second epoch; then the plot reads it."""
    config = write_train_toml(tmp_path / "t.toml", no_forces_store, tmp_path / "run", epochs=3, extra="eval_every = 2")
    result = run_in_process(cli.main, ["train", config])
    assert result.returncode == 0, result.stderr
    rows = [_strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_rmse_energy_meV_atom"] is None for r in rows] == [True, False, False]
    assert all(r["train_rmse_forces_eV_A"] is None and r["test_rmse_forces_eV_A"] is None for r in rows)
    assert "F – (no forces)" in result.stderr and "nan eV/Å" not in result.stderr and "angle nan" not in result.stderr
    summary = result.stdout + result.stderr
    assert "train RMSE forces" in summary and "nan" not in summary.lower().replace("nanoseconds", "")
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]  # the tests' reader: null as NaN
    plotted = run_in_process(cli.main, ["plot", tmp_path / "run", "--no-parity", "--out", tmp_path / "plots"])
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "plots" / "learning_curves.png").stat().st_size > 0


def test_a_resumed_run_rewrites_an_older_versions_nan_lines_as_strict_json(tmp_path):
    """metrics.jsonl of an older version has bare NaN: a resumed run's file must be strict JSON throughout."""
    older = [json.dumps(_epoch(k, math.nan, 10.0 + k, math.nan, math.nan)) for k in (1, 2, 3)]
    assert "NaN" in older[0]
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in older))
    report = RunReport(RunConfig(epochs=4), DistInfo(0, 1, 0, torch.device("cpu")), tmp_path, steps=2, prefetch=False)
    last = report.start(2)
    assert last["epoch"] == 2 and math.isnan(last["train_rmse_forces_eV_A"])
    report.epoch_done(_epoch(3, math.nan, 9.0, math.nan, math.nan), 1, 0.1, due=False)
    rows = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(r["train_rmse_forces_eV_A"] is None for r in rows)
