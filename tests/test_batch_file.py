"""Kept batches on disk (aenet_dist.batch_file): a written batch reads back bit for bit, and a
damaged or partial file is refused with a message naming it, never trusted."""

import struct

import numpy as np
import pytest
import torch

from aenet_dist.batch_file import MAGIC, BatchFile, BatchFileError, BatchFileWriter
from aenet_dist.batching import gather_batch, shard_from_range
from aenet_dist.store import StoreReader
from helpers import featurized_emt


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Batches of a small EMT store: dense blocks and sparse rows, with and without forces."""
    _, store = featurized_emt(tmp_path_factory.mktemp("bf"), 12, seed=3, force_percent=50.0)
    reader = StoreReader(store)
    part = reader.read_range(0, reader.num_structures, np.float32)
    dense = shard_from_range(part, torch.float32)
    sparse = shard_from_range(part, torch.float32, dense_blocks=False)
    out = [gather_batch(dense, torch.tensor([0, 3, 5, 7])), gather_batch(sparse, torch.tensor([1, 2, 8, 11])),
           gather_batch(dense, torch.tensor([4, 6]), with_forces=False)]
    assert any(b.dense for b in out) and any(b.deriv for b in out)
    return out


def _fields(batch):
    """Every tensor of a batch under a name, for comparison."""
    items = {"structure_index": batch.structure_index, "num_atoms": batch.num_atoms, "energy": batch.energy}
    items.update({f"G{e}": t for e, t in batch.G.items()})
    items.update({f"as{e}": t for e, t in batch.atom_structure.items()})
    for e, rows in batch.deriv.items():
        items.update({f"d{e}{k}": t for k, t in enumerate(rows)})
    for e, blocks in batch.dense.items():
        for k, b in enumerate(blocks):
            items.update({f"D{e}{k}rows": b.rows, f"D{e}{k}atoms": b.atoms, f"D{e}{k}D": b.D})
    for e, (rows, atoms) in batch.contract_index.items():
        items.update({f"ci{e}r": rows, f"ci{e}a": atoms})
    if batch.forces is not None:
        items.update(forces=batch.forces, force_atoms=batch.force_atoms)
    items.update({f"fr{e}": torch.tensor(n) for e, n in (batch.force_rows or {}).items()})
    return items


def test_batches_read_back_bit_for_bit_in_any_order(batches, tmp_path):
    path = tmp_path / "kept.bin"
    with BatchFileWriter(path) as writer:
        for batch in batches:
            writer.append(batch)
        writer.finish()
    assert not list(tmp_path.glob(".*partial"))
    kept = BatchFile(path)
    # as training writes it: no name at all from the start, read through the open handle
    with BatchFileWriter(tmp_path / "scratch", anonymous=True) as writer:
        for batch in batches:
            writer.append(batch)
        assert list((tmp_path / "scratch").iterdir()) == []
        unnamed = writer.finish()
    for k in range(len(batches)):
        assert all(torch.equal(a, b) for a, b in zip(_fields(unnamed.read(k)).values(), _fields(kept.read(k)).values()))
    unnamed.close()
    assert len(kept) == len(batches)
    for k, batch in zip([2, 0, 1, 0], kept.iterate([2, 0, 1, 0])):
        want, got = _fields(batches[k]), _fields(batch)
        assert want.keys() == got.keys()
        for name in want:
            assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name
        # the step's numpy views are made where the batch is put together
        assert all(b.host is not None for blocks in batch.dense.values() for b in blocks)
        assert set(batch.deriv_host) == set(batch.deriv)


def test_a_failed_writer_leaves_no_file(batches, tmp_path):
    path = tmp_path / "kept.bin"
    with pytest.raises(RuntimeError):
        with BatchFileWriter(path) as writer:
            writer.append(batches[0])
            raise RuntimeError("the store read failed")
    assert list(tmp_path.iterdir()) == []


def _written(batches, path):
    with BatchFileWriter(path) as writer:
        for batch in batches:
            writer.append(batch)
        writer.finish()
    return path.read_bytes()


def _without_body_bytes(raw: bytes, count: int) -> bytes:
    """``raw`` with ``count`` bytes cut out just before its index (which then points past the data)."""
    (index_len,) = struct.unpack("<Q", raw[-len(MAGIC) - 8 : -len(MAGIC)])
    body_end = len(raw) - len(MAGIC) - 8 - index_len
    return raw[: body_end - count] + raw[body_end:]


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-5], "incomplete"),  # cut short: no end marker
    (lambda raw: b"X" + raw[1:], "not a kept-batch file"),
    (lambda raw: raw[: -len(MAGIC) - 8] + struct.pack("<Q", 10**12) + MAGIC, "incomplete"),  # index length past the file
    (lambda raw: raw.replace(b'"float32"', b'"float99"', 1), "unknown dtype"),
    (lambda raw: raw.replace(b"[[%d, " % len(MAGIC), b"[[99, ", 1), "header length differs"),  # the first batch moved
    (lambda raw: _without_body_bytes(raw, 1000), "lies outside the file"),  # a hole before the index
])
def test_damaged_files_are_refused_with_the_file_named(batches, tmp_path, damage, message):
    path = tmp_path / "kept.bin"
    raw = _written(batches, path)
    path.write_bytes(damage(raw))
    with pytest.raises(BatchFileError, match=message) as err:
        kept = BatchFile(path)
        for _ in kept.iterate(range(len(kept))):
            pass
    assert str(path) in str(err.value)


def test_an_array_larger_than_its_batch_is_refused(batches, tmp_path):
    path = tmp_path / "kept.bin"
    raw = _written(batches[:1], path)
    shape = list(batches[0].energy.shape)
    old = f'["energy", "float32", {shape}'.encode()
    assert old in raw
    assert shape[0] < 9
    path.write_bytes(raw.replace(old, '["energy", "float32", [9]'.encode(), 1))  # same length: the header still parses
    with pytest.raises(BatchFileError, match="does not fit"):
        BatchFile(path).read(0)


def test_kept_structure_indices_do_not_hold_the_batch_in_memory(batches, tmp_path):
    """The trainer keeps each step's structure indices until the epoch's check; a batch is one read
    buffer, so a view would keep the whole batch's memory alive with them (numpy reports its
    buffers to tracemalloc)."""
    import gc
    import tracemalloc

    path = tmp_path / "kept.bin"
    _written(batches[:1], path)
    kept = BatchFile(path)
    size = kept.index[0][2]
    gc.collect()
    tracemalloc.start()
    try:
        batch = kept.read(0)
        held = tracemalloc.get_traced_memory()[0]
        index = batch.structure_index
        del batch
        gc.collect()
        left = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held >= size and left < size / 2, (held, left, size)
    assert index.tolist() == batches[0].structure_index.tolist()
