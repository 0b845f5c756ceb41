"""Loading one store block into training tensors, in the rank's own threads or in worker processes.

A block's trip from disk to a :class:`~aenet_dist.batching.ShardData`: read and decode its
chunks, cast G and dG to the training dtype, check the reference values, keep the structures
the source holds (its training or its test structures), drop the derivative rows
``data.force_percent`` leaves out, and lay the rows out for the contraction. That is all of a
``stream`` epoch's data work but the batch gathers, and the same code runs in both places:

* in threads of the rank (``data.workers = 0``; ``data.readers`` of them): decoding releases
  the GIL, the rest of the conversion only partly does, so it competes with the training
  thread for the interpreter;
* in worker processes (``data.workers`` > 0, :class:`BlockWorkers`): the rank only waits for
  finished blocks. A finished block comes back as one shared-memory buffer (one file
  descriptor per block, however many tensors it holds) and is rebuilt in the rank as views of
  that buffer, without a copy (:func:`pack`, :func:`unpack`).

Workers ignore SIGINT, SIGTERM and SIGUSR1: the rank decides when to stop (it finishes the step
and checkpoints), and the workers must keep serving it until then. A worker that dies (killed,
out of memory) ends the rank with :class:`WorkerDied`, never a wait. Workers exit with the
rank, even when it is killed (their task queue closes).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch

from .batching import ShardData, numpy_dtype, shard_from_range
from .store import StoreReader, StructureRange, select_structures, without_derivatives

ALIGN = 64  # bytes: every tensor in a packed buffer starts at a multiple of this


class WorkerDied(RuntimeError):
    """A data worker process ended while the rank waited for a block it was converting."""


@dataclass(frozen=True)
class BlockTask:
    """What loading one block takes (small and picklable, so a worker process can be sent it).

    Attributes:
        store: the store's path.
        first: first store structure of the block (or of the joined blocks).
        stop: one past its last.
        members: store indices of the structures kept, sorted.
        dtype: the training dtype.
        buckets: pad dense blocks to size buckets (``data.dense_buckets``).
        derivs_used: per member, whether its derivative rows are kept (``data.force_percent``); None = all.
        dense_blocks: lay complete derivative rows out as dense blocks (False: all sparse, for CUDA graphs).
    """

    store: str
    first: int
    stop: int
    members: np.ndarray
    dtype: torch.dtype
    buckets: bool
    derivs_used: np.ndarray | None = None
    dense_blocks: bool = True


def check_finite(data: StructureRange, reader: StoreReader) -> None:
    """Reference energies and forces must be finite; name the first offending structures."""
    bad = ~np.isfinite(data.energy)
    atom_bad = ~np.isfinite(data.forces).all(axis=1)
    if atom_bad.any():
        bad |= np.add.reduceat(atom_bad.astype(np.int64), np.r_[0, np.cumsum(data.num_atoms)[:-1]]) > 0
    if bad.any():
        names = reader.names()
        which = [names[data.start + k] for k in np.flatnonzero(bad)[:5]]
        raise ValueError(f"{reader.path}: reference energy or forces not finite in {int(bad.sum())} structure(s): {which}")


def load_block(reader: StoreReader, task: BlockTask) -> ShardData:
    """The block of ``task`` as tensors: read, cast block by block, checked, reduced to its members."""
    part = reader.read_range(task.first, task.stop, numpy_dtype(task.dtype))
    check_finite(part, reader)
    if len(task.members) < task.stop - task.first:
        part = select_structures(part, task.members - task.first)
    if task.derivs_used is not None:
        part = without_derivatives(part, ~task.derivs_used)
    return shard_from_range(part, task.dtype, dense_blocks=task.dense_blocks, store_index=torch.from_numpy(task.members),
                            buckets=task.buckets)


# ------------------------------------------------------------------ transport between processes


@dataclass(frozen=True)
class _TensorSlot:
    index: int  # position in the packed tensor list


def pack(value) -> tuple[torch.Tensor, tuple]:
    """(one shared-memory uint8 buffer holding every tensor in ``value``, the layout to rebuild it).

    ``value`` is a tree of dataclasses, dicts, lists and tuples with tensors and plain values as
    leaves (a :class:`~aenet_dist.batching.ShardData`). Sending the buffer to another process
    passes one file descriptor; sending each tensor would pass one per tensor (dozens per
    block) and run into the open-file limit with blocks held in memory.
    """
    tensors: list[torch.Tensor] = []

    def strip(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x.contiguous())
            return _TensorSlot(len(tensors) - 1)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return (type(x), {f.name: strip(getattr(x, f.name)) for f in dataclasses.fields(x)})
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(strip(v) for v in x)
        return x

    skeleton = strip(value)
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(total, 1)))
    specs = []
    for t, offset in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        buffer[offset : offset + nbytes].view(t.dtype).view(t.shape).copy_(t)
        specs.append((offset, t.dtype, tuple(t.shape)))
    return buffer, (skeleton, specs)


def unpack(buffer: torch.Tensor, layout: tuple):
    """The value :func:`pack` packed, its tensors views of ``buffer`` (no copies)."""
    skeleton, specs = layout

    def build(x):
        if isinstance(x, _TensorSlot):
            offset, dtype, shape = specs[x.index]
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
            return buffer[offset : offset + nbytes].view(dtype).view(shape)
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], type) and dataclasses.is_dataclass(x[0]):
            return x[0](**{name: build(v) for name, v in x[1].items()})
        if isinstance(x, dict):
            return {k: build(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(build(v) for v in x)
        return x

    return build(skeleton)


# ------------------------------------------------------------------ worker processes

_READERS: dict[str, StoreReader] = {}  # in a worker: one reader per store, opened once


def _start_worker() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)  # the rank stops its workers (see the module docstring)
    torch.set_num_threads(1)


def _load_packed(task: BlockTask) -> tuple[torch.Tensor, tuple]:
    reader = _READERS.get(task.store)
    if reader is None:
        reader = _READERS[task.store] = StoreReader(task.store)
    shard = load_block(reader, task)
    try:
        return pack(shard)
    except RuntimeError as err:  # torch's report of a shared-memory segment it could not create or fill
        raise ValueError(f"a data worker could not hand over a converted block through shared memory ({err}); "
                         "is /dev/shm full or small (containers often give it 64 MB)? Set data.workers=0 "
                         "to convert blocks in the rank's own threads") from None


class _Loading:
    """A block being loaded by a worker: ``result()`` gives it as a ShardData."""

    def __init__(self, future: Future):
        self.future = future
        self.shard: ShardData | None = None  # unpacked once, however many steps use the block

    def result(self) -> ShardData:
        if self.shard is None:
            try:
                buffer, layout = self.future.result()
            except BrokenProcessPool:
                raise WorkerDied(
                    "a data worker process of this rank died while converting store blocks (killed, or out of memory: "
                    "see the system log); rerun with --resume to continue from the last checkpoint, with fewer "
                    "data.workers or a smaller data.memory_budget_gb if memory ran out"
                ) from None
            self.shard = unpack(buffer, layout)
        return self.shard

    def cancel(self) -> bool:
        return self.future.cancel()


class BlockWorkers:
    """``count`` worker processes that load blocks (:func:`load_block`) for one rank.

    Started with ``spawn``: the rank runs threads (zarr's event loop, the prefetcher) that a
    ``fork`` could copy in a locked state. Each worker imports torch once (about a second)
    and holds one block's conversion at a time.
    """

    def __init__(self, count: int):
        self.count = count
        self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker)

    def submit(self, task: BlockTask) -> _Loading:
        try:
            return _Loading(self.pool.submit(_load_packed, task))
        except BrokenProcessPool:
            return _Loading(_failed(BrokenProcessPool()))

    def pids(self) -> list[int]:
        """Process ids of the workers started so far."""
        return [p.pid for p in list(self.pool._processes.values())]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _failed(err: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(err)
    return future
