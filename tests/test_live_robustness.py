"""Live sessions through a real daemon (fake engines) under input that once hurt them: huge
chunks at another rate, refused requests that named an input slot, text past a voice's
limit, segments the TTS cannot speak, sessions that end while a segment plays.

No timing assertions: the daemon's stall watchdog (`timeouts.stall_timeout_s`, 3 s here)
is what fails a session whose clock thread stops; the tests assert on events and counts."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from daemon_harness import run_daemon
from test_live import FAKE, RATE, RINGS, TICK, Recorder, assert_continuous, segment_is

from avatard.engines.audio import complete_sentences, pack_sentences
from avatard.engines.fake import FakeTTSEngine
from avatard.ipc import protocol as P
from avatard.ipc.client import (
    InputRefusedEvent,
    JobFailedError,
    PlaybackFinishedEvent,
    PlaybackSkippedEvent,
    PlaybackStartedEvent,
    SessionMovedEvent,
    SpeechRefusedEvent,
)
from avatard.ipc.ring import FREE


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


BAD_FIELDS = {  # a live_audio the decoder refuses -> the field its error names
    "rate 0": (0, "seg", "sample_rate"),
    "rate as a float": (44100.0, "seg", "sample_rate"),
    "segment_id too long": (RATE, "x" * 300, "segment_id"),
    "segment_id not a string": (RATE, 5, "segment_id"),
}


def test_refused_audio_gives_its_input_slot_back(tmp_path):
    # The client's input ring has 4 slots: a refusal that kept its slot would make the
    # 5th send wait for a free slot and fail (RingFullError).
    chunk = np.full(1600, 0.1, np.float32)
    with (run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d,
          d.client(timeout_s=5) as c):
        rec = Recorder(c.live(seed=2))
        sent = {}
        for rate, segment_id, field in BAD_FIELDS.values():
            for _ in range(3):
                sent[rec.session.send_audio(chunk, rate, segment_id)] = field
        refused = []
        while len(refused) < len(sent):
            event = rec.next()
            if isinstance(event, InputRefusedEvent):
                refused.append(event)
        ring = c._input_ring
        assert ring is not None and ring.count(FREE) == ring.slot_count
        for _ in range(6):  # slots free: good chunks go through
            rec.session.send_audio(chunk, RATE, "good")
        rec.session.end_segment("good")
        finished = rec.until(segment_is(PlaybackFinishedEvent, "good"))
        done = rec.close()
    assert {e.req_id: e.field for e in refused} == sent
    assert all(e.code == P.E_BAD_MESSAGE for e in refused)
    assert finished.position_s == 6 * chunk.size / RATE and not finished.interrupted
    assert done.frames == len(rec.frames)


def test_text_past_the_voice_limit_is_spoken_in_parts(tmp_path):
    # One live_text far over the voice's max_text_chars (here 20): cut at sentence ends,
    # then clauses, then anywhere (a word of 50 letters), and spoken whole, not refused.
    # (The fake voice speaks 0.3 s a word: few words, a small limit.)
    text = "One two. Three four five. Six seven. " + "x" * 50 + " eight nine, ten."
    # The session speaks its complete sentences, then the rest at `final`; each in
    # parts within the limit (each part ends as a sentence does: a pause after it).
    complete, rest = complete_sentences(text)
    parts = pack_sentences(complete, 20) + pack_sentences(rest, 20)
    assert len(parts) > 4 and all(len(part) <= 20 for part in parts)
    tts = FakeTTSEngine()
    expected_s = sum(tts.synthesize(part)[0].size for part in parts) / RATE
    with (run_daemon(tmp_path, fake=FAKE | {"tts_max_text_chars": 20}, sections=RINGS)
          as d, d.client() as c):
        rec = Recorder(c.live(seed=4))
        rec.session.send_text(text, "long", final=True)
        finished = rec.until(segment_is(PlaybackFinishedEvent, "long"))
        rec.close()
    assert not rec.of(SpeechRefusedEvent)
    assert not finished.interrupted and finished.position_s == expected_s


def playback_order(rec: Recorder) -> list[tuple[str, str]]:
    kinds = {PlaybackStartedEvent: "started", PlaybackFinishedEvent: "finished",
             PlaybackSkippedEvent: "skipped"}
    return [(kinds[type(e)], e.segment_id) for e in rec.events if type(e) in kinds]


def test_text_the_tts_cannot_speak_is_reported_and_its_segment_ends(tmp_path):
    # A refused piece is reported (speech_refused) and the rest of its segment plays; a
    # segment with nothing to speak ends with playback_skipped, in its turn, so a client
    # waiting for each segment's end never hangs and the queue goes on behind it.
    with (run_daemon(tmp_path, fake=FAKE | {"tts_refuse_word": "zork"}, sections=RINGS)
          as d, d.client() as c):
        rec = Recorder(c.live(seed=4))
        rec.session.send_text("Zork is here. ", "part")  # a complete sentence: refused
        rec.session.send_text("Bye now.", "part", final=True)
        rec.session.send_text("\U0001f642\U0001f642", "emoji", final=True)
        rec.session.send_text("   ", "blank", final=True)
        rec.session.send_text("Hello Zork.", "refused", final=True)
        rec.session.send_text("All good.", "after", final=True)
        rec.until(segment_is(PlaybackFinishedEvent, "after"))
        rec.close()
    order = playback_order(rec)
    # Each segment ends once, in playing order ("after" may start in the tick where
    # "part" ends: its playback_started comes before that frame, the ends after it).
    assert [e for e in order if e[0] != "started"] == [
        ("finished", "part"), ("skipped", "emoji"), ("skipped", "blank"),
        ("skipped", "refused"), ("finished", "after")]
    assert [e for e in order if e[0] == "started"] == [("started", "part"),
                                                       ("started", "after")]
    assert order.index(("started", "after")) > order.index(("started", "part"))
    refusals = {e.segment_id: e for e in rec.of(SpeechRefusedEvent)}
    assert sorted(refusals) == ["part", "refused"]
    assert all((e.code, e.field) == (P.E_BAD_INPUT, "text") and "zork" in e.rule
               for e in refusals.values())
    assert refusals["part"].text == "Zork is here."
    skipped = {e.segment_id: e.reason for e in rec.of(PlaybackSkippedEvent)}
    assert "nothing speakable" in skipped["emoji"] and "zork" in skipped["refused"]
    finished = {e.segment_id: e for e in rec.of(PlaybackFinishedEvent)}
    assert finished["part"].position_s == FakeTTSEngine().synthesize("Bye now.")[0].size / RATE


def _cut_short(rec: Recorder) -> tuple[PlaybackFinishedEvent, JobFailedError]:
    """Read until the session fails: (its segment's playback_finished, the failure)."""
    with pytest.raises(JobFailedError) as failure:
        rec.until(lambda e: False)
    (finished,) = rec.of(PlaybackFinishedEvent)
    return finished, failure.value


@pytest.mark.parametrize("how", ["cancel", "worker lost, none free"])
def test_a_session_cut_short_still_finishes_its_playing_segment(tmp_path, how):
    # playback_finished (interrupted) comes for every started segment, also when the
    # session ends by a cancel or by losing its worker with no other worker free.
    speech = np.full(RATE * 4, 0.5, np.float32)
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c:
        rec = Recorder(c.live(seed=3), seed=3)
        rec.session.send_audio(speech, RATE, "a")
        rec.until(segment_is(PlaybackStartedEvent, "a"))
        rec.frames_more(10)
        if how == "cancel":
            c.cancel(rec.session.job_id)
        else:
            victim = next(w for w in d.status()["workers"] if w["current_jobs"])
            os.kill(victim["pid"], signal.SIGKILL)
        finished, failure = _cut_short(rec)
    assert finished.segment_id == "a" and finished.interrupted
    assert 10 * TICK / RATE <= finished.position_s < 4.0
    assert failure.code == (P.E_CANCELLED if how == "cancel" else P.E_WORKER)


def test_a_client_that_reads_again_after_its_slots_were_taken_back_sees_the_timeout(
        tmp_path):
    # A client that stopped reading past timeouts.client_call_s: the daemon took its slots
    # back and ended the session (`timeout`). Its queued frames name slots that are no
    # longer its own: reading on must raise the session's failure, not a stale slot.
    with (run_daemon(tmp_path, fake=FAKE, sections=RINGS, timeouts={"client_call_s": 1.0})
          as d, d.client() as c):
        rec = Recorder(c.live(seed=5), seed=5)
        rec.frames_more(3)  # the client holds the slot of the last frame from here on
        d.wait_for(lambda s: s["queue"]["running"] == 0, 30,
                   "the daemon to end the session of a client that stopped reading")
        with pytest.raises(JobFailedError) as failure:
            rec.until(lambda e: False)
    assert failure.value.code == P.E_TIMEOUT
    assert "client_call_s" in str(failure.value)


def test_a_live_end_for_a_segment_that_got_no_input_gets_playback_skipped(tmp_path):
    # Its one end event, in its turn (after the segment playing); input for it later is
    # refused as for any ended segment.
    speech = np.full(TICK * 10, 0.5, np.float32)
    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d, d.client() as c:
        rec = Recorder(c.live(seed=6), seed=6)
        rec.session.send_audio(speech, RATE, "a")
        rec.session.end_segment("nothing")
        rec.session.end_segment("a")
        skipped = rec.until(segment_is(PlaybackSkippedEvent, "nothing"))
        late = rec.session.send_audio(speech, RATE, "nothing")
        refused = rec.until(lambda e: isinstance(e, InputRefusedEvent))
        rec.close()
    assert playback_order(rec) == [("started", "a"), ("finished", "a"),
                                   ("skipped", "nothing")]
    assert "live_end came before any input" in skipped.reason
    assert (refused.req_id, refused.field) == (late, "segment_id")
    assert "ended by live_end" in refused.rule
