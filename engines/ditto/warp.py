"""Warp network: dense 3D motion from two keypoint sets, then feature warping.

Inputs ``feature_3d`` (B,32,16,64,64) from the appearance extractor, ``kp_source`` and
``kp_driving`` (B,21,3) in normalised [-1,1] coordinates (x right, y down, z inward).
Output (B,256,64,64): the warped feature volume flattened to 512 channels, projected to
256 channels and multiplied by a predicted occlusion map.

Dense motion: the volume is compressed to 4 channels; for each keypoint k a sparse motion
maps driving space to source space by the shift ``kp_source[k] - kp_driving[k]`` (plus an
identity "background" motion). The compressed volume is sampled through each of those 22
motions, stacked with Gaussian heatmap differences (driving minus source), and fed to a
3D hourglass (5 levels) whose output gives a softmax mask over the 22 motions (their
weighted sum is the deformation field) and a 2D occlusion map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DownBlock3d, SameBlock2d, UpBlock3d


def coordinate_grid(depth: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(D,H,W,3) grid of (x, y, z) in [-1,1], matching grid_sample's align_corners=False
    convention used upstream (corners at -1 and 1 exactly)."""

    def axis(n: int) -> torch.Tensor:
        return 2 * (torch.arange(n, device=like.device, dtype=like.dtype) / (n - 1)) - 1

    z, y, x = torch.meshgrid(axis(depth), axis(height), axis(width), indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def keypoint_gaussians(
    kp: torch.Tensor, spatial: tuple[int, int, int], variance: float = 0.01
) -> torch.Tensor:
    """(B,K,D,H,W) isotropic Gaussians centred at each keypoint (B,K,3)."""
    grid = coordinate_grid(*spatial, like=kp)  # (D,H,W,3)
    diff = grid[None, None] - kp[:, :, None, None, None, :]  # (B,K,D,H,W,3)
    return torch.exp(-0.5 * diff.pow(2).sum(-1) / variance)


class HourglassEncoder(nn.Module):
    def __init__(self, base: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            cin = in_features if i == 0 else min(max_features, base * 2**i)
            blocks.append(DownBlock3d(cin, min(max_features, base * 2 ** (i + 1))))
        self.down_blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class HourglassDecoder(nn.Module):
    def __init__(self, base: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            # The deepest block sees only the bottleneck; the others also the skip input.
            factor = 1 if i == num_blocks - 1 else 2
            cin = factor * min(max_features, base * 2 ** (i + 1))
            blocks.append(UpBlock3d(cin, min(max_features, base * 2**i)))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = base + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        skips = list(skips)
        out = skips.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
    def __init__(self, base: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        self.encoder = HourglassEncoder(base, in_features, num_blocks, max_features)
        self.decoder = HourglassDecoder(base, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DenseMotionNetwork(nn.Module):
    def __init__(
        self,
        num_kp: int = 21,
        feature_channels: int = 32,
        compress: int = 4,
        base: int = 32,
        num_blocks: int = 5,
        max_features: int = 1024,
        depth: int = 16,
    ):
        super().__init__()
        self.num_kp = num_kp
        in_features = (num_kp + 1) * (compress + 1)  # 22 motions x (heatmap + 4 channels)
        self.hourglass = Hourglass(base, in_features, num_blocks, max_features)
        hidden = self.hourglass.out_filters  # 142
        self.mask = nn.Conv3d(hidden, num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(feature_channels, compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(compress)
        self.occlusion = nn.Conv2d(hidden * depth, 1, kernel_size=7, padding=3)

    def forward(
        self, feature: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (deformation (B,D,H,W,3) float32 in grid_sample order, occlusion (B,1,H,W)).

        Coordinates, heatmaps, sampling and the motion mixture are computed in float32
        whatever the weights' dtype (as autocast does upstream): in bfloat16 a 64-step grid
        and 0.01-variance Gaussians would lose most of their precision.
        """
        bs, _, d, h, w = feature.shape
        k = self.num_kp
        conv_dtype = feature.dtype
        kp_driving, kp_source = kp_driving.float(), kp_source.float()
        feature = F.relu(self.norm(self.compress(feature))).float()  # (B,4,D,H,W)

        identity = coordinate_grid(d, h, w, like=kp_source)[None, None]  # (1,1,D,H,W,3)
        # Keep upstream's operation order (grid - kp_d + kp_s) for identical rounding.
        per_kp = (
            identity - kp_driving.reshape(bs, k, 1, 1, 1, 3) + kp_source.reshape(bs, k, 1, 1, 1, 3)
        )
        motions = torch.cat([identity.expand(bs, 1, d, h, w, 3), per_kp], dim=1)

        channels = feature.shape[1]
        repeated = feature[:, None].expand(bs, k + 1, channels, d, h, w)
        sampled = F.grid_sample(
            repeated.reshape(bs * (k + 1), channels, d, h, w),
            motions.reshape(bs * (k + 1), d, h, w, 3),
            align_corners=False,
        ).reshape(bs, k + 1, channels, d, h, w)

        heatmap = keypoint_gaussians(kp_driving, (d, h, w)) - keypoint_gaussians(
            kp_source, (d, h, w)
        )
        heatmap = torch.cat([heatmap.new_zeros(bs, 1, d, h, w), heatmap], dim=1)

        stacked = torch.cat([heatmap[:, :, None], sampled], dim=2).reshape(bs, -1, d, h, w)
        prediction = self.hourglass(stacked.to(conv_dtype))  # (B,142,D,H,W)

        mask = F.softmax(self.mask(prediction).float(), dim=1)  # (B,22,D,H,W)
        deformation = torch.einsum("bkdhwc,bkdhw->bdhwc", motions, mask)
        occlusion = torch.sigmoid(self.occlusion(prediction.reshape(bs, -1, h, w)))
        return deformation, occlusion


class WarpingNetwork(nn.Module):
    def __init__(self, num_kp: int = 21, volume_channels: int = 32, out_channels: int = 256):
        super().__init__()
        self.dense_motion_network = DenseMotionNetwork(
            num_kp=num_kp, feature_channels=volume_channels
        )
        self.third = SameBlock2d(512, out_channels, leaky=True)
        self.fourth = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    def forward(
        self, feature_3d: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor
    ) -> torch.Tensor:
        deformation, occlusion = self.dense_motion_network(feature_3d, kp_driving, kp_source)
        warped = F.grid_sample(feature_3d.float(), deformation, align_corners=False)
        warped = warped.to(feature_3d.dtype)  # (B,32,16,64,64)
        bs, c, d, h, w = warped.shape
        out = self.fourth(self.third(warped.reshape(bs, c * d, h, w)))  # (B,256,64,64)
        return out * occlusion
