"""Hostile audio and text: `validate_pcm`, `decode_audio` and `validate_text` either return
clean data or raise `EngineInputError` naming the field; nothing else, and quickly."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import wave

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from avatard.engines.audio import (
    DEFAULT_MAX_TEXT_CHARS,
    decode_audio,
    validate_pcm,
    validate_text,
)
from avatard.engines.base import EngineInputError

EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.longdouble, np.int16,
                          np.int32, np.uint8, np.bool_, np.complex64])
RATES = st.one_of(st.integers(-10, 10), st.integers(7990, 8010), st.integers(191_990, 192_010),
                  st.integers(-(2**70), 2**70), st.sampled_from([16000, 44100, 48000]),
                  st.booleans(), st.floats(), st.none(), st.text(max_size=3))


def check_pcm_result(pcm: np.ndarray, rate: int) -> None:
    assert pcm.dtype == np.float32 and pcm.ndim == 1 and pcm.size > 0
    assert pcm.flags.c_contiguous and np.isfinite(pcm).all()
    assert float(np.abs(pcm).max()) <= 1.0
    assert isinstance(rate, int) and 8000 <= rate <= 192000


@EXAMPLES
@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
                  elements=None), RATES)
def test_validate_pcm(array: np.ndarray, rate: object) -> None:
    try:
        pcm, out_rate = validate_pcm(array, rate)
    except EngineInputError as exc:
        assert exc.field in ("audio", "sample_rate") and exc.rule
        return
    check_pcm_result(pcm, out_rate)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3.0, -1e30])
def test_validate_pcm_refuses_nan_inf_and_out_of_range(value: float) -> None:
    pcm = np.zeros(1600, np.float32)
    pcm[800] = value
    with pytest.raises(EngineInputError) as err:
        validate_pcm(pcm, 16000)
    assert err.value.field == "audio"


@pytest.mark.parametrize("seconds", [0, 601, 3600 * 10])
def test_validate_pcm_refuses_zero_seconds_and_hours_without_copying(seconds: int) -> None:
    # A zero-strided view: 10 hours at 192 kHz costs no memory unless something copies it.
    samples = np.broadcast_to(np.float32(0.1), (seconds * 192000,))
    started = time.monotonic()
    with pytest.raises(EngineInputError) as err:
        validate_pcm(samples, 192000)
    assert time.monotonic() - started < 1.0
    assert "empty" in err.value.rule if seconds == 0 else "limit" in err.value.rule


def wav_bytes(rate: int, channels: int, seconds: float, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        count = int(rate * seconds)
        tone = (np.sin(np.arange(count * channels) / 7) * 8000).astype("<i2")
        w.writeframes(tone.tobytes() if width == 2 else bytes(count * channels * width))
    return buf.getvalue()


@st.composite
def mutated_wavs(draw: st.DrawFn) -> bytes:
    data = bytearray(wav_bytes(draw(st.sampled_from([8000, 16000, 44100])),
                               draw(st.integers(1, 2)), draw(st.floats(0.0, 0.2))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "rate", "channels", "bits", "size",
                                   "append"]))
        if op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "append":
            data += draw(st.binary(max_size=64))
        elif len(data) >= 44:
            # Header fields of the canonical 44-byte WAV header: lie about them.
            where, fmt = {"rate": (24, "<I"), "channels": (22, "<H"), "bits": (34, "<H"),
                          "size": (40, "<I")}[op]
            bound = 2**32 - 1 if fmt == "<I" else 2**16 - 1
            struct.pack_into(fmt, data, where, draw(st.integers(0, bound)))
    if len(data) >= 24 and struct.unpack_from("<H", data, 22)[0] >= 8:
        # 8 channels or more crash the interpreter (SIGSEGV in PyAV), which would end the
        # whole test run: that case has its own test, in a subprocess, below.
        struct.pack_into("<H", data, 22, 2)
    return bytes(data)


@EXAMPLES
@given(st.one_of(mutated_wavs(), st.binary(max_size=200)),
       st.one_of(st.none(), st.sampled_from([8000, 16000, 48000])))
def test_decode_audio_of_hostile_files(data: bytes, target_rate: int | None) -> None:
    started = time.monotonic()
    try:
        pcm, rate = decode_audio(data, target_rate)
    except EngineInputError as exc:
        # "sample_rate" when the file's own rate is out of range.
        assert exc.field in ("audio", "sample_rate") and exc.rule
    else:
        check_pcm_result(pcm, rate)
        if target_rate:
            assert rate == target_rate
    assert time.monotonic() - started < 5.0


def test_decode_audio_of_a_wav_without_a_decoder() -> None:
    data = bytearray(wav_bytes(16000, 1, 0.1))
    struct.pack_into("<H", data, 34, 0)  # bits per sample
    with pytest.raises(EngineInputError) as err:
        decode_audio(bytes(data))
    assert err.value.field == "audio"


SEGV_PROBE = """
import io, sys, wave
import numpy as np
from avatard.engines.audio import decode_audio
channels, target = int(sys.argv[1]), (int(sys.argv[2]) or None)
buf = io.BytesIO()
with wave.open(buf, "wb") as w:
    w.setnchannels(channels)
    w.setsampwidth(2)
    w.setframerate(8000)
    w.writeframes(np.zeros(800 * channels, "<i2").tobytes())
pcm, rate = decode_audio(buf.getvalue(), target)
assert pcm.shape == ((1600,) if target else (800,)), pcm.shape
"""


def _decode_in_a_subprocess(channels: int, target_rate: int) -> int:
    done = subprocess.run([sys.executable, "-c", SEGV_PROBE, str(channels), str(target_rate)],
                          capture_output=True, timeout=60)
    return done.returncode


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_decode_audio_of_multichannel_wavs(channels: int) -> None:
    assert _decode_in_a_subprocess(channels, 0) == 0
    assert _decode_in_a_subprocess(channels, 16000) == 0


REFUSE_PROBE = SEGV_PROBE.replace(
    "pcm, rate = decode_audio(buf.getvalue(), target)",
    "from avatard.engines.base import EngineInputError\n"
    "try:\n    decode_audio(buf.getvalue(), target)\n"
    "except EngineInputError as exc:\n    print(exc.field, exc.rule)\n    sys.exit(0)\n"
    "sys.exit(3)")


@pytest.mark.parametrize(("channels", "target_rate"), [(8, 0), (8, 16000), (9, 0), (9, 16000)])
def test_decode_audio_refuses_8_or_more_channels_without_crashing(channels: int,
                                                                   target_rate: int) -> None:
    # PyAV 18.1 crashes (SIGSEGV) converting planar frames of 8+ channels: such files must
    # be refused before decoding, with an error naming `audio` (in a subprocess, so a
    # regression shows as a crash code, not a dead test run).
    done = subprocess.run([sys.executable, "-c", REFUSE_PROBE, str(channels), str(target_rate)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.startswith("audio ") and "channels" in done.stdout


def test_decode_audio_refuses_long_files_while_decoding() -> None:
    data = wav_bytes(8000, 1, 3.0)
    with pytest.raises(EngineInputError) as err:
        decode_audio(data, max_duration_s=1.0)
    assert "longer than the limit" in err.value.rule


def test_decode_audio_refuses_a_bad_target_rate() -> None:
    with pytest.raises(EngineInputError) as err:
        decode_audio(wav_bytes(8000, 1, 0.1), target_rate=4)
    assert err.value.field == "target_rate"


# Any code point, lone surrogates and control characters included.
ANY_CHAR = st.integers(0, 0x10FFFF).map(chr)
TEXTS = st.one_of(st.text(alphabet=ANY_CHAR, max_size=200),
                  st.text(alphabet=st.sampled_from("\x00\x07\x1b\r\n\t\u200b\ud800\udfff"
                                                   "\u0301a. "), max_size=50))


@EXAMPLES
@given(TEXTS)
def test_validate_text(text: str) -> None:
    try:
        cleaned = validate_text(text)
    except EngineInputError as exc:
        assert exc.field == "text" and exc.rule
        return
    cleaned.encode("utf-8")  # no lone surrogate survives
    assert any(ch.isalnum() for ch in cleaned)
    assert not any(ord(ch) < 0x20 and ch != "\n" for ch in cleaned)


@pytest.mark.parametrize("value", [b"\xff\xfe hello", bytearray(b"hi"), None, 5, ["a"]])
def test_validate_text_refuses_non_strings(value: object) -> None:
    with pytest.raises(EngineInputError) as err:
        validate_text(value)
    assert err.value.field == "text" and "must be a string" in err.value.rule


def test_validate_text_refuses_ten_megabytes_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(EngineInputError) as err:
        validate_text("a" * (10 * 2**20))
    assert time.monotonic() - started < 0.5
    assert str(DEFAULT_MAX_TEXT_CHARS) in err.value.rule


@pytest.fixture(scope="module")
def embedded_portrait() -> tuple[object, object]:
    avatar = pytest.importorskip("avatard.engines.embedded.avatar")
    engine = avatar.EmbeddedAvatarEngine(options={"warmup": False})
    return engine, engine.register(avatar.default_portrait())


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hnp.arrays(np.float32, st.integers(0, 4000),
                  elements=st.floats(-1e6, 1e6, width=32) | st.sampled_from([np.nan, np.inf])))
def test_embedded_avatar_stream_of_hostile_pcm(embedded_portrait: tuple[object, object],
                                               pcm: np.ndarray) -> None:
    """What a lipsync job feeds the embedded avatar: frames, or EngineInputError."""
    engine, state = embedded_portrait
    stream = engine.open_stream(state, 1)  # type: ignore[attr-defined]
    try:
        frames = stream.push(pcm) + stream.finish()
    except EngineInputError as exc:
        assert exc.field == "audio"
    else:
        assert all(f.dtype == np.uint8 and f.ndim == 3 for f in frames)


def test_embedded_avatar_stream_of_huge_finite_pcm(
        embedded_portrait: tuple[object, object]) -> None:
    engine, state = embedded_portrait
    stream = engine.open_stream(state, 1)  # type: ignore[attr-defined]
    with pytest.raises(EngineInputError):
        stream.push(np.full(8000, 1e30, np.float32))
