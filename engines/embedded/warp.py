"""Portrait framing and the per-frame mesh warp of the embedded avatar.

Everything here works on the 512x512 head-and-shoulders crop. `build_rig` precomputes, once
per avatar, smooth displacement fields in the crop's pixel grid (jaw drop, upper-lip lift,
lip spread, head-motion and breathing weights); `render_frame` scales them by a `FacePose`
and resamples the portrait with `cv2.remap`, which is a piecewise-smooth warp at the cost of
one lookup per pixel. Two warps run per frame: a local one over the face (mouth, lips, lids)
into which the mouth cavity is painted, then a global one that moves the head on the neck
and raises head and shoulders with the breath.

Backward mapping is used throughout: an output pixel p shows the source pixel at
map(p). Moving a feature down by d therefore means map(p) = p - d near that feature.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from .landmarks import EyePoints, FaceLandmarks

FRAME_SIZE = 512
# Crop side as a multiple of the face-box width, and the margin above the face box as a
# multiple of its height: head, hair and the top of the shoulders, face a little above
# the middle, the framing of a video call.
CROP_FACE_WIDTHS = 2.9
CROP_TOP_MARGIN = 0.8
# Share of the mouth's corner-to-corner half width over which the lips part.
INNER_MOUTH = 0.88


@dataclass(frozen=True)
class FacePose:
    """What one frame shows. Mouth values are in [0, 1] (spread in [-1, 1])."""

    mouth_open: float = 0.0
    lip_spread: float = 0.0  # > 0 wide ("ee"), < 0 rounded ("oo")
    blink: float = 0.0  # 0 open, 1 closed
    head_dx: float = 0.0  # pixels
    head_dy: float = 0.0  # pixels
    head_roll_deg: float = 0.0
    breath_px: float = 0.0  # pixels head and shoulders are raised by the breath (>= 0)


@dataclass
class Rig:
    """Once-per-avatar warp state in crop coordinates."""

    portrait: np.ndarray  # (512, 512, 3) uint8
    landmarks: FaceLandmarks  # in crop coordinates
    roi: tuple[int, int, int, int]  # x0, y0, x1, y1 of the local (face) warp
    roi_grid_x: np.ndarray  # absolute crop x of each ROI pixel, float32
    roi_grid_y: np.ndarray
    jaw: np.ndarray  # downward shift per pixel of mouth opening, in [0, 1]
    upper_lip: np.ndarray  # upward shift of the upper lip per pixel of lift, in [0, 1]
    spread: np.ndarray  # outward horizontal shift per pixel of spread, signed
    max_open_px: float  # lip gap at mouth_open = 1
    head_weight: np.ndarray  # (512, 512) share of the head motion each pixel follows
    head_weight_x: np.ndarray  # head_weight * (x - pivot x)
    head_weight_y: np.ndarray  # head_weight * (y - pivot y)
    # (512, 512) float32 share of the breathing rise each pixel follows: 1 over the head,
    # neck and shoulders, 0 over the background beside and above them.
    body_weight: np.ndarray
    grid_x: np.ndarray  # (512, 512) float32 pixel x coordinates
    grid_y: np.ndarray


def _smoothstep(edge0: float, edge1: float, values: np.ndarray) -> np.ndarray:
    t = np.clip((values - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@functools.cache
def _pixel_grid() -> tuple[np.ndarray, np.ndarray]:
    """(x, y) coordinates of every frame pixel, shared by all avatars (read-only)."""
    grid_y, grid_x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float32)
    grid_x.flags.writeable = False
    grid_y.flags.writeable = False
    return grid_x, grid_y


def frame_portrait(rgb: np.ndarray, landmarks: FaceLandmarks) -> tuple[np.ndarray, FaceLandmarks]:
    """Crop and scale a portrait to the 512x512 head-and-shoulders framing.

    The crop square is moved inside the picture where it fits (shifting beats inventing
    pixels); only a picture too small or a face too near an edge gets mirrored padding.
    """
    height, width = rgb.shape[:2]
    fx, fy, fw, fh = landmarks.face_box
    side = CROP_FACE_WIDTHS * fw
    # A tight close-up: use as much of the picture as there is, but keep some margin.
    side = max(min(side, float(min(width, height))), 1.6 * fw)
    left = fx + fw / 2 - side / 2
    top = fy - CROP_TOP_MARGIN * fh
    if side <= width:
        left = float(np.clip(left, 0.0, width - side))
    if side <= height:
        top = float(np.clip(top, 0.0, height - side))
    scale = FRAME_SIZE / side

    source = rgb
    source_scale = 1.0
    if scale < 0.5:
        # Shrinking a lot in one resample aliases; area-average to about twice the target
        # first, then let the affine resample do the rest.
        source_scale = 2.0 * scale
        size = (max(1, round(width * source_scale)), max(1, round(height * source_scale)))
        source = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    affine_scale = scale / source_scale
    matrix = np.array(
        [
            [affine_scale, 0.0, -left * source_scale * affine_scale],
            [0.0, affine_scale, -top * source_scale * affine_scale],
        ],
        dtype=np.float64,
    )
    portrait = cv2.warpAffine(
        source,
        matrix,
        (FRAME_SIZE, FRAME_SIZE),
        flags=cv2.INTER_CUBIC if scale > 1.0 else cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    return np.ascontiguousarray(portrait), landmarks.transformed(scale, -left * scale, -top * scale)


def build_rig(portrait: np.ndarray, landmarks: FaceLandmarks) -> Rig:
    """Precompute the displacement fields for one framed portrait."""
    fx, fy, fw, fh = landmarks.face_box
    mouth_x, mouth_y = landmarks.mouth_center
    # The lips part over a little less than their full width: the corners stay shut.
    mouth_half = INNER_MOUTH * landmarks.mouth_half_width
    chin_y = max(landmarks.chin[1], mouth_y + 0.15 * fh)

    # The local warp covers the face from the brows down past the chin.
    x0 = int(max(0, fx - 0.15 * fw))
    x1 = int(min(FRAME_SIZE, fx + 1.15 * fw))
    y0 = int(max(0, fy + 0.05 * fh))
    y1 = int(min(FRAME_SIZE, chin_y + 0.55 * fh))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx = xs - mouth_x

    # Jaw: just under the lip line only the lower lip moves, with an elliptical profile so
    # the opening is lens-shaped and the mouth corners stay put; towards the chin the moving
    # part widens to the jaw, and under the chin it fades out along the neck.
    lens = np.sqrt(np.clip(1.0 - (dx / mouth_half) ** 2, 0.0, 1.0))
    jaw_half = 0.42 * fw
    broad = 1.0 - _smoothstep(0.35 * jaw_half, jaw_half, np.abs(dx))
    depth = np.clip((ys - mouth_y) / (chin_y - mouth_y), 0.0, 1.0)
    below_chin = 1.0 - _smoothstep(chin_y, chin_y + 0.45 * fh, ys)
    jaw = np.where(ys >= mouth_y, ((1.0 - depth) * lens + depth * broad) * below_chin, 0.0)

    # Upper lip: rises a little at its middle, fading out towards the nose.
    above = 1.0 - _smoothstep(0.0, 0.13 * fh, mouth_y - ys)
    upper_lip = np.where(ys < mouth_y, lens * above, 0.0)

    # Spread: lip corners move outwards (or inwards), strongest on the lip line.
    around_mouth = np.exp(-((dx / (1.4 * mouth_half)) ** 2) - ((ys - mouth_y) / (0.1 * fh)) ** 2)
    spread = np.clip(dx / mouth_half, -1.5, 1.5) * around_mouth
    # Every field must be exactly zero at the ROI's edge, or pasting the ROI back would
    # leave a seam; the Gaussian's tail is cut off well inside it.
    spread *= 1.0 - _smoothstep(0.45 * fw, 0.6 * fw, np.abs(dx))

    # Head motion: the head (face plus hair) follows fully, the background and shoulders not
    # at all, with a wide soft edge so the background only bends where it touches the head.
    grid_x, grid_y = _pixel_grid()
    head_cx, head_cy = fx + fw / 2, fy + 0.45 * fh
    radius = np.hypot((grid_x - head_cx) / (0.95 * fw), (grid_y - head_cy) / (1.1 * fh))
    head_weight = 1.0 - _smoothstep(0.85, 1.6, radius)
    head_weight *= 1.0 - _smoothstep(chin_y + 0.1 * fh, chin_y + 0.9 * fh, grid_y)
    pivot_x, pivot_y = mouth_x, chin_y + 0.35 * fh  # roughly the top of the neck

    # Breathing: the chest and shoulders rise and fall and carry the head with them. The
    # torso fills the frame below the neck (the framing puts the shoulders 2.5-3 face widths
    # wide at the bottom edge); it fades in over the neck, where the head weight fades out,
    # so head, neck and shoulders rise together, and out towards the frame's sides, where
    # a shoulder ends or the picture is background.
    torso = _smoothstep(chin_y, chin_y + 0.5 * fh, grid_y)
    torso *= 1.0 - _smoothstep(1.1 * fw, 1.6 * fw, np.abs(grid_x - (fx + fw / 2)))
    body_weight = 1.0 - (1.0 - head_weight) * (1.0 - torso)

    return Rig(
        portrait=portrait,
        landmarks=landmarks,
        roi=(x0, y0, x1, y1),
        roi_grid_x=xs,
        roi_grid_y=ys,
        jaw=jaw.astype(np.float32),
        upper_lip=upper_lip.astype(np.float32),
        spread=spread.astype(np.float32),
        max_open_px=float(min(0.115 * fh, 0.6 * mouth_half)),
        head_weight=head_weight.astype(np.float32),
        head_weight_x=(head_weight * (grid_x - pivot_x)).astype(np.float32),
        head_weight_y=(head_weight * (grid_y - pivot_y)).astype(np.float32),
        body_weight=body_weight.astype(np.float32),
        grid_x=grid_x,
        grid_y=grid_y,
    )


def _close_lid(map_y: np.ndarray, rig: Rig, eye: EyePoints, amount: float) -> None:
    """Lower the upper eyelid over `eye` by `amount` (1 = shut), editing the ROI's map_y.

    The skin between brow and lid is stretched down so the lash line (the lid's edge)
    travels to the lower lid; below the moving edge the eye is left as it was, so the edge
    is as crisp as in the photo.
    """
    x0, y0, x1, y1 = rig.roi
    center_x, center_y = eye.center
    half_w, half_h = eye.half_width, eye.half_height
    top = center_y - 3.2 * half_h  # above this nothing moves (brow)
    ex0 = int(max(x0, np.floor(center_x - 1.3 * half_w)))
    ex1 = int(min(x1, np.ceil(center_x + 1.3 * half_w) + 1))
    ey0 = int(max(y0, np.floor(top)))
    ey1 = int(min(y1, np.ceil(center_y + 1.2 * half_h) + 1))
    if ex1 <= ex0 or ey1 <= ey0:
        return
    xs = np.arange(ex0, ex1, dtype=np.float32)
    ys = np.arange(ey0, ey1, dtype=np.float32)[:, None]
    shape = np.sqrt(np.clip(1.0 - ((xs - center_x) / (1.15 * half_w)) ** 2, 0.0, 1.0))[None, :]
    lid_rest = center_y - half_h * shape
    lid_low = center_y + 0.9 * half_h * shape
    lid_now = lid_rest + amount * (lid_low - lid_rest)
    stretch = (lid_rest - top) / np.maximum(lid_now - top, 1e-3)
    covered = (ys >= top) & (ys < lid_now)
    source_y = np.where(covered, top + (ys - top) * stretch, ys)
    map_y[ey0 - y0 : ey1 - y0, ex0 - x0 : ex1 - x0] = source_y


def _paint_cavity(
    roi_image: np.ndarray, rig: Rig, open_px: float, lift_px: float, half_width: float
) -> None:
    """Paint the inside of the open mouth (dark throat, hint of upper teeth) into the gap
    the jaw warp opened between the lips. Edges get about a pixel of feathering."""
    x0, y0, _, _ = rig.roi
    mouth_x, mouth_y = rig.landmarks.mouth_center
    bx0 = int(np.floor(mouth_x - half_width)) - 1
    bx1 = int(np.ceil(mouth_x + half_width)) + 2
    by0 = int(np.floor(mouth_y - lift_px)) - 1
    by1 = int(np.ceil(mouth_y + open_px)) + 2
    bx0, by0 = max(bx0, x0), max(by0, y0)
    bx1 = min(bx1, x0 + roi_image.shape[1])
    by1 = min(by1, y0 + roi_image.shape[0])
    if bx1 <= bx0 or by1 <= by0:
        return
    xs = np.arange(bx0, bx1, dtype=np.float32)[None, :] + 0.5
    ys = np.arange(by0, by1, dtype=np.float32)[:, None] + 0.5
    lens = np.sqrt(np.clip(1.0 - ((xs - mouth_x) / half_width) ** 2, 0.0, 1.0))
    upper = mouth_y - lift_px * lens
    lower = mouth_y + open_px * lens
    inside = np.clip((np.minimum(ys - upper, lower - ys) + 0.6) / 1.4, 0.0, 1.0)
    gap = np.maximum(lower - upper, 1e-3)
    depth = (ys - upper) / gap  # 0 at the upper lip, 1 at the lower lip
    # Throat: near-black red-brown, a little lighter at the corners (the inside of the
    # cheeks catches light), with the tongue's dull red rising from the lower lip.
    centre = np.clip(1.0 - np.abs((xs - mouth_x) / half_width), 0.0, 1.0)
    cheek = (1.0 - centre)[..., None] ** 2
    throat = np.array([34.0, 14.0, 10.0]) * (1.0 - cheek) + np.array([84.0, 40.0, 32.0]) * cheek
    tongue = (np.clip((depth - 0.55) / 0.45, 0.0, 1.0) * np.sqrt(centre))[..., None]
    throat = throat * (1.0 - tongue) + np.array([146.0, 68.0, 58.0]) * tongue
    # Teeth: a light band under the upper lip across the middle of the mouth, once the
    # mouth is open enough for teeth to show.
    teeth_height = min(0.22 * gap.max(), 0.16 * half_width)
    across = _smoothstep(0.8, 0.45, np.abs(xs - mouth_x) / half_width)
    showing = 0.85 * float(np.clip((open_px - 1.5) / 4.0, 0.0, 1.0))
    teeth = np.clip(upper + teeth_height - ys + 0.5, 0.0, 1.0) * across * showing
    # Teeth darken with depth into the mouth.
    teeth_colour = (
        np.array([226.0, 214.0, 194.0]) - 35.0 * np.clip((ys - upper) / 8.0, 0, 1)[..., None]
    )
    teeth = teeth[..., None]
    colour = throat * (1.0 - teeth) + teeth_colour * teeth
    patch = roi_image[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0].astype(np.float32)
    alpha = inside[..., None]
    patch = patch * (1.0 - alpha) + colour * alpha
    roi_image[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] = np.clip(patch + 0.5, 0, 255)


def render_frame(rig: Rig, pose: FacePose) -> np.ndarray:
    """One 512x512x3 uint8 frame of the portrait in `pose`."""
    x0, y0, x1, y1 = rig.roi
    open_px = float(np.clip(pose.mouth_open, 0.0, 1.0)) * rig.max_open_px
    lift_px = 0.22 * open_px
    # Opening the jaw pulls the corners in a little on its own.
    spread_px = (0.14 * float(np.clip(pose.lip_spread, -1.0, 1.0)) - 0.05 * pose.mouth_open) * (
        rig.landmarks.mouth_half_width
    )
    map_x = rig.roi_grid_x - spread_px * rig.spread
    map_y = rig.roi_grid_y - open_px * rig.jaw + lift_px * rig.upper_lip
    blink = float(np.clip(pose.blink, 0.0, 1.0))
    if blink > 0.0:
        _close_lid(map_y, rig, rig.landmarks.left_eye, blink)
        _close_lid(map_y, rig, rig.landmarks.right_eye, blink)
    local = cv2.remap(rig.portrait, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if open_px > 0.4:
        # Spread moves the corners by about spread_px; the cavity follows them.
        half_width = INNER_MOUTH * rig.landmarks.mouth_half_width + 0.9 * spread_px
        _paint_cavity(local, rig, open_px, lift_px, max(half_width, 2.0))

    canvas = rig.portrait.copy()
    canvas[y0:y1, x0:x1] = local
    if (pose.head_dx == 0.0 and pose.head_dy == 0.0 and pose.head_roll_deg == 0.0
            and pose.breath_px == 0.0):
        return canvas
    # First-order inverse of "rotate about the neck, then translate", scaled per pixel by
    # how much of the head motion the pixel follows; the breath raises head and shoulders
    # (backward map: a pixel lifted by b shows the source b below it).
    angle = np.deg2rad(pose.head_roll_deg)
    cos_minus_1, sin = float(np.cos(angle) - 1.0), float(np.sin(angle))
    head_map_x = rig.grid_x - (
        cos_minus_1 * rig.head_weight_x - sin * rig.head_weight_y + pose.head_dx * rig.head_weight
    )
    head_map_y = rig.grid_y - (
        sin * rig.head_weight_x + cos_minus_1 * rig.head_weight_y + pose.head_dy * rig.head_weight
    )
    if pose.breath_px != 0.0:
        head_map_y += pose.breath_px * rig.body_weight
    return cv2.remap(
        canvas, head_map_x, head_map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
