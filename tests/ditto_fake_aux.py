"""Stand-ins for the Ditto aux models (a test helper, not a test module).

Tiny ONNX files with the official files' input/output names and shapes:

- ``det_10g.onnx``, ``2d106det.onnx``, ``landmark203.onnx``: constant outputs that plant
  one face (`write_fake_aux`); the registrar's chain (detection -> 106 points -> 203
  points -> crop) reproduces the planted landmarks for an image of the planted size;
- ``hubert_streaming_fix_kv.onnx``: input ``input_values`` (1, 6480) float32, output
  ``encoding_out`` (1, 20, 1024): the chunk cut into 20 frames of 324 samples, each
  multiplied by a fixed seeded (324, 1024) matrix, so different audio gives different
  features (20 rows = 2 per 40 ms frame of the 3+5+2 chunk, as the engine reads them).

Needs the ``onnx`` package (the ``test`` extra). As a script it writes the four files
into a folder, e.g. to prepare a checkpoint folder made by
``python -m avatard.engines.ditto.random_checkpoint`` for a machine without ``onnx``::

    python tests/ditto_fake_aux.py OUT/ditto_pytorch/aux_models [--image-size 480x640]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

STRIDES = (8, 16, 32)
HUBERT_FILE = "hubert_streaming_fix_kv.onnx"
HUBERT_SAMPLES = 6480  # (3 + 5 + 2) frames of 640 samples + 80
HUBERT_ROWS = 20  # 50 Hz rows of a chunk: 2 per 40 ms frame
AUDIO_DIM = 1024
# The planted detection (stride-16 head, 512x512 detector input): see `write_fake_aux`.
PLANTED_DETECTION = {"stride": 16, "row": 14, "col": 20, "anchor": 0, "score": 0.95,
                     "dist": (4, 5, 4, 6), "kps": [(0, 0)] * 5}
DEFAULT_IMAGE_HW = (600, 1000)


def _model(nodes: list, inputs: list, outputs: list, initializers: list | None = None):
    graph = helper.make_graph(nodes, "fake", inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def write_model(path: Path, input_name: str, input_shape: tuple[int, ...],
                outputs: list[tuple[str, np.ndarray]]) -> Path:
    """An ONNX file whose outputs are constants (the input is accepted and ignored)."""
    nodes = [
        helper.make_node("Constant", [], [name],
                         value=numpy_helper.from_array(value.astype(np.float32), name + "_c"))
        for name, value in outputs
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape))
         for name, value in outputs],
    )
    path.write_bytes(model.SerializeToString())
    return path


def write_hubert(path: Path, seed: int = 0) -> Path:
    """The streaming-HuBERT stand-in: (1, 6480) -> reshape (1, 20, 324) -> MatMul with a
    seeded (324, 1024) matrix (scaled so unit-variance audio gives unit-variance
    features) -> ``encoding_out`` (1, 20, 1024)."""
    width = HUBERT_SAMPLES // HUBERT_ROWS
    rng = np.random.default_rng(seed)
    matrix = (rng.standard_normal((width, AUDIO_DIM)) / math.sqrt(width)).astype(np.float32)
    shape = np.array([1, HUBERT_ROWS, width], np.int64)
    nodes = [
        helper.make_node("Reshape", ["input_values", "frames_shape"], ["frames"]),
        helper.make_node("MatMul", ["frames", "projection"], ["encoding_out"]),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input_values", TensorProto.FLOAT, [1, HUBERT_SAMPLES])],
        [helper.make_tensor_value_info("encoding_out", TensorProto.FLOAT,
                                       [1, HUBERT_ROWS, AUDIO_DIM])],
        [numpy_helper.from_array(shape, "frames_shape"),
         numpy_helper.from_array(matrix, "projection")],
    )
    path.write_bytes(model.SerializeToString())
    return path


def det_outputs(planted: list[dict], size: int = 512) -> list[tuple[str, np.ndarray]]:
    """SCRFD outputs (scores, distances, keypoints per stride; 2 anchors per cell, rows
    row-major) that are background everywhere except at the planted anchors."""
    scores, boxes, kps = [], [], []
    for stride in STRIDES:
        n = (size // stride) ** 2 * 2
        scores.append(np.full((n, 1), 0.01, np.float32))
        boxes.append(np.ones((n, 4), np.float32))
        kps.append(np.zeros((n, 10), np.float32))
    for p in planted:
        s = STRIDES.index(p["stride"])
        cells = size // p["stride"]
        i = (p["row"] * cells + p["col"]) * 2 + p["anchor"]
        scores[s][i, 0] = p["score"]
        boxes[s][i] = np.asarray(p["dist"], np.float32)
        kps[s][i] = np.asarray(p["kps"], np.float32).reshape(10)
    names = [f"score_{s}" for s in STRIDES] + [f"bbox_{s}" for s in STRIDES] + \
        [f"kps_{s}" for s in STRIDES]
    return list(zip(names, scores + boxes + kps, strict=True))


def expected_detection(p: dict, det_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Box and keypoints of a planted anchor in image pixels, from the SCRFD definition."""
    stride = p["stride"]
    cx, cy = p["col"] * stride, p["row"] * stride
    left, top, right, bottom = (v * stride for v in p["dist"])
    box = np.array([cx - left, cy - top, cx + right, cy + bottom]) / det_scale
    k = np.asarray(p["kps"], float).reshape(5, 2) * stride
    return box, (k + [cx, cy]) / det_scale


def canonical_face(n: int, center=(0.0, 0.0), size: float = 100.0, seed: int = 0) -> np.ndarray:
    """An upright layout of n landmarks (106 or 203 ordering of the eye and lip points):
    eye centre straight above the lip centre, other points spread over the face."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform([-0.5, -0.6], [0.5, 0.6], size=(n, 2))
    if n == 203:
        left, right, lips = [0, 6, 12, 18], [24, 30, 36, 42], (48, 66)
    else:
        left, right, lips = [33, 35, 40, 39], [87, 89, 94, 93], (52, 61)
    ring = np.array([[-0.08, 0.0], [0.0, -0.04], [0.08, 0.0], [0.0, 0.04]])
    pts[left] = ring + [-0.2, -0.15]
    pts[right] = ring + [0.2, -0.15]
    pts[lips[0]] = [-0.1, 0.3]
    pts[lips[1]] = [0.1, 0.3]
    return pts * size + np.asarray(center)


def rotate(pts: np.ndarray, degrees: float, about) -> np.ndarray:
    a = math.radians(degrees)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (pts - about) @ r.T + about


def detector_scale(image_hw: tuple[int, int], size: int = 512) -> float:
    """The detector's input scale for an image (new height over height, as the
    registrar's preprocessing computes it)."""
    h, w = image_hw
    new_h = size if h > w else int(size * (h / w))
    return new_h / h


def write_fake_aux(aux_dir: Path | str, image_hw: tuple[int, int] = DEFAULT_IMAGE_HW,
                   hubert: bool = True) -> dict:
    """det_10g.onnx, 2d106det.onnx and landmark203.onnx planting one face for an image of
    `image_hw` (height, width), plus the HuBERT stand-in when `hubert`. Returns what was
    planted, in image pixels: 'box' (4,), 'lmk106', 'lmk203' (the face rotated by 12
    degrees) and 'up203' (the same face upright)."""
    aux = Path(aux_dir)
    aux.mkdir(parents=True, exist_ok=True)
    planted = PLANTED_DETECTION
    write_model(aux / "det_10g.onnx", "input.1", (1, 3, 512, 512), det_outputs([planted]))
    box, _ = expected_detection(planted, detector_scale(image_hw))
    # 106 points: an upright face centred in the box.
    c = (box[:2] + box[2:]) / 2
    lmk106 = canonical_face(106, center=c, size=(box[3] - box[1]) * 0.8, seed=11)
    s = 192 / (max(box[2] - box[0], box[3] - box[1]) * 1.5)
    pred106 = ((lmk106 - c) * s + 96) / 96 - 1
    write_model(aux / "2d106det.onnx", "data", (1, 3, 192, 192), [("fc1", pred106.reshape(1, -1))])
    # 203 points: the face rotated by 12 degrees about its centre.
    up203 = canonical_face(203, center=c, size=(box[3] - box[1]) * 0.75, seed=12)
    lmk203 = rotate(up203, 12.0, c)
    lo, hi = lmk106.min(0), lmk106.max(0)
    side = max(hi - lo) * 1.5
    center = (lo + hi) / 2 + [0, -0.1 * side]
    pred203 = ((lmk203 - center) * (224 / side) + 112) / 224
    outputs = [("o0", np.zeros((1, 1), np.float32)), ("o1", np.zeros((1, 1), np.float32)),
               ("landmarks", pred203.reshape(1, -1))]
    write_model(aux / "landmark203.onnx", "input", (1, 3, 224, 224), outputs)
    if hubert:
        write_hubert(aux / HUBERT_FILE)
    return {"box": box, "lmk106": lmk106, "lmk203": lmk203, "up203": up203,
            "image_hw": tuple(image_hw)}


def fake_aux_dir(tmp_path: Path, rng_seed: int = 0) -> tuple[Path, dict]:
    """All fakes under ``tmp_path/ditto_pytorch/aux_models``, planted for a 600x1000 image
    so that the chain's results are known."""
    aux = tmp_path / "ditto_pytorch" / "aux_models"
    aux.mkdir(parents=True)
    return aux, write_fake_aux(aux, DEFAULT_IMAGE_HW)


def face_image(planted: dict, seed: int = 0) -> np.ndarray:
    """(H,W,3) uint8 image of the planted size with a face drawn where the stand-ins put
    it: a skin-toned ellipse over the box, dark eyes and a red mouth at the 203 points."""
    h, w = planted["image_hw"]
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:h, :w]
    image = np.empty((h, w, 3), np.float64)
    image[..., 0] = 60 + 80 * xs / w
    image[..., 1] = 90 + 60 * ys / h
    image[..., 2] = 140
    x1, y1, x2, y2 = planted["box"]
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    face = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    image[face] = (220, 180, 150)
    lmk = planted["lmk203"]
    r = max(2.0, rx * 0.08)
    for idx, colour in (([0, 6, 12, 18], (30, 30, 40)), ([24, 30, 36, 42], (30, 30, 40)),
                        ([48, 66], (170, 40, 50))):
        px, py = lmk[idx].mean(0)
        image[(xs - px) ** 2 + (ys - py) ** 2 <= r * r] = colour
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write stand-in Ditto aux ONNX models (det_10g, 2d106det, landmark203 "
        "planting one face; streaming HuBERT) into AUX_DIR. For tests only."
    )
    parser.add_argument("aux_dir", type=Path, help="e.g. OUT/ditto_pytorch/aux_models")
    parser.add_argument("--image-size", default="x".join(map(str, DEFAULT_IMAGE_HW)),
                        help="HxW of the image the face is planted for (default 600x1000)")
    args = parser.parse_args(argv)
    h, w = (int(v) for v in args.image_size.lower().split("x"))
    planted = write_fake_aux(args.aux_dir, (h, w))
    box = ", ".join(f"{v:.0f}" for v in planted["box"])
    print(f"wrote stand-in aux models to {args.aux_dir} (STAND-INS, not the official files);"
          f" face planted at box [{box}] for a {h}x{w} image; no face_landmarker.task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
