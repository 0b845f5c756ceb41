"""The Zarr v3 feature store: schema, parallel resumable writer (mpi4py), and reader.

Schema (``schema_version`` 1)
-----------------------------
Structures are cut, in file order, into *blocks* of consecutive structures whose
estimated uncompressed size is about ``chunk_bytes``. A block is the unit of work,
of completion and of reading; its arrays are cut into Zarr chunks of ~4 MiB along the
first axis, each a zstd frame with its content checksum, and every
chunk is written (array attribute ``aenet_dist_all_chunks_written``), so a missing chunk file or
a flipped bit is an error on read, not zeros or garbage.

``<store>/zarr.json`` root group attributes:
    format="aenet_dist.store", schema_version, species (TYPES order), atomic_energies
    (eV), setups (per element: the .stp content), num_features (per element),
    fingerprint (sha256 of every input that changes the content, the structure files by a
    hash of their bytes), fingerprint_of="file contents" (absent in older stores), block_first
    (first structure of each block, plus the total at the end), num_structures,
    num_atoms, deriv_dtype, complete (False until consolidation), and once complete:
    stats = {element: {count, min, max, mean, mean_sq, std} per feature},
    energy_per_atom = {min, max, mean} of the cohesive energy per atom (eV/atom),
    num_force_structures, num_deriv_rows {element: rows}.

``<store>/blocks/bNNNNNN/`` one group per block (written by one rank into a temporary
directory, then renamed: a block directory that exists is complete). Attributes:
first_structure, num_structures, num_atoms, partial feature sums for the statistics.
    num_atoms (n,) int32          atoms per structure
    energy (n,) float64            DFT total energy, eV
    cohesive_energy (n,) float64   energy − Σ atomic reference energies, eV
    pbc (n,) bool, cell (n,3,3) float64 (rows = lattice vectors, Å; zeros if isolated)
    has_derivs (n,) bool           structure selected for force training
    species (a,) int8              type index of each atom (TYPES order), atoms in file order
    pos (a,3) float64, forces (a,3) float64 (Å, eV/Å)
    <El>/atom (a_El,) int32        block-local atom index of each row of <El>/G
    <El>/G (a_El, F_El) float64    raw (unnormalized) descriptors, aenet's feature order
    <El>/deriv_center (p,) int32   row of <El>/G (center atom i) of each derivative row
    <El>/deriv_neighbor (p,) int32 block-local index of the atom a that moves G_i
    <El>/dG (p, F_El, 3)           ∂G_i/∂R_a, periodic images summed; rows sorted by (i, a);
                                   only for structures with has_derivs; no padding

``<store>/structures/`` (written by consolidation, last): num_atoms, atom_offset (S+1),
energy, cohesive_energy, has_derivs, block (block of each structure), num_deriv_rows,
name_bytes + name_offset (UTF-8 source names, e.g. the XSF path relative to generate.in).

mpi4py is imported here only; every other module is free of MPI. zarr is imported only where it
is used (reading arrays of another layout, StoreReader, other compressors than zstd): featurize
writes and consolidates zstd stores without it (0.3 s of each rank's start-up), in zarr's format.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np

from .config import FeaturizeConfig, StoreOptions
from .descriptors import featurize
from .files import atomic_write, describe_os_error, lock_file, unlock
from .log import get_logger
from .symmetry_functions import aenet_numbering_problems
from .structures import Structure, read_structures

SCHEMA_VERSION = 1
FORMAT = "aenet_dist.store"
log = get_logger(__name__)


# ----------------------------------------------------------------------------- MPI


class _SerialComm:
    """Stand-in with the few mpi4py calls we use, for runs without MPI."""

    rank = 0
    size = 1

    def allgather(self, obj):
        return [obj]

    def bcast(self, obj, root=0):
        return obj

    def Barrier(self):
        pass


def world_comm():
    """mpi4py's COMM_WORLD when launched by mpiexec with more than one rank, else a serial stand-in."""
    if not any(k in os.environ for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        return _SerialComm()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm if comm.size > 1 else _SerialComm()


class RankFailed(ValueError):
    """A phase failed on some rank; every rank raises this, so none waits in a later collective.

    ``bad_input``: some rank failed with :class:`BadInput` (a rerun of the same inputs fails again).
    """

    def __init__(self, message: str, bad_input: bool = False):
        super().__init__(message)
        self.bad_input = bad_input


class BadInput(ValueError):
    """A structure that cannot be featurized (atoms closer than RMIN, no forces): a property of the inputs,
    unlike a failure to read or write, so a store of these inputs can never be finished."""


def wait_for_all(comm, poll_s: float = 0.002) -> None:
    """Return once every rank has called this, sleeping between checks instead of spinning.

    MPICH waits in a blocking collective by polling, at full speed: a rank that finished its
    blocks first burned a core until the others were done (and then through rank 0's
    consolidation), about 0.65 CPU-s per TiO2-1000 run on 2 ranks, taken from the ranks still
    working when the cores are shared. A non-blocking barrier tested every ``poll_s`` costs
    nothing measurable and delays the collective that follows by at most ``poll_s``.
    """
    if comm.size == 1:
        return
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_s)


def together(comm, what: str, fn):
    """``fn()`` on every rank, then one allgather of how it went: if it failed anywhere, fail everywhere.

    A user error (ValueError, OSError) becomes :class:`RankFailed` with the first failing
    rank's message on every rank. Anything else is a bug: the rank it happened on re-raises it
    (a traceback), the others raise :class:`RankFailed` naming that rank.
    """
    result, error, own, bad_input = None, None, None, False
    try:
        result = fn()
    except (ValueError, OSError) as err:
        error, bad_input = (describe_os_error(err) if isinstance(err, OSError) else str(err)), isinstance(err, BadInput)
    except BaseException as err:  # noqa: BLE001 - reported to the other ranks, then re-raised here
        error, own = f"internal error ({type(err).__name__}: {err})", err
    wait_for_all(comm)
    errors = comm.allgather((error, bad_input))
    failed = [(rank, message) for rank, (message, _) in enumerate(errors) if message]
    if not failed:
        return result
    if own is not None:
        raise own
    rank, message = failed[0]
    raise RankFailed(message if comm.size == 1 else f"{message} (rank {rank} of {comm.size}, {what})",
                     bad_input=any(bad for _, bad in errors))


# ------------------------------------------------------------------ planning


@dataclass(frozen=True)
class StructureInfo:
    """What the planner needs to know of one structure before featurizing it."""

    file: str  # absolute path
    frame: int  # index inside multi-frame files, 0 for XSF
    num_atoms: int
    volume: float  # Å^3, 0 for isolated structures


def _info(structures: list[Structure], path: str) -> list[StructureInfo]:
    return [
        StructureInfo(path, k, s.num_atoms, float(abs(np.linalg.det(s.cell))) if s.pbc else 0.0) for k, s in enumerate(structures)
    ]


def estimate_rows_per_atom(info: StructureInfo, cutoff: float) -> float:
    """Expected number of atoms moving one atom's descriptor (itself included)."""
    if info.volume <= 0:
        return float(info.num_atoms)
    in_sphere = info.num_atoms / info.volume * 4.0 / 3.0 * math.pi * cutoff**3
    return float(min(info.num_atoms, 1.0 + in_sphere))


def estimate_bytes(info: StructureInfo, with_derivs: bool, num_features: int, cutoff: float, deriv_itemsize: int) -> float:
    """Uncompressed bytes this structure adds to the store (descriptors, positions, derivative rows)."""
    per_atom = num_features * 8 + 3 * 8 * 2 + 8
    rows = info.num_atoms * estimate_rows_per_atom(info, cutoff) if with_derivs else 0.0
    return info.num_atoms * per_atom + rows * (num_features * 3 * deriv_itemsize + 8)


def choose_force_structures(config: FeaturizeConfig, names: list[str]) -> np.ndarray:
    """Boolean mask of the structures that get derivatives.

    An explicit list (``force_structures``: names or basenames) wins; otherwise a
    deterministic ``force_percent`` share chosen by a permutation seeded with ``force_seed``.
    """
    num = len(names)
    if not config.forces:
        return np.zeros(num, dtype=bool)
    if config.force_structures is not None:
        wanted = {Path(n).name for n in config.force_structures}
        mask = np.array([Path(n).name in wanted for n in names], dtype=bool)
        unknown = wanted - {Path(n).name for n in names}
        if unknown:
            raise ValueError(f"force structure list names {len(unknown)} structures not in FILES, e.g. {sorted(unknown)[:3]}")
        return mask
    count = int(round(num * config.force_percent / 100.0))
    chosen = np.random.default_rng(config.force_seed).permutation(num)[:count]
    mask = np.zeros(num, dtype=bool)
    mask[chosen] = True
    return mask


def plan_blocks(costs: np.ndarray, chunk_bytes: int) -> np.ndarray:
    """First structure of each block (plus the total at the end): consecutive runs of ~chunk_bytes."""
    bounds = [0]
    acc = 0.0
    for s, c in enumerate(costs):  # a loop over structures, but only over floats: cheap planning
        if acc > 0 and acc + c > chunk_bytes:
            bounds.append(s)
            acc = 0.0
        acc += c
    bounds.append(len(costs))
    return np.array(bounds, dtype=np.int64)


def assign_blocks(block_costs: np.ndarray, num_ranks: int) -> list[list[int]]:
    """Greedy longest-processing-time assignment of blocks to ranks (deterministic)."""
    loads = np.zeros(num_ranks)
    owned: list[list[int]] = [[] for _ in range(num_ranks)]
    for b in np.argsort(-block_costs, kind="stable"):
        r = int(np.argmin(loads))
        owned[r].append(int(b))
        loads[r] += block_costs[b]
    return [sorted(o) for o in owned]


FINGERPRINT_OF = "file contents"  # what the fingerprint hashes; stores without this attribute hashed file sizes


def fingerprint(config: FeaturizeConfig, names: list[str], digests: list[str], force_mask: np.ndarray, options: StoreOptions) -> str:
    """sha256 of every input that changes the store's content (the structure files by their bytes)."""
    payload = {
        "schema": SCHEMA_VERSION,
        "species": list(config.species),
        "atomic_energies": {k: float(v) for k, v in config.atomic_energies.items()},
        "setups": {k: v.to_dict() for k, v in config.setups.items()},
        "files": names,
        "file_digests": digests,
        "force_mask": np.flatnonzero(force_mask).tolist(),
        "deriv_dtype": options.deriv_dtype,
        "chunk_bytes": options.chunk_bytes,
    }
    if options.compressor != "zstd":  # (zstd stores keep the fingerprints they had)
        payload["compressor"] = options.compressor
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------ writing


def _codecs(compressor: str, level: int) -> dict:
    """create_array's compressors for a StoreOptions.compressor.

    Every chunk carries a checksum: zstd's frame checksum (xxhash64 of the content), or a CRC32C
    after the other codecs. A flipped bit is then an error on read instead of a wrong number
    (one flip once decoded to values up to 6e99).
    """
    import zarr

    if compressor == "zstd":
        return {"compressors": zarr.codecs.ZstdCodec(level=level, checksum=True)}
    if compressor == "lz4":
        return {"compressors": (zarr.codecs.BloscCodec(cname="lz4", clevel=max(1, level), shuffle="shuffle"), zarr.codecs.Crc32cCodec())}
    return {"compressors": zarr.codecs.Crc32cCodec()}


ALL_CHUNKS_WRITTEN = "aenet_dist_all_chunks_written"
"""Array attribute: every chunk has a file (zarr skips chunks equal to the fill value), so a
missing chunk file is damage, not zeros."""


def _chunk_shape(data: np.ndarray, chunk_bytes: int) -> tuple[int, ...]:
    """Chunks of ~chunk_bytes along the first axis only (whole rows)."""
    row_bytes = max(1, data.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
    rows = max(1, min(data.shape[0] if data.ndim else 1, chunk_bytes // row_bytes))
    return (rows,) + tuple(max(1, n) for n in data.shape[1:])


def _write_array(group, name: str, data: np.ndarray, level: int, chunk_bytes: int = 4 * 2**20, compressor: str = "zstd") -> None:
    """One array, chunked along its first axis into pieces of ~chunk_bytes (zarr compresses them concurrently)."""
    data = np.ascontiguousarray(data)
    chunks = _chunk_shape(data, chunk_bytes)
    array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, **_codecs(compressor, level), fill_value=0,
                               attributes={ALL_CHUNKS_WRITTEN: True}, config={"write_empty_chunks": True})
    if data.size:
        array[...] = data


def _block_dir(root: Path, b: int) -> Path:
    return root / "blocks" / f"b{b:06d}"


# Per-structure and per-atom arrays of a block read for training (pbc and cell are not needed).
_PLAIN_DTYPES = {"bool", "int8", "uint8", "int32", "int64", "float32", "float64"}  # (uint8: the structure names)
_ZSTD = numcodecs.Zstd()
_BLOSC = numcodecs.Blosc()
_BLOCK_ARRAYS = ("num_atoms", "energy", "cohesive_energy", "has_derivs", "species", "pos", "forces")
_ELEMENT_ARRAYS = ("atom", "G", "deriv_center", "deriv_neighbor", "dG")  # per element of a block


def _plain_layout(meta: dict) -> tuple | None:
    """(codec names, shape, chunk shape, stored dtype, every chunk written, fill value) of an array
    in :func:`_write_array`'s layout, from its ``zarr.json``; None for any other layout."""
    codecs = meta.get("codecs", [])
    if (
        meta.get("zarr_format") != 3
        or meta.get("chunk_grid", {}).get("name") != "regular"
        or meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
        or [c.get("name") for c in codecs] not in (["bytes", "zstd"], ["bytes", "blosc", "crc32c"], ["bytes", "crc32c"])
        or codecs[0].get("configuration", {}).get("endian", "little") != "little"
        or meta.get("storage_transformers")
        or meta.get("data_type") not in _PLAIN_DTYPES
    ):
        return None
    shape = tuple(int(n) for n in meta["shape"])
    chunk = tuple(int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"])
    if not shape or len(chunk) != len(shape) or chunk[1:] != shape[1:] or chunk[0] < 1:
        return None
    return ([c.get("name") for c in codecs], shape, chunk, np.dtype(meta["data_type"]).newbyteorder("<"),
            bool(meta.get("attributes", {}).get(ALL_CHUNKS_WRITTEN)), meta.get("fill_value") or 0)


def _block_array_names(species: list[str]) -> list[str]:
    """The arrays of a block that training reads (pbc and cell are not needed), by path in the block."""
    return list(_BLOCK_ARRAYS) + [f"{e}/{name}" for e in species for name in _ELEMENT_ARRAYS]


def _array_meta(directory: str | Path) -> dict:
    """An array's parsed ``zarr.json``; a missing, unreadable or garbled one is a ValueError naming the file
    (json's own message gave no file, and a missing one went to train's handler of disk errors)."""
    path = f"{directory}/zarr.json"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: array metadata file is missing; {_DAMAGED}") from None
    except (ValueError, UnicodeDecodeError) as err:  # (json.JSONDecodeError is a ValueError)
        raise ValueError(f"{path}: damaged array metadata ({err}); {_DAMAGED}") from None
    if not isinstance(meta, dict) or meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
        raise ValueError(f"{path}: not the metadata of a Zarr v3 array; {_DAMAGED}")
    return meta


def _read_plain_array(directory: str | Path, cast_to=None, metas: dict | None = None, xyz_major: bool = False) -> np.ndarray | None:
    """A whole array written by :func:`_write_array`, read from its chunk files directly.

    zarr-python 3.1 spends about 1 ms of event-loop and buffer bookkeeping per chunk, three
    times the cost of decompressing it, and a training epoch in ``stream`` mode reads every
    chunk of the store. Arrays in exactly the layout this module writes (regular grid chunked
    along the first axis only, little-endian bytes, zstd, default chunk keys) are decoded here
    with numcodecs, the codec zarr itself uses; anything else returns None and goes through
    zarr. Every chunk's decoded length is checked before it is trusted.

    Whole chunks decode straight into the result, and a float array with ``cast_to`` (a numpy
    float dtype) is cast chunk by chunk from one reused chunk buffer: no second full-size copy,
    no float64 array the size of the block when a float32 one is wanted (a stream epoch reads
    the whole store; the extra passes and page faults were half of its reading time).

    ``xyz_major`` (a (P, F, 3) dG/dR array cast to another dtype): the result is a (P, F, 3) view of a
    (P, 3, F) array, the layout training contracts, so the cast's one pass also transposes, and the
    transposing copy a block's conversion made after it is gone (when no cast is asked for, the
    chunks decode in place and the conversion transposes, one pass either way).

    ``metas`` caches each array's layout (:func:`_plain_layout`) by path: a complete store does not change,
    and re-reading 20-odd small metadata files per block every epoch cost as much as reading the
    data when the store was not in the page cache (the case ``stream`` is for).
    """
    directory = str(directory)  # paths as strings: a stream epoch builds ~4 per chunk, and pathlib's cost showed
    layout = metas.get(directory, False) if metas is not None else False
    if layout is False:
        meta = _array_meta(directory)
        try:
            layout = _plain_layout(meta)
        except (AttributeError, TypeError, KeyError, ValueError) as err:  # valid JSON, but fields of the wrong kind
            raise ValueError(f"{directory}/zarr.json: damaged array metadata ({type(err).__name__}: {err}); {_DAMAGED}") from None
        if metas is not None:
            metas[directory] = layout
    if layout is None:
        return None
    names, shape, chunk, stored, every_chunk, fill = layout
    target = np.dtype(cast_to) if cast_to is not None and stored.kind == "f" else stored
    if xyz_major and target != stored and len(shape) == 3 and shape[2] == 3:
        out = np.empty((shape[0], 3, shape[1]), dtype=target).transpose(0, 2, 1)  # shape (P, F, 3), memory (P, 3, F)
        if not every_chunk:
            out[...] = fill
    else:
        out = np.empty(shape, dtype=target) if every_chunk else np.full(shape, fill, dtype=target)
    chunk_bytes = math.prod(chunk) * stored.itemsize
    tail = "/0" * (len(shape) - 1)
    scratch = None  # one chunk's bytes, for chunks that cannot decode in place
    for k in range(-(-shape[0] // chunk[0])):
        path = f"{directory}/c/{k}{tail}"
        first = k * chunk[0]
        rows = min(chunk[0], shape[0] - first)
        in_place = target == stored and rows == chunk[0]  # (an xyz_major result is always cast, never in place)
        if not in_place and scratch is None:
            scratch = np.empty(chunk_bytes, dtype=np.uint8)
        try:
            _decode_chunk(path, names, out[first : first + rows].reshape(-1).view(np.uint8) if in_place else scratch)
        except FileNotFoundError:
            if every_chunk:
                raise ValueError(f"{path}: chunk file is missing (the store is damaged); "
                                 "`aenet-dist featurize --verify` with the same inputs redoes the damaged blocks") from None
            continue  # older stores: zarr leaves chunks that equal the fill value unwritten
        if not in_place:
            out[first : first + rows] = scratch.view(stored).reshape(chunk)[:rows]  # casts where target differs
    return out


_CRC32C_RESIDUE = 0x48674BC7  # CRC-32C of any message followed by its CRC-32C (little-endian)
_DAMAGED = "the store is damaged: `aenet-dist featurize <generate.in> --out <store> --verify` with the same inputs repairs it"
_ZSTD_MAGIC = 0xFD2FB528


def _zstd_content_size(frame: bytes) -> int | None:
    """The decompressed size a zstd frame's header declares (RFC 8878, 3.1.1.1), None if it declares none.

    Decoding into a buffer of the expected size would hide a frame that is shorter than
    expected (the rest of the buffer keeps what it held), so the size is checked from the header.
    """
    if len(frame) < 5 or int.from_bytes(frame[:4], "little") != _ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    single_segment = bool(descriptor & 0x20)
    size_bytes = (0, 2, 4, 8)[descriptor >> 6] or (1 if single_segment else 0)
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 0x03]
    if size_bytes == 0 or len(frame) < start + size_bytes:
        return None
    return int.from_bytes(frame[start : start + size_bytes], "little") + (256 if size_bytes == 2 else 0)


_READ_BUFFER = threading.local()  # each reading thread's reused buffer for chunk files


def _file_buffer(size: int) -> np.ndarray:
    """``size`` bytes of this thread's reused read buffer (valid until the thread's next call).

    A new ``bytes`` per chunk file costs fresh pages, faulted in and handed back every time:
    reading the chunk files of a block that way took ten times as long as reading them into
    one reused buffer.
    """
    buffer = getattr(_READ_BUFFER, "array", None)
    if buffer is None or buffer.size < size:
        buffer = _READ_BUFFER.array = np.empty(max(size, 2**20), dtype=np.uint8)
    return buffer[:size]


def _read_exactly(f, out: np.ndarray) -> int:
    """Fill ``out`` (uint8) from the file ``f``; the number of bytes read (short at the end of the file)."""
    view, done = memoryview(out), 0
    while done < len(out):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def _decode_chunk(path: str, codecs: list[str], out: np.ndarray) -> None:
    """One chunk file's bytes through the codecs of :func:`_codecs` into ``out`` (uint8, exactly
    the chunk's size), every checksum and the decoded length verified."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if codecs[1:] == ["crc32c"]:  # uncompressed: the data straight into place, then their CRC32C
            if size != len(out) + 4:
                raise ValueError(f"{path}: chunk holds {size - 4} bytes, expected {len(out)} (damaged store)")
            crc = np.empty(4, dtype=np.uint8)
            if _read_exactly(f, out) != len(out) or _read_exactly(f, crc) != 4:
                raise ValueError(f"{path}: chunk file shorter than its size ({_DAMAGED})")
            if google_crc32c.value(out) != int.from_bytes(crc.tobytes(), "little"):
                raise ValueError(f"{path}: chunk checksum (CRC32C) does not match; {_DAMAGED}")
            return
        raw = _file_buffer(size)
        if _read_exactly(f, raw) != size:
            raise ValueError(f"{path}: chunk file shorter than its size ({_DAMAGED})")
    if codecs[-1] == "crc32c":  # zarr's Crc32cCodec: the data, then their CRC32C (4 bytes, little-endian)
        # The CRC32C of data followed by its own CRC32C is a constant: checked without slicing off a copy.
        if size < 4 or google_crc32c.value(raw) != _CRC32C_RESIDUE:
            raise ValueError(f"{path}: chunk checksum (CRC32C) does not match; {_DAMAGED}")
        raw = raw[:-4]
    try:
        if "zstd" in codecs:
            size = _zstd_content_size(raw[:18].tobytes())
            if size is None:  # not written by us (no size in the header): decode, then check
                decoded = _ZSTD.decode(raw)
                size = len(decoded)
                if size == len(out):
                    out[:] = np.frombuffer(decoded, dtype=np.uint8)
            if size != len(out):
                raise ValueError(f"{path}: chunk decodes to {size} bytes, expected {len(out)} (damaged store)")
            _ZSTD.decode(raw, out=out)
            return
        if "blosc" in codecs:
            size = int.from_bytes(raw[4:8].tobytes(), "little") if len(raw) >= 16 else -1  # blosc header: nbytes, uncompressed
            if size != len(out):
                raise ValueError(f"{path}: chunk decodes to {size} bytes, expected {len(out)} (damaged store)")
            _BLOSC.decode(raw, out=out)
            return
    except RuntimeError as err:  # numcodecs' report of a corrupt frame or a checksum mismatch
        raise ValueError(f"{path}: chunk cannot be decompressed ({err}); {_DAMAGED}") from err
    raise ValueError(f"{path}: codecs {codecs} are not ones this reader decodes")


def _read_arrays(directory: Path, names: list[str], cast: dict | None = None, metas: dict | None = None) -> dict[str, np.ndarray]:
    """Whole arrays of one block group: directly where possible (in the calling thread, so
    reader threads decode in parallel), the rest through zarr in one concurrent batch.
    ``cast`` maps names of float arrays to the numpy dtype they are wanted in; ``metas`` is
    :func:`_read_plain_array`'s metadata cache."""
    cast = cast or {}
    values = {}
    for name in names:
        array = _read_plain_array(f"{directory}/{name}", cast.get(name), metas, xyz_major=name.endswith("/dG"))
        if array is not None:
            values[name] = array
    rest = [name for name in names if name not in values]
    if rest:
        import zarr.core.sync

        read = zarr.core.sync.sync(_read_arrays_with_zarr(directory, rest))  # on zarr's own event loop
        values.update((name, array.astype(cast[name], copy=False) if name in cast else array) for name, array in read)
    return values


async def _read_arrays_with_zarr(directory: Path, names: list[str]) -> list[tuple[str, np.ndarray]]:
    import zarr.api.asynchronous

    # zarr's errors name no file ("Required key 'node_type' is missing ..."): each becomes one naming the array.
    zarr_errors = (ValueError, KeyError, TypeError, RuntimeError, OSError)
    try:
        group = await zarr.api.asynchronous.open_group(store=zarr.storage.LocalStore(directory, read_only=True), mode="r")
    except zarr_errors as err:
        raise ValueError(f"{directory}/zarr.json: cannot be read as a Zarr group ({type(err).__name__}: {err}); {_DAMAGED}") from None

    async def read(name: str) -> tuple[str, np.ndarray]:
        try:
            array = await group.getitem(name)
            return name, np.asarray(await array.getitem(...))
        except zarr_errors as err:
            raise ValueError(f"{directory}/{name}: cannot be read ({type(err).__name__}: {err}); {_DAMAGED}") from None

    return await asyncio.gather(*(read(name) for name in names))


def compute_block(
    structures: list[Structure], first: int, with_derivs: np.ndarray, config: FeaturizeConfig, options: StoreOptions
) -> tuple[dict[str, np.ndarray], dict]:
    """Featurize one block: the arrays of its group (keyed by path inside the group) and its attributes."""
    for s in structures:
        _check_forces(s, config)
    species_index, features = featurize(structures, config.setups, config.species, with_derivs)
    num_atoms = np.array([s.num_atoms for s in structures], dtype=np.int32)
    energy = np.array([s.energy for s in structures], dtype=np.float64)
    e_atom = np.array([config.atomic_energies[e] for e in config.species])
    cohesive = energy - np.add.reduceat(e_atom[species_index], np.r_[0, np.cumsum(num_atoms)[:-1]])
    arrays = {
        "num_atoms": num_atoms,
        "energy": energy,
        "cohesive_energy": cohesive,
        "pbc": np.array([s.pbc for s in structures], dtype=bool),
        "cell": np.stack([s.cell for s in structures]).astype(np.float64),
        "has_derivs": np.asarray(with_derivs, dtype=bool),
        "species": species_index.astype(np.int8),
        "pos": np.concatenate([s.pos for s in structures]),
        "forces": np.concatenate([s.forces if s.forces is not None else np.zeros_like(s.pos) for s in structures]),
    }
    partial = {}
    deriv_dtype = np.dtype(options.deriv_dtype)
    for element, f in features.items():
        G, atom_index = f.G, f.atom_index
        rows_of_atom = np.full(len(species_index), -1, dtype=np.int64)
        rows_of_atom[atom_index] = np.arange(len(G))
        arrays[f"{element}/atom"] = atom_index.astype(np.int32)
        arrays[f"{element}/G"] = G
        arrays[f"{element}/deriv_center"] = rows_of_atom[f.deriv_center].astype(np.int32)
        arrays[f"{element}/deriv_neighbor"] = f.deriv_neighbor.astype(np.int32)
        arrays[f"{element}/dG"] = f.dG.astype(deriv_dtype, copy=False)  # float64 stores: no copy of the largest array
        partial[element] = {
            "count": int(len(G)),
            "sum": G.sum(axis=0).tolist(),
            "sum_sq": (G * G).sum(axis=0).tolist(),
            "min": G.min(axis=0).tolist() if len(G) else None,
            "max": G.max(axis=0).tolist() if len(G) else None,
            "deriv_rows": int(f.dG.shape[0]),
        }
    attrs = {"first_structure": int(first), "num_structures": len(structures), "num_atoms": int(num_atoms.sum()), "partial_stats": partial}
    return arrays, attrs


# Writing a block without zarr. zarr-python spends about as long on its per-array and per-chunk
# bookkeeping (metadata objects, an event loop, a thread pool) as on compressing a block, and a
# featurize rank writes about 30 arrays per block. For the layout that :func:`_read_plain_array`
# reads (zstd, chunked along the first axis, every chunk written) the files are simple, so
# they are written here: the same bytes as zarr writes (tests/test_store.py compares them),
# zarr's JSON (indent 2) and each chunk padded with the fill value to the full chunk shape,
# compressed by numcodecs' Zstd as zarr's ZstdCodec does.


def _is_plain(data: np.ndarray) -> bool:
    """Whether :func:`_write_plain_array` writes ``data`` (a little-endian plain dtype, at least one axis)."""
    return data.ndim >= 1 and data.dtype.name in _PLAIN_DTYPES and data.dtype.byteorder in ("=", "<", "|")


def _write_json(path: Path, doc: dict) -> None:
    """A zarr.json document as zarr-python writes it (``json.dumps(indent=2, allow_nan=True)``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(doc, allow_nan=True, indent=2).encode())


def _write_plain_group(directory: Path, attrs: dict) -> None:
    """A group's zarr.json, as zarr writes it."""
    _write_json(directory / "zarr.json", {"attributes": attrs, "zarr_format": 3, "node_type": "group"})


def _plain_codecs(compressor: str, level: int, itemsize: int) -> tuple[list[dict], object]:
    """(zarr.json's codec list, the numcodecs codec or None) that :func:`_codecs` gives for ``compressor``."""
    # (zarr names no byte order for one-byte types)
    codecs = [{"name": "bytes"} if itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}]
    if compressor == "zstd":
        return codecs + [{"name": "zstd", "configuration": {"level": level, "checksum": True}}], numcodecs.Zstd(level=level, checksum=True)
    if compressor == "lz4":
        blosc = {"typesize": itemsize, "cname": "lz4", "clevel": max(1, level), "shuffle": "shuffle", "blocksize": 0}
        return codecs + [{"name": "blosc", "configuration": blosc}, {"name": "crc32c"}], \
            numcodecs.Blosc(cname="lz4", clevel=max(1, level), shuffle=numcodecs.Blosc.SHUFFLE)
    return codecs + [{"name": "crc32c"}], None


def _write_plain_array(directory: Path, data: np.ndarray, level: int, chunk_bytes: int = 4 * 2**20, compressor: str = "zstd") -> None:
    """The files :func:`_write_array` writes with ``compressor``, byte for byte, without zarr
    (through zarr, featurize spent more time writing lz4 or uncompressed blocks than computing them)."""
    data = np.ascontiguousarray(data)
    chunks = _chunk_shape(data, chunk_bytes)
    fill = False if data.dtype == bool else (0.0 if data.dtype.kind == "f" else 0)
    codecs, codec = _plain_codecs(compressor, level, data.itemsize)
    _write_json(directory / "zarr.json", {
        "shape": list(data.shape),
        "data_type": data.dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": codecs,
        "attributes": {ALL_CHUNKS_WRITTEN: True},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    })
    if not data.size:
        return  # zarr writes no chunk for an empty array
    rows = chunks[0]
    tail = "/0" * (data.ndim - 1)
    (directory / "c").mkdir()
    for k in range(-(-data.shape[0] // rows)):
        chunk = data[k * rows : (k + 1) * rows]
        if len(chunk) < rows:  # zarr stores the last chunk whole, padded with the fill value
            chunk = np.concatenate([chunk, np.zeros((rows - len(chunk),) + chunk.shape[1:], dtype=data.dtype)])
        path = directory / "c" / f"{k}{tail}"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = codec.encode(chunk) if codec is not None else np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
        with open(path, "wb") as f:
            f.write(body)
            if compressor != "zstd":  # zstd has its own frame checksum; the others end with a CRC32C (zarr's Crc32cCodec)
                f.write(google_crc32c.value(np.frombuffer(body, dtype=np.uint8)).to_bytes(4, "little"))


def write_block(root: Path, b: int, arrays: dict[str, np.ndarray], attrs: dict, level: int, compressor: str = "zstd") -> None:
    """Write one block group atomically: into a temporary directory, then rename it into place."""
    final = _block_dir(root, b)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if all(_is_plain(data) for data in arrays.values()):
            _write_plain_group(tmp, attrs)
            for path in {path.rpartition("/")[0] for path in arrays} - {""}:
                _write_plain_group(tmp / path, {})
            for path, data in arrays.items():
                _write_plain_array(tmp / path, data, level, compressor=compressor)
        else:
            import zarr

            group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
            for path, data in arrays.items():
                parent, _, name = path.rpartition("/")
                _write_array(group.require_group(parent) if parent else group, name, data, level, compressor=compressor)
            group.attrs.update(attrs)
        # The rename is the completion marker: a block directory either is complete or absent.
        if final.exists():  # one that lost its zarr.json (damage): counted as missing, so redone; rename cannot replace it
            if (final / "zarr.json").exists():  # complete: written meanwhile by another process, which must not lose it
                raise ValueError(f"{final}: was completed by another process while this one computed it; two featurize "
                                 "runs must not write one store (this run stops, the block stays as written)")
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # a full disk, Ctrl-C: no half-written directory left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _scan(paths: list[str], cache: dict[str, list[Structure]], config: FeaturizeConfig) -> tuple[list[StructureInfo], dict[str, str]]:
    """Atom counts and volumes of every structure in ``paths``, and each file's content digest.

    Keeps what it read in ``cache``. The digest (BLAKE2b of the bytes) goes into the store's
    fingerprint: an input edited in place, even to the same size, makes a different store.
    What can be checked here is (an element not in TYPES, missing forces): before the store is
    created, not after hours of blocks.
    """
    infos, digests = [], {}
    for p in paths:
        with open(p, "rb") as fh:
            digests[p] = hashlib.blake2b(fh.read(), digest_size=16).hexdigest()
        cache[p] = read_structures(p, config.species)
        for s in cache[p]:
            _check_forces(s, config)
        infos.extend(_info(cache[p], p))
    return infos, digests


def _check_forces(s: Structure, config: FeaturizeConfig) -> None:
    """Refuse a structure without forces when FORCES is set, or with forces for other atoms."""
    if s.forces is None and config.forces:
        raise ValueError(f"{s.name}: no forces, but FORCES is set in {config.source}")
    if s.forces is not None and s.forces.shape != s.pos.shape:
        raise ValueError(f"{s.name}: {len(s.forces)} force rows for {s.num_atoms} atoms")


def _read_range(infos: list[StructureInfo], start: int, stop: int, cache: dict[str, list[Structure]]) -> list[Structure]:
    """Structures start..stop-1, from ``cache`` (filled by the scan) or read now; drops them from the cache."""
    out: list[Structure] = []
    for info in infos[start:stop]:
        if info.file not in cache:
            cache[info.file] = read_structures(info.file)
        out.append(cache[info.file][info.frame])
    for info in infos[start:stop]:
        cache.pop(info.file, None)
    return out


def featurize_to_store(
    config: FeaturizeConfig, out: str | os.PathLike, options: StoreOptions = StoreOptions(), progress: bool = True,
    verify: bool = False,
) -> Path:
    """Featurize every structure of ``config`` into the Zarr store ``out`` (MPI-parallel when launched so).

    Resumable: blocks already present are skipped; the root metadata is completed last. A
    block whose directory has gone is featurized again, also in a complete store; ``verify``
    decodes every chunk and metadata file (checksums, lengths, missing files) and redoes damaged
    blocks and a damaged structure table. Raises ValueError if ``out`` holds a store made from
    different inputs (one that holds no completed block is replaced). When featurizing fails, a
    store this run created is removed if nothing in it can serve a rerun (see :func:`_remove_unfinished`).
    """
    comm = world_comm()
    rank, size = comm.rank, comm.size
    root = Path(out)
    start_time = time.perf_counter()
    if rank == 0:
        for problem in aenet_numbering_problems(config.setups, config.species):
            log.warning(problem)

    # 1. Scan the structure files (spread over ranks); choose the force structures.
    cache: dict[str, list[Structure]] = {}
    infos, names, digest_of = _scan_all(comm, config, cache)
    force_mask = choose_force_structures(config, names)

    # 2. Plan blocks from estimated bytes; assign them to ranks by cost.
    bounds, owned = _plan_blocks(config, options, infos, force_mask, size, rank)
    fp = fingerprint(config, names, [digest_of[f] for f in config.files], force_mask, options)

    # 3. Lock the store and create (or validate) the root group; rank 0 only, every rank learns how it went.
    with contextlib.ExitStack() as held:  # rank 0 holds the store's lock until this function returns

        def claim() -> tuple[bool, bool] | None:
            if rank == 0:
                # Beside the store, not in it: the store's files stay exactly what featurize writes.
                held.callback(_unlock_store, *_lock_store(root))
                # a directory that was there (empty, or a replaced store's) is the user's: kept if this run fails
                was_there = root.exists()
                return _init_root(root, config, fp, bounds, options, len(infos)), was_there
            return None

        # (rank 0: whether this run created the store, and whether its directory was there before)
        created = together(comm, "opening the store", claim)
        missing = _blocks_to_write(comm, root, bounds, owned, verify, list(config.species), fp)
        complete = _is_complete(root)
        table_damaged = False
        if verify and complete:  # an incomplete store gets its structure table from consolidation anyway
            table_damaged = comm.bcast(together(comm, "verifying the structure table",
                                                lambda: rank == 0 and not _table_is_intact(root, len(infos))))
        if complete and not missing and not table_damaged:
            if rank == 0:
                log.info("%s is already complete (same inputs)%s; nothing to do", root, ", every chunk intact" if verify else "")
            return root
        if complete and rank == 0 and missing:
            log.warning("%s: %d block(s) missing or damaged (%s); featurizing them again", root, len(missing), ", ".join(map(str, missing[:10])))
        if complete and rank == 0 and table_damaged:
            log.warning("%s: the structure table is damaged; writing it again from the blocks", root)

        # 4. Featurize the blocks this rank owns that are not yet complete.
        todo = [b for b in owned if b in missing]
        keep_files = {info.file for b in todo for info in infos[bounds[b] : bounds[b + 1]]}
        for f in [f for f in cache if f not in keep_files]:
            del cache[f]
        if len(owned) > len(todo) and rank == 0:
            log.info("resuming: %d of this rank's %d blocks already complete", len(owned) - len(todo), len(owned))
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            total = int(sum(bounds[b + 1] - bounds[b] for b in todo))
            bar = tqdm(total=total, unit="struct", desc=f"featurize (rank 0 of {size})", smoothing=0.1)
        try:  # (also the barrier before consolidation)
            together(comm, "featurizing its blocks",
                     lambda: _featurize_blocks(root, todo, bounds, infos, cache, force_mask, config, options, bar, fp))
        except BaseException as err:
            # Every rank has left its blocks when together raises (its allgather), except on an interrupt
            # that lands in the allgather itself: with other ranks, only RankFailed lets rank 0 clean up.
            if created and (size == 1 or isinstance(err, RankFailed)):
                _remove_unfinished(root, created_now=created[0], keep_directory=created[1],
                                   unusable=getattr(err, "bad_input", False))
            raise
        finally:
            if bar is not None:
                bar.close()

        # 5. Consolidate on rank 0: structure table, statistics, complete=True last.
        together(comm, "consolidating the store", lambda: consolidate(root, names) if rank == 0 else None)
        if rank == 0:
            log.info("featurized %d structures into %s in %.1f s", len(infos), root, time.perf_counter() - start_time)
        return root


def _lock_store(root: Path) -> tuple[int, Path]:
    """Take the store's lock, ``.<name>.lock`` beside it: (descriptor, path) for :func:`_unlock_store`.

    :func:`_unlock_store` removes the file (a user saw it left beside the store after every run),
    while still holding the lock; :func:`~aenet_dist.files.lock_file` checks that the file it locked
    is still the one at the path and tries again if not, so two runs never both hold it.
    """
    # The store's real path: two runs reaching one store by other paths (a symlink, ..) take one lock.
    real = Path(os.path.realpath(root))
    path = real.parent / f".{real.name}.lock"
    return lock_file(path, f"store {root}"), path


def _unlock_store(fd: int, path: Path) -> None:
    """Remove the lock file of :func:`_lock_store`, then release the lock (in this order: see there)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    unlock(fd)


def _remove_unfinished(root: Path, created_now: bool, keep_directory: bool, unusable: bool) -> None:
    """After featurizing failed: remove the store this run created if it holds no completed block, or
    if a structure cannot be featurized (``unusable``: no rerun of these inputs can finish it).

    Left behind, it would make the rerun with corrected inputs refuse it as made from different
    inputs. A store with completed blocks that a rerun of the same inputs can finish (a full disk,
    a lost file server), or that an earlier run made, stays; the log says so, and what to do.
    """
    done = sum((block / "zarr.json").exists() for block in (root / "blocks").glob("b*"))
    if not created_now or (done and not unusable):
        if done:
            log.warning("%s: kept, with %d completed block(s), for a rerun of the same inputs to finish; after changing "
                        "the inputs, remove it first (it would be refused as made from different inputs)", root, done)
        return  # (holding no block, a rerun with other inputs replaces it: _init_root)
    # Only this run's blocks (it created the store), and temporary directories of writers that have ended.
    shutil.rmtree(root / "blocks", ignore_errors=True)
    (root / "zarr.json").unlink(missing_ok=True)
    if not keep_directory:
        with contextlib.suppress(OSError):
            root.rmdir()
    log.info("%s: removed (%s)", root, f"{done} completed block(s), of inputs that cannot be featurized" if done
             else "it held no completed block")


def _scan_all(comm, config: FeaturizeConfig, cache: dict[str, list[Structure]]) -> tuple[list[StructureInfo], list[str], dict[str, str]]:
    """(every structure's info in FILES order, its name, file -> content digest), scanned by all ranks.

    Each rank reads a contiguous range of the files, so that the structures it scans (kept in
    ``cache``) are mostly those it featurizes; a file with several frames names them ``file@k``.
    """
    files, rank, size = list(config.files), comm.rank, comm.size
    mine = together(comm, "reading the structure files", lambda: _scan(files[len(files) * rank // size : len(files) * (rank + 1) // size], cache, config))
    per_file: dict[str, list[StructureInfo]] = {}
    digest_of: dict[str, str] = {}
    for part, digests in comm.allgather(mine):
        digest_of.update(digests)
        for info in part:
            per_file.setdefault(info.file, []).append(info)
    infos = [info for f in files for info in per_file[f]]
    base = Path(config.source).parent if config.source else Path(".")
    names = [os.path.relpath(i.file, base) + (f"@{i.frame}" if len(per_file[i.file]) > 1 else "") for i in infos]
    return infos, names, digest_of


def _plan_blocks(config: FeaturizeConfig, options: StoreOptions, infos: list[StructureInfo], force_mask: np.ndarray,
                 size: int, rank: int) -> tuple[np.ndarray, list[int]]:
    """(block bounds over the structures, the blocks this rank writes), from estimated bytes and cost."""
    num_features = max(s.num_features for s in config.setups.values())
    cutoff = max(s.basis.max_cutoff for s in config.setups.values())
    # Sizes in float64 terms whatever dG is stored in: a --deriv-dtype float32 store then has the
    # blocks of the float64 one, so training plans (shards, shuffle windows) and batches are the same.
    costs = np.array([estimate_bytes(i, m, num_features, cutoff, 8) for i, m in zip(infos, force_mask)])
    bounds = plan_blocks(costs, options.chunk_bytes)
    block_costs = np.add.reduceat(costs, bounds[:-1]) if len(bounds) > 1 else np.zeros(0)
    return bounds, assign_blocks(block_costs, size)[rank]


def _blocks_to_write(comm, root: Path, bounds: np.ndarray, owned: list[int], verify: bool, species: list[str], fp: str) -> list[int]:
    """Blocks without their metadata, blocks of other inputs and, with ``verify``, damaged ones (those
    two removed by their owner), on every rank."""
    missing = [b for b in range(len(bounds) - 1) if not (_block_dir(root, b) / "zarr.json").exists()]
    # A block records the fingerprint of the inputs it was made from: one written by a process of an
    # earlier run (a rank left running after its run failed) into a store since restarted with other
    # inputs is redone, not taken for this run's. (Blocks of older versions record none: kept.)
    # (read on rank 0, told to the others: one read of each block's metadata, not one per rank)
    foreign = comm.bcast([b for b in range(len(bounds) - 1) if b not in missing and _block_fingerprint(root, b) not in (None, fp)]
                         if comm.rank == 0 else None)
    for b in foreign:
        if b in owned:
            log.warning("%s: block %d was made from other inputs; featurizing it again", root, b)
            shutil.rmtree(_block_dir(root, b))
    missing = sorted(set(missing) | set(foreign))
    if verify:
        damaged = together(comm, "verifying the store",
                           lambda: [b for b in owned if b not in missing and not _block_is_intact(root, b, species, bounds)])
        for b in damaged:  # each rank removes only the blocks it owns (and will redo)
            log.warning("%s: block %d is damaged; featurizing it again", root, b)
            shutil.rmtree(_block_dir(root, b))
        missing = sorted(set(missing) | {b for part in comm.allgather(damaged) for b in part})
    return missing


def _block_fingerprint(root: Path, b: int) -> str | None:
    """The inputs' fingerprint block ``b`` records (None: none recorded, or metadata that does not parse,
    which ``--verify`` repairs)."""
    try:
        return store_attrs(_block_dir(root, b)).get("fingerprint")
    except (OSError, ValueError):
        return None


def _featurize_blocks(root: Path, todo: list[int], bounds: np.ndarray, infos: list[StructureInfo], cache, force_mask: np.ndarray,
                      config: FeaturizeConfig, options: StoreOptions, bar, fp: str) -> None:
    """Compute and write the blocks ``todo`` in order (computing and compressing share the rank's core: one after the other)."""
    for b in todo:
        first, stop = int(bounds[b]), int(bounds[b + 1])
        structures = _read_range(infos, first, stop, cache)
        try:
            arrays, attrs = compute_block(structures, first, force_mask[first:stop], config, options)
        except ValueError as err:  # (its reading and writing are not in here: a lost file server is no BadInput)
            raise BadInput(str(err)) from None
        write_block(root, b, arrays, {**attrs, "fingerprint": fp}, options.compressor_level, options.compressor)
        if bar is not None:
            bar.update(stop - first)


def _init_root(root: Path, config: FeaturizeConfig, fp: str, bounds: np.ndarray, options: StoreOptions, num_structures: int) -> bool:
    """Create the store's root group, or check that the one there is of the same inputs; True if this call wrote it.

    A store of other inputs that holds no completed block (its featurize failed or was killed before
    finishing one) is replaced: there is nothing in it to keep. Rank 0 calls this holding the store's
    lock and before any rank of this run writes a block (``together``'s allgather follows), so the
    temporary block directories it removes are those of killed writers, never of a live one.
    """
    if (root / "zarr.json").exists():
        attrs = store_attrs(root)
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{root}: exists and is not an aenet_dist store; choose another --out")
        fresh = attrs.get("fingerprint") != fp
        if fresh and not _holds_nothing(root, attrs):
            older = "" if attrs.get("fingerprint_of") == FINGERPRINT_OF else (
                " (or by an older aenet_dist, whose fingerprint covered file sizes, not contents, and whose chunks carry "
                "no checksums: featurize it again)")
            raise ValueError(
                f"{root}: exists but was made from different inputs{older} (fingerprint {attrs.get('fingerprint', '?')[:12]} "
                f"!= {fp[:12]}); remove it or choose another --out"
            )
        if fresh:
            log.warning("%s: holds no completed block of its inputs (fingerprint %s); starting it again with these inputs",
                        root, str(attrs.get("fingerprint", "?"))[:12])
    else:
        fresh = True
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"{root}: exists, is not empty and is not a Zarr store; choose another --out")
    if fresh:
        _write_root_attrs(
            root,
            {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "species": list(config.species),
                "atomic_energies": {k: float(config.atomic_energies[k]) for k in config.species},
                "setups": {k: config.setups[k].to_dict() for k in config.species},
                "num_features": {k: config.setups[k].num_features for k in config.species},
                "fingerprint": fp,
                "fingerprint_of": FINGERPRINT_OF,
                "block_first": bounds.tolist(),
                "num_structures": num_structures,
                "deriv_dtype": options.deriv_dtype,
                "complete": False,
            },
        )
    (root / "blocks").mkdir(exist_ok=True)
    for stale in (root / "blocks").glob(".*.tmp-*"):  # write_block's, of a killed rank (kill -9, a lost node)
        shutil.rmtree(stale, ignore_errors=True)
    return fresh


def _holds_nothing(root: Path, attrs: dict) -> bool:
    """Whether the store at ``root`` is only what :func:`_init_root` writes: incomplete, no completed block, nothing else."""
    return (not attrs.get("complete") and {p.name for p in root.iterdir()} <= {"zarr.json", "blocks"}
            and not any((root / "blocks").glob("b*")))


def _block_is_intact(root: Path, b: int, species: list[str], bounds: np.ndarray) -> bool:
    """Block ``b`` is whole: its group metadata parse, every array featurize writes decodes (frame
    checksums, lengths, no missing chunk or metadata file) and their sizes agree with each other."""
    directory = _block_dir(root, b)
    try:
        attrs = store_attrs(directory, _DAMAGED)
        for e in species:
            store_attrs(directory / e, _DAMAGED)
        # The list of what should be there, not what is: an array whose metadata has gone is damage too.
        names = _block_array_names(species) + ["pbc", "cell"]
        values = _read_arrays(directory, names)
        n = int(bounds[b + 1] - bounds[b])
        _check_block_sizes(directory, values, species, n)
        counts = [(attrs["first_structure"], int(bounds[b])), (attrs["num_structures"], n), (attrs["num_atoms"], len(values["pos"]))]
        for e in species:
            stats = attrs["partial_stats"][e]
            counts += [(stats["count"], len(values[f"{e}/G"])), (stats["deriv_rows"], len(values[f"{e}/dG"]))]
        if any(stored != found for stored, found in counts):
            raise ValueError(f"{directory / 'zarr.json'}: the block's attributes disagree with its arrays; {_DAMAGED}")
    except (KeyError, TypeError) as err:  # attributes missing or of the wrong kind
        log.warning("%s: damaged block attributes (%s: %s)", directory / "zarr.json", type(err).__name__, err)
        return False
    except (ValueError, OSError, RuntimeError) as err:
        log.warning("%s", err)
        return False
    return True


def _check_block_sizes(directory: Path, values: dict[str, np.ndarray], species: list[str], n: int) -> None:
    """Refuse a block of ``n`` structures whose arrays (those in ``values``) disagree in length: an
    edited shape in a zarr.json reads without a checksum error, and went on as wrong data."""
    a = int(values["num_atoms"].sum())
    expected = {name: n for name in ("num_atoms", "energy", "cohesive_energy", "pbc", "cell", "has_derivs")}
    expected |= {name: a for name in ("species", "pos", "forces")}
    for e in species:
        expected[f"{e}/G"] = len(values[f"{e}/atom"])
        expected[f"{e}/deriv_neighbor"] = expected[f"{e}/dG"] = len(values[f"{e}/deriv_center"])
    wrong = [name for name, rows in expected.items() if name in values and len(values[name]) != rows]
    if wrong:
        raise ValueError(f"{directory}/{wrong[0]}: {len(values[wrong[0]])} rows where the block has {expected[wrong[0]]}; {_DAMAGED}")


def _table_is_intact(root: Path, num_structures: int) -> bool:
    """The root's ``structures/`` table decodes, every array has its length and the atom offsets add up."""
    try:
        store_attrs(root / "structures", _DAMAGED)
        table = _read_structure_table(root, num_structures)
        if not np.array_equal(table["atom_offset"], np.r_[0, np.cumsum(table["num_atoms"], dtype=np.int64)]):
            raise ValueError(f"{root / 'structures' / 'atom_offset'}: does not add up the atom counts; {_DAMAGED}")
    except (ValueError, OSError, RuntimeError) as err:
        log.warning("%s", err)
        return False
    return True


def store_attrs(root: str | os.PathLike, advice: str = "remove the store or choose another --out") -> dict:
    """The group attributes of the store (or one of its groups) at ``root``, read from its zarr.json
    (ValueError naming the file, followed by ``advice``, if it is damaged)."""
    path = Path(root) / "zarr.json"
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: damaged store metadata ({err}); {advice}") from None
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or not isinstance(meta.get("attributes", {}), dict):
        raise ValueError(f"{path}: not the metadata of a Zarr group; {advice}")
    return dict(meta.get("attributes", {}))


def _write_root_attrs(root: Path, attrs: dict) -> None:
    """The root group's zarr.json with ``attrs``, as zarr writes it, replaced atomically."""
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "zarr.json", json.dumps({"attributes": attrs, "zarr_format": 3, "node_type": "group"}, allow_nan=True, indent=2))


def _is_complete(root: Path) -> bool:
    return bool(store_attrs(root).get("complete"))


def consolidate(root: Path, names: list[str]) -> None:
    """Merge per-block tables and statistics into the root; sets ``complete`` last."""
    attrs = store_attrs(root)
    if attrs.get("complete"):  # redoing blocks or the table of a complete store: killed while at it, it must not pass as complete
        _write_root_attrs(root, attrs | {"complete": False})
    bounds = np.array(attrs["block_first"])
    species = attrs["species"]
    parts: dict[str, list] = {k: [] for k in ("num_atoms", "energy", "cohesive_energy", "has_derivs")}
    rows_per_structure = []
    sums: dict[str, dict | None] = {e: None for e in species}
    for b in range(len(bounds) - 1):
        block_dir = _block_dir(root, b)
        if not block_dir.exists():
            raise ValueError(f"{root}: block {b} is missing; rerun featurize to finish the store")
        block = _read_arrays(block_dir, list(parts) + [f"{e}/{name}" for e in species for name in ("atom", "deriv_center")])
        for key in parts:
            parts[key].append(block[key])
        rows_per_structure.append(_block_deriv_rows(block, species))
        partial_stats = store_attrs(block_dir, _DAMAGED)["partial_stats"]
        for e in species:
            sums[e] = _add_partial_stats(sums[e], partial_stats[e])
    table = {k: np.concatenate(v) for k, v in parts.items()}
    num_atoms = table["num_atoms"].astype(np.int64)
    per_atom = table["cohesive_energy"] / np.maximum(num_atoms, 1)
    _write_structure_table(root, table, num_atoms, bounds, rows_per_structure, names)
    attrs.update(
        {
            "num_atoms": int(num_atoms.sum()),
            "num_force_structures": int(table["has_derivs"].sum()),
            "num_deriv_rows": {e: int(sums[e]["deriv_rows"]) for e in species},
            "stats": {e: _final_stats(sums[e]) for e in species},
            "energy_per_atom": {"min": float(per_atom.min()), "max": float(per_atom.max()), "mean": float(per_atom.mean())},
            "complete": True,
        }
    )
    _write_root_attrs(root, attrs)


def _block_deriv_rows(block: dict[str, np.ndarray], species: list[str]) -> np.ndarray:
    """(S_b,) int64 number of derivative rows of each structure of one block (its arrays by path), over all elements."""
    num_atoms = block["num_atoms"]
    atom_structure = np.repeat(np.arange(len(num_atoms)), num_atoms)
    rows = np.zeros(len(num_atoms), dtype=np.int64)
    for e in species:
        center_atom = block[f"{e}/atom"][block[f"{e}/deriv_center"]]
        rows += np.bincount(atom_structure[center_atom], minlength=len(num_atoms))
    return rows


def _add_partial_stats(total: dict | None, p: dict) -> dict:
    """Add one block's partial statistics ``p`` of an element to the running ``total`` (None before the first block)."""
    if total is None:
        width = len(p["sum"])
        total = {"sum": np.zeros(width), "sum_sq": np.zeros(width), "min": np.full(width, np.inf), "max": np.full(width, -np.inf)}
        total |= {"count": 0, "deriv_rows": 0}
    total["sum"] += np.array(p["sum"])
    total["sum_sq"] += np.array(p["sum_sq"])
    if p["min"] is not None:  # a block without atoms of this element has no min/max
        total["min"] = np.minimum(total["min"], p["min"])
        total["max"] = np.maximum(total["max"], p["max"])
    total["count"] += p["count"]
    total["deriv_rows"] += p["deriv_rows"]
    return total


def _final_stats(s: dict) -> dict:
    """The stored per-feature statistics (count, min, max, mean, mean_sq, std) from summed partial statistics."""
    count = max(s["count"], 1)
    mean = s["sum"] / count
    mean_sq = s["sum_sq"] / count
    return {
        "count": int(s["count"]),
        # An element with no atoms keeps ±inf bounds; store 0 instead (JSON has no inf).
        "min": np.where(np.isfinite(s["min"]), s["min"], 0.0).tolist(),
        "max": np.where(np.isfinite(s["max"]), s["max"], 0.0).tolist(),
        "mean": mean.tolist(),
        "mean_sq": mean_sq.tolist(),
        "std": np.sqrt(np.maximum(mean_sq - mean * mean, 0.0)).tolist(),
    }


def _write_structure_table(root: Path, table: dict[str, np.ndarray], num_atoms: np.ndarray, bounds: np.ndarray,
                           rows_per_structure: list[np.ndarray], names: list[str]) -> None:
    """(Re)write the root's ``structures/`` arrays: per-structure sizes, energies, block and names."""
    name_bytes = [n.encode() for n in names]
    sgroup = root / "structures"
    _write_plain_group(sgroup, {})  # (also when it is there: --verify found it damaged)
    level = 1
    for key, data in {
        "num_atoms": num_atoms,
        "atom_offset": np.r_[0, np.cumsum(num_atoms)],
        "energy": table["energy"],
        "cohesive_energy": table["cohesive_energy"],
        "has_derivs": table["has_derivs"],
        "block": np.repeat(np.arange(len(bounds) - 1), np.diff(bounds)).astype(np.int32),
        "num_deriv_rows": np.concatenate(rows_per_structure) if rows_per_structure else np.zeros(0, dtype=np.int64),
        "name_bytes": np.frombuffer(b"".join(name_bytes), dtype=np.uint8),
        "name_offset": np.r_[0, np.cumsum([len(n) for n in name_bytes])].astype(np.int64),
    }.items():
        shutil.rmtree(sgroup / key, ignore_errors=True)
        _write_plain_array(sgroup / key, data, level)


_TABLE_ARRAYS = ("num_atoms", "atom_offset", "energy", "cohesive_energy", "has_derivs", "block", "num_deriv_rows",
                 "name_bytes", "name_offset")


def _read_structure_table(root: Path, num_structures: int, names: tuple[str, ...] = _TABLE_ARRAYS) -> dict[str, np.ndarray]:
    """Arrays of the root's ``structures/`` table, each checked for its length (ValueError naming the damaged one)."""
    values = _read_arrays(root / "structures", list(names))
    lengths = {"atom_offset": num_structures + 1, "name_offset": num_structures + 1}
    if "name_bytes" in values and "name_offset" in values:
        lengths["name_bytes"] = int(values["name_offset"][-1]) if len(values["name_offset"]) else -1
    for name, array in values.items():
        if array.ndim != 1 or len(array) != lengths.get(name, num_structures):
            raise ValueError(f"{root / 'structures' / name}: shape {array.shape} does not fit the store's {num_structures} "
                             f"structures; {_DAMAGED}")
    return values


# ------------------------------------------------------------------ reading


@dataclass
class ElementRows:
    """One element's data within a range of structures (indices local to the range)."""

    atom: np.ndarray  # (a_El,) int64 range-local atom index of each descriptor row
    G: np.ndarray  # (a_El, F) float64 raw descriptors
    deriv_center: np.ndarray  # (p,) int64 row of G
    deriv_neighbor: np.ndarray  # (p,) int64 range-local atom index
    dG: np.ndarray  # (p, F, 3)


@dataclass
class StructureRange:
    """Everything stored for structures [start, stop), with range-local indices."""

    start: int
    stop: int
    num_atoms: np.ndarray  # (n,) int64
    energy: np.ndarray  # (n,) float64 total energy, eV
    cohesive_energy: np.ndarray  # (n,) float64, eV
    has_derivs: np.ndarray  # (n,) bool
    species: np.ndarray  # (a,) int64 type index
    pos: np.ndarray  # (a, 3)
    forces: np.ndarray  # (a, 3)
    elements: dict[str, ElementRows]


class StoreReader:
    """Read-only access to a complete store; reads only the blocks a range touches."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise ValueError(f"{self.path}: no Zarr store here (run `aenet-dist featurize` first)")
        try:
            json.loads((self.path / "zarr.json").read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.path / 'zarr.json'}: damaged store metadata ({err}); featurize the store again") from None
        import zarr

        self.group = zarr.open_group(zarr.storage.LocalStore(self.path), mode="r")
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not an aenet_dist store")
        if self.attrs.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{self.path}: store schema {self.attrs.get('schema_version')} but this version reads {SCHEMA_VERSION}")
        if not self.attrs.get("complete"):
            raise ValueError(f"{self.path}: store is incomplete (featurize was interrupted); rerun the same featurize command to finish it")
        self.species: list[str] = list(self.attrs["species"])
        self.block_first = np.array(self.attrs["block_first"], dtype=np.int64)
        self._metas: dict = {}  # parsed zarr.json of the block arrays read so far (a complete store does not change)
        # Read like the blocks (not through zarr): a damaged chunk or metadata file is an error naming it.
        table = _read_structure_table(self.path, self.num_structures, ("num_atoms", "atom_offset", "has_derivs",
                                                                        "num_deriv_rows", "cohesive_energy", "energy"))
        self.num_atoms = table["num_atoms"].astype(np.int64)
        self.atom_offset = table["atom_offset"].astype(np.int64)
        self.has_derivs = table["has_derivs"]
        self.num_deriv_rows = table["num_deriv_rows"].astype(np.int64)
        self.cohesive_energy = table["cohesive_energy"]
        self.energy = table["energy"]

    @property
    def num_structures(self) -> int:
        return int(self.attrs["num_structures"])

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    def facts(self) -> dict:
        """What a model and its .nn files need of this store, as plain data (a few KB).

        Species, descriptor setups and feature counts, the float64 descriptor statistics, atomic
        and per-atom energies, training-set size, path and fingerprint. Checkpoints carry it, so
        export and plot rebuild the model without the store.
        """
        keys = ("species", "setups", "num_features", "stats", "atomic_energies", "energy_per_atom", "num_atoms")
        facts = {k: self.attrs[k] for k in keys}
        facts.update(num_structures=int(self.num_structures), store_path=str(self.path), fingerprint=self.fingerprint)
        return facts

    def names(self) -> list[str]:
        table = _read_structure_table(self.path, self.num_structures, ("name_bytes", "name_offset"))
        raw = table["name_bytes"].tobytes()
        off = table["name_offset"]
        return [raw[a:b].decode() for a, b in zip(off[:-1], off[1:])]

    def read_block(self, b: int, feature_dtype=None) -> StructureRange:
        """One whole block; G and dG cast to ``feature_dtype`` (a numpy dtype) if given.

        Arrays in this module's own layout are decoded directly (:func:`_read_plain_array`):
        through zarr's synchronous API, per-array and per-chunk bookkeeping was about two
        thirds of the time of reading a block.
        """
        directory = _block_dir(self.path, b)
        if not (directory / "zarr.json").exists():
            raise ValueError(f"{self.path}: block {b} ({directory}) is missing (the store is damaged); rerun featurize "
                             "with the same inputs to redo it")
        cast = {} if feature_dtype is None else {f"{e}/{name}": feature_dtype for e in self.species for name in ("G", "dG")}
        values = _read_arrays(directory, self._block_array_names, cast, self._metas)
        _check_block_sizes(directory, values, self.species, int(self.block_first[b + 1] - self.block_first[b]))
        elements = {}
        for e in self.species:
            elements[e] = ElementRows(
                atom=values[f"{e}/atom"].astype(np.int64),
                G=values[f"{e}/G"],
                deriv_center=values[f"{e}/deriv_center"].astype(np.int64),
                deriv_neighbor=values[f"{e}/deriv_neighbor"].astype(np.int64),
                dG=values[f"{e}/dG"],
            )
        first = int(self.block_first[b])
        return StructureRange(
            start=first,
            stop=int(self.block_first[b + 1]),
            num_atoms=values["num_atoms"].astype(np.int64),
            energy=values["energy"],
            cohesive_energy=values["cohesive_energy"],
            has_derivs=values["has_derivs"],
            species=values["species"].astype(np.int64),
            pos=values["pos"],
            forces=values["forces"],
            elements=elements,
        )

    @property
    def _block_array_names(self) -> list[str]:
        return _block_array_names(self.species)

    def read_range(self, start: int, stop: int, feature_dtype=None) -> StructureRange:
        """Structures [start, stop): reads the blocks that overlap, then trims and re-indexes.

        ``feature_dtype`` casts G and dG block by block as they are read, so a float32
        training shard never holds the whole range in float64 (half the peak memory).
        """
        if not 0 <= start <= stop <= self.num_structures:
            raise ValueError(f"{self.path}: structure range [{start}, {stop}) outside [0, {self.num_structures})")
        first_block = int(np.searchsorted(self.block_first, start, side="right") - 1)
        last_block = int(np.searchsorted(self.block_first, stop, side="left"))
        blocks = [self.read_block(b, feature_dtype) for b in range(max(first_block, 0), max(last_block, first_block + 1))]
        whole = blocks[0] if len(blocks) == 1 else concat_ranges(blocks, self.species)  # one block: no copy
        return _trim(whole, start, stop)


def _concatenated_rows(arrays: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate`` along rows, keeping the parts' memory layout (dG/dR read as (P, 3, F) under
    (P, F, 3)): an empty part, contiguous either way, would make numpy fall back to C order."""
    filled = [a for a in arrays if len(a)]
    return np.concatenate(filled) if filled else arrays[0]


def concat_ranges(parts: list[StructureRange], species: list[str]) -> StructureRange:
    """Concatenate consecutive ranges, shifting their local indices."""
    atom_shift = np.cumsum([0] + [len(p.species) for p in parts])
    elements = {}
    for e in species:
        row_shift = np.cumsum([0] + [len(p.elements[e].G) for p in parts])
        elements[e] = ElementRows(
            atom=np.concatenate([p.elements[e].atom + atom_shift[k] for k, p in enumerate(parts)]),
            G=np.concatenate([p.elements[e].G for p in parts]),
            deriv_center=np.concatenate([p.elements[e].deriv_center + row_shift[k] for k, p in enumerate(parts)]),
            deriv_neighbor=np.concatenate([p.elements[e].deriv_neighbor + atom_shift[k] for k, p in enumerate(parts)]),
            dG=_concatenated_rows([p.elements[e].dG for p in parts]),
        )
    cat = lambda key: np.concatenate([getattr(p, key) for p in parts])  # noqa: E731
    return StructureRange(
        start=parts[0].start,
        stop=parts[-1].stop,
        num_atoms=cat("num_atoms"),
        energy=cat("energy"),
        cohesive_energy=cat("cohesive_energy"),
        has_derivs=cat("has_derivs"),
        species=cat("species"),
        pos=cat("pos"),
        forces=cat("forces"),
        elements=elements,
    )


def _trim(r: StructureRange, start: int, stop: int) -> StructureRange:
    """Keep structures [start, stop) of a range that covers them."""
    if r.start == start and r.stop == stop:
        return r
    return dataclasses.replace(select_structures(r, np.arange(start - r.start, stop - r.start)), start=start, stop=stop)


def select_structures(r: StructureRange, positions: np.ndarray) -> StructureRange:
    """The structures at sorted range-local ``positions`` of ``r``, re-indexed.

    The result no longer covers a contiguous store range: ``start``/``stop`` keep ``r``'s,
    and a caller that needs store indices takes them from ``r.start + positions``.
    """
    keep = np.zeros(len(r.num_atoms), dtype=bool)
    keep[positions] = True
    keep_atom = np.repeat(keep, r.num_atoms)
    new_atom = np.cumsum(keep_atom) - 1
    elements = {}
    for e, el in r.elements.items():
        keep_rows = keep_atom[el.atom]
        new_row = np.cumsum(keep_rows) - 1
        keep_deriv = keep_rows[el.deriv_center] if len(el.deriv_center) else np.zeros(0, dtype=bool)
        elements[e] = ElementRows(
            atom=new_atom[el.atom[keep_rows]],
            G=el.G[keep_rows],
            deriv_center=new_row[el.deriv_center[keep_deriv]],
            deriv_neighbor=new_atom[el.deriv_neighbor[keep_deriv]],
            dG=el.dG[keep_deriv],
        )
    return StructureRange(
        start=r.start,
        stop=r.stop,
        num_atoms=r.num_atoms[keep],
        energy=r.energy[keep],
        cohesive_energy=r.cohesive_energy[keep],
        has_derivs=r.has_derivs[keep],
        species=r.species[keep_atom],
        pos=r.pos[keep_atom],
        forces=r.forces[keep_atom],
        elements=elements,
    )


def without_derivatives(r: StructureRange, drop: np.ndarray) -> StructureRange:
    """``r`` with the derivative rows of the structures where ``drop`` (per structure, bool) removed.

    Their ``has_derivs`` becomes False: they train on energies only, and no force is computed
    for them (``data.force_percent``).
    """
    if not drop.any():
        return r
    drop_atom = np.repeat(drop, r.num_atoms)
    elements = {}
    for e, el in r.elements.items():
        keep = ~drop_atom[el.atom[el.deriv_center]] if len(el.deriv_center) else np.zeros(0, dtype=bool)
        elements[e] = ElementRows(el.atom, el.G, el.deriv_center[keep], el.deriv_neighbor[keep], el.dG[keep])
    return dataclasses.replace(r, has_derivs=np.asarray(r.has_derivs, dtype=bool) & ~drop, elements=elements)
