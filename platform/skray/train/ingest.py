"""The watchdog on a worker's input batches: a stalled Ray Data pipeline fails the run,
saying why, instead of hanging it silently.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator

from skray.core.concurrency import put_unless_stopped


class IngestStalledError(RuntimeError):
    """No batch came from the input pipeline for ``data.stall_timeout_s``."""


def stall_guarded(batches: Iterable, timeout_s: float, what: str) -> Iterator:
    """``batches``, read one thread ahead (at most two waiting), raising
    :class:`IngestStalledError` when the next one does not come within ``timeout_s``:
    a pipeline that stalls says so and fails the run instead of hanging silently."""
    items: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def offer(item: tuple[str, Any]) -> bool:
        return put_unless_stopped(items, item, stop, poll_s=0.2)

    def produce() -> None:
        try:
            for batch in batches:
                if not offer(("batch", batch)):
                    return
            offer(("end", None))
        except BaseException as err:  # noqa: BLE001 - raised again where the batches are used
            offer(("error", err))

    threading.Thread(target=produce, name=f"skray-{what}-batches", daemon=True).start()
    try:
        while True:
            try:
                kind, value = items.get(timeout=timeout_s)
            except queue.Empty:
                raise IngestStalledError(
                    f"no {what} batch for {timeout_s:g} s (data.stall_timeout_s): the input "
                    "pipeline is stalled. Most often its read+decode tasks (data.decode_cpus CPUs "
                    "each) find no CPU left beside the training workers (scaling.workers x "
                    "scaling.cpus_per_worker): `ray status` shows them under Pending Demands. "
                    "Lower those or add CPUs; raise data.stall_timeout_s if the batches are only "
                    "slow."
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
