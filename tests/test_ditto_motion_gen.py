"""Motion-vector layout, LMDM windowing in upstream's offline and online schemes, the blink
schedule, and the engine stream's plumbing (chunking independence, seeds, noise reuse,
live streams: pace, look-ahead, barge-in), with cheap deterministic stand-ins for the LMDM
sampler. The recorded upstream cases are checked in test_ditto_motion_vectors.py."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

# The Ditto engine needs torch (the `ditto` extra); without it these tests skip.
torch = pytest.importorskip("torch")

from ditto_shared import resolved_futures  # noqa: E402

from avatard.engines.ditto import random_checkpoint  # noqa: E402
from avatard.engines.ditto.engine import (  # noqa: E402
    HUBERT_LEAD,
    SAMPLES_PER_FRAME,
    DittoAvatar,
    DittoStream,
    _hubert_features,
)
from avatard.engines.ditto.generator import Blinks, FeatureMotion  # noqa: E402
from avatard.engines.ditto.motion_gen import (  # noqa: E402
    MOTION_DIM,
    MotionRecord,
    MotionSequence,
    MotionSettings,
    OfflineMotion,
    OnlineMotion,
    info_to_vector,
    smooth,
    vector_to_info,
)
from avatard.engines.ditto.pipeline import (  # noqa: E402
    PipelineConfig,
    StitchSource,
    blink_schedule,
    driving_keypoints,
)

OFFLINE = MotionSettings(overlap=10, smooth_kernel=3, fix_kp_cond=1, fix_kp_cond_dim=(0, 202))
ONLINE = MotionSettings(overlap=70, online=True, smooth_kernel=3, fix_kp_cond=1,
                        fix_kp_cond_dim=(0, 202))


def fake_info(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "pitch": rng.standard_normal((1, 66)).astype(np.float32),
        "yaw": rng.standard_normal((1, 66)).astype(np.float32),
        "roll": rng.standard_normal((1, 66)).astype(np.float32),
        "t": rng.standard_normal((1, 3)).astype(np.float32),
        "exp": rng.standard_normal((1, 63)).astype(np.float32),
        "scale": np.array([[1.3]], np.float32),
        "kp": rng.standard_normal((1, 63)).astype(np.float32),
    }


def test_vector_layout_roundtrip() -> None:
    info = fake_info(np.random.default_rng(0))
    vec = info_to_vector(info)
    assert vec.shape == (MOTION_DIM,) == (265,)
    assert vec[0] == pytest.approx(0.3)  # scale is stored minus one
    back = vector_to_info(vec)
    for key in ("pitch", "yaw", "roll", "t", "exp", "scale"):
        assert np.allclose(back[key], info[key]), key
    assert "kp" not in back


def test_smooth_only_touches_pose_dims() -> None:
    seq = np.random.default_rng(1).standard_normal((1, 6, MOTION_DIM)).astype(np.float32)
    out = smooth(seq.copy(), 0, 6)
    assert np.allclose(out[0, 2, :202], seq[0, 1:4, :202].mean(axis=0))
    assert np.allclose(out[0, 0, :202], seq[0, 0:2, :202].mean(axis=0))
    assert np.array_equal(out[..., 202:], seq[..., 202:])


def linear_sampler(reference: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """Deterministic stand-in for the LMDM: depends on the reference and the condition."""
    base = np.asarray(reference, np.float32).reshape(1, MOTION_DIM)
    return base + cond[:, :1] * np.linspace(0, 1, MOTION_DIM, dtype=np.float32)


def test_offline_fuse_and_reference_reset() -> None:
    template = np.full(MOTION_DIM, 5.0, np.float32)
    seq = MotionSequence(MotionSettings(overlap=10, smooth_kernel=1, fix_kp_cond=1,
                                        fix_kp_cond_dim=(0, 202)), template)
    seq.add(np.zeros((80, MOTION_DIM), np.float32))
    seq.add(np.ones((80, MOTION_DIM), np.float32))
    values = seq.seq[0, :, 0]
    assert values.shape == (150,)
    assert np.allclose(values[70:80], np.arange(10) / 10)  # new window weighted j/10
    assert np.all(values[:70] == 0) and np.all(values[80:] == 1)
    assert seq.settled == 140
    # The next reference: pose dims from frame 139, expression reset to the template's.
    assert np.all(seq.kp_cond[:202] == 1) and np.all(seq.kp_cond[202:] == 5)


def test_online_fuses_the_window_frames_60_to_69() -> None:
    seq = MotionSequence(MotionSettings(overlap=70, online=True, smooth_kernel=1),
                         np.zeros(MOTION_DIM, np.float32))
    seq.add(np.zeros((80, MOTION_DIM), np.float32))
    window = np.zeros((80, MOTION_DIM), np.float32)
    window[60:70], window[70:] = 1, 2
    seq.add(window)
    values = seq.seq[0, :, 0]
    assert values.shape == (90,)
    assert np.allclose(values[70:80], np.arange(10) / 10)
    assert np.all(values[80:] == 2)
    # fix_kp_cond 0: the reference is the whole frame before the next window (position 19).
    assert np.array_equal(seq.kp_cond, seq.seq[0, 19])


def _offline_whole(cond: np.ndarray) -> np.ndarray:
    """The offline result computed as upstream does: every window, cut, smooth all."""
    frames = len(cond)
    seq = MotionSequence(OFFLINE, np.zeros(MOTION_DIM, np.float32))
    start = 0
    while start < frames:
        rows = cond[start : start + 80]
        rows = np.concatenate([rows, np.repeat(rows[-1:], 80 - len(rows), 0)])
        seq.add(linear_sampler(seq.kp_cond, rows))
        start += 70
    return smooth(seq.seq[:, :frames].copy(), 0, frames)[0]


@pytest.mark.parametrize("frames", [1, 50, 81, 150, 222])
def test_offline_streamed_equals_whole_clip(frames: int) -> None:
    cond = np.sin(np.arange(frames, dtype=np.float32) / 7)[:, None].repeat(4, 1)
    motion = OfflineMotion(OFFLINE, np.zeros(MOTION_DIM, np.float32), linear_sampler)
    out = []
    while motion.next_start() + 80 <= frames:  # the windows a stream runs before the end
        motion.add_window(cond[motion.next_start() : motion.next_start() + 80])
        out.append(motion.take())
    early = sum(len(o) for o in out)
    while motion.next_start() < frames:
        rows = cond[motion.next_start() : motion.next_start() + 80]
        motion.add_window(np.concatenate([rows, np.repeat(rows[-1:], 80 - len(rows), 0)]))
        out.append(motion.take(frames))
    out.append(motion.take(frames))
    streamed = np.concatenate(out)
    assert streamed.shape == (frames, MOTION_DIM)
    np.testing.assert_array_equal(streamed, _offline_whole(cond))
    # One frame of look-ahead: a stream has every frame but the last of the settled ones.
    assert early == (max(0, (frames - 10) // 70) * 70 - 1 if frames >= 80 else 0)


@pytest.mark.parametrize("n", [0, 7, 10, 19, 20, 50, 101])
def test_online_frame_count_and_timing(n: int) -> None:
    record = MotionRecord()
    motion = OnlineMotion(ONLINE, np.zeros(MOTION_DIM, np.float32), linear_sampler,
                          np.zeros((70, 4), np.float32), lambda rows, first: rows, record)
    feats = np.cos(np.arange(n, dtype=np.float32) / 5)[:, None].repeat(4, 1)
    out = [motion.feed(feats[i : i + 5]) for i in range(0, n, 5)]
    out.append(motion.end())
    frames = np.concatenate(out)
    expected = 0 if n < 10 else 10 * ((n - 10) // 10) + 20
    assert len(frames) == expected
    # Frame i leaves once 10 floor(i/10) + 20 real rows have arrived; the last 20 at the end.
    for i, fed in enumerate(record.frame_fed[: max(expected - 20, 0)]):
        assert fed == 10 * (i // 10) + 20
    assert all(record.frame_after_end[max(expected - 20, 0) :])
    if n:
        assert motion.d0_source is not None


def test_online_keeps_two_windows_only() -> None:
    motion = OnlineMotion(ONLINE, np.zeros(MOTION_DIM, np.float32), linear_sampler,
                          np.zeros((70, 4), np.float32), lambda rows, first: rows)
    for _ in range(100):
        motion.feed(np.ones((10, 4), np.float32))
    assert motion.sequence.seq.shape[1] <= 160 and len(motion.buffer) <= 160
    assert motion.output == 990


def test_blink_schedule_follows_upstream() -> None:
    draws = iter([60, 70, 80, 90, 100])
    idx = blink_schedule(300, 15, 0, lambda lo, hi: next(draws))
    # start 60, guard 70: blinks at 60, 60+15+80=155; 155+15+90=260 >= 300-70: stop.
    assert list(np.flatnonzero(idx == 1)) == [61, 156]
    assert np.array_equal(idx[60:75], np.arange(15)) and idx[75] == 0
    assert not blink_schedule(300, 15, -1, None).any()  # type: ignore[arg-type]
    fixed = blink_schedule(200, 15, [20, 30], None)  # type: ignore[arg-type]
    # Gaps cycle 30, 20, 30 ... after the first start (20); the guard is the last (30).
    assert list(np.flatnonzero(fixed == 1)) == [21, 66, 101, 146]
    # A short clip never blinks: the first blink would end within the guard interval.
    assert not blink_schedule(120, 15, 0, lambda lo, hi: 60).any()


def test_offline_blinks_wait_until_the_clip_is_long_enough() -> None:
    cfg = random_checkpoint.make_cfg()
    pcfg = PipelineConfig.from_cfg(cfg, "offline")
    blinks = Blinks(pcfg, lambda lo, hi: 60)  # start 60, guard 60, gaps of 60
    assert blinks.ready(100, known_frames=100, total=None) == 60  # fate of 60.. unknown
    assert blinks.ready(100, known_frames=121, total=None) == 100
    rows = blinks.rows(0, 100)
    assert rows is not None and np.array_equal(rows[60:75], np.arange(15))
    # A clip of 120 frames ends within the guard: upstream drops the blink.
    assert not blinks.rows(0, 120, total=120).any()  # type: ignore[union-attr]
    online = Blinks(PipelineConfig.from_cfg(cfg, "online"), lambda lo, hi: 60)
    assert online.ready(100, 0, None) == 100  # a 3000-frame schedule, drawn at the start


def test_stitch_scales_deltas_and_applies_controls() -> None:
    cfg = random_checkpoint.make_cfg()
    pcfg = PipelineConfig.from_cfg(cfg, "offline")
    assert pcfg.template is not None and pcfg.overall_ctrl == {"delta_pitch": 2.0}
    rng = np.random.default_rng(4)
    source = StitchSource.from_info(fake_info(rng))
    d0 = info_to_vector(source.info)
    same = driving_keypoints(pcfg, source, d0[None], d0, np.array([0]))
    moved = d0.copy()
    moved[1:67] += rng.standard_normal(66).astype(np.float32)
    changed = driving_keypoints(pcfg, source, moved[None], d0, np.array([0]))
    assert same.shape == changed.shape == (1, 21, 3)
    assert not np.allclose(same, changed)
    # No controls, no blink delta, no template: the avatar's own keypoints come back.
    plain = PipelineConfig.from_cfg({}, "offline")
    assert np.allclose(driving_keypoints(plain, source, d0[None], d0, None), source.x_s,
                       atol=1e-5)


def test_cfg_modes_and_overrides() -> None:
    cfg = random_checkpoint.make_cfg()
    offline = PipelineConfig.from_cfg(cfg, "offline")
    online = PipelineConfig.from_cfg(cfg, "online", overrides={"sampling_timesteps": 8})
    assert (offline.motion.overlap, offline.motion.online) == (10, False)
    assert (online.motion.overlap, online.motion.online, online.sampling_timesteps) == (
        70, True, 8)
    assert online.overrides["sampling_timesteps"][1] == 8
    assert not offline.unhonoured
    cfg["default_kwargs"]["ctrl_info"] = {3: {"fade_alpha": 0.5}}
    cfg["default_kwargs"]["overall_ctrl_info"] = {"delta_pitch": 2, "vad_alpha": 0.5}
    pcfg = PipelineConfig.from_cfg(cfg, "offline")
    assert pcfg.unhonoured == ("ctrl_info", "overall_ctrl_info.vad_alpha")
    assert pcfg.overall_ctrl == {"delta_pitch": 2.0}


# ----------------------------------------------------------------------- the stream


class _FakeLMDM:
    seq_frames = 80
    motion_feat_dim = MOTION_DIM
    n_timestep = 1000


class _FakeEngine:
    """Duck-typed engine: cheap, deterministic stand-ins for the heavy calls."""

    lmdm = _FakeLMDM()
    cfg = None
    condition_dim = 4 + 1024
    fps = 25
    max_batch = 16  # frames per render batch: the stream queues whole batches between windows

    def __init__(self, mode: str = "offline"):
        self.pcfg = PipelineConfig.from_cfg(None, mode, overrides={"sampling_timesteps": 3})
        self.step_noises: list[np.ndarray] = []

    def pipeline(self, mode=None):
        return self.pcfg

    def preroll_features(self, rows: int) -> np.ndarray:
        return np.zeros((rows, 1024), np.float32)

    def audio_features(self, pcm: np.ndarray, start: int, end: int, base: int = 0
                       ) -> np.ndarray:
        # Frame f's mean; `pcm` holds the clip from sample `base` on (the stream drops
        # audio it no longer needs, never audio a chunk with its lead still reads).
        assert base == 0 or base <= start * SAMPLES_PER_FRAME - HUBERT_LEAD
        rows = []
        for f in range(start, end):
            segment = pcm[f * SAMPLES_PER_FRAME - base : (f + 1) * SAMPLES_PER_FRAME - base]
            rows.append(segment.sum() / SAMPLES_PER_FRAME)
        return np.array(rows, np.float32).reshape(-1, 1).repeat(1024, axis=1)

    def sample_window(self, reference, cond, x_init, step_noise, due=None,
                      holder=None) -> np.ndarray:
        self.step_noises.append(step_noise)
        return linear_sampler(reference, cond) + x_init * 1e-3

    def driving_keypoints(self, avatar, pcfg, motion, d0, blink_rows) -> np.ndarray:
        return (motion - d0)[:, :63].reshape(-1, 21, 3)

    def submit_frames(self, avatar, x_d, deadlines=None, first_alone=False) -> list[Future]:
        return resolved_futures(x_d)


def _avatar() -> DittoAvatar:
    return DittoAvatar(
        image=np.zeros((8, 8, 3), np.uint8),
        crop_box=(0, 0, 8),
        feature_3d=torch.zeros(1),
        source_info=fake_info(np.random.default_rng(3)),
        x_s=np.zeros((1, 21, 3), np.float32),
    )


def _render_stream(pcm: np.ndarray, chunk: int, mode: str = "offline", seed: int = 7,
                   engine: _FakeEngine | None = None) -> list[np.ndarray]:
    engine = engine or _FakeEngine(mode)
    stream = DittoStream(engine, _avatar(), seed=seed, mode=mode)  # type: ignore[arg-type]
    frames = []
    for i in range(0, len(pcm), chunk):
        frames += stream.push(pcm[i : i + chunk])
    frames += stream.finish()
    return frames


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_stream_frames_do_not_depend_on_chunking(mode: str) -> None:
    seconds = 7.3
    pcm = np.sin(np.arange(int(seconds * 16000)) / 37.0).astype(np.float32) * 0.3
    whole = _render_stream(pcm, len(pcm), mode)
    chunked = _render_stream(pcm, 3217, mode)
    assert len(whole) == len(chunked) == round(seconds * 25)
    for a, b in zip(whole, chunked, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_stream_seed_decides_the_frames_and_step_noise_is_reused(mode: str) -> None:
    pcm = np.sin(np.arange(3 * 16000) / 11.0).astype(np.float32) * 0.3
    engine = _FakeEngine(mode)
    a = _render_stream(pcm, 4000, mode, seed=5, engine=engine)
    # Upstream draws the per-step noise once and reuses it for every window.
    assert len(engine.step_noises) > 1
    assert all(n is engine.step_noises[0] for n in engine.step_noises)
    assert engine.step_noises[0].shape == (2, 80, MOTION_DIM)
    b = _render_stream(pcm, 640, mode, seed=5)  # a requeued job: same frames
    c = _render_stream(pcm, 4000, mode, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_stream_emits_before_finish() -> None:
    pcm = np.zeros(16000 * 5, np.float32)  # 125 frames: one window is final early
    stream = DittoStream(_FakeEngine(), _avatar(), seed=1, mode="offline")  # type: ignore[arg-type]
    early = list(stream.push(pcm))
    assert len(early) == 69  # settled frames but the last (the final smoothing's look-ahead)
    assert len(early) + len(list(stream.finish())) == 125


def test_online_stream_first_frame_after_22_frames_of_audio() -> None:
    stream = DittoStream(_FakeEngine("online"), _avatar(), seed=1, mode="online")  # type: ignore[arg-type]
    assert list(stream.push(np.zeros(21 * SAMPLES_PER_FRAME, np.float32))) == []
    assert len(list(stream.push(np.zeros(SAMPLES_PER_FRAME, np.float32)))) == 10


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_stream_without_audio_gives_no_frames(mode: str) -> None:
    assert _render_stream(np.zeros(0, np.float32), 640, mode) == []
    # Less than half a frame of audio rounds to zero frames as well.
    assert _render_stream(np.zeros(300, np.float32), 640, mode) == []
    assert len(_render_stream(np.zeros(5 * 640, np.float32), 640, mode)) == 5


def test_feature_motion_without_cfg_pads_zero_controls() -> None:
    pcfg = PipelineConfig.from_cfg(None, "offline")
    seen = []
    motion = FeatureMotion(pcfg, None, None, np.zeros(MOTION_DIM, np.float32),
                           lambda r, c: seen.append(c.shape) or np.zeros((80, MOTION_DIM)),
                           condition_dim=1059)
    out = motion.finish(0)
    assert len(out) == 0
    motion.push(np.zeros((100, 1024), np.float32))
    assert seen[0] == (80, 1059)


class _FakeSession:
    """onnxruntime's surface for `_hubert_features`: (1,6480) -> (1,20,1024) from the chunk."""

    class _Input:
        name = "audio"

    def get_inputs(self):
        return [self._Input()]

    def run(self, outputs, feeds):
        chunk = feeds["audio"].reshape(20, -1)[:, :324]
        return [np.repeat(chunk.sum(axis=1, keepdims=True), 1024, axis=1)[None]]


def test_hubert_features_from_the_recent_audio_only() -> None:
    """A long stream keeps only recent audio: features from a tail of the clip equal the
    features from the whole clip."""
    pcm = np.sin(np.arange(30 * SAMPLES_PER_FRAME) / 9.0).astype(np.float32)
    session = _FakeSession()
    whole = _hubert_features(session, pcm, 10, 27)
    base = 10 * SAMPLES_PER_FRAME - HUBERT_LEAD
    tail = _hubert_features(session, pcm[base:], 10, 27, base)
    np.testing.assert_array_equal(whole, tail)
    assert whole.shape == (17, 1024) and np.abs(whole).max() > 0
    with pytest.raises(ValueError, match="cannot give"):
        _hubert_features(session, pcm[base + 1 :], 10, 27, base + 1)


def test_long_stream_keeps_little_audio() -> None:
    engine = _FakeEngine("online")
    stream = DittoStream(engine, _avatar(), seed=1, mode="online")  # type: ignore[arg-type]
    for _ in range(40):  # 40 s
        list(stream.push(np.zeros(16000, np.float32)))
    # Trimmed in steps of 16 encoder windows (6.5 s), never to less than a chunk needs.
    assert len(stream.pcm) < 8 * 16000 and stream.samples == 40 * 16000


@pytest.mark.parametrize("steps", [3, 4, 5, 6, 8, 10, 50])
def test_ddim_step_factors_are_finite_float64_values(steps: int) -> None:
    """Upstream's float32 factors are NaN at 5 steps (and at 3 on a CPU whose float32 sqrt
    rounds correctly); ours follow the formula in float64 from the float32 schedule and
    are finite, so every step count samples."""
    from avatard.engines.ditto.lmdm import LMDM, ddim_time_pairs

    lmdm = LMDM(audio_feat_dim=1103)
    abar = lmdm.alphas_cumprod.numpy().astype(np.float64)
    for t, t_next in ddim_time_pairs(steps, lmdm.n_timestep):
        if t_next < 0:
            continue
        coef = lmdm.step_coefficients(t, t_next)
        assert all(np.isfinite(v) for v in coef), (steps, t, t_next, coef)
        a, an = abar[t], abar[t_next]
        sigma = np.sqrt((1 - a / an) * (1 - an) / (1 - a))
        c = np.sqrt(max(1 - an - sigma**2, 0.0))
        np.testing.assert_allclose(coef, [np.sqrt(an), c, sigma], rtol=1e-6, atol=1e-9)
        # Each row is a unit vector (a DDIM step keeps the variance): a check of the maths.
        assert abs(sum(v * v for v in coef) - 1.0) < 1e-5


# ----------------------------------------------------------------------- live streams


class _WholeWindowSession:
    """The streaming encoder's surface with outputs that depend on the whole chunk (as
    HuBERT's attention does): row i of the 20 = its own 324 samples' sum plus a quarter of
    the chunk's sum, so a row changes when audio in its chunk's look-ahead changes."""

    class _Input:
        name = "audio"

    def get_inputs(self):
        return [self._Input()]

    def run(self, outputs, feeds):
        chunk = feeds["audio"].reshape(20, -1)
        rows = chunk.sum(axis=1, keepdims=True) + 0.25 * chunk.sum()
        return [np.repeat(rows, 1024, axis=1)[None]]


class _LiveEngine(_FakeEngine):
    """The stand-in engine with the real encoder chunking (`_hubert_features`) over the
    session above, so a barge-in has features that read the silenced audio to redo."""

    def __init__(self, mode: str = "online"):
        super().__init__(mode)
        self.session = _WholeWindowSession()
        self.conds: list[np.ndarray] = []  # the condition of every window sampled

    def preroll_features(self, rows: int) -> np.ndarray:
        return self.audio_features(np.zeros(rows * SAMPLES_PER_FRAME, np.float32), 0, rows)

    def audio_features(self, pcm, start, end, base=0) -> np.ndarray:
        return _hubert_features(self.session, pcm, start, end, base)

    def sample_window(self, reference, cond, x_init, step_noise, due=None,
                      holder=None) -> np.ndarray:
        self.conds.append(np.asarray(cond).copy())
        return super().sample_window(reference, cond, x_init, step_noise, due, holder)


def _live(engine: _FakeEngine | None = None, seed: int = 7) -> DittoStream:
    return DittoStream(engine or _LiveEngine(), _avatar(), seed=seed, mode="online",  # type: ignore[arg-type]
                       live=True)


def _per_frame(stream: DittoStream, pcm: np.ndarray) -> list[list[np.ndarray]]:
    """Push one frame of audio per call, as the live clock does: each call's frames."""
    return [list(stream.push(pcm[i : i + SAMPLES_PER_FRAME]))
            for i in range(0, len(pcm), SAMPLES_PER_FRAME)]


def _flat(per_push: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [frame for frames in per_push for frame in frames]


def _speech(frames: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * SAMPLES_PER_FRAME) / 16000.0
    envelope = 0.2 + 0.3 * np.abs(np.sin(2 * np.pi * 2.7 * t))  # syllables
    return (envelope * rng.standard_normal(t.size)).astype(np.float32)


def _silence(frames: int) -> np.ndarray:
    return np.zeros(frames * SAMPLES_PER_FRAME, np.float32)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_live_stream_fed_silence_keeps_pace_with_the_audio() -> None:
    stream = _live()
    assert stream.live and stream.mode == "online" and stream.lookahead_frames == 21
    per_push = _per_frame(stream, _silence(600))
    # Frames leave in tens (one window each) and never fall behind: after n frames of
    # audio, between n - 21 and n - 12 frames are out, and exactly n - 12 every 10 frames.
    out = np.cumsum([len(frames) for frames in per_push])
    pushed = np.arange(1, 601)
    assert np.all(out[21:] >= pushed[21:] - 21) and np.all(out[21:] <= pushed[21:] - 12)
    assert np.all(out[21::10] == pushed[21::10] - 12)
    # Frame k of the live stream is frame k of the same audio as one job: nothing is
    # skipped, repeated or reordered.
    whole = _render_stream(_silence(600), 600 * SAMPLES_PER_FRAME, "online")
    assert _same(_flat(per_push), whole[: out[-1]])
    # Hours of it keep little audio.
    assert len(stream.pcm) < 8 * 16000


def test_live_lookahead_is_what_push_does() -> None:
    late = {}
    for stream in (_live(), DittoStream(_FakeEngine("offline"), _avatar(), seed=1,  # type: ignore[arg-type]
                                        mode="offline")):
        per_push = _per_frame(stream, _speech(300))
        appeared = [push for push, frames in enumerate(per_push) for _ in frames]
        late[stream.mode] = [push - k for k, push in enumerate(appeared)]
        assert max(late[stream.mode]) == stream.lookahead_frames
    assert _live().lookahead_frames == 21
    # Online: frames leave in tens, the first of each ten with the 21st frame of audio
    # after its own (frame 0 with the 22nd frame of audio, 0.88 s), the last with the 12th.
    assert late["online"][:20] == list(range(21, 11, -1)) * 2
    # Offline: a window every 70 frames, 80 rows each, and the smoothing's extra frame.
    assert max(late["offline"]) == 82 == late["offline"][69]


def test_interrupt_before_the_speech_was_read_renders_silence() -> None:
    """The client's speech starts, and the user barges in before any window read a
    feature row made from it: the stream renders exactly what a stream fed silence
    renders, the rows already computed from the speech (pending in the motion generator)
    included."""
    engine = _LiveEngine()
    stream = _live(engine)
    frames = _flat(_per_frame(stream, _silence(52)))
    frames += _flat(_per_frame(stream, _speech(6)))
    assert len(frames) == 40 and stream.features == 55  # rows 50..54 read the speech
    assert stream.interrupt() == 58 - 40
    frames += _flat(_per_frame(stream, _silence(60)))

    silent = _flat(_per_frame(_live(), _silence(118)))
    assert _same(frames, silent)
    # Not interrupted, the speech shows from frame 40 on.
    spoken = _live()
    spoken_frames = _flat(_per_frame(spoken, np.concatenate([_silence(52), _speech(6),
                                                             _silence(60)])))
    assert _same(spoken_frames[:40], silent[:40])
    assert not _same(spoken_frames[40:], silent[40:])


def test_interrupt_mid_speech_feeds_silence_to_every_window_after_it() -> None:
    """Barge-in in the middle of speech, after windows read rows of the frames not yet
    returned: every window sampled after it reads, for the frames not returned, the
    features of silence; frames do not depend on the silenced audio at all."""
    speech = _speech(64, seed=3)

    def interrupted(pushed: np.ndarray, engine: _LiveEngine) -> tuple[DittoStream, list]:
        stream = _live(engine)
        frames = _flat(_per_frame(stream, pushed))
        assert len(frames) == 50  # window 5 output frames 40..49 and read rows up to 59
        windows = len(engine.conds)
        assert stream.interrupt() == 64 - 50
        return stream, frames, windows

    engine = _LiveEngine()
    stream, frames, windows = interrupted(speech, engine)
    # The features the motion generator now holds, from the first row whose encoder
    # chunk read frame 50's audio, are those of the audio with frames 50.. silenced.
    effective = speech.copy()
    effective[50 * SAMPLES_PER_FRAME :] = 0.0
    online = stream.motion.online
    first = 45  # chunk 45 reads frames 42..51
    held = np.concatenate([online.buffer, *online.pending])
    local = first + online.preroll_rows - online.buffer_offset
    assert np.array_equal(held[local:], engine.audio_features(effective, first, stream.features))
    assert not np.array_equal(held[local:], engine.audio_features(speech, first,
                                                                  stream.features))

    frames += _flat(_per_frame(stream, _silence(60)))
    # Each window sampled after the interrupt read silence features for frames >= 50:
    # rows of chunks holding only silenced audio are the pre-roll's silence rows.
    silence_row = engine.preroll_features(5)[0, 0]
    for k, cond in enumerate(engine.conds[windows:]):
        first_row = (windows + k) * 10 - 70  # feature row of the window's first row
        rows = np.arange(first_row, first_row + 80)
        assert np.all(cond[rows >= 55, 0] == silence_row)
        assert np.array_equal(cond[rows >= 50, 0],
                              engine.audio_features(effective, 50, first_row + 80)[
                                  max(0, first_row - 50):, 0])

    # The audio of the frames not returned does not matter: other speech there (the
    # audio the windows read before the interrupt kept) gives the same frames.
    other = speech.copy()
    read = (50 + 12) * SAMPLES_PER_FRAME  # window 5's rows up to 59 read frames up to 61
    other[read:] = _speech(64, seed=9)[read:]
    other_stream, other_frames, _ = interrupted(other, _LiveEngine())
    other_frames += _flat(_per_frame(other_stream, _silence(60)))
    assert _same(frames, other_frames)
    assert len(frames) == 50 + 60


def test_online_rows_are_replaced_where_they_wait() -> None:
    motion = OnlineMotion(ONLINE, np.zeros(MOTION_DIM, np.float32), linear_sampler,
                          np.zeros((70, 4), np.float32), lambda rows, first: rows)
    motion.feed(np.ones((10, 4), np.float32))  # absorbed: window 0 ran
    motion.feed(np.ones((5, 4), np.float32))  # pending
    motion.replace_rows(8, np.full((7, 4), 2.0, np.float32))
    assert np.array_equal(motion.buffer[70:], [[1.0] * 4] * 8 + [[2.0] * 4] * 2)
    assert np.array_equal(np.concatenate(motion.pending), np.full((5, 4), 2.0))
    with pytest.raises(ValueError, match="not the last rows"):
        motion.replace_rows(8, np.zeros((3, 4), np.float32))
    for _ in range(30):
        motion.feed(np.ones((10, 4), np.float32))
    with pytest.raises(ValueError, match="no longer held"):
        motion.replace_rows(0, np.zeros((motion.fed, 4), np.float32))
    offline = FeatureMotion(PipelineConfig.from_cfg(None, "offline"), None, None,
                            np.zeros(MOTION_DIM, np.float32), linear_sampler)
    with pytest.raises(ValueError, match="online"):
        offline.replace_features(0, np.zeros((0, 1024), np.float32))


def test_blink_hold_is_the_offline_guard() -> None:
    cfg = random_checkpoint.make_cfg()
    assert Blinks(PipelineConfig.from_cfg(cfg, "offline"), lambda lo, hi: 77).hold_frames == 77
    assert Blinks(PipelineConfig.from_cfg(cfg, "online"), lambda lo, hi: 77).hold_frames == 0
    assert Blinks(PipelineConfig.from_cfg(None, "offline"), None).hold_frames == 0


def test_interrupt_needs_a_live_stream_with_its_frames_read() -> None:
    with pytest.raises(RuntimeError, match="live"):
        DittoStream(_FakeEngine("online"), _avatar(), seed=1, mode="online").interrupt()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="online"):
        DittoStream(_FakeEngine("offline"), _avatar(), seed=1, mode="offline", live=True)  # type: ignore[arg-type]
    stream = _live()
    assert stream.interrupt() == 0  # nothing pushed
    unread = stream.push(_silence(30))
    with pytest.raises(RuntimeError, match="read"):
        stream.interrupt()
    assert len(list(unread)) == 10
    assert stream.interrupt() == 20
    list(stream.finish())
    with pytest.raises(RuntimeError, match="finish"):
        stream.interrupt()
