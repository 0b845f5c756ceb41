"""Read and write aenet's text inputs: descriptor setups (``.stp``) and ``generate.in``.

The formats follow aenet's Fortran readers (``sfsetup.f90``: ``read_Setup_parameters``;
``input.f90``: ``read_InpGenerate`` of aenet-PyTorch's ``aenet_modified``, which adds
``FORCES``/``FORCESPERCENT``). Keywords are case-insensitive; ``!`` and ``#`` start
comments. Every error is a :class:`ValueError` that names the file and, where there is
one, the line (``path:line: message``).

``.stp`` example::

    DESCR
     Descriptor for Ti
    END DESCR
    ATOM Ti
    ENV 2
    Ti
    O
    RMIN 0.35d0
    BASIS type=Chebyshev
    radial_Rc = 6.5  radial_N = 20 angular_Rc = 5.  angular_N = 6

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
import re
from pathlib import Path

from aenet_dist.config import BEHLER_PARAMETERS, BehlerBasis, BehlerFunction, ChebyshevBasis, DescriptorSetup, FeaturizeConfig
from aenet_dist.files import atomic_write
from aenet_dist.log import get_logger

_log = get_logger(__name__)

_STP_KEYWORDS = ("descr", "atom", "env", "rmin", "basis", "symmfunc", "functions")
_BASIS_KEYWORDS = ("basis", "symmfunc", "functions")
_CHEBYSHEV_KEYS = {"radial_rc": "radial_Rc", "radial_n": "radial_N", "angular_rc": "angular_Rc", "angular_n": "angular_N"}
_PAIRS_RE = re.compile(r"\s*(?:[A-Za-z_]\w*\s*=\s*[^\s=]+\s*)+")
_PAIR_RE = re.compile(r"([A-Za-z_]\w*)\s*=\s*([^\s=]+)")
_END_DESCR_RE = re.compile(r"^\s*end\s+descr", re.IGNORECASE)

_GEN_KEYWORDS = ("output", "types", "setups", "files", "forces", "forcespercent", "timing", "debug", "verbosity")
_DEFAULT_FORCE_PERCENT = 1.0  # aenet-PyTorch's pyo_forces_percent default
_DEFAULT_RMIN = 1.0  # aenet's Rc_min when RMIN is not given


# --------------------------------------------------------------------------- helpers


def read_lines(path: Path, what: str) -> list[str]:
    """Lines of an input file; a missing or unreadable file is a ValueError naming it and ``what``."""
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read {what}: {err}") from None


def strip_comment(line: str) -> str:
    """Drop everything from the first ``!`` or ``#`` on; strip whitespace."""
    cut = len(line)
    for mark in ("!", "#"):
        pos = line.find(mark)
        if pos >= 0:
            cut = min(cut, pos)
    return line[:cut].strip()


def _content_lines(lines: list[str], start: int = 0):
    """Yield ``(index, text)`` of non-empty lines from ``start`` on, comments removed (index 0-based)."""
    for i in range(start, len(lines)):
        text = strip_comment(lines[i])
        if text:
            yield i, text


def _to_float(token: str, path: Path, line_no: int, what: str) -> float:
    """Parse a Fortran real (``0.35d0``, ``5.``, ``1e-3``)."""
    try:
        return float(token.replace("d", "e").replace("D", "e"))
    except ValueError:
        raise ValueError(f"{path}:{line_no}: cannot read {what} from {token!r}") from None


def to_int(token: str, path: Path, line_no: int, what: str) -> int:
    """``token`` as an int; otherwise a ValueError naming the file, line and ``what``."""
    try:
        return int(token)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: {what} must be an integer, got {token!r}") from None


def _fmt_float(x: float) -> str:
    """Shortest text that reads back as exactly ``x`` (Python and Fortran list-directed input)."""
    return repr(float(x))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`aenet_dist.files.atomic_write`)."""
    atomic_write(path, text)


# --------------------------------------------------------------------------- .stp


def read_setup(path: str | os.PathLike) -> DescriptorSetup:
    """Parse one aenet descriptor setup (``.stp``) file.

    Only ``BASIS type=Chebyshev`` is supported; ``SYMMFUNC``/``FUNCTIONS`` (Behler symmetry
    functions) raise. The Chebyshev parameters ``radial_Rc radial_N angular_Rc angular_N``
    are ``key = value`` pairs in any order on the BASIS line itself and/or the lines that
    follow it. Without ``RMIN`` aenet's default of 1.0 Å is used (with a warning).

    Args:
        path: the ``.stp`` file.

    Returns:
        The setup, with ``source`` set to ``str(path)``.

    Raises:
        ValueError: naming the file (and line) for unreadable files, unknown keywords, bad
            numbers, unsupported descriptor types, or missing ATOM/ENV/BASIS/parameters.
    """
    path = Path(path)
    lines = read_lines(path, "setup file")
    element = None
    env: list[str] | None = None
    rmin = None
    description = ""
    basis: ChebyshevBasis | BehlerBasis | None = None
    seen: dict[str, int] = {}
    i = 0
    while i < len(lines):
        text = strip_comment(lines[i])
        line_no = i + 1
        if not text:
            i += 1
            continue
        tokens = text.split()
        keyword = tokens[0].lower()
        if keyword not in _STP_KEYWORDS:
            raise ValueError(f"{path}:{line_no}: unknown keyword {tokens[0]!r} (expected one of {', '.join(k.upper() for k in _STP_KEYWORDS)})")
        if keyword in seen or (keyword in _BASIS_KEYWORDS and basis is not None):
            first = seen.get(keyword) or min(seen[k] for k in _BASIS_KEYWORDS if k in seen)
            raise ValueError(f"{path}:{line_no}: {keyword.upper()} given twice, or a second descriptor basis (first on line {first})")
        seen[keyword] = line_no
        if keyword == "descr":
            body = []
            i += 1
            while i < len(lines) and not _END_DESCR_RE.match(lines[i]):
                body.append(lines[i].strip())
                i += 1
            if i >= len(lines):
                raise ValueError(f"{path}:{line_no}: DESCR without a closing 'END DESCR'")
            description = "\n".join(body).strip()
            i += 1
        elif keyword == "atom":
            if len(tokens) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'ATOM <symbol>', got {text!r}")
            element = tokens[1]
            i += 1
        elif keyword == "env":
            if len(tokens) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'ENV <number of species>', got {text!r}")
            num_env = to_int(tokens[1], path, line_no, "the ENV species count")
            if num_env < 1:
                raise ValueError(f"{path}:{line_no}: ENV needs at least one species, got {num_env}")
            env = []
            i += 1
            while len(env) < num_env:
                while i < len(lines) and not strip_comment(lines[i]):
                    i += 1
                if i >= len(lines) or strip_comment(lines[i]).split()[0].lower() in _STP_KEYWORDS:
                    where = f"line {i + 1}" if i < len(lines) else "the end of the file"
                    raise ValueError(f"{path}:{line_no}: ENV announces {num_env} species but only {len(env)} follow before {where}")
                species_tokens = strip_comment(lines[i]).split()
                if len(species_tokens) != 1:
                    raise ValueError(f"{path}:{i + 1}: expected one ENV species symbol, got {lines[i].strip()!r}")
                if species_tokens[0] in env:
                    raise ValueError(f"{path}:{i + 1}: ENV species {species_tokens[0]!r} listed twice")
                env.append(species_tokens[0])
                i += 1
        elif keyword == "rmin":
            if len(tokens) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'RMIN <distance>', got {text!r}")
            rmin = _to_float(tokens[1], path, line_no, "RMIN")
            if rmin < 0:
                raise ValueError(f"{path}:{line_no}: RMIN must be >= 0, got {rmin}")
            i += 1
        elif keyword == "basis":
            basis, i = _read_chebyshev(path, lines, i)
        else:  # SYMMFUNC / FUNCTIONS
            basis, i = _read_behler(path, lines, i, env)

    if element is None:
        raise ValueError(f"{path}: missing 'ATOM <symbol>' (the central species)")
    if env is None:
        raise ValueError(f"{path}: missing 'ENV <n>' and its species lines")
    if basis is None:
        raise ValueError(f"{path}: missing 'BASIS type=Chebyshev' (or 'SYMMFUNC type=Behler2011') and its parameters")
    if rmin is None:
        _log.warning("%s: RMIN not set, using aenet's default %.1f", path, _DEFAULT_RMIN)
        rmin = _DEFAULT_RMIN
    try:
        return DescriptorSetup(
            element=element,
            env_species=tuple(env),
            basis_type="behler2011" if isinstance(basis, BehlerBasis) else "chebyshev",
            basis=basis,
            rmin=rmin,
            description=description,
            source=str(path),
        )
    except ValueError as err:
        raise ValueError(str(err) if str(err).startswith(str(path)) else f"{path}: {err}") from None


def _read_chebyshev(path: Path, lines: list[str], i: int) -> tuple[ChebyshevBasis, int]:
    """Read ``BASIS type=...`` at line index ``i`` and its parameter lines; return the basis and next index."""
    line_no = i + 1
    rest = strip_comment(lines[i]).split(None, 1)
    rest = rest[1] if len(rest) > 1 else ""
    pair_lines = [(line_no, rest)] if rest else []
    j = i + 1
    while True:
        while j < len(lines) and not strip_comment(lines[j]):
            j += 1
        if j >= len(lines):
            break
        text = strip_comment(lines[j])
        if text.split()[0].lower() in _STP_KEYWORDS or "=" not in text:
            break
        pair_lines.append((j + 1, text))
        j += 1

    values: dict[str, tuple[str, int]] = {}
    basis_type = None
    for pl_no, text in pair_lines:
        if not _PAIRS_RE.fullmatch(text):
            raise ValueError(f"{path}:{pl_no}: expected 'key = value' pairs, got {text!r}")
        for key, value in _PAIR_RE.findall(text):
            low = key.lower()
            if low == "type":
                basis_type = value
                continue
            if low not in _CHEBYSHEV_KEYS:
                raise ValueError(
                    f"{path}:{pl_no}: unknown basis parameter {key!r} (expected {', '.join(_CHEBYSHEV_KEYS.values())})"
                )
            if low in values:
                raise ValueError(f"{path}:{pl_no}: basis parameter {key!r} given twice")
            values[low] = (value, pl_no)
    if basis_type is None:
        raise ValueError(f"{path}:{line_no}: BASIS needs 'type=Chebyshev'")
    if basis_type.lower() != "chebyshev":
        raise ValueError(f"{path}:{line_no}: descriptor basis type {basis_type!r} is not supported (only 'Chebyshev')")
    missing = [name for low, name in _CHEBYSHEV_KEYS.items() if low not in values]
    if missing:
        raise ValueError(f"{path}:{line_no}: BASIS type=Chebyshev is missing parameter(s) {', '.join(missing)}")
    r_rc = _to_float(values["radial_rc"][0], path, values["radial_rc"][1], "radial_Rc")
    r_n = to_int(values["radial_n"][0], path, values["radial_n"][1], "radial_N")
    a_rc = _to_float(values["angular_rc"][0], path, values["angular_rc"][1], "angular_Rc")
    a_n = to_int(values["angular_n"][0], path, values["angular_n"][1], "angular_N")
    try:
        basis = ChebyshevBasis(radial_cutoff=r_rc, radial_order=r_n, angular_cutoff=a_rc, angular_order=a_n)
    except ValueError as err:
        raise ValueError(f"{path}:{line_no}: {err}") from None
    return basis, j


def _aenet_readval(text: str, name: str) -> str | None:
    """The token aenet's ``io_readval`` reads for ``name``: after the first '=' following the first
    occurrence of ``name`` anywhere in the line (case-sensitive, so 'eta' also matches inside 'zeta')."""
    at = text.find(name)
    if at < 0:
        return None
    rest = text[at + len(name):]
    eq = rest.find("=")
    if eq < 0:
        return None
    tokens = rest[eq + 1:].split()
    return tokens[0] if tokens else None


def _read_behler_function(path: Path, line_no: int, text: str, env: set[str] | None) -> BehlerFunction:
    """One ``G=<n> type2=<X> [type3=<Y>] Rc=... ...`` line of a Behler2011 setup."""
    if not _PAIRS_RE.fullmatch(text):
        raise ValueError(f"{path}:{line_no}: expected 'key=value' pairs such as 'G=2 type2=O Rc=6.5 Rs=0.0 eta=0.5', got {text!r}")
    pairs: dict[str, str] = {}
    for key, value in _PAIR_RE.findall(text):
        if key in pairs:
            raise ValueError(f"{path}:{line_no}: {key!r} given twice")
        pairs[key] = value
    if "G" not in pairs:
        raise ValueError(f"{path}:{line_no}: symmetry function line needs 'G=<1..5>', got {text!r}")
    kind = to_int(pairs["G"], path, line_no, "G")
    if kind not in BEHLER_PARAMETERS:
        raise ValueError(f"{path}:{line_no}: G={kind} does not exist (aenet has G=1..5)")
    names = ("type2", "type3") if kind >= 4 else ("type2",)
    wanted = {"G", *names, *BEHLER_PARAMETERS[kind]}
    unknown = sorted(set(pairs) - wanted)
    if unknown:
        raise ValueError(f"{path}:{line_no}: G={kind} takes {', '.join(sorted(wanted - {'G'}))} (names are case-sensitive, "
                         f"as in aenet); unknown: {', '.join(unknown)}")
    optional = {"Rs"} if kind == 2 else set()  # aenet's default of 0 is the usual choice for Rs only
    missing = [k for k in (*names, *BEHLER_PARAMETERS[kind]) if k not in pairs and k not in optional]
    if missing:
        raise ValueError(f"{path}:{line_no}: G={kind} is missing {', '.join(missing)}")
    for key, value in pairs.items():
        # aenet finds a key as the first substring match: 'eta' after 'zeta' would silently read zeta's value.
        if _aenet_readval(text, key) != value:
            raise ValueError(f"{path}:{line_no}: aenet would read {key} from another field of this line "
                             f"(it takes the first '{key}' anywhere in the line); put {key}= before the fields containing '{key}'")
    for key in names:
        if env is not None and pairs[key] not in env:
            raise ValueError(f"{path}:{line_no}: {key}={pairs[key]} is not among the ENV species {sorted(env)}")
    values = {k: _to_float(pairs[k], path, line_no, k) for k in BEHLER_PARAMETERS[kind] if k in pairs}
    try:
        return BehlerFunction(kind, pairs["type2"], pairs.get("type3", ""), cutoff=values["Rc"], rs=values.get("Rs", 0.0),
                              eta=values.get("eta", 0.0), kappa=values.get("kappa", 0.0), lam=values.get("lambda", 0.0),
                              zeta=values.get("zeta", 0.0))
    except ValueError as err:
        raise ValueError(f"{path}:{line_no}: {err}") from None


def _read_behler(path: Path, lines: list[str], i: int, env: list[str] | None = None) -> tuple[BehlerBasis, int]:
    """Read ``SYMMFUNC type=Behler2011`` at line index ``i``, its count line and function lines."""
    line_no = i + 1
    text = strip_comment(lines[i])
    basis_type = None
    for key, value in _PAIR_RE.findall(text):
        if key.lower() == "type":
            basis_type = value
    if basis_type is None or basis_type.lower() != "behler2011":
        raise ValueError(f"{path}:{line_no}: expected 'SYMMFUNC type=Behler2011', got {text!r}")
    body = list(_content_lines(lines, i + 1))
    if not body:
        raise ValueError(f"{path}:{line_no}: SYMMFUNC must be followed by the number of symmetry functions")
    count_idx, count_text = body[0]
    count = to_int(count_text.split()[0], path, count_idx + 1, "the number of symmetry functions")
    if count < 1:
        raise ValueError(f"{path}:{count_idx + 1}: the number of symmetry functions must be >= 1, got {count}")
    entries = body[1:1 + count]
    if len(entries) < count or any(t.split()[0].lower() in _STP_KEYWORDS for _, t in entries):
        found = next((n for n, (_, t) in enumerate(entries) if t.split()[0].lower() in _STP_KEYWORDS), len(entries))
        raise ValueError(f"{path}:{count_idx + 1}: SYMMFUNC announces {count} functions but {found} follow")
    functions = tuple(_read_behler_function(path, k + 1, t, set(env) if env else None) for k, t in entries)
    return BehlerBasis(functions), entries[-1][0] + 1


def write_setup(path: str | os.PathLike, setup: DescriptorSetup) -> None:
    """Write ``setup`` as an aenet ``.stp`` file (atomically) that :func:`read_setup` reads back equal.

    Args:
        path: destination file.
        setup: a Chebyshev descriptor setup.
    """
    path = Path(path)
    b = setup.basis
    out = []
    if setup.description:
        out += ["DESCR"] + [" " + line for line in setup.description.splitlines()] + ["END DESCR", ""]
    out += [f"ATOM {setup.element}", "", f"ENV {len(setup.env_species)}"]
    out += list(setup.env_species)
    out += ["", f"RMIN {_fmt_float(setup.rmin)}", ""]
    if setup.basis_type == "behler2011":
        out += ["SYMMFUNC type=Behler2011", str(len(b.functions))]
        out += [_behler_line(f) for f in b.functions]
    else:
        out += ["BASIS type=Chebyshev"]
        out += [
            f"radial_Rc = {_fmt_float(b.radial_cutoff)}  radial_N = {b.radial_order}  "
            f"angular_Rc = {_fmt_float(b.angular_cutoff)}  angular_N = {b.angular_order}"
        ]
    atomic_write_text(path, "\n".join(out) + "\n")


def _behler_line(f: BehlerFunction) -> str:
    """One function line; 'eta' is written before 'zeta' because aenet matches keys as substrings."""
    types = f"type2={f.type2}" + (f" type3={f.type3}" if f.angular else "")
    values = dict(zip(BEHLER_PARAMETERS[f.kind], f.sfparam))
    order = [k for k in ("eta", "Rs", "kappa", "lambda", "zeta") if k in values]
    return f"G={f.kind} {types} " + " ".join(f"{k}={_fmt_float(values[k])}" for k in order) + f" Rc={_fmt_float(f.cutoff)}"


# --------------------------------------------------------------------------- generate.in


def parse_flag(tokens: list[str], path: Path, line_no: int) -> bool:
    """aenet flags: ``KEYWORD`` or ``KEYWORD .true.`` mean true, ``KEYWORD .false.`` false."""
    if len(tokens) == 1:
        return True
    if len(tokens) == 2:
        value = tokens[1].lower().strip(".")
        if value in ("true", "t"):
            return True
        if value in ("false", "f"):
            return False
    raise ValueError(f"{path}:{line_no}: expected '{tokens[0]}' or '{tokens[0]} .true./.false.', got {' '.join(tokens)!r}")


def _block(lines: list[str], start: int) -> list[tuple[int, str]]:
    """Content lines from index ``start`` up to (excluding) the next generate.in keyword line."""
    block = []
    for i, text in _content_lines(lines, start):
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
            force_percent = _to_float(tokens[1], path, line_no, "FORCESPERCENT")
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
                energies[symbol] = _to_float(parts[1], path, idx + 1, f"the atomic energy of {symbol}")
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
    out += [f"{s} {_fmt_float(config.atomic_energies[s])}  ! eV" for s in config.species]
    out += ["", "SETUPS"] + [f"{s} {stp_names[s]}" for s in config.species]
    out += [""]
    if config.forces:
        out += ["FORCES", f"FORCESPERCENT {_fmt_float(config.force_percent)}"]
    elif config.force_percent != _DEFAULT_FORCE_PERCENT:
        out += ["FORCES .false.", f"FORCESPERCENT {_fmt_float(config.force_percent)}"]
    out += ["", "FILES", str(len(config.files))]
    for f in config.files:
        absolute = os.path.abspath(f)
        rel = os.path.relpath(absolute, base)
        out.append(absolute if rel == ".." or rel.startswith(".." + os.sep) else rel)
    if write_setups:
        for s in config.species:
            write_setup(path.parent / stp_names[s], config.setups[s])
    atomic_write_text(path, "\n".join(out) + "\n")
