"""The labeling report: one pass over the parts, a self-contained page, thumbnails from the
sources."""

from __future__ import annotations

import base64
import collections
import io
from html.parser import HTMLParser

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from labeled_output import FAILURES, LABELS, write_labeled_output
from skray.io.storage import filesystem_for, join, read_bytes
from skray.label.sinks import OutputError
from skray.report import scan as scan_module
from skray.report.charts import label_counts, score_histograms
from skray.report.page import write_report
from skray.report.scan import SCORE_BINS, scan_output
from skray.report.thumbnails import Reading, Source, locate, thumbnails


class Page(HTMLParser):
    """Every attribute naming a resource, every image (by title) and every unreadable source box."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: dict[str, str] = {}
        self.missing: list[str] = []
        self._in_missing = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.links += [attrs[a] for a in ("src", "href", "srcset", "poster", "data") if a in attrs]
        if tag == "img":
            self.images[attrs.get("title") or attrs["alt"]] = attrs["src"]
        if tag == "div" and attrs.get("class") == "missing":
            self._in_missing = 1
            self.missing.append("")
        elif self._in_missing:
            self._in_missing += 1

    def handle_endtag(self, tag: str) -> None:
        if self._in_missing and tag == "div":
            self._in_missing = 0

    def handle_data(self, data: str) -> None:
        if self._in_missing:
            self.missing[-1] += data


def decoded(src: str) -> Image.Image:
    assert src.startswith("data:image/"), src[:40]
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


@pytest.fixture(scope="module")
def local_report(tmp_path_factory: pytest.TempPathFactory):
    out = write_labeled_output(str(tmp_path_factory.mktemp("report")))
    page = write_report(out.uri)
    return out, page, Page(read_bytes(page).decode())


@pytest.mark.timeout(120)
def test_page_is_self_contained_every_image_inline_and_decodable(local_report) -> None:
    out, page, parsed = local_report
    assert parsed.links and all(link.startswith("data:image/") for link in parsed.links)
    for src in parsed.links:
        decoded(src).load()
    text = read_bytes(page).decode()
    assert "http://" not in text and "https://" not in text
    fs, path = filesystem_for(join(out.uri, "_report"))
    written = {info.base_name for info in fs.get_file_info(pafs.FileSelector(path))}
    assert {"index.html", "labels.png", "scores.png", "throughput.png"} <= written


@pytest.mark.timeout(120)
def test_failures_table_names_each_reason_with_its_count_and_example_keys(local_report) -> None:
    out, page, _ = local_report
    text = read_bytes(page).decode()
    for reason, count in FAILURES.items():
        assert f'<td>{reason}</td><td class="n">{count}</td>' in text
        assert join(out.root, f"src/bad/{reason}-0") in text


@pytest.mark.timeout(120)
def test_galleries_show_thumbnails_from_image_files_shard_members_and_parquet_cells(
    local_report,
) -> None:
    out, _, parsed = local_report
    thumbs = {key: src for key, src in parsed.images.items() if key.startswith(out.root)}
    assert set(out.tar_keys) <= set(thumbs), "the five shard members are the lowest-scoring rockets"
    assert set(out.parquet_keys) <= set(thumbs), "the four Parquet rows are the lowest-scoring mugs"
    for src in thumbs.values():
        assert max(decoded(src).size) <= 160
    assert any(key.endswith(".jpg") and "#" not in key for key in thumbs)


@pytest.mark.timeout(120)
def test_sources_that_are_gone_or_bad_show_their_key_and_why(local_report) -> None:
    out, _, parsed = local_report
    for key, reason in (
        (out.deleted, "missing"),
        (out.garbage, "not_an_image"),
        (out.bomb, "too_many_pixels"),
    ):
        assert any(box.startswith(key) and reason in box for box in parsed.missing), (
            key,
            parsed.missing,
        )
    assert out.deleted not in parsed.images


@pytest.mark.timeout(180)
def test_report_reads_and_writes_s3(bucket: str) -> None:
    out = write_labeled_output(bucket, progress=False)
    page = write_report(out.uri)
    assert page == join(out.uri, "_report/index.html")
    parsed = Page(read_bytes(page).decode())
    assert set(out.tar_keys) | set(out.parquet_keys) <= set(parsed.images)
    assert any(box.startswith(out.deleted) and "missing" in box for box in parsed.missing)
    assert "Throughput over the run" not in read_bytes(page).decode()


@pytest.mark.timeout(120)
def test_scan_counts_and_samples_match_the_rows_whatever_the_batch_size(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = write_labeled_output(str(tmp_path))
    monkeypatch.setattr(scan_module, "BATCH_ROWS", 4)  # samples merge across many batches
    scan = scan_output(out.uri, random_k=3, lowest_k=3, seed=1)
    ok = [r for r in out.rows if r["error"] is None]
    counts = collections.Counter(r["label"] for r in ok)
    assert scan.rows == len(out.rows) and scan.parts == 5
    assert scan.failed == sum(FAILURES.values()) and dict(scan.failures) == FAILURES
    assert scan.low_confidence == counts[None] == 2
    assert dict(scan.top_labels(10)) == {k: v for k, v in counts.items() if k is not None}
    assert scan.histogram(None).sum() == 2 and scan.score_hist.sum() == len(ok)
    for label in counts:
        scores = np.float32([r["score"] for r in ok if r["label"] == label])
        expected = np.bincount(
            np.clip((scores.astype(np.float64) * SCORE_BINS).astype(int), 0, SCORE_BINS - 1),
            minlength=SCORE_BINS,
        )
        assert scan.histogram(label).tolist() == expected.tolist()
        lowest = scan.rows_of(scan.lowest, label)
        assert [r["score"] for r in lowest] == pytest.approx(sorted(scores.tolist())[:3])
        keys = {r["key"] for r in ok if r["label"] == label}
        picked = scan.rows_of(scan.random, label)
        assert len(picked) == min(3, len(keys)) and {r["key"] for r in picked} <= keys


@pytest.mark.timeout(120)
def test_random_examples_are_a_uniform_sample_across_parts_and_batches(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of a label's 14 rows (in two parts, many batches) is picked about equally often."""
    out = write_labeled_output(str(tmp_path))
    monkeypatch.setattr(scan_module, "BATCH_ROWS", 3)
    hits = collections.Counter()
    for seed in range(200):
        scan = scan_output(out.uri, random_k=2, seed=seed)
        hits.update(r["key"] for r in scan.rows_of(scan.random, "tabby"))
    assert len(hits) == LABELS["tabby"] and sum(hits.values()) == 400
    assert min(hits.values()) >= 15 and max(hits.values()) <= 50  # 400 / 14 = 28.6 expected each


def test_locate_splits_container_and_member() -> None:
    assert locate("s3://b/x/img.jpg") == Source("s3://b/x/img.jpg", None, "images")
    assert locate("s3://b/s/shard-1.tar#dir/sample#2") == Source(
        "s3://b/s/shard-1.tar", "dir/sample#2", "webdataset"
    )
    assert locate("/data/t.parquet#17") == Source("/data/t.parquet", "17", "parquet")
    assert locate("/data/a#b.jpg") == Source("/data/a#b.jpg", None, "images")
    assert locate("/data/shard-7#k", "webdataset") == Source("/data/shard-7", "k", "webdataset")


@pytest.mark.timeout(60)
def test_thumbnails_refuse_images_over_the_pixel_limit_before_decoding(tmp_path) -> None:
    out = write_labeled_output(str(tmp_path))
    tiny = thumbnails([out.tar_keys[0], out.bomb], Reading(max_pixels=10_000))
    assert tiny[out.tar_keys[0]].startswith("too_many_pixels")
    assert tiny[out.bomb].startswith("too_many_pixels")
    fine = thumbnails([out.tar_keys[0]], Reading())
    assert Image.open(io.BytesIO(fine[out.tar_keys[0]])).format == "JPEG"


def test_a_path_with_no_labeling_output_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(OutputError, match="no labeling output at .*nowhere"):
        write_report(str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()


def test_labels_with_dollar_signs_are_drawn_as_written_not_as_math() -> None:
    names = ["cost $x^$", "$\\nocommand$", "price $5 to $9", "one $ sign"]
    counts = [(name, 3 - i) for i, name in enumerate(names)]

    assert label_counts(counts).startswith(b"\x89PNG")
    histogram = np.ones(10)
    assert score_histograms(histogram, [(n, histogram) for n in names]).startswith(b"\x89PNG")
