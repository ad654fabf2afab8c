"""Small building blocks shared by the Ditto image networks (LivePortrait family).

Attribute names follow the upstream checkpoints (``conv``, ``norm``, ``conv1``...) because
they become state_dict keys that the official files must load into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pool_hw(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool over the last two dims of a 5D volume (depth kept).

    CPU kernels of avg_pool3d lack bfloat16/float16; there the same average is taken by a
    reshape (CPU reduced precision is only used in tests, speed does not matter)."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w].unflatten(-1, (w // 2, 2)).unflatten(-3, (h // 2, 2))
        return x.float().mean(dim=(-3, -1)).to(x.dtype)
    return F.avg_pool3d(x, kernel_size=(1, 2, 2))


class SameBlock2d(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU (or LeakyReLU 0.01), resolution kept."""

    def __init__(self, in_ch: int, out_ch: int, leaky: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_ch)
        self.leaky = leaky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.leaky_relu(x) if self.leaky else F.relu(x)


class DownBlock2d(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU -> 2x2 average pool (halves H and W)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


class ResBlock3d(nn.Module):
    """Pre-activation 3D residual block: x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm3d(channels)
        self.norm2 = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


class DownBlock3d(nn.Module):
    """conv3x3x3 -> BatchNorm -> ReLU -> pool (1,2,2): depth kept, H and W halved."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_hw(F.relu(self.norm(self.conv(x))))


class UpBlock3d(nn.Module):
    """Nearest upsample (1,2,2) -> conv3x3x3 -> BatchNorm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return F.relu(self.norm(self.conv(x)))
