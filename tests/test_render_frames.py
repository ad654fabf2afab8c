"""What `avatard render` and `lipsync` report is what the mp4 holds (issue 16, item 12).

The writer pads the audio to a whole AAC frame and repeats the last video frame to cover
it, so the file can hold a few frames more than the job sent; the CLI must print the
file's count, and the two tracks must end within one frame of each other. Checked by
decoding the written file with PyAV."""

from __future__ import annotations

import io
import re
import subprocess

import numpy as np
import pytest
from daemon_harness import AVATARD, run_daemon

from avatard.daemon.render import Progress, write_job_mp4
from avatard.engines.mux import read_mp4
from avatard.ipc.client import AudioEvent, DoneEvent, FrameEvent

FPS = 25


def _job_events(frames: int, audio_samples: int, rate: int):
    """A job's events as the client yields them: audio chunks, frames, then done."""
    pcm = (0.1 * np.sin(np.arange(audio_samples) * 0.05)).astype(np.float32)
    step = rate // 5
    for index, start in enumerate(range(0, audio_samples, step)):
        yield AudioEvent("job", index, 0, rate, pcm[start : start + step])
    for index in range(frames):
        yield FrameEvent("job", index, 0, np.full((32, 48, 3), index % 255, np.uint8))
    yield DoneEvent("job", frames, frames / FPS, 1.0, 0.1, 1, audio_samples)


# Job lengths whose audio does not end on an AAC frame (1024 samples), so the writer must
# repeat frames: e.g. 26 frames = 1.04 s of 16 kHz audio ends inside AAC frame 17.
@pytest.mark.parametrize(
    "frames, rate", [(26, 16000), (1, 16000), (91, 22050), (50, 44100), (40, 37800)]
)
def test_result_counts_the_frames_the_file_holds(tmp_path, frames, rate):
    out = tmp_path / "job.mp4"
    samples = round(frames / FPS * rate)
    result = write_job_mp4(_job_events(frames, samples, rate), out, FPS,
                           Progress(io.StringIO(), "test"))
    info = read_mp4(out)
    assert result.frames == info.frame_count
    assert result.frames >= frames  # nothing the job sent is dropped
    assert result.media_s == pytest.approx(info.video_duration_s, abs=1e-6)
    assert abs(info.audio_duration_s - info.video_duration_s) <= 1 / FPS


def test_cli_prints_the_frame_count_of_the_written_file(tmp_path):
    # Three fake words: 3 * 0.3 s + 0.15 s = 1.05 s of 16 kHz audio, 26 job frames; the
    # audio padded to 17 AAC frames (1.088 s) needs a 27th frame.
    out = tmp_path / "fake.mp4"
    with run_daemon(tmp_path) as daemon:
        result = subprocess.run(
            [AVATARD, "render", "one two three.", "-o", str(out), "--endpoint",
             daemon.endpoint], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = re.search(r"(\d+) frames, ([\d.]+) s of video", result.stdout)
    assert printed, result.stdout
    info = read_mp4(out)
    assert int(printed.group(1)) == info.frame_count == 27
    assert float(printed.group(2)) == pytest.approx(info.video_duration_s, abs=0.01)
    assert abs(info.audio_duration_s - info.video_duration_s) <= 1 / FPS


def test_the_job_writer_encodes_each_frame_as_it_comes_and_keeps_none(tmp_path):
    """`JobMp4` (the writer of `avatard render` and of the cluster's mp4 responses) must
    hold memory independent of the job's length: each frame is encoded when fed, and no
    attribute of it or of its `Mp4Writer` grows with the frames fed (checked on their
    structure, not on RSS). The file holds every frame, at FPS, audio as long as video."""
    from avatard.daemon.render import JobMp4

    frames, rate = 120, 16000
    out = tmp_path / "job.mp4"
    mp4 = JobMp4(out, FPS)
    pcm = (0.1 * np.sin(np.arange(rate // FPS) * 0.05)).astype(np.float32)
    for index in range(frames):
        # Interleaved as a speak job sends them: one frame's audio, then the frame.
        mp4.feed(AudioEvent("job", index, 0, rate, pcm))
        mp4.feed(FrameEvent("job", index, 0, np.full((32, 48, 3), index % 255, np.uint8)))
        assert mp4.writer is not None and mp4.writer.frames_written == index + 1
        assert mp4.frames == index + 1
        for holder in (mp4, mp4.writer):
            for name, value in vars(holder).items():
                if isinstance(value, (list, tuple, dict, set)):
                    assert len(value) <= 1, (name, len(value))
    assert not out.exists()  # renamed onto `out` only when finished
    mp4.feed(DoneEvent("job", frames, frames / FPS, 1.0, 0.1, 1, frames * len(pcm)))
    result = mp4.finish()
    info = read_mp4(out)
    assert info.frame_count == result.frames
    assert frames <= result.frames <= frames + 3  # the writer repeats the last 0-3 times
    assert info.video_duration_s == pytest.approx(result.frames / FPS)
    assert abs(info.audio_duration_s - info.video_duration_s) <= 1 / FPS


def test_the_job_writer_refuses_a_job_without_frames_and_leaves_no_file(tmp_path):
    from avatard.daemon.render import JobMp4
    from avatard.ipc.client import ClientError

    out = tmp_path / "job.mp4"
    mp4 = JobMp4(out, FPS)
    mp4.feed(AudioEvent("job", 0, 0, 16000, np.zeros(1600, np.float32)))
    mp4.feed(DoneEvent("job", 0, 0.0, 1.0, 0.1, 1, 1600))
    with pytest.raises(ClientError, match="no frames"):
        mp4.finish()
    assert list(tmp_path.iterdir()) == []
