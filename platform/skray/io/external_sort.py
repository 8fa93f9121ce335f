"""Sorting more keys than memory holds: sorted runs spilled to local disk, merged back as
one sorted stream of bounded tables (the classic external merge sort).

Planning a rerun over a 100M-key bucket merges the listing with every committed key, and an
S3 Inventory report comes in no particular order: neither fits a driver as Python objects,
and both are needed sorted. Runs are Arrow IPC files in a temporary folder removed when the
stream ends; input that fits one run never touches the disk.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

RUN_ROWS = 1 << 19  # rows sorted in memory at once: ~150 MiB of 50-byte keys, copies included
SPILL_BATCH_ROWS = 1 << 12  # what the merge buffers per run: 200 runs of 50-byte keys, ~40 MiB


def _sorted(table: pa.Table, by: str) -> pa.Table:
    return table.take(pc.sort_indices(table, [(by, "ascending")]))


def _spill(table: pa.Table, folder: str, index: int) -> str:
    path = f"{folder}/run-{index:05d}.arrow"
    with pa.OSFile(path, "wb") as sink, ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=SPILL_BATCH_ROWS):
            writer.write_batch(batch)
    return path


def sorted_tables(
    tables: Iterable[pa.Table], by: str, run_rows: int | None = None, chunk_rows: int = 1 << 16
) -> Iterator[pa.Table]:
    """The rows of ``tables`` sorted by the column ``by``, as tables of at most about
    ``chunk_rows`` rows (one run) or one spilled batch per run (merged runs). Holds about
    ``run_rows`` (default ``RUN_ROWS``) rows while reading and ``SPILL_BATCH_ROWS`` per run
    while merging."""
    run_rows = run_rows or RUN_ROWS
    pending: list[pa.Table] = []
    held = 0
    with tempfile.TemporaryDirectory(prefix="skray-sort-") as folder:
        runs: list[str] = []
        for table in tables:
            pending.append(table)
            held += table.num_rows
            if held >= run_rows:
                runs.append(_spill(_sorted(pa.concat_tables(pending), by), folder, len(runs)))
                pending, held = [], 0
        if not runs:
            if pending:
                whole = _sorted(pa.concat_tables(pending), by)
                for start in range(0, whole.num_rows, chunk_rows):
                    yield whole.slice(start, chunk_rows)
            return
        if pending:
            runs.append(_spill(_sorted(pa.concat_tables(pending), by), folder, len(runs)))
        del pending
        yield from _merge(runs, by)


def _merge(paths: list[str], by: str) -> Iterator[pa.Table]:
    """The runs at ``paths`` (each sorted by ``by``) as one sorted stream: each round takes from
    every run the rows up to the smallest of the runs' last buffered keys — nothing unread can
    sort before that — so each round empties at least one run's buffer."""
    # read, not memory-mapped: mapped pages stay resident, and the runs are the whole input
    readers = [ipc.open_stream(pa.OSFile(path)) for path in paths]
    buffers: list[pa.Table | None] = [None] * len(readers)

    def refill(i: int) -> None:
        try:
            buffers[i] = pa.Table.from_batches([readers[i].read_next_batch()])
        except StopIteration:
            buffers[i] = None

    for i in range(len(readers)):
        refill(i)
    while any(b is not None for b in buffers):
        live = [i for i, b in enumerate(buffers) if b is not None]
        bound = min((buffers[i].column(by)[-1] for i in live), key=lambda s: s.as_py())
        taken = []
        for i in live:
            table = buffers[i]
            upto = pc.sum(pc.less_equal(table.column(by), bound)).as_py() or 0
            taken.append(table.slice(0, upto))
            buffers[i] = table.slice(upto) if upto < table.num_rows else None
            if buffers[i] is None:
                refill(i)
        yield _sorted(pa.concat_tables(taken), by)
