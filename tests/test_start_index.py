"""`speak` / `lipsync` with `start_index`: a retried request resumes at a frame index.

The cluster's ingress resends a job whose node died with the same seed and the next frame
index it needs; the daemon must send exactly the frames from that index on, identical to
the ones the first attempt would have sent, and refuse a start without a fixed seed."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_harness import run_daemon

from avatard.engines.fake import expected_frame
from avatard.ipc.client import AudioEvent, ClientError, DoneEvent, FrameEvent

SEED = 4242
TEXT = "One two three four. Five six seven."


def _events(client, **kwargs):
    frames: dict[int, np.ndarray] = {}
    audio: list[int] = []
    done = None
    for event in client.speak(TEXT, seed=SEED, **kwargs):
        if isinstance(event, FrameEvent):
            frames[event.index] = event.array.copy()
        elif isinstance(event, AudioEvent):
            audio.append(event.index)
        elif isinstance(event, DoneEvent):
            done = event
    return frames, audio, done


def test_a_job_started_at_an_index_sends_the_rest_and_only_the_rest(tmp_path):
    with run_daemon(tmp_path) as d, d.client(inline=True) as client:
        whole, whole_audio, whole_done = _events(client)
        count = whole_done.frames
        assert sorted(whole) == list(range(count)) and count > 10
        start = count // 2
        rest, rest_audio, rest_done = _events(
            client, start_index=start, audio_start_index=len(whole_audio) - 1
        )
        assert sorted(rest) == list(range(start, count))
        assert rest_audio == [len(whole_audio) - 1]
        assert rest_done.frames == count  # the job's length, not what was sent
        height, width = whole[0].shape[:2]
        for index, frame in rest.items():
            np.testing.assert_array_equal(frame, whole[index])
            np.testing.assert_array_equal(frame, expected_frame(SEED, index, height, width))
        # Past the end: the job ends with nothing to send.
        empty, _, empty_done = _events(client, start_index=count + 5)
        assert empty == {} and empty_done.frames == count


def test_a_start_without_a_seed_is_refused_naming_the_field(tmp_path):
    with run_daemon(tmp_path) as d, d.client(inline=True) as client:
        with pytest.raises(ClientError) as refused:
            client.speak(TEXT, seed=0, start_index=3)
        assert refused.value.code == "bad_message"
        assert refused.value.field == "start_index"
        pcm = np.zeros(16000, np.float32)
        with pytest.raises(ClientError) as refused:
            client.lipsync(pcm, 16000, seed=0, start_index=1)
        assert refused.value.field == "start_index"
        # A lipsync with a seed resumes like speak.
        frames = [
            e.index
            for e in client.lipsync(pcm, 16000, seed=SEED, start_index=20)
            if isinstance(e, FrameEvent)
        ]
        assert frames == list(range(20, 25))
