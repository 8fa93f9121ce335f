"""Storage that fails the way S3 fails: a fault is retried, resumed where it broke, and,
past its budget, reported as work not done, never as a row about an image."""

from __future__ import annotations

import threading
import time

import pytest

from helpers import PROMPT_RETRY, parquet_bytes, tar_bytes
from skray.dev.s3proxy import FaultyS3Proxy
from skray.dev.testing import synthetic_image
from skray.io.retry import IoRetry, StorageUnavailable, call_with_retry
from skray.io.sources import Unit, unit_batches
from skray.io.sources.rows import incomplete_reason
from skray.io.storage import write_bytes_atomic

pytestmark = pytest.mark.timeout(120)

QUICK = IoRetry(initial_backoff_s=0.05, max_backoff_s=0.2, total_s=1.0)  # a short budget
# The default budget, tried again at once: at a 50 % cut rate the default backoff (0.2 s doubling,
# up to 8 s) made a run of cuts cost 3 to 27 s.
EAGER = IoRetry(initial_backoff_s=0.01, max_backoff_s=0.05)


def rows_of(unit: Unit, io_retry: IoRetry | None = None, **reading) -> list[dict]:
    return [row for batch in unit_batches(unit, 4, io_retry=io_retry, **reading) for row in batch]


@pytest.fixture
def inputs(embedded_s3, bucket: str) -> dict[str, Unit]:
    """An image-file unit, a WebDataset shard of 12 samples and a Parquet file of 6 rows."""
    images = [f"{bucket}/img/{i}.jpg" for i in range(5)]
    for i, uri in enumerate(images):
        write_bytes_atomic(uri, synthetic_image(i))
    shard = f"{bucket}/shard.tar"
    members = [
        (f"{i:03d}.{ext}", synthetic_image(i) if ext == "jpg" else b"3")
        for i in range(12)
        for ext in ("jpg", "cls")
    ]
    write_bytes_atomic(shard, tar_bytes(members))
    table = f"{bucket}/table.parquet"
    write_bytes_atomic(table, parquet_bytes({"image": [synthetic_image(i) for i in range(6)]}))
    return {
        "images": Unit("i", "images", tuple(images), len(images)),
        "webdataset": Unit("w", "webdataset", (shard,)),
        "parquet": Unit("p", "parquet", (table,), 6),
    }


def healthy(unit: Unit) -> list[tuple[str, bytes, str]]:
    return [(r["key"], r["data"], r["error"]) for r in rows_of(unit)]


@pytest.mark.parametrize("kind", ["images", "webdataset", "parquet"])
def test_flaky_s3_503s_and_cut_bodies_read_every_row_once_with_no_error(
    inputs, faulty_s3: FaultyS3Proxy, kind: str
):
    expected = healthy(inputs[kind])
    faulty_s3.slowdown_rate, faulty_s3.cut_rate = 0.3, 0.2

    got = [(r["key"], r["data"], r["error"]) for r in rows_of(inputs[kind])]

    assert got == expected and not any(error for _, _, error in got)


def test_a_shard_stream_cut_half_way_resumes_where_it_broke_without_repeating_a_sample(
    inputs, faulty_s3: FaultyS3Proxy, monkeypatch
):
    expected = healthy(inputs["webdataset"])
    # A read of a few KB at a time makes the stream many requests; half of them are cut.
    monkeypatch.setattr("skray.io.objects.DEFAULT_BUFFER_BYTES", 2048)
    faulty_s3.cut_rate = 0.5

    got = [(r["key"], r["data"], r["error"]) for r in rows_of(inputs["webdataset"], EAGER)]

    assert got == expected
    assert faulty_s3.counts()["GET_RANGE"] > 5, "the shard was read in pieces, cut in between"


def test_an_outage_shorter_than_the_budget_is_ridden_out(inputs, faulty_s3: FaultyS3Proxy):
    expected = healthy(inputs["images"])
    faulty_s3.outage = 1  # longer than pyarrow's own retries ride out (a second or two)
    threading.Timer(3.0, faulty_s3.heal).start()

    got = [(r["key"], r["data"], r["error"]) for r in rows_of(inputs["images"], PROMPT_RETRY)]

    assert got == expected


@pytest.mark.parametrize("kind", ["images", "webdataset", "parquet"])
def test_an_outage_past_the_budget_ends_the_unit_with_an_incomplete_marker_not_error_rows(
    inputs, faulty_s3: FaultyS3Proxy, kind: str
):
    faulty_s3.outage = 1

    rows = rows_of(inputs[kind], QUICK)

    assert [incomplete_reason(r["error"]) for r in rows] == [None] * (len(rows) - 1) + [
        "unavailable"
    ]
    assert not any(r["error"] for r in rows[:-1]), "no row says anything about an image"
    assert rows[-1]["error"].startswith("incomplete: unavailable: ")
    assert {r["unit_rows"] for r in rows[-4:]} == {len(rows)}, "the writer learns it is done"


def test_expired_credentials_are_told_apart_as_denied(inputs, faulty_s3: FaultyS3Proxy):
    faulty_s3.forbidden = 1

    rows = rows_of(inputs["images"], QUICK)

    assert rows[-1]["error"].startswith("incomplete: denied: ")


def test_a_fault_outlasting_the_budget_raises_naming_what_and_why():
    calls = []

    def failing() -> None:
        calls.append(time.monotonic())
        raise OSError("AWS Error SLOW_DOWN during GetObject operation: reduce your rate")

    few_tries = IoRetry(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02, total_s=60.0)
    with pytest.raises(StorageUnavailable, match="reading s3://b/k: storage kept failing") as err:
        call_with_retry(failing, "reading s3://b/k", few_tries)

    assert err.value.reason == "unavailable" and "for 4 tries" in str(err.value)
    assert len(calls) == 4, "every try of the budget, and no more"
    calls.clear()
    with pytest.raises(StorageUnavailable):  # the time budget ends it long before 1000 tries
        call_with_retry(failing, "reading s3://b/k", QUICK.model_copy(update={"attempts": 1000}))
    assert 2 <= len(calls) < 1000 and calls[-1] - calls[0] < 2 * QUICK.total_s  # a late wake-up
    with pytest.raises(FileNotFoundError):  # a missing object is an answer: not retried
        call_with_retry(lambda: open("/nonexistent/skray"), "opening", QUICK)
