"""`avatard bench ipc`: move 512x512x3 uint8 frames producer process -> consumer process
three ways, in one run, and compare.

- ``shm``: the producer copies each frame into a shared-memory slot ring and sends a
  descriptor over ZeroMQ; the consumer maps the slot as a numpy view (no copy), reads it,
  and sends RELEASE back. This is avatard's local data plane.
- ``zmq_inline``: the frame bytes travel as a ZeroMQ message part (zero-copy send; the
  consumer wraps the received buffer with numpy). This is the remote-client path.
- ``mp_queue``: a pickled numpy array through `multiprocessing.Queue`, the prototype's way.

Both ZeroMQ consumers wait the way `avatard.ipc.client.Client` does (`wait_readable`: a
short spin, then a blocking poll).

Two phases per method: *throughput* (the producer sends as fast as back-pressure allows,
every copy and (de)serialisation included) and *handoff latency* (one frame in flight: from
the frame being ready in the producer's memory (for shm: written into its slot) to the
consumer holding a usable array). Both processes stamp time with
`time.perf_counter_ns()`, which reads CLOCK_MONOTONIC and so is comparable across processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zmq

from avatard.ipc.ring import READY, SlotRef, SlotRing
from avatard.ipc.sockets import wait_readable

from .timing import median, percentile

FRAME_SHAPE = (512, 512, 3)
WAIT_S = 30.0  # bound on every wait inside the benchmark
RELEASE_POLL_MS = 100  # one read of RELEASE messages while the ring is full


@dataclass
class MethodResult:
    frames: int
    frames_per_s: float
    gb_per_s: float
    p50_us: float
    p99_us: float
    latency_samples: int


def _frames(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8) for _ in range(count)]


def _check(array: np.ndarray, index: int) -> None:
    # Touch the data the way a consumer would (a cheap read of both ends of the frame).
    if array.shape != FRAME_SHAPE or array.dtype != np.uint8:
        raise RuntimeError(f"frame {index}: got {array.shape} {array.dtype}")
    int(array[0, 0, 0]) + int(array[-1, -1, -1])


# ----------------------------------------------------------------- shm ring + zmq


def _shm_producer(addr: str, ring_name_q: Any, frames: int, lat_frames: int, slots: int,
                  seed: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(addr)
    ring = SlotRing.create("bench", slots, int(np.prod(FRAME_SHAPE)))
    try:
        ring_name_q.put(ring.name)
        data = _frames(8, seed)

        def drain_releases(block_ms: int) -> None:
            if sock.poll(block_ms, zmq.POLLIN):
                while True:
                    try:
                        slot, seq = np.frombuffer(sock.recv(zmq.NOBLOCK), np.int64)
                    except zmq.Again:
                        return
                    ring.release(int(slot), int(seq))

        for phase, count in (("tput", frames), ("lat", lat_frames)):
            for i in range(count):
                # A full ring frees up only through the RELEASE messages on our socket, so
                # the wait reads them (blocking briefly) as soon as the ring is full.
                with ring.writing(FRAME_SHAPE, "uint8", WAIT_S, wait_step_s=0.0,
                                  on_wait=lambda: drain_releases(RELEASE_POLL_MS)) as pending:
                    # The write is the data plane's one copy (a worker renders into the
                    # slot); the handoff clock starts once the frame is in the slot.
                    np.copyto(pending.view, data[i % 8])
                    t0 = time.perf_counter_ns()
                ref = pending.ref
                assert ref is not None  # set when the block published the slot
                sock.send(np.array([ref.slot, ref.seq, t0, i], np.int64).tobytes())
                if phase == "lat":
                    drain_releases(int(WAIT_S * 1000))  # one frame in flight
                else:
                    drain_releases(0)
        sock.send(b"")  # end
        deadline = time.monotonic() + WAIT_S
        while ring.count(READY) and time.monotonic() < deadline:
            drain_releases(100)
    finally:
        ring.close()
        sock.close(linger=0)
        ctx.term()


def _shm_consumer(addr: str, ring_name_q: Any, result_q: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.bind(addr)
    ring = SlotRing.attach(ring_name_q.get(timeout=WAIT_S))
    stamps = []
    try:
        while True:
            if not wait_readable(sock, int(WAIT_S * 1000)):
                raise TimeoutError(f"shm consumer: no descriptor within {WAIT_S} s")
            msg = sock.recv()
            if not msg:
                break
            slot, seq, t0, index = (int(x) for x in np.frombuffer(msg, np.int64))
            array = ring.read(SlotRef(ring.name, slot, seq, FRAME_SHAPE, "uint8"))
            t1 = time.perf_counter_ns()
            _check(array, index)
            del array
            sock.send(np.array([slot, seq], np.int64).tobytes())
            stamps.append((t0, t1))
        result_q.put(stamps)
    finally:
        ring.close()
        sock.close(linger=0)
        ctx.term()


# ----------------------------------------------------------------- zmq inline


def _zmq_producer(addr: str, _unused: Any, frames: int, lat_frames: int, slots: int,
                  seed: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.SNDHWM, slots)  # the same amount of buffering as the ring
    sock.connect(addr)
    data = _frames(8, seed)
    try:
        for phase, count in (("tput", frames), ("lat", lat_frames)):
            for i in range(count):
                t0 = time.perf_counter_ns()
                head = np.array([t0, i, phase == "lat"], np.int64).tobytes()
                sock.send_multipart([head, data[i % 8]], copy=False)
                if phase == "lat":
                    if not sock.poll(int(WAIT_S * 1000)):
                        raise TimeoutError("zmq producer: no ack")
                    sock.recv()
        sock.send_multipart([b"", b""])
    finally:
        sock.close(linger=int(WAIT_S * 1000))
        ctx.term()


def _zmq_consumer(addr: str, _unused: Any, result_q: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.RCVHWM, 8)
    sock.bind(addr)
    stamps = []
    try:
        while True:
            if not wait_readable(sock, int(WAIT_S * 1000)):
                raise TimeoutError(f"zmq consumer: no frame within {WAIT_S} s")
            head, body = sock.recv_multipart(copy=False)
            if not head.bytes:
                break
            t0, index, latency_phase = (int(x) for x in np.frombuffer(head.buffer, np.int64))
            array = np.frombuffer(body.buffer, np.uint8).reshape(FRAME_SHAPE)
            t1 = time.perf_counter_ns()
            _check(array, index)
            stamps.append((t0, t1))
            if latency_phase:
                sock.send(b"k")
        result_q.put(stamps)
    finally:
        sock.close(linger=0)
        ctx.term()


# ----------------------------------------------------------------- multiprocessing.Queue


def _mpq_producer(q: Any, ack_q: Any, frames: int, lat_frames: int, slots: int,
                  seed: int) -> None:
    data = _frames(8, seed)
    for phase, count in (("tput", frames), ("lat", lat_frames)):
        for i in range(count):
            t0 = time.perf_counter_ns()
            q.put((t0, i, phase == "lat", data[i % 8]))
            if phase == "lat":
                ack_q.get(timeout=WAIT_S)
    q.put(None)


def _mpq_consumer(q: Any, ack_q: Any, result_q: Any) -> None:
    stamps = []
    while True:
        item = q.get(timeout=WAIT_S)
        if item is None:
            break
        t0, index, latency_phase, array = item
        t1 = time.perf_counter_ns()
        _check(array, index)
        stamps.append((t0, t1))
        if latency_phase:
            ack_q.put(1)
    result_q.put(stamps)


# ----------------------------------------------------------------- driver


def _run_pair(producer: Any, consumer: Any, frames: int, lat_frames: int, slots: int,
              seed: int, kind: str) -> MethodResult:
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    if kind == "mp_queue":
        a = ctx.Queue(maxsize=slots)  # same buffering as the ring
        b = ctx.Queue()
    else:
        a = f"ipc:///tmp/avatard-bench-{os.getpid()}-{kind}.sock"
        b = ctx.Queue()
    cons = ctx.Process(target=consumer, args=(a, b, result_q), daemon=True)
    cons.start()
    if kind != "mp_queue":
        time.sleep(0.3)  # let the consumer bind before the producer connects
    prod = ctx.Process(target=producer, args=(a, b, frames, lat_frames, slots, seed),
                       daemon=True)
    prod.start()
    try:
        stamps = result_q.get(timeout=WAIT_S * 4)
    finally:
        for proc in (prod, cons):
            proc.join(timeout=WAIT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if kind != "mp_queue":
            try:
                os.unlink(a[len("ipc://"):])
            except FileNotFoundError:
                pass
    if len(stamps) != frames + lat_frames:
        raise RuntimeError(f"{kind}: consumer saw {len(stamps)} frames, sent "
                           f"{frames + lat_frames}")
    tput = stamps[:frames]
    lat = stamps[frames:]
    elapsed_s = (tput[-1][1] - tput[0][0]) / 1e9
    frame_bytes = int(np.prod(FRAME_SHAPE))
    lat_us = [(t1 - t0) / 1e3 for t0, t1 in lat]
    return MethodResult(
        frames=frames,
        frames_per_s=frames / elapsed_s,
        gb_per_s=frames * frame_bytes / elapsed_s / 1e9,
        p50_us=median(lat_us),
        p99_us=percentile(lat_us, 99),
        latency_samples=len(lat_us),
    )


METHODS = {
    "shm": (_shm_producer, _shm_consumer),
    "zmq_inline": (_zmq_producer, _zmq_consumer),
    "mp_queue": (_mpq_producer, _mpq_consumer),
}


def run_ipc_bench(frames: int = 2000, latency_frames: int = 500, slots: int = 8,
                  seed: int = 0) -> dict[str, Any]:
    results = {}
    for name, (producer, consumer) in METHODS.items():
        results[name] = asdict(_run_pair(producer, consumer, frames, latency_frames, slots,
                                         seed, name))
    base = results["mp_queue"]["frames_per_s"]
    return {
        "frame_shape": list(FRAME_SHAPE),
        "frames": frames,
        "latency_frames": latency_frames,
        "slots": slots,
        "cpu_count": os.cpu_count(),
        **results,
        "ratios": {
            "shm_vs_mp_queue_frames_per_s": results["shm"]["frames_per_s"] / base,
            "zmq_inline_vs_mp_queue_frames_per_s": results["zmq_inline"]["frames_per_s"] / base,
            "mp_queue_p99_vs_shm_p99": results["mp_queue"]["p99_us"] / results["shm"]["p99_us"],
        },
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['frames']} frames of {'x'.join(map(str, report['frame_shape']))} uint8, "
        f"{report['slots']} slots in flight; latency over {report['latency_frames']} "
        "one-at-a-time handoffs",
        "",
        "| method | frames/s | GB/s | p50 handoff (us) | p99 handoff (us) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in METHODS:
        r = report[name]
        lines.append(f"| {name} | {r['frames_per_s']:,.0f} | {r['gb_per_s']:.2f} | "
                     f"{r['p50_us']:.1f} | {r['p99_us']:.1f} |")
    ratios = report["ratios"]
    lines += [
        "",
        f"shm vs mp_queue frames/s: {ratios['shm_vs_mp_queue_frames_per_s']:.1f}x; "
        f"zmq_inline vs mp_queue: {ratios['zmq_inline_vs_mp_queue_frames_per_s']:.1f}x; "
        f"mp_queue p99 / shm p99: {ratios['mp_queue_p99_vs_shm_p99']:.1f}x",
    ]
    return "\n".join(lines)

