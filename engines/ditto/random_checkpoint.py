"""Write a Ditto checkpoint folder in the official layout, filled with RANDOM weights.

    python -m avatard.engines.ditto.random_checkpoint OUT [--seed N] [--eyes]

For testing the checkpoint path (``weights=<folder>``, ``--checkpoints DIR``) end to end
where the official files are not available. The output is noise: never serve it.

Written (paths relative to OUT, as in `checkpoints.py`)::

    ditto_pytorch/models/*.pth              the six networks, each in its official
                                            container, seeded random weights of the
                                            official shapes (the LMDM's from the cfg)
    ditto_cfg/v0.4_hubert_cfg_pytorch.pkl   a plain-dict pipeline config (see `make_cfg`)
    RANDOM_WEIGHTS_TESTING_ONLY.txt         a marker saying so

Not written: the aux models under ``ditto_pytorch/aux_models`` (det_10g.onnx,
2d106det.onnx, landmark203.onnx, hubert_streaming_fix_kv.onnx, face_landmarker.task).
Stand-ins for the four ONNX files come from the test helper ``tests/ditto_fake_aux.py``
(it needs the ``onnx`` package); there is no stand-in for mediapipe's task file, so the
default cfg switches the eye conditions off.

The weights are those the engine's random-weights mode builds for the same seed
(`networks.random_state`), so the networks match ``weights="random"`` with that seed,
except the LMDM's condition projection, whose width follows the cfg. Needs only torch
and numpy.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoints, conditions, networks, synthetic
from .motion_gen import MOTION_LAYOUT
from .registration import AUX_FILES

BANNER = (
    "RANDOM WEIGHTS: this Ditto checkpoint folder holds seeded random weights and a "
    "made-up config, for testing only; its output is noise"
)
MARKER_FILE = "RANDOM_WEIGHTS_TESTING_ONLY.txt"
HUBERT_FILE = "hubert_streaming_fix_kv.onnx"
MOTION_FEAT_DIM = 265
SEQ_FRAMES = 80

# Made-up per-block motion limits for default_kwargs['v_min_max_for_clip'] (rows: min,
# max), in the units of the 265-d motion vector (scale - 1, pose-bin logits, t, exp).
# Wide enough to leave ordinary motion alone, narrow enough to tame random weights.
_CLIP_LIMITS = {"scale": 0.5, "pitch": 20.0, "yaw": 20.0, "roll": 20.0, "t": 0.5, "exp": 0.2}


def clip_limits() -> np.ndarray:
    """(2, 265) float32: row 0 the per-dim minimum, row 1 the maximum."""
    half = np.concatenate([np.full(width, _CLIP_LIMITS[name], np.float32)
                           for name, width in MOTION_LAYOUT])
    return np.stack([-half, half])


def make_cfg(eyes: bool = False) -> dict[str, Any]:
    """The pipeline config as upstream's ``parse_cfg`` reads it (plain dicts, paths relative
    to ``ditto_pytorch/``, upstream's data root), with the keys our loader, registration
    and condition handler read.

    `eyes` false (the default) switches off the eye-openness and eye-ball conditions,
    which need mediapipe's face_landmarker.task: the condition is then audio 1024 + emo 8
    + sc 63 = 1095 wide. With `eyes` all four blocks are on (1103, upstream's default)."""
    aux = {key: f"aux_models/{name}" for key, name in AUX_FILES.items()}
    models = {name: f"models/{filename}"
              for name, (filename, _, _) in checkpoints.CHECKPOINT_FILES.items()}
    onnx_cfg = {"device": "cuda", "force_ori_type": False}
    base_cfg: dict[str, Any] = {
        "insightface_det_cfg": {"model_path": aux["insightface_det_cfg"], **onnx_cfg},
        "landmark106_cfg": {"model_path": aux["landmark106_cfg"], **onnx_cfg},
        "landmark203_cfg": {"model_path": aux["landmark203_cfg"], **onnx_cfg},
        "landmark478_cfg": {"blaze_face_model_path": "", "face_mesh_model_path": "",
                            "task_path": aux["landmark478_cfg"], **onnx_cfg},
        "hubert_cfg": {"model_path": f"aux_models/{HUBERT_FILE}", **onnx_cfg},
    }
    for name in ("appearance_extractor", "motion_extractor", "stitch_network",
                 "warp_network", "decoder"):
        base_cfg[f"{name}_cfg"] = {"model_path": models[name], "device": "cuda"}
    audio2motion_cfg: dict[str, Any] = {
        "model_path": models["lmdm"],
        "device": "cuda",
        "motion_feat_dim": MOTION_FEAT_DIM,
        "seq_frames": SEQ_FRAMES,
        "use_emo": True,
        "use_sc": True,
        "use_eye_open": eyes,
        "use_eye_ball": eyes,
        "w2f_type": "hubert",
    }
    audio2motion_cfg["audio_feat_dim"] = conditions.AUDIO_DIM + conditions.control_width(
        {"audio2motion_cfg": audio2motion_cfg}
    )
    default_kwargs: dict[str, Any] = {
        "max_size": 1920,
        "template_n_frames": -1,
        "crop_scale": 2.3,
        "crop_vx_ratio": 0,
        "crop_vy_ratio": -0.125,
        "crop_flag_do_rot": True,
        "smo_k_s": 13,
        "emo": conditions.DEFAULT_EMOTION,
        "eye_f0_mode": False,
        "overlap_v2": 10,
        "sampling_timesteps": 50,
        "online_mode": False,
        "smo_k_d": 3,
        "v_min_max_for_clip": clip_limits(),
        "relative_d": True,
        "flag_stitching": True,
    }
    cfg = {
        "base_cfg": base_cfg,
        "audio2motion_cfg": audio2motion_cfg,
        "default_kwargs": default_kwargs,
        "note": BANNER,
    }
    conditions.check_width(cfg)
    return cfg


def lmdm_config(cfg: dict[str, Any]) -> dict[str, int]:
    """The LMDM constructor arguments the cfg sets (as the engine reads them)."""
    section = cfg["audio2motion_cfg"]
    return {k: int(section[k]) for k in ("motion_feat_dim", "audio_feat_dim", "seq_frames")}


def container(module: str, state: dict[str, torch.Tensor]) -> Any:
    """`state` wrapped as the official file holds it (see `checkpoints.CHECKPOINT_FILES`).
    The stitching state_dict is written with the 'module.' prefix of a DDP-saved file,
    so the loader's prefix stripping runs too."""
    _, key, ddp_prefix = checkpoints.CHECKPOINT_FILES[module]
    if ddp_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    return state if key is None else {key: state}


def write_random_checkpoint(out: Path | str, seed: int = 0, eyes: bool = False,
                            log=print) -> dict[str, Path]:
    """Write the folder (see the module docstring); returns the written paths by module
    name, plus 'cfg' and 'marker'. Existing files are overwritten."""
    out = Path(out)
    cfg = make_cfg(eyes)
    paths: dict[str, Path] = {}
    for name in synthetic.MODULES:
        state = networks.random_state(name, seed, lmdm_config(cfg) if name == "lmdm" else None)
        path = checkpoints.checkpoint_path(out, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(container(name, state), path)
        params = sum(v.numel() for v in state.values() if v.is_floating_point())
        log(f"  wrote {path} ({params / 1e6:.1f}M random parameters)")
        paths[name] = path
    cfg_path = out / checkpoints.CFG_RELPATH
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_bytes(pickle.dumps(cfg, protocol=4))
    log(f"  wrote {cfg_path}")
    paths["cfg"] = cfg_path
    marker = out / MARKER_FILE
    marker.write_text(
        f"{BANNER}.\n\nWritten by `python -m avatard.engines.ditto.random_checkpoint` "
        f"(seed {seed}, eye conditions {'on' if eyes else 'off'}).\n"
    )
    paths["marker"] = marker
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m avatard.engines.ditto.random_checkpoint",
        description="Write a Ditto checkpoint folder in the official layout with RANDOM "
        "weights, for testing the checkpoint path only.",
    )
    parser.add_argument("out", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--eyes", action="store_true",
        help="switch the eye-openness/eye-ball conditions on (needs mediapipe and a "
        "face_landmarker.task, which this tool does not write)",
    )
    args = parser.parse_args(argv)
    line = "!" * 88
    print(f"{line}\n!! {BANNER}.\n!! Do not serve it.\n{line}", file=sys.stderr)
    write_random_checkpoint(args.out, args.seed, args.eyes)
    aux_dir = args.out / checkpoints.AUX_RELDIR
    print(
        f"{line}\n!! {BANNER}.\n"
        f"!! The aux models were NOT written. Stand-ins for the ONNX files:\n"
        f"!!     python tests/ditto_fake_aux.py {aux_dir}   (needs the onnx package)\n"
        f"!! face_landmarker.task has no stand-in: the cfg's eye conditions are "
        f"{'ON (bring mediapipe and the task file)' if args.eyes else 'off'}.\n{line}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
