"""The row every reader yields, one shape for all formats so the job handles them alike.

Rows carry ``key`` (stable id), ``data`` (the image bytes, or empty), ``error`` (a read
problem, or "") and ``meta`` (passed-through JSON, or ""); :mod:`.units` adds ``unit`` and
``unit_rows``. "No error" and "no metadata" are empty strings, not None: a column of only
None has no type, and Ray Data would turn it into NaNs. No object is read past
``max_object_bytes``: a larger one is a ``too_large`` error row.
"""

from __future__ import annotations

from skray.core.images import REASONS as IMAGE_REASONS

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


# The documented reason codes a row's error starts with (README "Bad data"): the image's
# (skray.core.images) and the sources'. Only these ever reach a Prometheus tag or an MLflow
# metric name, so series stay bounded and names valid.
SOURCE_REASONS = (
    "unreadable",
    "too_large",
    "tar_member_not_regular",
    "unsafe_member_name",
    "broken_tar",
    "split_sample",
    "no_image_member",
    "empty_shard",
    "unreadable_parquet",
    "bad_image_column",
    "missing",
)
ROW_REASONS = IMAGE_REASONS + SOURCE_REASONS
MESSAGE_MAX_CHARS = 300  # of the message after a row error's code


def error_code(error: str) -> str:
    """A row error's reason code: its prefix when that is a documented code (or the
    ``incomplete`` marker), else ``undecodable``: nothing a file holds can make a new one."""
    code = error.split(":", 1)[0].strip()
    return code if code in ROW_REASONS or code == INCOMPLETE else "undecodable"


def clean_error(error: str | None) -> str | None:
    """``code: message`` with a documented code and a single-line message of at most
    MESSAGE_MAX_CHARS (a member name can hold newlines, an exception a page of text)."""
    if not error:
        return error
    code = error_code(error)
    prefix, sep, rest = error.partition(":")
    message = " ".join((rest if sep and prefix.strip() == code else error).split())
    if len(message) > MESSAGE_MAX_CHARS:
        message = message[: MESSAGE_MAX_CHARS - 1] + "…"
    return f"{code}: {message}"


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
