"""Tests for aenet_dist.cli: one argparse tree, lazy command imports, one error handler."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aenet_dist import cli
from helpers import fault_env, featurized_emt, run_in_process, write_train_toml

ROOT = Path(__file__).resolve().parents[1]


def _exit_code(argv: list[str]) -> int:
    """cli.main's exit code, whether returned or raised by argparse."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


def test_help_lists_every_command(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: aenet-dist <command> [args]")
    for name, help_text in cli.COMMANDS.items():
        assert f"  {name:<11} {help_text}" in out


def test_no_command_prints_the_overview_and_exits_2(capsys):
    """``aenet-dist`` alone exited 0, so a script with an empty command variable went on as if it had run."""
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: aenet-dist <command> [args]") and "featurize" in captured.err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_command_has_its_help(command, capsys):
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: aenet-dist {command} ")
    module = __import__(f"aenet_dist.{command}", fromlist=["DESCRIPTION"])
    assert module.DESCRIPTION.split()[0] in out
    if module.EPILOG:
        assert module.EPILOG.splitlines()[-1] in out


def test_datasets_subcommands_have_their_help(capsys):
    for name in ("emt", "synth"):
        assert _exit_code(["datasets", name, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: aenet-dist datasets {name} ")


def test_unknown_command_exits_2_naming_the_commands(capsys):
    assert _exit_code(["fetaurize", "x"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fetaurize'" in err and "featurize" in err


def _modules_after(argv: list[str]) -> dict:
    """The aenet_dist modules (and whether torch, matplotlib) a fresh interpreter loaded for cli.main(argv)."""
    code = (
        "import contextlib, io, json, sys\n"
        "from aenet_dist import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    cli.main({argv!r})\n"
        "print(json.dumps({'aenet_dist': sorted(m for m in sys.modules if m.startswith('aenet_dist')),\n"
        "                  'matplotlib': 'matplotlib' in sys.modules, 'torch': 'torch' in sys.modules}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_only_the_chosen_command_is_imported():
    loaded = _modules_after(["featurize", "--help"])
    assert "aenet_dist.featurize" in loaded["aenet_dist"]
    for other in ("train", "predict", "plot", "export", "plan", "datasets", "loader", "model", "step", "dist"):
        assert f"aenet_dist.{other}" not in loaded["aenet_dist"], loaded
    assert not loaded["matplotlib"]
    loaded = _modules_after(["--help"])
    assert loaded["aenet_dist"] == ["aenet_dist", "aenet_dist.cli"] and not loaded["torch"]


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["plan", str(tmp_path / "nonexistent.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nonexistent.zarr" in err and "Traceback" not in err
    assert cli.main(["plan", str(tmp_path / "x.zarr"), "--ranks", "0"]) == 2
    assert capsys.readouterr().err == "error: --ranks must be >= 1, got 0\n"
    assert cli.main(["featurize", str(tmp_path / "generate.in"), "--out", str(tmp_path / "s.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "generate.in" in err


def test_error_handler_maps_user_errors_and_keeps_bugs(capsys):
    def bad_input(args):
        raise FileNotFoundError(2, "No such file or directory", "x.in")

    def bug(args):
        raise KeyError("a bug")

    assert cli.run_command(bad_input, None) == 2
    # a sentence with the path and what to do, not "[Errno 2] No such file or directory: 'x.in'"
    assert capsys.readouterr().err == "error: x.in: no such file or directory; check the path\n"
    assert cli.run_command(lambda args: 75, None) == 75
    with pytest.raises(KeyError):
        cli.run_command(bug, None)


def test_module_main_is_the_same_command(tmp_path):
    """``python -m aenet_dist.plan`` goes through the same parser and error handler as ``aenet-dist plan``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    result = subprocess.run([sys.executable, "-m", "aenet_dist.plan", str(tmp_path / "x.zarr"), "--ranks", "0"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2 and result.stderr == "error: --ranks must be >= 1, got 0\n"
    result = subprocess.run([sys.executable, "-m", "aenet_dist.train"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("usage: aenet-dist train ")
    assert result.stderr.endswith("error: give a configuration file (train.toml, or aenet-PyTorch's train.in); see --help\n")


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args...`` in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_fast_exit_keeps_exit_codes_and_flushes_output(tmp_path):
    """featurize and predict end without Python's teardown (cli.exit_process): exit codes, the full stdout
    (block-buffered in a pipe) and logging still come out; other commands exit normally."""
    entry = "import sys\nsys.argv = ['aenet-dist', *sys.argv[1:]]\nfrom aenet_dist.cli import entry\nentry()\n"
    bad = _run(entry, "featurize", str(tmp_path / "missing.in"), "--out", str(tmp_path / "s.zarr"))
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "missing.in" in bad.stderr
    assert _run(entry, "plan", str(tmp_path / "nothing.zarr")).returncode == 2  # the normal exit path
    code = ("import atexit, sys\natexit.register(lambda: print('TEARDOWN'))\n"
            "print('x' * 100000)\nfrom aenet_dist.cli import exit_process\nexit_process(3)\n")
    done = _run(code)
    assert done.returncode == 3 and done.stdout == "x" * 100000 + "\n"  # flushed, and no teardown (atexit) ran


def test_featurize_module_run_under_mpi_exits_cleanly(tmp_path):
    """``mpiexec -n 2 python -m aenet_dist.featurize``: every rank ends by itself with exit code 0 (a rank that left
    by os._exit right after MPI_Finalize got the others killed, and mpiexec still returned 0), and the summary."""
    from aenet_dist.datasets import generate_emt_dataset

    generate_in = generate_emt_dataset(tmp_path / "emt", num_structures=6, seed=1, force_percent=50.0)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    command = f"{sys.executable} -m aenet_dist.featurize {generate_in} --out {tmp_path / 's.zarr'} --no-progress; echo rank exit $?"
    result = subprocess.run([str(mpiexec), "-n", "2", "sh", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("rank exit 0") == 2, result.stdout + result.stderr
    assert "structures       6" in result.stdout and "on 2 rank(s)" in result.stdout
    # The same with rank 1 ending a second after rank 0 (the case that got rank 1 killed).
    late = ("from mpi4py import MPI; import time; time.sleep(MPI.COMM_WORLD.rank); "
            "from aenet_dist.cli import exit_process; exit_process(0)")
    result = subprocess.run([str(mpiexec), "-n", "2", "sh", "-c", f'{sys.executable} -c "{late}"; echo rank exit $?'],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.count("rank exit 0") == 2, result.stdout + result.stderr


def _parsers(parser: argparse.ArgumentParser):
    """``parser`` and every subparser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_has_help_and_no_abbreviation_is_taken(command):
    """An abbreviation (``--resum`` for ``--resume``) that is unique today becomes ambiguous, or another
    option, when one is added; every option says what it does (predict --dtype did not)."""
    _, chosen = cli.build_parser(__import__(f"aenet_dist.{command}", fromlist=["add_arguments"]))
    for parser in _parsers(chosen):
        assert parser.allow_abbrev is False, parser.prog
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):  # (its choices are checked as parsers)
                assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help text"


@pytest.mark.parametrize("argv, bad", [
    (["train", "x.toml", "--resum"], "--resum"),
    (["featurize", "generate.in", "--out", "s.zarr", "--compression", "3"], "--compression"),
    (["predict", "--potential", "pots", "a.xsf"], "--potential"),
    (["datasets", "emt", "--ou", "x"], "--out"),  # a command's own subcommand, too
])
def test_abbreviated_options_are_refused(argv, bad, capsys):
    assert _exit_code(argv) == 2
    assert bad in capsys.readouterr().err


@pytest.fixture(scope="module")
def no_forces_store(tmp_path_factory):
    """A store of 12 EMT structures without derivatives (featurized in about a second)."""
    return featurized_emt(tmp_path_factory.mktemp("cli_store"), num_structures=12, seed=5, force_percent=0.0)[1]


def test_missing_config_file_is_one_sentence(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nofile.toml")]) == 2
    assert capsys.readouterr().err == (f"error: configuration file {tmp_path / 'nofile.toml'} does not exist; check the path "
                                       "(a train.toml, or aenet-PyTorch's train.in)\n")


def test_failed_start_leaves_no_run_directory(no_forces_store, tmp_path):
    """A start that fails (here: no store, the GPU cache without a GPU... any) used to leave
    runs/<name>/ holding only .lock; the directories it created go, a directory that was there stays."""
    config = write_train_toml(tmp_path / "t.toml", no_forces_store, tmp_path / "runs" / "new", epochs=1)
    failed = run_in_process(cli.main, ["train", config, f"data.store={tmp_path / 'missing.zarr'}"])
    assert failed.returncode == 2 and "missing.zarr" in failed.stderr
    assert not (tmp_path / "runs").exists()  # runs/ was created with runs/new: both are gone
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "notes.txt").write_text("kept\n")
    (tmp_path / "runs" / "empty").mkdir()
    for name in ("mine", "empty"):
        failed = run_in_process(cli.main, ["train", config, f"data.store={tmp_path / 'missing.zarr'}",
                                           f"run.run_dir={tmp_path / 'runs' / name}"])
        assert failed.returncode == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["empty", "mine"]
    assert sorted(p.name for p in (tmp_path / "runs" / "empty").iterdir()) == [".lock"]  # the lock of a directory in use stays
    # a run that trained keeps its directory (and its lock file: see aenet_dist.files)
    done = run_in_process(cli.main, ["train", config])
    assert done.returncode == 0, done.stderr
    assert {".lock", "config.toml", "metrics.jsonl", "checkpoints"} <= {p.name for p in (tmp_path / "runs" / "new").iterdir()}


def test_ctrl_c_during_featurize_is_one_line_and_the_rerun_resumes(tmp_path):
    """Ctrl-C printed a KeyboardInterrupt traceback; now one line, exit 130, and the same command finishes the store."""
    from aenet_dist.datasets import generate_emt_dataset

    generate_in = generate_emt_dataset(tmp_path / "emt", num_structures=12, seed=2, force_percent=50.0)
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "aenet_dist.featurize", str(generate_in), "--out", str(out), "--chunk-mb", str(2**16 / 2**20),
           "--no-progress"]
    env = fault_env(dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)),
                    block_delay=0.5)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "blocks").glob("b*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume (finished blocks are kept)"
    assert "Traceback" not in err
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=env["PYTHONPATH"]))
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr


def test_one_ctrl_c_while_train_loads_its_data(no_forces_store, tmp_path):
    """Before the run's own handler is in place (loading data) Ctrl-C stops at once: one line that
    does not speak of a "second Ctrl-C", exit 130, and the run directory it created is gone."""
    store = tmp_path / "slow.zarr"
    store.mkdir()
    os.mkfifo(store / "zarr.json")  # reading the store waits here until the signal comes
    config = write_train_toml(tmp_path / "t.toml", store, tmp_path / "runs" / "r", epochs=1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "aenet_dist.train", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "runs" / "r" / ".lock").exists():
        time.sleep(0.02)
    time.sleep(0.5)  # on to the store, past the run directory
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("interrupted: Ctrl-C while the run was starting (loading data), before its first "
                                            "step; rerun the same command to start it again")
    assert "second" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_while_train_imports_torch_is_one_line(no_forces_store, tmp_path):
    """`python -m aenet_dist.train` (what torchrun runs) spends its first second loading torch; a Ctrl-C
    then printed an import traceback (on every rank). Now one line and exit 130, whenever it comes."""
    config = write_train_toml(tmp_path / "t.toml", no_forces_store, tmp_path / "runs" / "r", epochs=1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "aenet_dist.train", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # (the interpreter is up; torch is loading, on this machine)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted"), err


def test_compression_level_out_of_range_is_refused(tmp_path, capsys):
    from aenet_dist.datasets import generate_emt_dataset

    generate_in = generate_emt_dataset(tmp_path / "emt", num_structures=2, seed=2, force_percent=0.0)
    assert cli.main(["featurize", str(generate_in), "--out", str(tmp_path / "s.zarr"), "--compression-level", "99", "--no-progress"]) == 2
    assert "must be an integer in [-131072, 22], got 99" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_featurize_system_errors_are_sentences(tmp_path, capsys):
    """An OSError inside featurize (here: --out below a file) reaches the user as the path and what to
    do, not Python's '[Errno 17] File exists: ...' (featurize reports errors from every rank)."""
    from aenet_dist.datasets import generate_emt_dataset

    generate_in = generate_emt_dataset(tmp_path / "emt", num_structures=2, seed=2, force_percent=0.0)
    (tmp_path / "afile").write_text("not a folder\n")
    assert cli.main(["featurize", str(generate_in), "--out", str(tmp_path / "afile" / "s.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "[Errno" not in err and f"{tmp_path / 'afile'}: file exists; remove it or choose another path" in err
