"""Units: the pieces an input is cut into (a run of image files, one tar shard, one
Parquet file). A unit is read by one task, streamed a batch at a time, and committed as
one Parquet part, so a rerun skips exactly the units that finished. Ids depend on the
files only, so a rerun plans the same units."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal

import pyarrow as pa

from skray.io.retry import IoRetry, StorageUnavailable
from skray.io.sources.files import read_image_files
from skray.io.sources.listing import Format, file_format
from skray.io.sources.parquet import parquet_rows, read_parquet
from skray.io.sources.rows import DEFAULT_MAX_OBJECT_BYTES, RowError, incomplete_error, make_row
from skray.io.sources.webdataset import SampleLimits, read_webdataset

UNKNOWN_ROWS = -1  # ``unit_rows`` of a row not in its unit's last batch
UNIT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("format", pa.string()),
        ("uris", pa.list_(pa.string())),
        ("rows", pa.int64()),
        ("sizes", pa.list_(pa.int64())),
    ]
)  # :meth:`Unit.to_row` as Arrow: a plan of 10M keys held as Python strings would be a GB


@dataclass(frozen=True)
class Unit:
    """A piece of input read by one task and committed as one Parquet part."""

    id: str
    format: Format
    uris: tuple[str, ...]
    rows: int | None = None  # known up front for image files and Parquet, not for tar shards
    # Bytes per uri, from the listing: an oversize file is never opened, and no read asks
    # the store for a size.
    sizes: tuple[int, ...] | None = None

    def to_row(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "uris": list(self.uris),
            "sizes": None if self.sizes is None else list(self.sizes),
        }

    @staticmethod
    def from_row(row: dict[str, Any]) -> "Unit":
        sizes = None if row["sizes"] is None else tuple(row["sizes"])
        return Unit(row["id"], row["format"], tuple(row["uris"]), row["rows"], sizes)


def unit_id(fmt: str, uris: list[str]) -> str:
    return hashlib.sha256(("\n".join([fmt, *uris])).encode()).hexdigest()[:20]


def group_units(
    files: list[str],
    fmt: Format | Literal["auto"],
    files_per_unit: int,
    parquet_columns: tuple[str, ...] = ("image",),
) -> list[Unit]:
    """Cut the sorted file list into units: image files in runs of ``files_per_unit``,
    each tar shard and each Parquet file on its own. Ids depend on the files only.
    Parquet files are checked for ``parquet_columns`` here, before any work."""
    by_format: dict[Format, list[str]] = {}
    for uri in files:
        by_format.setdefault(file_format(uri) if fmt == "auto" else fmt, []).append(uri)
    units: list[Unit] = []
    for kind, uris in by_format.items():
        if kind == "images":
            chunks = [uris[i : i + files_per_unit] for i in range(0, len(uris), files_per_unit)]
            units += [Unit(unit_id(kind, c), kind, tuple(c), len(c)) for c in chunks]
        else:
            units += [shard_unit(kind, f, parquet_columns) for f in uris]
    return units


def shard_unit(
    fmt: Format, uri: str, parquet_columns: tuple[str, ...] = ("image",), size: int | None = None
) -> Unit:
    """A tar shard or a Parquet file as a unit of its own (Parquet rows counted from its
    footer); ``size``: its bytes, where the listing gave them."""
    rows = parquet_rows(uri, parquet_columns, size) if fmt == "parquet" else None
    return Unit(unit_id(fmt, [uri]), fmt, (uri,), rows, None if size is None else (size,))


def _unit_rows(
    unit: Unit,
    image_column: str,
    id_column: str | None,
    meta_columns: tuple[str, ...],
    max_bytes: int,
    policy: IoRetry | None,
    limits: SampleLimits,
    buffer_bytes: int | None,
) -> Iterator[dict]:
    if unit.format == "images":
        return read_image_files(unit.uris, unit.sizes, max_bytes, policy)
    stored = (None if unit.sizes is None else unit.sizes[0], buffer_bytes)
    if unit.format == "webdataset":
        return read_webdataset(unit.uris[0], max_bytes, policy, limits, *stored)
    return read_parquet(
        unit.uris[0], image_column, id_column, meta_columns, max_bytes, policy, *stored
    )


def _tagged(rows: list[dict], unit_id: str, unit_rows: int) -> list[dict]:
    for row in rows:
        row["unit"], row["unit_rows"] = unit_id, unit_rows
    return rows


def unit_batches(
    unit: Unit,
    batch_size: int,
    image_column: str = "image",
    id_column: str | None = None,
    meta_columns: tuple[str, ...] = (),
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    io_retry: IoRetry | None = None,
    sample_limits: SampleLimits = SampleLimits(),
    read_buffer_bytes: int | None = None,
) -> Iterator[list[dict]]:
    """The rows of one unit, ``batch_size`` at a time as they are read, so a task holds a
    batch, never a whole shard. Rows carry ``unit`` and ``unit_rows``: UNKNOWN_ROWS, except
    in the unit's last batch, where it is the unit's row count (a full batch waits for one
    more row to learn whether it is the last: the writer knows the unit is complete once it
    holds that many rows, whatever order its batches came in). A unit without rows still
    yields one ``empty_shard`` row, so it is committed and reported. ``meta_columns`` of a
    Parquet file travel in ``meta`` (a training label, say). A shard or Parquet file is read
    ``read_buffer_bytes`` per request (default 16 MiB). When storage fails past
    ``io_retry``, the unit ends with one ``incomplete`` marker row: it was not read, and the
    writer must not commit it."""
    rows = _unit_rows(
        unit,
        image_column,
        id_column,
        meta_columns,
        max_object_bytes,
        io_retry,
        sample_limits,
        read_buffer_bytes,
    )
    batch: list[dict] = []
    count = 0
    try:
        for row in rows:
            if len(batch) == batch_size:
                yield _tagged(batch, unit.id, UNKNOWN_ROWS)
                batch = []
            batch.append(row)
            count += 1
    except StorageUnavailable as err:
        marker = make_row(
            f"{unit.uris[0]}#<not read>", error=incomplete_error(err.reason, str(err))
        )
        yield _tagged([*batch, marker], unit.id, count + 1)
        return
    if not count:
        error = RowError("empty_shard", f"the {unit.format} file holds no samples")
        batch, count = [make_row(unit.uris[0], error=error)], 1
    yield _tagged(batch, unit.id, count)


def table_batches(units: pa.Table, batch_size: int, **reading: Any) -> Iterator[list[dict]]:
    """:func:`unit_batches` (``reading``: its keyword arguments) of every unit in ``units``
    (rows of :meth:`Unit.to_row`, the block a Ray Data read task gets), one after the other."""
    for row in units.to_pylist():
        yield from unit_batches(Unit.from_row(row), batch_size, **reading)
