"""Live streams of the CPU avatar engines (`open_stream(..., live=True)`):
fed a frame of audio per tick forever, the look-ahead they state, and barge-in
(`interrupt()`). Ditto's live streams are tested with the other Ditto stream tests
(test_ditto_motion_gen.py)."""

from __future__ import annotations

import numpy as np
import pytest

from avatard.engines.base import (
    AvatarState,
    AvatarStream,
    EngineInputError,
    frame_start_sample,
    frames_with_audio,
)
from avatard.engines.fake import (
    FakeAvatarEngine,
    expected_frame,
    frame_audio_level_of,
    frame_index_of,
)

SAMPLES_PER_FRAME = 640  # 16 kHz at 25 fps, both engines' defaults


def tone(frames: int, hz: float = 500.0, amplitude: float = 0.5) -> np.ndarray:
    """A vowel-like tone (first-formant band, where the embedded engine opens the mouth
    most), `frames` frames long."""
    t = np.arange(frames * SAMPLES_PER_FRAME) / 16000.0
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def push_per_frame(stream: AvatarStream, pcm: np.ndarray) -> list[list[np.ndarray]]:
    """Push `pcm` one frame of audio per call, as the live clock does: the frames each
    call returned."""
    assert len(pcm) % SAMPLES_PER_FRAME == 0
    return [list(stream.push(pcm[i : i + SAMPLES_PER_FRAME]))
            for i in range(0, len(pcm), SAMPLES_PER_FRAME)]


def flat(per_push: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [frame for frames in per_push for frame in frames]


def appearance(per_push: list[list[np.ndarray]]) -> list[int]:
    """For each frame k in order, the index of the push that returned it."""
    return [push for push, frames in enumerate(per_push) for _ in frames]


def assert_same_frames(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x, y), f"frame {k} differs"


# ---------------------------------------------------------------------------- fake


@pytest.fixture(scope="module")
def fake() -> FakeAvatarEngine:
    return FakeAvatarEngine("cpu", {"width": 16, "height": 8})


def test_fake_live_stream_fed_silence_gives_one_frame_per_frame_of_audio(fake) -> None:
    stream = fake.open_stream(fake.register(b"face"), 9, live=True)
    assert stream.live and stream.lookahead_frames == 0
    per_push = push_per_frame(stream, np.zeros(2000 * SAMPLES_PER_FRAME, np.float32))
    assert [len(frames) for frames in per_push] == [1] * 2000
    frames = flat(per_push)
    assert [frame_index_of(f) for f in frames] == list(range(2000))
    # Silence: audio level 0 in the header, the rest of the frame as every fake frame.
    assert all(np.array_equal(f, expected_frame(9, k, 8, 16, audio_level=0))
               for k, f in enumerate(frames))


def test_fake_lookahead_is_what_push_does(fake) -> None:
    stream = fake.open_stream(fake.register(b"face"), 1, live=True)
    per_push = push_per_frame(stream, tone(50))
    assert appearance(per_push) == [k + stream.lookahead_frames for k in range(50)]
    # A frame waits for the last sample of its audio.
    assert list(stream.push(np.zeros(SAMPLES_PER_FRAME - 1, np.float32))) == []
    assert len(stream.push(np.zeros(1, np.float32))) == 1


def test_fake_interrupt_silences_the_frame_not_yet_returned(fake) -> None:
    state = fake.register(b"face")
    speech = tone(10)
    partial = tone(1)[:300]  # a barge-in lands 300 samples into frame 10

    stream = fake.open_stream(state, 4, live=True)
    before = flat(push_per_frame(stream, speech)) + list(stream.push(partial))
    assert stream.interrupt() == 1  # frame 10: its first 300 samples become zeros
    after = list(stream.push(np.zeros(SAMPLES_PER_FRAME - 300, np.float32)))
    after += flat(push_per_frame(stream, np.zeros(20 * SAMPLES_PER_FRAME, np.float32)))
    assert stream.interrupt() == 0  # every pushed frame already returned

    # The same stream fed zeros for the interrupted audio, never interrupted.
    reference = fake.open_stream(state, 4, live=True)
    zeros = np.zeros(SAMPLES_PER_FRAME + 20 * SAMPLES_PER_FRAME, np.float32)
    expected = flat(push_per_frame(reference, np.concatenate([speech, zeros])))
    assert_same_frames(before + after, expected)
    assert [frame_index_of(f) for f in before + after] == list(range(31))
    assert all(frame_audio_level_of(f) == 128 for f in before)  # round(255 * 0.5)
    assert all(frame_audio_level_of(f) == 0 for f in after)

    # Not interrupted, frame 10 would carry the speech.
    plain = fake.open_stream(state, 4, live=True)
    plain.push(np.concatenate([speech, partial]))
    assert frame_audio_level_of(plain.push(np.zeros(340, np.float32))[0]) > 0


@pytest.mark.parametrize(("audio_rate", "fps"), [(16000, 25), (1000, 3), (22050, 30)])
def test_frame_audio_bounds_agree(audio_rate: int, fps: int) -> None:
    starts = [frame_start_sample(k, audio_rate, fps) for k in range(12)]
    for n in range(0, starts[-1]):
        assert frames_with_audio(n, audio_rate, fps) == sum(start < n for start in starts)


def test_fake_interrupt_counts_frames_at_any_rate() -> None:
    engine = FakeAvatarEngine("cpu", {"width": 16, "height": 8, "audio_rate": 1000, "fps": 3})
    stream = engine.open_stream(engine.register(b"face"), 2, live=True)
    assert len(stream.push(tone(2)[:334])) == 1  # frame 0 is samples 0..333
    assert stream.interrupt() == 0  # frame 1 starts at sample 334: no audio of it yet
    stream.push(np.full(1, 0.5, np.float32))
    assert stream.interrupt() == 1
    frames = stream.push(np.zeros(333, np.float32))
    assert [frame_audio_level_of(f) for f in frames] == [0]


def test_fake_interrupt_needs_a_live_unfinished_stream(fake) -> None:
    state = fake.register(b"face")
    with pytest.raises(RuntimeError, match="live"):
        fake.open_stream(state, 1).interrupt()
    stream = fake.open_stream(state, 1, live=True)
    stream.push(np.zeros(700, np.float32))
    stream.finish()
    with pytest.raises(RuntimeError, match="finish"):
        stream.interrupt()
    # Frames of streams that are not live stay a function of (seed, index) alone.
    plain = fake.open_stream(state, 1)
    assert np.array_equal(plain.push(tone(1))[0], expected_frame(1, 0, 8, 16))


# ---------------------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def embedded():
    pytest.importorskip("cv2")
    from avatard.engines.embedded.avatar import EmbeddedAvatarEngine, default_portrait

    engine = EmbeddedAvatarEngine("cpu", {"warmup": False})
    return engine, engine.register(default_portrait())


def test_embedded_live_stream_fed_silence_gives_one_frame_per_frame_of_audio(embedded) -> None:
    engine, state = embedded
    stream = engine.open_stream(state, 5, live=True)
    lookahead = stream.lookahead_frames
    silence = np.zeros(300 * SAMPLES_PER_FRAME, np.float32)
    per_push = push_per_frame(stream, silence)
    assert [len(frames) for frames in per_push] == [0] * lookahead + [1] * (300 - lookahead)
    # Frame k of the live stream is frame k of the same audio rendered in one piece:
    # nothing skipped, repeated or reordered.
    whole = list(engine.render(state, silence, seed=5))
    assert_same_frames(flat(per_push), whole[: 300 - lookahead])


def test_embedded_lookahead_is_what_push_does(embedded) -> None:
    engine, state = embedded
    stream = engine.open_stream(state, 0, live=True)
    assert stream.lookahead_frames == 2  # 832 samples past the frame's end
    per_push = push_per_frame(stream, tone(60))
    assert appearance(per_push) == [k + 2 for k in range(58)]


def _mouth_darkness(frame: np.ndarray, state) -> float:
    """Share of dark pixels around the lip line (an open mouth is dark inside)."""
    rig = state.payload.rig
    x, y = rig.landmarks.mouth_center
    half = rig.landmarks.mouth_half_width
    region = frame[int(y - 8) : int(y + 30), int(x - half) : int(x + half)]
    luminance = region.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float((luminance < 70).mean())


def test_embedded_interrupt_before_the_speech_was_read_equals_silence(embedded) -> None:
    """Speech that no returned frame read (the last 448 samples pushed) is silenced:
    the stream renders exactly what a stream fed zeros there renders."""
    engine, state = embedded
    audio = np.zeros(11 * SAMPLES_PER_FRAME, np.float32)
    audio[-448:] = tone(1)[-448:]  # read only by frames 9 and 10, not returned yet
    tail = np.zeros(40 * SAMPLES_PER_FRAME, np.float32)

    stream = engine.open_stream(state, 3, live=True)
    frames = flat(push_per_frame(stream, audio))
    assert len(frames) == 9
    assert stream.interrupt() == 2  # frames 9 and 10
    frames += flat(push_per_frame(stream, tail))

    silent = engine.open_stream(state, 3, live=True)
    expected = flat(push_per_frame(silent, np.concatenate([np.zeros_like(audio), tail])))
    assert_same_frames(frames, expected)

    # Without the interrupt the speech opens the mouth in frame 9.
    plain = engine.open_stream(state, 3, live=True)
    spoken = flat(push_per_frame(plain, np.concatenate([audio, tail])))
    assert not np.array_equal(spoken[9], expected[9])


def test_embedded_interrupt_mid_speech_silences_every_frame_not_returned(embedded) -> None:
    """Barge-in in the middle of speech: what happens next depends only on the audio the
    returned frames read (up to 832 samples into frame F), never on the rest of the
    pushed audio; the mouth closes from where it was, to rest."""
    engine, state = embedded
    speech = tone(30)
    tail = np.zeros(60 * SAMPLES_PER_FRAME, np.float32)
    returned_read = (30 - 2) * SAMPLES_PER_FRAME + 832  # frames 0..27 returned

    def interrupted(pushed: np.ndarray) -> list[np.ndarray]:
        stream = engine.open_stream(state, 8, live=True)
        frames = flat(push_per_frame(stream, pushed))
        assert len(frames) == 28
        assert stream.interrupt() == 2
        return frames + flat(push_per_frame(stream, tail))

    frames = interrupted(speech)
    # The same stream fed zeros for the audio no returned frame read, interrupted at the
    # same point: identical from the first frame to the last.
    other = speech.copy()
    other[returned_read:] = 0.0
    assert_same_frames(frames, interrupted(other))
    # ... and fed different speech there: identical too.
    other[returned_read:] = tone(30, hz=800.0)[returned_read:]
    assert_same_frames(frames, interrupted(other))

    rest = _mouth_darkness(flat(push_per_frame(engine.open_stream(state, 8, live=True),
                                               tail))[-1], state)
    speaking = _mouth_darkness(frames[27], state)
    closing = [_mouth_darkness(f, state) for f in frames[28:40]]
    assert speaking > rest + 0.05
    assert max(closing[2:]) <= rest + 0.01  # at rest on the third frame (0.12 s) and after
    # Closing, not cut: the darkness falls frame by frame (head sway moves it by a hair).
    assert all(b <= a + 0.005 for a, b in zip(closing, closing[1:], strict=False))
    assert closing[0] > closing[-1] + 0.05


def _eye_darkness(frame: np.ndarray, state) -> float:
    """Share of dark pixels (iris, pupil, lashes) in a box around each eye, the smaller of
    the two: a blink covers them with lid skin. The boxes reach 8 px past the eye, so the
    head sway (a few px) keeps each eye inside its box."""
    shares = []
    for eye in (state.payload.rig.landmarks.left_eye, state.payload.rig.landmarks.right_eye):
        x, y = eye.center
        reach_x, reach_y = eye.half_width + 8, eye.half_height + 8
        box = frame[int(y - reach_y) : int(y + reach_y), int(x - reach_x) : int(x + reach_x)]
        shares.append(float((box.astype(np.float32).mean(axis=2) < 90).mean()))
    return min(shares)


def _live_run(engine, state, seed: int, pcm: np.ndarray, interrupt_after: int | None = None
              ) -> tuple[list[np.ndarray], list]:
    """Push `pcm` a frame per call into a live stream, calling interrupt() after the push
    of index `interrupt_after` when given: (frames, the pose each frame was drawn in)."""
    stream = engine.open_stream(state, seed, live=True)
    frames, poses = [], []
    for push, start in enumerate(range(0, len(pcm), SAMPLES_PER_FRAME)):
        returned = stream.push(pcm[start : start + SAMPLES_PER_FRAME])
        assert len(returned) <= 1
        frames += returned
        poses += [stream.last_pose] * len(returned)
        if push == interrupt_after:
            stream.interrupt()
    return frames, poses


def test_embedded_live_idle_blinks_breathes_and_sways_with_the_mouth_shut(embedded) -> None:
    """10 s of silence: the eyes blink (shut, then open again), head and shoulders keep
    moving, and the mouth stays as in the photo."""
    engine, state = embedded
    frames, poses = _live_run(engine, state, 4, np.zeros(252 * SAMPLES_PER_FRAME, np.float32))
    assert len(frames) == 250

    eyes = np.array([_eye_darkness(frame, state) for frame in frames])
    open_eyes = float(np.median(eyes))
    assert open_eyes > 0.1
    shut = np.flatnonzero(eyes < 0.4 * open_eyes)
    blinks = [k for k in shut if k - 1 not in shut]  # first shut frame of each blink
    assert len(blinks) >= 1
    for k in blinks:
        if k >= 6 and k + 6 < len(frames):
            # The eye was open before and opens again within 6 frames (240 ms).
            assert eyes[k - 6] > 0.8 * open_eyes
            assert max(eyes[k + 1 : k + 7]) > 0.8 * open_eyes

    # Head and shoulders move: no two consecutive frames are equal, and over the 10 s the
    # face region drifts well away from where it started.
    assert not any(np.array_equal(a, b) for a, b in zip(frames, frames[1:], strict=False))
    x, y, w, h = (int(v) for v in state.payload.rig.landmarks.face_box)
    drift = [np.abs(frame[y : y + h, x : x + w].astype(np.float32)
                    - frames[0][y : y + h, x : x + w]).mean() for frame in frames]
    assert max(drift) > 10.0
    # Breathing: at least two breaths in 10 s (12-20 a minute), each a rise of 1-3 px that
    # falls back to 0.
    breath = np.array([pose.breath_px for pose in poses])
    assert 1.0 < breath.max() < 3.0 and breath.min() == 0.0
    inhales = np.flatnonzero((breath[1:] > 0.0) & (breath[:-1] == 0.0))
    assert len(inhales) >= 2

    # The mouth is shut throughout: no drive, and the lips look as in the photo.
    assert all(pose.mouth_open == 0.0 for pose in poses)
    rest = _mouth_darkness(state.payload.rig.portrait, state)
    assert max(_mouth_darkness(frame, state) for frame in frames) <= rest + 0.01


def test_embedded_live_frames_are_a_function_of_seed_audio_and_interrupts(embedded) -> None:
    """The same seed, audio and interrupt position give the same frames bit for bit
    (blinks, breathing and sway included); another seed moves differently."""
    from avatard.engines.embedded.avatar import speech_like_signal

    engine, state = embedded
    pcm = np.concatenate([speech_like_signal(2.0, seed=5),
                          np.zeros(100 * SAMPLES_PER_FRAME, np.float32)])
    first, _ = _live_run(engine, state, 7, pcm, interrupt_after=30)
    again, _ = _live_run(engine, state, 7, pcm, interrupt_after=30)
    assert_same_frames(first, again)
    other, _ = _live_run(engine, state, 8, pcm, interrupt_after=30)
    differing = sum(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert differing >= 0.9 * len(first)
    # The interrupt position is part of the input: elsewhere, other frames.
    later, _ = _live_run(engine, state, 7, pcm, interrupt_after=35)
    assert not np.array_equal(first[33], later[33])


def test_embedded_interrupt_closes_the_mouth_in_three_frames_without_a_jump(embedded) -> None:
    """Barge-in at the widest opening of a stretch of speech: the mouth drive reaches 0 on
    the third frame after the cut, and no step of the closing mouth (drive or pixels) is
    larger than the largest frame-to-frame step of the speech itself."""
    from avatard.engines.embedded.avatar import OPEN_RELEASE, speech_like_signal

    engine, state = embedded
    speech = speech_like_signal(4.0, seed=2)
    silence = np.zeros(12 * SAMPLES_PER_FRAME, np.float32)
    spoken, spoken_poses = _live_run(engine, state, 4, np.concatenate([speech, silence]))
    spoken_drive = [pose.mouth_open for pose in spoken_poses]
    spoken_darkness = [_mouth_darkness(frame, state) for frame in spoken]
    # Speech still opens the mouth, as before: the drive and the dark gap between the lips.
    rest = _mouth_darkness(state.payload.rig.portrait, state)
    widest = int(np.argmax(spoken_drive[:90]))
    assert spoken_drive[widest] > 0.3
    assert spoken_darkness[widest] > rest + 0.05

    # Interrupt once frame `widest` (F - 1) is returned: with the look-ahead of 2 that is
    # after the push of frame widest + 2's audio.
    cut = widest + 1  # F, the first frame after the barge-in
    pushed = (widest + 3) * SAMPLES_PER_FRAME
    frames, poses = _live_run(engine, state, 4, np.concatenate([speech[:pushed], silence]),
                              interrupt_after=widest + 2)
    assert_same_frames(frames[:cut], spoken[:cut])
    drive = [pose.mouth_open for pose in poses[widest : cut + 6]]
    assert drive[1] > 0.0 and drive[2] > 0.0  # closing over frames F and F + 1 ...
    assert drive[3:] == [0.0] * 4  # ... at rest from frame F + 2 on (to F + 5)
    assert all(pose.lip_spread == 0.0 for pose in poses[cut + 2 : cut + 6])
    steps = np.abs(np.diff(drive))
    # Smaller than the one-pole release step from that opening, and than the speech's own
    # largest step (opening or closing).
    assert steps.max() <= OPEN_RELEASE * drive[0]
    assert steps.max() <= np.abs(np.diff(spoken_drive)).max()

    # Pixels: the closing mouth's steps are within the speech's own (a hair of tolerance:
    # the head sway moves the measured region), and from frame F + 2 on it looks as in the
    # photo, where the plain release (the speech simply stopping there) is still open.
    darkness = [_mouth_darkness(frame, state) for frame in frames[widest : cut + 6]]
    assert np.abs(np.diff(darkness)).max() <= np.abs(np.diff(spoken_darkness)).max() + 0.005
    assert max(darkness[3:]) <= rest + 0.01
    stopped_audio = np.concatenate([speech[:pushed], silence])
    stopped_audio[cut * SAMPLES_PER_FRAME + 832 :] = 0.0  # from the first sample not read
    stopped, _ = _live_run(engine, state, 4, stopped_audio)
    assert _mouth_darkness(stopped[cut + 2], state) > rest + 0.02


def test_embedded_interrupt_needs_a_live_unfinished_stream(embedded) -> None:
    engine, state = embedded
    with pytest.raises(RuntimeError, match="live"):
        engine.open_stream(state, 1).interrupt()
    stream = engine.open_stream(state, 1, live=True)
    assert stream.interrupt() == 0  # nothing pushed yet
    stream.push(np.zeros(100, np.float32))
    assert stream.interrupt() == 1
    list(stream.finish())
    with pytest.raises(RuntimeError, match="finish"):
        stream.interrupt()
    with pytest.raises(EngineInputError):
        engine.open_stream(AvatarState("not-embedded", 8, 8), 1, live=True)
