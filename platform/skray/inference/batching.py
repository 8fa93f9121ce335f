"""Dynamic batching that takes a batch when the model is free, so batches fill under load.

Ray Serve's ``@serve.batch`` (2.60) forms the next batch while the current one runs: it takes
the first queued request plus whatever arrives within ``batch_wait_timeout_s`` and parks that
batch on a semaphore until the model is free. When a forward pass takes a second (CPU) and
requests trickle in, the batches it parks are a few images each, and they run one after
another: at concurrency 16 the mean batch was about 4 of 16. Here one loop owns the model:
while a batch runs, requests queue; when it returns, the next batch is everything queued (up to
``max_batch_size``), topped up for at most ``wait_timeout_s`` if short.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class BatchTiming:
    """Where one item's time went once it was queued for the model."""

    size: int  # items in the forward pass it shared
    queue_s: float  # queued until its batch started
    forward_s: float  # the batch's call to ``run``


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    queued_at: float
    future: asyncio.Future


class Batcher(Generic[Item, Result]):
    """Calls the blocking ``run`` in a worker thread on batches of submitted items, one at a time.

    ``run`` maps a list of items to one result per item, in order; if it raises, every item of
    that batch gets the exception. A submitter that is cancelled (client gone) drops out of
    the batch it was waiting for.
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Sequence[Result]],
        max_batch_size: int,
        wait_timeout_s: float,
    ) -> None:
        self.run, self.max_batch_size, self.wait_timeout_s = run, max_batch_size, wait_timeout_s
        self._queue: asyncio.Queue[_Pending[Item, Result]] | None = None
        self._loop_task: asyncio.Task | None = None

    async def submit(self, item: Item) -> tuple[Result, BatchTiming]:
        """The item's result and how it was batched, once a batch holding it has run."""
        if self._loop_task is None:  # created on the loop that serves requests
            self._queue = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._batches())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, time.perf_counter(), future))
        return await future

    async def _next_batch(self) -> list[_Pending[Item, Result]]:
        """Everything queued (up to the maximum); if that is short, what arrives within the
        timeout."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.wait_timeout_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.done()]

    async def _batches(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.run, [p.item for p in batch])
            except Exception as err:  # noqa: BLE001 - the batch's requests get it; the loop carries on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            forward_s = time.perf_counter() - started
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(
                        (result, BatchTiming(len(batch), started - p.queued_at, forward_s))
                    )
