"""torch.distributed plumbing (aenet_dist.dist): a plain process is a world of one whose
collectives hand values back unchanged; two gloo ranks (one spawn) sum tensors, gather
objects in rank order, broadcast from a chosen rank, and sum (not average) DDP gradients.

Training with 2 ranks, a killed rank and the collective timeout are in test_train.py.
"""

import socket

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
