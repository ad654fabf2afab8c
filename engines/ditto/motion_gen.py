"""Audio-conditioned motion over long clips: LMDM windows, blending and smoothing.

The LMDM denoises 80-frame windows of 265-d motion vectors. A clip is covered by windows
that start every 70 frames (overlap 10): each new window is conditioned on the motion of
the frame just before its overlap, its first 10 frames are cross-faded with the end of
the previous result, and a 3-frame moving average smooths the pose/translation dims
(the first 202) around each seam and once more over the whole clip at the end.

Motion vector layout (265 = 1 + 66*3 + 3 + 63): scale - 1, pitch bins, yaw bins,
roll bins, t, exp. Canonical keypoints are not generated; they come from the source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

# (name, width) in the order of the 265-d motion vector.
MOTION_LAYOUT: tuple[tuple[str, int], ...] = (
    ("scale", 1),
    ("pitch", 66),
    ("yaw", 66),
    ("roll", 66),
    ("t", 3),
    ("exp", 63),
)
MOTION_DIM = sum(width for _, width in MOTION_LAYOUT)  # 265
SMOOTHED_DIMS = 202  # scale, pose bins and t: expression is left unsmoothed


def info_to_vector(info: Mapping[str, np.ndarray]) -> np.ndarray:
    """Motion-extractor outputs (each (1,k)) -> one (265,) vector; scale is stored - 1."""
    parts = []
    for name, width in MOTION_LAYOUT:
        value = np.asarray(info[name], dtype=np.float32).reshape(width)
        parts.append(value - 1 if name == "scale" else value)
    return np.concatenate(parts)


def vector_to_info(vector: np.ndarray) -> dict[str, np.ndarray]:
    """(265,) vector -> {name: (1,k)} as the motion extractor gives them (no kp)."""
    return vectors_to_info(np.asarray(vector).reshape(1, -1))


def vectors_to_info(vectors: np.ndarray) -> dict[str, np.ndarray]:
    """(N,265) vectors -> {name: (N,k)} as the motion extractor gives them (no kp)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] < MOTION_DIM:
        raise ValueError(f"motion vectors are {vectors.shape}, need (N, {MOTION_DIM})")
    info, start = {}, 0
    for name, width in MOTION_LAYOUT:
        value = vectors[:, start : start + width].copy()
        info[name] = value + 1 if name == "scale" else value
        start += width
    return info


def smooth(seq: np.ndarray, start: int, end: int, kernel: int = 3) -> np.ndarray:
    """Moving average (centred, `kernel` frames, clipped at the ends) of the first 202 dims
    of frames [start, end) of seq (1,N,265); the averages read the unsmoothed input."""
    if kernel <= 1:
        return seq
    source = seq.copy()
    n = seq.shape[1]
    half = kernel // 2
    for i in range(max(start, 0), min(end, n)):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        seq[:, i, :SMOOTHED_DIMS] = source[:, lo:hi, :SMOOTHED_DIMS].mean(axis=1)
    return seq


# (reference motion (1,265), window condition (1,80,C)) -> window motion (1,80,265)
SampleFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class WindowedMotion:
    """Motion over a clip, window by window. `add` takes each new 80-frame window in
    order; `reference` is the motion to condition the next window on; frames before
    `settled` can no longer change."""

    def __init__(
        self,
        source_vector: np.ndarray,
        seq_frames: int = 80,
        overlap: int = 10,
        smooth_kernel: int = 3,
    ):
        if not 0 < overlap < seq_frames:
            raise ValueError(f"overlap {overlap} must be in (0, {seq_frames})")
        self.seq_frames = seq_frames
        self.overlap = overlap
        self.valid = seq_frames - overlap
        self.smooth_kernel = smooth_kernel
        self.fuse_alpha = (np.arange(overlap, dtype=np.float32) / overlap).reshape(1, -1, 1)
        self.reference = np.asarray(source_vector, dtype=np.float32).reshape(1, -1)
        self.motion = np.zeros((1, 0, MOTION_DIM), np.float32)
        self.windows = 0

    def next_start(self) -> int:
        """First frame of the next window's condition."""
        return self.windows * self.valid

    @property
    def settled(self) -> int:
        # A later window rewrites (fuse + seam smoothing) only the last `overlap` frames.
        return max(self.motion.shape[1] - self.overlap, 0) if self.windows else 0

    def add(self, window: np.ndarray) -> None:
        window = np.asarray(window, dtype=np.float32)
        if window.shape[1] != self.seq_frames:
            raise ValueError(f"window has {window.shape[1]} frames, needs {self.seq_frames}")
        if self.windows == 0:
            self.motion = smooth(window.copy(), 0, window.shape[1], self.smooth_kernel)
        else:
            # Cross-fade our last `overlap` frames with the window's first `overlap` frames,
            # append the rest, and smooth around the seam.
            n = self.motion.shape[1]
            tail = slice(n - self.overlap, n)
            head = window[:, : self.overlap]
            self.motion[:, tail] = (
                self.motion[:, tail] * (1 - self.fuse_alpha) + head * self.fuse_alpha
            )
            self.motion = np.concatenate([self.motion, window[:, self.overlap :]], axis=1)
            seam = self.motion.shape[1] - self.valid
            self.motion = smooth(self.motion, seam - self.overlap, seam + 1, self.smooth_kernel)
        # The next window continues from the frame just before its overlap.
        self.reference = self.motion[:, self.motion.shape[1] - self.overlap - 1]
        self.windows += 1

    def window_condition(self, cond: np.ndarray, offset: int = 0) -> np.ndarray:
        """The next window's (1,80,C) condition from per-frame conditions (N,C) whose first
        row is clip frame `offset`; a short last window repeats its last frame."""
        start = self.next_start()
        rows = cond[start - offset : start - offset + self.seq_frames]
        window = np.asarray(rows, dtype=np.float32)[None]
        if window.shape[1] == 0:
            raise ValueError(f"no condition frames from {start}")
        if window.shape[1] < self.seq_frames:
            pad = np.repeat(window[:, -1:], self.seq_frames - window.shape[1], axis=1)
            window = np.concatenate([window, pad], axis=1)
        return window


def generate_offline(
    sample: SampleFn, source_vector: np.ndarray, cond: np.ndarray, **kwargs: int
) -> np.ndarray:
    """Offline motion for a whole clip: cond (N,C) -> (N,265), as upstream's offline
    pipeline (windows every 70 frames, then one smoothing pass over the whole clip)."""
    frames = len(cond)
    motion = WindowedMotion(source_vector, **kwargs)
    while motion.next_start() < frames:
        motion.add(sample(motion.reference, motion.window_condition(cond)))
    if frames == 0:
        return np.zeros((0, MOTION_DIM), np.float32)
    result = smooth(motion.motion[:, :frames].copy(), 0, frames, motion.smooth_kernel)
    return result[0]
