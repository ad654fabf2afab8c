"""Dynamic batching: one thread runs a function on items gathered from many callers.

A worker serving several streams on one GPU gets far more frames per second when the
per-frame networks see a batch of frames instead of one at a time (a 512x512 decode at
batch 1 leaves most of an H100 idle). Streams submit items (one frame, or one motion
window) and get a Future per item; the batch thread takes up to `max_items` pending
items, and when fewer are pending it waits at most `max_wait_s` after the oldest one
arrived for more to come, so a lone stream is never held back by more than that wait.

With a `finish` function the batch runs in two stages: `run` only launches the work (on
a GPU: queues the kernels and an asynchronous copy to the host) and returns a handle;
a completion thread calls `finish(handle)` to wait for it and resolve the futures. The
batch thread meanwhile gathers and launches the next batch, so the GPU is not idle while
the host waits for, splits and hands out the previous one. At most `in_flight` launched
batches wait for completion (two: one running, one queued behind it).

Items carry a deadline (by default their arrival time) and run earliest deadline first:
a stream that submits frame k with deadline ``start + k / fps`` gets its first frames
ahead of another stream's later ones, so every stream keeps pace with realtime while the
GPU has the capacity (FIFO would let one stream's 70-frame window hold all others back).
A submission can also ask for a cut after its first item, so a new stream's first frame
runs in a small batch of its own and leaves early.

With `hold_s`, items submitted by a `holder` (a key naming who submits them, e.g. one
live stream) wait longer for company: while every pending item is a holder's but fewer
holders have one pending than submitted within the last `holder_ttl_s` (the holders that
take part in this round), the batch waits up to `hold_s` after the oldest item's arrival
(not just `max_wait_s`), and runs as soon as the last expected holder's item is in. An
item without a holder ends the wait (batch streams' windows are not held back). This is
for work whose cost hardly grows with the batch (an LMDM window batch of 8
takes about as long as one of 2): live sessions submit their windows in the same clock
tick but from different threads, spread over a few to tens of ms, and a 2 ms wait splits
them into several batches that each cost a full run. The wait does not depend on the
items' deadlines: when the worker falls behind, batching the round's windows together is
what lets it catch up (a rule that stopped holding once deadlines came near could turn a
small lag into a lasting one; docs/bench.md, live table F).

`run` must return one result per item, in order; if it raises, every item of that batch
gets the exception.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
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
        finish: Callable[[Any], Sequence[Result]] | None = None,
        in_flight: int = 2,
        hold_s: float = 0.0,
        holder_ttl_s: float = 0.0,
    ):
        if max_items < 1:
            raise ValueError(f"{name}: max_items must be >= 1, got {max_items}")
        if max_wait_s < 0:
            raise ValueError(f"{name}: max_wait_s must be >= 0, got {max_wait_s}")
        if hold_s < 0 or holder_ttl_s < 0:
            raise ValueError(f"{name}: hold_s and holder_ttl_s must be >= 0, got "
                             f"{hold_s}, {holder_ttl_s}")
        self.name = name
        self._run = run
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self.hold_s = hold_s
        self.holder_ttl_s = holder_ttl_s
        # Heap of (deadline, sequence, arrival, cut_after, holder, item, future).
        self._pending: list[tuple[float, int, float, bool, Hashable | None, Item,
                                  Future[Result]]] = []
        # Holder -> when it last submitted (monotonic s); entries older than holder_ttl_s
        # are dropped at the next submit.
        self._holders: dict[Hashable, float] = {}
        self._sequence = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        # Counters for benchmarks and logs: how full the batches actually were.
        self.batches = 0
        self.items = 0
        self._finish = finish
        self._in_flight = threading.BoundedSemaphore(max(1, in_flight))
        self._launched: queue.SimpleQueue[tuple[Any, list] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()
        self._completer: threading.Thread | None = None
        if finish is not None:
            self._completer = threading.Thread(
                target=self._complete_loop, name=f"batch-{name}-done", daemon=True
            )
            self._completer.start()

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def submit(
        self,
        items: Sequence[Item],
        deadlines: Sequence[float] | None = None,
        cut_after_first: bool = False,
        holder: Hashable | None = None,
    ) -> list[Future[Result]]:
        """Queue items; `deadlines` (time.monotonic() values, one per item) order them
        against other callers' items, default arrival time. With `cut_after_first`, the
        batch that takes the first item takes nothing after it; with a `holder` key, the
        items may wait up to `hold_s` for the other holders' items of the round (see the
        module docstring). Raises BatcherClosed after `close()`, ValueError when
        `deadlines` does not match `items`."""
        futures: list[Future[Result]] = [Future() for _ in items]
        now = time.monotonic()
        if deadlines is None:
            deadlines = [now] * len(items)
        elif len(deadlines) != len(items):
            raise ValueError(f"{len(items)} items but {len(deadlines)} deadlines")
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"{self.name} batcher is closed")
            if holder is not None:
                self._holders[holder] = now
                for key, seen in list(self._holders.items()):
                    if now - seen > self.holder_ttl_s:
                        del self._holders[key]
            for i, (item, fut, deadline) in enumerate(zip(items, futures, deadlines, strict=True)):
                cut = cut_after_first and i == 0
                heapq.heappush(
                    self._pending, (deadline, next(self._sequence), now, cut, holder, item, fut)
                )
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
        deadline = time.monotonic() + timeout_s
        for thread in (self._thread, self._completer):
            if thread is None:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s thread did not stop within %.0f s", thread.name, timeout_s)

    def _take(self) -> list[tuple[Item, Future[Result]]] | None:
        with self._cond:
            while True:
                if self._closed and not self._pending:
                    return None
                if self._pending:
                    head = self._pending[0]
                    if len(self._pending) >= self.max_items or self._closed or head[3]:
                        break
                    now = time.monotonic()
                    waited = now - min(entry[2] for entry in self._pending)
                    limit = self.max_wait_s
                    if self.hold_s > self.max_wait_s and self._awaits_holders(now):
                        limit = self.hold_s
                    if waited >= limit:
                        break
                    self._cond.wait(limit - waited)
                else:
                    # Nothing to do: sleep until a submit (bounded, to notice close()).
                    self._cond.wait(1.0)
            batch = []
            while self._pending and len(batch) < self.max_items:
                _, _, _, cut, _, item, fut = heapq.heappop(self._pending)
                batch.append((item, fut))
                if cut:
                    break
            return batch

    def _awaits_holders(self, now: float) -> bool:
        """Whether every pending item is a holder's while other holders of the round
        (those that submitted within `holder_ttl_s`) have not submitted theirs yet. An
        item without a holder (a batch stream's window) is never held back: it ends the
        wait. Called with the condition's lock held."""
        if any(e[4] is None for e in self._pending):
            return False
        pending = {e[4] for e in self._pending}
        expected = sum(1 for seen in self._holders.values() if now - seen <= self.holder_ttl_s)
        return len(pending) < expected

    def _loop(self) -> None:
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
                if not live:
                    continue
                if self._finish is None:
                    try:
                        results = self._run([item for item, _ in live])
                    except BaseException as exc:  # delivered to every caller of this batch
                        _fail(live, exc)
                        continue
                    self._deliver(live, results)
                    continue
                # Two stages: wait (bounded) for a completion slot, launch, hand over.
                while not self._in_flight.acquire(timeout=1.0):
                    log.debug("%s: waiting for a launched batch to complete", self.name)
                try:
                    handle = self._run([item for item, _ in live])
                except BaseException as exc:
                    self._in_flight.release()
                    _fail(live, exc)
                    continue
                self._launched.put((handle, live))
        finally:
            self._launched.put(None)  # lets the completion thread finish what was launched

    def _complete_loop(self) -> None:
        assert self._finish is not None
        while True:
            entry = self._launched.get()
            if entry is None:
                return
            handle, live = entry
            try:
                # Blocks until the device has finished this batch. A hung device shows up
                # to the callers as their own bounded waits on the futures timing out.
                results = self._finish(handle)
            except BaseException as exc:
                _fail(live, exc)
            else:
                self._deliver(live, results)
            finally:
                self._in_flight.release()

    def _deliver(self, live: list, results: Sequence[Result]) -> None:
        if len(results) != len(live):
            _fail(live, RuntimeError(
                f"{self.name}: batch of {len(live)} gave {len(results)} results"))
            return
        self.batches += 1
        self.items += len(live)
        for (_, fut), result in zip(live, results, strict=True):
            fut.set_result(result)


def _fail(live: list, exc: BaseException) -> None:
    """Deliver one exception to every caller of a batch."""
    for _, fut in live:
        fut.set_exception(exc)


def drain_futures(futures: Sequence[Future[Any]], timeout_s: float, what: str):
    """Yield each future's result in order, waiting at most `timeout_s` for each."""
    for fut in futures:
        try:
            yield fut.result(timeout=timeout_s)
        except TimeoutError:
            raise TimeoutError(f"{what} not ready within {timeout_s:.0f} s") from None
