"""The condition handler: control features appended to the audio features, and the clipping
of generated motion.

Per frame the LMDM's condition is ``[audio (1024) | emo (8) | eye_open (2) | eye_ball (6)
| sc (63)]``, each control block present only when the cfg's ``audio2motion_cfg`` enables
it (``use_emo``, ``use_eye_open``, ``use_eye_ball``, ``use_sc``; upstream defaults all
four to true, which gives 1024 + 79 = 1103). The LMDM's ``audio_feat_dim`` in the same
section must equal that total; `check_width` verifies it.

- emo: a softmax over 8 logits that are 8 at the chosen emotion labels and 0 elsewhere
  (labels: Angry, Disgust, Fear, Happy, Neutral, Sad, Surprise, Contempt), or rows of an
  (m,8) array used frame by frame, cycling; default ``default_kwargs['emo']`` of the cfg,
  else 4 (Neutral).
- eye_open / eye_ball: the source's eye openness and eye-ball movement (registration's
  mediapipe features), the same for every frame of an image source; for several source
  frames (video) they follow the frame index, mirrored at the ends.
- sc: the source's canonical keypoints (motion extractor ``kp``, 63 values).

Negative frame indices (upstream's online warm-up buffer) count as frame 0.

Clipping: when ``default_kwargs`` holds ``v_min_max_for_clip`` (rows 0 and 1: per-dim
minimum and maximum of the 265-d motion), generated motion is clamped to it where it is
turned into keypoint parameters for stitching; the motion kept for the next window's
reference frame is not clipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

AUDIO_DIM = 1024
EMOTIONS = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise", "Contempt")
DEFAULT_EMOTION = 4  # Neutral
# (name, cfg flag, width) in the order the blocks follow the audio features.
CONTROL_BLOCKS: tuple[tuple[str, str, int], ...] = (
    ("emo", "use_emo", 8),
    ("eye_open", "use_eye_open", 2),
    ("eye_ball", "use_eye_ball", 6),
    ("sc", "use_sc", 63),
)


class ConditionError(ValueError):
    """The cfg, the source or an override cannot make a condition."""


def _section(cfg: Any, name: str) -> Mapping[str, Any]:
    value = cfg.get(name) if isinstance(cfg, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def handler_flags(cfg: Any = None) -> dict[str, bool]:
    """The four ``use_*`` flags from ``cfg['audio2motion_cfg']`` (missing ones: true)."""
    section = _section(cfg, "audio2motion_cfg")
    return {flag: bool(section.get(flag, True)) for _, flag, _ in CONTROL_BLOCKS}


def control_width(cfg: Any = None) -> int:
    """Number of control dims the cfg's flags give (79 with all four)."""
    flags = handler_flags(cfg)
    return sum(width for _, flag, width in CONTROL_BLOCKS if flags[flag])


def check_width(cfg: Any) -> int:
    """1024 + control width; raises if the cfg's ``audio_feat_dim`` says otherwise."""
    total = AUDIO_DIM + control_width(cfg)
    declared = _section(cfg, "audio2motion_cfg").get("audio_feat_dim")
    if declared is not None and int(declared) != total:
        flags = handler_flags(cfg)
        raise ConditionError(
            f"cfg audio2motion_cfg.audio_feat_dim is {int(declared)} but the condition "
            f"handler's flags {flags} give {AUDIO_DIM} + {total - AUDIO_DIM} = {total}"
        )
    return total


def default_kwargs(cfg: Any) -> Mapping[str, Any]:
    """The cfg's ``default_kwargs`` (upstream's run-time defaults), or {}."""
    return _section(cfg, "default_kwargs")


# --------------------------------------------------------------------------- emotion


def emotion_vector(labels: int | list[int] | tuple[int, ...]) -> np.ndarray:
    """(8,) float32: softmax of logits that are 8 at `labels` and 0 elsewhere."""
    labels = [labels] if isinstance(labels, Integral) else list(labels)
    logits = np.zeros(len(EMOTIONS), np.float64)
    for label in labels:
        if not isinstance(label, Integral) or not 0 <= int(label) < len(EMOTIONS):
            raise ConditionError(f"emotion label {label!r} is not in 0..7 ({EMOTIONS})")
        logits[int(label)] = 8.0
    e = np.exp(logits - logits.max())
    return (e / e.sum()).astype(np.float32)


def parse_emotion(emo: Any) -> np.ndarray:
    """(m,8) emotion rows from: an int label; a list/tuple of 1..7 int labels (mixed);
    a list of label lists (one row each); or an (m,8) array (used as it is)."""
    if isinstance(emo, np.ndarray) and emo.ndim == 2 and emo.shape[1] == len(EMOTIONS):
        return emo.astype(np.float32)
    if isinstance(emo, Integral) and not isinstance(emo, bool):
        return emotion_vector(int(emo))[None]
    if isinstance(emo, list | tuple) and emo:
        if all(isinstance(x, Integral) for x in emo) and len(emo) < len(EMOTIONS):
            return emotion_vector(list(emo))[None]
        if all(isinstance(x, list | tuple) for x in emo):
            return np.stack([emotion_vector(list(x)) for x in emo])
    raise ConditionError(f"unsupported emotion value {emo!r}")


# --------------------------------------------------------------------------- source


@dataclass
class ConditionSource:
    """What the condition handler needs from a registered source."""

    sc: np.ndarray  # (63,) canonical keypoints of the (first) source frame
    eye_open: np.ndarray | None = None  # (k,2), one row per source frame
    eye_ball: np.ndarray | None = None  # (k,6)

    @classmethod
    def from_registration(cls, registration: Any, motion_info: Mapping[str, np.ndarray]
                          ) -> ConditionSource:
        """From a `registration.Registration` and the motion extractor's outputs for its
        crop (``kp`` (1,63))."""
        def rows(value: Any, width: int) -> np.ndarray | None:
            return None if value is None else np.asarray(value, np.float32).reshape(-1, width)

        return cls(
            sc=np.asarray(motion_info["kp"], np.float32).reshape(-1)[:63],
            eye_open=rows(getattr(registration, "eye_open", None), 2),
            eye_ball=rows(getattr(registration, "eye_ball", None), 6),
        )


def _mirror(index: int, size: int) -> int:
    turn, rest = divmod(index, size)
    return rest if turn % 2 == 0 else size - rest - 1


def _source_rows(values: np.ndarray | None, name: str, width: int, frames: np.ndarray,
                 first_only: bool) -> np.ndarray:
    if values is None:
        raise ConditionError(
            f"the cfg uses the {name} condition but the source has no {name} values "
            f"(registration computes them with mediapipe's face_landmarker.task)"
        )
    values = np.asarray(values, np.float32).reshape(-1, width)
    if first_only or len(values) == 1:
        return np.repeat(values[:1], len(frames), axis=0)
    return values[[_mirror(int(i), len(values)) for i in frames]]


def control_dims(cfg: Any, source: ConditionSource, n_frames: int, start: int = 0,
                 emo: Any = None, eye_f0_mode: bool | None = None) -> np.ndarray:
    """(n_frames, control_width(cfg)) float32 control features for frames
    ``start .. start + n_frames - 1`` (absolute frame indices of the clip).

    `emo` and `eye_f0_mode` override the cfg's ``default_kwargs`` (defaults 4 and false;
    `eye_f0_mode` uses the first source frame's eye values throughout)."""
    flags = handler_flags(cfg)
    defaults = default_kwargs(cfg)
    if emo is None:
        emo = defaults.get("emo", DEFAULT_EMOTION)
    if eye_f0_mode is None:
        eye_f0_mode = bool(defaults.get("eye_f0_mode", False))
    frames = np.maximum(np.arange(start, start + n_frames), 0)
    blocks = []
    for name, flag, width in CONTROL_BLOCKS:
        if not flags[flag]:
            continue
        if name == "emo":
            rows = parse_emotion(emo)
            block = rows[frames % len(rows)]
        elif name == "sc":
            sc = np.asarray(source.sc, np.float32).reshape(-1)
            if sc.size != width:
                raise ConditionError(f"sc has {sc.size} values, expected {width}")
            block = np.repeat(sc[None], n_frames, axis=0)
        else:
            block = _source_rows(getattr(source, name), name, width, frames, eye_f0_mode)
        blocks.append(block.astype(np.float32))
    if not blocks:
        return np.zeros((n_frames, 0), np.float32)
    return np.concatenate(blocks, axis=1)


def build_condition(audio: np.ndarray, cfg: Any, source: ConditionSource, start: int = 0,
                    **overrides: Any) -> np.ndarray:
    """(n, 1024) audio features of frames start.. -> (n, 1024 + control width) condition."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 2 or audio.shape[1] != AUDIO_DIM:
        raise ConditionError(f"audio features are {audio.shape}, expected (n, {AUDIO_DIM})")
    controls = control_dims(cfg, source, len(audio), start, **overrides)
    return np.concatenate([audio, controls], axis=1)


# --------------------------------------------------------------------------- clipping


def clip_limits(cfg_or_limits: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(v_min, v_max) from a cfg (``default_kwargs['v_min_max_for_clip']``) or from the
    array itself (rows 0 and 1); None when the cfg has none."""
    if isinstance(cfg_or_limits, Mapping):
        value = default_kwargs(cfg_or_limits).get("v_min_max_for_clip")
    else:
        value = cfg_or_limits
    if value is None:
        return None
    arr = np.asarray(value, np.float32)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ConditionError(f"v_min_max_for_clip is {arr.shape}, expected (>=2, dims)")
    return arr[0], arr[1]


def clip_motion(motion: np.ndarray, cfg_or_limits: Any) -> np.ndarray:
    """Clamp motion vectors (..., 265) per dim to the cfg's limits (a copy; unchanged
    when the cfg has no ``v_min_max_for_clip``)."""
    motion = np.asarray(motion)
    limits = clip_limits(cfg_or_limits)
    if limits is None:
        return motion.copy()
    v_min, v_max = limits
    if motion.shape[-1] != v_min.shape[0]:
        raise ConditionError(
            f"motion has {motion.shape[-1]} dims, v_min_max_for_clip has {v_min.shape[0]}"
        )
    return np.clip(motion, v_min, v_max).astype(motion.dtype, copy=False)
