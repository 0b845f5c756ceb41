"""torch.distributed plumbing: process group from torchrun's environment, global sums.

One code path serves a plain process (world size 1, no process group) and torchrun
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set): gloo on CPU, nccl on CUDA. Collectives get
a timeout so a dead rank makes the others fail with a message instead of hanging. The
training step's one collective goes through shared memory instead (:class:`HostSum`) when
every rank trains on the CPUs of one host, where gloo's latency was twenty times a pipe's.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
import select
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from .log import get_logger
from .loss import loss_coefficients

log = get_logger(__name__)


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
    """What tells this machine, and its shared-memory and file-system view, from another: the
    hostname, the boot id, and (Linux) this process's IPC and mount namespaces, since two
    containers on one node may share a hostname but not ``/dev/shm`` or ``/tmp``."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/ipc", "/proc/self/ns/mnt"):
        try:
            parts.append(os.readlink(path) if "/ns/" in path else Path(path).read_text(encoding="ascii").strip())
        except OSError:
            parts.append("")
    return "/".join(parts)


class HostSum:
    """Sums a flat CPU tensor over ranks that all run on one host, through shared memory.

    gloo's all-reduce of a step's few hundred numbers took 0.4-2.5 ms between two ranks of a
    2-vCPU VM (a median of 1.1 ms in a loop doing nothing else), where a pipe's round trip
    takes 46 µs: its worker threads hand every message on, and each hand-over waits for the
    scheduler. Here each rank writes its tensor into its slot of a shared array, tells every
    other rank through a pipe (one byte: the call's parity), waits for theirs, and sums the
    slots in rank order, so every rank computes the same bits (measured 45 µs a sum).

    Two sets of slots alternate between calls: a rank can only start call k + 2 after every
    rank has finished adding up call k (it needs their notes of call k + 1), so it never
    overwrites slots another rank is still reading. Waiting gives up after ``timeout_s``, and
    at once when a rank exits (its end of this rank's pipe closes, or a pipe to it breaks): no
    rank waits forever. The shared memory and the pipes' names are removed as soon as every
    rank has them open, so nothing is left behind when a rank is killed. Use
    :func:`host_sum_for`, which falls back to the process group when this cannot be set up.
    """

    def __init__(self, info: DistInfo, capacity: int, timeout_s: float, directory: str, name: str, memory=None):
        """Called on every rank by :func:`host_sum_for` after rank 0 made ``directory`` and the segment ``name``."""
        self.rank, self.world, self.timeout_s, self.capacity = info.rank, info.world_size, timeout_s, capacity
        self.inbox, self.peers, self.closed = -1, [], False
        if memory is None:
            memory = shared_memory.SharedMemory(name=name)
            # Only rank 0, which made the segment, removes it; other ranks' resource trackers would
            # try again at exit and warn.
            with contextlib.suppress(Exception):
                resource_tracker.unregister(memory._name, "shared_memory")
        self.memory = memory
        self.inbox_path = os.path.join(directory, f"rank{self.rank}")
        os.mkfifo(self.inbox_path, 0o600)

    def connect(self, info: DistInfo, directory: str) -> None:
        """Open this rank's pipe for reading, then the others' for writing (every rank's exists by now)."""
        self.inbox = os.open(self.inbox_path, os.O_RDONLY | os.O_NONBLOCK)  # opening for reading does not wait for writers
        barrier(info)
        self.peers = [os.open(os.path.join(directory, f"rank{p}"), os.O_WRONLY) for p in range(self.world) if p != self.rank]
        self.poll = select.poll()
        self.poll.register(self.inbox, select.POLLIN)
        for fd in self.peers:  # a write end reports POLLERR once its reader is gone (that rank exited)
            self.poll.register(fd, 0)
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
        note = bytes([parity])
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
            if left <= 0:
                raise RuntimeError(
                    f"rank {self.rank}: timed out after {self.timeout_s:g} s waiting for the other ranks on this host "
                    "in the step's gradient sum (a peer died or hangs)")
            events = self.poll.poll(max(1, int(1000 * min(left, 1.0))))
            if any(fd != self.inbox and event & (select.POLLERR | select.POLLHUP) for fd, event in events):
                raise RuntimeError(f"rank {self.rank}: another rank on this host closed its pipe during the step's gradient sum "
                                   "(a peer exited)")
            if not any(fd == self.inbox for fd, _ in events):
                continue
            notes = os.read(self.inbox, 4096)
            if not notes:
                raise RuntimeError(f"rank {self.rank}: the other ranks on this host closed their pipes during the step's "
                                   "gradient sum (a peer exited)")
            for note in notes:
                self.arrived[note] += 1
        self.arrived[parity] -= others

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in [self.inbox, *self.peers]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.inbox, self.peers = -1, []
        with contextlib.suppress(Exception):
            self.memory.close()


def host_sum_for(info: DistInfo, capacity: int, timeout_s: float, enabled: bool = True) -> HostSum | None:
    """A :class:`HostSum` when every rank trains on the CPU of this same host (decided together), else None.

    Every rank takes the same path through the set-up's collectives whatever fails on it; if the
    segment or a pipe cannot be made anywhere, every rank frees what it made and uses the process group.
    """
    if not (enabled and info.distributed and info.device.type == "cpu" and hasattr(os, "mkfifo")):
        return None
    if len(set(all_gather_objects(_host_identity(), info))) != 1:
        return None
    made, directory, name = None, None, None
    if info.is_main:
        size = 2 * info.world_size * capacity * 8
        try:
            # tmpfs hands out pages as they are first written: a segment larger than what /dev/shm has
            # left (64 MiB in a default container) would kill a rank with SIGBUS mid-step, so check first.
            shm = os.statvfs("/dev/shm")
            if shm.f_bavail * shm.f_frsize < 2 * size:
                raise OSError(f"/dev/shm has {shm.f_bavail * shm.f_frsize / 2**20:.0f} MiB free, the sum needs {size / 2**20:.0f} MiB")
            directory = tempfile.mkdtemp(prefix="aenet_dist_sum_")
            made = shared_memory.SharedMemory(create=True, size=size)
            name = made.name
        except OSError as err:
            log.info("the step's sum goes through gloo: no room in shared memory here (%s)", err)
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
                directory = None
    directory, name = broadcast_object((directory, name), info)
    host_sum, problem = None, None
    if name is not None:
        try:
            host_sum = HostSum(info, capacity, timeout_s, directory, name, made)
        except (OSError, ValueError) as err:
            problem = f"rank {info.rank}: {err}"
    problems = [p for p in all_gather_objects(problem, info) if p] if name is not None else ["no segment"]
    if not problems:
        host_sum.connect(info, directory)
        barrier(info)  # every pipe is open at both ends: the names can go
    if host_sum is not None:
        with contextlib.suppress(OSError):
            os.unlink(host_sum.inbox_path)
    barrier(info)
    if info.is_main:
        if made is not None:
            with contextlib.suppress(OSError):
                made.unlink()  # attached everywhere (or nowhere): the segment lives until the last rank closes it
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    if problems:
        if host_sum is not None:
            host_sum.close()
        if info.is_main and name is not None:
            log.info("the step's sum goes through gloo: shared memory could not be set up (%s)", "; ".join(problems))
        return None
    return host_sum


class FusedStepState:
    """What the one collective of a DDP step carries besides the bucket, and what it brings back.

    Set before each step: ``stop_requested`` (this rank's) and ``grad_probe`` = None. Read after
    ``backward()``: ``totals`` (the global error sums (4,)), ``stop_flag`` (0-d, > 0 when some rank
    asked to stop; the same on every rank) and ``grad_probe`` (the sum of every combined gradient:
    finite exactly when they all are). All three stay on the device: the hook reads nothing back.
    """

    def __init__(self, step, loss_weights: torch.Tensor, weight_decay: float):
        self.step = step  # the LeanStep: its G_F and local error sums
        self.loss_weights = loss_weights  # (2,) (1 − α, α)
        self.weight_decay = weight_decay  # c of the penalty's gradient c·W (2λ for λ·Σ w²), added once
        self.stop_requested = False
        self.totals: torch.Tensor | None = None
        self.stop_flag: torch.Tensor | None = None
        # The buckets' sums, summed: the step's probe of its gradients for the NaN check, one operator
        # per bucket where a norm of every parameter's .grad took five (0.05 ms of a 2-rank TiO2 step).
        self.grad_probe: torch.Tensor | None = None
        self.host_sum: HostSum | None = None  # ranks on one host: the sum goes through shared memory, not gloo
        self._views: dict = {}  # bucket -> (its parameters' G_F views, their flat views), listed once

    def bucket_views(self, params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(G_F, parameter) flat views of a bucket's parameters, made the first time the bucket holds
        these parameters in this order (DDP rebuilds its buckets after the first step, so the key is
        the parameters, not the bucket's index); both are updated in place, so the views stay valid."""
        key = tuple(map(id, params))
        views = self._views.get(key)
        if views is None:
            # view, not reshape: a copy would go stale (view raises where it cannot share the memory)
            views = ([self.step.force_gradient_of(p).view(-1) for p in params], [p.detach().view(-1) for p in params])
            self._views[key] = views
        return views


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
    force_views, param_views = state.bucket_views(params)
    packed = torch.cat([grads_e, *force_views, sums, flag])
    if state.host_sum is not None:
        # A peer gone or silent raises here, and backward() raises it as it is (a future holding the
        # exception reached backward() as "Unable to cast <message> to Tensor").
        done = torch.futures.Future()
        done.set_result(combine_sums(state, param_views, n, state.host_sum(packed)))
        return done
    work = tdist.all_reduce(packed, op=tdist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: combine_sums(state, param_views, n, fut.value()[0]))


def combine_sums(state: FusedStepState, param_views: list[torch.Tensor], n: int, total: torch.Tensor) -> torch.Tensor:
    """The step's gradient from the summed [G_E, G_F, error sums, stop flag] of :func:`fused_step_hook`
    (``param_views``: the bucket's parameters, flat)."""
    state.totals = total[2 * n : 2 * n + 4]
    state.stop_flag = total[-1]  # > 0: some rank asked to stop (read by the trainer: reading it waits for the sum)
    c = loss_coefficients(state.totals, state.loss_weights)
    out = total[:n] * c[0] + total[n : 2 * n] * c[1]
    if state.weight_decay:
        out += state.weight_decay * torch.cat(param_views)
    probe = out.sum()
    state.grad_probe = probe if state.grad_probe is None else state.grad_probe + probe
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
