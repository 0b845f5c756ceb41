"""Loss (aenet_dist.loss) on hand-made float64 tensors: the loss of the global sums, the
adjoints ∂L/∂E and ∂L/∂F against autograd of the direct formula (also split over two
'ranks'), unlabelled atoms (NaN references included) never entering the force error, and
the force-angle histogram and its quantiles on hand-computed angles.

global_loss's surrogate gradients and the α = 0/1 limits are in test_train.py; the lean step
built on these adjoints is checked against autograd in test_step.py.
"""

import math

import numpy as np
import pytest
import torch

from aenet_dist.batching import Batch
from aenet_dist.loss import (
    ANGLE_BINS,
    adjoints,
    error_sums,
    force_angle_histogram,
    histogram_quantile,
    loss_coefficients,
    loss_of_totals,
)

F64 = torch.float64


def _batch(energy, num_atoms, forces=None, force_atoms=None) -> Batch:
    """A Batch with only what the loss reads (no descriptors)."""
    return Batch(torch.arange(len(energy)), num_atoms, energy, {}, {}, forces=forces, force_atoms=force_atoms)


def _case(seed=0):
    """5 structures (2, 3, 1, 4, 2 atoms); structures 1 and 4 have no force labels."""
    g = torch.Generator().manual_seed(seed)
    num_atoms = torch.tensor([2, 3, 1, 4, 2])
    labelled = torch.tensor([True, False, True, True, False])
    force_atoms = torch.repeat_interleave(labelled, num_atoms)
    ref_e = torch.randn(5, dtype=F64, generator=g)
    ref_f = torch.randn(12, 3, dtype=F64, generator=g)
    energy = torch.randn(5, dtype=F64, generator=g)
    forces = torch.randn(12, 3, dtype=F64, generator=g)
    return energy, forces, _batch(ref_e, num_atoms, ref_f, force_atoms)


def _direct_loss(energy, forces, batch, alpha):
    """(1 − α)·RMSE_E + α·RMSE_F written out, for autograd."""
    per_atom = (energy - batch.energy) / batch.num_atoms
    rmse_e = torch.sqrt(torch.mean(per_atom**2))
    labelled = (forces - batch.forces)[batch.force_atoms]
    rmse_f = torch.sqrt(torch.mean(labelled**2))
    return (1 - alpha) * rmse_e + alpha * rmse_f


def test_error_sums_and_loss_equal_the_direct_formula():
    energy, forces, batch = _case()
    sums = error_sums(batch, energy, forces)
    per_atom = (energy - batch.energy) / batch.num_atoms
    assert float(sums.count_energy) == 5 and float(sums.count_forces) == 3 * 7  # 2 + 1 + 4 labelled atoms
    assert torch.allclose(sums.sse_energy, (per_atom**2).sum(), rtol=1e-14, atol=0)
    assert torch.allclose(sums.sse_forces, ((forces - batch.forces)[batch.force_atoms] ** 2).sum(), rtol=1e-14, atol=0)
    for alpha in (0.0, 0.3, 1.0):
        assert torch.allclose(loss_of_totals(sums.detached(), alpha), _direct_loss(energy, forces, batch, alpha), rtol=1e-14, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_adjoints_equal_autograd_of_the_direct_loss(alpha):
    energy, forces, batch = _case(1)
    energy.requires_grad_(True)
    forces.requires_grad_(True)
    d_energy, d_forces = torch.autograd.grad(_direct_loss(energy, forces, batch, alpha), [energy, forces])
    sums = error_sums(batch, energy.detach(), forces.detach())
    adj_e, adj_f = adjoints(sums, loss_coefficients(sums.detached(), alpha))
    assert torch.allclose(adj_e, d_energy, rtol=0, atol=1e-12)
    assert torch.allclose(adj_f, d_forces, rtol=0, atol=1e-12)
    assert torch.all(adj_f[~batch.force_atoms] == 0)
    if 0 < alpha < 1:
        assert adj_e.abs().min() > 1e-6 and adj_f[batch.force_atoms].abs().min() > 1e-9


def test_adjoints_of_two_ranks_are_the_global_gradient():
    """Each 'rank' holds part of the batch; with the summed totals, its adjoints are its rows
    of the gradient of the global loss (not of its own loss)."""
    energy, forces, batch = _case(2)
    alpha = 0.4
    energy.requires_grad_(True)
    forces.requires_grad_(True)
    d_energy, d_forces = torch.autograd.grad(_direct_loss(energy, forces, batch, alpha), [energy, forces])
    parts = [(slice(0, 2), slice(0, 5)), (slice(2, 5), slice(5, 12))]  # structures, their atoms
    rank_sums = [error_sums(_batch(batch.energy[s], batch.num_atoms[s], batch.forces[a], batch.force_atoms[a]),
                            energy.detach()[s], forces.detach()[a]) for s, a in parts]
    totals = rank_sums[0].detached() + rank_sums[1].detached()  # what all_reduce_sum gives
    coefficients = loss_coefficients(totals, alpha)
    got = [adjoints(sums, coefficients) for sums in rank_sums]
    assert torch.allclose(torch.cat([e for e, _ in got]), d_energy, rtol=0, atol=1e-12)
    assert torch.allclose(torch.cat([f for _, f in got]), d_forces, rtol=0, atol=1e-12)
    own = adjoints(rank_sums[0], loss_coefficients(rank_sums[0].detached(), alpha))[0]
    assert not torch.allclose(own, d_energy[:2]), "a rank's own loss must give another gradient"


def test_unlabelled_atoms_never_enter_the_force_error():
    energy, forces, batch = _case(3)
    clean = error_sums(batch, energy, forces)
    batch.forces[~batch.force_atoms] = float("nan")  # references of atoms without labels may be anything
    forces = forces.clone()
    forces[~batch.force_atoms] = 1e30
    dirty = error_sums(batch, energy, forces)
    assert torch.equal(dirty.detached(), clean.detached())
    assert torch.isfinite(dirty.force_error).all() and torch.all(dirty.force_error[~batch.force_atoms] == 0)


def test_batch_without_forces_gives_zero_force_sums_and_finite_coefficients():
    energy, _, batch = _case(4)
    for sums in (error_sums(_batch(batch.energy, batch.num_atoms), energy, None), error_sums(batch, energy, None)):
        assert float(sums.sse_forces) == 0 and float(sums.count_forces) == 0 and sums.force_error is None
        totals = sums.detached()
        assert float(loss_of_totals(totals, 0.3)) == pytest.approx(0.7 * math.sqrt(float(totals[0]) / 5), rel=1e-14)
        coefficients = loss_coefficients(totals, 0.3)
        assert torch.isfinite(coefficients).all()  # RMSE_F = 0: clamped, not a division by zero
        adj_e, adj_f = adjoints(sums, coefficients)
        assert adj_f is None and torch.isfinite(adj_e).all()
    exact = error_sums(batch, batch.energy.clone(), batch.forces.clone())  # a perfect prediction
    adj_e, adj_f = adjoints(exact, loss_coefficients(exact.detached(), 0.5))
    assert torch.all(adj_e == 0) and torch.all(adj_f == 0)


def _at(degrees, length=1.0):
    rad = torch.deg2rad(torch.tensor(degrees, dtype=F64))
    return torch.stack([torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)], 1) * length


def test_force_angle_histogram_bins_and_threshold():
    # 0°, 180° and angles inside 0.5° bins (45.2° etc.) from +x; |F_ref| 2 except two atoms at and below the threshold.
    predicted = _at([0.0, 45.2, 90.2, 135.2, 180.0, 10.2, 30.0, 60.0], 3.0)
    reference = _at([0.0] * 8, 2.0)
    reference[6] *= 0.25  # |F_ref| = 0.5 = min_force: not strictly above, not counted
    reference[7] *= 0.2
    use = torch.ones(8, dtype=torch.bool)
    hist = force_angle_histogram(predicted, reference, use, min_force=0.5)
    expected = np.zeros(ANGLE_BINS)
    for b in (0, 90, 180, 270, ANGLE_BINS - 1, 20):  # 0.5° bins; 180° falls into the last bin
        expected[b] += 1
    np.testing.assert_array_equal(hist.numpy(), expected)
    # The angle is direction only: the predicted force's length changes nothing.
    scaled = force_angle_histogram(predicted * 1e-3, reference, use, min_force=0.5)
    assert torch.equal(scaled, hist)
    assert force_angle_histogram(predicted, reference, torch.zeros(8, dtype=torch.bool), min_force=0.0).sum() == 0


def test_histogram_quantile_interpolates_within_a_bin():
    hist = np.zeros(ANGLE_BINS)
    hist[20] = 4  # four angles in [10°, 10.5°)
    assert histogram_quantile(hist, 0.5) == pytest.approx(10.25, abs=1e-12)
    assert histogram_quantile(hist, 1.0) == pytest.approx(10.5, abs=1e-12)
    hist[100] = 4  # four more in [50°, 50.5°)
    assert histogram_quantile(hist, 0.5) == pytest.approx(10.5, abs=1e-12)  # the upper edge of the first half
    assert histogram_quantile(hist, 0.75) == pytest.approx(50.25, abs=1e-12)
    assert histogram_quantile(torch.tensor(hist), 0.75) == pytest.approx(50.25, abs=1e-12)  # a tensor too
    assert math.isnan(histogram_quantile(np.zeros(ANGLE_BINS), 0.5))
