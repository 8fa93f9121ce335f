"""Labeling output: one Parquet part per input unit, committed atomically, plus a manifest.

A part's name is its unit's id, so a rerun finds exactly which units are done by
listing the output; since each key belongs to one unit and each unit to one
part, every key appears once however often the job is killed and rerun.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skray.storage import filesystem_for, write_bytes_atomic

PART_PREFIX = "part-"
MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"

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
        ("error", pa.string()),
        ("meta", pa.string()),
    ]
)


class OutputError(ValueError):
    """The output location cannot be used (unwritable, or holds another job's results)."""


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def part_name(unit_id: str) -> str:
    return f"{PART_PREFIX}{unit_id}.parquet"


def committed_units(output: str) -> set[str]:
    """Ids of the units whose part is in ``output`` (temporary files are hidden, so never counted)."""
    fs, path = filesystem_for(output)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    selector = pafs.FileSelector(path, recursive=False)
    names = (posixpath.basename(f.path) for f in fs.get_file_info(selector))
    return {n[len(PART_PREFIX) : -len(".parquet")] for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet")}


def write_part(output: str, unit_id: str, rows: list[dict[str, Any]]) -> None:
    """Commit one unit's rows: readers see the whole part or nothing."""
    table = pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes_atomic(join(output, part_name(unit_id)), buffer.getvalue())


def read_json(uri: str) -> dict[str, Any] | None:
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.readall())


def write_json(uri: str, value: dict[str, Any]) -> None:
    write_bytes_atomic(uri, json.dumps(value, indent=2, sort_keys=False, default=str).encode())


def clear_output(output: str) -> None:
    """``--overwrite``: remove parts, the manifest and the job record (nothing else)."""
    fs, path = filesystem_for(output)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = posixpath.basename(info.path)
        if name.startswith(PART_PREFIX) or name in (MANIFEST, JOB_FILE):
            fs.delete_file(info.path)


def check_writable(output: str) -> None:
    """Fail before any work when the output cannot be written."""
    probe = join(output, "_write_probe")
    try:
        write_bytes_atomic(probe, b"")
        fs, path = filesystem_for(probe)
        fs.delete_file(path)
    except (OSError, ValueError) as err:
        raise OutputError(f"output is not writable: {output}: {err}") from None


def summarize_output(output: str) -> dict[str, Any]:
    """Counts over every committed part: rows, distinct keys, failures by reason, top labels."""
    fs, path = filesystem_for(output)
    parts = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=False))
        if posixpath.basename(f.path).startswith(PART_PREFIX)
    ]
    rows = 0
    keys: set[str] = set()
    reasons: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for part in parts:
        table = pq.read_table(part, filesystem=fs, columns=["key", "label", "error"])
        rows += table.num_rows
        keys.update(table.column("key").to_pylist())
        for label, error in zip(table.column("label").to_pylist(), table.column("error").to_pylist()):
            if error is None:
                labels[label] += 1
            else:
                reasons[error.split(":", 1)[0]] += 1
    return {
        "parts": len(parts),
        "rows": rows,
        "distinct_keys": len(keys),
        "labeled": rows - sum(reasons.values()),
        "failed": sum(reasons.values()),
        "failed_by_reason": dict(reasons.most_common()),
        "top_labels": labels.most_common(10),
    }
