"""Pipecat adapter: an avatard live session as a video service frame processor.

`AvatardVideoService` goes where Pipecat's avatar services go, between the TTS and the
output transport:

    pipeline = Pipeline([transport.input(), stt, context_aggregator.user(), llm, tts,
                         AvatardVideoService(), transport.output(),
                         context_aggregator.assistant()])

| frame in (downstream)        | avatard live session                                   |
|------------------------------|--------------------------------------------------------|
| `TTSStartedFrame`            | a new segment; the frame is held                       |
| `TTSAudioRawFrame`           | `live_audio` to the segment (not passed on)            |
| `TTSStoppedFrame`            | `live_end` of the segment; the frame is held           |
| `InterruptionFrame`          | `live_interrupt`, then passed on                       |
| any other frame              | passed on                                              |

| session event                | frame out (downstream)                                 |
|------------------------------|--------------------------------------------------------|
| `frame`                      | `OutputImageRawFrame` (RGB, the session's size)        |
| `audio` of a speaking frame  | `TTSAudioRawFrame` (int16 mono, after its image)       |
| `playback_started`           | the segment's held `TTSStartedFrame`                   |
| `playback_finished`          | the segment's held `TTSStoppedFrame`                   |

So downstream sees the speech when the avatar speaks it: each image is followed by the
audio it was made from, between the TTS's own started/stopped frames, and the output
transport's bot-speaking events follow the avatar's mouth, not the TTS. Images that carry
speech have `sync_with_audio` set, so the transport shows each one after the audio before
it has gone out; idle images (the avatar moves between replies, no audio is pushed for
them: the transport sends its own silence) are shown as they come. A segment cut by an
interruption pushes nothing more: no audio and no `TTSStoppedFrame` (the
`InterruptionFrame` already told downstream that the speech stopped).

Lifecycle: `StartFrame` connects to the daemon and opens the session (a failure is pushed
upstream as an `ErrorFrame` that marks the service unusable, so the pipeline worker
applies its `processor_unusable_policy`); `EndFrame` waits until the speech sent so far has
played out (at most `playout_timeout_s`), then closes the session; `CancelFrame` closes
it at once. The service owns its client and session; both are closed by then, and by
`cleanup()`. Every wait on the daemon is bounded by `timeout_s`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from avatard.ipc.async_client import AsyncClient, AsyncLiveSession
from avatard.ipc.client import (
    AudioEvent,
    ClientError,
    FrameEvent,
    InputRefusedEvent,
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
    SessionMovedEvent,
)

from .pcm import float_to_int16, int16_to_float_mono, send_pcm

__all__ = ["AvatardVideoService"]

log = logging.getLogger("avatard.pipecat")


class _Segment:
    """One TTS response as a segment of the session, with the frames held for it."""

    def __init__(self, segment_id: str, started: TTSStartedFrame | None):
        self.segment_id = segment_id
        self.started = started  # pushed at playback_started
        self.stopped: TTSStoppedFrame | None = None  # pushed at playback_finished
        self.context_id = started.context_id if started is not None else None
        self.audio_sent = False


class AvatardVideoService(AIService):
    """A Pipecat frame processor that renders the TTS audio passing through it as an
    avatard live session's video, and pushes the frames and their lip-synced audio.

    Args:
        endpoint: the daemon, ``ipc://PATH`` or ``tcp://HOST:PORT`` (default:
            $AVATARD_ENDPOINT or the local socket).
        avatar: an avatar id (`register_avatar`; default: the engine's portrait).
        seed: seed of blinks and head motion (0: random).
        prebuffer_ms: the session's jitter buffer (docs/protocol.md, `live_open`).
        timeout_s: bound of every wait on the daemon, in seconds.
        playout_timeout_s: how long an `EndFrame` waits for the speech sent so far to
            play out before the session is closed, in seconds.
        **kwargs: passed to Pipecat's `AIService`.

    Out (downstream): `OutputImageRawFrame` (RGB bytes, `size` = (width, height) of the
    session, one per frame period at the session's fps), `TTSAudioRawFrame` (int16 mono
    at the session's `audio_rate`, `audio_rate / fps` samples, after the image it plays
    with), and the TTS's `TTSStartedFrame` / `TTSStoppedFrame` when the avatar starts and
    stops speaking. The module says how each frame is handled.
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        avatar: str = "",
        seed: int = 0,
        prebuffer_ms: int = 0,
        timeout_s: float = 30.0,
        playout_timeout_s: float = 60.0,
        **kwargs: Any,
    ):
        # Pipecat logs an error at start for a settings field left NOT_GIVEN; the model
        # is the daemon's avatar engine, named by its reports, not chosen here.
        kwargs.setdefault("settings", ServiceSettings(model="avatard"))
        super().__init__(**kwargs)
        self._endpoint = endpoint
        self._avatar = avatar
        self._seed = seed
        self._prebuffer_ms = prebuffer_ms
        self._timeout_s = timeout_s
        self._playout_timeout_s = playout_timeout_s
        self._client: AsyncClient | None = None
        self._session: AsyncLiveSession | None = None
        self._reader: asyncio.Task[None] | None = None
        self._numbers = itertools.count(1)
        self._receiving: _Segment | None = None  # the segment TTS audio goes to
        # Segments sent to the daemon whose playback has not finished, by id.
        self._pending: dict[str, _Segment] = {}
        self._playing: list[_Segment] = []  # oldest first: two share a frame period
        self._played_out = asyncio.Event()  # set while nothing is pending
        self._played_out.set()

    @property
    def session(self) -> AsyncLiveSession | None:
        """The live session, from `StartFrame` until it is closed."""
        return self._session

    # ----------------------------------------------------------------- lifecycle

    async def start(self, frame: StartFrame) -> None:
        """Connect to the daemon and open the live session; frames flow from now on."""
        await super().start(frame)
        try:
            self._client = await AsyncClient(self._endpoint, timeout_s=self._timeout_s).connect()
            self._session = await self._client.live(
                avatar=self._avatar, seed=self._seed, prebuffer_ms=self._prebuffer_ms
            )
        except ClientError as exc:
            await self._close()
            await self.push_error(
                error_msg=f"avatard: could not open a live session: {exc}",
                exception=exc,
                force_treat_as_permanent=True,
            )
            return
        self._reader = self.create_task(self._read_session(self._session), "avatard_events")

    async def stop(self, frame: EndFrame) -> None:
        """Let the speech sent so far play out (at most `playout_timeout_s`), then close."""
        await super().stop(frame)
        await self._end_receiving()  # a response still receiving gets no more audio
        try:
            await asyncio.wait_for(self._played_out.wait(), self._playout_timeout_s)
        except TimeoutError:
            log.warning(
                "avatard: %d segment(s) had not played out %g s after EndFrame; "
                "closing the session",
                len(self._pending),
                self._playout_timeout_s,
            )
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        """Close the session at once."""
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        """Close the session and the client if still open."""
        await super().cleanup()
        await self._close()

    async def _close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            await self.cancel_task(reader, timeout=self._timeout_s)
        session, self._session = self._session, None
        client, self._client = self._client, None
        if session is not None:
            await session.aclose()  # sends live_close
        if client is not None:
            await client.close()
        self._pending.clear()
        self._playing.clear()
        self._played_out.set()

    # ----------------------------------------------------------------- frames in

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Route a frame: TTS frames go to the session (see the module), an
        `InterruptionFrame` interrupts it and goes on, everything else goes on."""
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM and self._session is not None:
            if isinstance(frame, TTSStartedFrame):
                await self._end_receiving()
                self._receiving = _Segment(f"pc-{next(self._numbers)}", frame)
                return
            if isinstance(frame, TTSAudioRawFrame):
                await self._send_audio(frame)
                return
            if isinstance(frame, TTSStoppedFrame):
                segment = self._receiving
                if segment is not None and segment.audio_sent:
                    segment.stopped = frame
                    await self._end_receiving()
                    return
                # A response without audio: nothing to render, its frames go on now.
                self._receiving = None
                if segment is not None and segment.started is not None:
                    await self.push_frame(segment.started, direction)
                await self.push_frame(frame, direction)
                return
        if isinstance(frame, InterruptionFrame):
            await self._interrupt()
        await self.push_frame(frame, direction)

    async def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        assert self._session is not None
        if frame.num_frames == 0:
            return  # the daemon refuses empty chunks; nothing to play
        segment = self._receiving
        if segment is None:  # a TTS that sends no TTSStartedFrame
            segment = self._receiving = _Segment(f"pc-{next(self._numbers)}", None)
            segment.context_id = frame.context_id
        if not segment.audio_sent:
            segment.audio_sent = True
            self._pending[segment.segment_id] = segment
            self._played_out.clear()
        pcm = int16_to_float_mono(frame.audio, frame.num_channels)
        await send_pcm(self._session, pcm, frame.sample_rate, segment.segment_id)

    async def _end_receiving(self) -> None:
        segment, self._receiving = self._receiving, None
        if segment is not None and segment.audio_sent and self._session is not None:
            await self._session.end_segment(segment.segment_id)

    async def _interrupt(self) -> None:
        """Barge-in: the daemon drops every segment sent so far; none of them pushes
        anything more."""
        self._receiving = None
        self._pending.clear()
        self._playing.clear()
        self._played_out.set()
        if self._session is not None:
            await self._session.interrupt()

    # ----------------------------------------------------------------- frames out

    async def _read_session(self, session: AsyncLiveSession) -> None:
        """Push the session's frames, speech and playback frames downstream until the
        session ends; an error of the session is pushed upstream and marks the service
        unusable (the pipeline worker then applies its `processor_unusable_policy`)."""
        try:
            async for event in session:
                await self._push_event(event)
        except ClientError as exc:
            await self.push_error(
                error_msg=f"avatard: live session {session.job_id} failed: {exc}",
                exception=exc,
                force_treat_as_permanent=True,
            )

    async def _push_event(self, event: Any) -> None:
        if isinstance(event, FrameEvent):
            height, width = event.array.shape[:2]
            # tobytes copies: the frame's slot goes back when the next event is read.
            image = OutputImageRawFrame(
                image=event.array.tobytes(), size=(width, height), format="RGB"
            )
            image.sync_with_audio = bool(self._playing)
            await self.push_frame(image)
        elif isinstance(event, AudioEvent):
            if self._playing:
                pcm16 = float_to_int16(event.pcm)
                await self.push_frame(
                    TTSAudioRawFrame(
                        audio=pcm16.tobytes(),
                        sample_rate=event.sample_rate,
                        num_channels=1,
                        context_id=self._playing[0].context_id,
                    )
                )
        elif isinstance(event, PlaybackStartedEvent):
            segment = self._pending.get(event.segment_id)
            if segment is not None:  # not cut by an interruption
                self._playing.append(segment)
                if segment.started is not None:
                    await self.push_frame(segment.started)
        elif isinstance(event, PlaybackFinishedEvent):
            segment = self._pending.pop(event.segment_id, None)
            if segment is not None:
                if segment in self._playing:
                    self._playing.remove(segment)
                if event.interrupted:
                    log.warning(
                        "avatard: live session cut segment %s short at %.2f s (see session_moved)",
                        event.segment_id,
                        event.position_s,
                    )
                if segment is self._receiving:
                    self._receiving = None
                await self.push_frame(
                    segment.stopped or TTSStoppedFrame(context_id=segment.context_id)
                )
            if not self._pending:
                self._played_out.set()
        elif isinstance(event, InputRefusedEvent):
            log.warning(
                "avatard: live session refused %s (request %d): %s: %s: %s",
                event.what,
                event.req_id,
                event.code,
                event.field,
                event.rule,
            )
        elif isinstance(event, SessionMovedEvent):
            self._receiving = None  # input for the segments known so far is refused now
            log.warning(
                "avatard: live session moved to another worker (%s); %d frames lost",
                event.reason,
                event.frames_lost,
            )
