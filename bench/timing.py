"""Timers and summary figures shared by the benches.

- `median`, `percentile`: one definition for every bench (numpy's linear interpolation);
  an empty sample gives None, which the reports print as "-".
- `time_calls`: warm-up calls, then timed calls of a function that may run on a GPU: CUDA
  events around each call, or wall clock around a synchronised call.
- `FrameClock`: first-frame latency and wall time of one stream of frames.

Wall clocks are `time.perf_counter()` (monotonic). Importing this module imports no
torch; `time_calls` and `sync` import it only for a CUDA device.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def median(values: Sequence[float]) -> float | None:
    """The median of `values` (mean of the two middle ones for an even count), or None
    for no values."""
    return float(statistics.median(values)) if len(values) else None


def percentile(values: Sequence[float], q: float, ndigits: int | None = None) -> float | None:
    """The `q`-th percentile (0..100) of `values`, interpolated linearly between the two
    nearest samples (numpy's default), rounded to `ndigits` when given; None for no
    values. Raises ValueError for q outside 0..100."""
    if not len(values):
        return None
    value = float(np.percentile(values, q))
    return value if ndigits is None else round(value, ndigits)


def sync(device: str) -> None:
    """Wait for the work queued on `device` ("cuda", "cuda:1"; nothing to wait for on
    "cpu")."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class CallTimes:
    """What `time_calls` measured: each timed call's milliseconds, and the last output."""

    times_ms: list[float]
    output: Any

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.times_ms))


def time_calls(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 0,
               cuda_events: bool = True) -> CallTimes:
    """Call `fn()` `warmup` times untimed, wait for the device, then `repeats` times timed.

    On a CUDA `device` with `cuda_events`, CUDA events around each call (the host waits for
    each call's end event before the next call). Otherwise wall clock around each call plus
    a `sync(device)`, so queued GPU work is inside the time. Times are milliseconds.
    Raises ValueError when `repeats` < 1; exceptions of `fn` propagate.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    output = None
    for _ in range(warmup):
        output = fn()
    sync(device)
    times_ms: list[float] = []
    if cuda_events and device.startswith("cuda"):
        import torch

        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            output = fn()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            started = time.perf_counter()
            output = fn()
            sync(device)
            times_ms.append((time.perf_counter() - started) * 1e3)
    return CallTimes(times_ms, output)


class FrameClock:
    """Timings of one stream of frames: start it, call `frame()` for each frame in hand,
    then read `first_frame_s` (None before the first frame) and `elapsed_s()`; seconds
    since the clock was made."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_frame_s: float | None = None
        self.frames = 0

    def elapsed_s(self) -> float:
        """Seconds since the clock started."""
        return time.perf_counter() - self.started

    def frame(self, count: int = 1) -> None:
        """Count `count` frames arriving now; the first arrival sets `first_frame_s`."""
        if count > 0 and self.first_frame_s is None:
            self.first_frame_s = self.elapsed_s()
        self.frames += count
