"""SPADE decoder: warped 2D feature -> 512x512 RGB frame.

Input ``feature`` (B,256,64,64) from the warp network. A 3x3 conv lifts it to 512
channels; six SPADE residual blocks at 64x64, nearest 2x upsample, a block to 256
channels at 128x128, upsample, a block to 64 channels at 256x256, then LeakyReLU(0.2), a
conv to 12 channels and a pixel shuffle to (B,3,512,512), squashed by a sigmoid to [0,1].

Every SPADE block modulates instance-normalised activations with per-pixel gain and bias
predicted from the input feature (the "segmentation map"), and its convolutions are
spectrally normalised. The checkpoint stores spectral norm the way
``torch.nn.utils.spectral_norm`` does (``weight_orig``, ``weight_u``, ``weight_v``); in
inference the weight is ``weight_orig / (u . (W v))`` with the stored vectors, without the
power iteration that training runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpectralNormConv2d(nn.Module):
    """Conv2d whose weight is ``weight_orig`` divided by the stored spectral-norm estimate.

    The stored u and v are the converged power-iteration vectors from training, so
    ``sigma = u . (W v)`` is the largest singular value of W reshaped to (out, -1).
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0, bias: bool = True
    ):
        super().__init__()
        self.padding = padding
        # Parameter/buffer names are those of torch's spectral_norm hook (checkpoint keys).
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.weight_orig = nn.Parameter(torch.empty(out_ch, in_ch, kernel_size, kernel_size))
        self.register_buffer("weight_u", torch.zeros(out_ch))
        self.register_buffer("weight_v", torch.zeros(in_ch * kernel_size * kernel_size))
        nn.init.kaiming_uniform_(self.weight_orig, a=5**0.5)

    def normalised_weight(self) -> torch.Tensor:
        matrix = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        sigma = torch.dot(self.weight_u, torch.mv(matrix, self.weight_v))
        return self.weight_orig / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.normalised_weight(), self.bias, padding=self.padding)


class SPADE(nn.Module):
    """Instance norm (no affine) followed by a per-pixel affine map predicted from `seg`."""

    def __init__(self, channels: int, seg_channels: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(seg_channels, hidden, kernel_size=3, padding=1), nn.ReLU()
        )
        self.mlp_gamma = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        normalised = F.instance_norm(x, eps=1e-5)
        seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
        hidden = self.mlp_shared(seg)
        return normalised * (1 + self.mlp_gamma(hidden)) + self.mlp_beta(hidden)


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin: int, fout: int, seg_channels: int):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = SpectralNormConv2d(fin, fmiddle, 3, padding=1)
        self.conv_1 = SpectralNormConv2d(fmiddle, fout, 3, padding=1)
        if self.learned_shortcut:
            self.conv_s = SpectralNormConv2d(fin, fout, 1, bias=False)
        self.norm_0 = SPADE(fin, seg_channels)
        self.norm_1 = SPADE(fmiddle, seg_channels)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, seg_channels)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return shortcut + dx


class SPADEDecoder(nn.Module):
    def __init__(self, in_channels: int = 256, out_channels: int = 64, num_middle: int = 6):
        super().__init__()
        wide = 2 * in_channels
        self.num_middle = num_middle
        self.fc = nn.Conv2d(in_channels, wide, kernel_size=3, padding=1)
        for i in range(num_middle):
            self.add_module(f"G_middle_{i}", SPADEResnetBlock(wide, wide, in_channels))
        self.up_0 = SPADEResnetBlock(wide, in_channels, in_channels)
        self.up_1 = SPADEResnetBlock(in_channels, out_channels, in_channels)
        # Conv to 3*2*2 channels + pixel shuffle: the final 2x upscale to 512x512.
        self.conv_img = nn.Sequential(
            nn.Conv2d(out_channels, 3 * 4, kernel_size=3, padding=1), nn.PixelShuffle(2)
        )

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        seg = feature
        x = self.fc(feature)  # (B,512,64,64)
        for i in range(self.num_middle):
            x = getattr(self, f"G_middle_{i}")(x, seg)
        x = self.up_0(F.interpolate(x, scale_factor=2.0, mode="nearest"), seg)  # 128x128
        x = self.up_1(F.interpolate(x, scale_factor=2.0, mode="nearest"), seg)  # 256x256
        x = self.conv_img(F.leaky_relu(x, 0.2))  # (B,3,512,512)
        return torch.sigmoid(x)
