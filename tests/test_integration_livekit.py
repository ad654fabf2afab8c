"""The LiveKit Agents adapter (`avatard.integrations.livekit_avatar`) against a real daemon
(fake engines) and the framework's own objects: `AvatarRunner`, `QueueAudioOutput` (the
agent's audio output and the runner's `AudioReceiver` in one process), `rtc.AudioFrame`,
`rtc.VideoFrame`, and the runner's real `AVSynchronizer`, audio and video sources.

No LiveKit server can run here, so no room is joined: the runner gets `RoomWithoutServer`,
which stands in for a connected room (it accepts the two track publications and nothing
else). Everything else is real. No timing assertions: counts, order and contents; every
wait is bounded and names what it waited for."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable

import numpy as np
import pytest

if os.environ.get("AVATARD_EXPECT_INSTALLED") != "1":
    # CI installs the extra: a skip there would hide a broken install.
    pytest.importorskip("livekit.agents", reason="needs the `livekit` extra")

from daemon_harness import AVATARD, free_port, run_daemon
from livekit import rtc
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarRunner,
    QueueAudioOutput,
    VideoGenerator,
)
from livekit.agents.voice.io import PlaybackFinishedEvent
from test_live import FPS, RATE, RINGS, SIZE, TICK

from avatard.engines.fake import audio_level, frame_audio_level_of, frame_index_of
from avatard.integrations.livekit_avatar import AvatardVideoGenerator
from avatard.ipc.async_client import AsyncClient

FAKE = {"width": SIZE, "height": SIZE}
WAIT_S = 30.0  # bound of every wait of a test step; far above what a step needs


async def bounded(awaitable, what: str, timeout_s: float = WAIT_S):
    """`await awaitable`, failing the test with `what` after `timeout_s`."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        pytest.fail(f"waited {timeout_s:g} s for {what}")


def pcm16_frame(pcm: np.ndarray, rate: int = RATE, channels: int = 1) -> rtc.AudioFrame:
    """An `rtc.AudioFrame` of float PCM in [-1, 1] (for `channels` > 1: the same signal on
    every channel, interleaved)."""
    samples = np.rint(pcm * 32768).clip(-32768, 32767).astype(np.int16)
    interleaved = np.repeat(samples, channels)
    return rtc.AudioFrame(interleaved.tobytes(), rate, channels, samples.size)


def agent_frames(
    pcm: np.ndarray, rate: int = RATE, channels: int = 1, frame_s: float = 0.05
) -> list[rtc.AudioFrame]:
    """`pcm` cut into frames of `frame_s` seconds, as a TTS hands them over."""
    step = int(rate * frame_s)
    return [pcm16_frame(pcm[i : i + step], rate, channels) for i in range(0, pcm.size, step)]


class Tap(VideoGenerator):
    """Passes every call to the generator under test and records, in order, what it
    yields (video frames as (index, level), audio frames as int16 arrays, segment ends)
    and when `clear_buffer` was called."""

    def __init__(self, inner: AvatardVideoGenerator):
        self.inner = inner
        self.items: list = []
        self.sizes: set[tuple[int, int, int]] = set()
        self._changed = asyncio.Event()

    async def push_audio(self, frame):
        await self.inner.push_audio(frame)

    async def clear_buffer(self):
        self._note("clear")
        await self.inner.clear_buffer()

    def __aiter__(self):
        return self._stream()

    async def _stream(self):
        async for item in self.inner:
            if isinstance(item, rtc.VideoFrame):
                self.sizes.add((item.width, item.height, item.type))
                array = np.frombuffer(item.data, np.uint8).reshape(item.height, item.width, 3)
                self._note(("video", frame_index_of(array), frame_audio_level_of(array)))
            elif isinstance(item, rtc.AudioFrame):
                assert (item.sample_rate, item.num_channels) == (RATE, 1)
                self._note(("audio", np.frombuffer(item.data, np.int16).copy()))
            else:
                assert isinstance(item, AudioSegmentEnd)
                self._note("end")
            yield item

    def _note(self, item) -> None:
        self.items.append(item)
        self._changed.set()

    async def until(self, predicate: Callable[[list], bool], what: str) -> None:
        async def wait():
            while not predicate(self.items):
                self._changed.clear()
                await self._changed.wait()

        await bounded(wait(), what)

    def count(self, kind: str) -> int:
        return sum(1 for item in self.items if _kind(item) == kind)


def _kind(item) -> str:
    return item if isinstance(item, str) else item[0]


def lip_sync_checked(items: list) -> list[np.ndarray]:
    """Check that every audio frame follows its video frame and carries the audio that
    frame was made from (a fake live frame shows its audio's level); returns the audio."""
    audio = []
    for before, item in zip(items, items[1:], strict=False):
        if _kind(item) != "audio":
            continue
        assert _kind(before) == "video", f"audio frame after {_kind(before)}, not a video frame"
        pcm = item[1].astype(np.float32) / 32768
        assert pcm.size == TICK
        assert audio_level(pcm) == before[2], f"video frame {before[1]} does not show its audio"
        audio.append(item[1])
    return audio


def test_generator_yields_frames_with_their_speech_and_segment_ends(tmp_path):
    first = np.full(RATE // 2, 0.5, np.float32)  # 0.5 s: 12.5 frame periods
    second = (np.sin(np.arange(int(RATE * 0.3)) / 7.0) * 0.25).astype(np.float32)

    async def scenario(endpoint: str):
        async with AsyncClient(endpoint, timeout_s=20) as client, client.live(seed=3) as session:
            generator = AvatardVideoGenerator(session)
            options = await generator.avatar_options()
            tap = Tap(generator)
            reader = asyncio.ensure_future(_drain(tap))
            try:
                await tap.until(lambda items: len(items) >= 5, "5 idle video frames")
                for frame in agent_frames(first):
                    await tap.push_audio(frame)
                await tap.push_audio(AudioSegmentEnd())
                # Stereo: the adapter averages channels (the same signal on both here).
                for frame in agent_frames(second, channels=2):
                    await tap.push_audio(frame)
                await tap.push_audio(AudioSegmentEnd())
                await tap.push_audio(AudioSegmentEnd())  # a stray end opens nothing
                await tap.until(lambda items: items.count("end") == 2, "two segment ends")
                ends = len(tap.items)
                await tap.until(lambda items: len(items) >= ends + 5, "5 frames after them")
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        return options, tap

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        options, tap = asyncio.run(scenario(d.endpoint))

    assert (options.video_width, options.video_height, options.video_fps) == (SIZE, SIZE, FPS)
    assert (options.audio_sample_rate, options.audio_channels) == (RATE, 1)
    assert tap.sizes == {(SIZE, SIZE, rtc.VideoBufferType.RGB24)}
    indices = [item[1] for item in tap.items if _kind(item) == "video"]
    assert indices == list(range(indices[0], indices[0] + len(indices))), "frames skipped"
    audio = lip_sync_checked(tap.items)
    played = np.concatenate(audio)
    # Exactly the speech sent, the second segment right after the first (they share the
    # frame period where one ends and the other begins), then silence to the period's end.
    speech = np.rint(np.concatenate([first, second]) * 32768).astype(np.int16)
    assert len(audio) == -(-speech.size // TICK)
    np.testing.assert_array_equal(played[: speech.size], speech)
    assert not played[speech.size :].any()
    # Each end comes after the audio frame that carried its segment's last sample, and
    # no audio is yielded while idle.
    kinds = [_kind(item) for item in tap.items]
    audio_at = [i for i, kind in enumerate(kinds) if kind == "audio"]
    end_at = [i for i, kind in enumerate(kinds) if kind == "end"]
    assert end_at == [audio_at[-(-first.size // TICK) - 1] + 1, audio_at[-1] + 1]
    idle = kinds[: audio_at[0] - 1] + kinds[end_at[1] + 1 :]
    assert len(kinds) - end_at[1] > 5 and all(kind == "video" for kind in idle)


async def _drain(tap: Tap) -> None:
    async for _ in tap:
        pass


class RoomWithoutServer(rtc.EventEmitter):
    """Stands in for a connected `rtc.Room`, which needs a LiveKit server (none can run
    here): `AvatarRunner` publishes its two tracks on it and the publications report
    themselves subscribed. Records what was published."""

    def __init__(self):
        super().__init__()
        self.local_participant = self
        self.published: list[str] = []

    def isconnected(self) -> bool:
        return True

    async def publish_track(self, track, options):
        self.published.append(track.name)
        return self

    async def wait_for_subscription(self) -> None:
        return None


def test_avatar_runner_reports_playback_and_interrupts(tmp_path):
    said = np.full(RATE * 2 // 5, 0.5, np.float32)  # 0.4 s: 10 frames
    long = np.full(RATE * 3, 0.25, np.float32)  # 3 s: cut short by clear_buffer
    after = np.full(RATE // 5, 0.75, np.float32)  # 0.2 s: 5 frames

    async def scenario(endpoint: str):
        output = QueueAudioOutput(sample_rate=RATE, wait_playback_start=True)
        events: list = []
        output.on("playback_started", lambda ev: events.append("started"))
        output.on("playback_finished", events.append)
        room = RoomWithoutServer()
        async with AsyncClient(endpoint, timeout_s=20) as client, client.live(seed=4) as session:
            generator = AvatardVideoGenerator(session)
            tap = Tap(generator)
            runner = AvatarRunner(
                room, audio_recv=output, video_gen=tap, options=await generator.avatar_options()
            )
            await runner.start()
            try:
                # The agent's side: AudioOutput.capture_frame / flush / clear_buffer.
                for frame in agent_frames(said):
                    await output.capture_frame(frame)
                output.flush()
                first = await bounded(output.wait_for_playout(), "segment 1 played out")
                for frame in agent_frames(long):
                    await output.capture_frame(frame)
                output.flush()
                await tap.until(
                    lambda items: sum(_kind(i) == "audio" for i in items) >= 15,
                    "5 audio frames of segment 2",
                )
                output.clear_buffer()  # barge-in
                second = await bounded(output.wait_for_playout(), "segment 2 reported cut")
                cleared_at = tap.items.index("clear")
                await tap.until(
                    lambda items: len(items) >= cleared_at + 20, "frames after the barge-in"
                )
                for frame in agent_frames(after):
                    await output.capture_frame(frame)
                output.flush()
                third = await bounded(output.wait_for_playout(), "segment 3 played out")
            finally:
                await runner.aclose()
        return events, (first, second, third), tap, cleared_at, room

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        events, finished, tap, cleared_at, room = asyncio.run(scenario(d.endpoint))

    assert room.published == ["avatar_audio", "avatar_video"]
    first, second, third = finished
    assert all(isinstance(ev, PlaybackFinishedEvent) for ev in finished)
    assert (first.interrupted, second.interrupted, third.interrupted) == (False, True, False)
    # Positions: the speech forwarded to the room, frame periods of 40 ms.
    assert first.playback_position == pytest.approx(said.size / RATE)
    assert third.playback_position == pytest.approx(after.size / RATE)
    audio = lip_sync_checked(tap.items)
    levels = [audio_level(a.astype(np.float32) / 32768) for a in audio]
    cut = levels.count(audio_level(long))
    assert 5 <= cut < long.size // TICK
    # Every frame of it yielded before the barge-in counts, also one that the runner's
    # synchronizer was still taking (clear_buffer waits for it).
    assert second.playback_position == pytest.approx(cut / FPS)
    # Started / finished in order, once per segment; one segment end for each segment
    # that played out, none for the one cut short.
    assert [ev if ev == "started" else "finished" for ev in events] == ["started", "finished"] * 3
    assert tap.count("end") == 2
    # Nothing of the cut segment after the barge-in: the next audio is segment 3's.
    after_clear = [item for item in tap.items[cleared_at:] if _kind(item) == "audio"]
    assert {audio_level(a[1].astype(np.float32) / 32768) for a in after_clear} == {
        audio_level(after)
    }


def test_runner_command_says_which_room_it_could_not_join(tmp_path):
    url = f"ws://127.0.0.1:{free_port()}"  # nothing listens there: refused at once
    with run_daemon(tmp_path, fake=FAKE) as d:
        result = subprocess.run(
            [AVATARD, "livekit", "--url", url, "--endpoint", d.endpoint],
            env={**os.environ, "LIVEKIT_TOKEN": "not-a-token"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        status = d.status()
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"Error: could not join the LiveKit room at {url}: " in result.stderr
    assert "not-a-token" not in result.stderr
    # The session opens only after the room and the agent: none was opened.
    assert status["queue"]["running"] == 0 and status["jobs"]["frames_delivered"] == 0
