"""``aenet-dist plan store.zarr --ranks N --cache MODE``: memory and I/O per rank before a job is queued.

Reads only the store's structure table (no descriptors), shards it exactly as training will,
and prints per rank: structures, atoms, derivative rows, the bytes the shard occupies in a
cache, host and device memory each cache mode needs, the bytes read from the store per
epoch, and the mode ``auto`` would pick on this machine.
"""

from __future__ import annotations

import argparse
import sys

import psutil
import torch

from .loader import (
    CACHE_SAFETY,
    DEVICE_MARGIN_BYTES,
    PREFETCH_DEPTH,
    RESIDENT_PIECE_BYTES,
    BlockSource,
    choose_cache,
    epoch_plan,
    eval_plan_and_batch_bytes,
    rank_data,
    steps_per_epoch,
    smallest_stream_budget,
    stream_training_source,
    structure_bytes,
)
from .config import CACHE_MODES, DTYPES, DataConfig, RunConfig
from .store import StoreReader

GiB = 2**30


def plan_rows(reader: StoreReader, ranks: int, itemsize: int, window_blocks: int, batch_size: int, num_shards: int | None = None,
              test_percent: float = 10.0, readers: int | None = None, seed: int = 0, workers: int = 0) -> list[dict]:
    """One dict per rank with the figures the table prints.

    ``host_stream`` is the smallest ``data.memory_budget_gb`` the ``stream`` cache accepts for
    the first epoch's plan (blocks held at once, batches queued, blocks being converted; the
    test set streamed too); with twice the test set's size (``test_bytes``) more, the test set
    is kept in memory instead.
    """
    dtype = torch.float32 if itemsize == 4 else torch.float64
    per_structure = structure_bytes(reader, itemsize)
    readers = readers or 2  # auto picks at most 2 (loader.reader_threads): plan for the most
    rows = []
    for rank in range(ranks):
        data = rank_data(reader, rank, ranks, num_shards, test_percent, 0)
        local = per_structure[data.start : data.stop]
        shard = float(local.sum())
        # blocks being converted at once: by the worker processes (data.workers), else the reader threads
        train = stream_training_source(reader, data, dtype, readers=workers or readers)
        plan = epoch_plan(data, seed, 0, steps_per_epoch(data.num_train_global, batch_size), window_blocks)
        chunks, biggest_batch = eval_plan_and_batch_bytes(data, local, plan, batch_size)  # as training computes them
        live = float(train.live_bytes(plan).max(initial=0.0))
        if len(data.test_local):
            test = BlockSource(reader, data, data.test_local, dtype, resident=False, readers=readers)
            live = max(live, float(test.live_bytes(chunks).max(initial=0.0)))
        rows.append(
            {
                "rank": rank,
                "structures": data.stop - data.start,
                "atoms": int(reader.num_atoms[data.start : data.stop].sum()),
                "deriv_rows": int(reader.num_deriv_rows[data.start : data.stop].sum()),
                "shard_bytes": shard,
                "test_bytes": float(local[data.test_local].sum()),
                "host_memory": shard * CACHE_SAFETY + readers * 2 * RESIDENT_PIECE_BYTES,
                "host_stream": smallest_stream_budget(live, train, biggest_batch),
                "device_gpu": shard * CACHE_SAFETY + DEVICE_MARGIN_BYTES,
                "device_other": (PREFETCH_DEPTH + 1) * biggest_batch + DEVICE_MARGIN_BYTES,
                "read_per_epoch_stream": shard,
            }
        )
    return rows


DESCRIPTION = ("Memory and I/O per rank of a training run on a store, before the job is queued "
               "(reads only the store's structure table).")
EPILOG = "example: aenet-dist plan store.zarr --ranks 8 --cache stream --memory-budget-gb 4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aenet-dist plan``; those named after a config field default to that field's default."""
    parser.add_argument("store", help="Zarr store from featurize")
    parser.add_argument("--ranks", type=int, default=1, help="training ranks (default 1)")
    data, run = DataConfig(store="-"), RunConfig()  # the defaults training uses, from their one home
    parser.add_argument("--cache", default=data.cache, choices=CACHE_MODES,
                        help=f"data.cache to plan for (default {data.cache}: what training would choose here)")
    parser.add_argument("--dtype", default=run.dtype, choices=DTYPES, help=f"run.dtype (default {run.dtype})")
    parser.add_argument("--batch-size", type=int, default=run.batch_size, help=f"run.batch_size: global batch in structures (default {run.batch_size})")
    parser.add_argument("--shuffle-window-blocks", type=int, default=data.shuffle_window_blocks,
                        help=f"data.shuffle_window_blocks (default {data.shuffle_window_blocks})")
    parser.add_argument("--num-shards", type=int, default=data.num_shards, help="data.num_shards (default: one per rank)")
    parser.add_argument("--test-percent", type=float, default=data.test_percent, help=f"data.test_percent (default {data.test_percent:g})")
    parser.add_argument("--memory-budget-gb", type=float, default=data.memory_budget_gb, help="data.memory_budget_gb: host memory per rank for data")
    parser.add_argument("--readers", type=int, default=data.readers, help="data.readers (default: auto, planned as 2)")
    parser.add_argument("--workers", type=int, default=data.workers, help=f"data.workers (default {data.workers})")
    parser.add_argument("--ranks-per-node", type=int, default=None, help="ranks sharing one node's memory (default: --ranks)")


def run(args: argparse.Namespace) -> int:
    """Print the plan table of ``args.store``."""
    for name in ("ranks", "batch_size", "shuffle_window_blocks", "readers", "num_shards", "ranks_per_node"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.memory_budget_gb is not None and not args.memory_budget_gb > 0:
        raise ValueError(f"--memory-budget-gb must be > 0, got {args.memory_budget_gb:g}")
    if not 0 <= args.test_percent < 100:
        raise ValueError(f"--test-percent must be in [0, 100), got {args.test_percent:g}")
    reader = StoreReader(args.store)
    itemsize = 4 if args.dtype == "float32" else 8
    rows = plan_rows(reader, args.ranks, itemsize, args.shuffle_window_blocks, args.batch_size, args.num_shards, args.test_percent, args.readers,
                     workers=args.workers)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    host = psutil.virtual_memory().available
    print(f"store {args.store}: {reader.num_structures} structures, {len(reader.block_first) - 1} blocks; {args.ranks} rank(s), {args.dtype}")
    print(f"this machine: {host / GiB:.1f} GiB host memory available" + (f", {torch.cuda.mem_get_info()[0] / GiB:.1f} GiB free on {device}" if device.type == "cuda" else ", no GPU"))
    header = f"{'rank':>4} {'structs':>8} {'atoms':>9} {'dG rows':>10} {'shard GiB':>9} {'host mem/pinned':>15} {'stream min':>10} {'dev gpu':>8} {'dev other':>9} {'read/epoch stream':>17}  auto here"
    print(header)
    failing = 0
    for r in rows:
        try:
            budget = None if args.memory_budget_gb is None else args.memory_budget_gb * GiB
            mode, reason = choose_cache(args.cache, r["shard_bytes"], device, budget, args.ranks_per_node or args.ranks)
            if mode == "stream" and budget is not None and budget < r["host_stream"]:
                mode, reason = "ERROR", f"a budget of {args.memory_budget_gb} GiB is below the {r['host_stream'] / GiB:.3f} GiB stream needs"
        except ValueError as err:
            mode, reason = "ERROR", str(err)
        failing += mode == "ERROR"
        print(
            f"{r['rank']:>4} {r['structures']:>8} {r['atoms']:>9} {r['deriv_rows']:>10} {r['shard_bytes'] / GiB:>9.3f} "
            f"{r['host_memory'] / GiB:>15.3f} {r['host_stream'] / GiB:>10.3f} {r['device_gpu'] / GiB:>8.2f} {r['device_other'] / GiB:>9.2f} "
            f"{r['read_per_epoch_stream'] / GiB:>17.3f}  {mode} ({reason})"
        )
    print("GiB throughout, data only (Python, torch and the model add ~0.25 GiB per rank). 'stream min' = the smallest")
    print("data.memory_budget_gb stream accepts (with 2x the test set more, the test set is kept in memory: +" + f"{2 * max(r['test_bytes'] for r in rows) / GiB:.3f} GiB);")
    print("'host mem/pinned' = the shard with a margin, plus the readers' buffers while it loads (each reader 2 pieces of "
          f"{RESIDENT_PIECE_BYTES / 2**20:.0f} MiB: the floor for a small shard).")
    print("'dev other' = device memory for pinned/memory/stream (a few batches in flight plus a margin).")
    print("data.batches=fixed keeps the batches instead of the cache: in memory as much as 'shard GiB' (the data held once, "
          "and the descriptors, a few % of it, once more as the step's padded rows and buffers); "
          f"with stream on disk (data.batch_dir, default the run directory), up to {max(r['shard_bytes'] for r in rows) / GiB:.3f} GiB per rank, read "
          "back each epoch instead of the store.")
    if failing:  # a script (or a job template) can tell from the exit code that the run would not start
        print(f"error: {failing} of {len(rows)} rank(s) cannot run with these settings (rows marked ERROR)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aenet_dist.plan ...``, the same as ``aenet-dist plan ...``."""
    from .cli import main as cli_main

    return cli_main(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
