"""Motion-vector layout, LMDM windowing (offline and streamed) and the stream's chunking
independence, with a cheap deterministic stand-in for the LMDM sampler."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

# The Ditto engine needs torch (the `ditto` extra); without it these tests skip.
torch = pytest.importorskip("torch")

from avatard.engines.ditto.engine import SAMPLES_PER_FRAME, DittoAvatar, DittoStream  # noqa: E402
from avatard.engines.ditto.motion_gen import (  # noqa: E402
    MOTION_DIM,
    WindowedMotion,
    generate_offline,
    info_to_vector,
    smooth,
    vector_to_info,
)


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
    base = np.asarray(reference, np.float32).reshape(1, 1, MOTION_DIM)
    return base + cond[..., :1] * np.linspace(0, 1, MOTION_DIM, dtype=np.float32)


def test_offline_windows_cover_clip_and_chain_references() -> None:
    frames = 200  # windows at 0, 70, 140
    cond = np.arange(frames, dtype=np.float32)[:, None].repeat(4, 1) / frames
    calls = []

    def sampler(reference, window_cond):
        calls.append((reference.copy(), window_cond.copy()))
        return linear_sampler(reference, window_cond)

    source = np.zeros(MOTION_DIM, np.float32)
    motion = generate_offline(sampler, source, cond)
    assert motion.shape == (frames, MOTION_DIM)
    assert len(calls) == 3
    assert np.array_equal(calls[0][0], source[None])
    # The second window starts at frame 70 and the last one is padded with its last row.
    assert calls[1][1][0, 0, 0] == pytest.approx(cond[70, 0])
    assert np.all(calls[2][1][0, 60:, 0] == cond[-1, 0])
    # The second window is conditioned on the fused result's frame 69.
    assert calls[1][0].shape == (1, MOTION_DIM)


def test_fuse_cross_fades_overlap() -> None:
    motion = WindowedMotion(np.zeros(MOTION_DIM, np.float32), smooth_kernel=1)
    motion.add(np.zeros((1, 80, MOTION_DIM), np.float32))
    motion.add(np.ones((1, 80, MOTION_DIM), np.float32))
    values = motion.motion[0, :, 0]
    assert values.shape == (150,)
    assert np.allclose(values[70:80], np.arange(10) / 10)
    assert np.all(values[:70] == 0) and np.all(values[80:] == 1)
    assert motion.settled == 140


class _FakeLMDM:
    seq_frames = 80


class _FakeEngine:
    """Duck-typed engine: cheap, deterministic stand-ins for the heavy calls."""

    lmdm = _FakeLMDM()

    def audio_features(self, pcm: np.ndarray, start: int, end: int) -> np.ndarray:
        padded = np.zeros(end * SAMPLES_PER_FRAME, np.float32)
        padded[: min(len(pcm), len(padded))] = pcm[: len(padded)]
        per_frame = padded.reshape(end, SAMPLES_PER_FRAME).mean(axis=1)
        return per_frame[start:end, None].repeat(4, axis=1)

    def conditions(self, feats: np.ndarray, avatar, start: int) -> np.ndarray:
        return feats

    fps = 25
    max_batch = 16  # frames per render batch: the stream queues whole batches between windows

    def sample_window(self, reference, cond, generator: torch.Generator, due=None) -> np.ndarray:
        noise = torch.randn(1, 80, MOTION_DIM, generator=generator).numpy() * 1e-3
        return linear_sampler(reference, cond) + noise

    def driving_keypoints(self, avatar, motion, first_motion) -> np.ndarray:
        return (motion - first_motion)[:, :63].reshape(-1, 21, 3)

    def submit_frames(self, avatar, x_d, deadlines=None, first_alone=False) -> list[Future]:
        futures = []
        for frame in x_d:
            future: Future = Future()
            future.set_result(frame.copy())
            futures.append(future)
        return futures


def _render_stream(pcm: np.ndarray, chunk: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    avatar = DittoAvatar(
        image=np.zeros((8, 8, 3), np.uint8),
        crop_box=(0, 0, 8),
        feature_3d=torch.zeros(1),
        source_info=fake_info(rng),
        x_s=np.zeros((1, 21, 3), np.float32),
    )
    stream = DittoStream(_FakeEngine(), avatar, seed=7)  # type: ignore[arg-type]
    frames = []
    for i in range(0, len(pcm), chunk):
        frames += stream.push(pcm[i : i + chunk])
    frames += stream.finish()
    return frames


def test_stream_frames_do_not_depend_on_chunking() -> None:
    seconds = 7.3
    pcm = np.sin(np.arange(int(seconds * 16000)) / 37.0).astype(np.float32) * 0.3
    whole = _render_stream(pcm, len(pcm))
    chunked = _render_stream(pcm, 3217)
    assert len(whole) == len(chunked) == round(seconds * 25)
    for a, b in zip(whole, chunked, strict=True):
        assert np.array_equal(a, b)


def test_stream_emits_before_finish() -> None:
    pcm = np.zeros(16000 * 5, np.float32)  # 125 frames: one window is final early
    rng = np.random.default_rng(0)
    avatar = DittoAvatar(
        np.zeros((8, 8, 3), np.uint8),
        (0, 0, 8),
        torch.zeros(1),
        fake_info(rng),
        np.zeros((1, 21, 3), np.float32),
    )
    stream = DittoStream(_FakeEngine(), avatar, seed=1)  # type: ignore[arg-type]
    early = list(stream.push(pcm))
    assert len(early) == 70  # frames before the first window's overlap
    assert len(early) + len(list(stream.finish())) == 125


def test_stream_without_audio_gives_no_frames() -> None:
    assert _render_stream(np.zeros(0, np.float32), 640) == []
    # Less than half a frame of audio rounds to zero frames as well.
    assert _render_stream(np.zeros(300, np.float32), 640) == []
