"""Reading costs what S3 bills, counted at the toolkit's proxy: one GET per image and no
HEAD, a shard or Parquet file ``ceil(size / buffer)`` GETs, its footer one more at planning.
Sizes come from the listing, so no read asks the store for one."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import parquet_bytes, tar_bytes
from skray.dev.s3proxy import FaultyS3Proxy
from skray.dev.testing import synthetic_image
from skray.io import storage
from skray.io.sources import list_inputs, listing, listing_tables, unit_batches
from skray.io.storage import s3_client, write_bytes_atomic
from skray.label.plan import make_plan

pytestmark = pytest.mark.timeout(120)

BUFFER = 64 * 2**10  # the least read_buffer_bytes takes: a test shard spans several requests


def reads(proxy: FaultyS3Proxy) -> dict[str, int]:
    counts = proxy.counts()
    return {kind: counts[kind] for kind in ("HEAD", "GET", "GET_RANGE")}


def planned(proxy: FaultyS3Proxy, input_uri: str, tmp_path) -> tuple[list, dict[str, int]]:
    """The plan's units for ``input_uri`` into an empty output, and the reads planning made
    after the listing."""
    listing = list_inputs(input_uri)
    proxy.reset_counts()
    units = make_plan(listing, str(tmp_path / "out")).units
    return units, reads(proxy)


def read_every_unit(units, **reading) -> list[dict]:
    return [row for u in units for batch in unit_batches(u, 8, **reading) for row in batch]


def test_loose_images_cost_one_get_each_and_an_oversize_one_none(
    bucket: str, faulty_s3: FaultyS3Proxy, tmp_path
):
    for i in range(30):
        write_bytes_atomic(f"{bucket}/img/{i:02d}.jpg", synthetic_image(i))
    write_bytes_atomic(f"{bucket}/img/huge.jpg", b"x" * 200_000)
    units, _ = planned(faulty_s3, f"{bucket}/img", tmp_path)
    faulty_s3.reset_counts()

    rows = read_every_unit(units, max_object_bytes=100_000)

    assert len(rows) == 31 and [r["key"] for r in rows if r["error"]] == [f"{bucket}/img/huge.jpg"]
    assert reads(faulty_s3) == {"HEAD": 0, "GET": 0, "GET_RANGE": 30}


def test_a_shard_is_streamed_in_ceil_size_over_buffer_gets_with_no_head(
    bucket: str, faulty_s3: FaultyS3Proxy, tmp_path
):
    members = [(f"{i:03d}.jpg", synthetic_image(i, size=(640, 480))) for i in range(40)]
    shard = tar_bytes(members)
    write_bytes_atomic(f"{bucket}/shards/a.tar", shard)
    assert len(shard) > 3 * BUFFER
    units, planning = planned(faulty_s3, f"{bucket}/shards", tmp_path)
    faulty_s3.reset_counts()

    rows = read_every_unit(units, read_buffer_bytes=BUFFER)

    assert planning == {"HEAD": 0, "GET": 0, "GET_RANGE": 0}
    assert len(rows) == 40 and not any(r["error"] for r in rows)
    assert reads(faulty_s3) == {"HEAD": 0, "GET": 0, "GET_RANGE": math.ceil(len(shard) / BUFFER)}


@pytest.mark.parametrize("buffer", [BUFFER, 16 * 2**20])
def test_a_parquet_file_costs_one_footer_get_to_plan_and_ceil_size_over_buffer_to_read(
    bucket: str, faulty_s3: FaultyS3Proxy, tmp_path, buffer: int
):
    images = [synthetic_image(i, size=(640, 480)) for i in range(40)]
    table = parquet_bytes({"image": images})
    write_bytes_atomic(f"{bucket}/tables/a.parquet", table)
    units, planning = planned(faulty_s3, f"{bucket}/tables", tmp_path)
    faulty_s3.reset_counts()

    rows = read_every_unit(units, read_buffer_bytes=buffer)

    assert units[0].rows == 40 and planning == {"HEAD": 0, "GET": 0, "GET_RANGE": 1}
    assert [r["data"] for r in rows] == images
    # The footer is read again with the data: one request more, unless the file fits one buffer.
    most = math.ceil(len(table) / buffer) + (len(table) > buffer)
    assert reads(faulty_s3)["HEAD"] == 0 and reads(faulty_s3)["GET_RANGE"] <= most


# --- listing: a page per 1,000 keys, split on sub-prefixes, streamed --------------------

PAGE = 10  # keys per LIST page in these tests (S3's is 1,000)


def put_objects(bucket: str, keys: list[str]) -> None:
    name = bucket.removeprefix("s3://")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3_client().put_object(Bucket=name, Key=k, Body=b"x"), keys))


def test_threads_asking_for_an_s3_client_at_once_share_one(monkeypatch):
    """A pool's first requests miss the client cache together: each must not build its own."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://share-one.invalid")  # no client for it yet
    with ThreadPoolExecutor(16) as pool:
        clients = list(pool.map(lambda _: s3_client(), range(16)))

    assert len({id(client) for client in clients}) == 1


def test_a_prefix_is_listed_a_page_at_a_time_split_on_its_sub_prefixes_in_key_order(
    bucket: str, faulty_s3: FaultyS3Proxy, monkeypatch
):
    monkeypatch.setattr(storage, "PAGE_KEYS", PAGE)
    sub = {"p0/": 25, "p1/": 3, "p2/deep/": 12}
    keys = [f"data/{p}{i:03d}.jpg" for p, n in sub.items() for i in range(n)]
    beside = ["data/a.jpg", "data/p0.jpg", "data/p1x.jpg", "data/z.jpg"]  # between the prefixes
    put_objects(bucket, [*keys, *beside, "data/_SUCCESS", "data/p1/.tmp"])
    faulty_s3.reset_counts()

    listed = list_inputs(f"{bucket}/data")

    assert listed.keys == sorted(f"{bucket}/{k}" for k in [*keys, *beside])
    assert listed.sizes == [1] * len(listed.keys)
    pages = 1 + sum(math.ceil((n + (p == "p1/")) / PAGE) for p, n in sub.items())
    # one LIST of pyarrow's to tell a prefix from a file, one with delimiter="/" at data/,
    # then each sub-prefix page by page
    assert faulty_s3.counts()["LIST"] == 1 + pages and faulty_s3.counts()["HEAD"] == 1


def test_a_prefix_holding_one_sub_prefix_is_split_where_its_keys_fan_out(
    bucket: str, faulty_s3: FaultyS3Proxy, monkeypatch
):
    monkeypatch.setattr(storage, "PAGE_KEYS", PAGE)
    keys = [f"data/2026/12/{d}/{i:02d}.jpg" for d in ("a", "b", "c") for i in range(4)]
    put_objects(bucket, keys)
    lists = []
    monkeypatch.setattr(
        listing, "list_page", lambda *a: lists.append(a[1:3]) or storage.list_page(*a)
    )

    assert list_inputs(f"{bucket}/data").keys == [f"{bucket}/{k}" for k in keys]
    delimited = [prefix for prefix, delimiter in lists if delimiter]
    assert delimited == ["data/", "data/2026/", "data/2026/12/"]
    assert sorted(p for p, d in lists if not d) == [f"data/2026/12/{d}/" for d in "abc"]


def test_a_listing_streams_a_bounded_number_of_pages_ahead_of_its_reader(
    bucket: str, faulty_s3: FaultyS3Proxy, monkeypatch
):
    monkeypatch.setattr(storage, "PAGE_KEYS", PAGE)
    monkeypatch.setattr(listing, "CHUNK_KEYS", PAGE)
    monkeypatch.setattr(listing, "PREFIXES_IN_FLIGHT", 1)
    monkeypatch.setattr(listing, "PAGES_AHEAD", 1)
    put_objects(bucket, [f"data/p{p}/{i:03d}.jpg" for p in range(3) for i in range(40)])
    faulty_s3.reset_counts()

    tables = listing_tables(f"{bucket}/data")
    first = next(tables)
    seen = settled(lambda: faulty_s3.counts()["LIST"])
    rest = [k for t in tables for k in t.column("key").to_pylist()]

    assert first.num_rows == PAGE and len(rest) == 110
    # pyarrow's one, the delimiter listing, the page read, one queued, one fetched and waiting
    assert seen <= 5 < faulty_s3.counts()["LIST"] == 2 + 3 * 4


def settled(count, quiet_s: float = 0.5, timeout_s: float = 10) -> int:
    """``count()`` once it has stopped changing for ``quiet_s``: the listing's workers, left to
    run ahead of a reader that stopped, have done all they will."""
    value, since = count(), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if count() != value:
            value, since = count(), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return value
    raise AssertionError(f"still changing after {timeout_s} s: {value}")
