"""Per-element MLPs of an aenet Behler-Parrinello potential; atomic energies and forces via dG/dR.

The energy model is aenet's (``aenet.f90``, ``potential.f90``, ``sfsetup.f90: stp_normalize``):

    x_i = (G_i - avg) / std             std = sqrt(cov - avg**2), factor 0 where std <= 1e-10
    E_i = NN_t(x_i) / scale + shift + E_atom(t)                                   (eV)
    F_a = -sum_i sum_f dE_i/dG_if * dG[i -> a, f, :]                               (eV/Å)

This module knows nothing of files, stores or ranks; :mod:`aenet_dist.export` converts
to and from aenet ``.nn`` files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The activation tables, aenet's constants and the name <-> code functions live in the torch-free
# aenet_dist.potential (numpy inference needs them without torch); still importable from here,
# and __all__ lists them as this module's re-exports.
from .potential import (_ALIASES, _MTANH_A, _MTANH_B, _TWIST_C, ACTIVATION_NAMES, ACTIVATIONS, STD_EPS,
                        activation_code, activation_name)

__all__ = ["ACTIVATIONS", "ACTIVATION_NAMES", "STD_EPS", "activation_code", "activation_name", "activate",
           "activate_with_derivatives", "leading", "NetworkConfig", "ElementNet", "AtomicModel", "model_from_facts",
           "forces_from_dEdG"]


def activate(x: Tensor, name: str) -> Tensor:
    """Apply aenet activation ``name`` elementwise (``ff_activate``)."""
    if name == "linear":
        return x
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "mtanh":
        return _MTANH_A * torch.tanh(_MTANH_B * x)
    if name == "twist":
        return _MTANH_A * torch.tanh(_MTANH_B * x) + _TWIST_C * x
    raise ValueError(f"unknown activation {name!r}")


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(value: float, like: Tensor) -> Tensor:
    """A 0-d tensor of ``value`` in ``like``'s dtype and device, made once (not an operator every step)."""
    key = (value, like.dtype, like.device)
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = _CONSTANTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return constant


def leading(x: Tensor | None, rows: int | None) -> Tensor | None:
    """The first ``rows`` entries of ``x`` along its last axis (all of it for None, with no operator;
    None for None: a constant derivative)."""
    return x if x is None or rows is None or rows == x.shape[-1] else x[..., :rows]


def activate_with_derivatives(x: Tensor, name: str, second: bool = True,
                              rows: int | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(σ(x), σ'(x), σ''(x)) of aenet activation ``name``, each one or two fused operators.

    ``None`` stands for a constant derivative (linear: σ' = 1, σ'' = 0), so callers skip
    the multiplication. ``second=False`` leaves σ'' out (None) when no force term needs it;
    ``rows`` computes σ'' of the first ``rows`` entries along the last axis only.
    The forms follow from σ(x) written through t = tanh(·) or s = sigmoid(·):
    tanh: σ' = 1 − t², σ'' = −2 t σ'; sigmoid: σ' = s(1 − s), σ'' = σ'(1 − 2s);
    mtanh (a tanh(b x)): σ' = a b (1 − t²), σ'' = −2 b t σ'; twist adds c x to mtanh, so σ' gains c.
    """
    if name == "linear":
        return x, None, None
    if name in ("tanh", "mtanh", "twist"):
        a, b = (1.0, 1.0) if name == "tanh" else (_MTANH_A, _MTANH_B)
        t = torch.tanh(x if b == 1.0 else b * x)
        y = t if name == "tanh" else (a * t if name == "mtanh" else a * t + _TWIST_C * x)  # as activate(), bitwise
        slope = torch.addcmul(_constant(a * b, x), t, t, value=-a * b)  # a b (1 − t²)
        curvature = torch.mul(leading(t, rows), leading(slope, rows)).mul_(-2.0 * b) if second else None
        if name == "twist":
            slope = slope.add_(_TWIST_C)
        return y, slope, curvature
    if name == "sigmoid":
        s = torch.sigmoid(x)
        slope = torch.addcmul(s, s, s, value=-1.0)  # s (1 − s)
        lead = leading(slope, rows)
        curvature = torch.addcmul(lead, lead, leading(s, rows), value=-2.0) if second else None  # σ'(1 − 2s)
        return s, slope, curvature
    raise ValueError(f"unknown activation {name!r}")


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of one element's network (aenet ``NETWORKS`` line, e.g. ``5:tanh 5:tanh``).

    Attributes:
        hidden: number of nodes of each hidden layer.
        activations: activation name of each hidden layer (see :data:`ACTIVATIONS`).
        output_activation: activation of the single output node; aenet trains with
            ``linear`` (the default) but a ``.nn`` file may say otherwise.
    """

    hidden: tuple[int, ...] = (5, 5)
    activations: tuple[str, ...] = ("tanh", "tanh")
    output_activation: str = "linear"

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "activations", tuple(_ALIASES.get(a, a) for a in self.activations))
        object.__setattr__(self, "output_activation", _ALIASES.get(self.output_activation, self.output_activation))
        if len(self.hidden) != len(self.activations):
            raise ValueError(f"hidden has {len(self.hidden)} layers but activations has {len(self.activations)}: "
                             f"hidden={self.hidden}, activations={self.activations}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be >= 1, got {self.hidden}")
        for a in (*self.activations, self.output_activation):
            activation_code(a)  # raises ValueError naming the bad one

    @property
    def activation_codes(self) -> tuple[int, ...]:
        """aenet codes of all non-input layers (hidden layers, then output)."""
        return tuple(activation_code(a) for a in (*self.activations, self.output_activation))


class ElementNet(nn.Module):
    """One element's MLP plus aenet's feature normalization and energy scaling.

    Buffers (all follow ``.to(dtype/device)``):
        sfval_min, sfval_max, sfval_avg, sfval_cov: (F,) raw descriptor statistics as stored
            in the ``.nn`` file (cov is the mean of G**2, not the variance).
        neval: () int64, number of atoms the statistics were taken over.
        avg: (F,) = sfval_avg; std: (F,) = sqrt(cov - avg**2) (negative round-off clamped to 0);
        inv_std: (F,) = 1/std, or 0 where std <= 1e-10 (aenet's rule).
        scale: () energy divisor; shift: () eV/atom; e_atom: () atomic reference energy, eV.
    """

    def __init__(self, num_features: int, config: NetworkConfig, element: str = "",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"{element or 'ElementNet'}: num_features must be >= 1, got {num_features}")
        self.element = element
        self.config = config
        self.num_features = int(num_features)
        kw = {"dtype": dtype if dtype is not None else torch.get_default_dtype(), "device": device}
        sizes = (self.num_features, *config.hidden, 1)
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out, **kw) for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        self._act = (*config.activations, config.output_activation)
        F = self.num_features
        for name in ("sfval_min", "sfval_max", "sfval_avg", "sfval_cov", "avg", "std"):
            self.register_buffer(name, torch.zeros(F, **kw))
        self.register_buffer("inv_std", torch.ones(F, **kw))
        self.register_buffer("neval", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("scale", torch.ones((), **kw))
        self.register_buffer("shift", torch.zeros((), **kw))
        self.register_buffer("e_atom", torch.zeros((), **kw))

    @torch.no_grad()
    def set_feature_stats(self, sfval_min, sfval_max, sfval_avg, sfval_cov, neval: int) -> None:
        """Set aenet's descriptor statistics (each (F,)) and derive avg, std, inv_std from them."""
        for name, value in (("sfval_min", sfval_min), ("sfval_max", sfval_max),
                            ("sfval_avg", sfval_avg), ("sfval_cov", sfval_cov)):
            value = torch.as_tensor(value, dtype=torch.float64)
            if value.shape != (self.num_features,):
                raise ValueError(f"{self.element}: {name} has shape {tuple(value.shape)}, expected ({self.num_features},)")
            getattr(self, name).copy_(value)
        # Derive in float64 from the float64 inputs, then store in the module's dtype.
        avg = torch.as_tensor(sfval_avg, dtype=torch.float64)
        var = torch.as_tensor(sfval_cov, dtype=torch.float64) - avg * avg
        std = torch.sqrt(var.clamp(min=0.0))  # aenet would give NaN for var < 0; 0 -> factor 0 instead
        self.avg.copy_(avg)
        self.std.copy_(std)
        self.inv_std.copy_(torch.where(std > STD_EPS, 1.0 / std.clamp(min=STD_EPS), torch.zeros_like(std)))
        self.neval.fill_(int(neval))

    @torch.no_grad()
    def set_energy_scaling(self, scale: float, shift: float, e_atom: float) -> None:
        """Set E_i = NN/scale + shift + e_atom (scale a divisor, shift eV/atom, e_atom eV)."""
        if not scale or scale != scale:
            raise ValueError(f"{self.element}: energy scale must be non-zero, got {scale}")
        self.scale.fill_(float(scale))
        self.shift.fill_(float(shift))
        self.e_atom.fill_(float(e_atom))

    def normalize(self, G: Tensor) -> Tensor:
        """Network inputs x = (G - avg) * inv_std; G (N, F) raw -> (N, F)."""
        return (G - self.avg) * self.inv_std

    def network(self, x: Tensor) -> Tensor:
        """Bare MLP output NN(x): x (N, F) -> (N,)."""
        h = x
        for layer, act in zip(self.layers, self._act):
            h = activate(layer(h), act)
        return h.squeeze(-1)

    def forward(self, G: Tensor, cohesive: bool = False) -> Tensor:
        """Atomic energies E_i in eV from raw descriptors G (N, F) -> (N,).

        With ``cohesive`` the atomic reference energy is left out (E_i − E_atom): training
        compares cohesive energies, which float32 resolves far better than totals.
        """
        if G.shape[-1] != self.num_features:
            raise ValueError(f"{self.element}: descriptors have {G.shape[-1]} features, network expects {self.num_features}")
        energy = self.network(self.normalize(G)) / self.scale + self.shift
        return energy if cohesive else energy + self.e_atom

    def extra_repr(self) -> str:
        return f"element={self.element!r}, num_features={self.num_features}, activations={self._act}"


class AtomicModel(nn.Module):
    """One :class:`ElementNet` per element; atomic energies by element, one network call each."""

    def __init__(self, nets: Mapping[str, ElementNet], species: Sequence[str] | None = None):
        super().__init__()
        species = tuple(species) if species is not None else tuple(nets)
        if set(species) != set(nets):
            raise ValueError(f"species {list(species)} do not match the networks' elements {list(nets)}")
        for el, net in nets.items():
            if net.element and net.element != el:
                raise ValueError(f"network for {el!r} says it is for element {net.element!r}")
        self.species = species
        self.nets = nn.ModuleDict({el: nets[el] for el in species})

    def forward(self, features: Mapping[str, Tensor], cohesive: bool = False) -> dict[str, Tensor]:
        """Atomic energies (eV).

        Args:
            features: element -> raw descriptors G, (N_s, F_s). Elements may be absent.
            cohesive: leave out the atomic reference energies.
        Returns:
            element -> atomic energies E_i, (N_s,), same keys as ``features``.
        """
        unknown = [el for el in features if el not in self.nets]
        if unknown:
            raise ValueError(f"features for species {unknown} but the model only has {list(self.species)}")
        return {el: self.nets[el](G, cohesive=cohesive) for el, G in features.items()}


def model_from_facts(facts: Mapping, network_for: Callable[[str], NetworkConfig], dtype: torch.dtype | None = None) -> "AtomicModel":
    """Fresh per-element networks with aenet's normalization from a store's facts (``StoreReader.facts``).

    Inputs: x = (G − mean)/std per feature. Energies: E_i = NN/scale + shift + E_atom with
    shift = (E_max + E_min)/2 and scale = 2/(E_max − E_min) over the cohesive energies per
    atom, as aenet's training-set normalization does, so NN targets lie in [−1, 1].
    """
    energy = facts["energy_per_atom"]
    spread = energy["max"] - energy["min"]
    scale = 2.0 / spread if spread > 1e-12 else 1.0
    shift = 0.5 * (energy["max"] + energy["min"])
    nets = {}
    for element in facts["species"]:
        stats = facts["stats"][element]
        net = ElementNet(facts["num_features"][element], network_for(element), element, dtype=dtype)
        net.set_feature_stats(stats["min"], stats["max"], stats["mean"], stats["mean_sq"], stats["count"])
        net.set_energy_scaling(scale, shift, facts["atomic_energies"][element])
        nets[element] = net
    return AtomicModel(nets, facts["species"])


class _SparseForceContraction(torch.autograd.Function):
    """F[nbr[p]] -= sum_f dE_dG[ctr[p], f] * dG_xf[p, :, f] over sparse rows p (one element).

    dG rows are held x-major, (P, 3, F): both directions are then one batched matrix-vector
    product over contiguous rows, measured 2.4x faster on CPU than the (P, F, 3) einsum.
    """

    @staticmethod
    def forward(ctx, dE_dG: Tensor, dG_xf: Tensor, center_idx: Tensor, neighbor_idx: Tensor, num_atoms: int) -> Tensor:
        # dE_dG (N, F), dG_xf (P, 3, F), center_idx/neighbor_idx (P,) int64
        ctx.save_for_backward(dE_dG, dG_xf, center_idx, neighbor_idx)
        ctx.num_rows = dE_dG.shape[0]
        contrib = torch.bmm(dG_xf, dE_dG.index_select(0, center_idx).unsqueeze(-1)).squeeze(-1)  # shape (P, 3)
        forces = torch.zeros(num_atoms, 3, dtype=dE_dG.dtype, device=dE_dG.device)
        return forces.index_add_(0, neighbor_idx, contrib, alpha=-1.0)  # shape (A, 3)

    @staticmethod
    def backward(ctx, grad_forces: Tensor):
        # Differentiable torch ops only, so create_graph / double backward work.
        dE_dG, dG_xf, center_idx, neighbor_idx = ctx.saved_tensors
        g = grad_forces.index_select(0, neighbor_idx)  # shape (P, 3)
        grad_dE_dG = grad_dG = None
        if ctx.needs_input_grad[0]:
            # The transposed contraction Σ_x g[p, x] dG[p, x, :] as three multiply-adds over (P, F)
            # slices: one read of dG, measured faster than a batch of 1x3 @ 3xF products.
            rows = dG_xf[:, 0] * g[:, 0:1]
            rows = torch.addcmul(rows, dG_xf[:, 1], g[:, 1:2])
            rows = torch.addcmul(rows, dG_xf[:, 2], g[:, 2:3])  # shape (P, F)
            grad_dE_dG = torch.zeros(ctx.num_rows, dG_xf.shape[2], dtype=g.dtype, device=g.device)
            grad_dE_dG = grad_dE_dG.index_add(0, center_idx, rows, alpha=-1.0)
        if ctx.needs_input_grad[1]:
            grad_dG = -g.unsqueeze(-1) * dE_dG.index_select(0, center_idx).unsqueeze(1)  # shape (P, 3, F)
        return grad_dE_dG, grad_dG, None, None, None


def forces_from_dEdG(dE_dG: Mapping[str, Tensor], rows: Mapping[str, tuple[Tensor, Tensor, Tensor]],
                     num_atoms: int) -> Tensor:
    """Forces F_a = -sum_i sum_f dE/dG[i, f] * dG[i -> a, f, :] (eV/Å) over sparse derivative rows.

    Args:
        dE_dG: element -> dE_i/dG_i w.r.t. the raw descriptors, (N_s, F_s), eV.
        rows: element -> (center_idx (P_s,) int: row of the center atom in ``dE_dG[element]``,
            neighbor_idx (P_s,) int: atom index in [0, num_atoms) that is moved,
            dG_xf (P_s, 3, F_s): +dG_center/dR_neighbor, x-major, 1/Å). Elements without rows are skipped.
        num_atoms: number of atoms A in the output.
    Returns:
        (A, 3) forces, dtype of ``dE_dG``. Differentiable w.r.t. ``dE_dG`` (and ``dG``), also with
        ``create_graph=True``; the backward is the transposed sparse contraction.
    """
    forces = None
    for el, (center_idx, neighbor_idx, dG) in rows.items():  # dG is x-major, (P, 3, F)
        if el not in dE_dG:
            raise ValueError(f"dG rows for species {el!r} but no dE/dG for it (have {list(dE_dG)})")
        g = dE_dG[el]
        if dG.dim() != 3 or dG.shape[1] != 3 or dG.shape[2] != g.shape[1] or dG.shape[0] != center_idx.shape[0] \
                or center_idx.shape != neighbor_idx.shape:
            raise ValueError(f"{el}: inconsistent shapes dE_dG {tuple(g.shape)}, dG {tuple(dG.shape)}, "
                             f"center_idx {tuple(center_idx.shape)}, neighbor_idx {tuple(neighbor_idx.shape)}")
        if dG.dtype != g.dtype or dG.device != g.device:
            raise ValueError(f"{el}: dG is {dG.dtype} on {dG.device} but dE_dG is {g.dtype} on {g.device}")
        f = _SparseForceContraction.apply(g, dG, center_idx.long(), neighbor_idx.long(), int(num_atoms))
        forces = f if forces is None else forces + f
    if forces is None:
        ref = next(iter(dE_dG.values()), None)
        kw = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
        forces = torch.zeros(int(num_atoms), 3, **kw)
    return forces
