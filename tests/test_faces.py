"""Errors that name the real cause when a picture has no face the engines can animate:
no face, a face too small (both numbers), several faces of similar size. Pictures are the
default portrait scaled onto generated canvases (embedded engine) and planted detections
of the stand-in aux models (Ditto registration)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from avatard.engines.faces import (
    MIN_DETECTION_PX,
    MIN_DETECTION_SHARE,
    MIN_FACE_PX,
    FaceChoiceError,
    choose_face,
    detection_floor_px,
)


def test_choose_face_rules():
    assert choose_face([120.0]) == 0
    assert choose_face([60.0, 200.0, 90.0]) == 1  # a clearly largest face wins
    with pytest.raises(FaceChoiceError, match=r"^no face found; use a well-lit"):
        choose_face([])
    # The detector could see 13 px; narrower than the floor is not a face.
    with pytest.raises(FaceChoiceError, match=rf"from about {MIN_DETECTION_PX} px wide were "):
        choose_face([], smallest_searched_px=13.2)
    with pytest.raises(FaceChoiceError, match=r"from about 30 px wide were looked for\)"):
        choose_face([], smallest_searched_px=30.4)
    with pytest.raises(FaceChoiceError, match=rf"is 31 px wide; at least {MIN_FACE_PX} px"):
        choose_face([31.0])
    with pytest.raises(FaceChoiceError, match=r"40 px wide \(the largest of 2 faces found\)"):
        choose_face([30.0, 40.0])
    # A detection under the floor is left out: of the others, the face and its index.
    with pytest.raises(FaceChoiceError, match=r"is 40 px wide; at least"):
        choose_face([11.0, 40.0])
    assert choose_face([12.0, 100.0, 11.0]) == 1


def test_detections_under_the_floor_are_texture_not_faces():
    assert detection_floor_px(None) == MIN_DETECTION_PX
    assert detection_floor_px(512) == MIN_DETECTION_PX  # the absolute floor
    assert detection_floor_px(4000) == pytest.approx(MIN_DETECTION_SHARE * 4000)  # relative
    with pytest.raises(FaceChoiceError) as caught:
        choose_face([11.0, 12.4], smallest_searched_px=10.0, short_side_px=512)
    assert str(caught.value) == (
        f"no face found (faces from about {MIN_DETECTION_PX} px wide were looked for; 2 "
        "smaller face-like patterns (12, 11 px wide) were taken for texture); use a "
        "well-lit, front-facing portrait")
    # In a 4000 px picture a 50 px patch is under the relative floor (60 px).
    with pytest.raises(FaceChoiceError, match=r"^no face found \(faces from about 60 px"):
        choose_face([50.0], short_side_px=4000)
    with pytest.raises(FaceChoiceError, match=r"2 faces of similar size \(110, 100 px wide\)"):
        choose_face([100.0, 110.0, 50.0])


# ----------------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def embedded():
    pytest.importorskip("cv2")
    from avatard.engines.embedded.avatar import EmbeddedAvatarEngine

    return EmbeddedAvatarEngine("cpu", {"warmup": False})


def canvas(scales: list[float], size=(1200, 1600)) -> np.ndarray:
    """The default portrait (face about 100 px wide at scale 1) at these scales, side by
    side on a plain light canvas."""
    from avatard.engines.embedded.avatar import default_portrait

    portrait = default_portrait()
    picture = np.full((*size, 3), 200, np.uint8)
    x = 100
    for scale in scales:
        side = int(512 * scale)
        scaled = np.asarray(Image.fromarray(portrait).resize((side, side), Image.LANCZOS))
        picture[100 : 100 + side, x : x + side] = scaled
        x += side + 50
    return picture


def refusal(engine, picture: np.ndarray) -> str:
    from avatard.engines.base import EngineInputError

    with pytest.raises(EngineInputError) as caught:
        engine.register(picture)
    assert caught.value.field == "image"
    return caught.value.rule


def test_a_face_about_100_px_wide_in_a_large_picture_registers(embedded):
    """The field report: a 96 px face in a 1600x1200 picture got the lighting/pose message
    (the first search skips faces under a tenth of the picture)."""
    state = embedded.register(canvas([1.0]))
    assert 85 <= state.extras["face_box"][2] <= 115


@pytest.mark.parametrize("scale", [0.36, 0.4])
def test_a_too_small_face_is_named_with_both_numbers(embedded, scale):
    rule = refusal(embedded, canvas([scale]))
    found = re.fullmatch(r"the face is (\d+) px wide; at least (\d+) px is needed: .*", rule)
    assert found, rule
    assert int(found.group(2)) == MIN_FACE_PX
    assert abs(int(found.group(1)) - 100 * scale) <= 10  # about the face's real width


@pytest.mark.parametrize("seed", [2, 16, 25])
def test_noise_is_no_face_not_a_tiny_one(embedded, seed):
    """The field report: a noise picture was refused as "the face is 11 px wide". These
    generated pictures make the frontal-face cascade fire on an 11-12 px patch (checked
    here first, so the test keeps meaning something if the detector changes)."""
    from avatard.engines.embedded import landmarks as lm

    noise = np.random.default_rng(seed).integers(100, 156, (512, 512, 3), dtype=np.uint8)
    # The engine's second, fine search for small faces, as find_landmarks runs it.
    gray, shrink = lm._for_detection(noise, lm.SMALL_FACE_MAX_SIDES[0], lm.SMALL_FACE_MAX_ENLARGE)
    widths = lm._detect_faces(gray, lm.CASCADE_WINDOW_PX, fine=True)[:, 2] / shrink
    assert len(widths) and widths.max() < MIN_DETECTION_PX, widths
    rule = refusal(embedded, noise)
    assert rule.startswith(f"no face found (faces from about {MIN_DETECTION_PX} px wide"), rule
    assert "taken for texture" in rule and "use a well-lit, front-facing portrait" in rule


def test_no_face_gets_the_lighting_message_and_says_how_small_was_searched(embedded):
    rule = refusal(embedded, np.full((600, 800, 3), 128, np.uint8))
    assert rule.startswith("no face found (faces from about ")
    assert "use a well-lit, front-facing portrait" in rule


def test_two_faces_of_similar_size_are_named(embedded):
    rule = refusal(embedded, canvas([1.0, 1.0]))
    assert rule.startswith("2 faces of similar size (") and "crop it" in rule


def test_a_clearly_largest_face_is_animated(embedded):
    state = embedded.register(canvas([1.0, 0.5]))
    x = state.extras["face_box"][0]
    assert x < 100 + 512  # the face of the large copy, on the left


# ----------------------------------------------------------------------- Ditto


@pytest.fixture
def ditto_registrar(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("torch")

    def make(planted: list[dict]):
        from ditto_fake_aux import det_outputs, write_fake_aux, write_model

        from avatard.engines.ditto import registration

        aux = tmp_path / "aux"
        write_fake_aux(aux, hubert=False)
        write_model(aux / "det_10g.onnx", "input.1", (1, 3, 512, 512), det_outputs(planted))
        return registration.Registrar(aux, "cpu", eyes=False)

    return make


def _face(row: int, col: int, stride: int = 16, half: float = 4.0) -> dict:
    return {"stride": stride, "row": row, "col": col, "anchor": 0, "score": 0.9,
            "dist": (half, half, half, half), "kps": [(0, 0)] * 5}


def test_ditto_small_face_several_faces_and_no_face(ditto_registrar):
    from avatard.engines.ditto.registration import RegistrationError

    rgb = np.zeros((600, 1000, 3), np.uint8)  # detector scale 0.512
    # 2 x 1 x 8 = 16 detector px = 31 px in the picture.
    with pytest.raises(RegistrationError, match=rf"the face is 31 px wide; at least {MIN_FACE_PX}"):
        ditto_registrar([_face(20, 20, stride=8, half=1.0)]).register(rgb)
    with pytest.raises(RegistrationError, match=r"2 faces of similar size \(250, 250 px"):
        ditto_registrar([_face(14, 8), _face(14, 24)]).register(rgb)
    with pytest.raises(RegistrationError, match=r"^no face found"):
        ditto_registrar([]).register(rgb)
    # A large face and a small one: the large one is registered, as upstream does.
    result = ditto_registrar([_face(14, 8), _face(14, 24, half=1.5)]).register(rgb)
    assert result.box[2] - result.box[0] == pytest.approx(8 * 16 / 0.512, abs=0.5)


def test_ditto_face_size_is_measured_in_the_submitted_picture(ditto_registrar):
    """Pictures over 1920 px are shrunk before detection; the width in the error is in
    the pixels the user sent."""
    from avatard.engines.ditto.registration import RegistrationError

    rgb = np.zeros((1200, 3840, 3), np.uint8)  # fitted to 600x1920, detector scale 512/1920
    with pytest.raises(RegistrationError, match=r"similar size \(120, 120 px wide\)"):
        # 16 detector px -> 60 px fitted -> 120 px submitted
        ditto_registrar([_face(20, 20, stride=8, half=1.0),
                         _face(20, 40, stride=8, half=1.0)]).register(rgb)
