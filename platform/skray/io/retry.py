"""Storage faults, told apart from bad data: what is retried, for how long, and what then.

Object storage fails for seconds at a time (503 SlowDown, resets, timeouts, an expired
token), and none of that says anything about an image. As Ray Data does
(``DataContext.retried_io_errors``, ``call_with_retry``), every storage call is retried with
exponential backoff and jitter within a budget (:class:`IoRetry`); what outlasts it raises
:class:`StorageUnavailable`, which a job reports as work not done, never as a row. A key that
is gone (deleted since the listing) is the one storage answer that is data: ``missing``.
"""

from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from skray.core.errors import SkrayError

T = TypeVar("T")

# What pyarrow's S3 errors (and the AWS SDK's) say when access itself is refused.
_DENIED = ("ACCESS_DENIED", "AccessDenied", "HTTP status 403", "HTTP status 401", "ExpiredToken")
_DENIED += ("InvalidAccessKeyId", "SignatureDoesNotMatch", "INVALID_ACCESS_KEY_ID")


# Errors that are answers, not faults: retrying cannot change them. (A local file's
# permissions are a setup mistake; S3's 403 comes as a plain OSError and is retried, since
# an expired token may be refreshed by then.)
_ANSWERS = (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class IoRetry(BaseModel):
    """The retry budget of one storage call (a GET, a stream's next piece, a PUT)."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(30, ge=1, description="tries of one call before it counts as failed")
    initial_backoff_s: float = Field(
        0.2, gt=0, description="the first wait; each next one doubles, with jitter"
    )
    max_backoff_s: float = Field(8.0, gt=0, description="the longest wait between two tries")
    total_s: float = Field(
        90.0, gt=0, description="seconds one call may keep retrying (rides out a 60 s outage)"
    )


class StorageUnavailable(SkrayError, OSError):  # noqa: N818 - the name says what happened
    """A storage call kept failing for its whole retry budget: the work is not done, and
    says nothing about the data."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # ``denied`` or ``unavailable``


def is_missing(err: BaseException) -> bool:
    """The object is not there: an answer about the data, not a fault."""
    return isinstance(err, FileNotFoundError)


def fault_reason(err: BaseException) -> str:
    """``denied`` for refused access or credentials, else ``unavailable``."""
    text = str(err)
    return "denied" if any(token in text for token in _DENIED) else "unavailable"


def call_with_retry(fn: Callable[[], T], what: str, policy: IoRetry | None = None) -> T:
    """``fn()``, retried on any ``OSError`` but a missing object and the other answers
    (raised as they are) until the
    budget is spent; then :class:`StorageUnavailable` naming ``what`` and the last error."""
    policy = policy or IoRetry()
    deadline = time.monotonic() + policy.total_s
    backoff = policy.initial_backoff_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except OSError as err:
            if is_missing(err) or isinstance(err, (*_ANSWERS, StorageUnavailable)):
                raise
            wait = random.uniform(backoff / 2, backoff)
            if attempt == policy.attempts or time.monotonic() + wait > deadline:
                raise StorageUnavailable(
                    f"{what}: storage kept failing for {attempt} tries: {err}", fault_reason(err)
                ) from err
            time.sleep(wait)
            backoff = min(backoff * 2, policy.max_backoff_s)
    raise AssertionError("unreachable")  # the loop returns or raises
