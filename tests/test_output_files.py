"""The user's output file under interruption, with real processes and signals: a render,
lipsync or live recording that does not finish (the daemon SIGKILLed, the CLI sent
SIGTERM, SIGINT or SIGHUP) leaves a file that was at `-o` before exactly as it was and no
temporary file beside it, exits non-zero and says the output was not written; one that
finishes replaces it with a complete mp4."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import AVATARD, FAST_RESTART, FAST_TIMEOUTS, reap_killed_daemon, run_daemon

from avatard.daemon import PrivateDaemon
from avatard.engines.mux import Mp4Writer, read_mp4

pytest.importorskip("av")

# 40 ms a frame: a render of the long text below takes several seconds, time enough to
# signal it mid-way (the tests wait for its temporary file, not for a time).
FAKE = {"frame_ms": 40.0}
LONG_TEXT = " ".join(["Words to speak slowly for a while."] * 12)
OLD_BYTES = b"an earlier render the user wants to keep\n" * 100
PART_WAIT_S = 60.0  # bound of the wait for a render to start writing


def _existing(path: Path) -> Path:
    path.write_bytes(OLD_BYTES)
    return path


def _parts(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.part"))


def _wait_for_part(directory: Path, proc: subprocess.Popen) -> None:
    """Wait (bounded) until the CLI's writer has its temporary file open."""
    deadline = time.monotonic() + PART_WAIT_S
    while not _parts(directory):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the CLI ended before writing anything: {proc.returncode}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no temporary output file in {directory} within {PART_WAIT_S} s")
        time.sleep(0.05)


def _write_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    pcm = 0.3 * np.sin(2 * np.pi * 220 * t) * ((t % 1.0) < 0.6)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with run_daemon(tmp_path_factory.mktemp("outputs"), fake=FAKE) as d:
        yield d


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [AVATARD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize(
    ("sig", "name"),
    [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT"), (signal.SIGHUP, "SIGHUP")],
)
def test_a_signalled_render_leaves_the_existing_file_untouched(daemon, tmp_path, sig, name):
    out = _existing(tmp_path / "out.mp4")
    cli = _start("render", LONG_TEXT, "-o", str(out), "--endpoint", daemon.endpoint)
    _wait_for_part(tmp_path, cli)
    cli.send_signal(sig)
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 128 + sig, stderr
    assert f"interrupted by {name}: {out} was not written" in stderr, stderr
    assert "the file already there is unchanged" in stderr
    assert "Traceback" not in stderr
    assert out.read_bytes() == OLD_BYTES
    assert _parts(tmp_path) == []


def test_a_render_that_finishes_replaces_the_existing_file(daemon, tmp_path):
    out = _existing(tmp_path / "out.mp4")
    result = subprocess.run(
        [AVATARD, "render", "Short and done.", "-o", str(out), "--endpoint", daemon.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert read_mp4(out).frame_count > 0
    assert _parts(tmp_path) == []


def test_a_signalled_lipsync_leaves_the_existing_file_untouched(daemon, tmp_path):
    out = _existing(tmp_path / "out.mp4")
    wav = _write_wav(tmp_path / "in.wav", 12.0)
    cli = _start("lipsync", str(wav), "-o", str(out), "--endpoint", daemon.endpoint)
    _wait_for_part(tmp_path, cli)
    cli.send_signal(signal.SIGTERM)
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 128 + signal.SIGTERM, stderr
    assert f"{out} was not written" in stderr
    assert out.read_bytes() == OLD_BYTES and _parts(tmp_path) == []


def test_a_signalled_live_recording_leaves_the_existing_file_untouched(daemon, tmp_path):
    out = _existing(tmp_path / "live.mp4")
    wav = _write_wav(tmp_path / "in.wav", 20.0)
    cli = _start("live", str(wav), "-o", str(out), "--endpoint", daemon.endpoint)
    _wait_for_part(tmp_path, cli)
    cli.send_signal(signal.SIGTERM)
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 128 + signal.SIGTERM, stderr
    assert f"interrupted by SIGTERM: {out} was not written" in stderr, stderr
    assert "Traceback" not in stderr
    assert out.read_bytes() == OLD_BYTES and _parts(tmp_path) == []


def test_the_daemon_sigkilled_mid_render_leaves_the_existing_file_untouched(tmp_path):
    (tmp_path / "d").mkdir()
    d = PrivateDaemon(
        tmp_path / "d",
        {
            "daemon": {"workers": 1, "min_ready": 1, "devices": "cpu"},
            "timeouts": FAST_TIMEOUTS,
            "restart": FAST_RESTART,
            "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
            "engines.options.fake": FAKE,
        },
    )
    pids = [d.proc.pid]
    try:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] == 1, 60, "a ready worker")
        pids += d.worker_pids()
        out = _existing(tmp_path / "out.mp4")
        cli = _start("render", LONG_TEXT, "-o", str(out), "--endpoint", d.endpoint)
        _wait_for_part(tmp_path, cli)
        os.kill(d.proc.pid, signal.SIGKILL)
        _, stderr = cli.communicate(timeout=60)
        assert cli.returncode == 1, stderr
        assert f"{out} was not written (the file already there is unchanged)" in stderr
        assert "Traceback" not in stderr
        assert out.read_bytes() == OLD_BYTES and _parts(tmp_path) == []
    finally:
        reap_killed_daemon(d, pids)


def test_the_writer_renames_only_a_finished_file(tmp_path):
    # The writer itself: an aborted write and a write that fails on close leave the target.
    out = _existing(tmp_path / "w.mp4")
    writer = Mp4Writer(out, fps=25, width=16, height=16, audio_rate=16000)
    for _ in range(60):  # enough for the encoder to have written to its file
        writer.write_frame(np.zeros((16, 16, 3), np.uint8))
    assert out.read_bytes() == OLD_BYTES and len(_parts(tmp_path)) == 1
    writer.abort()
    assert out.read_bytes() == OLD_BYTES and _parts(tmp_path) == []
    with pytest.raises(RuntimeError, match="nothing was written"):
        Mp4Writer(out, fps=25, width=16, height=16, audio_rate=16000).close()
    assert out.read_bytes() == OLD_BYTES and _parts(tmp_path) == []
    with Mp4Writer(out, fps=25, width=16, height=16, audio_rate=16000) as writer:
        writer.write_frame(np.zeros((16, 16, 3), np.uint8))
        writer.write_audio(np.zeros(640, np.float32))
    assert read_mp4(out).frame_count >= 1 and _parts(tmp_path) == []


def test_a_symlinked_output_is_written_through_the_link(tmp_path):
    real = _existing(tmp_path / "real.mp4")
    link = tmp_path / "link.mp4"
    link.symlink_to(real)
    with Mp4Writer(link, fps=25, width=16, height=16, audio_rate=16000) as writer:
        writer.write_frame(np.zeros((16, 16, 3), np.uint8))
    assert link.is_symlink() and read_mp4(real).frame_count >= 1
    assert _parts(tmp_path) == []
