"""skray.label.sinks: committed units, clearing and checking an output, summarizing it."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import label_row
from skray.io.sources.rows import RowError
from skray.io.storage import filesystem_for, join, write_json
from skray.label.sinks import (
    JOB_FILE,
    LABEL_SCHEMA,
    MANIFEST,
    OutputError,
    check_writable,
    clear_output,
    committed_units,
    part_name,
    summarize_output,
    write_part,
)

pytestmark = pytest.mark.timeout(60)
EMPTY = RowError("empty", "zero bytes")


def part_keys(output: str, unit_id: str) -> list[str]:
    fs, path = filesystem_for(join(output, part_name(unit_id)))
    return pq.read_table(path, filesystem=fs).column("key").to_pylist()


def test_committed_units_lists_the_ids_of_written_parts(tmp_path):
    output = str(tmp_path / "out")
    assert committed_units(output) == set()

    write_part(output, "unit1", [label_row("k1")])
    write_part(output, "unit2", [])

    assert committed_units(output) == {"unit1", "unit2"}
    assert part_keys(output, "unit1") == ["k1"]


def test_committed_units_does_not_count_a_leftover_temporary_file(tmp_path):
    output = tmp_path / "out"
    write_part(str(output), "done", [label_row("k")])
    (output / ".part-x.parquet.123.tmp").write_bytes(b"half a part")

    assert committed_units(str(output)) == {"done"}


def test_clear_output_removes_parts_manifest_and_job_file_only(tmp_path):
    output = tmp_path / "out"
    write_part(str(output), "u1", [label_row("k")])
    write_json(join(str(output), MANIFEST), {})
    write_json(join(str(output), JOB_FILE), {})
    (output / "README.txt").write_text("keep me")
    (output / "other").mkdir()
    (output / "other" / "part-nested.parquet").write_bytes(b"keep")

    clear_output(str(output))

    assert sorted(os.listdir(output)) == ["README.txt", "other"]
    assert (output / "other" / "part-nested.parquet").exists()


def test_check_writable_fails_for_an_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("a regular file")

    with pytest.raises(OutputError, match="not writable"):
        check_writable(str(tmp_path / "file" / "out"))
    check_writable(str(tmp_path / "out"))  # a writable one leaves no probe behind
    assert os.listdir(tmp_path / "out") == []


def test_summarize_output_counts_rows_failures_by_reason_and_top_labels(tmp_path):
    output = str(tmp_path / "out")
    write_part(
        output,
        "u1",
        [label_row("a", "cat"), label_row("b", "dog"), label_row("c", error=EMPTY)],
    )
    write_part(
        output,
        "u2",
        [
            label_row("d", "cat"),
            label_row("e", error=RowError("not_an_image", "text")),
            label_row("f", error=EMPTY),
        ],
    )

    summary = summarize_output(output)

    assert (summary["parts"], summary["rows"], summary["distinct_keys"]) == (2, 6, 6)
    assert (summary["labeled"], summary["failed"]) == (3, 3)
    assert summary["failed_by_reason"] == {"empty": 2, "not_an_image": 1}
    assert summary["top_labels"] == [("cat", 2), ("dog", 1)]


def test_failure_reasons_of_an_earlier_versions_rows_are_only_documented_codes(tmp_path):
    """Earlier versions wrote no ``reason`` column: their rows count by their error's prefix,
    a documented code or else ``undecodable``, beside this version's parts."""
    output = str(tmp_path / "out")
    errors = ["broken_tar: a\nnew: b", "made-up thing: c", "empty: zero bytes"]
    earlier = pa.Table.from_pylist(
        [label_row(str(i), error=e) for i, e in enumerate(errors)], schema=LABEL_SCHEMA
    ).drop_columns(["reason"])
    fs, path = filesystem_for(join(output, part_name("earlier")))
    fs.create_dir(os.path.dirname(path))
    pq.write_table(earlier, path, filesystem=fs)
    write_part(output, "now", [label_row("n", error=EMPTY)])

    assert summarize_output(output)["failed_by_reason"] == {
        "empty": 2,
        "broken_tar": 1,
        "undecodable": 1,
    }
