"""`avatard bench ipc` runs its three methods between real processes. Speed is not
asserted here (benchmarks are measured by the command, not by unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_ipc_json_has_every_method():
    exe = Path(sys.executable).with_name("avatard")
    out = subprocess.run([str(exe), "bench", "ipc", "--frames", "40", "--latency-frames", "20",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for method in ("shm", "zmq_inline", "mp_queue"):
        result = report[method]
        assert result["frames"] == 40
        assert result["latency_samples"] == 20
        for key in ("frames_per_s", "gb_per_s", "p50_us", "p99_us"):
            assert result[key] > 0, (method, key)
        assert result["p99_us"] >= result["p50_us"]
    assert report["ratios"]["shm_vs_mp_queue_frames_per_s"] > 0
