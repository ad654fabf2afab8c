"""Write a Ditto checkpoint folder in the official layout, filled with RANDOM weights.

    python -m avatard.engines.ditto.random_checkpoint OUT [--seed N] [--no-template]

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
(it needs the ``onnx`` package); there is no stand-in for mediapipe's task file and none
is needed: the cfg's template ``ch_info`` supplies the eye conditions (with
``--no-template`` they are off).

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
    """(4, 265) float32 like the released cfg's ``v_min_max_for_clip``: rows 0 and 1 the
    per-dim minimum and maximum (the only rows upstream reads), rows 2 and 3 a mean and
    a spread."""
    half = np.concatenate([np.full(width, _CLIP_LIMITS[name], np.float32)
                           for name, width in MOTION_LAYOUT])
    return np.stack([-half, half, np.zeros_like(half), half / 2])


def template_info(seed: int = 0) -> dict[str, np.ndarray]:
    """A made-up canonical template frame in the motion extractor's format: a frontal
    pose (bin logits peaked at 0 degrees), small translation and expression, scale 1.4."""
    rng = np.random.default_rng(seed)
    bins = -((np.arange(66, dtype=np.float32) - 32.5) ** 2) / 8  # peaked at 0 degrees
    return {
        "pitch": bins[None].copy(), "yaw": bins[None].copy(), "roll": bins[None].copy(),
        "t": (0.01 * rng.standard_normal((1, 3))).astype(np.float32),
        "exp": (0.01 * rng.standard_normal((1, 63))).astype(np.float32),
        "scale": np.array([[1.4]], np.float32),
        "kp": (0.3 * rng.standard_normal((1, 63))).astype(np.float32),
    }


def blink_array(frames: int = 15) -> np.ndarray:
    """(frames, 63) float32: a scripted blink as expression offsets on the eye rows (11,
    13, 15, 16, 18 of the 21 x 3 expression), closing the eyes (negative y) with a sin^2
    profile; row 0, used between blinks, is small but not zero, as in the released cfg."""
    phase = (np.arange(frames, dtype=np.float32) + 0.5) / frames
    amplitude = -0.03 * np.sin(np.pi * phase) ** 2
    arr = np.zeros((frames, 21, 3), np.float32)
    arr[:, [11, 13, 15, 16, 18], 1] = amplitude[:, None]
    return arr.reshape(frames, 63)


def make_cfg(template: bool = True) -> dict[str, Any]:
    """The pipeline config as upstream's ``parse_cfg`` reads it (plain dicts, paths relative
    to ``ditto_pytorch/``, upstream's data root), with the structure of the released cfg:
    every ``default_kwargs`` key upstream's setup reads, the canonical template
    ``ch_info`` (made up, see `template_info`), a scripted blink ``delta_eye_arr``
    (15 x 63), 4 x 265 clip limits, ``fix_kp_cond``, ``overall_ctrl_info`` (delta_pitch 2).

    With the template the four condition blocks are on (1024 + 8 + 2 + 6 + 63 = 1103, the
    released width) and the eye conditions come from the template, so registration needs
    no eye features. `template` false leaves ``ch_info`` out and switches the eye
    conditions off (they would need mediapipe's face_landmarker.task): 1095 wide."""
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
        "use_eye_open": template,
        "use_eye_ball": template,
        "w2f_type": "hubert",
    }
    audio2motion_cfg["audio_feat_dim"] = conditions.AUDIO_DIM + conditions.control_width(
        {"audio2motion_cfg": audio2motion_cfg}
    )
    default_kwargs: dict[str, Any] = {
        "online_mode": False,
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
        "fix_kp_cond": 1,
        "fix_kp_cond_dim": [0, 202],
        "sampling_timesteps": 50,
        "v_min_max_for_clip": clip_limits(),
        "smo_k_d": 3,
        "N_d": -1,
        "use_d_keys": None,
        "relative_d": True,
        "drive_eye": None,
        "delta_eye_arr": blink_array(),
        "delta_eye_open_n": 0,
        "fade_type": "d0",
        "fade_out_keys": ["exp"],
        "flag_stitching": True,
        "overall_ctrl_info": {"delta_pitch": 2},
    }
    if template:
        info = template_info()
        default_kwargs["ch_info"] = {
            "x_s_info_lst": [info],
            "sc": info["kp"].reshape(63).copy(),  # 1-D: upstream stacks it per frame
            "eye_open_lst": [np.array([[0.35, 0.35]], np.float32)],
            "eye_ball_lst": [np.zeros((1, 6), np.float32)],
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


def write_random_checkpoint(out: Path | str, seed: int = 0, template: bool = True,
                            log=print) -> dict[str, Path]:
    """Write the folder (see the module docstring); returns the written paths by module
    name, plus 'cfg' and 'marker'. Existing files are overwritten."""
    out = Path(out)
    cfg = make_cfg(template)
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
        f"(seed {seed}, {'template ch_info' if template else 'no template, eye conditions off'}).\n"
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
        "--no-template", action="store_true",
        help="leave the canonical template ch_info out; the eye conditions are then off "
        "(they would need mediapipe and a face_landmarker.task, which this tool does not "
        "write)",
    )
    args = parser.parse_args(argv)
    line = "!" * 88
    print(f"{line}\n!! {BANNER}.\n!! Do not serve it.\n{line}", file=sys.stderr)
    write_random_checkpoint(args.out, args.seed, not args.no_template)
    aux_dir = args.out / checkpoints.AUX_RELDIR
    print(
        f"{line}\n!! {BANNER}.\n"
        f"!! The aux models were NOT written. Stand-ins for the ONNX files:\n"
        f"!!     python tests/ditto_fake_aux.py {aux_dir}   (needs the onnx package)\n"
        f"!! face_landmarker.task has no stand-in and none is needed: "
        f"{'the eye conditions are off' if args.no_template else 'the template has them'}"
        f".\n{line}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
