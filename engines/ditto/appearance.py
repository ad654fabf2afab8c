"""Appearance feature extractor: source crop -> 3D appearance feature volume.

Input ``image`` (B,3,256,256) RGB in [0,1]. Output ``feature_3d`` (B,32,16,64,64): a 2D
encoder (one full-resolution block, two downsampling blocks, a 1x1 projection to 512
channels) whose channels are read as 32 channels x 16 depth slices, refined by six 3D
residual blocks. Computed once per avatar.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import DownBlock2d, ResBlock3d, SameBlock2d


class AppearanceFeatureExtractor(nn.Module):
    def __init__(
        self,
        image_channels: int = 3,
        base_channels: int = 64,
        num_down_blocks: int = 2,
        max_channels: int = 512,
        volume_channels: int = 32,
        volume_depth: int = 16,
        num_resblocks: int = 6,
    ):
        super().__init__()
        self.volume_channels = volume_channels
        self.volume_depth = volume_depth
        self.first = SameBlock2d(image_channels, base_channels)
        channels = [min(max_channels, base_channels * 2**i) for i in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(
            DownBlock2d(channels[i], channels[i + 1]) for i in range(num_down_blocks)
        )
        self.second = nn.Conv2d(channels[-1], max_channels, kernel_size=1)
        # Sequential with names "3dr<i>": the names are part of the checkpoint keys.
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(volume_channels))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.first(image)  # (B,64,256,256)
        for block in self.down_blocks:
            x = block(x)  # (B,128,128,128) -> (B,256,64,64)
        x = self.second(x)  # (B,512,64,64)
        b, _, h, w = x.shape
        volume = x.view(b, self.volume_channels, self.volume_depth, h, w)  # (B,32,16,64,64)
        return self.resblocks_3d(volume)
