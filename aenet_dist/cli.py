"""``aenet-dist`` command line: one argparse tree, one subcommand per stage, one error handler.

Each command module (``aenet_dist.<command>``) provides ``DESCRIPTION`` and ``EPILOG`` (its
``--help`` text), ``add_arguments(parser)`` and ``run(args) -> int``, and may provide
``parse_args(parser, argv)`` when it parses its own way; its ``main(argv)`` calls :func:`main`, so
``python -m aenet_dist.<command>`` and ``aenet-dist <command>`` are the same code.

Only the chosen command's module is imported (the command name is read before the tree is
built, and the other subcommands are bare names), so ``aenet-dist featurize`` never
loads the training, prediction or plotting code, and ``aenet-dist --help`` loads none of them.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import NoReturn

COMMANDS: dict[str, str] = {  # command (module aenet_dist.<command>) -> one-line help
    "featurize": "aenet generate.in -> Zarr store (descriptors and derivatives); MPI-parallel",
    "train": "train per-element networks from a store (torchrun for several ranks)",
    "export": "write aenet .nn potentials (one per element) from a training run",
    "predict": "energies/forces of structures with .nn potentials (predict.in or --potentials)",
    "plot": "learning curves and parity plots of a training run",
    "plan": "memory per rank and cache mode for a store, before a job is queued",
    "datasets": "generate the embedded EMT datasets (emt, synth)",
}

# Bad input: a wrong value, a missing, unreadable or unwritable file. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
# What to do after a Ctrl-C, per command (train handles its own: it checkpoints first).
INTERRUPTED_HINTS = {"featurize": "rerun the same command to resume (finished blocks are kept)"}


def build_parser(command: ModuleType | None = None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The ``aenet-dist`` parser and the subparser of the ``command`` module, the only one built in full.

    The other subcommands are bare names (the help lists them from COMMANDS), so that their
    modules need not be imported.
    """
    # The command table goes in the description: argparse's own list of subcommands wraps badly.
    table = "\n".join(f"  {name:<11} {help_text}" for name, help_text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="aenet-dist", usage="aenet-dist <command> [args]",
        description="Featurize, train, export and run aenet neural-network interatomic potentials.\n\ncommands:\n" + table,
        epilog="Run `aenet-dist <command> --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(prog="aenet-dist", metavar="<command>", required=True, help=argparse.SUPPRESS)
    chosen = None
    for name, help_text in COMMANDS.items():
        if command is None or command.__name__ != f"aenet_dist.{name}":
            sub.add_parser(name)
            continue
        chosen = sub.add_parser(name, description=command.DESCRIPTION, epilog=command.EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        command.add_arguments(chosen)
        _no_abbreviations(chosen)
    return parser, chosen


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Refuse abbreviated options (``--resum`` for ``--resume``) in ``parser`` and the subparsers a
    command module added to it (datasets emt|synth): an abbreviation that is unique today becomes
    ambiguous, or silently another option, when an option is added."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _no_abbreviations(subparser)


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``'s exit code; a user error becomes one line ``error: <message>`` on stderr and exit code 2."""
    try:
        return int(run(args) or 0)
    except USER_ERRORS as err:
        from .files import describe_os_error  # (here: `aenet-dist --help` imports nothing but this module)

        print(f"error: {describe_os_error(err) if isinstance(err, OSError) else err}", file=sys.stderr)
        return USER_ERROR_EXIT


def _is_main_rank() -> bool:
    """Not a rank other than 0 of an MPI job (featurize under mpiexec) or of torchrun (``RANK``): a
    Ctrl-C reaches every rank, and one line says it."""
    if os.environ.get("RANK", "0") != "0":
        return False
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is None or not mpi.Is_initialized() or mpi.COMM_WORLD.rank == 0


def main(argv: Sequence[str] | None = None) -> int:
    """``aenet-dist <command> [args]``; the exit code of the command (argparse exits 2 on a bad command line,
    130 after a Ctrl-C)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (a command that must clean up catches it first)
        if _is_main_rank():
            hint = INTERRUPTED_HINTS.get(argv[0] if argv else "")
            print(f"interrupted{f'; {hint}' if hint else ''}", file=sys.stderr)
        return INTERRUPTED_EXIT


def _main(argv: list[str]) -> int:
    module = importlib.import_module(f"aenet_dist.{argv[0]}") if argv and argv[0] in COMMANDS else None
    parser, chosen = build_parser(module)
    if module is None or chosen is None:
        if not argv:  # no command: the overview, as for a bad command line (exit 2, so that a script notices)
            parser.print_help(sys.stderr)
            return 2
        parser.parse_args(argv)  # exits: 0 for --help; 2 naming the commands for an unknown one
        parser.print_usage(sys.stderr)  # only for odd input such as `aenet-dist -- featurize`
        return 2
    # The subparser parses the command's arguments itself, so that a module can parse its own way (train: intermixed).
    parse = getattr(module, "parse_args", argparse.ArgumentParser.parse_args)
    return run_command(module.run, parse(chosen, argv[1:]))


FAST_EXIT_COMMANDS = ("featurize", "predict", "train")
"""Commands whose process ends without Python's teardown (:func:`exit_process`): they leave nothing
pending at their end. Training closes its metrics files, TensorBoard writer and data workers
and destroys its process group before it returns; the teardown after that only risked an abort
(a gloo thread releasing a Python object while the interpreter shut down, see
:func:`aenet_dist.dist.cleanup`)."""


def exit_process(code: int) -> NoReturn:
    """End the process with exit status ``code`` without tearing the interpreter down.

    With torch imported, Python's shutdown (the final garbage collection and the freeing of
    every module's objects) took 0.6-0.8 CPU-s: about a sixth of a featurize rank on TiO2-1000
    and of a predict run (both were torch-based until 2026-12; without torch the teardown is
    smaller but still pure waste). At the end of featurize and predict nothing is pending (files
    are written atomically and closed), so the streams and logging are flushed
    and the process exits at once. Under MPI (mpi4py, imported by the store only, has started it)
    the exit is the normal one, only without the final garbage collection (gc.freeze: ~0.3 of
    the 0.6-0.8 s): with MPICH's mpiexec, a rank that left by os._exit right after MPI_Finalize
    had the ranks still finishing killed (signal 9).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written anyway
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        gc.freeze()
        sys.exit(code)
    os._exit(code)


def entry() -> NoReturn:
    """The ``aenet-dist`` console script: :func:`main`, then the exit (fast for :data:`FAST_EXIT_COMMANDS`)."""
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] in FAST_EXIT_COMMANDS:
        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
