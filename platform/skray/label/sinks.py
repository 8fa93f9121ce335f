"""Labeling output: one Parquet part per input unit, committed atomically, plus a manifest.

A part's name is its unit's id, so a rerun finds exactly which units are done by
listing the output; since each key belongs to one unit and each unit to one
part, every key appears once however often the job is killed and rerun.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skray.core.errors import SkrayError
from skray.io.retry import IoRetry, call_with_retry
from skray.io.sources.rows import INCOMPLETE, ROW_REASONS
from skray.io.storage import (
    filesystem_for,
    join,
    read_bytes,
    redact_text,
    redact_uri,
    write_bytes_atomic,
    write_bytes_exclusive,
)

PART_PREFIX = "part-"
MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"
REPORT_DIR = "_report"  # skray.report.page's page and charts
REVIEW_PREFIX = "_review."  # skray.report.review's sample

LABEL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label_id", pa.int32()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_scores", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("weights_sha256", pa.string()),
        ("reason", pa.string()),  # the error's documented code (README "Bad data"); null: labeled
        ("error", pa.string()),  # "reason: message"
        ("meta", pa.string()),
        (
            "low_confidence",
            pa.bool_(),
        ),  # top score under min_score: label and label_id null; null on errors
    ]
)


class OutputError(SkrayError):
    """The output location cannot be used (unwritable, or holds another job's results)."""


def part_name(unit_id: str) -> str:
    return f"{PART_PREFIX}{unit_id}.parquet"


def part_paths(output: str) -> tuple[pafs.FileSystem, list[str]]:
    """The committed parts of ``output`` (temporary files are hidden, so never counted)."""
    fs, path = filesystem_for(output)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return fs, []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = (info.path for info in infos if info.type == pafs.FileType.File)
    return fs, sorted(
        p for p in names if posixpath.basename(p).startswith(PART_PREFIX) and p.endswith(".parquet")
    )


def committed_units(output: str) -> set[str]:
    """Ids of the units whose part is in ``output``."""
    _, paths = part_paths(output)
    return {posixpath.basename(p)[len(PART_PREFIX) : -len(".parquet")] for p in paths}


class PartExists(SkrayError):
    """A part this run was to write exists: another writer committed the unit."""


def write_part(
    output: str,
    unit_id: str,
    rows: pa.Table | list[dict[str, Any]],
    io_retry: IoRetry | None = None,
) -> None:
    """Commit one unit's rows (the label schema's columns): readers see the whole part or
    nothing. The write is retried within ``io_retry`` and is create-only: a part that exists
    with other bytes was written by another run (:class:`PartExists`: stop, never overwrite);
    with the same bytes it is this write's own earlier try, whose answer was lost."""
    if isinstance(rows, pa.Table):
        table = rows.select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)
    else:
        table = pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    uri, data = join(output, part_name(unit_id)), buffer.getvalue()
    try:
        call_with_retry(
            lambda: write_bytes_exclusive(uri, data), f"writing {redact_uri(uri)}", io_retry
        )
    except FileExistsError:
        if call_with_retry(lambda: read_bytes(uri), f"reading {redact_uri(uri)}", io_retry) != data:
            raise PartExists(
                f"{redact_uri(uri)} was written by another run: this run stops without "
                "overwriting it (is a second run labeling this output?)"
            ) from None


def withdraw_rows(
    output: str, part: str, keys: tuple[str, ...] | None, io_retry: IoRetry | None = None
) -> None:
    """Take ``keys``'s rows out of a committed part, or the whole part (``keys`` None, or no
    row left): the part is replaced atomically, so a reader sees it with or without them.
    Used to heal rows earlier versions committed for a storage failure before their keys are
    labeled again; a run that dies between the two leaves the keys unlabeled, never twice."""
    uri = join(output, part)
    fs, path = filesystem_for(uri)
    if keys is not None:
        data = call_with_retry(lambda: read_bytes(uri), f"reading {redact_uri(uri)}", io_retry)
        table = pq.read_table(io.BytesIO(data))
        kept = table.filter(pc.invert(pc.is_in(table.column("key"), pa.array(keys, pa.string()))))
        if kept.num_rows:
            buffer = io.BytesIO()
            pq.write_table(kept, buffer, compression="zstd")
            call_with_retry(
                lambda: write_bytes_atomic(uri, buffer.getvalue()),
                f"rewriting {redact_uri(uri)}",
                io_retry,
            )
            return
    call_with_retry(lambda: fs.delete_file(path), f"removing {redact_uri(uri)}", io_retry)


def clear_output(output: str) -> None:
    """``--overwrite``: remove parts, the manifest, the job record, the report and review
    samples (what describes the old parts; nothing else)."""
    fs, path = filesystem_for(output)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = posixpath.basename(info.path)
        if name == REPORT_DIR and info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        elif name.startswith((PART_PREFIX, REVIEW_PREFIX)) or name in (MANIFEST, JOB_FILE):
            fs.delete_file(info.path)


def check_writable(output: str) -> None:
    """Fail before any work when the output cannot be written."""
    probe = join(output, "_write_probe")
    try:
        write_bytes_atomic(probe, b"")
        fs, path = filesystem_for(probe)
        fs.delete_file(path)
    except (OSError, ValueError) as err:
        raise OutputError(
            f"output is not writable: {redact_uri(output)}: {redact_text(str(err))}"
        ) from None


def withdraw_manifest(output: str) -> None:
    """Remove the manifest of an earlier run as this one starts: until the new one is written
    last, no reader can mistake a partial output for a complete one."""
    fs, path = filesystem_for(join(output, MANIFEST))
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def _ranked(counts: pa.StructArray) -> list[tuple[str, int]]:
    """``value_counts`` output as (value, count), most frequent first, ties by value."""
    pairs = zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
    return sorted(pairs, key=lambda pair: (-pair[1], pair[0]))


def reason_codes(failed: pa.Table) -> pa.Array:
    """The reason code of each of ``failed``'s rows: its ``reason``; for a row of an earlier
    version, which had no reason column (read as null), its error's prefix if that is a
    documented code, else ``undecodable``."""
    earlier = pc.replace_substring_regex(failed.column("error"), pattern="(?s):.*$", replacement="")
    codes = pc.coalesce(failed.column("reason"), earlier)
    documented = pa.array([*ROW_REASONS, INCOMPLETE], pa.string())
    return pc.if_else(pc.is_in(codes, value_set=documented), codes, "undecodable")


def summarize_output(output: str, top: int = 10) -> dict[str, Any]:
    """Counts over every committed part: rows, distinct keys, failures by reason, low-confidence
    rows (no error, no label: under ``min_score``), top labels.

    Reads four columns through Arrow and counts there, so a 10M-row output stays a few
    hundred MB, never a Python object per row."""
    fs, paths = part_paths(output)
    columns = ["key", "label", "reason", "error"]
    if paths:  # by the schema: a part of an earlier version reads as null reasons
        dataset = pads.dataset(paths, schema=LABEL_SCHEMA, filesystem=fs, format="parquet")
        table = dataset.to_table(columns=columns)
    else:
        table = pa.table({c: pa.array([], pa.string()) for c in columns})
    errors = table.column("error")
    failed = table.filter(pc.is_valid(errors))
    reasons = dict(_ranked(pc.value_counts(reason_codes(failed))))
    predicted = table.filter(pc.is_null(errors)).column("label")
    labels = pc.value_counts(predicted.drop_null())
    return {
        "parts": len(paths),
        "rows": table.num_rows,
        "distinct_keys": pc.count_distinct(table.column("key")).as_py(),
        "labeled": len(predicted) - predicted.null_count,
        "low_confidence": predicted.null_count,
        "failed": failed.num_rows,
        "failed_by_reason": reasons,
        "top_labels": _ranked(labels)[:top],
    }
