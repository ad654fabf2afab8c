"""Stitching network: corrects driving keypoints so shoulders and neck stay in place.

Input ``kp_source``, ``kp_driving`` (B,21,3). An MLP 126 -> 128 -> 128 -> 64 -> 65 on the
two flattened keypoint sets predicts 63 per-keypoint offsets plus a 2D shift; the output
(B,21,3) is ``kp_driving + offsets`` with the shift added to x and y of every keypoint.
"""

from __future__ import annotations

import torch
from torch import nn


class StitchingNetwork(nn.Module):
    def __init__(
        self,
        input_size: int = 126,
        hidden_sizes: tuple[int, ...] = (128, 128, 64),
        output_size: int = 65,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, output_size))
        self.mlp = nn.Sequential(*layers)  # indices 0,2,4,6 are the Linear layers

    def forward(self, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> torch.Tensor:
        bs, num_kp = kp_source.shape[:2]
        features = torch.cat([kp_source.reshape(bs, -1), kp_driving.reshape(bs, -1)], dim=1)
        delta = self.mlp(features)  # (B,65)
        delta_kp = delta[:, : 3 * num_kp].reshape(bs, num_kp, 3)
        delta_xy = delta[:, 3 * num_kp : 3 * num_kp + 2].reshape(bs, 1, 2)
        out = kp_driving + delta_kp
        # Only x and y receive the global shift; z keeps the per-keypoint offset alone.
        shift = torch.cat([delta_xy, torch.zeros_like(delta_xy[..., :1])], dim=-1)
        return out + shift
