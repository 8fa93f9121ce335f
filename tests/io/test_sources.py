"""skray.io.sources: listing inputs, cutting them into units and reading a unit's rows, bounded
and streamed, without a Ray cluster."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import parquet_bytes, tar_bytes, write_files
from skray.dev.testing import synthetic_image, webdataset_shard
from skray.io import objects
from skray.io.sources import (
    InputError,
    Unit,
    group_units,
    list_inputs,
    table_batches,
    unit_batches,
)
from skray.io.sources.parquet import PARQUET_BATCH_ROWS
from skray.io.sources.rows import RowError
from skray.io.sources.webdataset import TAR_HEADER_MAX_BYTES, SampleLimits
from skray.io.storage import join, write_bytes_atomic

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def root(location: str) -> str:
    """An input prefix, on the local disk or in a fresh bucket on the embedded S3."""
    return location + "/data"


# --- sources.list_inputs ---------------------------------------------------


def test_list_inputs_returns_every_file_below_the_prefix_recursively_and_sorted(root: str):
    write_files(root, ["b.jpg", "a/z.png", "a/b/c.jpg", "a.tar"])

    assert list_inputs(root).keys == [
        join(root, n) for n in ["a.tar", "a/b/c.jpg", "a/z.png", "b.jpg"]
    ]


def test_list_inputs_skips_hidden_names_in_any_path_component_below_the_prefix(root: str):
    write_files(
        root,
        [
            "keep.jpg",
            ".DS_Store",
            "_SUCCESS",
            "_tmp/x.jpg",
            "sub/.cache/y.jpg",
            "sub/_staging/z.jpg",
            "sub/keep.jpg",
        ],
    )

    assert list_inputs(root).keys == [join(root, "keep.jpg"), join(root, "sub/keep.jpg")]


def test_list_inputs_does_not_skip_a_prefix_that_itself_sits_under_a_hidden_name(root: str):
    prefix = join(root, "_private/.inputs")
    write_files(prefix, ["a.jpg"])

    assert list_inputs(prefix).keys == [join(prefix, "a.jpg")]


def test_list_inputs_skips_exclude_globs_matched_relative_to_the_prefix(root: str):
    write_files(root, ["a.jpg", "notes.txt", "skip/b.jpg", "keep/c.jpg"])

    kept = list_inputs(root, exclude=["*.txt", "skip/*"])

    assert kept.keys == [join(root, "a.jpg"), join(root, "keep/c.jpg")]


def test_list_inputs_with_a_glob_keeps_only_matching_files(root: str):
    write_files(root, ["a.jpg", "b.png", "c.jpg", ".hidden.jpg"])

    assert list_inputs(join(root, "*.jpg")).keys == [join(root, "a.jpg"), join(root, "c.jpg")]
    assert list_inputs(join(root, "?.png")).keys == [join(root, "b.png")]


def test_list_inputs_of_a_single_file_returns_just_that_file(root: str):
    write_files(root, ["a.jpg", "b.jpg"])

    assert list_inputs(join(root, "b.jpg")).keys == [join(root, "b.jpg")]


def test_list_inputs_of_a_missing_input_fails_naming_it(root: str):
    write_files(root, ["a.jpg"])
    missing = join(root, "nope")

    with pytest.raises(InputError, match=f"input not found: {missing}"):
        list_inputs(missing)


def test_list_inputs_fails_when_nothing_matched(root: str):
    write_files(root, ["a.jpg", "_hidden.jpg", "notes.txt"])

    with pytest.raises(InputError, match="no input file matched"):
        list_inputs(join(root, "*.gif"))
    with pytest.raises(InputError, match="no input file matched"):
        list_inputs(root, exclude=["*.jpg", "*.txt"])


def test_list_inputs_accepts_a_relative_local_glob(tmp_path, monkeypatch):
    write_files(str(tmp_path / "data"), ["a.jpg", "b.png"])
    monkeypatch.chdir(tmp_path)

    assert list_inputs("data/*.jpg").keys == [str(tmp_path / "data" / "a.jpg")]
    assert list_inputs(f"file://{tmp_path}/data/*.png").keys == [str(tmp_path / "data" / "b.png")]


# --- sources.group_units ----------------------------------------------------


def test_plan_units_cuts_image_files_into_runs_of_files_per_unit():
    files = [f"/d/img{i}.jpg" for i in range(7)]

    units = group_units(files, "auto", files_per_unit=3)

    assert [u.uris for u in units] == [tuple(files[0:3]), tuple(files[3:6]), tuple(files[6:7])]
    assert [u.rows for u in units] == [3, 3, 1]
    assert {u.format for u in units} == {"images"}


def test_plan_units_makes_each_tar_and_parquet_file_its_own_unit_under_format_auto(tmp_path):
    tables = [str(tmp_path / f"t{i}.parquet") for i in range(2)]
    for t in tables:
        write_bytes_atomic(t, parquet_bytes({"image": [b"a", b"b", b"c"]}))
    shards = ["/d/s0.tar", "/d/s1.tar"]

    units = group_units(["/d/a.jpg", "/d/b.jpg", *shards, *tables], "auto", files_per_unit=10)

    formats = ("images", "webdataset", "parquet")
    by_format = {f: [u for u in units if u.format == f] for f in formats}
    assert [u.uris for u in by_format["images"]] == [("/d/a.jpg", "/d/b.jpg")]
    assert [u.uris for u in by_format["webdataset"]] == [(s,) for s in shards]
    assert [u.rows for u in by_format["webdataset"]] == [None, None]  # unknown until read
    assert [u.uris for u in by_format["parquet"]] == [(t,) for t in tables]
    assert [u.rows for u in by_format["parquet"]] == [3, 3]


def test_plan_units_gives_the_same_files_the_same_ids_and_other_files_other_ids():
    files = [f"/d/img{i}.jpg" for i in range(4)] + ["/d/s.tar"]

    first = [u.id for u in group_units(files, "auto", 2)]
    again = [u.id for u in group_units(list(files), "auto", 2)]
    other = [u.id for u in group_units([f.replace("/d/", "/e/") for f in files], "auto", 2)]

    assert first == again
    assert len(set(first)) == len(first)
    assert not set(first) & set(other)


def test_plan_units_fails_on_a_parquet_file_without_the_image_column_naming_it(tmp_path):
    table = str(tmp_path / "t.parquet")
    write_bytes_atomic(table, parquet_bytes({"picture": [b"a"]}))

    with pytest.raises(InputError, match=r"no column 'image'"):
        group_units([table], "auto", 10)
    with pytest.raises(InputError, match=r"no column 'id'"):
        group_units([table], "auto", 10, parquet_columns=("picture", "id"))


def test_plan_units_with_format_images_treats_a_tar_as_an_image_file():
    units = group_units(["/d/a.jpg", "/d/s.tar"], "images", 10)

    assert [(u.format, u.uris) for u in units] == [("images", ("/d/a.jpg", "/d/s.tar"))]


# --- sources.table_batches: a unit's rows -----------------------------------


def all_rows(unit: Unit, **reading) -> list[dict]:
    """All rows of ``unit`` as the labeling job's read task gets them (one block of
    :meth:`Unit.to_row` rows through :func:`table_batches`), in one batch so each row
    carries the unit's row count."""
    [rows] = table_batches(pa.Table.from_pylist([unit.to_row()]), 10**9, **reading)
    return rows


def test_table_batches_of_image_files_yields_one_row_per_file_with_its_bytes(tmp_path):
    images = {str(tmp_path / f"img{i}.jpg"): synthetic_image(i) for i in range(3)}
    for uri, data in images.items():
        write_bytes_atomic(uri, data)
    [unit] = group_units(sorted(images), "auto", 10)

    rows = all_rows(unit)

    assert [r["key"] for r in rows] == sorted(images)
    assert all(r["data"] == images[r["key"]] for r in rows)
    assert {(r["error"], r["meta"], r["unit"], r["unit_rows"]) for r in rows} == {
        ("", "", unit.id, 3)
    }


def test_an_image_file_deleted_since_the_listing_is_a_missing_row(tmp_path):
    good, gone = str(tmp_path / "good.jpg"), str(tmp_path / "gone.jpg")
    write_bytes_atomic(good, b"bytes")

    rows = all_rows(Unit("u1", "images", (gone, good), 2))

    assert [r["key"] for r in rows] == [gone, good]
    assert rows[0]["error"].startswith("missing: ") and rows[0]["data"] == b""
    assert rows[1]["error"] == "" and rows[1]["data"] == b"bytes"
    assert {r["unit_rows"] for r in rows} == {2}


def test_table_batches_of_a_webdataset_shard_yields_one_row_per_sample_with_metadata(tmp_path):
    shard = str(tmp_path / "shard.tar")
    write_bytes_atomic(shard, webdataset_shard(7, 3))

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    assert [r["key"] for r in rows] == [f"{shard}#sample{i:06d}" for i in (7, 8, 9)]
    assert rows[0]["data"] == synthetic_image(7) and rows[0]["error"] == ""
    assert json.loads(rows[1]["meta"]) == {"cls": 8, "json": {"source": "demo", "index": 8}}
    assert {r["unit_rows"] for r in rows} == {3}


def test_a_shard_made_by_gnu_tar_of_a_directory_labels_every_sample(tmp_path):
    folder = tmp_path / "samples"
    for i in range(12):
        write_bytes_atomic(str(folder / f"{i:06d}.jpg"), synthetic_image(i))
        write_bytes_atomic(str(folder / f"{i:06d}.cls"), str(i % 10).encode())
    shard = str(tmp_path / "shard-000000.tar")
    subprocess.run(["tar", "--sort=name", "-C", str(folder), "-cf", shard, "."], check=True)

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    assert [r["key"] for r in rows] == [f"{shard}#{i:06d}" for i in range(12)]
    assert not any(r["error"] for r in rows) and rows[3]["data"] == synthetic_image(3)
    assert json.loads(rows[3]["meta"]) == {"cls": 3}


def test_a_shard_written_by_the_webdataset_packages_tarwriter_labels_every_sample(tmp_path):
    wds = pytest.importorskip("webdataset")
    shard = str(tmp_path / "shard-000000.tar")
    with wds.TarWriter(shard) as sink:  # keys with directories, as webdataset users write them
        for i in range(6):
            sink.write(
                {
                    "__key__": f"part{i % 2}/{i:06d}",
                    "jpg": synthetic_image(i),
                    "cls": i % 10,
                    "json": {"index": i},
                }
            )

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    assert [r["key"] for r in rows] == [f"{shard}#part{i % 2}/{i:06d}" for i in range(6)]
    assert not any(r["error"] for r in rows) and rows[4]["data"] == synthetic_image(4)
    assert json.loads(rows[4]["meta"]) == {"cls": 4, "json": {"index": 4}}


def test_a_sample_whose_members_are_apart_keeps_one_row_per_key_and_says_how_to_fix_it(tmp_path):
    shard = str(tmp_path / "shard.tar")  # as `tar -C dir .` without --sort may order them
    members = [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.cls", b"3"), ("c.jpg", b"4")]
    write_bytes_atomic(shard, tar_bytes(members))

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 4, "one key, one row"
    assert [r["error"] for r in rows[:2]] == ["", ""] and rows[3]["error"] == ""
    assert rows[2]["key"].startswith(f"{shard}#a@")
    assert rows[2]["error"].startswith("split_sample: ") and "--sort=name" in rows[2]["error"]


def test_member_names_are_normalised_and_one_that_climbs_out_is_a_row_of_its_own(tmp_path):
    shard = str(tmp_path / "shard.tar")
    members = [
        ("./a/x.jpg", b"1"),
        ("/a/x.cls", b"2"),  # the same sample as ./a/x.jpg
        ("../../etc/y.jpg", b"3"),
        ("./b.tar.gz.jpg", b"4"),  # the key ends at the basename's first dot
    ]
    write_bytes_atomic(shard, tar_bytes(members))

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    assert [r["key"] for r in rows] == [f"{shard}#a/x", f"{shard}#../../etc/y.jpg", f"{shard}#b"]
    assert rows[0]["data"] == b"1" and json.loads(rows[0]["meta"]) == {"cls": 2}
    assert rows[1]["error"].startswith("unsafe_member_name: ")
    assert rows[2]["error"] == "" and rows[2]["data"] == b"4"


@pytest.mark.parametrize(
    "ext, data, kept",
    [
        ("json", b"[" * 100_000, "[" * 65536),  # nested past the stack: the text, capped
        ("json", b'{"a": ' * 900 + b"1" + b"}" * 900, None),  # parses; may be too deep to write
        ("cls", "²".encode(), "²"),  # a digit to str.isdigit, no number to int()
        ("cls", b"9" * 5000, "9" * 5000),  # past int()'s digit limit
        ("txt", b"\xff\xfe", "\ufffd\ufffd"),
    ],
    ids=["deep-json", "deep-but-parsable", "superscript-cls", "huge-cls", "bad-utf8"],
)
def test_no_metadata_member_can_fail_a_shard_its_sample_is_still_labeled(tmp_path, ext, data, kept):
    shard = str(tmp_path / "shard.tar")
    members = [("a.jpg", b"img"), (f"a.{ext}", data), ("b.jpg", b"img2")]
    write_bytes_atomic(shard, tar_bytes(members))

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    assert [(r["key"][-1], r["error"]) for r in rows] == [("a", ""), ("b", "")]
    meta = json.loads(rows[0]["meta"])[ext]
    assert kept is None or meta == kept


def test_a_sample_past_its_member_or_byte_limit_is_too_large_and_the_shard_goes_on(tmp_path):
    shard = str(tmp_path / "shard.tar")
    many = [(f"a.{i}.jpg", b"x") for i in range(17)]
    big = [("b.jpg", b"x" * 600), ("b.json", b"[" + b"1," * 300 + b"1]")]
    write_bytes_atomic(shard, tar_bytes([*many, *big, ("c.jpg", b"ok")]))

    rows = all_rows(Unit("s", "webdataset", (shard,)), sample_limits=SampleLimits(16, 1000))

    assert [r["key"].rsplit("#", 1)[1] for r in rows] == ["a", "b", "c"]
    assert (
        rows[0]["error"].startswith("too_large: ") and "max_members_per_sample" in rows[0]["error"]
    )
    assert rows[1]["error"].startswith("too_large: ") and "max_sample_bytes" in rows[1]["error"]
    assert rows[2]["error"] == "" and rows[2]["data"] == b"ok"


def test_a_row_reason_is_the_documented_code_its_reader_chose_and_its_error_one_line(tmp_path):
    shard = str(tmp_path / "shard.tar")
    hostile = "x\nfake_reason: y" + "z" * 5000  # a member name: newlines, a code of its own
    write_bytes_atomic(shard, tar_bytes([(hostile + ".jpg", b"x" * 200), ("ok.jpg", b"ok")]))

    rows = all_rows(Unit("s", "webdataset", (shard,)), max_object_bytes=100)

    assert [r["reason"] for r in rows] == ["too_large", ""]
    assert rows[0]["error"].startswith("too_large: x fake_reason: yzzz")
    assert "\n" not in rows[0]["error"] and len(rows[0]["error"]) <= len("too_large: ") + 300
    with pytest.raises(ValueError, match="'fake_reason' is not a documented row reason"):
        RowError("fake_reason", "y")  # no code but the README's can make a row


def test_table_batches_reports_a_sample_without_an_image_member_as_no_image_member(tmp_path):
    shard = str(tmp_path / "shard.tar")
    members = [("a.jpg", b"img"), ("b.cls", b"3"), ("b.txt", b"caption")]
    write_bytes_atomic(shard, tar_bytes(members))

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    assert [r["key"] for r in rows] == [f"{shard}#a", f"{shard}#b"]
    assert rows[0]["error"] == ""
    assert rows[1]["error"].startswith("no_image_member")
    assert json.loads(rows[1]["meta"]) == {"cls": 3, "txt": "caption"}


def test_table_batches_of_a_tar_cut_mid_way_keeps_earlier_samples_and_reports_broken_tar(tmp_path):
    data = webdataset_shard(0, 3)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmember("sample000002.jpg").offset_data + 100  # inside the last image
    shard = str(tmp_path / "shard.tar")
    write_bytes_atomic(shard, data[:cut])

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    assert [r["key"] for r in rows] == [f"{shard}#sample{i:06d}" for i in range(3)]
    assert [r["error"] for r in rows[:2]] == ["", ""]
    assert rows[2]["error"].startswith("broken_tar")
    assert {r["unit_rows"] for r in rows} == {3}


@pytest.mark.parametrize("into_header", [0, 100], ids=["at-a-header", "inside-a-header"])
def test_table_batches_of_a_tar_cut_between_members_reports_the_truncation(tmp_path, into_header):
    data = webdataset_shard(0, 3)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmember("sample000002.jpg").offset + into_header
    shard = str(tmp_path / "shard.tar")
    write_bytes_atomic(shard, data[:cut])

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    assert [r["key"] for r in rows[:2]] == [f"{shard}#sample{i:06d}" for i in range(2)]
    assert rows[-1]["key"] == f"{shard}#<truncated>" and "truncated" in rows[-1]["error"]
    assert rows[-1]["error"].startswith("broken_tar")


def test_table_batches_of_a_parquet_file_without_rows_yields_one_empty_shard_error_row(tmp_path):
    table = str(tmp_path / "t.parquet")
    write_bytes_atomic(table, parquet_bytes({"image": pa.array([], pa.binary())}))

    rows = all_rows(Unit("p", "parquet", (table,), 0))

    assert [(r["key"], r["error"].split(":")[0], r["unit_rows"]) for r in rows] == [
        (table, "empty_shard", 1)
    ]


def test_table_batches_of_an_empty_tar_yields_one_empty_shard_error_row(tmp_path):
    shard = str(tmp_path / "empty.tar")
    write_bytes_atomic(shard, tar_bytes([]))

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    assert len(rows) == 1
    assert rows[0]["key"] == shard and rows[0]["error"].startswith("empty_shard")
    assert rows[0]["unit_rows"] == 1


def test_table_batches_of_parquet_keys_rows_by_the_id_column_else_by_row_index(tmp_path):
    table = str(tmp_path / "t.parquet")
    write_bytes_atomic(table, parquet_bytes({"id": ["a", "b"], "img": [b"A", b"B"]}))
    unit = Unit("p", "parquet", (table,), 2)

    by_id = all_rows(unit, image_column="img", id_column="id")
    by_index = all_rows(unit, image_column="img")

    assert [(r["key"], r["data"]) for r in by_id] == [(f"{table}#a", b"A"), (f"{table}#b", b"B")]
    assert [r["key"] for r in by_index] == [f"{table}#0", f"{table}#1"]
    assert {r["unit_rows"] for r in by_id + by_index} == {2}


# --- sources: bounded, streamed reading ------------------------------------


class ReadSpy:
    """Records each ranged read (uri, start, length) the readers make, then makes it."""

    def __init__(self, read) -> None:
        self.read, self.reads = read, []

    def __call__(self, uri, start, length):
        self.reads.append((uri, start, length))
        return self.read(uri, start, length)


@pytest.fixture
def read_spy(monkeypatch) -> ReadSpy:
    spy = ReadSpy(objects.read_range)
    monkeypatch.setattr(objects, "read_range", spy)
    return spy


def test_table_batches_reads_an_image_of_unknown_size_only_up_to_max_object_bytes(
    tmp_path, read_spy
):
    small, big = str(tmp_path / "small.jpg"), str(tmp_path / "big.jpg")
    write_bytes_atomic(small, b"s" * 100)
    write_bytes_atomic(big, b"b" * 10_000)

    rows = all_rows(Unit("u", "images", (big, small), 2), max_object_bytes=100)

    assert (
        rows[0]["key"] == big
        and rows[0]["error"].startswith("too_large")
        and rows[0]["data"] == b""
    )
    assert rows[1]["error"] == "" and rows[1]["data"] == b"s" * 100
    assert sorted(read_spy.reads) == [(big, 0, 101), (small, 0, 101)], "one read each, capped"


def test_table_batches_trusts_the_listed_sizes_and_catches_a_file_that_grew_since(
    tmp_path, read_spy
):
    listed_big, grown = str(tmp_path / "listed_big.jpg"), str(tmp_path / "grown.jpg")
    write_bytes_atomic(listed_big, b"x")
    write_bytes_atomic(grown, b"g" * 5000)
    unit = Unit("u", "images", (listed_big, grown), 2, sizes=(10**10, 10))

    rows = all_rows(unit, max_object_bytes=100)

    assert [r["error"].split(":")[0] for r in rows] == ["too_large", "too_large"]
    assert read_spy.reads == [(grown, 0, 101)], "the listed-big file is never opened"
    assert Unit.from_row(unit.to_row()) == unit


def tar_member(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """One member as raw tar blocks (header, data, padding), to splice into an archive."""
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def gnu_sparse_member(name: str, stored: bytes, claimed: int) -> bytes:
    """A GNU sparse member (type 'S'): ``stored`` in the archive, ``claimed`` bytes once
    expanded."""
    header = bytearray(tar_member(tarfile.TarInfo(name), stored)[: tarfile.BLOCKSIZE])
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:398] = tarfile.itn(
        claimed - len(stored), 12, tarfile.GNU_FORMAT
    )  # the one data region
    header[398:410] = tarfile.itn(len(stored), 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(claimed, 12, tarfile.GNU_FORMAT)  # the size it claims
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + stored + b"\0" * (-len(stored) % tarfile.BLOCKSIZE)


def test_table_batches_of_a_tar_makes_links_sparse_and_oversize_members_error_rows(tmp_path):
    link = tarfile.TarInfo("link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "good0.jpg"
    hard = tarfile.TarInfo("hard.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "good0.jpg"
    shard = str(tmp_path / "shard.tar")
    write_bytes_atomic(
        shard,
        b"".join(
            [
                tar_member(tarfile.TarInfo("good0.jpg"), b"img0"),
                tar_member(link),
                tar_member(hard),
                gnu_sparse_member("sparse.jpg", b"s" * 512, claimed=4 * 2**30),
                tar_member(tarfile.TarInfo("big.jpg"), b"b" * 101),
                tar_member(tarfile.TarInfo("good1.jpg"), b"img1"),
                tar_member(tarfile.TarInfo("good1.cls"), b"1"),
                b"\0" * 2 * tarfile.BLOCKSIZE,
            ]
        ),
    )

    rows = all_rows(Unit("s", "webdataset", (shard,)), max_object_bytes=100)

    errors = {r["key"].split("#")[1]: r["error"].split(":")[0] for r in rows}
    assert errors == {
        "good0": "",
        "link": "tar_member_not_regular",
        "hard": "tar_member_not_regular",
        "sparse": "tar_member_not_regular",
        "big": "too_large",
        "good1": "",
    }
    assert "sparse" in rows[3]["error"] and str(4 * 2**30) in rows[3]["error"]
    assert (rows[0]["data"], rows[5]["data"], json.loads(rows[5]["meta"])) == (
        b"img0",
        b"img1",
        {"cls": 1},
    )
    assert {r["unit_rows"] for r in rows} == {6}


def test_table_batches_of_a_tar_stops_at_a_long_name_header_too_large_to_hold(tmp_path):
    long_name = tarfile.TarInfo("././@LongLink")
    long_name.type = tarfile.GNUTYPE_LONGNAME
    shard = str(tmp_path / "shard.tar")
    write_bytes_atomic(
        shard,
        b"".join(
            [
                tar_member(tarfile.TarInfo("good.jpg"), b"img"),
                tar_member(long_name, b"n" * (TAR_HEADER_MAX_BYTES + 1)),
                tar_member(tarfile.TarInfo("after.jpg"), b"img"),
                b"\0" * 2 * tarfile.BLOCKSIZE,
            ]
        ),
    )

    rows = all_rows(Unit("s", "webdataset", (shard,)))

    [row] = rows  # the sample being read when the archive broke off is reported broken
    assert row["key"] == f"{shard}#good" and row["error"].startswith("broken_tar")
    assert "header block claims" in row["error"]


def test_unit_batches_streams_a_tar_shard_and_puts_the_row_count_in_the_last_batch_only(tmp_path):
    shard = str(tmp_path / "shard.tar")
    write_bytes_atomic(shard, webdataset_shard(0, 5))

    batches = unit_batches(Unit("s", "webdataset", (shard,)), batch_size=2)

    assert [[(r["unit"], r["unit_rows"]) for r in b] for b in batches] == [
        [("s", -1), ("s", -1)],
        [("s", -1), ("s", -1)],
        [("s", 5)],
    ]


def test_unit_batches_of_an_empty_shard_yields_one_empty_shard_row_counting_itself(tmp_path):
    shard = str(tmp_path / "empty.tar")
    write_bytes_atomic(shard, tar_bytes([]))

    [[row]] = list(unit_batches(Unit("s", "webdataset", (shard,)), batch_size=2))

    assert row["error"].startswith("empty_shard") and row["unit_rows"] == 1


def parquet_row_groups(path: str, images: list[bytes], rows_per_group: int) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": images}), buf, row_group_size=rows_per_group)
    write_bytes_atomic(path, buf.getvalue())


def test_unit_batches_reads_parquet_row_group_by_row_group_as_it_streams(tmp_path, monkeypatch):
    table = str(tmp_path / "t.parquet")
    parquet_row_groups(table, [bytes([65 + i]) for i in range(6)], rows_per_group=2)
    reads = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, row_groups=None, **kwargs):
        reads.append((batch_size, row_groups))
        return iter_batches(self, batch_size, row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)

    batches = unit_batches(Unit("p", "parquet", (table,), 6), batch_size=1)
    first = next(batches)

    assert [r["data"] for r in first] == [b"A"] and reads == [(PARQUET_BATCH_ROWS, [0])]
    rest = list(batches)
    assert [g for _, g in reads] == [[0], [1], [2]]
    assert [r["data"] for b in rest for r in b] == [b"B", b"C", b"D", b"E", b"F"]
    assert [r["unit_rows"] for b in [first, *rest] for r in b] == [-1] * 5 + [6]


def test_table_batches_of_parquet_makes_a_cell_over_max_object_bytes_a_too_large_row(tmp_path):
    table = str(tmp_path / "t.parquet")
    write_bytes_atomic(table, parquet_bytes({"image": [b"a" * 100, b"b" * 101, None]}))

    rows = all_rows(Unit("p", "parquet", (table,), 3), max_object_bytes=100)

    assert [r["key"] for r in rows] == [f"{table}#{i}" for i in range(3)]
    assert [r["error"].split(":")[0] for r in rows] == ["", "too_large", ""]
    assert [r["data"] for r in rows] == [b"a" * 100, b"", b""]


def test_a_hugging_face_image_column_is_read_from_its_bytes_field_and_size_capped(tmp_path):
    path = str(tmp_path / "hf.parquet")
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [
        {"bytes": b"img0", "path": "0.jpg"},
        None,
        {"bytes": None, "path": "2.jpg"},
        {"bytes": b"x" * 101, "path": "3.jpg"},
    ]
    pq.write_table(pa.table({"image": pa.array(cells, kind)}), path)

    rows = all_rows(Unit("t", "parquet", (path,), 4), max_object_bytes=100)

    assert [(r["data"], r["error"]) for r in rows[:3]] == [(b"img0", ""), (b"", ""), (b"", "")]
    assert rows[3]["error"].startswith("too_large: the cell is 101 bytes")


def test_an_image_column_of_no_bytes_makes_each_row_an_error_naming_its_type(tmp_path):
    path = str(tmp_path / "ints.parquet")
    pq.write_table(pa.table({"image": [1, 2]}), path)

    rows = all_rows(Unit("t", "parquet", (path,), 2))

    assert [r["error"] for r in rows] == [
        "bad_image_column: column 'image' is int64, not binary, string or struct<bytes, path>"
    ] * 2


def test_table_batches_of_a_parquet_file_with_a_broken_footer_yields_one_unreadable_row(tmp_path):
    table = str(tmp_path / "t.parquet")
    write_bytes_atomic(table, parquet_bytes({"image": [b"a", b"b"]})[:-10])

    rows = all_rows(Unit("p", "parquet", (table,), 2))

    assert [(r["key"], r["error"].split(":")[0], r["unit_rows"]) for r in rows] == [
        (table, "unreadable_parquet", 1)
    ]


def test_table_batches_of_parquet_turns_a_row_group_not_decoding_into_one_error_row(tmp_path):
    table = str(tmp_path / "t.parquet")
    parquet_row_groups(table, [bytes([65 + i]) * 50 for i in range(6)], rows_per_group=2)
    chunk = pq.ParquetFile(table).metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    with open(table, "r+b") as f:  # garbage over the second row group's pages
        f.seek(start)
        f.write(b"\xff" * chunk.total_compressed_size)

    rows = all_rows(Unit("p", "parquet", (table,), 6))

    keys = [f"{table}#{k}" for k in ("0", "1", "<row group 1>", "4", "5")]
    assert [r["key"] for r in rows] == keys
    assert [r["error"].split(":")[0] for r in rows] == ["", "", "unreadable_parquet", "", ""]
    assert rows[3]["data"] == b"E" * 50
