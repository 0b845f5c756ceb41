"""Export of a training run to aenet .nn files: records, the .nn potential reproduces the trained
model exactly, the CLI, and clear messages for a missing store or checkpoint.

``shared_emt_run`` (one 3-epoch float64 run on 20 EMT structures per session) is shared with
test_ase.py and test_plot.py; they only read it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_in_process, write_train_toml
from aenet_dist.formats.generate_in import read_generate_input
from aenet_dist.batching import gather_batch, shard_from_range
from aenet_dist.config import StoreOptions
from aenet_dist.datasets import generate_emt_dataset
from aenet_dist.export import export_run, main as export_main
from aenet_dist.formats.nn import read_nn, read_nn_ascii
from aenet_dist.predict import Predictor
from aenet_dist.store import StoreReader, featurize_to_store
from aenet_dist.structures import read_structures
from aenet_dist.train import main as train_main
from aenet_dist.step import forward

EMT_ELEMENTS = ("Cu", "Au", "Ni")


def make_emt_run(base: Path, epochs: int = 3) -> dict:
    """Generate 20 EMT structures (all with forces), featurize, train ``epochs`` epochs in float64.

    Returns: dict with generate_in, store, run_dir, toml paths.
    """
    generate_in = generate_emt_dataset(base / "data", num_structures=20, seed=3, force_percent=100.0)
    store = base / "store.zarr"
    featurize_to_store(read_generate_input(generate_in), store, StoreOptions(chunk_bytes=2**18), progress=False)
    run_dir = base / "run"
    toml = base / "train.toml"
    write_train_toml(toml, store, run_dir, epochs=epochs)
    result = run_in_process(train_main, [toml])
    assert result.returncode == 0, result.stdout + result.stderr
    return {"generate_in": generate_in, "store": store, "run_dir": run_dir, "toml": toml}


_SHARED_RUN: dict = {}


def shared_emt_run(tmp_path_factory) -> dict:
    """One :func:`make_emt_run` per test session, shared read-only by the modules that need a trained run."""
    if not _SHARED_RUN:
        _SHARED_RUN.update(make_emt_run(tmp_path_factory.mktemp("emt_run")))
    return _SHARED_RUN


@pytest.fixture(scope="module")
def emt_run(tmp_path_factory):
    return shared_emt_run(tmp_path_factory)


def test_export_writes_one_file_per_element_with_training_set_records(emt_run, tmp_path):
    written = export_run(emt_run["run_dir"], tmp_path / "pot", ascii=True)
    reader = StoreReader(emt_run["store"])
    assert [p.name for p in written] == [f"{el}.nn" for el in reader.species] + [f"{el}.nn.ascii" for el in reader.species]
    energy = reader.attrs["energy_per_atom"]
    for el in reader.species:
        nn = read_nn(tmp_path / "pot" / f"{el}.nn")
        assert read_nn_ascii(tmp_path / "pot" / f"{el}.nn.ascii").equals(nn)
        assert nn.atomtype == el and nn.envtypes == tuple(reader.attrs["setups"][el]["env_species"])
        assert nn.train_file == str(emt_run["store"]) and nn.normalized
        assert nn.type_names == tuple(reader.species)
        assert nn.e_atom.tolist() == [reader.attrs["atomic_energies"][e] for e in reader.species]
        assert (nn.num_structures, nn.num_atoms_total) == (20, reader.attrs["num_atoms"])
        assert (nn.e_min, nn.e_max, nn.e_avg) == (energy["min"], energy["max"], energy["mean"])
        assert nn.neval == reader.attrs["stats"][el]["count"]
        assert nn.sfval_avg.tolist() == reader.attrs["stats"][el]["mean"]
        assert nn.scale == pytest.approx(2.0 / (energy["max"] - energy["min"]), rel=1e-15)
        assert [p.name for p in (tmp_path / "pot").iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_exported_potential_reproduces_the_trained_model(emt_run, tmp_path):
    """Predictions from the .nn files == train.predict of the best checkpoint on the store (float64, 1e-10)."""
    from aenet_dist.export import load_run_model, resolve_checkpoint

    export_run(emt_run["run_dir"], tmp_path)
    model, _, _ = load_run_model(resolve_checkpoint(emt_run["run_dir"], "best"))
    reader = StoreReader(emt_run["store"])
    shard = shard_from_range(reader.read_range(0, reader.num_structures), torch.float64)
    batch = gather_batch(shard, torch.arange(reader.num_structures))
    with torch.enable_grad():
        fwd = forward(model, batch, with_forces=True, for_training=False)
        energy, forces = fwd.energy, fwd.forces
    structures = [s for f in read_generate_input(emt_run["generate_in"]).files for s in read_structures(f)]
    predictor = Predictor.from_potentials(tmp_path)
    assert set(predictor.species) == set(EMT_ELEMENTS)
    for engine in ("pairs", "rows"):
        results = predictor.predict(structures, forces=True, engine=engine)
        cohesive = np.array([r.cohesive_energy for r in results])
        np.testing.assert_allclose(cohesive, energy.detach().numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.concatenate([r.forces for r in results]), forces.detach().numpy(), rtol=0, atol=1e-10)
    # total energies include the reference energies of the store
    e_atom = reader.attrs["atomic_energies"]
    totals = np.array([r.cohesive_energy + sum(e_atom[e] for e in r.species) for r in results])
    np.testing.assert_allclose([r.energy for r in results], totals, rtol=1e-14, atol=1e-9)


def test_export_cli(emt_run, tmp_path, capsys):
    assert export_main([str(emt_run["run_dir"]), "--out", str(tmp_path / "o"), "--checkpoint", "latest", "--ascii"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted([f"{e}.nn" for e in EMT_ELEMENTS] + [f"{e}.nn.ascii" for e in EMT_ELEMENTS])
    # the latest and the best checkpoint differ only if training got worse; both must load
    assert Predictor.from_potentials(tmp_path / "o").species


def test_export_errors_are_clear(emt_run, tmp_path, capsys):
    run_dir = emt_run["run_dir"]
    with pytest.raises(ValueError, match=r"checkpoint not found"):
        export_run(tmp_path / "no_run", tmp_path / "o")
    with pytest.raises(ValueError, match=r"no checkpoint_NNNNNN.pt"):
        export_run(tmp_path, tmp_path / "o", checkpoint="latest")
    # A checkpoint carries its store's facts: the store may be gone, the .nn files are the same.
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["data"]["store"] = str(tmp_path / "moved.zarr")
    moved = tmp_path / "moved.pt"
    torch.save(state, moved)
    export_run(run_dir, tmp_path / "with_store")
    export_run(run_dir, tmp_path / "without", checkpoint=str(moved))
    for nn in (tmp_path / "with_store").glob("*.nn"):
        assert (tmp_path / "without" / nn.name).read_bytes() == nn.read_bytes()
    # A checkpoint from before store facts needs its store: gone, then --store
    del state["store_facts"]
    torch.save(state, moved)
    with pytest.raises(ValueError, match=r"moved.pt: the feature store it was trained on, .*moved.zarr, is gone.*--store"):
        export_run(run_dir, tmp_path / "o", checkpoint=str(moved))
    assert export_run(run_dir, tmp_path / "o", checkpoint=str(moved), store=emt_run["store"])  # --store fixes it
    # a corrupt checkpoint
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert export_main([str(run_dir), "--out", str(tmp_path / "o"), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.pt: not a readable aenet_dist checkpoint" in err
    assert "give another checkpoint with --checkpoint (best, latest or a path)" in err  # not in a run's checkpoints/


def test_truncated_checkpoint_names_the_file_and_the_other_checkpoints(emt_run, tmp_path, capsys):
    """A best.pt cut short gave "not a readable aenet_dist checkpoint: [Errno 22] Invalid argument": now
    the file, that it is truncated or damaged, and the run's other checkpoint to use instead."""
    run_dir = tmp_path / "run"
    shutil.copytree(emt_run["run_dir"], run_dir)
    best = run_dir / "checkpoints" / "best.pt"
    latest = max((run_dir / "checkpoints").glob("checkpoint_*.pt"))
    full = best.read_bytes()
    best.write_bytes(full[:-100])  # the end of the zip (its directory) is gone: torch says [Errno 22]
    assert export_main([str(run_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {best}: not a readable aenet_dist checkpoint: the file ({len(full) - 100} bytes) is "
                          "truncated or damaged"), err
    assert f"try another checkpoint of the run: --checkpoint latest ({latest.name})" in err
    assert "Errno" not in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert export_main([str(run_dir), "--out", str(tmp_path / "o"), "--checkpoint", "latest"]) == 0  # the advice works
    best.write_bytes(full)
    latest.write_bytes(b"")
    assert export_main([str(run_dir), "--out", str(tmp_path / "o"), "--checkpoint", "latest"]) == 2
    assert "try another checkpoint of the run: --checkpoint best" in capsys.readouterr().err
    # a directory given as the checkpoint: said so, not "[Errno 21] Is a directory"
    assert export_main([str(run_dir), "--out", str(tmp_path / "o"), "--checkpoint", str(run_dir / "checkpoints")]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'checkpoints'}: is a directory, not a checkpoint file" in err and "Errno" not in err


def test_out_that_is_a_file_is_one_message(emt_run, tmp_path, capsys):
    """export --out an existing file gave "[Errno 17] File exists"; refused before any work, the file unchanged."""
    target = tmp_path / "afile"
    target.write_text("mine\n")
    assert export_main([str(emt_run["run_dir"]), "--out", str(target)]) == 2
    assert capsys.readouterr().err == (f"error: --out {target}: exists and is not a directory; give a directory for the "
                                       ".nn files (it is created if missing)\n")
    assert target.read_text() == "mine\n"
