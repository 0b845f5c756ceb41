"""Training: model forces are −dE/dR, batching, loss definitions, 1 vs 2 ranks (gloo),
exact resume, and the bad-input messages."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aenet_dist.formats.generate_in import read_generate_input
from aenet_dist.batching import gather_batch, shard_from_range
from aenet_dist.checkpoint import load as load_checkpoint
from aenet_dist.config import TrainConfig, load_train_config
from aenet_dist.descriptors import featurize
from aenet_dist.loss import ErrorSums, error_sums, global_loss
from aenet_dist.store import StoreReader, StructureRange, ElementRows, featurize_to_store
from aenet_dist.structures import Structure, read_structures, write_xsf
from aenet_dist.dist import DistInfo
from aenet_dist.loader import epoch_plan
from aenet_dist.train import Trainer, TrainingError, build_model
from aenet_dist.train import main as train_main
from helpers import fault_env, featurized_emt, predict, read_metrics, run_in_process, write_train_toml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def emt(tmp_path_factory):
    """A small EMT dataset and its store (periodic and isolated structures, half with forces)."""
    return featurized_emt(tmp_path_factory.mktemp("emt"), 30, seed=5, force_percent=50.0)


def config_for(store, run_dir, **sections) -> TrainConfig:
    d = {
        "data": {"store": str(store), "test_percent": 20.0, "cache": "memory"},
        "model": {"hidden": [6, 6], "activations": ["tanh", "tanh"]},
        "optim": {"method": "adam", "lr": 1e-2},
        "loss": {"force_weight": 0.3},
        "run": {"epochs": 3, "batch_size": 8, "dtype": "float64", "device": "cpu", "run_dir": str(run_dir)},
    }
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return TrainConfig.from_dict(d)


def range_from_features(structures, config, with_derivs) -> StructureRange:
    """A StructureRange built directly from featurize (no store)."""
    species_index, feats = featurize(structures, config.setups, config.species, with_derivs)
    num_atoms = np.array([s.num_atoms for s in structures])
    energy = np.array([s.energy for s in structures])
    e_atom = np.array([config.atomic_energies[e] for e in config.species])[species_index]
    cohesive = energy - np.add.reduceat(e_atom, np.r_[0, np.cumsum(num_atoms)[:-1]])
    elements = {}
    for element, f in feats.items():
        row_of_atom = np.full(len(species_index), -1)
        row_of_atom[f.atom_index] = np.arange(len(f.atom_index))
        elements[element] = ElementRows(
            f.atom_index, f.G, row_of_atom[f.deriv_center], f.deriv_neighbor, f.dG
        )
    return StructureRange(
        0, len(structures), num_atoms, energy, cohesive, np.asarray(with_derivs), species_index,
        np.concatenate([s.pos for s in structures]), np.concatenate([s.forces for s in structures]), elements,
    )


def model_energy_and_forces(model, structures, gen_config):
    data = range_from_features(structures, gen_config, [True] * len(structures))
    batch = gather_batch(shard_from_range(data, torch.float64), torch.arange(len(structures)))
    energy, forces = predict(model, batch, with_forces=True, create_graph=False)
    return energy.detach().numpy(), forces.detach().numpy()


def moved(s: Structure, pos) -> Structure:
    return Structure(s.species, pos, s.cell, s.pbc, s.energy, s.forces, s.name)


def test_model_forces_are_minus_dE_dR(emt, tmp_path):
    generate_in, store = emt
    gen = read_generate_input(generate_in)
    torch.manual_seed(0)
    model = build_model(StoreReader(store), config_for(store, tmp_path), torch.float64)
    structures = [s for f in gen.files for s in read_structures(f)]
    # The smallest structures that are not symmetric enough to have zero forces.
    asymmetric = [s for s in structures if np.abs(s.forces).max() > 0.05]
    periodic = min((s for s in asymmetric if s.pbc), key=lambda s: s.num_atoms)
    isolated = min((s for s in asymmetric if not s.pbc), key=lambda s: s.num_atoms)
    h = 1e-5
    for structure in (periodic, isolated):
        _, forces = model_energy_and_forces(model, [structure], gen)
        numeric = np.zeros_like(forces)
        for a in range(min(structure.num_atoms, 4)):
            for d in range(3):
                plus, minus = structure.pos.copy(), structure.pos.copy()
                plus[a, d] += h
                minus[a, d] -= h
                e_plus, _ = model_energy_and_forces(model, [moved(structure, plus)], gen)
                e_minus, _ = model_energy_and_forces(model, [moved(structure, minus)], gen)
                numeric[a, d] = -(e_plus[0] - e_minus[0]) / (2 * h)
        assert np.abs(forces).max() > 1e-3
        np.testing.assert_allclose(forces[:4], numeric[:4], rtol=0, atol=1e-6)


def test_species_grouped_batch_equals_structure_by_structure(emt, tmp_path):
    _, store = emt
    reader = StoreReader(store)
    torch.manual_seed(1)
    model = build_model(reader, config_for(store, tmp_path), torch.float64)
    shard = shard_from_range(reader.read_range(0, reader.num_structures), torch.float64)
    order = torch.tensor([7, 2, 19, 3, 11, 0, 25])
    energy, forces = predict(model, gather_batch(shard, order), with_forces=True, create_graph=False)
    offsets = torch.cumsum(shard.num_atoms[order], 0) - shard.num_atoms[order]
    for k, s in enumerate(order.tolist()):
        e_alone, f_alone = predict(model, gather_batch(shard, torch.tensor([s])), with_forces=True, create_graph=False)
        assert torch.allclose(energy[k], e_alone[0], rtol=0, atol=1e-10)
        a0 = int(offsets[k])
        block = forces[a0 : a0 + int(shard.num_atoms[s])]
        if bool(shard.has_derivs[s]):
            assert torch.allclose(block, f_alone, rtol=0, atol=1e-10)
    # Energies equal the store's per-structure totals evaluated with the atomic energies added back.
    assert energy.shape == (len(order),)


def test_dense_blocks_equal_sparse_rows(emt, tmp_path):
    _, store = emt
    reader = StoreReader(store)
    torch.manual_seed(2)
    model = build_model(reader, config_for(store, tmp_path), torch.float64)
    data = reader.read_range(0, reader.num_structures)
    dense = shard_from_range(data, torch.float64)
    sparse = shard_from_range(data, torch.float64, dense_blocks=False)
    assert any(el.dense for el in dense.elements.values()), "the EMT set has small cells: some blocks must be dense"
    assert all(el.deriv_center.numel() < s.deriv_center.numel() for el, s in zip(dense.elements.values(), sparse.elements.values()))
    index = torch.tensor([3, 17, 1, 8, 22, 5, 14, 0, 29])
    e1, f1 = predict(model, gather_batch(dense, index), with_forces=True, create_graph=False)
    e2, f2 = predict(model, gather_batch(sparse, index), with_forces=True, create_graph=False)
    assert torch.equal(e1, e2)
    assert torch.allclose(f1, f2, rtol=0, atol=1e-12) and f1.abs().max() > 1e-3


def _sums(batch_energy, ref, num_atoms, forces, ref_forces, mask):
    class B:  # the fields error_sums reads
        pass

    b = B()
    b.energy, b.num_atoms, b.forces, b.force_atoms = ref, num_atoms, ref_forces, mask
    b.structure_count = None  # every structure is real (no padding to a shape bucket)
    b.step_cache = None  # nothing kept between steps
    return error_sums(b, batch_energy, forces)


def test_loss_weights_and_missing_derivatives():
    torch.manual_seed(0)
    ref = torch.randn(4, dtype=torch.float64)
    num_atoms = torch.tensor([2, 3, 1, 2])
    ref_forces = torch.randn(8, 3, dtype=torch.float64)
    mask = torch.tensor([True] * 5 + [False] * 3)  # structures 3 and 4 have no derivatives
    energy = torch.randn(4, dtype=torch.float64, requires_grad=True)
    forces = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    identity = lambda t: t  # noqa: E731

    sums = _sums(energy, ref, num_atoms, forces, ref_forces, mask)
    rmse_e = torch.sqrt((((energy - ref) / num_atoms) ** 2).mean())
    rmse_f = torch.sqrt(((forces - ref_forces)[:5] ** 2).mean())
    for alpha in (0.0, 0.3, 1.0):
        surrogate, value = global_loss(sums, alpha, identity)
        expected = (1 - alpha) * rmse_e + alpha * rmse_f
        assert torch.allclose(value.loss, expected.detach())
        g_sur = torch.autograd.grad(surrogate, [energy, forces], retain_graph=True, allow_unused=True)
        g_ref = torch.autograd.grad(expected, [energy, forces], retain_graph=True, allow_unused=True)
        for a, b in zip(g_sur, g_ref):
            a = torch.zeros(1, dtype=torch.float64) if a is None else a
            b = torch.zeros(1, dtype=torch.float64) if b is None else b
            assert torch.allclose(a, b, atol=1e-12)
    # α = 0: forces have no gradient; α = 1: energies have none.
    s0, _ = global_loss(sums, 0.0, identity)
    assert torch.autograd.grad(s0, forces, retain_graph=True, allow_unused=True)[0] is None
    s1, _ = global_loss(sums, 1.0, identity)
    assert torch.autograd.grad(s1, energy, retain_graph=True, allow_unused=True)[0] is None
    # Atoms of structures without derivatives never enter the force error.
    g = torch.autograd.grad(s1, forces, retain_graph=True)[0]
    assert torch.all(g[5:] == 0) and torch.any(g[:5] != 0)
    assert float(sums.count_forces) == 15


def test_global_loss_sums_over_ranks_not_averages():
    """Two 'ranks' with unequal sizes: the reduced RMSE is that of the union."""
    a = ErrorSums(torch.tensor(4.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0))
    b = ErrorSums(torch.tensor(0.0), torch.tensor(3.0), torch.tensor(0.0), torch.tensor(0.0))
    reduce = lambda t: t + b.detached() if t.data_ptr() else t  # noqa: E731
    _, value = global_loss(a, 0.0, lambda t: t + b.detached())
    assert float(value.rmse_energy) == pytest.approx(1.0)  # sqrt(4/4), not mean(sqrt(4/1), 0)
    assert reduce is not None


def run_train(args, ranks=1, check=True):
    """The train CLI: in this process for one rank (no interpreter start-up), torchrun for more."""
    args = [str(a) for a in args]
    if ranks > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "aenet_dist.train", *args]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    else:
        result = run_in_process(train_main, args)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def write_toml(path: Path, store, run_dir, extra: str = "") -> Path:
    return write_train_toml(path, store, run_dir, extra=extra)


metrics = read_metrics


KEYS = ("train_rmse_energy_meV_atom", "train_rmse_forces_eV_A", "test_rmse_energy_meV_atom", "test_rmse_forces_eV_A", "loss")


@pytest.mark.dist
def test_two_gloo_ranks_follow_the_one_rank_trajectory(emt, tmp_path):
    _, store = emt
    one = write_toml(tmp_path / "one.toml", store, tmp_path / "one")
    two = write_toml(tmp_path / "two.toml", store, tmp_path / "two")
    run_train([one, "data.num_shards=2"])
    result = run_train([two], ranks=2)
    assert "test RMSE energy" in result.stdout
    # the lean step under DDP, its one sum a step through shared memory (both ranks on this host)
    assert "DistributedDataParallel over 2 ranks (gloo), summed through shared memory" in result.stdout + result.stderr
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-8, abs=1e-10), key
    w1 = load_checkpoint(tmp_path / "one" / "checkpoints" / "checkpoint_000003.pt")["model"]
    w2 = load_checkpoint(tmp_path / "two" / "checkpoints" / "checkpoint_000003.pt")["model"]
    for name in w1:
        assert torch.allclose(w1[name], w2[name], rtol=0, atol=1e-8), name
    assert m1[0]["loss"] != m1[-1]["loss"]
    # Streaming through data worker processes on each rank, and summing through gloo instead of shared
    # memory: the same 2-rank run, bit for bit (two addends sum alike in either order).
    streamed = write_toml(tmp_path / "streamed.toml", store, tmp_path / "streamed")
    result = run_train([streamed, "data.cache=stream", "data.workers=1", "run.shared_memory_sum=false"], ranks=2)
    assert "through shared memory" not in result.stdout + result.stderr
    for a, b in zip(m2, metrics(tmp_path / "streamed"), strict=True):
        assert all(a[key] == b[key] for key in KEYS), (a, b)


def test_resume_continues_exactly(emt, tmp_path):
    _, store = emt
    full = write_toml(tmp_path / "full.toml", store, tmp_path / "full", "checkpoint_every = 1")
    part = write_toml(tmp_path / "part.toml", store, tmp_path / "part", "checkpoint_every = 1")
    run_train([full, "run.epochs=4"])
    run_train([part, "run.epochs=2"])  # a job that stopped after epoch 2
    # resumed elsewhere: another cache mode, budget and reader count (none changes the result)
    run_train([part, "run.epochs=4", "--resume", "data.cache=stream", "data.memory_budget_gb=2", "data.readers=1"])
    m_full, m_part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [m["epoch"] for m in m_part] == [1, 2, 3, 4]
    for a, b in zip(m_full, m_part):
        for key in KEYS:
            assert a[key] == b[key], (a["epoch"], key)
    assert (tmp_path / "part" / "config.toml").exists()
    assert (tmp_path / "part" / "checkpoints" / "best.pt").exists()
    assert len(list((tmp_path / "part" / "checkpoints").glob("checkpoint_*.pt"))) == 2  # keep_last
    refused = run_train([part, "run.epochs=5", "optim.lr=0.5", "--resume"], check=False)
    assert refused.returncode == 2 and "optim.lr" in refused.stderr and "--finetune" in refused.stderr
    # a checkpoint whose train/test split is not this one (e.g. from a version with another split)
    latest = sorted((tmp_path / "part" / "checkpoints").glob("checkpoint_*.pt"))[-1]
    state = load_checkpoint(latest)
    state["split_digest"] = "0" * 16
    torch.save(state, latest)
    refused = run_train([part, "run.epochs=5", "--resume"], check=False)
    assert refused.returncode == 2 and "train/test split differs" in refused.stderr


def test_best_checkpoint_is_the_best_epoch_even_between_checkpoints(emt, tmp_path):
    _, store = emt
    cfg = write_toml(tmp_path / "b.toml", store, tmp_path / "b", "checkpoint_every = 5")
    run_train([cfg, "run.epochs=7", "optim.lr=0.3"])  # a large step: the test loss goes up and down
    losses = [m["loss"] for m in metrics(tmp_path / "b")]
    best_epoch = 1 + int(np.argmin(losses))
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "best.pt")["epoch"] == best_epoch, losses


def test_bad_inputs_have_clear_messages(emt, tmp_path):
    _, store = emt
    missing = run_train([write_toml(tmp_path / "m.toml", tmp_path / "nowhere.zarr", tmp_path / "m")], check=False)
    assert missing.returncode == 2 and "no Zarr store" in missing.stderr
    typo = run_train([write_toml(tmp_path / "t.toml", store, tmp_path / "t"), "optim.lrr=1"], check=False)
    assert typo.returncode == 2 and "did you mean 'optim.lr'" in typo.stderr
    species = run_train([write_toml(tmp_path / "s.toml", store, tmp_path / "s", "[model.networks.Xx]\nhidden = [3]")], check=False)
    assert species.returncode == 2 and "Xx" in species.stderr


def test_switch_interval_setting(emt, tmp_path, monkeypatch):
    """AENET_DIST_SWITCH_INTERVAL: a bad value is a clear error (exit 2); the command leaves the
    interval of the process that called it as it found it."""
    _, store = emt
    monkeypatch.setenv("AENET_DIST_SWITCH_INTERVAL", "-1")
    bad = run_train([write_toml(tmp_path / "b.toml", store, tmp_path / "b")], check=False)
    assert bad.returncode == 2 and "AENET_DIST_SWITCH_INTERVAL must be a positive number of seconds, got '-1'" in bad.stderr
    monkeypatch.setenv("AENET_DIST_SWITCH_INTERVAL", "0.002")
    before = sys.getswitchinterval()
    run_train([write_toml(tmp_path / "g.toml", store, tmp_path / "g"), "run.epochs=1"])
    assert sys.getswitchinterval() == before


def test_checkpoints_on_the_time_schedule(emt, tmp_path):
    """checkpoint_every unset: a checkpoint once run.checkpoint_interval_s has passed (0: every epoch),
    and at the end; best.pt, kept in memory in between, is the best epoch's state."""
    _, store = emt
    rare = write_train_toml(tmp_path / "r.toml", store, tmp_path / "r", epochs=6, extra="keep_last = 4\ncheckpoint_interval_s = 3600")
    run_train([rare, "optim.lr=1.0"])  # a rate this high makes the last epoch worse than an earlier one
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("checkpoint_*.pt"))
    assert ckpts == ["checkpoint_000006.pt"]  # only the end: the hour never passed
    history = metrics(tmp_path / "r")
    best_epoch = min(history, key=lambda m: m["loss"])["epoch"]
    assert best_epoch < 6  # so best.pt is an improvement that waited in memory
    best = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    assert best["epoch"] == best_epoch and best["best_loss"] == min(m["loss"] for m in history)
    last = load_checkpoint(tmp_path / "r" / "checkpoints" / "checkpoint_000006.pt")
    assert any(not torch.equal(w, last["model"][k]) for k, w in best["model"].items())  # that epoch's weights, not the last
    every = write_train_toml(tmp_path / "e.toml", store, tmp_path / "e", epochs=3, extra="keep_last = 4\ncheckpoint_interval_s = 0")
    run_train([every])
    assert sorted(p.name for p in (tmp_path / "e" / "checkpoints").glob("checkpoint_*.pt")) == [
        "checkpoint_000001.pt", "checkpoint_000002.pt", "checkpoint_000003.pt"]
    # the cadence decides only how often files are written: a resumed run may change it (a checkpoint
    # of an older version recorded checkpoint_every = 1 and no interval)
    run_train([every, "run.epochs=4", "run.checkpoint_every=1", "run.checkpoint_interval_s=30", "--resume"])
    assert [m["epoch"] for m in metrics(tmp_path / "e")] == [1, 2, 3, 4]
    bad = run_train([every, "run.checkpoint_interval_s=-1"], check=False)
    assert bad.returncode == 2 and "run.checkpoint_interval_s must be >= 0 seconds" in bad.stderr


def test_nan_reference_energy_is_named_by_featurize(emt, tmp_path):
    """A NaN energy is refused where it is read (file and line), before any store is written."""
    generate_in, _ = emt
    gen = read_generate_input(generate_in)
    structures = [s for f in gen.files for s in read_structures(f)]
    data_dir = tmp_path / "data"
    (data_dir / "xsf").mkdir(parents=True)
    names = []
    for k, s in enumerate(structures[:12]):
        energy = float("nan") if k == 4 else s.energy
        write_xsf(data_dir / "xsf" / f"s{k:02d}.xsf", Structure(s.species, s.pos, s.cell, s.pbc, energy, s.forces, s.name))
        names.append(f"xsf/s{k:02d}.xsf")
    text = Path(generate_in).read_text()
    for stp in Path(generate_in).parent.glob("*.stp"):
        (data_dir / stp.name).write_text(stp.read_text())
    (data_dir / "generate.in").write_text(text[: text.upper().index("FILES")] + f"FILES\n{len(names)}\n" + "\n".join(names) + "\n")
    store = tmp_path / "nan.zarr"
    with pytest.raises(ValueError, match=r"s04.xsf:1: the total energy has a value that is not finite"):
        featurize_to_store(read_generate_input(data_dir / "generate.in"), store, progress=False)
    assert not (store / "blocks").exists()


def test_nan_loss_stops_with_epoch_step_and_structures(emt, tmp_path):
    _, store = emt
    trainer = Trainer(config_for(store, tmp_path / "run"), DistInfo(0, 1, 0, torch.device("cpu")))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1, step 1; structures on rank 0 include \['xsf/"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failing_run_still_writes_its_best_epoch(emt, tmp_path):
    """On the time schedule an improvement waits in memory; a run that then fails (a NaN here,
    injected into the weights before epoch 4) writes it to best.pt on the way out."""
    _, store = emt
    trainer = Trainer(config_for(store, tmp_path / "run", run={"epochs": 6, "checkpoint_interval_s": 3600.0}),
                      DistInfo(0, 1, 0, torch.device("cpu")))
    train_epoch = trainer._train_epoch

    def poisoned_at_epoch_4():
        if trainer.epoch == 3:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return train_epoch()

    trainer._train_epoch = poisoned_at_epoch_4
    with pytest.raises(TrainingError, match="at epoch 4"):
        trainer.fit()
    trainer.close()
    assert not list((tmp_path / "run" / "checkpoints").glob("checkpoint_*.pt"))  # none was due
    history = metrics(tmp_path / "run")
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["epoch"] == min(history, key=lambda m: m["loss"])["epoch"] <= 3


def _wait_for_epoch(run_dir: Path, epoch: int, proc, timeout: float = 120.0) -> None:
    import time

    deadline = time.time() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"run did not reach epoch {epoch}")


@pytest.mark.dist
@pytest.mark.parametrize("ranks, batches", [(1, "reshuffle"), (2, "reshuffle"), (2, "fixed"), (1, "fixed stream")])
def test_signal_mid_epoch_then_resume_equals_uninterrupted(emt, tmp_path, ranks, batches):
    """SIGUSR1 to one rank: all ranks finish the step, rank 0 checkpoints the position inside
    the epoch, the job exits 75, and --resume ends with the uninterrupted run's metrics and weights
    (with data.batches=fixed too: the kept batches, taken from the step where the epoch stopped)."""
    import signal

    import psutil

    _, store = emt
    extra = "checkpoint_every = 1"
    full = write_toml(tmp_path / "full.toml", store, tmp_path / "full", extra)
    part = write_toml(tmp_path / "part.toml", store, tmp_path / "part", extra)
    batches, _, cache = batches.partition(" ")
    common = ["run.batch_size=4", "run.epochs=3", f"data.batches={batches}"] + ([f"data.cache={cache}"] if cache else [])
    if ranks == 1:
        run_train([full, *common])
        cmd = [sys.executable, "-m", "aenet_dist.train", str(part), *common]
    else:
        run_train([full, *common], ranks=2)
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "aenet_dist.train", str(part), *common]
    env = fault_env(step_delay=0.25)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(tmp_path / "part", 1, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "aenet_dist.train" in " ".join(p.cmdline())]
    target = workers[-1] if workers else psutil.Process(proc.pid)  # the last rank, not rank 0
    target.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    if ranks == 1:
        assert proc.returncode == 75, err
    else:
        assert proc.returncode != 0  # torchrun reports the workers' exit status 75 as a failure
    assert "interrupted" in err
    mid = [p.name for p in (tmp_path / "part" / "checkpoints").glob("checkpoint_000001.*.pt")]
    assert mid, f"no mid-epoch checkpoint: {sorted(p.name for p in (tmp_path / 'part' / 'checkpoints').iterdir())}"
    run_train([part, *common, "--resume"], ranks=ranks)
    m_full, m_part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [m["epoch"] for m in m_part] == [1, 2, 3]
    for a, b in zip(m_full, m_part):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-14), (a["epoch"], key)
    w_full = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint_000003.pt")["model"]
    w_part = load_checkpoint(tmp_path / "part" / "checkpoints" / "checkpoint_000003.pt")["model"]
    for name in w_full:
        assert torch.equal(w_full[name], w_part[name]), name


def _two_ranks_past_epoch_one(cfg: Path, run_dir: Path, args: list[str], step_delay: float):
    """torchrun with 2 CPU workers, slowed by ``step_delay`` s per step, once epoch 1 is logged:
    (the torchrun process, its 2 worker processes)."""
    import psutil

    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "aenet_dist.train", str(cfg), *args]
    env = fault_env(step_delay=step_delay)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(run_dir, 1, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "aenet_dist.train" in " ".join(p.cmdline())]
    assert len(workers) == 2
    return proc, workers


@pytest.mark.dist
def test_killed_rank_stops_the_others_and_resume_recovers(emt, tmp_path):
    """kill -9 of one worker: the job ends (no hang) and --resume finishes from the last checkpoint."""
    import signal
    import time

    _, store = emt
    cfg = write_toml(tmp_path / "k.toml", store, tmp_path / "k", "checkpoint_every = 1")
    common = ["run.batch_size=4", "run.epochs=3"]
    proc, workers = _two_ranks_past_epoch_one(cfg, tmp_path / "k", common, step_delay=0.25)
    workers[-1].send_signal(signal.SIGKILL)
    start = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - start < 120, "the surviving rank must not hang"
    # the survivor says what happened in one sentence, not a cast error or a timeout that did not occur
    said = [line for line in err.splitlines() if "a collective with the other ranks failed" in line]
    assert said and "another rank has exited" in said[0] and "--resume" in said[0], err[-3000:]
    assert "Unable to cast" not in err and "collective_timeout_s" not in said[0]
    run_train([cfg, *common, "--resume"], ranks=2)
    assert [m["epoch"] for m in metrics(tmp_path / "k")] == [1, 2, 3]


@pytest.mark.dist
def test_hung_rank_times_out_the_others(emt, tmp_path):
    """A rank that stops responding (SIGSTOP): the other fails its collective after
    run.collective_timeout_s with a message, and the job ends instead of hanging."""
    import signal
    import time

    _, store = emt
    cfg = write_toml(tmp_path / "h.toml", store, tmp_path / "h", "checkpoint_every = 1")
    args = ["run.batch_size=4", "run.epochs=50", "run.collective_timeout_s=5"]
    proc, workers = _two_ranks_past_epoch_one(cfg, tmp_path / "h", args, step_delay=0.1)
    workers[-1].send_signal(signal.SIGSTOP)
    start = time.time()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        for w in workers:
            if w.is_running():
                w.send_signal(signal.SIGCONT)
                w.kill()
    assert proc.returncode != 0
    assert time.time() - start < 100, "the waiting rank must give up after the collective timeout"
    assert "a collective with the other ranks failed" in err and "--resume" in err, err[-3000:]


def test_epoch_log_warns_when_a_rank_waits_for_data(emt, tmp_path, caplog):
    import logging

    _, store = emt
    trainer = Trainer(config_for(store, tmp_path / "w"), DistInfo(0, 1, 0, torch.device("cpu")))
    logger = logging.getLogger("aenet_dist")
    logger.addHandler(caplog.handler)
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="aenet_dist"):
            trainer.report.warn_about_waiting(0.05, trainer.local_seconds, 1.0)
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            trainer.report.warn_about_waiting(0.6, trainer.local_seconds, 1.0)
            assert "rank 0 waited 0.60 s of 1.00 s for data" in caplog.text
            # Waiting that is a large share of a short epoch but below the floor per step: quiet.
            caplog.clear()
            trainer.report.warn_about_waiting(0.04 * trainer.steps, trainer.local_seconds, 0.05 * trainer.steps)
            assert not caplog.records
            # Recurring: once, then every 10th epoch it recurs, with the count.
            for _ in range(18):
                trainer.report.warn_about_waiting(0.6, trainer.local_seconds, 1.0)
        warned = sorted({r.getMessage() for r in caplog.records if "waited" in r.getMessage()})
        assert len(warned) == 1 and "(10 epochs so far)" in warned[0]
    finally:
        logger.removeHandler(caplog.handler)


def test_a_batch_larger_than_the_training_set_is_said(emt, tmp_path, caplog):
    import logging

    _, store = emt
    trainer = Trainer(config_for(store, tmp_path / "b", run={"batch_size": 100000, "epochs": 1}), DistInfo(0, 1, 0, torch.device("cpu")))
    logger = logging.getLogger("aenet_dist")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="aenet_dist"):
            trainer.fit()
    finally:
        logger.removeHandler(caplog.handler)
        trainer.close()
    assert trainer.steps == 1
    assert f"run.batch_size=100000 is more than the {trainer.data.num_train_global} training structures" in caplog.text


def test_nan_in_one_structure_skips_the_step_and_names_it(emt, tmp_path):
    """A non-finite value in one structure's descriptors: that step is not taken, and the check
    (once per epoch or log line, not a host sync per step) names the epoch, step and structure."""
    _, store = emt
    trainer = Trainer(config_for(store, tmp_path / "run"), DistInfo(0, 1, 0, torch.device("cpu")))
    reader = StoreReader(store)
    shard = shard_from_range(reader.read_range(0, reader.num_structures), torch.float64)
    good = gather_batch(shard, torch.tensor([0, 1, 2]))
    trainer.train_step(good)
    trainer._check_steps()  # a finite step passes
    bad = gather_batch(shard, torch.tensor([4, 5, 6]))
    element = next(el for el, g in bad.G.items() if g.shape[0])
    bad.G[element] = bad.G[element].clone()
    bad.G[element][0, 0] = float("nan")  # a row of one of its structures
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step_in_epoch = 1
    trainer.train_step(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())), "a NaN step changed the weights"
    name = reader.names()[4]
    with pytest.raises(TrainingError, match=rf"loss is nan at epoch 1, step 2; structures on rank 0 include \['{name}'"):
        trainer._check_steps()


@pytest.mark.parametrize("method", ["adagrad", "adamax", "nadam", "radam", "rmsprop", "adadelta", "asgd", "rprop", "sgd"])
def test_every_torch_optimizer_by_name_trains_and_resumes_exactly(emt, tmp_path, method):
    """The paper's Table I used adagrad and adamax: every first-order torch.optim method by name,
    checkpointed and resumed like Adam (fused ones skip non-finite steps on the device)."""
    _, store = emt
    extra = "checkpoint_every = 1"
    full = write_toml(tmp_path / "full.toml", store, tmp_path / "full", extra)
    part = write_toml(tmp_path / "part.toml", store, tmp_path / "part", extra)
    opts = [f"optim.method={method}", "optim.lr=0.003"]
    run_train([full, *opts, "run.epochs=2"])
    run_train([part, *opts, "run.epochs=1"])
    run_train([part, *opts, "run.epochs=2", "--resume"])
    m_full, m_part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert m_full[0]["loss"] != m_full[1]["loss"]  # it trains
    # NAdam: torch.optim loads its float32 mu_product state cast to the parameters' float64, so a
    # resumed run differs in the 12th digit (a torch quirk, not ours); every other method is exact.
    rel = 1e-9 if method == "nadam" else 1e-12
    for a, b in zip(m_full, m_part):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-14), (method, a["epoch"], key)
    state = load_checkpoint(tmp_path / "part" / "checkpoints" / "checkpoint_000002.pt")
    assert state["config"]["optim"]["method"] == method


def test_train_in_takes_command_line_overrides(emt, tmp_path):
    """A train.in run takes the overrides of a train.toml (nested keys too) and reports typos alike."""
    _, store = emt
    tin = tmp_path / "train.in"
    tin.write_text(f"TRAININGSET {store}\nITERATIONS 50\nBATCHSIZE 8\nMETHOD\nmethod=adam lr=0.01\n"
                   "NETWORKS\n  Cu Cu.nn 1 4:tanh\n")
    run_dir = tmp_path / "run"
    run_train([tin, "model.networks.Cu.hidden=[3]", "model.networks.Au.hidden=[2,2]", "run.epochs=1",
               "run.device=cpu", "run.dtype=float64", f"run.run_dir={run_dir}"])
    config = load_train_config(run_dir / "config.toml")  # the resolved config the run wrote
    assert config.run.epochs == 1 and config.optim.lr == 0.01 and config.data.store == str(store)
    assert config.model.network_for("Cu").hidden == (3,) and config.model.network_for("Au").hidden == (2, 2)
    assert len(metrics(run_dir)) == 1
    toml = write_toml(tmp_path / "t.toml", store, tmp_path / "t")
    for typo in ("optim.lrr=1", "model.networks.Cu.hiden=[3]"):
        from_train_in = run_train([tin, typo], check=False)
        from_toml = run_train([toml, typo], check=False)
        assert from_train_in.returncode == from_toml.returncode == 2
        assert from_train_in.stderr == from_toml.stderr and "did you mean" in from_toml.stderr


def test_train_in_method_adamax(tmp_path):
    from aenet_dist.formats.train_in import read_train_in

    (tmp_path / "train.in").write_text("TRAININGSET data.train\nMETHOD\nmethod=adamax lr=0.002\n")
    config = read_train_in(tmp_path / "train.in")
    assert config.optim.method == "adamax" and config.optim.lr == 0.002
    with pytest.raises(ValueError, match="optim.method"):
        TrainConfig.from_dict({"data": {"store": "s.zarr"}, "optim": {"method": "lbfgs"}})


def test_force_subsets_are_nested_seeded_and_exclude_the_test_set():
    from aenet_dist.loader import force_subset, split_test

    rng = np.random.default_rng(0)
    has_derivs = rng.random(400) < 0.6
    test = split_test(has_derivs, 10.0, 3)
    masks = {p: force_subset(has_derivs, test, p, 3) for p in (0, 5, 10, 20, 50, 100)}
    candidates = has_derivs & ~test
    for p, m in masks.items():
        assert m.sum() == round(candidates.sum() * p / 100) and not (m & ~candidates).any()
    for small, large in ((0, 5), (5, 10), (10, 20), (20, 50), (50, 100)):
        assert not (masks[small] & ~masks[large]).any(), f"{small} % is not inside {large} %"
    assert (masks[100] == candidates).all()
    assert not np.array_equal(force_subset(has_derivs, test, 20, 4), masks[20])  # another seed, another subset


def test_force_angle_histogram_and_quantiles():
    from aenet_dist.loss import force_angle_histogram, histogram_quantile

    angles = torch.tensor([10.0, 20.0, 30.0, 40.0, 170.0], dtype=torch.float64)
    reference = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64).repeat(6, 1) * 2.0
    rad = torch.deg2rad(torch.cat([angles, torch.tensor([90.0], dtype=torch.float64)]))
    predicted = torch.stack([torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)], 1) * 3.0
    use = torch.tensor([True] * 5 + [False])  # the 90° atom belongs to a structure without forces
    hist = force_angle_histogram(predicted, reference, use, min_force=0.1).numpy()
    assert hist.sum() == 5
    assert histogram_quantile(hist, 0.5) == pytest.approx(30.0, abs=0.5)
    assert histogram_quantile(hist, 0.9) == pytest.approx(170.0, abs=0.5)
    small = force_angle_histogram(predicted, reference * 0.01, use, min_force=0.1)  # |F_ref| below the threshold
    assert small.sum() == 0 and np.isnan(histogram_quantile(small.numpy(), 0.5))


@pytest.mark.parametrize("percent", [0, 50])
def test_force_percent_trains_on_a_subset_of_the_forces(emt, tmp_path, percent):
    _, store = emt
    run = tmp_path / "run"
    trainer = Trainer(config_for(store, run, data={"force_percent": float(percent)}, run={"epochs": 2}),
                      DistInfo(0, 1, 0, torch.device("cpu")))
    last = trainer.fit()
    m = read_metrics(run)
    assert len(m) == 2 and np.isfinite(m[-1]["test_rmse_forces_eV_A"])  # test forces: every test structure
    assert 0 <= m[-1]["test_force_angle_median_deg"] <= m[-1]["test_force_angle_p90_deg"] <= 180
    if percent == 0:
        assert np.isnan(m[-1]["train_rmse_forces_eV_A"])  # no training force enters the loss
    else:
        assert np.isfinite(m[-1]["train_rmse_forces_eV_A"]) and last["epoch"] == 2


def test_without_derivatives_drops_exactly_the_rows_of_those_structures(emt):
    from aenet_dist.store import without_derivatives

    _, store = emt
    reader = StoreReader(store)
    r = reader.read_range(0, reader.num_structures)
    drop = np.zeros(reader.num_structures, dtype=bool)
    drop[::2] = True
    out = without_derivatives(r, drop)
    assert not (out.has_derivs & drop).any() and np.array_equal(out.has_derivs, r.has_derivs.astype(bool) & ~drop)
    structure_of_atom = np.repeat(np.arange(reader.num_structures), r.num_atoms)
    for el in r.elements:
        centers = structure_of_atom[out.elements[el].atom[out.elements[el].deriv_center]]
        assert not drop[centers].any()
        kept = ~drop[structure_of_atom[r.elements[el].atom[r.elements[el].deriv_center]]]
        assert np.array_equal(out.elements[el].dG, r.elements[el].dG[kept])
        assert np.array_equal(out.elements[el].G, r.elements[el].G)  # descriptors (energies) untouched


def _data_workers(proc) -> list:
    """The data worker processes (spawned by multiprocessing) under a training process."""
    import psutil

    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def test_stream_with_worker_processes_survives_sigterm_and_resumes_exactly(emt, tmp_path):
    """data.workers with the stream cache: SIGTERM to the rank and its workers (as SLURM's scancel
    sends it): the workers keep serving, the rank checkpoints its position (exit 75), and --resume
    ends with the uninterrupted run's metrics and weights."""
    import signal

    _, store = emt
    common = ["run.batch_size=4", "run.epochs=3", "data.cache=stream", "data.workers=1"]
    full = write_toml(tmp_path / "full.toml", store, tmp_path / "full", "checkpoint_every = 1")
    part = write_toml(tmp_path / "part.toml", store, tmp_path / "part", "checkpoint_every = 1")
    run_train([full, *common])
    proc = subprocess.Popen([sys.executable, "-m", "aenet_dist.train", str(part), *common], cwd=ROOT, env=fault_env(step_delay=0.25),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(tmp_path / "part", 1, proc)
    workers = _data_workers(proc)
    assert workers, "the stream run should have a data worker process"
    for p in workers:
        p.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    run_train([part, *common, "--resume"])
    for a, b in zip(metrics(tmp_path / "full"), metrics(tmp_path / "part"), strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-14), (a["epoch"], key)
    w_full = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint_000003.pt")["model"]
    w_part = load_checkpoint(tmp_path / "part" / "checkpoints" / "checkpoint_000003.pt")["model"]
    assert all(torch.equal(w_full[name], w_part[name]) for name in w_full)


def test_a_killed_data_worker_ends_training_with_a_message(emt, tmp_path):
    """kill -9 of a data worker process: the run ends with exit 1 and says what happened, no hang."""
    import signal

    _, store = emt
    cfg = write_toml(tmp_path / "train.toml", store, tmp_path / "run", "checkpoint_every = 1")
    proc = subprocess.Popen([sys.executable, "-m", "aenet_dist.train", str(cfg), "run.batch_size=4", "run.epochs=50",
                             "data.cache=stream", "data.workers=1"], cwd=ROOT, env=fault_env(step_delay=0.1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(tmp_path / "run", 1, proc)
    for p in _data_workers(proc):
        p.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "data worker process of this rank died" in err and "Traceback" not in err


def test_memory_cache_keeps_its_evaluation_batches_and_evaluates_the_same(emt, tmp_path):
    """The memory cache gathers the test batches once; later evaluations (after training steps
    changed the weights) equal a trainer that gathers them anew. Stream gathers every time."""
    _, store = emt
    kept = Trainer(config_for(store, tmp_path / "kept"), DistInfo(0, 1, 0, torch.device("cpu")))
    fresh = Trainer(config_for(store, tmp_path / "fresh"), DistInfo(0, 1, 0, torch.device("cpu")))
    fresh.keep_eval_batches = False
    assert kept.keep_eval_batches and kept.eval_batches is None
    first = kept.evaluate()
    assert kept.eval_batches is not None and len(kept.eval_batches) == len(kept.eval_plan)
    for trainer in (kept, fresh):  # the same steps on both: the weights move
        plan = epoch_plan(trainer.data, 0, 0, trainer.steps, trainer.config.data.shuffle_window_blocks)
        for batch in trainer.source.iterate(plan, True):
            trainer.train_step(batch)
    again, anew = kept.evaluate(), fresh.evaluate()
    assert fresh.eval_batches is None
    assert not torch.equal(first[0], again[0])
    for a, b in zip(again, anew):
        assert torch.equal(a, b)
    stream = Trainer(config_for(store, tmp_path / "stream", data={"cache": "stream"}), DistInfo(0, 1, 0, torch.device("cpu")))
    stream.evaluate()
    assert not stream.keep_eval_batches and stream.eval_batches is None
    stream.close()


def _gathering_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.is_alive() and "(_run)" in t.name]


def test_next_epoch_gathered_ahead_trains_the_same_and_leaves_no_thread(emt, tmp_path):
    """A resident cache gathers the next epoch's first batches during the end of the epoch before:
    the run equals one gathering in the training thread, bit for bit, and an early stop (batches of
    an epoch that never comes) leaves no gathering thread behind."""
    _, store = emt
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    ahead = Trainer(config_for(store, tmp_path / "ahead"), info)
    inline = Trainer(config_for(store, tmp_path / "inline"), info)
    ahead.prefetch, inline.prefetch = True, False
    started = []
    original = ahead._gather_next_epoch_ahead
    ahead._gather_next_epoch_ahead = lambda with_forces: (original(with_forces), started.append(ahead.next_epoch_batches))
    ahead.fit()
    inline.fit()
    assert len([s for s in started if s is not None]) == 2  # before epochs 2 and 3, not after the last
    for (name, a), (_, b) in zip(ahead.model.state_dict().items(), inline.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not _gathering_threads() and ahead.next_epoch_batches is None
    # An lr of 1e-30 leaves the weights as they are: the test loss never improves, so patience 1
    # stops after epoch 2, with epoch 3's batches gathered ahead.
    stopping = Trainer(config_for(store, tmp_path / "stop", optim={"method": "sgd", "lr": 1e-30},
                                  run={"epochs": 5, "early_stop_patience": 1}), info)
    stopping.prefetch = True
    stopping.fit()
    assert stopping.epoch == 2 and stopping.next_epoch_batches is None
    assert not _gathering_threads()


def test_eval_every_evaluates_on_schedule_and_at_the_end(emt, tmp_path):
    """run.eval_every = 3 over 7 epochs: the test set is evaluated at epochs 3, 6 and 7 (the last);
    the other epochs' test fields are NaN, the training itself is bit for bit that of evaluating
    every epoch, and the best epoch, early stopping and a plateau schedule count evaluations only."""
    _, store = emt
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    every = Trainer(config_for(store, tmp_path / "every", run={"epochs": 7}), info)
    sparse = Trainer(config_for(store, tmp_path / "sparse", run={"epochs": 7, "eval_every": 3}), info)
    every.fit()
    sparse.fit()
    for (name, a), (_, b) in zip(every.model.state_dict().items(), sparse.model.state_dict().items()):
        assert torch.equal(a, b), name
    rows, full = metrics(tmp_path / "sparse"), metrics(tmp_path / "every")
    tested = [r["epoch"] for r in rows if math.isfinite(r["test_rmse_energy_meV_atom"])]
    assert tested == [3, 6, 7]
    for r, f in zip(rows, full):
        assert r["train_rmse_energy_meV_atom"] == f["train_rmse_energy_meV_atom"]
        if r["epoch"] in tested:
            assert r["test_rmse_forces_eV_A"] == f["test_rmse_forces_eV_A"]
        else:
            assert math.isnan(r["test_rmse_forces_eV_A"]) and math.isnan(r["loss"])
    assert sparse.best_epoch in tested
    # An lr of 1e-30 never improves the test loss: patience 1 stops at the second evaluation (epoch 4),
    # and a plateau schedule is stepped once per evaluation (3 in 6 epochs).
    stopping = Trainer(config_for(store, tmp_path / "stop", optim={"method": "sgd", "lr": 1e-30},
                                  run={"epochs": 9, "eval_every": 2, "early_stop_patience": 1}), info)
    stopping.fit()
    assert stopping.epoch == 4
    plateau = Trainer(config_for(store, tmp_path / "plateau", optim={"method": "sgd", "lr": 1e-30},
                                 schedule={"kind": "plateau", "patience": 0, "factor": 0.5, "min_lr": 0.0},
                                 run={"epochs": 6, "eval_every": 2}), info)
    plateau.fit()
    assert plateau.scheduler.last_epoch == 3
    with pytest.raises(ValueError, match="run.eval_every must be >= 1"):
        config_for(store, tmp_path / "bad", run={"eval_every": 0})


def _steps_taken(trainer: Trainer) -> list[tuple[int, tuple[int, ...]]]:
    """Records (epoch, structure indices) of every step ``trainer`` takes from now on."""
    taken = []
    original = trainer.train_step

    def recording(batch):
        taken.append((trainer.epoch, tuple(batch.structure_index.tolist())))
        return original(batch)

    trainer.train_step = recording
    return taken


def test_fixed_batches_are_formed_once_and_taken_in_a_new_order_each_epoch(emt, tmp_path):
    """data.batches=fixed: the first epoch is the reshuffling run's first epoch, bit for bit; every
    later epoch takes the same batches (the first epoch's structure sets) in another seeded order,
    gathered once: no block stays in the sources, no gathering thread runs."""
    _, store = emt
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    fixed = Trainer(config_for(store, tmp_path / "fixed", data={"batches": "fixed"}, run={"epochs": 4, "batch_size": 4}), info)
    drawn = Trainer(config_for(store, tmp_path / "drawn", run={"epochs": 4, "batch_size": 4}), info)
    assert len(fixed.kept_batches) == fixed.steps >= 4 and not fixed.prefetch
    assert not fixed.source.resident and not fixed.eval_source.resident  # blocks were read once, for the kept batches
    taken, taken_drawn = _steps_taken(fixed), _steps_taken(drawn)
    fixed.fit()
    drawn.fit()
    assert not _gathering_threads()
    by_epoch = [[index for e, index in taken if e == epoch] for epoch in range(4)]
    first = [tuple(p.tolist()) for p in epoch_plan(fixed.data, 0, 0, fixed.steps, fixed.config.data.shuffle_window_blocks)]
    assert by_epoch[0] == first == [index for e, index in taken_drawn if e == 0]
    for later in by_epoch[1:]:
        assert sorted(later) == sorted(first)
    assert len({tuple(order) for order in by_epoch}) == 4  # four orders
    assert [index for e, index in taken_drawn if e == 1] != by_epoch[1]  # reshuffling draws other batches
    m_fixed, m_drawn = metrics(tmp_path / "fixed"), metrics(tmp_path / "drawn")
    assert all(m_fixed[0][key] == m_drawn[0][key] for key in KEYS)
    assert m_fixed[-1]["loss"] != m_drawn[-1]["loss"]
    # a second run is the same run
    again = Trainer(config_for(store, tmp_path / "again", data={"batches": "fixed"}, run={"epochs": 4, "batch_size": 4}), info)
    again.fit()
    assert [m["loss"] for m in metrics(tmp_path / "again")] == [m["loss"] for m in m_fixed]


def test_fixed_batches_on_two_ranks_equal_one_rank_and_stream_from_disk(emt, tmp_path):
    """data.batches=fixed on 2 gloo ranks follows the 1-rank run of the same shards, with the batches
    kept in memory or, with stream, on disk (each rank's file, read back every epoch, then removed):
    the same run bit for bit."""
    _, store = emt
    one = write_toml(tmp_path / "one.toml", store, tmp_path / "one")
    two = write_toml(tmp_path / "two.toml", store, tmp_path / "two")
    disk = write_toml(tmp_path / "disk.toml", store, tmp_path / "disk")
    run_train([one, "data.num_shards=2", "data.batches=fixed"])
    run_train([two, "data.batches=fixed"], ranks=2)
    scratch = tmp_path / "scratch"  # data.batch_dir: node-local scratch on a cluster
    result = run_train([disk, "data.batches=fixed", "data.cache=stream", "data.memory_budget_gb=0.5", f"data.batch_dir={scratch}"], ranks=2)
    assert f"written to an unnamed file in {scratch}" in result.stdout + result.stderr
    assert list(scratch.iterdir()) == []  # the files never had a name to leave behind
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-8, abs=1e-10), key
    for a, b in zip(metrics(tmp_path / "two"), metrics(tmp_path / "disk"), strict=True):
        assert all(a[key] == b[key] for key in KEYS), (a, b)
    refused = run_train([one, "data.batches=sometimes", "run.run_dir=" + str(tmp_path / "s")], check=False)
    assert refused.returncode == 2 and "data.batches must be one of" in refused.stderr


def test_resume_accepts_a_checkpoint_from_before_a_setting_existed(emt, tmp_path):
    """A checkpoint whose config lacks a key that a later version added (data.batches) resumes when
    the key has its default (the effect the older version had), and is refused otherwise."""
    _, store = emt
    cfg = write_toml(tmp_path / "r.toml", store, tmp_path / "r", "checkpoint_every = 1")
    run_train([cfg, "run.epochs=1"])
    latest = sorted((tmp_path / "r" / "checkpoints").glob("checkpoint_*.pt"))[-1]
    state = load_checkpoint(latest)
    del state["config"]["data"]["batches"]
    torch.save(state, latest)
    run_train([cfg, "run.epochs=2", "--resume"])
    assert [m["epoch"] for m in metrics(tmp_path / "r")] == [1, 2]
    refused = run_train([cfg, "run.epochs=3", "--resume", "data.batches=fixed"], check=False)
    assert refused.returncode == 2 and "data.batches" in refused.stderr


def test_nan_on_one_of_two_ranks_stops_both_naming_its_structures(emt, tmp_path):
    """A NaN in one descriptor of rank 1's second batch: the step is taken on neither rank, both stop
    at the epoch's check (no checkpoint), rank 1 names its structures, rank 0 says its own were finite."""
    _, store = emt
    config = write_toml(tmp_path / "nan.toml", store, tmp_path / "run", "checkpoint_every = 1")
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "aenet_dist.train", str(config),
           "run.batch_size=4", "run.epochs=2", "data.batches=fixed"]
    proc = subprocess.run(cmd, cwd=ROOT, env=fault_env(nan_at=(1, 1)), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(r"loss is nan at epoch 1, step 2; structures on rank 1 include \['xsf/", proc.stderr), proc.stderr[-3000:]
    assert "loss is nan at epoch 1, step 2; rank 0's own structures of the step gave finite errors" in proc.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("checkpoint_*.pt"))
