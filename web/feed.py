"""From a live session's events to WebRTC tracks: the pump that reads one session and the
tracks that hand its frames and audio to aiortc, one pair per viewer.

Pacing: the daemon sends frame k and audio chunk k of a live session at the session's
tick k (1/fps apart); the pump (`LiveFeed.run`) reads them as they come and puts each,
converted once into a PyAV frame, into every viewer's tracks. aiortc's senders pull with
`recv()`, which waits for the next item: so the tracks follow the session clock, and frame
k and audio k enter their encoders at the same moment, which keeps audio and video in sync
on the wire. Video frames carry `pts = index` in 1/fps, so a gap (frames the daemon
dropped) stays a gap in time; the audio track fills such a gap with silence so that its
sample clock keeps pace with the video.

Slow viewers: each track holds a short bounded queue; when a viewer's encoder falls
behind, the oldest item is dropped and counted (`FeedTrack.dropped`). The pump never
waits for a viewer, so a slow viewer never slows the session or other viewers.

Ownership: the gateway owns a `LiveFeed` and its session; the feed owns its pump task
and ends every viewer's tracks when the session ends (the tracks' `recv()` then raises
`MediaStreamError`, which stops aiortc's senders).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.video.frame import PictureType

from avatard.ipc.async_client import AsyncLiveSession
from avatard.ipc.client_core import (
    AudioEvent,
    DoneEvent,
    FrameEvent,
    InputRefusedEvent,
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
    SessionMovedEvent,
)

log = logging.getLogger("avatard.web")

# Per-viewer queue depths. Video: 10 frames (400 ms at 25 fps) absorbs the encoder thread
# being starved for a moment on a busy machine (with 5, a 2-core machine at a load of 12
# dropped 6 % of the frames) and adds no latency in steady state (the queue is empty
# then). Audio: the same span of chunks, so both tracks drop the same stretch.
VIDEO_QUEUE_FRAMES = 10
AUDIO_QUEUE_CHUNKS = 10
# A track whose session sends nothing for this long ends: the daemon sends a frame every
# 1/fps while a session lives, so a 10 s silence means the session or the daemon is gone.
TRACK_IDLE_TIMEOUT_S = 10.0
# At most this many chunks of silence fill a gap in the audio (frames the daemon dropped);
# a longer gap (a session that moved workers) restarts the audio clock instead.
MAX_AUDIO_GAP_CHUNKS = 50
# Shared encode (one encode per session, every viewer gets the same packets): a fixed
# bitrate, since viewers cannot each steer it as aiortc's own encoder lets them (REMB);
# 1 Mb/s is what aiortc's VP8 encoder settles at for 512x512 on a clean link. A keyframe
# every 2 s lets a viewer recover from a lost packet without a PLI round trip (PLI and
# FIR reach aiortc's sender, which only acts on them when it encodes itself).
SHARED_BITRATE = 1_000_000
SHARED_KEYFRAME_INTERVAL_S = 2.0
SHARED_ENCODER_QUEUE_FRAMES = 2
# PyAV encoder names and options, chosen as aiortc's own encoders are configured: VP8 in
# libvpx's realtime mode with no look-ahead; H264 constrained baseline, level 3.1, no
# B-frames (the profile browsers offer as 42e01f).
SHARED_CODECS = {
    "vp8": (
        "libvpx",
        {
            "deadline": "realtime",
            "cpu-used": "8",
            "lag-in-frames": "0",
            "error-resilient": "1",
            "auto-alt-ref": "0",
        },
    ),
    "h264": (
        "libx264",
        {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline", "level": "31"},
    ),
    # NVIDIA's hardware H264 encoder (`avatard web --nvenc`), set up as the software one:
    # baseline profile, no B-frames, constant bitrate, and FFmpeg's low-latency settings
    # for it (fastest preset p1, tune "ull" = ultra-low latency, no frame delay).
    "h264_nvenc": (
        "h264_nvenc",
        {"preset": "p1", "tune": "ull", "zerolatency": "1", "delay": "0", "rc": "cbr",
         "profile": "baseline"},
    ),
}


def nvenc_unavailable(width: int = 512, height: int = 512) -> str | None:
    """Why NVIDIA's hardware H264 encoder cannot run here (no such codec in this PyAV
    build, no NVIDIA GPU or driver), or None when an encoder of `width` x `height`
    yuv420p opened. Opens one encoder session, so it costs a few ms on a GPU
    host; the gateway asks once, at start."""
    name, options = SHARED_CODECS["h264_nvenc"]
    if name not in av.codecs_available:
        return f"this PyAV build has no {name} encoder"
    try:
        context = av.CodecContext.create(name, "w")
        context.width, context.height = width, height
        context.pix_fmt = "yuv420p"
        context.time_base = fractions.Fraction(1, 25)
        context.options = dict(options)
        context.open()  # freed with the object (PyAV has no explicit close)
    except Exception as exc:  # noqa: BLE001 - PyAV raises OSError subclasses, FFmpegError...
        return f"{name} did not open ({type(exc).__name__}: {exc}); it needs an NVIDIA GPU " \
               "and driver"
    return None


class FeedTrack(MediaStreamTrack):
    """A `MediaStreamTrack` ("video" or "audio") fed by a `LiveFeed`: `recv()` returns the
    next PyAV frame in session order, waiting for the session's next tick.

    `put()` never waits: past `depth` queued items the oldest is dropped and counted in
    `dropped`. `finish(reason)` ends the track: `recv()` then raises `MediaStreamError`.
    `recv()` raises `MediaStreamError` also when nothing arrives for `idle_timeout_s`
    seconds (logged with what it waited for)."""

    def __init__(
        self, kind: str, depth: int, what: str, idle_timeout_s: float = TRACK_IDLE_TIMEOUT_S
    ) -> None:
        super().__init__()
        self.kind = kind
        self.dropped = 0
        self.sent = 0
        self._what = what
        self._idle_timeout_s = idle_timeout_s
        self._queue: asyncio.Queue[av.VideoFrame | av.AudioFrame | av.Packet | None] = (
            asyncio.Queue(depth)
        )
        self._ended = False

    def put(self, frame: av.VideoFrame | av.AudioFrame | av.Packet) -> bool:
        """Queue `frame` (or an encoded packet) for the sender; drop the oldest queued one
        if the queue is full. Returns whether one was dropped."""
        if self._ended:
            return False
        dropped = self._queue.full()
        if dropped:
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(frame)
        return dropped

    def clear(self) -> int:
        """Drop everything queued (counted in `dropped`); returns how many."""
        count = 0
        while not self._queue.empty():
            if self._queue.get_nowait() is None:  # keep an end marker
                self._queue.put_nowait(None)
                break
            count += 1
        self.dropped += count
        return count

    def finish(self, reason: str) -> None:
        """End the track after what is queued has no more use: the next `recv()` raises."""
        if self._ended:
            return
        self._ended = True
        log.info("%s ends: %s", self._what, reason)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def recv(self) -> av.VideoFrame | av.AudioFrame | av.Packet:
        """The next frame of the session, or with a shared encoder the next encoded
        packet, which aiortc's sender then only packetizes (it calls this in a loop)."""
        if self.readyState != "live":
            raise MediaStreamError
        try:
            frame = await asyncio.wait_for(self._queue.get(), self._idle_timeout_s)
        except TimeoutError:
            log.warning(
                "%s got no %s from its session within %.0f s: ending it",
                self._what,
                "frame" if self.kind == "video" else "audio",
                self._idle_timeout_s,
            )
            self.stop()
            raise MediaStreamError from None
        if frame is None:
            self.stop()
            raise MediaStreamError
        self.sent += 1
        return frame


@dataclass
class Viewer:
    """One peer watching a feed: its two tracks."""

    viewer_id: str
    video: FeedTrack
    audio: FeedTrack
    # Shared encode: the viewer's video starts at a keyframe (a decoder cannot start on a
    # delta frame); until one comes its track gets nothing.
    needs_keyframe: bool = True

    def finish(self, reason: str) -> None:
        self.video.finish(reason)
        self.audio.finish(reason)


@dataclass
class FeedStats:
    """What the pump saw of its session. Counts of frames; latency in milliseconds."""

    frames: int = 0  # frame events received
    frames_missing: int = 0  # indices the daemon skipped (this gateway read too late)
    last_index: int = -1
    speech_to_frame_ms: list[float] = field(default_factory=list)  # per segment
    playing: str = ""  # segment id playing now ("" while idle)
    first_frame_s: float | None = None  # from opening the session to its first frame
    inputs_refused: int = 0  # text or audio the daemon refused (it runs on without them)
    last_refusal: str = ""  # "field: rule" of the last one


class SharedEncoder:
    """One video encoder for every viewer of a session (`avatard web --shared-encode`):
    each frame is encoded once, in an executor thread, and the packets go to every
    viewer's track; aiortc's senders then only packetize them (`Encoder.pack`).

    `codec`: a key of SHARED_CODECS ("vp8", "h264", or "h264_nvenc" for NVIDIA's
    hardware encoder: H264 for the browser, encoded on the GPU); frames are (height,
    width) yuv420p at `fps`. Frames wait
    in a queue of `SHARED_ENCODER_QUEUE_FRAMES`; when the encoder falls behind the oldest
    is dropped and counted in `dropped`, so the pump never waits for it."""

    def __init__(self, codec: str, width: int, height: int, fps: int) -> None:
        name, options = SHARED_CODECS[codec]
        self.context = av.CodecContext.create(name, "w")
        self.context.width = width
        self.context.height = height
        self.context.pix_fmt = "yuv420p"
        self.context.time_base = fractions.Fraction(1, fps)
        self.context.framerate = fps
        self.context.bit_rate = SHARED_BITRATE
        self.context.gop_size = int(SHARED_KEYFRAME_INTERVAL_S * fps)
        self.context.max_b_frames = 0
        # One thread, as aiortc's own VP8 encoder uses below 640x480: libvpx's worker
        # threads stall for 100 ms and more on a machine whose cores are all busy
        # (measured here: 2-13 ms per frame with one thread, bimodal up to 130 ms with two).
        self.context.thread_count = 1
        self.context.options = dict(options)
        self.time_base = fractions.Fraction(1, fps)
        self.dropped = 0
        self.keyframe_wanted = True
        self._queue: asyncio.Queue[av.VideoFrame | None] = asyncio.Queue(
            SHARED_ENCODER_QUEUE_FRAMES
        )

    def put(self, frame: av.VideoFrame) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(frame)

    def stop(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def _encode(self, frame: av.VideoFrame, keyframe: bool) -> list[av.Packet]:
        # The frame is this encoder's alone (viewers get packets), so setting its picture
        # type is safe.
        frame.pict_type = PictureType.I if keyframe else PictureType.NONE
        return list(self.context.encode(frame))

    async def run(self, viewers: dict[str, Viewer]) -> None:
        """Encode queued frames until `stop()`; give each packet to every viewer that has
        had its keyframe (or gets one now)."""
        loop = asyncio.get_running_loop()
        while True:
            # The pump feeds a frame every 1/fps while the session lives, and stop() ends
            # this loop; the bound only guards against a pump that died without stop().
            try:
                frame = await asyncio.wait_for(self._queue.get(), TRACK_IDLE_TIMEOUT_S)
            except TimeoutError:
                log.warning(
                    "shared encoder got no frame within %.0f s: stopping", TRACK_IDLE_TIMEOUT_S
                )
                return
            if frame is None:
                return
            keyframe = self.keyframe_wanted
            self.keyframe_wanted = False
            packets = await loop.run_in_executor(None, self._encode, frame, keyframe)
            for packet in packets:
                packet.time_base = self.time_base
                for viewer in list(viewers.values()):
                    if viewer.needs_keyframe:
                        if not packet.is_keyframe:
                            continue
                        viewer.needs_keyframe = False
                    if viewer.video.put(packet):
                        # A lost packet breaks the frames that refer to it: drop what is
                        # queued and restart this viewer at the next keyframe, asked now.
                        viewer.video.clear()
                        viewer.needs_keyframe = True
                        self.keyframe_wanted = True


class LiveFeed:
    """One live session, read by one pump task and fanned out to any number of viewers.

    `session`: an accepted `AsyncLiveSession` (its `fps`, `width`, `height`, `audio_rate`
    describe the media: frames (height, width, 3) uint8 RGB, audio float32 mono at
    `audio_rate` Hz, `audio_rate / fps` samples per frame). `opened_at`: the
    `time.monotonic()` when the session was asked for (first-frame figure).

    Viewers join and leave at any time (`add_viewer`, `remove_viewer`); a viewer sees the
    session from its next frame on. `mark_input(segment_id)` records when the gateway sent
    a segment's first input, for the speech-to-frame figure. `started` is set at the first
    frame (a worker runs the session; until then the daemon may hold it queued). `ended`
    is set once the pump has stopped (session done, failed or closed); every viewer's
    tracks end with it."""

    def __init__(
        self, session: AsyncLiveSession, opened_at: float, shared_codec: str | None = None
    ) -> None:
        self.session = session
        self.fps = session.fps
        self.audio_rate = session.audio_rate
        self.samples_per_frame = session.audio_rate // session.fps
        self.video_time_base = fractions.Fraction(1, session.fps)
        self.audio_time_base = fractions.Fraction(1, session.audio_rate)
        self.viewers: dict[str, Viewer] = {}
        self.stats = FeedStats()
        self.started = asyncio.Event()  # the first frame came: a worker runs the session
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.timed_out = False  # it ended because no event came within the client's timeout
        self._opened_at = opened_at
        self._input_sent_at: dict[str, float] = {}
        self._audio_next_index = -1
        self._segments = 0
        self.encoder: SharedEncoder | None = None
        self._encoder_task: asyncio.Task | None = None
        if shared_codec is not None:
            self.encoder = SharedEncoder(shared_codec, session.width, session.height, session.fps)

    def add_viewer(self, viewer_id: str) -> Viewer:
        """A new pair of tracks for `viewer_id`, fed from the session's next frame."""
        what = f"viewer {viewer_id} of session {self.session.job_id}"
        viewer = Viewer(
            viewer_id,
            FeedTrack("video", VIDEO_QUEUE_FRAMES, f"video of {what}"),
            FeedTrack("audio", AUDIO_QUEUE_CHUNKS, f"audio of {what}"),
        )
        if self.ended.is_set():
            viewer.finish(self.end_reason)
        if self.encoder is not None:
            self.encoder.keyframe_wanted = True  # the new viewer starts at a keyframe
        self.viewers[viewer_id] = viewer
        return viewer

    def remove_viewer(self, viewer_id: str, reason: str) -> None:
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is not None:
            viewer.finish(reason)

    def new_segment_id(self, prefix: str) -> str:
        """A segment id not used before in this session: `prefix-1`, `prefix-2`, ..."""
        self._segments += 1
        return f"{prefix}-{self._segments}"

    def mark_input(self, segment_id: str) -> None:
        """The gateway sends the first input of `segment_id` now."""
        self._input_sent_at.setdefault(segment_id, time.monotonic())

    async def run(self) -> None:
        """Read the session's events until it ends; then end every viewer's tracks.
        Each wait for an event is bounded by the client's timeout (the AsyncClient's)."""
        reason = "the session ended"
        if self.encoder is not None:
            self._encoder_task = asyncio.create_task(
                self.encoder.run(self.viewers), name=f"encoder of {self.session.job_id}"
            )
        try:
            async for event in self.session:
                if isinstance(event, FrameEvent):
                    self.started.set()
                    self._on_frame(event)
                elif isinstance(event, AudioEvent):
                    self._on_audio(event)
                elif isinstance(event, PlaybackStartedEvent):
                    self.stats.playing = event.segment_id
                elif isinstance(event, PlaybackFinishedEvent):
                    if self.stats.playing == event.segment_id:
                        self.stats.playing = ""
                elif isinstance(event, InputRefusedEvent):
                    self.stats.inputs_refused += 1
                    self.stats.last_refusal = f"{event.field}: {event.rule}"
                    log.warning(
                        "session %s refused a %s: %s: %s: %s",
                        self.session.job_id,
                        event.what,
                        event.code,
                        event.field,
                        event.rule,
                    )
                elif isinstance(event, SessionMovedEvent):
                    log.warning(
                        "session %s moved to another worker (%s): %d frames lost",
                        self.session.job_id,
                        event.reason,
                        event.frames_lost,
                    )
                elif isinstance(event, DoneEvent):
                    reason = (
                        f"the session ended: {event.frames} frames, {event.frames_dropped} dropped"
                    )
        except asyncio.CancelledError:
            reason = "the gateway closed the session"
            raise
        except Exception as exc:  # the daemon failed the session or went away
            self.timed_out = getattr(exc, "code", "") == "timeout"
            reason = f"the session failed: {exc}"
            log.warning("session %s: %s", self.session.job_id, reason)
        finally:
            self.end_reason = reason
            self.ended.set()
            if self.encoder is not None:
                self.encoder.stop()
            for viewer in list(self.viewers.values()):
                viewer.finish(reason)

    def _on_frame(self, event: FrameEvent) -> None:
        stats = self.stats
        if stats.first_frame_s is None:
            stats.first_frame_s = time.monotonic() - self._opened_at
        if stats.last_index >= 0 and event.index > stats.last_index + 1:
            stats.frames_missing += event.index - stats.last_index - 1
        stats.last_index = event.index
        stats.frames += 1
        if stats.playing and stats.playing in self._input_sent_at:
            sent_at = self._input_sent_at.pop(stats.playing)
            stats.speech_to_frame_ms.append((time.monotonic() - sent_at) * 1000.0)
            del stats.speech_to_frame_ms[:-20]  # the recent ones are what a viewer sees
        if not self.viewers:
            return
        # One conversion per session, shared by every viewer: the array is a view into
        # the daemon's ring, valid only until the next event is read, so it is copied
        # here; yuv420p is what the VP8 and H264 encoders take.
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(event.array), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = event.index
        frame.time_base = self.video_time_base
        if self.encoder is not None:
            self.encoder.put(frame)
            return
        for viewer in self.viewers.values():
            viewer.video.put(frame)

    def _on_audio(self, event: AudioEvent) -> None:
        if not self.viewers:
            self._audio_next_index = event.index + 1
            return
        gap = event.index - self._audio_next_index if self._audio_next_index >= 0 else 0
        if 0 < gap <= MAX_AUDIO_GAP_CHUNKS:
            silence = np.zeros(self.samples_per_frame, np.float32)
            for index in range(self._audio_next_index, event.index):
                self._put_audio(index, silence)
        self._put_audio(event.index, event.pcm)
        self._audio_next_index = event.index + 1

    def _put_audio(self, index: int, pcm: np.ndarray) -> None:
        # aiortc's Opus encoder takes s16 (mono or stereo) and resamples to 48 kHz itself.
        s16 = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(s16, format="s16", layout="mono")
        frame.sample_rate = self.audio_rate
        frame.pts = index * self.samples_per_frame
        frame.time_base = self.audio_time_base
        for viewer in self.viewers.values():
            viewer.audio.put(frame)
