"""The pieces every aenet text input shares: lines, comments, Fortran numbers, flags.

aenet's readers (``sfsetup.f90``, ``input.f90``, aenet-PyTorch's ``read_input.py``) take
keywords case-insensitively, ``!`` and ``#`` start comments, reals may be Fortran style
(``0.35d0``, ``5.``). Every error is a :class:`ValueError` that names the file and line
(``path:line: message``).
"""

from __future__ import annotations

from pathlib import Path


def read_lines(path: Path, what: str) -> list[str]:
    """Lines of an input file; a missing or unreadable file is a ValueError naming it and ``what``."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file ({what}); check the path") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not {what}; give the file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file, so not {what}") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read {what}: {err.strerror or err}") from None


def strip_comment(line: str) -> str:
    """Drop everything from the first ``!`` or ``#`` on; strip whitespace."""
    cut = len(line)
    for mark in ("!", "#"):
        pos = line.find(mark)
        if pos >= 0:
            cut = min(cut, pos)
    return line[:cut].strip()


def content_lines(lines: list[str], start: int = 0):
    """Yield ``(index, text)`` of non-empty lines from ``start`` on, comments removed (index 0-based).

    A line starting with ``%`` is a comment too, as aenet's reader (``aeio_readline``) has it.
    """
    for i in range(start, len(lines)):
        text = strip_comment(lines[i])
        if text and not text.startswith("%"):
            yield i, text


def fortran_real(token: str) -> float:
    """A Fortran real (``0.35d0``, ``5.``, ``1e-3``) as a float; ValueError if it is none."""
    return float(token.replace("d", "e").replace("D", "e"))


def to_float(token: str, path: Path, line_no: int, what: str) -> float:
    """:func:`fortran_real`, or a ValueError naming the file, line and ``what``."""
    try:
        return fortran_real(token)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: cannot read {what} from {token!r}") from None


def to_int(token: str, path: Path, line_no: int, what: str) -> int:
    """``token`` as an int; otherwise a ValueError naming the file, line and ``what``."""
    try:
        return int(token)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: {what} must be an integer, got {token!r}") from None


def fmt_float(x: float) -> str:
    """Shortest text that reads back as exactly ``x`` (Python and Fortran list-directed input)."""
    return repr(float(x))


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
