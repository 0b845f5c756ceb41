"""Tests of aenet_dist.potential: numpy inference of aenet .nn networks against the torch ElementNet
(energies and dE/dG by autograd) through real .nn files, its error messages, and that it needs no torch."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aenet_dist import export, model, potential
from aenet_dist.config import ChebyshevBasis, DescriptorSetup
from aenet_dist.export import TrainSetInfo, element_net_from_nn, nn_from_element_net
from aenet_dist.formats.nn import read_nn, write_nn
from aenet_dist.model import ElementNet, NetworkConfig
from aenet_dist.potential import ElementPotential

ACTIVATIONS = ("linear", "tanh", "sigmoid", "mtanh", "twist")
HIDDEN = {1: (7,), 2: (6, 5), 3: (5, 4, 3)}
SETUP = DescriptorSetup("Zn", ("Zn", "O"), "chebyshev", ChebyshevBasis(6.0, 4, 4.0, 2), rmin=0.5)
INFO = TrainSetInfo(("O", "Zn"), (-432.5, -1604.6), "zno.train", True, 200, 20, -3.0, -1.0, -2.0)
ROOT = Path(__file__).resolve().parents[1]


def _random_net(hidden, activations, output, seed: int) -> tuple[ElementNet, np.ndarray]:
    """A float64 ElementNet for Zn with random weights and statistics, and descriptors G (40, F) to evaluate.

    Features 0-2 have std 0: cov = avg² exactly, cov a round-off below avg² (negative variance),
    and std 1e-11 (below aenet's 1e-10); all get the input factor 0.
    """
    rng = np.random.default_rng(seed)
    F = SETUP.num_features
    net = ElementNet(F, NetworkConfig(hidden, activations, output), "Zn", dtype=torch.float64)
    with torch.no_grad():
        for layer in net.layers:  # O(1) pre-activations, so every nonlinearity is exercised off its linear part
            n_out, n_in = layer.weight.shape
            layer.weight.copy_(torch.from_numpy(rng.normal(scale=1.5 / np.sqrt(n_in), size=(n_out, n_in))))
            layer.bias.copy_(torch.from_numpy(rng.normal(scale=0.5, size=n_out)))
    avg = rng.normal(size=F)
    cov = avg * avg + rng.uniform(0.1, 2.0, size=F)
    cov[0] = avg[0] * avg[0]
    cov[1] = np.nextafter(avg[1] * avg[1], 0.0)
    avg[2], cov[2] = 0.0, 1e-22
    G = avg + np.sqrt(np.maximum(cov - avg * avg, 0.0)) * rng.normal(size=(40, F)) * 1.3
    net.set_feature_stats(G.min(0), G.max(0), avg, cov, 200)
    net.set_energy_scaling(0.37, -2.1, -1604.6)
    return net, G


def _written_nn(tmp_path: Path, net: ElementNet) -> Path:
    """``net`` as a real aenet .nn file in ``tmp_path``."""
    path = tmp_path / "Zn.nn"
    write_nn(path, nn_from_element_net(net, SETUP, INFO))
    return path


def _torch_reference(net: ElementNet, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies (N,) and dE/dG (N, F) of the torch net (float64, autograd)."""
    Gt = torch.from_numpy(G).requires_grad_(True)
    energy = net(Gt)
    (grad,) = torch.autograd.grad(energy.sum(), Gt)
    return energy.detach().numpy(), grad.numpy()


def _check_against_torch(net: ElementNet, G: np.ndarray, path: Path) -> None:
    nn = read_nn(path)
    ref_e, ref_g = _torch_reference(net, G)
    assert np.isfinite(ref_e).all() and np.isfinite(ref_g).all()
    assert np.abs(ref_g[:, :3]).max() == 0 and np.abs(ref_g[:, 3:]).min() > 0  # std-0 features, and the rest live

    pot = ElementPotential.from_nn(nn, source=str(path))
    assert pot.element == "Zn" and pot.num_features == G.shape[1] and pot.dtype == np.float64
    assert pot.activations == (*net.config.activations, net.config.output_activation)
    assert np.array_equal(pot.inv_std, net.inv_std.numpy()) and np.array_equal(pot.avg, net.avg.numpy())
    assert not pot.inv_std[:3].any()
    energy = pot.energies(G)
    e2, grad = pot.energies_and_gradient(G)
    assert energy.shape == (len(G),) and grad.shape == G.shape and energy.dtype == grad.dtype == np.float64
    assert np.array_equal(energy, e2)
    np.testing.assert_allclose(energy, ref_e, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grad, ref_g, rtol=1e-12, atol=1e-12 * np.abs(ref_g).max())

    pot32 = ElementPotential.from_nn(nn, dtype=np.float32)
    e32, g32 = pot32.energies_and_gradient(G)
    assert pot32.dtype == e32.dtype == g32.dtype == pot32.weights[0][0].dtype == np.float32
    assert np.array_equal(pot32.energies(G), e32)
    np.testing.assert_allclose(e32, ref_e, rtol=1e-5, atol=0)
    np.testing.assert_allclose(g32, ref_g, rtol=1e-5, atol=1e-5 * np.abs(ref_g).max())


@pytest.mark.parametrize("depth", sorted(HIDDEN))
@pytest.mark.parametrize("activation, output", [(a, o) for a in ACTIVATIONS for o in dict.fromkeys(("linear", a))])
def test_matches_torch_element_net(tmp_path, activation, output, depth):
    """Hidden layers of one activation, output linear (as aenet trains) or that activation too."""
    net, G = _random_net(HIDDEN[depth], (activation,) * depth, output, seed=10 * depth + ACTIVATIONS.index(activation))
    _check_against_torch(net, G, _written_nn(tmp_path, net))


def test_matches_torch_mixed_deep_net(tmp_path):
    """Every activation in one six-layer network, output sigmoid."""
    net, G = _random_net((6, 5, 5, 4, 3), ("tanh", "linear", "sigmoid", "mtanh", "twist"), "sigmoid", seed=99)
    _check_against_torch(net, G, _written_nn(tmp_path, net))


def test_rows_do_not_depend_on_how_many_share_the_call(tmp_path):
    """An atom's energy and dE/dG are the same bits alone, in a pair or among many (a structure's
    prediction must not depend on its batch: BLAS kernels for one or a few rows round differently)."""
    net, G = _random_net((7, 5), ("tanh", "sigmoid"), "linear", seed=12)
    pot = ElementPotential.from_nn(read_nn(_written_nn(tmp_path, net)))
    G = np.concatenate([G] * 4)  # enough rows for whole GEMM blocks and a remainder
    energy, grad = pot.energies_and_gradient(G)
    for start, rows in [(0, 1), (3, 1), (5, 2), (1, 3), (2, 17), (0, len(G) - 1)]:
        e, g = pot.energies_and_gradient(G[start : start + rows])
        assert np.array_equal(e, energy[start : start + rows]) and np.array_equal(g, grad[start : start + rows]), (start, rows)
        assert np.array_equal(pot.energies(G[start : start + rows]), e)


def test_no_hidden_layer_and_edge_inputs(tmp_path):
    """A network with no hidden layer; no atoms; float32 input to a float64 potential; extreme G (no overflow)."""
    net, G = _random_net((), (), "twist", seed=5)
    pot = ElementPotential.from_nn(read_nn(_written_nn(tmp_path, net)))
    _check_against_torch(net, G, tmp_path / "Zn.nn")
    e, g = pot.energies_and_gradient(np.zeros((0, G.shape[1])))
    assert e.shape == (0,) and g.shape == (0, G.shape[1])
    assert np.array_equal(pot.energies(G.astype(np.float32)), pot.energies(G.astype(np.float32).astype(np.float64)))
    net, G = _random_net((4,), ("sigmoid",), "sigmoid", seed=6)
    pot = ElementPotential.from_nn(read_nn(_written_nn(tmp_path, net)))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        e, g = pot.energies_and_gradient(G * 1e6)
    ref_e, ref_g = _torch_reference(net, G * 1e6)
    np.testing.assert_allclose(e, ref_e, rtol=1e-12)
    np.testing.assert_allclose(g, ref_g, rtol=1e-12, atol=1e-300)


def test_arrays_are_read_only(tmp_path):
    net, _ = _random_net((3,), ("tanh",), "linear", seed=7)
    pot = ElementPotential.from_nn(read_nn(_written_nn(tmp_path, net)))
    with pytest.raises(ValueError, match="read-only"):
        pot.weights[0][0][0, 0] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        pot.scale = 2.0


def test_errors_are_those_of_element_net_from_nn(tmp_path):
    """Each bad file content gives the same ValueError as export.element_net_from_nn."""
    net, _ = _random_net((3,), ("tanh",), "linear", seed=8)
    path = _written_nn(tmp_path, net)
    nn = read_nn(path)
    bad = {
        "two output nodes": (dataclasses.replace(nn, nnodes=np.array([nn.nnodes[0], 3, 2], dtype=np.int32)),
                             f"{path}: output layer has 2 nodes, an atomic-energy network has 1"),
        "activation code 7": (dataclasses.replace(nn, activations=np.array([1, 7], dtype=np.int32)),
                              "unknown aenet activation code 7"),
        "atomtype not a type": (dataclasses.replace(nn, type_names=("O", "Ti"), e_atom=np.array([-1.0, -2.0])),
                                f"{path}: atomtype 'Zn' is not among the training-set types ['O', 'Ti']"),
        "scale 0": (dataclasses.replace(nn, scale=0.0), "Zn: energy scale must be non-zero, got 0.0"),
        "scale NaN": (dataclasses.replace(nn, scale=float("nan")), "Zn: energy scale must be non-zero, got nan"),
    }
    for case, (content, message) in bad.items():
        with pytest.raises(ValueError) as torch_err:
            element_net_from_nn(content, source=str(path))
        with pytest.raises(ValueError) as numpy_err:
            ElementPotential.from_nn(content, source=str(path))
        assert str(numpy_err.value) == str(torch_err.value), case
        assert message in str(numpy_err.value), case


def test_wrong_descriptor_shape_names_element(tmp_path):
    net, G = _random_net((3,), ("tanh",), "linear", seed=9)
    pot = ElementPotential.from_nn(read_nn(_written_nn(tmp_path, net)))
    F = G.shape[1]
    with pytest.raises(ValueError) as torch_err:
        net(torch.from_numpy(G[:, :-1]))
    for method in (pot.energies, pot.energies_and_gradient):
        with pytest.raises(ValueError) as numpy_err:
            method(G[:, :-1])
        assert str(numpy_err.value) == str(torch_err.value) == f"Zn: descriptors have {F - 1} features, network expects {F}"
        with pytest.raises(ValueError, match=re.escape(f"Zn: descriptors have shape ({F},), not (N, {F})")):
            method(G[0])


def test_moved_names_are_shared():
    """setup_from_nn and the activation tables live in potential; export and model hand out the same objects."""
    assert export.setup_from_nn is potential.setup_from_nn
    for name in ("ACTIVATIONS", "ACTIVATION_NAMES", "STD_EPS", "_ALIASES", "_MTANH_A", "_MTANH_B", "_TWIST_C",
                 "activation_code", "activation_name"):
        assert getattr(model, name) is getattr(potential, name), name
    assert potential.activation_code("w") == 4 and potential.activation_name(2) == "sigmoid"


def test_inference_does_not_import_torch(tmp_path):
    """Importing potential, reading a .nn file, its setup, energies and gradient: torch never loaded."""
    net, G = _random_net((4, 3), ("tanh", "twist"), "linear", seed=11)
    path = _written_nn(tmp_path, net)
    np.save(tmp_path / "G.npy", G)
    ref_e, ref_g = _torch_reference(net, G)
    np.save(tmp_path / "ref.npy", np.concatenate([ref_e[:, None], ref_g], axis=1))
    code = f"""
import sys
import numpy as np
import aenet_dist.potential as potential
from aenet_dist.formats.nn import read_nn
nn = read_nn({str(path)!r})
setup = potential.setup_from_nn(nn)
pot = potential.ElementPotential.from_nn(nn)
e, g = pot.energies_and_gradient(np.load({str(tmp_path / 'G.npy')!r}))
ref = np.load({str(tmp_path / 'ref.npy')!r})
assert setup.num_features == pot.num_features
assert np.allclose(e, ref[:, 0], rtol=1e-12, atol=0) and np.allclose(g, ref[:, 1:], rtol=1e-12, atol=1e-14)
torch_modules = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(torch_modules)
assert not torch_modules
"""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]"
