"""The run-time settings of upstream's `StreamSDK.setup` (the cfg's ``default_kwargs``, then
the engine's overrides), the canonical template ``ch_info``, the blink schedule and the
motion stitch (numpy; the stitching network is applied by the caller).

Which keys are honoured is listed in `HONOURED`; `PipelineConfig.unhonoured` names the
keys of a cfg that we read but do not reproduce (the engine warns once at load and puts
them in its report). Engine options override cfg values (`PipelineConfig.overrides`
says which).

Upstream's offline and online pipelines differ only in the settings they run with: the
released cfgs set ``online_mode``, ``overlap_v2`` and ``sampling_timesteps`` per mode.
With one cfg we derive the other mode's three values from `MODE_DEFAULTS` (upstream's
online scheme: overlap 70, 10 DDIM steps) unless the cfg's ``online_mode`` already
matches the mode asked for.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import conditions
from .keypoints import bins_to_degrees, transform_keypoints
from .motion_gen import MOTION_DIM, MotionSettings, info_to_vector, vectors_to_info

MODES = ("offline", "online")
# Values a mode brings when the cfg was written for the other one.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "offline": {"online_mode": False, "overlap_v2": 10, "sampling_timesteps": 50},
    "online": {"online_mode": True, "overlap_v2": 70, "sampling_timesteps": 10},
}
BLINK_FRAMES_UNKNOWN_N = 3000  # upstream's schedule length when the clip length is unknown
OPEN_MIN, OPEN_MAX = 60, 100  # frames the eyes stay open between scripted blinks
LIP_ROWS = (6, 12, 14, 17, 19, 20)  # rows of the 21x3 expression driven by the audio
EYE_ROWS = (11, 13, 15, 16, 18)

# Every default_kwargs key upstream's setup reads, and where we honour it.
HONOURED = {
    "max_size": "registration", "crop_scale": "registration",
    "crop_vx_ratio": "registration (upstream's crop helper drops it too)",
    "crop_vy_ratio": "registration", "crop_flag_do_rot": "registration",
    "template_n_frames": "video sources only (not supported; no effect on an image)",
    "smo_k_s": "video sources only (not supported; no effect on an image)",
    "emo": "conditions", "eye_f0_mode": "conditions", "ch_info": "conditions, stitch",
    "overlap_v2": "motion", "fix_kp_cond": "motion", "fix_kp_cond_dim": "motion",
    "sampling_timesteps": "sampler", "online_mode": "mode", "v_min_max_for_clip": "clip",
    "smo_k_d": "motion", "N_d": "blinks", "use_d_keys": "stitch", "relative_d": "stitch",
    "drive_eye": "stitch", "delta_eye_arr": "blinks", "delta_eye_open_n": "blinks",
    "fade_type": "no effect without per-frame fade_alpha (ctrl_info)",
    "fade_out_keys": "no effect without per-frame fade_alpha (ctrl_info)",
    "flag_stitching": "stitch", "overall_ctrl_info": "stitch (delta_*, alpha_*, delta_exp)",
}
# Read by upstream but not reproduced here, when present with a value that acts.
NOT_HONOURED = ("ctrl_info",)
OVERALL_CONTROLS = ("delta_pitch", "delta_yaw", "delta_roll", "alpha_pitch", "alpha_yaw",
                    "alpha_roll", "delta_exp")


@dataclass(frozen=True)
class Template:
    """The canonical character of ``ch_info`` (or, without one, the avatar itself): what
    the LMDM is conditioned on and what the driving deltas are scaled against."""

    vector: np.ndarray  # (265,) first reference frame x_s_info_lst[0] as a motion vector
    sc: np.ndarray  # (63,)
    eye_open: np.ndarray | None  # (k,2)
    eye_ball: np.ndarray | None  # (k,6)
    scale: float

    @classmethod
    def from_ch_info(cls, ch_info: Mapping[str, Any]) -> Template:
        try:
            first = ch_info["x_s_info_lst"][0]
            return cls(
                vector=info_to_vector(first),
                sc=np.asarray(ch_info["sc"], np.float32).reshape(-1),
                eye_open=_rows(ch_info.get("eye_open_lst"), 2),
                eye_ball=_rows(ch_info.get("eye_ball_lst"), 6),
                scale=float(np.asarray(first["scale"]).reshape(-1)[0]),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise conditions.ConditionError(f"default_kwargs.ch_info is malformed: {exc!r}"
                                            ) from None

    def condition_source(self) -> conditions.ConditionSource:
        return conditions.ConditionSource(sc=self.sc, eye_open=self.eye_open,
                                          eye_ball=self.eye_ball)


def _rows(value: Any, width: int) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        value = np.concatenate([np.asarray(v, np.float32).reshape(-1, width) for v in value])
    return np.asarray(value, np.float32).reshape(-1, width)


@dataclass(frozen=True)
class PipelineConfig:
    """Upstream's setup keyword arguments after merging: cfg default_kwargs < mode
    defaults (when the cfg is for the other mode) < engine overrides."""

    mode: str
    motion: MotionSettings
    sampling_timesteps: int
    clip: tuple[np.ndarray, np.ndarray] | None
    template: Template | None  # None: no ch_info, the avatar is its own template
    emo: Any
    eye_f0_mode: bool
    n_d: int
    use_d_keys: Any
    relative_d: bool
    drive_eye: bool | None
    delta_eye_arr: np.ndarray | None
    delta_eye_open_n: int | list[int]
    flag_stitching: bool
    overall_ctrl: dict[str, Any]
    overrides: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key: (cfg, used)
    unhonoured: tuple[str, ...] = ()

    @classmethod
    def from_cfg(cls, cfg: Any, mode: str = "offline", seq_frames: int = 80,
                 overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        given = dict(conditions.default_kwargs(cfg))
        kw = dict(given)
        if bool(kw.get("online_mode", False)) != (mode == "online"):
            kw.update(MODE_DEFAULTS[mode])
        changed: dict[str, tuple[Any, Any]] = {}
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key in given and _same(given[key], value):
                continue
            changed[key] = (given.get(key), value)
            kw[key] = value
        for key in MODE_DEFAULTS[mode]:
            if key in given and not _same(given[key], kw[key]) and key not in changed:
                changed[key] = (given[key], kw[key])
        dim = kw.get("fix_kp_cond_dim")
        motion = MotionSettings(
            seq_frames=seq_frames,
            overlap=int(kw.get("overlap_v2", 10)),
            online=bool(kw.get("online_mode", False)),
            smooth_kernel=int(kw.get("smo_k_d", 3)),
            fix_kp_cond=int(kw.get("fix_kp_cond", 0)),
            fix_kp_cond_dim=None if dim is None else (int(dim[0]), int(dim[1])),
        )
        ch_info = kw.get("ch_info")
        delta_eye = kw.get("delta_eye_arr")
        unhonoured = [k for k in NOT_HONOURED if kw.get(k)]
        overall = dict(kw.get("overall_ctrl_info") or {})
        # Upstream merges these into every frame's controls; we reproduce the pose and
        # expression offsets and gains, not per-frame fades or VAD gating.
        unhonoured += [f"overall_ctrl_info.{k}" for k in overall if k not in OVERALL_CONTROLS]
        return cls(
            mode=mode,
            motion=motion,
            sampling_timesteps=int(kw.get("sampling_timesteps", 50)),
            clip=conditions.clip_limits(kw["v_min_max_for_clip"])
            if kw.get("v_min_max_for_clip") is not None else None,
            template=Template.from_ch_info(ch_info) if ch_info is not None else None,
            emo=kw.get("emo", conditions.DEFAULT_EMOTION),
            eye_f0_mode=bool(kw.get("eye_f0_mode", False)),
            n_d=int(kw.get("N_d", -1)),
            use_d_keys=kw.get("use_d_keys"),
            relative_d=bool(kw.get("relative_d", True)),
            drive_eye=kw.get("drive_eye"),
            delta_eye_arr=None if delta_eye is None else np.asarray(delta_eye, np.float32),
            delta_eye_open_n=kw.get("delta_eye_open_n", 0),
            flag_stitching=bool(kw.get("flag_stitching", True)),
            overall_ctrl={k: v if k == "delta_exp" else float(v)
                          for k, v in overall.items() if k in OVERALL_CONTROLS},
            overrides=changed,
            unhonoured=tuple(unhonoured),
        )

    def describe_overrides(self) -> list[str]:
        return [f"{k}={used!r} (cfg {cfg!r})" for k, (cfg, used) in sorted(self.overrides.items())]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except Exception:
        return a == b


# --------------------------------------------------------------------------- blinks


def blink_schedule(n: int, blink_frames: int, open_n: int | Sequence[int],
                   randint: Callable[[int, int], int]) -> np.ndarray:
    """Upstream's `_set_eye_blink_idx`: (n,) rows of the blink array per frame (0 outside a
    blink). `open_n` -1: no blink; 0: open for randint(60, 100) frames between blinks; > 0
    or a list: fixed (cycled) open intervals. `randint` is python's `random.randint` of
    the job's own generator (tests feed recorded draws)."""
    idx = np.zeros(n, np.int64)
    if isinstance(open_n, int | np.integer):
        if open_n < 0:
            return idx
        opens = [int(open_n)] if open_n > 0 else []
    else:
        opens = [int(v) for v in open_n]
    start = opens[0] if opens else randint(OPEN_MIN, OPEN_MAX)
    guard = opens[-1] if opens else randint(OPEN_MIN, OPEN_MAX)
    last = n - max(guard, blink_frames)
    position, count = start, 1
    while position < last:
        span = idx[position : position + blink_frames]
        span[:] = np.arange(blink_frames)[: len(span)]
        if opens:
            gap = opens[count % len(opens)]
            count += 1
        else:
            gap = randint(OPEN_MIN, OPEN_MAX)
        position += blink_frames + gap
    return idx


def job_randint(seed: int) -> Callable[[int, int], int]:
    """randint of a python generator of the job's own (never the global one)."""
    return random.Random(seed).randint


# --------------------------------------------------------------------------- stitch


@dataclass(frozen=True)
class StitchSource:
    """The avatar's side of the motion stitch (upstream `MotionStitch.setup`)."""

    info: dict[str, np.ndarray]  # motion-extractor outputs of the avatar, (1,k) each
    x_s: np.ndarray  # (1,21,3)
    yaw_pitch: tuple[float, float]  # degrees

    @classmethod
    def from_info(cls, info: Mapping[str, np.ndarray]) -> StitchSource:
        info = {k: np.asarray(v, np.float32).reshape(1, -1) for k, v in info.items()}
        return cls(info, transform_keypoints(info),
                   (float(bins_to_degrees(info["yaw"])[0]),
                    float(bins_to_degrees(info["pitch"])[0])))


def clip_motion(motion: np.ndarray, limits: tuple[np.ndarray, np.ndarray] | None
                ) -> np.ndarray:
    motion = np.asarray(motion, np.float32)
    if limits is None:
        return motion.copy()
    return np.clip(motion, limits[0], limits[1]).astype(np.float32)


def driving_keypoints(cfg: PipelineConfig, source: StitchSource, motion_clipped: np.ndarray,
                      d0: np.ndarray | None, blink_rows: np.ndarray | None) -> np.ndarray:
    """x_d before the stitching network (N,21,3) for N clipped motion frames, as upstream's
    `MotionStitch.__call__` for an image source: relative motion (scaled by template scale
    / avatar scale when ch_info is set), lips from the driving expression, the rest from
    the avatar, scripted blinks added to the eye rows, overall controls (delta_pitch ...),
    gaze fix, keypoint transform."""
    motion = np.asarray(motion_clipped, np.float32).reshape(-1, MOTION_DIM)
    n = len(motion)
    if n == 0:
        return np.zeros((0, 21, 3), np.float32)
    src = source.info
    drv = vectors_to_info(motion)
    keys = cfg.use_d_keys if cfg.use_d_keys is not None else ("exp", "pitch", "yaw", "roll", "t")
    if cfg.template is not None:
        ratio = cfg.template.scale / float(src["scale"].reshape(-1)[0])
        if ratio != 1:
            if isinstance(keys, Mapping):
                keys = {k: v * (ratio if k in ("exp", "pitch", "yaw", "roll") else 1)
                        for k, v in keys.items()}
            else:
                keys = {k: ratio if k in ("exp", "pitch", "yaw", "roll") else 1 for k in keys}
    info: dict[str, np.ndarray] = {}
    # Upstream's online worker sets d0 itself, so online motion is relative whatever
    # relative_d says.
    relative = (cfg.relative_d or cfg.motion.online) and d0 is not None
    if relative:
        ref = vectors_to_info(np.asarray(d0, np.float32).reshape(1, -1))
        for k, v in drv.items():
            weight = keys.get(k, 1) if isinstance(keys, Mapping) else 1
            info[k] = src[k] + (v - ref[k]) * weight
    else:
        info = dict(drv)
    for k, v in src.items():
        if k not in info or k not in keys:
            info[k] = np.repeat(v, n, axis=0)
    if isinstance(keys, Mapping) and not relative:
        for k, weight in keys.items():
            info[k] = info[k] * weight
    # Expression rows: lips driven, the rest the avatar's; eyes scripted or driven.
    drive_eye = True if cfg.drive_eye is None else bool(cfg.drive_eye)
    lips = np.zeros((21, 3), np.float32)
    lips[list(LIP_ROWS)] = 1
    eyes = np.zeros((21, 3), np.float32)
    scripted = drive_eye and cfg.delta_eye_arr is not None
    if drive_eye and not scripted:
        lips[list(EYE_ROWS)] = 1
    if scripted:
        eyes[list(EYE_ROWS)] = 1
    a1, a3 = lips.reshape(1, -1), eyes.reshape(1, -1)
    a1, a2 = a1 * (1 - a3), (1 - a1) + a1 * a3
    delta_eye = 0.0
    if scripted:
        assert cfg.delta_eye_arr is not None and blink_rows is not None
        delta_eye = cfg.delta_eye_arr[np.asarray(blink_rows)].reshape(n, -1)
    info["exp"] = info["exp"] * a1 + src["exp"] * a2 + delta_eye * a3
    # Overall controls (upstream's ctrl_motion): angles become degrees where offset.
    ctrl = cfg.overall_ctrl
    for name in ("pitch", "yaw", "roll"):
        if f"delta_{name}" in ctrl:
            info[name] = bins_to_degrees(info[name]) + ctrl[f"delta_{name}"]
    for name in ("pitch", "yaw", "roll"):
        if f"alpha_{name}" in ctrl:
            info[name] = info[name] * ctrl[f"alpha_{name}"]
    if "delta_exp" in ctrl:
        info["exp"] = info["exp"] + np.asarray(ctrl["delta_exp"], np.float32).reshape(1, -1)
    if drive_eye:
        info["exp"] = _fix_gaze(info, source.yaw_pitch)
    return transform_keypoints(info)


def _fix_gaze(info: dict[str, np.ndarray], yaw_pitch: tuple[float, float]) -> np.ndarray:
    """Shift the eye-ball expression entries with the head's yaw/pitch change so the gaze
    follows the head (upstream's ratios and coefficients), for N frames at once."""
    exp = np.array(info["exp"], dtype=np.float32)
    yaw_s, pitch_s = yaw_pitch
    dx = (np.asarray(bins_to_degrees(info["yaw"]), np.float64).reshape(-1) - yaw_s) * 0.26
    dy = (np.asarray(bins_to_degrees(info["pitch"]), np.float64).reshape(-1) - pitch_s) * 0.28
    right = dx > 0
    exp[:, 33] += dx * np.where(right, 0.0007, 0.001)
    exp[:, 45] += dx * np.where(right, 0.001, 0.0007)
    exp[:, 34] += dy * -0.001
    exp[:, 46] += dy * -0.001
    return exp
