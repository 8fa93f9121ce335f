"""skray.io.external_sort: more keys than a run holds come back as one sorted stream, the runs
spilled to disk and merged a bounded batch per run at a time."""

from __future__ import annotations

import os
import random

import pyarrow as pa
import pytest

from skray.io import external_sort
from skray.io.external_sort import sorted_tables

pytestmark = pytest.mark.timeout(60)


def shuffled_tables(n: int, per_table: int) -> tuple[list[str], list[pa.Table]]:
    keys = [f"s3://b/{random.Random(i).randrange(10**6):06d}/{i}.jpg" for i in range(n)]
    random.Random(0).shuffle(keys)
    tables = [
        pa.table(
            {
                "key": keys[i : i + per_table],
                "size": list(range(i, i + per_table))[: len(keys[i : i + per_table])],
            }
        )
        for i in range(0, n, per_table)
    ]
    return keys, tables


@pytest.mark.parametrize("run_rows", [50, 10_000], ids=["spilled", "one-run"])
def test_rows_come_back_sorted_by_the_column_each_whole_and_once(monkeypatch, run_rows):
    monkeypatch.setattr(external_sort, "SPILL_BATCH_ROWS", 16)
    keys, tables = shuffled_tables(1000, 70)
    size_of = {r["key"]: r["size"] for t in tables for r in t.to_pylist()}

    out = list(sorted_tables(tables, "key", run_rows=run_rows, chunk_rows=100))

    rows = [r for t in out for r in t.to_pylist()]
    assert [r["key"] for r in rows] == sorted(keys)
    assert all(r["size"] == size_of[r["key"]] for r in rows), "rows travel whole"
    # spilled, every input table is a run of its own: a merge round holds a batch of each
    most = 16 * len(tables) if run_rows < 70 else 100
    assert max(t.num_rows for t in out) <= most


def test_runs_are_spilled_to_a_folder_that_is_gone_when_the_stream_ends(monkeypatch):
    folders = []
    spill = external_sort._spill

    def recorded(table, folder, index):
        folders.append(folder)
        return spill(table, folder, index)

    monkeypatch.setattr(external_sort, "_spill", recorded)
    _, tables = shuffled_tables(300, 50)

    assert sum(t.num_rows for t in sorted_tables(tables, "key", run_rows=100)) == 300
    assert len(folders) == 3 and not os.path.exists(folders[0])
