"""aenet's descriptor setup files (``.stp``): Chebyshev basis and Behler2011 symmetry functions.

The format follows aenet's Fortran reader (``sfsetup.f90``: ``read_Setup_parameters``,
``read_basis_chebyshev``, ``read_symmfunc_Behler2011``). Keywords are case-insensitive;
``!`` and ``#`` start comments. Every error is a :class:`ValueError` that names the file
and, where there is one, the line (``path:line: message``).

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

A Behler2011 setup replaces the BASIS line with::

    SYMMFUNC type=Behler2011
    2
    G=2 type2=O eta=0.05 Rs=0.0 Rc=6.5
    G=4 type2=O type3=Ti eta=0.01 lambda=1.0 zeta=2.0 Rc=5.0
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import BEHLER_PARAMETERS, BehlerBasis, BehlerFunction, ChebyshevBasis, DescriptorSetup
from ..files import atomic_write
from ..log import get_logger
from .text import content_lines, fmt_float, read_lines, strip_comment, to_float, to_int

_log = get_logger(__name__)

STP_KEYWORDS = ("descr", "atom", "env", "rmin", "basis", "symmfunc", "functions")
_BASIS_KEYWORDS = ("basis", "symmfunc", "functions")
_CHEBYSHEV_KEYS = {"radial_rc": "radial_Rc", "radial_n": "radial_N", "angular_rc": "angular_Rc", "angular_n": "angular_N"}
_PAIRS_RE = re.compile(r"\s*(?:[A-Za-z_]\w*\s*=\s*[^\s=]+\s*)+")
_PAIR_RE = re.compile(r"([A-Za-z_]\w*)\s*=\s*([^\s=]+)")
_END_DESCR_RE = re.compile(r"^\s*end\s+descr", re.IGNORECASE)
_DEFAULT_RMIN = 1.0  # aenet's Rc_min when RMIN is not given


def read_setup(path: str | os.PathLike) -> DescriptorSetup:
    """Parse one aenet descriptor setup (``.stp``) file.

    The basis is ``BASIS type=Chebyshev`` or ``SYMMFUNC``/``FUNCTIONS type=Behler2011``
    (Behler symmetry functions). The Chebyshev parameters ``radial_Rc radial_N angular_Rc angular_N``
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
    s = _read_keywords(path, read_lines(path, "setup file"))
    if s.element is None:
        raise ValueError(f"{path}: missing 'ATOM <symbol>' (the central species)")
    if s.env is None:
        raise ValueError(f"{path}: missing 'ENV <n>' and its species lines")
    if s.basis is None:
        raise ValueError(f"{path}: missing 'BASIS type=Chebyshev' (or 'SYMMFUNC type=Behler2011') and its parameters")
    rmin = s.rmin
    if rmin is None:
        _log.warning("%s: RMIN not set, using aenet's default %.1f", path, _DEFAULT_RMIN)
        rmin = _DEFAULT_RMIN
    try:
        return DescriptorSetup(
            element=s.element,
            env_species=tuple(s.env),
            basis_type="behler2011" if isinstance(s.basis, BehlerBasis) else "chebyshev",
            basis=s.basis,
            rmin=rmin,
            description=s.description,
            source=str(path),
        )
    except ValueError as err:
        raise ValueError(str(err) if str(err).startswith(str(path)) else f"{path}: {err}") from None


@dataclass
class _SetupKeywords:
    """What the keywords of a ``.stp`` file say; ``None`` where the keyword is absent."""

    seen: dict[str, int] = field(default_factory=dict)  # keyword -> its line (1-based)
    element: str | None = None
    env: list[str] | None = None
    rmin: float | None = None
    description: str = ""
    basis: ChebyshevBasis | BehlerBasis | None = None


def _read_keywords(path: Path, lines: list[str]) -> _SetupKeywords:
    """The keyword pass: each keyword once, at most one basis, each read by its helper."""
    out = _SetupKeywords()
    i = 0
    while (found := next(content_lines(lines, i), None)) is not None:
        i, text = found
        line_no = i + 1
        tokens = text.split()
        keyword = tokens[0].lower()
        if keyword not in STP_KEYWORDS:
            raise ValueError(f"{path}:{line_no}: unknown keyword {tokens[0]!r} (expected one of {', '.join(k.upper() for k in STP_KEYWORDS)})")
        seen = out.seen
        if keyword in seen or (keyword in _BASIS_KEYWORDS and out.basis is not None):
            first = seen.get(keyword) or min(seen[k] for k in _BASIS_KEYWORDS if k in seen)
            raise ValueError(f"{path}:{line_no}: {keyword.upper()} given twice, or a second descriptor basis (first on line {first})")
        seen[keyword] = line_no
        if keyword == "descr":
            out.description, i = _read_descr(path, lines, i)
        elif keyword == "atom":
            out.element = _one_value(path, line_no, text, "ATOM <symbol>")
            i += 1
        elif keyword == "env":
            out.env, i = _read_env(path, lines, i)
        elif keyword == "rmin":
            out.rmin = _read_rmin(path, line_no, text)
            i += 1
        elif keyword == "basis":
            out.basis, i = _read_chebyshev(path, lines, i)
        else:  # SYMMFUNC / FUNCTIONS
            out.basis, i = _read_behler(path, lines, i, out.env)
    return out


def _one_value(path: Path, line_no: int, text: str, expected: str) -> str:
    """The single value after the keyword on line ``text``; ``expected`` is the form named in the error."""
    tokens = text.split()
    if len(tokens) != 2:
        raise ValueError(f"{path}:{line_no}: expected '{expected}', got {text!r}")
    return tokens[1]


def _read_descr(path: Path, lines: list[str], i: int) -> tuple[str, int]:
    """Read ``DESCR`` at line index ``i`` up to ``END DESCR``; return the text and the next index."""
    line_no = i + 1
    body = []
    i += 1
    while i < len(lines) and not _END_DESCR_RE.match(lines[i]):
        body.append(lines[i].strip())
        i += 1
    if i >= len(lines):
        raise ValueError(f"{path}:{line_no}: DESCR without a closing 'END DESCR'")
    return "\n".join(body).strip(), i + 1


def _read_env(path: Path, lines: list[str], i: int) -> tuple[list[str], int]:
    """Read ``ENV <n>`` at line index ``i`` and its ``n`` species lines; return them and the next index."""
    line_no = i + 1
    text = strip_comment(lines[i])
    num_env = to_int(_one_value(path, line_no, text, "ENV <number of species>"), path, line_no, "the ENV species count")
    if num_env < 1:
        raise ValueError(f"{path}:{line_no}: ENV needs at least one species, got {num_env}")
    env: list[str] = []
    i += 1
    while len(env) < num_env:
        i = next(content_lines(lines, i), (len(lines), ""))[0]  # the next content line, or the end
        # A keyword (or the end of the file) before n species means the count is wrong.
        if i >= len(lines) or strip_comment(lines[i]).split()[0].lower() in STP_KEYWORDS:
            where = f"line {i + 1}" if i < len(lines) else "the end of the file"
            raise ValueError(f"{path}:{line_no}: ENV announces {num_env} species but only {len(env)} follow before {where}")
        species_tokens = strip_comment(lines[i]).split()
        if len(species_tokens) != 1:
            raise ValueError(f"{path}:{i + 1}: expected one ENV species symbol, got {lines[i].strip()!r}")
        if species_tokens[0] in env:
            raise ValueError(f"{path}:{i + 1}: ENV species {species_tokens[0]!r} listed twice")
        env.append(species_tokens[0])
        i += 1
    return env, i


def _read_rmin(path: Path, line_no: int, text: str) -> float:
    """The distance of an ``RMIN <distance>`` line (Å, >= 0)."""
    rmin = to_float(_one_value(path, line_no, text, "RMIN <distance>"), path, line_no, "RMIN")
    if rmin < 0:
        raise ValueError(f"{path}:{line_no}: RMIN must be >= 0, got {rmin}")
    return rmin


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
        if text.split()[0].lower() in STP_KEYWORDS or "=" not in text:
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
    r_rc = to_float(values["radial_rc"][0], path, values["radial_rc"][1], "radial_Rc")
    r_n = to_int(values["radial_n"][0], path, values["radial_n"][1], "radial_N")
    a_rc = to_float(values["angular_rc"][0], path, values["angular_rc"][1], "angular_Rc")
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
    values = {k: to_float(pairs[k], path, line_no, k) for k in BEHLER_PARAMETERS[kind] if k in pairs}
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
    body = list(content_lines(lines, i + 1))
    if not body:
        raise ValueError(f"{path}:{line_no}: SYMMFUNC must be followed by the number of symmetry functions")
    count_idx, count_text = body[0]
    count = to_int(count_text.split()[0], path, count_idx + 1, "the number of symmetry functions")
    if count < 1:
        raise ValueError(f"{path}:{count_idx + 1}: the number of symmetry functions must be >= 1, got {count}")
    entries = body[1:1 + count]
    if len(entries) < count or any(t.split()[0].lower() in STP_KEYWORDS for _, t in entries):
        found = next((n for n, (_, t) in enumerate(entries) if t.split()[0].lower() in STP_KEYWORDS), len(entries))
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
    out += ["", f"RMIN {fmt_float(setup.rmin)}", ""]
    if setup.basis_type == "behler2011":
        out += ["SYMMFUNC type=Behler2011", str(len(b.functions))]
        out += [_behler_line(f) for f in b.functions]
    else:
        out += ["BASIS type=Chebyshev"]
        out += [
            f"radial_Rc = {fmt_float(b.radial_cutoff)}  radial_N = {b.radial_order}  "
            f"angular_Rc = {fmt_float(b.angular_cutoff)}  angular_N = {b.angular_order}"
        ]
    atomic_write(path, "\n".join(out) + "\n")


def _behler_line(f: BehlerFunction) -> str:
    """One function line; 'eta' is written before 'zeta' because aenet matches keys as substrings."""
    types = f"type2={f.type2}" + (f" type3={f.type3}" if f.angular else "")
    values = dict(zip(BEHLER_PARAMETERS[f.kind], f.sfparam))
    order = [k for k in ("eta", "Rs", "kappa", "lambda", "zeta") if k in values]
    return f"G={f.kind} {types} " + " ".join(f"{k}={fmt_float(values[k])}" for k in order) + f" Rc={fmt_float(f.cutoff)}"


# --------------------------------------------------------------------------- generate.in
