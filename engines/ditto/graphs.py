"""CUDA graphs for fixed-shape calls: capture once per input shape, then replay.

The LMDM's DDIM loop is hundreds of tiny kernels per window (an 8-layer transformer on
80 tokens, 10-50 times, both guidance branches): on an H100 it is bound by kernel launches,
not by arithmetic. Replaying a captured graph issues the whole loop with one launch.
The warp + decode calls benefit less (they are compute-bound from batch ~4) but still
lose their launch gaps at small batches.

A `GraphedCall` wraps `fn(*tensors) -> tensor`. For each distinct tuple of input shapes
(dtypes and devices are fixed by the caller) it copies the inputs into static buffers,
replays the graph captured for that shape and returns a clone of the static output.
Graphs share one memory pool: they are replayed one at a time from one thread, and the
output is cloned before the next replay may overwrite it.

Without CUDA, or with `enabled=False`, it just calls `fn`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("avatard.engines.ditto")

WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS/cuDNN set-up)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class GraphedCall:
    def __init__(self, name: str, fn: Callable[..., torch.Tensor], enabled: bool,
                 max_graphs: int = 32):
        self.name = name
        self.fn = fn
        self.enabled = enabled and torch.cuda.is_available()
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._lock = threading.Lock()  # capture and replay from one thread at a time

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not inputs[0].is_cuda:
            return self.fn(*inputs)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        with self._lock:
            captured = self._graphs.get(key)
            if captured is None:
                if len(self._graphs) >= self.max_graphs:
                    return self.fn(*inputs)  # an unusual shape: not worth another graph
                captured = self._capture(key, inputs)
            for static, value in zip(captured.inputs, inputs, strict=True):
                static.copy_(value)
            captured.graph.replay()
            return captured.output.clone()

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        device = inputs[0].device
        statics = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.fn(*statics)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the worker (other streams' LMDM or extractors)
        # may use CUDA while this thread captures; "global" would make their calls fail.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = self.fn(*statics)
        captured = _Captured(graph, statics, output)
        self._graphs[key] = captured
        log.info("captured CUDA graph %s for shapes %s", self.name,
                 [shape for shape, _ in key])
        return captured
