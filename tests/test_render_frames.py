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
