"""aenet ``.nn`` potential files: binary (Fortran unformatted) and ASCII read/write, model conversion.

A ``.nn`` file holds 36 Fortran sequential records (aenet ``feedforward.f90: save_Network``,
``sfsetup.f90: save_Setup``, ``trainset.f90: save_TrnSet_info``); see the refdata README,
"Binary file layouts". Every record is: int32 byte count, payload, the same int32 byte count,
little endian; integers and logicals are 4 bytes, reals 8 bytes, arrays column-major, strings
fixed length and blank padded.

The ASCII form is the one aenet-PyTorch's ``nnASCII2bin`` tool reads with Fortran list-directed
``read(1,*)`` (one ``read`` per binary record, so one line per record here) and aenet-PyTorch's
``output_nn.py`` writes. See :func:`write_nn_ascii` for the exact layout we write.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write
from .config import BEHLER_PARAMETERS, BehlerBasis, BehlerFunction, ChebyshevBasis, DescriptorSetup
from .model import AtomicModel, ElementNet, NetworkConfig, activation_name, model_from_facts

DESCRIPTION_LEN = 1024  # character(len=1024) :: description
TYPE_LEN = 2            # character(len=2) :: atomtype, envtypes, type names
SFTYPE_LEN = 100        # character(len=100) :: sftype
PATH_LEN = 1024         # character(len=1024) :: training-set file name
NENV_MAX = 2            # sfsetup.f90: sfenv(NENV_MAX, nsf)
NSFPARAM = 4  # sfsetup.f90: NSFPARAM (both basis types)

# Names of the 36 records, 1-based as in the README.
RECORD_NAMES = (
    None, "nlayers", "nnodes_max", "Wsize", "nvalues", "nnodes", "activations", "iw", "iv", "weights",
    "description", "atomtype", "nenv", "envtypes", "Rc_min", "Rc_max", "sftype", "nsf", "nsfparam", "sf",
    "sfparam", "sfenv", "neval", "sfval_min", "sfval_max", "sfval_avg", "sfval_cov",
    "trainset file", "normalized", "scale", "shift", "ntypes", "type names", "E_atom",
    "total atoms", "number of structures", "E_min/E_max/E_av",
)


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

    def int(self) -> int:
        return int(self.ints(1)[0])

    def reals(self, count: int) -> np.ndarray:
        return np.frombuffer(self.record(8 * count), dtype="<f8").astype(np.float64)

    def real(self) -> float:
        return float(self.reals(1)[0])

    def chars(self, length: int, count: int = 1) -> list[str]:
        raw = self.record(length * count).decode("latin-1")
        return [raw[k * length:(k + 1) * length].rstrip(" ") for k in range(count)]

    def positive(self, value: int, what: str, minimum: int = 1) -> int:
        if value < minimum:
            raise self.fail(f"{what} = {value} is invalid (must be >= {minimum}; corrupt file?)")
        return value


def _parse_records(r: _RecordReader) -> NNFile:
    nlayers = r.positive(r.int(), "nlayers", 2)
    nnodes_max = r.int()
    Wsize = r.int()
    nvalues = r.int()
    nnodes = r.ints(nlayers)
    if (nnodes < 1).any():
        raise r.fail(f"has non-positive layer sizes {nnodes.tolist()}")
    layout = network_layout(nnodes)
    if (nnodes_max, Wsize, nvalues) != layout[:3]:
        raise ValueError(f"{r.name}: records 2-4 (nnodes_max, Wsize, nvalues) = {(nnodes_max, Wsize, nvalues)} are "
                         f"inconsistent with nnodes {nnodes.tolist()} (expected {layout[:3]}; corrupt file?)")
    activations = r.ints(nlayers - 1)
    iw = r.ints(nlayers)
    if not np.array_equal(iw, layout[3]):
        raise r.fail(f"is {iw.tolist()}, expected {layout[3].tolist()} for nnodes {nnodes.tolist()}")
    iv = r.ints(nlayers)
    if not np.array_equal(iv, layout[4]):
        raise r.fail(f"is {iv.tolist()}, expected {layout[4].tolist()} for nnodes {nnodes.tolist()}")
    W = r.reals(Wsize)

    (description,) = r.chars(DESCRIPTION_LEN)
    (atomtype,) = r.chars(TYPE_LEN)
    nenv = r.positive(r.int(), "nenv", 0)
    envtypes = tuple(r.chars(TYPE_LEN, nenv))
    rc_min = r.real()
    rc_max = r.real()
    (sftype,) = r.chars(SFTYPE_LEN)
    nsf = r.positive(r.int(), "nsf")
    nsfparam = r.positive(r.int(), "nsfparam", 0)
    sf = r.ints(nsf)
    sfparam = r.reals(nsfparam * nsf).reshape(nsf, nsfparam).T.copy()  # Fortran (nsfparam, nsf)
    sfenv = r.ints(NENV_MAX * nsf).reshape(nsf, NENV_MAX).T.copy()     # Fortran (2, nsf)
    neval = r.int()
    sfval_min, sfval_max, sfval_avg, sfval_cov = (r.reals(nsf) for _ in range(4))

    (train_file,) = r.chars(PATH_LEN)
    normalized = r.int() != 0
    scale = r.real()
    shift = r.real()
    ntypes = r.positive(r.int(), "ntypes", 0)
    type_names = tuple(r.chars(TYPE_LEN, ntypes))
    e_atom = r.reals(ntypes)
    num_atoms_total = r.int()
    num_structures = r.int()
    e_min, e_max, e_avg = (float(v) for v in r.reals(3))
    if r.pos != len(r.data):
        r.rec = 36
        raise r.fail(f"is followed by {len(r.data) - r.pos} unexpected bytes (not a single aenet .nn potential?)")
    return NNFile(
        nnodes=nnodes, activations=activations, iw=iw, iv=iv, W=W, nnodes_max=nnodes_max, Wsize=Wsize, nvalues=nvalues,
        description=description, atomtype=atomtype, envtypes=envtypes, rc_min=rc_min, rc_max=rc_max, sftype=sftype,
        sf=sf, sfparam=sfparam, sfenv=sfenv, neval=neval, sfval_min=sfval_min, sfval_max=sfval_max,
        sfval_avg=sfval_avg, sfval_cov=sfval_cov, train_file=train_file, normalized=normalized, scale=scale,
        shift=shift, type_names=type_names, e_atom=e_atom, num_atoms_total=num_atoms_total,
        num_structures=num_structures, e_min=e_min, e_max=e_max, e_avg=e_avg,
    )


def read_nn(path: str | os.PathLike) -> NNFile:
    """Read an aenet binary ``.nn`` file.

    Raises:
        ValueError naming the file and the record on a truncated or corrupt file.
    """
    path = Path(path)
    return _parse_records(_RecordReader(path.read_bytes(), str(path)))


def _check_nn(nn: NNFile, where: str) -> None:
    """Validate shapes and string lengths before writing."""
    layout = network_layout(nn.nnodes)
    if (int(nn.nnodes_max), int(nn.Wsize), int(nn.nvalues)) != layout[:3] \
            or not np.array_equal(nn.iw, layout[3]) or not np.array_equal(nn.iv, layout[4]):
        raise ValueError(f"{where}: nnodes_max/Wsize/nvalues/iw/iv are inconsistent with nnodes {list(nn.nnodes)}")
    checks = [("activations", np.shape(nn.activations), (nn.nlayers - 1,)), ("W", np.shape(nn.W), (layout[1],)),
              ("sfparam", np.shape(nn.sfparam), (nn.nsfparam, nn.nsf)), ("sfenv", np.shape(nn.sfenv), (NENV_MAX, nn.nsf)),
              ("e_atom", np.shape(nn.e_atom), (nn.ntypes,))]
    checks += [(n, np.shape(getattr(nn, n)), (nn.nsf,)) for n in ("sfval_min", "sfval_max", "sfval_avg", "sfval_cov")]
    for name, shape, expected in checks:
        if tuple(shape) != tuple(expected):
            raise ValueError(f"{where}: {name} has shape {tuple(shape)}, expected {tuple(expected)}")
    for name, value, length in [("description", nn.description, DESCRIPTION_LEN), ("atomtype", nn.atomtype, TYPE_LEN),
                                ("sftype", nn.sftype, SFTYPE_LEN), ("train_file", nn.train_file, PATH_LEN),
                                *[("envtypes", t, TYPE_LEN) for t in nn.envtypes],
                                *[("type_names", t, TYPE_LEN) for t in nn.type_names]]:
        if len(value.encode("latin-1")) > length:
            raise ValueError(f"{where}: {name} {value[:40]!r}... is longer than aenet's {length} characters")


def nn_to_bytes(nn: NNFile, where: str = "NNFile") -> bytes:
    """Serialize ``nn`` to the bytes of an aenet binary ``.nn`` file."""
    _check_nn(nn, where)
    out = bytearray()

    def rec(payload: bytes) -> None:
        out.extend(struct.pack("<i", len(payload)))
        out.extend(payload)
        out.extend(struct.pack("<i", len(payload)))

    def ints(values) -> bytes:
        return np.asarray(values, dtype="<i4").tobytes()

    def reals(values) -> bytes:
        return np.asarray(values, dtype="<f8").tobytes()

    def chars(values, length: int) -> bytes:
        return b"".join(v.encode("latin-1").ljust(length, b" ") for v in values)

    for v in (nn.nlayers, nn.nnodes_max, nn.Wsize, nn.nvalues):
        rec(ints([v]))
    for a in (nn.nnodes, nn.activations, nn.iw, nn.iv):
        rec(ints(a))
    rec(reals(nn.W))
    rec(chars([nn.description], DESCRIPTION_LEN))
    rec(chars([nn.atomtype], TYPE_LEN))
    rec(ints([len(nn.envtypes)]))
    rec(chars(nn.envtypes, TYPE_LEN))
    rec(reals([nn.rc_min]))
    rec(reals([nn.rc_max]))
    rec(chars([nn.sftype], SFTYPE_LEN))
    rec(ints([nn.nsf]))
    rec(ints([nn.nsfparam]))
    rec(ints(nn.sf))
    rec(reals(np.asarray(nn.sfparam).T.ravel()))  # column-major
    rec(ints(np.asarray(nn.sfenv).T.ravel()))
    rec(ints([nn.neval]))
    for a in (nn.sfval_min, nn.sfval_max, nn.sfval_avg, nn.sfval_cov):
        rec(reals(a))
    rec(chars([nn.train_file], PATH_LEN))
    rec(ints([1 if nn.normalized else 0]))  # gfortran .true. = 1
    rec(reals([nn.scale]))
    rec(reals([nn.shift]))
    rec(ints([nn.ntypes]))
    rec(chars(nn.type_names, TYPE_LEN))
    rec(reals(nn.e_atom))
    rec(ints([nn.num_atoms_total]))
    rec(ints([nn.num_structures]))
    rec(reals([nn.e_min, nn.e_max, nn.e_avg]))
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


def nn_to_ascii(nn: NNFile, where: str = "NNFile") -> str:
    """Text of the ASCII form (see :func:`write_nn_ascii`)."""
    _check_nn(nn, where)
    ints = lambda a: " ".join(_fmt_int(v) for v in np.asarray(a).ravel(order="F"))  # noqa: E731
    reals = lambda a: " ".join(_fmt_real(v) for v in np.asarray(a).ravel(order="F"))  # noqa: E731
    strs = lambda a: " ".join(_fmt_str(v) for v in a)  # noqa: E731
    lines = [
        _fmt_int(nn.nlayers), _fmt_int(nn.nnodes_max), _fmt_int(nn.Wsize), _fmt_int(nn.nvalues),
        ints(nn.nnodes), ints(nn.activations), ints(nn.iw), ints(nn.iv), reals(nn.W),
        _fmt_str(nn.description), _fmt_str(nn.atomtype), _fmt_int(len(nn.envtypes)), strs(nn.envtypes),
        _fmt_real(nn.rc_min), _fmt_real(nn.rc_max), _fmt_str(nn.sftype), _fmt_int(nn.nsf), _fmt_int(nn.nsfparam),
        ints(nn.sf), reals(nn.sfparam), ints(nn.sfenv), _fmt_int(nn.neval),
        reals(nn.sfval_min), reals(nn.sfval_max), reals(nn.sfval_avg), reals(nn.sfval_cov),
        _fmt_str(nn.train_file), "T" if nn.normalized else "F", _fmt_real(nn.scale), _fmt_real(nn.shift),
        _fmt_int(nn.ntypes), strs(nn.type_names), reals(nn.e_atom), _fmt_int(nn.num_atoms_total),
        _fmt_int(nn.num_structures), reals([nn.e_min, nn.e_max, nn.e_avg]),
    ]
    return "\n".join(lines) + "\n"


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

    def int(self) -> int:
        return int(self.ints(1)[0])

    def reals(self, count: int) -> np.ndarray:
        toks = self.tokens(count)
        try:
            return np.array([float(t.replace("d", "e").replace("D", "E")) for t in toks], dtype=np.float64)
        except ValueError:
            raise self.fail(f"expected {count} reals, got {toks[:5]}...") from None

    def real(self) -> float:
        return float(self.reals(1)[0])

    def chars(self, length: int, count: int = 1) -> list[str]:
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
    with :func:`write_nn` equals what ``nnASCII2bin`` would produce.
    """
    path = Path(path)
    r = _ListDirectedReader(path.read_text(encoding="latin-1"), str(path))
    nlayers = r.int()
    if nlayers < 2:
        raise r.fail(f"nlayers = {nlayers} must be >= 2")
    nnodes_max, Wsize, nvalues = r.int(), r.int(), r.int()
    nnodes = r.ints(nlayers)
    activations = r.ints(nlayers - 1)
    iw = r.ints(nlayers)
    iv = r.ints(nlayers)
    W = r.reals(Wsize)
    (description,) = r.chars(DESCRIPTION_LEN)
    (atomtype,) = r.chars(TYPE_LEN)
    nenv = r.int()
    envtypes = tuple(r.chars(TYPE_LEN, nenv))
    rc_min, rc_max = r.real(), r.real()
    (sftype,) = r.chars(SFTYPE_LEN)
    nsf, nsfparam = r.int(), r.int()
    sf = r.ints(nsf)
    sfparam = r.reals(nsfparam * nsf).reshape(nsf, nsfparam).T.copy()
    sfenv = r.ints(NENV_MAX * nsf).reshape(nsf, NENV_MAX).T.copy()
    neval = r.int()
    sfval_min, sfval_max, sfval_avg, sfval_cov = (r.reals(nsf) for _ in range(4))
    (train_file,) = r.chars(PATH_LEN)
    normalized = r.logical()
    scale, shift = r.real(), r.real()
    ntypes = r.int()
    type_names = tuple(r.chars(TYPE_LEN, ntypes))
    e_atom = r.reals(ntypes)
    num_atoms_total, num_structures = r.int(), r.int()
    e_min, e_max, e_avg = (float(v) for v in r.reals(3))
    nn = NNFile(
        nnodes=nnodes, activations=activations, iw=iw, iv=iv, W=W, nnodes_max=nnodes_max, Wsize=Wsize, nvalues=nvalues,
        description=description, atomtype=atomtype, envtypes=envtypes, rc_min=rc_min, rc_max=rc_max, sftype=sftype,
        sf=sf, sfparam=sfparam, sfenv=sfenv, neval=neval, sfval_min=sfval_min, sfval_max=sfval_max,
        sfval_avg=sfval_avg, sfval_cov=sfval_cov, train_file=train_file, normalized=normalized, scale=scale,
        shift=shift, type_names=type_names, e_atom=e_atom, num_atoms_total=num_atoms_total,
        num_structures=num_structures, e_min=e_min, e_max=e_max, e_avg=e_avg,
    )
    _check_nn(nn, str(path))
    return nn


# --------------------------------------------------------------------------------------------
# conversion to and from the model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSetInfo:
    """Training-set records of a ``.nn`` file (27-36) other than scale/shift (taken from the net).

    Attributes:
        type_names: all species of the training set, aenet TYPES order.
        atomic_energies: reference energy per type, eV (same order).
        train_file: name of the training-set file (kept for the record).
        normalized: whether energies were normalized (aenet writes .true.).
        num_atoms_total, num_structures: training-set size.
        e_min, e_max, e_avg: per-atom energy range and mean, eV/atom.
    """

    type_names: tuple[str, ...]
    atomic_energies: tuple[float, ...]
    train_file: str = ""
    normalized: bool = True
    num_atoms_total: int = 0
    num_structures: int = 0
    e_min: float = 0.0
    e_max: float = 0.0
    e_avg: float = 0.0

    def __post_init__(self):
        if len(self.type_names) != len(self.atomic_energies):
            raise ValueError(f"type_names {self.type_names} and atomic_energies {self.atomic_energies} differ in length")

    @classmethod
    def from_nn(cls, nn: NNFile) -> "TrainSetInfo":
        return cls(tuple(nn.type_names), tuple(float(e) for e in nn.e_atom), nn.train_file, nn.normalized,
                   nn.num_atoms_total, nn.num_structures, nn.e_min, nn.e_max, nn.e_avg)


def setup_from_nn(nn: NNFile, source: str = "") -> DescriptorSetup:
    """The :class:`DescriptorSetup` recorded in a ``.nn`` file (Chebyshev or Behler2011)."""
    where = source or nn.atomtype
    sftype = nn.sftype.strip().lower()
    if sftype not in ("chebyshev", "behler2011"):
        raise ValueError(f"{where}: descriptor type {nn.sftype!r} is not supported (Chebyshev or Behler2011)")
    if nn.nsfparam < 4:
        raise ValueError(f"{where}: a {nn.sftype.strip()} setup needs nsfparam >= 4, got {nn.nsfparam}")
    if sftype == "behler2011":
        basis, basis_type = _behler_from_nn(nn, where), "behler2011"
    else:
        rr, nr, ra, na = (float(v) for v in nn.sfparam[:4, 0])
        basis, basis_type = ChebyshevBasis(rr, int(round(nr)), ra, int(round(na))), "chebyshev"  # aenet: nint(sfparam(2,1))
    try:
        setup = DescriptorSetup(element=nn.atomtype, env_species=tuple(nn.envtypes), basis_type=basis_type, basis=basis,
                                rmin=nn.rc_min, description=nn.description, source=source)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if setup.num_features != nn.nsf:
        raise ValueError(f"{where}: nsf = {nn.nsf} but the {nn.sftype.strip()} setup gives {setup.num_features} features")
    return setup


def _behler_from_nn(nn: NNFile, where: str) -> BehlerBasis:
    """Behler2011 functions from a ``.nn`` file's sf (kind), sfparam and sfenv (1-based ENV positions)."""
    functions = []
    for n in range(nn.nsf):
        kind = int(nn.sf[n])
        if kind not in BEHLER_PARAMETERS:
            raise ValueError(f"{where}: symmetry function {n + 1} has kind G={kind} (aenet has G=1..5)")
        env = []
        for slot in range(2 if kind >= 4 else 1):
            position = int(nn.sfenv[slot, n])
            if not 1 <= position <= len(nn.envtypes):
                raise ValueError(f"{where}: symmetry function {n + 1} names ENV species number {position}, "
                                 f"but the file lists {len(nn.envtypes)}")
            env.append(nn.envtypes[position - 1])
        try:
            functions.append(BehlerFunction.from_sfparam(kind, env[0], env[1] if kind >= 4 else "", nn.sfparam[:4, n]))
        except ValueError as err:
            raise ValueError(f"{where}: symmetry function {n + 1}: {err}") from None
    return BehlerBasis(tuple(functions))


def element_net_from_nn(nn: NNFile, dtype: torch.dtype = torch.float64, source: str = "") -> ElementNet:
    """Build the :class:`ElementNet` (weights, normalization, energy scaling) of a ``.nn`` file."""
    where = source or nn.atomtype
    codes = [int(c) for c in nn.activations]
    if int(nn.nnodes[-1]) != 1:
        raise ValueError(f"{where}: output layer has {int(nn.nnodes[-1])} nodes, an atomic-energy network has 1")
    names = [activation_name(c) for c in codes]
    config = NetworkConfig(hidden=tuple(int(n) for n in nn.nnodes[1:-1]), activations=tuple(names[:-1]),
                           output_activation=names[-1])
    net = ElementNet(int(nn.nnodes[0]), config, nn.atomtype, dtype=dtype)
    with torch.no_grad():
        for layer_idx, layer in enumerate(net.layers):
            w, b = nn.layer_weights(layer_idx)
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
    net.set_feature_stats(nn.sfval_min, nn.sfval_max, nn.sfval_avg, nn.sfval_cov, nn.neval)
    if nn.atomtype not in nn.type_names:
        raise ValueError(f"{where}: atomtype {nn.atomtype!r} is not among the training-set types {list(nn.type_names)}")
    net.set_energy_scaling(nn.scale, nn.shift, nn.e_atom_of(nn.atomtype))
    return net


def _as_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().copy()


def nn_from_element_net(net: ElementNet, setup: DescriptorSetup, train_info: TrainSetInfo) -> NNFile:
    """The ``.nn`` file content for ``net`` with descriptor ``setup`` and training-set ``train_info``.

    Chebyshev setups are written as aenet does (``read_basis_chebyshev``): sfparam(1:4, 1) =
    (Rr, Nr, Ra, Na), everything else 0; sf and sfenv all 0. Behler2011 setups as
    ``read_symmfunc_Behler2011``: per function (file order) its kind, four parameters and the
    1-based ENV positions of type2/type3. Scale and shift come from the net.
    """
    if setup.element != net.element:
        raise ValueError(f"setup is for {setup.element!r} but the network is for {net.element!r}")
    if setup.num_features != net.num_features:
        raise ValueError(f"{setup.element}: setup has {setup.num_features} features, network {net.num_features}")
    if setup.element not in train_info.type_names:
        raise ValueError(f"{setup.element!r} is not among the training-set types {list(train_info.type_names)}")
    e_ref = train_info.atomic_energies[train_info.type_names.index(setup.element)]
    e_net = float(net.e_atom)
    if abs(e_net - e_ref) > 1e-6 * max(1.0, abs(e_ref)):
        raise ValueError(f"{setup.element}: network's atomic energy {e_net} differs from the training set's {e_ref}")
    nnodes = np.array([net.num_features, *net.config.hidden, 1], dtype=np.int32)
    nnodes_max, Wsize, nvalues, iw, iv = network_layout(nnodes)
    W = np.concatenate([
        np.concatenate([_as_f64(layer.weight), _as_f64(layer.bias)[:, None]], axis=1).ravel(order="F")
        for layer in net.layers])
    nsf = setup.num_features
    sfparam = np.zeros((NSFPARAM, nsf))
    sf = np.zeros(nsf, dtype=np.int32)
    sfenv = np.zeros((NENV_MAX, nsf), dtype=np.int32)
    b = setup.basis
    if setup.basis_type == "behler2011":  # read_symmfunc_Behler2011: functions in file order, ENV positions 1-based
        for n, f in enumerate(b.functions):
            sf[n] = f.kind
            sfparam[:, n] = f.sfparam
            sfenv[0, n] = setup.env_species.index(f.type2) + 1
            sfenv[1, n] = setup.env_species.index(f.type3) + 1 if f.angular else 0
    else:
        sfparam[:, 0] = (b.radial_cutoff, b.radial_order, b.angular_cutoff, b.angular_order)
    description = setup.description.encode("latin-1", "replace")[:DESCRIPTION_LEN].decode("latin-1")
    return NNFile(
        nnodes=nnodes, activations=np.array(net.config.activation_codes, dtype=np.int32), iw=iw, iv=iv, W=W,
        nnodes_max=nnodes_max, Wsize=Wsize, nvalues=nvalues,
        description=description, atomtype=setup.element, envtypes=tuple(setup.env_species),
        rc_min=float(setup.rmin), rc_max=float(b.max_cutoff), sftype="Behler2011" if setup.basis_type == "behler2011" else "Chebyshev",
        sf=sf, sfparam=sfparam, sfenv=sfenv,
        neval=int(net.neval), sfval_min=_as_f64(net.sfval_min), sfval_max=_as_f64(net.sfval_max),
        sfval_avg=_as_f64(net.sfval_avg), sfval_cov=_as_f64(net.sfval_cov),
        train_file=train_info.train_file, normalized=bool(train_info.normalized),
        scale=float(net.scale), shift=float(net.shift), type_names=tuple(train_info.type_names),
        e_atom=np.array(train_info.atomic_energies, dtype=np.float64), num_atoms_total=int(train_info.num_atoms_total),
        num_structures=int(train_info.num_structures), e_min=float(train_info.e_min), e_max=float(train_info.e_max),
        e_avg=float(train_info.e_avg),
    )


def resolve_checkpoint(run_dir: str | os.PathLike, checkpoint: str = "best") -> Path:
    """``best`` -> run_dir/checkpoints/best.pt, ``latest`` -> the newest checkpoint_NNNNNN.pt, else a path."""
    from .checkpoint import Checkpointer

    run_dir = Path(run_dir)
    if checkpoint == "best":
        path = run_dir / "checkpoints" / "best.pt"
    elif checkpoint == "latest":
        path = Checkpointer(run_dir).latest()
        if path is None:
            raise ValueError(f"{run_dir}: no checkpoint_NNNNNN.pt in {run_dir / 'checkpoints'} (was the run trained?)")
    else:
        path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"{path}: checkpoint not found (run directory {run_dir})")
    return path


def load_run_model(checkpoint_path: str | os.PathLike, store: str | os.PathLike | None = None):
    """The trained model of a checkpoint in float64, with the facts of its store and its config.

    Checkpoints carry their store's facts (setups, feature counts, float64 statistics, energy
    records: ``StoreReader.facts``), so the store is not needed; checkpoints from before that
    take them from the store (``store``, default the path in the checkpoint's config).

    The networks' normalization and energy scaling are the float64 statistics whenever the
    checkpoint's buffers agree with them to float32 precision (so a float32 run exports the
    exact statistics, not float32-rounded ones); otherwise (weights fine-tuned with another
    store's normalization) the checkpoint's own buffers are kept.

    Returns:
        (model (AtomicModel, float64, eval mode), store facts (dict), TrainConfig).
    Raises:
        ValueError: unreadable checkpoint; an older checkpoint whose store is gone (with the path
            it was looked for at) or whose store's fingerprint differs.
    """
    from . import checkpoint as ckpt
    from .config import TrainConfig

    checkpoint_path = Path(checkpoint_path)
    state = ckpt.load(checkpoint_path)
    if "config" not in state or "model" not in state:
        raise ValueError(f"{checkpoint_path}: not an aenet_dist training checkpoint (no 'config'/'model')")
    config = TrainConfig.from_dict(state["config"], source=str(checkpoint_path))
    facts = state.get("store_facts")
    if facts is None:  # a checkpoint from before store facts: read them from the store
        from .store import StoreReader

        store_path = Path(store) if store is not None else Path(config.data.store)
        if not (store_path / "zarr.json").exists():
            raise ValueError(
                f"{checkpoint_path}: the feature store it was trained on, {store_path}, is gone; its descriptor setups and "
                f"training-set records are needed for the .nn files. Pass the store's current path with --store")
        reader = StoreReader(store_path)
        if state.get("store_fingerprint") not in (None, reader.fingerprint):
            raise ValueError(f"{checkpoint_path}: trained on a store with fingerprint {str(state['store_fingerprint'])[:12]}, "
                             f"but {store_path} has {reader.fingerprint[:12]} (a different store)")
        facts = reader.facts()
    model = model_from_facts(facts, config.model.network_for, torch.float64)
    exact = {k: v.clone() for k, v in model.state_dict().items()}
    mismatch = ckpt.weights_mismatch(model.state_dict(), state["model"])
    if mismatch:
        raise ValueError(f"{checkpoint_path}: weights do not fit the model of its config and store ({mismatch})")
    model.load_state_dict(state["model"])
    with torch.no_grad():
        for el, net in model.nets.items():
            names = ("sfval_min", "sfval_max", "sfval_avg", "sfval_cov", "scale", "shift", "e_atom")
            same = all(torch.allclose(getattr(net, n), exact[f"nets.{el}.{n}"], rtol=1e-6, atol=1e-30) for n in names)
            if same:
                net.set_feature_stats(*(exact[f"nets.{el}.{n}"] for n in names[:4]), int(net.neval))
                net.set_energy_scaling(*(float(exact[f"nets.{el}.{n}"]) for n in names[4:]))
    return model.eval(), facts, config


def train_set_info(facts: dict) -> TrainSetInfo:
    """The ``.nn`` training-set records of a store's facts: types, E_atom, sizes, cohesive energy per atom range."""
    energy = facts["energy_per_atom"]
    return TrainSetInfo(
        type_names=tuple(facts["species"]),
        atomic_energies=tuple(float(facts["atomic_energies"][el]) for el in facts["species"]),
        train_file=str(facts["store_path"])[:PATH_LEN],
        normalized=True,
        num_atoms_total=int(facts["num_atoms"]),
        num_structures=int(facts["num_structures"]),
        e_min=float(energy["min"]), e_max=float(energy["max"]), e_avg=float(energy["mean"]),
    )


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, checkpoint: str = "best", ascii: bool = False,
               store: str | os.PathLike | None = None) -> list[Path]:
    """Write one aenet ``<El>.nn`` per element (and ``<El>.nn.ascii`` with ``ascii``) from a training run.

    Args:
        run_dir: the run directory of ``aenet-dist train``.
        out_dir: where to write (created if needed).
        checkpoint: ``best``, ``latest`` or a checkpoint path.
        ascii: also write the ASCII form (aenet-PyTorch's ``nnASCII2bin`` input).
        store: the feature store, if it moved since training.
    Returns:
        The written paths, binary files first.
    """
    from .config import DescriptorSetup as _Setup

    path = resolve_checkpoint(run_dir, checkpoint)
    model, facts, _ = load_run_model(path, store)
    untrained = [el for el in facts["species"] if int(facts["stats"][el]["count"]) == 0]
    if untrained:
        raise ValueError(f"{facts['store_path']}: no atoms of {', '.join(untrained)} in the store, so its network was never trained "
                         "and a .nn file for it would be random weights; featurize structures with it, or leave it out of TYPES")
    info = train_set_info(facts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {el: nn_from_element_net(model.nets[el], _Setup.from_dict(facts["setups"][el]), info) for el in facts["species"]}
    written = []
    for el, nn in files.items():
        write_nn(out_dir / f"{el}.nn", nn)
        written.append(out_dir / f"{el}.nn")
    if ascii:
        for el, nn in files.items():
            write_nn_ascii(out_dir / f"{el}.nn.ascii", nn)
            written.append(out_dir / f"{el}.nn.ascii")
    return written


def main(argv: list[str] | None = None) -> int:
    """``aenet-dist export RUN_DIR --out DIR [--checkpoint best|latest|PATH] [--ascii] [--store PATH]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="aenet-dist export",
                                     description="Write aenet .nn potential files (one per element) from a training run.")
    parser.add_argument("run_dir", help="run directory of aenet-dist train (holds checkpoints/)")
    parser.add_argument("--out", required=True, help="output directory for <El>.nn")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a checkpoint file")
    parser.add_argument("--ascii", action="store_true", help="also write <El>.nn.ascii (aenet-PyTorch's ASCII form)")
    parser.add_argument("--store", help="the feature store, if it is no longer where the run's config says")
    args = parser.parse_args(argv)
    try:
        for path in export_run(args.run_dir, args.out, args.checkpoint, args.ascii, args.store):
            print(path)
        return 0
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import sys

    sys.exit(main())
