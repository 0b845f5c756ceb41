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

Elements whose networks have the same shape (descriptor length, layers, activations) are
evaluated together: their rows are padded to one (n_el, N_max, F) tensor and every layer is
one batched matrix product for all of them. Padded rows get a zero energy adjoint and a zero
tangent, so they add exactly nothing to any gradient, and their energies go to a dummy
structure that is dropped.

How it is laid out, for speed on a CPU core as much as for kernel count (each choice measured on
TiO2, see the comments where it is made): activations are feature-major, (E, n, M), because
torch's products with a long row axis and a handful of columns were 2-10x slower than the same
products transposed; inv_std is folded into the first layer's weights, so no (E, M, F) row scaling
remains; on a CPU the force contractions' products run in numpy on views of the same memory.

Everything runs without autograd (``torch.no_grad``) and without reading a value back to
the host, so a step is a fixed, short sequence of kernels. :func:`aenet_dist.train.predict`
is the autograd reference this module is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as tnf
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .batching import Batch, contraction_index, derivative_elements
from .loss import adjoints, error_sums, loss_coefficients
from .model import AtomicModel, ElementNet, activate_with_derivatives, leading


@dataclass
class GroupPass:
    """One network group's forward pass, kept for its backward pass. Shapes: E elements, M rows each (padded)."""

    elements: tuple[str, ...]
    weights: list[Tensor]  # per layer (E, n_out, n_in), the elements' parameters stacked
    atom_structure: Tensor  # (E, M) batch structure of each row; padded rows: the dummy structure B
    inputs: list[Tensor]  # G − avg (E, M, F), then h_1ᵀ .. h_{L−1}ᵀ (E, n, M): each layer's input (h_0 = inputs[0] ⊙ inv_std)
    first: Tensor  # (E, n_1, F) W_1 ⊙ inv_std: the first layer applied to centered rows
    slopes: list[Tensor | None]  # σ′(z_l)ᵀ, (E, n_out, M); None: linear (σ′ = 1)
    curvatures: list[Tensor | None]  # σ″(z_l)ᵀ; None: linear or not needed
    inv_std: Tensor  # (E, 1, F)
    inv_scale: Tensor  # (E, 1, 1) 1/scale of E = NN/scale + shift
    dE_dG: Tensor | None  # (E, K, F) eV of the first K rows (those with derivative rows), when forces are asked for
    force_rows: int = 0  # K: the force work's leading rows; curvatures are (E, n, K) (slopes (E, n, M), cut in backward)


@dataclass
class StepForward:
    """Energies, forces and the per-group passes of one batch."""

    energy: Tensor  # (B,) cohesive structure energies, eV
    forces: Tensor | None  # (A, 3) eV/Å, None when forces were not asked for
    dE_dG: dict[str, Tensor]  # element -> (K_el, F) eV of its leading rows (Batch.force_rows): views into the groups' dE_dG
    groups: list[GroupPass]


def network_groups(model: AtomicModel) -> list[tuple[str, ...]]:
    """Elements whose networks have the same shape and activations, in species order."""
    groups: dict[tuple, list[str]] = {}
    for element in model.species:
        net = model.nets[element]
        groups.setdefault((net.num_features, net.config), []).append(element)
    return [tuple(members) for members in groups.values()]


class GradientBuffer:
    """Every parameter's ``.grad`` as a view into one flat buffer, laid out by network group.

    Per group and layer, dW is one (E, n_out, n_in) block and db one (E, n_out) block, so the
    backward pass writes a whole group's gradient with one batched product. With ``attach``
    (one rank) every ``param.grad`` is its view and the optimizer reads them directly; without
    (under DDP), :class:`LeanStep` hands the views to autograd and DDP all-reduces them.
    """

    def __init__(self, model: AtomicModel, attach: bool = True):
        self.groups = network_groups(model)
        self.views: dict[str, Tensor] = {}  # parameter name -> its gradient's view
        nets = model.nets
        sizes = []
        for members in self.groups:
            for layer in nets[members[0]].layers:
                sizes += [len(members) * layer.weight.numel(), len(members) * layer.bias.numel()]
        ref = next(model.parameters())
        self.flat = torch.zeros(sum(sizes), dtype=ref.dtype, device=ref.device)
        self.blocks: list[list[tuple[Tensor, Tensor]]] = []
        offset = 0
        for members in self.groups:
            layers = []
            for k, layer in enumerate(nets[members[0]].layers):
                n = len(members)
                dW = self.flat[offset : offset + n * layer.weight.numel()].view(n, *layer.weight.shape)
                offset += dW.numel()
                db = self.flat[offset : offset + n * layer.bias.numel()].view(n, *layer.bias.shape)
                offset += db.numel()
                for e, element in enumerate(members):
                    self.views[f"nets.{element}.layers.{k}.weight"] = dW[e]
                    self.views[f"nets.{element}.layers.{k}.bias"] = db[e]
                    if attach:  # one rank: the parameters' .grad are these views, nothing is copied
                        nets[element].layers[k].weight.grad = dW[e]
                        nets[element].layers[k].bias.grad = db[e]
                layers.append((dW, db))
            self.blocks.append(layers)


def _stacked(nets: list[ElementNet], name: str) -> Tensor:
    """(E, 1, n) stack of a buffer of each net (a 0-d buffer gives (E, 1, 1))."""
    return torch.stack([getattr(net, name) for net in nets]).view(len(nets), 1, -1)


_BUFFERS = ("avg", "inv_std", "scale", "shift")  # what the step reads of each net besides its layers


@dataclass
class GroupTensors:
    """A network group's parameters and the buffers the step reads, one stacked tensor each (E elements).

    The elements' own parameters and buffers are views into these (:func:`share_group_storage`),
    so the optimizer's in-place updates and ``load_state_dict``'s copies land here, and a step
    reads the stacks as they are instead of stacking them anew (some twenty operators a step).
    """

    weights: list[Tensor]  # per layer (E, n_out, n_in)
    biases: list[Tensor]  # per layer (E, 1, n_out)
    buffers: dict[str, Tensor]  # avg, inv_std (E, 1, F); scale, shift (E, 1, 1)
    views: list[tuple[torch.nn.Module, str, Tensor]]  # (module, tensor's name, the stack's slice it must be a view of)

    def intact(self) -> bool:
        """Whether every element tensor is still the view it was made (``model.to`` or an assignment breaks that)."""
        return all(getattr(module, name).data_ptr() == slot.data_ptr() for module, name, slot in self.views)


def share_group_storage(model: AtomicModel) -> None:
    """Re-seat each network group's parameters and buffers as views of stacked tensors (values unchanged).

    Parameter objects, names and ``state_dict`` stay as they are; only their storage moves. Call it
    after the model is on its device and before the step runs; :func:`forward` checks the views are
    intact each step and stacks the tensors itself where they are not.
    """
    groups = {}
    with torch.no_grad():
        for members in network_groups(model):
            stacks = group_tensors(model, members)  # stacked copies (the first time; the shared stacks again after)
            stacks.views = []
            for e, element in enumerate(members):
                net = model.nets[element]
                for k, layer in enumerate(net.layers):
                    layer.weight.data = stacks.weights[k][e]
                    layer.bias.data = stacks.biases[k][e, 0]
                    stacks.views += [(layer, "weight", stacks.weights[k][e]), (layer, "bias", stacks.biases[k][e, 0])]
                for name in _BUFFERS:
                    setattr(net, name, stacks.buffers[name][e].view(getattr(net, name).shape))
                    stacks.views.append((net, name, stacks.buffers[name][e]))
            groups[members] = stacks
    model.lean_groups = groups


def group_tensors(model: AtomicModel, members: tuple[str, ...]) -> GroupTensors:
    """The group's stacked tensors: the shared ones where intact, else stacked now (one step's copies)."""
    shared = getattr(model, "lean_groups", {}).get(members)
    if shared is not None and shared.intact():
        return shared
    nets = [model.nets[el] for el in members]
    weights = [torch.stack([net.layers[k].weight for net in nets]) for k in range(len(nets[0].layers))]
    biases = [torch.stack([net.layers[k].bias for net in nets]).unsqueeze(1) for k in range(len(nets[0].layers))]
    return GroupTensors(weights, biases, {name: _stacked(nets, name) for name in _BUFFERS}, [])


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
        ref = next(iter(batch.G.values()))
        energy = torch.zeros(num_structures + 1, dtype=ref.dtype, device=ref.device)  # the last one: padded rows
        with_rows = set(batch.deriv) | set(batch.dense) if with_forces else set()
        passes, dE_dG = [], {}
        for members in network_groups(model):
            nets = [model.nets[el] for el in members]
            rows = [batch.G[el].shape[0] for el in members]
            num_rows = max(rows)
            if num_rows == 0:
                continue
            stacks = group_tensors(model, members)
            avg, inv_std, inv_scale = stacks.buffers["avg"], stacks.buffers["inv_std"], stacks.buffers["scale"].reciprocal()
            centered, atom_structure = _group_rows(batch, members, avg, keep=bool(stacks.views))  # shapes (E, M, F), (E, M)
            # The force work (dE/dG, σ″, and in backward the tangent pass) runs on the leading rows only.
            force_rows = max(_force_rows(batch, el) for el in members) if any(el in with_rows for el in members) else 0
            second = for_training and force_rows > 0
            # x = (G − avg) ⊙ inv_std enters only through x W_1ᵀ, so inv_std is folded into W_1 (an (E, n_1, F)
            # product) instead of scaling every row; avg is still subtracted from the rows, where it is exact.
            first = stacks.weights[0] * inv_std
            # Feature-major activations, zᵀ = W hᵀ + b (E, n, M): on a CPU core, torch's products with a long
            # row axis and 5 columns ran 2-10x slower than the same products transposed (M = 1650, f32:
            # 154 against 82 µs for the first layer, 162 against 18 µs for a 5 x 5 layer).
            h = centered.transpose(1, 2)
            inputs, slopes, curvatures = [centered], [], []
            for k, act in enumerate(nets[0]._act):
                if k:
                    inputs.append(h)
                z = torch.baddbmm(stacks.biases[k].transpose(1, 2), first if k == 0 else stacks.weights[k], h)
                h, slope, curvature = activate_with_derivatives(z, act, second, rows=force_rows)
                slopes.append(slope)
                curvatures.append(curvature)
            atomic = torch.addcmul(stacks.buffers["shift"], h, inv_scale)  # shape (E, 1, M): E_i − E_atom, eV
            energy.index_add_(0, atom_structure.view(-1), atomic.view(-1))
            p = GroupPass(members, stacks.weights, atom_structure, inputs, first, slopes, curvatures, inv_std, inv_scale, None,
                          force_rows)
            if force_rows:
                p.dE_dG = _input_gradient(p)
                for e, el in enumerate(members):
                    dE_dG[el] = p.dE_dG[e, : _force_rows(batch, el)]
            passes.append(p)
        forces = contract(dE_dG, batch) if with_forces else None
        return StepForward(energy[:num_structures], forces, dE_dG, passes)


def _force_rows(batch: Batch, element: str) -> int:
    """How many leading rows of ``element`` the force work needs (:attr:`Batch.force_rows`; all without that layout)."""
    return batch.G[element].shape[0] if batch.force_rows is None else batch.force_rows.get(element, 0)


def _group_rows(batch: Batch, members: tuple[str, ...], avg: Tensor, keep: bool) -> tuple[Tensor, Tensor]:
    """G − avg of the group's elements, (E, M, F), and the batch structure of each row, (E, M): each
    element's rows, then padding rows up to M (the most rows of any of them).

    The padding rows hold −avg: finite, and they get zero adjoints and tangents, so they add exact
    zeros to every gradient (two operators for the group, where a copy per element took a dozen).
    Their structure is the dummy one after the batch's. With :attr:`Batch.step_cache` and ``keep``
    (``avg`` is the model's own stacked buffer, not a copy made for this step) both are made once per
    batch: the entry holds the tensors it was made from and their versions, so a changed ``avg`` or
    ``G`` (in place or replaced) makes them anew.
    """
    cache = batch.step_cache if keep else None
    sources = (avg, *(batch.G[el] for el in members))
    versions = tuple(t._version for t in sources)
    entry = cache.get(("group rows", members)) if cache is not None else None
    if entry is not None and all(a is b for a, b in zip(entry[0], sources)) and entry[1] == versions:
        return entry[2]
    if len(members) == 1:
        rows = (torch.sub(batch.G[members[0]], avg[0]).unsqueeze(0), batch.atom_structure[members[0]].unsqueeze(0))
    else:
        rows = (pad_sequence([batch.G[el] for el in members], batch_first=True).sub_(avg),
                pad_sequence([batch.atom_structure[el] for el in members], batch_first=True,
                             padding_value=batch.num_atoms.numel()))
    if cache is not None:
        cache[("group rows", members)] = (sources, versions, rows)
    return rows


def _input_gradient(p: GroupPass) -> Tensor:
    """dE_i/dG_i (E, K, F) of the leading K rows, eV per descriptor unit: the chain of Wᵀ·diag(σ′) products.

    The last product is with W_1 ⊙ (inv_std/scale), an (E, n_1, F) tensor, so no (E, K, F) row
    scaling follows it.
    """
    num_rows = p.force_rows
    delta = None  # adjointᵀ of the current layer's output (E, n_out, 1 or K); None: all ones
    for l in range(len(p.weights) - 1, 0, -1):
        slope = leading(p.slopes[l], num_rows)
        if slope is not None:
            delta = slope if delta is None else delta * slope
        weight_t = p.weights[l].transpose(1, 2)
        delta = weight_t if delta is None else torch.bmm(weight_t, delta)  # shape (E, n_in, 1 or K)
    if p.slopes[0] is not None:
        slope = leading(p.slopes[0], num_rows)
        delta = slope if delta is None else delta * slope
    first = p.weights[0] * (p.inv_std * p.inv_scale)
    if delta is None:  # a single linear layer
        return first.expand(-1, num_rows, -1)
    return torch.bmm(delta.transpose(1, 2), first).expand(-1, num_rows, -1)  # shape (E, K, F)


def _contract_index(batch: Batch, element: str) -> tuple[Tensor, Tensor]:
    """(G rows, atoms) of ``element``'s sparse rows then dense blocks (the batch's, if it has them)."""
    index = batch.contract_index.get(element)
    return index if index is not None else contraction_index(batch, element)


def _pieces(flat, blocks, axis: int) -> list:
    """``flat`` (a tensor or numpy array) cut into one piece per block, each viewed as (B_g, D.shape[axis])."""
    pieces, start = [], 0
    for b in blocks:
        rows, size = int(b.D.shape[0]), int(b.D.shape[axis])
        pieces.append(flat[start : start + rows * size].reshape(rows, size))
        start += rows * size
    return pieces


# The contractions' products on a CPU go through numpy (views of the tensors' memory): its stacked
# matmul runs one OpenBLAS matrix-vector product per matrix and reads a dense block at memory speed,
# where torch's bmm took 1.3-1.8x as long; its einsum did the sparse rows' 3 x F products in 0.4-0.5x
# the time of torch's bmm (TiO2 blocks and 5,000 sparse rows, one core, float32 and float64). The batch
# carries the numpy views of its blocks and sparse rows, and the step's buffers are numpy's, so no
# tensor is converted in a step (a conversion costs four dispatcher calls).
# numpy's OpenBLAS keeps to one thread (aenet_dist sets OPENBLAS_NUM_THREADS=1, one thread per rank
# being the default), so with run.cpu_threads > 1 torch's threaded products are used instead.
HOST_PRODUCTS = True  # False: torch's products on the CPU too (the path other devices take; for tests)
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _on_host(t: Tensor) -> bool:
    """Whether the contraction products of ``t``'s device run in numpy (a CPU tensor, one torch thread)."""
    return HOST_PRODUCTS and t.device.type == "cpu" and torch.get_num_threads() == 1


def _buffer(like: Tensor, rows: int, width: int) -> tuple[Tensor, np.ndarray | None]:
    """An empty (rows, width) tensor like ``like``, and a numpy view of it where the products run in numpy.

    On the host the memory is numpy's and the tensor wraps it (``torch.from_numpy`` is one operator,
    and the numpy side is sliced and reshaped without any).
    """
    if not _on_host(like):
        return like.new_empty((rows, width)), None
    host = np.empty((rows, width), dtype=_NUMPY[like.dtype])
    return torch.from_numpy(host), host


# A contraction buffer is kept with its batch only while it is this small a share of the element's
# derivative data: true of dense blocks (their buffers hold a row per center, not per atom pair, ~1-2 %),
# not of sparse rows (a third of their dG/dR), which would grow a kept batch by up to 70 %.
KEPT_BUFFER_SHARE = 0.05


def _kept_buffer(batch: Batch, key: tuple, like: Tensor, rows: int, width: int) -> tuple[Tensor, np.ndarray | None]:
    """A :func:`_buffer` pair for one use within a step, made once per batch where the batch keeps
    what the step derives from it (:attr:`Batch.step_cache`) and the buffer is small beside the
    element's derivative data (KEPT_BUFFER_SHARE): a new buffer is an allocation and a ``from_numpy``."""
    cache = batch.step_cache
    if cache is None or ("not kept", *key) in cache:
        return _buffer(like, rows, width)
    pair = cache.get(key)
    if pair is None or pair[0].dtype != like.dtype or pair[0].device != like.device or pair[0].shape != (rows, width) \
            or (pair[1] is None) == _on_host(like):
        pair = _buffer(like, rows, width)
        element = key[1]
        data = sum(b.D.numel() for b in batch.dense.get(element, []) if b.D is not None)
        if element in batch.deriv and batch.deriv[element][2] is not None:
            data += batch.deriv[element][2].numel()
        if rows * width <= KEPT_BUFFER_SHARE * data:
            cache[key] = pair
        else:  # decided once: a buffer too large to keep is not weighed again every step
            cache[("not kept", *key)] = True
    return pair


def _gathered(batch: Batch, key: tuple, values: Tensor, index: Tensor) -> tuple[Tensor, np.ndarray | None]:
    """values[index] (a :func:`_buffer` pair): the rows a contraction reads, written once into its buffer."""
    rows = _kept_buffer(batch, key, values, index.numel(), values.shape[1])
    torch.index_select(values, 0, index, out=rows[0])
    return rows


def _products(batch: Batch, element: str, x: tuple[Tensor, np.ndarray | None], out: tuple[Tensor, np.ndarray | None],
              transposed: bool) -> None:
    """out = C x for one element's derivative rows (``transposed``: out = Cᵀ x), C its sparse rows then
    its dense blocks, in the order of :attr:`Batch.contract_index`.

    ``x`` and ``out`` are :func:`_buffer` pairs. Forward: x (rows, F) of dE/dG, out (atoms, 3).
    Transposed: x (atoms, 3), out (rows, F). The sparse rows take the first P rows of both.

    The transposed products read the derivative rows in the reverse order of the forward ones: the
    rows the forward pass read last are the likeliest still in cache (each piece writes its own
    rows of ``out``, so the order changes no bit). Measured on TiO2, float32, one core: a step took
    0.3 ms (8 %) less.
    """
    deriv = batch.deriv.get(element)
    num_sparse = 0 if deriv is None else deriv[2].shape[0]
    blocks = batch.dense.get(element)
    dense = _dense_pieces(batch, element, blocks, x, out, num_sparse, transposed) if blocks else None
    if dense and transposed:
        _dense_products(dense, transposed)
    if deriv is not None:
        dG = deriv[2]  # (P, 3, F)
        if x[1] is not None:
            dG_host = batch.deriv_host.get(element)
            np.einsum("pcf,pc->pf" if transposed else "pcf,pf->pc", dG.numpy() if dG_host is None else dG_host,
                      x[1][:num_sparse], out=out[1][:num_sparse])
        elif transposed:  # three multiply-adds over (P, F) slices: fewer kernels than P batched 1 x 3 @ 3 x F products
            xs, ys = x[0][:num_sparse], out[0][:num_sparse]
            torch.mul(dG[:, 0], xs[:, 0:1], out=ys)
            ys.addcmul_(dG[:, 1], xs[:, 1:2]).addcmul_(dG[:, 2], xs[:, 2:3])
        else:
            torch.bmm(dG, x[0][:num_sparse].unsqueeze(-1), out=out[0][:num_sparse].unsqueeze(-1))
    if dense and not transposed:
        _dense_products(dense, transposed)


def _flat_tail(pair: tuple[Tensor, np.ndarray | None], start: int):
    """Rows ``start:`` of a :func:`_buffer` pair, flattened: the numpy array where there is one, else the tensor."""
    return pair[1][start:].reshape(-1) if pair[1] is not None else pair[0][start:].reshape(-1)


def _dense_pieces(batch: Batch, element: str, blocks, x: tuple, out: tuple, start: int, transposed: bool) -> list:
    """Per dense block, in the order the products run: (D, its x piece, its out piece), viewed for the
    product (numpy on the host, else tensors), from rows ``start:`` of the :func:`_buffer` pairs.

    Per block and matrix s: out_s = D_s x_s, or D_sᵀ x_s when ``transposed``; x (S, K) and out (S, R)
    per block with D (S, R, K), or x (S, R) and out (S, K) when transposed. Where the batch keeps its
    buffers (:func:`_kept_buffer`) the pieces are kept with them: some sixty µs of slicing a step.
    """
    cache = batch.step_cache
    key = ("dense pieces", element, transposed)
    entry = cache.get(key) if cache is not None else None
    if entry is not None and entry[0] is x and entry[1] is out:
        return entry[2]
    flat_x, flat_out = (_flat_tail(pair, start) for pair in (x, out))
    axes = (1, 2) if transposed else (2, 1)
    host = isinstance(flat_x, np.ndarray)
    pieces = []
    for block, xs, ys in zip(blocks, _pieces(flat_x, blocks, axes[0]), _pieces(flat_out, blocks, axes[1])):
        if host:
            D = block.host if block.host is not None else block.D.numpy()
            pieces.append((D, xs[:, None, :], ys[:, None, :]) if transposed else (D, xs[:, :, None], ys[:, :, None]))
        else:  # (D x)ᵀ = xᵀ Dᵀ: row vector times matrix
            pieces.append((block.D if transposed else block.D.transpose(1, 2), xs.unsqueeze(1), ys.unsqueeze(1)))
    if transposed:  # the reverse of the forward pass's order (see _products)
        pieces.reverse()
    kept = ("force adjoint rows", "dE_dG adjoint rows") if transposed else ("dE_dG rows", "forces")
    if cache is not None and cache.get((kept[0], element)) is x and cache.get((kept[1], element)) is out:
        cache[key] = (x, out, pieces)  # only with buffers the batch keeps: the pieces are views of them
    return pieces


def _dense_products(pieces: list, transposed: bool) -> None:
    """The products of :func:`_dense_pieces`: numpy's stacked matmul on the host, else torch's bmm."""
    if isinstance(pieces[0][1], np.ndarray):
        for D, xs, ys in pieces:
            if transposed:
                np.matmul(xs, D, out=ys)
            else:
                np.matmul(D, xs, out=ys)
        return
    for D_t, xs, ys in pieces:
        torch.bmm(xs, D_t, out=ys)


def contract(dE_dG: dict[str, Tensor], batch: Batch) -> Tensor:
    """Forces F = −C · dE/dG (A, 3) over the batch's sparse rows and dense blocks.

    Per element, all its derivative rows (sparse rows and every dense block) share one gather of
    their dE/dG rows and one scatter of their forces, with the products in between: the operator
    count does not grow with the number of distinct structure sizes in a batch.
    """
    ref = next(iter(batch.G.values()))
    # C · dE/dG is summed, then negated once: index_add_ with alpha=-1 took 4-6x as long as without
    # on a CPU core (synthetic set: 12 of a 35 ms step). Negation is exact, so the bits are those
    # of summing the negated terms (an atom without rows gets −0.0).
    forces = torch.zeros(batch.total_atoms, 3, dtype=ref.dtype, device=ref.device)
    for element in derivative_elements(batch):
        rows, atoms = _contract_index(batch, element)
        contrib = _kept_buffer(batch, ("forces", element), ref, atoms.numel(), 3)
        _products(batch, element, _gathered(batch, ("dE_dG rows", element), dE_dG[element], rows), contrib, transposed=False)
        forces.index_add_(0, atoms, contrib[0])
    return forces.neg_()


def contract_transposed(force_adjoint: Tensor, batch: Batch, out: dict[str, Tensor]) -> None:
    """out[element] −= Cᵀ · force_adjoint: the adjoint of dE/dG (N, F) given that of F (A, 3).

    ``out`` holds zeroed (N, F) tensors (views into a group's padded rows are fine).
    """
    negated = force_adjoint.neg()  # so that index_add_ runs without its slow alpha (see contract)
    for element in reversed(derivative_elements(batch)):  # the reverse of contract's order (see _products)
        u = out[element]
        rows, atoms = _contract_index(batch, element)
        contrib = _kept_buffer(batch, ("dE_dG adjoint rows", element), negated, rows.numel(), u.shape[1])
        _products(batch, element, _gathered(batch, ("force adjoint rows", element), negated, atoms), contrib, transposed=True)
        u.index_add_(0, rows, contrib[0])


def backward(model: AtomicModel, fwd: StepForward, batch: Batch, energy_adjoint: Tensor, force_adjoint: Tensor | None,
             weight_decay: float, grads: GradientBuffer) -> None:
    """Write ∂L/∂W and ∂L/∂b of every network into ``grads`` (and so into every ``param.grad``).

    Args:
        energy_adjoint: (B,) ∂L/∂E_s of each structure energy.
        force_adjoint: (A, 3) ∂L/∂F, or None without a force term.
        weight_decay: c of the penalty's gradient c·W (2λ for λ·Σ w²), added to every dW.
        grads: the model's gradient buffer, overwritten.
    """
    with torch.no_grad():
        adjoint_of_structure = tnf.pad(energy_adjoint, (0, 1))  # the dummy structure of padded rows: 0
        # Adjoint of each group's dE/dG (E, K, F), where the group has derivative rows and a force term.
        dE_dG_adjoints = [None if force_adjoint is None or p.dE_dG is None else p.dE_dG.new_zeros(p.dE_dG.shape) for p in fwd.groups]
        if force_adjoint is not None:
            U = {el: u[e, : _force_rows(batch, el)]
                 for p, u in zip(fwd.groups, dE_dG_adjoints) if u is not None for e, el in enumerate(p.elements)}
            contract_transposed(force_adjoint, batch, U)
        done = set()
        for p, u in zip(fwd.groups, dE_dG_adjoints):
            g = grads.groups.index(p.elements)
            done.add(g)
            atom_adjoint = (adjoint_of_structure[p.atom_structure] * p.inv_scale.view(-1, 1)).unsqueeze(1)  # shape (E, 1, M)
            _group_backward(p, atom_adjoint, u, weight_decay, grads.blocks[g])
        for g, members in enumerate(grads.groups):  # no rows in this batch: only the penalty
            if g not in done:
                stacks = group_tensors(model, members)
                for k, (dW, db) in enumerate(grads.blocks[g]):
                    torch.mul(stacks.weights[k], weight_decay, out=dW)
                    db.zero_()


def _group_backward(p: GroupPass, out_adjoint: Tensor, u: Tensor | None, weight_decay: float,
                    grads: list[tuple[Tensor, Tensor]]) -> None:
    """Reverse pass of one group for the objective Σ out_adjoint·h_L + Σ v·∂E/∂x, v = u ⊙ inv_std (see module doc).

    Feature-major like the forward pass: adjoints are (E, n, M), tangents and their adjoints (E, n, K),
    the leading K rows (``p.force_rows``): v is zero on the others, so their tangents are too. The first
    layer works on unscaled rows: ż_1ᵀ = (W_1 ⊙ inv_std) uᵀ, and ∂L/∂W_1 = (ā_1ᵀ (G − avg) + ȧ_1ᵀ u) ⊙ inv_std,
    one (E, n_1, F) scaling.
    """
    num_layers = len(p.weights)
    num_rows = p.force_rows
    tangents = None  # (ḣ_{l−1}, ż_l) of each layer (ḣ_0 = u, row-major), only with a force term
    if u is not None:
        slopes = [leading(slope, num_rows) for slope in p.slopes]  # on the leading rows
        tangents = []
        hdot = u
        for l in range(num_layers):
            zdot = torch.bmm(p.first, u.transpose(1, 2)) if l == 0 else torch.bmm(p.weights[l], hdot)
            tangents.append((hdot, zdot))
            hdot = zdot if slopes[l] is None else zdot * slopes[l]
    # Adjoints of z_L and ż_L; the tangent's seed is 1/scale because E = h_L/scale + shift. A σ″ term
    # adds to the leading rows of ā only; ā is a fresh tensor wherever there is one (σ″ implies σ′).
    a = out_adjoint
    adot = None
    slope, curvature = p.slopes[-1], p.curvatures[-1]
    if slope is not None:
        a = a * slope
    if tangents is not None:
        adot = p.inv_scale.expand(-1, 1, num_rows) if slope is None else slopes[-1] * p.inv_scale
        if curvature is not None:
            leading(a, num_rows).addcmul_(curvature * tangents[-1][1], p.inv_scale)
    for l in range(num_layers - 1, -1, -1):
        weight = p.weights[l]
        dW, db = grads[l]
        torch.sum(a, 2, out=db)
        if l == 0:  # products with the unscaled rows, then one scaling by inv_std
            products = torch.bmm(a, p.inputs[0])
            if adot is not None:
                products.baddbmm_(adot, tangents[0][0])
            if weight_decay:
                torch.addcmul(weight * weight_decay, products, p.inv_std, out=dW)
            else:
                torch.mul(products, p.inv_std, out=dW)
            break
        h_t = p.inputs[l].transpose(1, 2)  # (E, M, n_in)
        if weight_decay:
            torch.baddbmm(weight, a, h_t, beta=weight_decay, out=dW)
        else:
            torch.bmm(a, h_t, out=dW)
        if adot is not None:
            dW.baddbmm_(adot, tangents[l][0].transpose(1, 2))
        weight_t = weight.transpose(1, 2)
        a_in = torch.bmm(weight_t, a)  # adjointᵀ of h_{l−1}
        slope, curvature = p.slopes[l - 1], p.curvatures[l - 1]
        a = a_in if slope is None else a_in * slope
        if adot is None:
            continue
        adot_in = torch.bmm(weight_t, adot)
        if curvature is not None:
            leading(a, num_rows).addcmul_(adot_in, curvature * tangents[l - 1][1])
        adot = adot_in if slope is None else adot_in * slopes[l - 1]


class _HandOverGradients(torch.autograd.Function):
    """A zero loss whose backward returns ready gradients for every parameter.

    DistributedDataParallel then sees an ordinary ``loss.backward()``: its hook on each
    parameter fires as autograd hands the gradient over, and it all-reduces them in buckets.
    Every parameter is an input, so every parameter takes part in every step (a static graph).
    """

    @staticmethod
    def forward(ctx, gradients: list[Tensor], *params: Tensor) -> Tensor:
        ctx.gradients = gradients
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        # grad_output is 1: the caller backpropagates the returned scalar itself, nothing scales it.
        return (None, *ctx.gradients)


class LeanStep(torch.nn.Module):
    """The lean step as a module, so that ``DistributedDataParallel(LeanStep(model))`` wraps it.

    With several ranks one collective per step carries everything: the gradient is linear in the
    two adjoints, ∇L = c_E(totals)·G_E + c_F(totals)·G_F, where G_E and G_F are the gradients of
    Σ sse_E and Σ sse_F (unit coefficients) and c = :func:`~aenet_dist.loss.loss_coefficients` of
    the global error sums. ``forward`` computes this rank's G_E (handed to autograd, so DDP's
    buckets hold it), G_F and error sums; DDP's communication hook
    (:func:`aenet_dist.dist.fused_step_hook`) sums [G_E, G_F, sums] over ranks in one all-reduce
    and combines them. Two collectives per step (the sums first, then the gradients) cost twice the
    latency: 1.3-1.4 ms each between two gloo ranks on a 2-vCPU VM, against ~7 ms of work.
    """

    def __init__(self, model: AtomicModel):
        super().__init__()
        self.model = model
        self.gradients = GradientBuffer(model, attach=False)  # G_E: what DDP's buckets carry
        self.force_gradients = GradientBuffer(model, attach=False)  # G_F: added to the bucket by the hook
        self._names = [name for name, _ in model.named_parameters()]
        self._force_view = {id(p): self.force_gradients.views[n] for n, p in model.named_parameters()}
        # What forward hands to autograd each step, listed once (named_parameters walks the modules:
        # ~60 Python calls a step). Parameters are updated in place, so the lists stay valid.
        self._params = [p for _, p in model.named_parameters()]
        self._grad_views = [self.gradients.views[n] for n in self._names]
        self.local_sums: Tensor | None = None  # (4,) this rank's error sums of the step
        self.replay: Callable[[Batch], Tensor] | None = None  # local_step from CUDA graphs (aenet_dist.graphs)
        self.replay_force_weight = 0.0  # the force weight replay's local_step runs with

    def force_gradient_of(self, param: Tensor) -> Tensor:
        """G_F of one parameter (a view into the flat buffer)."""
        return self._force_view[id(param)]

    def local_step(self, batch: Batch, force_weight: float) -> Tensor:
        """This rank's G_E and G_F, written into the two gradient buffers; returns its error sums (4,).

        Reads nothing back to the host, so :class:`~aenet_dist.graphs.GraphedStep` can replay it.
        """
        fwd = forward(self.model, batch, with_forces=force_weight > 0)
        sums = error_sums(batch, fwd.energy, fwd.forces)
        local_sums = sums.detached()
        unit = torch.ones(2, dtype=local_sums.dtype, device=local_sums.device)
        energy_adjoint, force_adjoint = adjoints(sums, unit)
        backward(self.model, fwd, batch, energy_adjoint, None, 0.0, self.gradients)
        if force_weight > 0:
            backward(self.model, fwd, batch, torch.zeros_like(energy_adjoint), force_adjoint, 0.0, self.force_gradients)
        else:
            self.force_gradients.flat.zero_()
        return local_sums

    def forward(self, batch: Batch, force_weight: float) -> Tensor:
        """A zero scalar whose ``backward()`` hands G_E to DDP; G_F and the error sums are kept for the hook.

        ``self.replay`` (set by the trainer for ``run.cuda_graphs``) runs :meth:`local_step` from CUDA graphs.
        """
        if self.replay is not None:
            if force_weight != self.replay_force_weight:
                raise ValueError(f"the step was captured for force weight {self.replay_force_weight}, not {force_weight}")
            self.local_sums = self.replay(batch)
        else:
            self.local_sums = self.local_step(batch, force_weight)
        return _HandOverGradients.apply(self._grad_views, *self._params)


def compute_gradients(model: AtomicModel, batch: Batch, force_weight: float, loss_weights: Tensor, weight_decay: float,
                      reduce: Callable[[Tensor], Tensor], gradients: GradientBuffer) -> Tensor:
    """One step's gradients into ``gradients``; returns the global error sums (4,).

    Args:
        force_weight: α of the loss (0: no forces are computed).
        loss_weights: (2,) tensor (1 − α, α) on the device.
        weight_decay: c of the penalty's gradient c·W (2λ / world size for λ·Σ w² on every rank).
        reduce: sums a (4,) tensor over ranks (identity on one rank).
    """
    fwd = forward(model, batch, with_forces=force_weight > 0)
    sums = error_sums(batch, fwd.energy, fwd.forces)
    totals = reduce(sums.detached())
    energy_adjoint, force_adjoint = adjoints(sums, loss_coefficients(totals, loss_weights))
    backward(model, fwd, batch, energy_adjoint, force_adjoint if force_weight > 0 else None, weight_decay, gradients)
    return totals
