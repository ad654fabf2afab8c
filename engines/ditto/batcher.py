"""Dynamic batching: one thread runs a function on items gathered from many callers.

A worker serving several streams on one GPU gets far more frames per second when the
per-frame networks see a batch of frames instead of one at a time (a 512x512 decode at
batch 1 leaves most of an H100 idle). Streams submit items (one frame, or one motion
window) and get a Future per item; the batch thread takes up to `max_items` pending
items, and when fewer are pending it waits at most `max_wait_s` after the oldest one
arrived for more to come, so a lone stream is never held back by more than that wait.

Items leave in submission order, so one stream's frames come back in order whatever the
other streams submit. `run` must return one result per item, in order; if it raises, every
item of that batch gets the exception.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

log = logging.getLogger("avatard.engines.ditto")

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatcherClosed(RuntimeError):
    """The batcher was closed before the item ran."""


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        name: str,
        run: Callable[[list[Item]], Sequence[Result]],
        max_items: int,
        max_wait_s: float,
    ):
        if max_items < 1:
            raise ValueError(f"{name}: max_items must be >= 1, got {max_items}")
        if max_wait_s < 0:
            raise ValueError(f"{name}: max_wait_s must be >= 0, got {max_wait_s}")
        self.name = name
        self._run = run
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self._pending: deque[tuple[float, Item, Future[Result]]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # Counters for benchmarks and logs: how full the batches actually were.
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def submit(self, items: Sequence[Item]) -> list[Future[Result]]:
        futures: list[Future[Result]] = [Future() for _ in items]
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"{self.name} batcher is closed")
            self._pending.extend((now, item, fut) for item, fut in zip(items, futures, strict=True))
            self._cond.notify()
        return futures

    def run_now(self, items: Sequence[Item]) -> list[Result]:
        """Submit and wait for every result (the caller's thread blocks; the batch thread
        may merge these items with other callers')."""
        return [f.result() for f in self.submit(items)]

    def close(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("%s batcher thread did not stop within %.0f s", self.name, timeout_s)

    def _take(self) -> list[tuple[float, Item, Future[Result]]] | None:
        with self._cond:
            while True:
                if self._closed and not self._pending:
                    return None
                if self._pending:
                    if len(self._pending) >= self.max_items or self._closed:
                        break
                    waited = time.monotonic() - self._pending[0][0]
                    if waited >= self.max_wait_s:
                        break
                    self._cond.wait(self.max_wait_s - waited)
                else:
                    # Nothing to do: sleep until a submit (bounded, to notice close()).
                    self._cond.wait(1.0)
            count = min(self.max_items, len(self._pending))
            return [self._pending.popleft() for _ in range(count)]

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [(item, fut) for _, item, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._run([item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(
                        f"{self.name}: batch of {len(live)} gave {len(results)} results"
                    )
            except BaseException as exc:  # delivered to every caller of this batch
                for _, fut in live:
                    fut.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(live)
            for (_, fut), result in zip(live, results, strict=True):
                fut.set_result(result)


def drain_futures(futures: Sequence[Future[Any]], timeout_s: float, what: str):
    """Yield each future's result in order, waiting at most `timeout_s` for each."""
    for fut in futures:
        try:
            yield fut.result(timeout=timeout_s)
        except TimeoutError:
            raise TimeoutError(f"{what} not ready within {timeout_s:.0f} s") from None
