"""The lean training step (aenet_dist.step) equals autograd's double backward, in float64.

Energies, forces, the loss and every parameter gradient agree to 1e-10 for all five aenet
activations, 1-3 hidden layers, sparse rows and dense blocks, an element absent from a
batch, and α = 0, 0.3, 1.
"""

import pytest
import torch

from aenet_dist import step as lean
from aenet_dist.batching import gather_batch, shard_from_range
from aenet_dist.loss import adjoints, error_sums, global_loss, loss_coefficients, loss_of_totals
from aenet_dist.model import NetworkConfig, activate, activate_with_derivatives
from aenet_dist.store import StoreReader
from aenet_dist.train import build_model
from helpers import featurized_emt, predict

from test_train import config_for

ACTIVATIONS = ("linear", "tanh", "sigmoid", "mtanh", "twist")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Dense and all-sparse float64 shards of a small EMT store (two elements, half with forces)."""
    _, store = featurized_emt(tmp_path_factory.mktemp("lean"), 24, seed=11, force_percent=60.0)
    reader = StoreReader(store)
    data = reader.read_range(0, reader.num_structures)
    return store, reader, shard_from_range(data, torch.float64), shard_from_range(data, torch.float64, dense_blocks=False)


def _model(reader, store, tmp_path, hidden, activations, seed=0):
    torch.manual_seed(seed)
    config = config_for(store, tmp_path, model={"hidden": list(hidden), "activations": list(activations)})
    model = build_model(reader, config, torch.float64)
    with torch.no_grad():  # larger weights than the default init, so that every activation bends
        for p in model.parameters():
            p.mul_(3.0)
    return model


def _reference(model, batch, alpha, l2):
    """Autograd: predict with create_graph, the surrogate of loss.global_loss, backward."""
    for p in model.parameters():
        p.grad = None
    energy, forces = predict(model, batch, with_forces=True, create_graph=True)
    sums = error_sums(batch, energy, forces)
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    penalty = l2 * sum((w * w).sum() for w in weights) if l2 else None
    surrogate, value = global_loss(sums, alpha, lambda t: t, penalty)
    surrogate.backward()
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in model.named_parameters()}
    loss = value.loss - (penalty.detach() if penalty is not None else 0)
    return energy.detach(), forces.detach(), loss.detach(), grads


def _lean(model, batch, alpha, l2):
    fwd = lean.forward(model, batch, with_forces=True)
    sums = error_sums(batch, fwd.energy, fwd.forces)
    totals = sums.detached()
    energy_adjoint, force_adjoint = adjoints(sums, loss_coefficients(totals, alpha))
    grads = lean.GradientBuffer(model)
    grads.flat.fill_(float("nan"))  # every entry must be written
    lean.backward(model, fwd, batch, energy_adjoint, force_adjoint if alpha > 0 else None, 2 * l2, grads)
    named = {name: p.grad.clone() for name, p in model.named_parameters()}
    return fwd.energy, fwd.forces, loss_of_totals(totals, alpha), named


def _compare(model, batch, alpha, l2=0.0):
    e_ref, f_ref, loss_ref, g_ref = _reference(model, batch, alpha, l2)
    e, f, loss, g = _lean(model, batch, alpha, l2)
    assert torch.allclose(e, e_ref, rtol=0, atol=1e-10)
    assert torch.allclose(f, f_ref, rtol=0, atol=1e-10) and f.abs().max() > 1e-3
    assert torch.allclose(loss, loss_ref, rtol=1e-12, atol=0)
    assert set(g) == set(g_ref)
    for name in g_ref:
        scale = max(1.0, float(g_ref[name].abs().max()))
        assert torch.allclose(g[name], g_ref[name], rtol=0, atol=1e-10 * scale), name
    return g


def test_activation_derivatives_match_autograd():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64, requires_grad=True)
    for name in ACTIVATIONS:
        y, slope, curvature = activate_with_derivatives(x.detach(), name)
        ref = activate(x, name)
        d1 = torch.autograd.grad(ref.sum(), x, create_graph=True)[0]
        d2 = torch.autograd.grad(d1.sum(), x, allow_unused=True)[0] if d1.requires_grad else None
        assert torch.equal(y, ref.detach()), name  # bitwise: the same formula as the model's
        assert torch.allclose(torch.ones_like(x) if slope is None else slope, d1.detach(), rtol=0, atol=1e-14), name
        d2 = torch.zeros_like(x) if d2 is None else d2
        assert torch.allclose(torch.zeros_like(x) if curvature is None else curvature, d2, rtol=0, atol=1e-14), name


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_lean_step_equals_autograd(shards, tmp_path, activation, depth):
    store, reader, dense, sparse = shards
    hidden = [5, 4, 3][:depth]
    model = _model(reader, store, tmp_path, hidden, [activation] * depth, seed=depth)
    index = torch.tensor([3, 17, 1, 8, 22, 5, 14, 0, 2, 11])
    for shard in (dense, sparse):
        batch = gather_batch(shard, index)
        # dense blocks (structure 22 misses 11 % of its atom pairs: zeros) beside sparse rows (structure 2: 68 %), then rows only
        assert (shard is dense) == bool(batch.dense) and batch.deriv
        assert all(0 < batch.force_rows[el] < batch.G[el].shape[0] for el in batch.G)  # the force work on leading rows
        _compare(model, batch, 0.3, l2=1e-3)


@pytest.mark.parametrize("buckets", [False, True])
def test_torch_products_equal_autograd_too(shards, tmp_path, monkeypatch, buckets):
    """The contractions' torch products (what a GPU runs; on a CPU numpy's do them) equal autograd as well."""
    store, reader, _, sparse = shards
    shard = shard_from_range(reader.read_range(0, reader.num_structures), torch.float64, buckets=buckets)
    model = _model(reader, store, tmp_path, [5, 4], ["tanh", "twist"], seed=5)
    monkeypatch.setattr(lean, "HOST_PRODUCTS", False)
    index = torch.tensor([3, 17, 1, 8, 22, 5, 14, 0, 2, 11])
    for source in (shard, sparse):
        _compare(model, gather_batch(source, index), 0.3, l2=1e-3)


def test_several_torch_threads_use_torch_products(shards, tmp_path):
    """With run.cpu_threads > 1 the products are torch's (threaded); they equal numpy's to rounding."""
    store, reader, dense, sparse = shards
    model = _model(reader, store, tmp_path, [5, 4], ["tanh", "sigmoid"], seed=6)
    index = torch.tensor([3, 17, 1, 8, 22, 5, 14, 0, 2, 11])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert lean._on_host(dense.energy)
        one = [_lean(model, gather_batch(source, index), 0.3, 1e-3) for source in (dense, sparse)]
        torch.set_num_threads(2)
        assert not lean._on_host(dense.energy)
        two = [_lean(model, gather_batch(source, index), 0.3, 1e-3) for source in (dense, sparse)]
    finally:
        torch.set_num_threads(threads)
    for (e1, f1, l1, g1), (e2, f2, l2, g2) in zip(one, two):
        assert torch.allclose(e1, e2, rtol=0, atol=1e-12) and torch.allclose(f1, f2, rtol=0, atol=1e-12)
        for name in g1:
            assert torch.allclose(g1[name], g2[name], rtol=0, atol=1e-12 * max(1.0, float(g1[name].abs().max()))), name


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_lean_step_force_weight_limits(shards, tmp_path, alpha):
    store, reader, dense, _ = shards
    model = _model(reader, store, tmp_path, [6, 5], ["tanh", "twist"], seed=4)
    batch = gather_batch(dense, torch.arange(12))
    _compare(model, batch, alpha)


def test_lean_step_mixed_activations_and_output(shards, tmp_path):
    """Different activations per layer, a non-linear output node (a .nn file may have one), and
    networks of different shapes per element (groups of one: no padding)."""
    store, reader, dense, sparse = shards
    torch.manual_seed(7)
    from aenet_dist.model import AtomicModel, ElementNet

    base = build_model(reader, config_for(store, tmp_path), torch.float64)
    shapes = [NetworkConfig((4, 6), ("sigmoid", "mtanh"), "tanh"), NetworkConfig((3,), ("twist",), "linear")]
    configs = {el: shapes[min(k, 1)] for k, el in enumerate(reader.species)}  # the first alone, the others packed
    model = AtomicModel({el: ElementNet(reader.attrs["num_features"][el], configs[el], el, dtype=torch.float64) for el in reader.species},
                        reader.species)
    assert len(lean.network_groups(model)) == 2
    for el, net in model.nets.items():  # keep the store's normalization
        ref = base.nets[el]
        net.set_feature_stats(ref.sfval_min, ref.sfval_max, ref.sfval_avg, ref.sfval_cov, int(ref.neval))
        net.set_energy_scaling(float(ref.scale), float(ref.shift), float(ref.e_atom))
    index = torch.tensor([2, 9, 13, 4, 21])
    _compare(model, gather_batch(dense, index), 0.5, l2=1e-2)
    _compare(model, gather_batch(sparse, index), 0.5)


def test_lean_step_element_absent_from_batch(shards, tmp_path):
    store, reader, dense, _ = shards
    model = _model(reader, store, tmp_path, [5, 5], ["tanh", "tanh"])
    species = reader.species
    counts = {el: (el_shard.row_offset[1:] - el_shard.row_offset[:-1]) for el, el_shard in dense.elements.items()}
    absent = species[0]  # structures without this element, with forces
    single = [s for s in range(dense.num_structures) if int(counts[absent][s]) == 0 and bool(dense.has_derivs[s])]
    assert single, "the EMT set has structures without its first element"
    batch = gather_batch(dense, torch.tensor(single[:4]))
    missing = [el for el in species if batch.G[el].shape[0] == 0]
    assert missing
    g = _compare(model, batch, 0.3, l2=1e-3)
    # The absent element's gradient is the weight penalty's alone.
    for name, value in g.items():
        if f".{missing[0]}." in name and name.endswith("bias"):
            assert torch.all(value == 0)


def test_bucket_sizes_cover_every_count_within_20_percent():
    from aenet_dist.batching import bucket_size

    previous = 0
    for n in range(1, 2000):
        b = bucket_size(n)
        assert b >= n and b >= previous
        assert b <= max(n + 1, 1.2 * n + 1e-9) or n <= 4, (n, b)
        previous = b
    assert len({bucket_size(n) for n in range(1, 129)}) == 27  # a batch of any sizes up to 128 atoms: <= 27 groups


def test_size_buckets_change_nothing_but_the_number_of_products(shards, tmp_path):
    """Dense blocks padded to size buckets give the same energies, forces, loss and gradients
    (float64, 1e-12) with fewer batched products."""
    store, reader, dense, _ = shards
    data = reader.read_range(0, reader.num_structures)
    bucketed = shard_from_range(data, torch.float64, buckets=True)
    assert any(g.centers is not None for el in bucketed.elements.values() for g in el.dense)
    model = _model(reader, store, tmp_path, [5, 4], ["tanh", "sigmoid"], seed=3)
    index = torch.arange(reader.num_structures)
    plain_batch, bucket_batch = gather_batch(dense, index), gather_batch(bucketed, index)
    assert sum(map(len, bucket_batch.dense.values())) <= sum(map(len, plain_batch.dense.values()))
    padded = [b for blocks in bucket_batch.dense.values() for b in blocks if (b.D.abs().sum(dim=(0, 2)) == 0).any()]
    assert padded, "some block must carry padding rows"
    e1, f1, l1, g1 = _lean(model, plain_batch, 0.3, 1e-3)
    e2, f2, l2, g2 = _lean(model, bucket_batch, 0.3, 1e-3)
    assert torch.allclose(e1, e2, rtol=0, atol=1e-12) and torch.allclose(f1, f2, rtol=0, atol=1e-12)
    assert torch.allclose(l1, l2, rtol=1e-13, atol=0)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=0, atol=1e-12 * max(1.0, float(g1[name].abs().max()))), name


@pytest.mark.gpu
@pytest.mark.parametrize("buckets", [False, True])
def test_lean_step_on_cuda_equals_cpu(shards, tmp_path, buckets):
    """The same step on a CUDA device: energies, forces, loss and gradients as on the CPU (float64)."""
    store, reader, _, _ = shards
    shard = shard_from_range(reader.read_range(0, reader.num_structures), torch.float64, buckets=buckets)
    model = _model(reader, store, tmp_path, [5, 4], ["tanh", "twist"], seed=5)
    batch = gather_batch(shard, torch.arange(reader.num_structures))
    e_cpu, f_cpu, l_cpu, g_cpu = _lean(model, batch, 0.3, 1e-3)
    model_gpu = model.to("cuda")
    e_gpu, f_gpu, l_gpu, g_gpu = _lean(model_gpu, batch.to("cuda"), 0.3, 1e-3)
    assert torch.allclose(e_gpu.cpu(), e_cpu, rtol=0, atol=1e-10) and torch.allclose(f_gpu.cpu(), f_cpu, rtol=0, atol=1e-10)
    assert torch.allclose(l_gpu.cpu(), l_cpu, rtol=1e-12, atol=0)
    for name in g_cpu:
        assert torch.allclose(g_gpu[name].cpu(), g_cpu[name], rtol=0, atol=1e-10 * max(1.0, float(g_cpu[name].abs().max()))), name


def test_shared_group_storage_changes_nothing_and_follows_updates(shards, tmp_path):
    """share_group_storage: the step reads stacked views of the parameters. Same bits as stacking
    them each step; an optimizer's and load_state_dict's in-place writes are seen; a model whose
    tensors were replaced (``model.to``) falls back to stacking instead of reading stale stacks."""
    store, reader, dense, _ = shards
    batch = gather_batch(dense, torch.arange(dense.num_structures))
    plain = _model(reader, store, tmp_path, [5, 4], ["tanh", "twist"])
    shared = _model(reader, store, tmp_path, [5, 4], ["tanh", "twist"])
    state = {k: v.clone() for k, v in shared.state_dict().items()}
    lean.share_group_storage(shared)
    assert all(torch.equal(v, state[k]) for k, v in shared.state_dict().items())  # values unchanged
    assert shared.lean_groups and all(g.intact() for g in shared.lean_groups.values())
    for a, b in zip(_lean(plain, batch, 0.3, 1e-3), _lean(shared, batch, 0.3, 1e-3)):
        if isinstance(a, dict):
            assert all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(a, b)
    # An optimizer step (in place) on both: the stacks follow, results stay bitwise equal.
    for model in (plain, shared):
        _, _, _, grads = _lean(model, batch, 0.3, 1e-3)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for name, p in model.named_parameters():
            p.grad = grads[name]
        optimizer.step()
    assert torch.equal(_lean(plain, batch, 0.3, 0.0)[1], _lean(shared, batch, 0.3, 0.0)[1])
    shared.load_state_dict(state)  # in place, into the stacks
    plain.load_state_dict(state)
    assert torch.equal(_lean(plain, batch, 0.3, 0.0)[0], _lean(shared, batch, 0.3, 0.0)[0])
    # Tensors replaced behind the stacks' back: the step stacks the current ones.
    with torch.no_grad():
        first = next(iter(shared.nets.values())).layers[0]
        first.weight = torch.nn.Parameter(first.weight * 2)
    assert not all(g.intact() for g in shared.lean_groups.values())
    with torch.no_grad():
        next(iter(plain.nets.values())).layers[0].weight.mul_(2)
    assert torch.equal(_lean(plain, batch, 0.3, 0.0)[1], _lean(shared, batch, 0.3, 0.0)[1])


def test_force_work_on_leading_rows_and_kept_rows_change_nothing(shards, tmp_path):
    """The force work on the leading rows (Batch.force_rows) gives what it gives on every row (1e-12),
    and a batch that keeps its padded rows (Batch.step_cache) gives the same bits step after step,
    making them anew when the model's avg changes (load_state_dict writes it in place)."""
    store, reader, dense, _ = shards
    model = _model(reader, store, tmp_path, [5, 4], ["tanh", "sigmoid"])
    lean.share_group_storage(model)
    batch = gather_batch(dense, torch.tensor([3, 17, 1, 8, 22, 5, 14, 0, 2, 11]))
    assert all(batch.force_rows[el] < batch.G[el].shape[0] for el in batch.G)
    leading = _lean(model, batch, 0.3, 1e-3)
    batch.force_rows = None  # the same rows, the force work on all of them
    everywhere = _lean(model, batch, 0.3, 1e-3)
    for a, b in zip(leading, everywhere):
        for k in (a if isinstance(a, dict) else [None]):
            x, y = (a[k], b[k]) if k is not None else (a, b)
            assert torch.allclose(x, y, rtol=0, atol=1e-12 * max(1.0, float(y.abs().max())))
    batch = gather_batch(dense, torch.tensor([3, 17, 1, 8, 22, 5, 14, 0, 2, 11]))
    plain = _lean(model, batch, 0.3, 1e-3)
    batch.step_cache = {}
    for _ in range(2):
        kept = _lean(model, batch, 0.3, 1e-3)
        assert sum(key[0] == "group rows" for key in batch.step_cache) == 1  # one group's rows (and small buffers)
        assert torch.equal(kept[0], plain[0]) and torch.equal(kept[1], plain[1])
        assert all(torch.equal(kept[3][k], plain[3][k]) for k in plain[3])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in state:
        if name.endswith(".avg"):
            state[name] += 0.5
    model.load_state_dict(state)
    changed = _lean(model, batch, 0.3, 1e-3)
    assert sum(key[0] == "group rows" for key in batch.step_cache) == 1  # made anew in place of the older avg's
    batch.step_cache = None
    assert torch.equal(changed[0], _lean(model, batch, 0.3, 1e-3)[0]) and not torch.equal(changed[0], plain[0])


def test_kept_rows_follow_an_unshared_model_and_a_changed_batch(shards, tmp_path):
    """A model whose stacks are made anew each step (no share_group_storage) keeps nothing, so an avg
    changed in place is seen; a replaced G is seen too; sparse rows keep no contraction buffers
    (they would be a third of the batch's dG/dR), dense blocks keep theirs."""
    store, reader, dense, sparse = shards
    index = torch.tensor([3, 17, 1, 8, 22, 5, 14, 0, 2, 11])
    model = _model(reader, store, tmp_path, [5, 4], ["tanh", "tanh"])
    batch = gather_batch(dense, index)
    batch.step_cache = {}
    first = _lean(model, batch, 0.3, 0.0)[0]
    with torch.no_grad():
        next(iter(model.nets.values())).avg.add_(0.25)
    fresh = gather_batch(dense, index)
    assert torch.equal(_lean(model, batch, 0.3, 0.0)[0], _lean(model, fresh, 0.3, 0.0)[0])
    assert not torch.equal(first, _lean(model, fresh, 0.3, 0.0)[0])
    lean.share_group_storage(model)
    kept = _lean(model, batch, 0.3, 0.0)[0]
    element = next(el for el, g in batch.G.items() if g.shape[0])
    batch.G = {**batch.G, element: batch.G[element] * 1.01}  # replaced, not changed in place
    fresh.G = {**fresh.G, element: fresh.G[element] * 1.01}
    assert torch.equal(_lean(model, batch, 0.3, 0.0)[0], _lean(model, fresh, 0.3, 0.0)[0])
    assert not torch.equal(kept, _lean(model, fresh, 0.3, 0.0)[0])
    assert any(key[0] == "forces" for key in batch.step_cache)  # dense: small buffers kept
    rows_only = gather_batch(sparse, index)
    rows_only.step_cache = {}
    _lean(model, rows_only, 0.3, 0.0)
    _lean(model, rows_only, 0.3, 0.0)
    kept_keys = {key[0] for key in rows_only.step_cache}
    assert "dE_dG rows" not in kept_keys and "dE_dG adjoint rows" not in kept_keys and "group rows" in kept_keys


@pytest.mark.parametrize("dense", [True, False])
def test_the_device_path_runs_on_the_meta_device_without_host_reads(shards, tmp_path, dense):
    """What a GPU runs, run on PyTorch's ``meta`` device, which has no values: a read back to the host
    (.item(), bool(), .tolist(), nonzero: a wait for a GPU) raises, and so does mixing in a CPU tensor.
    The gather from a shard on the device, the step on a gathered and on a kept batch (twice: the
    second reads what it kept), DDP's local step, the evaluation and a batch padded for a CUDA graph."""
    from aenet_dist.graphs import bucket_key, fill_static, padded_batch, probe_batch
    from aenet_dist.train import _kept

    store, reader, dense_shard, sparse_shard = shards
    meta = torch.device("meta")
    model = _model(reader, store, tmp_path, [6, 5], ["tanh", "twist"]).to(meta)
    lean.share_group_storage(model)
    grads = lean.GradientBuffer(model)
    weights = torch.tensor([0.7, 0.3], dtype=torch.float64, device=meta)
    shard = (dense_shard if dense else sparse_shard).to(meta)
    batch = gather_batch(shard, torch.arange(3, 20))
    assert bool(batch.dense) == dense
    sums = lean.compute_gradients(model, batch, 0.3, weights, 1e-3, lambda t: t, grads)
    assert sums.device == meta and sums.shape == (4,)
    kept = _kept(gather_batch(shard, torch.arange(0, 12)))
    for _ in range(2):
        lean.compute_gradients(model, kept, 0.3, weights, 1e-3, lambda t: t, grads)
    cached = [t for entry in kept.step_cache.values() for t in (entry if isinstance(entry, (tuple, list)) else [entry])
              if isinstance(t, torch.Tensor)]
    assert cached and all(t.device == meta for t in cached)
    assert lean.LeanStep(model).local_step(batch, 0.3).shape == (4,)
    fwd = lean.forward(model, batch, with_forces=True, for_training=False)
    assert error_sums(batch, fwd.energy, fwd.forces).detached().device == meta
    if not dense:  # CUDA graphs take all-sparse shards
        key = bucket_key(batch)
        static = padded_batch(batch, key)
        lean.compute_gradients(model, static, 0.3, weights, 1e-3, lambda t: t, grads)
        fill_static(static, probe_batch(batch), key)
