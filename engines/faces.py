"""Which detected face an avatar engine animates, and why a picture is refused.

Both avatar engines that find faces (the embedded engine's Haar cascades, Ditto's SCRFD)
hand the widths of the faces they found to `choose_face`, so their errors name the same
causes with the same numbers:

- no face at all: "no face found ...; use a well-lit, front-facing portrait"
  (the only case that gets the lighting and pose advice). Detections narrower than the
  detection floor (`detection_floor_px`: `MIN_DETECTION_PX`, or `MIN_DETECTION_SHARE` of
  the picture's shorter side when that is more) are not faces: they are what the
  detectors fire on in texture and noise, and the message says how many were ignored;
- the largest face is narrower than the engine's minimum: "the face is N px wide; at
  least M px is needed";
- two or more faces of about the same size (the second at least `SIMILAR_FACE_RATIO` of the
  largest's width): "2 faces of similar size (...)", because which person to animate is
  then a guess. A clearly largest face is animated, as before (a person in front of a
  crowd, a photo on the wall behind).

Widths are in pixels of the picture as submitted. Pure Python, no engine imports.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_FACE_PX = 48  # below this a face has too little detail to animate (both engines)
SIMILAR_FACE_RATIO = 0.8
# Narrower detections are taken for texture, not faces. Half of MIN_FACE_PX: a face that
# narrow has eyes of about 4 px, less than any detector we use can tell from noise (the
# embedded engine's Haar cascades fire on 11-40 px patches of generated noise; see
# tests/test_faces.py). The share keeps the floor in step with large pictures, where a
# patch of sensor noise is larger in pixels: 1.5 % of the shorter side (45 px at 3000 px,
# still under MIN_FACE_PX up to a 3200 px side, so a small real face there is named as
# small, not missed).
MIN_DETECTION_PX = 24
MIN_DETECTION_SHARE = 0.015


def detection_floor_px(short_side_px: float | None) -> float:
    """The narrowest detection taken for a face in a picture whose shorter side is
    `short_side_px` pixels (None: not known, the absolute floor alone)."""
    if not short_side_px:
        return float(MIN_DETECTION_PX)
    return max(float(MIN_DETECTION_PX), MIN_DETECTION_SHARE * float(short_side_px))


class FaceChoiceError(ValueError):
    """The picture has no face the engine can animate; the message says why."""


def choose_face(
    widths: Sequence[float],
    *,
    min_face_px: float = MIN_FACE_PX,
    smallest_searched_px: float | None = None,
    short_side_px: float | None = None,
) -> int:
    """Index (into `widths`) of the face to animate among detections of these widths
    (source pixels), or FaceChoiceError naming the cause. Detections under
    `detection_floor_px(short_side_px)` (`short_side_px`: the submitted picture's shorter
    side) are ignored as texture. `smallest_searched_px`: the narrowest face the detector
    could have found, said in the no-face message."""
    floor = detection_floor_px(short_side_px)
    ignored = [float(w) for w in widths if float(w) < floor]
    widths = [float(w) if float(w) >= floor else 0.0 for w in widths]
    if len(ignored) == len(widths):
        smallest = max(floor, smallest_searched_px or 0.0)
        searched = f" (faces from about {smallest:.0f} px wide were looked for"
        if ignored:
            count = len(ignored)
            searched += (f"; {count} smaller face-like pattern{'s' * (count != 1)} "
                         f"({', '.join(f'{w:.0f}' for w in sorted(ignored)[::-1][:5])} px "
                         f"wide) {'were' if count != 1 else 'was'} taken for texture")
        searched = searched + ")" if (smallest_searched_px or short_side_px or ignored) else ""
        raise FaceChoiceError(
            f"no face found{searched}; use a well-lit, front-facing portrait"
        )
    order = [i for i in sorted(range(len(widths)), key=lambda i: -widths[i]) if widths[i]]
    largest = float(widths[order[0]])
    if largest < min_face_px:
        many = f" (the largest of {len(order)} faces found)" if len(order) > 1 else ""
        raise FaceChoiceError(
            f"the face is {largest:.0f} px wide{many}; at least {min_face_px:.0f} px is "
            "needed: use a picture taken closer or at a higher resolution"
        )
    similar = [float(widths[i]) for i in order if widths[i] >= SIMILAR_FACE_RATIO * largest]
    if len(similar) > 1:
        sizes = ", ".join(f"{w:.0f}" for w in similar)
        raise FaceChoiceError(
            f"{len(similar)} faces of similar size ({sizes} px wide); use a picture with "
            "one face, or crop it to the face to animate"
        )
    return order[0]
