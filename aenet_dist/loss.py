"""Energy + force loss of the aenet-PyTorch paper, built from global sums.

L = (1 − α)·RMSE_E + α·RMSE_F (+ λ·Σ w² over weights, biases excluded), where RMSE_E is
over structures of (E_pred − E_ref)/N_atoms (eV/atom) and RMSE_F over the Cartesian force
components of the structures that have derivatives (eV/Å).

With several ranks the RMSEs are those of the **global** batch: each rank contributes its
sums of squared errors and counts, which are summed over ranks (``reduce``). The rank's
differentiable *surrogate* is chosen so that the sum over ranks of its gradients equals the
gradient of the global L: d sqrt(S/N) = dS / (2 N sqrt(S/N)) with S = Σ_ranks S_r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .batching import Batch


@dataclass
class ErrorSums:
    """Sums of squared errors and their counts for one batch on one rank (differentiable)."""

    sse_energy: torch.Tensor  # Σ ((E_pred − E_ref)/N)^2, (eV/atom)^2
    count_energy: torch.Tensor  # number of structures
    sse_forces: torch.Tensor  # Σ over force components, (eV/Å)^2
    count_forces: torch.Tensor  # number of force components
    energy_error: torch.Tensor | None = None  # (B,) (E_pred − E_ref)/N, eV/atom
    force_error: torch.Tensor | None = None  # (A, 3) F_pred − F_ref, 0 for atoms without derivatives
    atoms: torch.Tensor | None = None  # (B,) N of each structure, in the energies' dtype

    def detached(self) -> torch.Tensor:
        """(4,) tensor of the sums, for all-reducing."""
        return torch.stack([self.sse_energy.detach(), self.count_energy, self.sse_forces.detach(), self.count_forces])


def error_sums(batch: Batch, energy: torch.Tensor, forces: torch.Tensor | None) -> ErrorSums:
    """Squared errors of predicted structure energies (B,) and forces (A, 3) against the batch.

    No value is read back to the host (a device sync): a batch whose structures have no
    derivatives gives zero force sums through the mask.
    """
    atoms, count_e, zero, mask, count_f = _batch_constants(batch, energy)
    per_atom = (energy - batch.energy) / atoms
    sse_e = torch.dot(per_atom, per_atom)  # one kernel where product and sum are two
    if forces is None or mask is None:
        return ErrorSums(sse_e, count_e, zero, zero, per_atom, None, atoms)
    diff = torch.where(mask, forces - batch.forces, zero)  # where, not a product: a non-finite reference must not leak
    flat = diff.view(-1)
    return ErrorSums(sse_e, count_e, torch.dot(flat, flat), count_f, per_atom, diff, atoms)


def _batch_constants(batch: Batch, like: torch.Tensor) -> tuple:
    """What :func:`error_sums` needs of the batch alone, in ``like``'s dtype: atoms per structure (B,),
    the structure count, a zero, the force mask (A, 1) and the force component count (no mask: None,
    zero). Made once per batch where it keeps what the step derives from it (:attr:`Batch.step_cache`)."""
    cache = batch.step_cache
    key = ("loss constants", like.dtype, like.device)
    if cache is not None and key in cache:
        return cache[key]
    kw = {"dtype": like.dtype, "device": like.device}
    atoms = batch.num_atoms.to(like.dtype)
    # A batch padded to a shape bucket counts its real structures only (padded ones add 0 to the sum).
    count_e = torch.full((), float(atoms.numel()), **kw) if batch.structure_count is None else batch.structure_count.to(like.dtype)
    zero = torch.zeros((), **kw)
    mask, count_f = None, zero
    if batch.force_atoms is not None:
        mask = batch.force_atoms.unsqueeze(-1)  # shape (A, 1)
        count_f = torch.sum(mask, dtype=like.dtype) * 3
    constants = (atoms, count_e, zero, mask, count_f)
    if cache is not None:
        cache[key] = constants
    return constants


def loss_coefficients(totals: torch.Tensor, force_weight: float | torch.Tensor) -> torch.Tensor:
    """(2,) ∂L/∂sse_E and ∂L/∂sse_F of L = (1 − α)·sqrt(sse_E/n_E) + α·sqrt(sse_F/n_F) at the global sums.

    d sqrt(S/N)/dS = 1 / (2 N sqrt(S/N)); a zero RMSE is clamped to the dtype's tiny.
    ``force_weight`` may be the (2,) tensor (1 − α, α) on the device, which saves a host copy per step.
    """
    sse, counts = totals[0::2], totals[1::2].clamp(min=1)
    weights = force_weight if isinstance(force_weight, torch.Tensor) else \
        torch.tensor([1.0 - force_weight, force_weight], dtype=totals.dtype, device=totals.device)
    rmse = torch.sqrt(sse / counts)
    return weights / (2 * counts * rmse.clamp(min=torch.finfo(totals.dtype).tiny))


def loss_of_totals(totals: torch.Tensor, force_weight: float) -> torch.Tensor:
    """L = (1 − α)·RMSE_E + α·RMSE_F of the global sums (4,)."""
    rmse = torch.sqrt(totals[0::2] / totals[1::2].clamp(min=1))
    return (1 - force_weight) * rmse[0] + force_weight * rmse[1]


def adjoints(sums: ErrorSums, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """∂L/∂E_s (B,) and ∂L/∂F (A, 3) of this rank's share of the global loss.

    sse_E = Σ ((E_s − E_ref)/N_s)², so ∂sse_E/∂E_s = 2 (E_s − E_ref)/N_s²; ∂sse_F/∂F = 2 (F − F_ref).
    """
    twice = 2 * coefficients
    energy_adjoint = sums.energy_error * twice[0] / sums.atoms
    force_adjoint = None if sums.force_error is None else sums.force_error * twice[1]
    return energy_adjoint, force_adjoint


@dataclass
class LossValue:
    """Global loss and RMSEs of a step (floats only after ``.item()``, at log time)."""

    loss: torch.Tensor
    rmse_energy: torch.Tensor  # eV/atom
    rmse_forces: torch.Tensor  # eV/Å
    totals: torch.Tensor  # (4,) the global sums (sse_E, n_E, sse_F, n_F)


def global_loss(
    sums: ErrorSums,
    force_weight: float,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    l2_penalty: torch.Tensor | None = None,
    world_size: int = 1,
) -> tuple[torch.Tensor, LossValue]:
    """(surrogate to backpropagate on this rank, global loss value).

    Args:
        sums: this rank's error sums for the step.
        force_weight: α in [0, 1].
        reduce: in-place sum over ranks of a (4,) tensor (identity on one rank).
        l2_penalty: λ·Σ w², identical on every rank (each rank adds 1/world_size of its gradient).
    """
    totals = reduce(sums.detached().clone())
    rmse_e, rmse_f = torch.sqrt(totals[0::2] / totals[1::2].clamp(min=1))
    alpha = float(force_weight)
    coefficients = loss_coefficients(totals, alpha)
    # No Python branches on tensor values: they would be a device sync every step.
    surrogate = torch.zeros((), dtype=totals.dtype, device=totals.device)
    if alpha < 1.0:
        surrogate = surrogate + coefficients[0] * sums.sse_energy
    if alpha > 0.0:
        surrogate = surrogate + coefficients[1] * sums.sse_forces
    loss = loss_of_totals(totals, alpha)
    if l2_penalty is not None:
        surrogate = surrogate + l2_penalty / world_size
        loss = loss + l2_penalty.detach()
    return surrogate, LossValue(loss, rmse_e, rmse_f, totals)


ANGLE_BINS = 360  # 0.5° bins over [0°, 180°]


def force_angle_histogram(predicted: torch.Tensor, reference: torch.Tensor, use: torch.Tensor, min_force: float) -> torch.Tensor:
    """(ANGLE_BINS,) counts of the angle between predicted and reference force, per atom.

    Atoms count where ``use`` (A,) holds and |F_ref| > ``min_force`` (eV/Å); below it the
    reference direction is noise. No value is read back to the host.
    """
    ref_norm = torch.linalg.vector_norm(reference, dim=1)
    pred_norm = torch.linalg.vector_norm(predicted, dim=1)
    cosine = (predicted * reference).sum(1) / (ref_norm * pred_norm).clamp(min=torch.finfo(reference.dtype).tiny)
    degrees = torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0)))
    bins = (degrees * (ANGLE_BINS / 180.0)).long().clamp_(0, ANGLE_BINS - 1)
    weight = (use & (ref_norm > min_force)).to(reference.dtype)
    return torch.zeros(ANGLE_BINS, dtype=reference.dtype, device=reference.device).index_add_(0, bins, weight)


def histogram_quantile(histogram, q: float) -> float:
    """The ``q`` quantile (0..1) of angles in degrees from a :func:`force_angle_histogram` (linear within a bin); NaN if empty."""
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    cumulative = np.cumsum(counts)
    k = int(np.searchsorted(cumulative, q * total))
    below = cumulative[k - 1] if k > 0 else 0.0
    inside = (q * total - below) / counts[k] if counts[k] > 0 else 0.0
    return (k + inside) * 180.0 / ANGLE_BINS
