"""Typed, frozen configuration for every stage (featurize now; train, export later).

Descriptor setups mirror aenet's ``.stp`` files; :class:`FeaturizeConfig` mirrors
aenet's ``generate.in``. Parsers for those formats live in :mod:`aenet_dist.aenet_inputs`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import re
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, imported where needed
    tomllib = None

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


@dataclass(frozen=True)
class DescriptorSetup:
    """One aenet ``.stp`` descriptor setup: the central species, its environment species and basis.

    ``basis_type`` is the explicit switch between descriptor families; only
    ``"chebyshev"`` is implemented (Behler symmetry functions slot in later).
    """

    element: str
    env_species: tuple[str, ...]
    basis_type: str
    basis: ChebyshevBasis
    rmin: float = 0.0
    description: str = ""
    source: str = ""

    def __post_init__(self):
        if self.basis_type != "chebyshev":
            raise ValueError(f"{self.source or self.element}: descriptor basis {self.basis_type!r} is not supported (only Chebyshev)")
        if len(set(self.env_species)) != len(self.env_species):
            raise ValueError(f"{self.source or self.element}: ENV species repeated: {self.env_species}")

    @property
    def num_features(self) -> int:
        """aenet's nsf: (Nr+1 + Na+1), doubled when there is more than one ENV species."""
        per_channel = self.basis.radial_order + 1 + self.basis.angular_order + 1
        return per_channel * (2 if len(self.env_species) > 1 else 1)

    def typespin(self) -> dict[str, int]:
        """aenet's species weights: -m//2 .. m//2 in ENV order, 0 skipped when m is even."""
        m = len(self.env_species)
        spins = [s for s in range(-(m // 2), m // 2 + 1) if not (m % 2 == 0 and s == 0)]
        return dict(zip(self.env_species, spins))

    def to_dict(self) -> dict:
        return {
            "element": self.element,
            "env_species": list(self.env_species),
            "basis_type": self.basis_type,
            "radial_cutoff": self.basis.radial_cutoff,
            "radial_order": self.basis.radial_order,
            "angular_cutoff": self.basis.angular_cutoff,
            "angular_order": self.basis.angular_order,
            "rmin": self.rmin,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DescriptorSetup":
        return cls(
            element=d["element"],
            env_species=tuple(d["env_species"]),
            basis_type=d["basis_type"],
            basis=ChebyshevBasis(d["radial_cutoff"], int(d["radial_order"]), d["angular_cutoff"], int(d["angular_order"])),
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


@dataclass(frozen=True)
class StoreOptions:
    """How featurize writes the Zarr store."""

    chunk_bytes: int = 32 * 2**20
    """Target uncompressed bytes per block of structures (descriptors + derivatives)."""
    deriv_dtype: str = "float64"
    """Storage dtype of dG/dR rows: float64 (exact) or float32 (half the disk)."""
    compressor_level: int = 1
    """zstd level for all arrays (1: twice the speed of 3 for 5% more disk on float64 derivatives)."""

    def __post_init__(self):
        if self.chunk_bytes < 2**16:
            raise ValueError(f"chunk_bytes must be at least 65536, got {self.chunk_bytes}")
        if self.deriv_dtype not in ("float32", "float64"):
            raise ValueError(f"deriv_dtype must be 'float32' or 'float64', got {self.deriv_dtype!r}")
