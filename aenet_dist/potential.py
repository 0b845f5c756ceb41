"""The per-element networks of an aenet ``.nn`` potential, evaluated in numpy for inference.

One job: atomic energies E_i and their gradient dE_i/dG_i with respect to the raw descriptors
G, from the weights, feature statistics and energy scaling of a ``.nn`` file, without torch
(importing torch costs seconds, more than a whole prediction). The model is aenet's, the same
as :class:`aenet_dist.model.ElementNet` (which trains it):

    x_i = (G_i - avg) * inv_std         inv_std = 1/sqrt(cov - avg**2), 0 where std <= 1e-10
    E_i = NN_t(x_i) / scale + shift + E_atom(t)                                   (eV)

Here also live the torch-free pieces of a ``.nn`` file that both sides need: aenet's
activation names and codes and constants, and the descriptor setup a file records
(:func:`setup_from_nn`). This module imports only numpy, the standard library,
:mod:`aenet_dist.config` and :mod:`aenet_dist.formats.nn`; never torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import BEHLER_PARAMETERS, BehlerBasis, BehlerFunction, ChebyshevBasis, DescriptorSetup
from .descriptors import rowwise_matmul
from .formats.nn import NNFile

# aenet ``ext/feedforward.f90`` (``ff_activate``, ``ff_change_activation``): code <-> name.
ACTIVATIONS: dict[str, int] = {"linear": 0, "tanh": 1, "sigmoid": 2, "mtanh": 3, "twist": 4}
ACTIVATION_NAMES: dict[int, str] = {code: name for name, code in ACTIVATIONS.items()}
# aenet's one-letter aliases ('t', 's', 'l', 'm', 'w') are accepted by :func:`activation_code`.
_ALIASES = {"l": "linear", "t": "tanh", "s": "sigmoid", "m": "mtanh", "w": "twist"}

# Constants of aenet's scaled tanh (codes 3 and 4), literally as in ff_activate;
# note b is 0.666666666666667, not 2/3 to the last bit.
_MTANH_A = 1.7159
_MTANH_B = 0.666666666666667
_TWIST_C = 0.1

STD_EPS = 1e-10
"""aenet's threshold: a feature whose std is <= this gets the scale factor 0 (stp_normalize)."""


def activation_code(name: str) -> int:
    """aenet activation code of ``name`` ('linear', 'tanh', 'sigmoid', 'mtanh', 'twist' or an alias)."""
    key = _ALIASES.get(name, name)
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)} (aenet codes 0-4)")
    return ACTIVATIONS[key]


def activation_name(code: int) -> str:
    """Name of aenet activation ``code`` (0 linear, 1 tanh, 2 sigmoid, 3 mtanh, 4 twist)."""
    if int(code) not in ACTIVATION_NAMES:
        raise ValueError(f"unknown aenet activation code {code}; known: {ACTIVATION_NAMES}")
    return ACTIVATION_NAMES[int(code)]


# --------------------------------------------------------------------------------------------
# descriptor setup of a .nn file
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1/(1 + exp(-z)) without overflow: exp of -|z| only, so no warning for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def _activate(z: np.ndarray, name: str, slope: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(σ(z), σ'(z)) of aenet activation ``name`` (``ff_activate``), elementwise.

    σ'(z) is None with ``slope=False`` and for ``linear`` (σ' = 1, so the backward pass skips
    the multiplication). With t = tanh(b z): mtanh a t has σ' = a b (1 − t²), twist adds c z,
    so c to σ'; sigmoid s has σ' = s (1 − s). The forward forms are those of model.activate.
    """
    if name == "linear":
        return z, None
    if name == "sigmoid":
        s = _sigmoid(z)
        return s, (s * (1.0 - s) if slope else None)
    if name in ("tanh", "mtanh", "twist"):
        if name == "tanh":
            t = np.tanh(z)
            return t, ((1.0 - t * t) if slope else None)
        t = np.tanh(_MTANH_B * z)
        y = _MTANH_A * t if name == "mtanh" else _MTANH_A * t + _TWIST_C * z
        if not slope:
            return y, None
        d = (_MTANH_A * _MTANH_B) * (1.0 - t * t)
        return y, (d + _TWIST_C if name == "twist" else d)
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------------------------
# one element's network
# --------------------------------------------------------------------------------------------


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class ElementPotential:
    """One element's aenet network with its feature normalization and energy scaling, in numpy.

    Build it with :meth:`from_nn`. Arrays are read-only and all of one float ``dtype``.

    Attributes:
        element: the element (the ``.nn`` file's atomtype).
        num_features: F, descriptors per atom.
        weights: per layer l (input -> hidden ... -> output), (W (n_out, n_in), b (n_out,));
            the last layer has n_out = 1.
        activations: aenet activation name of each non-input layer (hidden layers, then output).
        avg: (F,) feature mean; inv_std: (F,) 1/std, or 0 where std <= 1e-10 (aenet's rule).
        scale: energy divisor; shift: eV/atom; e_atom: atomic reference energy, eV
            (numpy scalars of ``dtype``, as ElementNet's buffers).
    """

    element: str
    num_features: int
    weights: tuple[tuple[np.ndarray, np.ndarray], ...]
    activations: tuple[str, ...]
    avg: np.ndarray
    inv_std: np.ndarray
    scale: np.floating
    shift: np.floating
    e_atom: np.floating

    @property
    def dtype(self) -> np.dtype:
        """Float type of the weights, statistics and results."""
        return self.avg.dtype

    @classmethod
    def from_nn(cls, nn: NNFile, dtype=np.float64, source: str = "") -> "ElementPotential":
        """The network (weights, normalization, energy scaling) of a ``.nn`` file, as ``dtype``.

        These are also the checks of :func:`aenet_dist.export.element_net_from_nn`, which builds on
        this; ``source`` (the file's path) names the file in the messages, else the atomtype.
        """
        where = source or nn.atomtype
        dtype = np.dtype(dtype)
        if int(nn.nnodes[-1]) != 1:
            raise ValueError(f"{where}: output layer has {int(nn.nnodes[-1])} nodes, an atomic-energy network has 1")
        activations = tuple(activation_name(c) for c in nn.activations)
        num_features = int(nn.nnodes[0])
        if num_features < 1:
            raise ValueError(f"{nn.atomtype}: num_features must be >= 1, got {num_features}")
        weights = []
        for layer in range(len(nn.nnodes) - 1):
            w, b = nn.layer_weights(layer)  # w (n_out, n_in), b (n_out,), float64 as stored
            weights.append((_readonly(w.astype(dtype)), _readonly(b.astype(dtype))))
        stats = {}
        for name in ("sfval_avg", "sfval_cov"):
            value = np.asarray(getattr(nn, name), dtype=np.float64)
            if value.shape != (num_features,):
                raise ValueError(f"{nn.atomtype}: {name} has shape {value.shape}, expected ({num_features},)")
            stats[name] = value
        # Derived in float64, as ElementNet.set_feature_stats, then cast: the same inv_std bits.
        avg = stats["sfval_avg"]
        var = stats["sfval_cov"] - avg * avg
        std = np.sqrt(np.maximum(var, 0.0))  # aenet would give NaN for var < 0; 0 -> factor 0 instead
        inv_std = np.where(std > STD_EPS, 1.0 / np.maximum(std, STD_EPS), 0.0)
        if nn.atomtype not in nn.type_names:
            raise ValueError(f"{where}: atomtype {nn.atomtype!r} is not among the training-set types {list(nn.type_names)}")
        scale = nn.scale
        if not scale or scale != scale:
            raise ValueError(f"{nn.atomtype}: energy scale must be non-zero, got {scale}")
        return cls(element=nn.atomtype, num_features=num_features, weights=tuple(weights), activations=activations,
                   avg=_readonly(avg.astype(dtype)), inv_std=_readonly(inv_std.astype(dtype)),
                   scale=dtype.type(scale), shift=dtype.type(nn.shift), e_atom=dtype.type(nn.e_atom_of(nn.atomtype)))

    def _inputs(self, G) -> np.ndarray:
        """G as a (N, F) array of ``dtype``; ValueError naming the element if it is not (N, F)."""
        G = np.asarray(G, dtype=self.dtype)
        if G.ndim != 2 or G.shape[-1] != self.num_features:
            got = f"{G.shape[-1]} features" if G.ndim == 2 else f"shape {G.shape}, not (N, {self.num_features})"
            raise ValueError(f"{self.element}: descriptors have {got}, network expects {self.num_features}")
        return G

    def _finish(self, out: np.ndarray) -> np.ndarray:
        """E_i = NN/scale + shift + e_atom from the output layer (N, 1) -> (N,), ElementNet's order."""
        return out[:, 0] / self.scale + self.shift + self.e_atom

    def energies(self, G) -> np.ndarray:
        """Atomic energies E_i in eV from raw descriptors G (N, F) -> (N,).

        G is cast to ``dtype``; a G that is not (N, F) raises ValueError naming the element.
        """
        h = (self._inputs(G) - self.avg) * self.inv_std  # shape (N, F)
        # rowwise_matmul: an atom's bits must not depend on how many atoms share the call (BLAS
        # kernels for one or a few left-over rows round differently, e.g. OpenBLAS on AVX-512).
        for (W, b), act in zip(self.weights, self.activations):
            h, _ = _activate(rowwise_matmul(h, W.T) + b, act, slope=False)  # shape (N, n_out)
        return self._finish(h)

    def energies_and_gradient(self, G) -> tuple[np.ndarray, np.ndarray]:
        """Atomic energies E_i (N,) and their gradient dE_i/dG_i (N, F) w.r.t. the raw descriptors.

        A hand-written backward pass: the forward keeps σ'(z_l) of each layer; then
        δ_L = σ'_L(z_L)/scale at the output, δ_{l-1} = (δ_l @ W_l) * σ'_{l-1}(z_{l-1}), and
        dE/dG = (δ_0 @ W_0) * inv_std. Each atom's energy depends on its own G row only, so
        the rows of dE/dG are the per-atom gradients.
        """
        h = (self._inputs(G) - self.avg) * self.inv_std  # shape (N, F)
        slopes = []
        for (W, b), act in zip(self.weights, self.activations):
            h, slope = _activate(rowwise_matmul(h, W.T) + b, act, slope=True)  # each (N, n_out); slope None for linear
            slopes.append(slope)
        energy = self._finish(h)  # shape (N,)
        out = slopes[-1]
        delta = out / self.scale if out is not None else np.full((h.shape[0], 1), 1.0 / self.scale, dtype=self.dtype)
        for layer in range(len(self.weights) - 1, 0, -1):
            delta = rowwise_matmul(delta, self.weights[layer][0])  # shape (N, n_in of layer) = (N, n_out of layer - 1)
            if slopes[layer - 1] is not None:
                delta *= slopes[layer - 1]
        grad = rowwise_matmul(delta, self.weights[0][0]) * self.inv_std  # shape (N, F)
        return energy, grad
