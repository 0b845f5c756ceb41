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
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DescriptorSetup, FeaturizeConfig
from ..files import atomic_write
from ..log import get_logger
from .stp import read_setup, write_setup
from .text import content_lines, fmt_float, parse_flag, read_lines, to_float, to_int

_log = get_logger(__name__)

_GEN_KEYWORDS = ("output", "types", "setups", "files", "forces", "forcespercent", "timing", "debug", "verbosity")
_DEFAULT_FORCE_PERCENT = 1.0  # aenet-PyTorch's pyo_forces_percent default


def _unknown_keyword(path: Path, line_no: int, word: str) -> ValueError:
    """The error for ``word``, not a keyword, where one is expected (or looks like one), with the likely one."""
    close = difflib.get_close_matches(word.lower(), _GEN_KEYWORDS, n=1)
    hint = f"; did you mean {close[0].upper()}?" if close else f" (known: {', '.join(k.upper() for k in _GEN_KEYWORDS)})"
    return ValueError(f"{path}:{line_no}: unknown keyword {word!r}{hint}")


def _block(lines: list[str], start: int, path: Path, symbols: bool = True) -> list[tuple[int, str]]:
    """Content lines from index ``start`` up to (excluding) the next generate.in keyword line.

    ``symbols``: the entries start with an element symbol (TYPES, SETUPS). There a line that starts
    with a misspelled keyword (SETUP for SETUPS) is an error: taken as an entry of the block it
    would be reported as a wrong count or entry, lines away from the typo; a symbol has at most 3
    letters, so a word of 4 letters or more that is close to a keyword is one. (FILES entries are
    file names, which may be any word: ``file``, ``setup``.)
    """
    block = []
    for i, text in content_lines(lines, start):
        word = text.split()[0]
        if word.lower() in _GEN_KEYWORDS:
            break
        if symbols and _looks_like_keyword(word):
            raise _unknown_keyword(path, i + 1, word)
        block.append((i, text))
    return block


def _looks_like_keyword(word: str) -> bool:
    """A word of 4 letters or more, close to a keyword (FORCESPERCNT, SETUP)."""
    return len(word) >= 4 and word.isalpha() and bool(difflib.get_close_matches(word.lower(), _GEN_KEYWORDS, n=1, cutoff=0.8))


def _counted_block(lines: list[str], i: int, path: Path, keyword: str, what: str,
                   symbols: bool = True) -> tuple[list[tuple[int, str]], int]:
    """Read the count line after ``keyword`` (at line index ``i``) and the entries that follow it
    (``symbols``: see :func:`_block`)."""
    line_no = i + 1
    block = _block(lines, i + 1, path, symbols)
    if not block:
        raise ValueError(f"{path}:{line_no}: {keyword} must be followed by the number of {what}")
    count_idx, count_text = block[0]
    if len(count_text.split()) != 1:
        raise ValueError(f"{path}:{count_idx + 1}: expected the number of {what} after {keyword}, got {count_text!r}")
    count = to_int(count_text, path, count_idx + 1, f"the number of {what}")
    entries = block[1:]
    if len(entries) > count and not symbols and _looks_like_keyword(entries[count][1].split()[0]):
        # the counted entries (file names: any word) are done, and what follows looks like a misspelled keyword
        idx, text = entries[count]
        raise _unknown_keyword(path, idx + 1, text.split()[0])
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
    sections = _read_sections(path, read_lines(path, "generate.in"))
    force_percent = sections.force_percent
    if force_percent is None:
        force_percent = _DEFAULT_FORCE_PERCENT
    elif sections.forces is None:
        _log.warning("%s:%d: FORCESPERCENT without FORCES: no structure gets derivatives", path, sections.seen["forcespercent"])
    return FeaturizeConfig(
        species=tuple(sections.species),
        atomic_energies=sections.energies,
        setups=_read_setups(path, base, sections),
        files=tuple(_structure_files(path, base, sections)),
        output=sections.output,
        forces=bool(sections.forces),
        force_percent=force_percent,
        force_seed=force_seed,
        force_structures=None if force_structures is None else tuple(str(s) for s in force_structures),
        source=str(path),
    )


@dataclass
class _Sections:
    """What the keywords of a generate.in say, with the line of each entry (1-based)."""

    seen: dict[str, int] = field(default_factory=dict)  # keyword -> its line
    output: str = ""
    species: list[str] = field(default_factory=list)  # TYPES order
    energies: dict[str, float] = field(default_factory=dict)
    setup_entries: list[tuple[int, str, str]] = field(default_factory=list)  # (line, symbol, file)
    file_entries: list[tuple[int, str]] = field(default_factory=list)  # (line, file)
    forces: bool | None = None
    force_percent: float | None = None


def _read_sections(path: Path, lines: list[str]) -> _Sections:
    """The keyword pass: each keyword once, counted blocks checked, values parsed."""
    out = _Sections()
    i = 0
    while (found := next(content_lines(lines, i), None)) is not None:
        i, text = found
        line_no = i + 1
        tokens = text.split()
        keyword = tokens[0].lower()
        if keyword not in _GEN_KEYWORDS:
            # An unknown keyword may be a misspelled one that changes the result (FORCEPERCENT):
            # aenet's own files contain none, so stop and name the likely one.
            raise _unknown_keyword(path, line_no, tokens[0])
        if keyword in out.seen:
            raise ValueError(f"{path}:{line_no}: {keyword.upper()} given twice (first on line {out.seen[keyword]})")
        out.seen[keyword] = line_no
        i += 1
        if keyword in ("timing", "debug", "verbosity"):
            _log.warning("%s:%d: %s has no effect here, ignored", path, line_no, tokens[0].upper())
        elif keyword == "output":
            if len(tokens) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'OUTPUT <file name>', got {text!r}")
            out.output = tokens[1]
        elif keyword == "forces":
            out.forces = parse_flag(tokens, path, line_no)
        elif keyword == "forcespercent":
            if len(tokens) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'FORCESPERCENT <percent>', got {text!r}")
            out.force_percent = to_float(tokens[1], path, line_no, "FORCESPERCENT")
            if not 0.0 <= out.force_percent <= 100.0:
                raise ValueError(f"{path}:{line_no}: FORCESPERCENT must be within [0, 100], got {out.force_percent}")
        elif keyword == "types":
            entries, i = _counted_block(lines, line_no - 1, path, "TYPES", "species")
            for idx, entry in entries:
                parts = entry.split()
                if len(parts) < 2:  # (aenet reads the two list-directed: text after them, '| eV', is ignored)
                    raise ValueError(f"{path}:{idx + 1}: expected '<symbol> <atomic energy in eV>', got {entry!r}")
                symbol = parts[0]
                if symbol in out.energies:
                    raise ValueError(f"{path}:{idx + 1}: species {symbol!r} listed twice in TYPES")
                out.energies[symbol] = to_float(parts[1], path, idx + 1, f"the atomic energy of {symbol}")
                out.species.append(symbol)
        elif keyword == "setups":
            entries = _block(lines, line_no, path)
            if not entries:
                raise ValueError(f"{path}:{line_no}: SETUPS must be followed by '<symbol> <setup file>' lines")
            for idx, entry in entries:
                parts = entry.split()
                if len(parts) != 2:
                    raise ValueError(f"{path}:{idx + 1}: expected '<symbol> <setup file>', got {entry!r}")
                out.setup_entries.append((idx + 1, parts[0], parts[1]))
            i = entries[-1][0] + 1
        else:  # files
            entries, i = _counted_block(lines, line_no - 1, path, "FILES", "files", symbols=False)
            out.file_entries = [(idx + 1, entry) for idx, entry in entries]
    for keyword in ("types", "setups", "files"):
        if keyword not in out.seen:
            raise ValueError(f"{path}: missing {keyword.upper()} section")
    return out


def _read_setups(path: Path, base: Path, sections: _Sections) -> dict[str, DescriptorSetup]:
    """One setup per TYPES species (in TYPES order), ATOM and ENV consistent with TYPES."""
    setups: dict[str, DescriptorSetup] = {}
    for line_no, symbol, name in sections.setup_entries:
        if symbol not in sections.energies:
            raise ValueError(f"{path}:{line_no}: SETUPS species {symbol!r} is not in TYPES {sections.species}")
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
        unknown = [e for e in setup.env_species if e not in sections.energies]
        if unknown:
            raise ValueError(f"{path}:{line_no}: {stp_path}: ENV species {unknown} not in TYPES {sections.species}")
        setups[symbol] = setup
    missing = [s for s in sections.species if s not in setups]
    if missing:
        raise ValueError(f"{path}:{sections.seen['setups']}: SETUPS has no entry for species {missing}")
    return {s: setups[s] for s in sections.species}


def _structure_files(path: Path, base: Path, sections: _Sections) -> list[str]:
    """FILES as absolute paths; each must exist and be listed once."""
    files = []
    first_line: dict[str, int] = {}
    for line_no, name in sections.file_entries:
        file_path = os.path.normpath(os.path.join(base, name))
        if not os.path.isfile(file_path):
            raise ValueError(f"{path}:{line_no}: structure file not found: {file_path}")
        if file_path in first_line:  # it would be featurized (and trained on) twice
            raise ValueError(f"{path}:{line_no}: structure file {name} is listed twice (first on line {first_line[file_path]})")
        first_line[file_path] = line_no
        files.append(file_path)
    if not files:
        raise ValueError(f"{path}:{sections.seen['files']}: FILES lists no structures")
    return files


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
