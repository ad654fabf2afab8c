"""Tests of engines/fake.py: determinism, chunking, options, and the injected faults.

Crashes and hangs run in real `spawn` child processes (as workers are started), and are
ended with real signals.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue
import signal
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatard.engines.base import EngineInputError, WorkerContext
from avatard.engines.fake import (
    FAKE_VOICES,
    FakeASREngine,
    FakeAvatarEngine,
    FakeTTSEngine,
    expected_frame,
    frame_count,
    frame_index_of,
    frame_seed_of,
    parse_fake_options,
)
from avatard.engines.registry import load_engine

SPAWN = multiprocessing.get_context("spawn")
CHILD_START_TIMEOUT_S = 60.0  # a spawned child imports numpy first; slow CI is slow


# ---------------------------------------------------------------------------- helpers


def _context(options: dict[str, Any]) -> tuple[dict[str, Any], WorkerContext]:
    """Split the worker context a test names (worker_index, attempt) off the options: the
    worker passes it to the engine beside them, not in them."""
    options = dict(options)
    return options, WorkerContext(options.pop("worker_index", 0), options.pop("attempt", 1))


def make_avatar(**options: Any) -> FakeAvatarEngine:
    options, context = _context(options)
    engine = load_engine("avatar", "fake", "cpu", options, context=context)
    assert isinstance(engine, FakeAvatarEngine)
    return engine


def render_chunks(engine: FakeAvatarEngine, seed: int, chunks: list[int]) -> list[np.ndarray]:
    state = engine.register(b"portrait")
    stream = engine.open_stream(state, seed)
    frames: list[np.ndarray] = []
    for size in chunks:
        frames += stream.push(np.zeros(size, np.float32))
    frames += stream.finish()
    return frames


def load_in_child(kind: str, options: dict[str, Any], events: Any) -> None:
    """Child process body: load an engine as a worker would, reporting through `events`."""

    def progress(stage: str, fraction: float) -> None:
        events.put(("progress", stage, fraction))

    options, context = _context(options)
    load_engine(kind, "fake", "cpu", options, progress, context=context)
    events.put(("loaded", "", 1.0))


def render_in_child(options: dict[str, Any], events: Any) -> None:
    """Child process body: load the avatar engine, then render 1 s of audio frame by frame."""
    engine = load_engine("avatar", "fake", "cpu", options)
    events.put(("loaded", "", 1.0))
    stream = engine.open_stream(engine.register(b"face"), 1)
    samples_per_frame = engine.audio_rate // engine.fps
    for _ in range(engine.fps):
        for frame in stream.push(np.zeros(samples_per_frame, np.float32)):
            events.put(("frame", "", frame_index_of(frame)))
    events.put(("finished", "", 1.0))


def next_event(events: Any, timeout_s: float) -> tuple[str, str, float]:
    return events.get(timeout=timeout_s)


def wait_for(events: Any, wanted: tuple[str, str, float]) -> list[tuple[str, str, float]]:
    """Events up to and including `wanted`."""
    seen = []
    deadline = time.monotonic() + CHILD_START_TIMEOUT_S
    while True:
        event = next_event(events, max(0.1, deadline - time.monotonic()))
        seen.append(event)
        if event == wanted:
            return seen


def drain(events: Any) -> list[tuple[str, str, float]]:
    seen = []
    while True:
        try:
            seen.append(events.get(timeout=0.2))
        except queue.Empty:
            return seen


def start_child(target: Any, *args: Any) -> tuple[Any, Any]:
    events = SPAWN.Queue()
    process = SPAWN.Process(target=target, args=(*args, events), daemon=True)
    process.start()
    return process, events


def stop_child(process: Any) -> None:
    if process.is_alive():
        process.kill()
    process.join(10)


# ---------------------------------------------------------------------------- frames


def test_expected_frame_is_deterministic_and_distinct():
    a = expected_frame(42, 7, 64, 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
    assert np.array_equal(a, expected_frame(42, 7, 64, 64))
    assert not np.array_equal(a, expected_frame(42, 8, 64, 64))
    assert not np.array_equal(a, expected_frame(43, 7, 64, 64))
    assert frame_index_of(a) == 7
    assert frame_seed_of(a) == 42
    # Negative and huge seeds are folded to 64 bits, never rejected.
    assert frame_seed_of(expected_frame(-1, 0, 8, 8)) == 0xFFFFFFFF
    assert expected_frame(2**70 + 5, 3, 8, 8).shape == (8, 8, 3)
    # A 512x512 frame is allowed too.
    assert frame_index_of(expected_frame(1, 123456, 512, 512)) == 123456


def test_stream_frames_match_expected_pixels():
    engine = make_avatar(width=32, height=16)
    frames = render_chunks(engine, seed=5, chunks=[16000])
    assert len(frames) == 25
    for index, frame in enumerate(frames):
        assert frame.shape == (16, 32, 3)
        assert np.array_equal(frame, expected_frame(5, index, 16, 32))


def test_frames_arrive_as_soon_as_their_audio_is_complete():
    engine = make_avatar()
    stream = engine.open_stream(engine.register(b"x"), 0)
    samples_per_frame = 16000 // 25
    assert stream.push(np.zeros(samples_per_frame - 1, np.float32)) == []
    assert [frame_index_of(f) for f in stream.push(np.zeros(1, np.float32))] == [0]
    assert len(stream.push(np.zeros(3 * samples_per_frame, np.float32))) == 3
    assert stream.finish() == []
    assert stream.finish() == []
    with pytest.raises(RuntimeError):
        stream.push(np.zeros(1, np.float32))


CHUNK_ENGINE = FakeAvatarEngine(options={"width": 8, "height": 8})


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
    seed=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_chunking_does_not_change_frames(chunks, seed):
    engine = CHUNK_ENGINE
    total = sum(chunks)
    frames = render_chunks(engine, seed, chunks)
    assert len(frames) == frame_count(total, 16000, 25) == round(total * 25 / 16000)
    whole = render_chunks(engine, seed, [total])
    assert len(whole) == len(frames)
    for index, (piece, reference) in enumerate(zip(frames, whole, strict=True)):
        assert frame_index_of(piece) == index
        assert np.array_equal(piece, reference)


def test_frame_count_rounds_exactly():
    assert frame_count(0, 16000, 25) == 0
    assert frame_count(319, 16000, 25) == 0  # 0.498 frames
    assert frame_count(321, 16000, 25) == 1
    assert frame_count(320, 16000, 25) == 0  # exactly half: to even, as round() does
    assert frame_count(960, 16000, 25) == 2  # 1.5 -> 2
    assert frame_count(48000, 48000, 30) == 30


def test_frame_cost_sleep_and_busy():
    for busy in (False, True):
        engine = make_avatar(frame_ms=20.0, frame_busy=busy)
        started = time.perf_counter()
        frames = render_chunks(engine, 1, [640 * 10])
        elapsed_s = time.perf_counter() - started
        assert len(frames) == 10
        assert elapsed_s >= 0.19, (busy, elapsed_s)


def test_bad_pcm_is_refused():
    engine = make_avatar()
    stream = engine.open_stream(engine.register(b"x"), 0)
    with pytest.raises(EngineInputError) as caught:
        stream.push(np.zeros(10, np.float64))
    assert caught.value.field == "pcm"
    with pytest.raises(EngineInputError):
        stream.push(np.zeros((2, 10), np.float32))


# ---------------------------------------------------------------------------- register


def test_register_bytes_and_arrays():
    engine = make_avatar()
    state = engine.register(b"png bytes")
    assert state.avatar_id == hashlib.sha256(b"png bytes").hexdigest()
    assert (state.width, state.height) == (64, 64)
    assert engine.register(bytearray(b"png bytes")) is state  # cached by content hash

    image = np.zeros((10, 12, 3), np.uint8)
    array_state = engine.register(image)
    assert len(array_state.avatar_id) == 64
    assert engine.register(image.copy()).avatar_id == array_state.avatar_id
    assert engine.register(np.zeros((12, 10, 3), np.uint8)).avatar_id != array_state.avatar_id


@pytest.mark.parametrize(
    "image",
    [b"", np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3)), "x"],
)
def test_register_refuses_bad_images(image):
    with pytest.raises(EngineInputError) as caught:
        make_avatar().register(image)
    assert caught.value.field == "image"


def test_portrait_size_renders_a_registered_portrait_at_its_own_size():
    import io

    from PIL import Image

    engine = make_avatar(portrait_size=True, width=32, height=32)
    png = io.BytesIO()
    Image.new("RGB", (40, 24)).save(png, format="PNG")
    state = engine.register(png.getvalue())
    assert (state.width, state.height) == (40, 24)
    frames = engine.open_stream(state, 5).push(np.zeros(16000 // 25 * 2, np.float32))
    assert len(frames) == 2
    for index, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, expected_frame(5, index, 24, 40))
    assert engine.register(np.zeros((10, 12, 3), np.uint8)).width == 12  # an array's shape
    default = engine.register(engine.default_portrait())
    assert (default.width, default.height) == (32, 32)  # the option's size
    with pytest.raises(EngineInputError) as caught:
        engine.register(b"not an image")
    assert caught.value.field == "image" and "Pillow" in caught.value.rule
    without = make_avatar(width=32, height=32).register(png.getvalue())
    assert (without.width, without.height) == (32, 32)  # the option off: a fixed size


def test_open_stream_needs_a_registered_avatar():
    engine = make_avatar()
    state = make_avatar().register(b"elsewhere")
    with pytest.raises(EngineInputError) as caught:
        engine.open_stream(state, 1)
    assert caught.value.field == "avatar_id"


# ---------------------------------------------------------------------------- TTS / ASR


def test_tts_is_deterministic_and_streams_per_sentence():
    tts = load_engine("tts", "fake")
    assert isinstance(tts, FakeTTSEngine)
    assert tts.voices() == FAKE_VOICES
    # Tones read any text: the fake voices declare no language (their text is not checked).
    assert [(v.name, v.languages, v.sample_rate) for v in tts.voice_list()] == [
        (name, (), 16000) for name in FAKE_VOICES]
    chunks = list(tts.stream("Hello there. How are you? Fine!"))
    assert len(chunks) == 3
    assert all(chunk.dtype == np.float32 and chunk.ndim == 1 for chunk in chunks)
    pcm, rate = tts.synthesize("Hello there. How are you? Fine!")
    assert rate == 16000
    assert np.array_equal(pcm, np.concatenate(chunks))
    assert np.abs(pcm).max() <= 1.0
    again, _ = load_engine("tts", "fake").synthesize("Hello there. How are you? Fine!")
    assert np.array_equal(pcm, again)
    other_voice, _ = tts.synthesize("Hello there. How are you? Fine!", "fake-b")
    assert other_voice.shape == pcm.shape and not np.array_equal(other_voice, pcm)


def test_tts_refuses_bad_input():
    tts = FakeTTSEngine()
    with pytest.raises(EngineInputError) as caught:
        tts.stream("   ")
    assert caught.value.field == "text"
    with pytest.raises(EngineInputError) as caught:
        tts.stream("hi", voice="nobody")
    assert caught.value.field == "voice"


def test_asr_hears_one_word_per_half_second_of_sound():
    asr = load_engine("asr", "fake")
    assert isinstance(asr, FakeASREngine)
    rate = 16000
    tone = 0.5 * np.sin(np.linspace(0, 2000, rate)).astype(np.float32)  # 1 s of sound
    silence = np.zeros(rate // 2, np.float32)
    pcm = np.concatenate([silence, tone, silence, tone[: rate // 4]])
    transcript = asr.transcribe(pcm, rate)
    assert transcript.duration_s == pytest.approx(pcm.shape[0] / rate)
    assert [len(s.words) for s in transcript.segments] == [2, 1]
    assert transcript.text == "alpha bravo charlie"
    first = transcript.segments[0]
    assert first.start_s == pytest.approx(0.5, abs=0.011)
    assert first.end_s == pytest.approx(1.5, abs=0.011)
    assert first.words[0].end_s == pytest.approx(1.0, abs=0.011)
    assert isinstance(first.start_s, float) and type(first.words[0].start_s) is float
    assert asr.transcribe(pcm, rate) == transcript
    assert asr.transcribe(np.zeros(rate, np.float32), rate).segments == ()
    assert asr.transcribe(np.zeros(0, np.float32), rate).segments == ()


def test_tts_then_asr_round_trip_counts_words():
    pcm, rate = FakeTTSEngine().synthesize("one two three. four")
    # Word tones are 0.25 s apart by 0.05 s gaps: every word is its own sound.
    assert len(FakeASREngine().transcribe(pcm, rate).text.split()) == 4


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "field", "rule"),
    [
        ({"load_sx": 1}, "options.load_sx", "did you mean load_s?"),
        ({"bogus": 1}, "options.bogus", "unknown option"),
        ({"load_s": "1"}, "options.load_s", "expected float, got str"),
        ({"load_s": -1}, "options.load_s", ">= 0"),
        ({"load_hang": 1}, "options.load_hang", "expected bool, got int"),
        ({"alloc_mb": 1.5}, "options.alloc_mb", "expected int, got float"),
        ({"width": 7}, "options.width", ">= 8"),
        ({"width": 65}, "options.width", "must be even"),
        ({"fault_workers": [1, "3"]}, "options.fault_workers", "list of ints"),
        ({"fault_attempts": [0]}, "options.fault_attempts", ">= 1"),
        ({"load_kinds": ["video"]}, "options.load_kinds", "engine kinds"),
        ({"hang_at_frame": -2}, "options.hang_at_frame", ">= -1"),
    ],
)
def test_option_validation_names_the_option(options, field, rule):
    with pytest.raises(EngineInputError) as caught:
        parse_fake_options(options)
    assert caught.value.field == field
    assert rule in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_every_engine_kind_accepts_the_shared_table():
    table = {"load_s": 0.0, "frame_ms": 1.0, "sentence_ms": 0.0}
    for kind in ("avatar", "tts", "asr"):
        engine = load_engine(kind, "fake", "cuda:1", table, context=WorkerContext(2, 1))
        report = engine.report()
        assert (report.name, report.kind, report.device) == ("fake", kind, "cuda:1")
        assert "FAKE" in report.notes


def test_load_reports_progress_and_takes_load_s():
    stages: list[tuple[str, float]] = []
    started = time.perf_counter()
    engine = load_engine(
        "avatar", "fake", "cpu", {"load_s": 0.5}, lambda s, f: stages.append((s, f))
    )
    elapsed_s = time.perf_counter() - started
    assert elapsed_s >= 0.45  # a lower bound only: a busy machine makes it longer
    weights = [f for s, f in stages if s == "weights"]
    assert len(weights) >= 5 and weights == sorted(weights) and weights[-1] == 1.0
    assert [s for s, _ in stages][-2:] == ["warmup", "warmup"]
    assert engine.report().warmup_s >= 0.09  # a fifth of load_s is the warm-up


def test_load_s_applies_to_load_kinds_only():
    started = time.perf_counter()
    load_engine("tts", "fake", "cpu", {"load_s": 60.0})
    assert time.perf_counter() - started < 60.0  # it did not wait out load_s
    started = time.perf_counter()
    load_engine("tts", "fake", "cpu", {"load_s": 0.3, "load_kinds": ["tts"]})
    assert time.perf_counter() - started >= 0.28


def test_load_oom_raises_memory_error():
    with pytest.raises(MemoryError, match="out-of-memory"):
        load_engine("avatar", "fake", "cpu", {"load_oom": True})


def test_load_error_raises_runtime_error():
    with pytest.raises(RuntimeError, match="injected load error"):
        load_engine("avatar", "fake", "cpu", {"load_error": True})


@pytest.mark.parametrize(
    ("worker_index", "attempt", "fails"),
    [(1, 1, True), (3, 1, True), (5, 1, True), (2, 1, False), (3, 2, False), (0, 1, False)],
)
def test_faults_restricted_by_worker_and_attempt(worker_index, attempt, fails):
    options = {
        "load_oom": True,
        "fault_workers": [1, 3, 5],
        "fault_attempts": [1],
        "worker_index": worker_index,
        "attempt": attempt,
    }
    options, context = _context(options)
    if fails:
        with pytest.raises(MemoryError):
            load_engine("avatar", "fake", "cpu", options, context=context)
    else:
        load_engine("avatar", "fake", "cpu", options, context=context)


def test_frame_error_restricted_by_worker():
    hit = make_avatar(error_at_frame=2, fault_workers=[1], worker_index=1)
    with pytest.raises(RuntimeError, match="frame 2"):
        render_chunks(hit, 0, [640 * 5])
    missed = make_avatar(error_at_frame=2, fault_workers=[1], worker_index=0)
    assert len(render_chunks(missed, 0, [640 * 5])) == 5


def _alloc_report(options, result_q) -> None:
    result_q.put(make_avatar(**options).report().memory_bytes)


def test_alloc_mb_is_resident_and_reported():
    # In a fresh process: RSS growth is only meaningful where no freed heap can be reused
    # (after other tests, the allocator may hand the ballast pages it already holds).
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for options, check in (({"alloc_mb": 64}, lambda b: b >= 60 * 1024 * 1024),
                           ({"alloc_mb": 64, "fault_workers": [9]},
                            lambda b: b < 32 * 1024 * 1024)):
        result_q = ctx.Queue()
        proc = ctx.Process(target=_alloc_report, args=(options, result_q))
        proc.start()
        memory_bytes = result_q.get(timeout=60)
        proc.join(timeout=30)
        assert check(memory_bytes), (options, memory_bytes)


# ---------------------------------------------------------------------------- real children


def test_load_crash_kills_the_child_abruptly():
    process, events = start_child(
        load_in_child, "avatar", {"load_crash": True, "crash_delay_s": 0.5}
    )
    try:
        process.join(CHILD_START_TIMEOUT_S)
        assert process.exitcode == 70
        seen = drain(events)
        assert ("progress", "weights", 0.5) in seen  # it died half-way through loading
        assert not any(event[0] == "loaded" for event in seen)
    finally:
        stop_child(process)


def test_load_crash_spares_other_workers():
    options = {"load_crash": True, "fault_workers": [1], "worker_index": 0}
    process, events = start_child(load_in_child, "avatar", options)
    try:
        wait_for(events, ("loaded", "", 1.0))
        process.join(CHILD_START_TIMEOUT_S)
        assert process.exitcode == 0
    finally:
        stop_child(process)


def test_load_hang_blocks_until_sigterm():
    process, events = start_child(load_in_child, "avatar", {"load_hang": True, "load_s": 0.2})
    try:
        wait_for(events, ("progress", "weights", 0.5))
        time.sleep(1.0)
        assert process.is_alive()
        assert drain(events) == []  # no further progress: it is stuck
        process.terminate()  # SIGTERM
        process.join(10)
        assert process.exitcode == -signal.SIGTERM
    finally:
        stop_child(process)


def test_crash_at_frame_dies_after_the_earlier_frames():
    process, events = start_child(render_in_child, {"crash_at_frame": 3, "crash_delay_s": 0.5})
    try:
        wait_for(events, ("loaded", "", 1.0))
        process.join(CHILD_START_TIMEOUT_S)
        assert process.exitcode == 70
        frames = [int(value) for kind, _, value in drain(events) if kind == "frame"]
        assert frames == [0, 1, 2]
    finally:
        stop_child(process)


def test_hang_at_frame_blocks_until_sigkill():
    process, events = start_child(render_in_child, {"hang_at_frame": 2})
    try:
        seen = wait_for(events, ("frame", "", 1))
        assert [value for kind, _, value in seen if kind == "frame"] == [0, 1]
        time.sleep(1.0)
        assert process.is_alive()
        assert drain(events) == []
        process.kill()  # SIGKILL
        process.join(10)
        assert process.exitcode == -signal.SIGKILL
    finally:
        stop_child(process)
