"""skray.inference.batching.Batcher: the next batch is taken when the model is free, so it holds
everything that queued while the previous one ran."""

from __future__ import annotations

import asyncio
import threading

import pytest

from skray.inference.batching import Batcher

pytestmark = pytest.mark.timeout(30)


class GatedModel:
    """Doubles its inputs; the first call blocks until ``release`` so requests queue behind it."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.started, self.gate = threading.Event(), threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        self.started.set()
        self.gate.wait(10)
        if any(i < 0 for i in items):
            raise ValueError("negative input")
        return [2 * i for i in items]


async def submit_while_busy(batcher: Batcher, model: GatedModel, later: list[int]) -> list:
    """Submit 0, and ``later`` one by one while the model runs 0's batch; then let it go."""
    first = asyncio.create_task(batcher.submit(0))
    while not model.started.is_set():
        await asyncio.sleep(0.001)
    queued = []
    for i in later:
        queued.append(asyncio.create_task(batcher.submit(i)))
        await asyncio.sleep(0)  # each arrives on its own, as HTTP requests do
    model.gate.set()
    return await asyncio.gather(first, *queued, return_exceptions=True)


def test_requests_that_queue_while_a_batch_runs_share_the_next_batch():
    model = GatedModel()
    batcher = Batcher(model, max_batch_size=8, wait_timeout_s=0)
    results = asyncio.run(submit_while_busy(batcher, model, list(range(1, 6))))
    assert model.calls == [[0], [1, 2, 3, 4, 5]]
    assert [r for r, _ in results] == [0, 2, 4, 6, 8, 10]
    assert [t.size for _, t in results] == [1, 5, 5, 5, 5, 5]
    assert all(t.queue_s >= 0 and t.forward_s >= 0 for _, t in results)


def test_a_batch_never_exceeds_max_batch_size():
    model = GatedModel()
    batcher = Batcher(model, max_batch_size=4, wait_timeout_s=0)
    asyncio.run(submit_while_busy(batcher, model, list(range(1, 7))))
    assert model.calls == [[0], [1, 2, 3, 4], [5, 6]]


def test_a_failing_batch_fails_its_own_requests_and_the_next_batch_still_runs():
    model = GatedModel()
    batcher = Batcher(model, max_batch_size=2, wait_timeout_s=0)
    results = asyncio.run(submit_while_busy(batcher, model, [1, -1, 3]))
    assert results[0][0] == 0
    assert all(isinstance(r, ValueError) for r in results[1:3])
    assert results[3][0] == 6
