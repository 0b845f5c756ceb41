"""torch.distributed plumbing (aenet_dist.dist): a plain process is a world of one whose
collectives hand values back unchanged; two gloo ranks (one spawn) sum tensors, gather
objects in rank order, broadcast from a chosen rank, and sum (not average) DDP gradients.

Training with 2 ranks, a killed rank and the collective timeout are in test_train.py.
"""

import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from aenet_dist import dist


def test_a_plain_process_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = dist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert info.is_main and not info.distributed
    assert not torch.distributed.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t, info) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_gather_objects({"a": 1}, info) == [{"a": 1}]
    assert dist.broadcast_object("x", info) == "x"
    dist.barrier(info)
    dist.cleanup(info)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_a_device_is_refused():
    for request in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="no CUDA device is available"):
            dist.choose_device(request, 0)
    assert dist.choose_device("auto", 3) == torch.device("cpu")


def _rank(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks: run each collective and save what it returned."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    info = dist.init_distributed("cpu", timeout_s=60)
    try:
        summed = dist.all_reduce_sum(torch.tensor([1.0, 10.0]) * (rank + 1), info)
        gathered = dist.all_gather_objects({"rank": rank, "items": list(range(rank + 2))}, info)
        from_0 = dist.broadcast_object(f"from rank {rank}", info)
        from_1 = dist.broadcast_object({"value": rank * 7}, info, src=1)
        torch.manual_seed(0)  # equal initial weights (DDP broadcasts rank 0's anyway)
        ddp = dist.wrap_ddp(torch.nn.Linear(3, 1, bias=False).double(), info)
        x = torch.arange(6, dtype=torch.float64).view(2, 3) * (rank + 1)  # rank 1's input: twice rank 0's
        ddp(x).sum().backward()
        grad = ddp.module.weight.grad.clone()
        dist.barrier(info)
        torch.save({"info": (info.rank, info.world_size, info.is_main, info.distributed), "summed": summed,
                    "gathered": gathered, "from_0": from_0, "from_1": from_1, "grad": grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.cleanup(info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_gloo_ranks_sum_gather_broadcast_and_sum_gradients(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    x0 = torch.arange(6, dtype=torch.float64).view(2, 3)
    for rank, res in enumerate(results):
        assert res["info"] == (rank, 2, rank == 0, True)
        assert res["summed"].tolist() == [3.0, 30.0]  # 1·[1, 10] + 2·[1, 10]
        assert res["gathered"] == [{"rank": 0, "items": [0, 1]}, {"rank": 1, "items": [0, 1, 2]}]
        assert res["from_0"] == "from rank 0" and res["from_1"] == {"value": 7}
        # d/dw of Σ x·w is Σ x over rows; summed over ranks: (1 + 2)·Σ x0, where DDP's default would average.
        assert torch.equal(res["grad"], 3 * x0.sum(0, keepdim=True))


def _host_sum_rank(rank: int, world: int, port: int, out_dir: str, leave_early: bool) -> None:
    """One of ``world`` CPU ranks summing through shared memory; with ``leave_early`` the last rank
    exits after joining, and the others record the error their next sum raises."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    info = dist.init_distributed("cpu", timeout_s=60)
    host_sum = dist.host_sum_for(info, capacity=64, timeout_s=30)
    results = [host_sum.memory.name]
    try:
        if leave_early and rank == world - 1:
            host_sum.close()
            return
        generator = torch.Generator().manual_seed(rank)
        for k in range(5):  # both sets of slots, both dtypes, sizes up to the capacity
            dtype = torch.float32 if k % 2 else torch.float64
            x = torch.randn(64 if k == 4 else 10 + k, generator=generator, dtype=dtype)
            summed = host_sum(x)
            gloo = x.clone()
            dist.all_reduce_sum(gloo, info)
            results.append((x, summed, gloo))
    except RuntimeError as err:
        results.append(str(err))
    finally:
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        host_sum.close()
        if not leave_early:
            dist.cleanup(info)


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_on_one_host_sum_through_shared_memory(tmp_path, world):
    mp.spawn(_host_sum_rank, args=(world, _free_port(), str(tmp_path), False), nprocs=world, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)[1:] for r in range(world)]
    for k in range(5):
        addends = [runs[r][k][0] for r in range(world)]
        expected = addends[0].clone()
        for a in addends[1:]:
            expected += a  # rank order
        for r in range(world):
            summed, gloo = runs[r][k][1], runs[r][k][2]
            assert summed.dtype == addends[0].dtype and torch.equal(summed, expected)  # the same bits on every rank
            assert torch.allclose(summed, gloo, rtol=1e-6 if summed.dtype == torch.float32 else 1e-14)
            if world == 2:
                assert torch.equal(summed, gloo)  # two addends: gloo's sum bit for bit
    segment = torch.load(tmp_path / "rank0.pt", weights_only=False)[0]
    assert not (Path("/dev/shm") / segment).exists()  # removed once every rank had it open
    assert not list(Path(tempfile.gettempdir()).glob("aenet_dist_sum_*"))  # and the pipes' directory


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_that_exits_ends_the_shared_memory_sum_of_the_others(tmp_path, world):
    """Its pipes close or break: the others stop at once (with 3 ranks the third still holds each pipe open)."""
    import time

    start = time.time()
    mp.spawn(_host_sum_rank, args=(world, _free_port(), str(tmp_path), True), nprocs=world, join=True)
    assert time.time() - start < 25  # not the 30 s timeout
    for rank in range(world - 1):
        _, message = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "on this host closed" in message and "peer exited" in message


def _host_sum_without_room(rank: int, port: int, out_dir: str) -> None:
    """A rank whose /dev/shm reports almost no free space (as in a default container)."""
    import os
    from types import SimpleNamespace

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.os.statvfs = lambda path: SimpleNamespace(f_bavail=1, f_frsize=4096)
    info = dist.init_distributed("cpu", timeout_s=60)
    try:
        torch.save(dist.host_sum_for(info, capacity=2**20, timeout_s=30) is None, f"{out_dir}/rank{rank}.pt")
        dist.barrier(info)
    finally:
        dist.cleanup(info)


@pytest.mark.dist
def test_no_room_in_shared_memory_falls_back_to_the_process_group(tmp_path):
    """A segment larger than /dev/shm has left would kill a rank with SIGBUS when written: every rank uses gloo instead."""
    mp.spawn(_host_sum_without_room, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert all(torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert not list(Path(tempfile.gettempdir()).glob("aenet_dist_sum_*"))
