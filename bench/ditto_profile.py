"""`python -m avatard.bench.ditto_profile`: where a Ditto render batch spends its GPU time.

Builds the engine (random weights unless --checkpoints) with CUDA graphs off, so the
compiled warp network and decoder run as separate calls, and reports for one batch size:

- ms per frame of the warp network alone, of the decoder alone (CUDA events, median),
  and of the engine's whole render call (warp + decode + paste-back + host copy);
- with --kernels, the profiler's table of the kernels of a few warp + decode batches,
  sorted by device time; with --shapes, the operators grouped by input shape (which
  layer a heavy kernel belongs to).

Compare ``--serving-layers on`` and ``off`` in one run to see what the rewrites of
`engines/ditto/serving.py` buy. Achieved TFLOP/s follow from the FLOPs per frame that
`avatard bench ditto` counts (docs/bench.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .timing import time_calls


def _median_ms(fn, device: str, repeats: int) -> float:
    return time_calls(fn, device, repeats, warmup=3).median_ms


def profile_tables(call: Callable[[], Any], device: str, kernels: bool, shapes: bool,
                   calls: int = 5) -> dict[str, str]:
    """Profile `calls` calls of `call` on `device` and return the profiler's tables:
    "kernels" (every kernel or op by device time, or CPU time on a CPU device) and
    "shapes" (the operators grouped by their input shapes, sorted the same way: which
    layer a heavy convolution kernel belongs to, e.g. ``aten::cudnn_convolution`` with
    its input, weight and output shapes). Only the tables asked for are returned."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities, record_shapes=shapes) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize(device)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    tables = {}
    if kernels:
        tables["kernels"] = prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30,
            max_name_column_width=90)
    if shapes:
        tables["shapes"] = prof.key_averages(group_by_input_shape=True).table(
            sort_by=sort, row_limit=40, max_name_column_width=60,
            max_shapes_column_width=120)
    return tables


def profile(device: str, batch: int, serving_layers: bool, repeats: int, kernels: bool,
            options: dict[str, Any], shapes: bool = False) -> dict[str, Any]:
    import torch

    from avatard.engines.ditto.engine import DittoEngine

    cuda = device.startswith("cuda")
    engine = DittoEngine(device, {"weights": "random", "dtype": "bfloat16" if cuda else
                                  "float32", **options, "cuda_graphs": False,
                                  "serving_layers": serving_layers})
    try:
        avatar = engine.register(engine.default_portrait()).payload
        rng = np.random.default_rng(1)
        items = [(avatar, avatar.x_s[0] + rng.normal(0, 0.01, (21, 3)).astype(np.float32))
                 for _ in range(batch)]
        warp, decoder = engine.models["warp_network"], engine.models["decoder"]
        with torch.inference_mode():
            feature = avatar.feature_3d.expand(batch, -1, -1, -1, -1).contiguous()
            kp_s = torch.from_numpy(np.stack([avatar.x_s[0]] * batch)).to(device)
            kp_d = torch.from_numpy(np.stack([x for _, x in items])).to(device)
            warped = warp(feature, kp_s, kp_d)
            record: dict[str, Any] = {
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "torch": torch.__version__, "batch": batch, "serving_layers": serving_layers,
                "report": engine.report().notes,
                "warp_ms_per_frame": _median_ms(lambda: warp(feature, kp_s, kp_d), device,
                                                repeats) / batch,
                "decoder_ms_per_frame": _median_ms(lambda: decoder(warped), device,
                                                   repeats) / batch,
                "render_ms_per_frame": _median_ms(lambda: engine._render_items(items),
                                                  device, repeats) / batch,
            }
            if kernels or shapes:
                tables = profile_tables(lambda: decoder(warp(feature, kp_s, kp_d)), device,
                                        kernels, shapes)
                record.update(tables)
        return record
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avatard.bench.ditto_profile",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--serving-layers", default="on,off",
                        help="on, off, or both in one run: on,off")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kernels", action="store_true", help="print the kernel table")
    parser.add_argument("--shapes", action="store_true",
                        help="print the operators grouped by input shape (which layers "
                        "the heavy kernels belong to)")
    parser.add_argument("--option", action="append", default=[], metavar="K=V",
                        help="engine option (JSON value)")
    args = parser.parse_args(argv)
    options = {}
    for kv in args.option:
        key, _, value = kv.partition("=")
        options[key] = json.loads(value)
    modes = args.serving_layers.split(",")
    for mode in modes:
        if mode not in ("on", "off"):
            parser.error(f"--serving-layers: {mode!r} is not on or off")
    print("*** RANDOM WEIGHTS: benchmark of compute only; the frames are noise ***")
    for mode in modes:
        record = profile(args.device, args.batch, mode == "on", args.repeats, args.kernels,
                         options, shapes=args.shapes)
        tables = [record.pop(name) for name in ("kernels", "shapes") if name in record]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                          for k, v in record.items()}))
        for table in tables:
            print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
