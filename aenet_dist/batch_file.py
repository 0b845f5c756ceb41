"""Kept batches on disk: ``data.batches = "fixed"`` with ``data.cache = "stream"``.

The first epoch's batches are gathered once from the store and written, in the layout the step
reads, to one file per rank; every later epoch reads them back in its own order (one read per
batch into fresh memory, then views): no decompression, no conversion, no gathering, and the
data are held in memory only while their step needs them, as the stream cache promises.
aenet-PyTorch's ``memory_mode = disk`` keeps its batches on disk the same way.

File layout (all integers little-endian uint64; every array 64-byte aligned)::

    MAGIC
    per batch: header length, header (JSON: [key, dtype, shape, offset, nbytes] of each array), arrays
    index (JSON: [start, header length, data length] of each batch), index length, MAGIC

Training writes the file **anonymously**: its name is removed as soon as it is created, and the
open handle is kept for reading (``os.preadv``, safe from several threads). No other run can open
or overwrite it, and the kernel frees its space when the process ends however it ends (a crash,
SIGKILL, the out-of-memory killer): nothing is left to clean up. A named file (``anonymous=False``)
is written under a temporary name and renamed when complete, so a killed writer leaves no file that
looks whole. The reader checks every length and bound against the file before it trusts it, and
refuses a dtype or key it does not know.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from pathlib import Path

import numpy as np
import torch

from .batching import Batch, DenseBlock, index_derivatives

MAGIC = b"AENET_DIST_BATCHES_1\n"
ALIGN = 64
_U64 = struct.Struct("<Q")
_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
_MAX_JSON = 64 * 2**20  # a header or index longer than this is damage, not a batch


def _data_start(start: int, header_len: int) -> int:
    """Where a batch's arrays begin: after its header length and header, at the next aligned offset."""
    end = start + _U64.size + header_len
    return end + (-end % ALIGN)


class BatchFileError(ValueError):
    """A kept-batch file that is not what its writer wrote (the message names the file and what is wrong)."""


def _arrays(batch: Batch) -> list[tuple[str, torch.Tensor]]:
    """The batch's tensors under keys that say where they go back (:func:`_rebuild`)."""
    items = [("structure_index", batch.structure_index), ("num_atoms", batch.num_atoms), ("energy", batch.energy)]
    items += [(f"G/{e}", t) for e, t in batch.G.items()]
    items += [(f"atom_structure/{e}", t) for e, t in batch.atom_structure.items()]
    for e, (center, atom, dG) in batch.deriv.items():
        items += [(f"deriv/{e}/center", center), (f"deriv/{e}/atom", atom), (f"deriv/{e}/dG", dG)]
    for e, blocks in batch.dense.items():
        for k, block in enumerate(blocks):
            items += [(f"dense/{e}/{k}/rows", block.rows), (f"dense/{e}/{k}/atoms", block.atoms), (f"dense/{e}/{k}/D", block.D)]
    if batch.forces is not None:
        items += [("forces", batch.forces), ("force_atoms", batch.force_atoms)]
    if batch.structure_count is not None:
        items.append(("structure_count", batch.structure_count))
    if batch.force_rows is not None:
        items += [(f"force_rows/{e}", torch.tensor(n, dtype=torch.int64)) for e, n in batch.force_rows.items()]
    return items


def _rebuild(arrays: dict[str, torch.Tensor], where: str) -> Batch:
    """The :class:`Batch` whose :func:`_arrays` these are."""
    try:
        batch = Batch(arrays.pop("structure_index"), arrays.pop("num_atoms"), arrays.pop("energy"), {}, {})
        for key, t in arrays.items():
            part = key.split("/")
            if part[0] in ("G", "atom_structure") and len(part) == 2:
                getattr(batch, part[0])[part[1]] = t
            elif part[0] == "deriv" and len(part) == 3 and part[2] in ("center", "atom", "dG"):
                batch.deriv.setdefault(part[1], {})[part[2]] = t
            elif part[0] == "dense" and len(part) == 4 and part[3] in ("rows", "atoms", "D"):
                batch.dense.setdefault(part[1], {}).setdefault(int(part[2]), {})[part[3]] = t
            elif key in ("forces", "force_atoms", "structure_count"):
                setattr(batch, key, t)
            elif part[0] == "force_rows" and len(part) == 2 and t.dim() == 0 and t.dtype == torch.int64:
                batch.force_rows = batch.force_rows or {}
                batch.force_rows[part[1]] = int(t)
            else:
                raise KeyError(key)
        for e, n in (batch.force_rows or {}).items():
            if not 0 <= n <= batch.G[e].shape[0]:
                raise ValueError(f"force_rows/{e} = {n} for {batch.G[e].shape[0]} rows")
        batch.deriv = {e: (d["center"], d["atom"], d["dG"]) for e, d in batch.deriv.items()}
        batch.dense = {e: [DenseBlock(b[k]["rows"], b[k]["atoms"], b[k]["D"]) for k in range(len(b))] for e, b in batch.dense.items()}
    except (KeyError, ValueError) as err:
        raise BatchFileError(f"{where}: arrays do not make a batch (unexpected or missing {err})") from None
    return index_derivatives(batch)


class BatchFileWriter:
    """Writes batches one after another; :meth:`finish` makes the file whole and returns it as a
    :class:`BatchFile`.

    ``path``: for a named file, its name (written as ``.NAME.partial``, renamed by :meth:`finish`);
    with ``anonymous=True``, the folder to write in (a unique name, removed at once).
    Use as a context manager: leaving it by an exception removes the partial file.
    """

    def __init__(self, path: str | os.PathLike, anonymous: bool = False):
        self.anonymous = anonymous
        if anonymous:
            folder = Path(path)
            folder.mkdir(parents=True, exist_ok=True)
            self.path = self.partial = folder / f".aenet_dist_batches.{os.getpid()}.{uuid.uuid4().hex}"
        else:
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.file = open(self.partial, "w+b")
        if anonymous:
            os.unlink(self.partial)  # the open handle keeps the data; the kernel frees it with the process
        self.file.write(MAGIC)
        self.index: list[list[int]] = []
        self.bytes = 0

    def append(self, batch: Batch) -> None:
        # (ascontiguousarray makes a 0-d array 1-d: the reshape keeps its shape)
        arrays = [(key, np.ascontiguousarray(t.detach().cpu().numpy()).reshape(t.shape)) for key, t in _arrays(batch)]
        entries, offset = [], 0
        for key, a in arrays:
            entries.append([key, a.dtype.name, list(a.shape), offset, a.nbytes])
            offset += -(-a.nbytes // ALIGN) * ALIGN
        header = json.dumps(entries).encode()
        start = self.file.tell()
        self.file.write(_U64.pack(len(header)) + header)
        self._pad()
        data_start = self.file.tell()
        for _, a in arrays:
            self.file.write(memoryview(a.reshape(-1)).cast("B"))
            self._pad()
        self.index.append([start, len(header), self.file.tell() - data_start])
        self.bytes = self.file.tell()

    def _pad(self) -> None:
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))

    def finish(self) -> "BatchFile":
        index = json.dumps(self.index).encode()
        self.file.write(index + _U64.pack(len(index)) + MAGIC)
        self.file.flush()
        if self.anonymous:
            return BatchFile(self.file, name=f"the batch file {self.path} (unnamed)")
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        return BatchFile(self.path)

    def abandon(self) -> None:
        self.file.close()
        if not self.anonymous:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "BatchFileWriter":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is not None:
            self.abandon()


class BatchFile:
    """A complete kept-batch file: ``len()`` batches, read back by :meth:`read` or :meth:`iterate`.

    ``iterate(order, with_forces)`` has the signature of a loader source's, so a
    :class:`~aenet_dist.loader.Prefetcher` reads the coming batches in a thread.
    """

    def __init__(self, path, name: str | None = None):
        """``path``: a file's name, or an open binary file (kept open for reading: an anonymous file)."""
        if isinstance(path, (str, os.PathLike)):
            self.file = open(path, "rb", buffering=0)
            self.path = Path(path)
        else:
            self.file, self.path = path, name or getattr(path, "name", "batch file")
        self.fd = self.file.fileno()
        size = os.fstat(self.fd).st_size
        tail = len(MAGIC) + _U64.size
        if size < len(MAGIC) + tail or self._read(0, len(MAGIC)) != MAGIC:
            raise BatchFileError(f"{self.path}: not a kept-batch file (no {MAGIC!r} at its start, or too short)")
        (index_len,), magic = _U64.unpack(self._read(size - tail, _U64.size)), self._read(size - len(MAGIC), len(MAGIC))
        if magic != MAGIC or index_len > min(_MAX_JSON, size - len(MAGIC) - tail):
            raise BatchFileError(f"{self.path}: incomplete (its end marker or index length is wrong)")
        self.index = self._parse(self._read(size - tail - index_len, index_len), "index")
        body_end = size - tail - index_len
        if not isinstance(self.index, list):
            raise BatchFileError(f"{self.path}: its index is not a list of batches")
        for k, entry in enumerate(self.index):
            if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(v, int) and v >= 0 for v in entry)):
                raise BatchFileError(f"{self.path}: index entry {k} is not [start, header length, data length]")
            start, header_len, data_len = entry
            if start < len(MAGIC) or header_len > _MAX_JSON or _data_start(start, header_len) + data_len > body_end:
                raise BatchFileError(f"{self.path}: batch {k} lies outside the file (start {start}, {data_len} bytes)")

    def _read(self, offset: int, count: int, into=None) -> bytes | None:
        """``count`` bytes at ``offset`` (into ``into``, a writable buffer, if given): ``os.preadv``
        needs no shared file position, so threads may read at once."""
        buffer = memoryview(bytearray(count) if into is None else into)
        done = 0
        while done < count:  # a single read may return less (large reads, signals)
            got = os.preadv(self.fd, [buffer[done:]], offset + done)
            if not got:
                raise BatchFileError(f"{self.path}: ends at byte {offset + done}, inside data its index names")
            done += got
        return bytes(buffer) if into is None else None

    def close(self) -> None:
        """Close the file (an anonymous one is gone then)."""
        self.file.close()

    def _parse(self, raw: bytes, what: str):
        try:
            return json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BatchFileError(f"{self.path}: its {what} is damaged ({err})") from None

    def __len__(self) -> int:
        return len(self.index)

    def read(self, k: int) -> Batch:
        """Batch ``k``: one read of its arrays into fresh memory, then tensor views of it."""
        start, header_len, data_len = self.index[k]
        where = f"{self.path} batch {k}"
        if _U64.unpack(self._read(start, _U64.size))[0] != header_len:
            raise BatchFileError(f"{where}: header length differs from the index")
        entries = self._parse(self._read(start + _U64.size, header_len), f"batch {k} header")
        data = np.empty(data_len, dtype=np.uint8)
        self._read(_data_start(start, header_len), data_len, into=data)
        arrays = {}
        for entry in entries if isinstance(entries, list) else [None]:
            if not (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str)):
                raise BatchFileError(f"{where}: header entry {entry!r} is not [key, dtype, shape, offset, bytes]")
            key, dtype, shape, offset, nbytes = entry
            if dtype not in _DTYPES or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise BatchFileError(f"{where}: array {key!r} has an unknown dtype or shape ({dtype}, {shape})")
            itemsize = np.dtype(_DTYPES[dtype]).itemsize
            if not (isinstance(offset, int) and offset >= 0 and nbytes == itemsize * math.prod(shape)
                    and offset + nbytes <= data_len):
                raise BatchFileError(f"{where}: array {key!r} ({nbytes} bytes at {offset}) does not fit its shape or the batch")
            arrays[key] = torch.from_numpy(data[offset : offset + nbytes].view(_DTYPES[dtype]).reshape(shape))
        if "structure_index" in arrays:
            # The trainer keeps each step's structure indices until the epoch's check (to name them if
            # a step fails): a view would keep the whole batch's memory alive with them.
            arrays["structure_index"] = arrays["structure_index"].clone()
        return _rebuild(arrays, where)

    def iterate(self, order, with_forces: bool = True):
        """The batches ``order`` names, in that order (``with_forces``: as written; the file holds what was kept)."""
        for k in order:
            yield self.read(int(k))
