"""Registration maths for the Ditto engine, without the official files.

Tiny ONNX models with the official files' input/output names and shapes output planted
values; the tests check the decoding (SCRFD anchors, NMS, landmark back-projection), the
crop matrices (upright and rotated faces), the eye features and the paste-back.
Expected values are computed here from the definitions, not with the module's helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ditto_fake_aux import (  # noqa: E402
    canonical_face,
    det_outputs,
    expected_detection,
    fake_aux_dir,
    rotate,
    write_model,
)

from avatard.engines.ditto import registration as reg  # noqa: E402
from avatard.engines.ditto.checkpoints import CheckpointError  # noqa: E402

# --------------------------------------------------------------------------- fakes


def upright_crop(pts: np.ndarray, dsize: int, scale: float, vy: float) -> np.ndarray:
    """Crop positions of an upright layout: square around the points' bounding box, side
    scale x longer extent, centre moved down by vy x side."""
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    side = max(hi - lo) * scale
    center = (lo + hi) / 2 + [0.0, vy * side]
    return (pts - center) * (dsize / side) + dsize / 2


# --------------------------------------------------------------------------- detection


def test_scrfd_decodes_planted_detections_and_nms(tmp_path):
    strong = {"stride": 16, "row": 10, "col": 12, "anchor": 1, "score": 0.9,
              "dist": (3, 4, 5, 6), "kps": [(-1, -1), (1, -1), (0, 0), (-1, 1), (1, 1)]}
    # Almost the same box from the stride-8 head, weaker: NMS must drop it.
    overlap = {"stride": 8, "row": 21, "col": 24, "anchor": 0, "score": 0.7,
               "dist": (6, 10, 10, 11), "kps": [(0, 0)] * 5}
    separate = {"stride": 32, "row": 2, "col": 13, "anchor": 0, "score": 0.6,
                "dist": (1, 1, 1, 1), "kps": [(0.5, 0.5)] * 5}
    below = {"stride": 32, "row": 12, "col": 3, "anchor": 1, "score": 0.49,
             "dist": (1, 1, 1, 1), "kps": [(0, 0)] * 5}
    path = write_model(tmp_path / "det_10g.onnx", "input.1", (1, 3, 512, 512),
                       det_outputs([strong, overlap, separate, below]))
    det = reg.FaceDetector(path)
    rgb = np.zeros((768, 1024, 3), np.uint8)  # wider than tall: scale 512 / 1024
    dets, kps = det(rgb)
    assert dets.shape == (2, 5) and kps.shape == (2, 5, 2)
    for row, planted in zip(range(2), (strong, separate), strict=True):
        box, points = expected_detection(planted, 0.5)
        np.testing.assert_allclose(dets[row, :4], box, atol=1e-3)
        assert dets[row, 4] == pytest.approx(planted["score"])
        np.testing.assert_allclose(kps[row], points, atol=1e-3)
    # The dropped one really overlapped (IoU > 0.4 with the +1 convention).
    a, _ = expected_detection(strong, 0.5)
    b, _ = expected_detection(overlap, 0.5)
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    area = lambda x: (x[2] - x[0] + 1) * (x[3] - x[1] + 1)  # noqa: E731
    assert iw * ih / (area(a) + area(b) - iw * ih) > 0.4
    assert reg.largest_face(dets)[4] == pytest.approx(0.9)


def test_scrfd_scale_for_tall_image(tmp_path):
    p = {"stride": 32, "row": 5, "col": 4, "anchor": 0, "score": 0.8,
         "dist": (1, 2, 3, 4), "kps": [(0, 0)] * 5}
    path = write_model(tmp_path / "det.onnx", "input.1", (1, 3, 512, 512), det_outputs([p]))
    rgb = np.zeros((1000, 600, 3), np.uint8)  # taller than wide: scale 512 / 1000
    dets, _ = reg.FaceDetector(path)(rgb)
    box, _ = expected_detection(p, 512 / 1000)
    np.testing.assert_allclose(dets[0, :4], box, rtol=1e-5)


def test_nms_keeps_best_of_overlaps():
    dets = np.array([
        [0, 0, 99, 99, 0.5],      # overlaps the best one: IoU 0.81 -> dropped
        [10, 0, 109, 99, 0.9],
        [200, 200, 299, 299, 0.8],
        [0, 0, 99, 99 * 0 + 39, 0.7],  # IoU with the best: 3600/(10000+4000-3600)=0.35 -> kept
    ], np.float32)
    assert reg.nms(dets, 0.4) == [1, 2, 3]
    assert reg.nms(dets, 0.3) == [1, 2]


def test_anchor_centres_row_major_two_per_cell():
    c = reg.anchor_centers(2, 3, 16, 2)
    assert c.shape == (12, 2)
    np.testing.assert_array_equal(c[:6], [[0, 0], [0, 0], [16, 0], [16, 0], [32, 0], [32, 0]])
    np.testing.assert_array_equal(c[6], [0, 16])


def test_detector_blob_matches_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = write_model(tmp_path / "det.onnx", "input.1", (1, 3, 512, 512), det_outputs([]))
    det = reg.FaceDetector(path)
    rgb = np.random.default_rng(1).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    blob, scale = det.preprocess(rgb)
    new_w, new_h = 512, int(512 * 300 / 420)
    canvas = np.zeros((512, 512, 3), np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(rgb, (new_w, new_h))
    ref = cv2.dnn.blobFromImage(canvas, 1 / 128, (512, 512), (127.5, 127.5, 127.5), swapRB=True)
    assert scale == pytest.approx(new_h / 300)
    assert np.abs(blob - ref).max() <= 1.01 / 128


# --------------------------------------------------------------------------- landmarks


def test_landmark106_maps_back_to_image(tmp_path):
    box = np.array([300.0, 200.0, 420.0, 360.0, 0.9])  # 120 x 160
    want = canonical_face(106, center=(360, 285), size=140, seed=3)
    s = 192 / (160 * 1.5)
    crop = (want - [360, 280]) * s + 96
    pred = (crop / 96 - 1).reshape(1, 212)
    path = write_model(tmp_path / "2d106det.onnx", "data", (1, 3, 192, 192), [("fc1", pred)])
    got = reg.Landmark106(path)(np.zeros((600, 800, 3), np.uint8), box)
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_landmark203_maps_back_through_rotated_crop(tmp_path, angle):
    about = np.array([400.0, 300.0])
    guide_up = canonical_face(106, center=about, size=150, seed=4)
    want_up = canonical_face(203, center=about + [3, -2], size=130, seed=5)
    # The model sees the 224 crop of the (rotated) guide; in crop coordinates the points
    # are where the upright layout puts them.
    crop_guide = upright_crop(guide_up, 224, 1.5, -0.1)
    lo, hi = guide_up.min(0), guide_up.max(0)
    side = max(hi - lo) * 1.5
    center = (lo + hi) / 2 + [0, -0.1 * side]
    crop_want = (want_up - center) * (224 / side) + 112
    assert crop_guide.min() >= 0  # sanity: the guide is inside its crop
    pred = (crop_want / 224).reshape(1, 406)
    outputs = [("heatmap", np.zeros((1, 4), np.float32)), ("aux", np.zeros((1, 2), np.float32)),
               ("landmarks", pred)]
    path = write_model(tmp_path / "landmark203.onnx", "input", (1, 3, 224, 224), outputs)
    guide = rotate(guide_up, angle, about)
    got = reg.Landmark203(path)(np.zeros((600, 800, 3), np.uint8), guide)
    np.testing.assert_allclose(got, rotate(want_up, angle, about), atol=1e-3)


# --------------------------------------------------------------------------- crop


@pytest.mark.parametrize("angle", [0.0, 17.0, -40.0, 150.0])
def test_crop_matrix_puts_face_upright(angle):
    about = np.array([500.0, 400.0])
    up = canonical_face(203, center=about, size=180, seed=7)
    pts = rotate(up, angle, about)
    m = reg.crop_matrix(pts, 512, 2.3, 0.0, -0.125, rotate=True)
    want = upright_crop(up, 512, 2.3, -0.125)
    got = pts @ m[:2, :2].T + m[:2, 2]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Eyes-to-lips axis vertical in the crop, with the eyes above.
    eye = got[[0, 6, 12, 18, 24, 30, 36, 42]].mean(0)
    lip = got[[48, 66]].mean(0)
    assert abs(eye[0] - lip[0]) < 1e-6 and eye[1] < lip[1]


def test_crop_without_rotation_keeps_axes():
    about = np.array([300.0, 300.0])
    pts = rotate(canonical_face(203, center=about, size=100, seed=2), 20.0, about)
    m = reg.crop_matrix(pts, 512, 2.3, 0.0, -0.125, rotate=False)
    assert m[0, 1] == 0 and m[1, 0] == 0 and m[0, 0] == pytest.approx(m[1, 1])


def test_crop_registration_image_content_and_inverse():
    about = np.array([420.0, 330.0])
    up = canonical_face(203, center=about, size=160, seed=9)
    angle = 25.0
    pts = rotate(up, angle, about)
    rgb = np.zeros((640, 840, 3), np.uint8)
    eye = pts[[0, 6, 12, 18, 24, 30, 36, 42]].mean(0)
    lip = pts[[48, 66]].mean(0)
    for (x, y), colour in ((eye, (255, 0, 0)), (lip, (0, 255, 0))):
        rgb[int(round(y)) - 3:int(round(y)) + 4, int(round(x)) - 3:int(round(x)) + 4] = colour
    r = reg.crop_registration(rgb, pts)
    assert r.crop_512.shape == (512, 512, 3) and r.crop.shape == (256, 256, 3)
    np.testing.assert_allclose(r.m_c2o @ r.m_o2c, np.eye(3), atol=1e-9)
    want = upright_crop(up, 512, 2.3, -0.125)
    want_eye = want[[0, 6, 12, 18, 24, 30, 36, 42]].mean(0)
    want_lip = want[[48, 66]].mean(0)
    for channel, target in ((0, want_eye), (1, want_lip)):
        ys, xs = np.nonzero(r.crop_512[:, :, channel] > 128)
        assert len(xs) > 0
        assert abs(xs.mean() - target[0]) < 1.0 and abs(ys.mean() - target[1]) < 1.0
    # The 256 crop is the 512 crop averaged in 2x2 blocks.
    block = r.crop_512.astype(float).reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(r.crop.astype(float) - block).max() <= 0.5
    t = r.crop_tensor()
    assert t.shape == (1, 3, 256, 256) and float(t.max()) <= 1.0


def test_resampling_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (7, 7), 2)  # smooth content: fixed-point effects stay small
    a = math.radians(20)
    m = np.array([[1.7 * math.cos(a), 1.7 * math.sin(a), -30.0],
                  [-1.7 * math.sin(a), 1.7 * math.cos(a), 60.0]])
    ours = reg.warp_affine(img, m, (160, 140)).astype(int)
    ref = cv2.warpAffine(img, m, (160, 140)).astype(int)
    diff = np.abs(ours - ref).max(axis=-1)
    # OpenCV rounds source positions to 1/32 px: inside the image that moves a level or
    # two; across the zero border (a steep edge) a few more.
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    ys, xs = np.mgrid[:140, :160]
    u = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    v = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    inside = (u >= 0) & (v >= 0) & (u <= 119) & (v <= 89)
    assert inside.mean() > 0.3 and not inside.all()
    assert diff[inside].max() <= 2 and diff.max() <= 4 and diff.mean() < 0.3
    ours = reg.resize_linear(img, (77, 51)).astype(int)
    ref = cv2.resize(img, (77, 51)).astype(int)
    assert np.abs(ours - ref).max() <= 1
    big = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    ours = reg.downsample_area(big, 256).astype(int)
    ref = cv2.resize(big, (256, 256), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(ours - ref).max() <= 1


def test_fit_source_limits_and_evens():
    img = np.zeros((2001, 3001, 3), np.uint8)
    out = reg.fit_source(img, 1920)
    assert out.shape == (1280, 1920, 3)
    img = np.zeros((101, 64, 3), np.uint8)
    assert reg.fit_source(img, 1920).shape == (100, 64, 3)
    same = np.zeros((100, 64, 3), np.uint8)
    assert reg.fit_source(same, 1920) is same


# --------------------------------------------------------------------------- registrar


def test_registrar_chain_with_fake_models(tmp_path):
    aux, want = fake_aux_dir(tmp_path)
    rgb = np.random.default_rng(2).integers(0, 256, (600, 1000, 3), dtype=np.uint8)
    registrar = reg.Registrar.from_checkpoint(tmp_path, None, "cpu", eyes=False)
    r = registrar.register(rgb)
    np.testing.assert_allclose(r.box[:4], want["box"], atol=1e-3)
    np.testing.assert_allclose(r.lmk106, want["lmk106"], atol=1e-3)
    np.testing.assert_allclose(r.lmk203, want["lmk203"], atol=1e-3)
    got = reg.transform_points(r.lmk203, r.m_o2c)
    np.testing.assert_allclose(got, upright_crop(want["up203"], 512, 2.3, -0.125), atol=1e-3)
    assert r.image.shape == rgb.shape and r.eye_open is None
    # Video tracking: guided by the previous 203 points, no detection.
    r2 = registrar.register(rgb, last_lmk203=r.lmk203)
    assert r2.box is None and r2.lmk203.shape == (203, 2)


def test_aux_paths_from_cfg(tmp_path):
    cfg = {"base_cfg": {"insightface_det_cfg": {"model_path": "aux_models/other_det.onnx"},
                        "landmark478_cfg": {"task_path": "aux_models/x.task"}}}
    paths = reg.aux_paths(tmp_path, cfg)
    assert paths["insightface_det_cfg"] == tmp_path / "ditto_pytorch/aux_models/other_det.onnx"
    assert paths["landmark478_cfg"] == tmp_path / "ditto_pytorch/aux_models/x.task"
    assert paths["landmark106_cfg"] == tmp_path / "ditto_pytorch/aux_models/2d106det.onnx"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="det_10g.onnx"):
        reg.Registrar(tmp_path, "cpu", eyes=False)
    aux, _ = fake_aux_dir(tmp_path)
    (aux / "landmark203.onnx").unlink()
    with pytest.raises(CheckpointError, match="landmark203.onnx"):
        reg.Registrar(aux, "cpu", eyes=False)


def test_eyes_need_task_file_and_mediapipe(tmp_path):
    aux, _ = fake_aux_dir(tmp_path)
    with pytest.raises(CheckpointError, match="face_landmarker.task"):
        reg.Registrar(aux, "cpu", eyes=True)
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        (aux / "face_landmarker.task").write_bytes(b"not a real task file")
        with pytest.raises(reg.RegistrationError, match="'mediapipe' is not installed"):
            reg.Registrar(aux, "cpu", eyes=True)


def fake_mediapipe(monkeypatch, faces: list[np.ndarray]) -> list:
    """Stand-in for the mediapipe package: the landmarker returns `faces` (each (478,3))
    and records the images it was given."""
    import sys
    import types

    seen: list = []

    class Detector:
        def __init__(self, options):
            self.options = options

        def detect(self, image):
            seen.append((image.data.copy(), self.options))
            points = [[types.SimpleNamespace(x=p[0], y=p[1], z=p[2]) for p in f] for f in faces]
            return types.SimpleNamespace(face_landmarks=points)

    mp = types.ModuleType("mediapipe")
    tasks = types.ModuleType("mediapipe.tasks")
    python = types.ModuleType("mediapipe.tasks.python")
    python.BaseOptions = lambda model_asset_path: types.SimpleNamespace(path=model_asset_path)
    python.vision = types.SimpleNamespace(
        FaceLandmarkerOptions=lambda **kw: types.SimpleNamespace(**kw),
        FaceLandmarker=types.SimpleNamespace(create_from_options=Detector),
    )
    mp.Image = lambda image_format, data: types.SimpleNamespace(format=image_format, data=data)
    mp.ImageFormat = types.SimpleNamespace(SRGB="srgb")
    mp.tasks, tasks.python = tasks, python
    for name, module in (("mediapipe", mp), ("mediapipe.tasks", tasks),
                         ("mediapipe.tasks.python", python)):
        monkeypatch.setitem(sys.modules, name, module)
    return seen


def test_eye_features_from_landmarker_on_the_512_crop(tmp_path, monkeypatch):
    aux, _ = fake_aux_dir(tmp_path)
    (aux / "face_landmarker.task").write_bytes(b"stand-in")
    face = np.random.default_rng(3).uniform(0.2, 0.8, (478, 3)).astype(np.float32)
    seen = fake_mediapipe(monkeypatch, [face])
    rgb = np.random.default_rng(4).integers(0, 256, (600, 1000, 3), dtype=np.uint8)
    r = reg.Registrar(aux, "cpu", eyes=True).register(rgb)
    openness, ball = reg.eye_features(face[None])
    np.testing.assert_allclose(r.eye_open, openness)
    np.testing.assert_allclose(r.eye_ball, ball)
    assert r.eye_open.shape == (1, 2) and r.eye_ball.shape == (1, 6)
    image, options = seen[0]
    assert np.array_equal(image, r.crop_512)  # mediapipe runs on the 512 crop
    assert options.num_faces == 1 and options.base_options.path.endswith("face_landmarker.task")
    seen_none = fake_mediapipe(monkeypatch, [])
    with pytest.raises(reg.RegistrationError, match="no face"):
        reg.Registrar(aux, "cpu", eyes=True).register(rgb)
    assert len(seen_none) == 1


def test_no_face_raises(tmp_path):
    aux = tmp_path / "aux"
    aux.mkdir()
    write_model(aux / "det_10g.onnx", "input.1", (1, 3, 512, 512), det_outputs([]))
    write_model(aux / "2d106det.onnx", "data", (1, 3, 192, 192),
                [("fc1", np.zeros((1, 212), np.float32))])
    write_model(aux / "landmark203.onnx", "input", (1, 3, 224, 224),
                [(f"o{i}", np.zeros((1, 406), np.float32)) for i in range(3)])
    with pytest.raises(reg.RegistrationError, match="no face"):
        reg.Registrar(aux, "cpu", eyes=False).register(np.zeros((100, 100, 3), np.uint8))


# --------------------------------------------------------------------------- eye features


def test_eye_features_by_hand():
    lmk = np.zeros((1, 478, 3), np.float32)
    # Left eye: corners 0.1 apart, lids 0.02 + 0.03 + 0.01 -> openness 0.6; iris 0.01
    # below the corner centre -> ((0,1,0) - (-1,0,0)) * 0.01.
    lmk[0, 33] = [0.40, 0.5, 0]
    lmk[0, 133] = [0.50, 0.5, 0]
    for (a, b), d in zip(((145, 159), (144, 160), (153, 158)), (0.02, 0.03, 0.01), strict=True):
        lmk[0, a] = [0.45, 0.5 + d, 0]
        lmk[0, b] = [0.45, 0.5, 0]
    lmk[0, 468] = [0.45, 0.51, 0]
    # Right eye: corners 0.2 apart, lids 0.02 each -> 0.3; iris 0.02 along +z.
    lmk[0, 263] = [0.8, 0.5, 0]
    lmk[0, 362] = [0.6, 0.5, 0]
    for a, b in ((374, 386), (373, 387), (380, 385)):
        lmk[0, a] = [0.7, 0.52, 0]
        lmk[0, b] = [0.7, 0.50, 0]
    lmk[0, 473] = [0.7, 0.5, 0.02]
    openness, ball = reg.eye_features(lmk)
    np.testing.assert_allclose(openness, [[0.6, 0.3]], rtol=1e-5)
    left = np.array([0.01, 0.01, 0.0])  # (0,1,0) - (-1,0,0), times 0.01
    right = np.array([-1.0, 0.0, 1.0]) * 0.02  # (0,0,1) - (1,0,0), times 0.02
    # Per coordinate, left then right.
    want = np.stack([left, right], axis=-1).reshape(1, 6)
    np.testing.assert_allclose(ball, want, atol=1e-6)
    assert ball[0, 0] == pytest.approx(0.01, abs=1e-6)
    assert ball[0, 1] == pytest.approx(-0.02, abs=1e-6)


# --------------------------------------------------------------------------- paste-back


def test_paste_mask_shape_and_values():
    m = reg.paste_mask(512, 512)
    assert m.shape == (512, 512) and m.dtype == np.float32
    # Border 26 px (512 - int(512*0.9) = 52, split evenly).
    assert m[26:486, 26:486].min() == 1.0
    assert m[0, 256] == 0.0 and m[511, 256] == 0.0 and m[256, 0] == 0.0 and m[256, 511] == 0.0
    assert m[13, 256] == pytest.approx(13 / 25)
    assert m[0, 0] == 0.0 and m[25, 25] == pytest.approx(1.0)
    assert m[12, 25] == pytest.approx(1 - (1 - 12 / 25), abs=1e-6)
    np.testing.assert_allclose(m, m[::-1, ::-1], atol=1e-6)
    np.testing.assert_allclose(m, m.T, atol=1e-6)


def _rotated_m_c2o(h: int, w: int, angle: float = 20.0, side: float = 300.0) -> np.ndarray:
    a = math.radians(angle)
    s = 512 / side
    c = np.array([w * 0.55, h * 0.45])
    m_o2c = np.array([[s * math.cos(a), s * math.sin(a), 0], [-s * math.sin(a), s * math.cos(a), 0],
                      [0, 0, 1]])
    m_o2c[:2, 2] = 256 - m_o2c[:2, :2] @ c
    return np.linalg.inv(m_o2c)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_paste_back_constant_face(device):
    h, w = 480, 640
    image = np.random.default_rng(5).integers(0, 256, (h, w, 3), dtype=np.uint8)
    m_c2o = _rotated_m_c2o(h, w)
    paster = reg.PasteBack(image, m_c2o, device)
    face = torch.full((3, 512, 512), 0.5, device=device)
    out = paster(face)
    assert out.shape == (h, w, 3) and out.dtype == torch.uint8 and out.device.type == device
    out = out.cpu().numpy()
    # Which image pixels the mask touches, from the definition: crop position inside the
    # (bilinear-extended) mask support.
    m_o2c = np.linalg.inv(m_c2o)
    ys, xs = np.mgrid[:h, :w]
    u = m_o2c[0, 0] * xs + m_o2c[0, 1] * ys + m_o2c[0, 2]
    v = m_o2c[1, 0] * xs + m_o2c[1, 1] * ys + m_o2c[1, 2]
    outside = (u <= 0.0) | (v <= 0.0) | (u >= 511) | (v >= 511)
    assert np.array_equal(out[outside], image[outside])
    inner = (u > 30) & (v > 30) & (u < 481) & (v < 481)  # fully opaque part of the mask
    assert inner.sum() > 10000
    assert np.all(out[inner] == 127)  # 127.5 truncated, as upstream
    changed = np.any(out != image, axis=-1)
    assert changed[~outside].mean() > 0.9
    # Round trip: cropping the result with M_o2c gives the face back inside the mask core.
    back = reg.warp_affine(out, m_o2c, 512)
    assert np.abs(back[40:472, 40:472].astype(int) - 127).max() <= 1


def test_paste_back_matches_upstream_formula_with_opencv():
    cv2 = pytest.importorskip("cv2")
    h, w = 360, 500
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    face = torch.from_numpy(cv2.GaussianBlur(rng.random((512, 512, 3)).astype(np.float32),
                                             (9, 9), 3)).permute(2, 0, 1)
    m_c2o = _rotated_m_c2o(h, w, angle=-15, side=260)
    ours = reg.PasteBack(image, m_c2o)(face).numpy().astype(int)
    face_hwc = face.permute(1, 2, 0).numpy().clip(0, 1) * 255
    mask = cv2.warpAffine(reg.paste_mask(), m_c2o[:2], (w, h)).clip(0, 1)[..., None]
    warped = cv2.warpAffine(face_hwc, m_c2o[:2], (w, h))
    ref = np.clip(mask * warped + (1 - mask) * image, 0, 255).astype(np.uint8).astype(int)
    diff = np.abs(ours - ref)
    assert diff.max() <= 2 and (diff <= 1).mean() > 0.99


def test_paste_back_batched_equals_single():
    h, w = 200, 260
    image = np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8)
    m_c2o = _rotated_m_c2o(h, w, angle=5, side=150)
    paster = reg.PasteBack(image, m_c2o)
    faces = torch.rand(3, 3, 512, 512)
    batch = paster(faces)
    assert batch.shape == (3, h, w, 3)
    for i in range(3):
        assert torch.equal(batch[i], paster(faces[i]))
    assert torch.equal(reg.paste_back(image, faces[1], m_c2o), batch[1])
    with pytest.raises(ValueError):
        paster(torch.rand(3, 256, 256))


def test_paste_back_outside_image_is_identity():
    image = np.full((100, 100, 3), 9, np.uint8)
    m_c2o = np.array([[0.1, 0, 1000.0], [0, 0.1, 1000.0], [0, 0, 1]])  # crop far away
    out = reg.PasteBack(image, m_c2o)(torch.ones(2, 3, 512, 512))
    assert torch.all(out == 9)
