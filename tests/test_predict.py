"""Prediction with aenet .nn potentials: agreement with aenet's predict.x (TiO2 reference), both
engines, batching, forces and stress by finite differences, predict.in parsing, the CLI, and the
messages for bad input (truncated .nn, species without potential, disagreeing ENV setups)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aenet_dist.formats.nn import read_nn, write_nn
from aenet_dist.formats.predict_in import read_predict_input
from aenet_dist.predict import Predictor, format_aenet, main as predict_main, predict_files
from aenet_dist.structures import Structure, read_xsf
from helpers import fd_force, fd_stress

SHARED = Path(os.environ.get("AENET_DIST_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFDATA = SHARED / "refdata"
XSF_DIR = SHARED / "data" / "tio2" / "xsf"
POTENTIALS = {"Ti": REFDATA / "Ti.pytorch.nn", "O": REFDATA / "O.pytorch.nn"}


@pytest.fixture(scope="module")
def ref():
    path = REFDATA / "tio2_20_predict.npz"
    if not path.exists() or not XSF_DIR.exists() or not all(p.exists() for p in POTENTIALS.values()):
        pytest.skip(f"aenet reference data not found ({path}, {XSF_DIR}): the shared/ folder is absent")
    data = np.load(path)
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def predictor(ref):
    return Predictor.from_potentials(POTENTIALS)


@pytest.fixture(scope="module")
def structures(ref):
    return [read_xsf(XSF_DIR / name) for name in ref["file_names"]]


def _flat(results, key):
    return np.concatenate([getattr(r, key) for r in results])


@pytest.mark.parametrize("engine", ["pairs", "rows"])
def test_agrees_with_predict_x(ref, predictor, structures, engine):
    results = predictor.predict(structures, forces=True, engine=engine)
    natoms = ref["natoms"]
    energy = np.array([r.energy for r in results])
    assert np.abs(energy - ref["energy_total"]).max() / natoms.min() < 1e-8  # eV/atom
    np.testing.assert_allclose([r.cohesive_energy for r in results], ref["energy_cohesive"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(_flat(results, "atomic_energies"), ref["atomic_energy"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(_flat(results, "forces"), ref["forces"], rtol=0, atol=1e-6)  # eV/Å
    assert [r.num_atoms for r in results] == natoms.tolist()


def test_energies_only_and_batching_give_the_same_numbers(predictor, structures):
    full = predictor.predict(structures, forces=True)
    small = predictor.predict(structures, forces=False, batch_structures=3, pair_budget=500)
    assert all(r.forces is None and r.stress is None for r in small)
    np.testing.assert_allclose([r.energy for r in small], [r.energy for r in full], rtol=0, atol=1e-9)
    tiny = predictor.predict(structures[:5], forces=True, batch_structures=1, pair_budget=1)
    np.testing.assert_allclose(_flat(tiny, "forces"), _flat(full[:5], "forces"), rtol=0, atol=1e-12)


def test_threads_give_the_same_bits_in_the_same_order(predictor, structures):
    """Batches evaluated side by side: every number bitwise that of one thread, structures in order."""
    one = predictor.predict(structures, forces=True, stress=True, batch_structures=4)
    for threads in (2, 3):
        many = predictor.predict(structures, forces=True, stress=True, batch_structures=4, threads=threads)
        assert [r.name for r in many] == [r.name for r in one]
        for a, b in zip(one, many):
            assert a.energy == b.energy
            assert np.array_equal(a.atomic_energies, b.atomic_energies) and np.array_equal(a.forces, b.forces)
            assert np.array_equal(a.stress, b.stress)
    energies = predictor.predict(structures, forces=False, threads=2)
    assert [r.energy for r in energies] == [r.energy for r in one]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        predictor.predict(structures, threads=0)


def test_files_read_and_predicted_side_by_side(ref, predictor, tmp_path):
    """predict_files with threads: chunks of files read and predicted at once, results in file order,
    bitwise those of one thread; a broken file in the middle is named."""
    paths = [XSF_DIR / n for n in ref["file_names"][:9]]
    names = [f"s{k}" for k in range(9)]
    one = predict_files(predictor, paths, names, threads=1, forces=True)
    two = predict_files(predictor, paths, names, threads=2, forces=True)
    assert [r.name for r in two] == [r.name for r in one] == names
    assert all(a.energy == b.energy and np.array_equal(a.forces, b.forces) for a, b in zip(one, two))
    bad = tmp_path / "bad.xsf"
    bad.write_text("# total energy = -1.0 eV\nCRYSTAL\nPRIMVEC\n1 0 0\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}: PRIMVEC needs 3 lattice vectors")):
        predict_files(predictor, paths[:4] + [bad] + paths[4:], names[:4] + ["bad"] + names[4:], threads=2)


def test_forces_and_stress_are_derivatives_of_the_energy(predictor, structures):
    """F = −dE/dR for a periodic and an isolated structure; stress = (1/V) dE/dε (ASE's sign)."""
    periodic = structures[9]  # 22 atoms
    isolated = Structure(periodic.species[:10], periodic.pos[:10], np.zeros((3, 3)), False, None, None, "cluster")
    for s in (periodic, isolated):
        (res,) = predictor.predict([s], forces=True, stress=s.pbc)
        assert (res.stress is not None) == s.pbc
        for atom in (0, 3, 7):
            for d in range(3):
                assert res.forces[atom, d] == pytest.approx(fd_force(predictor, s, atom, d), abs=2e-6)
    (res,) = predictor.predict([periodic], forces=True, stress=True)
    for a, b in ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)):
        assert res.stress[a, b] == pytest.approx(fd_stress(predictor, periodic, a, b), abs=1e-7)
    assert np.allclose(res.stress, res.stress.T)


def test_float32_is_close(structures):
    p32 = Predictor.from_potentials(POTENTIALS, dtype="float32")
    p64 = Predictor.from_potentials(POTENTIALS)
    r32, r64 = p32.predict(structures[:4]), p64.predict(structures[:4])
    for a, b in zip(r32, r64):
        assert abs(a.cohesive_energy - b.cohesive_energy) / a.num_atoms < 1e-4
        assert np.abs(a.forces - b.forces).max() < 1e-3


def test_float32_results_are_float32_computed(structures):
    """float32 is computed in float32 (not float64 cast back): it differs from float64 in the low bits."""
    p32 = Predictor.from_potentials(POTENTIALS, dtype=np.float32)
    assert p32.dtype == np.float32 and all(net.dtype == np.float32 for net in p32.networks.values())
    (a,), (b,) = p32.predict(structures[:1]), Predictor.from_potentials(POTENTIALS).predict(structures[:1])
    assert a.energy != b.energy
    with pytest.raises(ValueError, match="float64 or float32"):
        Predictor.from_potentials(POTENTIALS, dtype="float16")


def test_prediction_and_featurize_never_import_torch(structures, tmp_path):
    """predict, the ASE calculator and featurize run without torch (its import alone costs 2+ s per process)."""
    code = (
        "import sys\n"
        "from aenet_dist.predict import Predictor, read_for_prediction\n"
        "import aenet_dist.ase, aenet_dist.featurize, aenet_dist.store\n"
        f"p = Predictor.from_potentials({{'Ti': {str(POTENTIALS['Ti'])!r}, 'O': {str(POTENTIALS['O'])!r}}})\n"
        f"(r,) = p.predict(read_for_prediction({str(sorted(XSF_DIR.glob('*.xsf'))[0])!r}), forces=True, stress=True)\n"
        "assert r.forces.shape[1] == 3\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------- predict.in and CLI


def _predict_in(tmp_path: Path, names, extra: str = "FORCES\n") -> Path:
    """predict.in in tmp_path/job with potentials in pots/ and structures in xsf/, paths relative."""
    job = tmp_path / "job"
    (job / "pots").mkdir(parents=True)
    (job / "xsf").mkdir()
    for el, p in POTENTIALS.items():
        shutil.copy(p, job / "pots" / p.name)
    for n in names:
        shutil.copy(XSF_DIR / n, job / "xsf" / n)
    files = "\n".join(f"xsf/{n}" for n in names)
    path = job / "predict.in"
    path.write_text(f"! comment line\nTYPES\n2\nTi\nO   ! oxygen\n\nNETWORKS\n  Ti  pots/Ti.pytorch.nn\n  O   pots/O.pytorch.nn\n\n"
                    f"{extra}VERBOSITY low\n\nFILES\n{len(names)}\n{files}\n")
    return path


def test_predict_in_is_parsed(ref, tmp_path):
    names = [str(n) for n in ref["file_names"][:3]]
    path = _predict_in(tmp_path, names)
    inp = read_predict_input(path)
    assert inp.types == ("Ti", "O") and inp.forces and not inp.print_atomic_energies
    assert inp.networks == {"Ti": path.parent / "pots" / "Ti.pytorch.nn", "O": path.parent / "pots" / "O.pytorch.nn"}
    assert inp.files == tuple(path.parent / "xsf" / n for n in names)
    assert inp.file_names == tuple(f"xsf/{n}" for n in names)


@pytest.mark.parametrize("text, message", [
    ("TYPES\n2\nTi\nO\nFILES\n0\n", r": missing NETWORKS section"),
    ("TYPES\n2\nTi\nNETWORKS\nTi a.nn\nO b.nn\nFILES\n0\n", r":2: TYPES announces 2 species but only 1 follow before NETWORKS \(line 4\)"),
    ("TYPES\n1\nTi\nNETWORKS\nO a.nn\nFILES\n0\n", r":5: NETWORKS species 'O' is not in TYPES \['Ti'\]"),
    ("TYPES\n1\nTi\nNETWORKS\nTi a.nn\nFILES\n3\nx.xsf\n", r":7: FILES announces 3 files but only 1 follow before the end of the file"),
    ("TYPES\n1\nTi\nNETWORKS\nTi a.nn\nRELAX\nFILES\n0\n", r":6: RELAX .* is not supported"),
    ("TYPES\n1\nTi\nNETWORKS\nTi a.nn\nFORCES maybe\nFILES\n0\n", r":6: expected 'FORCES' or 'FORCES .true./.false.'"),
    ("TYPES\n1\nTi\nNETWORK\nTi a.nn\n", r":4: unknown keyword 'NETWORK'"),
])
def test_bad_predict_in(tmp_path, text, message):
    path = tmp_path / "predict.in"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        read_predict_input(path)


def test_cli_with_predict_in(ref, tmp_path, capsys):
    names = [str(n) for n in ref["file_names"][:4]]
    path = _predict_in(tmp_path, names, extra="FORCES\nPRINT_ATOMIC_ENERGIES\n")
    out = tmp_path / "out.json"
    assert predict_main([str(path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("Total energy               :") == 4 and "File name         : xsf/structure1169.xsf" in text
    assert "E_atom" in text and "The maximum force is acting on atom" in text
    data = json.loads(out.read_text())
    assert [d["name"] for d in data] == [f"xsf/{n}" for n in names]
    np.testing.assert_allclose([d["energy"] for d in data], ref["energy_total"][:4], rtol=0, atol=1e-8)
    np.testing.assert_allclose([d["cohesive_energy"] for d in data], ref["energy_cohesive"][:4], rtol=0, atol=1e-8)
    n = int(ref["atom_offset"][4])
    np.testing.assert_allclose(np.concatenate([d["forces"] for d in data]), ref["forces"][:n], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([d["atomic_energies"] for d in data]), ref["atomic_energy"][:n], atol=1e-9)
    for d in data:  # energy_per_atom is E / N, the atomic energies sum to E
        assert d["energy_per_atom"] == pytest.approx(d["energy"] / d["num_atoms"], rel=1e-14)
        assert sum(d["atomic_energies"]) == pytest.approx(d["energy"], rel=1e-12)
    # structure files on the command line replace FILES; --threads 1 gives the same numbers
    assert predict_main([str(path), "--threads", "1", "--quiet", "--json", str(out)]) == 0
    assert [d["forces"] for d in json.loads(out.read_text())] == [d["forces"] for d in data]
    assert predict_main([str(path), str(path.parent / "xsf" / names[0]), "--quiet", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 1
    assert predict_main([str(path), "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_quiet_without_an_output_file_is_refused(ref, tmp_path, capsys):
    """--quiet without --json or --out computed everything and wrote nothing; --quiet --out wrote
    nothing either. Now the first is refused before any work, and --out is always written."""
    path = _predict_in(tmp_path, [str(n) for n in ref["file_names"][:2]])
    assert predict_main([str(path), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ("error: --quiet leaves out the text report on stdout, and without --json FILE "
                                                   "or --out FILE nothing would be written; add one of them, or leave out --quiet\n")
    report = tmp_path / "report.txt"
    assert predict_main([str(path), "--quiet", "--out", str(report)]) == 0
    assert capsys.readouterr().out == "" and report.read_text().count("Total energy               :") == 2


def test_cli_worker_processes_give_the_same_bits(ref, tmp_path):
    """In a process without torch, --threads 2 forks worker processes: the JSON equals --threads 1's
    bit for bit, in file order; a broken file in the middle is named, without a traceback."""
    names = [str(n) for n in ref["file_names"][:9]]
    path = _predict_in(tmp_path, names)
    job = path.parent
    code = ("import sys\nfrom aenet_dist import predict\nassert predict._can_fork()\n"
            "sys.exit(predict.main(sys.argv[1:]))\n")
    for threads in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code, str(path), "--threads", threads, "--quiet", "--json", f"t{threads}.json"],
                              cwd=job, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    one, two = (json.loads((job / f"t{t}.json").read_text()) for t in ("1", "2"))
    assert [d["name"] for d in two] == [f"xsf/{n}" for n in names]
    assert two == one  # floats through JSON's repr: equal means bitwise
    bad = job / "xsf" / "bad.xsf"
    bad.write_text("# total energy = -1.0 eV\nCRYSTAL\nPRIMVEC\n1 0 0\n")
    files = [str(job / "xsf" / n) for n in names[:4]] + [str(bad)] + [str(job / "xsf" / n) for n in names[4:]]
    done = subprocess.run([sys.executable, "-m", "aenet_dist.predict", "--potentials", str(job / "pots"), *files, "--threads", "2", "--quiet",
                           "--json", "bad.json"],
                          cwd=job, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: {bad}: PRIMVEC needs 3 lattice vectors" in done.stderr


def test_killed_worker_process_is_a_clear_error(ref, tmp_path):
    """A worker that dies (SIGKILL, as the out-of-memory killer sends) ends predict with a one-line
    error, not a hang or a traceback."""
    path = _predict_in(tmp_path, [str(n) for n in ref["file_names"][:6]])
    code = ("import os, signal, sys\nfrom aenet_dist import predict\n"
            "def killed(chunk):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "predict._predict_chunk = killed\n"
            "sys.exit(predict.main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(path), "--threads", "2", "--quiet", "--json", "out.json"],
                          cwd=path.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "error: a predict worker process ended abruptly" in done.stderr


def test_cli_with_potentials_and_globs(ref, tmp_path, capsys):
    job = _predict_in(tmp_path, [str(n) for n in ref["file_names"][:3]]).parent
    out = tmp_path / "out.json"
    argv = ["--potentials", str(job / "pots"), str(job / "xsf" / "*.xsf"), "--json", str(out), "--stress", "--out", str(tmp_path / "report.txt")]
    assert predict_main(argv) == 0
    data = json.loads(out.read_text())
    assert len(data) == 3 and "forces" not in data[0] and len(data[0]["stress"]) == 3
    assert "Stress" in (tmp_path / "report.txt").read_text()
    files = ",".join(str(job / "pots" / f"{el}.pytorch.nn") for el in ("Ti", "O"))
    assert predict_main(["--potentials", files, str(job / "xsf" / "*.xsf"), "--forces", "--quiet", "--json", str(out)]) == 0
    assert "forces" in json.loads(out.read_text())[0]
    # an extended XYZ file (ASE reader), two frames
    import ase.io
    from aenet_dist.structures import to_ase

    xyz = tmp_path / "two.extxyz"
    ase.io.write(xyz, [to_ase(read_xsf(XSF_DIR / n)) for n in ref["file_names"][:2]])
    assert predict_main(["--potentials", str(job / "pots"), str(xyz), "--quiet", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [d["name"] for d in data] == [f"{xyz}@0", f"{xyz}@1"]
    np.testing.assert_allclose([d["energy"] for d in data], ref["energy_total"][:2], rtol=0, atol=1e-8)
    assert predict_main(["--potentials", str(job / "pots"), str(tmp_path / "none*.xsf")]) == 2
    assert "none*.xsf: no files match" in capsys.readouterr().err


def test_format_without_forces(predictor, structures):
    text = format_aenet(predictor.predict(structures[:2], forces=False), forces=False)
    assert text.count("Cohesive energy") == 2 and "Fx" not in text and "+" * 70 in text


# --------------------------------------------------------------------------- bad input


def test_truncated_potential_names_the_file(ref, tmp_path):
    bad = tmp_path / "Ti.nn"
    bad.write_bytes(POTENTIALS["Ti"].read_bytes()[:5000])
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r": record \d+ .*truncated"):
        Predictor.from_potentials({"Ti": bad, "O": POTENTIALS["O"]})
    assert predict_main(["--potentials", f"{bad},{POTENTIALS['O']}", str(XSF_DIR / ref["file_names"][0])]) == 2


def test_species_without_potential_names_structure_and_species(predictor, structures):
    odd = dataclasses.replace(structures[0], species=("Ti", "Cu") + structures[0].species[2:], name="odd.xsf")
    with pytest.raises(ValueError, match=r"^odd.xsf: species \['Cu'\] have no potential \(potentials for \['Ti', 'O'\]\)"):
        predictor.predict(structures[:2] + [odd])


def test_missing_env_potential_and_mismatched_setups(ref, tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(POTENTIALS["Ti"])) + r": ENV species \['O'\] have no potential"):
        Predictor.from_potentials({"Ti": POTENTIALS["Ti"]})
    other = tmp_path / "O.nn"
    write_nn(other, dataclasses.replace(read_nn(POTENTIALS["O"]), envtypes=("O", "Ti")))
    with pytest.raises(ValueError, match=re.escape(str(other)) + " and " + re.escape(str(POTENTIALS["Ti"]))
                       + r": descriptor setups disagree on the ENV species: \['O', 'Ti'\] vs \['Ti', 'O'\]"):
        Predictor.from_potentials({"Ti": POTENTIALS["Ti"], "O": other})
    with pytest.raises(ValueError, match=re.escape(str(POTENTIALS["Ti"])) + r": potential is for atom type 'Ti', but was given for 'O'"):
        Predictor.from_potentials({"Ti": POTENTIALS["Ti"], "O": POTENTIALS["Ti"]})
    shutil.copy(POTENTIALS["Ti"], tmp_path / "Ti_copy.nn")
    shutil.copy(POTENTIALS["Ti"], tmp_path / "Ti.nn")
    with pytest.raises(ValueError, match=r"two potentials for 'Ti'"):
        Predictor.from_potentials(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no \*\.nn potential files in this directory"):
        Predictor.from_potentials(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"nowhere.nn: no such potential file or directory"):
        Predictor.from_potentials([tmp_path / "nowhere.nn"])
