"""`avatard bench encode`: what one video encode of a live session costs the gateway.

`avatard web --shared-encode` (and `--nvenc`) encodes each session's video once for all
its viewers with `web.feed.SharedEncoder`; this bench runs that encoder on its own, in
this process, over a talking-head-like clip: the built-in 512x512 portrait moved a few
pixels per frame (a head that sways over a still background, as the avatar engines
make), `frames` frames at `fps`, a keyframe every 2 s as the gateway asks. Per encoder:
CPU time per frame (this process's `time.process_time()`, so a hardware encoder's
driver threads count), wall time per frame, the bitrate it produced, and the share of
one core it takes at `fps`. An encoder that cannot open here (h264_nvenc without an
NVIDIA GPU) is reported with the reason instead of figures.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

DEFAULT_ENCODERS = ("vp8", "h264", "h264_nvenc")  # keys of web.feed.SHARED_CODECS
WARMUP_FRAMES = 10  # encoded first, untimed: encoder start-up is not per-frame cost
SWAY_PX = 6.0  # amplitude of the clip's motion, in pixels


def sway_clip(frames: int, size: int = 512) -> list[np.ndarray]:
    """`frames` RGB uint8 (size, size, 3) frames: the built-in portrait (scaled to `size`)
    shifted by up to SWAY_PX pixels on slow sinusoids, edges repeated."""
    from PIL import Image

    from avatard.engines.embedded.avatar import default_portrait

    portrait = default_portrait()
    if portrait.shape[0] != size:
        portrait = np.asarray(Image.fromarray(portrait).resize((size, size)))
    pad = math.ceil(SWAY_PX)
    padded = np.pad(portrait, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    clip = []
    for i in range(frames):
        dx = round(SWAY_PX * math.sin(i / 11.0))
        dy = round(SWAY_PX * 0.5 * math.sin(i / 17.0 + 1.0))
        clip.append(np.ascontiguousarray(
            padded[pad + dy:pad + dy + size, pad + dx:pad + dx + size]))
    return clip


def time_encoder(name: str, clip: list[np.ndarray], fps: int) -> dict[str, Any]:
    """Encode `clip` with the gateway's shared encoder `name` (a SHARED_CODECS key):
    {"encoder", "cpu_ms_per_frame", "wall_ms_per_frame", "mbit_per_s",
    "core_share_at_fps"}, or {"encoder", "unavailable": reason} when it does not open."""
    import av

    from avatard.web.feed import SharedEncoder, nvenc_unavailable

    if name == "h264_nvenc" and (why := nvenc_unavailable(clip[0].shape[1],
                                                           clip[0].shape[0])) is not None:
        return {"encoder": name, "unavailable": why}
    height, width = clip[0].shape[:2]
    try:
        encoder = SharedEncoder(name, width, height, fps)
        frames = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
                  for f in clip]
        for frame in frames[:WARMUP_FRAMES]:
            encoder._encode(frame, False)
    except Exception as exc:  # noqa: BLE001 - PyAV's errors when an encoder cannot run
        return {"encoder": name, "unavailable": f"{type(exc).__name__}: {exc}"}
    keyframe_every = 2 * fps
    size = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i, frame in enumerate(frames):
        size += sum(packet.size for packet in encoder._encode(frame, i % keyframe_every == 0))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = len(frames)
    return {"encoder": name, "cpu_ms_per_frame": round(1000 * cpu / n, 3),
            "wall_ms_per_frame": round(1000 * wall / n, 3),
            "mbit_per_s": round(size * 8 * fps / n / 1e6, 3),
            "core_share_at_fps": round(cpu / n * fps, 4)}


def run_encode_bench(encoders: list[str], frames: int, fps: int = 25, size: int = 512
                     ) -> dict[str, Any]:
    """Every encoder of `encoders` over the same clip. Raises ValueError for an encoder
    the gateway does not have."""
    from avatard.web.feed import SHARED_CODECS

    unknown = [e for e in encoders if e not in SHARED_CODECS]
    if unknown:
        raise ValueError(f"--encoders: {', '.join(unknown)}: not one of "
                         f"{', '.join(SHARED_CODECS)}")
    clip = sway_clip(frames, size)
    return {"frames": frames, "fps": fps, "size": size,
            "results": [time_encoder(name, clip, fps) for name in encoders]}


def format_encode(report: dict[str, Any]) -> str:
    """The report as a text table, one row per encoder."""
    lines = [f"{report['frames']} frames of {report['size']}x{report['size']} at "
             f"{report['fps']} fps (the built-in portrait, swaying)",
             f"{'encoder':<12} {'CPU ms/frame':>13} {'wall ms/frame':>14} {'Mb/s':>7} "
             f"{'core at fps':>12}"]
    for r in report["results"]:
        if "unavailable" in r:
            lines.append(f"{r['encoder']:<12} unavailable: {r['unavailable']}")
        else:
            lines.append(f"{r['encoder']:<12} {r['cpu_ms_per_frame']:>13.2f} "
                         f"{r['wall_ms_per_frame']:>14.2f} {r['mbit_per_s']:>7.2f} "
                         f"{r['core_share_at_fps']:>11.1%}")
    return "\n".join(lines)
