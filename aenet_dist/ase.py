"""ASE calculator for aenet ``.nn`` potentials: ``atoms.calc = AenetCalculator({"Ti": "Ti.nn", "O": "O.nn"})``.

Energies, forces and (for periodic cells) the stress come from :class:`aenet_dist.predict.Predictor`
in one pass: forces and the virial both from the per-pair gradients ∂E/∂R_ij, so the stress
costs one extra (pairs, 3, 3) reduction. Usable with any ASE dynamics or optimizer, e.g.
``ase.md.verlet.VelocityVerlet``.

This module is ``aenet_dist.ase``; the real ASE package is imported with absolute imports
(``from ase.calculators.calculator import ...`` always means the top-level ``ase``).
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .predict import Predictor, structure_from_atoms

__all__ = ["AenetCalculator"]


class AenetCalculator(Calculator):
    """ASE calculator: energy, free_energy, energies (per atom), forces, stress (periodic cells).

    Args:
        potentials: {element: .nn path}, a directory of ``*.nn`` files, a list of files, or a
            ready :class:`~aenet_dist.predict.Predictor`.
        dtype: ``float64`` (default) or ``float32`` (name or numpy dtype).
    Units: eV, eV/Å, eV/Å³ (ASE's). ``free_energy`` equals ``energy`` (no electronic entropy).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, potentials, *, dtype="float64", **kwargs):
        if "device" in kwargs:  # ASE would keep an unknown keyword as a parameter and ignore it
            raise ValueError("AenetCalculator: there is no device option any more; prediction runs in numpy on the CPU")
        super().__init__(**kwargs)
        if isinstance(potentials, Predictor):
            self.predictor = potentials
        else:
            self.predictor = Predictor.from_potentials(potentials, dtype=dtype)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        structure = structure_from_atoms(self.atoms, self.atoms.get_chemical_formula() or "atoms")
        if "stress" in properties and not structure.pbc:
            raise PropertyNotImplementedError("stress needs a periodic cell (atoms.pbc all True)")
        # Forces and stress come from the same pair gradients: compute both once per geometry.
        (result,) = self.predictor.predict([structure], forces=True, stress=structure.pbc)
        self.results = {
            "energy": result.energy,
            "free_energy": result.energy,
            "energies": result.atomic_energies.copy(),
            "forces": result.forces.copy(),
        }
        if result.stress is not None:
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(result.stress))
