"""Hostile portraits: `EmbeddedAvatarEngine.register` and `FakeAvatarEngine.register` take
any bytes or array and either register an avatar or raise `EngineInputError` naming
`image`, without decoding a gigapixel image a header merely claims."""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from avatard.engines.base import AvatarState, EngineInputError
from avatard.engines.fake import FakeAvatarEngine

Image = pytest.importorskip("PIL.Image")
embedded = pytest.importorskip("avatard.engines.embedded.avatar")

EXAMPLES = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def engine() -> Iterator[object]:
    yield embedded.EmbeddedAvatarEngine(options={"warmup": False})


def encoded(fmt: str, side: int = 128) -> bytes:
    """The default portrait (it has a face) scaled to side x side, encoded as `fmt`."""
    picture = Image.fromarray(embedded.default_portrait()).resize((side, side))
    buf = io.BytesIO()
    picture.save(buf, format=fmt)
    return buf.getvalue()


SEEDS = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose (valid, CRC-correct) header claims width x height, with a tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def jpeg_header(width: int, height: int) -> bytes:
    """The seed JPEG with its SOF0 frame header rewritten to claim width x height."""
    data = bytearray(SEEDS["JPEG"])
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


@st.composite
def hostile_images(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "splice", "header"]))
        if op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "flip" and data:
            at = draw(st.integers(0, min(len(data) - 1, 400)))  # headers live up front
            data[at] = draw(st.integers(0, 255))
        elif op == "splice":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(max_size=32))
        elif len(data) > 32:
            at = draw(st.integers(0, 32))
            struct.pack_into(">H", data, at, draw(st.integers(0, 0xFFFF)))
    return bytes(data)


def _register(engine: object, image: object) -> AvatarState | None:
    """Register; None for a refusal (checked to name `image`)."""
    started = time.monotonic()
    try:
        state = engine.register(image)  # type: ignore[attr-defined]
    except EngineInputError as exc:
        assert exc.field == "image" and exc.rule
        state = None
    assert time.monotonic() - started < 5.0
    return state


@EXAMPLES
@given(st.one_of(hostile_images(), st.binary(max_size=300)))
def test_embedded_register_hostile_bytes(engine: object, data: bytes) -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = _register(engine, data)
    if state is not None:
        assert state.width > 0 and state.height > 0
    # A gigapixel decode would raise the peak by gigabytes (ru_maxrss is in KiB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 * 1024


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hnp.arrays(st.sampled_from([np.uint8, np.float32, np.int16, np.bool_]),
                  hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=80)))
def test_embedded_register_hostile_arrays(engine: object, array: np.ndarray) -> None:
    _register(engine, array)


@pytest.mark.parametrize("value", [None, "portrait.png", 5, [1, 2, 3]])
def test_embedded_register_wrong_types(engine: object, value: object) -> None:
    with pytest.raises(EngineInputError) as err:
        engine.register(value)  # type: ignore[attr-defined]
    assert err.value.field == "image"


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_embedded_register_refuses_other_formats(engine: object, fmt: str) -> None:
    with pytest.raises(EngineInputError) as err:
        engine.register(SEEDS[fmt])  # type: ignore[attr-defined]
    assert "not accepted" in err.value.rule


@pytest.mark.parametrize(("width", "height"), [(9000, 100), (8000, 8000), (100, 9000),
                                               (10, 10)])
@pytest.mark.parametrize("header", [png_header, jpeg_header])
def test_embedded_register_refuses_claimed_sizes_before_decoding(
        engine: object, header: object, width: int, height: int) -> None:
    started = time.monotonic()
    with pytest.raises(EngineInputError) as err:
        engine.register(header(width, height))  # type: ignore[attr-defined,operator]
    assert time.monotonic() - started < 1.0
    assert f"{width}x{height} px" in err.value.rule


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (65535, 65535)])
@pytest.mark.parametrize("header", [png_header, jpeg_header])
def test_header_claiming_a_gigapixel_image(engine: object, header: object, width: int,
                                           height: int) -> None:
    with pytest.raises(EngineInputError):
        engine.register(header(width, height))  # type: ignore[attr-defined,operator]


@pytest.mark.parametrize(("fmt", "keep"), [("JPEG", 30), ("JPEG", 600), ("PNG", 20),
                                           ("BMP", 18), ("WEBP", 30)])
def test_truncated_or_corrupt_headers(engine: object, fmt: str, keep: int) -> None:
    with pytest.raises(EngineInputError) as err:
        engine.register(SEEDS[fmt][:keep])  # type: ignore[attr-defined]
    assert err.value.field == "image"


@pytest.fixture(scope="module")
def fake_engine() -> FakeAvatarEngine:
    return FakeAvatarEngine(options={"width": 16, "height": 16})


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200),
                 hnp.arrays(st.sampled_from([np.uint8, np.float32, np.int64]),
                            hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=8)),
                 st.none(), st.integers(), st.text(max_size=5)))
def test_fake_register_hostile_input(fake_engine: FakeAvatarEngine, image: object) -> None:
    try:
        state = fake_engine.register(image)  # type: ignore[arg-type]
    except EngineInputError as exc:
        assert exc.field == "image" and exc.rule
    else:
        assert state.avatar_id and (state.width, state.height) == (16, 16)
