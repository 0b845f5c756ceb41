"""The Zarr store: content equals direct featurization, MPI and resume give identical
stores, statistics, range reads across blocks, and bad-input errors."""

import contextlib
import io
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from aenet_dist.formats.generate_in import read_generate_input
from aenet_dist.config import StoreOptions
from aenet_dist.datasets import generate_emt_dataset
from aenet_dist.descriptors import featurize
from aenet_dist.featurize import main as featurize_main
from aenet_dist.store import StoreReader, _read_plain_array, _write_array, _write_plain_array, featurize_to_store, write_block
from aenet_dist.structures import read_structures
from helpers import fault_env

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
SMALL_CHUNKS = StoreOptions(chunk_bytes=2**16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_emt_dataset(tmp_path_factory.mktemp("emt"), num_structures=24, seed=3, force_percent=50.0)


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "emt.zarr"
    featurize_to_store(read_generate_input(dataset), out, SMALL_CHUNKS, progress=False)
    return out


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def featurize_cli(args, ranks=1):
    """The featurize CLI: in this process for one rank (no interpreter start-up), mpiexec for more."""
    args = [str(a) for a in args] + ["--no-progress"]
    if ranks > 1:
        cmd = [str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "aenet_dist.featurize", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = featurize_main(args)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_content_equals_direct_featurization(dataset, store):
    config = read_generate_input(dataset)
    reader = StoreReader(store)
    assert len(reader.block_first) > 3, "the test wants several blocks"
    structures = [s for f in config.files for s in read_structures(f)]
    data = reader.read_range(0, reader.num_structures)
    species_index, feats = featurize(structures, config.setups, config.species, data.has_derivs)
    assert data.has_derivs.sum() == round(0.5 * len(structures))
    np.testing.assert_array_equal(data.species, species_index)
    np.testing.assert_array_equal(data.energy, [s.energy for s in structures])
    np.testing.assert_array_equal(data.forces, np.concatenate([s.forces for s in structures]))
    for element, f in feats.items():
        rows = data.elements[element]
        np.testing.assert_array_equal(rows.atom, f.atom_index)
        np.testing.assert_array_equal(rows.G, f.G)
        # Derivative rows: center row -> atom, then the same (center atom, moved atom) pairs and values.
        np.testing.assert_array_equal(rows.atom[rows.deriv_center], f.deriv_center)
        np.testing.assert_array_equal(rows.deriv_neighbor, f.deriv_neighbor)
        np.testing.assert_array_equal(rows.dG, f.dG)
    assert reader.names()[0] == "xsf/" + Path(config.files[0]).name


def test_statistics_and_tables(store):
    reader = StoreReader(store)
    data = reader.read_range(0, reader.num_structures)
    for element in reader.species:
        G = data.elements[element].G
        stats = reader.attrs["stats"][element]
        assert stats["count"] == len(G)
        np.testing.assert_allclose(stats["mean"], G.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats["mean_sq"], (G * G).mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats["std"], G.std(0), rtol=1e-7, atol=1e-9)
        np.testing.assert_array_equal(stats["min"], G.min(0))
        np.testing.assert_array_equal(stats["max"], G.max(0))
    per_atom = data.cohesive_energy / data.num_atoms
    assert reader.attrs["energy_per_atom"]["min"] == pytest.approx(per_atom.min())
    assert reader.attrs["energy_per_atom"]["max"] == pytest.approx(per_atom.max())
    np.testing.assert_array_equal(reader.atom_offset, np.r_[0, np.cumsum(data.num_atoms)])
    rows = np.zeros(reader.num_structures, dtype=np.int64)
    structure_of_atom = np.repeat(np.arange(reader.num_structures), data.num_atoms)
    for element in reader.species:
        el = data.elements[element]
        rows += np.bincount(structure_of_atom[el.atom[el.deriv_center]], minlength=reader.num_structures)
    np.testing.assert_array_equal(reader.num_deriv_rows, rows)
    assert (rows[~reader.has_derivs] == 0).all() and (rows[reader.has_derivs] > 0).all()


@pytest.mark.parametrize("start,stop", [(0, 1), (3, 11), (5, 24), (7, 7)])
def test_range_reads_across_blocks(store, start, stop):
    reader = StoreReader(store)
    whole = reader.read_range(0, reader.num_structures)
    part = reader.read_range(start, stop)
    a0, a1 = reader.atom_offset[start], reader.atom_offset[stop]
    np.testing.assert_array_equal(part.pos, whole.pos[a0:a1])
    np.testing.assert_array_equal(part.energy, whole.energy[start:stop])
    for element in reader.species:
        w, p = whole.elements[element], part.elements[element]
        keep = (w.atom >= a0) & (w.atom < a1)
        np.testing.assert_array_equal(p.G, w.G[keep])
        np.testing.assert_array_equal(p.atom, w.atom[keep] - a0)
        rows = keep[w.deriv_center]
        np.testing.assert_array_equal(p.dG, w.dG[rows])
        np.testing.assert_array_equal(p.deriv_neighbor, w.deriv_neighbor[rows] - a0)
        np.testing.assert_array_equal(p.atom[p.deriv_center], w.atom[w.deriv_center[rows]] - a0)


def test_float32_reads_come_in_the_contraction_layout(store):
    """A float64 store read as float32: dG/dR values as cast, laid out (P, 3, F) in memory under the
    (P, F, 3) shape, so the training shard's sparse rows take that memory without another copy."""
    import torch

    from aenet_dist.batching import shard_from_range

    reader = StoreReader(store)
    exact = reader.read_range(0, reader.num_structures)
    cast = reader.read_range(0, reader.num_structures, np.float32)
    for element in reader.species:
        dG = cast.elements[element].dG
        assert dG.dtype == np.float32 and dG.shape == exact.elements[element].dG.shape
        np.testing.assert_array_equal(dG, exact.elements[element].dG.astype(np.float32))
        assert dG.transpose(0, 2, 1).flags.c_contiguous
    one_block = reader.read_block(0, np.float32)
    shard = shard_from_range(one_block, torch.float32, dense_blocks=False)
    for element in reader.species:
        if len(one_block.elements[element].dG):
            assert np.shares_memory(shard.elements[element].dG.numpy(), one_block.elements[element].dG)


@pytest.mark.mpi
def test_two_mpi_ranks_give_identical_store(dataset, store, tmp_path):
    out = tmp_path / "mpi.zarr"
    result = featurize_cli([dataset, "--out", out, "--chunk-mb", 2**16 / 2**20], ranks=2)
    assert result.returncode == 0, result.stderr
    assert "structures" in result.stdout
    assert tree_bytes(out) == tree_bytes(store)


def test_killed_run_resumes_to_identical_store(dataset, store, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "aenet_dist.featurize", str(dataset), "--out", str(out), "--chunk-mb", str(2**16 / 2**20), "--no-progress"]
    # Slow each block down so that the kill lands mid-run (the test checks that it did).
    env = fault_env(block_delay=0.3)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "blocks").glob("b*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list((out / "blocks").glob("b*"))
    assert 0 < len(done) < len(StoreReader(store).block_first) - 1, "kill did not land mid-run"
    with pytest.raises(ValueError, match="incomplete"):
        StoreReader(out)
    result = featurize_cli([dataset, "--out", out, "--chunk-mb", 2**16 / 2**20])
    assert result.returncode == 0, result.stderr
    assert not list((out / "blocks").glob(".*tmp*"))
    assert tree_bytes(out) == tree_bytes(store)


def test_rerun_on_complete_store_is_a_no_op(dataset, store, tmp_path):
    out = tmp_path / "again.zarr"
    for _ in range(2):
        result = featurize_cli([dataset, "--out", out, "--chunk-mb", 2**16 / 2**20])
        assert result.returncode == 0, result.stderr
    assert tree_bytes(out) == tree_bytes(store)


def test_existing_store_from_different_inputs_is_refused(dataset, store, tmp_path):
    result = featurize_cli([dataset, "--out", store, "--chunk-mb", 1.0])
    assert result.returncode == 2
    assert "made from different inputs" in result.stderr and str(store) in result.stderr


def test_output_path_that_is_not_a_store_is_refused(dataset, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    result = featurize_cli([dataset, "--out", tmp_path / "x"])
    assert result.returncode == 2 and "not a Zarr store" in result.stderr


def test_bad_structure_file_is_named(dataset, tmp_path):
    config = read_generate_input(dataset)
    bad = Path(config.files[2])
    original = bad.read_text()
    try:
        lines = original.splitlines()
        lines[-1] = lines[-1] + " 1.0"  # 8 fields on an atom line
        bad.write_text("\n".join(lines) + "\n")
        result = featurize_cli([dataset, "--out", tmp_path / "bad.zarr"])
        assert result.returncode == 2
        assert bad.name in result.stderr and "fields" in result.stderr
    finally:
        bad.write_text(original)


def test_reader_rejects_missing_store(tmp_path):
    with pytest.raises(ValueError, match="no Zarr store"):
        StoreReader(tmp_path / "nothing.zarr")


def test_reader_rejects_other_zarr(tmp_path):
    zarr.open_group(zarr.storage.LocalStore(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    with pytest.raises(ValueError, match="not an aenet_dist store"):
        StoreReader(tmp_path / "other.zarr")


@pytest.mark.parametrize(
    "data",
    [
        np.arange(1000, dtype=np.float64).reshape(125, 8),  # several chunks, a partial last one
        np.zeros((40, 3, 2), dtype=np.float32),  # equals the fill value: zarr writes no chunk
        np.array([True, False, True]),
        np.arange(-5, 5, dtype=np.int8),
        np.zeros((0, 4), dtype=np.int32),
    ],
)
@pytest.mark.parametrize("compressor", ["zstd", "lz4", "none"])
def test_direct_array_reads_equal_zarr(tmp_path, data, compressor):
    group = zarr.open_group(zarr.storage.LocalStore(tmp_path / "g"), mode="w", zarr_format=3)
    _write_array(group, "a", data, level=1, chunk_bytes=256, compressor=compressor)
    direct = _read_plain_array(tmp_path / "g" / "a")
    expected = zarr.open_group(zarr.storage.LocalStore(tmp_path / "g"), mode="r")["a"][...]
    assert direct is not None and direct.dtype == expected.dtype and direct.shape == expected.shape
    np.testing.assert_array_equal(direct, expected)
    # Cast chunk by chunk: bitwise what casting the whole array gives; only float arrays are cast.
    cast = _read_plain_array(tmp_path / "g" / "a", np.float32)
    wanted = expected.astype(np.float32) if expected.dtype.kind == "f" else expected
    assert cast.dtype == wanted.dtype and np.array_equal(cast, wanted)


def test_zstd_chunk_of_the_wrong_length_is_refused(tmp_path):
    """A valid zstd frame that decodes to fewer bytes than the chunk (its header says so) is an
    error, not a chunk whose tail keeps whatever the buffer held."""
    import numcodecs

    from aenet_dist.store import _zstd_content_size

    group = zarr.open_group(zarr.storage.LocalStore(tmp_path / "g"), mode="w", zarr_format=3)
    _write_array(group, "a", np.arange(64, dtype=np.float64).reshape(8, 8), level=1, chunk_bytes=256)
    chunk = tmp_path / "g" / "a" / "c" / "0" / "0"
    short = numcodecs.Zstd(checksum=True).encode(np.arange(31, dtype=np.float64))
    assert _zstd_content_size(short) == 31 * 8 and _zstd_content_size(chunk.read_bytes()) == 256
    chunk.write_bytes(short)
    with pytest.raises(ValueError, match=f"{chunk}: chunk decodes to 248 bytes, expected 256"):
        _read_plain_array(tmp_path / "g" / "a")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "data",
    [
        np.arange(1000, dtype=np.float64).reshape(125, 8),  # several chunks, a partial last one (padded)
        np.arange(1000, dtype=np.float64).reshape(25, 8, 5) * 0.1,  # (p, F, 3)-like, three axes
        np.zeros((40, 3, 2), dtype=np.float32),  # all fill value: still every chunk written
        np.array([True, False, True]),  # one-byte types: zarr names no byte order
        np.arange(-5, 5, dtype=np.int8),
        np.arange(70, dtype=np.int64),
        np.zeros((0, 4), dtype=np.int32),  # empty: metadata only
        np.zeros((0, 56, 3), dtype=np.float64),
    ],
)
@pytest.mark.parametrize("compressor", ["zstd", "lz4", "none"])
def test_direct_array_write_equals_zarr(tmp_path, data, compressor):
    """Block arrays are written without zarr (store._write_plain_array): the same files, byte for byte."""
    group = zarr.open_group(zarr.storage.LocalStore(tmp_path / "z"), mode="w", zarr_format=3)
    _write_array(group, "a", data, level=1, chunk_bytes=256, compressor=compressor)
    _write_plain_array(tmp_path / "d" / "a", data, level=1, chunk_bytes=256, compressor=compressor)
    assert _files(tmp_path / "d" / "a") == _files(tmp_path / "z" / "a")


@pytest.mark.parametrize("compressor", ["zstd", "lz4", "none"])
def test_direct_block_write_equals_zarr(tmp_path, compressor):
    """A whole block group written directly equals what zarr writes, attributes (NaN, None) included."""
    arrays = {"num_atoms": np.array([2, 3], dtype=np.int32), "species": np.array([0, 1, 1, 0, 1], dtype=np.int8),
              "Cu/G": np.linspace(0, 1, 20).reshape(5, 4), "Cu/dG": np.zeros((0, 4, 3))}
    attrs = {"first_structure": 0, "partial_stats": {"Cu": {"sum": [0.5, float("nan")], "min": None}}}
    (tmp_path / "direct" / "blocks").mkdir(parents=True)
    write_block(tmp_path / "direct", 0, arrays, attrs, level=1, compressor=compressor)
    group = zarr.open_group(zarr.storage.LocalStore(tmp_path / "zarr"), mode="w", zarr_format=3)
    for path, data in arrays.items():
        parent, _, name = path.rpartition("/")
        _write_array(group.require_group(parent) if parent else group, name, data, level=1, compressor=compressor)
    group.attrs.update(attrs)
    assert _files(tmp_path / "direct" / "blocks" / "b000000") == _files(tmp_path / "zarr")


def test_block_reads_equal_zarr(store):
    reader = StoreReader(store)
    for b in range(len(reader.block_first) - 1):
        block = reader.read_block(b)
        group = zarr.open_group(zarr.storage.LocalStore(store / "blocks" / f"b{b:06d}"), mode="r")
        np.testing.assert_array_equal(block.pos, group["pos"][...])
        np.testing.assert_array_equal(block.has_derivs, group["has_derivs"][...])
        for element in reader.species:
            np.testing.assert_array_equal(block.elements[element].dG, group[element]["dG"][...])
            np.testing.assert_array_equal(block.elements[element].G, group[element]["G"][...])


def test_damaged_chunk_is_named(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    chunk = sorted(copy.glob("blocks/*/*/dG/c/0/0/0"))[0]
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
    block = int(chunk.relative_to(copy / "blocks").parts[0][1:])
    with pytest.raises(ValueError, match=f"{chunk}.*damaged"):
        StoreReader(copy).read_block(block)


def test_wait_for_all_sleeps_until_the_barrier_completes(monkeypatch):
    """Ranks wait for each other on a non-blocking barrier, tested between sleeps (MPICH's blocking wait spins)."""
    from aenet_dist import store as store_module

    class Request:
        tests = 0

        def Test(self):
            Request.tests += 1
            return Request.tests >= 3

    class Comm:
        size = 2

        def Ibarrier(self):
            return Request()

    sleeps = []
    monkeypatch.setattr(store_module.time, "sleep", sleeps.append)
    store_module.wait_for_all(Comm(), poll_s=0.002)
    assert Request.tests == 3 and sleeps == [0.002, 0.002]
    store_module.wait_for_all(store_module._SerialComm())  # one rank: returns at once


def test_featurize_writes_a_zstd_store_without_zarr(dataset, store, tmp_path):
    """featurize (scan, blocks, consolidation, summary) never imports zarr for a zstd store (0.3 s of each rank's
    start-up), and writes what zarr wrote before: the same files as the module's store, which zarr still reads."""
    out = tmp_path / "nozarr.zarr"
    code = ("import sys\nfrom aenet_dist.featurize import main\n"
            f"rc = main([{str(dataset)!r}, '--out', {str(out)!r}, '--chunk-mb', '0.0625', '--no-progress'])\n"
            "assert rc == 0, rc\nassert 'zarr' not in sys.modules, 'zarr was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert _files(out) == _files(store)
    assert StoreReader(out).num_structures == StoreReader(store).num_structures
