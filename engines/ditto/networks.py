"""The six Ditto networks together, built from synthetic, random or official weights, and
the per-frame pipeline functions that use them (shared by `verify` and the engine).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoints, synthetic
from .appearance import AppearanceFeatureExtractor
from .decoder import SPADEDecoder
from .keypoints import transform_keypoints
from .lmdm import LMDM
from .motion import MotionExtractor
from .stitching import StitchingNetwork
from .warp import WarpingNetwork

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_LMDM_CONFIG = {
    "motion_feat_dim": 265,
    "audio_feat_dim": 1059,
    "seq_frames": 80,
    "latent_dim": 512,
    "ff_size": 1024,
    "num_layers": 8,
    "num_heads": 8,
    "n_timestep": 1000,
    "guidance_weight": 2,
    "ddim_eta": 1,
}


def build_module(name: str, lmdm_config: Mapping[str, object] | None = None) -> nn.Module:
    """A freshly constructed (untrained) network by manifest module name."""
    if name == "appearance_extractor":
        return AppearanceFeatureExtractor()
    if name == "motion_extractor":
        return MotionExtractor()
    if name == "warp_network":
        return WarpingNetwork()
    if name == "decoder":
        return SPADEDecoder()
    if name == "stitch_network":
        return StitchingNetwork()
    if name == "lmdm":
        return LMDM(**{**DEFAULT_LMDM_CONFIG, **dict(lmdm_config or {})})
    raise KeyError(f"unknown Ditto network {name!r}")


def weight_target(module: nn.Module) -> nn.Module:
    """The part of a network whose state_dict is in the checkpoint (LMDM: its denoiser)."""
    return module.model if isinstance(module, LMDM) else module


def place(module: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    """Eval mode on `device`; weights in `dtype` (the LMDM's noise schedule stays float32)."""
    module = module.to(device).eval()
    if not isinstance(module, StitchingNetwork):
        # The stitching MLP stays float32: it costs nothing, and its output keypoints
        # steer the whole warp (bf16 would move them by ~1e-3 relative).
        weight_target(module).to(dtype)
    return module


@dataclass
class SyntheticSource:
    """Where the synthetic weights come from. The constants file is only read for
    networks with constant buffers (the LMDM)."""

    manifest_dir: Path
    constants_path: Path | None = None


@functools.lru_cache(maxsize=8)
def _synthetic_state(manifest_path: str, constants_path: str | None) -> dict[str, torch.Tensor]:
    # Building the 55M-parameter decoder (with 16 SVDs) takes seconds: reuse per process.
    manifest = synthetic.load_manifest(manifest_path)
    needs_constants = any(e.synthetic == "constant" for e in manifest.entries)
    if needs_constants and constants_path is None:
        raise FileNotFoundError(
            f"{manifest.module}: synthetic weights need {synthetic.CONSTANTS_FILE}"
        )
    constants = synthetic.load_constants(constants_path) if needs_constants else None
    return synthetic.build_state_dict(manifest, constants)


def synthetic_module(
    name: str, source: SyntheticSource, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Network `name` with the reference synthetic weights, strictly loaded."""
    manifest_path = source.manifest_dir / f"{name}.json"
    manifest = synthetic.load_manifest(manifest_path)
    module = build_module(name, manifest.config)
    constants = str(source.constants_path) if source.constants_path else None
    state = _synthetic_state(str(manifest_path), constants)
    checkpoints.load_into(weight_target(module), state, f"synthetic {name}")
    return place(module, device, dtype)


def module_state_template(module: nn.Module) -> synthetic.Manifest:
    """A manifest made from a module's own state_dict (for random weights without the
    shared manifests at run time)."""
    entries = []
    for key, value in module.state_dict().items():
        if key.endswith("rotary.freqs"):
            kind = "constant"
        elif key.endswith(("weight_u", "weight_v")):
            kind = "spectral_uv"
        else:
            kind = "scheme"
        dtype = str(value.dtype).removeprefix("torch.")
        entries.append(synthetic.ManifestEntry(key, tuple(value.shape), dtype, kind))
    return synthetic.Manifest("", "", "", 0, tuple(entries), {})


def random_state(
    name: str, seed: int, lmdm_config: Mapping[str, object] | None = None
) -> dict[str, torch.Tensor]:
    """Seeded random weights for network `name`, shaped like its checkpoint's state_dict
    (the LMDM's: its denoiser, sized by `lmdm_config`). The shapes come from the module
    itself, so no manifest is needed; the values are those the engine's random-weights
    mode builds for the same seed."""
    target = weight_target(build_module(name, lmdm_config))
    return synthetic.random_state_dict(module_state_template(target), seed)


def random_module(
    name: str, manifest: synthetic.Manifest, seed: int, device: str, dtype: torch.dtype
) -> nn.Module:
    """Network `name` with seeded random weights (benchmarking only)."""
    module = build_module(name, manifest.config)
    checkpoints.load_into(
        weight_target(module), synthetic.random_state_dict(manifest, seed), f"random {name}"
    )
    return place(module, device, dtype)


def checkpoint_module(
    name: str,
    root: Path | str,
    device: str,
    dtype: torch.dtype,
    lmdm_config: Mapping[str, object] | None = None,
) -> nn.Module:
    """Network `name` from the official checkpoint folder `root`."""
    module = build_module(name, lmdm_config)
    checkpoints.load_checkpoint(module, root, name)
    return place(module, device, dtype)


# ------------------------------------------------------------------ pipeline functions


def to_tensor(array: np.ndarray, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _params(module: nn.Module) -> tuple[str, torch.dtype]:
    p = next(weight_target(module).parameters())
    return str(p.device), p.dtype


@torch.inference_mode()
def appearance_feature(model: AppearanceFeatureExtractor, image: np.ndarray) -> np.ndarray:
    """(1,3,256,256) RGB [0,1] -> (1,32,16,64,64) float32."""
    device, dtype = _params(model)
    return to_numpy(model(to_tensor(image, device, dtype)))


@torch.inference_mode()
def motion_info(model: MotionExtractor, image: np.ndarray) -> dict[str, np.ndarray]:
    """(1,3,256,256) RGB [0,1] -> pitch/yaw/roll/t/exp/scale/kp as float32 numpy."""
    device, dtype = _params(model)
    return {k: to_numpy(v) for k, v in model.extract(to_tensor(image, device, dtype)).items()}


@torch.inference_mode()
def stitch(model: StitchingNetwork, x_s: np.ndarray, x_d: np.ndarray) -> np.ndarray:
    device, dtype = _params(model)
    return to_numpy(model(to_tensor(x_s, device, dtype), to_tensor(x_d, device, dtype)))


@torch.inference_mode()
def warp_feature(
    model: WarpingNetwork, feature_3d: np.ndarray | torch.Tensor, x_s: np.ndarray, x_d: np.ndarray
) -> torch.Tensor:
    """Warped 2D feature (1,256,64,64), left on the device for the decoder. Keypoints go
    in as float32 whatever the weights' dtype: the warp does its coordinate maths in
    float32, and bf16 would round keypoints to ~1/10 of a feature-grid cell."""
    device, dtype = _params(model)
    if isinstance(feature_3d, np.ndarray):
        feature_3d = to_tensor(feature_3d, device, dtype)
    kp_s = to_tensor(x_s, device, torch.float32)
    kp_d = to_tensor(x_d, device, torch.float32)
    return model(feature_3d.to(device, dtype), kp_s, kp_d)


@torch.inference_mode()
def decode(model: SPADEDecoder, feature: np.ndarray | torch.Tensor) -> np.ndarray:
    """(1,256,64,64) -> (1,3,512,512) float32 in [0,1]."""
    device, dtype = _params(model)
    if isinstance(feature, np.ndarray):
        feature = to_tensor(feature, device, dtype)
    return to_numpy(model(feature.to(device, dtype)))


def render_frame(
    warp: WarpingNetwork,
    decoder: SPADEDecoder,
    feature_3d: np.ndarray | torch.Tensor,
    source_info: Mapping[str, np.ndarray],
    driving_info: Mapping[str, np.ndarray],
    stitching: StitchingNetwork | None = None,
) -> np.ndarray:
    """Keypoint transform -> (optional stitching) -> warp -> decode: (1,3,512,512)."""
    x_s = transform_keypoints(source_info)
    x_d = transform_keypoints(driving_info)
    if stitching is not None:
        x_d = stitch(stitching, x_s, x_d)
    return decode(decoder, warp_feature(warp, feature_3d, x_s, x_d))
