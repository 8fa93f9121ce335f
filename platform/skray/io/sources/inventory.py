"""The objects of an input read from an S3 Inventory report or a listing file, not LISTed.

LISTing a bucket of 100M keys takes 100k sequential requests; S3 Inventory already writes
every key with its size once a day. An input can therefore name the report's
``manifest.json`` (CSV or Parquet reports), or a plain listing (``.parquet``, ``.csv``,
``.csv.gz``) written by any tool. The report is streamed a bounded number of rows at a
time, each storage read retried within the job's budget, and never held whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from skray.io.objects import ResumableFile, read_object
from skray.io.retry import IoRetry
from skray.io.sources.inputs import LISTING_SCHEMA, InputError
from skray.io.storage import redact_uri

COLUMNS = ("bucket", "key", "size")  # what is read of a report or a listing
PARQUET_BATCH_ROWS = 2**16  # rows decoded from a Parquet file at a time
CSV_BLOCK_BYTES = 4 * 2**20  # CSV decoded a block this large at a time
MANIFEST_MAX_BYTES = 64 * 2**20  # a manifest lists data files: a few MB for 100M keys
_BUCKET_ARN = "arn:aws:s3:::"
_CSV_TYPES = {"bucket": pa.string(), "key": pa.string(), "size": pa.int64()}


def inventory_tables(inventory: str, io_retry: IoRetry | None = None) -> Iterator[pa.Table]:
    """The objects ``inventory`` lists, as tables of ``key`` (``s3://bucket/key``) and
    ``size`` (null where not given), in the report's own order, one Parquet batch or CSV
    block at a time. ``inventory`` is an S3 Inventory ``manifest.json`` (CSV or Parquet
    report), or a listing ``.parquet``, ``.csv`` or ``.csv.gz`` with a ``key`` column (and
    ``bucket``, unless the keys are ``s3://`` URIs) and optionally ``size``; CSV listings
    have a header row. A manifest is read and checked before this returns; a missing or
    malformed file raises :class:`InputError`."""
    if inventory.endswith(".json"):
        return _report_tables(inventory, io_retry)
    if inventory.endswith(".parquet"):
        return _parquet_tables(inventory, io_retry)
    if inventory.endswith((".csv", ".csv.gz")):
        return _csv_tables(inventory, io_retry)
    raise InputError(
        f"inventory {redact_uri(inventory)}: expected an S3 Inventory manifest.json or a "
        "listing ending .parquet, .csv or .csv.gz"
    )


def _report_tables(manifest_uri: str, io_retry: IoRetry | None) -> Iterator[pa.Table]:
    """The tables of every data file of the report, file after file."""
    manifest = _read_manifest(manifest_uri, io_retry)
    where = f"inventory manifest {redact_uri(manifest_uri)}"
    file_format = _field(manifest, "fileFormat", where)
    if file_format.upper() not in ("CSV", "PARQUET"):
        raise InputError(f"{where} is {file_format}: only CSV and Parquet reports are read")
    bucket = _field(manifest, "destinationBucket", where).removeprefix(_BUCKET_ARN)
    files = _field(manifest, "files", where)
    if not isinstance(files, list):
        raise InputError(f"{where}: 'files' is not a list")
    uris = [
        f"s3://{bucket}/{_field(f, 'key', f'{where}, files[{i}]')}" for i, f in enumerate(files)
    ]
    if file_format.upper() == "PARQUET":
        return (table for uri in uris for table in _parquet_tables(uri, io_retry))
    names = [name.strip().lower() for name in _field(manifest, "fileSchema", where).split(",")]
    if "key" not in names:
        raise InputError(f"{where}: fileSchema {manifest['fileSchema']!r} has no Key column")
    return (table for uri in uris for table in _csv_tables(uri, io_retry, names))


def _read_manifest(uri: str, io_retry: IoRetry | None) -> dict[str, Any]:
    # read_object, not storage.read_bytes: its S3 faults come as OSError, which is retried.
    try:
        data = read_object(uri, MANIFEST_MAX_BYTES + 1, io_retry)
    except FileNotFoundError:
        raise InputError(f"inventory manifest not found: {redact_uri(uri)}") from None
    if len(data) > MANIFEST_MAX_BYTES:
        raise InputError(f"inventory manifest {redact_uri(uri)} is over {MANIFEST_MAX_BYTES} bytes")
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise InputError(f"inventory manifest {redact_uri(uri)} is not JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"inventory manifest {redact_uri(uri)} is not a JSON object")
    return manifest


def _field(entry: Any, name: str, where: str) -> Any:
    if not isinstance(entry, dict) or entry.get(name) is None:
        raise InputError(f"{where}: no {name!r} field")
    return entry[name]


def _open(uri: str, io_retry: IoRetry | None) -> ResumableFile:
    """``uri`` as a seekable file whose every read is retried where it broke off."""
    try:
        return ResumableFile(uri, io_retry)
    except FileNotFoundError:
        raise InputError(f"inventory file not found: {redact_uri(uri)}") from None


def _parquet_tables(uri: str, io_retry: IoRetry | None) -> Iterator[pa.Table]:
    with _open(uri, io_retry) as source:
        try:
            parquet = pq.ParquetFile(source)
            names = parquet.schema_arrow.names
            if "key" not in names:
                raise InputError(f"{redact_uri(uri)}: no column 'key' (columns: {names})")
            columns = [c for c in COLUMNS if c in names]
            for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, columns=columns):
                yield _table(batch, uri, url_encoded=False)
        except pa.ArrowInvalid as err:
            raise InputError(f"{redact_uri(uri)} cannot be read as Parquet: {err}") from None


def _csv_tables(
    uri: str, io_retry: IoRetry | None, names: list[str] | None = None
) -> Iterator[pa.Table]:
    """A CSV file (gzipped where its name ends ``.gz``) a block at a time: with ``names``,
    an S3 Inventory data file (no header row, URL-encoded keys); without, a listing whose
    header row names its columns."""
    with _open(uri, io_retry) as source:
        stream = pa.CompressedInputStream(source, "gzip") if uri.endswith(".gz") else source
        try:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(column_names=names, block_size=CSV_BLOCK_BYTES),
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(COLUMNS),
                    include_missing_columns=True,
                    column_types=_CSV_TYPES,
                ),
            )
            for batch in reader:
                yield _table(batch, uri, url_encoded=names is not None)
        except pa.ArrowInvalid as err:
            raise InputError(f"{redact_uri(uri)} cannot be read as CSV: {err}") from None


def _table(batch: pa.RecordBatch, uri: str, url_encoded: bool) -> pa.Table:
    """One batch of a report as ``key``/``size``: ``s3://bucket/key`` where the row names
    its bucket, else the key as written, which must then be an ``s3://`` URI.

    S3 Inventory CSV reports URL-encode the key ("When using the CSV file format, the key
    name is URL-encoded and must be decoded before you can use it", AWS's S3 Inventory
    guide) as a form would: a space as ``+``, a ``+`` as ``%2B``, other bytes of UTF-8 as
    ``%XX``; hence ``unquote_plus``, not ``unquote``. Parquet reports and listings are not
    encoded."""
    keys = batch.column("key").cast(pa.string())
    if keys.null_count:
        raise InputError(f"{redact_uri(uri)}: no key column, or a row without a key")
    if url_encoded:
        keys = pa.array([unquote_plus(key) for key in keys.to_pylist()], pa.string())
    uris = keys
    if "bucket" in batch.schema.names:
        buckets = batch.column("bucket").cast(pa.string())
        uris = pc.coalesce(pc.binary_join_element_wise("s3://", buckets, "/", keys, ""), keys)
    not_s3 = pc.invert(pc.starts_with(uris, "s3://"))
    if pc.any(not_s3).as_py():
        bad = uris.filter(not_s3)[0].as_py()
        raise InputError(
            f"{redact_uri(uri)}: key {redact_uri(bad)!r} has no bucket and is not an s3:// URI"
        )
    sizes = (
        batch.column("size").cast(pa.int64())
        if "size" in batch.schema.names
        else pa.nulls(batch.num_rows, pa.int64())
    )
    return pa.Table.from_arrays([uris, sizes], schema=LISTING_SCHEMA)
