"""Live sessions through a real daemon (fake engines unless said): paced frames that never
stop, speech in segments, barge-in, streamed text, slow and vanished clients, bad input.

No timing assertions: counts, order and contents only. The sessions run on the worker's
clock, so every wait below is for a number of frames (bounded by the client's timeout)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from daemon_harness import AVATARD, run_daemon

from avatard.daemon.config import load_config
from avatard.daemon.live_worker import render_ahead_frames
from avatard.engines.audio import resample
from avatard.engines.fake import (
    FakeTTSEngine,
    audio_level,
    expected_frame,
    frame_audio_level_of,
)
from avatard.ipc import protocol as P
from avatard.ipc.client import (
    AudioEvent,
    ClientError,
    DoneEvent,
    FrameEvent,
    InputRefusedEvent,
    JobFailedError,
    LiveSession,
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
    SessionMovedEvent,
)

SIZE = 32
FAKE = {"width": SIZE, "height": SIZE}
RATE, FPS, TICK = 16000, 25, 640  # the fake avatar engine's audio rate and fps
DEFAULT_AHEAD = load_config(None).daemon.live_render_ahead_frames
# Small frame slots, many of them: a reading client on a busy machine never loses a frame
# (64 frames of slack), and a session's rings stay small in /dev/shm.
RINGS = {"rings": {"frame_slots": 64, "frame_slot_bytes": 4096, "audio_slots": 64,
                   "audio_slot_bytes": 32768}}


class Recorder:
    """Reads a live session's events, copying what it keeps (slots go back as it reads)."""

    def __init__(self, session: LiveSession, seed: int | None = None):
        self.session = session
        self.seed = seed
        self.events: list = []  # frames as their index, audio as (index, pcm copy), others
        self.frames: list[int] = []
        self.audio: dict[int, np.ndarray] = {}
        self.levels: dict[int, int] = {}  # the audio level each live fake frame shows
        # Frames made from speech that went out silent: rendered before a barge-in and
        # sent after it (at most an engine's burst less one).
        self.silenced: list[int] = []
        # A fake stream numbers its frames from 0: after a move, from the resume index.
        self.stream_start = 0
        self.done: DoneEvent | None = None

    def next(self):
        return self.take(next(self.session))

    def take(self, event):
        """Record and check one event (shared with the asyncio client's tests)."""
        if isinstance(event, FrameEvent):
            if self.seed is not None:
                # A live fake frame shows the level of the audio it was made from: it
                # must be the level of the audio chunk sent with it (checked in `audio`).
                level = self.levels[event.index] = frame_audio_level_of(event.array)
                np.testing.assert_array_equal(
                    event.array, expected_frame(self.seed, event.index - self.stream_start,
                                                SIZE, SIZE, level),
                    err_msg=f"frame {event.index}")
            self.frames.append(event.index)
            self.events.append(("frame", event.index))
        elif isinstance(event, AudioEvent):
            assert event.sample_rate == RATE
            self.audio[event.index] = np.array(event.pcm)
            if event.index in self.levels:
                sent, shown = audio_level(self.audio[event.index]), self.levels[event.index]
                if sent == 0 and shown > 0:
                    self.silenced.append(event.index)
                else:
                    assert sent == shown, (f"frame {event.index} was not made from the audio "
                                           "sent with it")
            self.events.append(("audio", event.index))
        else:
            self.events.append(event)
            if isinstance(event, SessionMovedEvent):
                self.stream_start = event.resume_index
            if isinstance(event, DoneEvent):
                self.done = event
        return event

    def frames_more(self, count: int) -> None:
        target = len(self.frames) + count
        while len(self.frames) < target:
            self.next()

    def until(self, predicate) -> object:
        while True:
            event = self.next()
            if predicate(event):
                return event

    def close(self) -> DoneEvent:
        self.session.close()
        self.until(lambda e: isinstance(e, DoneEvent))
        assert self.done is not None
        return self.done

    def of(self, cls) -> list:
        return [e for e in self.events if isinstance(e, cls)]

    def pcm(self) -> np.ndarray:
        """The session's audio as played: every chunk in frame order."""
        return np.concatenate([self.audio[i] for i in sorted(self.audio)])

    def position(self, event) -> int:
        """Events before `event` that are frames: the frame index it precedes."""
        return sum(1 for e in self.events[:self.events.index(event)]
                   if isinstance(e, tuple) and e[0] == "frame")


def segment_is(cls, segment_id):
    return lambda e: isinstance(e, cls) and e.segment_id == segment_id


def send_in_chunks(session: LiveSession, pcm: np.ndarray, rate: int, segment_id: str,
                   chunk_s: float = 0.1) -> None:
    step = int(rate * chunk_s)
    for start in range(0, pcm.size, step):
        session.send_audio(pcm[start:start + step], rate, segment_id)


def assert_continuous(rec: Recorder, silenced_from: int | None = None, burst: int = 1
                      ) -> None:
    """Every frame in order with its audio chunk; frames made from speech went out silent
    only after a barge-in (the first frame after it: `silenced_from`): those rendered
    ahead of the clock (the default for `burst`) or in one burst with them."""
    assert rec.frames == list(range(len(rec.frames))), "every frame, in order, none lost"
    if silenced_from is None:
        assert not rec.silenced, "frames made from speech went out silent"
    else:
        ahead = render_ahead_frames(DEFAULT_AHEAD, burst)
        # (+ 1: the frame being rendered when the barge-in came, sent after it)
        assert all(silenced_from <= i < silenced_from + ahead + burst
                   for i in rec.silenced), (rec.silenced, silenced_from)
    assert sorted(rec.audio) == rec.frames, "one audio chunk per frame, same index"
    assert all(rec.audio[i].size == TICK for i in rec.frames)


# The fake engine as it is (frames leave with their own audio) and standing in for Ditto's
# online scheme (look-ahead 21 frames, frames in bursts of 10): the session's clock must
# send one frame per tick, each with the audio it was made from, either way.
ENGINES = pytest.mark.parametrize("engine", [{}, {"lookahead_frames": 21, "burst_frames": 10}],
                                  ids=["no-lookahead", "lookahead21-burst10"])


@ENGINES
@pytest.mark.parametrize("inline", [False, True], ids=["shm", "inline"])
def test_two_segments_and_a_pause_frames_never_stop(tmp_path, inline, engine):
    first = np.full(RATE // 2, 0.25, np.float32)  # 0.5 s at 16 kHz, 100 ms chunks
    second = (np.sin(np.arange(int(48000 * 0.3)) / 9.0) * 0.5).astype(np.float32)  # 48 kHz
    with (run_daemon(tmp_path, fake=FAKE | engine, sections=RINGS) as d,
          d.client(inline=inline) as c):
        rec = Recorder(c.live(seed=5), seed=5)
        session = rec.session
        assert (session.fps, session.width, session.height, session.audio_rate) == (
            FPS, SIZE, SIZE, RATE)
        rec.frames_more(5)  # idle: frames come before any speech
        send_in_chunks(rec.session, first, RATE, "a")
        rec.session.end_segment("a")
        finished_a = rec.until(segment_is(PlaybackFinishedEvent, "a"))
        pause_from = len(rec.frames)
        rec.frames_more(12)  # the pause
        send_in_chunks(rec.session, second, 48000, "b")
        rec.session.end_segment("b")
        finished_b = rec.until(segment_is(PlaybackFinishedEvent, "b"))
        rec.frames_more(3)
        done = rec.close()

    assert_continuous(rec)
    assert done.frames == len(rec.frames) and done.frames_dropped == 0
    assert done.audio_samples == done.frames * TICK
    started_a, started_b = rec.of(PlaybackStartedEvent)
    assert [started_a.segment_id, started_b.segment_id] == ["a", "b"]
    order = [rec.events.index(e) for e in (started_a, finished_a, started_b, finished_b)]
    assert order == sorted(order)
    assert (finished_a.position_s, finished_a.interrupted) == (0.5, False)
    assert (finished_b.position_s, finished_b.interrupted) == (0.3, False)

    pcm = rec.pcm()
    a_at = rec.position(started_a) * TICK  # "a" starts in the frame after its event
    assert rec.audio[rec.position(started_a)].any() and not pcm[:a_at].any()
    # "a" plays exactly as sent, then silence through the pause until "b".
    a_end = a_at + first.size
    np.testing.assert_array_equal(pcm[a_at:a_end], first)
    b_at = rec.position(started_b) * TICK
    assert rec.position(started_b) >= pause_from + 12 and not pcm[a_end:b_at].any()
    expected_b = resample(second, 48000, RATE)
    np.testing.assert_array_equal(pcm[b_at:b_at + expected_b.size], expected_b)
    assert not pcm[b_at + expected_b.size:].any()


@ENGINES
def test_interrupt_mid_segment_finishes_it_and_the_avatar_goes_idle(tmp_path, engine):
    speech = np.full(RATE * 2, 0.5, np.float32)  # 2 s, more than is read before the barge-in
    with run_daemon(tmp_path, fake=FAKE | engine, sections=RINGS) as d, d.client() as c:
        rec = Recorder(c.live(seed=6), seed=6)
        rec.session.send_audio(speech, RATE, "a")
        rec.session.end_segment("a")
        rec.until(segment_is(PlaybackStartedEvent, "a"))
        rec.frames_more(10)
        heard_s = sum(rec.audio[i].astype(bool).sum() for i in rec.audio) / RATE
        rec.session.interrupt()
        finished = rec.until(segment_is(PlaybackFinishedEvent, "a"))
        after = len(rec.frames)
        rec.frames_more(25)  # frames go on, silent
        late = rec.session.send_audio(speech[:TICK], RATE, "a")  # "a" was interrupted
        refused = rec.until(lambda e: isinstance(e, InputRefusedEvent))
        rec.session.send_audio(speech[:RATE // 5], RATE, "b")
        rec.session.end_segment("b")
        finished_b = rec.until(segment_is(PlaybackFinishedEvent, "b"))
        done = rec.close()

    # Frames the engine had made from the speech but not sent yet go out silent; every
    # frame after them is made from silence (its level is 0, as its audio is).
    assert_continuous(rec, silenced_from=after, burst=engine.get("burst_frames", 1))
    burst = engine.get("burst_frames", 1)
    ahead = render_ahead_frames(DEFAULT_AHEAD, burst)
    assert not any(rec.levels[i] for i in range(after + ahead + burst, after + 25))
    assert finished.interrupted
    # At least what the client heard before it barged in, less than the whole segment.
    assert heard_s <= finished.position_s < 2.0
    assert round(finished.position_s * RATE) == sum(rec.audio[i].astype(bool).sum()
                                                    for i in rec.audio if i < after)
    assert not any(rec.audio[i].any() for i in range(after, after + 15))
    assert (refused.req_id, refused.code, refused.field) == (late, P.E_BAD_INPUT,
                                                             "segment_id")
    assert "ended by live_end" in refused.rule  # its first end is what it says
    assert (finished_b.position_s, finished_b.interrupted) == (0.2, False)
    assert done.frames == len(rec.frames)


def test_poll_waits_for_an_event_and_loses_none(tmp_path):
    speech = np.full(TICK * 6, 0.25, np.float32)
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c:
        rec = Recorder(c.live(seed=4), seed=4)
        # Sends between polls, as a voice agent keeping its own schedule does: every
        # event still comes once, in order, and poll says so before next() is called.
        for start in range(0, speech.size, TICK):
            rec.session.send_audio(speech[start:start + TICK], RATE, "a")
            assert rec.session.poll(c.timeout_s)
            rec.next()
        rec.session.end_segment("a")
        while not any(isinstance(e, PlaybackFinishedEvent) for e in rec.events):
            assert rec.session.poll(c.timeout_s)
            rec.next()
        done = rec.close()

    assert_continuous(rec)
    assert done.frames == len(rec.frames)
    np.testing.assert_array_equal(rec.pcm()[rec.pcm() != 0], speech)


def test_input_sent_while_the_session_waits_for_a_worker_plays_once_it_starts(tmp_path):
    speech = np.full(TICK * 4, 0.25, np.float32)
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c:
        first = Recorder(c.live(seed=1), seed=1)  # the one worker's one place
        first.frames_more(2)
        waiting = Recorder(c.live(seed=2), seed=2)
        assert waiting.session.queue_position == 0  # first in line, behind the running one
        waiting.session.send_audio(speech, RATE, "held")
        waiting.session.end_segment("held")
        first.frames_more(2)
        first.close()
        finished = waiting.until(segment_is(PlaybackFinishedEvent, "held"))
        done = waiting.close()

    assert_continuous(waiting)
    assert (finished.position_s, finished.interrupted) == (speech.size / RATE, False)
    assert done.frames == len(waiting.frames)


def test_a_session_closed_while_it_waits_for_a_worker_ends_at_once(tmp_path):
    # Closed before a worker took it: done at once with no frames, out of the queue (not
    # run once the worker frees up only to close); the running session goes on untouched.
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c:
        first = Recorder(c.live(seed=1), seed=1)  # the one worker's one place
        first.frames_more(2)
        waiting = Recorder(c.live(seed=2), seed=2)
        assert waiting.session.queue_position == 0
        waiting.session.send_audio(np.full(TICK * 2, 0.25, np.float32), RATE, "held")
        done = waiting.close()
        assert (done.frames, done.media_s) == (0, 0.0) and waiting.frames == []
        status = d.status()
        assert status["queue"]["depth"] == 0 and status["queue"]["running"] == 1
        first.frames_more(3)  # still served
        first.close()


def test_streamed_text_is_spoken_by_the_session_tts(tmp_path):
    tts = FakeTTSEngine()
    spoken = [tts.synthesize(text)[0] for text in ("Hello there.", "How are you")]
    expected = np.concatenate(spoken)
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c:
        rec = Recorder(c.live(seed=7), seed=7)
        for fragment in ("Hel", "lo there", ".", " How are", " you"):
            rec.session.send_text(fragment, "t")
        rec.session.send_text("", "t", final=True)
        started = rec.until(segment_is(PlaybackStartedEvent, "t"))
        finished = rec.until(segment_is(PlaybackFinishedEvent, "t"))
        done = rec.close()

    assert_continuous(rec)
    assert (finished.position_s, finished.interrupted) == (expected.size / RATE, False)
    start, end = rec.position(started), rec.position(finished)
    played = np.concatenate([rec.audio[i] for i in range(start, end)])
    # Exactly the TTS's audio, in order (a sentence synthesized late would only add
    # silence between them, so the comparison leaves silence out).
    np.testing.assert_array_equal(played[played != 0], expected[expected != 0])
    assert done.frames == len(rec.frames)


def test_a_client_that_stops_reading_loses_frames_and_another_session_does_not(tmp_path):
    import socket
    import urllib.request

    pytest.importorskip("prometheus_client")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # 48 slots: 1.9 s of slack for the steady client, whose reads a busy machine may
    # hold back while the slow one catches up.
    slots = 48
    rings = {"rings": {"frame_slots": slots, "frame_slot_bytes": 4096}}
    with run_daemon(tmp_path, fake=FAKE, sections=rings,
                    daemon={"jobs_per_worker": 2, "metrics_port": port}) as d, \
            d.client() as a, d.client() as b:
        slow, steady = Recorder(a.live(seed=1), seed=1), Recorder(b.live(seed=2), seed=2)
        # Both sessions run on the one worker, on clocks started together: while the steady
        # client reads 80 frames, the slow one reads none and its slots fill up. Then it
        # reads them and a few new ones (quickly: the steady client's slots are slack
        # enough meanwhile), which come after a gap.
        steady.frames_more(80)
        assert len(d.status()["workers"][0]["current_jobs"]) == 2
        # While the slow client reads nothing its session drops frames, and stats say so
        # now (no later frame has gone out to show the gap yet).
        stalled = d.wait_for(
            lambda s: {e["job_id"]: e["frames_dropped"] for e in s["live_sessions"]}.get(
                slow.session.job_id, 0) > 0, 30, "stats to show the slow session's drops")
        assert all(e["late_frames"] >= 0 for e in stalled["live_sessions"])
        shown = subprocess.run([AVATARD, "status", "--endpoint", d.endpoint],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert f"live {slow.session.job_id} on worker 0: frame " in shown.stdout
        slow.frames_more(slots + 4)
        steady.frames_more(10)
        # Each session's own figures in stats, while they run (the daemon may have sent
        # frames the clients have not read yet: at least what they read).
        live = {s["job_id"]: s for s in d.status()["live_sessions"]}
        assert set(live) == {slow.session.job_id, steady.session.job_id}
        slow_now, steady_now = live[slow.session.job_id], live[steady.session.job_id]
        assert slow_now["worker"] == steady_now["worker"] == 0
        assert slow_now["frames_dropped"] >= slow.frames[-1] + 1 - len(slow.frames) > 0
        assert slow_now["frames_sent"] >= len(slow.frames)
        assert steady_now["frames_dropped"] == steady_now["frames_lost"] == 0
        slow_done, steady_done = slow.close(), steady.close()
        status = d.status()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()

    assert_continuous(steady)
    assert steady_done.frames_dropped == 0 and steady_done.frames == len(steady.frames)
    assert slow_done.frames_dropped > 0 and slow_done.frames == len(slow.frames)
    assert slow.frames == sorted(slow.frames) and sorted(slow.audio) == slow.frames
    missing = slow.frames[-1] + 1 - len(slow.frames)
    assert 0 < missing <= slow_done.frames_dropped  # the gaps are the dropped frames
    # Every tick made a frame (the fake engine has no look-ahead): sent or dropped.
    assert slow_done.frames + slow_done.frames_dropped == round(slow_done.media_s * FPS)
    # The daemon's figures sum the sessions' own.
    assert status["jobs"]["live_frames_dropped"] == slow_done.frames_dropped
    assert f"avatard_live_frames_dropped_total {slow_done.frames_dropped:.1f}" in metrics


def test_a_worker_lost_mid_session_moves_it_and_its_clock_runs_on(tmp_path):
    speech = np.full(RATE * 4, 0.5, np.float32)  # still playing when the worker dies
    with run_daemon(tmp_path, workers=2, fake=FAKE, sections=RINGS) as d, d.client() as c:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] == 2, 60, "both workers ready")
        rec = Recorder(c.live(seed=3), seed=3)
        rec.session.send_audio(speech, RATE, "a")
        rec.until(segment_is(PlaybackStartedEvent, "a"))
        rec.frames_more(5)
        victim = next(w for w in d.status()["workers"] if w["current_jobs"])
        os.kill(victim["pid"], signal.SIGKILL)
        finished = rec.until(segment_is(PlaybackFinishedEvent, "a"))
        moved = rec.until(lambda e: isinstance(e, SessionMovedEvent))
        before = list(rec.frames)
        late = rec.session.send_audio(speech[:TICK], RATE, "a")  # "a" ended with the move
        refused = rec.until(lambda e: isinstance(e, InputRefusedEvent))
        rec.session.send_audio(speech[:RATE // 5], RATE, "b")
        rec.session.end_segment("b")
        finished_b = rec.until(segment_is(PlaybackFinishedEvent, "b"))
        done = rec.close()

    assert finished.interrupted and 0 < finished.position_s < 4.0
    assert "killed by signal 9" in moved.reason
    # Frames went on from the clock's frame after the gap: none repeated, none reordered.
    assert before == list(range(len(before))), "frames before the move, in order"
    assert moved.resume_index == len(before) + moved.frames_lost
    after = rec.frames[len(before):]
    assert after == list(range(moved.resume_index, moved.resume_index + len(after)))
    assert sorted(rec.audio) == rec.frames and not rec.silenced
    assert (refused.req_id, refused.code, refused.field) == (late, P.E_BAD_INPUT,
                                                             "segment_id")
    assert "moved to another worker" in refused.rule  # the refusal says why "a" ended
    assert (finished_b.position_s, finished_b.interrupted) == (0.2, False)
    assert (done.frames, done.frames_lost, done.attempts) == (len(rec.frames),
                                                              moved.frames_lost, 2)
    # The session's totals, not the last worker's part: its length runs from index 0
    # (frames sent, dropped and lost), its audio is every chunk sent on both workers.
    assert done.frames_dropped == 0
    assert done.media_s * FPS == pytest.approx(rec.frames[-1] + 1)
    assert done.audio_samples == sum(chunk.size for chunk in rec.audio.values())


def test_a_worker_lost_with_no_other_worker_free_ends_the_session(tmp_path):
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c:
        rec = Recorder(c.live(seed=3), seed=3)
        rec.frames_more(5)
        victim = next(w for w in d.status()["workers"] if w["current_jobs"])
        os.kill(victim["pid"], signal.SIGKILL)
        with pytest.raises(JobFailedError) as err:
            while True:
                rec.next()
        assert err.value.code == P.E_WORKER
        assert "no other worker had a free place" in str(err.value)
        assert "killed by signal 9" in str(err.value)
        d.wait_for(lambda s: s["workers"][0]["restarts"] >= 1
                   and s["daemon"]["ready_workers"] == 1, 30, "the replacement worker")
        again = Recorder(c.live(seed=4), seed=4)
        again.frames_more(3)
        assert again.close().frames == len(again.frames)


def _live_then_die(endpoint, ready_q):
    from avatard.ipc.client import Client

    client = Client(endpoint, timeout_s=10)
    session = client.live(seed=3)
    for _ in range(5):
        next(session)
    ready_q.put(session.job_id)
    time.sleep(600)


def test_a_vanished_client_ends_its_live_session(tmp_path):
    from conftest import spawn_context

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        ctx = spawn_context()
        ready_q = ctx.Queue()
        proc = ctx.Process(target=_live_then_die, args=(d.endpoint, ready_q))
        proc.start()
        job_id = ready_q.get(timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        status = d.wait_for(lambda s: s["queue"]["running"] == 0, 20,
                            "the vanished client's live session to end")
        assert status["jobs"]["jobs_cancelled"] == 1
        # Whichever the daemon saw first: the connection closing, or the process gone.
        log = d.log_text()
        assert (f"job {job_id} failed: cancelled: the client's connection closed" in log
                or f"job {job_id} failed: cancelled: the client process exited" in log)
        with d.client() as c:  # the worker serves the next session
            rec = Recorder(c.live(seed=4), seed=4)
            rec.frames_more(3)
            assert rec.close().frames == len(rec.frames)


def test_bad_input_is_refused_with_the_field_and_the_session_keeps_running(tmp_path):
    tone = np.full(TICK * 5, 0.25, np.float32)
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c:
        rec = Recorder(c.live(seed=8), seed=8)
        s = rec.session
        rec.frames_more(2)
        sent = {
            s.send_audio(tone.astype(np.float64), RATE, "x"): (P.E_BAD_MESSAGE, "audio.dtype"),
            s.send_audio(tone.reshape(-1, 2), RATE, "x"): (P.E_BAD_MESSAGE, "audio.shape"),
            s.send_audio(np.zeros(0, np.float32), RATE, "x"): (P.E_BAD_INPUT, "audio"),
            s.send_audio(np.full(TICK, np.nan, np.float32), RATE, "x"): (P.E_BAD_INPUT,
                                                                        "audio"),
            s.send_audio(np.full(TICK, 3000.0, np.float32), RATE, "x"): (P.E_BAD_INPUT,
                                                                        "audio"),
            # 10 MB: over the largest payload (rings.inline_slot_bytes, 8 MiB).
            s.send_audio(np.zeros(2_621_440, np.float32), RATE, "x"): (P.E_TOO_LARGE, "audio"),
        }
        s.send_audio(tone, RATE, "a")  # good input among the bad
        sent[s.send_audio(tone, 22050, "a")] = (P.E_BAD_INPUT, "sample_rate")
        sent[s.send_text("Hi. ", "a")] = (P.E_BAD_INPUT, "segment_id")
        s.end_segment("a")
        sent[s.send_audio(tone, RATE, "a")] = (P.E_BAD_INPUT, "segment_id")  # "a" ended
        refused = {}
        while len(refused) < len(sent):
            event = rec.next()
            if isinstance(event, InputRefusedEvent):
                refused[event.req_id] = (event.code, event.field)
        finished = rec.until(segment_is(PlaybackFinishedEvent, "a"))
        rec.frames_more(3)
        done = rec.close()
        # After its end the session is unknown; a request naming it, or no session at
        # all, is refused the same way.
        with pytest.raises(JobFailedError) as err:  # the worker's TTS has no such voice
            next(c.live(voice="no-such-voice"))
        assert err.value.code == P.E_BAD_INPUT and "voice: unknown voice" in str(err.value)
        for job_id in (rec.session.job_id, "j0-nosuchjob"):
            ghost = LiveSession(c, P.make(P.Accepted, req_id=0, job_id=job_id,
                                          queue_position=0, fps=0, width=0, height=0,
                                          audio_rate=0))
            req = ghost.send_audio(tone, RATE, "z")
            event = next(ghost)
            assert (event.req_id, event.code, event.field) == (req, P.E_NOT_FOUND, "job_id")
            ghost._events.close()

    assert refused == {req: sent[req] for req in sent}
    assert (finished.position_s, finished.interrupted) == (tone.size / RATE, False)
    assert_continuous(rec)
    assert done.frames == len(rec.frames) and done.frames_dropped == 0


@pytest.mark.slow
def test_embedded_engine_live_session_speaks_and_idles(tmp_path):
    from avatard.engines.embedded.avatar import speech_like_signal

    speech = speech_like_signal(1.0, seed=2)
    engines = {"avatar": "embedded", "tts": "fake", "asr": "fake"}
    with run_daemon(tmp_path, engines=engines, ready_timeout_s=120,
                    sections={"rings": {"frame_slots": 16}}) as d, \
            d.client(timeout_s=60) as c:
        rec = Recorder(c.live(seed=9))
        assert (rec.session.fps, rec.session.audio_rate) == (FPS, RATE)
        rec.frames_more(3)
        send_in_chunks(rec.session, speech, RATE, "s")
        rec.session.end_segment("s")
        started = rec.until(segment_is(PlaybackStartedEvent, "s"))
        finished = rec.until(segment_is(PlaybackFinishedEvent, "s"))
        rec.frames_more(5)
        done = rec.close()

    assert rec.frames == sorted(rec.frames) and sorted(rec.audio) == rec.frames
    assert done.frames == len(rec.frames)
    assert (finished.position_s, finished.interrupted) == (1.0, False)
    # The audio chunk of each frame is the audio that frame was made from, whatever the
    # engine's look-ahead: the speech starts in the frame after playback_started.
    start = rec.position(started)
    played = np.concatenate([rec.audio[i] for i in rec.frames if i >= rec.frames[start]])
    np.testing.assert_array_equal(played[:speech.size], speech)


def test_a_drain_closes_live_sessions_instead_of_waiting_for_them(tmp_path):
    # drain_timeout_s is far longer than the test may take: only closing the session lets
    # the daemon exit in time.
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS,
                    daemon={"drain_timeout_s": 3600}) as d, d.client() as c:
        rec = Recorder(c.live(seed=8), seed=8)
        rec.session.send_audio(np.full(RATE * 4, 0.5, np.float32), RATE, "a")
        rec.until(segment_is(PlaybackStartedEvent, "a"))
        d.proc.send_signal(signal.SIGTERM)
        finished = rec.until(segment_is(PlaybackFinishedEvent, "a"))
        done = rec.until(lambda e: isinstance(e, DoneEvent))
        assert d.proc.wait(timeout=60) == 0
    assert finished.interrupted
    assert done.frames == len(rec.frames)


def test_speech_queued_past_the_limit_is_refused_busy_until_it_plays(tmp_path):
    second = np.full(RATE, 0.25, np.float32)  # 1 s per chunk; the limit is 2.5 s queued
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS,
                    daemon={"live_max_queued_s": 2.5}) as d, d.client() as c:
        rec = Recorder(c.live(seed=9), seed=9)
        rec.frames_more(2)
        rec.session.send_audio(second, RATE, "a")
        rec.session.send_audio(second, RATE, "a")
        over = rec.session.send_audio(second, RATE, "a")  # 3 s: past the limit
        refused = rec.until(lambda e: isinstance(e, InputRefusedEvent))
        text_over = rec.session.send_text("More words.", "t")  # 2 s queued: under 2.5 s
        rec.session.end_segment("t")
        finished_a = rec.until(segment_is(PlaybackFinishedEvent, "a"))
        rec.until(segment_is(PlaybackFinishedEvent, "t"))
        rec.frames_more(10)  # heartbeats (every 0.2 s) report the queue empty
        rec.session.send_audio(second, RATE, "b")
        rec.session.send_audio(second, RATE, "b")
        rec.session.end_segment("b")
        finished_b = rec.until(segment_is(PlaybackFinishedEvent, "b"))
        done = rec.close()

    assert (refused.req_id, refused.code, refused.field) == (over, P.E_BUSY, "audio")
    assert "live_max_queued_s=2.5" in refused.rule
    assert text_over not in [e.req_id for e in rec.of(InputRefusedEvent)]
    assert finished_a.position_s == 2.0 and not finished_a.interrupted
    assert finished_b.position_s == 2.0 and not finished_b.interrupted
    assert done.frames == len(rec.frames)


def test_live_open_options_prebuffer_and_bad_options_name_the_field(tmp_path):
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c:
        rec = Recorder(c.live(seed=2, prebuffer_ms=200), seed=2)
        rec.session.send_audio(np.full(RATE // 10, 0.5, np.float32), RATE, "a")  # 100 ms
        rec.frames_more(25)  # a second: 100 ms of 200 queued, the segment waits
        assert not rec.of(PlaybackStartedEvent)
        rec.session.send_audio(np.full(RATE // 10, 0.5, np.float32), RATE, "a")
        rec.session.end_segment("a")
        finished = rec.until(segment_is(PlaybackFinishedEvent, "a"))
        rec.close()
        with pytest.raises(ClientError) as err:
            c.live(prebuffer_ms=60_000)
    assert (finished.position_s, finished.interrupted) == (0.2, False)
    # The 200 ms played in one piece: no silence inside the segment.
    played = [i for i in sorted(rec.audio) if rec.audio[i].any()]
    assert played == list(range(played[0], played[0] + 5))
    assert err.value.code == P.E_BAD_MESSAGE and "prebuffer_ms" in str(err.value)
