"""Plots of a short real training run: learning_curves.png and parity.png are PNGs of the set size."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from aenet_dist.plot import DPI, FIGSIZE, evaluate_run, main as plot_main, plot_run, read_metrics
from test_export_cli import shared_emt_run  # the shared EMT training run (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_emt_run(tmp_path_factory)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; asserts the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_of_a_run(run, tmp_path):
    written = plot_run(run["run_dir"], tmp_path)
    assert [p.name for p in written] == ["learning_curves.png", "parity.png"]
    for path, key in zip(written, ("learning_curves", "parity")):
        w, h = FIGSIZE[key]
        assert png_size(path) == (round(w * DPI), round(h * DPI))
        assert path.stat().st_size > 10_000  # something was drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learning_curves.png", "parity.png"]  # no temp files


def test_parity_data_follow_the_runs_split(run):
    results = evaluate_run(run["run_dir"])
    metrics = read_metrics(run["run_dir"])
    assert results["test"].sum() == 4 and len(results["energy_ref"]) == 20  # 20 % of 20 structures
    best = min(metrics, key=lambda m: m["loss"])
    test = results["test"]
    rmse = np.sqrt(np.mean((results["energy_pred"][test] - results["energy_ref"][test]) ** 2))
    assert 1000 * rmse == pytest.approx(best["test_rmse_energy_meV_atom"], rel=1e-9)
    ft = results["force_test"]
    rmse_f = np.sqrt(np.mean((results["force_pred"][ft] - results["force_ref"][ft]) ** 2))
    assert rmse_f == pytest.approx(best["test_rmse_forces_eV_A"], rel=1e-9)


def test_plot_cli_and_errors(run, tmp_path, capsys):
    assert plot_main([str(run["run_dir"]), "--out", str(tmp_path), "--no-parity"]) == 0
    assert capsys.readouterr().out.strip().endswith("learning_curves.png")
    assert plot_main([str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl: no metrics" in capsys.readouterr().err
