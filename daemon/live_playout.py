"""The speech of one live session, one frame's worth at a time: pure logic, no clock.

A live session's job thread in the worker (`daemon/live_worker.py`) owns one `Playout`. It
feeds it the session's input in the order the client sent it (speech PCM, text, segment
ends, barge-in), and on every tick of its pacing clock takes one `Tick`: exactly one
frame's worth of audio at the engine's rate (`rate / fps` samples, fractional rates spread
over ticks), made of queued speech and, where none is queued, silence. The tick's PCM is
pushed into the avatar stream; when the stream returns a frame, the oldest tick in flight
is `emitted` with that frame, and its PCM goes out as the frame's audio chunk. So the audio
chunk sent with frame k is exactly the audio frame k was made from, whatever look-ahead
the engine has.

Segments: every piece of speech belongs to a segment the client names. Segments play one
after another in the order they began; input for a new segment ends the one before it (as
`live_end` would), so at most one segment takes input at a time. A segment whose input has
not ended and whose queued audio ran out (the client's TTS is slower than realtime, or
this session's TTS is still synthesizing its sentence) holds the queue: silence plays
until more comes. With a prebuffer (the session's `prebuffer_ms`), a segment starts only
once that much of it is queued or its input has ended (a jitter buffer). A text segment's
text is cut into complete sentences as it arrives; those wait in `take_sentences()` for
the session's TTS thread, whose audio comes back through `tts_audio` / `tts_done`, tagged
with the `generation` it was asked in: a barge-in starts a new generation, so audio of
sentences asked before it is dropped.

Events, returned by `emitted`, `interrupt` and `close` for the worker to send in order with
the frames: `Started` just before the first frame that carries a segment's speech,
`Finished` after the frame with its last sample (position = its whole length), or at a
barge-in or close for a segment that started and had not finished (position = the speech
that went out with frames so far, interrupted). A segment whose input ended without any
speech (no audio, nothing speakable, every piece refused by the TTS; a `live_end` for a
segment that got no input at all) gets `Skipped` when its turn comes instead, so every
segment that ends by itself is announced; one cut short
by a barge-in or close before its first frame gets nothing. A frame the worker drops (the
client's ring is full) still counts as emitted: its tick's speech was played on the
session's clock, and `Finished` must still come.

Times are in samples at `rate` Hz; positions in seconds. Not thread-safe: one job thread
uses it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from avatard.engines.audio import StreamingResampler, complete_sentences
from avatard.engines.base import frame_start_sample

log = logging.getLogger("avatard.worker")

KNOWN_SEGMENTS = 1024  # ended segments remembered, so late input for them is ignored


class SegmentKind(StrEnum):
    AUDIO = "audio"  # the client sends the speech
    TEXT = "text"  # the session's TTS speaks the client's text


@dataclass(frozen=True, slots=True)
class Started:
    segment_id: str


@dataclass(frozen=True, slots=True)
class Finished:
    segment_id: str
    position_s: float
    interrupted: bool


@dataclass(frozen=True, slots=True)
class Skipped:
    segment_id: str
    reason: str


Event = Started | Finished | Skipped

NOTHING_SPEAKABLE = "has nothing speakable (no letter or digit)"


@dataclass(eq=False)
class Segment:
    """One segment's speech. Sample counts are at the playout's rate."""

    segment_id: str
    kind: SegmentKind
    queued: deque[np.ndarray] = field(default_factory=deque)  # not yet in a tick
    queued_samples: int = 0
    # Audio segments: the client's chunks at its rate, not yet resampled. They are
    # resampled a tick's worth at a time as ticks take them (`Playout._fill`), so a chunk
    # of minutes costs the clock thread no more per tick than one of 10 ms.
    raw: deque[np.ndarray] = field(default_factory=deque)
    raw_samples: int = 0
    input_ended: bool = False  # live_end, final text, a later segment, or a barge-in
    text: str = ""  # text that is not a complete sentence yet
    tts_pending: int = 0  # pieces handed to the TTS whose audio has not all come back
    refusal: str = ""  # why the last piece of its text made no speech (for `Skipped`)
    no_input: bool = False  # its live_end came before any input (`Playout.end`)
    resampler: StreamingResampler | None = None  # audio segments: client rate -> rate
    sample_rate: int = 0  # the client's rate (audio segments)
    taken: int = 0  # samples put into ticks
    played: int = 0  # samples in ticks emitted with a frame
    started: bool = False  # Started was returned
    done: bool = False  # Finished was returned, or it was dropped unplayed

    @property
    def complete(self) -> bool:
        """No more speech will come and none is left to take."""
        return (self.input_ended and not self.tts_pending and not self.queued_samples
                and not self.raw_samples
                and (self.resampler is None or self.resampler.flushed))

    @property
    def pending_samples(self) -> int:
        """Samples queued at the playout's rate, the raw chunks counted as what they will
        become."""
        if self.resampler is None or not self.raw_samples:
            return self.queued_samples
        return self.queued_samples + self.resampler.output_for(self.raw_samples)


@dataclass(eq=False)
class Tick:
    """One frame's audio: `pcm` (1-D float32 at the playout's rate, speech and silence),
    the segments whose speech it carries (`spans`: segment, samples) and the segments
    whose last sample is in it or in a tick before it (`ends`)."""

    index: int
    pcm: np.ndarray
    spans: list[tuple[Segment, int]] = field(default_factory=list)
    ends: list[Segment] = field(default_factory=list)
    skipped: list[Segment] = field(default_factory=list)  # ended here without speech

    @property
    def speech_samples(self) -> int:
        return sum(count for _, count in self.spans)


class Playout:
    """Queued speech of one live session and the ticks taken from it but not yet emitted
    with a frame (`in_flight`: the engine's look-ahead)."""

    def __init__(self, rate: int, fps: int, first_tick: int = 0, prebuffer_samples: int = 0):
        if rate <= 0 or fps <= 0:
            raise ValueError(f"rate and fps must be positive, got {rate} Hz, {fps} fps")
        self.rate = rate
        self.fps = fps
        self.generation = 0  # grows at every barge-in (TTS audio is tagged with it)
        self.segments: deque[Segment] = deque()  # in playing order, the head plays now
        self.in_flight: deque[Tick] = deque()
        self.ticks_taken = first_tick  # the index of the next tick `take` makes
        # A segment starts playing once this much of it is queued or its input ended.
        self.prebuffer_samples = prebuffer_samples
        self._known: OrderedDict[str, Segment] = OrderedDict()  # by id, newest last
        self._open: Segment | None = None  # the segment that takes input now
        self._to_speak: deque[tuple[int, str, str]] = deque()  # (generation, segment, text)

    def samples_in_tick(self, index: int) -> int:
        """Samples of tick `index`: the audio of frame `index` as the avatar stream counts
        it (`engines.base.frame_start_sample`: ticks 0..k-1 hold ceil(k * rate / fps)
        samples together), so tick k's audio is exactly what frame k is made from."""
        return self.tick_start_sample(index + 1) - self.tick_start_sample(index)

    def tick_start_sample(self, index: int) -> int:
        """Samples of all ticks before `index` (the audio pts of tick `index`)."""
        return frame_start_sample(index, self.rate, self.fps)

    # ------------------------------------------------------------ input

    def _segment(self, segment_id: str, kind: SegmentKind) -> Segment | None:
        """The segment taking this input: the open one, or a new one (which ends the one
        open before). None for input the segment cannot take (it ended, or is of the other
        kind: the supervisor refuses both, so this is only a defence)."""
        seg = self._known.get(segment_id)
        if seg is not None:
            if seg is not self._open or seg.kind is not kind:
                log.warning("live input for segment %r dropped: it %s", segment_id,
                            "is of another kind" if seg.kind is not kind else "has ended")
                return None
            return seg
        if self._open is not None:
            self._end_input(self._open)
        seg = self._open = Segment(segment_id, kind)
        self._remember(seg)
        return seg

    def _remember(self, seg: Segment) -> None:
        """Queue a new segment in its turn, and know it by its id."""
        self._known[seg.segment_id] = seg
        while len(self._known) > KNOWN_SEGMENTS:
            self._known.popitem(last=False)
        self.segments.append(seg)

    def audio(self, segment_id: str, pcm: np.ndarray, sample_rate: int) -> bool:
        """Append speech (1-D float32 at `sample_rate`) to a segment, resampled to `rate`
        with no clicks at chunk edges as ticks take it (this call does no work per
        sample, whatever the chunk's size). False when dropped (see `_segment`)."""
        seg = self._segment(segment_id, SegmentKind.AUDIO)
        if seg is None:
            return False
        if seg.resampler is None:
            seg.resampler, seg.sample_rate = StreamingResampler(sample_rate, self.rate), sample_rate
        elif sample_rate != seg.sample_rate:
            log.warning("live audio for segment %r at %d Hz dropped: it began at %d Hz",
                        segment_id, sample_rate, seg.sample_rate)
            return False
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        if pcm.size:
            seg.raw.append(pcm)
            seg.raw_samples += pcm.size
        return True

    def text(self, segment_id: str, text: str, final: bool) -> bool:
        """Append text to a segment; its complete sentences wait in `take_sentences()`
        (all of it when `final`). False when dropped (see `_segment`)."""
        seg = self._segment(segment_id, SegmentKind.TEXT)
        if seg is None:
            return False
        seg.text += text
        complete, seg.text = complete_sentences(seg.text)
        self._speak(seg, complete)
        if final:
            self._end_input(seg)
        return True

    def end(self, segment_id: str) -> bool:
        """No more input for a segment (`live_end`). False for one not taking input.

        A segment never seen (its live_end came before any input, or instead of it) is a
        segment without speech: it takes its turn after those queued and gets `Skipped`
        then, like any other that ends with nothing to play, so that a client waiting for
        each segment's end event gets one. It does not end the segment taking input (no
        input came for a new segment)."""
        seg = self._known.get(segment_id)
        if seg is None:
            seg = Segment(segment_id, SegmentKind.AUDIO, input_ended=True, no_input=True)
            self._remember(seg)
            return True
        if seg is not self._open:
            return False
        self._end_input(seg)
        return True

    def _end_input(self, seg: Segment) -> None:
        if seg.input_ended:
            return
        # An audio segment's resampler is flushed once its raw chunks are all taken
        # (`_fill`).
        self._speak(seg, seg.text)
        seg.text = ""
        seg.input_ended = True
        if self._open is seg:
            self._open = None

    def _speak(self, seg: Segment, text: str) -> None:
        if any(ch.isalnum() for ch in text):  # "..." alone is nothing a TTS can say
            seg.tts_pending += 1
            self._to_speak.append((self.generation, seg.segment_id, text.strip()))
        elif text.strip():
            seg.refusal = f"text {text.strip()[:40]!r} {NOTHING_SPEAKABLE}"

    def take_sentences(self) -> list[tuple[int, str, str]]:
        """Text waiting for the TTS: (generation, segment id, text) in order. Each must be
        answered with `tts_audio` for its audio and one `tts_done`."""
        taken = list(self._to_speak)
        self._to_speak.clear()
        return taken

    def tts_audio(self, generation: int, segment_id: str, pcm: np.ndarray) -> None:
        """Audio (1-D float32 at `rate`) the TTS made for text of a segment; dropped when
        a barge-in came since it was asked (`generation`)."""
        seg = self._known.get(segment_id)
        if generation == self.generation and seg is not None and not seg.done:
            self._queue(seg, np.asarray(pcm, np.float32).reshape(-1))

    def tts_done(self, generation: int, segment_id: str, refusal: str = "") -> None:
        """The TTS finished one piece of text taken from `take_sentences`: spoken, or not
        (`refusal`: why, kept for the segment's `Skipped` if none of it is spoken)."""
        seg = self._known.get(segment_id)
        if generation == self.generation and seg is not None and seg.tts_pending:
            seg.tts_pending -= 1
            if refusal:
                seg.refusal = refusal

    def _queue(self, seg: Segment, pcm: np.ndarray) -> None:
        if pcm.size:
            seg.queued.append(pcm)
            seg.queued_samples += pcm.size

    def _fill(self, seg: Segment, want: int) -> None:
        """Resample raw chunks of an audio segment until `want` samples are queued at the
        playout's rate, or its raw chunks ran out (then, its input having ended, the
        resampler's tail). Bounded work: about `want` samples' worth of input, however
        big the chunk the client sent."""
        resampler = seg.resampler
        if resampler is None:
            return
        while seg.queued_samples < want and seg.raw:
            budget = resampler.input_for(want - seg.queued_samples)
            chunk = seg.raw[0]
            piece = chunk[:budget]
            if piece.size == chunk.size:
                seg.raw.popleft()
            else:
                seg.raw[0] = chunk[piece.size:]
            seg.raw_samples -= piece.size
            self._queue(seg, resampler.push(piece))
        if not seg.raw and seg.input_ended and not resampler.flushed:
            self._queue(seg, resampler.flush())

    # ------------------------------------------------------------ ticks

    def take(self, index: int) -> Tick:
        """Tick `index`: one frame's audio from the head segments (in order; a finished
        head gives way to the next within the tick), silence for the rest. The tick joins
        `in_flight` until `emitted`."""
        need = self.samples_in_tick(index)
        pcm = np.zeros(need, np.float32)
        tick = Tick(index, pcm)
        filled = 0
        while self.segments:
            seg = self.segments[0]
            if (not seg.taken and not seg.input_ended
                    and seg.pending_samples < self.prebuffer_samples):
                break  # its jitter buffer is filling: silence meanwhile
            self._fill(seg, need - filled)
            while filled < need and seg.queued:
                chunk = seg.queued[0]
                count = min(need - filled, chunk.size)
                pcm[filled:filled + count] = chunk[:count]
                if count == chunk.size:
                    seg.queued.popleft()
                else:
                    seg.queued[0] = chunk[count:]
                seg.queued_samples -= count
                seg.taken += count
                filled += count
                if tick.spans and tick.spans[-1][0] is seg:
                    tick.spans[-1] = (seg, tick.spans[-1][1] + count)
                else:
                    tick.spans.append((seg, count))
            if not seg.complete:
                break  # it plays on (or waits for more input: silence meanwhile)
            self.segments.popleft()
            if seg.taken:
                tick.ends.append(seg)
            else:
                seg.done = True  # ended without any speech: announced with the tick
                tick.skipped.append(seg)
        self.in_flight.append(tick)
        self.ticks_taken = index + 1
        return tick

    def emitted(self) -> tuple[Tick, list[Event], list[Event]]:
        """The oldest tick in flight goes out with the frame the stream just returned:
        (tick, events to send before that frame, events to send after it). Raises
        IndexError when no tick is in flight (an engine returned more frames than the
        audio it was given allows)."""
        tick = self.in_flight.popleft()
        before: list[Event] = []
        after: list[Event] = []
        for seg, count in tick.spans:
            if not seg.started:
                seg.started = True
                before.append(Started(seg.segment_id))
            seg.played += count
        for seg in tick.ends:
            if seg.started and not seg.done:
                seg.done = True
                after.append(Finished(seg.segment_id, seg.played / self.rate, False))
        # After the segments that ended before them in the tick (playing order).
        after += [Skipped(seg.segment_id, self._skip_reason(seg)) for seg in tick.skipped]
        return tick, before, after

    @staticmethod
    def _skip_reason(seg: Segment) -> str:
        if seg.refusal:
            return seg.refusal
        if seg.no_input:
            return "its live_end came before any input"
        if seg.kind is SegmentKind.AUDIO:
            return "its input ended with no audio"
        return "its input ended with no text (or only whitespace)"

    def interrupt(self) -> list[Event]:
        """Barge-in: drop every piece of queued speech (audio, text not yet spoken, TTS
        work asked for: a new generation), silence the ticks in flight (their frames are
        still to come, their audio is now silence), end every segment. Returns `Finished`
        (interrupted) for each segment that started and had not finished."""
        self.generation += 1
        self._to_speak.clear()
        if self._open is not None:
            self._open.input_ended = True
            self._open = None
        for tick in self.in_flight:
            tick.pcm[:] = 0.0
            tick.spans.clear()
            tick.ends.clear()  # (a segment skipped in it is announced still: it ended)
        finished: list[Event] = []
        for seg in self._known.values():
            seg.input_ended = True
            seg.queued.clear()
            seg.raw.clear()
            seg.queued_samples = seg.raw_samples = seg.tts_pending = 0
            seg.text = ""
            if not seg.done:
                seg.done = True
                if seg.started:
                    finished.append(Finished(seg.segment_id, seg.played / self.rate, True))
        self.segments.clear()
        return finished

    def close(self) -> list[Event]:
        """The session ends: as `interrupt`, for the segments still playing."""
        return self.interrupt()

    @property
    def queued_s(self) -> float:
        """Seconds of speech queued and not yet in a tick."""
        return sum(seg.pending_samples for seg in self.segments) / self.rate
