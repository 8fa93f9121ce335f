"""Committing labeled rows: one Parquet part per unit, written off the driver's critical path.

The driver only groups rows by unit, in Arrow (never a Python object per row); once
all of a unit's rows are here its part goes to a bounded pool of writer threads, so
the per-PUT latency of S3 overlaps instead of adding up. Exactly once still holds:

* a part is written atomically under its unit's name, and a part that exists is a
  unit that is done (:mod:`skray.label.plan`), so a crash mid-write leaves the unit to do;
* a failed write fails the run: the next ``add`` or ``close`` raises it, and writes
  not yet started are dropped (their units stay to do);
* ``guard`` (the lease's check) runs right before every write, so a lost lease
  stops every write from then on;
* a unit that ends with an ``incomplete`` marker (storage failed past its retry budget,
  :mod:`skray.io.sources.units`) is not committed: it is counted in ``incomplete`` and
  the next run reads it again;
* a part is written with its store's retry budget, create-only: a part that exists
  means another writer got there, and the run stops (:func:`skray.label.sinks.write_part`);
* ``close`` returns only once every part is written: the manifest comes after it.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skray.io.retry import IoRetry
from skray.io.sources.rows import INCOMPLETE
from skray.label.sinks import LABEL_SCHEMA, write_part

DEFAULT_CONCURRENCY = (
    32  # parts written at once: 32 PUTs of 50 ms are ~160k rows/s with 256-row units
)
MAX_BYTES_IN_FLIGHT = 256 * 2**20  # Arrow bytes of the parts queued or being written

ROUTING_COLUMNS = ("unit", "unit_rows")


def _no_guard() -> None:
    """Commit without a lease."""


def _runs(table: pa.Table) -> Iterator[tuple[str, int, int, int]]:
    """(unit, start, end, unit_rows) for each run of rows of one unit: a batch holds whole
    decode batches, so a few runs, found by Arrow's run-end encoding of the unit column."""
    if not table.num_rows:
        return
    runs = pc.run_end_encode(table.column("unit").combine_chunks())
    ends = runs.run_ends.to_numpy()
    starts = np.concatenate(([0], ends[:-1]))
    counts = np.maximum.reduceat(
        table.column("unit_rows").to_numpy(), starts
    )  # -1 but on a unit's last batch
    yield from zip(runs.values.to_pylist(), starts.tolist(), ends.tolist(), counts.tolist())


def _incomplete(rows: pa.Table) -> str | None:
    """The marker's error when the unit was not read whole, else None."""
    marked = pc.equal(pc.fill_null(rows.column("reason"), ""), INCOMPLETE)
    if not pc.any(marked).as_py():
        return None
    return rows.column("error").filter(marked)[0].as_py()


class UnitCommitter:
    """Gathers rows per unit and commits a unit's part as soon as all its rows arrived.

    Units stream: only the rows of a unit's last read batch carry its row count
    (the others ``unit_rows = -1``), and batches may arrive in any order, so a
    unit is complete once its count is known and that many rows are here. Columns
    outside the label schema (a stage's timings) are dropped; a part's rows are
    sorted by key. Use as a context manager, or call ``close``."""

    def __init__(
        self,
        output: str,
        guard: Callable[[], None] = _no_guard,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT,
        io_retry: IoRetry | None = None,
    ) -> None:
        self.output, self.guard, self.max_bytes_in_flight = output, guard, max_bytes_in_flight
        self.io_retry = io_retry
        self.incomplete: dict[str, str] = {}  # unit -> why it was not read
        self.pending: dict[str, list[pa.Table]] = defaultdict(
            list
        )  # the row groups of incomplete units
        self.arrived: dict[str, int] = defaultdict(int)  # rows per pending unit
        self.expected: dict[str, int] = {}  # row count per pending unit, once its last batch came
        self.committed = 0  # parts written
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="skray-commit")
        self._state = threading.Condition()  # guards the three below
        self._bytes_in_flight = 0
        self._failure: BaseException | None = None
        self._closed = False

    def add(self, batch: pa.Table) -> int:
        """Take a batch of rows (any units, any order); returns its row count."""
        self._raise_failure()
        table = batch.select([*LABEL_SCHEMA.names, *ROUTING_COLUMNS])
        for unit, start, end, unit_rows in _runs(table):
            self.pending[unit].append(table.slice(start, end - start))
            self.arrived[unit] += end - start
            if unit_rows >= 0:
                self.expected[unit] = unit_rows
            if self.arrived[unit] == self.expected.get(unit):
                rows = pa.concat_tables(self.pending.pop(unit)).select(LABEL_SCHEMA.names)
                del self.arrived[unit], self.expected[unit]
                if why := _incomplete(rows):
                    self.incomplete[unit] = why
                else:
                    self._submit(unit, rows.sort_by("key"))
        return batch.num_rows

    def _submit(self, unit: str, part: pa.Table) -> None:
        size = part.nbytes
        with self._state:  # backpressure: the driver waits while too many bytes are in flight
            self._state.wait_for(
                lambda: (
                    self._failure is not None
                    or self._bytes_in_flight == 0
                    or self._bytes_in_flight + size <= self.max_bytes_in_flight
                )
            )
            self._raise_failure()
            self._bytes_in_flight += size
        self._pool.submit(self._write, unit, part, size)

    def _write(self, unit: str, part: pa.Table, size: int) -> None:
        try:
            if self._failure is None:  # after a failure, nothing more is written
                self.guard()
                write_part(self.output, unit, part, self.io_retry)
                with self._state:
                    self.committed += 1
        except BaseException as err:  # noqa: BLE001 - handed to the driver thread, which raises it
            with self._state:
                self._failure = self._failure or err
        finally:
            with self._state:
                self._bytes_in_flight -= size
                self._state.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        """Wait for every write, then raise the first failure, or fail if a unit is incomplete."""
        self._shutdown(cancel=False)
        self._raise_failure()
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} units ended incomplete: rerun to finish them")

    def _shutdown(self, cancel: bool) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> UnitCommitter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # the run failed: writes not started are dropped, running ones end (each is atomic)
            self._shutdown(cancel=True)
