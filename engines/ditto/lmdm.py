"""LMDM: the motion-diffusion transformer and its DDIM sampler.

The network predicts a clean 80-frame window of 265-d motion vectors (``x_start``) from
a noisy window ``x`` (B,80,265) at diffusion step ``t`` (B,), conditioned on the motion of
a reference frame ``cond_frame`` (B,265) and on per-frame audio+control features ``cond``
(B,80,1059).

- The noisy window, each frame concatenated with the reference frame, is projected to 512.
- The condition is projected to 512 and encoded by two pre-norm transformer encoder layers;
  its mean, through a small MLP, joins the diffusion-step embedding as FiLM input.
- Eight pre-norm decoder layers (self-attention, cross-attention to the encoded condition
  plus two time tokens, feed-forward), each residual branch modulated by FiLM from the
  step embedding.
- Rotary position embeddings are applied to the (model-width) query/key inputs of every
  attention, before the projections, as upstream does.
- Classifier-free guidance: ``uncond + w * (cond - uncond)`` where the unconditional pass
  replaces the encoded condition with learned null embeddings.

The sampler uses the cosine beta schedule over 1000 steps and DDIM with eta = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class StepCoefficients(NamedTuple):
    """The factors of one noisy DDIM step: x_next = x0 * alpha_next_sqrt + c * eps +
    sigma * noise (float32 values held as Python floats)."""

    alpha_next_sqrt: float
    c: float
    sigma: float


class RotaryEmbedding(nn.Module):
    """Interleaved-pair rotary embedding over the full model width."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))  # (dim/2,)
        self.register_buffer("freqs", freqs)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (B,N,dim) by position along N: pairs (2i, 2i+1) turn by pos * freqs[i]."""
        positions = torch.arange(x.shape[-2], device=x.device, dtype=self.freqs.dtype)
        angles = positions[:, None] * self.freqs[None, :]  # (N, dim/2)
        angles = angles.repeat_interleave(2, dim=-1).to(x.dtype)  # (N, dim)
        pairs = x.unflatten(-1, (-1, 2))
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * angles.cos() + rotated_half * angles.sin()


class Attention(nn.Module):
    """Multi-head attention with torch.nn.MultiheadAttention's parameter layout
    (``in_proj_weight`` = stacked q,k,v projections, ``out_proj``), batch-first."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def split(t: torch.Tensor) -> torch.Tensor:  # (B,N,D) -> (B,H,N,D/H)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = split(F.linear(query, wq, bq))
        k = split(F.linear(key, wk, bk))
        v = split(F.linear(value, wv, bv))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(-2))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer (GELU feed-forward) with rotary q/k."""

    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.rotary = RotaryEmbedding(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        qk = self.rotary.rotate(h)
        x = x + self.self_attn(qk, qk, h)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class DenseFiLM(nn.Module):
    """Mish -> Linear to (scale, shift) for feature-wise modulation."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(nn.Mish(), nn.Linear(dim, 2 * dim))

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.block(t)[:, None, :].chunk(2, dim=-1)  # (B,1,D) each
        return scale, shift


def _film(x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    scale, shift = scale_shift
    return (scale + 1) * x + shift


class FiLMDecoderLayer(nn.Module):
    """Pre-norm decoder layer; each residual branch is FiLM-modulated by the step embedding."""

    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.multihead_attn = Attention(dim, heads)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.film1 = DenseFiLM(dim)
        self.film2 = DenseFiLM(dim)
        self.film3 = DenseFiLM(dim)
        self.rotary = RotaryEmbedding(dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        qk = self.rotary.rotate(h)
        x = x + _film(self.self_attn(qk, qk, h), self.film1(t))
        h = self.norm2(x)
        attended = self.multihead_attn(self.rotary.rotate(h), self.rotary.rotate(memory), memory)
        x = x + _film(attended, self.film2(t))
        ff = self.linear2(F.gelu(self.linear1(self.norm3(x))))
        return x + _film(ff, self.film3(t))


class DecoderStack(nn.Module):
    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.stack = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for layer in self.stack:
            x = layer(x, memory, t)
        return x


def timestep_embedding(times: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,dim) of integer diffusion steps: [sin | cos]."""
    half = dim // 2
    rate = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=times.device) * -rate)
    angles = times[:, None] * freqs[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, times: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(times, self.dim)


class MotionDecoder(nn.Module):
    """The denoiser: predicts x_start (B,N,265) for one classifier-free-guidance branch."""

    def __init__(
        self,
        motion_feat_dim: int = 265,
        audio_feat_dim: int = 1059,
        seq_frames: int = 80,
        latent_dim: int = 512,
        ff_size: int = 1024,
        num_layers: int = 8,
        num_heads: int = 8,
    ):
        super().__init__()
        d = latent_dim
        self.rotary = RotaryEmbedding(d)  # unused at run time; its buffer is in checkpoints
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, 4 * d), nn.Mish())
        self.to_time_cond = nn.Sequential(nn.Linear(4 * d, d))
        self.to_time_tokens = nn.Sequential(nn.Linear(4 * d, 2 * d))
        self.null_cond_embed = nn.Parameter(torch.randn(1, seq_frames, d))
        self.null_cond_hidden = nn.Parameter(torch.randn(1, d))
        self.norm_cond = nn.LayerNorm(d)
        self.input_projection = nn.Linear(2 * motion_feat_dim, d)
        self.cond_encoder = nn.Sequential(*[EncoderLayer(d, num_heads, ff_size) for _ in range(2)])
        self.cond_projection = nn.Linear(audio_feat_dim, d)
        self.non_attn_cond_projection = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d)
        )
        self.seqTransDecoder = DecoderStack(
            [FiLMDecoderLayer(d, num_heads, ff_size) for _ in range(num_layers)]
        )
        self.final_layer = nn.Linear(d, motion_feat_dim)

    def forward(
        self,
        x: torch.Tensor,
        cond_frame: torch.Tensor,
        cond: torch.Tensor,
        times: torch.Tensor,
        keep_cond: torch.Tensor,
    ) -> torch.Tensor:
        """`keep_cond` (B,) bool: False replaces the condition by the null embeddings."""
        frames = x.shape[1]
        x = torch.cat([x, cond_frame[:, None, :].expand(-1, frames, -1)], dim=-1)
        x = self.input_projection(x)  # (B,N,512)

        tokens = self.cond_encoder(self.cond_projection(cond))  # (B,N,512)
        null_tokens = self.null_cond_embed.to(tokens.dtype)
        tokens = torch.where(keep_cond[:, None, None], tokens, null_tokens)
        cond_hidden = self.non_attn_cond_projection(tokens.mean(dim=-2))  # (B,512)

        # The sinusoidal embedding is computed in float32, then cast to the weights' dtype.
        sinusoid = self.time_mlp[0](times).to(x.dtype)
        t_hidden = self.time_mlp[2](self.time_mlp[1](sinusoid))  # (B,2048)
        t = self.to_time_cond(t_hidden)
        t_tokens = self.to_time_tokens(t_hidden).unflatten(-1, (2, -1))  # (B,2,512)
        null_hidden = self.null_cond_hidden.to(t.dtype)
        t = t + torch.where(keep_cond[:, None], cond_hidden, null_hidden)

        memory = self.norm_cond(torch.cat((tokens, t_tokens), dim=-2))  # (B,N+2,512)
        return self.final_layer(self.seqTransDecoder(x, memory, t))

    def guided(
        self,
        x: torch.Tensor,
        cond_frame: torch.Tensor,
        cond: torch.Tensor,
        times: torch.Tensor,
        guidance_weight: float,
    ) -> torch.Tensor:
        """Classifier-free guidance; both branches run as one batch of 2B."""
        bs = x.shape[0]
        keep = torch.cat([x.new_zeros(bs, dtype=torch.bool), x.new_ones(bs, dtype=torch.bool)])
        out = self.forward(
            torch.cat([x, x]),
            torch.cat([cond_frame, cond_frame]),
            torch.cat([cond, cond]),
            torch.cat([times, times]),
            keep,
        )
        uncond, conditioned = out[:bs], out[bs:]
        return uncond + (conditioned - uncond) * guidance_weight


def cosine_betas(n_timestep: int, s: float = 8e-3) -> np.ndarray:
    """Cosine noise schedule (float64), betas clipped to [0, 0.999]."""
    steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + s
    alphas_bar = np.cos(steps / (1 + s) * np.pi / 2) ** 2
    alphas_bar = alphas_bar / alphas_bar[0]
    return np.clip(1 - alphas_bar[1:] / alphas_bar[:-1], 0, 0.999)


def ddim_time_pairs(sampling_timesteps: int, n_timestep: int = 1000) -> list[tuple[int, int]]:
    """(time, time_next) pairs from T-1 down to -1, evenly spaced as upstream."""
    times = torch.linspace(-1, n_timestep - 1, steps=sampling_timesteps + 1).int().tolist()
    times = list(reversed(times))
    return list(zip(times[:-1], times[1:], strict=True))


class LMDM(nn.Module):
    """Guided x_start / noise prediction and DDIM sampling around `MotionDecoder`.

    Only ``self.model``'s parameters are in the checkpoint (container key
    ``model_state_dict``); the schedule buffers here are rebuilt, not loaded.
    """

    def __init__(
        self,
        motion_feat_dim: int = 265,
        audio_feat_dim: int = 1059,
        seq_frames: int = 80,
        latent_dim: int = 512,
        ff_size: int = 1024,
        num_layers: int = 8,
        num_heads: int = 8,
        n_timestep: int = 1000,
        guidance_weight: float = 2.0,
        ddim_eta: float = 1.0,
        **_ignored: object,
    ):
        super().__init__()
        self.motion_feat_dim = motion_feat_dim
        self.seq_frames = seq_frames
        self.n_timestep = n_timestep
        self.guidance_weight = guidance_weight
        self.ddim_eta = ddim_eta
        self.model = MotionDecoder(
            motion_feat_dim, audio_feat_dim, seq_frames, latent_dim, ff_size, num_layers, num_heads
        )
        # float32 like upstream (float64 schedule cast to float32 before the cumprod).
        betas = torch.tensor(cosine_betas(n_timestep), dtype=torch.float32)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        # A host copy for the step factors (buffers follow the module to the device).
        self._abar = alphas_cumprod.numpy().copy()
        self._step_cache: dict[tuple[int, int], StepCoefficients] = {}
        self.register_buffer(
            "sqrt_recipm1_alphas_cumprod", torch.sqrt(1.0 / alphas_cumprod - 1), persistent=False
        )
        self.register_buffer(
            "sqrt_recip1m_alphas_cumprod",
            torch.sqrt(1.0 / (1.0 - alphas_cumprod)),
            persistent=False,
        )

    def predict(
        self,
        x: torch.Tensor,
        cond_frame: torch.Tensor,
        cond: torch.Tensor,
        times: torch.Tensor,
        guidance_weight: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One guided prediction: (pred_noise, x_start), each shaped like `x`."""
        weight = self.guidance_weight if guidance_weight is None else guidance_weight
        x_start = self.model.guided(x, cond_frame, cond, times, weight)
        a = self.sqrt_recip1m_alphas_cumprod[times].reshape(-1, 1, 1).to(x.dtype)
        b = self.sqrt_recipm1_alphas_cumprod[times].reshape(-1, 1, 1).to(x.dtype)
        pred_noise = a * x - x_start / b
        return pred_noise, x_start

    def ddim_sample(
        self,
        cond_frame: torch.Tensor,
        cond: torch.Tensor,
        sampling_timesteps: int,
        x_init: torch.Tensor | None = None,
        noises: Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        step_coef: Sequence[Sequence[float]] | None = None,
    ) -> torch.Tensor:
        """DDIM from pure noise to a motion window (B,N,265).

        `x_init` and `noises` (one per step except the last) make the run reproducible
        against references; otherwise they are drawn from `generator`. `step_coef`, one
        (sqrt(abar_next), c, sigma) per noisy step, replaces `step_coefficients` (the
        verifier feeds upstream's recorded factors to check the sampler by itself).
        """
        bs = cond_frame.shape[0]
        shape = (bs, cond.shape[1], self.motion_feat_dim)
        device, dtype = cond.device, cond.dtype

        def draw() -> torch.Tensor:
            return torch.randn(shape, generator=generator, device="cpu").to(device, dtype)

        x = draw() if x_init is None else x_init
        pairs = ddim_time_pairs(sampling_timesteps, self.n_timestep)
        if noises is not None and len(noises) < len(pairs) - 1:
            raise ValueError(f"{len(pairs) - 1} step noises needed, {len(noises)} given")
        for i, (time, time_next) in enumerate(pairs):
            times = torch.full((bs,), time, device=device, dtype=torch.long)
            pred_noise, x_start = self.predict(x, cond_frame, cond, times)
            if time_next < 0:
                x = x_start
                continue
            coef = (self.step_coefficients(time, time_next) if step_coef is None
                    else StepCoefficients(*(float(v) for v in step_coef[i])))
            noise = draw() if noises is None else noises[i]
            x = x_start * coef.alpha_next_sqrt + coef.c * pred_noise
            x = x + coef.sigma * noise
        return x

    def step_coefficients(self, time: int, time_next: int) -> StepCoefficients:
        """(sqrt(abar_next), c, sigma) of a noisy DDIM step (t -> t_next), as Python floats
        rounded to float32; abar is the float32 schedule (`alphas_cumprod`), the formula
        upstream's (DDIM with eta = `ddim_eta`): sigma = eta sqrt((1 - abar/abar_next)
        (1 - abar_next) / (1 - abar)), c = sqrt(1 - abar_next - sigma^2).

        Evaluated in float64 with c's radicand clamped at 0, not in float32 as upstream
        does: at t = 999 (abar = 2.4e-9) the radicand is about 1e-8, below float32's
        rounding of its terms, so upstream's c there is rounding noise that differs by
        platform. Its recorded references hold 2.44e-4 at 3 steps (a CPU whose float32
        sqrt rounds sqrt(0.75265580) down), while a correctly rounded sqrt, as on the
        CUDA device of our GPU machine and in numpy, gives a negative radicand and NaN for
        every window; at 5 steps it is NaN everywhere. float64 gives the true value
        (1.1e-4 at 3 steps) on every machine; the shared motion README measured that this
        moves raw windows by at most 6.9e-6 and x_d by 5.8e-5 (relative L2) against
        upstream's float32 factors. Computed on the host once per pair (no device sync in
        the sampling loop, so the loop can be captured in a CUDA graph)."""
        cached = self._step_cache.get((time, time_next))
        if cached is not None:
            return cached
        alpha, alpha_next = float(self._abar[time]), float(self._abar[time_next])
        sigma = self.ddim_eta * math.sqrt((1 - alpha / alpha_next) * (1 - alpha_next)
                                          / (1 - alpha))
        c = math.sqrt(max(1 - alpha_next - sigma * sigma, 0.0))
        coef = StepCoefficients(*(float(np.float32(v)) for v in
                                  (math.sqrt(alpha_next), c, sigma)))
        self._step_cache[(time, time_next)] = coef
        return coef
