"""The Ditto condition handler (control dims of the LMDM condition) and motion clipping."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from avatard.engines.ditto import conditions as cond


def source(k: int = 1) -> cond.ConditionSource:
    return cond.ConditionSource(
        sc=np.arange(63, dtype=np.float32) / 100,
        eye_open=np.array([[0.3 + i, 0.4 + i] for i in range(k)], np.float32),
        eye_ball=np.array([[i + j / 10 for j in range(1, 7)] for i in range(k)], np.float32),
    )


def neutral() -> np.ndarray:
    """softmax of 8 at index 4, 0 elsewhere, written out."""
    big = math.exp(8) / (math.exp(8) + 7)
    small = 1 / (math.exp(8) + 7)
    v = np.full(8, small)
    v[4] = big
    return v


def test_width_and_order_with_upstream_defaults():
    out = cond.control_dims({}, source(), 5)
    assert out.shape == (5, 79) and out.dtype == np.float32
    assert cond.control_width({}) == 79
    for row in out:
        np.testing.assert_allclose(row[0:8], neutral(), rtol=1e-6)
        np.testing.assert_allclose(row[8:10], [0.3, 0.4], rtol=1e-6)
        np.testing.assert_allclose(row[10:16], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], rtol=1e-6)
        np.testing.assert_allclose(row[16:79], np.arange(63) / 100, rtol=1e-6)


def test_flags_drop_blocks_keep_order():
    cfg = {"audio2motion_cfg": {"use_emo": True, "use_eye_open": False,
                                "use_eye_ball": True, "use_sc": False}}
    assert cond.control_width(cfg) == 14
    out = cond.control_dims(cfg, source(), 2)
    np.testing.assert_allclose(out[0, :8], neutral(), rtol=1e-6)
    np.testing.assert_allclose(out[0, 8:], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], rtol=1e-6)
    none = {"audio2motion_cfg": {f: False for f in
                                 ("use_emo", "use_eye_open", "use_eye_ball", "use_sc")}}
    assert cond.control_dims(none, source(), 3).shape == (3, 0)


def test_check_width_against_cfg():
    assert cond.check_width({"audio2motion_cfg": {"audio_feat_dim": 1103}}) == 1103
    assert cond.check_width({}) == 1103
    with pytest.raises(cond.ConditionError, match="1059"):
        cond.check_width({"audio2motion_cfg": {"audio_feat_dim": 1059}})
    cfg = {"audio2motion_cfg": {"audio_feat_dim": 1040, "use_sc": False}}
    assert cond.check_width(cfg) == 1040


def test_emotion_labels():
    np.testing.assert_allclose(cond.emotion_vector(4), neutral(), rtol=1e-6)
    happy = cond.control_dims({"default_kwargs": {"emo": 3}}, source(), 1)[0, :8]
    assert int(np.argmax(happy)) == 3
    mixed = cond.parse_emotion([3, 4])[0]
    assert mixed[3] == pytest.approx(mixed[4]) and mixed[3] == pytest.approx(
        math.exp(8) / (2 * math.exp(8) + 6))
    assert cond.parse_emotion([[1], [2, 5]]).shape == (2, 8)
    override = cond.control_dims({"default_kwargs": {"emo": 3}}, source(), 1, emo=0)
    assert int(np.argmax(override[0, :8])) == 0
    for bad in (8, -1, "happy", [], [1, 2, 3, 4, 5, 6, 7, 0]):
        with pytest.raises(cond.ConditionError):
            cond.parse_emotion(bad)
    assert cond.EMOTIONS[4] == "Neutral" and len(cond.EMOTIONS) == 8


def test_emotion_array_cycles_by_absolute_frame():
    table = np.eye(8, dtype=np.float32)[:3]  # rows 0, 1, 2
    cfg = {"default_kwargs": {"emo": table}}
    out = cond.control_dims(cfg, source(), 5, start=4)
    assert [int(np.argmax(r[:8])) for r in out] == [1, 2, 0, 1, 2]  # frames 4..8 mod 3
    # Negative frames (upstream's online warm-up buffer) count as frame 0.
    out = cond.control_dims(cfg, source(), 4, start=-2)
    assert [int(np.argmax(r[:8])) for r in out] == [0, 0, 0, 1]


def test_video_eye_rows_mirror_and_f0_mode():
    src = source(k=3)
    out = cond.control_dims({}, src, 8)
    assert [int(round(r[8] - 0.3)) for r in out] == [0, 1, 2, 2, 1, 0, 0, 1]
    assert [int(r[10]) for r in out] == [0, 1, 2, 2, 1, 0, 0, 1]
    f0 = cond.control_dims({"default_kwargs": {"eye_f0_mode": True}}, src, 4, start=2)
    assert np.allclose(f0[:, 8:10], [0.3, 0.4])


def test_missing_eye_values_name_mediapipe():
    src = cond.ConditionSource(sc=np.zeros(63, np.float32))
    with pytest.raises(cond.ConditionError, match="face_landmarker"):
        cond.control_dims({}, src, 2)
    cfg = {"audio2motion_cfg": {"use_eye_open": False, "use_eye_ball": False}}
    assert cond.control_dims(cfg, src, 2).shape == (2, 71)
    with pytest.raises(cond.ConditionError):
        cond.control_dims(cfg, cond.ConditionSource(sc=np.zeros(21, np.float32)), 2)


def test_build_condition_and_source_from_registration():
    audio = np.random.default_rng(0).standard_normal((7, 1024)).astype(np.float32)
    registration = SimpleNamespace(eye_open=np.array([[0.5, 0.6]]), eye_ball=np.ones((1, 6)))
    info = {"kp": np.arange(63, dtype=np.float32).reshape(1, 63)}
    src = cond.ConditionSource.from_registration(registration, info)
    c = cond.build_condition(audio, {}, src, start=10)
    assert c.shape == (7, 1103)
    np.testing.assert_array_equal(c[:, :1024], audio)
    np.testing.assert_allclose(c[:, 1032:1034], [[0.5, 0.6]] * 7)
    np.testing.assert_allclose(c[:, 1040:], np.tile(np.arange(63), (7, 1)))
    with pytest.raises(cond.ConditionError):
        cond.build_condition(audio[:, :100], {}, src)


def test_clip_motion_uses_first_two_rows():
    rng = np.random.default_rng(1)
    limits = np.stack([np.full(265, -1.0), np.full(265, 2.0),
                       np.full(265, -100.0), np.full(265, 100.0)]).astype(np.float32)
    limits[0, 7], limits[1, 7] = 0.25, 0.5
    cfg = {"default_kwargs": {"v_min_max_for_clip": limits}}
    motion = rng.normal(0, 3, (2, 80, 265)).astype(np.float32)
    before = motion.copy()
    clipped = cond.clip_motion(motion, cfg)
    np.testing.assert_array_equal(motion, before)  # input untouched
    assert clipped.shape == motion.shape and clipped.dtype == np.float32
    assert clipped[..., :7].min() == -1.0 and clipped[..., :7].max() == 2.0
    assert clipped[..., 7].min() >= 0.25 and clipped[..., 7].max() <= 0.5
    inside = (motion >= limits[0]) & (motion <= limits[1])
    np.testing.assert_array_equal(clipped[inside], motion[inside])
    np.testing.assert_array_equal(cond.clip_motion(motion, limits), clipped)


def test_clip_motion_without_limits_and_bad_shapes():
    motion = np.ones((3, 265), np.float32) * 5
    out = cond.clip_motion(motion, {"default_kwargs": {}})
    np.testing.assert_array_equal(out, motion)
    assert out is not motion
    assert cond.clip_limits({}) is None
    with pytest.raises(cond.ConditionError):
        cond.clip_motion(np.ones((3, 100)), np.zeros((2, 265)))
    with pytest.raises(cond.ConditionError):
        cond.clip_limits(np.zeros(265))
