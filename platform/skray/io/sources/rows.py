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
# Rows that earlier versions committed for a storage failure, not for the image: reads were not
# retried then, and an I/O error became an ``unreadable`` row (or a shard's ``broken_tar`` row
# naming the store's error). A rerun takes them out and reads their keys again.
EARLIER_IO_ERROR = (
    r"^unreadable:|^(broken_tar|unreadable_parquet):.*(AWS Error|HTTP status (403|5\d\d)"
    r"|curlCode|SlowDown|ExpiredToken|[Tt]imed out|Connection (reset|refused|aborted))"
)


def make_row(key: str, data: bytes = b"", error: str = "", meta: str = "") -> dict:
    return {"key": key, "data": data, "error": error, "meta": meta}


def incomplete_error(reason: str, message: str) -> str:
    """The marker row's error: ``incomplete: <reason>: <message>``."""
    return f"{INCOMPLETE}: {reason}: {message}"


def incomplete_reason(error: str | None) -> str | None:
    """``denied`` or ``unavailable`` for a marker row's error, None for any other row."""
    if not error or not error.startswith(INCOMPLETE + ":"):
        return None
    return error.split(":", 2)[1].strip()


def too_large(what: str, size: int | str, max_bytes: int) -> str:
    return f"too_large: {what} is {size} bytes, over max_object_bytes={max_bytes}"
