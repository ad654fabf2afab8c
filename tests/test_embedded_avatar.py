"""The embedded avatar engine with its real dependencies (OpenCV cascades, PIL, numpy)."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("cv2")
PIL_Image = pytest.importorskip("PIL.Image")

from avatard.engines.base import EngineInputError  # noqa: E402
from avatard.engines.embedded.avatar import (  # noqa: E402
    BLINK_PROFILE,
    BREATH_RISE_PX,
    FPS,
    HOP,
    MAX_SIDE_PX,
    EmbeddedAvatarEngine,
    _Motion,
    default_portrait,
    speech_like_signal,
)
from avatard.engines.registry import load_engine  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> EmbeddedAvatarEngine:
    return EmbeddedAvatarEngine("cpu", {}, lambda stage, fraction: None)


@pytest.fixture(scope="module")
def portrait_state(engine: EmbeddedAvatarEngine):
    return engine.register(default_portrait())


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL_Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _render(engine, state, pcm, seed, chunks=None) -> list[np.ndarray]:
    stream = engine.open_stream(state, seed)
    frames: list[np.ndarray] = []
    if chunks is None:
        frames += stream.push(pcm)
    else:
        start = 0
        for size in chunks:
            frames += stream.push(pcm[start : start + size])
            start += size
        frames += stream.push(pcm[start:])
    frames += stream.finish()
    return frames


def test_registry_loads_the_engine_and_reports_cpu_warmup():
    loaded = load_engine("avatar", "embedded", "cpu", {"cache_size": 2})
    report = loaded.report()
    assert report.name == "embedded" and report.kind == "avatar" and report.device == "cpu"
    assert report.warmup_s > 0.0
    assert report.memory_bytes >= 0


def test_default_portrait_registers_with_a_face(engine, portrait_state):
    portrait = default_portrait()
    # The worker asks the engine for it when a job names no avatar; that hits the cache.
    assert np.array_equal(engine.default_portrait(), portrait)
    hits = engine.cache_hits
    assert engine.register(engine.default_portrait()) is portrait_state
    assert engine.cache_hits == hits + 1
    assert portrait.dtype == np.uint8 and portrait.shape == (512, 512, 3)
    assert portrait_state.width == 512 and portrait_state.height == 512
    assert portrait_state.extras["eyes_found"] and portrait_state.extras["mouth_found"]
    x, y, w, h = portrait_state.extras["face_box"]
    # The astronaut's face is in the upper middle of the picture, about 95 px wide.
    assert 150 < x < 200 and 40 < y < 100 and 70 < w < 130


@pytest.mark.parametrize(
    "picture",
    [
        np.full((256, 256, 3), 128, np.uint8),
        np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8),
    ],
    ids=["flat-grey", "noise"],
)
def test_picture_without_a_face_is_refused(engine, picture):
    with pytest.raises(EngineInputError) as caught:
        engine.register(_png(picture))
    assert caught.value.field == "image"
    assert "face" in caught.value.rule


def test_truncated_png_is_refused(engine):
    data = _png(default_portrait())
    with pytest.raises(EngineInputError) as caught:
        engine.register(data[: len(data) // 2])
    assert caught.value.field == "image"
    assert "truncated or corrupt" in caught.value.rule


def test_non_image_bytes_are_refused(engine):
    with pytest.raises(EngineInputError) as caught:
        engine.register(b"this is plain text, not a picture" * 10)
    assert caught.value.field == "image" and "not a decodable image" in caught.value.rule
    with pytest.raises(EngineInputError):
        engine.register(b"")


def test_too_large_and_too_small_images_are_refused(engine):
    # A 9000x64 PNG is tiny to encode but over the per-side limit.
    with pytest.raises(EngineInputError) as caught:
        engine.register(_png(np.zeros((64, MAX_SIDE_PX + 808, 3), np.uint8)))
    assert caught.value.field == "image" and str(MAX_SIDE_PX) in caught.value.rule
    with pytest.raises(EngineInputError) as caught:
        engine.register(np.zeros((32, 32, 3), np.uint8))
    assert "at least 64 px" in caught.value.rule


def test_wrong_array_layout_is_refused(engine):
    with pytest.raises(EngineInputError) as caught:
        engine.register(default_portrait().astype(np.float32))
    assert caught.value.field == "image" and "uint8" in caught.value.rule


def test_second_registration_hits_the_cache():
    engine = EmbeddedAvatarEngine("cpu", {"warmup": False}, lambda stage, fraction: None)
    data = _png(default_portrait())
    first = engine.register(data)
    assert (engine.cache_hits, engine.cache_misses) == (0, 1)
    second = engine.register(data)
    assert (engine.cache_hits, engine.cache_misses) == (1, 1)
    assert second is first and second.avatar_id == first.avatar_id
    # The same pixels as an array are a different input (different hash), not a false hit.
    engine.register(default_portrait())
    assert engine.cache_misses == 2


def test_frames_are_512_rgb_uint8_and_deterministic(engine, portrait_state):
    pcm = speech_like_signal(1.0, seed=1)
    first = _render(engine, portrait_state, pcm, seed=5)
    again = _render(engine, portrait_state, pcm, seed=5)
    assert len(first) == 25
    for frame in first:
        assert frame.shape == (512, 512, 3) and frame.dtype == np.uint8
        assert frame.flags["C_CONTIGUOUS"]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_another_seed_moves_the_head_differently(engine, portrait_state):
    silence = np.zeros(HOP * 25, np.float32)
    frames_a = _render(engine, portrait_state, silence, seed=1)
    frames_b = _render(engine, portrait_state, silence, seed=2)
    differing = [not np.array_equal(a, b) for a, b in zip(frames_a, frames_b, strict=True)]
    assert sum(differing) >= 20


@pytest.mark.parametrize("samples", [0, 100, 320, 321, HOP * 10, 19_999, 16000 + 1234])
def test_frame_count_is_rounded_seconds_times_fps(engine, portrait_state, samples):
    pcm = speech_like_signal(samples / 16000, seed=2)[:samples]
    pcm = np.pad(pcm, (0, samples - pcm.size))
    frames = _render(engine, portrait_state, pcm, seed=0)
    assert len(frames) == round(samples / 16000 * FPS)


def test_chunking_does_not_change_frames(engine, portrait_state):
    pcm = speech_like_signal(1.3, seed=4)
    whole = _render(engine, portrait_state, pcm, seed=9)
    rng = np.random.default_rng(0)
    for chunks in ([1, 639, 641, 5000], list(rng.integers(1, 900, 40)), [HOP] * 30):
        stream_frames = _render(engine, portrait_state, pcm, seed=9, chunks=chunks)
        assert len(stream_frames) == len(whole) == round(1.3 * FPS)
        assert all(np.array_equal(a, b) for a, b in zip(whole, stream_frames, strict=True))


def test_frames_arrive_while_audio_streams(engine, portrait_state):
    stream = engine.open_stream(portrait_state, 0)
    produced = []
    pcm = speech_like_signal(1.0, seed=0)
    for start in range(0, pcm.size, HOP):
        produced.append(len(stream.push(pcm[start : start + HOP])))
    # After the ~52 ms look-ahead, every 40 ms of audio yields one frame.
    assert produced[:2] == [0, 0] and all(count == 1 for count in produced[3:])
    assert sum(produced) + len(stream.finish()) == 25


def _mouth_darkness(frames: list[np.ndarray], state) -> float:
    """Share of dark pixels around the lip line, averaged over frames."""
    rig = state.payload.rig
    mouth_x, mouth_y = rig.landmarks.mouth_center
    half = rig.landmarks.mouth_half_width
    shares = []
    for frame in frames:
        region = frame[
            int(mouth_y - 8) : int(mouth_y + 30), int(mouth_x - half) : int(mouth_x + half)
        ]
        luminance = region.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        shares.append(float((luminance < 70).mean()))
    return float(np.mean(shares))


def test_silence_keeps_the_mouth_shut_and_speech_opens_it(engine, portrait_state):
    silence = np.zeros(16000 * 2, np.float32)
    speech = speech_like_signal(2.0, seed=6)
    quiet_frames = _render(engine, portrait_state, silence, seed=3)
    loud_frames = _render(engine, portrait_state, speech, seed=3)
    quiet, loud = (
        _mouth_darkness(quiet_frames, portrait_state),
        _mouth_darkness(loud_frames, portrait_state),
    )
    # At rest the frames show the photo's own mouth (lip corners are a little dark).
    rest = _mouth_darkness([portrait_state.payload.rig.portrait], portrait_state)
    assert quiet <= rest + 0.01
    assert loud > quiet + 0.05


def test_blinks_come_every_two_to_six_seconds():
    motion = _Motion(seed=11)
    closed = [frame for frame in range(FPS * 60) if motion.blink(frame) == 1.0]
    gaps_s = np.diff(closed) / FPS
    assert 8 <= len(closed) <= 30
    assert gaps_s.min() >= 2.0 - len(BLINK_PROFILE) / FPS and gaps_s.max() <= 6.0 + 0.05


def test_breaths_come_12_to_20_a_minute_and_rise_smoothly():
    motion = _Motion(seed=11)
    rise = np.array([motion.breath(frame) for frame in range(FPS * 60)])
    inhales = np.flatnonzero((rise[1:] > 0.0) & (rise[:-1] == 0.0)) + 1
    periods_s = np.diff(inhales) / FPS
    assert 11 <= len(inhales) <= 21
    assert periods_s.min() >= 3.0 - 0.05 and periods_s.max() <= 5.0 + 0.05
    assert rise.min() == 0.0 and 0.75 * BREATH_RISE_PX < rise.max() <= 1.25 * BREATH_RISE_PX
    # Smooth: a breath moves a fraction of a pixel per frame.
    assert np.abs(np.diff(rise)).max() < 0.25


def test_a_breath_raises_head_and_shoulders_but_not_the_background(portrait_state):
    from avatard.engines.embedded.warp import FacePose, render_frame

    rig = portrait_state.payload.rig
    still = render_frame(rig, FacePose())
    raised = render_frame(rig, FacePose(breath_px=2.0))
    # Where the body follows the breath fully (face, neck, chest), the frame is the still
    # one moved up by 2 px; the background above the shoulders stays where it was.
    body = rig.body_weight[:-2] == 1.0
    assert body[440:].mean() > 0.6  # the chest and shoulders, not just the head
    difference = np.abs(raised[:-2].astype(np.int16) - still[2:])
    assert difference[body].max() <= 1
    background = rig.body_weight == 0.0
    assert background[:100].any() and np.array_equal(raised[background], still[background])


def test_bad_audio_and_push_after_finish(engine, portrait_state):
    stream = engine.open_stream(portrait_state, 0)
    with pytest.raises(EngineInputError) as caught:
        stream.push(np.array([0.0, np.nan], np.float32))
    assert caught.value.field == "audio"
    with pytest.raises(EngineInputError, match="float PCM"):
        stream.push(np.zeros(640, np.int16))
    with pytest.raises(EngineInputError, match="mono"):
        stream.push(np.zeros((640, 2), np.float32))
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.push(np.zeros(10, np.float32))


def _encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    PIL_Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_jpeg_and_rgba_png_register_and_gif_is_refused(engine):
    portrait = default_portrait()
    assert engine.register(_encoded(portrait, "JPEG", quality=85)).extras["eyes_found"]
    rgba = np.dstack([portrait, np.full(portrait.shape[:2], 255, np.uint8)])
    assert engine.register(_encoded(rgba, "PNG")).payload is not None
    with pytest.raises(EngineInputError) as caught:
        engine.register(_encoded(portrait, "GIF"))
    assert caught.value.field == "image" and "GIF" in caught.value.rule


def test_face_in_a_big_mirrored_picture_gets_the_same_landmarks(engine):
    """A mirrored, doubled copy on a wide canvas: the landmarks found there, mapped back to
    the original picture, land within a few pixels of the original's, and the 512x512
    framing shows the face at the same size."""
    portrait = default_portrait()
    big = np.asarray(PIL_Image.fromarray(portrait[:, ::-1]).resize((1024, 1024)))
    canvas = np.full((1200, 2000, 3), 200, np.uint8)
    canvas[100:1124, 700:1724] = big
    original = engine.register(portrait).payload
    moved = engine.register(_encoded(canvas, "JPEG", quality=90)).payload

    def back(point: tuple[float, float]) -> tuple[float, float]:
        return 512 - (point[0] - 700) / 2, (point[1] - 100) / 2

    source, copy = original.source_landmarks, moved.source_landmarks
    assert np.allclose(back(copy.mouth_center), source.mouth_center, atol=4)
    assert np.allclose(back(copy.right_eye.center), source.left_eye.center, atol=4)
    assert np.allclose(back(copy.left_eye.center), source.right_eye.center, atol=4)
    framed, framed_copy = original.rig.landmarks, moved.rig.landmarks
    assert abs(framed_copy.face_box[2] - framed.face_box[2]) < 0.12 * framed.face_box[2]


def test_grey_portrait_registers_without_colour_cues(engine):
    grey = np.asarray(PIL_Image.fromarray(default_portrait()).convert("L"))
    state = engine.register(_encoded(grey, "PNG"))
    original = engine.register(default_portrait()).payload.source_landmarks
    # The lip line then comes from the darkest row near the mouth guess, not from colour.
    assert abs(state.payload.source_landmarks.mouth_center[1] - original.mouth_center[1]) < 10


def test_a_blink_closes_both_eyes(engine, portrait_state):
    seed = 4
    motion = _Motion(seed)
    shut = next(frame for frame in range(FPS * 8) if motion.blink(frame) == 1.0)
    frames = _render(engine, portrait_state, np.zeros(HOP * (shut + 2), np.float32), seed)
    landmarks = portrait_state.payload.rig.landmarks

    def iris_darkness(frame: np.ndarray) -> float:
        shares = []
        for eye in (landmarks.left_eye, landmarks.right_eye):
            x, y = (round(v) for v in eye.center)
            half = round(eye.half_width * 0.6)
            patch = frame[y - 4 : y + 3, x - half : x + half].astype(np.float32).mean(axis=2)
            shares.append(float((patch < 90).mean()))
        return min(shares)

    # Open eyes show the dark iris; on the shut frame the lid skin covers it.
    assert iris_darkness(frames[0]) > 0.15
    assert iris_darkness(frames[shut]) < 0.5 * iris_darkness(frames[0])


def test_face_warp_leaves_no_seam_at_its_region_edge(portrait_state):
    from avatard.engines.embedded.warp import FacePose, render_frame

    rig = portrait_state.payload.rig
    frame = render_frame(rig, FacePose(mouth_open=1.0, lip_spread=1.0, blink=1.0))
    x0, y0, x1, y1 = rig.roi
    inside = np.zeros(frame.shape[:2], bool)
    inside[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = True
    # Without head motion only the face region changes, and it fades to nothing at its edge.
    assert np.array_equal(frame[~inside], rig.portrait[~inside])
    assert not np.array_equal(frame[inside], rig.portrait[inside])


def test_any_chunking_gives_the_same_frames(engine, portrait_state):
    hypothesis = pytest.importorskip("hypothesis")
    strategies = pytest.importorskip("hypothesis.strategies")
    pcm = speech_like_signal(0.9, seed=12)
    whole = _render(engine, portrait_state, pcm, seed=3)

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
    @hypothesis.given(strategies.lists(strategies.integers(0, 3000), max_size=12))
    def same_frames(chunks: list[int]) -> None:
        frames = _render(engine, portrait_state, pcm, seed=3, chunks=chunks)
        assert len(frames) == len(whole)
        assert all(np.array_equal(a, b) for a, b in zip(whole, frames, strict=True))

    same_frames()
