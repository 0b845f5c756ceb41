"""Make the Behler2011 reference data in this folder with aenet's own generate.x.

Run from the project root (needs ../shared/peers, which builds generate.x):

    .venv/bin/python tests/data/behler/make_reference.py

It writes a few small structures of our own (xsf/, seeded random positions: periodic
cells larger and smaller than the cutoffs, a triclinic cell, three species, a free
molecule), runs generate.x on them with the setups here (every structure with
derivatives) and stores, per run, aenet's raw G and its dG/dR summed over periodic
images into ``reference_<run>.npz`` (keys as ``../shared/refdata``'s descriptor file:
``G``, ``dG_struct``, ``dG_center``, ``dG_neighbor``, ``dG``, 0-based indices).

Then it writes a small Behler2011 potential (potential/O.nn, potential/Ti.nn: seeded random
2 x 5 tanh networks, statistics of the two-species G) with aenet_dist's exporter and stores
what aenet's predict_hp.x computes with it (total energies, forces) in ``reference_predict.npz``.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
ENERGY = {"O": -432.503149303, "Ti": -1604.604515075, "N": -270.0}

RUNS = {
    "two_species": {"types": ("O", "Ti"), "setups": {"O": "O.stp", "Ti": "Ti.stp"},
                    "structures": ("tio2_bulk", "tio2_small_triclinic", "tio2_molecule")},
    "three_species": {"types": ("O", "Ti", "N"), "setups": {"O": "O3.stp", "Ti": "Ti3.stp", "N": "N3.stp"},
                      "structures": ("tion_bulk",)},
}


def random_positions(rng, count: int, cell: np.ndarray | None, box: float, min_dist: float) -> np.ndarray:
    """Positions at least ``min_dist`` apart (minimum image in ``cell`` when periodic)."""
    pos: list[np.ndarray] = []
    while len(pos) < count:
        p = rng.random(3) @ cell if cell is not None else rng.random(3) * box
        ok = True
        for q in pos:
            d = p - q
            if cell is not None:
                frac = np.linalg.solve(cell.T, d)
                d = (frac - np.round(frac)) @ cell
            ok &= bool(np.linalg.norm(d) >= min_dist)
        if ok:
            pos.append(p)
    return np.array(pos)


def write_xsf(path: Path, species, pos, cell) -> None:
    lines = [f"# total energy = {sum(ENERGY[s] for s in species) - 5.0:.8f} eV", ""]
    if cell is None:
        lines.append("ATOMS")
    else:
        lines += ["CRYSTAL", "PRIMVEC"] + [" ".join(f"{x:16.10f}" for x in row) for row in cell] + ["PRIMCOORD", f"{len(species)} 1"]
    lines += [f"{s:3s}" + " ".join(f"{x:16.10f}" for x in p) + "   0.0 0.0 0.0" for s, p in zip(species, pos)]
    path.write_text("\n".join(lines) + "\n")


def make_structures(xsf: Path) -> None:
    rng = np.random.default_rng(2011)
    xsf.mkdir(exist_ok=True)
    cell = np.diag([4.6, 4.7, 5.9])
    write_xsf(xsf / "tio2_bulk.xsf", ["Ti"] * 4 + ["O"] * 8, random_positions(rng, 12, cell, 0, 1.7), cell)
    cell = np.array([[3.2, 0.0, 0.0], [1.4, 3.9, 0.0], [0.3, -0.6, 4.4]])
    write_xsf(xsf / "tio2_small_triclinic.xsf", ["Ti"] * 2 + ["O"] * 4, random_positions(rng, 6, cell, 0, 1.6), cell)
    write_xsf(xsf / "tio2_molecule.xsf", ["Ti"] * 2 + ["O"] * 5, random_positions(rng, 7, None, 3.6, 1.6), None)
    cell = np.array([[5.0, 0.0, 0.0], [0.0, 4.8, 0.0], [0.8, 0.0, 5.1]])
    write_xsf(xsf / "tion_bulk.xsf", ["Ti"] * 4 + ["O"] * 5 + ["N"] * 3, random_positions(rng, 12, cell, 0, 1.6), cell)


class Records:
    """Fortran unformatted sequential records (int32 length, payload, int32 length)."""

    def __init__(self, path: Path):
        self.data, self.at = path.read_bytes(), 0

    def next(self) -> bytes:
        (n,) = struct.unpack_from("<i", self.data, self.at)
        payload = self.data[self.at + 4 : self.at + 4 + n]
        self.at += 8 + n
        return payload

    def ints(self) -> np.ndarray:
        return np.frombuffer(self.next(), dtype="<i4")

    def reals(self) -> np.ndarray:
        return np.frombuffer(self.next(), dtype="<f8")


def read_outputs(train: Path, forces: Path, num_types: int) -> dict:
    r = Records(train)
    (_,), (num_structures,) = r.ints(), r.ints()
    for _ in range(5):  # type names, E_atom, normalized, scale, shift
        r.next()
    G, names, natoms = [], [], []
    for _ in range(num_structures):
        r.next()
        names.append(r.next().decode())
        n, _ = r.ints()
        natoms.append(int(n))
        r.next()  # energy
        for _ in range(n):
            r.next(), r.next(), r.next()  # type, position, force
            (nsf,) = r.ints()
            G.append(np.zeros(max(nsf, 0)) if nsf == 0 else r.reals())
    f = Records(forces)
    (count,) = f.ints()
    assert count == num_structures
    rows: dict[tuple[int, int, int], np.ndarray] = {}
    for s in range(num_structures):
        f.next(), f.next(), f.ints()
        (flag,) = f.ints()
        assert flag == 1
        for i in range(natoms[s]):
            f.ints()
            nsf, nnb = f.ints()
            nblist = f.ints() - 1
            d_i = f.reals().reshape(3, nsf).T
            d_j = f.reals().reshape(3, nsf, nnb).transpose(2, 1, 0)
            rows[(s, i, i)] = rows.get((s, i, i), 0) + d_i
            for n, a in enumerate(nblist):
                rows[(s, i, int(a))] = rows.get((s, i, int(a)), 0) + d_j[n]
    keys = sorted(rows)
    width = max(len(g) for g in G)
    return {
        "file_names": np.array(names), "natoms": np.array(natoms),
        "G": np.array([np.pad(g, (0, width - len(g)), constant_values=np.nan) for g in G]),
        "num_features": np.array([len(g) for g in G]),
        "dG_struct": np.array([k[0] for k in keys], dtype=np.int32),
        "dG_center": np.array([k[1] for k in keys], dtype=np.int32),
        "dG_neighbor": np.array([k[2] for k in keys], dtype=np.int32),
        "dG": np.array([np.pad(rows[k], ((0, width - len(rows[k])), (0, 0)), constant_values=np.nan) for k in keys]),
    }


def write_potential(ref: dict, setups: dict, out: Path) -> None:
    """Seeded random networks for O and Ti with the reference G's statistics, as aenet .nn files."""
    import torch

    from aenet_dist.export import TrainSetInfo, nn_from_element_net
    from aenet_dist.formats.nn import write_nn
    from aenet_dist.model import ElementNet, NetworkConfig

    torch.manual_seed(5)
    out.mkdir(exist_ok=True)
    types = ("O", "Ti")
    info = TrainSetInfo(types, tuple(ENERGY[t] for t in types), "reference.train", True, 25, 3, -8.5, -7.5, -8.2)
    atom_species = np.concatenate([[line.split()[0] for line in (HERE / str(name)).read_text().splitlines()
                                    if line.split() and line.split()[0] in types] for name in ref["file_names"]])
    for element in types:
        G = ref["G"][atom_species == element][:, : setups[element].num_features]
        net = ElementNet(G.shape[1], NetworkConfig(hidden=(5, 5), activations=("tanh", "tanh")), element, dtype=torch.float64)
        net.set_feature_stats(G.min(0), G.max(0), G.mean(0), (G * G).mean(0), len(G))
        net.set_energy_scaling(1.7, -8.0, ENERGY[element])
        write_nn(out / f"{element}.nn", nn_from_element_net(net, setups[element], info))


def read_predict_output(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Total energies and forces (all atoms, structure order) from predict_hp.x's output."""
    energies = [float(line.split(":")[1].split()[0]) for line in text.splitlines() if line.strip().startswith("Total energy")]
    forces, inside = [], False
    for line in text.splitlines():
        if line.strip().startswith("-----"):
            inside = True
            continue
        parts = line.split()
        if inside and len(parts) == 7:
            forces.append([float(v) for v in parts[4:]])
        elif inside:
            inside = False
    return np.array(energies), np.array(forces)


def make_predict_reference(peers: Path) -> None:
    from aenet_dist.formats.stp import read_setup

    ref = dict(np.load(HERE / "reference_two_species.npz"))
    setups = {e: read_setup(HERE / stp) for e, stp in RUNS["two_species"]["setups"].items()}
    write_potential(ref, setups, HERE / "potential")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "xsf").symlink_to(HERE / "xsf")
        for element in ("O", "Ti"):
            (work / f"{element}.nn").symlink_to(HERE / "potential" / f"{element}.nn")
        names = [str(n) for n in ref["file_names"]]
        text = ["TYPES", "2", "O", "Ti", "", "NETWORKS", "O O.nn", "Ti Ti.nn", "", "FORCES", "", "FILES", str(len(names))] + names
        (work / "predict.in").write_text("\n".join(text) + "\n")
        done = subprocess.run([str(peers / "predict_hp.x"), "predict.in"], cwd=work, capture_output=True, text=True, errors="replace")
    energies, forces = read_predict_output(done.stdout)
    if len(energies) != len(names) or len(forces) != int(ref["natoms"].sum()):
        raise SystemExit(f"predict_hp.x output not understood:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    np.savez_compressed(HERE / "reference_predict.npz", file_names=np.array(names), natoms=ref["natoms"],
                        energy_total=energies, forces=forces)
    print("predict_hp.x energies", energies)


def main() -> int:
    peers = Path(subprocess.run(["bash", str(SHARED / "peers" / "build.sh")], check=True, capture_output=True, text=True).stdout.split()[-1])
    make_structures(HERE / "xsf")
    for run, spec in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "xsf").symlink_to(HERE / "xsf")
            for element, stp in spec["setups"].items():
                (work / stp).symlink_to(HERE / stp)
            text = ["OUTPUT out.train", "", "TYPES", str(len(spec["types"]))]
            text += [f"{t} {ENERGY[t]}" for t in spec["types"]]
            text += ["", "SETUPS"] + [f"{e} {stp}" for e, stp in spec["setups"].items()]
            text += ["", "FORCES", "FORCESPERCENT 100", "", "FILES", str(len(spec["structures"]))]
            text += [f"xsf/{name}.xsf" for name in spec["structures"]]
            (work / "generate.in").write_text("\n".join(text) + "\n")
            done = subprocess.run([str(peers / "generate.x"), "generate.in"], cwd=work, capture_output=True, text=True, errors="replace")
            if done.returncode != 0 or not (work / "out.train").exists():
                print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
                return 1
            ref = read_outputs(work / "out.train", work / "out.train.forces", len(spec["types"]))
        np.savez_compressed(HERE / f"reference_{run}.npz", **ref)
        print(run, "structures", list(ref["file_names"]), "rows", len(ref["dG"]))
    make_predict_reference(peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
