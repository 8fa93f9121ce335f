"""Reading costs what S3 bills, counted at the toolkit's proxy: one GET per image and no
HEAD, a shard or Parquet file ``ceil(size / buffer)`` GETs, its footer one more at planning.
Sizes come from the listing, so no read asks the store for one."""

from __future__ import annotations

import math

import pytest

from helpers import parquet_bytes, tar_bytes
from skray.dev.s3proxy import FaultyS3Proxy
from skray.dev.testing import synthetic_image
from skray.io.sources import list_inputs, unit_batches
from skray.io.storage import write_bytes_atomic
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
