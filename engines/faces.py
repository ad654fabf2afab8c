"""Which detected face an avatar engine animates, and why a picture is refused.

Both avatar engines that find faces (the embedded engine's Haar cascades, Ditto's SCRFD)
hand the widths of the faces they found to `choose_face`, so their errors name the same
causes with the same numbers:

- no face at all: "no face found ...; use a well-lit, front-facing portrait"
  (the only case that gets the lighting and pose advice);
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


class FaceChoiceError(ValueError):
    """The picture has no face the engine can animate; the message says why."""


def choose_face(
    widths: Sequence[float],
    *,
    min_face_px: float = MIN_FACE_PX,
    smallest_searched_px: float | None = None,
) -> int:
    """Index of the face to animate among faces of these widths (source pixels), or
    FaceChoiceError naming the cause. `smallest_searched_px`: the narrowest face the
    detector could have found, said in the no-face message."""
    if len(widths) == 0:
        searched = (
            f" (faces from about {smallest_searched_px:.0f} px wide were looked for)"
            if smallest_searched_px
            else ""
        )
        raise FaceChoiceError(
            f"no face found{searched}; use a well-lit, front-facing portrait"
        )
    order = sorted(range(len(widths)), key=lambda i: -float(widths[i]))
    largest = float(widths[order[0]])
    if largest < min_face_px:
        many = f" (the largest of {len(widths)} faces found)" if len(widths) > 1 else ""
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
