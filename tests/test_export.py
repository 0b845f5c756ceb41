"""Tests of aenet_dist.formats.nn (.nn binary/ASCII round trips, corrupt files) and aenet_dist.export
(model conversion, loading potentials)."""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from aenet_dist.config import ChebyshevBasis, DescriptorSetup
from aenet_dist.export import TrainSetInfo, element_net_from_nn, nn_from_element_net, setup_from_nn
from aenet_dist.formats.nn import (RECORD_NAMES, RECORDS, NNFile, network_layout, nn_to_bytes, read_nn, read_nn_ascii,
                                   write_nn, write_nn_ascii)
from aenet_dist.model import ElementNet, NetworkConfig
from aenet_dist.predict import Predictor

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFDATA = SHARED / "refdata"
ELEMENTS = ("Ti", "O")


@pytest.fixture(scope="module", params=ELEMENTS)
def ref_nn(request) -> Path:
    path = REFDATA / f"{request.param}.pytorch.nn"
    if not path.exists():
        pytest.skip(f"aenet reference potential not found at {path} (the shared/ folder is absent)")
    return path


def _record_offsets(data: bytes) -> list[int]:
    """Byte offset of each record's leading length marker."""
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        (n,) = struct.unpack_from("<i", data, pos)
        pos += n + 8
    return offsets


# --------------------------------------------------------------------------- binary


def test_record_table_covers_every_field_once():
    """The one table that drives all four directions: 36 records, each NNFile field in exactly one."""
    assert len(RECORDS) == 36 and RECORD_NAMES[1:] == tuple(rec.name for rec in RECORDS)
    attrs = [a for rec in RECORDS for a in (rec.attr if isinstance(rec.attr, tuple) else (rec.attr,))]
    counts = {"nlayers", "nenv", "nsf", "nsfparam", "ntypes"}  # NNFile properties, not fields
    assert sorted(set(attrs) - counts) == sorted(f.name for f in dataclasses.fields(NNFile))
    assert len(attrs) == len(set(attrs))



def test_binary_round_trip_is_byte_identical(ref_nn, tmp_path):
    nn = read_nn(ref_nn)
    out = tmp_path / ref_nn.name
    write_nn(out, nn)
    assert out.read_bytes() == ref_nn.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [ref_nn.name]  # no temp file left behind


def test_reference_content(ref_nn):
    nn = read_nn(ref_nn)
    el = ref_nn.name.split(".")[0]
    assert nn.nnodes.tolist() == [56, 5, 5, 1] and nn.activations.tolist() == [1, 1, 0]
    assert nn.iw.tolist() == [0, 285, 315, 321] and nn.iv.tolist() == [0, 57, 63, 69]
    assert (nn.nnodes_max, nn.Wsize, nn.nvalues) == network_layout(nn.nnodes)[:3] == (56, 321, 70)
    assert nn.atomtype == el and nn.envtypes == ("Ti", "O") and nn.type_names == ("Ti", "O")
    assert nn.description == "Descriptor" and nn.sftype == "Chebyshev" and nn.train_file == "TiO.train.ascii"
    assert (nn.rc_min, nn.rc_max) == (0.35, 6.5)
    assert nn.sfparam.shape == (4, 56) and nn.sfparam[:, 0].tolist() == [6.5, 20.0, 5.0, 6.0]
    assert not nn.sfparam[:, 1:].any() and not nn.sf.any() and nn.sfenv.shape == (2, 56) and not nn.sfenv.any()
    assert nn.neval == {"Ti": 7308, "O": 13977}[el]
    assert nn.normalized and nn.scale == 1.27384834786371 and nn.shift == -7.786247938833317
    assert nn.e_atom.tolist() == [-1604.604515075, -432.503149303]
    assert (nn.num_atoms_total, nn.num_structures) == (21285, 1000)
    assert nn.e_min < nn.e_avg < nn.e_max  # stored as E_min, E_max, E_av


def test_truncated_file_names_file_and_record(ref_nn, tmp_path):
    data = ref_nn.read_bytes()
    offsets = _record_offsets(data)
    assert len(offsets) == 36
    cuts = [0, 2, 4, 7, offsets[8] + 4 + 100, offsets[9], offsets[19] + 50, len(data) - 30, len(data) - 4, len(data) - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}_{ref_nn.name}"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=re.escape(str(bad)) + r": record \d+ \(") as exc:
            read_nn(bad)
        assert "truncated" in str(exc.value) or "has" in str(exc.value), str(exc.value)


def test_corrupt_length_markers(ref_nn, tmp_path):
    data = bytearray(ref_nn.read_bytes())
    offsets = _record_offsets(bytes(data))
    bad = tmp_path / ref_nn.name
    lead = bytearray(data)
    struct.pack_into("<i", lead, offsets[8], 100)  # record 9 = weights
    bad.write_bytes(lead)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: record 9 (weights) has 100 bytes, expected 2568")):
        read_nn(bad)
    trail = bytearray(data)
    struct.pack_into("<i", trail, offsets[21] - 4, 447)  # trailing marker of record 21 (sfenv)
    bad.write_bytes(trail)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: record 21 (sfenv) trailing length marker 447")):
        read_nn(bad)
    huge = bytearray(data)
    struct.pack_into("<i", huge, offsets[0] + 4, 10**8)  # nlayers value
    bad.write_bytes(huge)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: record 5 (nnodes) has 16 bytes, expected 400000000")):
        read_nn(bad)
    bad.write_bytes(bytes(data) + b"\0" * 12)
    with pytest.raises(ValueError, match="unexpected bytes|12 unexpected"):
        read_nn(bad)


# --------------------------------------------------------------------------- ASCII


def test_ascii_round_trip(ref_nn, tmp_path):
    nn = read_nn(ref_nn)
    txt = tmp_path / (ref_nn.name + ".ascii")
    write_nn_ascii(txt, nn)
    back = read_nn_ascii(txt)
    assert back.equals(nn)
    assert nn_to_bytes(back) == ref_nn.read_bytes()
    # one line per record
    assert len(txt.read_text().splitlines()) == 36


def test_ascii_keeps_blanks_in_strings(ref_nn, tmp_path):
    nn = dataclasses.replace(read_nn(ref_nn), description="Chebyshev for 'Ti', Nr=20 / Na=6", train_file="")
    txt = tmp_path / "x.ascii"
    write_nn_ascii(txt, nn)
    back = read_nn_ascii(txt)
    assert back.description == nn.description and back.train_file == "" and back.equals(nn)


def _aenet_pytorch_ascii(nn: NNFile, description: str) -> str:
    """The layout aenet-PyTorch's output_nn.py writes (from which nnASCII2bin made the refdata files)."""
    i = lambda a: " ".join(f"{int(v):17d}" for v in np.ravel(a, order="F")) + " "  # noqa: E731
    r = lambda a: " ".join(f"{float(v):24.17f}" for v in np.ravel(a, order="F")) + " "  # noqa: E731
    lines = [f"{nn.nlayers:17d}", f"{nn.nnodes_max:17d}", f"{nn.Wsize:17d}", f"{nn.nvalues:17d}",
             i(nn.nnodes), i(nn.activations), i(nn.iw), i(nn.iv), r(nn.W),
             description, nn.atomtype, f"{len(nn.envtypes):17d}", " ".join(nn.envtypes) + " ",
             f"{nn.rc_min:24.17f}", f"{nn.rc_max:24.17f}", nn.sftype, f"{nn.nsf:17d}", f"{nn.nsfparam:17d}",
             i(nn.sf), r(nn.sfparam), i(nn.sfenv), f"{nn.neval:17d}",
             r(nn.sfval_min), r(nn.sfval_max), r(nn.sfval_avg), r(nn.sfval_cov),
             nn.train_file, str(nn.normalized), repr(nn.scale), repr(nn.shift), str(nn.ntypes),
             " ".join(nn.type_names) + " ", " ".join(repr(float(e)) for e in nn.e_atom) + " ",
             str(nn.num_atoms_total), str(nn.num_structures), f"{nn.e_min!r} {nn.e_max!r} {nn.e_avg!r}"]
    return "\n".join(lines) + "\n"


def test_reads_aenet_pytorch_ascii_like_nnASCII2bin(ref_nn, tmp_path):
    """List-directed reading: 'Descriptor for Ti$$' -> 'Descriptor', 'True' -> .true., fixed-point reals."""
    nn = read_nn(ref_nn)
    txt = tmp_path / "apt.ascii"
    txt.write_text(_aenet_pytorch_ascii(nn, f"Descriptor for {nn.atomtype}$$"))
    assert nn_to_bytes(read_nn_ascii(txt)) == ref_nn.read_bytes()
    # gfortran list-directed output (nnASCII2bin --to-ascii): leading blanks, env types one per line
    lines = txt.read_text().splitlines()
    lines[9] = " " + "Descriptor".ljust(1024)
    lines[27] = " T"
    lines[12:13] = [f"{t:2s}" for t in nn.envtypes]  # after the index-based edits above
    txt.write_text("\n".join(lines) + "\n")
    assert nn_to_bytes(read_nn_ascii(txt)) == ref_nn.read_bytes()


def test_ascii_checks_counts_like_binary(ref_nn, tmp_path):
    """The ASCII reader checks each count where it is read (as the binary one), not records later."""
    txt = tmp_path / "bad.ascii"
    write_nn_ascii(txt, read_nn(ref_nn))
    lines = txt.read_text().splitlines()
    for k, value, message in [(17, "0", "line 17, record 17 (nsf): nsf = 0 is invalid (must be >= 1"),
                              (12, "-1", "line 12, record 12 (nenv): nenv = -1 is invalid (must be >= 0"),
                              (3, "3", "records 2-4 (nnodes_max, Wsize, nvalues) = (56, 3, 70) are inconsistent"),
                              (7, "0 1 2 3", "line 7, record 7 (iw): is [0, 1, 2, 3], expected [0, 285, 315, 321]")]:
        txt.write_text("\n".join(lines[:k - 1] + [value] + lines[k:]) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{txt}: ") + ".*" + re.escape(message)):
            read_nn_ascii(txt)


def test_truncated_ascii_names_file(ref_nn, tmp_path):
    txt = tmp_path / "short.ascii"
    write_nn_ascii(txt, read_nn(ref_nn))
    txt.write_text("\n".join(txt.read_text().splitlines()[:20]) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(txt)) + r".*record 21 \(sfenv\).*truncated"):
        read_nn_ascii(txt)


# --------------------------------------------------------------------------- model conversion


def test_model_round_trip_is_byte_identical(ref_nn, tmp_path):
    nn = read_nn(ref_nn)
    setup = setup_from_nn(nn, source=str(ref_nn))
    assert setup.basis == ChebyshevBasis(6.5, 20, 5.0, 6) and setup.env_species == ("Ti", "O")
    assert setup.rmin == 0.35 and setup.num_features == 56 and setup.element == nn.atomtype
    net = element_net_from_nn(nn)
    assert net.config == NetworkConfig((5, 5), ("tanh", "tanh"), "linear")
    assert float(net.e_atom) == nn.e_atom_of(nn.atomtype) and float(net.scale) == nn.scale
    w0, b0 = nn.layer_weights(0)
    assert np.array_equal(net.layers[0].weight.detach().numpy(), w0)
    assert np.array_equal(w0[:, 0], nn.W[0:5]) and np.array_equal(b0, nn.W[280:285])  # column-major, bias last
    out = nn_from_element_net(net, setup, TrainSetInfo.from_nn(nn))
    out_path = tmp_path / ref_nn.name
    write_nn(out_path, out)
    assert out_path.read_bytes() == ref_nn.read_bytes()


def test_new_net_exports_aenet_chebyshev_setup(tmp_path):
    setup = DescriptorSetup("Zn", ("Zn", "O", "H"), "chebyshev", ChebyshevBasis(6.0, 8, 4.0, 3), rmin=0.5,
                            description="x" * 2000)
    net = ElementNet(setup.num_features, NetworkConfig((4,), ("twist",)), "Zn", dtype=torch.float64)
    rng = np.random.default_rng(0)
    G = rng.normal(size=(50, setup.num_features))
    net.set_feature_stats(G.min(0), G.max(0), G.mean(0), (G**2).mean(0), len(G))
    net.set_energy_scaling(0.5, -2.0, -10.0)
    info = TrainSetInfo(("Zn", "O", "H"), (-10.0, -5.0, -1.0), "zno.train", True, 50, 3, -3.0, -1.0, -2.0)
    nn = nn_from_element_net(net, setup, info)
    assert len(nn.description) == 1024 and nn.rc_max == 6.0 and nn.rc_min == 0.5 and nn.sftype == "Chebyshev"
    assert nn.sfparam[:, 0].tolist() == [6.0, 8.0, 4.0, 3.0] and not nn.sfparam[:, 1:].any()
    assert nn.activations.tolist() == [4, 0]
    write_nn(tmp_path / "Zn.nn", nn)
    back = read_nn(tmp_path / "Zn.nn")
    assert back.equals(nn)
    assert setup_from_nn(back).basis == setup.basis
    net2 = element_net_from_nn(back)
    Gt = torch.from_numpy(G)
    torch.testing.assert_close(net2(Gt), net(Gt), atol=0, rtol=0)
    with pytest.raises(ValueError, match="atomic energy"):
        nn_from_element_net(net, setup, dataclasses.replace(info, atomic_energies=(-11.0, -5.0, -1.0)))


# --------------------------------------------------------------------------- loading potentials


@pytest.fixture()
def ref_paths():
    paths = {el: REFDATA / f"{el}.pytorch.nn" for el in ELEMENTS}
    if not all(p.exists() for p in paths.values()):
        pytest.skip(f"aenet reference potentials not found in {REFDATA} (the shared/ folder is absent)")
    return paths


def test_load_potentials(ref_paths):
    predictor = Predictor.from_potentials(ref_paths)
    assert predictor.species == ("Ti", "O") and set(predictor.networks) == {"Ti", "O"}
    assert predictor.networks["O"].weights[0][0].dtype == np.float64
    nets = {el: element_net_from_nn(read_nn(path)) for el, path in ref_paths.items()}
    for el, net in nets.items():  # the same weights as the training-side network built from the file
        for layer, (weight, bias) in zip(net.layers, predictor.networks[el].weights):
            assert np.array_equal(layer.weight.detach().numpy(), weight) and np.array_equal(layer.bias.detach().numpy(), bias)


def test_load_potentials_missing_species(ref_paths):
    with pytest.raises(ValueError, match=r"ENV species \['O'\] have no potential"):
        Predictor.from_potentials({"Ti": ref_paths["Ti"]})


def test_load_potentials_rejects_mismatch(ref_paths, tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(ref_paths["Ti"])) + ".*'Ti'.*'O'"):
        Predictor.from_potentials({"Ti": ref_paths["Ti"], "O": ref_paths["Ti"]})
    other = tmp_path / "O.nn"
    write_nn(other, dataclasses.replace(read_nn(ref_paths["O"]), envtypes=("O", "Ti")))
    with pytest.raises(ValueError, match=re.escape(str(other)) + " and " + re.escape(str(ref_paths["Ti"])) + ".*ENV"):
        Predictor.from_potentials({"Ti": ref_paths["Ti"], "O": other})
