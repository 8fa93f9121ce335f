"""Two thread patterns the jobs share: reading ahead in order with a bounded window, and
handing an item to a bounded queue unless the reader has gone."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], in_flight: int) -> Iterator[R]:
    """``fn`` of each item, in order, at most ``in_flight`` running or done but unread: an
    executor's ``map`` submits everything at once, a future per item of a million."""
    with ThreadPoolExecutor(in_flight) as pool:
        running: deque = deque()
        for item in items:
            running.append(pool.submit(fn, item))
            if len(running) >= in_flight:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()


def put_unless_stopped(
    into: queue.Queue, item: object, stop: threading.Event, poll_s: float = 0.1
) -> bool:
    """Put ``item`` into the bounded queue ``into``, waiting for room until ``stop`` is set
    (the reader went away); False then, and the item is dropped."""
    while not stop.is_set():
        try:
            into.put(item, timeout=poll_s)
            return True
        except queue.Full:
            continue
    return False
