"""`avatard live` end to end with the fake engines: a WAV file played into a live session
at realtime pace (with and without a barge-in), a text file streamed as tokens, bad input
and a daemon that vanishes mid-session; the mp4 holds every frame that came out.

No timing assertions: the figures must be there, their values depend on the machine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import wave

import numpy as np
import pytest
from daemon_harness import AVATARD, FAST_RESTART, FAST_TIMEOUTS, reap_killed_daemon, run_daemon

from avatard.daemon import PrivateDaemon
from avatard.engines.mux import plan_padding, read_mp4

pytest.importorskip("av")

SIZE = 64  # even: H.264 wants even frame sizes
FAKE = {"width": SIZE, "height": SIZE}
FPS, RATE = 25, 16000  # the fake avatar engine's
AAC_FRAME_S = 1024 / RATE  # the mp4's audio packets: the video is padded to cover the last


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with run_daemon(tmp_path_factory.mktemp("live-cli"), fake=FAKE) as d:
        yield d


def _live(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([AVATARD, "live", *args], capture_output=True, text=True,
                          timeout=timeout)


def _write_wav(path, seconds: float, rate: int = 44100, channels: int = 2) -> None:
    t = np.arange(int(rate * seconds)) / rate
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0) + 0.05
    pcm = np.stack([voice * (1.0 - 0.3 * c) for c in range(channels)], axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())


def _check_mp4(path, frames_received: int) -> None:
    """The mp4 holds the frames received, plus the repeats of the last one that make its
    video cover the audio's last AAC packet; audio and video agree within a frame."""
    info = read_mp4(path)
    audio_s = frames_received / FPS  # one chunk of rate / fps samples per frame
    assert info.frame_count == plan_padding(frames_received, audio_s, FPS, AAC_FRAME_S)[0]
    assert frames_received <= info.frame_count <= frames_received + 3
    assert abs(info.audio_duration_s - info.frame_count / FPS) <= 1 / FPS


def test_a_wav_plays_in_a_live_session_and_the_mp4_holds_what_came_out(daemon, tmp_path):
    _write_wav(tmp_path / "in.wav", 1.5)  # 44.1 kHz stereo: the daemon converts it
    out = tmp_path / "out.mp4"
    result = _live(str(tmp_path / "in.wav"), "-o", str(out), "--endpoint", daemon.endpoint,
                   "--tail", "0.4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["frames_received"] == report["frames_sent"] > 0
    assert report["frames_received"] + report["frames_dropped"] >= round((1.5 + 0.4) * FPS)
    assert (report["fps"], report["width"], report["height"], report["audio_rate"]) == (
        FPS, SIZE, SIZE, RATE)
    _check_mp4(out, report["frames_received"])
    assert read_mp4(out).frame_count == report["frames_in_mp4"]
    assert report["first_frame_s"] > 0
    # One figure per 100 ms chunk whose first sample was found in the session's audio.
    assert 0 < len(report["audio_to_frame_s"]) <= 15
    assert all(value > 0 for value in report["audio_to_frame_s"])
    assert report["interrupt_at_s"] is None and report["text_to_speech_s"] is None


def test_a_barge_in_is_measured_and_the_speech_stops(daemon, tmp_path):
    _write_wav(tmp_path / "in.wav", 3.0, rate=22050, channels=1)
    out = tmp_path / "out.mp4"
    result = _live(str(tmp_path / "in.wav"), "-o", str(out), "--endpoint", daemon.endpoint,
                   "--interrupt-at", "0.8", "--tail", "0.4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout
    for figure in ("first frame after open: ", "audio-to-frame latency: median ",
                   "barge-in at 0.8", "playback_finished after ", "first silent frame after ",
                   " dropped, ", " late "):
        assert figure in lines, lines
    sent, received = map(int, re.search(r"frames: (\d+) sent, (\d+) received", lines).groups())
    assert sent == received
    _check_mp4(out, received)
    # The headline gives what the file holds (it was the frames received, one or more
    # short of the file when the video was padded to cover the audio's last packet).
    info = read_mp4(out)
    headline = re.search(rf"wrote {re.escape(str(out))}: (\d+) frames \(([0-9.]+) s of video\)",
                         lines)
    assert headline, lines
    assert int(headline.group(1)) == info.frame_count
    assert float(headline.group(2)) == pytest.approx(info.video_duration_s, abs=0.005)
    padding = info.frame_count - received
    if padding:
        assert f"the {received} that came out of live session" in lines
        assert f"plus {padding} repeat" in lines
    # The speech stopped at the barge-in: the session lasted less than the file.
    assert received < (3.0 + 0.4) * FPS


def test_a_text_file_streams_as_tokens_through_a_private_daemon(tmp_path):
    (tmp_path / "reply.txt").write_text("Hello there. I am a portrait that speaks what a "
                                        "model writes, a few words at a time.\n")
    out = tmp_path / "out.mp4"
    result = _live("--text-stream", str(tmp_path / "reply.txt"), "-o", str(out),
                   "--endpoint", f"ipc://{tmp_path}/nobody.sock", "--engine", "fake",
                   "--set", "engines.tts=fake", "--set", "engines.asr=fake",
                   "--set", f"engines.options.fake.width={SIZE}",
                   "--set", f"engines.options.fake.height={SIZE}",
                   "--tail", "0.2", "--json")
    assert result.returncode == 0, result.stderr
    assert "starting a private one" in result.stderr
    report = json.loads(result.stdout)
    assert report["text_to_speech_s"] > 0 and not report["audio_to_frame_s"]
    assert report["frames_received"] == report["frames_sent"]
    _check_mp4(out, report["frames_received"])


@pytest.mark.parametrize(("args", "code", "words"), [
    (["{tmp}/missing.wav"], 2, "does not exist"),
    (["{tmp}/bad.wav"], 1, "bad audio file"),
    (["{tmp}/in.wav", "--text-stream", "{tmp}/in.wav"], 2, "one of them"),
    ([], 2, "one of them"),
    (["--text-stream", "{tmp}/empty.txt"], 1, "holds no words"),
    (["{tmp}/in.wav", "-o", "/nonexistent-dir/x.mp4"], 1, "does not exist"),
    (["{tmp}/in.wav", "--avatar", "no-such-portrait"], 1, "not_found: avatar_id"),
    # in.wav is 0.3 s long: a barge-in after its end would interrupt nothing.
    (["{tmp}/in.wav", "--interrupt-at", "5"], 1,
     "--interrupt-at 5 s is past the end of the audio: {tmp}/in.wav is 0.30 s long"),
])
def test_bad_input_is_a_clear_error(daemon, tmp_path, args, code, words):
    _write_wav(tmp_path / "in.wav", 0.3)
    (tmp_path / "bad.wav").write_text("not audio")
    (tmp_path / "empty.txt").write_text("  \n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "x.mp4")]
    result = _live(*args, "--endpoint", daemon.endpoint)
    assert result.returncode == code, result.stdout
    assert words.replace("{tmp}", str(tmp_path)) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_a_daemon_gone_mid_session_is_a_clear_error(tmp_path):
    _write_wav(tmp_path / "in.wav", 30.0, channels=1)
    (tmp_path / "d").mkdir()
    d = PrivateDaemon(tmp_path / "d", {
        "daemon": {"workers": 1, "min_ready": 1, "devices": "cpu"},
        "timeouts": FAST_TIMEOUTS, "restart": FAST_RESTART,
        "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
        "engines.options.fake": FAKE,
    })
    pids = [d.proc.pid]
    try:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] == 1, 60, "a ready worker")
        pids += d.worker_pids()
        cli = subprocess.Popen([AVATARD, "live", str(tmp_path / "in.wav"), "-o",
                                str(tmp_path / "x.mp4"), "--endpoint", d.endpoint,
                                "--timeout", "600"],  # only the dropped connection ends it
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        d.wait_for(lambda s: s["queue"]["running"] == 1, 60, "the CLI's live session")
        os.kill(d.proc.pid, signal.SIGKILL)
        stdout, stderr = cli.communicate(timeout=60)
        assert cli.returncode == 1, stdout
        assert "closed the connection" in stderr and "exited or restarted" in stderr
        assert "Traceback" not in stderr
        assert not (tmp_path / "x.mp4").exists()
    finally:
        reap_killed_daemon(d, pids)


@pytest.mark.parametrize("command", [["live", "{tmp}/in.wav"], ["render", "Hi."],
                                     ["lipsync", "{tmp}/in.wav"]])
@pytest.mark.parametrize("avatar", ["nosuch.jpg", "{tmp}/nosuch", "{tmp}"])
def test_an_avatar_file_that_is_not_there_is_named_as_such(tmp_path, command, avatar):
    # A value that names a file (a path separator or an image suffix) is not taken for
    # the id of a registered portrait: the usage error says the file is not there, in
    # every command, before any daemon is asked.
    _write_wav(tmp_path / "in.wav", 0.3)
    args = [a.replace("{tmp}", str(tmp_path)) for a in [*command, "--avatar", avatar]]
    result = subprocess.run([AVATARD, *args, "-o", str(tmp_path / "x.mp4"),
                             "--endpoint", f"ipc://{tmp_path}/no-daemon.sock"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    why = "is not a file" if avatar == "{tmp}" else "does not exist"
    assert f"image file '{avatar.replace('{tmp}', str(tmp_path))}' {why}" in result.stderr
    assert "not registered" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.mp4").exists()
