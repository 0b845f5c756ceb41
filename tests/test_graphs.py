"""CUDA graph replay (aenet_dist.graphs): what can be checked without a GPU, and the replay itself on one.

Padding a batch to its shape bucket changes no energy, force, error sum or gradient (1e-12,
float64); a static batch refilled with a smaller batch forgets the larger one; a capture that
cannot run falls back to eager steps (``auto``) or stops (``on``).
"""

import logging

import pytest
import torch

from aenet_dist import step as lean
from aenet_dist.batching import bucket_size, gather_batch, shard_from_range
from aenet_dist.config import RunConfig
from aenet_dist.graphs import REUSE, GraphedStep, _mismatch, batch_counts, bucket_key, choose_bucket, fill_static, padded_batch, probe_batch, use_cuda_graphs
from aenet_dist.store import StoreReader
from aenet_dist.train import build_model
from helpers import featurized_emt

from test_train import config_for


@pytest.fixture(scope="module")
def sparse_shard(tmp_path_factory):
    """An all-sparse float64 shard of a small two-element EMT store, most structures with forces."""
    _, store = featurized_emt(tmp_path_factory.mktemp("graphs"), 30, seed=5, force_percent=70.0)
    reader = StoreReader(store)
    return store, reader, shard_from_range(reader.read_range(0, reader.num_structures), torch.float64, dense_blocks=False)


def _model(reader, store, tmp_path):
    torch.manual_seed(3)
    config = config_for(store, tmp_path, model={"hidden": [6, 5], "activations": ["tanh", "twist"]})
    model = build_model(reader, config, torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model


def _step(model, batch, alpha=0.3, l2=1e-3):
    """(error sums, gradient, energies, forces) of the lean step on one rank."""
    grads = lean.GradientBuffer(model)
    grads.flat.fill_(float("nan"))
    weights = torch.tensor([1 - alpha, alpha], dtype=torch.float64)
    totals = lean.compute_gradients(model, batch, alpha, weights, 2 * l2, lambda t: t, grads)
    fwd = lean.forward(model, batch, with_forces=True)
    return totals, grads.flat.clone(), fwd.energy, fwd.forces


def _assert_same_step(model, batch, padded):
    totals, grad, energy, forces = _step(model, batch)
    p_totals, p_grad, p_energy, p_forces = _step(model, padded)
    assert torch.allclose(p_totals, totals, rtol=1e-12, atol=0)
    assert torch.allclose(p_grad, grad, rtol=0, atol=1e-12 * max(1.0, float(grad.abs().max())))
    b, a = batch.num_atoms.numel(), forces.shape[0]
    assert torch.allclose(p_energy[:b], energy, rtol=0, atol=1e-12)
    assert torch.all(p_energy[b:] == 0)  # padded structures have no atoms
    assert torch.allclose(p_forces[:a], forces, rtol=0, atol=1e-12) and forces.abs().max() > 1e-3
    assert torch.all(p_forces[a:] == 0)


@pytest.mark.parametrize("count", [1, 7, 19, 30])
def test_padding_to_a_bucket_changes_nothing(sparse_shard, tmp_path, count):
    store, reader, shard = sparse_shard
    model = _model(reader, store, tmp_path)
    index = torch.randperm(shard.num_structures, generator=torch.Generator().manual_seed(count))[:count]
    batch = gather_batch(shard, index)
    key = bucket_key(batch)
    padded = padded_batch(batch, key)
    # every count rounded up to its bucket, at most +25 % here (small counts) and never below
    assert key.structures == bucket_size(count) and padded.num_atoms.numel() == key.structures
    assert padded.forces.shape[0] == key.atoms >= batch.forces.shape[0]
    for element, rows in zip(batch.G, key.rows):
        assert padded.G[element].shape[0] == rows >= max(1, batch.G[element].shape[0])
        assert padded.deriv[element][2].shape[0] >= (batch.deriv[element][2].shape[0] if element in batch.deriv else 1)
    assert int(padded.structure_count) == count
    assert sum(padded.G[e].shape[0] for e in batch.G) > sum(batch.G[e].shape[0] for e in batch.G)  # rows were padded
    _assert_same_step(model, batch, padded)


def test_refilled_static_batch_forgets_the_larger_batch(sparse_shard, tmp_path):
    """A graph's static tensors hold the last batch: a smaller one must not see the larger one's tail."""
    store, reader, shard = sparse_shard
    model = _model(reader, store, tmp_path)
    large = gather_batch(shard, torch.arange(24))
    small = gather_batch(shard, torch.arange(3, 17, 2))  # a subset: every count fits the large batch's bucket
    key = bucket_key(large)
    static = padded_batch(large, key)
    for batch in (small, large, small):
        fill_static(static, batch, key)
        _assert_same_step(model, batch, static)


def test_batches_share_a_few_buckets_that_hold_them(sparse_shard):
    """Shuffled batches reuse and widen buckets: few graphs, each batch within REUSE of its own cost."""
    _, _, shard = sparse_shard
    generator = torch.Generator().manual_seed(0)
    keys = []
    for _ in range(60):
        batch = gather_batch(shard, torch.randperm(shard.num_structures, generator=generator)[:20])
        key = choose_bucket(batch, keys)
        counts = batch_counts(batch)
        assert key.holds(counts) and key.cost() <= REUSE * counts.cost()
        if key not in keys:
            keys.append(key)
    exact = {bucket_key(gather_batch(shard, torch.randperm(shard.num_structures, generator=generator)[:20])) for _ in range(60)}
    print(f"{len(keys)} buckets shared, {len(exact)} of the batches' own")
    assert len(keys) <= len(exact) // 2, keys  # 60 batches, each of whose 8 counts differ from batch to batch


def test_ddp_local_step_padded_equals_unpadded(sparse_shard, tmp_path):
    """What a rank replays under DDP (G_E, G_F, its error sums) is unchanged by the padding."""
    store, reader, shard = sparse_shard
    model = _model(reader, store, tmp_path)
    lean.share_group_storage(model)
    step = lean.LeanStep(model)
    batch = gather_batch(shard, torch.arange(5, 26, 2))
    sums = step.local_step(batch, 0.3)
    g_e, g_f = step.gradients.flat.clone(), step.force_gradients.flat.clone()
    p_sums = step.local_step(padded_batch(batch), 0.3)
    assert torch.allclose(p_sums, sums, rtol=1e-12, atol=0)
    for padded, plain in ((step.gradients.flat, g_e), (step.force_gradients.flat, g_f)):
        assert torch.allclose(padded, plain, rtol=0, atol=1e-12 * max(1.0, float(plain.abs().max())))


def test_the_capture_check_probe_has_no_references_to_cancel(sparse_shard, tmp_path):
    """The capture check runs the step on the batch's probe: zero references, so its energy errors are the
    predictions (well above rounding however well the model fits); the batch itself is left as it was."""
    store, reader, shard = sparse_shard
    model = _model(reader, store, tmp_path)
    batch = gather_batch(shard, torch.arange(4, 20))
    batch.step_cache = {}
    energy, forces = batch.energy.clone(), batch.forces.clone()
    probe = probe_batch(batch)
    assert torch.all(probe.energy == 0) and torch.all(probe.forces == 0) and probe.step_cache is None
    assert probe.G is batch.G and probe.deriv is batch.deriv  # the same structures, nothing copied
    totals, _, predicted, predicted_forces = _step(model, probe)
    per_atom = predicted / batch.num_atoms
    mask = batch.force_atoms[:, None]
    assert torch.allclose(totals[0], (per_atom**2).sum(), rtol=1e-12)
    assert torch.allclose(totals[2], (torch.where(mask, predicted_forces, 0.0) ** 2).sum(), rtol=1e-12)
    assert torch.equal(batch.energy, energy) and torch.equal(batch.forces, forces) and batch.step_cache == {}
    # padded and refilled, the probe gives the unpadded probe's step (what the check compares)
    key = bucket_key(batch)
    static = padded_batch(batch, key)
    fill_static(static, probe, key)
    assert not _mismatch(list(_step(model, static)[:2]), list(_step(model, probe)[:2]))


def test_capture_check_compares_entry_by_entry():
    """The check of a captured graph: each error sum to its own size, gradients to rounding."""
    sums = torch.tensor([2e-4, 40.0, 3e-2, 900.0])
    grads = torch.tensor([1.0, -2.0, 1e-9, 0.5])
    assert _mismatch([sums * (1 + 1e-6), grads + 1e-7], [sums, grads]) == ""
    assert "output 0" in _mismatch([sums * torch.tensor([1.1, 1, 1, 1]), grads], [sums, grads])  # a wrong sse_E, counts large
    assert "output 1" in _mismatch([sums, grads * 1.01], [sums, grads])
    assert "not finite" in _mismatch([sums, grads.clone().fill_(float("nan"))], [sums, grads])


def test_buckets_of_other_elements_are_not_mixed(sparse_shard):
    _, _, shard = sparse_shard
    batch = gather_batch(shard, torch.arange(6))
    key = bucket_key(batch)
    other = type(key)(key.structures, key.atoms, key.rows, key.deriv_rows, tuple(reversed(key.elements)))
    assert key.holds(batch_counts(batch)) and not other.holds(batch_counts(batch))
    chosen = choose_bucket(batch, [other])  # a new bucket, not the other elements' one
    assert chosen.elements == key.elements and chosen.holds(batch_counts(batch))
    with pytest.raises(ValueError, match="does not fit a bucket"):
        padded_batch(batch, other)


def test_dense_blocks_are_refused(sparse_shard):
    store, reader, _ = sparse_shard
    dense = shard_from_range(reader.read_range(0, reader.num_structures), torch.float64)
    batch = gather_batch(dense, torch.arange(10))
    assert batch.dense
    with pytest.raises(ValueError, match="sparse derivative rows only"):
        bucket_key(batch)


def test_cuda_graphs_setting():
    assert not use_cuda_graphs("auto", torch.device("cpu"))
    assert not use_cuda_graphs("off", torch.device("cuda"))
    assert use_cuda_graphs("auto", torch.device("cuda"))
    with pytest.raises(ValueError, match="run.cuda_graphs='on' needs a CUDA device"):
        use_cuda_graphs("on", torch.device("cpu"))
    with pytest.raises(ValueError, match="run.cuda_graphs"):
        RunConfig(cuda_graphs="always")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no capture can run")
def test_failed_capture_falls_back_to_eager_steps_or_stops(sparse_shard, tmp_path, caplog):
    store, reader, shard = sparse_shard
    model = _model(reader, store, tmp_path)
    grads = lean.GradientBuffer(model)
    weights = torch.tensor([0.7, 0.3], dtype=torch.float64)

    def step(batch):
        return lean.compute_gradients(model, batch, 0.3, weights, 0.0, lambda t: t, grads)

    batch = gather_batch(shard, torch.arange(12))
    expected = step(batch).clone()
    graphed = GraphedStep(step, [grads.flat])
    with caplog.at_level(logging.WARNING, logger="aenet_dist.graphs"):
        assert torch.equal(graphed(batch), expected) and torch.equal(graphed(batch), expected)
    assert not graphed.enabled and graphed.eager_steps == 2 and not graphed.graphs
    assert "training goes on without CUDA graphs" in caplog.text
    with pytest.raises(RuntimeError, match="run.cuda_graphs='on': capturing the step"):
        GraphedStep(step, [grads.flat], strict=True)(batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, cache, batches", [("float64", "gpu", "reshuffle"), ("float32", "gpu", "reshuffle"),
                                                   ("float32", "pinned", "reshuffle"), ("float64", "gpu", "fixed"),
                                                   ("float32", "pinned", "fixed"), ("float64", "stream", "fixed")])
def test_cuda_graph_training_equals_eager(tmp_path, dtype, cache, batches):
    """Three epochs with run.cuda_graphs on and off give the same losses (to atomic-add rounding); with
    the pinned cache a gathering thread pins batches while graphs are captured. data.batches=fixed:
    batches kept on the device (gpu), page-locked on the host (pinned) or on disk (stream)."""
    import json

    from aenet_dist.dist import DistInfo
    from aenet_dist.train import Trainer

    _, store = featurized_emt(tmp_path / "data", 40, seed=2, force_percent=60.0)
    losses = {}
    for mode in ("off", "on"):
        config = config_for(store, tmp_path / mode, run={"epochs": 3, "batch_size": 8, "device": "cuda", "dtype": dtype,
                                                          "cuda_graphs": mode}, data={"cache": cache, "batches": batches})
        trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cuda")))
        trainer.fit()
        # the straggler check's own-work time comes from CUDA events (the host clock would time launches)
        assert 0 < trainer.local_seconds and not trainer.step_events
        if mode == "on":
            assert trainer.graphed.enabled and trainer.graphed.graphs and trainer.graphed.eager_steps == 0
        trainer.close()
        metrics = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [m[key] for m in metrics for key in ("train_rmse_energy_meV_atom", "train_rmse_forces_eV_A", "loss")]
    tol = 1e-4 if dtype == "float32" else 1e-9
    assert losses["on"] == pytest.approx(losses["off"], rel=tol)


def test_cuda_graphs_on_without_a_gpu_is_a_clear_error(sparse_shard, tmp_path):
    from aenet_dist.dist import DistInfo
    from aenet_dist.train import Trainer

    store, _, _ = sparse_shard
    config = config_for(store, tmp_path / "run", run={"cuda_graphs": "on"})
    with pytest.raises(ValueError, match="run.cuda_graphs='on' needs a CUDA device, but this run trains on cpu"):
        Trainer(config, DistInfo(0, 1, 0, torch.device("cpu")))
