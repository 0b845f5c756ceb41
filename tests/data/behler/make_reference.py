"""Make the Behler2011 reference data in this folder with aenet's own generate.x.

Run from the project root (needs ../shared/peers, which builds generate.x):

    .venv/bin/python tests/data/behler/make_reference.py

It writes a few small structures of our own (xsf/, seeded random positions: periodic
cells larger and smaller than the cutoffs, a triclinic cell, three species, a free
molecule), runs generate.x on them with the setups here (every structure with
derivatives) and stores, per run, aenet's raw G and its dG/dR summed over periodic
images into ``reference_<run>.npz`` (keys as ``../shared/refdata``'s descriptor file:
``G``, ``dG_struct``, ``dG_center``, ``dG_neighbor``, ``dG``, 0-based indices).
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
