"""The featurize command: ``python -m aenet_dist.featurize generate.in --out store.zarr``.

Runs as one process or under ``mpiexec -n N``; a rerun of the same command after a
crash skips the completed blocks and finishes the store.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from .formats.generate_in import read_generate_input
from .config import StoreOptions
from .log import setup_logging
from .store import featurize_to_store, store_attrs, world_comm


DESCRIPTION = ("Compute aenet's descriptors and their derivatives for the structures of a generate.in "
               "into a Zarr store; a rerun of the same command finishes an interrupted store.")
EPILOG = ("examples:\n  aenet-dist featurize generate.in --out store.zarr\n"
          "  mpiexec -n 8 python -m aenet_dist.featurize generate.in --out store.zarr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aenet-dist featurize``."""
    parser.add_argument("generate_in", help="aenet generate.in (TYPES, SETUPS, FILES, FORCES, FORCESPERCENT)")
    parser.add_argument("--out", required=True, help="output Zarr store (directory)")
    parser.add_argument("--force-seed", type=int, default=0, help="seed of the FORCESPERCENT choice (default 0)")
    parser.add_argument("--force-list", help="text file naming the structures (one per line, '#' comments) that get derivatives; overrides FORCESPERCENT")
    parser.add_argument("--chunk-mb", type=float, default=32.0, help="target uncompressed MiB per block of structures, dG/dR counted as float64 whatever --deriv-dtype says (default 32)")
    parser.add_argument("--deriv-dtype", choices=("float64", "float32"), default="float64", help="storage dtype of dG/dR (default float64)")
    parser.add_argument("--compressor", choices=("zstd", "lz4", "none"), default="zstd",
                        help="codec of the store's chunks: zstd (default, smallest), lz4 or none (larger, faster to read "
                             "when training streams the store); every chunk carries a checksum")
    parser.add_argument("--compression-level", type=int, default=1, help="zstd level (-131072 to 22; negative: faster, larger) / Blosc clevel (1 to 9); default 1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify", action="store_true",
                        help="read back every chunk and metadata file of an existing store (checksums, lengths, missing files) "
                             "and redo damaged blocks and a damaged structure table")


def run(args: argparse.Namespace) -> int:
    """Featurize ``args.generate_in`` into ``args.out`` and print the store's summary (rank 0)."""
    comm = world_comm()
    setup_logging(comm.rank)
    force_structures = None
    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a directory (a store is a directory); choose another path")
        if args.chunk_mb * 2**20 < 2**16:
            raise ValueError(f"--chunk-mb must be at least 0.0625 (64 KiB), got {args.chunk_mb:g}")
        if args.force_list and not Path(args.force_list).is_file():
            raise ValueError(f"--force-list {args.force_list}: no such file")
        if args.force_list:
            lines = (line.split("#", 1)[0].strip() for line in Path(args.force_list).read_text().splitlines())
            force_structures = tuple(line for line in lines if line)
        config = read_generate_input(args.generate_in, force_seed=args.force_seed, force_structures=force_structures)
        options = StoreOptions(chunk_bytes=int(args.chunk_mb * 2**20), deriv_dtype=args.deriv_dtype,
                               compressor_level=args.compression_level, compressor=args.compressor)
        start = time.perf_counter()
        featurize_to_store(config, args.out, options, progress=not args.no_progress, verify=args.verify)
        elapsed = time.perf_counter() - start
    except (ValueError, OSError):
        # Every rank fails together (inputs read by all, store.together) with the same message: rank 0 reports it
        # (through the command line's error handler, exit code 2), the others only exit.
        if comm.rank == 0:
            raise
        return 2
    if comm.rank == 0:
        print(summary(args.out, elapsed, comm.size))
    return 0


def summary(path, elapsed: float, ranks: int) -> str:
    """Human-readable description of a finished store (from its root attributes: no zarr needed)."""
    attrs = store_attrs(path)
    num_structures = int(attrs["num_structures"])
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    lines = [
        f"store            {path}",
        f"structures       {num_structures} ({attrs['num_force_structures']} with derivatives)",
        f"atoms            {attrs['num_atoms']}",
        "species          " + ", ".join(f"{e} ({attrs['stats'][e]['count']} atoms, {attrs['num_features'][e]} features)" for e in attrs["species"]),
        f"derivative rows  {sum(attrs['num_deriv_rows'].values())}",
        f"blocks           {len(attrs['block_first']) - 1}",
        f"size on disk     {size / 2**20:.1f} MiB",
        f"energy/atom      min {attrs['energy_per_atom']['min']:.4f}  mean {attrs['energy_per_atom']['mean']:.4f}  max {attrs['energy_per_atom']['max']:.4f} eV (cohesive)",
        f"wall time        {elapsed:.2f} s on {ranks} rank(s), {num_structures / max(elapsed, 1e-9):.0f} structures/s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m aenet_dist.featurize ...``, the same as ``aenet-dist featurize ...``."""
    from .cli import main as cli_main

    return cli_main(["featurize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from .cli import exit_process

    exit_process(main())
