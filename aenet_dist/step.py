"""The lean training step: energies, forces, error sums and every parameter gradient by hand.

Autograd's route to the force loss's gradient (``autograd.grad(create_graph=True)``, then
``backward`` through that graph) costs about a thousand small operators per step, each a
kernel launch on a GPU. The maths needs far fewer. For one element's network with layers
z_l = h_{l−1} W_lᵀ + b_l, h_l = σ_l(z_l), h_0 = x = (G − avg)·inv_std, E_i = h_L/scale + shift:

    dE/dx      δ_L = σ_L′/scale,  δ_{l−1} = (δ_l W_l) ⊙ σ′_{l−1},  dE/dx = δ_1 W_1
    forces     F = −C · dE/dG        (C: the batch's stored dG/dR, sparse rows and dense blocks)
    adjoints   a_i = ∂L/∂E_i (energy term),  U = ∂L/∂(dE/dG) = −Cᵀ · ∂L/∂F (force term)
    gradient   ∂L/∂θ = ∂/∂θ [Σ_i a_i E_i + Σ_i v_i · ∂E_i/∂x_i],  v = U ⊙ inv_std

The second sum is E's directional derivative along v: one forward-mode tangent pass
(ż_l = ḣ_{l−1} W_lᵀ, ḣ_l = σ′_l ⊙ ż_l) whose reverse pass, for the pair (z, ż), gives the force
term's parameter gradient without building a second graph:

    ā_l   = adjoint of z_l = (ā_{l+1} W_{l+1}) ⊙ σ′_l + (ȧ_{l+1} W_{l+1}) ⊙ σ″_l ⊙ ż_l
    ȧ_l   = adjoint of ż_l = (ȧ_{l+1} W_{l+1}) ⊙ σ′_l
    ∂L/∂W_l = ā_lᵀ h_{l−1} + ȧ_lᵀ ḣ_{l−1} (+ 2λ W_l),   ∂L/∂b_l = Σ_i ā_l

Everything runs without autograd (``torch.no_grad``) and without reading a value back to
the host, so a step is a fixed, short sequence of kernels. :func:`aenet_dist.train.predict`
is the autograd reference this module is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as tnf
from torch import Tensor

from .batching import Batch
from .model import AtomicModel, ElementNet, activate_with_derivatives


@dataclass
class NetPass:
    """What one element's forward pass keeps for its backward pass."""

    inputs: list[Tensor]  # h_0 .. h_{L−1}: the input of each layer, (N, n_in)
    slopes: list[Tensor | None]  # σ′(z_l), (N, n_out); None: linear (σ′ = 1)
    curvatures: list[Tensor | None]  # σ″(z_l); None: linear or not needed
    inv_scale: Tensor  # () 1/scale of E = NN/scale + shift


@dataclass
class StepForward:
    """Energies, forces and the per-element passes of one batch."""

    energy: Tensor  # (B,) cohesive structure energies, eV
    forces: Tensor | None  # (A, 3) eV/Å, None when forces were not asked for
    dE_dG: dict[str, Tensor]  # element -> (N, F), eV (only elements with derivative rows)
    passes: dict[str, NetPass]


def _layers(net: ElementNet) -> list[tuple[Tensor, Tensor, str]]:
    return [(layer.weight, layer.bias, act) for layer, act in zip(net.layers, net._act)]


def _net_forward(net: ElementNet, G: Tensor, second: bool) -> tuple[Tensor, NetPass]:
    """Network outputs (N, 1) and the activations' derivatives, from raw descriptors G (N, F)."""
    h = (G - net.avg) * net.inv_std
    inputs, slopes, curvatures = [], [], []
    for weight, bias, act in _layers(net):
        inputs.append(h)
        h, slope, curvature = activate_with_derivatives(tnf.linear(h, weight, bias), act, second)
        slopes.append(slope)
        curvatures.append(curvature)
    return h, NetPass(inputs, slopes, curvatures, net.scale.reciprocal())


def _input_gradient(net: ElementNet, p: NetPass, num_rows: int) -> Tensor:
    """dE_i/dG_i (N, F), eV per descriptor unit: the chain of Wᵀ·diag(σ′) products."""
    delta = None  # adjoint of the current layer's output; None: all ones
    for (weight, _, _), slope in zip(reversed(_layers(net)), reversed(p.slopes)):
        if slope is not None:
            delta = slope if delta is None else delta * slope
        delta = weight if delta is None else delta @ weight  # (1 or N, n_in)
    return (delta * (net.inv_std * p.inv_scale)).expand(num_rows, -1)


def forward(model: AtomicModel, batch: Batch, with_forces: bool, for_training: bool = True) -> StepForward:
    """Energies (and forces) of a batch, keeping what :func:`backward` needs.

    Args:
        model: the per-element networks.
        batch: species-grouped structures.
        with_forces: compute forces (needs the batch's derivative rows).
        for_training: keep σ″ for the force term's gradient.
    """
    with torch.no_grad():
        num_structures = batch.num_atoms.numel()
        elements_with_rows = set(batch.deriv) | set(batch.dense) if with_forces else set()
        energy = None
        passes, dE_dG = {}, {}
        for element, G in batch.G.items():
            net = model.nets[element]
            out, p = _net_forward(net, G, second=for_training and element in elements_with_rows)
            passes[element] = p
            atomic = torch.addcmul(net.shift, out.squeeze(-1), p.inv_scale)  # E_i − E_atom, eV
            if energy is None:
                energy = torch.zeros(num_structures, dtype=atomic.dtype, device=atomic.device)
            energy.index_add_(0, batch.atom_structure[element], atomic)
            if element in elements_with_rows:
                dE_dG[element] = _input_gradient(net, p, G.shape[0])
        forces = contract(dE_dG, batch) if with_forces else None
        return StepForward(energy, forces, dE_dG, passes)


def contract(dE_dG: dict[str, Tensor], batch: Batch) -> Tensor:
    """Forces F = −C · dE/dG (A, 3) over the batch's sparse rows and dense blocks."""
    ref = next(iter(batch.G.values()))
    forces = torch.zeros(batch.total_atoms, 3, dtype=ref.dtype, device=ref.device)
    for element, (center, neighbor, dG) in batch.deriv.items():  # dG (P, 3, F)
        rows = torch.bmm(dG, dE_dG[element].index_select(0, center).unsqueeze(-1))  # shape (P, 3, 1)
        forces.index_add_(0, neighbor, rows.view(-1, 3), alpha=-1.0)
    for element, blocks in batch.dense.items():
        g = dE_dG[element]
        for block in blocks:  # D (B_g, 3n, n_el F)
            contrib = torch.bmm(block.D, g[block.rows].view(block.D.shape[0], -1, 1))  # shape (B_g, 3n, 1)
            forces.index_add_(0, block.atoms.view(-1), contrib.view(-1, 3), alpha=-1.0)
    return forces


def contract_transposed(force_adjoint: Tensor, batch: Batch, shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    """U = −Cᵀ · force_adjoint: element -> (N, F), the adjoint of dE/dG given that of F (A, 3)."""
    out = {}
    for element, (center, neighbor, dG) in batch.deriv.items():
        g = force_adjoint.index_select(0, neighbor).unsqueeze(1)  # shape (P, 1, 3)
        out[element] = torch.zeros(shapes[element], dtype=dG.dtype, device=dG.device).index_add_(
            0, center, torch.bmm(g, dG).squeeze(1), alpha=-1.0)
    for element, blocks in batch.dense.items():
        u = out.get(element)
        if u is None:
            u = out[element] = torch.zeros(shapes[element], dtype=force_adjoint.dtype, device=force_adjoint.device)
        for block in blocks:
            g = force_adjoint[block.atoms].view(block.D.shape[0], 1, -1)  # shape (B_g, 1, 3n)
            u.index_add_(0, block.rows.view(-1), torch.bmm(g, block.D).view(-1, u.shape[1]), alpha=-1.0)
    return out


def backward(model: AtomicModel, fwd: StepForward, batch: Batch, energy_adjoint: Tensor, force_adjoint: Tensor | None,
             weight_decay: float, grads: dict[str, list[tuple[Tensor, Tensor]]]) -> None:
    """Write ∂L/∂W and ∂L/∂b of every network into ``grads`` (element -> [(dW, db)] per layer).

    Args:
        energy_adjoint: (B,) ∂L/∂E_s of each structure energy.
        force_adjoint: (A, 3) ∂L/∂F, or None without a force term.
        weight_decay: c of the penalty's gradient c·W (2λ for λ·Σ w²), added to every dW.
        grads: output tensors, overwritten (views into one flat buffer, so no copies are needed).
    """
    with torch.no_grad():
        shapes = {el: tuple(batch.G[el].shape) for el in fwd.dE_dG}
        U = contract_transposed(force_adjoint, batch, shapes) if force_adjoint is not None and fwd.dE_dG else {}
        for element, p in fwd.passes.items():
            net = model.nets[element]
            atom_adjoint = energy_adjoint.index_select(0, batch.atom_structure[element]).unsqueeze(-1)  # shape (N, 1)
            v = U[element] * net.inv_std if element in U else None
            _net_backward(net, p, atom_adjoint * p.inv_scale, v, weight_decay, grads[element])
        for element, net in model.nets.items():  # an element absent from the batch: only the penalty
            if element not in fwd.passes:
                for (weight, _, _), (dW, db) in zip(_layers(net), grads[element]):
                    torch.mul(weight, weight_decay, out=dW)
                    db.zero_()


def _net_backward(net: ElementNet, p: NetPass, out_adjoint: Tensor, v: Tensor | None, weight_decay: float,
                  grads: list[tuple[Tensor, Tensor]]) -> None:
    """Reverse pass of one network for the objective Σ out_adjoint·h_L + Σ v·∂E/∂x (see module doc)."""
    layers = _layers(net)
    num_layers = len(layers)
    tangents = None  # ḣ_{l−1} and ż_l of each layer, only with a force term
    if v is not None:
        tangents = []
        hdot = v
        for l, (weight, _, _) in enumerate(layers):
            zdot = tnf.linear(hdot, weight)
            tangents.append((hdot, zdot))
            slope = p.slopes[l]
            hdot = zdot if slope is None else zdot * slope
    # Adjoints of z_L and ż_L; the tangent's seed is 1/scale because E = h_L/scale + shift.
    a = out_adjoint
    adot = None
    slope, curvature = p.slopes[-1], p.curvatures[-1]
    if slope is not None:
        a = a * slope
    if tangents is not None:
        adot = p.inv_scale.expand(out_adjoint.shape[0], 1) if slope is None else slope * p.inv_scale
        if curvature is not None:
            a = torch.addcmul(a, curvature * tangents[-1][1], p.inv_scale)
    for l in range(num_layers - 1, -1, -1):
        weight = layers[l][0]
        dW, db = grads[l]
        h = p.inputs[l]
        if weight_decay:
            torch.addmm(weight, a.t(), h, beta=weight_decay, out=dW)
        else:
            torch.mm(a.t(), h, out=dW)
        torch.sum(a, 0, out=db)
        if adot is not None:
            dW.addmm_(adot.t(), tangents[l][0])
        if l == 0:
            break
        a_in = a @ weight  # adjoint of h_{l−1}
        slope, curvature = p.slopes[l - 1], p.curvatures[l - 1]
        if adot is None:
            a = a_in if slope is None else a_in * slope
            continue
        adot_in = adot @ weight
        a = a_in if slope is None else a_in * slope
        if curvature is not None:
            a = torch.addcmul(a, adot_in, curvature * tangents[l - 1][1])
        adot = adot_in if slope is None else adot_in * slope
