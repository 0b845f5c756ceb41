"""Tests of aenet_dist.formats (text inputs): .stp and generate.in parsing, writing, and error messages."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

from aenet_dist.formats.generate_in import read_generate_input, write_generate_input
from aenet_dist.formats.stp import read_setup, write_setup
from aenet_dist.config import ChebyshevBasis, DescriptorSetup, FeaturizeConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
TIO2 = SHARED / "data" / "tio2"

STP_O = """DESCR
 Descriptor for O.
END DESCR

ATOM O

ENV 2
Ti
O

RMIN 0.35d0

BASIS type=Chebyshev
radial_Rc = 6.5  radial_N = 20 angular_Rc = 5.  angular_N = 6"""

STP_TI = STP_O.replace("ATOM O", "ATOM Ti").replace("for O.", "for Ti")


def _tio2():
    if not (TIO2 / "generate.in").is_file():
        pytest.skip(f"shared TiO2 data not found at {TIO2} (sibling 'shared' of the project root)")
    return TIO2


def _line_of(path: Path, needle: str) -> int:
    """1-based number of the first line of ``path`` containing ``needle``."""
    for k, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return k
    raise AssertionError(f"{needle!r} not in {path}")


def _where(path: Path, line: int | None = None) -> str:
    return re.escape(f"{path}:{line}:" if line is not None else f"{path}")


def _make_inputs(tmp_path: Path, generate: str | None = None, stp_o: str = STP_O, stp_ti: str = STP_TI, files=("a.xsf", "b.xsf")):
    """Write two .stp files, dummy structure files and a generate.in into tmp_path; return its path."""
    (tmp_path / "O.stp").write_text(stp_o)
    (tmp_path / "Ti.stp").write_text(stp_ti)
    for name in files:
        (tmp_path / name).write_text("dummy\n")
    if generate is None:
        generate = (
            "OUTPUT out.train\n"
            "TYPES\n2\nO  -432.5  ! eV\nTi -1604.6  ! eV\n\n"
            "SETUPS\nTi Ti.stp\nO  O.stp\n\n"
            "FORCES\nFORCESPERCENT 50\n\n"
            f"FILES\n{len(files)}\n" + "".join(f"{f}\n" for f in files)
        )
    gen = tmp_path / "generate.in"
    gen.write_text(generate)
    return gen


# --------------------------------------------------------------------------- real data


def test_read_real_setup():
    tio2 = _tio2()
    setup = read_setup(tio2 / "Ti.fingerprint.stp")
    assert setup.element == "Ti"
    assert setup.env_species == ("Ti", "O")
    assert setup.basis_type == "chebyshev"
    assert setup.basis == ChebyshevBasis(6.5, 20, 5.0, 6)
    assert setup.rmin == pytest.approx(0.35)
    assert setup.description == "Descriptor for Ti"
    assert setup.num_features == 56
    assert setup.typespin() == {"Ti": -1, "O": 1}
    assert setup.source == str(tio2 / "Ti.fingerprint.stp")


def test_read_real_generate_input():
    tio2 = _tio2()
    config = read_generate_input(tio2 / "generate.in")
    assert config.species == ("O", "Ti")
    assert config.atomic_energies == {"O": -432.503149303, "Ti": -1604.604515075}
    assert len(config.files) == 1000
    assert config.files[0] == str(tio2 / "xsf" / "structure0001.xsf")
    assert all(Path(f).is_absolute() for f in config.files)
    assert config.forces is True
    assert config.force_percent == 25.0
    assert config.output == "TiO.train"
    assert config.source == str(tio2 / "generate.in")
    assert list(config.setups) == ["O", "Ti"]
    for element, setup in config.setups.items():
        assert setup.element == element
        assert setup.basis == ChebyshevBasis(6.5, 20, 5.0, 6)
        assert setup.rmin == pytest.approx(0.35)
        assert setup.num_features == 56
        assert setup.typespin() == {"Ti": -1, "O": 1}


def test_real_round_trip(tmp_path):
    tio2 = _tio2()
    config = read_generate_input(tio2 / "generate.in", force_seed=7)
    out = tmp_path / "gen" / "generate.in"
    out.parent.mkdir()
    write_generate_input(out, config, {"O": "O.stp", "Ti": "Ti.stp"})
    again = read_generate_input(out, force_seed=7)
    _assert_same_config(config, again)


def _assert_same_config(a: FeaturizeConfig, b: FeaturizeConfig):
    ignore = {"source", "setups"}
    for field in dataclasses.fields(FeaturizeConfig):
        if field.name not in ignore:
            assert getattr(a, field.name) == getattr(b, field.name), field.name
    assert list(a.setups) == list(b.setups)
    for element in a.setups:
        assert a.setups[element].to_dict() == b.setups[element].to_dict()


# --------------------------------------------------------------------------- round trips in tmp_path


def test_setup_round_trip(tmp_path):
    setup = DescriptorSetup(
        element="Li",
        env_species=("Li", "Co", "O"),
        basis_type="chebyshev",
        basis=ChebyshevBasis(6.0, 10, 3.5, 3),
        rmin=0.75,
        description="line one\nline two",
    )
    write_setup(tmp_path / "Li.stp", setup)
    again = read_setup(tmp_path / "Li.stp")
    assert again.to_dict() == setup.to_dict()
    assert again.source == str(tmp_path / "Li.stp")


def test_generate_round_trip(tmp_path):
    gen = _make_inputs(tmp_path)
    config = read_generate_input(gen, force_seed=3, force_structures=["a.xsf"])
    assert config.species == ("O", "Ti")
    assert config.force_percent == 50.0
    assert config.force_structures == ("a.xsf",)
    assert config.files == (str(tmp_path / "a.xsf"), str(tmp_path / "b.xsf"))
    out = tmp_path / "generate2.in"
    write_generate_input(out, config, {"O": "O2.stp", "Ti": "Ti2.stp"})
    assert (tmp_path / "O2.stp").is_file() and (tmp_path / "Ti2.stp").is_file()
    assert "a.xsf" in out.read_text().split()  # files under the directory are written relative
    _assert_same_config(config, read_generate_input(out, force_seed=3, force_structures=["a.xsf"]))


def test_generate_round_trip_without_forces(tmp_path):
    gen = _make_inputs(tmp_path)
    base = read_generate_input(gen)
    for forces, percent in ((False, 1.0), (False, 30.0), (True, 1.0)):
        config = dataclasses.replace(base, forces=forces, force_percent=percent, output="")
        out = tmp_path / f"gen_{forces}_{percent}.in"
        write_generate_input(out, config, {"O": "O.stp", "Ti": "Ti.stp"}, write_setups=False)
        _assert_same_config(config, read_generate_input(out))


# --------------------------------------------------------------------------- .stp variants and errors


def test_setup_variants(tmp_path):
    stp = tmp_path / "x.stp"
    stp.write_text(
        "# comment line\n"
        "atom Ti   ! central\n"
        "env 1\n"
        "  Ti\n"
        "Rmin 1.0D-1\n"
        "basis TYPE=chebyshev angular_N=2\n"
        "angular_Rc=4.0d0 radial_N=3\n"
        "radial_Rc= 5\n"
    )
    setup = read_setup(stp)
    assert setup.element == "Ti" and setup.env_species == ("Ti",)
    assert setup.rmin == pytest.approx(0.1)
    assert setup.basis == ChebyshevBasis(5.0, 3, 4.0, 2)
    assert setup.description == ""
    assert setup.num_features == 4 + 3


def test_setup_without_rmin_uses_aenet_default(tmp_path, caplog):
    stp = tmp_path / "x.stp"
    stp.write_text(STP_O.replace("RMIN 0.35d0", ""))
    with caplog.at_level(logging.WARNING, logger="aenet_dist"):
        setup = read_setup(stp)
    assert setup.rmin == 1.0
    assert "RMIN" in caplog.text


@pytest.mark.parametrize(
    "edit, line_needle, match",
    [
        (("ATOM O", ""), None, "missing 'ATOM"),
        (("ENV 2\nTi\nO", ""), None, "missing 'ENV"),
        (("BASIS type=Chebyshev\nradial_Rc = 6.5  radial_N = 20 angular_Rc = 5.  angular_N = 6", ""), None, "missing 'BASIS"),
        (("angular_N = 6", ""), "BASIS", "missing parameter.*angular_N"),
        (("radial_Rc = 6.5  radial_N = 20", "radial_N = 20"), "BASIS", "missing parameter.*radial_Rc"),
        (("RMIN 0.35d0", "RMIN 0.3x5"), "RMIN", "cannot read RMIN"),
        (("radial_Rc = 6.5", "radial_Rc = 6.5.1"), "radial_Rc", "radial_Rc"),
        (("radial_N = 20", "radial_N = 20.5"), "radial_N", "radial_N must be an integer"),
        (("ENV 2", "ENV two"), "ENV", "ENV species count must be an integer"),
        (("ENV 2", "ENV 3"), "ENV", "ENV announces 3 species but only 2 follow"),
        (("type=Chebyshev", "type=Spline"), "BASIS", "'Spline' is not supported"),
        (("RMIN 0.35d0", "RCUT 0.35d0"), "RCUT", "unknown keyword 'RCUT'"),
        (("radial_Rc = 6.5", "radial_Rc = -6.5"), "BASIS", "cutoffs must be positive"),
        (("ATOM O", "ATOM O\nATOM Ti"), "ATOM Ti", "ATOM given twice"),
        (("END DESCR", ""), "DESCR", "without a closing 'END DESCR'"),
        (("angular_N = 6", "angular_N = 6 foo"), "angular_N", "key = value"),
    ],
)
def test_setup_errors(tmp_path, edit, line_needle, match):
    stp = tmp_path / "bad.stp"
    old, new = edit
    assert old in STP_O
    stp.write_text(STP_O.replace(old, new, 1))
    where = _where(stp, _line_of(stp, line_needle) if line_needle else None)
    with pytest.raises(ValueError, match=where + ".*" + match):
        read_setup(stp)


def test_setup_unknown_symmfunc_type_refused(tmp_path):
    stp = tmp_path / "behler.stp"
    stp.write_text("ATOM O\nENV 1\nO\nRMIN 0.5\nSYMMFUNC type=Behler2\n2\nG=2 type2=O eta=0.003 Rs=0.0 Rc=6.5\nG=2 type2=O eta=0.03 Rs=0.0 Rc=6.5\n")
    with pytest.raises(ValueError, match=_where(stp, 5) + ".*expected 'SYMMFUNC type=Behler2011'"):
        read_setup(stp)


def test_setup_missing_file(tmp_path):
    stp = tmp_path / "nope.stp"
    with pytest.raises(ValueError, match=_where(stp) + r": no such file \(setup file\); check the path"):
        read_setup(stp)


# --------------------------------------------------------------------------- generate.in variants and errors


def test_generate_defaults_and_ignored_keywords(tmp_path, caplog):
    gen = _make_inputs(
        tmp_path,
        "types\n2\nO -1.0\nTi -2.0d0\nsetups\nO O.stp\nTi Ti.stp\n"
        "TIMING\nDEBUG\nforces\nfiles\n1\na.xsf\n",
    )
    with caplog.at_level(logging.WARNING, logger="aenet_dist"):
        config = read_generate_input(gen)
    assert config.forces is True
    assert config.force_percent == 1.0  # aenet's default with FORCES and no FORCESPERCENT
    assert config.atomic_energies == {"O": -1.0, "Ti": -2.0}
    assert config.output == ""
    assert config.force_structures is None
    assert "TIMING" in caplog.text and "DEBUG" in caplog.text
    # An unknown keyword stops (it may be a misspelled one that changes the result).
    gen.write_text(gen.read_text().replace("DEBUG\n", "DEBUG\nFROBNICATE 3\n"))
    with pytest.raises(ValueError, match=rf"{gen}:10: unknown keyword .FROBNICATE. \(known: OUTPUT"):
        read_generate_input(gen)


def test_generate_forces_false_flag(tmp_path):
    gen = _make_inputs(tmp_path)
    gen.write_text(gen.read_text().replace("FORCES\n", "FORCES .false.\n"))
    config = read_generate_input(gen)
    assert config.forces is False and config.force_percent == 50.0


def test_generate_absolute_file_path(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "c.xsf").write_text("dummy\n")
    gen_dir = tmp_path / "run"
    gen_dir.mkdir()
    gen = _make_inputs(gen_dir, files=("a.xsf",))
    gen.write_text(gen.read_text().replace("FILES\n1\na.xsf\n", f"FILES\n2\na.xsf\n{other / 'c.xsf'}\n"))
    config = read_generate_input(gen)
    assert config.files == (str(gen_dir / "a.xsf"), str(other / "c.xsf"))
    out = gen_dir / "generate2.in"
    write_generate_input(out, config, {"O": "O.stp", "Ti": "Ti.stp"}, write_setups=False)
    assert str(other / "c.xsf") in out.read_text()
    _assert_same_config(config, read_generate_input(out))


GOOD = (
    "OUTPUT out.train\n"  # line 1
    "TYPES\n2\nO  -432.5  ! eV\nTi -1604.6  ! eV\n\n"  # lines 2-6
    "SETUPS\nTi Ti.stp\nO  O.stp\n\n"  # lines 7-10
    "FORCES\nFORCESPERCENT 50\n\n"  # lines 11-13
    "FILES\n2\na.xsf\nb.xsf\n"  # lines 14-17
)


@pytest.mark.parametrize(
    "edit, line, match",
    [
        (("FILES\n2", "FILES\n3"), 15, "FILES announces 3 files but 2 follow"),
        (("FILES\n2", "FILES\n1"), 15, "FILES announces 1 files but 2 follow"),
        (("FILES\n2", "FILES\nmany"), 15, "number of files must be an integer"),
        (("FILES\n2\na.xsf\nb.xsf\n", "FILES\n"), 14, "FILES must be followed by the number of files"),
        (("TYPES\n2", "TYPES\n3"), 3, "TYPES announces 3 species but 2 follow"),
        (("TYPES\n2", "TYPES\n1"), 3, "TYPES announces 1 species but 2 follow"),
        (("O  -432.5", "O  -432.5x"), 4, "cannot read the atomic energy of O"),
        (("O  -432.5", "O"), 4, "expected '<symbol> <atomic energy"),
        (("Ti -1604.6", "O -1604.6"), 5, "species 'O' listed twice in TYPES"),
        (("O  O.stp", "O  O.stp\nLi Ti.stp"), 10, "SETUPS species 'Li' is not in TYPES"),
        (("O  O.stp", "O  missing.stp"), 9, "setup file for 'O' not found"),
        (("O  O.stp", "O  Ti.stp"), 9, "but its ATOM is 'Ti'"),
        (("O  O.stp", "Ti Ti.stp"), 9, "SETUPS lists species 'Ti' twice"),
        (("O  O.stp\n", ""), 7, "SETUPS has no entry for species \\['O'\\]"),
        (("b.xsf", "c.xsf"), 17, "structure file not found"),
        (("FORCESPERCENT 50", "FORCESPERCENT 150"), 12, "FORCESPERCENT must be within"),
        (("FORCESPERCENT 50", "FORCESPERCENT lots"), 12, "cannot read FORCESPERCENT"),
        (("FORCES\n", "FORCES maybe\n"), 11, "expected 'FORCES'"),
        (("OUTPUT out.train", "OUTPUT out.train\nOUTPUT b"), 2, "OUTPUT given twice"),
    ],
)
def test_generate_errors(tmp_path, edit, line, match):
    old, new = edit
    assert old in GOOD
    gen = _make_inputs(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ValueError, match=_where(gen, line) + ".*" + match):
        read_generate_input(gen)


@pytest.mark.parametrize("section", ["TYPES", "SETUPS", "FILES"])
def test_generate_missing_section(tmp_path, section):
    sections = {
        "TYPES": "TYPES\n2\nO  -432.5  ! eV\nTi -1604.6  ! eV\n",
        "SETUPS": "SETUPS\nTi Ti.stp\nO  O.stp\n",
        "FILES": "FILES\n2\na.xsf\nb.xsf\n",
    }
    gen = _make_inputs(tmp_path, "".join(v for k, v in sections.items() if k != section))
    with pytest.raises(ValueError, match=_where(gen) + f": missing {section}"):
        read_generate_input(gen)


def test_generate_setup_env_not_in_types(tmp_path):
    gen = _make_inputs(tmp_path, stp_o=STP_O.replace("ENV 2\nTi\nO", "ENV 2\nLi\nO"))
    line = _line_of(gen, "O  O.stp")
    stp = tmp_path / "O.stp"
    with pytest.raises(ValueError, match=_where(gen, line) + " " + _where(stp) + r": ENV species \['Li'\] not in TYPES"):
        read_generate_input(gen)


def test_generate_setup_error_names_both_files(tmp_path):
    gen = _make_inputs(tmp_path, stp_ti=STP_TI.replace("RMIN 0.35d0", "RMIN abc"))
    stp = tmp_path / "Ti.stp"
    match = _where(gen, _line_of(gen, "Ti Ti.stp")) + " " + _where(stp, _line_of(stp, "RMIN")) + " cannot read RMIN"
    with pytest.raises(ValueError, match=match):
        read_generate_input(gen)


def test_generate_bad_symmfunc_setup_names_both_files(tmp_path):
    gen = _make_inputs(tmp_path, stp_o="ATOM O\nENV 1\nO\nSYMMFUNC type=Behler2\n1\nG=2 type2=O eta=0.003 Rs=0.0 Rc=6.5\n")
    with pytest.raises(ValueError, match=_where(gen, _line_of(gen, "O  O.stp")) + ".*O.stp:4: expected .SYMMFUNC type=Behler2011."):
        read_generate_input(gen)


def test_generate_unreadable(tmp_path):
    gen = tmp_path / "missing.in"
    with pytest.raises(ValueError, match=_where(gen) + r": no such file \(generate.in\); check the path"):
        read_generate_input(gen)
    with pytest.raises(ValueError, match=_where(tmp_path) + ": is a directory, not generate.in"):
        read_generate_input(tmp_path)
    binary = tmp_path / "binary.in"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ValueError, match=_where(binary) + ": not a text file, so not generate.in"):
        read_generate_input(binary)


def test_write_generate_input_needs_all_stp_names(tmp_path):
    config = read_generate_input(_make_inputs(tmp_path))
    with pytest.raises(ValueError, match="stp_names has no setup file name for species \\['Ti'\\]"):
        write_generate_input(tmp_path / "g.in", config, {"O": "O.stp"})


def test_generate_forcespercent_without_forces_warns(tmp_path, caplog):
    gen = _make_inputs(tmp_path, GOOD.replace("FORCES\n", "", 1))
    with caplog.at_level(logging.WARNING, logger="aenet_dist"):
        config = read_generate_input(gen)
    assert config.forces is False and config.force_percent == 50.0
    assert f"{gen}:11" in caplog.text and "FORCESPERCENT without FORCES" in caplog.text


def test_generate_no_files(tmp_path):
    gen = _make_inputs(tmp_path, GOOD.replace("FILES\n2\na.xsf\nb.xsf\n", "FILES\n0\n"))
    with pytest.raises(ValueError, match=_where(gen, 14) + " FILES lists no structures"):
        read_generate_input(gen)


def test_generate_read_as_aenet_reads_it(tmp_path):
    """What aenet's reader accepts: file names that are any word (``file``, ``setup``), text after a
    species' energy (aenet's example: ``Ti -1626.66972707  | eV``), whole-line ``%`` comments."""
    for name in ("file", "setup", "Type"):
        (tmp_path / name).write_text("dummy\n")
    text = GOOD.replace("FILES\n2\na.xsf\nb.xsf\n", "FILES\n3\nfile\nsetup\nType\n").replace("O  -432.5  ! eV", "O  -432.5  | eV")
    gen = _make_inputs(tmp_path, "% a comment line, as aenet allows\n" + text)
    config = read_generate_input(gen)
    assert [Path(f).name for f in config.files] == ["file", "setup", "Type"] and config.atomic_energies["O"] == -432.5


@pytest.mark.parametrize("edit, line, keyword, meant", [
    (("SETUPS\n", "SETUP\n"), 7, "SETUP", "SETUPS"),  # read as more TYPES entries: "TYPES announces 2 species but 5 follow"
    (("FILES\n2", "FILE\n2"), 14, "FILE", "FILES"),  # read as more SETUPS entries
    (("FILES\n2\na.xsf\nb.xsf\n", "FILES\n2\na.xsf\nb.xsf\nFORCESPERCNT 5\n"), 18, "FORCESPERCNT", "FORCESPERCENT"),
])
def test_generate_misspelled_keyword_inside_a_block_is_named(tmp_path, edit, line, keyword, meant):
    """A misspelled keyword right after a block is named where it is, not reported as the block's
    wrong count or a malformed entry lines away."""
    old, new = edit
    gen = _make_inputs(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ValueError, match=rf"^{_where(gen, line)} unknown keyword '{keyword}'; did you mean {meant}\?$"):
        read_generate_input(gen)
