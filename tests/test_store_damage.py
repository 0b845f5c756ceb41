"""A damaged, interrupted or failed store: every damage is an error naming the file and pointing at
``featurize --verify``, which repairs it byte-identically; a featurize that fails or is killed
leaves nothing that blocks the rerun."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aenet_dist.cli import main as cli_main
from aenet_dist.datasets import generate_emt_dataset
from aenet_dist.featurize import main as featurize_main
from aenet_dist.store import StoreReader
from helpers import fault_env, run_in_process

ROOT = Path(__file__).resolve().parents[1]
CHUNK_MB = "0.0625"  # 12 EMT structures in several blocks


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """(generate.in, a complete store of it) made by the featurize command."""
    base = tmp_path_factory.mktemp("damage")
    generate_in = generate_emt_dataset(base / "data", num_structures=12, seed=9, force_percent=50.0)
    store = base / "s.zarr"
    result = run_in_process(featurize_main, [generate_in, "--out", store, "--no-progress", "--chunk-mb", CHUNK_MB])
    assert result.returncode == 0, result.stderr
    assert len(StoreReader(store).block_first) > 3, "the tests want several blocks"
    return generate_in, store


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _featurize(generate_in, out, *extra):
    result = run_in_process(featurize_main, [generate_in, "--out", out, "--no-progress", "--chunk-mb", CHUNK_MB, *extra])
    assert "Traceback" not in result.stdout + result.stderr
    return result


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _set_shape(path: Path, shape: list[int]) -> None:
    meta = json.loads(path.read_text())
    meta["shape"] = shape
    path.write_text(json.dumps(meta, indent=2))


TABLE_DAMAGE = {
    "flipped bit in energy": ("structures/energy/c/0", _flip),
    "flipped bit in num_atoms": ("structures/num_atoms/c/0", _flip),
    "num_atoms metadata emptied": ("structures/num_atoms/zarr.json", lambda p: p.write_text("{}")),
    "energy metadata garbled": ("structures/energy/zarr.json", lambda p: p.write_text('{"shape": [12, ')),
    "energy shape edited": ("structures/energy/zarr.json", lambda p: _set_shape(p, [11])),
    "atom_offset metadata deleted": ("structures/atom_offset/zarr.json", Path.unlink),
    "name_bytes chunk deleted": ("structures/name_bytes/c/0", Path.unlink),
}


@pytest.mark.parametrize("damage", TABLE_DAMAGE)
def test_damaged_structure_table_is_named_and_verify_repairs_it(intact, tmp_path, damage):
    """The structure table (read when a store is opened) is verified and rewritten like the blocks.
    It used to pass --verify ("every chunk intact") and then fail train and plan with a zstd traceback."""
    generate_in, store = intact
    out = tmp_path / "s.zarr"
    shutil.copytree(store, out)
    name, spoil = TABLE_DAMAGE[damage]
    spoil(out / name)
    damaged_file = str(out / name) if "shape" not in damage else str(out / Path(name).parent)
    with pytest.raises(ValueError, match="--verify") as err:
        StoreReader(out).names()
    assert damaged_file in str(err.value)
    if "/name_" not in name:  # (the names are not read to plan)
        plan = run_in_process(cli_main, ["plan", out])
        assert plan.returncode == 2 and damaged_file in plan.stderr and "--verify" in plan.stderr
        assert "Traceback" not in plan.stderr
    result = _featurize(generate_in, out, "--verify")
    assert result.returncode == 0, result.stderr
    assert "structure table is damaged" in result.stderr
    assert _tree(out) == _tree(store)


BLOCK_DAMAGE = {  # (file of block 1, how it is spoiled, whether reading the block for training meets it)
    "array metadata garbled": ("Au/G/zarr.json", lambda p: p.write_text('{"shape": [3, '), True),
    "array metadata emptied": ("Au/G/zarr.json", lambda p: p.write_text("{}"), True),
    "array metadata deleted": ("Au/G/zarr.json", Path.unlink, True),
    "array shape edited": ("pos/zarr.json", lambda p: _set_shape(p, [1, 3]), True),
    "block attributes garbled": ("zarr.json", lambda p: p.write_text('{"attributes": '), False),
    "element group metadata garbled": ("Ni/zarr.json", lambda p: p.write_text("[]"), False),
}


@pytest.mark.parametrize("damage", BLOCK_DAMAGE)
def test_damaged_block_metadata_is_found_by_verify_and_repaired(intact, tmp_path, damage):
    """Every metadata file of a block is checked by --verify (an emptied array zarr.json used to be
    skipped as 'not an array'); a read names the file and the repair (json's message named none)."""
    generate_in, store = intact
    out = tmp_path / "s.zarr"
    shutil.copytree(store, out)
    name, spoil, read = BLOCK_DAMAGE[damage]
    spoil(out / "blocks" / "b000001" / name)
    if read:  # (the block's and its groups' own metadata are not read for training: --verify finds them)
        with pytest.raises(ValueError, match="--verify") as err:
            StoreReader(out).read_block(1)
        assert str(out / "blocks" / "b000001" / Path(name).parent) in str(err.value)
    result = _featurize(generate_in, out, "--verify")
    assert result.returncode == 0, result.stderr
    assert "block 1 is damaged" in result.stderr
    assert _tree(out) == _tree(store)


def test_block_without_its_metadata_is_redone_without_verify(intact, tmp_path):
    """A block directory whose zarr.json has gone counts as missing; redoing it used to fail renaming
    the new block onto the old directory ("Directory not empty")."""
    generate_in, store = intact
    out = tmp_path / "s.zarr"
    shutil.copytree(store, out)
    (out / "blocks" / "b000002" / "zarr.json").unlink()
    result = _featurize(generate_in, out)
    assert result.returncode == 0, result.stderr
    assert _tree(out) == _tree(store)


def test_train_names_a_deleted_array_metadata_file_and_the_repair(intact, tmp_path):
    """It used to go to train's disk-error message: 'rerun with --resume' (no help for a damaged store)."""
    from aenet_dist.train import main as train_main
    from helpers import write_train_toml

    _, store = intact
    out = tmp_path / "s.zarr"
    shutil.copytree(store, out)
    (out / "blocks" / "b000001" / "Au" / "G" / "zarr.json").unlink()
    result = run_in_process(train_main, [write_train_toml(tmp_path / "t.toml", out, tmp_path / "run", epochs=1)])
    assert result.returncode == 2, result.stderr
    assert f"{out}/blocks/b000001/Au/G/zarr.json: array metadata file is missing" in result.stderr
    assert "--verify" in result.stderr and "--resume" not in result.stderr and "Traceback" not in result.stderr


def _copy_inputs(generate_in: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    shutil.copytree(generate_in.parent, tmp_path / "data")
    return tmp_path / "data" / generate_in.name, sorted((tmp_path / "data" / "xsf").glob("*.xsf"))


def _atom_line(lines: list[str], k: int = 0) -> int:
    """Index of the ``k``-th atom line of an XSF file's lines."""
    return [i for i, line in enumerate(lines) if line.split() and line.split()[0] in ("Cu", "Au", "Ni")][k]


def test_an_element_not_in_types_is_refused_with_its_line_before_the_store_is_made(intact, tmp_path):
    """Checked when the files are read (it was checked block by block: late, with no line, leaving
    an empty store that refused the corrected rerun as 'made from different inputs')."""
    generate_in, store = _copy_inputs(intact[0], tmp_path)[0], intact[1]
    xsf = sorted((tmp_path / "data" / "xsf").glob("*.xsf"))[-1]
    original = xsf.read_text()
    lines = original.splitlines()
    at = _atom_line(lines, 2)
    lines[at] = "Fe" + lines[at][2:]
    xsf.write_text("\n".join(lines) + "\n")
    out = tmp_path / "s.zarr"
    result = _featurize(generate_in, out)
    assert result.returncode == 2
    assert f"{xsf}:{at + 1}: species 'Fe' not in TYPES ['Cu', 'Au', 'Ni']" in result.stderr
    assert not out.exists() and not (tmp_path / ".s.zarr.lock").exists()
    xsf.write_text(original)
    assert _featurize(generate_in, out).returncode == 0
    assert _tree(out) == _tree(store) and not (tmp_path / ".s.zarr.lock").exists()


def test_an_element_not_in_types_in_an_extxyz_file_is_named(tmp_path):
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from aenet_dist.structures import read_structures

    frames = []
    for symbols in ("Cu2", "CuFe"):
        atoms = ase.Atoms(symbols, positions=[[0, 0, 0], [2.5, 0, 0]])
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=[[0, 0, 0], [0, 0, 0]])
        frames.append(atoms)
    path = tmp_path / "set.extxyz"
    ase.io.write(path, frames)
    with pytest.raises(ValueError, match=r"set.extxyz@1: atom 2: species 'Fe' not in TYPES \['Cu', 'Au'\]"):
        read_structures(path, ("Cu", "Au"))
    assert [s.species for s in read_structures(path)] == [("Cu", "Cu"), ("Cu", "Fe")]  # no TYPES given: no check


@pytest.mark.parametrize("bad,existing_dir", [(0, False), (0, True), (-1, False)])
def test_a_structure_that_cannot_be_featurized_leaves_nothing_behind(intact, tmp_path, bad, existing_dir):
    """Atoms closer than RMIN (found while featurizing): the store this run made is removed (an empty
    --out directory that was there stays), and so is the lock file beside it; also with blocks
    completed before (the last file), which no rerun of these inputs could use. The store used to
    stay and refuse the corrected rerun as 'made from different inputs'."""
    generate_in, xsf = _copy_inputs(intact[0], tmp_path)
    original = xsf[bad].read_text()
    lines = original.splitlines()
    a, b = _atom_line(lines, 0), _atom_line(lines, 1)
    first = lines[a].split()
    lines[b] = " ".join([lines[b].split()[0], str(float(first[1]) + 0.05), *first[2:4]] + lines[b].split()[4:])
    xsf[bad].write_text("\n".join(lines) + "\n")
    out = tmp_path / "s.zarr"
    if existing_dir:
        out.mkdir()
    result = _featurize(generate_in, out)
    assert result.returncode == 2 and "closer than RMIN" in result.stderr and xsf[bad].name in result.stderr
    before = len(StoreReader(intact[1]).block_first) - 2  # (the last file is in the last block)
    assert "removed (" + ("it held no completed block" if bad == 0 else f"{before} completed block(s)") in result.stderr
    assert (out.is_dir() and not any(out.iterdir())) if existing_dir else not out.exists()
    assert not (tmp_path / ".s.zarr.lock").exists()
    xsf[bad].write_text(original)
    assert _featurize(generate_in, out).returncode == 0
    assert _tree(out) == _tree(intact[1])


def test_a_store_that_failed_writing_keeps_its_blocks_for_the_rerun(intact, tmp_path):
    """A failure that is not the inputs' (here the last block cannot be put in place) keeps the
    completed blocks: the same command, once the cause is gone, finishes the store."""
    generate_in, store = intact
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "aenet_dist.featurize", str(generate_in), "--out", str(out), "--chunk-mb", CHUNK_MB, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fault_env(block_delay=0.3), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "blocks").glob("b*")):
        time.sleep(0.01)
    last = len(StoreReader(store).block_first) - 2
    (out / "blocks" / f"b{last:06d}").write_text("in the way")  # a file where the last block's directory goes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and f"b{last:06d}" in err and "Traceback" not in err
    assert f"kept, with {last} completed block(s)" in err
    (out / "blocks" / f"b{last:06d}").unlink()
    assert _featurize(generate_in, out).returncode == 0
    assert _tree(out) == _tree(store)


def _killed_mid_run(generate_in: Path, out: Path) -> None:
    """A featurize of ``generate_in`` into ``out``, killed (SIGKILL) after its first block."""
    cmd = [sys.executable, "-m", "aenet_dist.featurize", str(generate_in), "--out", str(out), "--chunk-mb", CHUNK_MB, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fault_env(block_delay=0.5), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "blocks").glob("b*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((out / "blocks").glob("b*")) and not (out / "structures").exists(), "the kill did not land mid-run"


def test_store_of_other_inputs_without_a_completed_block_is_replaced(intact, tmp_path):
    """A featurize killed before it completed a block leaves only the root metadata: a rerun with
    corrected inputs starts it again instead of refusing it as 'made from different inputs'."""
    generate_in, xsf = _copy_inputs(intact[0], tmp_path)
    original = xsf[3].read_text()
    xsf[3].write_text(original.replace("total energy = ", "total energy = 1"))  # other inputs (a typo in an energy)
    out = tmp_path / "s.zarr"
    _killed_mid_run(generate_in, out)
    for block in (out / "blocks").glob("b*"):  # as if killed before the first block was renamed into place
        shutil.rmtree(block)
    xsf[3].write_text(original)
    result = _featurize(generate_in, out)
    assert result.returncode == 0, result.stderr
    assert "holds no completed block" in result.stderr
    assert _tree(out) == _tree(intact[1])
    # With a completed block, a store of other inputs is still refused (it holds work).
    data = json.loads((out / "zarr.json").read_text())
    data["attributes"]["fingerprint"] = "0" * 64
    data["attributes"]["complete"] = False
    (out / "zarr.json").write_text(json.dumps(data))
    result = _featurize(generate_in, out)
    assert result.returncode == 2 and "made from different inputs" in result.stderr


@pytest.mark.parametrize("state", ["killed", "complete", "complete --verify"])
def test_temporary_block_directories_of_dead_writers_are_removed(intact, tmp_path, state):
    """kill -9 mid-block leaves blocks/.bNNNNNN.tmp-PID; the rerun (resume, no-op or --verify) removes
    it (they were removed only when a store was created)."""
    generate_in, store = intact
    out = tmp_path / "s.zarr"
    if state == "killed":
        _killed_mid_run(generate_in, out)
    else:
        shutil.copytree(store, out)
    stale = out / "blocks" / f".b000004.tmp-{2**22 + 7}"  # (above the usual pid_max: no live process of this name)
    (stale / "pos" / "c").mkdir(parents=True)
    (stale / "pos" / "c" / "0").write_bytes(b"half a chunk")
    result = _featurize(generate_in, out, *state.split()[1:])
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert _tree(out) == _tree(store)


def test_temporary_block_directories_are_left_to_the_run_holding_the_store(intact, tmp_path):
    """The clean-up happens only under the store's lock: a second featurize, refused because a run
    holds the store, touches none of that run's temporary directories."""
    generate_in, store = intact
    out = tmp_path / "s.zarr"
    shutil.copytree(store, out)
    live = out / "blocks" / f".b000004.tmp-{os.getpid()}"
    live.mkdir()
    with open(tmp_path / ".s.zarr.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("PID 777 on host node7\n")
        lock.flush()
        result = _featurize(generate_in, out)
    assert result.returncode == 2 and "in use by PID 777 on host node7" in result.stderr
    assert live.is_dir()


def test_one_store_reached_by_two_paths_has_one_lock(intact, tmp_path):
    """The lock is taken on the store's real path: a run through a symlink and one through the
    directory itself cannot both write it (they would mix two inputs' blocks)."""
    from aenet_dist.files import DirectoryInUse
    from aenet_dist.store import _lock_store, _unlock_store

    real = tmp_path / "data" / "s.zarr"
    real.mkdir(parents=True)
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    held = _lock_store(real)
    try:
        with pytest.raises(DirectoryInUse, match="in use by PID"):
            _lock_store(link)
        with pytest.raises(DirectoryInUse):
            _lock_store(tmp_path / "data" / ".." / "link.zarr")
    finally:
        _unlock_store(*held)
    _unlock_store(*_lock_store(link))  # free again: taken and given back


def test_a_completed_block_is_never_replaced_by_another_writer(intact, tmp_path):
    """write_block finding the block completed meanwhile (another process wrote it) stops, and the
    block stays as that process wrote it."""
    from aenet_dist.store import write_block

    out = tmp_path / "s.zarr"
    shutil.copytree(intact[1], out)
    block = out / "blocks" / "b000001"
    before = _tree(block)
    arrays = {"Cu/G": __import__("numpy").zeros((2, 3))}
    with pytest.raises(ValueError, match="was completed by another process while this one computed it"):
        write_block(out, 1, arrays, {}, level=1)
    assert _tree(block) == before and not list((out / "blocks").glob(".*tmp*"))


def test_a_block_of_other_inputs_is_redone(intact, tmp_path):
    """A block records the fingerprint of its inputs: one left by a writer of other inputs (a rank of
    an earlier, failed run) is featurized again, not taken for this run's; the store ends as made
    in one go."""
    out = tmp_path / "s.zarr"
    shutil.copytree(intact[1], out)
    meta_path = out / "blocks" / "b000002" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    assert meta["attributes"]["fingerprint"] == json.loads((out / "zarr.json").read_text())["attributes"]["fingerprint"]
    meta["attributes"]["fingerprint"] = "f" * 64
    meta_path.write_text(json.dumps(meta))
    result = _featurize(intact[0], out)
    assert result.returncode == 0, result.stderr
    assert "block 2 was made from other inputs; featurizing it again" in result.stderr
    assert _tree(out) == _tree(intact[1])


def test_a_replaced_store_keeps_its_directory_when_the_new_run_fails(intact, tmp_path):
    """A directory that was there before the run (here a block-less store of other inputs, replaced)
    is the user's: a run that then fails on its input removes what it wrote, not the directory."""
    generate_in, xsf = _copy_inputs(intact[0], tmp_path)
    out = tmp_path / "s.zarr"
    _killed_mid_run(generate_in, out)
    for block in (out / "blocks").glob("b*"):
        shutil.rmtree(block)
    lines = xsf[0].read_text().splitlines()
    a, b = _atom_line(lines, 0), _atom_line(lines, 1)
    first = lines[a].split()  # two atoms closer than RMIN: found while featurizing, after the store is opened
    lines[b] = " ".join([lines[b].split()[0], str(float(first[1]) + 0.05), *first[2:4]] + lines[b].split()[4:])
    xsf[0].write_text("\n".join(lines) + "\n")
    result = _featurize(generate_in, out)
    assert result.returncode == 2 and "closer than RMIN" in result.stderr and "holds no completed block" in result.stderr
    assert out.is_dir() and not any(out.iterdir())  # what it wrote is gone, the directory stays
