"""`avatard bench ditto` (bench/ditto_baseline.py) on CPU.

The FLOP counts are checked against counts derived by hand from the architecture; the
timings are only checked to be there (speed is what the command measures, on a GPU).
The upstream sources are not in CI: the side-by-side test runs only where a copy is at
`.upstream/ditto-talkinghead` (or $AVATARD_DITTO_UPSTREAM).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from avatard.bench import ditto_baseline as baseline
from avatard.daemon.cli import main
from avatard.engines.ditto.networks import build_module

UPSTREAM = Path(
    os.environ.get(
        "AVATARD_DITTO_UPSTREAM",
        Path(__file__).resolve().parents[1] / ".upstream" / "ditto-talkinghead",
    )
)
COUNTED = (
    "appearance_extractor",
    "motion_extractor",
    "stitch_network",
    "warp_network",
    "decoder",
    "warp+decode",
    "lmdm_step",
)
# What a --quick run times (and, with upstream, compares output by output).
QUICK_NETWORKS = {
    "appearance_extractor",
    "motion_extractor",
    "stitch_network",
    "lmdm_step",
    "lmdm_ddim_2",
    "warp+decode",
}


def conv_flops(cin: int, cout: int, kernel: int, voxels: int, dims: int = 2) -> int:
    """2 FLOPs per multiply-add; biases are not counted (nor by FlopCounterMode)."""
    return 2 * cin * cout * kernel**dims * voxels


def decoder_flops() -> int:
    """SPADE decoder by hand: fc, six 512-channel SPADE residual blocks at 64x64, two
    upsampling blocks (128x128, 256x256), conv_img. SPADE(C) = shared 3x3 conv from the
    256-channel feature to 128, then 3x3 convs to gamma and beta (C each)."""

    def spade(channels: int, pixels: int) -> int:
        return conv_flops(256, 128, 3, pixels) + 2 * conv_flops(128, channels, 3, pixels)

    def block(fin: int, fout: int, pixels: int) -> int:
        mid = min(fin, fout)
        flops = spade(fin, pixels) + conv_flops(fin, mid, 3, pixels)
        flops += spade(mid, pixels) + conv_flops(mid, fout, 3, pixels)
        if fin != fout:  # learned shortcut: SPADE + 1x1 conv
            flops += spade(fin, pixels) + conv_flops(fin, fout, 1, pixels)
        return flops

    return (
        conv_flops(256, 512, 3, 64 * 64)
        + 6 * block(512, 512, 64 * 64)
        + block(512, 256, 128 * 128)
        + block(256, 64, 256 * 256)
        + conv_flops(64, 12, 3, 256 * 256)
    )


def warp_flops() -> int:
    """Warp network by hand: 1x1x1 compression 32->4, 3D hourglass (5 down blocks from
    22 x 5 = 110 channels, 5 up blocks with skips, 142-channel output conv), 7x7x7 mask
    conv to 22 motions, 7x7 occlusion conv on the 142 x 16 flattened depth, then the
    3x3 512->256 and 1x1 256->256 convs; plus our mixture of the 22 motions as an einsum
    (22 x 3 multiply-adds per voxel; upstream multiplies and sums elementwise)."""
    voxels = 16 * 64 * 64
    flops = conv_flops(32, 4, 1, voxels, 3)
    for i, (cin, cout) in enumerate([(110, 64), (64, 128), (128, 256), (256, 512), (512, 1024)]):
        flops += conv_flops(cin, cout, 3, 16 * (64 >> i) ** 2, 3)
    for cin, cout, side in [
        (1024, 512, 4),
        (1024, 256, 8),
        (512, 128, 16),
        (256, 64, 32),
        (128, 32, 64),
    ]:
        flops += conv_flops(cin, cout, 3, 16 * side * side, 3)
    flops += conv_flops(142, 142, 3, voxels, 3) + conv_flops(142, 22, 7, voxels, 3)
    flops += conv_flops(142 * 16, 1, 7, 64 * 64)
    flops += conv_flops(512, 256, 3, 64 * 64) + conv_flops(256, 256, 1, 64 * 64)
    return flops + 2 * 22 * 3 * voxels


def test_flop_counter_matches_a_hand_count_of_one_conv():
    conv = nn.Conv2d(16, 32, kernel_size=3, padding=1)
    x = torch.zeros(2, 16, 20, 24)
    with torch.no_grad():
        assert baseline.count_flops(lambda: conv(x)) == 2 * 16 * 32 * 9 * 20 * 24 * 2


def test_per_frame_flops_match_the_hand_count():
    table = baseline.flop_table(None, lambda _line: None)
    assert set(table) == set(COUNTED)
    assert table["decoder"]["ours_flops"] == decoder_flops()
    assert table["warp_network"]["ours_flops"] == warp_flops()
    total = table["warp+decode"]["ours_flops"]
    assert total == decoder_flops() + warp_flops()
    # ARCHITECTURE.md: 342.1 + 891.6 GFLOP measured on the upstream modules, each rounded
    # to 0.1 GFLOP (so +-0.1 of 1233.7, 8e-5 relative); ours adds the 8.7 MFLOP einsum
    # (7e-6). 1e-4 still flags the smallest layer that matters (conv_img, 0.9 GFLOP).
    assert total == pytest.approx(1233.7e9, rel=1e-4)
    assert table["decoder"]["ours_params"] == 55_365_388
    assert table["warp_network"]["ours_params"] == 45_529_829


def test_meta_count_needs_no_weights_and_matches_a_real_layer():
    decoder = build_module("decoder").eval()
    x = torch.zeros(1, 256, 64, 64)
    with torch.no_grad():
        assert baseline.count_flops(lambda: decoder.fc(x)) == conv_flops(256, 512, 3, 64 * 64)


def test_einops_stand_in_matches_einops_on_upstreams_patterns():
    stand_in = baseline.einops_stand_in()
    fake, layer = stand_in["einops"], stand_in["einops.layers.torch"].Rearrange
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    b = torch.tensor([True, False])
    expected = {
        "b c -> b 1 c": x[:, 0][:, None],
        "b -> b 1 1": b[:, None, None],
        "b -> b 1": b[:, None],
    }
    assert torch.equal(fake.rearrange(x[:, 0], "b c -> b 1 c"), expected["b c -> b 1 c"])
    assert torch.equal(fake.rearrange(b, "b -> b 1 1"), expected["b -> b 1 1"])
    assert torch.equal(fake.rearrange(b, "b -> b 1"), expected["b -> b 1"])
    pairs = fake.rearrange(x, "... (d r) -> ... d r", r=2)
    assert pairs.shape == (2, 3, 4, 2) and pairs[0, 0, 1, 0] == x[0, 0, 2]
    assert torch.equal(fake.rearrange(pairs, "... d r -> ... (d r)"), x)
    assert torch.equal(fake.repeat(x, "... n -> ... (n r)", r=2), x.repeat_interleave(2, -1))
    assert torch.equal(layer("b (r d) -> b r d", r=2)(x[:, 0, :]), x[:, 0, :].reshape(2, 2, 4))
    with pytest.raises(NotImplementedError):
        fake.rearrange(x, "a b c -> c b a")
    try:
        import einops
    except ImportError:
        return
    for pattern, sizes, value in [
        ("... (d r) -> ... d r", {"r": 2}, x),
        ("... d r -> ... (d r)", {}, pairs),
        ("b c -> b 1 c", {}, x[:, 0]),
    ]:
        assert torch.equal(
            fake.rearrange(value, pattern, **sizes), einops.rearrange(value, pattern, **sizes)
        )
    assert torch.equal(
        fake.repeat(x, "... n -> ... (n r)", r=2), einops.repeat(x, "... n -> ... (n r)", r=2)
    )


def test_upstream_import_failures_are_reported(tmp_path):
    modules = tmp_path / "core" / "models" / "modules"
    modules.mkdir(parents=True)
    (modules / "stitching_network.py").write_text(
        "from torch import nn\n\nclass StitchingNetwork(nn.Linear):\n"
        "    def __init__(self):\n        super().__init__(126, 65)\n"
    )
    (modules / "LMDM.py").write_text("import a_module_that_is_not_there\n")
    up = baseline.load_upstream(tmp_path)
    assert set(up.classes) == {"stitch_network"}
    assert "ModuleNotFoundError" in up.failed["lmdm"]
    assert set(up.failed) == set(baseline.NETWORKS) - {"stitch_network"}
    assert up.summary()["imported"] == {
        "stitch_network": "core/models/modules/stitching_network.py:StitchingNetwork"
    }


def _check_report(report: dict, with_upstream: bool) -> None:
    assert report["random_weights"] is True
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert {"device_name", "driver", "cuda"} <= set(env)
    assert report["peak_tflops"]["fp32"] > 0
    assert set(report["flops"]) == set(COUNTED)
    sides = ["upstream", "ours"] if with_upstream else ["ours"]
    networks_timed = QUICK_NETWORKS
    for side in sides:
        rows = {r["network"]: r for r in report["timing"] if r["side"] == side}
        assert set(rows) == networks_timed
        for row in rows.values():
            assert row["mode"] == "fp32" and row["batch"] == 1
            assert row["ms_per_call"] > 0 and len(row["ms_all"]) == 1
        frame = rows["warp+decode"]
        assert frame["gflop_per_call"] == pytest.approx(
            report["flops"]["warp+decode"][f"{side}_flops"] / 1e9, rel=1e-6
        )
        assert frame["tflops"] > 0 and frame["pct_peak"] > 0 and frame["flop_bound_fps"] > 0
        assert rows["lmdm_ddim_2"]["frames_per_call"] == baseline.LMDM_NEW_FRAMES
    assert report["flop_bound_fps"]["fp32"]["warp+decode"] > 0
    assert report["complete"] is True


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_quick_cpu_run_without_upstream(tmp_path):
    out = tmp_path / "baseline.json"
    result = CliRunner().invoke(
        main, ["bench", "ditto", "--device", "cpu", "--quick", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("ALL WEIGHTS ARE RANDOM") >= 2
    assert "| fp32 | warp+decode | 1 |" in result.output
    report = json.loads(out.read_text())
    _check_report(report, with_upstream=False)
    assert report["upstream"] is None and report["agreement"] == {}
    assert report["settings"]["quick"] is True and report["settings"]["lmdm_steps"] == [2]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not (UPSTREAM / "core" / "models" / "modules").is_dir(),
    reason=f"no copy of the upstream sources at {UPSTREAM} (set AVATARD_DITTO_UPSTREAM)",
)
def test_quick_cpu_run_side_by_side_with_upstream(tmp_path, capsys):
    out = tmp_path / "baseline.json"
    code = baseline.main(
        ["--upstream", str(UPSTREAM), "--device", "cpu", "--quick", "--json", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["upstream"]["failed"] == {}
    _check_report(report, with_upstream=True)
    for key, row in report["flops"].items():
        assert row["upstream_flops"] > 0, key
        assert row["ours_flops"] == pytest.approx(row["upstream_flops"], rel=0.01), key
        assert row["ours_params"] == row["upstream_params"], key
    # Same weights and inputs in float32 on CPU: the outputs agree to rounding (~1e-6).
    assert set(report["agreement"]) == QUICK_NETWORKS
    for key, err in report["agreement"].items():
        assert err < 1e-4, (key, err)
    assert "ALL WEIGHTS ARE RANDOM" in capsys.readouterr().out
