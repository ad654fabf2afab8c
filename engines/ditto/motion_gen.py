"""Audio-conditioned motion: LMDM windows, fusing, smoothing, reference frames, in
upstream's offline and online schemes (`core/atomic_components/audio2motion.py` and the
audio-to-motion workers of `stream_pipeline_offline.py` / `stream_pipeline_online.py`).

The LMDM denoises 80-frame windows (`seq_frames`) of 265-d motion vectors. Windows start
every `valid = seq_frames - overlap` frames; each new window's first frames are
cross-faded into the end of the sequence so far (`fuse_length` frames, weight j/fuse for
the new one), the rest appended, and a centred `smooth_kernel`-frame mean of dims 0..201
(scale, pose bins, t; never exp) is taken around the seam.

- Offline (`OfflineMotion`; overlap 10): windows at clip frames 0, 70, 140, ...; after the
  last window the sequence is cut to the clip and smoothed once more over every frame.
  That last pass is done here frame by frame with one frame of look-ahead (frame i once
  frame i+1 can no longer change, or the clip has ended), so a stream gets upstream's
  offline values without waiting for the end of the clip.
- Online (`OnlineMotion`; overlap 70, fuse 10): the feature buffer starts with 70 rows of
  silence features; one window per 10 new feature rows; window 0 is not output, its first
  frame (clipped) is the relative-motion reference d0; window k >= 1 outputs its 10 fused
  frames. No final smoothing.

Reference frame of each window (`MotionSequence.kp_cond`): the template vector for window
0; afterwards, with ``fix_kp_cond`` = 1, the template vector with dims
``fix_kp_cond_dim`` (0..201) taken from the sequence at the frame before the next
window's first one (with 0, that frame entirely).

Nothing here draws random numbers: the sampler passed in (`SampleFn`) owns the noise, so
tests can inject upstream's recorded noise and the engine seeds it per job.

Motion vector layout (265 = 1 + 66*3 + 3 + 63): scale - 1, pitch bins, yaw bins,
roll bins, t, exp. Canonical keypoints are not generated; they come from the source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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
    of frames [start, end) of seq (1,N,265), in place; the averages read the unsmoothed
    input."""
    if kernel <= 1:
        return seq
    source = seq.copy()
    n = seq.shape[1]
    half = kernel // 2
    for i in range(max(start, 0), min(end, n)):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        seq[:, i, :SMOOTHED_DIMS] = source[:, lo:hi, :SMOOTHED_DIMS].mean(axis=1)
    return seq


def smooth_frame(seq: np.ndarray, i: int, n: int, kernel: int) -> np.ndarray:
    """Frame i of `smooth(seq[:, :n], 0, n, kernel)` alone: (265,)."""
    out = seq[0, i].copy()
    if kernel > 1:
        half = kernel // 2
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out[:SMOOTHED_DIMS] = seq[0, lo:hi, :SMOOTHED_DIMS].mean(axis=0)
    return out


# (reference motion (265,), window condition (80,C)) -> window motion (80,265)
SampleFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class MotionSettings:
    """How windows are laid, fused, smoothed and referenced (upstream's `Audio2Motion.setup`
    arguments)."""

    seq_frames: int = 80
    overlap: int = 10  # overlap_v2
    online: bool = False  # online_mode: fuse min(overlap, valid) frames at the window's end
    smooth_kernel: int = 3  # smo_k_d
    fix_kp_cond: int = 0
    fix_kp_cond_dim: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.overlap < self.seq_frames:
            raise ValueError(f"overlap {self.overlap} must be in (0, {self.seq_frames})")

    @property
    def valid(self) -> int:
        """New frames per window (valid_clip_len)."""
        return self.seq_frames - self.overlap

    @property
    def fuse_length(self) -> int:
        return min(self.overlap, self.valid) if self.online else self.overlap


@dataclass
class MotionRecord:
    """What each stage produced, for checking against upstream's vectors (optional)."""

    window_start: list[int] = field(default_factory=list)
    window_kp_cond: list[np.ndarray] = field(default_factory=list)
    window_cond: list[np.ndarray] = field(default_factory=list)
    window_raw: list[np.ndarray] = field(default_factory=list)
    window_fed: list[int] = field(default_factory=list)
    window_after_end: list[bool] = field(default_factory=list)
    smooth_calls: list[tuple[int, int, int]] = field(default_factory=list)
    frame_fed: list[int] = field(default_factory=list)
    frame_after_end: list[bool] = field(default_factory=list)
    motion: list[np.ndarray] = field(default_factory=list)  # output frames before clipping
    keep_cond: bool = False  # window conditions are large (80 x 1103 floats each)


class MotionSequence:
    """Upstream's ``res_kp_seq`` and reference-frame logic: `add` fuses one raw window in;
    `kp_cond` is the reference for the next window. Frames are addressed by absolute
    index; `drop_before` forgets old frames (their values are never read again)."""

    def __init__(self, settings: MotionSettings, template: np.ndarray,
                 record: MotionRecord | None = None):
        self.settings = settings
        self.template = np.asarray(template, np.float32).reshape(MOTION_DIM).copy()
        self.kp_cond = self.template.copy()
        self.seq = np.zeros((1, 0, MOTION_DIM), np.float32)
        self.offset = 0  # absolute index of self.seq[:, 0]
        self.windows = 0
        self.record = record
        fuse = settings.fuse_length
        self.fuse_alpha = (np.arange(fuse, dtype=np.float32) / fuse).reshape(1, -1, 1)

    @property
    def end(self) -> int:
        """Absolute index one past the last frame."""
        return self.offset + self.seq.shape[1]

    @property
    def settled(self) -> int:
        """Frames before this absolute index can no longer change (a later window rewrites
        only the last `fuse_length` frames; its seam smoothing reads one more)."""
        return self.end - self.settings.fuse_length if self.windows else 0

    def frames(self, start: int, stop: int) -> np.ndarray:
        return self.seq[0, start - self.offset : stop - self.offset]

    def _smooth(self, start: int, stop: int) -> None:
        if self.record is not None:
            self.record.smooth_calls.append((self.seq.shape[1], start, stop))
        smooth(self.seq, start, stop, self.settings.smooth_kernel)

    def add(self, raw: np.ndarray) -> None:
        s = self.settings
        raw = np.asarray(raw, np.float32).reshape(1, s.seq_frames, MOTION_DIM)
        if self.windows == 0:
            self.seq = raw.copy()
            self._smooth(0, s.seq_frames)
        else:
            fuse = s.fuse_length
            n = self.seq.shape[1]
            head = slice(s.seq_frames - s.valid - fuse, s.seq_frames - s.valid)
            self.seq[:, n - fuse :] = (
                self.seq[:, n - fuse :] * (1 - self.fuse_alpha) + raw[:, head] * self.fuse_alpha
            )
            self.seq = np.concatenate([self.seq, raw[:, s.seq_frames - s.valid :]], axis=1)
            n = self.seq.shape[1]
            self._smooth(n - s.valid - fuse, n - s.valid + 1)
        self.windows += 1
        # The reference of the next window: the frame before its first one.
        before = self.seq[0, self.seq.shape[1] - s.overlap - 1]
        if s.fix_kp_cond > 0 and (self.windows - 1) % s.fix_kp_cond == 0:
            self.kp_cond = self.template.copy()
            if s.fix_kp_cond_dim is not None:
                lo, hi = s.fix_kp_cond_dim
                self.kp_cond[lo:hi] = before[lo:hi]
        else:
            self.kp_cond = before.copy()

    def drop_before(self, index: int) -> None:
        cut = index - self.offset
        if cut > 0:
            self.seq = self.seq[:, cut:]
            self.offset = index


def _run_window(sequence: MotionSequence, sample: SampleFn, cond: np.ndarray,
                start: int, record: MotionRecord | None) -> None:
    reference = sequence.kp_cond.copy()
    raw = np.asarray(sample(reference, cond), np.float32).reshape(-1, MOTION_DIM)
    if record is not None:
        record.window_start.append(start)
        record.window_kp_cond.append(reference)
        record.window_raw.append(raw.copy())
        if record.keep_cond:
            record.window_cond.append(np.asarray(cond).copy())
    sequence.add(raw)


class OfflineMotion:
    """Upstream's offline scheme for a clip whose length is known only at its end.

    The caller runs windows in order (`next_start`, `add_window` with the (80,C)
    condition of clip frames next_start.. next_start+79, padded past the clip's end with
    the clip's last condition row) and collects final frames with `take`."""

    def __init__(self, settings: MotionSettings, template: np.ndarray, sample: SampleFn,
                 record: MotionRecord | None = None):
        if settings.online:
            raise ValueError("OfflineMotion needs offline settings")
        self.settings = settings
        self.sequence = MotionSequence(settings, template, record)
        self.sample = sample
        self.record = record
        self.taken = 0  # final frames handed out
        self._final_recorded = False

    def next_start(self) -> int:
        return self.sequence.windows * self.settings.valid

    def add_window(self, cond: np.ndarray) -> None:
        _run_window(self.sequence, self.sample, cond, self.next_start(), self.record)

    def take(self, total: int | None = None) -> np.ndarray:
        """The next final frames (k,265) (before clipping): those whose whole-clip
        smoothing can be computed, i.e. up to one frame before the settled ones; with
        `total` (the clip's frame count) once every window has run, all up to `total`."""
        seq = self.sequence
        if total is not None and self.next_start() >= total:
            stop, n = total, total  # every window has run: the clip's last frames too
            if self.record is not None and not self._final_recorded:
                self.record.smooth_calls.append((total, 0, total))
                self._final_recorded = True
        else:
            stop, n = seq.settled - 1, seq.end
            if total is not None:
                stop = min(stop, total - 1)
        stop = max(stop, self.taken)
        out = [smooth_frame(seq.seq, i, n, self.settings.smooth_kernel)
               for i in range(self.taken, stop)]
        self.taken = stop
        return np.stack(out) if out else np.zeros((0, MOTION_DIM), np.float32)


class OnlineMotion:
    """Upstream's online scheme. `feed` takes new feature rows (k,1024) as they come,
    `end` marks the end of the stream; both return the frames (k,265) output by the
    windows that could run (before clipping), in order. `d0_source` is the unclipped
    relative-motion reference (window 0's first frame) once window 0 has run.

    `make_cond(rows, first)` turns (80,1024) feature rows into (80,C) conditions, `first`
    being the condition index of row 0 (negative in the pre-roll)."""

    def __init__(self, settings: MotionSettings, template: np.ndarray, sample: SampleFn,
                 preroll: np.ndarray, make_cond: Callable[[np.ndarray, int], np.ndarray],
                 record: MotionRecord | None = None):
        if not settings.online:
            raise ValueError("OnlineMotion needs online settings")
        self.settings = settings
        self.sequence = MotionSequence(settings, template, record)
        self.sample = sample
        self.make_cond = make_cond
        self.record = record
        preroll = np.asarray(preroll, np.float32)
        if len(preroll) != settings.overlap:
            raise ValueError(f"{len(preroll)} pre-roll rows, need overlap = {settings.overlap}")
        self.preroll_rows = len(preroll)
        self.buffer = preroll.copy()  # feature rows from absolute position `buffer_offset`
        self.buffer_offset = 0
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.position = 0  # buffer position of the next window (local + offset)
        self.output_start: int | None = None  # absolute sequence index of the next output
        self.d0_source: np.ndarray | None = None
        self.fed = 0  # real feature rows received
        self.ended = False
        self.output = 0  # frames output so far

    def feed(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.float32).reshape(-1, self.buffer.shape[1])
        self.fed += len(rows)
        self.pending.append(rows)
        self.pending_rows += len(rows)
        # Upstream takes new rows only once a window's worth (valid) is pending.
        if self.pending_rows < self.settings.valid:
            return np.zeros((0, MOTION_DIM), np.float32)
        return self._absorb_and_run()

    def replace_rows(self, first: int, rows: np.ndarray) -> None:
        """Replace the real feature rows from `first` (0: the first row after the pre-roll)
        to the last one fed by `rows`, wherever they wait (the buffer or the pending rows),
        for the windows still to run; windows that ran keep what they read. The rows must
        still be held: the buffer keeps the last 2 * seq_frames rows."""
        rows = np.asarray(rows, np.float32).reshape(-1, self.buffer.shape[1])
        if first + len(rows) != self.fed:
            raise ValueError(f"rows {first}..{first + len(rows) - 1} are not the last rows "
                             f"fed (0..{self.fed - 1})")
        local = first + self.preroll_rows - self.buffer_offset
        if local < 0:
            raise ValueError(f"row {first} is no longer held (the buffer starts at row "
                             f"{self.buffer_offset - self.preroll_rows})")
        held = np.concatenate([self.buffer, *self.pending])
        held[local:] = rows
        self.buffer = held[: len(self.buffer)]
        self.pending = [held[len(self.buffer) :]] if self.pending_rows else []

    def end(self) -> np.ndarray:
        if self.ended:
            return np.zeros((0, MOTION_DIM), np.float32)
        self.ended = True
        return self._absorb_and_run()

    def _absorb_and_run(self) -> np.ndarray:
        if self.pending:
            self.buffer = np.concatenate([self.buffer, *self.pending])
            self.pending, self.pending_rows = [], 0
        s = self.settings
        out: list[np.ndarray] = []
        while True:
            local = self.position - self.buffer_offset
            rows = self.buffer[local : local + s.seq_frames]
            valid = s.valid
            if len(rows) == 0:
                break
            if len(rows) < s.seq_frames:
                if not self.ended:
                    break
                valid = len(rows)  # final window: padded with its last feature row
                rows = np.concatenate([rows, np.repeat(rows[-1:], s.seq_frames - len(rows), 0)])
            first = self.position - self.preroll_rows
            cond = self.make_cond(rows, first)
            if self.record is not None:
                self.record.window_fed.append(self.fed)
                self.record.window_after_end.append(self.ended)
            _run_window(self.sequence, self.sample, cond, self.position, self.record)
            seq = self.sequence
            if self.output_start is None:
                # Window 0 (pre-roll and the first real rows) is not output; its first
                # frame becomes the relative-motion reference.
                self.output_start = seq.end - s.fuse_length
                self.d0_source = seq.frames(seq.offset, seq.offset + 1)[0].copy()
            else:
                stop = min(self.output_start + valid, seq.end)
                frames = seq.frames(self.output_start, stop)
                out.append(frames.copy())
                if self.record is not None:
                    self.record.frame_fed += [self.fed] * len(frames)
                    self.record.frame_after_end += [self.ended] * len(frames)
                self.output_start += valid
            self.position += valid
            # Keep at most two windows of motion and of features (upstream's bound).
            if seq.seq.shape[1] > 2 * s.seq_frames:
                seq.drop_before(seq.end - 2 * s.seq_frames)
            if self.position - self.buffer_offset >= len(self.buffer):
                break
        extra = len(self.buffer) - 2 * s.seq_frames
        if extra > 0:
            self.buffer = self.buffer[extra:]
            self.buffer_offset += extra
        result = np.concatenate(out) if out else np.zeros((0, MOTION_DIM), np.float32)
        self.output += len(result)
        return result


def offline_window_rows(start: int, frames: int, seq_frames: int = 80) -> np.ndarray:
    """Clip frame of each row of the offline window at `start` (past the end: the last)."""
    return np.minimum(np.arange(start, start + seq_frames), frames - 1)
