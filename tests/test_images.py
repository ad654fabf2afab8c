"""The shared portrait decoder (`engines/images.py`): every Pillow mode -> 8-bit RGB.

Each case builds one picture in 8 bits (the reference), stores the same picture in
another mode or bit depth, and checks that the decoder (and the engines that use it)
gives back the reference. All pictures are generated here; none is over a few kB.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from avatard.engines.base import EngineInputError
from avatard.engines.images import (
    DEFAULT_BACKGROUND,
    composite,
    decode_image,
    parse_colour,
)
from avatard.engines.options import EngineOptionError, parse_options

H, W = 72, 96  # Ditto wants at least 64 px per side
GREY_BG = parse_colour(DEFAULT_BACKGROUND)


def reference_rgb(seed: int = 0) -> np.ndarray:
    """A picture with gradients, flat patches and noise, covering 0..255 in each channel."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:H, :W]
    rgb = np.stack([xs * 255 // (W - 1), ys * 255 // (H - 1), (xs + ys) * 255 // (W + H - 2)],
                   axis=-1).astype(np.uint8)
    rgb[10:20, 10:30] = rng.integers(0, 256, size=(10, 20, 3), dtype=np.uint8)
    rgb[30:40, 40:60] = (0, 0, 0)
    rgb[0:5, 0:5] = (255, 255, 255)
    return rgb


def reference_grey() -> np.ndarray:
    return np.asarray(Image.fromarray(reference_rgb()).convert("L"))


def reference_alpha() -> np.ndarray:
    ys, xs = np.mgrid[:H, :W]
    alpha = (xs * 255 // (W - 1)).astype(np.uint8)  # transparent left edge, opaque right
    alpha[:, :8] = 0
    alpha[:, -8:] = 255
    return alpha


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png16(samples: np.ndarray, transparent_grey: int | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes only 16-bit grey): (H, W) grey,
    (H, W, 2) grey+alpha, (H, W, 3) RGB (48-bit) or (H, W, 4) RGBA (64-bit) uint16."""
    colour_types = {1: 0, 2: 4, 3: 2, 4: 6}
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    height, width = samples.shape[:2]
    rows = samples.astype(">u2").reshape(height, width * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_types[channels], 0, 0, 0)
    if transparent_grey is not None:  # a tRNS key: pixels of this grey are transparent
        header_chunks = chunk(b"IHDR", header) + chunk(b"tRNS", struct.pack(">H", transparent_grey))
        return (b"\x89PNG\r\n\x1a\n" + header_chunks
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def expected_composite(rgb: np.ndarray, alpha: np.ndarray, background=GREY_BG) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb * a + np.asarray(background, np.float64) * (1 - a)).astype(np.uint8)


# ----------------------------------------------------------------------- opaque modes


def _opaque_cases() -> dict[str, tuple[bytes, np.ndarray, int]]:
    """name -> (encoded bytes, expected RGB, tolerance in levels)."""
    rgb, grey = reference_rgb(), reference_grey()
    grey16 = grey.astype(np.uint16) * 257  # the same picture in 16 bits
    cases = {
        "L png": (encode(Image.fromarray(grey), "PNG"), grey3(grey), 0),
        "1 png": (encode(Image.fromarray(grey >= 128), "PNG"),
                  grey3(np.where(grey >= 128, 255, 0).astype(np.uint8)), 0),
        "I;16 png": (encode(Image.fromarray(grey16), "PNG"), grey3(grey), 0),
        "I;16 png by hand": (png16(grey16), grey3(grey), 0),
        "I;16B tiff": (encode(Image.fromarray(grey16.astype(">u2")), "TIFF"), grey3(grey), 0),
        "I 16-bit values tiff": (encode(Image.fromarray(grey16.astype(np.int32)), "TIFF"),
                                 grey3(grey), 0),
        "I 8-bit values tiff": (encode(Image.fromarray(grey.astype(np.int32)), "TIFF"),
                                grey3(grey), 0),
        "I 16-bit pgm": (encode(Image.fromarray(grey16.astype(np.int32)), "PPM"), grey3(grey), 0),
        "F 0..1 tiff": (encode(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"),
                        grey3(grey), 0),
        "F 0..255 tiff": (encode(Image.fromarray(grey.astype(np.float32)), "TIFF"),
                          grey3(grey), 0),
        "RGB 48-bit png": (png16(rgb.astype(np.uint16) * 257), rgb, 0),
        "CMYK tiff": (encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"), rgb, 0),
        "CMYK jpeg": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb, 12),
        "YCbCr tiff": (encode(Image.fromarray(rgb).convert("YCbCr"), "TIFF"), rgb, 3),
        "P png": (encode(Image.fromarray(rgb).quantize(256), "PNG"),
                  np.asarray(Image.fromarray(rgb).quantize(256).convert("RGB")), 0),
        "RGB webp lossless": (encode(Image.fromarray(rgb), "WEBP", lossless=True), rgb, 0),
        "RGB bmp": (encode(Image.fromarray(rgb), "BMP"), rgb, 0),
        "RGBA opaque png": (encode(Image.fromarray(np.dstack([rgb, np.full((H, W), 255,
                                                                            np.uint8)])), "PNG"),
                            rgb, 0),
    }
    return cases


OPAQUE = _opaque_cases()


@pytest.mark.parametrize("name", sorted(OPAQUE))
def test_every_opaque_mode_decodes_to_the_8_bit_reference(name):
    data, expected, tolerance = OPAQUE[name]
    decoded = decode_image(data)
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == (H, W, 3)
    assert decoded.rgb.flags.c_contiguous
    assert decoded.alpha is None  # opaque pictures have no matte
    diff = np.abs(decoded.rgb.astype(int) - expected.astype(int))
    if name.endswith("jpeg"):  # lossy: the mean, not each pixel
        assert diff.mean() < tolerance / 4 and np.percentile(diff, 99) <= tolerance, name
    else:
        assert diff.max() <= tolerance, (name, decoded.mode, int(diff.max()))


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    """The field report: a 16-bit grey PNG came out ~90 % white (Pillow clips I;16 at 255)."""
    grey = reference_grey()
    data = encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    clipped = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # what Pillow alone gives
    decoded = decode_image(data)
    assert decoded.mode == "I;16"
    assert abs(float(decoded.rgb.mean()) - float(grey.mean())) < 0.5


def test_int_and_float_pictures_outside_the_standard_ranges_use_their_own_range():
    values = np.linspace(-1000.0, 3000.0, H * W).reshape(H, W)
    for array in (values.astype(np.float32), values.astype(np.int32) * 1000):
        decoded = decode_image(encode(Image.fromarray(array), "TIFF")).rgb[..., 0]
        assert decoded.min() == 0 and decoded.max() == 255
        assert np.all(np.diff(decoded.reshape(-1).astype(int)) >= 0)  # order kept
    nan = np.full((H, W), np.nan, np.float32)
    nan[:, W // 2:] = 1.0
    decoded = decode_image(encode(Image.fromarray(nan), "TIFF")).rgb
    assert decoded[:, 0].max() == 0 and decoded[:, -1].min() == 255


def test_exif_orientation_is_applied_for_every_mode():
    grey16 = reference_grey().astype(np.uint16) * 257
    rgb = reference_rgb()
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    for image, expected in ((Image.fromarray(rgb), rgb),
                            (Image.fromarray(grey16), grey3(reference_grey()))):
        decoded = decode_image(encode(image, "PNG", exif=exif))
        assert np.array_equal(decoded.rgb, np.rot90(expected, -1))


# ----------------------------------------------------------------------- transparency


def _alpha_cases() -> dict[str, tuple[bytes, np.ndarray, np.ndarray]]:
    """name -> (encoded bytes, straight RGB, alpha)."""
    rgb, grey, alpha = reference_rgb(), reference_grey(), reference_alpha()
    rgba = np.dstack([rgb, alpha])
    palette = Image.fromarray(rgb).quantize(255)  # index 255 is free for transparency
    indices = np.asarray(palette).copy()
    indices[:, :8] = 255
    palette_t = Image.fromarray(indices, "P")
    entries = palette.getpalette()
    palette_t.putpalette(entries + [255, 0, 255] * (256 - len(entries) // 3))  # magenta
    palette_rgb = np.asarray(palette.convert("RGB"))
    binary = np.where(np.arange(W) < 8, 0, 255).astype(np.uint8)[None].repeat(H, 0)
    pa = Image.fromarray(rgb).quantize(256).convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    grey_keyed = grey.copy()
    grey_keyed[grey_keyed == 77] = 78  # grey 77 appears only where it was planted
    grey_keyed[:, :8] = 77
    keyed_alpha = np.where(grey_keyed == 77, 0, 255).astype(np.uint8)
    return {
        "I;16 png with a tRNS key": (png16(grey_keyed.astype(np.uint16) * 257, 77 * 257),
                                     grey3(grey_keyed), keyed_alpha),
        "RGBA png": (encode(Image.fromarray(rgba), "PNG"), rgb, alpha),
        "RGBA webp lossless": (encode(Image.fromarray(rgba), "WEBP", lossless=True), rgb, alpha),
        "RGBA tiff": (encode(Image.fromarray(rgba), "TIFF"), rgb, alpha),
        "LA png": (encode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"),
                   grey3(grey), alpha),
        "PA tiff": (encode(pa, "TIFF"), np.asarray(pa.convert("RGB")), alpha),
        "P png with transparency": (encode(palette_t, "PNG", transparency=255),
                                    palette_rgb, binary),
        "RGBA 64-bit png": (png16(rgba.astype(np.uint16) * 257), rgb, alpha),
        "LA 32-bit png": (png16(np.dstack([grey, alpha]).astype(np.uint16) * 257),
                          grey3(grey), alpha),
    }


ALPHA = _alpha_cases()


@pytest.mark.parametrize("name", sorted(ALPHA))
def test_transparent_modes_are_composited_on_the_background_and_keep_a_matte(name):
    data, rgb, alpha = ALPHA[name]
    decoded = decode_image(data)
    assert decoded.alpha is not None and decoded.alpha.shape == (H, W)
    assert np.array_equal(decoded.alpha, alpha), name
    expected = expected_composite(rgb, alpha)
    # Where alpha is 0 the (possibly garbage) colour underneath must not show.
    assert np.all(decoded.rgb[alpha == 0] == GREY_BG)
    if name.startswith("P png"):  # the palette pixels under index 255 are replaced
        visible = alpha == 255
        assert np.array_equal(decoded.rgb[visible], rgb[visible])
    else:
        assert np.abs(decoded.rgb.astype(int) - expected.astype(int)).max() <= 1, name


def test_background_colour_is_configurable_and_the_default_is_a_light_grey():
    r, g, b = GREY_BG
    assert r == g == b and 180 <= r <= 230  # neutral light grey
    data, rgb, alpha = ALPHA["RGBA png"]
    white = decode_image(data, background="#ffffff").rgb
    assert np.all(white[alpha == 0] == 255)
    green = decode_image(data, background=(0, 255, 0)).rgb
    assert np.all(green[alpha == 0] == (0, 255, 0))
    assert np.array_equal(composite(rgb, alpha, (0, 255, 0)), green)


def test_removed_background_does_not_come_back():
    """A cut-out portrait whose transparent pixels still hold the old background (as
    background-removal tools leave them): only the background colour shows there."""
    rgb = reference_rgb()
    alpha = np.zeros((H, W), np.uint8)
    alpha[8:40, 16:48] = 255
    decoded = decode_image(encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"))
    assert np.all(decoded.rgb[alpha == 0] == GREY_BG)
    assert np.array_equal(decoded.rgb[alpha == 255], rgb[alpha == 255])


@pytest.mark.parametrize("bad", ["grey", "#12345", "#gggggg", "", "#1234567"])
def test_background_option_must_be_a_colour(bad):
    from avatard.engines.ditto.options import DittoOptions
    from avatard.engines.embedded.options import EmbeddedAvatarOptions

    with pytest.raises(EngineOptionError) as caught:
        parse_options(EmbeddedAvatarOptions, {"background": bad}, "engines.options.embedded")
    assert caught.value.key == "engines.options.embedded.background"
    assert "#rrggbb" in caught.value.reason
    with pytest.raises(EngineOptionError):
        parse_options(DittoOptions, {"weights": "random", "background": bad}, "x")
    assert parse_options(EmbeddedAvatarOptions, {"background": "#FFffFF"}, "x").background


# ----------------------------------------------------------------------- errors


def test_format_and_size_limits_are_checked_before_decoding():
    def refuse(width: int, height: int) -> None:
        raise EngineInputError("image", f"is {width}x{height} px")

    data = encode(Image.fromarray(reference_rgb()), "TIFF")
    with pytest.raises(EngineInputError, match="format TIFF is not accepted; use one of PNG"):
        decode_image(data, formats=("PNG",))
    with pytest.raises(EngineInputError, match=f"is {W}x{H} px"):
        decode_image(data, check_size=refuse)
    with pytest.raises(EngineInputError, match="is empty"):
        decode_image(b"")
    with pytest.raises(EngineInputError, match="not a decodable image"):
        decode_image(b"not a picture at all")


# ----------------------------------------------------------------------- engines


def test_ditto_decodes_with_the_shared_decoder():
    """Ditto accepts any format Pillow opens: every case gives the reference pixels (its
    avatar id is the hash of these pixels, so a 16-bit PNG and the 8-bit array are the
    same avatar)."""
    pytest.importorskip("torch")
    from avatard.engines.ditto.engine import _decode_image

    for name, (data, expected, tolerance) in OPAQUE.items():
        got = _decode_image(data, DEFAULT_BACKGROUND)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= max(tolerance, 0) + (
            40 if name.endswith("jpeg") else 0), name
    data, rgb, alpha = ALPHA["RGBA png"]
    assert np.array_equal(_decode_image(data, "#000000"), expected_composite(rgb, alpha,
                                                                             (0, 0, 0)))
    small = encode(Image.fromarray(rgb[:40, :40]), "PNG")
    with pytest.raises(EngineInputError, match="sides must be 64"):
        _decode_image(small, DEFAULT_BACKGROUND)  # Ditto's own size check, from the header


@pytest.fixture(scope="module")
def embedded():
    pytest.importorskip("cv2")
    from avatard.engines.embedded.avatar import EmbeddedAvatarEngine

    return EmbeddedAvatarEngine("cpu", {"warmup": False})


def test_embedded_engine_gets_the_same_pixels_from_16_bit_and_8_bit_portraits(embedded):
    """The default portrait as a 16-bit grey PNG and as a 48-bit RGB PNG: the engine finds
    exactly the landmarks of the 8-bit versions (the same pixels reach it)."""
    from avatard.engines.embedded.avatar import default_portrait

    portrait = default_portrait()
    grey = np.asarray(Image.fromarray(portrait).convert("L"))
    for wide, narrow in ((encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
                          grey3(grey)),
                         (png16(portrait.astype(np.uint16) * 257), portrait)):
        state = embedded.register(wide)
        reference = embedded.register(np.ascontiguousarray(narrow))
        assert state.payload.source_landmarks == reference.payload.source_landmarks
        assert state.extras["composited"] is False


def test_embedded_engine_composites_a_cut_out_portrait(embedded):
    """A portrait whose background was removed (alpha 0 there, black underneath, as many
    tools leave it) registers as the portrait on the light grey, not on black."""
    from avatard.engines.embedded.avatar import EmbeddedAvatarEngine, default_portrait

    portrait = default_portrait()
    alpha = np.zeros(portrait.shape[:2], np.uint8)
    alpha[20:500, 90:430] = 255  # head and shoulders kept
    cut = portrait.copy()
    cut[alpha == 0] = 0
    data = encode(Image.fromarray(np.dstack([cut, alpha])), "PNG")
    state = embedded.register(data)
    assert state.extras["composited"] is True and state.extras["eyes_found"]
    framed = state.payload.rig.portrait  # the 512x512 crop the frames are drawn from
    plain = embedded.register(portrait).payload.rig.portrait
    assert np.all(framed == GREY_BG, axis=2).mean() > 0.05  # the removed background
    assert np.all(plain == GREY_BG, axis=2).mean() < 0.01
    assert np.all(framed == 0, axis=2).mean() <= np.all(plain == 0, axis=2).mean() + 0.001
    white = EmbeddedAvatarEngine("cpu", {"warmup": False, "background": "#ffffff"})
    assert white.register(data).extras["composited"] is True
