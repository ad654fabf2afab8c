"""Client side of `avatard live`: play an audio file (or stream a text file as an LLM
would) into a live session at realtime pace, optionally barge in, record every frame and
audio chunk that comes out, in order, into an mp4, and measure what a voice agent feels.

One asyncio loop (`AsyncClient`) runs it: the main task sends the input on its schedule
(100 ms of audio every 100 ms, or a few words every 100 ms) while a reader task takes the
session's events with their arrival times; frames go to the mp4 writer on a thread of its
own, so encoding never delays reading. The session is closed, and the mp4 finished, after
the speech has played out and an idle tail; on any error the session is closed, the
partial mp4 deleted and the error raised.

Latency figures (seconds, from `time.monotonic()` in this process):
- first frame: from asking for the session to receiving frame 0;
- audio to frame: for each 100 ms chunk, from sending it to receiving the frame that
  carries its first sample (the session's `audio` events are exactly the audio each frame
  was made from, so the played speech is found in them); about look-ahead / fps plus
  compute when the audio arrives in time;
- text to speech: from sending the first words to receiving the first frame that speaks;
- barge-in: from sending `live_interrupt` to receiving `playback_finished`, and to
  receiving the first frame whose audio is silence.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import queue
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatard.engines.audio import resample
from avatard.ipc.async_client import AsyncClient, AsyncLiveSession
from avatard.ipc.client_core import (
    AudioEvent,
    ClientError,
    DoneEvent,
    FrameEvent,
    InputRefusedEvent,
    PlaybackFinishedEvent,
    PlaybackSkippedEvent,
    PlaybackStartedEvent,
    SpeechRefusedEvent,
    WarningEvent,
)

CHUNK_S = 0.1  # audio goes out in chunks this long, each when its first sample is due
# Text goes out a few words at a time at about 30 words/s (some 40 tokens/s), the pace at
# which a hosted LLM streams a reply.
TEXT_WORDS_PER_PIECE = 3
TEXT_PIECE_S = 0.1
SEGMENT_ID = "input"  # the one segment the input plays in
DEFAULT_FPS = 25  # of every engine we ship; used only when a session announced no fps
# Bound on waiting for text to be spoken: the TTS takes its time, a word lasts < 1 s.
TEXT_WORD_BOUND_S = 1.0


@dataclass
class LiveInput:
    """What to play: `pcm` (1-D float32) at `rate` Hz, or `text` streamed as tokens."""

    pcm: np.ndarray | None = None
    rate: int = 0
    text: str | None = None

    @property
    def duration_s(self) -> float:
        """Seconds of audio (0 for text: its length is the TTS's to decide)."""
        return self.pcm.size / self.rate if self.pcm is not None else 0.0


@dataclass
class LiveReport:
    """What `run_live` recorded and measured. Times in seconds; None when not measured
    (the reason is in `notes`)."""

    path: str
    job_id: str
    fps: int
    width: int
    height: int
    audio_rate: int
    frames_received: int  # frames recorded, as they came (the mp4's first frames)
    frames_in_mp4: int  # plus repeats of the last one that cover the audio's last packet
    video_s: float  # of the mp4
    frames_sent: int  # by the daemon (`done`): equals frames_received
    frames_dropped: int  # `done`: frames the daemon dropped because this client lagged
    late_frames: int  # `done`: frames made later than their tick (the engine was slow)
    first_frame_s: float | None = None
    audio_to_frame_s: list[float] = field(default_factory=list)  # per 100 ms chunk
    speech_gap_s: float = 0.0  # silence inside the speech: audio that came late
    text_to_speech_s: float | None = None
    interrupt_at_s: float | None = None  # when it was sent, after the input started
    barge_in_finished_s: float | None = None
    barge_in_silent_frame_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The report for people, one figure a line."""
        # The count and the length are the file's (as `avatard render` reports); how many
        # of its frames came from the session is said after them.
        padding = self.frames_in_mp4 - self.frames_received
        out = [f"wrote {self.path}: {self.frames_in_mp4} frames ({self.video_s:.2f} s of "
               f"video): "
               + (f"the {self.frames_received} that came out of live session {self.job_id}, "
                  f"plus {padding} repeat{'s' if padding > 1 else ''} of the last frame so "
                  "the video covers the audio's last packet" if padding else
                  f"all as they came out of live session {self.job_id}"),
               f"frames: {self.frames_sent} sent, {self.frames_received} received, "
               f"{self.frames_dropped} dropped, {self.late_frames} late "
               f"({self.width}x{self.height} at {self.fps} fps, audio {self.audio_rate} Hz)"]
        if self.first_frame_s is not None:
            out.append(f"first frame after open: {self.first_frame_s:.3f} s")
        if self.audio_to_frame_s:
            values = self.audio_to_frame_s
            out.append(f"audio-to-frame latency: median {statistics.median(values):.3f} s, "
                       f"max {max(values):.3f} s over {len(values)} chunks (audio sample "
                       "sent -> frame showing it received)")
        if self.speech_gap_s:
            out.append(f"speech gaps: {self.speech_gap_s:.3f} s of silence inside the speech "
                       "(audio that reached the daemon after its frames were due)")
        if self.text_to_speech_s is not None:
            out.append(f"text-to-speech latency: {self.text_to_speech_s:.3f} s (first words "
                       "sent -> first frame speaking them received)")
        if self.interrupt_at_s is not None:
            finished = _seconds(self.barge_in_finished_s)
            silent = _seconds(self.barge_in_silent_frame_s)
            out.append(f"barge-in at {self.interrupt_at_s:.2f} s: playback_finished after "
                       f"{finished}, first silent frame after {silent}")
        out += [f"note: {note}" for note in self.notes]
        return out


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def text_pieces(text: str, words: int = TEXT_WORDS_PER_PIECE) -> list[str]:
    """`text` cut into pieces of `words` words, each keeping the whitespace after its last
    word, so the pieces joined are the text (less leading whitespace)."""
    tokens = re.findall(r"\S+\s*", text)
    return ["".join(tokens[i:i + words]) for i in range(0, len(tokens), words)]


class _SpeechFinder:
    """Finds where the speech sent plays: the audio chunks of a segment's frames are its
    audio (at the engine's rate) in order, with silence wherever it ran out (the client's
    audio came late). `feed` each frame's audio from the segment's first frame on; a
    chunk sent is heard at the frame that carries its first sample.

    Ambiguity: silence in the input itself that coincides with audio coming late may be
    taken for played input; the figures of the chunks after it are then off by that much.
    Audio that cannot be followed (neither speech nor silence where it should be) stops
    the finder (`lost`)."""

    def __init__(self, expected: np.ndarray, chunk_starts: list[int]):
        self.expected = expected
        self.chunk_starts = chunk_starts  # sample of `expected` where each chunk begins
        self.heard_at: dict[int, float] = {}  # chunk -> arrival time of its frame
        self.position = 0  # samples of `expected` found so far
        self.gap_samples = 0
        self.lost = False

    def feed(self, pcm: np.ndarray, arrived: float, count_gap: bool = True) -> None:
        """Take the audio of the segment's next frame, which arrived at `arrived`.
        `count_gap`: silence where input was still to come counts as a gap (not after a
        barge-in, which cuts the speech short on purpose)."""
        if self.lost or self.position >= self.expected.size:
            return
        ref = self.expected[self.position:self.position + pcm.size]
        differs = np.flatnonzero(np.abs(pcm[:ref.size] - ref) > 1e-6)
        played = int(differs[0]) if differs.size else ref.size
        if np.any(pcm[played:]):
            self.lost = True
            return
        first = bisect.bisect_left(self.chunk_starts, self.position)
        last = bisect.bisect_left(self.chunk_starts, self.position + played)
        for chunk in range(first, last):
            self.heard_at[chunk] = arrived
        self.position += played
        if count_gap and self.position < self.expected.size:
            self.gap_samples += pcm.size - played


class _Mp4Thread:
    """The mp4 writer (`Mp4Writer`) on a thread of its own, fed in arrival order. It opens
    at the first frame (the frame size) once the audio rate is known; a writer error is
    raised by the next `put` or by `finish`."""

    def __init__(self, path: Path, fps: int, audio_rate: int):
        self.path = path
        self.fps = fps
        self.audio_rate = audio_rate  # 0: taken from the first audio chunk
        self._items: queue.Queue[tuple[str, np.ndarray] | None] = queue.Queue()
        self._writer: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="avatard live mp4",
                                        daemon=True)
        self._thread.start()

    def put(self, kind: str, array: np.ndarray, rate: int = 0) -> None:
        """Queue a copy of a frame (kind "frame") or an audio chunk ("audio", at `rate`)."""
        if self._error is not None:
            raise ClientError(f"writing {self.path} failed: {self._error}")
        if kind == "audio" and not self.audio_rate:
            self.audio_rate = rate
        self._items.put((kind, np.array(array)))

    def finish(self, timeout_s: float) -> tuple[int, float]:
        """Write what is queued and finish the file: (frames in it, video seconds). Raises
        `ClientError` when writing failed or did not end within `timeout_s`."""
        self._items.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise ClientError(f"writing {self.path} did not finish within {timeout_s:.0f} s")
        if self._error is not None:
            raise ClientError(f"writing {self.path} failed: {self._error}")
        if self._writer is None:
            raise ClientError("the live session sent no frames")
        return self._writer.frames_written, self._writer.video_duration_s

    def abort(self) -> None:
        """Stop writing and delete the partial file."""
        self._error = self._error or RuntimeError("aborted")
        self._items.put(None)
        self._thread.join(10)
        if self._writer is not None:
            self._writer.abort()

    def _run(self) -> None:
        from avatard.engines.mux import Mp4Writer

        waiting: list[tuple[str, np.ndarray]] = []  # until the writer can open
        while (item := self._items.get()) is not None:
            if self._error is not None:
                continue  # drain: nothing more is written after an error
            try:
                if self._writer is None:
                    waiting.append(item)
                    frame = next((a for k, a in waiting if k == "frame"), None)
                    if frame is None or not self.audio_rate:
                        continue
                    self._writer = Mp4Writer(self.path, fps=self.fps, width=frame.shape[1],
                                             height=frame.shape[0], audio_rate=self.audio_rate)
                    items, waiting = waiting, []
                else:
                    items = [item]
                for kind, array in items:
                    if kind == "frame":
                        self._writer.write_frame(array)
                    else:
                        self._writer.write_audio(array)
            except Exception as exc:  # reported by put() / finish(), not lost on a thread
                self._error = exc
        if self._error is None and self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:
                self._error = exc


class _Recording:
    """Reads a live session's events (`read`, a task), records them and keeps the figures;
    the main task waits on it with `until`."""

    def __init__(self, session: AsyncLiveSession, out: Path, finder: _SpeechFinder | None):
        self.session = session
        self.mp4 = _Mp4Thread(out, session.fps or DEFAULT_FPS, session.audio_rate)
        self.finder = finder
        self.frames = 0
        self.frame_arrived: dict[int, float] = {}  # frame index -> arrival time
        self.playing = False  # between our segment's playback_started and _finished
        self.started_at: float | None = None  # arrival of its first speaking frame
        self.started_seen = False
        self.finished: PlaybackFinishedEvent | None = None
        self.finished_at: float | None = None
        self.interrupt_sent: float | None = None
        self.silent_after_interrupt: float | None = None
        self.done: DoneEvent | None = None
        self.refused: InputRefusedEvent | None = None
        self.skipped: PlaybackSkippedEvent | None = None  # our segment had no speech
        self.notes: list[str] = []  # for the report: text the TTS could not speak
        self.ended = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()

    async def read(self) -> None:
        try:
            async for event in self.session:
                self._take(event, time.monotonic())
                self._changed.set()
                if isinstance(event, DoneEvent):
                    return
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.ended = True
            self._changed.set()

    def _take(self, event: Any, arrived: float) -> None:
        if isinstance(event, FrameEvent):
            self.frames += 1
            self.frame_arrived[event.index] = arrived
            self.mp4.put("frame", event.array)
            if self.playing and self.started_at is None:
                self.started_at = arrived
        elif isinstance(event, AudioEvent):
            self.mp4.put("audio", event.pcm, event.sample_rate)
            frame_arrived = self.frame_arrived.get(event.index, arrived)
            if self.playing and self.finder is not None:
                self.finder.feed(event.pcm, frame_arrived,
                                 count_gap=self.interrupt_sent is None)
            if (self.interrupt_sent is not None and self.silent_after_interrupt is None
                    and frame_arrived >= self.interrupt_sent and not event.pcm.any()):
                self.silent_after_interrupt = frame_arrived
        elif isinstance(event, PlaybackStartedEvent) and event.segment_id == SEGMENT_ID:
            self.playing = self.started_seen = True
        elif isinstance(event, PlaybackFinishedEvent) and event.segment_id == SEGMENT_ID:
            self.playing = False
            self.finished, self.finished_at = event, arrived
        elif isinstance(event, PlaybackSkippedEvent) and event.segment_id == SEGMENT_ID:
            self.skipped = event
            self.notes.append(f"nothing of the input was spoken: {event.reason}")
        elif isinstance(event, SpeechRefusedEvent):
            self.notes.append(f"the TTS could not speak {event.text!r}: {event.field}: "
                              f"{event.rule}")
        elif isinstance(event, InputRefusedEvent):
            # The input is ours: a refusal means it could not play as given.
            raise ClientError(f"the daemon refused the session's input ({event.what}): "
                              f"{event.code}: {event.field}: {event.rule}",
                              code=event.code, field=event.field)
        elif isinstance(event, WarningEvent):
            # Said at once, as it comes: the figures are printed at the end.
            sys.stderr.write(f"warning: {event.field}: {event.message}\n")
            sys.stderr.flush()
        elif isinstance(event, DoneEvent):
            self.done = event

    async def until(self, predicate: Any, what: str, timeout_s: float) -> None:
        """Wait until `predicate()` holds. Raises `ClientError` naming `what` after
        `timeout_s` seconds, or the reader's error (or a `ClientError`) if the session
        ended first."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    if self.ended:
                        if self.error is not None:
                            raise self.error
                        raise ClientError(f"the live session ended before {what}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise ClientError(f"no {what} within {timeout_s:.1f} s") from None


async def run_live(endpoint: str, source: LiveInput, out: Path, *, avatar_image: bytes | None,
                   avatar_id: str, voice: str, seed: int, interrupt_at_s: float | None,
                   tail_s: float, timeout_s: float, prebuffer_ms: int = 0) -> LiveReport:
    """Play `source` into a live session of the daemon at `endpoint` and record it to
    `out` (see the module). `avatar_image` (encoded image bytes) is registered for the
    call; else `avatar_id` ("" = the engine's portrait) is used. `interrupt_at_s`: seconds
    after the input started when to barge in (the input stops there). `tail_s`: seconds of
    idle frames kept after the speech. `timeout_s` bounds every wait for the daemon.
    `prebuffer_ms`: the session's jitter buffer (`protocol.LiveOptions`).

    Raises `ClientError` (`DaemonUnavailable` when the daemon is gone or silent) and
    OSError / ValueError from writing the mp4; no partial mp4 is left then."""
    async with AsyncClient(endpoint, timeout_s=timeout_s, name="cli-live") as client:
        avatar = await client.register_avatar(avatar_image) if avatar_image else avatar_id
        opened = time.monotonic()
        async with client.live(avatar=avatar, voice=voice, seed=seed,
                               prebuffer_ms=prebuffer_ms) as session:
            finder = None
            if source.pcm is not None and session.audio_rate:
                finder = _speech_finder(source, session.audio_rate)
            rec = _Recording(session, out, finder)
            reader = asyncio.create_task(rec.read(), name="avatard live reader")
            try:
                report = await _drive(session, rec, source, opened, interrupt_at_s, tail_s,
                                      timeout_s)
                await rec.until(lambda: rec.done is not None, "done after live_close",
                                timeout_s)
                await reader
            except BaseException:
                reader.cancel()
                await asyncio.wait({reader})
                if not reader.cancelled():
                    reader.exception()  # raised already (through `until`), or moot now
                rec.mp4.abort()
                raise
    try:
        report.frames_in_mp4, report.video_s = rec.mp4.finish(timeout_s)
    except BaseException:
        rec.mp4.abort()
        raise
    assert rec.done is not None
    report.frames_received = rec.frames
    report.frames_sent = rec.done.frames
    report.frames_dropped = rec.done.frames_dropped
    report.late_frames = rec.done.late_frames
    return report


def _speech_finder(source: LiveInput, audio_rate: int) -> _SpeechFinder:
    """The finder of `source`'s audio as the session plays it: at the engine's rate, as
    the daemon resamples it (the same filter: `resample`)."""
    assert source.pcm is not None
    step = _chunk_samples(source.rate)
    starts = [math.ceil(k * step * audio_rate / source.rate)
              for k in range(math.ceil(source.pcm.size / step))]
    return _SpeechFinder(resample(source.pcm, source.rate, audio_rate), starts)


def _chunk_samples(rate: int) -> int:
    return max(1, round(rate * CHUNK_S))


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _drive(session: AsyncLiveSession, rec: _Recording, source: LiveInput,
                 opened: float, interrupt_at_s: float | None, tail_s: float,
                 timeout_s: float) -> LiveReport:
    """Feed the input on its schedule, barge in, wait for the speech to end and the tail,
    then close the session. Returns the report's figures so far."""
    fps = session.fps or DEFAULT_FPS
    await rec.until(lambda: rec.frames > 0, "first frame of the live session", timeout_s)
    report = LiveReport(path=str(rec.mp4.path), job_id=session.job_id, fps=fps,
                        width=session.width, height=session.height,
                        audio_rate=session.audio_rate, frames_received=0, frames_in_mp4=0,
                        video_s=0.0, frames_sent=0, frames_dropped=0, late_frames=0)
    report.first_frame_s = min(rec.frame_arrived.values()) - opened
    started = time.monotonic()  # the input's time 0
    sent_at: list[float] = []
    if source.pcm is not None:
        step = _chunk_samples(source.rate)
        for begin in range(0, source.pcm.size, step):
            offset_s = begin / source.rate
            if interrupt_at_s is not None and offset_s >= interrupt_at_s:
                break  # the barge-in: the rest of the speech is not sent
            await _sleep_until(started + offset_s)
            sent_at.append(time.monotonic())
            await session.send_audio(source.pcm[begin:begin + step], source.rate, SEGMENT_ID)
        else:
            await session.end_segment(SEGMENT_ID)
        expected_s = source.duration_s
    else:
        assert source.text is not None
        pieces = text_pieces(source.text)
        for k, piece in enumerate(pieces):
            if interrupt_at_s is not None and k * TEXT_PIECE_S >= interrupt_at_s:
                break
            await _sleep_until(started + k * TEXT_PIECE_S)
            sent_at.append(time.monotonic())
            await session.send_text(piece, SEGMENT_ID)
        else:
            await session.send_text("", SEGMENT_ID, final=True)
        expected_s = len(source.text.split()) * TEXT_WORD_BOUND_S
    if interrupt_at_s is not None:
        await _sleep_until(started + interrupt_at_s)
        was_playing = rec.playing
        rec.interrupt_sent = time.monotonic()
        await session.interrupt()
        report.interrupt_at_s = rec.interrupt_sent - started
        if not was_playing and rec.finished is not None:
            report.notes.append("the speech had finished before the barge-in")
    else:
        # The speech plays to its end (its playback_finished) before the tail.
        bound_s = max(0.0, started + expected_s - time.monotonic()) + timeout_s
        await rec.until(lambda: rec.finished is not None or rec.skipped is not None,
                        f"playback_finished of the input's segment (it started: "
                        f"{'yes' if rec.started_seen else 'no'})", bound_s)
    tail_frames = rec.frames + max(1, round(tail_s * fps))
    await rec.until(lambda: rec.frames >= tail_frames, f"{tail_s:g} s of idle tail frames",
                    tail_s + timeout_s)
    await session.close()
    _latencies(report, rec, sent_at, text=source.text is not None)
    report.notes += rec.notes
    return report


def _latencies(report: LiveReport, rec: _Recording, sent_at: list[float], text: bool
               ) -> None:
    """The figures from what was recorded: `sent_at` holds when each chunk (or piece of
    text, `text`) was sent."""
    if rec.finder is not None:
        finder = rec.finder
        report.audio_to_frame_s = [finder.heard_at[k] - sent for k, sent in enumerate(sent_at)
                                   if k in finder.heard_at]
        report.speech_gap_s = finder.gap_samples / report.audio_rate
        if finder.lost:
            report.notes.append("the audio that came back could not be followed past "
                                f"{finder.position / report.audio_rate:.2f} s of the input; "
                                "later chunks have no audio-to-frame figure")
    if text and sent_at and rec.started_at is not None:
        report.text_to_speech_s = rec.started_at - sent_at[0]
    if rec.interrupt_sent is not None:
        if rec.finished is not None and rec.finished.interrupted and rec.finished_at:
            report.barge_in_finished_s = rec.finished_at - rec.interrupt_sent
        elif not rec.started_seen:
            report.notes.append("no speech had reached a frame at the barge-in")
        if rec.silent_after_interrupt is not None:
            report.barge_in_silent_frame_s = rec.silent_after_interrupt - rec.interrupt_sent
