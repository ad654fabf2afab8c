"""Fidelity and speed of the Ditto networks on a GPU.

    python -m avatard.engines.ditto.gpu_check --vectors ../shared/ditto/vectors

1. `verify` in float32 (TF32 off, tolerance 1e-4), bfloat16 and float16 (errors reported,
   judged against --bf16-tolerance) on the device.
2. On CUDA: per-network latency (warm-up, `torch.cuda.synchronize`, median of repeats)
   in float32, TF32, bfloat16 and float16, per call and per video frame, at several batch sizes
   for the per-frame networks, plus peak memory. On CPU the timing part is skipped.

Prints a table and, with --json, writes all numbers to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from . import networks
from .synthetic import find_constants
from .verify import verify


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Temporarily allow or forbid TF32 in cuDNN convolutions and cuBLAS matmuls."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def median_ms(fn: Callable[..., object], args: tuple, warmup: int, repeats: int) -> float:
    """Median wall time of fn(*args) in ms, with the GPU queue drained around each call."""
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class _Timer:
    """Latency rows for one precision. Weights are the synthetic ones: speed does not
    depend on the values, and these are at hand."""

    def __init__(
        self, vectors: Path, manifests: Path, device: str, precision: str, warmup: int, repeats: int
    ):
        self.device = device
        self.precision = precision
        self.dtype = networks.DTYPES["float32" if precision == "tf32" else precision]
        self.source = networks.SyntheticSource(manifests, find_constants(manifests, vectors))
        self.warmup, self.repeats = warmup, repeats
        self.gen = torch.Generator(device="cpu").manual_seed(0)
        self.rows: list[dict] = []

    def load(self, name: str) -> torch.nn.Module:
        return networks.synthetic_module(name, self.source, self.device, self.dtype)

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen).to(self.device, dtype or self.dtype)

    def record(self, network: str, batch: int, frames: float, fn, *args, light=False) -> None:
        warmup, repeats = self.warmup, self.repeats
        if light:  # whole DDIM runs: fewer repeats
            warmup, repeats = max(1, warmup // 2), max(3, repeats // 4)
        ms = median_ms(fn, args, warmup, repeats)
        row = {
            "precision": self.precision,
            "network": network,
            "batch": batch,
            "ms_per_call": round(ms, 3),
            "ms_per_frame": round(ms / frames, 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        self.rows.append(row)
        print(
            f"  {self.precision:<9} {network:<22} batch {batch:<3} {ms:9.2f} ms/call "
            f"{row['ms_per_frame']:9.3f} ms/frame  peak {row['peak_mem_gib']} GiB",
            flush=True,
        )

    @torch.inference_mode()
    def extractors(self) -> None:
        image = self.rand(1, 3, 256, 256)
        for name in ("appearance_extractor", "motion_extractor"):
            self.record(name, 1, 1, self.load(name), image)

    @torch.inference_mode()
    def per_frame(self, batches: list[int]) -> None:
        stitch = self.load("stitch_network")
        warp = self.load("warp_network")
        decoder = self.load("decoder")

        def frame(feature, kp_s, kp_d):
            return decoder(warp(feature, kp_s, kp_d))

        for batch in batches:
            torch.cuda.reset_peak_memory_stats()
            kp_s = self.rand(batch, 21, 3, dtype=torch.float32) * 0.5
            kp_d = kp_s + 0.01
            feature = self.rand(batch, 32, 16, 64, 64)
            kp_s_t, kp_d_t = kp_s, kp_d  # keypoints stay float32, as in the engine
            warped = warp(feature, kp_s_t, kp_d_t)
            self.record("stitch_network", batch, batch, stitch, kp_s, kp_d)
            self.record("warp_network", batch, batch, warp, feature, kp_s_t, kp_d_t)
            self.record("decoder", batch, batch, decoder, warped)
            self.record("warp+decoder", batch, batch, frame, feature, kp_s_t, kp_d_t)

        # The decoder is ~70% of the per-frame FLOPs; tensor-core convolutions prefer NHWC,
        # so also time it (and the frame) with channels_last weights and activations.
        decoder_cl = decoder.to(memory_format=torch.channels_last)

        def frame_cl(feature, kp_s, kp_d):
            warped = warp(feature, kp_s, kp_d).contiguous(memory_format=torch.channels_last)
            return decoder_cl(warped)

        for batch in batches:
            torch.cuda.reset_peak_memory_stats()
            kp_s = self.rand(batch, 21, 3, dtype=torch.float32) * 0.5
            kp_d = kp_s + 0.01
            feature = self.rand(batch, 32, 16, 64, 64)
            warped = warp(feature, kp_s, kp_d).contiguous(memory_format=torch.channels_last)
            self.record("decoder channels_last", batch, batch, decoder_cl, warped)
            self.record("warp+decoder chlast", batch, batch, frame_cl, feature, kp_s, kp_d)

    @torch.inference_mode()
    def motion(self, steps: int) -> None:
        lmdm = self.load("lmdm")
        frames = lmdm.seq_frames
        x = self.rand(1, frames, lmdm.motion_feat_dim)
        cond_frame = self.rand(1, lmdm.motion_feat_dim)
        cond = self.rand(1, frames, 1059)
        times = torch.full((1,), 500, device=self.device, dtype=torch.long)
        self.record("lmdm guided step", 1, frames, lmdm.predict, x, cond_frame, cond, times)
        # Each 80-frame window yields 70 new frames (overlap 10).
        self.record(
            f"lmdm ddim {steps} steps",
            1,
            frames - 10,
            lmdm.ddim_sample,
            cond_frame,
            cond,
            steps,
            light=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--manifests", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16-tolerance", type=float, default=3e-2)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--lmdm-steps", type=int, default=10)
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--cpu-bf16", action="store_true", help="verify bf16 on CPU too")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args(argv)
    manifests = args.manifests or args.vectors.parent / "manifest"

    report: dict = {"device": args.device, "torch": torch.__version__, "verify": {}, "timing": []}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(args.device)
    print(f"device {args.device} {report.get('gpu', '')}  torch {torch.__version__}", flush=True)

    ok = True
    if not args.skip_verify:
        # float16 is upstream's autocast dtype for warp and decoder: its errors beside bf16's.
        runs = [("float32", 1e-4), ("bfloat16", args.bf16_tolerance),
                ("float16", args.bf16_tolerance)]
        if not args.device.startswith("cuda") and not args.cpu_bf16:
            # CPU bf16 3D convolutions take many minutes per network.
            print("verify bfloat16 and float16 skipped on CPU (pass --cpu-bf16 to force)",
                  flush=True)
            runs = runs[:1]
        for dtype, tolerance in runs:
            print(f"verify {dtype} (tolerance {tolerance:g})", flush=True)
            start = time.perf_counter()
            results = verify(
                args.vectors,
                manifests,
                device=args.device,
                dtype=dtype,
                tolerance=tolerance,
                progress=lambda r: print("  " + r.line(), flush=True),
            )
            passed = all(r.passed for r in results)
            ok &= passed
            report["verify"][dtype] = {
                "tolerance": tolerance,
                "passed": passed,
                "seconds": round(time.perf_counter() - start, 1),
                "results": [
                    {
                        "file": r.file,
                        "array": r.array,
                        "rel_l2": r.error,
                        "passed": r.passed,
                        "note": r.note,
                    }
                    for r in results
                ],
            }
            worst = max((r.error for r in results if r.error is not None), default=float("nan"))
            print(f"  -> {'PASS' if passed else 'FAIL'}, worst rel_l2 {worst:.3e}", flush=True)

    if args.device.startswith("cuda"):
        batches = [int(b) for b in args.batches.split(",") if b]
        for precision in ("float32", "tf32", "bfloat16", "float16"):
            print(f"timing {precision}", flush=True)
            timer = _Timer(
                args.vectors, manifests, args.device, precision, args.warmup, args.repeats
            )
            with tf32(precision == "tf32"):
                timer.extractors()
                timer.per_frame(batches)
                timer.motion(args.lmdm_steps)
            report["timing"] += timer.rows
            torch.cuda.empty_cache()
    else:
        print("timing skipped: not a CUDA device")

    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=_jsonable))
        print(f"wrote {args.json}")
    return 0 if ok else 1


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
