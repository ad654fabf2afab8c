"""Live sessions through a real daemon (fake engines) under input that once hurt them: huge
chunks at another rate, refused requests that named an input slot, text past a voice's
limit, segments the TTS cannot speak, sessions that end while a segment plays.

No timing assertions: the daemon's stall watchdog (`timeouts.stall_timeout_s`, 3 s here)
is what fails a session whose clock thread stops; the tests assert on events and counts."""

from __future__ import annotations

import numpy as np
from daemon_harness import run_daemon
from test_live import FAKE, RATE, RINGS, TICK, Recorder, assert_continuous, segment_is

from avatard.ipc.client import (
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
    SessionMovedEvent,
)


def test_a_huge_chunk_at_another_rate_never_stops_the_clock(tmp_path):
    # 200 s at 8 kHz in one 6.4 MB chunk: resampled all at once it kept the session's
    # clock thread busy for seconds (the stall watchdog then killed the worker).
    rate = 8000
    speech = (np.sin(np.arange(rate * 200) * 0.05) * 0.3).astype(np.float32)
    with (run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c):
        rec = Recorder(c.live(seed=3), seed=3)
        rec.frames_more(3)
        rec.session.send_audio(speech, rate, "long")
        rec.session.end_segment("long")
        started = rec.until(segment_is(PlaybackStartedEvent, "long"))
        rec.frames_more(100)
        rec.session.interrupt()
        finished = rec.until(segment_is(PlaybackFinishedEvent, "long"))
        done = rec.close()
    assert_continuous(rec, silenced_from=rec.position(finished))
    assert not rec.of(SessionMovedEvent) and done.attempts == 1
    first = rec.position(started)
    # Speech in every frame from its first until the barge-in.
    assert all(rec.audio[i].any() for i in range(first, first + 90))
    assert finished.interrupted and 90 * TICK / RATE <= finished.position_s < 200
