"""``aenet-dist`` command line: parses the subcommand and hands off to the stage's module."""

from __future__ import annotations

import sys

USAGE = """usage: aenet-dist <command> [args]

commands:
  featurize   aenet generate.in -> Zarr store (descriptors and derivatives); MPI-parallel
  train       train per-element networks from a store (torchrun for several ranks)
  export      write aenet .nn potentials (one per element) from a training run
  predict     energies/forces of structures with .nn potentials (predict.in or --potentials)
  plot        learning curves and parity plots of a training run
  plan        memory per rank and cache mode for a store, before a job is queued
  datasets    generate the embedded EMT datasets (emt, synth)

Run `aenet-dist <command> --help` for a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "featurize":
        from .featurize import main as run
    elif command == "train":
        from .train import main as run
    elif command == "export":
        from .export import main as run
    elif command == "predict":
        from .predict import main as run
    elif command == "plot":
        from .plot import main as run
    elif command == "plan":
        from .plan import main as run
    elif command == "datasets":
        from .datasets import main as run
    else:
        print(f"aenet-dist: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    result = run(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
