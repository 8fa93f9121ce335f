"""The row every reader yields, one shape for all formats so the job handles them alike.

Rows carry ``key`` (stable id), ``data`` (the image bytes, or empty), ``reason`` and
``error`` (a read problem: its documented code, and ``code: message``; or "") and ``meta``
(passed-through JSON, or ""); :mod:`.units` adds ``unit`` and ``unit_rows``. "No error" and
"no metadata" are empty strings, not None: a column of only None has no type, and Ray Data
would turn it into NaNs. No object is read past ``max_object_bytes``: a larger one is a
``too_large`` error row.
"""

from __future__ import annotations

from dataclasses import dataclass

from skray.core.errors import IMAGE_REASONS, one_line
from skray.io.storage import redact_uri

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


@dataclass(frozen=True)
class RowError:
    """Why a row holds no image: a documented ``reason`` code, chosen by the code that met the
    problem (never parsed out of a message), and a ``message`` for people.

    Only codes reach a Prometheus tag or an MLflow metric name, so series stay bounded and
    names valid; ``str()`` is the row's ``error``: ``code: message``, the message on one capped
    line (:func:`~skray.core.errors.one_line`)."""

    reason: str
    message: str

    def __post_init__(self) -> None:
        if self.reason not in ROW_REASONS and self.reason != INCOMPLETE:
            raise ValueError(f"{self.reason!r} is not a documented row reason: {ROW_REASONS}")

    def __str__(self) -> str:
        return f"{self.reason}: {one_line(self.message)}"


def make_row(key: str, data: bytes = b"", error: RowError | None = None, meta: str = "") -> dict:
    return {
        "key": key,
        "data": data,
        "reason": error.reason if error else "",
        "error": str(error) if error else "",
        "meta": meta,
    }


def missing(uri: str) -> RowError:
    return RowError("missing", f"{redact_uri(uri)} is gone since the listing")


def incomplete_error(reason: str, message: str) -> RowError:
    """The marker row's error: ``incomplete: <reason>: <message>``."""
    return RowError(INCOMPLETE, f"{reason}: {message}")


def incomplete_reason(error: str | None) -> str | None:
    """``denied`` or ``unavailable`` for a marker row's error, None for any other row."""
    if not error or not error.startswith(INCOMPLETE + ":"):
        return None
    return error.split(":", 2)[1].strip()


def too_large(what: str, size: int | str, max_bytes: int) -> RowError:
    return RowError("too_large", f"{what} is {size} bytes, over max_object_bytes={max_bytes}")
