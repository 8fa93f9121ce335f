"""The request bodies a replica holds at once, bounded: past the bound a request is answered
503 with ``Retry-After`` before its body is read, so a burst of large uploads cannot grow a
replica to the OOM killer (Serve admits ``max_ongoing_requests`` of them at a time)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from skray.serve.api import ApiError

RETRY_AFTER_S = 1


class BodyBudget:
    """Bytes of bodies held, claimed by a request as it learns them (its ``Content-Length`` up
    front, else chunk by chunk) and given back when it is answered. One replica's event loop
    runs every claim, so no lock is needed."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.held = max_bytes, 0

    @contextmanager
    def claim(self) -> Iterator[Claim]:
        claim = Claim(self)
        try:
            yield claim
        finally:
            self.held -= claim.bytes


class Claim:
    """One request's share of a :class:`BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.bytes = budget, 0

    def grow_to(self, size: int) -> None:
        """Hold ``size`` bytes in all, or refuse with 503 when the replica holds too many."""
        more = size - self.bytes
        if more <= 0:
            return
        if self.budget.held + more > self.budget.max_bytes:
            raise ApiError(
                503,
                "overloaded",
                f"this replica holds {self.budget.held} bytes of uploads "
                f"(max_inflight_bytes={self.budget.max_bytes}): retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.budget.held += more
        self.bytes = size
