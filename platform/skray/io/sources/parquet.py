"""Parquet files: rows decoded a few at a time, column chunks read in pieces, so neither
the file nor a row group is held whole and an oversize cell is never copied into Python."""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skray.io.objects import ResumableFile
from skray.io.retry import IoRetry, StorageUnavailable, is_missing
from skray.io.sources.inputs import InputError
from skray.io.sources.rows import RowError, make_row, missing, too_large

PARQUET_BATCH_ROWS = 16  # rows decoded from Parquet at a time: at most this many objects held
PARQUET_BUFFER_BYTES = 2**20  # column chunks are read in pieces this large, not whole
FOOTER_BYTES = 2**16  # what planning reads of a file: pyarrow's first footer read


def parquet_rows(uri: str, columns: tuple[str, ...], size: int | None = None) -> int | None:
    """The file's row count from its footer (one ranged GET where ``size`` is known), after
    checking it has ``columns`` (a config mistake: fails before any work). None for an
    unreadable footer: a corrupt file is data, and becomes an ``unreadable_parquet`` row when
    its unit is read. A storage fault past the budget raises, as before any work."""
    try:
        with ResumableFile(uri, buffer_bytes=FOOTER_BYTES, size=size) as source:
            parquet = pq.ParquetFile(source)
    except StorageUnavailable:
        raise
    except Exception:  # noqa: BLE001 - any unreadable footer is the file's problem, reported as a row
        return None
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{uri}: no column {missing[0]!r} (columns: {names})")
    return parquet.metadata.num_rows


def _is_bytes(kind: pa.DataType) -> bool:
    return (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    )


def image_cells(column: pa.Array, name: str) -> tuple[pa.Array | None, RowError | None]:
    """The image bytes of a column: binary or string, or the ``bytes`` field of a
    ``struct<bytes, path>`` (the layout Hugging Face ``datasets`` writes); else None and the
    error naming the column's type."""
    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        column = pc.struct_field(column, "bytes")
    if _is_bytes(column.type):
        return column, None
    return None, RowError(
        "bad_image_column",
        f"column {name!r} is {column.type}, not binary, string or struct<bytes, path>",
    )


def _batch_rows(
    uri: str,
    batch: pa.RecordBatch,
    first: int,
    image_column: str,
    id_column: str | None,
    meta_columns: tuple[str, ...],
    max_bytes: int,
) -> Iterator[dict]:
    """The rows of one record batch (``first`` is the file's index of its first row); an
    image cell over ``max_bytes`` is a ``too_large`` row and is never copied into Python,
    and a column that holds no bytes makes every row an error naming its type."""
    images, unusable = image_cells(batch.column(image_column), image_column)
    sizes = pc.binary_length(images).to_pylist() if images is not None else []
    ids = batch.column(id_column).to_pylist() if id_column else [None] * batch.num_rows
    metas = {c: batch.column(c).to_pylist() for c in meta_columns}
    for i in range(batch.num_rows):
        key = f"{uri}#{ids[i] if ids[i] is not None else first + i}"
        meta = (
            json.dumps({c: metas[c][i] for c in meta_columns}, sort_keys=True)
            if meta_columns
            else ""
        )
        if unusable:
            yield make_row(key, error=unusable, meta=meta)
        elif sizes[i] is not None and sizes[i] > max_bytes:
            yield make_row(key, error=too_large("the cell", sizes[i], max_bytes), meta=meta)
        else:
            yield make_row(key, images[i].as_py() or b"", meta=meta)


def read_parquet(
    uri: str,
    image_column: str,
    id_column: str | None,
    meta_columns: tuple[str, ...],
    max_bytes: int,
    policy: IoRetry | None = None,
    size: int | None = None,
    buffer_bytes: int | None = None,
) -> Iterator[dict]:
    """Rows a few at a time, row group by row group, with column chunks read in pieces:
    the file is never held whole. A file whose footer is unreadable, or a row group that
    does not decode, is one ``unreadable_parquet`` row; the other row groups still count.
    The file is read through a :class:`~skray.io.objects.ResumableFile` (``size``: from the
    listing; ``buffer_bytes`` per request): a storage fault is retried where it broke off, or raises
    :class:`~skray.io.retry.StorageUnavailable`."""
    try:
        source = ResumableFile(uri, policy, buffer_bytes, size)
    except OSError as err:
        if not is_missing(err):
            raise
        yield make_row(uri, error=missing(uri))
        return
    with source:
        try:
            parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES)
        except StorageUnavailable:
            raise
        except (pa.ArrowException, OSError) as err:
            yield make_row(uri, error=RowError("unreadable_parquet", str(err)))
            return
        columns = list(
            dict.fromkeys([image_column, *([id_column] if id_column else []), *meta_columns])
        )
        first = 0
        for group in range(parquet.num_row_groups):
            index = first
            try:
                for batch in parquet.iter_batches(
                    PARQUET_BATCH_ROWS, row_groups=[group], columns=columns
                ):
                    yield from _batch_rows(
                        uri, batch, index, image_column, id_column, meta_columns, max_bytes
                    )
                    index += batch.num_rows
            except StorageUnavailable:
                raise
            except (pa.ArrowException, OSError) as err:
                yield make_row(
                    f"{uri}#<row group {group}>",
                    error=RowError("unreadable_parquet", f"row group {group}: {err}"),
                )
            first += parquet.metadata.row_group(group).num_rows
