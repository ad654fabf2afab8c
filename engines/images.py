"""Portrait decoding shared by the avatar engines: encoded bytes -> 8-bit RGB (+ a matte).

Every avatar engine that takes encoded pictures decodes them here (`decode_image`), so
every Pillow mode reaches every engine the same way:

- EXIF orientation is applied first.
- 16-bit data (``I;16``, ``I;16B``, ``I;16L``: 16-bit grey PNG, TIFF, PGM) is scaled by
  its type's range, 0..65535 -> 0..255 (``round(v / 257)``); Pillow's own
  ``convert("RGB")`` clips it at 255, which turns a 16-bit portrait nearly white.
- 32-bit integer (``I``) and float (``F``) data say nothing about their range, so the
  smallest of these that holds every pixel is used: 0..1 (float only), 0..255, 0..65535,
  else the picture's own minimum..maximum. NaN counts as 0.
- 48- and 64-bit RGB(A) PNGs are opened by Pillow as 8-bit RGB(A) (the high byte of
  each sample), which is the same scaling.
- Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``La``/``RGBa``, a palette or
  grey/RGB ``tRNS`` key, also on 16-bit grey) is composited over a background colour
  (the engines' option `background`, default `DEFAULT_BACKGROUND`, a neutral light grey)
  and also returned as an 8-bit matte (`DecodedImage.alpha`) for engines that can use
  it. A picture whose alpha is opaque everywhere has no matte.
- Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``RGBX``)
  goes through Pillow's conversion to RGB. Embedded ICC profiles are not applied.

Errors are `EngineInputError("image", ...)`. Sizes are checked from the header (the
caller's `check_size`) before any pixel is decoded, so a huge picture costs nothing.

Runs in workers only; Pillow is imported when a picture is decoded. `parse_colour` is
torch- and Pillow-free, so the options classes (imported by the supervisor) can use it.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import EngineInputError
from .options import OptionConflict, option

DEFAULT_BACKGROUND = "#d0d0d0"  # neutral light grey: reads as a studio backdrop
_COLOUR = re.compile(r"#?([0-9a-fA-F]{6})")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
# Pillow opens a few file formats under other names (camera JPEGs with a second picture).
FORMAT_ALIASES = {"MPO": "JPEG"}


def parse_colour(text: str) -> tuple[int, int, int]:
    """'#rrggbb' (or 'rrggbb') -> (r, g, b); ValueError saying what is expected."""
    match = _COLOUR.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"must be a colour as #rrggbb (e.g. {DEFAULT_BACKGROUND}), got {text!r}")
    value = int(match.group(1), 16)
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def background_option() -> str:
    """The `background` option of an avatar engine's options class (a field declaration);
    the class's `__post_init__` calls `check_background_option`."""
    return option(
        DEFAULT_BACKGROUND,
        "Colour (#rrggbb) that the transparent parts of a portrait are composited over.",
    )


def check_background_option(options: object) -> None:
    """OptionConflict naming `background` unless it is a #rrggbb colour."""
    try:
        parse_colour(options.background)  # type: ignore[attr-defined]
    except ValueError as error:
        raise OptionConflict("background", str(error)) from None


@dataclass(frozen=True)
class DecodedImage:
    """A decoded portrait."""

    rgb: np.ndarray  # (H, W, 3) uint8, C-contiguous, transparency composited
    alpha: np.ndarray | None  # (H, W) uint8 matte (255 opaque), None for an opaque picture
    format: str  # Pillow's format name ("PNG", "JPEG"...)
    mode: str  # the file's Pillow mode before conversion ("I;16", "RGBA"...)


def decode_image(
    data: bytes,
    *,
    background: tuple[int, int, int] | str = DEFAULT_BACKGROUND,
    formats: tuple[str, ...] | None = None,
    check_size: Callable[[int, int], None] | None = None,
) -> DecodedImage:
    """Decode encoded picture bytes to 8-bit RGB (see the module doc).

    `formats`: the accepted Pillow format names (None: whatever Pillow opens);
    `check_size(width, height)` raises EngineInputError for a size the engine refuses,
    called with the header's size before decoding (and again after EXIF rotation would
    swap the sides: the check is symmetric in the engines, so once suffices).
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pillow is optional for the engines that also take arrays
        raise EngineInputError(
            "image", "encoded pictures need pillow (pip install pillow); pass an RGB array"
        ) from None
    if isinstance(background, str):
        background = parse_colour(background)
    if not data:
        raise EngineInputError("image", "is empty")
    accepted = ", ".join(formats) if formats else "any format Pillow opens"
    try:
        # Opening reads only the header, so the size check comes before any big decode.
        # Pillow refuses headers past its decompression-bomb limit itself (an error, not
        # a warning, beyond twice the limit), and a truncated header is an OSError.
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise EngineInputError(
            "image", f"is not a decodable image; accepted formats: {accepted}"
        ) from None
    except Image.DecompressionBombError as error:
        raise EngineInputError("image", f"is too large to decode ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise EngineInputError("image", f"header is truncated or corrupt ({error})") from None
    with image:
        file_format = FORMAT_ALIASES.get(image.format or "", image.format or "unknown")
        if formats is not None and file_format not in formats:
            raise EngineInputError(
                "image", f"format {file_format} is not accepted; use one of {accepted}"
            )
        if check_size is not None:
            check_size(image.width, image.height)
        mode = image.mode
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
            rgb, alpha = image_to_rgb8(image, background)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as error:
            raise EngineInputError(
                "image", f"{file_format} data is truncated or corrupt ({error})"
            ) from None
    return DecodedImage(rgb=rgb, alpha=alpha, format=file_format, mode=mode)


def image_to_rgb8(image, background: tuple[int, int, int] | str = DEFAULT_BACKGROUND
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """A loaded PIL image of any mode -> ((H, W, 3) uint8 RGB, (H, W) uint8 matte or None),
    after EXIF orientation; transparency composited over `background`."""
    from PIL import ImageOps

    if isinstance(background, str):
        background = parse_colour(background)
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image)
        grey = np.repeat(_scaled_to_8_bits(values, mode)[..., None], 3, axis=2)
        key = image.info.get("transparency")  # a 16-bit grey PNG's tRNS: one grey value
        if isinstance(key, int) and not isinstance(key, bool) and np.any(values == key):
            alpha = np.where(values == key, 0, 255).astype(np.uint8)
            return composite(grey, alpha, background), alpha
        return np.ascontiguousarray(grey), None
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"))), None
    if mode == "La":  # Pillow converts premultiplied grey+alpha only to LA
        image = image.convert("LA")
    rgba = np.asarray(image.convert("RGBA"))
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3]), None
    return composite(rgba[..., :3], alpha, background), np.ascontiguousarray(alpha)


def composite(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]
              ) -> np.ndarray:
    """`rgb` over a flat `background` with the 8-bit `alpha` (straight, not premultiplied),
    in the picture's own (sRGB) values, as browsers and image editors blend; rounded."""
    weight = alpha.astype(np.float32)[..., None] / 255.0
    back = np.asarray(background, np.float32)
    out = rgb.astype(np.float32) * weight + back * (1.0 - weight)
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _scaled_to_8_bits(values: np.ndarray, mode: str) -> np.ndarray:
    """One-channel 16-bit, 32-bit integer or float pixels -> uint8 (see the module doc)."""
    data = values.astype(np.float64)
    if mode == "F":
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if mode in _SIXTEEN_BIT_MODES:
        low, high = 0.0, 65535.0
    else:
        lowest = float(data.min()) if data.size else 0.0
        highest = float(data.max()) if data.size else 0.0
        if lowest >= 0.0 and highest <= 1.0 and mode == "F":
            low, high = 0.0, 1.0
        elif lowest >= 0.0 and highest <= 255.0:
            low, high = 0.0, 255.0
        elif lowest >= 0.0 and highest <= 65535.0:
            low, high = 0.0, 65535.0
        else:
            low, high = lowest, max(highest, lowest + 1e-12)
    scaled = (data - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
