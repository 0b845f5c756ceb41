"""torch.distributed plumbing: process group from torchrun's environment, global sums.

One code path serves a plain process (world size 1, no process group) and torchrun
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set): gloo on CPU, nccl on CUDA. Collectives get
a timeout so a dead rank makes the others fail with a message instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
import select
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import torch
import torch.distributed as tdist

from .loss import loss_coefficients


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(requested: str, local_rank: int) -> torch.device:
    """'auto' -> this rank's GPU if there is one, else CPU; 'cuda' -> cuda:local_rank."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device='cuda' but no CUDA device is available (this torch build: "
                             f"{torch.__version__}); use run.device='cpu' or install torch's CUDA build")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device={requested!r} but no CUDA device is available")
    return device


def init_distributed(device_request: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group if launched by torchrun; otherwise a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_request, local_rank)
    if world_size > 1 and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place global sum (no-op on one rank)."""
    if info.distributed:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (pickled), in rank order."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        tdist.barrier()


def cleanup(info: DistInfo) -> None:
    """Destroy the process group while the interpreter is fully alive.

    The DDP wrapper (and the futures of its communication hook, which hold Python callables)
    keep the gloo group alive after ``destroy_process_group`` until they are collected. Left to
    the interpreter's teardown, a gloo thread that then releases a Python object aborted the
    rank ("terminate called without an active exception", SIGABRT; once in a CI run of a
    2-rank job that had trained to the end). Collecting first frees them here.
    """
    if info.distributed and tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()


def sum_gradients_hook(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP communication hook: the **sum** of each bucket (a ``GradBucket``) over ranks (DDP's default averages).

    Each rank's gradients are those of its share of the global-batch loss, so their sum is the
    gradient of that loss.
    """
    work = tdist.all_reduce(bucket.buffer(), op=tdist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _host_identity() -> str:
    """What tells this machine from another: its hostname and, where Linux has one, its boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class HostSum:
    """Sums a flat CPU tensor over ranks that all run on one host, through shared memory.

    gloo's all-reduce of a step's few hundred numbers took 0.4-2.5 ms between two ranks of a
    2-vCPU VM (a median of 1.1 ms in a loop doing nothing else), where a pipe's round trip
    takes 46 µs: its worker threads hand every message on, and each hand-over waits for the
    scheduler. Here each rank writes its tensor into its slot of a shared array, tells every
    other rank through a pipe (one byte: its rank and the step's parity), waits for theirs, and
    sums the slots in rank order, so every rank computes the same bits (measured 45 µs a sum).

    Two sets of slots alternate between steps: a rank can only start step k + 1 after every
    rank has started step k, so it never overwrites slots another rank is still adding up.
    Waiting gives up after ``timeout_s`` and stops at once when every other rank's end of the
    pipe is closed (a rank died): no rank waits forever. The shared memory and the pipes'
    names are removed as soon as every rank has them open, so nothing is left behind when a
    rank is killed.
    """

    def __init__(self, info: DistInfo, capacity: int, timeout_s: float):
        """``capacity``: the most elements a sum carries (of up to 8 bytes each)."""
        self.rank, self.world, self.timeout_s = info.rank, info.world_size, timeout_s
        self.capacity = capacity
        directory, memory = None, None
        if info.is_main:
            directory = tempfile.mkdtemp(prefix="aenet_dist_sum_")
            memory = shared_memory.SharedMemory(create=True, size=2 * self.world * capacity * 8)
        directory, name = broadcast_object((directory, memory.name if memory else None), info)
        self.memory = memory if memory is not None else shared_memory.SharedMemory(name=name)
        inbox_path = os.path.join(directory, f"rank{self.rank}")
        os.mkfifo(inbox_path, 0o600)
        barrier(info)
        self.inbox = os.open(inbox_path, os.O_RDONLY | os.O_NONBLOCK)  # opening for reading does not wait for writers
        barrier(info)
        self.peers = [os.open(os.path.join(directory, f"rank{p}"), os.O_WRONLY) for p in range(self.world) if p != self.rank]
        barrier(info)
        os.unlink(inbox_path)
        if info.is_main:
            self.memory.unlink()  # attached everywhere: the segment lives until the last rank closes it
        barrier(info)
        if info.is_main:
            os.rmdir(directory)
        self.poll = select.poll()
        self.poll.register(self.inbox, select.POLLIN)
        self.calls = 0
        self.arrived = [0, 0]  # other ranks' notes received for each parity, not yet used

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``tensor`` (1-D, CPU, at most ``capacity`` elements), a new tensor."""
        n = tensor.numel()
        if n > self.capacity or tensor.dim() != 1 or tensor.device.type != "cpu":
            raise ValueError(f"HostSum takes a 1-D CPU tensor of at most {self.capacity} elements, got {tuple(tensor.shape)} on {tensor.device}")
        parity = self.calls % 2
        self.calls += 1
        dtype = tensor.numpy().dtype
        slots = np.ndarray((2, self.world, self.capacity * 8 // dtype.itemsize), dtype=dtype, buffer=self.memory.buf)[parity]
        slots[self.rank, :n] = tensor.numpy()
        note = bytes([parity * 128 + self.rank])
        try:
            for fd in self.peers:
                os.write(fd, note)
        except BrokenPipeError:
            raise RuntimeError(f"rank {self.rank}: another rank on this host closed its pipe during the step's gradient sum "
                               "(a peer exited)") from None
        self._wait_for(parity)
        return torch.from_numpy(slots[:, :n].sum(axis=0))  # rank order: the same bits on every rank

    def _wait_for(self, parity: int) -> None:
        """Until every other rank has written its slots of ``parity`` (its note has come)."""
        others = self.world - 1
        deadline = time.monotonic() + self.timeout_s
        while self.arrived[parity] < others:
            left = deadline - time.monotonic()
            if left <= 0 or not self.poll.poll(max(1, int(1000 * min(left, 1.0)))):
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"rank {self.rank}: timed out after {self.timeout_s:g} s waiting for the other ranks on this host "
                        "in the step's gradient sum (a peer died or hangs)")
                continue
            notes = os.read(self.inbox, 4096)
            if not notes:
                raise RuntimeError(f"rank {self.rank}: the other ranks on this host closed their pipes during the step's "
                                   "gradient sum (a peer exited)")
            for note in notes:
                self.arrived[note // 128] += 1
        self.arrived[parity] -= others

    def close(self) -> None:
        for fd in [self.inbox, *self.peers]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.peers = []
        with contextlib.suppress(Exception):
            self.memory.close()


def host_sum_for(info: DistInfo, capacity: int, timeout_s: float, enabled: bool = True) -> HostSum | None:
    """A :class:`HostSum` when every rank trains on the CPU of this same host (decided together), else None."""
    if not (enabled and info.distributed and info.device.type == "cpu" and hasattr(os, "mkfifo")):
        return None
    hosts = all_gather_objects(_host_identity(), info)
    if len(set(hosts)) != 1:
        return None
    return HostSum(info, capacity, timeout_s)


class FusedStepState:
    """What the one collective of a DDP step carries besides the bucket, and what it brings back.

    Set before each step: ``stop_requested`` (this rank's). Read after ``backward()``: ``totals``
    (the global error sums (4,)) and ``stop_agreed`` (some rank asked to stop).
    """

    def __init__(self, step, loss_weights: torch.Tensor, weight_decay: float):
        self.step = step  # the LeanStep: its G_F and local error sums
        self.loss_weights = loss_weights  # (2,) (1 − α, α)
        self.weight_decay = weight_decay  # c of the penalty's gradient c·W (2λ for λ·Σ w²), added once
        self.stop_requested = False
        self.totals: torch.Tensor | None = None
        self.stop_agreed = False
        self.host_sum: HostSum | None = None  # ranks on one host: the sum goes through shared memory, not gloo


def fused_step_hook(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP communication hook of the lean step: one all-reduce of [G_E, G_F, error sums, stop flag].

    The bucket holds this rank's G_E; the sum over ranks of both gradients and of the error sums
    gives the loss coefficients c, and the bucket's result is c_E·ΣG_E + c_F·ΣG_F + c_W·W
    (:class:`aenet_dist.step.LeanStep` says why).
    """
    params = bucket.parameters()
    grads_e = bucket.buffer()
    n = grads_e.numel()
    sums = state.step.local_sums
    flag = torch.full((1,), float(state.stop_requested), dtype=sums.dtype, device=sums.device)
    packed = torch.cat([grads_e, *[state.step.force_gradient_of(p).reshape(-1) for p in params], sums, flag])
    if state.host_sum is not None:
        done = torch.futures.Future()
        try:
            done.set_result(combine_sums(state, params, n, state.host_sum(packed)))
        except RuntimeError as err:  # a peer gone or silent: backward() raises it, as with gloo
            done.set_exception(err)
        return done
    work = tdist.all_reduce(packed, op=tdist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: combine_sums(state, params, n, fut.value()[0]))


def combine_sums(state: FusedStepState, params, n: int, total: torch.Tensor) -> torch.Tensor:
    """The step's gradient from the summed [G_E, G_F, error sums, stop flag] of :func:`fused_step_hook`."""
    state.totals = total[2 * n : 2 * n + 4]
    state.stop_agreed = bool(total[-1] > 0)  # every rank sees the same sum, so all stop together
    c = loss_coefficients(state.totals, state.loss_weights)
    out = total[:n] * c[0] + total[n : 2 * n] * c[1]
    if state.weight_decay:
        out += state.weight_decay * torch.cat([p.detach().reshape(-1) for p in params])
    return out


def wrap_ddp(module: torch.nn.Module, info: DistInfo, state: FusedStepState | None = None) -> torch.nn.parallel.DistributedDataParallel:
    """``module`` in DistributedDataParallel: with ``state``, the lean step's one collective per step
    (:func:`fused_step_hook`); without, gradients summed over ranks (:func:`sum_gradients_hook`).

    Every parameter takes part in every step (``static_graph``, no search for unused ones);
    buffers (descriptor statistics, energy scaling) are equal on all ranks and never change
    in training, so they are not re-broadcast each step.
    """
    # Buffers are not synced in forward: torch 2.13 names it forward_sync_buffers (broadcast_buffers is deprecated).
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        torch.nn.parallel.DistributedDataParallel).parameters else {"broadcast_buffers": False}
    ddp = torch.nn.parallel.DistributedDataParallel(
        module,
        device_ids=None,  # the module and the batches are already on this rank's device
        gradient_as_bucket_view=True,
        static_graph=True,
        **sync,
    )
    if state is None:
        ddp.register_comm_hook(None, sum_gradients_hook)
    else:
        ddp.register_comm_hook(state, fused_step_hook)
    return ddp
