"""What a user gets wrong, or what goes wrong around a run: each case ends with a clear message
(never a traceback) and leaves the user's files as they were; the recoveries work."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aenet_dist.formats.generate_in import read_generate_input
from aenet_dist.datasets import generate_emt_dataset
from aenet_dist.store import featurize_to_store
from aenet_dist.train import main as train_main
from helpers import fault_env, featurized_emt, read_metrics, run_in_process, write_train_toml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return featurized_emt(tmp_path_factory.mktemp("bad"), 16, seed=3, force_percent=50.0)[1]


def _train(args):
    result = run_in_process(train_main, args)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_new_run_into_a_run_directory_with_history_is_refused(store, tmp_path):
    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "run", epochs=2, extra="checkpoint_every = 1")
    assert _train([config]).returncode == 0
    before = _snapshot(tmp_path / "run")
    result = _train([config, "run.epochs=1"])
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "--resume" in result.stderr and "checkpoint_000002.pt" in result.stderr
    assert _snapshot(tmp_path / "run") == before  # nothing pruned, overwritten or appended
    # --resume continues the run that is there.
    assert _train([config, "run.epochs=3", "--resume"]).returncode == 0
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_run_directory_in_use_is_refused_with_its_holder(store, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = open(run_dir / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write("PID 4242 on host elsewhere\n")
    lock.flush()
    try:
        result = _train([write_train_toml(tmp_path / "t.toml", store, run_dir, epochs=1)])
    finally:
        lock.close()
    assert result.returncode == 2
    assert "in use by PID 4242 on host elsewhere" in result.stderr
    assert not (run_dir / "metrics.jsonl").exists()
    # Released (the holder ended): the same command now runs.
    assert _train([tmp_path / "t.toml"]).returncode == 0


def test_no_training_structures_is_refused_with_the_counts(store, tmp_path):
    result = _train([write_train_toml(tmp_path / "t.toml", store, tmp_path / "run", epochs=1), "data.test_percent=99"])
    assert result.returncode == 2
    assert "no structures left to train on: 16 in" in result.stderr and "data.test_percent=99" in result.stderr


def test_resume_from_a_moved_run_directory(store, tmp_path):
    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "old", epochs=2, extra="checkpoint_every = 1")
    assert _train([config]).returncode == 0
    (tmp_path / "old").rename(tmp_path / "new")
    result = _train([config, f"run.run_dir={tmp_path / 'new'}", "run.epochs=3", "--resume"])
    assert result.returncode == 0, result.stderr
    assert [m["epoch"] for m in read_metrics(tmp_path / "new")] == [1, 2, 3]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(store, tmp_path):
    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "run", epochs=3, extra="checkpoint_every = 1\nkeep_last = 3")
    assert _train([config]).returncode == 0
    latest = tmp_path / "run" / "checkpoints" / "checkpoint_000003.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short
    result = _train([config, "run.epochs=4", "--resume"])
    assert result.returncode == 0, result.stderr
    assert "checkpoint_000003.pt" in result.stderr and "resuming from checkpoint_000002.pt" in result.stderr
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert torch.load(latest, weights_only=True)["epoch"] == 3  # rewritten, readable again


def test_ctrl_c_checkpoints_the_position_and_resume_continues(store, tmp_path):
    """SIGINT is handled like SIGTERM: finish the step, checkpoint, exit 75, no traceback."""
    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "run", epochs=3, batch_size=2)
    env = fault_env(step_delay=0.2)
    proc = subprocess.Popen([sys.executable, "-m", "aenet_dist.train", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "Traceback" not in out + err and "interrupted" in err
    assert list((tmp_path / "run" / "checkpoints").glob("checkpoint_000001.*.pt")), "no mid-epoch checkpoint"
    assert _train([config, "--resume"]).returncode == 0
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_two_ranks_refused_run_directory_ends_every_rank(store, tmp_path):
    """Rank 0 finds the run directory taken: every rank learns it and ends (no rank waits in a collective)."""
    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "run", epochs=1)
    assert _train([config]).returncode == 0
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "aenet_dist.train",
           str(config), "run.collective_timeout_s=600"]
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and time.time() - start < 60
    assert "already holds a run" in result.stderr
    assert str(ROOT / "aenet_dist") not in result.stderr  # torchrun prints its own trace of the exit codes; none is ours


def _emt_inputs(tmp_path, structures=8):
    generate_in = generate_emt_dataset(tmp_path / "data", num_structures=structures, seed=9, force_percent=50.0)
    xsf = sorted((tmp_path / "data" / "xsf").glob("*.xsf"))
    return generate_in, xsf


def _featurize_mpi(generate_in, out, ranks=2, timeout=60):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(ranks), sys.executable, "-m", "aenet_dist.featurize", str(generate_in), "--out", str(out), "--no-progress"]
    start = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    return result, time.time() - start


@pytest.mark.parametrize("damage", ["truncated", "nan_coordinate"])
def test_mpi_featurize_with_one_bad_file_ends_every_rank(tmp_path, damage):
    """The rank that reads the bad file fails; the other must not wait forever in a collective."""
    generate_in, xsf = _emt_inputs(tmp_path)
    bad = xsf[-1]  # read by the last rank
    lines = bad.read_text().splitlines()
    if damage == "truncated":
        bad.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    else:
        atom = next(i for i, line in enumerate(lines) if line.split() and line.split()[0].isalpha() and len(line.split()) in (4, 7))
        fields = lines[atom].split()
        lines[atom] = " ".join([fields[0], "nan", *fields[2:]])
        bad.write_text("\n".join(lines) + "\n")
    result, seconds = _featurize_mpi(generate_in, tmp_path / "s.zarr")
    assert result.returncode != 0 and seconds < 30
    out = result.stdout + result.stderr
    assert bad.name in out and "Traceback" not in out
    assert out.count("error:") == 1, out  # once, not once per rank


def test_non_finite_and_absurd_xsf_values_are_named(tmp_path):
    from aenet_dist.structures import read_xsf

    base = "CRYSTAL\nPRIMVEC\n{a} 0 0\n0 5 0\n0 0 5\nPRIMCOORD\n1 1\nCu 0 0 0\n"
    for a, expected in (("1e300", "out of range"), ("inf", "that is not finite"), ("nan", "that is not finite")):
        path = tmp_path / f"cell_{a}.xsf"
        path.write_text("# total energy = -1.0 eV\n" + base.format(a=a))
        with pytest.raises(ValueError, match=rf"{path.name}:4: a lattice vector has a value {expected}"):
            read_xsf(path)
    path = tmp_path / "energy.xsf"
    path.write_text("# total energy = nan eV\n" + base.format(a=5))
    with pytest.raises(ValueError, match=r"energy.xsf:1: the total energy has a value that is not finite"):
        read_xsf(path)


def test_generate_in_misspelled_keyword_and_duplicate_files(tmp_path):
    from aenet_dist.formats.generate_in import read_generate_input

    generate_in, xsf = _emt_inputs(tmp_path, structures=4)
    text = generate_in.read_text()
    misspelled = tmp_path / "data" / "misspelled.in"
    misspelled.write_text(text.replace("FORCESPERCENT", "FORCEPERCENT"))
    with pytest.raises(ValueError, match=r"misspelled.in:\d+: unknown keyword 'FORCEPERCENT'; did you mean FORCESPERCENT\?"):
        read_generate_input(misspelled)
    lines = text.splitlines()
    files_at = next(i for i, line in enumerate(lines) if line.strip().upper() == "FILES")
    first = lines[files_at + 2]
    duplicated = lines[: files_at + 1] + [str(len(xsf) + 1)] + lines[files_at + 2 :] + [first]
    (tmp_path / "data" / "dup.in").write_text("\n".join(duplicated) + "\n")
    with pytest.raises(ValueError, match=rf"dup.in:{len(duplicated)}: structure file .* is listed twice \(first on line {files_at + 3}\)"):
        read_generate_input(tmp_path / "data" / "dup.in")


def test_featurize_fingerprint_sees_an_edit_that_keeps_the_size(tmp_path):
    from aenet_dist.featurize import main as featurize_main

    generate_in, xsf = _emt_inputs(tmp_path, structures=4)
    out = tmp_path / "s.zarr"
    assert run_in_process(featurize_main, [generate_in, "--out", out, "--no-progress"]).returncode == 0
    text = xsf[0].read_text()
    head, _, rest = text.partition("total energy = ")
    digit = rest[0]
    edited = head + "total energy = " + ("7" if digit != "7" else "8") + rest[1:]  # one digit of the energy
    assert edited != text and len(edited) == len(text)
    xsf[0].write_text(edited)
    result = run_in_process(featurize_main, [generate_in, "--out", out, "--no-progress"])
    assert result.returncode == 2 and "different inputs" in result.stderr, result.stderr + result.stdout


def test_featurize_into_a_store_in_use_is_refused_with_its_holder(tmp_path):
    from aenet_dist.featurize import main as featurize_main

    generate_in, _ = _emt_inputs(tmp_path, structures=4)
    out = tmp_path / "s.zarr"
    with open(tmp_path / ".s.zarr.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("PID 777 on host node7\n")
        lock.flush()
        result = run_in_process(featurize_main, [generate_in, "--out", out, "--no-progress"])
    assert result.returncode == 2 and "in use by PID 777 on host node7" in result.stderr
    assert not out.exists()
    assert run_in_process(featurize_main, [generate_in, "--out", out, "--no-progress"]).returncode == 0


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_damaged_store_is_detected_and_featurize_repairs_it(tmp_path):
    """A deleted chunk, a flipped bit and a deleted block are errors naming the damage (not zeros or
    garbage); featurize (--verify for what only reading finds) redoes exactly those blocks."""
    from aenet_dist.featurize import main as featurize_main
    from aenet_dist.store import StoreReader

    generate_in, _ = _emt_inputs(tmp_path, structures=12)
    out = tmp_path / "s.zarr"
    args = [generate_in, "--out", out, "--no-progress", "--chunk-mb", "0.0625"]
    assert run_in_process(featurize_main, args).returncode == 0
    intact = _tree(out)
    reader = StoreReader(out)
    assert len(reader.block_first) > 2, "the test wants several blocks"
    chunk = next(p for p in sorted((out / "blocks" / "b000001").rglob("*")) if p.is_file() and "/dG/c/" in str(p))

    chunk.unlink()  # a deleted chunk file
    with pytest.raises(ValueError, match=r"chunk file is missing"):
        StoreReader(out).read_block(1)
    assert run_in_process(featurize_main, args + ["--verify"]).returncode == 0
    assert _tree(out) == intact

    data = bytearray(chunk.read_bytes())  # one flipped bit
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"cannot be decompressed .* damaged"):
        StoreReader(out).read_block(1)
    assert run_in_process(featurize_main, args + ["--verify"]).returncode == 0
    assert _tree(out) == intact

    import shutil

    shutil.rmtree(out / "blocks" / "b000001")  # a deleted block
    with pytest.raises(ValueError, match=r"block 1 .* is missing"):
        StoreReader(out).read_block(1)
    result = run_in_process(featurize_main, args)  # no --verify needed: a missing directory is seen at once
    assert result.returncode == 0
    assert _tree(out) == intact


@pytest.fixture(scope="module")
def cli_case(tmp_path_factory, store):
    base = tmp_path_factory.mktemp("cli")
    (base / "afile").write_text("x")
    (base / "t.toml").write_text(f'[data]\nstore = "{store}"\n[run]\nepochs = 1\nrun_dir = "{base / "run"}"\n')
    generate_in = generate_emt_dataset(base / "data", num_structures=3, seed=1)
    (base / "trunc.zarr").mkdir()
    (base / "trunc.zarr" / "zarr.json").write_text((Path(store) / "zarr.json").read_text()[:100])
    return base, generate_in


CLI_CASES = [
    (["featurize", "{gen}", "--out", "{base}/afile"], "--out .*afile: exists and is not a directory"),
    (["featurize", "{gen}", "--out", "{base}/s.zarr", "--force-list", "{base}/nope.txt"], "--force-list .*nope.txt: no such file"),
    (["featurize", "{gen}", "--out", "{base}/s.zarr", "--chunk-mb", "0.01"], r"--chunk-mb must be at least 0.0625 \(64 KiB\)"),
    (["train", "{base}/t.toml", "run.run_dir={base}/afile"], "run.run_dir .*afile exists and is not a directory"),
    (["train"], "give a configuration file"),
    (["train", "{base}/t.toml", "run.run_dir={base}/r3", "data.store={base}/trunc.zarr"], r"trunc.zarr/zarr.json: damaged store metadata"),
    (["datasets", "emt", "--out", "{base}/afile", "--structures", "2"], "cannot write the data set to .*afile"),
    (["plan", "{base}/trunc.zarr", "--ranks", "0"], "--ranks must be >= 1, got 0"),
    (["plan", "{base}/trunc.zarr", "--memory-budget-gb", "-1"], "--memory-budget-gb must be > 0, got -1"),
] + ([] if torch.cuda.is_available() else [
    (["train", "{base}/t.toml", "run.run_dir={base}/r4", "run.device=cuda"], "no CUDA device is available"),
])


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=lambda v: " ".join(v)[:50] if isinstance(v, list) else None)
def test_command_line_user_errors_are_one_clear_message(cli_case, argv, message):
    import re

    base, generate_in = cli_case
    argv = [a.format(base=base, gen=generate_in) for a in argv]
    result = subprocess.run([sys.executable, "-m", "aenet_dist.cli", *argv], capture_output=True, text=True, cwd=base, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert re.search(message, output), output
    assert "Traceback" not in output
    assert (base / "afile").read_text() == "x"


def test_finetune_with_another_network_shape_names_the_shapes(store, tmp_path):
    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "a", epochs=1)
    assert _train([config]).returncode == 0
    result = _train([config, f"run.run_dir={tmp_path / 'b'}", "model.hidden=[4, 4]", "--finetune",
                     tmp_path / "a" / "checkpoints" / "checkpoint_000001.pt"])
    assert result.returncode == 2
    assert "do not fit this model's networks" in result.stderr and "shapes differ: nets." in result.stderr and "(6, " in result.stderr and "here (4, " in result.stderr


def test_coincident_atoms_are_refused_naming_the_structure(tmp_path):
    from aenet_dist.formats.generate_in import read_generate_input as read_gen
    from aenet_dist.descriptors import featurize
    from aenet_dist.structures import Structure, read_structures

    generate_in, xsf = _emt_inputs(tmp_path, structures=3)
    config = read_gen(generate_in)
    s = read_structures(xsf[1])[0]
    pos = s.pos.copy()
    pos[1] = pos[0] + [0.05, 0.0, 0.0]  # a duplicated atom line, slightly off
    bad = Structure(s.species, pos, s.cell, s.pbc, s.energy, s.forces, "bad.xsf")
    with pytest.raises(ValueError, match=r"bad.xsf: atoms [12] and [12] \(counting from 1\) are 0.05 Å apart, closer than RMIN"):
        featurize([read_structures(xsf[0])[0], bad], config.setups, config.species, [True, True])


def test_atomic_write_honours_umask_follows_symlinks_and_leaves_nothing_on_failure(tmp_path):
    from aenet_dist.files import TMP_SUFFIX, atomic_write, remove_stale_temporaries

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.nn", b"data")  # a fresh file: 0644, as open() would give
        assert (tmp_path / "a.nn").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    atomic_write(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"
    atomic_write("/dev/null", "not a regular file: written through, not replaced")
    assert Path("/dev/null").is_char_device()

    def fail(fh):
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "a.nn", fail)
    assert (tmp_path / "a.nn").read_bytes() == b"data"
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}"))
    (tmp_path / f".x.nn.abc{TMP_SUFFIX}").write_text("left by a killed run")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [f".x.nn.abc{TMP_SUFFIX}"]


def test_predict_json_through_a_symlink_and_an_unwritable_target_refused_first(tmp_path):
    import json

    from aenet_dist.predict import main as predict_main

    shared = ROOT.parent / "shared" / "refdata"
    if not (shared / "Ti.pytorch.nn").exists():
        pytest.skip("../shared/refdata is not available")
    xsf = sorted((ROOT.parent / "shared" / "data" / "tio2" / "xsf").glob("*.xsf"))[:2]
    potentials = f"{shared / 'Ti.pytorch.nn'},{shared / 'O.pytorch.nn'}"
    (tmp_path / "real.json").write_text("[]")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    result = run_in_process(predict_main, ["--potentials", potentials, *xsf, "--json", tmp_path / "link.json", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "link.json").is_symlink() and len(json.loads((tmp_path / "real.json").read_text())) == 2
    result = run_in_process(predict_main, ["--potentials", potentials, *xsf, "--json", tmp_path / "nodir" / "x.json"])
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_export_refuses_an_element_without_training_atoms(tmp_path):
    from aenet_dist.export import main as export_main
    from aenet_dist.structures import read_structures

    generate_in, xsf = _emt_inputs(tmp_path, structures=30)
    config_text = generate_in.read_text()
    absent = "Ni"
    without = [p for p in xsf if absent not in read_structures(p)[0].species]
    assert len(without) >= 4, "the EMT set has structures without Ni"
    lines = config_text.splitlines()
    files_at = next(i for i, line in enumerate(lines) if line.strip().upper() == "FILES")
    names = [f"xsf/{p.name}" for p in without]
    (tmp_path / "data" / "no_ni.in").write_text("\n".join(lines[:files_at] + ["FILES", str(len(names)), *names]) + "\n")
    store = tmp_path / "s.zarr"
    featurize_to_store(read_generate_input(tmp_path / "data" / "no_ni.in"), store, progress=False)
    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "run", epochs=1)
    assert _train([config]).returncode == 0
    result = run_in_process(export_main, [tmp_path / "run", "--out", tmp_path / "nn"])
    assert result.returncode == 2 and f"no atoms of {absent} in the store" in result.stderr
    assert not list((tmp_path / "nn").glob("*.nn")) if (tmp_path / "nn").exists() else True


def test_resume_with_finetune_starts_from_the_weights_then_resumes_the_run(store, tmp_path):
    """launch/train.sh passes --resume on every start of a job: with --finetune, the first start
    takes the fine-tuning weights (it used to start from scratch, silently) and a requeue resumes."""
    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "a", epochs=1)
    assert _train([config]).returncode == 0
    weights = tmp_path / "a" / "checkpoints" / "checkpoint_000001.pt"
    assert _train([config, f"run.run_dir={tmp_path / 'plain'}", "--finetune", weights]).returncode == 0
    both = _train([config, f"run.run_dir={tmp_path / 'both'}", "--resume", "--finetune", weights])
    assert both.returncode == 0 and "from the weights of" in both.stderr
    assert read_metrics(tmp_path / "both") == [
        {k: v for k, v in m.items() if not k.endswith("seconds") and k != "structures_per_second"} | {
            k: v for k, v in b.items() if k.endswith("seconds") or k == "structures_per_second"}
        for m, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "both"))]
    again = _train([config, f"run.run_dir={tmp_path / 'both'}", "run.epochs=2", "--resume", "--finetune", weights])
    assert again.returncode == 0 and "resumed from" in again.stderr
    assert [m["epoch"] for m in read_metrics(tmp_path / "both")] == [1, 2]


def _train_output(config, tty: bool) -> str:
    """The train command's output through a pipe, or through a pseudo-terminal (what a user sees)."""
    cmd = [sys.executable, "-m", "aenet_dist.train", str(config)]
    if not tty:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300).stderr
    import pty

    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal 160 columns wide
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_training_output_a_bar_on_a_terminal_and_25_lines_in_a_pipe(store, tmp_path):
    piped = _train_output(write_train_toml(tmp_path / "p.toml", store, tmp_path / "p", epochs=50, batch_size=16), tty=False)
    epoch_lines = [line for line in piped.splitlines() if " INFO epoch " in line]
    assert 20 <= len(epoch_lines) <= 30, len(epoch_lines)  # about 25 lines, not 50
    assert " INFO epoch 1/50 " in piped and " INFO epoch 50/50 " in piped
    assert "\r" not in piped and "epoch/s]" not in piped and "s/epoch]" not in piped  # no bar in a pipe
    assert "WARNING" not in piped  # a balanced tiny run warns about nothing
    shown = _train_output(write_train_toml(tmp_path / "t.toml", store, tmp_path / "t", epochs=6, batch_size=16), tty=True)
    assert "train:" in shown and "6/6" in shown and "\r" in shown  # tqdm's bar, redrawn in place
    assert "test E" in shown and " INFO epoch 6/6 " in shown
    assert len(read_metrics(tmp_path / "p")) == 50  # every epoch in metrics.jsonl


def test_tensorboard_scalars_or_a_clear_message(store, tmp_path):
    import importlib.util

    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "run", epochs=2, extra="tensorboard = true")
    result = _train([config])
    if importlib.util.find_spec("tensorboard") is None:
        assert result.returncode == 2 and "pip install 'aenet_dist[tensorboard]'" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("compressor", ["lz4", "none"])
def test_store_codecs_read_back_equal_and_detect_damage(tmp_path, compressor):
    """Every codec gives the same content (read directly and through zarr), its own fingerprint,
    and a flipped bit is an error (CRC32C) naming the chunk."""
    import numpy as np
    import zarr

    from aenet_dist.featurize import main as featurize_main
    from aenet_dist.store import StoreReader, _read_plain_array

    generate_in, _ = _emt_inputs(tmp_path, structures=6)
    ref, other = tmp_path / "zstd.zarr", tmp_path / f"{compressor}.zarr"
    assert run_in_process(featurize_main, [generate_in, "--out", ref, "--no-progress"]).returncode == 0
    assert run_in_process(featurize_main, [generate_in, "--out", other, "--no-progress", "--compressor", compressor]).returncode == 0
    a, b = StoreReader(ref), StoreReader(other)
    assert a.fingerprint != b.fingerprint
    ra, rb = a.read_range(0, a.num_structures), b.read_range(0, b.num_structures)
    for el in ra.elements:
        for field in ("G", "dG", "deriv_center", "deriv_neighbor", "atom"):
            assert np.array_equal(getattr(ra.elements[el], field), getattr(rb.elements[el], field)), (el, field)
    chunk = max((p for p in (other / "blocks").rglob("*") if p.is_file() and "/dG/c/" in str(p)), key=lambda p: p.stat().st_size)
    array_dir = chunk.parents[len(chunk.relative_to(chunk.parent.parent).parts) - 1]  # .../<El>/dG
    while array_dir.name != "dG":
        array_dir = array_dir.parent
    direct = _read_plain_array(array_dir)
    assert direct is not None and np.array_equal(direct, zarr.open_array(zarr.storage.LocalStore(array_dir), mode="r")[...])
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checksum \(CRC32C\) does not match|cannot be decompressed"):
        _read_plain_array(array_dir)
