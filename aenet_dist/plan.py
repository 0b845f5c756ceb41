"""``aenet-dist plan store.zarr --ranks N --cache MODE``: memory and I/O per rank before a job is queued.

Reads only the store's structure table (no descriptors), shards it exactly as training will,
and prints per rank: structures, atoms, derivative rows, the bytes the shard occupies in a
cache, host and device memory each cache mode needs, the bytes read from the store per
epoch, and the mode ``auto`` would pick on this machine.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import psutil
import torch

from .loader import CACHE_SAFETY, DEVICE_MARGIN_BYTES, choose_cache, rank_data, structure_bytes
from .store import StoreReader

GiB = 2**30


def plan_rows(reader: StoreReader, ranks: int, itemsize: int, window_blocks: int, batch_size: int, num_shards: int | None = None) -> list[dict]:
    """One dict per rank with the figures the table prints."""
    per_structure = structure_bytes(reader, itemsize)
    block_bytes = np.add.reduceat(per_structure, reader.block_first[:-1])
    rows = []
    for rank in range(ranks):
        data = rank_data(reader, rank, ranks, num_shards, 0.0, 0)
        shard = float(per_structure[data.start : data.stop].sum())
        blocks = block_bytes[(reader.block_first[:-1] >= data.start) & (reader.block_first[:-1] < data.stop)]
        biggest_batch = float(np.sort(per_structure[data.start : data.stop])[-max(1, batch_size // ranks) :].sum())
        rows.append(
            {
                "rank": rank,
                "structures": data.stop - data.start,
                "atoms": int(reader.num_atoms[data.start : data.stop].sum()),
                "deriv_rows": int(reader.num_deriv_rows[data.start : data.stop].sum()),
                "shard_bytes": shard,
                "host_memory": shard * CACHE_SAFETY,
                "host_stream": 2 * window_blocks * float(blocks.max() if len(blocks) else 0) * CACHE_SAFETY,
                "device_gpu": shard * CACHE_SAFETY + DEVICE_MARGIN_BYTES,
                "device_other": 3 * biggest_batch + DEVICE_MARGIN_BYTES,
                "read_per_epoch_stream": shard,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aenet-dist plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="Zarr store from featurize")
    parser.add_argument("--ranks", type=int, default=1, help="training ranks (default 1)")
    parser.add_argument("--cache", default="auto", choices=("auto", "gpu", "pinned", "memory", "stream"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--batch-size", type=int, default=128, help="global batch in structures")
    parser.add_argument("--shuffle-window-blocks", type=int, default=8)
    parser.add_argument("--num-shards", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        reader = StoreReader(args.store)
        itemsize = 4 if args.dtype == "float32" else 8
        rows = plan_rows(reader, args.ranks, itemsize, args.shuffle_window_blocks, args.batch_size, args.num_shards)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    host = psutil.virtual_memory().available
    print(f"store {args.store}: {reader.num_structures} structures, {len(reader.block_first) - 1} blocks; {args.ranks} rank(s), {args.dtype}")
    print(f"this machine: {host / GiB:.1f} GiB host memory available" + (f", {torch.cuda.mem_get_info()[0] / GiB:.1f} GiB free on {device}" if device.type == "cuda" else ", no GPU"))
    header = f"{'rank':>4} {'structs':>8} {'atoms':>9} {'dG rows':>10} {'shard GiB':>9} {'host mem/pinned':>15} {'host stream':>11} {'dev gpu':>8} {'dev other':>9} {'read/epoch stream':>17}  auto here"
    print(header)
    for r in rows:
        try:
            mode, reason = choose_cache(args.cache, r["shard_bytes"], device)
        except ValueError as err:
            mode, reason = "ERROR", str(err)
        print(
            f"{r['rank']:>4} {r['structures']:>8} {r['atoms']:>9} {r['deriv_rows']:>10} {r['shard_bytes'] / GiB:>9.3f} "
            f"{r['host_memory'] / GiB:>15.3f} {r['host_stream'] / GiB:>11.3f} {r['device_gpu'] / GiB:>8.2f} {r['device_other'] / GiB:>9.2f} "
            f"{r['read_per_epoch_stream'] / GiB:>17.3f}  {mode} ({reason})"
        )
    print("GiB throughout; 'dev other' = device memory for pinned/memory/stream (a few batches in flight plus a margin).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
