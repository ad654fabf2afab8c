"""Audio and text input handling: validation, decoding, resampling, sentence splitting."""

from __future__ import annotations

import io
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from avatard.engines.audio import (
    decode_audio,
    pack_sentences,
    resample,
    split_sentences,
    validate_pcm,
    validate_text,
)
from avatard.engines.base import EngineInputError
from avatard.ipc.protocol import seconds_over


def tone(freq_hz: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


# ---------------------------------------------------------------------------- PCM


def test_valid_pcm_passes_through_as_float32():
    pcm, rate = validate_pcm(tone(440, 16000, 0.5).astype(np.float64), 16000)
    assert pcm.dtype == np.float32 and pcm.flags.c_contiguous and rate == 16000


def test_column_vector_is_accepted_as_mono():
    pcm, _ = validate_pcm(tone(440, 16000, 0.1)[:, None], 16000)
    assert pcm.ndim == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused(bad: float):
    pcm = tone(440, 16000, 0.5)
    pcm[100] = bad
    with pytest.raises(EngineInputError) as error:
        validate_pcm(pcm, 16000)
    assert error.value.field == "audio" and "NaN" in error.value.rule


def test_zero_length_audio_is_refused():
    with pytest.raises(EngineInputError) as error:
        validate_pcm(np.zeros(0, np.float32), 16000)
    assert error.value.field == "audio" and "0 s" in error.value.rule


def test_too_long_audio_names_the_limit():
    with pytest.raises(EngineInputError) as error:
        validate_pcm(np.zeros(16000 * 3, np.float32), 16000, max_duration_s=2.5)
    assert error.value.field == "audio" and "2.5 s" in error.value.rule


@pytest.mark.parametrize("rate", [0, 4000, 7999, 192001, 16000.0, "16000", True])
def test_bad_sample_rates_are_refused(rate: object):
    with pytest.raises(EngineInputError) as error:
        validate_pcm(tone(440, 16000, 0.1), rate)
    assert error.value.field == "sample_rate"


def test_integer_pcm_and_stereo_are_refused():
    with pytest.raises(EngineInputError, match="dtype int16"):
        validate_pcm(np.zeros(1600, np.int16), 16000)
    with pytest.raises(EngineInputError, match="mono"):
        validate_pcm(np.zeros((1600, 2), np.float32), 16000)
    with pytest.raises(EngineInputError, match="numpy array"):
        validate_pcm([0.0] * 100, 16000)


def test_codec_overshoot_is_clipped_but_integer_scale_is_refused():
    pcm = tone(440, 16000, 0.1, amplitude=1.2)
    clipped, _ = validate_pcm(pcm, 16000)
    assert float(np.abs(clipped).max()) == pytest.approx(1.0)
    with pytest.raises(EngineInputError, match="peak"):
        validate_pcm(pcm * 1000, 16000)


# ---------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(("src", "dst"), [(22050, 16000), (44100, 16000), (16000, 48000)])
def test_resample_keeps_in_band_tones_and_length(src: int, dst: int):
    x = tone(1000, src, 1.0)
    y = resample(x, src, dst)
    assert y.dtype == np.float32
    assert y.size == -(-x.size * dst // src)
    middle = slice(dst // 10, -dst // 10)  # away from the zero-padded edges
    assert rms(y[middle]) == pytest.approx(rms(x), rel=0.01)
    assert dominant_hz(y, dst) == pytest.approx(1000, abs=3)


def test_resample_rejects_aliases_above_the_new_nyquist():
    # 9 kHz cannot exist at 16 kHz; a naive decimator folds it down to 7 kHz at full level.
    y = resample(tone(9000, 22050, 1.0), 22050, 16000)
    middle = y[1600:-1600]
    attenuation_db = 20 * np.log10(rms(middle) / rms(tone(9000, 22050, 1.0)))
    assert attenuation_db < -60


def test_resample_is_aligned_in_time():
    # A click at 0.5 s must stay at 0.5 s: word timings depend on it.
    x = np.zeros(22050, np.float32)
    x[11025] = 1.0
    y = resample(x, 22050, 16000)
    assert abs(int(np.argmax(y)) - 8000) <= 1


def test_resample_odd_rate_pair_without_phase_table():
    y = resample(tone(500, 44100, 0.3), 44100, 16001)
    assert dominant_hz(y, 16001) == pytest.approx(500, abs=5)


# ---------------------------------------------------------------------------- decoding


# Fixed frame sizes some encoders insist on (mp3: 1152 samples; Opus: 20 ms at 48 kHz).
ENCODER_FRAME_SIZES = {"libmp3lame": 1152, "libopus": 960, "flac": 4608}


def write_audio_file(path: Path, codec: str, rate: int, samples: np.ndarray) -> None:
    """Encode a stereo file (right channel at half level) with PyAV."""
    import av

    stereo = np.ascontiguousarray(np.stack([samples, samples * 0.5]), dtype=np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "stereo"
        # Convert to whatever sample format and frame size the encoder wants.
        converter = av.AudioResampler(
            format=stream.format.name,
            layout="stereo",
            rate=rate,
            frame_size=ENCODER_FRAME_SIZES.get(codec),
        )
        frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = Fraction(1, rate)
        for converted in converter.resample(frame) + converter.resample(None):
            container.mux(stream.encode(converted))
        container.mux(stream.encode(None))


@pytest.mark.parametrize(
    ("suffix", "codec"),
    [(".wav", "pcm_s16le"), (".flac", "flac"), (".mp3", "libmp3lame"), (".ogg", "libopus")],
)
def test_decode_formats_to_mono_at_the_target_rate(tmp_path: Path, suffix: str, codec: str):
    rate = 48000 if codec == "libopus" else 44100
    path = tmp_path / f"tone{suffix}"
    write_audio_file(path, codec, rate, tone(440, rate, 1.0))
    pcm, out_rate = decode_audio(path, target_rate=16000)
    assert out_rate == 16000 and pcm.ndim == 1 and pcm.dtype == np.float32
    # Lossy codecs add priming/padding of a few tens of ms.
    assert pcm.size / 16000 == pytest.approx(1.0, abs=0.1)
    assert dominant_hz(pcm, 16000) == pytest.approx(440, abs=3)
    # Downmix is the mean of the channels: (1 + 0.5) / 2 of the left level.
    assert rms(pcm[1600:-1600]) == pytest.approx(0.75 * 0.5 / np.sqrt(2), rel=0.1)


def test_decode_keeps_native_rate_and_reads_bytes(tmp_path: Path):
    path = tmp_path / "tone.wav"
    write_audio_file(path, "pcm_s16le", 22050, tone(300, 22050, 0.5))
    pcm, rate = decode_audio(path.read_bytes())
    assert rate == 22050 and pcm.size == 11025


def test_decode_refuses_garbage_and_overlong_files(tmp_path: Path):
    with pytest.raises(EngineInputError) as error:
        decode_audio(b"this is not audio at all" * 10)
    assert error.value.field == "audio"
    path = tmp_path / "long.wav"
    write_audio_file(path, "pcm_s16le", 16000, tone(300, 16000, 3.0))
    with pytest.raises(EngineInputError, match="limit of 2 s"):
        decode_audio(path, max_duration_s=2)


def mono_wav(samples: np.ndarray, rate: int) -> bytes:
    """A 16-bit mono WAV (the header states the data's full length)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def test_a_wav_cut_short_gives_the_audio_that_is_there(caplog):
    whole = mono_wav(tone(300, 16000, 2.0), 16000)
    # Cut one byte into a sample, 3 packets (of 4096 bytes) into the data: the last packet
    # holds half a sample, which FFmpeg refuses to decode.
    cut = whole[:44 + 3 * 4096 + 1]
    with caplog.at_level("WARNING", logger="avatard.audio"):
        pcm, rate = decode_audio(cut)
    full, _ = decode_audio(whole)
    assert rate == 16000 and pcm.size == 3 * 4096 // 2
    np.testing.assert_array_equal(pcm, full[:pcm.size])
    warning = caplog.text
    assert "cut short" in warning and "header announces 2.00 s" in warning, warning
    # Cut at a whole sample halfway: the first second, and the same warning.
    caplog.clear()
    with caplog.at_level("WARNING", logger="avatard.audio"):
        half, _ = decode_audio(whole[:44 + 32000])
    assert half.size == 16000 and "the file holds 1.00 s" in caplog.text


@pytest.mark.parametrize("kept_bytes", [0, 1, 2, 200])
def test_a_wav_with_no_audio_in_it_is_refused_naming_audio(kept_bytes: int):
    whole = mono_wav(tone(300, 16000, 2.0), 16000)
    with pytest.raises(EngineInputError) as error:
        decode_audio(whole[:44 + kept_bytes])
    assert error.value.field == "audio"
    assert "holds no audio" in str(error.value) and "announces 2.00 s" in str(error.value)


# ---------------------------------------------------------------------------- text


def test_text_is_cleaned_of_control_characters():
    raw = "Hello\x00 wor\x1bld.\tNext\x7f line\r\nhere.\u200b"
    assert validate_text(raw) == "Hello world. Next line here.\u200b"


def test_blank_lines_survive_as_paragraph_breaks():
    assert validate_text("One.\n\n\nTwo.") == "One.\n\nTwo."


@pytest.mark.parametrize("empty", ["", "   ", "\n\t\x00", "!!! ... ?"])
def test_empty_or_unspeakable_text_is_refused(empty: str):
    with pytest.raises(EngineInputError) as error:
        validate_text(empty)
    assert error.value.field == "text"


def test_megabyte_of_text_is_refused_fast_naming_the_limit():
    with pytest.raises(EngineInputError) as error:
        validate_text("word " * 200_000, max_chars=5000)
    assert error.value.field == "text" and "5000" in error.value.rule


def test_non_string_text_is_refused():
    with pytest.raises(EngineInputError, match="string"):
        validate_text(b"bytes")


# ---------------------------------------------------------------------------- sentences


def test_split_on_terminal_punctuation():
    text = "Hello there. How are you? I am fine! Thanks\u2026 Bye."
    assert split_sentences(text) == [
        "Hello there.",
        "How are you?",
        "I am fine!",
        "Thanks\u2026",
        "Bye.",
    ]


def test_abbreviations_initials_and_decimals_do_not_split():
    text = "Dr. Smith met J. R. Tolkien at 3.15 p.m. today. Then they left, e.g. home."
    assert split_sentences(text) == [
        "Dr. Smith met J. R. Tolkien at 3.15 p.m. today.",
        "Then they left, e.g. home.",
    ]


def test_closing_quotes_stay_with_their_sentence():
    assert split_sentences('He said "stop." Then silence.') == [
        'He said "stop."',
        "Then silence.",
    ]


def test_paragraph_break_ends_a_sentence_without_punctuation():
    assert split_sentences("A heading\n\nBody text.") == ["A heading", "Body text."]


def test_long_sentences_are_cut_at_clauses_within_the_limit():
    clause = "this clause keeps going for a while"
    text = ", ".join([clause] * 20) + "."
    pieces = split_sentences(text, max_chars=120)
    assert all(len(p) <= 120 for p in pieces) and len(pieces) > 1
    assert " ".join(pieces).replace(" ", "") == text.replace(" ", "")


def test_symbol_only_pieces_are_merged_not_spoken_alone():
    assert split_sentences("Wow. !!! Great.") == ["Wow. !!!", "Great."]


@pytest.mark.parametrize(("src", "dst"), [(48000, 16000), (44100, 16000), (8000, 16000),
                                          (16000, 44100), (44101, 16000)])
def test_resample_paths_agree(src: int, dst: int, monkeypatch):
    # The polyphase path (strided views per phase) and the direct one (a gather per
    # output) compute the same sums: forcing the direct path changes nothing but speed.
    from avatard.engines import audio

    x = (np.random.default_rng(5).standard_normal(src // 2) * 0.3).astype(np.float32)
    fast = resample(x, src, dst)
    monkeypatch.setattr(audio, "_POLYPHASE_MIN_ROWS", 10**9)
    np.testing.assert_allclose(fast, resample(x, src, dst), rtol=0, atol=1e-6)


@pytest.mark.parametrize("max_chars", [1, 7, 20, 64, 5000])
def test_pack_sentences_keeps_every_word_within_the_limit(max_chars: int):
    text = ("Hello there. A long run-on clause, then another one; and more words here " * 9
            + "x" * 90 + " end.")
    pieces = pack_sentences(text, max_chars)
    assert all(0 < len(piece) <= max_chars for piece in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    if max_chars >= 20:  # sentences whole where they fit: the first piece ends one
        assert pieces[0].startswith("Hello there.")


@pytest.mark.parametrize("duration_s, limit_s, shown", [
    (600.05, 600, "600.05"),
    (600.004, 600, "600.004"),
    (601.0, 600, "601.0"),
    (61.0, 60, "61.0"),
    (5.25, 5.2, "5.25"),
    (600.0, 600, "600.0"),  # not over: one decimal
])
def test_a_duration_over_a_limit_is_written_over_it(duration_s, limit_s, shown):
    assert seconds_over(duration_s, limit_s) == shown


def test_audio_just_past_the_limit_is_not_said_to_be_at_it():
    rate = 16000
    with pytest.raises(EngineInputError) as error:
        validate_pcm(np.zeros(rate * 600 + rate // 20, np.float32), rate, max_duration_s=600)
    assert "is 600.05 s long; the limit is 600 s" in error.value.rule, error.value.rule
