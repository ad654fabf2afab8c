"""`avatard bench ditto-engine`: the Ditto engine's own speed, in one process, no daemon.

What a worker spends per job, split so each optimisation can be judged on its own:

- ``lmdm``: one 80-frame LMDM window (DDIM, both guidance branches) per window, at
  several window batch sizes, with CUDA graphs on and off;
- ``render``: warp + decode + paste-back + host copy per frame at several frame batches;
- ``offline``: one stream, the whole clip pushed at once: RTF and time to first frame;
- ``streams``: S streams in S threads sharing the engine's batchers (what one worker
  serving S jobs does): aggregate frames/s, per-stream RTF, first-frame latency.

Timings are wall clock around synchronised calls, medians of repeats. The weights are
random (``weights = "random"``) unless --checkpoints is given: the output says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .timing import FrameClock, median, time_calls


def _median_s(fn, repeats: int, device: str) -> float:
    """Median seconds of a synchronised call after one warm call (which also captures
    the CUDA graphs, where they are on)."""
    return time_calls(fn, device, repeats, warmup=1, cuda_events=False).median_ms / 1e3


def speech(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """Speech-like noise bursts (content does not matter with random weights)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    envelope = (np.sin(np.arange(n) / rate * 2 * np.pi * 3) > 0).astype(np.float32)
    return (rng.normal(0, 0.1, n).astype(np.float32) * envelope).clip(-1, 1)


def bench_lmdm(engine, windows: list[int], repeats: int) -> list[dict[str, Any]]:
    seq, dim = engine.lmdm.seq_frames, engine.lmdm.motion_feat_dim
    rng = np.random.default_rng(0)
    item = (
        rng.normal(size=dim).astype(np.float32),
        rng.normal(size=(seq, 1059)).astype(np.float32),
        rng.normal(size=(seq, dim)).astype(np.float32),
        rng.normal(size=(engine.noise_steps, seq, dim)).astype(np.float32),
    )
    rows = []
    for graphs in (True, False) if engine.cuda_graphs else (False,):
        saved = engine._ddim.enabled
        engine._ddim.enabled = graphs
        for b in windows:
            s = _median_s(lambda b=b: engine._sample_items([item] * b), repeats, engine.device)
            rows.append({"part": "lmdm", "graphs": graphs, "batch": b,
                         "ms_per_call": s * 1e3, "ms_per_window": s * 1e3 / b})
        engine._ddim.enabled = saved
    return rows


def bench_render(engine, avatar, batches: list[int], repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    rows = []
    for b in batches:
        items = [(avatar, avatar.x_s[0] + rng.normal(0, 0.01, (21, 3)).astype(np.float32))
                 for _ in range(b)]
        s = _median_s(lambda items=items: engine._render_items(items), repeats, engine.device)
        rows.append({"part": "render", "batch": b, "ms_per_call": s * 1e3,
                     "ms_per_frame": s * 1e3 / b})
    return rows


def run_stream(engine, state, pcm: np.ndarray, seed: int, start: threading.Barrier | None,
               chunk_s: float | None = None) -> dict[str, Any]:
    """One job: push the audio (whole, or in chunks), take every frame; timings."""
    if start is not None:
        start.wait(timeout=600)
    clock = FrameClock()
    stream = engine.open_stream(state, seed)
    step = len(pcm) if chunk_s is None else int(chunk_s * 16000)
    for i in range(0, len(pcm), step):
        for _ in stream.push(pcm[i : i + step]):
            clock.frame()
    for _ in stream.finish():
        clock.frame()
    wall = clock.elapsed_s()
    media = len(pcm) / 16000
    return {"frames": clock.frames, "wall_s": wall, "media_s": media, "rtf": wall / media,
            "first_frame_s": clock.first_frame_s}


def bench_streams(engine, state, counts: list[int], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for s in counts:
        barrier = threading.Barrier(s)
        results: list[dict[str, Any]] = [{}] * s

        def job(i: int, barrier=barrier, results=results) -> None:
            results[i] = run_stream(engine, state, speech(seconds, 100 + i), i, barrier)

        threads = [threading.Thread(target=job, args=(i,)) for i in range(s)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=3600)
        wall = time.perf_counter() - t0
        frames = sum(r["frames"] for r in results)
        rtfs = [r["rtf"] for r in results]
        firsts = [r["first_frame_s"] for r in results]
        rows.append({"part": "streams", "streams": s, "seconds": seconds,
                     "frames_per_s": frames / wall, "rtf_p50": median(rtfs),
                     "rtf_max": max(rtfs), "first_frame_p50_s": median(firsts),
                     "first_frame_max_s": max(firsts),
                     "mean_frame_batch": engine._frame_batcher.mean_batch,
                     "mean_window_batch": engine._window_batcher.mean_batch})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avatard bench ditto-engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoints", help="official checkpoint folder (default: random)")
    parser.add_argument("--option", action="append", default=[], metavar="K=V",
                        help="engine option (JSON value), e.g. dtype=\"bfloat16\"")
    parser.add_argument("--lmdm-batches", default="1,4,16")
    parser.add_argument("--render-batches", default="1,4,8,16")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--parts", default="lmdm,render,offline,streams")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    from avatard.engines.ditto.engine import RANDOM_NOTE, DittoEngine

    options: dict[str, Any] = {"weights": args.checkpoints or "random"}
    for kv in args.option:
        key, _, value = kv.partition("=")
        options[key] = json.loads(value)
    if options["weights"] == "random":
        print(f"*** {RANDOM_NOTE}: benchmark of compute only; the frames are noise ***")
    t0 = time.perf_counter()
    engine = DittoEngine(args.device, options)
    load_s = time.perf_counter() - t0
    state = engine.register(engine.default_portrait())
    parts = set(args.parts.split(","))
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    record: dict[str, Any] = {
        "weights": options["weights"], "options": options, "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "",
        "torch": torch.__version__, "load_s": load_s, "report": engine.report().notes,
        "rows": [],
    }
    rows = record["rows"]
    if "lmdm" in parts:
        rows += bench_lmdm(engine, ints(args.lmdm_batches), args.repeats)
    if "render" in parts:
        rows += bench_render(engine, state.payload, ints(args.render_batches), args.repeats)
    if "offline" in parts:
        run_stream(engine, state, speech(2.0, 0), 0, None)  # warm the stream path
        runs = [run_stream(engine, state, speech(args.seconds, 1), 1, None) for _ in range(3)]
        rows.append({"part": "offline", "seconds": args.seconds,
                     "rtf_p50": median([r["rtf"] for r in runs]),
                     "first_frame_p50_s": median([r["first_frame_s"] for r in runs]),
                     "frames": runs[0]["frames"]})
    if "streams" in parts:
        rows += bench_streams(engine, state, ints(args.streams), args.seconds)
    if args.device.startswith("cuda"):
        record["max_memory_mib"] = torch.cuda.max_memory_allocated(args.device) / 2**20
    engine.close()
    for row in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    if options["weights"] == "random":
        print(f"*** {RANDOM_NOTE} ***")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
