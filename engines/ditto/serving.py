"""Inference-time rewrites of the warp network and the decoder: same function, faster shapes.

The networks are built with the upstream layer layout so the official checkpoints load
strictly; a few of those layers run poorly on tensor cores as they are. After loading, the
engine swaps them for equivalent modules holding rearranged copies of the same weights:

- The dense-motion ``mask`` conv is 7x7x7 from 142 to 22 channels over a 16x64x64 volume:
  about 140 GFLOP per frame (11 % of a frame) with only 22 output channels, so its implicit
  GEMM fills a third of each tensor-core tile; on an H100 it took 29 % of a render batch.
  `DepthSplitConv3d` runs it as one 2D 7x7 conv per depth slice with the 7 depth taps as
  separate outputs (22 x 7 = 154 channels) and adds the taps back with a depth shift.
- The ``occlusion`` conv is 7x7 from 2272 channels to 1: a GEMV that cuDNN walks 49 times.
  `TapSplitConv2d` runs a 1x1 conv to 49 x 1 tap outputs and adds them back with their
  spatial shifts.
- Spectrally normalised decoder convs recompute ``weight_orig / sigma`` (a GEMV per layer)
  on every call; the weights are fixed in inference, so `FrozenConv2d` divides once.

The arithmetic is the same sums in another order: float32 results agree to rounding
(tests compare the rewritten modules against the originals, and `avatard ditto verify
--serving` checks them against the reference vectors).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import SPADEDecoder, SpectralNormConv2d
from .warp import WarpingNetwork


def _shifted_sum(taps: torch.Tensor, dims: tuple[int, ...], pads: tuple[int, ...]) -> torch.Tensor:
    """Sum of tap outputs, each shifted by its offset.

    ``taps`` has one axis of size k_i right before each spatial axis listed in `dims` (the
    tap index of that kernel dimension), e.g. (B, kd, O, D, H, W) with dims=(3,) for depth.
    Output position p of a spatial axis gets tap t evaluated at input position p + t - pad,
    which is what a convolution with zero padding `pad` computes.
    """
    # Zero-pad every split spatial axis so each tap's shifted window stays in range.
    for dim, pad in zip(dims, pads, strict=True):
        shape = list(taps.shape)
        shape[dim] = pad
        zeros = taps.new_zeros(shape)
        taps = torch.cat([zeros, taps, zeros], dim=dim)
    out = None
    sizes = [taps.shape[dim] - 2 * pad for dim, pad in zip(dims, pads, strict=True)]
    tap_counts = [2 * pad + 1 for pad in pads]
    for offsets in itertools.product(*[range(k) for k in tap_counts]):
        view = taps
        # Index the tap axes from the last one so earlier axis positions stay valid.
        for (dim, size), offset in reversed(list(zip(zip(dims, sizes, strict=True), offsets,
                                                     strict=True))):
            view = view.narrow(dim, offset, size).select(dim - 1, offset)
        out = view if out is None else out + view
    assert out is not None
    return out


class DepthSplitConv3d(nn.Module):
    """A Conv3d (stride 1, 'same' padding) computed as a 2D conv over depth slices whose
    outputs are the depth taps, summed back with a depth shift."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        kd, kh, kw = conv.kernel_size
        if conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1:
            raise ValueError("DepthSplitConv3d needs stride 1, dilation 1, groups 1")
        if conv.padding != (kd // 2, kh // 2, kw // 2) or kd % 2 == 0:
            raise ValueError(f"DepthSplitConv3d needs odd kernels with same padding, "
                             f"got kernel {conv.kernel_size} padding {conv.padding}")
        out_ch, in_ch = conv.out_channels, conv.in_channels
        weight = conv.weight.detach()  # (O, C, kd, kh, kw)
        # (kd*O, C, kh, kw): output channel t*O + o is tap t of output o.
        self.register_buffer("weight", weight.permute(2, 0, 1, 3, 4).reshape(kd * out_ch, in_ch,
                                                                            kh, kw).clone())
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.register_buffer("bias", bias)
        self.taps, self.out_channels = kd, out_ch
        self.padding2d = (kh // 2, kw // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * d, c, h, w)
        y = F.conv2d(slices, self.weight, None, padding=self.padding2d)
        y = y.reshape(b, d, self.taps, self.out_channels, h, w).transpose(1, 2)  # B,kd,D,O,H,W
        out = _shifted_sum(y, (2,), (self.taps // 2,))  # (B, D, O, H, W)
        out = out.transpose(1, 2)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1, 1)
        return out


class TapSplitConv2d(nn.Module):
    """A Conv2d (stride 1, 'same' padding) with few outputs computed as a 1x1 conv to one
    output per kernel tap, summed back with each tap's spatial shift."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        kh, kw = conv.kernel_size
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError("TapSplitConv2d needs stride 1, dilation 1, groups 1")
        if conv.padding != (kh // 2, kw // 2) or kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"TapSplitConv2d needs odd kernels with same padding, "
                             f"got kernel {conv.kernel_size} padding {conv.padding}")
        out_ch, in_ch = conv.out_channels, conv.in_channels
        weight = conv.weight.detach()  # (O, C, kh, kw)
        # (kh*kw*O, C, 1, 1): channel (i*kw + j)*O + o is tap (i, j) of output o.
        self.register_buffer("weight", weight.permute(2, 3, 0, 1).reshape(kh * kw * out_ch,
                                                                         in_ch, 1, 1).clone())
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.register_buffer("bias", bias)
        self.kernel, self.out_channels = (kh, kw), out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kh, kw = self.kernel
        y = F.conv2d(x, self.weight)  # (B, kh*kw*O, H, W)
        # Tap axes right before their spatial axes: (B, O, kh, H, kw, W).
        y = y.reshape(b, kh, kw, self.out_channels, h, w).permute(0, 3, 1, 4, 2, 5)
        out = _shifted_sum(y, (3, 5), (kh // 2, kw // 2))  # (B, O, H, W)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out


class FrozenConv2d(nn.Module):
    """A SpectralNormConv2d with its normalised weight computed once."""

    def __init__(self, conv: SpectralNormConv2d):
        super().__init__()
        self.register_buffer("weight", conv.normalised_weight().detach().clone())
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.register_buffer("bias", bias)
        self.padding = conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


@torch.no_grad()
def rewrite_for_serving(module: nn.Module) -> nn.Module:
    """Swap the slow layers of a loaded warp network or decoder (in place; other modules
    are returned unchanged). Call after loading weights and placing the module: the new
    layers copy the weights with their device and dtype."""
    if isinstance(module, WarpingNetwork):
        dense = module.dense_motion_network
        if isinstance(dense.mask, nn.Conv3d):
            dense.mask = DepthSplitConv3d(dense.mask)
        if isinstance(dense.occlusion, nn.Conv2d):
            dense.occlusion = TapSplitConv2d(dense.occlusion)
    elif isinstance(module, SPADEDecoder):
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, SpectralNormConv2d):
                    setattr(parent, name, FrozenConv2d(child))
    return module
