"""aenet ``.nn`` potential files: one record table, read and written as binary and as ASCII.

A ``.nn`` file holds 36 Fortran sequential records (aenet ``feedforward.f90: save_Network``,
``sfsetup.f90: save_Setup``, ``trainset.f90: save_TrnSet_info``); see the refdata README,
"Binary file layouts". :data:`RECORDS` lists them in file order, and the binary reader and
writer, the ASCII reader and writer, and the pre-write checks all walk that one table, so a
record is added or changed in one line.

Binary: every record is int32 byte count, payload, the same int32 byte count, little endian;
integers and logicals are 4 bytes, reals 8 bytes, arrays column-major, strings fixed length and
blank padded.

ASCII: the form aenet-PyTorch's ``nnASCII2bin`` tool reads with Fortran list-directed
``read(1,*)`` (one ``read`` per binary record, so one line per record here) and aenet-PyTorch's
``output_nn.py`` writes. See :func:`write_nn_ascii` for the exact layout we write.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np

from ..files import atomic_write

DESCRIPTION_LEN = 1024  # character(len=1024) :: description
TYPE_LEN = 2            # character(len=2) :: atomtype, envtypes, type names
SFTYPE_LEN = 100        # character(len=100) :: sftype
PATH_LEN = 1024         # character(len=1024) :: training-set file name
NENV_MAX = 2            # sfsetup.f90: sfenv(NENV_MAX, nsf)
NSFPARAM = 4            # sfsetup.f90: NSFPARAM (both basis types)


@dataclass
class NNFile:
    """Content of every record of one aenet ``.nn`` file.

    Network (records 1-9): ``nnodes`` (nlayers,) nodes per layer without bias; ``activations``
    (nlayers-1,) aenet codes of the non-input layers; ``iw``/``iv`` (nlayers,) 0-based offsets
    of each layer's weights / node values; ``W`` (Wsize,) all weights, block l column-major
    (n_out, n_in+1) with the bias in the last column. ``nnodes_max``, ``Wsize``, ``nvalues``
    are kept as read (see :func:`network_layout` for how aenet derives them).

    Setup (10-26): ``sfparam`` is (nsfparam, nsf), ``sfenv`` is (2, nsf), as the Fortran arrays.
    Strings are stored without their blank padding.

    Training-set info (27-36): ``scale`` is a divisor (E = NN/scale + shift + E_atom), ``shift``
    eV/atom, ``e_atom`` (ntypes,) eV in ``type_names`` order, ``e_min/e_max/e_avg`` eV/atom.

    The count records (nlayers, nenv, nsf, nsfparam, ntypes) are not fields: they are the
    properties below, derived from the arrays they count.
    """

    # network
    nnodes: np.ndarray
    activations: np.ndarray
    iw: np.ndarray
    iv: np.ndarray
    W: np.ndarray
    nnodes_max: int
    Wsize: int
    nvalues: int
    # descriptor setup
    description: str
    atomtype: str
    envtypes: tuple[str, ...]
    rc_min: float
    rc_max: float
    sftype: str
    sf: np.ndarray
    sfparam: np.ndarray
    sfenv: np.ndarray
    neval: int
    sfval_min: np.ndarray
    sfval_max: np.ndarray
    sfval_avg: np.ndarray
    sfval_cov: np.ndarray
    # training-set info
    train_file: str
    normalized: bool
    scale: float
    shift: float
    type_names: tuple[str, ...]
    e_atom: np.ndarray
    num_atoms_total: int
    num_structures: int
    e_min: float
    e_max: float
    e_avg: float

    @property
    def nlayers(self) -> int:
        return int(len(self.nnodes))

    @property
    def nenv(self) -> int:
        return len(self.envtypes)

    @property
    def nsf(self) -> int:
        return int(len(self.sf))

    @property
    def nsfparam(self) -> int:
        return int(self.sfparam.shape[0])

    @property
    def ntypes(self) -> int:
        return len(self.type_names)

    def e_atom_of(self, element: str) -> float:
        """Reference energy of ``element`` (what predict.x uses for the center type)."""
        if element not in self.type_names:
            raise ValueError(f"{element!r} is not among the training-set types {list(self.type_names)}")
        return float(self.e_atom[self.type_names.index(element)])

    def layer_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Weights (n_out, n_in) and bias (n_out,) of layer ``layer`` -> ``layer+1`` (0-based)."""
        n_in, n_out = int(self.nnodes[layer]), int(self.nnodes[layer + 1])
        block = self.W[self.iw[layer]:self.iw[layer + 1]].reshape(n_in + 1, n_out).T  # column-major (n_out, n_in+1)
        return block[:, :n_in], block[:, n_in]

    def equals(self, other: "NNFile") -> bool:
        """Exact equality of every record (arrays compared bitwise by value)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                a, b = np.asarray(a), np.asarray(b)
                if a.shape != b.shape or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True


def network_layout(nnodes) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """aenet's derived network sizes (``new_Network``): (nnodes_max, Wsize, nvalues, iw, iv)."""
    nnodes = [int(n) for n in nnodes]
    iw, iv = [0], [0]
    for n_in, n_out in zip(nnodes[:-1], nnodes[1:]):
        iw.append(iw[-1] + (n_in + 1) * n_out)
        iv.append(iv[-1] + n_in + 1)
    nvalues = iv[-1] + nnodes[-1]
    return max(nnodes), iw[-1], nvalues, np.array(iw, dtype=np.int32), np.array(iv, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# the record table
# --------------------------------------------------------------------------------------------


class _Reader(Protocol):
    """What the binary and the ASCII reader share: one call reads one record."""

    name: str

    def fail(self, msg: str) -> ValueError: ...
    def ints(self, count: int) -> np.ndarray: ...
    def reals(self, count: int) -> np.ndarray: ...
    def chars(self, length: int, count: int) -> list[str]: ...
    def logical(self) -> bool: ...


_KINDS = ("int", "ints", "real", "reals", "logical", "string", "strings")


@dataclass(frozen=True)
class Record:
    """One record of a ``.nn`` file.

    Attributes:
        name: the record's name in the refdata README (error messages use it).
        kind: int, real, logical or string (one value), ints, reals or strings (an array).
        attr: the :class:`NNFile` field or count property it holds; a tuple splits a reals
            record over several float fields.
        shape: Fortran shape of an array, each dimension a number or the attr of an earlier
            record (``"nlayers-1"``: one less); reading checks the record against it.
        length: characters of each string (blank padded in the file).
        minimum: smallest valid value of a count (checked on reading, before it sizes anything).
        check: ``check(reader, record, values)`` raises ``reader.fail(...)`` when the value just
            read disagrees with earlier ones.
    """

    name: str
    kind: str
    attr: str | tuple[str, ...]
    shape: tuple[int | str, ...] = ()
    length: int = 0
    minimum: int | None = None
    check: Callable[[_Reader, "Record", dict], None] | None = None

    def __post_init__(self) -> None:
        assert self.kind in _KINDS, self.kind
        assert (self.length > 0) == self.kind.startswith("string"), self.name
        assert bool(self.shape) == (self.kind in ("ints", "reals", "strings")), self.name

    def shape_of(self, values: dict) -> tuple[int, ...]:
        """The array shape given the values of the earlier records (keyed by attr)."""
        dims = []
        for dim in self.shape:
            if isinstance(dim, str):
                attr, _, less = dim.partition("-")
                dim = int(values[attr]) - int(less or 0)
            dims.append(dim)
        return tuple(dims)


def _check_nnodes(r: _Reader, rec: Record, values: dict) -> None:
    """Layer sizes are positive and give records 2-4 (Wsize sizes the weights record)."""
    nnodes = values["nnodes"]
    if (nnodes < 1).any():
        raise r.fail(f"has non-positive layer sizes {nnodes.tolist()}")
    layout = network_layout(nnodes)
    sizes = (values["nnodes_max"], values["Wsize"], values["nvalues"])
    if sizes != layout[:3]:
        raise ValueError(f"{r.name}: records 2-4 (nnodes_max, Wsize, nvalues) = {sizes} are "
                         f"inconsistent with nnodes {nnodes.tolist()} (expected {layout[:3]}; corrupt file?)")


def _check_offsets(r: _Reader, rec: Record, values: dict) -> None:
    """iw/iv are the offsets aenet derives from nnodes (they index W and the node values)."""
    nnodes = values["nnodes"]
    _, _, _, iw, iv = network_layout(nnodes)
    expected = iw if rec.attr == "iw" else iv
    if not np.array_equal(values[rec.attr], expected):
        raise r.fail(f"is {values[rec.attr].tolist()}, expected {expected.tolist()} for nnodes {nnodes.tolist()}")


# The 36 records in file order (the refdata README numbers them from 1).
RECORDS: tuple[Record, ...] = (
    # network: feedforward.f90 save_Network
    Record("nlayers", "int", "nlayers", minimum=2),
    Record("nnodes_max", "int", "nnodes_max"),
    Record("Wsize", "int", "Wsize"),
    Record("nvalues", "int", "nvalues"),
    Record("nnodes", "ints", "nnodes", ("nlayers",), check=_check_nnodes),
    Record("activations", "ints", "activations", ("nlayers-1",)),
    Record("iw", "ints", "iw", ("nlayers",), check=_check_offsets),
    Record("iv", "ints", "iv", ("nlayers",), check=_check_offsets),
    Record("weights", "reals", "W", ("Wsize",)),
    # descriptor setup: sfsetup.f90 save_Setup
    Record("description", "string", "description", length=DESCRIPTION_LEN),
    Record("atomtype", "string", "atomtype", length=TYPE_LEN),
    Record("nenv", "int", "nenv", minimum=0),
    Record("envtypes", "strings", "envtypes", ("nenv",), TYPE_LEN),
    Record("Rc_min", "real", "rc_min"),
    Record("Rc_max", "real", "rc_max"),
    Record("sftype", "string", "sftype", length=SFTYPE_LEN),
    Record("nsf", "int", "nsf", minimum=1),
    Record("nsfparam", "int", "nsfparam", minimum=0),
    Record("sf", "ints", "sf", ("nsf",)),
    Record("sfparam", "reals", "sfparam", ("nsfparam", "nsf")),
    Record("sfenv", "ints", "sfenv", (NENV_MAX, "nsf")),
    Record("neval", "int", "neval"),
    Record("sfval_min", "reals", "sfval_min", ("nsf",)),
    Record("sfval_max", "reals", "sfval_max", ("nsf",)),
    Record("sfval_avg", "reals", "sfval_avg", ("nsf",)),
    Record("sfval_cov", "reals", "sfval_cov", ("nsf",)),
    # training-set info: trainset.f90 save_TrnSet_info
    Record("trainset file", "string", "train_file", length=PATH_LEN),
    Record("normalized", "logical", "normalized"),
    Record("scale", "real", "scale"),
    Record("shift", "real", "shift"),
    Record("ntypes", "int", "ntypes", minimum=0),
    Record("type names", "strings", "type_names", ("ntypes",), TYPE_LEN),
    Record("E_atom", "reals", "e_atom", ("ntypes",)),
    Record("total atoms", "int", "num_atoms_total"),
    Record("number of structures", "int", "num_structures"),
    Record("E_min/E_max/E_av", "reals", ("e_min", "e_max", "e_avg"), (3,)),
)

# Names of the records, 1-based as in the README (index 0 is before the first record).
RECORD_NAMES: tuple[str | None, ...] = (None, *(rec.name for rec in RECORDS))


def _read_value(r: _Reader, rec: Record, shape: tuple[int, ...]):
    """Read one record as the Python value :class:`NNFile` holds."""
    if rec.kind == "int":
        return int(r.ints(1)[0])
    if rec.kind == "real":
        return float(r.reals(1)[0])
    if rec.kind == "logical":
        return r.logical()
    if rec.kind == "string":
        return r.chars(rec.length, 1)[0]
    if rec.kind == "strings":
        return tuple(r.chars(rec.length, math.prod(shape)))
    flat = r.ints(math.prod(shape)) if rec.kind == "ints" else r.reals(math.prod(shape))
    return np.ascontiguousarray(flat.reshape(shape[::-1]).T)  # the file is column-major


def _read_records(r: _Reader) -> NNFile:
    """Read the 36 records, checking each count before it sizes a later record."""
    values: dict = {}
    for rec in RECORDS:
        value = _read_value(r, rec, rec.shape_of(values))
        if rec.minimum is not None and value < rec.minimum:
            raise r.fail(f"{rec.attr} = {value} is invalid (must be >= {rec.minimum}; corrupt file?)")
        if isinstance(rec.attr, tuple):
            values.update(zip(rec.attr, (float(v) for v in value)))
        else:
            values[rec.attr] = value
        if rec.check is not None:
            rec.check(r, rec, values)
    # the count records are NNFile properties, not fields
    return NNFile(**{f.name: values[f.name] for f in fields(NNFile)})


def _value_of(nn: NNFile, rec: Record):
    """The value ``nn`` writes to record ``rec``."""
    if isinstance(rec.attr, tuple):
        return [getattr(nn, attr) for attr in rec.attr]
    return getattr(nn, rec.attr)


def _check_nn(nn: NNFile, where: str) -> None:
    """Validate shapes and string lengths before writing."""
    layout = network_layout(nn.nnodes)
    if (int(nn.nnodes_max), int(nn.Wsize), int(nn.nvalues)) != layout[:3] \
            or not np.array_equal(nn.iw, layout[3]) or not np.array_equal(nn.iv, layout[4]):
        raise ValueError(f"{where}: nnodes_max/Wsize/nvalues/iw/iv are inconsistent with nnodes {list(nn.nnodes)}")
    values = {rec.attr: _value_of(nn, rec) for rec in RECORDS if isinstance(rec.attr, str)}
    for rec in RECORDS:
        if rec.kind in ("ints", "reals") and isinstance(rec.attr, str):
            shape, expected = np.shape(values[rec.attr]), rec.shape_of(values)
            if tuple(shape) != expected:
                raise ValueError(f"{where}: {rec.attr} has shape {tuple(shape)}, expected {expected}")
    for rec in RECORDS:
        if rec.length:
            strings = [values[rec.attr]] if rec.kind == "string" else values[rec.attr]
            for value in strings:
                if len(value.encode("latin-1")) > rec.length:
                    raise ValueError(f"{where}: {rec.attr} {value[:40]!r}... is longer than aenet's {rec.length} characters")


# --------------------------------------------------------------------------------------------
# binary
# --------------------------------------------------------------------------------------------


class _RecordReader:
    """Reads Fortran sequential records, checking each length marker before trusting it."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name, self.pos, self.rec = data, name, 0, 0

    def fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.name}: record {self.rec} ({RECORD_NAMES[self.rec]}) {msg}")

    def record(self, expected: int) -> bytes:
        self.rec += 1
        size = len(self.data)
        if self.pos + 4 > size:
            raise self.fail(f"missing: the file ends at byte {size} (truncated?)")
        (n,) = struct.unpack_from("<i", self.data, self.pos)
        if n != expected:
            raise self.fail(f"has {n} bytes, expected {expected} (corrupt length marker or not an aenet .nn file)")
        if self.pos + 8 + n > size:
            raise self.fail(f"needs {n} + 8 bytes at byte {self.pos} but the file ends at byte {size} (truncated)")
        (n2,) = struct.unpack_from("<i", self.data, self.pos + 4 + n)
        if n2 != n:
            raise self.fail(f"trailing length marker {n2} does not match the leading one {n} (corrupt file)")
        payload = self.data[self.pos + 4:self.pos + 4 + n]
        self.pos += 8 + n
        return payload

    def ints(self, count: int) -> np.ndarray:
        return np.frombuffer(self.record(4 * count), dtype="<i4").astype(np.int32)

    def reals(self, count: int) -> np.ndarray:
        return np.frombuffer(self.record(8 * count), dtype="<f8").astype(np.float64)

    def chars(self, length: int, count: int) -> list[str]:
        raw = self.record(length * count).decode("latin-1")
        return [raw[k * length:(k + 1) * length].rstrip(" ") for k in range(count)]

    def logical(self) -> bool:
        return int(self.ints(1)[0]) != 0


def read_nn(path: str | os.PathLike) -> NNFile:
    """Read an aenet binary ``.nn`` file.

    Raises:
        ValueError naming the file and the record on a truncated or corrupt file.
    """
    path = Path(path)
    r = _RecordReader(path.read_bytes(), str(path))
    nn = _read_records(r)
    if r.pos != len(r.data):
        raise r.fail(f"is followed by {len(r.data) - r.pos} unexpected bytes (not a single aenet .nn potential?)")
    return nn


def _record_bytes(rec: Record, value) -> bytes:
    """Payload of one binary record."""
    if rec.kind in ("string", "strings"):
        strings = [value] if rec.kind == "string" else value
        return b"".join(s.encode("latin-1").ljust(rec.length, b" ") for s in strings)
    if rec.kind == "logical":
        value = 1 if value else 0  # gfortran .true. = 1
    dtype = "<f8" if rec.kind in ("real", "reals") else "<i4"
    return np.asarray(value, dtype=dtype).ravel(order="F").tobytes()


def nn_to_bytes(nn: NNFile, where: str = "NNFile") -> bytes:
    """Serialize ``nn`` to the bytes of an aenet binary ``.nn`` file."""
    _check_nn(nn, where)
    out = bytearray()
    for rec in RECORDS:
        payload = _record_bytes(rec, _value_of(nn, rec))
        marker = struct.pack("<i", len(payload))
        out += marker + payload + marker
    return bytes(out)


def write_nn(path: str | os.PathLike, nn: NNFile) -> None:
    """Write ``nn`` as an aenet binary ``.nn`` file (atomically)."""
    atomic_write(Path(path), nn_to_bytes(nn, str(path)))


# --------------------------------------------------------------------------------------------
# ASCII
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""'((?:[^']|'')*)'|"((?:[^"]|"")*)"|([^\s,]+)""")


def _fmt_real(x: float) -> str:
    return f"{float(x):25.16E}"  # 17 significant digits: exact round trip of float64


def _fmt_int(i: int) -> str:
    return f"{int(i):17d}"


def _fmt_str(s: str) -> str:
    """A string as list-directed input: bare if it is one token, else quoted ('' escapes ')."""
    if s and not re.search(r"[\s,/'\"*]", s):
        return s
    return "'" + s.replace("'", "''") + "'"


def _record_text(rec: Record, value) -> str:
    """One line of the ASCII form: the record's values, arrays in Fortran order."""
    if rec.kind == "logical":
        return "T" if value else "F"
    if rec.kind == "string":
        return _fmt_str(value)
    if rec.kind == "strings":
        return " ".join(_fmt_str(s) for s in value)
    fmt = _fmt_real if rec.kind in ("real", "reals") else _fmt_int
    return " ".join(fmt(v) for v in np.asarray(value).ravel(order="F"))


def nn_to_ascii(nn: NNFile, where: str = "NNFile") -> str:
    """Text of the ASCII form (see :func:`write_nn_ascii`)."""
    _check_nn(nn, where)
    return "\n".join(_record_text(rec, _value_of(nn, rec)) for rec in RECORDS) + "\n"


def write_nn_ascii(path: str | os.PathLike, nn: NNFile) -> None:
    """Write ``nn`` in the ASCII form that aenet-PyTorch's ``nnASCII2bin`` converts to binary (atomically).

    One line per binary record, in record order (1-36); arrays on one line in Fortran
    (column-major) order; integers ``I17``-like, reals with 17 significant digits (``%25.16E``,
    exact for float64), logicals ``T``/``F``, strings bare when they are a single token and
    otherwise in apostrophes (Fortran list-directed input, so ``nnASCII2bin`` keeps blanks
    inside the description). This is the line layout of aenet-PyTorch's ``output_nn.py``;
    gfortran's list-directed output of ``nnASCII2bin --to-ascii`` has the same records but
    writes the env types one per line and strings unquoted: :func:`read_nn_ascii` reads both.
    """
    atomic_write(Path(path), nn_to_ascii(nn, str(path)).encode("latin-1"))


class _ListDirectedReader:
    """Emulates Fortran ``read(u,*) items``: each read starts on a new line, takes values across
    lines as needed and drops the rest of its last line. Unquoted strings end at a blank or comma
    (so ``Descriptor for Ti`` reads as ``Descriptor``, as in nnASCII2bin); ``r*value`` repeats."""

    def __init__(self, text: str, name: str):
        self.lines, self.name, self.line_no, self.rec = text.splitlines(), name, 0, 0

    def fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.name}: line {self.line_no}, record {self.rec} ({RECORD_NAMES[self.rec]}): {msg}")

    def tokens(self, count: int) -> list[str]:
        self.rec += 1
        out: list[str] = []
        while len(out) < count:
            if self.line_no >= len(self.lines):
                raise self.fail(f"file ends after {len(out)} of {count} values (truncated?)")
            line = self.lines[self.line_no]
            self.line_no += 1
            for m in _TOKEN.finditer(line):
                if m.group(1) is not None:
                    out.append("\0" + m.group(1).replace("''", "'"))  # \0 marks a quoted string
                elif m.group(2) is not None:
                    out.append("\0" + m.group(2).replace('""', '"'))
                else:
                    tok = m.group(3)
                    rep = re.fullmatch(r"(\d+)\*(.+)", tok)
                    out.extend([rep.group(2)] * int(rep.group(1)) if rep else [tok])
                if len(out) >= count:
                    break
        return out[:count]

    def ints(self, count: int) -> np.ndarray:
        toks = self.tokens(count)
        try:
            return np.array([int(t) for t in toks], dtype=np.int32)
        except ValueError:
            raise self.fail(f"expected {count} integers, got {toks[:5]}...") from None

    def reals(self, count: int) -> np.ndarray:
        toks = self.tokens(count)
        try:
            return np.array([float(t.replace("d", "e").replace("D", "E")) for t in toks], dtype=np.float64)
        except ValueError:
            raise self.fail(f"expected {count} reals, got {toks[:5]}...") from None

    def chars(self, length: int, count: int) -> list[str]:
        # Fortran truncates a longer value to the variable's length.
        return [t.lstrip("\0")[:length].rstrip(" ") for t in self.tokens(count)]

    def logical(self) -> bool:
        (tok,) = self.tokens(1)
        t = tok.lstrip("\0").lstrip(".")[:1].upper()
        if t not in ("T", "F"):
            raise self.fail(f"expected a logical (T/F/.true./True), got {tok!r}")
        return t == "T"


def read_nn_ascii(path: str | os.PathLike) -> NNFile:
    """Read the ASCII form of a ``.nn`` file (aenet-PyTorch ``*.nn.ascii`` or :func:`write_nn_ascii` output).

    Parsed like ``nnASCII2bin`` parses it (Fortran list-directed input), so the result written
    with :func:`write_nn` equals what ``nnASCII2bin`` would produce. Lines after the last record
    are ignored, as ``nnASCII2bin`` ignores them.
    """
    path = Path(path)
    nn = _read_records(_ListDirectedReader(path.read_text(encoding="latin-1"), str(path)))
    _check_nn(nn, str(path))  # the record checks imply it; kept as the writers' guard on what we hand out
    return nn
