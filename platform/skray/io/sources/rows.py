"""The row every reader yields, one shape for all formats so the job handles them alike.

Rows carry ``key`` (stable id), ``data`` (the image bytes, or empty), ``error`` (a read
problem, or "") and ``meta`` (passed-through JSON, or ""); :mod:`.units` adds ``unit`` and
``unit_rows``. "No error" and "no metadata" are empty strings, not None: a column of only
None has no type, and Ray Data would turn it into NaNs. No object is read past
``max_object_bytes``: a larger one is a ``too_large`` error row.
"""

from __future__ import annotations

DEFAULT_MAX_OBJECT_BYTES = 64 * 2**20  # one image file, tar member or Parquet cell
# The error of the marker row a unit ends with when storage failed past its retry budget:
# the unit was not read, and is not committed (never a row about an image).
INCOMPLETE = "incomplete"


def make_row(key: str, data: bytes = b"", error: str = "", meta: str = "") -> dict:
    return {"key": key, "data": data, "error": error, "meta": meta}


def is_incomplete(error: str | None) -> bool:
    return bool(error) and error.startswith(INCOMPLETE + ":")


def too_large(what: str, size: int | str, max_bytes: int) -> str:
    return f"too_large: {what} is {size} bytes, over max_object_bytes={max_bytes}"
