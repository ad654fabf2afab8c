"""`avatard transcribe` of damaged files (fake engines): a WAV cut short transcribes what
is there and says it was cut; one with no audio in it is an error naming `audio`; silence
transcribes to nothing and says so."""

from __future__ import annotations

import io
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import AVATARD, run_daemon

RATE = 16000


def _wav(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with run_daemon(tmp_path_factory.mktemp("transcribe")) as d:
        yield d


def _transcribe(daemon, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([AVATARD, "transcribe", str(path), "--endpoint", daemon.endpoint],
                          capture_output=True, text=True, timeout=120)


def test_a_wav_cut_short_transcribes_what_is_there(daemon, tmp_path):
    whole = _wav(_tone(4.0))
    path = tmp_path / "cut.wav"
    path.write_bytes(whole[:44 + 2 * RATE * 2 + 1])  # 2 s and half a sample of 4 s
    result = _transcribe(daemon, path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(), "the 2 s that are there were heard"
    assert "cut short" in result.stderr and "header announces 4.00 s" in result.stderr


def test_a_wav_with_no_audio_in_it_is_an_error_naming_audio(daemon, tmp_path):
    path = tmp_path / "header.wav"
    path.write_bytes(_wav(_tone(4.0))[:46])  # the header and one sample
    result = _transcribe(daemon, path)
    assert result.returncode == 1, result.stdout
    assert "audio: holds no audio" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_silence_transcribes_to_nothing_and_says_so(daemon, tmp_path):
    path = tmp_path / "silence.wav"
    path.write_bytes(_wav(np.zeros(RATE, np.float32)))
    result = _transcribe(daemon, path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    assert "no speech heard in 1.00 s of audio" in result.stderr
