"""Shards, epoch plans and cache modes: chunk-aligned cost balance, deterministic plans,
and bitwise-identical training whatever the cache."""

import json


import numpy as np
import pytest
import torch

from aenet_dist.batching import gather_batch, shard_from_range
from aenet_dist.loader import LIVE_MARGIN, BlockSource, choose_cache, epoch_plan, eval_chunks, rank_data, structure_costs
from aenet_dist.store import StoreReader
from aenet_dist.train import main as train_main
from helpers import featurized_emt, run_in_process, write_train_toml


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A skewed store: structures of 1 to ~30 atoms, half of them with derivative rows, many small blocks."""
    return featurized_emt(tmp_path_factory.mktemp("loader"), 120, seed=11, force_percent=50.0, chunk_bytes=2**16)[1]


def test_shards_are_chunk_aligned_and_cost_balanced(store):
    reader = StoreReader(store)
    costs = structure_costs(reader)
    assert costs.max() > 10 * costs.min(), "the data set should be skewed"
    blocks = set(reader.block_first.tolist())
    worse = []
    for shards in (2, 3, 4):
        parts = [rank_data(reader, r, shards, None, 10.0, 0) for r in range(shards)]
        assert parts[0].start == 0 and parts[-1].stop == reader.num_structures
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert all(p.start in blocks and p.stop in blocks for p in parts), "shard bounds must be block bounds"
        load = np.array([costs[p.start : p.stop].sum() for p in parts])
        assert load.max() / load.mean() - 1 < 0.05, (shards, load)
        # ... and a structure count split (not even held to block bounds) is far worse for some shard counts
        even = np.array_split(costs, shards)
        worse.append(max(e.sum() for e in even) > 1.05 * load.max())
    assert any(worse)


def test_plan_is_deterministic_and_covers_the_training_set(store):
    reader = StoreReader(store)
    data = rank_data(reader, 0, 1, 2, 10.0, 0)
    plan = epoch_plan(data, seed=3, epoch=5, steps=7, window_blocks=2)
    again = epoch_plan(data, seed=3, epoch=5, steps=7, window_blocks=2)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))
    everything = np.sort(np.concatenate(plan))
    np.testing.assert_array_equal(everything, np.flatnonzero(data.train_local))
    other = epoch_plan(data, seed=3, epoch=6, steps=7, window_blocks=2)
    assert not all(np.array_equal(a, b) for a, b in zip(plan, other))


def test_steps_get_equal_shares_of_structures_with_and_without_derivatives(store):
    """split_steps: each step's share of a shard holds the same number of structures with derivative
    rows (±1) and without (±1), in the plan's order, so ranks carry about equal work in every step."""
    from aenet_dist.loader import split_steps

    reader = StoreReader(store)
    data = rank_data(reader, 0, 1, None, 10.0, 0)
    assert data.with_rows is not None and data.with_rows.any() and not data.with_rows.all()
    for steps in (1, 3, 7):
        plan = epoch_plan(data, seed=1, epoch=2, steps=steps, window_blocks=2)
        heavy = [int(data.with_rows[p].sum()) for p in plan]
        light = [len(p) - h for p, h in zip(plan, heavy)]
        assert max(heavy) - min(heavy) <= 1 and max(light) - min(light) <= 1, (heavy, light)
    order = np.arange(10)[::-1]
    parts = split_steps(order, np.arange(10) % 3 == 0, 2)
    assert [p.tolist() for p in parts] == [[9, 6, 8, 7, 5], [3, 0, 4, 2, 1]]
    assert [p.tolist() for p in split_steps(order, None, 2)] == [[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]]


def test_choose_cache():
    cpu = torch.device("cpu")
    assert choose_cache("auto", 1e6, cpu)[0] == "memory"
    assert choose_cache("auto", 1e15, cpu)[0] == "stream"
    assert choose_cache("stream", 1e6, cpu) == ("stream", "requested")
    mode, reason = choose_cache("auto", 1e9, cpu, budget_bytes=0.5e9)
    assert mode == "stream" and "memory_budget_gb" in reason
    import psutil
    half = 0.5 * psutil.virtual_memory().available
    assert choose_cache("auto", half, cpu, ranks_on_node=1)[0] == "memory"
    mode, reason = choose_cache("auto", half, cpu, ranks_on_node=4)  # four ranks share the node's memory
    assert mode == "stream" and "4 on this node" in reason
    with pytest.raises(ValueError, match="needs a CUDA device"):
        choose_cache("gpu", 1e6, cpu)


def test_cache_modes_train_identically(store, tmp_path):
    config = write_train_toml(tmp_path / "train.toml", store, tmp_path / "unused", epochs=2, batch_size=16, data_extra="shuffle_window_blocks = 3")
    results = {}
    for mode, workers in (("memory", 0), ("stream", 0), ("pinned", 0), ("stream", 2)):
        run_dir = tmp_path / f"{mode}{workers}"
        result = run_in_process(train_main, [config, f"data.cache={mode}", f"run.run_dir={run_dir}", f"data.workers={workers}"])
        assert result.returncode == 0, result.stderr
        assert f"data.cache={mode} -> {mode}" in result.stderr
        assert ("worker processes read and convert" in result.stderr) == (workers > 0)
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        weights = torch.load(run_dir / "checkpoints" / "checkpoint_000002.pt", weights_only=True)["model"]
        results[mode if not workers else f"{mode} with workers"] = (lines, weights)
    keys = ("train_rmse_energy_meV_atom", "train_rmse_forces_eV_A", "test_rmse_energy_meV_atom", "test_rmse_forces_eV_A")
    for mode in ("stream", "pinned", "stream with workers"):
        for a, b in zip(results["memory"][0], results[mode][0]):
            assert all(a[k] == b[k] for k in keys), (mode, a, b)
        for name, w in results["memory"][1].items():
            assert torch.equal(w, results[mode][1][name]), (mode, name)


def test_plan_command_covers_the_store(store, capsys):
    from aenet_dist.plan import main as plan_main, plan_rows

    reader = StoreReader(store)
    rows = plan_rows(reader, ranks=3, itemsize=4, window_blocks=2, batch_size=16)
    assert sum(r["structures"] for r in rows) == reader.num_structures
    assert sum(r["deriv_rows"] for r in rows) == int(reader.num_deriv_rows.sum())
    assert all(r["host_stream"] < r["host_memory"] for r in rows), "stream must need less host memory than a full cache here"
    assert plan_main([str(store), "--ranks", "3", "--cache", "auto"]) == 0
    out = capsys.readouterr().out
    assert out.count("memory (shard") == 3
    if not torch.cuda.is_available():  # a plan that cannot run says so in its exit code too
        assert plan_main([str(store), "--cache", "gpu"]) == 1
        assert "needs a CUDA device" in capsys.readouterr().out


def assert_batches_equal(a, b):
    for name in ("structure_index", "num_atoms", "energy", "forces", "force_atoms"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.G.keys() == b.G.keys() and a.deriv.keys() == b.deriv.keys() and a.dense.keys() == b.dense.keys()
    for e in a.G:
        assert torch.equal(a.G[e], b.G[e]) and torch.equal(a.atom_structure[e], b.atom_structure[e]), e
    for e in a.deriv:
        assert all(torch.equal(x, y) for x, y in zip(a.deriv[e], b.deriv[e])), e
    for e in a.dense:
        assert len(a.dense[e]) == len(b.dense[e]), e
        for x, y in zip(a.dense[e], b.dense[e]):
            assert torch.equal(x.rows, y.rows) and torch.equal(x.atoms, y.atoms) and torch.equal(x.D, y.D), e


@pytest.mark.parametrize("buckets", [False, True])
def test_block_gathers_equal_whole_shard_gathers(store, buckets):
    """Per-block gathers merged (stream), and gathers from blocks read one by one and joined into
    one shard (memory), == one gather from the whole shard (what the gpu cache does), bit for
    bit, also with dense blocks padded to size buckets."""
    reader = StoreReader(store)
    data = rank_data(reader, 1, 2, None, 20.0, 0)
    whole = shard_from_range(reader.read_range(data.start, data.stop), torch.float64, buckets=buckets)
    everything = np.arange(data.stop - data.start)
    assert whole.elements["Cu"].dense and len(whole.elements["Cu"].deriv_center), "store must have dense and sparse rows"
    if buckets:
        assert any(g.centers is not None for el in whole.elements.values() for g in el.dense), "some group must be padded"
    # the last step is empty, as a rank's is when it has fewer training structures than steps
    plan = epoch_plan(data, seed=1, epoch=0, steps=3, window_blocks=2) + [np.zeros(0, dtype=np.int64)]
    kw = {"buckets": buckets}
    sources = {
        "all": BlockSource(reader, data, everything, torch.float64, resident=True, **kw),
        "test only": BlockSource(reader, data, data.test_local, torch.float64, resident=True, **kw),
        "all, joined": BlockSource(reader, data, everything, torch.float64, resident=True, piece_bytes=3e5, **kw),
        "train streamed": BlockSource(reader, data, np.flatnonzero(data.train_local), torch.float64, resident=False, budget_bytes=1.0, **kw),
    }
    # Resident sources read block by block (or joined pieces of blocks), then keep one shard.
    assert 1 < sources["all, joined"].blocks_read < sources["all"].blocks_read
    assert all(len(sources[name].bounds) == len(sources[name].blocks) == 1 for name in ("all", "all, joined", "test only"))
    for name, source, steps in (("all", sources["all"], plan), ("test only", sources["test only"], eval_chunks(data.test_local, 5)),
                                ("train streamed", sources["train streamed"], plan), ("all, joined", sources["all, joined"], plan)):
        for local_index, batch in zip(steps, source.iterate(steps, with_forces=True), strict=True):
            assert_batches_equal(gather_batch(whole, torch.from_numpy(local_index)), batch)
    with pytest.raises(IndexError, match="not held"):
        next(sources["test only"].iterate(plan, with_forces=True))


def test_stream_stays_within_its_budget_and_reads_each_block_once(store):
    reader = StoreReader(store)
    data = rank_data(reader, 0, 1, None, 10.0, 0)
    plan = epoch_plan(data, seed=0, epoch=0, steps=6, window_blocks=2)
    reference = BlockSource(reader, data, np.arange(data.stop - data.start), torch.float32, resident=True)
    expected = list(reference.iterate(plan, with_forces=True))
    probe = BlockSource(reader, data, np.flatnonzero(data.train_local), torch.float32, resident=False)
    need = float(probe.live_bytes(plan).max())
    assert need < 0.5 * probe.block_bytes.sum(), "the plan should need far less than the shard"
    for budget in (need, 3 * need, np.inf):
        source = BlockSource(reader, data, np.flatnonzero(data.train_local), torch.float32, resident=False, budget_bytes=budget)
        if budget >= LIVE_MARGIN * need:
            source.check_budget(plan, "epoch")
        for a, b in zip(expected, source.iterate(plan, with_forces=True), strict=True):
            assert_batches_equal(a, b)
        assert source.peak_held_bytes <= budget
        assert source.blocks_read == len(source.bounds)
    small = BlockSource(reader, data, np.flatnonzero(data.train_local), torch.float32, resident=False, budget_bytes=0.9 * LIVE_MARGIN * need)
    with pytest.raises(ValueError, match=r"step \d+ of the epoch 1 needs .*memory_budget_gb"):
        small.check_budget(plan, "epoch 1")
    small.check_budget(plan, "epoch 2", strict=False)  # later epochs warn and go on


def test_stream_budget_too_small_for_queued_batches_is_refused(store, tmp_path):
    config = write_train_toml(tmp_path / "train.toml", store, tmp_path / "run", epochs=1, batch_size=16)
    result = run_in_process(train_main, [config, "data.cache=stream", "data.memory_budget_gb=1e-5"])
    assert result.returncode != 0 and "data.memory_budget_gb" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_eval_chunks_respect_count_and_bytes():
    indices = np.arange(3, 40)
    sizes = np.where(np.arange(50) % 7 == 0, 100.0, 1.0)
    chunks = eval_chunks(indices, 8, sizes, max_bytes=110.0)
    np.testing.assert_array_equal(np.concatenate(chunks), indices)
    assert all(len(c) <= 8 and (sizes[c].sum() <= 110.0 or len(c) == 1) for c in chunks)
    assert len(eval_chunks(indices, 8)) == 5 and eval_chunks(indices[:0], 8) == []
    assert [len(c) for c in eval_chunks(indices, 8, sizes, max_bytes=50.0)].count(1) >= 5  # a big structure stands alone


def test_plan_smallest_stream_budget_is_what_training_accepts(store, tmp_path):
    from aenet_dist.plan import plan_rows

    GiB = 2**30
    need = plan_rows(StoreReader(store), ranks=1, itemsize=8, window_blocks=3, batch_size=16, test_percent=20.0, readers=2)[0]["host_stream"]
    config = write_train_toml(tmp_path / "train.toml", store, tmp_path / "unused", epochs=1, batch_size=16,
                              data_extra="shuffle_window_blocks = 3\nreaders = 2")
    config = [config, "data.cache=stream"]
    ok = run_in_process(train_main, [*config, f"data.memory_budget_gb={1.001 * need / GiB}", f"run.run_dir={tmp_path / 'ok'}"])
    assert ok.returncode == 0, ok.stderr
    low = run_in_process(train_main, [*config, f"data.memory_budget_gb={0.95 * need / GiB}", f"run.run_dir={tmp_path / 'low'}"])
    assert low.returncode == 2 and "data.memory_budget_gb" in low.stderr, low.stderr


def test_split_is_stratified_by_force_labels():
    from aenet_dist.loader import split_test

    has_derivs = np.zeros(1000, dtype=bool)
    # featurize picks its force structures with this very permutation (FORCESPERCENT 20, seed 0)
    has_derivs[np.random.default_rng(0).permutation(1000)[:200]] = True
    test = split_test(has_derivs, 10.0, 0)
    assert test.sum() == 100 and (test & has_derivs).sum() == 20, "10 % of each group"
    assert not np.array_equal(test, split_test(has_derivs, 10.0, 1))
    np.testing.assert_array_equal(test, split_test(has_derivs, 10.0, 0))


def test_stream_keeps_the_test_set_only_beside_the_blocks_a_step_needs(store, tmp_path):
    """At the plan's smallest budget the test set must not crowd out the blocks (it is streamed)."""
    from aenet_dist.plan import plan_rows

    rows = plan_rows(StoreReader(store), ranks=1, itemsize=8, window_blocks=3, batch_size=16, test_percent=20.0, readers=2)[0]
    config = write_train_toml(tmp_path / "train.toml", store, tmp_path / "unused", epochs=1, batch_size=16,
                              data_extra="shuffle_window_blocks = 3\nreaders = 2")
    for budget in (rows["host_stream"] * 1.001, rows["host_stream"] + 3 * rows["test_bytes"]):
        result = run_in_process(train_main, [config, "data.cache=stream", f"data.memory_budget_gb={budget / 2**30}",
                                             f"run.run_dir={tmp_path / str(budget)}"])
        assert result.returncode == 0, result.stderr
    assert "streamed too" in run_in_process(train_main, [config, "data.cache=stream", f"data.memory_budget_gb={rows['host_stream'] * 1.001 / 2**30}",
                                                         f"run.run_dir={tmp_path / 'again'}"]).stderr
    assert "kept in memory" in result.stderr


@pytest.fixture(scope="module")
def block_workers():
    from aenet_dist.block_loading import BlockWorkers

    workers = BlockWorkers(2)
    yield workers
    workers.close()


@pytest.mark.parametrize("buckets", [False, True])
def test_worker_processes_give_the_batches_of_in_process_loading(store, block_workers, buckets):
    """data.workers: blocks converted in worker processes and handed over through shared memory
    give bit for bit the batches of the rank's own reader threads, resident and streamed."""
    reader = StoreReader(store)
    data = rank_data(reader, 0, 1, None, 20.0, 0)
    plan = epoch_plan(data, seed=2, epoch=1, steps=4, window_blocks=2)
    train = np.flatnonzero(data.train_local)
    used = np.random.default_rng(0).random(reader.num_structures) < 0.5  # data.force_percent drops rows in the worker too
    for kw in ({"resident": True, "piece_bytes": 3e5}, {"resident": False, "budget_bytes": 1.0}):
        threads = BlockSource(reader, data, train, torch.float32, buckets=buckets, derivs_used=used, **kw)
        processes = BlockSource(reader, data, train, torch.float32, buckets=buckets, derivs_used=used, workers=block_workers, **kw)
        for a, b in zip(threads.iterate(plan, with_forces=True), processes.iterate(plan, with_forces=True), strict=True):
            assert_batches_equal(a, b)
        assert processes.blocks_read == threads.blocks_read > 1  # each block (or piece) read once, either way


def test_pack_unpack_round_trip_is_views_of_one_buffer():
    from aenet_dist.block_loading import pack, unpack

    shard = shard_from_range(_tiny_range(), torch.float64)
    buffer, layout = pack(shard)
    again = unpack(buffer, layout)
    assert buffer.is_shared()
    for name in ("store_index", "num_atoms", "atom_offset", "energy", "has_derivs", "forces"):
        a, b = getattr(shard, name), getattr(again, name)
        assert torch.equal(a, b) and a.dtype == b.dtype and b.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    for e, el in shard.elements.items():
        assert torch.equal(el.dG, again.elements[e].dG) and len(el.dense) == len(again.elements[e].dense)


def _tiny_range():
    """Two structures of 2 and 1 atoms, one element with 2 features, all rows sparse."""
    from aenet_dist.store import ElementRows, StructureRange

    rows = ElementRows(atom=np.arange(3), G=np.arange(6.0).reshape(3, 2), deriv_center=np.array([0, 0, 1, 2]),
                       deriv_neighbor=np.array([0, 1, 1, 2]), dG=np.arange(24.0).reshape(4, 2, 3))
    return StructureRange(0, 2, np.array([2, 1]), np.array([-1.0, -2.0]), np.array([-0.5, -1.5]), np.array([True, True]),
                          np.zeros(3, dtype=np.int64), np.zeros((3, 3)), np.ones((3, 3)), {"Cu": rows})


def test_a_killed_worker_ends_the_read_with_a_message(store):
    """kill -9 of a data worker: the rank's next wait for a block raises WorkerDied (no hang)."""
    import os
    import signal

    from aenet_dist.block_loading import BlockWorkers, WorkerDied

    reader = StoreReader(store)
    data = rank_data(reader, 0, 1, None, 20.0, 0)
    plan = epoch_plan(data, seed=0, epoch=0, steps=4, window_blocks=2)
    workers = BlockWorkers(1)
    try:
        source = BlockSource(reader, data, np.flatnonzero(data.train_local), torch.float32, resident=False, budget_bytes=1.0, workers=workers)
        batches = source.iterate(plan, with_forces=True)
        next(batches)
        for pid in workers.pids():
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied, match="data worker process of this rank died"):
            for _ in batches:
                pass
    finally:
        workers.close()


def test_float32_derivative_storage_trains_float32_bit_for_bit(store, tmp_path):
    """`featurize --deriv-dtype float32` rounds dG/dR once when writing, exactly as a float32 run
    rounds a float64 store's dG/dR when reading: float32 training (memory and stream) gives the
    same metrics and weights bit for bit, from a store half the size to read."""
    from aenet_dist.config import StoreOptions
    from aenet_dist.formats.generate_in import read_generate_input
    from aenet_dist.store import featurize_to_store

    generate_in = store.parent / "data" / "generate.in"
    small = tmp_path / "f32.zarr"
    featurize_to_store(read_generate_input(generate_in), small, StoreOptions(chunk_bytes=2**16, deriv_dtype="float32"), progress=False)
    assert StoreReader(small).attrs["deriv_dtype"] == "float32"
    config = write_train_toml(tmp_path / "train.toml", store, tmp_path / "unused", epochs=2, batch_size=16)
    results = {}
    for name, path in (("float64 store", store), ("float32 store", small)):
        for mode in ("memory", "stream"):
            run_dir = tmp_path / f"{name}-{mode}".replace(" ", "_")
            result = run_in_process(train_main, [config, f"data.store={path}", f"data.cache={mode}", "run.dtype=float32",
                                                 f"run.run_dir={run_dir}", "data.workers=0"])
            assert result.returncode == 0, result.stderr
            weights = torch.load(run_dir / "checkpoints" / "checkpoint_000002.pt", weights_only=True)["model"]
            results[name, mode] = ([json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()], weights)
    keys = ("train_rmse_energy_meV_atom", "train_rmse_forces_eV_A", "test_rmse_energy_meV_atom", "test_rmse_forces_eV_A")
    reference_lines, reference_weights = results["float64 store", "memory"]
    for key, (lines, weights) in results.items():
        assert [[m[k] for k in keys] for m in lines] == [[m[k] for k in keys] for m in reference_lines], key
        assert all(torch.equal(w, reference_weights[n]) for n, w in weights.items()), key


def test_reader_threads_leave_the_training_thread_its_core(monkeypatch):
    """data.readers auto: 2 to load a resident cache; for stream the cores beyond the rank's
    training thread, 1 or 2; an explicit value wins."""
    import aenet_dist.loader as loader

    for cores, ranks, expected in ((2, 1, 1), (1, 1, 1), (4, 1, 2), (16, 8, 1), (16, 1, 2), (2, 2, 1)):
        monkeypatch.setattr(loader, "usable_cores", lambda: cores)
        monkeypatch.setattr(loader, "local_ranks", lambda: ranks)
        assert loader.reader_threads(None, "stream") == expected, (cores, ranks)
        assert loader.reader_threads(None, "memory") == 2
        assert loader.reader_threads(3, "stream") == 3
