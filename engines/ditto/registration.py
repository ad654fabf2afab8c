"""Avatar registration with the official auxiliary face models, and paste-back.

What upstream's registrar does for an image source, re-implemented here:

1. face detection with ``det_10g.onnx`` (SCRFD): the image is resized to fit 512x512
   (top-left aligned, zero padded), normalised as ``(x - 127.5) / 128`` with its channel
   order reversed, and the nine outputs (scores, box distances and five keypoints for the
   strides 8, 16 and 32, two anchors per cell) are decoded, thresholded at 0.5 and
   reduced by NMS (IoU 0.4). The largest box is the face, unless it is too small or
   another is about as large (`engines/faces.py`: the error then says so).
2. 106 landmarks with ``2d106det.onnx`` on a 192x192 crop around that box (side
   1.5 x the longer box side, channel order reversed, no normalisation).
3. 203 landmarks with ``landmark203.onnx`` on a 224x224 crop computed from the 106 points
   (scale 1.5, vertical shift -0.1, rotated upright); RGB in [0, 1].
4. the final crop from the 203 points: scale 2.3, vertical shift -0.125, rotation that
   puts the eyes-to-mouth axis vertical, 512x512 (``M_o2c``/``M_c2o`` map between the
   original image and this crop); the extractors get it downsampled to 256x256 by 2x2
   averaging.
5. eye openness (2) and eye-ball movement (6) from mediapipe's 478 landmarks
   (``face_landmarker.task``) on the 512 crop; these feed the condition handler.

Paste-back warps the decoded 512x512 face into the source image with ``M_c2o`` and
blends it with upstream's soft rectangular mask (0.9 of the side fully opaque, linear
ramps to the border, rounded corners); `PasteBack` does it in torch, batched, on the
device the faces are on.

Geometry runs in float64 numpy; image resampling uses torch (bilinear, zero border, pixel
centres on integer coordinates, as OpenCV's ``warpAffine``/``resize`` do), so neither
OpenCV nor scikit-image is needed. OpenCV computes with fixed-point coordinates, so
resampled pixels can differ from it by one or two levels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import acos
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..faces import FaceChoiceError, choose_face
from .checkpoints import AUX_RELDIR, CheckpointError

# Official file names under ditto_pytorch/aux_models (see `aux_paths`).
AUX_FILES: dict[str, str] = {
    "insightface_det_cfg": "det_10g.onnx",
    "landmark106_cfg": "2d106det.onnx",
    "landmark203_cfg": "landmark203.onnx",
    "landmark478_cfg": "face_landmarker.task",
}

CROP_SIZE = 512  # the registration crop; the decoder also renders 512x512
EXTRACTOR_SIZE = 256
DEFAULT_CROP = {"crop_scale": 2.3, "crop_vx_ratio": 0.0, "crop_vy_ratio": -0.125,
                "crop_flag_do_rot": True}


class RegistrationError(RuntimeError):
    """Registration cannot proceed: no face, a missing package, or a bad model output."""


# --------------------------------------------------------------------------- files


def aux_paths(root: Path | str, cfg: Any = None) -> dict[str, Path]:
    """Paths of the four aux model files for a checkpoint folder `root` (the one holding
    ``ditto_pytorch/``). With the pipeline `cfg`, its ``base_cfg`` paths are used (they are
    relative to ``ditto_pytorch/``, upstream's data root); otherwise the official names
    under ``ditto_pytorch/aux_models``. Keys are the cfg section names of `AUX_FILES`."""
    root = Path(root)
    aux_dir = root / AUX_RELDIR
    data_root = aux_dir.parent
    paths = {key: aux_dir / name for key, name in AUX_FILES.items()}
    base = cfg.get("base_cfg") if isinstance(cfg, Mapping) else None
    if isinstance(base, Mapping):
        for key in AUX_FILES:
            section = base.get(key)
            if not isinstance(section, Mapping):
                continue
            field_name = "task_path" if key == "landmark478_cfg" else "model_path"
            value = section.get(field_name)
            if isinstance(value, str) and value:
                candidate = Path(value)
                paths[key] = candidate if candidate.is_absolute() else data_root / candidate
    return paths


def _require(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise CheckpointError(
            f"{what}: file {path} does not exist (the official checkpoint folder has it as "
            f"{AUX_RELDIR}/{Path(path).name})"
        )
    return Path(path)


def _session(path: Path, device: str):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, (os.cpu_count() or 2) // 2)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        raise CheckpointError(f"cannot open ONNX model {path}: {exc}") from exc


# --------------------------------------------------------------------------- resampling


def _image_tensor(image: np.ndarray | torch.Tensor, device: str | torch.device = "cpu"):
    """(H,W,C) array -> (1,C,H,W) float32 tensor."""
    t = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    return t.to(device=device, dtype=torch.float32).permute(2, 0, 1)[None]


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    """(1,C,H,W) float -> (H,W,C) uint8, halves rounded up (OpenCV's fixed-point
    resampling of uint8 images rounds that way)."""
    return (t[0].permute(1, 2, 0) + 0.5).floor().clamp(0, 255).to(torch.uint8).cpu().numpy()


def _affine_grid(m_dst2src: np.ndarray, out_hw: tuple[int, int], in_hw: tuple[int, int],
                 origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """grid_sample grid (1,h,w,2) for output pixels (x0+i, y0+j) sampled at
    ``m_dst2src @ (x, y, 1)`` in an input of size `in_hw` (align_corners=True units)."""
    h, w = out_hw
    x0, y0 = origin
    ys, xs = np.meshgrid(np.arange(y0, y0 + h, dtype=np.float64),
                         np.arange(x0, x0 + w, dtype=np.float64), indexing="ij")
    m = np.asarray(m_dst2src, dtype=np.float64)
    u = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    v = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    hi, wi = in_hw
    gx = u * (2.0 / max(wi - 1, 1)) - 1.0
    gy = v * (2.0 / max(hi - 1, 1)) - 1.0
    return torch.from_numpy(np.stack([gx, gy], axis=-1)[None].astype(np.float32))


def warp_affine(image: np.ndarray, m_src2dst: np.ndarray,
                dsize: int | tuple[int, int]) -> np.ndarray:
    """Like ``cv2.warpAffine(image, M, dsize)`` with bilinear sampling and a zero border:
    output pixel p takes the input at ``inverse(M) p``. `dsize` is (width, height);
    uint8 in, uint8 out (rounded); float in, float32 out."""
    w, h = (dsize, dsize) if isinstance(dsize, int) else dsize
    m = np.eye(3)
    m[:2] = np.asarray(m_src2dst, dtype=np.float64)[:2]
    inv = np.linalg.inv(m)
    src = _image_tensor(image)
    grid = _affine_grid(inv, (h, w), image.shape[:2])
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if image.dtype == np.uint8:
        return _to_uint8(out)
    return out[0].permute(1, 2, 0).numpy().astype(np.float32)


def resize_linear(image: np.ndarray, dsize: tuple[int, int]) -> np.ndarray:
    """Like ``cv2.resize(image, (w, h))`` (bilinear, half-pixel centres, no antialias)."""
    w, h = dsize
    out = F.interpolate(_image_tensor(image), size=(h, w), mode="bilinear", align_corners=False)
    return _to_uint8(out)


def downsample_area(image: np.ndarray, size: int = EXTRACTOR_SIZE) -> np.ndarray:
    """Like ``cv2.resize(..., INTER_AREA)`` for an integer factor: block averages."""
    out = F.adaptive_avg_pool2d(_image_tensor(image), (size, size))
    return _to_uint8(out)


def fit_source(rgb: np.ndarray, max_dim: int = 1920, division: int = 2) -> np.ndarray:
    """Upstream's source loading: shrink so the longer side is at most `max_dim` (<= 0:
    no limit) and make both sides multiples of `division` (bilinear resize if needed)."""
    h, w = rgb.shape[:2]
    new_h, new_w = h, w
    if max_dim > 0 and max(h, w) > max_dim:
        if h > w:
            new_h, new_w = max_dim, int(round(w * max_dim / h))
        else:
            new_h, new_w = int(round(h * max_dim / w)), max_dim
    new_h -= new_h % division
    new_w -= new_w % division
    if (new_h, new_w) == (h, w):
        return rgb
    return resize_linear(rgb, (new_w, new_h))


# --------------------------------------------------------------------------- crop maths


def _eye_lip_points(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eye centre, lip centre) of a 203-, 106- or 5-point landmark set."""
    n = len(pts)
    if n == 203:
        left, right, lips = [0, 6, 12, 18], [24, 30, 36, 42], (48, 66)
    elif n == 106:
        left, right, lips = [33, 35, 40, 39], [87, 89, 94, 93], (52, 61)
    elif n == 5:
        eye = (pts[0] + pts[1]) / 2
        return eye, (pts[3] + pts[4]) / 2
    else:
        raise ValueError(f"crop from {n} landmarks is not supported (203, 106 or 5)")
    eye = (pts[left].mean(axis=0) + pts[right].mean(axis=0)) / 2
    return eye, (pts[lips[0]] + pts[lips[1]]) / 2


def crop_rect(pts: np.ndarray, scale: float, vx_ratio: float = 0.0, vy_ratio: float = 0.0
              ) -> tuple[np.ndarray, float, float]:
    """Centre (2,), side and angle (radians) of the square crop around landmarks `pts`:
    axes from the eyes-to-lips direction (y) and its perpendicular (x), the landmarks'
    extent along those axes, made square, times `scale`, shifted by `vx_ratio`/`vy_ratio`
    of the side along x/y."""
    pts = np.asarray(pts, dtype=np.float64)
    eye, lip = _eye_lip_points(pts)
    uy = lip - eye
    norm = np.linalg.norm(uy)
    uy = np.array([0.0, 1.0]) if norm <= 1e-3 else uy / norm
    ux = np.array([uy[1], -uy[0]])
    angle = acos(float(np.clip(ux[0], -1.0, 1.0)))
    if ux[1] < 0:
        angle = -angle
    rot = np.stack([ux, uy])
    mean = pts.mean(axis=0)
    local = (pts - mean) @ rot.T
    lo, hi = local.min(axis=0), local.max(axis=0)
    mid = (lo + hi) / 2
    side = float(max(hi - lo)) * scale
    center = mean + ux * mid[0] + uy * mid[1]
    center = center + ux * (vx_ratio * side) + uy * (vy_ratio * side)
    return center, side, angle


def crop_matrix(pts: np.ndarray, dsize: int, scale: float, vx_ratio: float = 0.0,
                vy_ratio: float = 0.0, rotate: bool = True) -> np.ndarray:
    """3x3 matrix M_o2c mapping original-image pixels to the `dsize` crop."""
    center, side, angle = crop_rect(pts, scale, vx_ratio, vy_ratio)
    s = dsize / side
    c, n = (np.cos(angle), np.sin(angle)) if rotate else (1.0, 0.0)
    half = dsize / 2
    cx, cy = center
    return np.array([
        [s * c, s * n, half - s * (c * cx + n * cy)],
        [-s * n, s * c, half - s * (-n * cx + c * cy)],
        [0.0, 0.0, 1.0],
    ])


def transform_points(pts: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply the affine part of a 2x3/3x3 matrix to (N,2) points."""
    m = np.asarray(m, dtype=np.float64)
    return np.asarray(pts, dtype=np.float64) @ m[:2, :2].T + m[:2, 2]


# --------------------------------------------------------------------------- SCRFD


def anchor_centers(height: int, width: int, stride: int, num_anchors: int = 2) -> np.ndarray:
    """(height*width*num_anchors, 2) anchor centres (x, y) in input pixels, row-major,
    each cell repeated `num_anchors` times."""
    ys, xs = np.mgrid[:height, :width]
    centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centers, num_anchors, axis=0)


def nms(dets: np.ndarray, thresh: float) -> list[int]:
    """Greedy NMS over (N,5) [x1,y1,x2,y2,score] rows (areas with the +1 pixel
    convention); returns kept row indices, best score first."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= thresh]
    return keep


class FaceDetector:
    """SCRFD (insightface ``det_10g.onnx``) as upstream runs it."""

    strides = (8, 16, 32)
    num_anchors = 2
    input_size = 512
    nms_thresh = 0.4
    det_thresh = 0.5

    def __init__(self, path: Path | str, device: str = "cpu"):
        self.session = _session(_require(Path(path), "face detector"), device)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if len(self.output_names) != 9:
            raise RegistrationError(
                f"face detector {path}: expected 9 outputs (scores, boxes, keypoints for "
                f"strides 8/16/32), found {len(self.output_names)}"
            )

    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """(1,3,512,512) float32 blob and the image -> input scale."""
        size = self.input_size
        h, w = rgb.shape[:2]
        if h / w > 1.0:
            new_h, new_w = size, int(size / (h / w))
        else:
            new_w, new_h = size, int(size * (h / w))
        canvas = np.zeros((size, size, 3), np.uint8)
        canvas[:new_h, :new_w] = resize_linear(rgb, (new_w, new_h))
        # Upstream hands the RGB image to a BGR->RGB swap, so the blob is in BGR order.
        blob = (canvas[:, :, ::-1].astype(np.float32) - 127.5) / 128.0
        return np.ascontiguousarray(blob.transpose(2, 0, 1)[None]), new_h / h

    def decode(self, outputs: list[np.ndarray], scale: float, threshold: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Network outputs -> (dets (N,5) [x1,y1,x2,y2,score], kps (N,5,2)) in image
        pixels after thresholding and NMS, best first."""
        threshold = self.det_thresh if threshold is None else threshold
        all_scores, all_boxes, all_kps = [], [], []
        for i, stride in enumerate(self.strides):
            scores = _rows(outputs[i], 1)
            boxes = _rows(outputs[i + 3], 4) * stride
            kps = _rows(outputs[i + 6], 10) * stride
            cells = self.input_size // stride
            centers = anchor_centers(cells, cells, stride, self.num_anchors)
            if len(centers) != len(scores):
                raise RegistrationError(
                    f"face detector: stride {stride} gives {len(scores)} anchors, expected "
                    f"{len(centers)} for a {self.input_size}x{self.input_size} input"
                )
            keep = np.where(scores[:, 0] >= threshold)[0]
            c = centers[keep]
            b = boxes[keep]
            all_boxes.append(np.stack([c[:, 0] - b[:, 0], c[:, 1] - b[:, 1],
                                       c[:, 0] + b[:, 2], c[:, 1] + b[:, 3]], axis=-1))
            k = kps[keep].reshape(-1, 5, 2)
            all_kps.append(c[:, None, :] + k)
            all_scores.append(scores[keep, 0])
        scores = np.concatenate(all_scores)
        dets = np.concatenate(
            [np.concatenate(all_boxes) / scale, scores[:, None]], axis=1
        ).astype(np.float32)
        kps = (np.concatenate(all_kps) / scale).astype(np.float32)
        order = scores.argsort()[::-1]
        dets, kps = dets[order], kps[order]
        keep = nms(dets, self.nms_thresh)
        return dets[keep], kps[keep]

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blob, scale = self.preprocess(rgb)
        outputs = self.session.run(self.output_names, {self.input_name: blob})
        return self.decode(outputs, scale)


def _rows(array: np.ndarray, width: int) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    return array.reshape(-1, width)


def largest_face(dets: np.ndarray) -> np.ndarray | None:
    """The detection with the largest box area (upstream's choice), or None."""
    if len(dets) == 0:
        return None
    area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    return dets[int(np.argsort(-area, kind="stable")[0])]


# --------------------------------------------------------------------------- landmarks


class Landmark106:
    """insightface ``2d106det.onnx``: 192x192 crop around a face box."""

    input_size = 192
    num_points = 106

    def __init__(self, path: Path | str, device: str = "cpu"):
        self.session = _session(_require(Path(path), "106-point landmark model"), device)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def crop_matrix(self, box: np.ndarray) -> np.ndarray:
        """2x3 image -> crop matrix: centre of the box to the crop centre, 1.5 x the
        longer side across the crop, no rotation."""
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        s = self.input_size / (max(x2 - x1, y2 - y1) * 1.5)
        half = self.input_size / 2
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        return np.array([[s, 0.0, half - s * cx], [0.0, s, half - s * cy]])

    def decode(self, pred: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Raw output -> (106,2) image points: the last 106 (x,y) pairs, from [-1,1] to
        crop pixels, then through the inverse crop matrix."""
        pts = np.asarray(pred, dtype=np.float64).reshape(-1, 2)[-self.num_points:]
        pts = (pts + 1) * (self.input_size // 2)
        full = np.eye(3)
        full[:2] = m
        return transform_points(pts, np.linalg.inv(full))

    def __call__(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        m = self.crop_matrix(box)
        crop = warp_affine(rgb, m, self.input_size)
        blob = np.ascontiguousarray(crop[:, :, ::-1].astype(np.float32).transpose(2, 0, 1)[None])
        pred = self.session.run([self.output_name], {self.input_name: blob})[0]
        return self.decode(pred, m)


class Landmark203:
    """LivePortrait's 203-point landmark model (``landmark203.onnx``) on a 224 crop."""

    input_size = 224
    output_index = 2  # the file has three outputs; the landmarks are the third

    def __init__(self, path: Path | str, device: str = "cpu"):
        self.session = _session(_require(Path(path), "203-point landmark model"), device)
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()
        if len(outputs) <= self.output_index:
            raise RegistrationError(
                f"203-point landmark model {path}: expected at least 3 outputs, found "
                f"{len(outputs)}"
            )
        self.output_name = outputs[self.output_index].name

    def decode(self, pred: np.ndarray, m_c2o: np.ndarray) -> np.ndarray:
        """Raw output (normalised to the crop) -> (203,2) image points."""
        pts = np.asarray(pred, dtype=np.float64).reshape(-1, 2) * self.input_size
        return transform_points(pts, m_c2o)

    def __call__(self, rgb: np.ndarray, guide: np.ndarray) -> np.ndarray:
        m_o2c = crop_matrix(guide, self.input_size, scale=1.5, vy_ratio=-0.1, rotate=True)
        crop = warp_affine(rgb, m_o2c, self.input_size)
        blob = np.ascontiguousarray((crop.astype(np.float32) / 255.0).transpose(2, 0, 1)[None])
        pred = self.session.run([self.output_name], {self.input_name: blob})[0]
        return self.decode(pred[0] if pred.ndim > 2 else pred, np.linalg.inv(m_o2c))


class Landmark478:
    """mediapipe's FaceLandmarker (``face_landmarker.task``): (1,478,3) normalised points."""

    def __init__(self, path: Path | str):
        path = _require(Path(path), "mediapipe face landmarker")
        try:
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision
        except ImportError as exc:
            raise RegistrationError(
                "eye openness and eye-ball conditions need mediapipe's face landmarker "
                f"({path.name}), but the Python package 'mediapipe' is not installed "
                f"(pip install mediapipe): {exc}"
            ) from exc
        self._mp = mp
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(path)),
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
            num_faces=1,
        )
        try:
            self.detector = vision.FaceLandmarker.create_from_options(options)
        except Exception as exc:  # mediapipe raises RuntimeError/ValueError for bad files
            raise CheckpointError(f"cannot open mediapipe face landmarker {path}: {exc}") from exc

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB,
                               data=np.ascontiguousarray(rgb))
        result = self.detector.detect(image)
        faces = [[[p.x, p.y, p.z] for p in face] for face in result.face_landmarks]
        if not faces:
            raise RegistrationError("mediapipe found no face in the registration crop")
        return np.asarray(faces, dtype=np.float32)


# --------------------------------------------------------------------------- eye features

# mediapipe face-mesh indices: eye corners (outer, inner), three lid pairs, iris centre.
_LEFT_EYE = {"corners": (33, 133), "lids": ((145, 159), (144, 160), (153, 158)), "iris": 468}
_RIGHT_EYE = {"corners": (263, 362), "lids": ((374, 386), (373, 387), (380, 385)), "iris": 473}


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - b) ** 2).sum(-1))


def _unit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a - b) / (_dist(a, b)[..., None] + 1e-8)


def _eye(lmk: np.ndarray, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    outer, inner = lmk[:, spec["corners"][0]], lmk[:, spec["corners"][1]]
    width = _dist(outer, inner)
    height = sum(_dist(lmk[:, a], lmk[:, b]) for a, b in spec["lids"])
    openness = height / (width + 1e-8)
    center = (outer + inner) / 2
    iris = lmk[:, spec["iris"]]
    move = (_unit(iris, center) - _unit(outer, inner)) * _dist(iris, center)[:, None]
    return openness, move


def eye_features(lmk478: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,478,3) mediapipe landmarks -> eye openness (n,2) [left, right] and eye-ball
    movement (n,6): per coordinate (x, y, z) the left then the right eye's value.

    Openness is the sum of three lid distances over the corner distance; the movement is
    (direction corner-centre -> iris minus direction inner -> outer corner) times the
    iris's distance from the corner centre."""
    lmk = np.asarray(lmk478, dtype=np.float32)
    if lmk.ndim == 2:
        lmk = lmk[None]
    if lmk.shape[1] < 478:
        raise ValueError(f"eye features need 478 mediapipe landmarks, got {lmk.shape}")
    l_open, l_move = _eye(lmk, _LEFT_EYE)
    r_open, r_move = _eye(lmk, _RIGHT_EYE)
    openness = np.stack([l_open, r_open], axis=-1)
    ball = np.stack([l_move, r_move], axis=-1).reshape(len(lmk), -1)
    return openness.astype(np.float32), ball.astype(np.float32)


# --------------------------------------------------------------------------- registrar


@dataclass
class Registration:
    """Everything registration derives from one source image."""

    image: np.ndarray  # (H,W,3) uint8: the source after `fit_source`, frames are pasted into it
    crop: np.ndarray  # (256,256,3) uint8 RGB for the appearance and motion extractors
    crop_512: np.ndarray  # (512,512,3) uint8 RGB, the registration crop
    m_c2o: np.ndarray  # (3,3) 512-crop pixels -> image pixels
    m_o2c: np.ndarray  # (3,3) image pixels -> 512-crop pixels
    lmk203: np.ndarray  # (203,2) image pixels
    lmk106: np.ndarray | None = None  # (106,2) image pixels (detection path only)
    box: np.ndarray | None = None  # (5,) detected face [x1,y1,x2,y2,score]
    eye_open: np.ndarray | None = None  # (1,2), None when eye features were not computed
    eye_ball: np.ndarray | None = None  # (1,6)
    extra: dict[str, Any] = field(default_factory=dict)

    def crop_tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """(1,3,256,256) float32 in [0,1], the extractors' input."""
        return _image_tensor(self.crop, device) / 255.0


class Registrar:
    """Face detection, landmarks, crop and eye features for a source image.

    ``Registrar(aux_dir, device)`` opens the three ONNX models under `aux_dir` (the
    official ``ditto_pytorch/aux_models``), and mediapipe's landmarker when `eyes` is true
    (needs the ``mediapipe`` package; the error says so). `paths` overrides file paths by
    the `AUX_FILES` keys (e.g. from `aux_paths(root, cfg)`)."""

    def __init__(self, aux_dir: Path | str, device: str = "cpu", eyes: bool = True,
                 paths: Mapping[str, Path | str] | None = None, max_dim: int = 1920,
                 crop: Mapping[str, Any] | None = None):
        aux_dir = Path(aux_dir)
        files = {key: aux_dir / name for key, name in AUX_FILES.items()}
        files.update({k: Path(v) for k, v in (paths or {}).items()})
        self.files = files
        self.max_dim = max_dim
        self.crop = {**DEFAULT_CROP, **(crop or {})}
        self.detector = FaceDetector(files["insightface_det_cfg"], device)
        self.landmark106 = Landmark106(files["landmark106_cfg"], device)
        self.landmark203 = Landmark203(files["landmark203_cfg"], device)
        self.landmark478 = Landmark478(files["landmark478_cfg"]) if eyes else None

    @classmethod
    def from_checkpoint(cls, root: Path | str, cfg: Any = None, device: str = "cpu",
                        **kwargs: Any) -> Registrar:
        """For a checkpoint folder holding ``ditto_pytorch/``; crop settings from the
        cfg's ``default_kwargs`` when present."""
        defaults = cfg.get("default_kwargs", {}) if isinstance(cfg, Mapping) else {}
        crop = {k: defaults[k] for k in DEFAULT_CROP if k in defaults}
        kwargs.setdefault("max_dim", int(defaults.get("max_size", 1920)))
        return cls(Path(root) / AUX_RELDIR, device, paths=aux_paths(root, cfg), crop=crop,
                   **kwargs)

    def landmarks(self, rgb: np.ndarray, last_lmk203: np.ndarray | None = None,
                  source_scale: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(lmk203, lmk106, box): detection -> 106 points -> 203 points, or, for video
        tracking, 203 points guided by the previous frame's 203 points. The face is chosen
        by `choose_face` (engines/faces.py): the largest, unless it is under MIN_FACE_PX
        wide in the submitted picture (`rgb` is that picture times `source_scale`) or
        another face is about as large; RegistrationError names the cause."""
        box = lmk106 = None
        if last_lmk203 is None:
            dets, _ = self.detector(rgb)
            widths = (dets[:, 2] - dets[:, 0]) / source_scale
            try:
                box = dets[choose_face(widths.tolist(),
                                       short_side_px=min(rgb.shape[:2]) / source_scale)]
            except FaceChoiceError as exc:
                raise RegistrationError(str(exc)) from None
            lmk106 = self.landmark106(rgb, box)
            guide = lmk106
        else:
            guide = np.asarray(last_lmk203, dtype=np.float64)
        return self.landmark203(rgb, guide), lmk106, box

    def register(self, rgb: np.ndarray, last_lmk203: np.ndarray | None = None) -> Registration:
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError("registration needs an (H, W, 3) uint8 RGB image")
        fitted = fit_source(rgb, self.max_dim)
        scale = fitted.shape[1] / rgb.shape[1]
        rgb = fitted
        lmk203, lmk106, box = self.landmarks(rgb, last_lmk203, source_scale=scale)
        reg = crop_registration(rgb, lmk203, **self.crop)
        reg.lmk106, reg.box = lmk106, box
        if self.landmark478 is not None:
            reg.eye_open, reg.eye_ball = eye_features(self.landmark478(reg.crop_512))
        return reg

    __call__ = register


def crop_registration(rgb: np.ndarray, lmk203: np.ndarray, crop_scale: float = 2.3,
                      crop_vx_ratio: float = 0.0, crop_vy_ratio: float = -0.125,
                      crop_flag_do_rot: bool = True) -> Registration:
    """The 512 crop, its 256 version and the matrices from 203 landmarks.

    Upstream's crop helper does not forward its horizontal shift, so `crop_vx_ratio` has
    no effect there; it is ignored here too and kept for the cfg's key set."""
    del crop_vx_ratio
    m_o2c = crop_matrix(lmk203, CROP_SIZE, crop_scale, 0.0, crop_vy_ratio, crop_flag_do_rot)
    crop_512 = warp_affine(rgb, m_o2c, CROP_SIZE)
    return Registration(
        image=rgb,
        crop=downsample_area(crop_512, EXTRACTOR_SIZE),
        crop_512=crop_512,
        m_c2o=np.linalg.inv(m_o2c),
        m_o2c=m_o2c,
        lmk203=np.asarray(lmk203, dtype=np.float64),
    )


# --------------------------------------------------------------------------- paste-back


def paste_mask(width: int = CROP_SIZE, height: int = CROP_SIZE, ratio_w: float = 0.9,
               ratio_h: float = 0.9) -> np.ndarray:
    """Upstream's blending mask (height, width) float32: 1 in the central
    ratio_w x ratio_h rectangle, linear ramps 0 -> 1 from each border towards it, and in
    each corner 1 minus the (ramp-normalised) distance from the rectangle's corner."""
    w, h = int(width * ratio_w), int(height * ratio_h)
    x1, y1 = (width - w) // 2, (height - h) // 2
    x2, y2 = x1 + w, y1 + h
    mask = np.ones((height, width), np.float32)
    up = np.linspace(0.0, 1.0, y1)  # distance-like ramps, 0 at the border
    down = np.linspace(1.0, 0.0, height - y2)
    left = np.linspace(0.0, 1.0, x1)
    right = np.linspace(1.0, 0.0, width - x2)
    mask[:y1, x1:x2] = up[:, None]
    mask[y2:, x1:x2] = down[:, None]
    mask[y1:y2, :x1] = left[None, :]
    mask[y1:y2, x2:] = right[None, :]

    def corner(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return 1.0 - np.clip(np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2), 0.0, 1.0)

    mask[:y1, :x1] = corner(1.0 - up, 1.0 - left)
    mask[:y1, x2:] = corner(1.0 - up, 1.0 - right)
    mask[y2:, :x1] = corner(1.0 - down, 1.0 - left)
    mask[y2:, x2:] = corner(1.0 - down, 1.0 - right)
    return mask


class PasteBack:
    """Blend decoded faces into one source image (fixed per avatar).

    ``PasteBack(image, m_c2o, device)`` precomputes, on `device`, the sampling grid of the
    region the crop covers and the warped mask; ``__call__(faces)`` takes (3,S,S) or
    (B,3,S,S) faces in [0,1] (any float dtype, S = 512 for ``m_c2o`` of the 512 crop) and
    returns (H,W,3) or (B,H,W,3) uint8 frames on the same device. Per pixel:
    ``mask * warp(face * 255) + (1 - mask) * image``, clamped and truncated to uint8 as
    upstream does; pixels outside the crop's footprint are the source's exactly."""

    def __init__(self, image: np.ndarray | torch.Tensor, m_c2o: np.ndarray,
                 device: str | torch.device = "cpu", face_size: int = CROP_SIZE,
                 mask: np.ndarray | None = None):
        img = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray)
                              else image)
        self.device = torch.device(device)
        self.image = img.to(self.device, torch.uint8)
        h, w = self.image.shape[:2]
        self.face_size = face_size
        m_c2o = np.asarray(m_c2o, dtype=np.float64)
        full = np.eye(3)
        full[:2] = m_c2o[:2]
        m_o2c = np.linalg.inv(full)
        # Footprint of the crop square in the image (one pixel of margin for the bilinear
        # border), clipped to the image.
        s = face_size
        corners = transform_points(np.array([[-1, -1], [s, -1], [-1, s], [s, s]], float), full)
        x0 = int(np.clip(np.floor(corners[:, 0].min()) - 1, 0, w))
        x1 = int(np.clip(np.ceil(corners[:, 0].max()) + 2, 0, w))
        y0 = int(np.clip(np.floor(corners[:, 1].min()) - 1, 0, h))
        y1 = int(np.clip(np.ceil(corners[:, 1].max()) + 2, 0, h))
        self.box = (x0, y0, x1, y1)
        self.empty = x1 <= x0 or y1 <= y0
        if self.empty:
            return
        self.grid = _affine_grid(m_o2c, (y1 - y0, x1 - x0), (s, s), (x0, y0)).to(self.device)
        mask = paste_mask(s, s) if mask is None else np.asarray(mask, np.float32)
        mask_t = torch.from_numpy(np.ascontiguousarray(mask))[None, None].to(self.device)
        warped = F.grid_sample(mask_t, self.grid, mode="bilinear", padding_mode="zeros",
                               align_corners=True)
        self.mask = warped[0, 0].clamp(0, 1)[..., None]  # (h,w,1)
        self.background = self.image[y0:y1, x0:x1].float()

    @torch.no_grad()
    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        single = faces.dim() == 3
        faces = faces[None] if single else faces
        if faces.shape[-1] != self.face_size or faces.shape[-2] != self.face_size:
            raise ValueError(f"faces are {tuple(faces.shape)}, expected (B,3,{self.face_size},"
                             f"{self.face_size})")
        b = faces.shape[0]
        out = self.image[None].expand(b, -1, -1, -1).clone()
        if not self.empty:
            x0, y0, x1, y1 = self.box
            src = faces.to(self.device, torch.float32).clamp(0, 1) * 255.0
            grid = self.grid.expand(b, -1, -1, -1)
            warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=True).permute(0, 2, 3, 1)
            blended = self.mask * warped + (1 - self.mask) * self.background
            out[:, y0:y1, x0:x1] = blended.clamp(0, 255).to(torch.uint8)
        return out[0] if single else out


def paste_back(image: np.ndarray, faces: torch.Tensor, m_c2o: np.ndarray) -> torch.Tensor:
    """One-off `PasteBack` on the faces' device."""
    return PasteBack(image, m_c2o, faces.device, faces.shape[-1])(faces)
