"""Motion extractor: source (or driving) crop -> head pose, expression and keypoints.

Input ``image`` (B,3,256,256) RGB in [0,1]. A ConvNeXt-V2 tiny backbone (depths 3,3,9,3,
widths 96..768, GRN in every block) pooled to a 768-d vector feeds seven linear heads.
Outputs, in this order: ``pitch``, ``yaw``, ``roll`` (B,66) bin logits, ``t`` (B,3),
``exp`` (B,63) expression offsets, ``scale`` (B,1), ``kp`` (B,63) canonical keypoints
(21 x 3, flattened).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MOTION_OUTPUTS = ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (biased variance, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC input: scale each channel by its spatial L2 norm relative to
    the mean over channels, with a learned gain and bias, plus the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial_norm = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * relative) + self.beta + x


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> LayerNorm -> Linear x4 -> GELU -> GRN -> Linear, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GlobalResponseNorm(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NCHW -> NHWC for the pointwise layers
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2Heads(nn.Module):
    """ConvNeXt-V2 backbone with the pose / expression / keypoint heads."""

    def __init__(
        self,
        in_channels: int = 3,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        num_kp: int = 21,
        num_bins: int = 66,
    ):
        super().__init__()
        stem = nn.Sequential(
            nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4),
            ChannelsFirstLayerNorm(dims[0]),
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(
                nn.Sequential(
                    ChannelsFirstLayerNorm(dims[i]),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
            for dim, depth in zip(dims, depths, strict=True)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        width = dims[-1]
        # Head creation order matches upstream (it is the checkpoint's key order).
        self.fc_kp = nn.Linear(width, 3 * num_kp)
        self.fc_scale = nn.Linear(width, 1)
        self.fc_pitch = nn.Linear(width, num_bins)
        self.fc_yaw = nn.Linear(width, num_bins)
        self.fc_roll = nn.Linear(width, num_bins)
        self.fc_t = nn.Linear(width, 3)
        self.fc_exp = nn.Linear(width, 3 * num_kp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))  # 256 -> 64 -> 32 -> 16 -> 8 pixels
        pooled = self.norm(x.mean(dim=(-2, -1)))  # (B,768)
        return (
            self.fc_pitch(pooled),
            self.fc_yaw(pooled),
            self.fc_roll(pooled),
            self.fc_t(pooled),
            self.fc_exp(pooled),
            self.fc_scale(pooled),
            self.fc_kp(pooled),
        )


class MotionExtractor(nn.Module):
    def __init__(self, num_kp: int = 21):
        super().__init__()
        self.detector = ConvNeXtV2Heads(num_kp=num_kp)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(pitch, yaw, roll, t, exp, scale, kp), see MOTION_OUTPUTS."""
        return self.detector(image)

    def extract(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs by name, exp and kp flattened to (B,63)."""
        out = dict(zip(MOTION_OUTPUTS, self.forward(image), strict=True))
        out["exp"] = out["exp"].reshape(out["exp"].shape[0], -1)
        out["kp"] = out["kp"].reshape(out["kp"].shape[0], -1)
        return out
