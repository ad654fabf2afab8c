"""Face finding and sparse landmarks for the embedded avatar, from OpenCV's bundled cascades.

The cascade XML files ship inside the `opencv-python-headless` wheel (4.x; the 5.0 wheels
dropped them), so nothing is downloaded. The cascades give boxes, not points: a face box,
eye boxes and a mouth ("smile") box. This module turns them into the few points the warp
needs (eye centres and sizes, the lip line, mouth width, chin) and refines each one from
the pixels (iris darkness, the lips' redness, else the dark gap between the lips) so a box
that is a little off still puts the eyelids and the lip line where they are in the picture.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from ..faces import MIN_FACE_PX, FaceChoiceError, choose_face

# Detection runs on a copy whose longer side is at most this: the cascades are scale
# invariant and a 12 MP photo would otherwise cost seconds per registration.
DETECT_MAX_SIDE = 640
# When that finds no face, a second search looks for small faces (only pictures without a
# face of a portrait's size pay for it): with finer scale steps, down to the cascade's
# window, on copies at most this large (longer side) and at most this much enlarged
# (the cascade misses faces near its window size; enlarged, it finds them).
SMALL_FACE_MAX_SIDES = (1600,)
SMALL_FACE_MAX_ENLARGE = 2.0
SMALL_FACE_ENLARGED_MAX_SIDE = 1024  # an enlarged copy stays this small (cost)
CASCADE_WINDOW_PX = 20  # the frontal-face cascade's window: it finds nothing smaller
# Eyes and mouth are searched in a copy of the face region scaled to this face width.
NORMAL_FACE_PX = 144


FACE_CASCADE = "haarcascade_frontalface_alt2.xml"
EYE_CASCADE = "haarcascade_eye.xml"
MOUTH_CASCADE = "haarcascade_smile.xml"


class NoFaceError(Exception):
    """No usable frontal face in the picture; the message says why."""


@dataclass(frozen=True)
class EyePoints:
    center: tuple[float, float]
    half_width: float  # corner-to-corner half width of the eye opening
    half_height: float  # lid-to-lid half height of the open eye


@dataclass(frozen=True)
class FaceLandmarks:
    """Points in the coordinates of the image they were found in."""

    face_box: tuple[float, float, float, float]  # x, y, w, h
    left_eye: EyePoints  # the eye on the left of the picture
    right_eye: EyePoints
    mouth_center: tuple[float, float]  # centre of the lip line (gap between the lips)
    mouth_half_width: float
    chin: tuple[float, float]
    eyes_found: bool  # False: eye points come from face proportions only
    mouth_found: bool

    def transformed(self, scale: float, offset_x: float, offset_y: float) -> FaceLandmarks:
        """The same points after p -> p * scale + offset (a crop and resize)."""

        def point(p: tuple[float, float]) -> tuple[float, float]:
            return (p[0] * scale + offset_x, p[1] * scale + offset_y)

        def eye(e: EyePoints) -> EyePoints:
            return EyePoints(point(e.center), e.half_width * scale, e.half_height * scale)

        x, y, w, h = self.face_box
        return FaceLandmarks(
            face_box=(x * scale + offset_x, y * scale + offset_y, w * scale, h * scale),
            left_eye=eye(self.left_eye),
            right_eye=eye(self.right_eye),
            mouth_center=point(self.mouth_center),
            mouth_half_width=self.mouth_half_width * scale,
            chin=point(self.chin),
            eyes_found=self.eyes_found,
            mouth_found=self.mouth_found,
        )


@functools.cache
def _cascade(file_name: str) -> cv2.CascadeClassifier:
    # OpenCV 5 wheels have neither the cascade files nor the classifier class.
    base = getattr(getattr(cv2, "data", None), "haarcascades", "")
    if not base or not hasattr(cv2, "CascadeClassifier"):
        classifier = None
    else:
        classifier = cv2.CascadeClassifier(base + file_name)
    if classifier is None or classifier.empty():
        raise RuntimeError(
            f"OpenCV cascade {file_name} is missing (OpenCV {cv2.__version__}): install "
            "opencv-python-headless>=4.10,<5; the 5.x wheels no longer ship the Haar cascades"
        )
    return classifier


def load_detectors() -> None:
    """Load every cascade now (at engine load) rather than on the first registration."""
    for file_name in (FACE_CASCADE, EYE_CASCADE, MOUTH_CASCADE):
        _cascade(file_name)


def _for_detection(
    rgb: np.ndarray, max_side: int = DETECT_MAX_SIDE, enlarge: float = 1.0
) -> tuple[np.ndarray, float]:
    """Equalised grey copy no larger than `max_side` (enlarged by at most `enlarge`), and
    the factor it was scaled by."""
    height, width = rgb.shape[:2]
    shrink = min(enlarge, max_side / max(height, width))
    small = rgb
    if shrink != 1.0:
        size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        interpolation = cv2.INTER_AREA if shrink < 1.0 else cv2.INTER_LINEAR
        small = cv2.resize(rgb, size, interpolation=interpolation)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    return cv2.equalizeHist(gray), shrink


def _detect_faces(gray: np.ndarray, min_face_px: int, fine: bool = False) -> np.ndarray:
    """(N, 4) float x, y, w, h of the frontal faces in `gray` at least `min_face_px` wide;
    `fine`: smaller scale steps and fewer neighbours, which small faces need."""
    scale_factor, neighbours = (1.05, 3) if fine else (1.1, 5)
    found = _cascade(FACE_CASCADE).detectMultiScale(
        gray, scaleFactor=scale_factor, minNeighbors=neighbours,
        minSize=(min_face_px, min_face_px),
    )
    return np.asarray(found, dtype=np.float64).reshape(-1, 4)


def _largest(boxes: np.ndarray | tuple) -> np.ndarray | None:
    if len(boxes) == 0:
        return None
    boxes = np.asarray(boxes)
    return boxes[int(np.argmax(boxes[:, 2] * boxes[:, 3]))]


def _refine_eye(gray: np.ndarray, box: tuple[int, int, int, int]) -> EyePoints:
    """Eye centre from the dark iris/pupil blob inside a cascade eye box.

    The cascade box includes brow and lid skin; the darkest 12% of the box's central part
    is iris, pupil and lashes, whose centroid is a steadier centre than the box's.
    """
    x, y, w, h = box
    inner = gray[y + h // 4 : y + h - h // 6, x + w // 6 : x + w - w // 6].astype(np.float32)
    center_x, center_y = x + w / 2.0, y + h / 2.0 + h * 0.04
    if inner.size > 16:
        threshold = np.percentile(inner, 12)
        rows, cols = np.nonzero(inner <= threshold)
        if rows.size:
            center_x = x + w // 6 + float(cols.mean())
            center_y = y + h // 4 + float(rows.mean())
    return EyePoints((center_x, center_y), half_width=w * 0.30, half_height=w * 0.13)


def _template_eyes(face: tuple[float, float, float, float]) -> tuple[EyePoints, EyePoints]:
    """Eye points from typical proportions of a cascade face box."""
    x, y, w, h = face
    left = EyePoints((x + 0.31 * w, y + 0.40 * h), 0.11 * w, 0.045 * w)
    right = EyePoints((x + 0.69 * w, y + 0.40 * h), 0.11 * w, 0.045 * w)
    return left, right


def _find_eyes(
    gray: np.ndarray, face: tuple[int, int, int, int]
) -> tuple[EyePoints, EyePoints] | None:
    x, y, w, h = face
    band_top, band_bottom = y + int(0.15 * h), y + int(0.60 * h)
    band = gray[band_top:band_bottom, x : x + w]
    min_eye = max(8, int(0.14 * w))
    found = _cascade(EYE_CASCADE).detectMultiScale(
        band,
        scaleFactor=1.05,
        minNeighbors=3,
        minSize=(min_eye, min_eye),
        maxSize=(int(0.45 * w), int(0.45 * w)),
    )
    left_boxes = [b for b in found if b[0] + b[2] / 2 < w / 2]
    right_boxes = [b for b in found if b[0] + b[2] / 2 >= w / 2]
    if not left_boxes or not right_boxes:
        return None
    picks = []
    for boxes in (left_boxes, right_boxes):
        bx, by, bw, bh = max(boxes, key=lambda b: b[2] * b[3])
        picks.append(_refine_eye(gray, (x + bx, band_top + by, bw, bh)))
    left, right = picks
    # Two eyes at very different heights or far too close are a false hit (nostril, brow).
    distance = abs(right.center[0] - left.center[0])
    if abs(right.center[1] - left.center[1]) > 0.15 * w or not 0.25 * w < distance < 0.65 * w:
        return None
    return left, right


def _lip_line(
    gray: np.ndarray, center_x: float, guess_y: float, half_width: float, face_h: float
) -> float:
    """Row of the dark gap between the lips near `guess_y`, for pictures without colour.

    Averages each row over the middle of the mouth and takes the darkest one, weighted
    towards the guess so a shadow under the lower lip does not win over the lip gap.
    """
    top = int(max(0, guess_y - 0.09 * face_h))
    bottom = int(min(gray.shape[0] - 1, guess_y + 0.09 * face_h))
    left = int(max(0, center_x - 0.5 * half_width))
    right = int(min(gray.shape[1], center_x + 0.5 * half_width + 1))
    if bottom - top < 3 or right - left < 3:
        return guess_y
    profile = gray[top:bottom, left:right].astype(np.float32).mean(axis=1)
    profile = np.convolve(profile, np.ones(3, np.float32) / 3, mode="same")
    rows = np.arange(top, bottom, dtype=np.float32)
    penalty = 40.0 * ((rows - guess_y) / (0.09 * face_h)) ** 2
    return float(rows[int(np.argmin(profile + penalty))])


def _lips_by_colour(
    rgb: np.ndarray, center_x: float, guess_y: float, half_width: float, face_h: float
) -> tuple[float, float] | None:
    """(lip line row, mouth half width) from the lips' redness, or None for grey pictures.

    Lips are redder than the skin around them whatever the skin tone, so the reddest fifth
    of the lower-face pixels outlines them (and the nasolabial folds above, which is why
    the band of rows closest to the guess is the one kept). The lip line is a little above
    the middle of that band because the upper lip is usually the thinner one.
    """
    top = int(max(0, guess_y - 0.14 * face_h))
    bottom = int(min(rgb.shape[0], guess_y + 0.16 * face_h))
    left = int(max(0, center_x - 1.3 * half_width))
    right = int(min(rgb.shape[1], center_x + 1.3 * half_width))
    if bottom - top < 6 or right - left < 6:
        return None
    region = rgb[top:bottom, left:right].astype(np.float32)
    total = region.sum(axis=2) + 1.0
    redness = (region[..., 0] - region[..., 1]) / total
    if float(np.ptp(redness)) < 0.04:  # grey or nearly so: no colour cue
        return None
    lips = redness > np.percentile(redness, 80)
    row_share = lips.mean(axis=1)
    # Rows with any lip share form runs; a row with none (skin between nose and lip)
    # splits them, while the teeth of a smiling mouth keep some red at the lip corners and
    # so do not split the lips. The run nearest the guess, with real lip content, is kept.
    busy = np.flatnonzero(row_share >= 0.04)
    if busy.size == 0:
        return None
    runs = [
        r
        for r in np.split(busy, np.flatnonzero(np.diff(busy) > 1) + 1)
        if row_share[r].max() >= 0.12
    ]
    if not runs:
        return None
    guess_row = guess_y - top
    run = min(runs, key=lambda r: abs((r[0] + r[-1]) / 2 - guess_row))
    if run[-1] - run[0] < 0.04 * face_h:
        return None
    lip_row = top + run[0] + 0.45 * (run[-1] - run[0])
    column_share = lips[run[0] : run[-1] + 1].mean(axis=0)
    columns = np.flatnonzero(column_share >= 0.15)
    measured_half = (columns[-1] - columns[0]) / 2 if columns.size else half_width
    return float(lip_row), float(measured_half)


def find_landmarks(rgb: np.ndarray) -> FaceLandmarks:
    """Landmarks of the frontal face in an RGB uint8 image, or NoFaceError naming the cause
    (no face, a face under MIN_FACE_PX, several faces of similar size: `choose_face`).

    The face is found on a reduced copy; eyes and mouth are then looked for in a copy of
    the face region from the full-resolution picture scaled to a standard face width, so
    the feature detectors see the same face size whatever the picture's resolution.
    """
    gray, shrink = _for_detection(rgb)
    short_side = min(gray.shape)
    # Small windows are most of the cascade's work; a portrait's face is rarely under a
    # tenth of the picture, so the first search skips smaller ones.
    min_face = max(24, int(0.1 * short_side), int(MIN_FACE_PX * shrink))
    faces = _detect_faces(gray, min_face) / shrink
    longest = max(rgb.shape[:2])
    enlarge = max(1.0, min(SMALL_FACE_MAX_ENLARGE, SMALL_FACE_ENLARGED_MAX_SIDE / longest))
    for max_side in SMALL_FACE_MAX_SIDES:
        if len(faces) > 0:
            break
        # A small face (a group or full-body photo, a large picture): search again for
        # every face the cascade can see, so the error can say how small it is.
        small_gray, small_shrink = _for_detection(rgb, max_side, enlarge)
        faces = _detect_faces(small_gray, CASCADE_WINDOW_PX, fine=True) / small_shrink
        shrink = small_shrink
    try:
        chosen = choose_face(
            [float(f[2]) for f in faces], smallest_searched_px=CASCADE_WINDOW_PX / shrink,
            short_side_px=min(rgb.shape[:2]),
        )
    except FaceChoiceError as error:
        raise NoFaceError(str(error)) from None
    face = faces[chosen]

    # Face region with room for the chin, at NORMAL_FACE_PX face width.
    fx, fy, fw, fh = (float(v) for v in face)
    height, width = rgb.shape[:2]
    rx0, ry0 = int(max(0, fx - 0.25 * fw)), int(max(0, fy - 0.25 * fh))
    rx1, ry1 = int(min(width, fx + 1.25 * fw)), int(min(height, fy + 1.45 * fh))
    scale = NORMAL_FACE_PX / fw
    size = (max(1, round((rx1 - rx0) * scale)), max(1, round((ry1 - ry0) * scale)))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    region_rgb = cv2.resize(rgb[ry0:ry1, rx0:rx1], size, interpolation=interpolation)
    region_gray = cv2.equalizeHist(cv2.cvtColor(region_rgb, cv2.COLOR_RGB2GRAY))
    box = (
        round((fx - rx0) * scale),
        round((fy - ry0) * scale),
        NORMAL_FACE_PX,
        round(fh * scale),
    )
    found = _face_points(region_rgb, region_gray, box)
    return found.transformed(1.0 / scale, float(rx0), float(ry0))


def _face_points(
    region_rgb: np.ndarray, gray: np.ndarray, box: tuple[int, int, int, int]
) -> FaceLandmarks:
    """Eye, mouth and chin points for the face in `box` of a normalised face region."""
    fx, fy, fw, fh = box
    eyes = _find_eyes(gray, (fx, fy, fw, fh))
    eyes_found = eyes is not None
    left_eye, right_eye = eyes if eyes is not None else _template_eyes((fx, fy, fw, fh))

    # The mouth sits about 0.83 face heights below the box top in the alt2 cascade's framing;
    # a smile-cascade hit in the lower face replaces that guess when there is one.
    mouth_x, mouth_y, mouth_half = fx + 0.5 * fw, fy + 0.82 * fh, 0.21 * fw
    lower = gray[fy + fh // 2 : fy + int(1.05 * fh), fx : fx + fw]
    smiles = _cascade(MOUTH_CASCADE).detectMultiScale(
        lower,
        scaleFactor=1.05,
        minNeighbors=12,
        minSize=(int(0.25 * fw), int(0.1 * fw)),
        maxSize=(int(0.8 * fw), int(0.4 * fw)),
    )
    smile = _largest(smiles)
    mouth_found = smile is not None
    if smile is not None:
        sx, sy, sw, sh = (int(v) for v in smile)
        candidate_x, candidate_y = fx + sx + sw / 2, fy + fh // 2 + sy + sh / 2
        # Accept only a hit that is centred under the eyes: beards and collars also fire.
        eye_mid_x = (left_eye.center[0] + right_eye.center[0]) / 2
        if abs(candidate_x - eye_mid_x) < 0.12 * fw and candidate_y > fy + 0.65 * fh:
            # The smile box also spans the upper lip and folds: it pulls the guess up, so it
            # only moves the template's guess half way.
            mouth_x, mouth_y = candidate_x, 0.7 * mouth_y + 0.3 * candidate_y
            mouth_half = float(np.clip(0.38 * sw, 0.15 * fw, 0.26 * fw))
        else:
            mouth_found = False
    if eyes_found:
        mouth_x = 0.5 * mouth_x + 0.5 * (left_eye.center[0] + right_eye.center[0]) / 2
    from_colour = _lips_by_colour(region_rgb, mouth_x, mouth_y, mouth_half, fh)
    if from_colour is not None:
        mouth_y = from_colour[0]
        mouth_half = float(np.clip(from_colour[1], 0.15 * fw, 0.28 * fw))
    else:
        mouth_y = _lip_line(gray, mouth_x, mouth_y, mouth_half, fh)
    # The chin is about 0.7 eye-to-mouth distances below the lip line on adult faces.
    eye_y = (left_eye.center[1] + right_eye.center[1]) / 2
    chin = (mouth_x, mouth_y + 0.7 * max(mouth_y - eye_y, 0.3 * fh))

    found = FaceLandmarks(
        face_box=(fx, fy, fw, fh),
        left_eye=left_eye,
        right_eye=right_eye,
        mouth_center=(mouth_x, mouth_y),
        mouth_half_width=mouth_half,
        chin=chin,
        eyes_found=eyes_found,
        mouth_found=mouth_found,
    )
    return found
