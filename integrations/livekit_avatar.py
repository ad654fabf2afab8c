"""LiveKit Agents adapter: an avatard live session as the avatar's `VideoGenerator`.

In LiveKit Agents an avatar is a participant of its own in the room. The agent's TTS audio
reaches it through an `AudioReceiver` (`DataStreamAudioReceiver` over the room, or
`QueueAudioOutput` inside one process); `AvatarRunner` pushes that audio into a
`VideoGenerator`, publishes what the generator yields (through its `AVSynchronizer`) and
reports playback back to the agent. `AvatardVideoGenerator` is that generator, backed by
one avatard live session (docs/protocol.md, "Live sessions"):

| framework                          | avatard live session                              |
|------------------------------------|---------------------------------------------------|
| `push_audio(rtc.AudioFrame)`       | `live_audio` to the current segment               |
| `push_audio(AudioSegmentEnd)`      | `live_end` of it (the next audio opens a new one) |
| `clear_buffer()`                   | `live_interrupt`                                  |
| yields `rtc.VideoFrame`            | every `frame` (idle ones too), RGB24              |
| yields `rtc.AudioFrame`            | the `audio` of a frame that carries speech        |
| yields `AudioSegmentEnd`           | `playback_finished` of a segment                  |

Why no audio is yielded while idle: `AvatarRunner` takes every audio frame it forwards as
playback of the agent's current speech (playback started at the first one, the position is
their summed duration), so the silence a session sends between segments must not reach
it; the room's audio track is silent by itself when nothing is pushed. The frames still
come at the session's fps, so the avatar keeps moving.

Playback notifications are made by `AvatarRunner` from what this generator yields:
started at a segment's first audio frame, finished (not interrupted, position = the audio
yielded) at its `AudioSegmentEnd`; on `clear_buffer` the runner itself reports finished,
interrupted, with the position so far. So a segment cut by `clear_buffer` yields nothing
more (neither audio nor `AudioSegmentEnd`), or the agent would hear of it twice. A
segment the daemon cut by itself (its worker was lost, `session_moved`; or the session
closed) yields `AudioSegmentEnd`, so the agent never waits for a playback that cannot end.
Segments queued back to back share the frame period where one ends and the next begins:
its audio frame counts toward the first, whose `AudioSegmentEnd` follows it. (LiveKit
Agents plays one speech at a time, waiting for its playout before the next.)

Ownership: the generator does not own its session; whoever opened it closes it
(`async with client.live(...) as session`). Iteration ends at the session's `done`; the
session's errors (`JobFailedError`, `DaemonUnavailable`) are raised from it. Every wait is
the `AsyncClient`'s, bounded by its `timeout_s`, and `run_in_room` bounds its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from livekit import rtc
from livekit.agents import utils
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    DataStreamAudioReceiver,
    VideoGenerator,
)

from avatard.ipc.async_client import AsyncClient, AsyncLiveSession
from avatard.ipc.client import (
    AudioEvent,
    FrameEvent,
    InputRefusedEvent,
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
    SessionMovedEvent,
)

from .pcm import float_to_int16, int16_to_float_mono, send_pcm

__all__ = ["AvatardVideoGenerator", "run_in_room"]

log = logging.getLogger("avatard.livekit")
# How long clear_buffer waits for the consumer to finish with the item it holds: an audio
# frame in an AVSynchronizer waits at most its queue (100 ms by default) of realtime.
HANDOVER_TIMEOUT_S = 2.0


class AvatardVideoGenerator(VideoGenerator):
    """A LiveKit Agents `VideoGenerator` backed by the avatard live session `session`.

    Yields, at the session's fps: `rtc.VideoFrame` (RGB24, the session's width x height,
    one per `frame` event, idle ones included), after each frame that carries speech its
    `rtc.AudioFrame` (int16 mono at the session's `audio_rate`, `audio_rate / fps`
    samples), and `AudioSegmentEnd` when a segment has played out. Segments sent to the
    daemon are named ``<segment_prefix>-<n>``, n from 1. One task iterates it; any task
    may call `push_audio` and `clear_buffer`. See the module for the mapping and why.
    """

    def __init__(self, session: AsyncLiveSession, segment_prefix: str = "lk"):
        self.session = session
        self._prefix = segment_prefix
        self._segments_opened = 0
        self._receiving: str | None = None  # the segment that push_audio appends to
        # Segments numbered up to this one were cut by clear_buffer: the runner reported
        # their end itself, so their audio and end are not yielded.
        self._cleared_through = 0
        # Segments whose speech the frames carry now, oldest first: two when one ends
        # within the frame period where the next one begins.
        self._playing: list[str] = []
        # Events read before iteration began (avatar_options waiting for the first frame),
        # with their arrays copied: their slots went back to the daemon.
        self._early: deque[Any] = deque()
        self._iterating = False
        # Clear while the consumer holds an item it has not finished with: AvatarRunner
        # adds an audio frame to the playback position only once its synchronizer took
        # it (which waits for realtime), so clear_buffer waits for that, or the frame
        # would count as the start of a new playback after the runner's reset.
        self._handed_over = asyncio.Event()
        self._handed_over.set()

    # ----------------------------------------------------------------- size and rate

    async def avatar_options(self) -> AvatarOptions:
        """The `AvatarOptions` an `AvatarRunner` needs for this session: its frame size,
        fps and audio rate, mono. They come from the session's `accepted`; when the daemon
        accepted it before any worker had loaded (all 0), this reads the session's first
        frame and audio chunk for them (each wait bounded by the client's `timeout_s`;
        the events are kept and yielded first). Raises `RuntimeError` when the session
        ends before its first frame."""
        s = self.session
        width, height, fps, rate = s.width, s.height, s.fps, s.audio_rate
        if not (width and height and fps and rate):
            if self._iterating:
                raise RuntimeError("avatar_options() must come before iterating the generator")
            frame, audio = await self._read_first_frame()
            height, width = frame.array.shape[:2]
            rate = audio.sample_rate
            # An audio chunk is exactly one frame period: audio_rate / fps samples.
            fps = round(rate / audio.pcm.size)
        return AvatarOptions(
            video_width=width,
            video_height=height,
            video_fps=fps,
            audio_sample_rate=rate,
            audio_channels=1,
        )

    async def _read_first_frame(self) -> tuple[FrameEvent, AudioEvent]:
        frame: FrameEvent | None = None
        async for event in self.session:
            if isinstance(event, FrameEvent):
                event = dataclasses.replace(event, array=event.array.copy())
                frame = event
            elif isinstance(event, AudioEvent):
                event = dataclasses.replace(event, pcm=event.pcm.copy())
            self._early.append(event)
            if isinstance(event, AudioEvent) and frame is not None:
                return frame, event
        raise RuntimeError(f"live session {self.session.job_id} ended before its first frame")

    # ----------------------------------------------------------------- input

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        """Send one frame of the agent's speech (int16 PCM, any rate and channel count;
        channels are averaged) to the current segment, opening a new segment after an
        `AudioSegmentEnd` or `clear_buffer`; `AudioSegmentEnd` ends the current segment
        (`live_end`). Returns once sent; the daemon's refusals arrive as logged
        `InputRefusedEvent`s. Raises `ClientError` when the client cannot send."""
        if isinstance(frame, AudioSegmentEnd):
            segment, self._receiving = self._receiving, None
            if segment is not None:
                await self.session.end_segment(segment)
            return
        if frame.samples_per_channel == 0:
            return  # nothing to play; the daemon refuses empty chunks
        if self._receiving is None:
            self._segments_opened += 1
            self._receiving = f"{self._prefix}-{self._segments_opened}"
        pcm = int16_to_float_mono(frame.data, frame.num_channels)
        await send_pcm(self.session, pcm, frame.sample_rate, self._receiving)

    async def clear_buffer(self) -> None:
        """Barge-in: `live_interrupt`. Every segment sent so far is dropped by the daemon
        (the avatar returns to rest from the next frame); none of them yields anything
        more. The next audio opens a new segment."""
        # Before the send: events read meanwhile must already see the segments as cut.
        self._cleared_through = self._segments_opened
        self._receiving = None
        self._playing.clear()
        await self.session.interrupt()
        if not self._handed_over.is_set():
            try:
                await asyncio.wait_for(self._handed_over.wait(), HANDOVER_TIMEOUT_S)
            except TimeoutError:
                log.warning(
                    "live session %s: the consumer did not come back for the next item "
                    "within %g s of clear_buffer; its playback position may be off by one "
                    "frame",
                    self.session.job_id,
                    HANDOVER_TIMEOUT_S,
                )

    # ----------------------------------------------------------------- output

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        self._iterating = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        try:
            async for item in self._items():
                self._handed_over.clear()
                yield item
                self._handed_over.set()  # the consumer asks for the next one
        finally:
            self._handed_over.set()

    async def _items(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        session = self.session
        while True:
            if self._early:
                event = self._early.popleft()
            else:
                try:
                    event = await session.__anext__()
                except StopAsyncIteration:
                    return
            if isinstance(event, FrameEvent):
                height, width = event.array.shape[:2]
                # tobytes copies: the frame's slot goes back when the next event is read.
                yield rtc.VideoFrame(
                    width, height, rtc.VideoBufferType.RGB24, event.array.tobytes()
                )
            elif isinstance(event, AudioEvent):
                if self._playing:
                    pcm16 = float_to_int16(event.pcm)
                    yield rtc.AudioFrame(pcm16.tobytes(), event.sample_rate, 1, pcm16.size)
            elif isinstance(event, PlaybackStartedEvent):
                if not self._was_cleared(event.segment_id):
                    self._playing.append(event.segment_id)
            elif isinstance(event, PlaybackFinishedEvent):
                if event.segment_id in self._playing:
                    self._playing.remove(event.segment_id)
                    if event.interrupted:
                        log.warning(
                            "live session %s: the daemon cut segment %s short at "
                            "%.2f s (see session_moved); reported as ended",
                            session.job_id,
                            event.segment_id,
                            event.position_s,
                        )
                    yield AudioSegmentEnd()
            elif isinstance(event, InputRefusedEvent):
                log.warning(
                    "live session %s refused %s (request %d): %s: %s: %s",
                    session.job_id,
                    event.what,
                    event.req_id,
                    event.code,
                    event.field,
                    event.rule,
                )
            elif isinstance(event, SessionMovedEvent):
                # Input for the segments known so far is refused from now on.
                self._receiving = None
                log.warning(
                    "live session %s moved to another worker (%s); %d frames lost",
                    session.job_id,
                    event.reason,
                    event.frames_lost,
                )

    def _was_cleared(self, segment_id: str) -> bool:
        prefix, _, number = segment_id.rpartition("-")
        return prefix == self._prefix and number.isdigit() and int(number) <= self._cleared_through


async def run_in_room(
    url: str,
    token: str,
    endpoint: str,
    *,
    avatar: str = "",
    avatar_image: bytes | None = None,
    seed: int = 0,
    prebuffer_ms: int = 0,
    agent_identity: str | None = None,
    connect_timeout_s: float = 30.0,
    agent_timeout_s: float = 120.0,
    timeout_s: float = 30.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Be the avatar of a LiveKit room: join `url` with `token` (the avatar's identity
    and grants are in the token), open a live session at the daemon `endpoint` (portrait
    `avatar`, an avatar id; or `avatar_image`, encoded image bytes registered for the
    call; motion `seed`, jitter buffer `prebuffer_ms`), receive the agent's audio
    over the room's data streams (`DataStreamAudioReceiver`, from the participant
    `agent_identity`, default: the first agent to join) and publish the session's video
    and audio with `AvatarRunner`. Runs until the room disconnects, the session ends or
    `stop` is set (SIGINT and SIGTERM set it when none is given); then closes the runner,
    the session and the room.

    Raises `TimeoutError` naming what it waited for when the room does not connect within
    `connect_timeout_s` or no agent joins within `agent_timeout_s`; `rtc.ConnectError`
    when the room refuses the connection; the client's errors (`ClientError`,
    `DaemonUnavailable`, each wait bounded by `timeout_s`)."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    room = rtc.Room()
    disconnected = asyncio.Event()
    room.on("disconnected", lambda *_: disconnected.set())
    try:
        try:
            await asyncio.wait_for(room.connect(url, token), connect_timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"the LiveKit room at {url} did not connect within {connect_timeout_s:g} s"
            ) from None
        log.info("joined room %s as %s", room.name, room.local_participant.identity)
        # The session opens only once the agent is there: frames nobody reads would be
        # dropped, and slots held past timeouts.client_call_s would end the session.
        waiting = asyncio.ensure_future(
            utils.wait_for_participant(
                room,
                identity=agent_identity,
                kind=None if agent_identity else rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
            )
        )
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {waiting, stopping}, timeout=agent_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (waiting, stopping):
                task.cancel()
            await asyncio.gather(waiting, stopping, return_exceptions=True)
        if stop.is_set():
            return
        if waiting.cancelled():
            who = agent_identity or "an agent participant"
            raise TimeoutError(f"{who} did not join room {room.name} within {agent_timeout_s:g} s")
        agent = waiting.result()
        async with (
            AsyncClient(endpoint, timeout_s=timeout_s) as client,
            client.live(
                avatar=await client.register_avatar(avatar_image) if avatar_image else avatar,
                seed=seed,
                prebuffer_ms=prebuffer_ms,
            ) as session,
        ):
            generator = AvatardVideoGenerator(session)
            options = await generator.avatar_options()
            receiver = DataStreamAudioReceiver(room, sender_identity=agent.identity)
            runner = AvatarRunner(room, audio_recv=receiver, video_gen=generator, options=options)
            try:
                # The agent is in the room already, so this returns at once.
                await asyncio.wait_for(runner.start(), timeout_s)
            except BaseException as exc:
                # The runner's aclose() needs a started runner: close the receiver only.
                await receiver.aclose()
                if isinstance(exc, TimeoutError):
                    raise TimeoutError(
                        f"the avatar runner did not start within {timeout_s:g}"
                        f" s (agent {agent.identity} in room {room.name})"
                    ) from None
                raise
            try:
                log.info(
                    "live session %s for agent %s: %dx%d at %g fps",
                    session.job_id,
                    agent.identity,
                    options.video_width,
                    options.video_height,
                    options.video_fps,
                )
                await _run_until_first(runner.wait_for_complete(), disconnected.wait(), stop.wait())
            finally:
                await runner.aclose()
    finally:
        await room.disconnect()


async def _run_until_first(*waits: Any) -> None:
    """Run the coroutines `waits` until the first of them ends (its error is raised);
    cancel the others. Each is a wait with no end of its own by design (a room, a stop
    signal): the first to end is the reason to stop."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
