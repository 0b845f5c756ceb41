"""aenet's prediction input ``predict.in`` (``input.f90: read_InpPredict``).

Keywords are case-insensitive; ``!`` and ``#`` start comments. Every error is a
:class:`ValueError` naming the file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .text import content_lines, parse_flag, read_lines, strip_comment, to_int


@dataclass(frozen=True)
class PredictInput:
    """aenet ``predict.in``: TYPES, NETWORKS (element -> .nn file), FORCES, FILES (paths resolved)."""

    types: tuple[str, ...]
    networks: dict[str, Path]
    files: tuple[Path, ...]
    file_names: tuple[str, ...]  # FILES entries as written (used as structure names)
    forces: bool = False
    print_atomic_energies: bool = False
    source: str = ""


_PREDICT_KEYWORDS = ("types", "networks", "forces", "timing", "print_atomic_energies", "debug", "relax", "files", "verbosity")


def _section(lines: list[str], start: int, count: int, path: Path, where: int, keyword: str, what: str) -> list[tuple[int, str]]:
    """The ``count`` content lines after line index ``start`` (comments and blank lines skipped);
    errors name line ``where`` (1-based: the count line, or the keyword line)."""
    out = []
    i = start
    while len(out) < count:
        if i >= len(lines):
            raise ValueError(f"{path}:{where}: {keyword} announces {count} {what} but only {len(out)} follow before the end of the file")
        text = strip_comment(lines[i])
        if text:
            if text.split()[0].lower() in _PREDICT_KEYWORDS:
                raise ValueError(f"{path}:{where}: {keyword} announces {count} {what} but only {len(out)} follow "
                                 f"before {text.split()[0]} (line {i + 1})")
            out.append((i, text))
        i += 1
    return out


def _next_content(lines: list[str], start: int, path: Path, keyword: str, what: str) -> tuple[int, str]:
    """The first content line from ``start`` on: (index, text); an error if there is none."""
    found = next(content_lines(lines, start), None)
    if found is None:
        raise ValueError(f"{path}: {keyword} must be followed by the number of {what}")
    return found


def read_predict_input(path: str | os.PathLike) -> PredictInput:
    """Parse aenet's ``predict.in`` (``input.f90: read_InpPredict``).

    Keywords (case-insensitive, ``!``/``#`` comments): ``TYPES`` (count, then one symbol per
    line), ``NETWORKS`` (one ``<symbol> <file.nn>`` line per type), ``FORCES``,
    ``PRINT_ATOMIC_ENERGIES``, ``FILES`` (count, then one structure file per line);
    ``TIMING``/``DEBUG``/``VERBOSITY`` are ignored. ``RELAX`` (geometry optimization) is not
    supported. Paths are relative to the directory of ``path``.

    Raises:
        ValueError naming the file and line.
    """
    path = Path(path)
    base = Path(os.path.abspath(path.parent))
    lines = read_lines(path, "predict.in")
    types: list[str] = []
    networks: dict[str, Path] = {}
    network_lines: list[tuple[int, str]] = []
    files: list[str] = []
    flags = {"forces": False, "print_atomic_energies": False}
    seen: dict[str, int] = {}
    i = 0
    while (found := next(content_lines(lines, i), None)) is not None:
        i, text = found
        tokens = text.split()
        keyword = tokens[0].lower()
        line_no = i + 1
        if keyword not in _PREDICT_KEYWORDS:
            raise ValueError(f"{path}:{line_no}: unknown keyword {tokens[0]!r} (expected one of "
                             f"{', '.join(k.upper() for k in _PREDICT_KEYWORDS)})")
        if keyword in seen:
            raise ValueError(f"{path}:{line_no}: {keyword.upper()} given twice (first on line {seen[keyword]})")
        seen[keyword] = line_no
        if keyword in ("types", "files"):
            what = "species" if keyword == "types" else "files"
            j, count_text = _next_content(lines, i + 1, path, keyword.upper(), what)
            count = to_int(count_text.split()[0], path, j + 1, f"the number of {what}")
            entries = _section(lines, j + 1, count, path, j + 1, keyword.upper(), what)
            if keyword == "types":
                types = [entry.split()[0] for _, entry in entries]
            else:
                files = [entry.split()[0] for _, entry in entries]
            i = (entries[-1][0] if entries else j) + 1
        elif keyword == "networks":
            if "types" not in seen:
                raise ValueError(f"{path}:{line_no}: TYPES must come before NETWORKS")
            network_lines = _section(lines, i + 1, len(types), path, line_no, "NETWORKS", "networks (one per TYPES species)")
            i = (network_lines[-1][0] if network_lines else i) + 1
        elif keyword in flags:
            flags[keyword] = parse_flag(tokens, path, line_no)
            i += 1
        elif keyword == "relax":
            raise ValueError(f"{path}:{line_no}: RELAX (geometry optimization) is not supported by aenet-dist predict; "
                             f"use the ASE calculator (aenet_dist.ase.AenetCalculator) with an ASE optimizer")
        else:  # timing, debug, verbosity
            i += 1
    for keyword in ("types", "networks", "files"):
        if keyword not in seen:
            raise ValueError(f"{path}: missing {keyword.upper()} section")
    for idx, entry in network_lines:
        parts = entry.split()
        if len(parts) < 2:
            raise ValueError(f"{path}:{idx + 1}: expected '<symbol> <potential file>', got {entry!r}")
        if parts[0] not in types:
            raise ValueError(f"{path}:{idx + 1}: NETWORKS species {parts[0]!r} is not in TYPES {types}")
        if parts[0] in networks:
            raise ValueError(f"{path}:{idx + 1}: NETWORKS lists {parts[0]!r} twice")
        networks[parts[0]] = base / parts[1]
    return PredictInput(tuple(types), networks, tuple(base / f for f in files), tuple(files),
                        flags["forces"], flags["print_atomic_energies"], str(path))
