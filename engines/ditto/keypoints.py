"""Keypoint maths of the per-frame pipeline (numpy, no weights).

The motion extractor gives head pose as 66-bin logits per angle; a softmax expectation
over the bin indices, times 3, minus 97.5 gives degrees (bins of 3 degrees covering
-97.5..100.5). The implicit keypoints of a frame are

    x = scale * (kp @ R + exp) + t        (t added to x and y only)

with R built from pitch (about x), yaw (about y) and roll (about z) as (Rz Ry Rx)^T, so
``kp @ R`` applies Rz Ry Rx to each row vector.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

NUM_BINS = 66


def bins_to_degrees(logits: np.ndarray) -> np.ndarray:
    """(B,66) bin logits -> (B,) degrees. Arrays that are not (B,66) are returned as
    already in degrees (the pipeline stores controlled angles that way)."""
    logits = np.asarray(logits)
    if logits.ndim < 2 or logits.shape[1] != NUM_BINS:
        return logits
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)  # stable softmax
    prob = np.exp(z)
    prob /= prob.sum(axis=1, keepdims=True)
    expectation = (prob * np.arange(NUM_BINS, dtype=np.float64)).sum(axis=1)
    return expectation * 3.0 - 97.5


def rotation_matrix(pitch: np.ndarray, yaw: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """(B,3,3) matrices for right-multiplying row vectors, from angles in degrees."""
    x, y, z = (np.deg2rad(np.asarray(a, dtype=np.float64).reshape(-1)) for a in (pitch, yaw, roll))
    bs = x.shape[0]
    one, zero = np.ones(bs), np.zeros(bs)
    rot_x = np.stack(
        [one, zero, zero, zero, np.cos(x), -np.sin(x), zero, np.sin(x), np.cos(x)], axis=1
    ).reshape(bs, 3, 3)
    rot_y = np.stack(
        [np.cos(y), zero, np.sin(y), zero, one, zero, -np.sin(y), zero, np.cos(y)], axis=1
    ).reshape(bs, 3, 3)
    rot_z = np.stack(
        [np.cos(z), -np.sin(z), zero, np.sin(z), np.cos(z), zero, zero, zero, one], axis=1
    ).reshape(bs, 3, 3)
    return np.transpose(rot_z @ rot_y @ rot_x, (0, 2, 1))


def transform_keypoints(info: Mapping[str, np.ndarray]) -> np.ndarray:
    """Keypoints (B,21,3) float32 from motion info: kp, exp (B,63), t (B,3), scale (B,1),
    pitch/yaw/roll as (B,66) logits or (B,) degrees."""
    kp = np.asarray(info["kp"], dtype=np.float64)
    bs = kp.shape[0]
    kp = kp.reshape(bs, -1, 3)
    exp = np.asarray(info["exp"], dtype=np.float64).reshape(bs, -1, 3)
    scale = np.asarray(info["scale"], dtype=np.float64).reshape(bs, 1, 1)
    t = np.asarray(info["t"], dtype=np.float64).reshape(bs, 3)
    rot = rotation_matrix(
        bins_to_degrees(info["pitch"]), bins_to_degrees(info["yaw"]), bins_to_degrees(info["roll"])
    )
    out = scale * (kp @ rot + exp)
    out[:, :, :2] += t[:, None, :2]  # the z translation is dropped on purpose (upstream)
    return out.astype(np.float32)
