"""The review sample: stratified by label, lowest scores first, abstentions first, with links."""

from __future__ import annotations

import csv
import io
import time
import urllib.request
from urllib.parse import parse_qs, urlparse

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from helpers import label_row
from labeled_output import LABELS, write_labeled_output
from skray.io.storage import join, read_bytes
from skray.label.sinks import write_part
from skray.report.review import REVIEW_SCHEMA, write_review


def read_review(uri: str) -> list[dict]:
    data = read_bytes(uri)
    if uri.endswith(".csv"):
        return pacsv.read_csv(
            io.BytesIO(data),
            convert_options=pacsv.ConvertOptions(
                column_types=REVIEW_SCHEMA, strings_can_be_null=True
            ),
        ).to_pylist()
    return pq.read_table(io.BytesIO(data)).to_pylist()


def lifetime_s(url: str) -> float:
    """Seconds a presigned URL has left (SigV4's X-Amz-Expires, or SigV2's Expires epoch)."""
    query = parse_qs(urlparse(url).query)
    if "X-Amz-Expires" in query:
        return float(query["X-Amz-Expires"][0])
    return float(query["Expires"][0]) - time.time()


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory):
    return write_labeled_output(str(tmp_path_factory.mktemp("review")))


@pytest.mark.timeout(60)
def test_each_label_gives_its_lowest_score_before_any_gives_a_second(output) -> None:
    rows = read_review(write_review(output.uri, n=6))
    by_key = {r["key"]: r for r in output.rows}
    assert [r["low_confidence"] for r in rows] == [True, True, False, False, False, False]
    assert [r["label"] for r in rows] == [None, None, "tabby", "rocket", "coffee mug", "daisy"]
    for row in rows:
        assert row["score"] == pytest.approx(by_key[row["key"]]["score"])
    for label in LABELS:  # the one taken is that label's lowest
        lowest = min(
            (r for r in output.rows if r["label"] == label and r["error"] is None),
            key=lambda r: r["score"],
        )
        assert any(r["key"] == lowest["key"] for r in rows)
    scores = [r["score"] for r in rows[2:]]
    assert scores == sorted(scores)


@pytest.mark.timeout(60)
def test_a_large_n_takes_every_labeled_row_and_no_failed_one(output) -> None:
    rows = read_review(write_review(output.uri, n=1000, fmt="parquet"))
    expected = {r["key"] for r in output.rows if r["error"] is None}
    assert len(rows) == len(expected) and {r["key"] for r in rows} == expected


@pytest.mark.timeout(60)
def test_csv_and_parquet_hold_the_same_rows_with_local_paths_and_members(output, tmp_path) -> None:
    csv_rows = read_review(write_review(output.uri, n=40, dest=str(tmp_path / "r.csv")))
    parquet_rows = read_review(
        write_review(output.uri, n=40, dest=str(tmp_path / "r.parquet"), fmt="parquet")
    )
    assert csv_rows == parquet_rows
    by_key = {r["key"]: r for r in csv_rows}
    shard_row = by_key[output.tar_keys[0]]
    assert shard_row["uri"] == output.tar_keys[0].split("#")[0] and shard_row["member"] == "s/0000"
    assert by_key[output.parquet_keys[2]]["member"] == "2"
    image_row = next(r for r in csv_rows if r["label"] == "daisy")
    assert image_row["uri"] == image_row["key"] and image_row["member"] is None
    assert image_row["topk_ids"] == "[1, 2]"


@pytest.mark.timeout(180)
def test_s3_sources_get_presigned_urls_that_fetch_the_object(bucket: str) -> None:
    out = write_labeled_output(bucket, progress=False)
    review = write_review(out.uri, n=50)
    assert review == join(out.uri, "_review.csv")
    rows = {r["key"]: r for r in read_review(review)}
    shard = rows[out.tar_keys[1]]
    assert (
        shard["uri"].startswith("http")
        and "Signature" in shard["uri"]
        and shard["member"] == "s/0001"
    )
    assert 3500 < lifetime_s(shard["uri"]) <= 3600, "an hour, as `aws s3 presign`"
    assert 0 < lifetime_s(read_review(write_review(out.uri, n=1, expires_s=60))[0]["uri"]) <= 60
    with urllib.request.urlopen(shard["uri"], timeout=30) as response:
        assert response.read() == read_bytes(out.tar_keys[1].split("#")[0])
    image = next(r for r in rows.values() if r["label"] == "daisy")
    with urllib.request.urlopen(image["uri"], timeout=30) as response:
        assert response.read() == read_bytes(image["key"])


def test_cells_a_spreadsheet_would_run_are_quoted_in_csv_and_kept_raw_in_parquet(tmp_path):
    output, table = str(tmp_path / "out"), str(tmp_path / "in" / "t.parquet")
    ids = ['=HYPERLINK("http://evil.example","x")', "@SUM(1+1)", "-2+3", "+1", "\tx", "plain"]
    write_part(output, "u", [label_row(f"{table}#{i}", label="=cmd|' /C calc'!A0") for i in ids])

    csv_text = read_bytes(write_review(output, n=10, dest=str(tmp_path / "r.csv"))).decode()
    raw = read_review(write_review(output, n=10, dest=str(tmp_path / "r.parquet"), fmt="parquet"))

    cells = [cell for row in csv.reader(io.StringIO(csv_text)) for cell in row]
    assert not [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r"))]
    assert '\'=HYPERLINK("http://evil.example","x")' in cells and "plain" in cells
    assert sorted(r["member"] for r in raw) == sorted(ids), "Parquet keeps the values"
    assert {r["label"] for r in raw} == {"=cmd|' /C calc'!A0"}


def test_an_unknown_format_is_refused_before_any_work(output) -> None:
    with pytest.raises(ValueError, match="csv or parquet"):
        write_review(output.uri, fmt="xlsx")
