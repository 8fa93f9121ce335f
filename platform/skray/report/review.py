"""``skray review OUTPUT --n 200``: the rows a person should check, as a file a labeling
tool imports (CSV or Parquet).

The sample is stratified by label and takes the lowest scores first: round by round,
every label (and the low-confidence rows, which have none) gives up its next
lowest-scoring row, so rare labels are covered before frequent ones are mined deep;
within a round abstentions come first, then lower scores. Rows are listed
low-confidence first, then by score. Each row names its source: a presigned HTTPS URL
for ``s3://`` objects (a shard or Parquet file for its members, with ``member`` the
key inside), the local path otherwise. Failed rows are the report's business, not here.
"""

from __future__ import annotations

import io
import json
from typing import Literal
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from skray.io.storage import join, read_json, s3_client, write_bytes_atomic
from skray.label.sinks import MANIFEST, REVIEW_PREFIX
from skray.report.scan import scan_output, smallest_per_group
from skray.report.thumbnails import locate

PRESIGN_EXPIRES_S = 3600  # as `aws s3 presign`; SigV4 allows up to 7 days
# A CSV cell a spreadsheet would run as a formula (OWASP "CSV injection") starts with one of
# these: such cells get a leading ' in CSV (Parquet keeps the raw value).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

REVIEW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("low_confidence", pa.bool_()),
        ("topk_ids", pa.string()),  # JSON lists: one cell in CSV and Parquet alike
        ("topk_scores", pa.string()),
        ("uri", pa.string()),
        ("member", pa.string()),
    ]
)


def sample(output: str, n: int) -> pa.Table:
    """The ``n`` rows to review, in review order (key, label, score, top-k; no URIs yet)."""
    scan = scan_output(output, lowest_k=n, keep=("topk_ids", "topk_scores"))
    if scan.lowest is None:
        return pa.table({"key": [], "label": [], "score": [], "topk_ids": [], "topk_scores": []})
    rows = scan.lowest
    picked, rank = smallest_per_group(
        rows.column("_group").to_numpy(), rows.column("_order").to_numpy(), n
    )
    rows = rows.take(picked).append_column("_round", pa.array(rank))
    rows = rows.append_column("_sure", rows.column("label").is_valid())
    first = rows.sort_by(
        [("_round", "ascending"), ("_sure", "ascending"), ("_order", "ascending")]
    ).slice(0, n)
    return first.sort_by([("_sure", "ascending"), ("_order", "ascending")]).drop_columns(
        ["_group", "_order", "_round", "_sure"]
    )


class _Linker:
    """Presigned URLs for s3:// objects (one per object), local paths as they are."""

    def __init__(self, expires_s: int) -> None:
        self.expires_s = expires_s
        self.urls: dict[str, str] = {}
        self.client = None

    def __call__(self, uri: str) -> str:
        if not uri.startswith("s3://"):
            return uri
        if uri not in self.urls:
            self.client = self.client or s3_client()
            parsed = urlparse(uri)
            self.urls[uri] = self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": parsed.netloc, "Key": parsed.path.lstrip("/")},
                ExpiresIn=self.expires_s,
            )
        return self.urls[uri]


def defused(table: pa.Table) -> pa.Table:
    """``table`` with every string cell that starts like a formula prefixed with ``'``, so a
    spreadsheet shows the text instead of running it."""
    columns = []
    for column in table.columns:
        if pa.types.is_string(column.type):
            cells = column.to_pylist()
            column = pa.array(
                [f"'{c}" if c and c.startswith(FORMULA_STARTS) else c for c in cells], pa.string()
            )
        columns.append(column)
    return pa.table(columns, schema=table.schema)


def write_review(
    output: str,
    n: int = 200,
    dest: str | None = None,
    fmt: Literal["csv", "parquet"] = "csv",
    expires_s: int = PRESIGN_EXPIRES_S,
) -> str:
    """Write the review sample to ``dest`` (default ``OUTPUT/_review.<fmt>``); returns its URI.
    Presigned URLs carry a signature valid for ``expires_s`` (default an hour), or less: one
    signed with temporary credentials (an STS session, an instance role) dies with them.
    CSV cells that a spreadsheet would run as formulas are defused (:func:`defused`)."""
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"review format must be csv or parquet, not {fmt!r}")
    dest = dest or join(output, f"{REVIEW_PREFIX}{fmt}")
    config = (read_json(join(output, MANIFEST)) or {}).get("config") or {}
    link = _Linker(expires_s)
    rows = []
    for row in sample(output, n).to_pylist():
        source = locate(row["key"], config.get("format", "auto"))
        rows.append(
            {
                **row,
                "low_confidence": row["label"] is None,
                "topk_ids": json.dumps(row["topk_ids"]),
                "topk_scores": json.dumps([float(f"{x:.6g}") for x in row["topk_scores"] or []]),
                "uri": link(source.uri),
                "member": source.member,
            }
        )
    table = pa.Table.from_pylist(rows, schema=REVIEW_SCHEMA)
    buffer = io.BytesIO()
    if fmt == "csv":
        pacsv.write_csv(defused(table), buffer)
    else:
        pq.write_table(table, buffer)
    write_bytes_atomic(dest, buffer.getvalue())
    return dest
