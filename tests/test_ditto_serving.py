"""The serving rewrites of the warp network and decoder compute what the loaded layers do."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from ditto_shared import MANIFESTS, VECTORS, needs_shared  # noqa: E402
from torch import nn  # noqa: E402

from avatard.engines.ditto import networks  # noqa: E402
from avatard.engines.ditto.cli import ditto  # noqa: E402
from avatard.engines.ditto.decoder import SPADEDecoder, SpectralNormConv2d  # noqa: E402
from avatard.engines.ditto.serving import (  # noqa: E402
    DepthSplitConv3d,
    FrozenConv2d,
    TapSplitConv2d,
    rewrite_for_serving,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kernel,bias", [(3, True), (7, True), (5, False)])
def test_depth_split_conv3d_matches_conv3d(kernel: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(kernel)
    conv = nn.Conv3d(6, 5, kernel, padding=kernel // 2, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        if bias:
            conv.bias.copy_(torch.randn(5, generator=gen))
    x = torch.randn(2, 6, 9, 11, 10, generator=gen)
    with torch.no_grad():
        assert _rel(DepthSplitConv3d(conv)(x), conv(x)) < 1e-5


@pytest.mark.parametrize("out_ch,kernel,bias", [(1, 7, True), (3, 3, True), (2, 5, False)])
def test_tap_split_conv2d_matches_conv2d(out_ch: int, kernel: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(out_ch * kernel)
    conv = nn.Conv2d(40, out_ch, kernel, padding=kernel // 2, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    x = torch.randn(3, 40, 13, 8, generator=gen)
    with torch.no_grad():
        assert _rel(TapSplitConv2d(conv)(x), conv(x)) < 1e-5


def test_frozen_conv_equals_the_spectral_norm_conv() -> None:
    conv = SpectralNormConv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight_u.copy_(torch.randn(4))
        conv.weight_v.copy_(torch.randn(8 * 9))
        conv.bias.copy_(torch.randn(4))
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        assert torch.equal(FrozenConv2d(conv)(x), conv(x))


@pytest.mark.parametrize(
    "conv,needle",
    [
        (nn.Conv3d(4, 2, 3, padding=0), "same padding"),
        (nn.Conv3d(4, 2, 3, padding=1, stride=2), "stride 1"),
        (nn.Conv3d(4, 2, (2, 3, 3), padding=(1, 1, 1)), "odd kernels"),
        (nn.Conv2d(4, 2, 3, padding=1, groups=2), "groups 1"),
        (nn.Conv2d(4, 2, 4, padding=2), "odd kernels"),
    ],
)
def test_layers_it_cannot_rewrite_are_refused_with_the_reason(conv: nn.Module, needle) -> None:
    cls = DepthSplitConv3d if isinstance(conv, nn.Conv3d) else TapSplitConv2d
    with pytest.raises(ValueError, match=needle):
        cls(conv)


def _random(name: str) -> nn.Module:
    module = networks.build_module(name)
    module.load_state_dict(networks.random_state(name, 3), strict=True)
    return module.eval()


def test_rewritten_networks_compute_the_same_frames() -> None:
    warp = _random("warp_network")
    fast_warp = rewrite_for_serving(copy.deepcopy(warp))
    dense = fast_warp.dense_motion_network
    assert isinstance(dense.mask, DepthSplitConv3d)
    assert isinstance(dense.occlusion, TapSplitConv2d)
    gen = torch.Generator().manual_seed(0)
    feature = torch.randn(1, 32, 16, 64, 64, generator=gen)
    kp_s = torch.rand(1, 21, 3, generator=gen) * 1.6 - 0.8
    kp_d = kp_s + 0.05 * torch.randn(1, 21, 3, generator=gen)
    with torch.no_grad():
        warped = warp(feature, kp_s, kp_d)
        assert _rel(fast_warp(feature, kp_s, kp_d), warped) < 1e-5

    decoder = _random("decoder")
    fast_decoder = rewrite_for_serving(copy.deepcopy(decoder))
    assert isinstance(fast_decoder, SPADEDecoder)
    assert not any(isinstance(m, SpectralNormConv2d) for m in fast_decoder.modules())
    with torch.no_grad():
        assert _rel(fast_decoder(warped), decoder(warped)) < 1e-5
    # Rewriting twice changes nothing more; other networks pass through untouched.
    assert rewrite_for_serving(fast_warp) is fast_warp
    stitch = _random("stitch_network")
    assert rewrite_for_serving(stitch) is stitch


@needs_shared
def test_verify_serving_layers_against_the_reference_vectors(tmp_path: Path) -> None:
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    for name in ("warp_network.npz", "decoder.npz"):
        shutil.copy(VECTORS / name, vectors / name)
    shutil.copytree(MANIFESTS, tmp_path / "manifest")
    result = CliRunner().invoke(ditto, ["verify", str(vectors), "--serving"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "serving layers" in result.output
    assert "2 of 2 checks passed" in result.output
