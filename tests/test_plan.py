"""``aenet-dist plan`` (aenet_dist.plan) as a user reads it: the summary line, one table row
per rank whose structures, atoms and derivative rows add up to the store's, the 'stream min'
column as plan_rows computes it, a budget below it marked ERROR, and one-line errors (exit 2)
for bad options.

plan_rows' sums and that 'stream min' is what training accepts are in test_loader.py;
--ranks 0 and a missing store are in test_cli.py.
"""

import re

import pytest

from aenet_dist import cli
from aenet_dist.plan import GiB, plan_rows
from aenet_dist.store import StoreReader
from helpers import featurized_emt


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return featurized_emt(tmp_path_factory.mktemp("plan"), 12, seed=3, force_percent=60.0, chunk_bytes=2**16)[1]


def _table(out: str) -> list[list[str]]:
    """The rows of the printed table, split into fields (the 'auto here' reason kept whole)."""
    lines = out.splitlines()
    start = next(k for k, line in enumerate(lines) if line.split()[:2] == ["rank", "structs"])
    rows = []
    for line in lines[start + 1:]:
        if not re.match(r"^\s*\d+\s", line):
            break
        rows.append(line.split(maxsplit=10))
    return rows


@pytest.mark.parametrize("ranks", [1, 3])
def test_one_row_per_rank_adding_up_to_the_store(store, capsys, ranks):
    reader = StoreReader(store)
    assert cli.main(["plan", str(store), "--ranks", str(ranks), "--dtype", "float64", "--batch-size", "4",
                     "--shuffle-window-blocks", "3", "--test-percent", "20", "--readers", "1"]) == 0
    out = capsys.readouterr().out
    blocks = len(reader.block_first) - 1
    assert out.splitlines()[0] == f"store {store}: {reader.num_structures} structures, {blocks} blocks; {ranks} rank(s), float64"
    rows = _table(out)
    assert [int(r[0]) for r in rows] == list(range(ranks))
    assert sum(int(r[1]) for r in rows) == reader.num_structures
    assert sum(int(r[2]) for r in rows) == int(reader.num_atoms.sum())
    assert sum(int(r[3]) for r in rows) == int(reader.num_deriv_rows.sum())
    expected = plan_rows(reader, ranks, itemsize=8, window_blocks=3, batch_size=4, test_percent=20.0, readers=1)
    assert [r[6] for r in rows] == [f"{e['host_stream'] / GiB:.3f}" for e in expected]  # 'stream min'
    assert all(r[10].startswith("memory (") for r in rows)  # a tiny store: auto keeps it in memory


def test_a_budget_below_stream_min_is_marked_error(store, capsys):
    assert cli.main(["plan", str(store), "--ranks", "2", "--cache", "stream", "--memory-budget-gb", "1e-6"]) == 1
    captured = capsys.readouterr()
    assert "error: 2 of 2 rank(s) cannot run with these settings" in captured.err
    rows = _table(captured.out)
    assert len(rows) == 2
    for r in rows:
        assert r[10].startswith("ERROR (a budget of 1e-06 GiB is below the ") and r[10].endswith(f"{r[6]} GiB stream needs)")


@pytest.mark.parametrize("args, message", [
    (["--memory-budget-gb", "0"], "--memory-budget-gb must be > 0, got 0"),
    (["--test-percent", "100"], "--test-percent must be in [0, 100), got 100"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--readers", "-1"], "--readers must be >= 1, got -1"),
    (["--ranks", "13"], "13 shards for 12 structures"),
])
def test_bad_options_are_one_line_errors(store, capsys, args, message):
    assert cli.main(["plan", str(store), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
