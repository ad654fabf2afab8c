"""`avatard bench encode`: the gateway's shared encoders timed on one clip. The report's
structure and counts are checked, never its figures."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from daemon_harness import AVATARD

pytest.importorskip("aiortc", reason="the web extra is not installed")

from avatard.bench.encode import run_encode_bench, sway_clip  # noqa: E402


def test_the_clip_is_the_portrait_moving():
    clip = sway_clip(12, size=64)
    assert len(clip) == 12 and all(f.shape == (64, 64, 3) and f.dtype == np.uint8
                                   for f in clip)
    assert any(not np.array_equal(clip[0], f) for f in clip[1:])  # it moves


def test_every_encoder_gives_figures_or_says_why_not():
    report = run_encode_bench(["vp8", "h264", "h264_nvenc"], frames=20, size=128)
    by_name = {r["encoder"]: r for r in report["results"]}
    assert list(by_name) == ["vp8", "h264", "h264_nvenc"]
    for name in ("vp8", "h264"):
        r = by_name[name]
        assert r["cpu_ms_per_frame"] > 0 and r["wall_ms_per_frame"] > 0, r
        assert r["mbit_per_s"] > 0 and r["core_share_at_fps"] > 0, r
    nvenc = by_name["h264_nvenc"]
    assert ("unavailable" in nvenc and "h264_nvenc" in nvenc["unavailable"]) or \
        nvenc["cpu_ms_per_frame"] > 0, nvenc
    with pytest.raises(ValueError, match="--encoders: av1"):
        run_encode_bench(["av1"], frames=20)


def test_the_cli_prints_json():
    run = subprocess.run([AVATARD, "bench", "encode", "--encoders", "vp8", "--frames", "20",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["frames"] == 20 and report["results"][0]["encoder"] == "vp8"
    bad = subprocess.run([AVATARD, "bench", "encode", "--encoders", "av1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--encoders: av1" in bad.stderr
