"""`avatard bench overhead`: what the daemon adds to the fake avatar engine, side by side.

- ``direct``: `FakeAvatarEngine` in this process: open_stream, push the audio in the same
  chunks the worker uses (`lipsync_chunks`: one frame's audio, then `LIPSYNC_CHUNK_S`),
  finish. First frame = when the first push
  returns frames; wall = when finish returns.
- ``daemon``: the same engine options in a private `avatard serve` with one worker, one
  local client (shared-memory frames): a lipsync job with the same audio and seed, timed
  on the client from sending the request to the first frame and to `done`.

The two paths alternate (direct, daemon, direct, ...) so that load from other programs on
the machine hits both alike; the medians are compared. The engine's frame cost is
`frame_ms` (a sleep by default, so the figures do not depend on free CPU cores), which
both paths pay; the differences are the daemon's overhead: the request and its audio
through the input ring, the supervisor's accept and dispatch, the worker's copy of the
audio, every frame's copy into the frame ring and its descriptor's two hops, the client's
release of each slot.

Daemon-side timestamps from the `done` event split the first-frame difference:
``accepted_s`` (client: request sent -> `accepted` received), ``daemon_first_frame_s``
(supervisor: job accepted -> first frame forwarded), the rest is the last hop.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from avatard.daemon import PrivateDaemon
from avatard.engines.audio import LIPSYNC_CHUNK_S, lipsync_chunks
from avatard.ipc.client import Client, DoneEvent, FrameEvent

from .sweep import MIB, SAMPLE_RATE, audio_bytes, speech_like_pcm
from .timing import FrameClock, median

PER_FRAME_TARGET = 0.02  # the daemon may add at most 2 % to the time per frame
FIRST_FRAME_TARGET_S = 0.005  # and at most 5 ms to the first frame


def _run_figures(clock: FrameClock) -> dict[str, float]:
    wall = clock.elapsed_s()
    frames = clock.frames
    return {"frames": frames, "first_frame_s": clock.first_frame_s or 0.0, "wall_s": wall,
            "per_frame_s": wall / frames if frames else 0.0}


def _direct(engine: Any, state: Any, pcm: np.ndarray, seed: int) -> dict[str, float]:
    clock = FrameClock()
    stream = engine.open_stream(state, seed)
    for chunk in lipsync_chunks(pcm, engine.audio_rate, engine.fps):
        clock.frame(len(list(stream.push(chunk))))
    clock.frame(len(list(stream.finish())))
    return _run_figures(clock)


def _daemon(client: Client, pcm: np.ndarray, seed: int) -> dict[str, float]:
    clock = FrameClock()
    events = client.lipsync(pcm, SAMPLE_RATE, seed=seed)
    accepted = clock.elapsed_s()
    done: DoneEvent | None = None
    for event in events:
        if isinstance(event, FrameEvent):
            if event.index != clock.frames:
                raise RuntimeError(f"frame {event.index} arrived as number {clock.frames}")
            clock.frame()
        elif isinstance(event, DoneEvent):
            done = event
    figures = _run_figures(clock)
    if done is None or done.frames != clock.frames:
        raise RuntimeError(f"daemon job ended with {clock.frames} frames received, done says "
                           f"{done.frames if done else None}")
    return {**figures, "accepted_s": accepted, "daemon_first_frame_s": done.first_frame_s,
            "daemon_wall_s": done.wall_s}


def _median(runs: list[dict[str, float]], key: str) -> float:
    return median([r[key] for r in runs])


def _least(runs: list[dict[str, float]], key: str) -> float:
    """The fastest run: on a shared machine the least disturbed one, so the difference of
    the minima is the best estimate of the daemon's own cost (medians include the noise)."""
    return min(r[key] for r in runs)


def run_overhead(frame_ms: float = 40.0, seconds: float = 10.0, size: int = 512,
                 repeat: int = 5, seed: int = 1, frame_busy: bool = False) -> dict[str, Any]:
    from avatard.engines.fake import FakeAvatarEngine

    options = {"frame_ms": frame_ms, "width": size, "height": size, "frame_busy": frame_busy}
    pcm = speech_like_pcm(seconds, seed)
    engine = FakeAvatarEngine("cpu", options)
    state = engine.register(engine.default_portrait())
    direct: list[dict[str, float]] = []
    daemon: list[dict[str, float]] = []
    sections: dict[str, dict[str, Any]] = {
        "daemon": {"workers": 1, "min_ready": 1, "devices": "cpu"},
        "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
        "engines.options.fake": options}
    rings: dict[str, int] = {}
    if audio_bytes(seconds, SAMPLE_RATE) > MIB:  # a job's audio must fit one input slot
        rings["input_slot_bytes"] = -(-audio_bytes(seconds, SAMPLE_RATE) // MIB) * MIB
    if size * size * 3 > 512 * 512 * 3:  # a frame must fit one slot (default: 512 x 512)
        rings["frame_slot_bytes"] = size * size * 3
    if rings:
        sections["rings"] = rings
    with tempfile.TemporaryDirectory(prefix="avatard-overhead-") as tmp:
        d = PrivateDaemon(Path(tmp), sections)
        try:
            d.wait_for(lambda s: s["daemon"]["ready_workers"] == 1, 120, "the worker READY")
            with d.client(timeout_s=60 + 10 * seconds, name="overhead") as client:
                _daemon(client, pcm[: SAMPLE_RATE // 2], seed)  # warm-up, both paths
                _direct(engine, state, pcm[: SAMPLE_RATE // 2], seed)
                for _ in range(repeat):
                    direct.append(_direct(engine, state, pcm, seed))
                    daemon.append(_daemon(client, pcm, seed))
        finally:
            code = d.stop()
        if code != 0:
            raise RuntimeError(f"daemon exited with status {code}:\n{d.log_text()[-3000:]}")
    engine.close()
    result: dict[str, Any] = {
        "frame_ms": frame_ms, "frame_busy": frame_busy, "seconds": seconds, "size": size,
        "repeat": repeat, "chunk_s": LIPSYNC_CHUNK_S, "frames": direct[0]["frames"],
        "direct": {k: _median(direct, k) for k in ("first_frame_s", "wall_s", "per_frame_s")},
        "daemon": {k: _median(daemon, k) for k in ("first_frame_s", "wall_s", "per_frame_s",
                                                   "accepted_s", "daemon_first_frame_s",
                                                   "daemon_wall_s")},
        "min": {"direct": {k: _least(direct, k) for k in ("first_frame_s", "per_frame_s")},
                "daemon": {k: _least(daemon, k) for k in ("first_frame_s", "per_frame_s")}},
        "runs": {"direct": direct, "daemon": daemon},
    }
    dd, dm = result["direct"], result["daemon"]
    per_frame_added = dm["per_frame_s"] - dd["per_frame_s"]
    first_added = dm["first_frame_s"] - dd["first_frame_s"]
    result["added"] = {
        "per_frame_s": per_frame_added,
        "per_frame_pct": 100.0 * per_frame_added / dd["per_frame_s"] if dd["per_frame_s"]
        else None,
        "first_frame_s": first_added,
        "first_frame_last_hop_s": dm["first_frame_s"] - dm["accepted_s"]
        - dm["daemon_first_frame_s"],
        "min_per_frame_s": result["min"]["daemon"]["per_frame_s"]
        - result["min"]["direct"]["per_frame_s"],
        "min_first_frame_s": result["min"]["daemon"]["first_frame_s"]
        - result["min"]["direct"]["first_frame_s"],
    }
    result["targets"] = {
        "per_frame_pct_max": 100 * PER_FRAME_TARGET, "first_frame_s_max": FIRST_FRAME_TARGET_S,
        "per_frame_met": per_frame_added <= PER_FRAME_TARGET * dd["per_frame_s"],
        "first_frame_met": first_added <= FIRST_FRAME_TARGET_S,
    }
    return result


def format_overhead(r: dict[str, Any]) -> str:
    dd, dm, add, t = r["direct"], r["daemon"], r["added"], r["targets"]
    lines = [
        f"fake engine, {r['size']}x{r['size']} frames, frame_ms={r['frame_ms']:g} "
        f"({'busy' if r['frame_busy'] else 'sleep'}), {r['seconds']:g} s of audio = "
        f"{r['frames']} frames, pushed as one frame's audio then {r['chunk_s']:g} s chunks; "
        f"median of {r['repeat']} "
        "alternating runs",
        "",
        "| path | per frame (ms) | first frame (ms) | wall (s) |",
        "|---|---:|---:|---:|",
        f"| direct (in process) | {1e3 * dd['per_frame_s']:.3f} | "
        f"{1e3 * dd['first_frame_s']:.2f} | {dd['wall_s']:.3f} |",
        f"| daemon (1 worker, 1 local client) | {1e3 * dm['per_frame_s']:.3f} | "
        f"{1e3 * dm['first_frame_s']:.2f} | {dm['wall_s']:.3f} |",
        f"| added by the daemon | {1e3 * add['per_frame_s']:+.3f} "
        f"({add['per_frame_pct']:+.2f} %) | {1e3 * add['first_frame_s']:+.2f} | "
        f"{dm['wall_s'] - dd['wall_s']:+.3f} |",
        f"| added, fastest run of each path | {1e3 * add['min_per_frame_s']:+.3f} "
        f"({100 * add['min_per_frame_s'] / r['min']['direct']['per_frame_s']:+.2f} %) | "
        f"{1e3 * add['min_first_frame_s']:+.2f} | |",
        "",
        f"targets: per frame < {t['per_frame_pct_max']:g} %: "
        f"{'met' if t['per_frame_met'] else 'MISSED'}; first frame < "
        f"{1e3 * t['first_frame_s_max']:g} ms: {'met' if t['first_frame_met'] else 'MISSED'}",
        f"daemon first frame split: request -> accepted {1e3 * dm['accepted_s']:.2f} ms, "
        f"accepted -> first frame forwarded (supervisor clock) "
        f"{1e3 * dm['daemon_first_frame_s']:.2f} ms, last hop "
        f"{1e3 * add['first_frame_last_hop_s']:.2f} ms (medians)",
    ]
    return "\n".join(lines)
