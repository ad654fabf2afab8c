"""`DittoOptions`: the `[engines.options.ditto]` table.

Torch-free: the supervisor imports this module (not `engine.py`) to validate the config.
Options whose best value depends on the device default to None, which the engine resolves
when it knows its device (`DittoEngine`); a value set explicitly always wins, except that
the CUDA-only switches stay off on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..images import background_option, check_background_option
from ..options import option

DTYPES = ("auto", "float32", "bfloat16", "float16")
MODES = ("offline", "online")


@dataclass(frozen=True, kw_only=True)
class DittoOptions:
    """The Ditto talking-head engine (PyTorch; random or checkpoint weights)."""

    weights: str = option(
        doc='"random" (seeded random weights of the official shapes, for benchmarking; '
        "every report and log line says RANDOM WEIGHTS) or the checkpoint folder holding "
        "ditto_pytorch/ and ditto_cfg/.", nonempty=True, path="dir", path_words=("random",),
    )
    seed: int = option(0, "Seed of the random weights (weights = \"random\" only).")
    dtype: str = option(
        "auto", "Dtype of warp and decoder, the per-frame cost; the extractors, stitching "
        "and LMDM stay float32. \"auto\": float16 on CUDA (upstream's autocast dtype: on "
        "the H200 as fast end to end as bfloat16 and ten times closer to float32 on the "
        "reference vectors, see docs/ditto.md), float32 on the CPU.", choices=DTYPES,
    )
    mode: str = option(
        "offline", "Audio-to-motion scheme of speak and lipsync jobs: \"offline\" (upstream's "
        "offline pipeline: a window every 70 frames, whole-clip smoothing; first frame after "
        "~3.3 s of audio) or \"online\" (upstream's online pipeline: 70 frames of silence "
        "first, a window every 10 frames; first frame after ~0.9 s of audio, 7x the LMDM "
        "windows). Live sessions always run online.", choices=MODES,
    )
    sampling_timesteps: int | None = option(
        None, "DDIM steps per 80-frame LMDM window (overrides the cfg's).", ge=1, le=1000,
        default_doc="the cfg's sampling_timesteps for its mode, else 50 offline and 10 online",
    )
    cache_size: int = option(8, "Registered avatars kept in memory.", ge=1, le=1024)
    max_batch: int | None = option(
        None, "Frames per warp + decode batch, across all of the worker's streams.",
        ge=1, le=64, default_doc="16 on CUDA, else 4",
    )
    max_windows: int | None = option(
        None, "LMDM windows per sampling batch, across all of the worker's streams.",
        ge=1, le=64, default_doc="16 on CUDA, else 4",
    )
    batch_wait_ms: float = option(
        2.0, "How long a lone frame or window waits for others to batch with, in ms.",
        ge=0, le=100,
    )
    window_hold_ms: float = option(
        40.0, "Longest a live session's LMDM window waits for the windows of the other "
        "live sessions of its round, in ms: it runs as soon as every live session that "
        "sent one in the last 0.6 s has sent its next (a batch of 8 windows costs about "
        "what a batch of 2 does; sessions submit theirs in the same tick, from different "
        "threads, spread over tens of ms when the GPU is busy).",
        ge=0, le=1000,
    )
    cuda_graphs: bool | None = option(
        None, "Replay warp + decode and LMDM sampling as CUDA graphs (CUDA only).",
        default_doc="on with CUDA",
    )
    serving_layers: bool = option(
        True, "Swap in serving.py's equivalent, tensor-core friendly layers for warp and "
        "decoder.",
    )
    channels_last: bool = option(False, "Run the decoder in channels-last (NHWC) layout.")
    cudnn_benchmark: bool = option(
        True, "Let cuDNN time its algorithms once per input shape and keep the fastest "
        "(CUDA only).",
    )
    compile: bool | None = option(
        None, "torch.compile warp and decoder (CUDA only; about 80 s more at load; falls back "
        "to eager if compiling fails).", default_doc="on with CUDA",
    )
    warmup: bool = option(
        True, "Run the batch sizes the batchers use once at load (compiled and captured "
        "there, reported as warmup_s), not on a job's first frames.",
    )
    background: str = background_option()

    def __post_init__(self) -> None:
        check_background_option(self)
