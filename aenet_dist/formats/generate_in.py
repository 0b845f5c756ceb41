"""aenet's featurization input ``generate.in`` (the ``.stp`` files it names are read by :mod:`.stp`).

The format follows aenet-PyTorch's ``aenet_modified`` (``input.f90``: ``read_InpGenerate``,
which adds ``FORCES``/``FORCESPERCENT`` to aenet's). Keywords are case-insensitive; ``!`` and
``#`` start comments. Every error is a :class:`ValueError` naming the file and line.

``generate.in`` example::

    OUTPUT TiO.train
    TYPES
    2
    O   -432.503149303  ! eV
    Ti -1604.604515075  ! eV
    SETUPS
    Ti  Ti.fingerprint.stp
    O    O.fingerprint.stp
    FORCES
    FORCESPERCENT 25
    FILES
    2
    xsf/structure0001.xsf
    xsf/structure0002.xsf
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from ..config import DescriptorSetup, FeaturizeConfig
from ..files import atomic_write
from ..log import get_logger
from .stp import read_setup, write_setup
from .text import content_lines, fmt_float, parse_flag, read_lines, strip_comment, to_float, to_int

_log = get_logger(__name__)

_GEN_KEYWORDS = ("output", "types", "setups", "files", "forces", "forcespercent", "timing", "debug", "verbosity")
_DEFAULT_FORCE_PERCENT = 1.0  # aenet-PyTorch's pyo_forces_percent default


def _block(lines: list[str], start: int) -> list[tuple[int, str]]:
    """Content lines from index ``start`` up to (excluding) the next generate.in keyword line."""
    block = []
    for i, text in content_lines(lines, start):
        if text.split()[0].lower() in _GEN_KEYWORDS:
            break
        block.append((i, text))
    return block


def _counted_block(lines: list[str], i: int, path: Path, keyword: str, what: str) -> tuple[list[tuple[int, str]], int]:
    """Read the count line after ``keyword`` (at line index ``i``) and the entries that follow it."""
    line_no = i + 1
    block = _block(lines, i + 1)
    if not block:
        raise ValueError(f"{path}:{line_no}: {keyword} must be followed by the number of {what}")
    count_idx, count_text = block[0]
    if len(count_text.split()) != 1:
        raise ValueError(f"{path}:{count_idx + 1}: expected the number of {what} after {keyword}, got {count_text!r}")
    count = to_int(count_text, path, count_idx + 1, f"the number of {what}")
    entries = block[1:]
    if len(entries) != count:
        last = f" (lines {entries[0][0] + 1}-{entries[-1][0] + 1})" if entries else ""
        raise ValueError(f"{path}:{count_idx + 1}: {keyword} announces {count} {what} but {len(entries)} follow{last}")
    end = (entries[-1][0] if entries else count_idx) + 1
    return entries, end


def read_generate_input(
    path: str | os.PathLike,
    force_seed: int = 0,
    force_structures: list[str] | tuple[str, ...] | None = None,
) -> FeaturizeConfig:
    """Parse aenet's ``generate.in`` (and the ``.stp`` files it names) into a :class:`FeaturizeConfig`.

    Paths of setups and structure files are relative to the directory of ``path``;
    structure paths are stored absolute. The structure files are checked to exist but not
    read. ``FORCES`` without ``FORCESPERCENT`` means aenet's default of 1 percent.
    ``TIMING``, ``DEBUG`` and ``VERBOSITY`` are accepted and ignored; an unknown keyword is an
    error with a did-you-mean (a misspelled FORCESPERCENT would silently change the result).

    Args:
        path: the generate.in file.
        force_seed: seed of the deterministic choice of force structures (not part of aenet's format).
        force_structures: explicit structure files that get derivatives (overrides the percentage).

    Returns:
        The frozen featurization config, ``source`` = ``str(path)``.

    Raises:
        ValueError: naming the file and line for malformed or inconsistent input, missing
            setup or structure files, and errors in the setups.
    """
    path = Path(path)
    base = Path(os.path.abspath(path.parent))
    lines = read_lines(path, "generate.in")
    seen: dict[str, int] = {}
    output = ""
    species: list[str] = []
    energies: dict[str, float] = {}
    setup_entries: list[tuple[int, str, str]] = []
    file_entries: list[tuple[int, str]] = []
    forces = None
    force_percent = None
    forces_percent_line = 0

    i = 0
    while i < len(lines):
        text = strip_comment(lines[i])
        line_no = i + 1
        if not text:
            i += 1
            continue
        tokens = text.split()
        keyword = tokens[0].lower()
        if keyword not in _GEN_KEYWORDS:
            # An unknown keyword may be a misspelled one that changes the result (FORCEPERCENT):
            # aenet's own files contain none, so stop and name the likely one.
            close = difflib.get_close_matches(keyword, _GEN_KEYWORDS, n=1)
            hint = f"; did you mean {close[0].upper()}?" if close else f" (known: {', '.join(k.upper() for k in _GEN_KEYWORDS)})"
            raise ValueError(f"{path}:{line_no}: unknown keyword {tokens[0]!r}{hint}")
        if keyword in seen:
            raise ValueError(f"{path}:{line_no}: {keyword.upper()} given twice (first on line {seen[keyword]})")
        seen[keyword] = line_no
        if keyword in ("timing", "debug", "verbosity"):
            _log.warning("%s:%d: %s has no effect here, ignored", path, line_no, tokens[0].upper())
            i += 1
        elif keyword == "output":
            if len(tokens) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'OUTPUT <file name>', got {text!r}")
            output = tokens[1]
            i += 1
        elif keyword == "forces":
            forces = parse_flag(tokens, path, line_no)
            i += 1
        elif keyword == "forcespercent":
            if len(tokens) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'FORCESPERCENT <percent>', got {text!r}")
            force_percent = to_float(tokens[1], path, line_no, "FORCESPERCENT")
            if not 0.0 <= force_percent <= 100.0:
                raise ValueError(f"{path}:{line_no}: FORCESPERCENT must be within [0, 100], got {force_percent}")
            forces_percent_line = line_no
            i += 1
        elif keyword == "types":
            entries, i = _counted_block(lines, i, path, "TYPES", "species")
            for idx, entry in entries:
                parts = entry.split()
                if len(parts) != 2:
                    raise ValueError(f"{path}:{idx + 1}: expected '<symbol> <atomic energy in eV>', got {entry!r}")
                symbol = parts[0]
                if symbol in energies:
                    raise ValueError(f"{path}:{idx + 1}: species {symbol!r} listed twice in TYPES")
                energies[symbol] = to_float(parts[1], path, idx + 1, f"the atomic energy of {symbol}")
                species.append(symbol)
        elif keyword == "setups":
            entries = _block(lines, i + 1)
            if not entries:
                raise ValueError(f"{path}:{line_no}: SETUPS must be followed by '<symbol> <setup file>' lines")
            for idx, entry in entries:
                parts = entry.split()
                if len(parts) != 2:
                    raise ValueError(f"{path}:{idx + 1}: expected '<symbol> <setup file>', got {entry!r}")
                setup_entries.append((idx + 1, parts[0], parts[1]))
            i = entries[-1][0] + 1
        else:  # files
            entries, i = _counted_block(lines, i, path, "FILES", "files")
            file_entries = [(idx + 1, entry) for idx, entry in entries]

    for keyword in ("types", "setups", "files"):
        if keyword not in seen:
            raise ValueError(f"{path}: missing {keyword.upper()} section")

    # setups: one per TYPES species, ATOM and ENV consistent with TYPES
    setups: dict[str, DescriptorSetup] = {}
    for line_no, symbol, name in setup_entries:
        if symbol not in energies:
            raise ValueError(f"{path}:{line_no}: SETUPS species {symbol!r} is not in TYPES {species}")
        if symbol in setups:
            raise ValueError(f"{path}:{line_no}: SETUPS lists species {symbol!r} twice")
        stp_path = base / name
        if not stp_path.is_file():
            raise ValueError(f"{path}:{line_no}: setup file for {symbol!r} not found: {stp_path}")
        try:
            setup = read_setup(stp_path)
        except ValueError as err:
            raise ValueError(f"{path}:{line_no}: {err}") from None
        if setup.element != symbol:
            raise ValueError(f"{path}:{line_no}: SETUPS lists {stp_path} for {symbol!r} but its ATOM is {setup.element!r}")
        unknown = [e for e in setup.env_species if e not in energies]
        if unknown:
            raise ValueError(f"{path}:{line_no}: {stp_path}: ENV species {unknown} not in TYPES {species}")
        setups[symbol] = setup
    missing = [s for s in species if s not in setups]
    if missing:
        raise ValueError(f"{path}:{seen['setups']}: SETUPS has no entry for species {missing}")
    setups = {s: setups[s] for s in species}  # TYPES order

    files = []
    first_line: dict[str, int] = {}
    for line_no, name in file_entries:
        file_path = os.path.normpath(os.path.join(base, name))
        if not os.path.isfile(file_path):
            raise ValueError(f"{path}:{line_no}: structure file not found: {file_path}")
        if file_path in first_line:  # it would be featurized (and trained on) twice
            raise ValueError(f"{path}:{line_no}: structure file {name} is listed twice (first on line {first_line[file_path]})")
        first_line[file_path] = line_no
        files.append(file_path)
    if not files:
        raise ValueError(f"{path}:{seen['files']}: FILES lists no structures")

    if force_percent is None:
        force_percent = _DEFAULT_FORCE_PERCENT
    elif forces is None:
        _log.warning("%s:%d: FORCESPERCENT without FORCES: no structure gets derivatives", path, forces_percent_line)
    return FeaturizeConfig(
        species=tuple(species),
        atomic_energies=energies,
        setups=setups,
        files=tuple(files),
        output=output,
        forces=bool(forces),
        force_percent=force_percent,
        force_seed=force_seed,
        force_structures=None if force_structures is None else tuple(str(s) for s in force_structures),
        source=str(path),
    )


def write_generate_input(
    path: str | os.PathLike,
    config: FeaturizeConfig,
    stp_names: dict[str, str],
    write_setups: bool = True,
) -> None:
    """Write ``config`` as aenet's ``generate.in`` (atomically), plus its ``.stp`` files.

    :func:`read_generate_input` reads the result back equal to ``config`` (give it the same
    ``force_seed``/``force_structures``, which the format does not hold). Structure files
    under the directory of ``path`` are written relative to it, others absolute.

    Args:
        path: destination generate.in.
        config: the featurization config.
        stp_names: setup file name per species, relative to the directory of ``path``.
        write_setups: also write each setup to ``path.parent / stp_names[species]``.

    Raises:
        ValueError: when ``stp_names`` lacks a species of ``config``.
    """
    path = Path(path)
    missing = [s for s in config.species if s not in stp_names]
    if missing:
        raise ValueError(f"{path}: stp_names has no setup file name for species {missing}")
    base = os.path.abspath(path.parent)
    out = ["! written by aenet_dist"]
    if config.output:
        out += [f"OUTPUT {config.output}"]
    out += ["", "TYPES", str(len(config.species))]
    out += [f"{s} {fmt_float(config.atomic_energies[s])}  ! eV" for s in config.species]
    out += ["", "SETUPS"] + [f"{s} {stp_names[s]}" for s in config.species]
    out += [""]
    if config.forces:
        out += ["FORCES", f"FORCESPERCENT {fmt_float(config.force_percent)}"]
    elif config.force_percent != _DEFAULT_FORCE_PERCENT:
        out += ["FORCES .false.", f"FORCESPERCENT {fmt_float(config.force_percent)}"]
    out += ["", "FILES", str(len(config.files))]
    for f in config.files:
        absolute = os.path.abspath(f)
        rel = os.path.relpath(absolute, base)
        out.append(absolute if rel == ".." or rel.startswith(".." + os.sep) else rel)
    if write_setups:
        for s in config.species:
            write_setup(path.parent / stp_names[s], config.setups[s])
    atomic_write(path, "\n".join(out) + "\n")
