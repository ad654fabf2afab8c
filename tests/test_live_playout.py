"""Unit tests of daemon/live_playout.py (a live session's speech, tick by tick) and of the
streaming pieces it uses from engines/audio.py. Pure logic: no clock, no processes."""

from __future__ import annotations

import numpy as np
import pytest

from avatard.daemon.live_playout import Finished, Playout, Skipped, Started
from avatard.engines.audio import StreamingResampler, complete_sentences, resample

RATE, FPS = 16000, 25
TICK = RATE // FPS  # 640 samples


def tone(samples: int, value: float = 0.5) -> np.ndarray:
    return np.full(samples, value, np.float32)


def run_ticks(playout: Playout, count: int, start: int = 0):
    """Take and emit `count` ticks with no look-ahead: [(tick, before, after)]."""
    out = []
    for index in range(start, start + count):
        playout.take(index)
        out.append(playout.emitted())
    return out


def events_of(results) -> list:
    return [e for _, before, after in results for e in (*before, *after)]


@pytest.mark.parametrize(("rate", "fps"), [(16000, 25), (22050, 30), (44100, 24), (8000, 7)])
def test_ticks_hold_exactly_rate_over_fps_samples_in_total(rate, fps):
    playout = Playout(rate, fps)
    sizes = [playout.take(i).pcm.size for i in range(3 * fps)]
    assert sum(sizes) == 3 * rate and max(sizes) - min(sizes) <= 1
    assert playout.tick_start_sample(fps) == rate


def test_two_segments_with_a_pause_play_in_order_with_silence_between():
    playout = Playout(RATE, FPS)
    first, second = tone(TICK * 3 + 100, 0.25), tone(TICK * 2, -0.5)
    playout.audio("a", first, RATE)
    playout.end("a")
    results = run_ticks(playout, 8)
    playout.audio("b", second, RATE)
    playout.end("b")
    results += run_ticks(playout, 6, start=8)
    pcm = np.concatenate([tick.pcm for tick, _, _ in results])
    np.testing.assert_array_equal(pcm[:first.size], first)
    assert not pcm[first.size:8 * TICK].any()  # the pause is silence
    np.testing.assert_array_equal(pcm[8 * TICK:10 * TICK], second)
    assert not pcm[10 * TICK:].any()
    assert events_of(results) == [Started("a"), Finished("a", first.size / RATE, False),
                                  Started("b"), Finished("b", second.size / RATE, False)]
    # Started comes before the first frame with the speech, Finished after the last one.
    assert results[0][1] == [Started("a")] and results[3][2] == [Finished("a", 0.12625, False)]


def test_a_segment_that_runs_dry_holds_the_queue_until_it_ends():
    playout = Playout(RATE, FPS)
    playout.audio("a", tone(TICK), RATE)
    results = run_ticks(playout, 3)  # no live_end: "a" waits for more
    playout.audio("a", tone(TICK // 2), RATE)
    results += run_ticks(playout, 1, start=3)
    assert events_of(results) == [Started("a")]
    playout.end("a")  # its last sample went out a tick ago: Finished after the next frame
    results += run_ticks(playout, 1, start=4)
    assert events_of(results)[-1] == Finished("a", 1.5 * TICK / RATE, False)
    assert results[3][0].speech_samples == TICK // 2


def test_input_for_a_new_segment_ends_the_one_before():
    playout = Playout(RATE, FPS)
    playout.audio("a", tone(TICK // 2), RATE)
    playout.audio("b", tone(TICK // 2, -0.5), RATE)
    assert not playout.audio("a", tone(10), RATE)  # "a" ended: dropped
    ((tick, before, after),) = run_ticks(playout, 1)
    # Both halves in one tick: "a" finishes and "b" starts with the same frame.
    assert before == [Started("a"), Started("b")] and after == [Finished("a", 0.02, False)]
    assert tick.speech_samples == TICK


def test_events_wait_for_the_frame_that_carries_the_speech():
    playout = Playout(RATE, FPS)
    playout.audio("a", tone(TICK), RATE)
    playout.end("a")
    for index in range(3):  # an engine with two frames of look-ahead
        playout.take(index)
    assert len(playout.in_flight) == 3
    tick, before, after = playout.emitted()
    assert tick.index == 0 and before == [Started("a")] and after == [Finished("a", 0.04, False)]
    assert playout.emitted()[0].index == 1


def test_barge_in_drops_queued_speech_silences_ticks_in_flight_and_finishes_started():
    playout = Playout(RATE, FPS)
    playout.audio("a", tone(TICK * 10), RATE)
    playout.audio("b", tone(TICK * 10), RATE)  # queued behind "a"
    results = run_ticks(playout, 3)
    playout.take(3)  # in flight: its frame is not out yet
    assert playout.interrupt() == [Finished("a", 3 * TICK / RATE, True)]  # "b" never started
    tick, before, after = playout.emitted()
    assert tick.index == 3 and not tick.pcm.any() and before == after == []
    results += run_ticks(playout, 2, start=4)
    assert not any(t.pcm.any() for t, _, _ in results[3:])
    assert not playout.audio("a", tone(TICK), RATE) and not playout.audio("b", tone(1), RATE)
    assert playout.audio("c", tone(TICK), RATE)  # a new segment plays
    assert events_of(run_ticks(playout, 1, start=6)) == [Started("c")]


def test_text_is_spoken_sentence_by_sentence_and_barge_in_drops_late_tts_audio():
    playout = Playout(RATE, FPS)
    playout.text("t", "Hello there", final=False)
    assert playout.take_sentences() == []
    playout.text("t", ".", final=False)
    assert playout.take_sentences() == []  # "." needs the space after it
    playout.text("t", " How are you? I", final=False)
    assert playout.take_sentences() == [(0, "t", "Hello there. How are you?")]
    playout.text("t", " am fine", final=True)
    assert playout.take_sentences() == [(0, "t", "I am fine")]
    playout.tts_audio(0, "t", tone(TICK))
    playout.tts_done(0, "t")
    results = run_ticks(playout, 2)  # the second piece is still being synthesized
    assert events_of(results) == [Started("t")] and not results[1][0].pcm.any()
    playout.tts_audio(0, "t", tone(TICK // 2))
    playout.tts_done(0, "t")
    assert events_of(run_ticks(playout, 1, start=2)) == [Finished("t", 0.06, False)]

    playout.text("u", "One. Two. ", final=False)
    ((generation, _, _),) = playout.take_sentences()
    playout.interrupt()
    playout.tts_audio(generation, "u", tone(TICK))  # asked before the barge-in: dropped
    playout.tts_done(generation, "u")
    assert not any(t.pcm.any() for t, _, _ in run_ticks(playout, 2, start=3))


def test_audio_at_another_rate_is_resampled_without_seams():
    playout = Playout(RATE, FPS)
    speech = (np.sin(np.arange(48000) / 7.0) * 0.5).astype(np.float32)
    for start in range(0, speech.size, 4800):  # 100 ms chunks at 48 kHz
        playout.audio("a", speech[start:start + 4800], 48000)
    playout.end("a")
    results = run_ticks(playout, 26)
    pcm = np.concatenate([t.pcm for t, _, _ in results])[:RATE]
    np.testing.assert_array_equal(pcm, resample(speech, 48000, RATE))
    assert events_of(results)[-1] == Finished("a", 1.0, False)


def test_streaming_resampler_equals_the_one_shot_resample():
    rng = np.random.default_rng(3)
    signal = (rng.standard_normal(9001) * 0.3).astype(np.float32)
    for from_rate, to_rate in [(48000, 16000), (44100, 16000), (8000, 22050), (16000, 16000)]:
        resampler = StreamingResampler(from_rate, to_rate)
        pieces, start = [], 0
        for size in (1, 13, 700, 2, 4000, 3):
            pieces.append(resampler.push(signal[start:start + size]))
            start += size
        pieces += [resampler.push(signal[start:]), resampler.flush()]
        np.testing.assert_array_equal(np.concatenate(pieces),
                                      resample(signal, from_rate, to_rate))


@pytest.mark.parametrize(("text", "complete"), [
    ("Hello. How", "Hello."),
    ("Hello.", ""),  # the space after the period has not come
    ("Wait! Go? Now", "Wait! Go?"),
    ("It costs 5 etc. ", ""),  # an abbreviation: the next word decides
    ("It is 5 p.m. Then", "It is 5 p.m."),
    ("Dr. Smith is here. Ok", "Dr. Smith is here."),
    ("First part\n\nSecond", "First part\n\n"),
])
def test_complete_sentences_of_streamed_text(text, complete):
    done, rest = complete_sentences(text)
    assert (done, done + rest) == (complete, text)


def test_a_prebuffer_holds_a_segment_until_enough_is_queued_or_its_input_ended():
    playout = Playout(RATE, FPS, prebuffer_samples=3 * TICK)
    playout.audio("a", tone(2 * TICK), RATE)
    results = run_ticks(playout, 2)  # 2 ticks queued of 3: not yet
    assert events_of(results) == [] and not any(t.pcm.any() for t, _, _ in results)
    playout.audio("a", tone(TICK), RATE)
    results = run_ticks(playout, 3, start=2)  # 3 queued: it plays, every tick full
    assert events_of(results) == [Started("a")]
    assert all(t.speech_samples == TICK for t, _, _ in results)
    # Once playing it is not held again (a later dry spell is silence, as without one).
    playout.audio("a", tone(TICK // 2), RATE)
    assert run_ticks(playout, 1, start=5)[0][0].speech_samples == TICK // 2
    # A segment shorter than the prebuffer plays once its input ends.
    playout.audio("b", tone(TICK), RATE)
    playout.end("b")
    results = run_ticks(playout, 2, start=6)
    assert [t.speech_samples for t, _, _ in results] == [TICK, 0]


@pytest.mark.parametrize(("at", "phase", "step", "tick"), [
    (0.0, 0, 1, 0), (3.2, 0, 1, 4), (3.0, 5, 10, 5), (5.5, 5, 10, 15), (17.0, 23, 10, 23),
    (12.0, 2, 10, 12), (12.01, 2, 10, 22)])
def test_aligned_tick_is_the_first_grid_tick_of_the_phase(at, phase, step, tick):
    from avatard.daemon.live_worker import aligned_tick

    assert aligned_tick(at, phase, step) == tick
    assert tick >= at and (tick - phase) % step == 0 and tick - at < step + 1


def test_a_huge_chunk_is_resampled_a_tick_at_a_time():
    # One call with minutes of 48 kHz audio does no resampling: each tick resamples about
    # its own share, so the clock thread's work per tick stays small whatever the chunk.
    playout = Playout(RATE, FPS)
    speech = (np.sin(np.arange(48000 * 60) / 7.0) * 0.5).astype(np.float32)
    playout.audio("a", speech, 48000)
    playout.end("a")
    (seg,) = playout.segments
    assert seg.queued_samples == 0 and seg.raw_samples == speech.size
    assert playout.queued_s == 60.0
    results = run_ticks(playout, 10)
    assert seg.queued_samples < 2 * TICK  # resampled: about what 10 ticks took
    assert seg.raw_samples > speech.size - 11 * TICK * 3
    pcm = np.concatenate([t.pcm for t, _, _ in results])
    np.testing.assert_array_equal(pcm, resample(speech[:48000], 48000, RATE)[:pcm.size])


def test_a_live_end_for_a_segment_that_got_no_input_is_skipped_in_its_turn():
    # Every segment whose input ended gets one end event: one that got nothing but its
    # live_end is skipped when its turn comes (after the segment playing), and it does
    # not end the segment still taking input.
    playout = Playout(RATE, FPS)
    playout.audio("a", tone(TICK * 2), RATE)
    assert playout.end("empty")
    playout.audio("a", tone(TICK), RATE)  # "a" still takes input
    results = run_ticks(playout, 4)
    assert events_of(results) == [Started("a")]
    playout.end("a")
    results += run_ticks(playout, 2, start=4)
    assert events_of(results) == [
        Started("a"), Finished("a", 3 * TICK / RATE, False),
        Skipped("empty", "its live_end came before any input")]
    assert not playout.end("empty")  # ended: a second live_end changes nothing
    assert events_of(run_ticks(playout, 2, start=6)) == []
