"""Typed, frozen configuration for every stage (featurize now; train, export later).

Descriptor setups mirror aenet's ``.stp`` files; :class:`FeaturizeConfig` mirrors
aenet's ``generate.in``. Parsers for those formats live in :mod:`aenet_dist.formats`.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

import tomli_w

from .files import atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomllib is tomli, adopted into the standard library in 3.11 (a dependency on 3.10)
    import tomli as tomllib

if typing.TYPE_CHECKING:
    from aenet_dist.model import NetworkConfig


@dataclass(frozen=True)
class ChebyshevBasis:
    """aenet's Chebyshev basis (Artrith, Urban, Ceder, PRB 96, 014112 (2017)).

    ``radial_order``/``angular_order`` are aenet's ``radial_N``/``angular_N``: polynomial
    orders, so there are ``radial_order + 1`` radial and ``angular_order + 1`` angular
    functions per species channel.
    """

    radial_cutoff: float
    radial_order: int
    angular_cutoff: float
    angular_order: int

    def __post_init__(self):
        if not self.radial_cutoff > 0 or not self.angular_cutoff > 0:
            raise ValueError(f"cutoffs must be positive, got radial_Rc={self.radial_cutoff}, angular_Rc={self.angular_cutoff}")
        if self.radial_order < 0 or self.angular_order < 0:
            raise ValueError(f"orders must be >= 0, got radial_N={self.radial_order}, angular_N={self.angular_order}")

    @property
    def max_cutoff(self) -> float:
        return max(self.radial_cutoff, self.angular_cutoff)


# aenet's parameter names per Behler2011 function kind (sfsetup.f90: read_symmfunc_Behler2011).
BEHLER_PARAMETERS = {1: ("Rc",), 2: ("Rc", "Rs", "eta"), 3: ("Rc", "kappa"),
                     4: ("Rc", "lambda", "zeta", "eta"), 5: ("Rc", "lambda", "zeta", "eta")}


@dataclass(frozen=True)
class BehlerFunction:
    """One of Behler's atom-centred symmetry functions (J. Chem. Phys. 134, 074106 (2011)).

    ``kind`` 1-3 are radial (neighbour species ``type2``), 4 and 5 angular (neighbour pair
    ``type2``/``type3``). Parameters a kind does not use are 0, as in aenet's ``sfparam``.
    """

    kind: int
    type2: str
    type3: str = ""
    cutoff: float = 0.0
    rs: float = 0.0
    eta: float = 0.0
    kappa: float = 0.0
    lam: float = 0.0
    zeta: float = 0.0

    def __post_init__(self):
        if self.kind not in BEHLER_PARAMETERS:
            raise ValueError(f"symmetry function G={self.kind} does not exist (aenet has G=1..5)")
        if not self.cutoff > 0:
            raise ValueError(f"G={self.kind}: cutoff Rc must be positive, got {self.cutoff}")
        if self.angular and not self.type3:
            raise ValueError(f"G={self.kind} is angular and needs type3")
        if self.angular and self.lam not in (-1.0, 1.0):
            raise ValueError(f"G={self.kind}: lambda must be +1 or -1, got {self.lam}")
        if self.angular and not self.zeta >= 1.0:
            raise ValueError(f"G={self.kind}: zeta must be >= 1 (the angular term (1 + lambda cos)^zeta), got {self.zeta}")
        if self.eta < 0:
            raise ValueError(f"G={self.kind}: eta must be >= 0, got {self.eta}")

    @property
    def angular(self) -> bool:
        return self.kind >= 4

    @property
    def sfparam(self) -> tuple[float, float, float, float]:
        """aenet's four ``sfparam`` values of this function, in its order."""
        values = {1: (self.cutoff,), 2: (self.cutoff, self.rs, self.eta), 3: (self.cutoff, self.kappa),
                  4: (self.cutoff, self.lam, self.zeta, self.eta), 5: (self.cutoff, self.lam, self.zeta, self.eta)}[self.kind]
        return tuple(values) + (0.0,) * (4 - len(values))

    @classmethod
    def from_sfparam(cls, kind: int, type2: str, type3: str, p) -> "BehlerFunction":
        """Inverse of :attr:`sfparam`."""
        p = [float(v) for v in p]
        if kind == 1:
            return cls(kind, type2, cutoff=p[0])
        if kind == 2:
            return cls(kind, type2, cutoff=p[0], rs=p[1], eta=p[2])
        if kind == 3:
            return cls(kind, type2, cutoff=p[0], kappa=p[1])
        return cls(kind, type2, type3, cutoff=p[0], lam=p[1], zeta=p[2], eta=p[3])


@dataclass(frozen=True)
class BehlerBasis:
    """A list of Behler2011 symmetry functions, in the order of the ``.stp`` file."""

    functions: tuple[BehlerFunction, ...]

    def __post_init__(self):
        if not self.functions:
            raise ValueError("a Behler2011 setup needs at least one symmetry function")

    @property
    def max_cutoff(self) -> float:
        return max(f.cutoff for f in self.functions)


@dataclass(frozen=True)
class DescriptorSetup:
    """One aenet ``.stp`` descriptor setup: the central species, its environment species and basis.

    ``basis_type`` is the explicit switch between descriptor families: ``"chebyshev"``
    (:class:`ChebyshevBasis`) or ``"behler2011"`` (:class:`BehlerBasis`).
    """

    element: str
    env_species: tuple[str, ...]
    basis_type: str
    basis: ChebyshevBasis | BehlerBasis
    rmin: float = 0.0
    description: str = ""
    source: str = ""

    def __post_init__(self):
        where = self.source or self.element
        expected = {"chebyshev": ChebyshevBasis, "behler2011": BehlerBasis}
        if self.basis_type not in expected:
            raise ValueError(f"{where}: descriptor basis {self.basis_type!r} is not supported (Chebyshev or Behler2011)")
        if not isinstance(self.basis, expected[self.basis_type]):
            raise ValueError(f"{where}: basis_type {self.basis_type!r} needs a {expected[self.basis_type].__name__}")
        if len(set(self.env_species)) != len(self.env_species):
            raise ValueError(f"{where}: ENV species repeated: {self.env_species}")
        if self.basis_type == "chebyshev":
            if self.rmin < 0 or self.rmin >= min(self.basis.radial_cutoff, self.basis.angular_cutoff):
                raise ValueError(f"{where}: RMIN {self.rmin:g} Å must be >= 0 and below both cutoffs "
                                 f"(radial_Rc {self.basis.radial_cutoff:g}, angular_Rc {self.basis.angular_cutoff:g} Å)")
            return
        if self.rmin < 0 or self.rmin >= self.basis.max_cutoff:
            raise ValueError(f"{where}: RMIN {self.rmin:g} Å must be >= 0 and below the largest cutoff {self.basis.max_cutoff:g} Å")
        if self.element not in self.env_species:
            # aenet looks the centre up in its own ENV list (stp%ltype); without it generate.x reads out of bounds.
            raise ValueError(f"{where}: the central species {self.element} must be listed in ENV for Behler2011 functions")
        for n, f in enumerate(self.basis.functions, start=1):
            for name in (f.type2, f.type3) if f.angular else (f.type2,):
                if name not in self.env_species:
                    raise ValueError(f"{where}: symmetry function {n} (G={f.kind}) names species {name!r}, "
                                     f"which is not in ENV {list(self.env_species)}")

    @property
    def num_features(self) -> int:
        """aenet's nsf: (Nr+1 + Na+1), doubled with more than one ENV species; or the number of functions."""
        if self.basis_type == "behler2011":
            return len(self.basis.functions)
        per_channel = self.basis.radial_order + 1 + self.basis.angular_order + 1
        return per_channel * (2 if len(self.env_species) > 1 else 1)

    def typespin(self) -> dict[str, int]:
        """aenet's species weights: -m//2 .. m//2 in ENV order, 0 skipped when m is even."""
        m = len(self.env_species)
        spins = [s for s in range(-(m // 2), m // 2 + 1) if not (m % 2 == 0 and s == 0)]
        return dict(zip(self.env_species, spins))

    def to_dict(self) -> dict:
        d = {"element": self.element, "env_species": list(self.env_species), "basis_type": self.basis_type}
        if self.basis_type == "behler2011":
            d["functions"] = [{"G": f.kind, "type2": f.type2, "type3": f.type3, "sfparam": list(f.sfparam)}
                              for f in self.basis.functions]
        else:
            b = self.basis
            d.update(radial_cutoff=b.radial_cutoff, radial_order=b.radial_order,
                     angular_cutoff=b.angular_cutoff, angular_order=b.angular_order)
        return d | {"rmin": self.rmin, "description": self.description}

    @classmethod
    def from_dict(cls, d: dict) -> "DescriptorSetup":
        if d["basis_type"] == "behler2011":
            basis = BehlerBasis(tuple(BehlerFunction.from_sfparam(int(f["G"]), f["type2"], f["type3"], f["sfparam"])
                                      for f in d["functions"]))
        else:
            basis = ChebyshevBasis(d["radial_cutoff"], int(d["radial_order"]), d["angular_cutoff"], int(d["angular_order"]))
        return cls(
            element=d["element"],
            env_species=tuple(d["env_species"]),
            basis_type=d["basis_type"],
            basis=basis,
            rmin=d.get("rmin", 0.0),
            description=d.get("description", ""),
        )



@dataclass(frozen=True)
class FeaturizeConfig:
    """What aenet's ``generate.in`` says, plus our own options.

    Attributes:
        species: element symbols in TYPES order (aenet's global type order).
        atomic_energies: reference energy per element, eV.
        setups: descriptor setup per element.
        files: structure files, absolute paths, in FILES order.
        output: aenet's OUTPUT name (kept for the record; our output is the Zarr store).
        forces: whether to compute derivatives at all (aenet keyword ``FORCES``).
        force_percent: percentage of structures that get derivatives (aenet ``FORCESPERCENT``).
        force_seed: seed of the deterministic choice of force structures.
        force_structures: explicit list of structure files (basenames or paths) that get
            derivatives; overrides ``force_percent`` when given.
        source: path of the generate.in this came from.
    """

    species: tuple[str, ...]
    atomic_energies: dict[str, float]
    setups: dict[str, DescriptorSetup]
    files: tuple[str, ...]
    output: str = ""
    forces: bool = False
    force_percent: float = 1.0
    force_seed: int = 0
    force_structures: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self):
        where = self.source or "generate.in"
        missing = [s for s in self.species if s not in self.setups]
        if missing:
            raise ValueError(f"{where}: no SETUPS entry for species {missing}")
        for element, setup in self.setups.items():
            if element not in self.species:
                raise ValueError(f"{where}: setup for {element!r} ({setup.source}) but {element!r} is not in TYPES {list(self.species)}")
            if setup.element != element:
                raise ValueError(f"{setup.source}: ATOM {setup.element!r} but SETUPS lists this file for {element!r}")
            unknown = [e for e in setup.env_species if e not in self.species]
            if unknown:
                raise ValueError(f"{setup.source}: ENV species {unknown} not in TYPES {list(self.species)}")
        if not 0.0 <= self.force_percent <= 100.0:
            raise ValueError(f"{where}: FORCESPERCENT must be within [0, 100], got {self.force_percent}")
        if not self.files:
            raise ValueError(f"{where}: FILES lists no structures")


# zstd's levels (negative: faster, 0: its default 3; ZSTD_minCLevel is -131072); Blosc's clevel (0 would store uncompressed)
COMPRESSION_LEVELS = {"zstd": (-131072, 22), "lz4": (1, 9)}


@dataclass(frozen=True)
class StoreOptions:
    """How featurize writes the Zarr store."""

    chunk_bytes: int = 32 * 2**20
    """Target uncompressed bytes per block of structures (descriptors + derivatives)."""
    deriv_dtype: str = "float64"
    """Storage dtype of dG/dR rows: float64 (exact) or float32 (half the disk)."""
    compressor_level: int = 1
    """zstd level for all arrays (1: twice the speed of 3 for 5% more disk on float64 derivatives)."""
    compressor: str = "zstd"
    """Codec of every array: ``zstd`` (smallest; each chunk carries zstd's content checksum),
    ``lz4`` (Blosc LZ4 with byte shuffle, faster to decode) or ``none``; the last two carry a
    CRC32C per chunk, so damage is detected whatever the codec."""

    def __post_init__(self):
        if self.compressor not in ("zstd", "lz4", "none"):
            raise ValueError(f"compressor must be 'zstd', 'lz4' or 'none', got {self.compressor!r}")
        if self.chunk_bytes < 2**16:
            raise ValueError(f"chunk_bytes must be at least 65536, got {self.chunk_bytes}")
        if self.deriv_dtype not in ("float32", "float64"):
            raise ValueError(f"deriv_dtype must be 'float32' or 'float64', got {self.deriv_dtype!r}")
        # The codecs clamp a level out of range (zstd to 22) without a word: refuse it instead.
        low, high = COMPRESSION_LEVELS.get(self.compressor, (self.compressor_level, self.compressor_level))
        if not isinstance(self.compressor_level, int) or not low <= self.compressor_level <= high:
            raise ValueError(f"compression level (--compression-level) of {self.compressor} must be an integer in "
                             f"[{low}, {high}], got {self.compressor_level!r}")


# =========================================================================== training
#
# train.toml has one table per section below ([data] [model] [optim] [schedule] [loss]
# [run], plus [model.networks.<element>] tables). Every dataclass checks and normalizes its
# own fields in __post_init__ (ints given for floats become floats, lists become tuples),
# so a config built in Python is as safe as one read from a file.

_log = logging.getLogger("aenet_dist.config")  # = log.get_logger("config"); log.py sits below config.py

CACHE_MODES = ("auto", "memory", "gpu", "pinned", "stream")
# torch.optim's first-order optimizers by their lower-case names (aenet-PyTorch takes any by name;
# the paper's best TiO2 fits used adagrad, adamw and adamax).
OPTIM_METHODS = ("adam", "adamw", "sgd", "adagrad", "adamax", "nadam", "radam", "rmsprop", "adadelta", "asgd", "rprop")
SCHEDULE_KINDS = ("none", "cosine", "step", "plateau")
DTYPES = ("float32", "float64")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


@functools.cache
def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _describe(value) -> str:
    """``value`` with its type, for error messages; flags quoted numbers."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return f"string {value!r}"
        return f"string {value!r} (a quoted number: drop the quotes)"
    return f"{type(value).__name__} {value!r}"


def _coerce(value, hint, key: str):
    """Check ``value`` against the type ``hint`` and return it normalized; ValueError names ``key``.

    int -> float for float fields, integral float -> int for int fields, list -> tuple.
    bool is never accepted as a number, nor a string as a number.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {_describe(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {_describe(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {_describe(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values, got {len(value)}: {list(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"internal: no coercion for {hint!r} ({key})")


def _coerce_fields(obj, section: str, skip: tuple[str, ...] = ()) -> None:
    """Coerce every field of the frozen dataclass ``obj`` in place (named ``section.field`` in errors)."""
    hints = _hints(type(obj))
    for f in fields(obj):
        if f.name not in skip:
            object.__setattr__(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}"))


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    same_case = [c for c in candidates if c.lower() == word.lower()]
    close = same_case or difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}{did_you_mean(value, choices)}")


@dataclass(frozen=True)
class DataConfig:
    """Where the featurized data lives, how it is split and where it is cached ([data])."""

    store: str
    """Path of the Zarr store written by ``aenet-dist featurize``. In a TOML file a relative path
    is resolved against the file's directory (aenet ``TRAININGSET``)."""
    test_percent: float = 10.0
    """Percentage of structures held out as the test set, 0 <= x < 100 (aenet ``TESTPERCENT``)."""
    split_seed: int = 0
    """Seed of the deterministic train/test split."""
    cache: str = "auto"
    """Where training data is kept: ``memory`` (host RAM), ``gpu`` (device memory), ``pinned``
    (page-locked host RAM, asynchronous copies), ``stream`` (blocks read from the store each epoch)
    or ``auto`` (the fastest that fits)."""
    num_shards: int | None = None
    """Number of data shards; None = the world size. Set it to an earlier run's world size to
    reproduce that run on fewer ranks (each rank then takes several virtual shards)."""
    shuffle_window_blocks: int = 8
    """Store blocks shuffled together: each epoch permutes a shard's blocks, then the structures
    within each window of this many blocks. A step draws from one or two windows, so this bounds
    the blocks the ``stream`` cache must hold at once."""
    memory_budget_gb: float | None = None
    """Host memory (GiB per rank) the data may take. ``stream`` keeps its test set, queued
    batches and blocks read ahead within it, and ``auto`` streams when the shard does not fit
    in it. None = half of the host memory available at start, shared by the node's ranks.
    Python, torch and the model take about 0.25 GiB more per rank."""
    readers: int | None = None
    """Threads per rank that read and convert store blocks (loading, and ``stream`` read-ahead).
    None = auto: 2 for the one read of ``memory``/``pinned`` (nothing else runs yet); for
    ``stream``, one per core the rank has beyond its training thread, 1 or 2 (on 2 cores and one
    rank, 2 readers made epochs 12 % slower than 1: they took the training thread's core).
    Decoding releases the GIL, converting partly does not: on an H100 node 8 readers (and
    parallel gathers) slowed the training thread's kernel launches more than they sped up reading."""
    workers: int = 0
    """Worker processes per rank that read and convert store blocks (each block decoded, cast and
    laid out in a worker, handed to the rank through shared memory), instead of ``data.readers``
    threads of the rank: the training thread then no longer shares the interpreter with that
    work. Worth it where the rank's threads are GIL-bound (many cores per rank feeding a GPU);
    on a 2-core CPU node it was slower (bench/RESULTS.md), so 0 (threads) is the default. Each
    worker adds its own Python and torch (~0.2 GiB) outside ``data.memory_budget_gb``."""
    dense_buckets: str = "auto"
    """Pad dense derivative blocks to size buckets (sizes within ~1.2x share one batched product):
    ``on``, ``off`` or ``auto`` (on for a CUDA device, where each product is a kernel launch; off
    on the CPU, where the padding costs more time than the fewer calls save). Results agree to
    rounding; every cache mode and rank count buckets alike."""
    batches: str = "reshuffle"
    """How structures are grouped into steps: ``reshuffle`` draws new batches every epoch (a seeded
    permutation); ``fixed`` groups them once (the first epoch's batches), gathers those once and
    keeps them, and each later epoch takes them in a new seeded order, as aenet-PyTorch does (it
    forms its batches once). With ``fixed`` nothing is gathered during training: no gathering
    thread shares the cores or the interpreter with the steps (TiO2, one CPU core: 21-28 % shorter
    epochs), and on a GPU the batches stay on the device. The kept batches replace the cache (the
    data are held once). With ``stream`` they are kept on disk instead: written once to an
    unnamed file per rank in ``data.batch_dir`` (as large as the rank's training and test data
    in ``run.dtype``; its space is freed when the process ends, however it ends), and each epoch
    reads them back in its order, with no decompression, conversion or gathering (aenet-PyTorch's
    ``memory_mode = disk``)."""
    batch_dir: str | None = None
    """Where ``data.batches='fixed'`` with ``stream`` writes its batch files (unnamed, one per rank:
    nothing appears in the folder, but its file system's free space shrinks): None = the run
    directory. On a cluster, node-local scratch (``$TMPDIR``, NVMe) is faster than a shared file
    system; ``$VARIABLES`` and ``~`` are expanded, and in a TOML file a relative path is resolved
    against the file's directory."""
    force_percent: float = 100.0
    """Percentage of the training set's force structures (those the store has derivatives for)
    whose forces enter the loss: a seeded subset, nested (the 10 % subset lies inside the 20 % one),
    so one store featurized with all forces serves every fraction (the aenet-PyTorch paper's
    Figs. 3 and 5). Energies of all training structures are always used; test metrics use every
    test structure. The other structures' derivative rows are dropped when the data are read."""

    def __post_init__(self):
        _coerce_fields(self, "data")
        if not self.store:
            raise ValueError("data.store must name the Zarr store, got an empty string")
        if not 0.0 <= self.test_percent < 100.0:
            raise ValueError(f"data.test_percent must be in [0, 100), got {self.test_percent}")
        if self.split_seed < 0:
            raise ValueError(f"data.split_seed must be >= 0, got {self.split_seed}")
        _check_choice(self.dense_buckets, ("auto", "on", "off"), "data.dense_buckets")
        if not 0.0 <= self.force_percent <= 100.0:
            raise ValueError(f"data.force_percent must be in [0, 100], got {self.force_percent}")
        _check_choice(self.cache, CACHE_MODES, "data.cache")
        _check_choice(self.batches, ("reshuffle", "fixed"), "data.batches")
        if self.batch_dir is not None and "$" in self.batch_dir:  # expanded where the config is read
            raise ValueError(f"data.batch_dir={self.batch_dir!r} names an environment variable that is not set")
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"data.num_shards must be >= 1 (or unset = world size), got {self.num_shards}")
        if self.shuffle_window_blocks < 1:
            raise ValueError(f"data.shuffle_window_blocks must be >= 1, got {self.shuffle_window_blocks}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"data.memory_budget_gb must be > 0 GiB (or unset), got {self.memory_budget_gb}")
        if self.readers is not None and self.readers < 1:
            raise ValueError(f"data.readers must be >= 1 (or unset = auto), got {self.readers}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")


_NETWORK_KEYS = ("hidden", "activations")


def _network_config(hidden: tuple[int, ...], activations: tuple[str, ...], key: str) -> NetworkConfig:
    """:class:`~aenet_dist.model.NetworkConfig` of one architecture; errors name ``key.hidden``/``key.activations``."""
    from aenet_dist.model import NetworkConfig  # lazy: keeps torch out of the featurize-side import

    if len(hidden) != len(activations):
        raise ValueError(f"{key}.activations has {len(activations)} entries but {key}.hidden has {len(hidden)} layers; "
                         f"give one activation per hidden layer (hidden={list(hidden)}, activations={list(activations)})")
    if any(h < 1 for h in hidden):
        raise ValueError(f"{key}.hidden layer sizes must be >= 1, got {list(hidden)}")
    try:
        return NetworkConfig(hidden=hidden, activations=activations)
    except ValueError as e:  # unknown activation name (model.activation_code)
        raise ValueError(f"{key}.activations: {e}") from None


def _check_network_keys(element, spec: Mapping) -> None:
    for k in spec:
        if k not in _NETWORK_KEYS:
            key = f"model.networks.{element}"
            raise ValueError(f"unknown key '{key}.{k}'{did_you_mean(f'{key}.{k}', [f'{key}.{n}' for n in _NETWORK_KEYS])}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the per-element networks ([model], [model.networks.<element>])."""

    hidden: tuple[int, ...] = (5, 5)
    """Nodes of each hidden layer, for every element without its own entry in ``networks``."""
    activations: tuple[str, ...] = ("tanh", "tanh")
    """Activation of each hidden layer, one per entry of ``hidden``: linear, tanh, sigmoid, mtanh
    or twist (aenet's names; see :data:`aenet_dist.model.ACTIVATIONS`)."""
    networks: dict[str, dict] = field(default_factory=dict)
    """Per-element overrides, element -> {"hidden": [...], "activations": [...]} (aenet ``NETWORKS``).
    A missing key falls back to the model-wide value. Normalized to tuples."""

    def __post_init__(self):
        _coerce_fields(self, "model", skip=("networks",))
        net = _network_config(self.hidden, self.activations, "model")
        object.__setattr__(self, "activations", net.activations)  # aliases ('t') -> names
        if not isinstance(self.networks, Mapping):
            raise ValueError(f"model.networks must be a table element -> {{hidden, activations}}, got {_describe(self.networks)}")
        networks = {}
        for element, spec in self.networks.items():
            key = f"model.networks.{element}"
            if not isinstance(element, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", element):
                raise ValueError(f"model.networks keys must be element symbols, got {element!r}")
            if hasattr(spec, "hidden") and hasattr(spec, "activations"):  # a model.NetworkConfig
                spec = {"hidden": spec.hidden, "activations": spec.activations}
            if not isinstance(spec, Mapping):
                raise ValueError(f"{key} must be a table with 'hidden' and 'activations', got {_describe(spec)}")
            _check_network_keys(element, spec)
            hidden = _coerce(spec.get("hidden", self.hidden), tuple[int, ...], f"{key}.hidden")
            activations = _coerce(spec.get("activations", self.activations), tuple[str, ...], f"{key}.activations")
            net = _network_config(hidden, activations, key)
            networks[element] = {"hidden": net.hidden, "activations": net.activations}
        object.__setattr__(self, "networks", networks)

    def network_for(self, element: str) -> NetworkConfig:
        """Architecture of ``element``'s network: its ``networks`` entry, else the model-wide one."""
        spec = self.networks.get(element, {"hidden": self.hidden, "activations": self.activations})
        return _network_config(spec["hidden"], spec["activations"], f"model.networks.{element}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer ([optim]; aenet ``METHOD`` and ``REGULARIZATION``)."""

    method: str = "adamw"
    """A torch.optim first-order optimizer by name: adam, adamw, sgd, adagrad, adamax, nadam, radam,
    rmsprop, adadelta, asgd or rprop. It gets lr and, where it takes them, weight_decay, betas
    (the Adam family) and momentum (sgd only); its other parameters keep torch's defaults."""
    lr: float = 1e-4
    """Learning rate (aenet-PyTorch ``lr=``)."""
    weight_decay: float = 0.0
    """As torch applies it: decoupled for adamw, an L2 term added to the gradient for adam and sgd
    (aenet ``REGULARIZATION``). For an explicit L2 penalty in the loss see ``loss.l2``."""
    momentum: float = 0.9
    """SGD momentum (sgd only)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam(W) coefficients of the running averages of the gradient and its square."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value before each step; None = no clipping."""

    def __post_init__(self):
        _coerce_fields(self, "optim")
        _check_choice(self.method, OPTIM_METHODS, "optim.method")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must both be in [0, 1), got {list(self.betas)}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"optim.clip_grad_norm must be > 0 (or unset = no clipping), got {self.clip_grad_norm}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, stepped once per epoch ([schedule])."""

    kind: str = "none"
    """``none`` (constant), ``cosine`` (CosineAnnealingLR over run.epochs down to min_lr), ``step``
    (StepLR: times gamma every step_size epochs) or ``plateau`` (ReduceLROnPlateau on the test loss)."""
    step_size: int = 100
    """Epochs between decays (step)."""
    gamma: float = 0.5
    """Decay factor, 0 < gamma <= 1 (step)."""
    patience: int = 10
    """Epochs without improvement before a decay (plateau)."""
    factor: float = 0.5
    """Decay factor, 0 < factor < 1 (plateau)."""
    min_lr: float = 0.0
    """Lower bound of the learning rate (cosine, plateau)."""

    def __post_init__(self):
        _coerce_fields(self, "schedule")
        _check_choice(self.kind, SCHEDULE_KINDS, "schedule.kind")
        if self.step_size < 1:
            raise ValueError(f"schedule.step_size must be >= 1, got {self.step_size}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"schedule.gamma must be in (0, 1], got {self.gamma}")
        if self.patience < 0:
            raise ValueError(f"schedule.patience must be >= 0, got {self.patience}")
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"schedule.factor must be in (0, 1), got {self.factor}")
        if not self.min_lr >= 0:
            raise ValueError(f"schedule.min_lr must be >= 0, got {self.min_lr}")


@dataclass(frozen=True)
class LossConfig:
    """Energy + force loss ([loss])."""

    force_weight: float = 0.1
    """alpha in [0, 1]: loss = (1 - alpha) * energy term + alpha * force term (aenet-PyTorch
    ``FORCES`` / ``alpha=``); 0 trains energies only."""
    l2: float = 0.0
    """lambda >= 0 of an explicit penalty lambda * sum(weights**2) added to the loss (biases excluded)."""

    def __post_init__(self):
        _coerce_fields(self, "loss")
        if not 0.0 <= self.force_weight <= 1.0:
            raise ValueError(f"loss.force_weight must be in [0, 1], got {self.force_weight}")
        if not self.l2 >= 0:
            raise ValueError(f"loss.l2 must be >= 0, got {self.l2}")


@dataclass(frozen=True)
class RunConfig:
    """Length, precision, device, seeds and output of a run ([run])."""

    epochs: int = 100
    """Passes over the training set (aenet ``ITERATIONS``)."""
    batch_size: int = 128
    """Global batch, in structures, summed over all ranks (aenet ``BATCHSIZE``)."""
    dtype: str = "float32"
    """Parameter and compute dtype: ``float32`` or ``float64``."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun each rank uses
    its LOCAL_RANK device."""
    seed: int = 0
    """Seed of weight initialization and batch shuffling."""
    run_dir: str = "runs/default"
    """Output directory (checkpoints, logs, resolved config.toml). In a TOML file a relative path is
    resolved against the file's directory."""
    checkpoint_every: int | None = None
    """Save a checkpoint every this many epochs (and at the end). None (default): after the first
    epoch that ends ``checkpoint_interval_s`` or more after the last checkpoint, and at the end."""
    checkpoint_interval_s: float = 60.0
    """With ``checkpoint_every`` unset: the least time between checkpoints, in seconds (0 = every
    epoch). ``best.pt`` is written with them: an improvement in between is kept in memory until
    the next checkpoint, the end, or a stop (a signal checkpoints at once). A run killed outright
    (kill -9, a lost node) resumes from a checkpoint at most this old. Writing one took ~7.5 ms on
    a 2-vCPU box, 20 % of wall time on top of a 43 ms TiO2 epoch when written every epoch."""
    keep_last: int = 2
    """Number of most recent checkpoints kept on disk, >= 1."""
    early_stop_patience: int | None = None
    """Stop after this many evaluated epochs without test-loss improvement; None = never."""
    log_every: int = 0
    """Log the training loss every this many steps; 0 = once per epoch only."""
    eval_every: int = 1
    """Evaluate the test set every this many epochs, and at the last epoch. The epochs between
    report training errors only (their test fields are NaN), and the best checkpoint, early
    stopping and a ``plateau`` schedule count evaluated epochs only. Worth raising for ``stream``
    under a budget too small to keep the test set: each evaluation then reads the store again,
    since test structures lie in every block (synthetic 5000: 4.2 of a 9.3 s epoch)."""

    cpu_threads: int = 1
    """Intra-op threads per rank when training on the CPU; 0 = this process's cores divided by the
    ranks on the node. The networks are small: one thread per rank, with more ranks, is the fast
    way (2 threads on a busy 2-core machine were measured 60x slower than 1)."""

    cuda_graphs: str = "auto"
    """Replay each training step from a CUDA graph (``auto``: on a CUDA device; ``on``; ``off``).
    Batches are padded to shape buckets (a few graphs per run, each captured and checked against
    the eager step once); a GPU step is then one launch instead of ~110 kernel launches. ``auto``
    falls back to eager steps, with a warning, if a capture fails or disagrees; ``on`` stops."""

    shared_memory_sum: bool = True
    """When every rank trains on the CPUs of one host, sum each step's gradients and errors through
    shared memory instead of gloo (45 µs a step against 0.4-2.5 ms between two ranks of a 2-vCPU
    VM); false = gloo. Ranks on several hosts, and GPUs (nccl), always use the process group."""

    collective_timeout_s: float = 600.0
    """How long a rank waits in a collective for the others before it stops with an error (a
    dead or hung rank). Raise it when the first epoch's loading takes longer on some ranks."""

    tensorboard: bool = False
    """Also write every epoch's metrics as TensorBoard scalars to run_dir/tensorboard (needs the
    optional ``tensorboard`` package: ``pip install 'aenet_dist[tensorboard]'``)."""
    print_every: int = 0
    """Epochs between the printed metrics lines; 0 = about 25 lines per run (epochs / 25). The first
    and last epochs always print; metrics.jsonl has every epoch."""
    angle_min_force: float = 0.1
    """eV/Å: atoms whose reference force is at most this are left out of the force-direction
    metric (test_force_angle_*_deg: angle between predicted and reference force)."""

    def __post_init__(self):
        _coerce_fields(self, "run")
        if self.epochs < 1:
            raise ValueError(f"run.epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"run.batch_size must be > 0, got {self.batch_size}")
        _check_choice(self.dtype, DTYPES, "run.dtype")
        if not _DEVICE_RE.fullmatch(self.device):
            raise ValueError(f"run.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.seed < 0:
            raise ValueError(f"run.seed must be >= 0, got {self.seed}")
        if not self.run_dir:
            raise ValueError("run.run_dir must not be empty")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"run.checkpoint_every must be >= 1 (or unset: every run.checkpoint_interval_s), got {self.checkpoint_every}")
        if not self.checkpoint_interval_s >= 0 or not math.isfinite(self.checkpoint_interval_s):
            raise ValueError(f"run.checkpoint_interval_s must be >= 0 seconds, got {self.checkpoint_interval_s}")
        if self.keep_last < 1:
            raise ValueError(f"run.keep_last must be >= 1, got {self.keep_last}")
        if self.eval_every < 1:
            raise ValueError(f"run.eval_every must be >= 1, got {self.eval_every}")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ValueError(f"run.early_stop_patience must be >= 1 (or unset = never), got {self.early_stop_patience}")
        if self.log_every < 0:
            raise ValueError(f"run.log_every must be >= 0 (0 = per epoch only), got {self.log_every}")
        if self.print_every < 0:
            raise ValueError(f"run.print_every must be >= 0 (0 = about 25 lines per run), got {self.print_every}")
        if self.angle_min_force < 0:
            raise ValueError(f"run.angle_min_force must be >= 0 eV/Å, got {self.angle_min_force}")
        if self.cpu_threads < 0:
            raise ValueError(f"run.cpu_threads must be >= 0 (0 = cores / ranks), got {self.cpu_threads}")
        _check_choice(self.cuda_graphs, ("auto", "on", "off"), "run.cuda_graphs")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"run.collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")


TRAIN_SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "loss": LossConfig, "run": RunConfig,
}


@functools.cache
def _known_keys() -> tuple[str, ...]:
    """Every valid key of train.toml: section names and dotted ``section.field`` names."""
    return (*TRAIN_SECTIONS, *(f"{s}.{f.name}" for s, cls in TRAIN_SECTIONS.items() for f in fields(cls)))


# Names other tools give to a key of ours (a PyTorch user writes learning_rate, a scheduler's
# "type"); difflib cannot see these, so they are suggested by name.
_KEY_SYNONYMS = {"learning_rate": ("lr",), "type": ("kind", "method"), "name": ("kind", "method"),
                 "optimizer": ("method",), "scheduler": ("kind",), "max_epochs": ("epochs",)}


def _unknown_key(dotted: str) -> str:
    """'unknown key ...' message with a suggestion: the same field in another section, else the
    closest field of its section (or a synonym's), else that section's keys; the closest key for
    an unknown section."""
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [k for k in _known_keys() if "." in k and k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return f"unknown key {dotted!r} (did you mean {same_leaf[0]!r}?)"
    section = dotted.split(".", 1)[0]
    if dotted.count(".") == 1 and section in TRAIN_SECTIONS:
        names = [f.name for f in fields(TRAIN_SECTIONS[section])]
        same_case = [n for n in names if n.lower() == leaf.lower()]
        close = same_case or [n for n in _KEY_SYNONYMS.get(leaf.lower(), ()) if n in names] \
            or difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)  # the leaves: the shared "section." would match anything
        if close:
            return f"unknown key {dotted!r} (did you mean {f'{section}.{close[0]}'!r}?)"
        return f"unknown key {dotted!r}; [{section}] has the keys {', '.join(names)}"
    return f"unknown key {dotted!r}{did_you_mean(dotted, _known_keys())}"


def _check_keys(raw: Mapping) -> None:
    """Raise ValueError naming the first key of the nested dict ``raw`` that TrainConfig does not know."""
    for name, section in raw.items():
        if name not in TRAIN_SECTIONS:
            raise ValueError(_unknown_key(str(name)))
        if not isinstance(section, Mapping):
            continue  # reported with its type when the section is built
        known = {f.name for f in fields(TRAIN_SECTIONS[name])}
        for key, value in section.items():
            if key not in known:
                raise ValueError(_unknown_key(f"{name}.{key}"))
            if (name, key) == ("model", "networks") and isinstance(value, Mapping):
                for element, spec in value.items():
                    if isinstance(spec, Mapping):
                        _check_network_keys(element, spec)


def _plain(value):
    """Nested plain Python data (dict, list, scalars) of a config value."""
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``aenet-dist train`` needs: one frozen tree, written to run_dir/config.toml."""

    data: DataConfig
    """[data] store, split and cache."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """[model] network architectures."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """[optim] optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """[schedule] learning-rate schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """[loss] force weight and L2 penalty."""
    run: RunConfig = field(default_factory=RunConfig)
    """[run] epochs, batch size, dtype, device, seeds, checkpoints."""

    def __post_init__(self):
        for name, cls in TRAIN_SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.data.cache == "gpu" and self.run.device == "cpu":
            raise ValueError("data.cache = 'gpu' needs a CUDA device, but run.device = 'cpu'")

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists, unset options as None); :meth:`from_dict` inverts it."""
        return {name: _plain(getattr(self, name)) for name in TRAIN_SECTIONS}

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "") -> "TrainConfig":
        """Build from a nested dict such as parsed TOML; missing sections and keys take their defaults.

        Unknown keys at any level, values of the wrong type and invalid values raise ValueError
        naming the dotted key, prefixed with ``source`` (the file) when given.
        """
        try:
            if not isinstance(d, Mapping):
                raise ValueError(f"config must be a table of sections {list(TRAIN_SECTIONS)}, got {_describe(d)}")
            _check_keys(d)
            sections = {}
            for name, section_cls in TRAIN_SECTIONS.items():
                section = d.get(name, {})
                if isinstance(section, section_cls):
                    sections[name] = section
                    continue
                if not isinstance(section, Mapping):
                    raise ValueError(f"{name} must be a table, got {_describe(section)}")
                for f in fields(section_cls):
                    if f.default is MISSING and f.default_factory is MISSING and f.name not in section:
                        raise ValueError(f"missing required key '{name}.{f.name}'")
                sections[name] = section_cls(**section)
            return cls(**sections)
        except ValueError as e:
            raise ValueError(f"{source}: {e}" if source else str(e)) from None


# --------------------------------------------------------------------------- TOML load / dump


_PATH_KEYS = (("data", "store"), ("data", "batch_dir"), ("run", "run_dir"))


def _resolve_path(value, base: str):
    """``value`` made absolute against ``base`` (``~`` and ``$VARIABLES`` expanded: a job's ``$TMPDIR``);
    URLs and non-strings unchanged."""
    if not isinstance(value, str) or not value or "://" in value:
        return value
    value = os.path.expandvars(os.path.expanduser(value))
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _override_hint(parts: list[str], key: str):
    """Type of the value that the dotted override key ``parts`` sets; ValueError if the key is unknown."""
    section = parts[0]
    if section not in TRAIN_SECTIONS:
        raise ValueError(_unknown_key(key))
    if len(parts) == 1:
        raise ValueError(f"{key!r} is a whole section; override one key, e.g. '{section}.{fields(TRAIN_SECTIONS[section])[0].name}=...'")
    hints = _hints(TRAIN_SECTIONS[section])
    if parts[1] not in {f.name for f in fields(TRAIN_SECTIONS[section])}:
        raise ValueError(_unknown_key(".".join(parts[:2])))
    if len(parts) == 2:
        return None if parts[:2] == ["model", "networks"] else hints[parts[1]]
    if parts[:2] != ["model", "networks"] or len(parts) > 4:
        raise ValueError(_unknown_key(key))
    if len(parts) == 3:
        return None  # a whole network table, checked by ModelConfig
    _check_network_keys(parts[2], {parts[3]: None})
    return tuple[int, ...] if parts[3] == "hidden" else tuple[str, ...]


def _parse_scalar(text: str):
    """A TOML value if ``text`` is one, else an int or float in Python syntax, else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _parse_override_value(text: str, hint):
    """Value of an override: TOML if possible, else a bare string; ``[a, b]`` of bare words is a list."""
    value = _parse_scalar(text)
    if isinstance(value, str) and value == text and text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        value = [_parse_scalar(t.strip()) for t in inner.split(",")] if inner else []
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional and isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    if hint is str and not isinstance(value, str):
        return text  # run.run_dir=2024 is the string '2024'
    return value


def _apply_overrides(raw: dict, overrides: Iterable[str], origins: dict[str, str]) -> dict:
    """Copy of ``raw`` with each ``section.key=value`` applied; records each key's origin in ``origins``."""
    raw = _plain(raw)
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        where = f"override {text!r}"
        key, sep, value_text = text.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p.strip() for p in parts):
            raise ValueError(f"{where}: expected section.key=value, e.g. optim.lr=1e-3")
        parts = [p.strip() for p in parts]
        try:
            hint = _override_hint(parts, key)
            value = _parse_override_value(value_text.strip(), hint)
            if hint is not None:
                value = _plain(_coerce(value, hint, key))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if tuple(parts) in _PATH_KEYS:
            value = _resolve_path(value, os.getcwd())  # typed on the command line: relative to the cwd
        node = raw
        for depth, p in enumerate(parts[:-1], 1):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"{where}: {'.'.join(parts[:depth])} is not a table in the file")
            node = child
        node[parts[-1]] = value
        origins.pop(key, None)  # re-inserted: origins stay in the order keys were set
        origins[key] = where
    return raw


def _origin_of(message: str, origins: Mapping[str, str], default: str) -> str:
    """Where the value that ``message`` is about was set: the origin of the last-set key it names.

    Sections validate in ``__post_init__``, often across fields, so a ValueError carries no key
    object, only a message that names its dotted keys ("optim.lr must be > 0, got -1"). A key
    also matches its subkeys (``model.networks.Ti`` in ``model.networks.Ti.hidden``). ``origins``
    is in the order keys were set, file first, then overrides: when a message names both, the
    override, which changed a file's values, is the likelier cause. Keys not in ``origins`` come
    from ``default``.
    """
    named = [where for key, where in origins.items() if re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message)]
    return named[-1] if named else default


def build_train_config(raw: Mapping, origins: Mapping[str, str], source: str,
                       overrides: Iterable[str] = ()) -> TrainConfig:
    """The one way from a file's contents to a TrainConfig, for train.toml and train.in alike.

    Args:
        raw: nested sections as read from the file, e.g. ``{"optim": {"lr": 1e-3}}``, paths
            already resolved. Not modified.
        origins: where each dotted key of ``raw`` was set (``"train.in:12"``); keys it does
            not hold are blamed on ``source``.
        source: the file, named in errors about its contents.
        overrides: command-line ``section.key=value`` strings, applied after the file (see
            :func:`load_train_config`).

    Raises:
        ValueError: ``"{where}: {problem}"``, where is the file, its line or ``override '...'``.
    """
    try:
        _check_keys(raw)  # a typo in the file is reported even when an override sets the right key
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    origins = dict(origins)
    raw = _apply_overrides(raw, overrides, origins)
    try:
        return TrainConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{_origin_of(str(e), origins, source)}: {e}") from None


def load_train_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a train.toml and apply command-line overrides.

    Args:
        path: TOML file with tables [data] [model] [optim] [schedule] [loss] [run] (and
            [model.networks.<element>]). Relative ``data.store`` and ``run.run_dir`` (also the
            default ``runs/default``) are resolved against the file's directory.
        overrides: ``section.key=value`` strings, e.g. ``optim.lr=1e-3``, ``model.hidden=[10,10]``,
            ``run.dtype=float64``, ``model.networks.Ti.hidden=[8,8]``, ``run.early_stop_patience=none``.
            The value is read as a TOML value if it is one, else as a bare string. Relative paths
            given here are resolved against the current directory.

    Returns:
        The validated, frozen :class:`TrainConfig`.

    Raises:
        ValueError: naming the file (or the override) and the dotted key, with a did-you-mean for
            unknown keys.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"configuration file {path} does not exist; check the path (a train.toml, or aenet-PyTorch's train.in)") from None
    except IsADirectoryError:
        raise ValueError(f"configuration file {path} is a directory; give the train.toml in it") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; a configuration is a train.toml (TOML text)") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    base = str(path.resolve().parent)
    if isinstance(raw.get("run", {}), dict):  # the default run_dir, too, sits next to the file
        raw.setdefault("run", {}).setdefault("run_dir", RunConfig.run_dir)
    for section, key in _PATH_KEYS:
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section][key] = _resolve_path(raw[section][key], base)
    return build_train_config(raw, {}, str(path), overrides)


def dump_toml(config: TrainConfig) -> str:
    """TOML text of ``config`` that :func:`load_train_config` reads back to an equal config.

    TOML has no null, so unset (None) options are left out and listed in the header comment;
    they read back as unset because None is the default of every optional field.
    """
    sections = config.to_dict()
    unset = [f"{name}.{key}" for name, values in sections.items() for key, value in values.items() if value is None]
    header = "# aenet_dist training configuration\n"
    if unset:
        header += f"# unset (TOML has no null): {', '.join(unset)}\n"
    present = {name: {key: value for key, value in values.items() if value is not None}
               for name, values in sections.items()}
    return header + "\n" + tomli_w.dumps(present)


def save_resolved_config(config: TrainConfig, run_dir: str | os.PathLike) -> Path:
    """Write ``dump_toml(config)`` to ``run_dir/config.toml`` atomically (temp file, fsync, os.replace).

    Call it on rank 0 only. Returns the path written.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.toml"
    atomic_write(target, dump_toml(config))
    return target
