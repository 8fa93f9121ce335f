"""skray.io.sources.inventory: the objects of an input read from an S3 Inventory report or a
listing file, streamed a bounded number of rows at a time, instead of LISTing the bucket."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import PROMPT_RETRY, parquet_bytes
from skray.dev.s3proxy import FaultyS3Proxy
from skray.io import external_sort
from skray.io.retry import IoRetry, StorageUnavailable
from skray.io.sources import listing_tables
from skray.io.sources.inputs import InputError
from skray.io.sources.inventory import CSV_BLOCK_BYTES, PARQUET_BATCH_ROWS, inventory_tables
from skray.io.storage import join, write_bytes_atomic
from skray.label.plan import make_plan

pytestmark = pytest.mark.timeout(60)

QUICK = IoRetry(initial_backoff_s=0.05, max_backoff_s=0.2, total_s=1.0)  # a short budget

CSV_SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag"

# Keys as an S3 Inventory CSV report writes them (URL-encoded as a form: a space is ``+``,
# a ``+`` is ``%2B``), and the keys they name.
ENCODED_KEYS = {
    "photos/a+b.jpg": "photos/a b.jpg",
    "photos/c%2Bd.jpg": "photos/c+d.jpg",
    "photos/%C3%A9t%C3%A9/%C3%BC.png": "photos/été/ü.png",
    "photos/%231.jpg": "photos/#1.jpg",
    "photos/100%25.jpg": "photos/100%.jpg",
}


def read_all(inventory: str, **kwargs) -> list[tuple[str, int | None]]:
    tables = list(inventory_tables(inventory, **kwargs))
    assert all(t.schema == pa.schema([("key", pa.string()), ("size", pa.int64())]) for t in tables)
    return [(r["key"], r["size"]) for t in tables for r in t.to_pylist()]


def csv_gz(rows: list[list[str]]) -> bytes:
    """A CSV data file as S3 Inventory writes one: gzipped, every field quoted, no header."""
    lines = [",".join(f'"{field}"' for field in row) for row in rows]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def write_report(bucket: str, file_format: str, data_files: dict[str, bytes], **overrides) -> str:
    """An S3 Inventory report in ``bucket`` (its destination bucket): the data files under
    ``inv/data/`` and the manifest listing them; ``overrides`` replace manifest fields
    (None drops one). Returns the manifest's URI."""
    for name, data in data_files.items():
        write_bytes_atomic(f"{bucket}/inv/data/{name}", data)
    manifest = {
        "sourceBucket": "source",
        "destinationBucket": "arn:aws:s3:::" + bucket.removeprefix("s3://"),
        "version": "2016-11-30",
        "creationTimestamp": "1514944800000",
        "fileFormat": file_format,
        "fileSchema": CSV_SCHEMA if file_format == "CSV" else "message s3.inventory { }",
        "files": [
            {"key": f"inv/data/{name}", "size": len(data), "MD5checksum": "0" * 32}
            for name, data in data_files.items()
        ],
    }
    manifest.update(overrides)
    manifest = {k: v for k, v in manifest.items() if v is not None}
    uri = f"{bucket}/inv/manifest.json"
    write_bytes_atomic(uri, json.dumps(manifest).encode())
    return uri


# --- S3 Inventory reports -----------------------------------------------------


def test_a_csv_report_yields_each_object_as_its_decoded_s3_uri_with_its_size(bucket: str):
    rows = [
        ["source", key, str(i), "2024-01-01T00:00:00.000Z", "e"]
        for i, key in enumerate(ENCODED_KEYS)
    ]
    manifest = write_report(bucket, "CSV", {"a.csv.gz": csv_gz(rows)})

    assert read_all(manifest) == [
        (f"s3://source/{key}", i) for i, key in enumerate(ENCODED_KEYS.values())
    ]


def test_a_csv_report_reads_its_columns_in_the_order_its_file_schema_names_them(bucket: str):
    rows = [["e", "1000", "photos/x+1.jpg", "source"], ["e", "", "photos/y.jpg", "source"]]
    manifest = write_report(
        bucket, "CSV", {"a.csv.gz": csv_gz(rows)}, fileSchema="ETag,Size , Key,Bucket"
    )

    assert read_all(manifest) == [
        ("s3://source/photos/x 1.jpg", 1000),
        ("s3://source/photos/y.jpg", None),
    ]


def test_a_parquet_report_over_two_data_files_yields_every_row_once_in_report_order(
    bucket: str,
):
    first = {"bucket": ["src", "src"], "key": ["b/2.jpg", "a b+c.jpg"], "size": [2, 3]}
    second = {"bucket": ["other"], "key": ["a/1.jpg"], "size": [1], "e_tag": ["e"]}
    manifest = write_report(
        bucket, "Parquet", {"1.parquet": parquet_bytes(first), "2.parquet": parquet_bytes(second)}
    )

    assert read_all(manifest) == [
        ("s3://src/b/2.jpg", 2),
        ("s3://src/a b+c.jpg", 3),  # Parquet reports are not URL-encoded
        ("s3://other/a/1.jpg", 1),
    ]


def test_an_orc_report_raises_input_error_before_any_read_saying_only_csv_and_parquet(
    bucket: str,
):
    manifest = write_report(bucket, "ORC", {"a.orc": b"ORC"})

    with pytest.raises(InputError, match=r"manifest.json is ORC: only CSV and Parquet"):
        inventory_tables(manifest)  # not iterated: the manifest is checked on the call


@pytest.mark.parametrize(
    ("file_format", "field"),
    [("CSV", "files"), ("CSV", "fileFormat"), ("CSV", "fileSchema"), ("Parquet", "files")]
    + [("Parquet", "destinationBucket")],
)
def test_a_manifest_missing_a_field_raises_input_error_naming_the_field_and_manifest(
    bucket: str, file_format: str, field: str
):
    manifest = write_report(bucket, file_format, {"a": b""}, **{field: None})

    with pytest.raises(InputError, match=f"manifest {manifest}: no '{field}' field"):
        inventory_tables(manifest)


def test_a_csv_manifest_whose_schema_has_no_key_column_raises_input_error(bucket: str):
    manifest = write_report(bucket, "CSV", {"a.csv.gz": b""}, fileSchema="Bucket, Size")

    with pytest.raises(InputError, match=r"fileSchema 'Bucket, Size' has no Key column"):
        inventory_tables(manifest)


def test_a_missing_manifest_raises_input_error_naming_it(bucket: str):
    with pytest.raises(InputError, match=f"manifest not found: {bucket}/nope/manifest.json"):
        inventory_tables(f"{bucket}/nope/manifest.json")


def test_a_manifest_that_is_not_json_raises_input_error(bucket: str):
    write_bytes_atomic(f"{bucket}/manifest.json", b"{not json")

    with pytest.raises(InputError, match=r"manifest.json is not JSON"):
        inventory_tables(f"{bucket}/manifest.json")


def test_a_data_file_missing_from_the_report_raises_input_error_naming_it(bucket: str):
    files = [{"key": "inv/data/a.csv.gz"}, {"key": "inv/data/gone.csv.gz"}]
    data = {"a.csv.gz": csv_gz([["s", "k", "1", "d", "e"]])}
    manifest = write_report(bucket, "CSV", data, files=files)

    tables = inventory_tables(manifest)

    assert next(tables).num_rows == 1, "the files before it are read"
    with pytest.raises(InputError, match=f"file not found: {bucket}/inv/data/gone.csv.gz"):
        next(tables)


@pytest.fixture
def big_report(bucket: str) -> tuple[str, list[tuple[str, int]]]:
    """A CSV report of 2000 incompressible keys, and what reading it yields."""
    names = [hashlib.md5(str(i).encode()).hexdigest() for i in range(2000)]
    rows = [["src", f"k/{name}+x.jpg", str(i), "d", "e"] for i, name in enumerate(names)]
    manifest = write_report(
        bucket, "CSV", {"a.csv.gz": csv_gz(rows[:1000]), "b.csv.gz": csv_gz(rows[1000:])}
    )
    return manifest, [(f"s3://src/k/{name} x.jpg", i) for i, name in enumerate(names)]


def test_a_report_read_through_flaky_s3_yields_every_row_once(
    big_report: tuple[str, list], faulty_s3: FaultyS3Proxy
):
    manifest, expected = big_report
    faulty_s3.slowdown_rate, faulty_s3.cut_rate = 0.3, 0.3

    assert read_all(manifest) == expected


def test_an_outage_shorter_than_the_retry_budget_is_ridden_out(
    big_report: tuple[str, list], faulty_s3: FaultyS3Proxy
):
    manifest, expected = big_report
    faulty_s3.outage = 1
    threading.Timer(2.0, faulty_s3.heal).start()

    assert read_all(manifest, io_retry=PROMPT_RETRY) == expected


def test_an_outage_past_the_retry_budget_raises_storage_unavailable_naming_the_manifest(
    big_report: tuple[str, list], faulty_s3: FaultyS3Proxy
):
    manifest, _ = big_report
    faulty_s3.outage = 1

    with pytest.raises(StorageUnavailable, match=f"reading {manifest}"):
        inventory_tables(manifest, QUICK)


# --- plain listings -----------------------------------------------------------


def test_a_parquet_listing_with_bucket_key_and_size_yields_s3_uris_in_its_order(location: str):
    listing = join(location, "listing.parquet")
    write_bytes_atomic(
        listing,
        parquet_bytes(
            {
                "bucket": ["b1", "b2", "b1"],
                "key": ["z.jpg", "a b+c.jpg", "d/e.jpg"],
                "size": pa.array([30, None, 10], pa.int32()),
            }
        ),
    )

    assert read_all(listing) == [
        ("s3://b1/z.jpg", 30),
        ("s3://b2/a b+c.jpg", None),
        ("s3://b1/d/e.jpg", 10),
    ]


def test_a_parquet_listing_of_s3_uris_alone_yields_them_with_null_sizes(location: str):
    listing = join(location, "listing.parquet")
    write_bytes_atomic(listing, parquet_bytes({"key": ["s3://b/2.jpg", "s3://c/1%20x.jpg"]}))

    assert read_all(listing) == [("s3://b/2.jpg", None), ("s3://c/1%20x.jpg", None)]


@pytest.mark.parametrize("name", ["listing.csv", "listing.csv.gz"])
def test_a_csv_listing_with_a_header_yields_its_keys_as_written_not_url_decoded(
    location: str, name: str
):
    text = 'size,key,bucket\n5,a+b%20c.jpg,b1\n,"d,e.jpg",b2\n7,123,b1\n'
    data = gzip.compress(text.encode()) if name.endswith(".gz") else text.encode()
    listing = join(location, name)
    write_bytes_atomic(listing, data)

    assert read_all(listing) == [
        ("s3://b1/a+b%20c.jpg", 5),
        ("s3://b2/d,e.jpg", None),
        ("s3://b1/123", 7),
    ]


def test_a_csv_listing_of_s3_uris_without_a_size_column_yields_null_sizes(location: str):
    listing = join(location, "listing.csv")
    write_bytes_atomic(listing, b"key\ns3://b/x.jpg\ns3://b/y.jpg\n")

    assert read_all(listing) == [("s3://b/x.jpg", None), ("s3://b/y.jpg", None)]


def test_a_large_parquet_file_comes_back_in_several_bounded_tables(tmp_path):
    n = PARQUET_BATCH_ROWS * 2 + 100
    listing = str(tmp_path / "listing.parquet")
    table = pa.table({"bucket": ["b"] * n, "key": [f"{i:07d}" for i in range(n)]})
    pq.write_table(table, listing, row_group_size=PARQUET_BATCH_ROWS // 2)

    tables = list(inventory_tables(listing))

    assert len(tables) > 1 and all(t.num_rows <= PARQUET_BATCH_ROWS for t in tables)
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert keys == [f"s3://b/{i:07d}" for i in range(n)]


def test_a_large_csv_file_comes_back_in_several_tables_of_a_block_each(tmp_path):
    line = b"b," + b"k" * 100 + b"%d,1\n"
    rows = CSV_BLOCK_BYTES * 3 // len(line)
    listing = tmp_path / "listing.csv.gz"
    listing.write_bytes(
        gzip.compress(b"bucket,key,size\n" + b"".join(line % i for i in range(rows)))
    )

    tables = list(inventory_tables(str(listing)))

    assert len(tables) >= 3
    assert all(t.num_rows <= CSV_BLOCK_BYTES // len(line) + 1 for t in tables)
    assert sum(t.num_rows for t in tables) == rows


def test_a_listing_without_a_key_column_raises_input_error_naming_the_file(location: str):
    parquet, csv = join(location, "l.parquet"), join(location, "l.csv")
    write_bytes_atomic(parquet, parquet_bytes({"path": ["s3://b/x"]}))
    write_bytes_atomic(csv, b"path\ns3://b/x\n")

    with pytest.raises(InputError, match=f"{parquet}: no column 'key'"):
        list(inventory_tables(parquet))
    with pytest.raises(InputError, match=f"{csv}: no key column"):
        list(inventory_tables(csv))


def test_a_key_that_names_no_bucket_and_is_not_an_s3_uri_raises_input_error(location: str):
    listing = join(location, "listing.parquet")
    write_bytes_atomic(listing, parquet_bytes({"key": ["s3://b/ok.jpg", "images/x.jpg"]}))

    with pytest.raises(InputError, match=r"key 'images/x.jpg' has no bucket"):
        list(inventory_tables(listing))


def test_a_missing_listing_raises_input_error_naming_it(location: str):
    missing = join(location, "gone.parquet")

    with pytest.raises(InputError, match=f"file not found: {missing}"):
        list(inventory_tables(missing))


def test_an_unreadable_listing_raises_input_error_naming_it(location: str):
    listing = join(location, "listing.parquet")
    write_bytes_atomic(listing, b"not parquet at all")

    with pytest.raises(InputError, match=f"{listing} cannot be read as Parquet"):
        list(inventory_tables(listing))


def test_an_inventory_neither_a_manifest_nor_a_listing_raises_input_error_saying_what_is_read():
    with pytest.raises(InputError, match=r"manifest.json or a listing ending .parquet, .csv"):
        inventory_tables("s3://b/inventory.orc")


# --- an inventory in place of the LIST ---------------------------------------------------


@pytest.mark.parametrize("run_rows", [4, None], ids=["sorted-on-disk", "sorted-in-memory"])
def test_an_inventory_report_plans_exactly_what_listing_the_same_keys_plans(
    bucket: str, tmp_path, monkeypatch, run_rows
):
    monkeypatch.setattr(external_sort, "RUN_ROWS", run_rows or external_sort.RUN_ROWS)
    name = bucket.removeprefix("s3://")
    keys = [f"data/{d}/{i:02d} {d}.jpg" for d in ("b", "a", "c") for i in range(7)]
    keys += ["data/z.tar", "data/notes.txt", "data/_SUCCESS", "data/a/.hidden.jpg", "other/x.jpg"]
    for key in keys:
        write_bytes_atomic(f"{bucket}/{key}", key.encode())
    rows = [[name, quote_plus(k, safe="/"), str(len(k.encode()))] for k in reversed(keys)]
    manifest = write_report(
        bucket,
        "CSV",
        {"1.csv.gz": csv_gz(rows[:13]), "2.csv.gz": csv_gz(rows[13:])},
        fileSchema="Bucket, Key, Size",
    )
    output = str(tmp_path / "out")

    def plan(**inventory):
        return make_plan(
            listing_tables(f"{bucket}/data", ["*.txt"], **inventory), output, files_per_unit=4
        )

    listed, reported = plan(), plan(inventory=manifest)

    assert reported.todo.equals(listed.todo) and reported.listed == listed.listed == 22
    first = reported.units[0]
    assert first.sizes == tuple(len(u.removeprefix(f"{bucket}/").encode()) for u in first.uris)
