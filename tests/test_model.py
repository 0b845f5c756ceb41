"""Tests of aenet_dist.model: activations, normalization, sparse force contraction, aenet reference predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aenet_dist.model import (
    ACTIVATIONS,
    AtomicModel,
    ElementNet,
    NetworkConfig,
    activate,
    activation_code,
    activation_name,
    forces_from_dEdG,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFDATA = SHARED / "refdata"


def _need_refdata():
    if not (REFDATA / "tio2_20_predict.npz").exists():
        pytest.skip(f"aenet reference data not found at {REFDATA} (the shared/ folder is absent)")


# --------------------------------------------------------------------------- activations, config


def test_activation_codes_match_aenet():
    assert ACTIVATIONS == {"linear": 0, "tanh": 1, "sigmoid": 2, "mtanh": 3, "twist": 4}
    for name, code in ACTIVATIONS.items():
        assert activation_code(name) == code and activation_name(code) == name
    assert activation_code("t") == 1 and activation_code("w") == 4
    with pytest.raises(ValueError, match="relu"):
        activation_code("relu")
    with pytest.raises(ValueError, match="7"):
        activation_name(7)


def test_activation_values():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(activate(x, "linear"), x)
    torch.testing.assert_close(activate(x, "tanh"), torch.tanh(x))
    torch.testing.assert_close(activate(x, "sigmoid"), 1 / (1 + torch.exp(-x)))
    mt = 1.7159 * torch.tanh(2 * x / 3)
    torch.testing.assert_close(activate(x, "mtanh"), mt, atol=1e-14, rtol=0)
    torch.testing.assert_close(activate(x, "twist"), mt + 0.1 * x, atol=1e-14, rtol=0)


def test_network_config_validation():
    cfg = NetworkConfig((10, 7), ("t", "twist"))
    assert cfg.activations == ("tanh", "twist") and cfg.activation_codes == (1, 4, 0)
    with pytest.raises(ValueError, match="activations"):
        NetworkConfig((5, 5), ("tanh",))
    with pytest.raises(ValueError, match="softplus"):
        NetworkConfig((5,), ("softplus",))
    with pytest.raises(ValueError, match=">= 1"):
        NetworkConfig((0,), ("tanh",))


# --------------------------------------------------------------------------- ElementNet


def _net(F=4, hidden=(3,), dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return ElementNet(F, NetworkConfig(hidden, ("tanh",) * len(hidden)), "X", dtype=dtype)


def test_element_net_normalization_and_energy():
    net = _net()
    avg = np.array([1.0, 2.0, -1.0, 5.0])
    std = np.array([2.0, 0.5, 1e-12, 0.0])  # last two: aenet's std <= 1e-10 -> factor 0
    cov = std**2 + avg**2
    net.set_feature_stats(avg - 3, avg + 3, avg, cov, neval=17)
    net.set_energy_scaling(scale=2.0, shift=-3.0, e_atom=-100.0)
    assert int(net.neval) == 17
    torch.testing.assert_close(net.inv_std, torch.tensor([0.5, 2.0, 0.0, 0.0], dtype=torch.float64))
    G = torch.randn(6, 4, dtype=torch.float64)
    x = net.normalize(G)
    torch.testing.assert_close(x[:, :2], (G[:, :2] - torch.tensor([1.0, 2.0], dtype=torch.float64)) / torch.tensor([2.0, 0.5], dtype=torch.float64))
    assert torch.all(x[:, 2:] == 0)
    torch.testing.assert_close(net(G), net.network(x) / 2.0 - 3.0 - 100.0)
    with pytest.raises(ValueError, match="features"):
        net(torch.zeros(2, 5, dtype=torch.float64))


def test_atomic_model_forward_by_element():
    nets = {"Ti": _net(seed=1), "O": _net(seed=2)}
    nets["Ti"].element, nets["O"].element = "Ti", "O"
    model = AtomicModel(nets, species=("Ti", "O"))
    G = {"O": torch.randn(5, 4, dtype=torch.float64)}  # Ti absent is fine
    out = model(G)
    assert list(out) == ["O"] and out["O"].shape == (5,)
    with pytest.raises(ValueError, match="Zr"):
        model({"Zr": torch.zeros(1, 4, dtype=torch.float64)})


# --------------------------------------------------------------------------- sparse force contraction


def _random_rows(N=5, P=23, F=4, A=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    center = torch.randint(0, N, (P,), generator=g)
    neighbor = torch.randint(0, A, (P,), generator=g)
    dG = torch.randn(P, 3, F, generator=g, dtype=dtype)  # x-major rows
    dE_dG = torch.randn(N, F, generator=g, dtype=dtype)
    return dE_dG, center, neighbor, dG


def test_forces_from_dEdG_matches_dense_contraction():
    dE_dG, center, neighbor, dG = _random_rows()
    dE_dG2, center2, neighbor2, dG2 = _random_rows(N=3, P=11, F=6, seed=1)
    A = 7
    forces = forces_from_dEdG({"a": dE_dG, "b": dE_dG2}, {"a": (center, neighbor, dG), "b": (center2, neighbor2, dG2)}, A)
    ref = torch.zeros(A, 3, dtype=torch.float64)
    for c, n, d, g in ((center, neighbor, dG, dE_dG), (center2, neighbor2, dG2, dE_dG2)):
        for p in range(len(c)):
            ref[n[p]] -= d[p] @ g[c[p]]
    torch.testing.assert_close(forces, ref, atol=1e-13, rtol=0)
    assert forces_from_dEdG({"a": dE_dG}, {}, 4).shape == (4, 3)


def test_forces_from_dEdG_gradcheck():
    dE_dG, center, neighbor, dG = _random_rows()
    dE_dG.requires_grad_(True)
    dG.requires_grad_(True)

    def f(g, d):
        return forces_from_dEdG({"a": g}, {"a": (center, neighbor, d)}, 7)

    assert torch.autograd.gradcheck(f, (dE_dG, dG), eps=1e-6, atol=1e-9)
    assert torch.autograd.gradgradcheck(f, (dE_dG, dG), eps=1e-6, atol=1e-9)


def test_force_training_gradients_through_dEdG():
    """Loss on forces -> weights via create_graph equals the same with plain torch ops."""
    net = _net(F=4, hidden=(5, 3))
    net.set_feature_stats(np.zeros(4), np.ones(4), np.full(4, 0.3), np.full(4, 0.5), 10)
    G = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    _, center, neighbor, dG = _random_rows(N=5, P=23, F=4, A=7, seed=3)
    F_ref = torch.randn(7, 3, dtype=torch.float64)

    def loss(custom: bool):
        E = net(G)
        (dE_dG,) = torch.autograd.grad(E.sum(), G, create_graph=True)
        if custom:
            forces = forces_from_dEdG({"X": dE_dG}, {"X": (center, neighbor, dG)}, 7)
        else:
            contrib = torch.einsum("pf,pxf->px", dE_dG[center], dG)
            forces = torch.zeros(7, 3, dtype=torch.float64).index_add(0, neighbor, -contrib)
        return ((forces - F_ref) ** 2).sum() + E.sum()

    params = list(net.parameters())
    g_custom = torch.autograd.grad(loss(True), params)
    g_plain = torch.autograd.grad(loss(False), params)
    for a, b in zip(g_custom, g_plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_forces_from_dEdG_rejects_inconsistent_inputs():
    dE_dG, center, neighbor, dG = _random_rows()
    with pytest.raises(ValueError, match="shapes"):
        forces_from_dEdG({"a": dE_dG}, {"a": (center, neighbor, dG[:, :, :3])}, 7)
    with pytest.raises(ValueError, match="float32"):
        forces_from_dEdG({"a": dE_dG}, {"a": (center, neighbor, dG.float())}, 7)
    with pytest.raises(ValueError, match="'b'"):
        forces_from_dEdG({"a": dE_dG}, {"b": (center, neighbor, dG)}, 7)


# --------------------------------------------------------------------------- aenet reference


@pytest.fixture(scope="module")
def reference():
    _need_refdata()
    from aenet_dist.export import element_net_from_nn
    from aenet_dist.formats.nn import read_nn

    model = AtomicModel({el: element_net_from_nn(read_nn(REFDATA / f"{el}.pytorch.nn")) for el in ("Ti", "O")}, ("Ti", "O"))
    d = np.load(REFDATA / "tio2_20_descriptors.npz")
    p = np.load(REFDATA / "tio2_20_predict.npz")
    return model, d, p


def test_predictions_match_aenet(reference):
    model, d, p = reference
    species = d["species"].astype(str)
    natoms, offset = d["natoms"].astype(np.int64), d["atom_offset"].astype(np.int64)
    num_atoms, num_structs = len(species), len(natoms)
    struct_of_atom = torch.from_numpy(np.repeat(np.arange(num_structs), natoms))  # shape (A,)
    center_g = offset[d["dG_struct"]] + d["dG_center"]  # global atom index, shape (P,)
    neighbor_g = offset[d["dG_struct"]] + d["dG_neighbor"]  # shape (P,)
    G_all = torch.from_numpy(d["G"])
    dG_all = torch.from_numpy(d["dG"]).transpose(1, 2).contiguous()  # x-major rows, (P, 3, F)

    feats, rows, atom_idx = {}, {}, {}
    for el in model.species:
        idx = np.nonzero(species == el)[0]
        local = np.full(num_atoms, -1)
        local[idx] = np.arange(len(idx))
        mask = species[center_g] == el
        atom_idx[el] = torch.from_numpy(idx)
        feats[el] = G_all[idx].clone().requires_grad_(True)
        rows[el] = (torch.from_numpy(local[center_g[mask]]), torch.from_numpy(neighbor_g[mask]), dG_all[torch.from_numpy(mask)])

    energies = model(feats)
    E_atom = torch.zeros(num_atoms, dtype=torch.float64)
    for el, e in energies.items():
        E_atom = E_atom.index_add(0, atom_idx[el], e)
    E_struct = torch.zeros(num_structs, dtype=torch.float64).index_add(0, struct_of_atom, E_atom)
    per_atom_err = (E_struct.detach().numpy() - p["energy_total"]) / natoms
    assert np.abs(per_atom_err).max() < 1e-8, per_atom_err
    np.testing.assert_allclose(E_atom.detach().numpy(), p["atomic_energy"], rtol=0, atol=1e-8)

    grads = torch.autograd.grad(sum(e.sum() for e in energies.values()), [feats[el] for el in model.species])
    dE_dG = dict(zip(model.species, grads))
    for el in model.species:
        idx = atom_idx[el].numpy()
        x = model.nets[el].normalize(feats[el]).detach().numpy()
        np.testing.assert_allclose(x, p["G_scaled"][idx], rtol=0, atol=1e-10)
        np.testing.assert_allclose(dE_dG[el].numpy(), p["dE_dG_raw"][idx], rtol=0, atol=1e-10)

    forces = forces_from_dEdG(dE_dG, rows, num_atoms)
    assert np.abs(forces.numpy() - p["forces"]).max() < 1e-6
