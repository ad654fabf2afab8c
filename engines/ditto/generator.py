"""Audio features in, clipped driving motion out: one job's audio-to-motion stage, in
upstream's offline or online scheme, shared by the engine's streams and `verify`.

`FeatureMotion.push(rows)` takes the next HuBERT feature rows (25 per second of audio)
and returns the motion frames that became final; `finish(total)` returns the rest, cut
to `total` frames. Values do not depend on how the features were chunked (only when
frames leave does). The sampler (`SampleFn`) owns the randomness.

`Blinks` gives the blink-array row of each output frame; in offline mode a frame inside
a scripted blink is known only once the clip is known to run on past the blink's guard
interval (upstream drops blinks that would end near the clip's end), so `ready` says how
far rows are decided.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import conditions
from .motion_gen import (
    MOTION_DIM,
    MotionRecord,
    OfflineMotion,
    OnlineMotion,
    SampleFn,
)
from .pipeline import BLINK_FRAMES_UNKNOWN_N, OPEN_MAX, OPEN_MIN, PipelineConfig, clip_motion

AUDIO_DIM = conditions.AUDIO_DIM


class FeatureMotion:
    def __init__(self, pcfg: PipelineConfig, cfg: Any, cond_source: conditions.ConditionSource
                 | None, template_vector: np.ndarray, sample: SampleFn,
                 preroll: np.ndarray | None = None, condition_dim: int | None = None,
                 record: MotionRecord | None = None):
        self.pcfg = pcfg
        self.cfg = cfg
        self.cond_source = cond_source
        # Without a cfg (random weights) the control dims are zeros of the LMDM's width.
        self.condition_dim = condition_dim
        self.record = record
        self.d0: np.ndarray | None = None  # clipped relative-motion reference
        self.frames_out = 0
        self.features_in = 0
        if pcfg.motion.online:
            if preroll is None:
                raise ValueError("online mode needs the pre-roll (silence) features")
            self.online: OnlineMotion | None = OnlineMotion(
                pcfg.motion, template_vector, sample, preroll, self._cond, record)
            self.offline: OfflineMotion | None = None
        else:
            self.online = None
            self.offline = OfflineMotion(pcfg.motion, template_vector, sample, record)
            self._rows = np.zeros((0, AUDIO_DIM), np.float32)  # features from `_rows_start`
            self._rows_start = 0

    def _cond(self, rows: np.ndarray, first: int) -> np.ndarray:
        if self.cfg is None or self.cond_source is None:
            width = (self.condition_dim or AUDIO_DIM) - AUDIO_DIM
            return np.concatenate([rows, np.zeros((len(rows), width), np.float32)], axis=1)
        return conditions.build_condition(rows, self.cfg, self.cond_source, first,
                                          emo=self.pcfg.emo, eye_f0_mode=self.pcfg.eye_f0_mode)

    def _finalise(self, motion: np.ndarray) -> np.ndarray:
        if self.record is not None:
            self.record.motion.append(motion.copy())
        clipped = clip_motion(motion, self.pcfg.clip)
        if self.d0 is None:
            if self.online is not None and self.online.d0_source is not None:
                self.d0 = clip_motion(self.online.d0_source[None], self.pcfg.clip)[0]
            elif self.offline is not None and len(clipped):
                self.d0 = clipped[0].copy()
        self.frames_out += len(clipped)
        return clipped

    def push(self, rows: np.ndarray) -> np.ndarray:
        """Feature rows (k,1024) of the next frames -> newly final clipped motion (m,265)."""
        rows = np.asarray(rows, np.float32).reshape(-1, AUDIO_DIM)
        self.features_in += len(rows)
        if self.online is not None:
            return self._finalise(self.online.feed(rows))
        self._rows = np.concatenate([self._rows, rows])
        return self._finalise(self._run_offline(final=False))

    def replace_features(self, first: int, rows: np.ndarray) -> None:
        """Online: rows (k,1024) replace the feature rows `first` .. `first` + k - 1 fed so
        far (the last k) for every window still to run (a barge-in's rows, computed again
        from silenced audio). Windows that already ran keep what they read. Offline
        streams are never interrupted: ValueError."""
        if self.online is None:
            raise ValueError("feature rows are replaced only in the online scheme")
        self.online.replace_rows(first, rows)

    def finish(self, total: int | None = None) -> np.ndarray:
        """End of audio: the remaining frames. Offline: up to `total` frames in all
        (default: one per feature row). Online: upstream outputs frames in tens, 1 to 10
        past the audio; with `total` those past it are dropped, and a stream of fewer
        than 10 frames (upstream outputs none) takes them from the first window."""
        if self.online is not None:
            out = self.online.end()
            if total is None:
                return self._finalise(out)
            need = total - self.frames_out
            if len(out) < need:
                seq, start = self.online.sequence, self.online.output_start
                assert start is not None
                extra = seq.frames(start, min(start + need - len(out), seq.end))
                out = np.concatenate([out, extra])
            return self._finalise(out[: max(need, 0)])
        total = self.features_in if total is None else total
        if total == 0:
            return np.zeros((0, MOTION_DIM), np.float32)
        if self.features_in < total:
            raise ValueError(f"{self.features_in} feature rows for {total} frames")
        return self._finalise(self._run_offline(final=True, total=total))

    def _run_offline(self, final: bool, total: int | None = None) -> np.ndarray:
        motion = self.offline
        assert motion is not None
        seq = motion.settings.seq_frames
        frames = total if final else None
        out = []
        while True:
            start = motion.next_start()
            if final:
                assert frames is not None
                if start >= frames:
                    break
            elif start + seq > self.features_in:
                break
            local = start - self._rows_start
            cond_rows = self._rows[local : local + seq]
            if final:
                cond_rows = cond_rows[: frames - start]  # type: ignore[operator]
            # Offline conditions are made for the clip's frames (emo index = frame);
            # past the clip's end the window repeats the last condition row.
            cond = self._cond(cond_rows, start)
            if len(cond) < seq:
                cond = np.concatenate([cond, np.repeat(cond[-1:], seq - len(cond), 0)])
            motion.add_window(cond)
            out.append(motion.take(frames))
            # Rows before the next window are never read again.
            drop = motion.next_start() - self._rows_start
            if drop > 0:
                self._rows = self._rows[drop:]
                self._rows_start += drop
        return np.concatenate(out) if out else np.zeros((0, MOTION_DIM), np.float32)


class Blinks:
    """Row of the blink array per output frame (upstream `_set_eye_blink_idx` and its
    `idx % len` lookup), drawn from the job's own `randint`.

    Online: one schedule of the cfg's `N_d` frames (3000 when -1) drawn at the start.
    Offline (upstream's `setup_Nd(clip frames)`), the clip's length is known only at its
    end: the schedule is drawn lazily with the same draws, and a blink starting at p is
    kept only if the clip turns out longer than p + max(guard, blink length), as
    upstream's N-frame schedule does."""

    def __init__(self, pcfg: PipelineConfig, randint: Callable[[int, int], int] | None,
                 rows: np.ndarray | None = None):
        arr = pcfg.delta_eye_arr
        drive_eye = True if pcfg.drive_eye is None else bool(pcfg.drive_eye)
        self.active = drive_eye and arr is not None
        self.blink_frames = len(arr) if arr is not None else 0
        self.offline = not pcfg.motion.online
        self.open_n = pcfg.delta_eye_open_n
        self.fixed: np.ndarray | None = None
        if not self.active:
            return
        if rows is not None:  # a recorded schedule (tests)
            self.fixed = np.asarray(rows, np.int64)
            return
        assert randint is not None
        self.randint = randint
        if not self.offline:
            from .pipeline import blink_schedule

            n = BLINK_FRAMES_UNKNOWN_N if pcfg.n_d <= 0 else pcfg.n_d
            self.fixed = blink_schedule(n, self.blink_frames, self.open_n, randint)
            return
        # Offline, length unknown: starts of candidate blinks, drawn as needed.
        opens = self.open_n
        if isinstance(opens, int | np.integer):
            if opens < 0:
                self.active = False
                return
            self._opens = [int(opens)] if opens > 0 else []
        else:
            self._opens = [int(v) for v in opens]
        self._starts = [self._opens[0] if self._opens else randint(OPEN_MIN, OPEN_MAX)]
        self._guard = self._opens[-1] if self._opens else randint(OPEN_MIN, OPEN_MAX)
        self._count = 1

    @property
    def hold_frames(self) -> int:
        """Frames of audio past a frame that its blink row may wait for: offline, a frame
        inside a scripted blink leaves once the audio runs `max(guard, blink length)`
        frames past the blink's start; 0 where rows are decided at once."""
        if not self.active or self.fixed is not None:
            return 0
        return max(self._guard, self.blink_frames)

    def _extend(self, frame: int, total: int | None = None) -> None:
        # Upstream draws a gap only after placing a blink: with the clip's length known,
        # no draw past its last blink.
        cutoff = None if total is None else total - max(self._guard, self.blink_frames)
        while self._starts[-1] <= frame and (cutoff is None or self._starts[-1] < cutoff):
            if self._opens:
                gap = self._opens[self._count % len(self._opens)]
                self._count += 1
            else:
                gap = self.randint(OPEN_MIN, OPEN_MAX)
            self._starts.append(self._starts[-1] + self.blink_frames + gap)

    def ready(self, stop: int, known_frames: int, total: int | None) -> int:
        """How many of frames [0, stop) have a decided row, knowing the clip has at least
        `known_frames` frames (`total` once it is known)."""
        if not self.active or self.fixed is not None or total is not None:
            return stop
        self._extend(stop)
        margin = max(self._guard, self.blink_frames)
        for p in self._starts:
            if p >= stop:
                break
            if p + margin >= known_frames:  # this blink's fate is not known yet
                return p
        return stop

    def rows(self, start: int, stop: int, total: int | None = None) -> np.ndarray | None:
        """(stop-start,) blink-array rows of frames [start, stop); None when inactive."""
        if not self.active:
            return None
        frames = np.arange(start, stop)
        if self.fixed is not None:
            return self.fixed[frames % len(self.fixed)]
        self._extend(stop, total)
        out = np.zeros(len(frames), np.int64)
        margin = max(self._guard, self.blink_frames)
        for p in self._starts:
            if p >= stop:
                break
            if total is not None and p >= total - margin:
                break
            lo, hi = max(p, start), min(p + self.blink_frames, stop)
            if lo < hi:
                out[lo - start : hi - start] = np.arange(lo - p, hi - p)
        return out
