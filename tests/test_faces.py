"""Errors that name the real cause when a picture has no face the engines can animate:
no face, a face too small (both numbers), several faces of similar size. Pictures are the
default portrait scaled onto generated canvases (embedded engine) and planted detections
of the stand-in aux models (Ditto registration)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from avatard.engines.faces import MIN_FACE_PX, FaceChoiceError, choose_face


def test_choose_face_rules():
    assert choose_face([120.0]) == 0
    assert choose_face([60.0, 200.0, 90.0]) == 1  # a clearly largest face wins
    with pytest.raises(FaceChoiceError, match=r"^no face found; use a well-lit"):
        choose_face([])
    with pytest.raises(FaceChoiceError, match=r"from about 13 px wide were looked for"):
        choose_face([], smallest_searched_px=13.2)
    with pytest.raises(FaceChoiceError, match=rf"is 31 px wide; at least {MIN_FACE_PX} px"):
        choose_face([31.0])
    with pytest.raises(FaceChoiceError, match=r"40 px wide \(the largest of 2 faces found\)"):
        choose_face([20.0, 40.0])
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
