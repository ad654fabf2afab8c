"""Live sessions' input as the supervisor checks and routes it. Pure bookkeeping.

A live session (`live_open`, a job of kind `live`) takes input for as long as it runs:
speech audio and text in segments, segment ends, barge-in, close. The supervisor checks
each request here against what the session was told before (a segment that ended takes
no more input, a segment is audio or text and keeps its sample rate, a closing session
takes nothing) and turns it into the worker's `live_input` message. Refused input is a
`ProtocolError` naming the field, answered to the client; the session runs on. Input
that comes while the session still waits for a worker is held here (bounded) and sent
behind its `run_job`.

Owned by the supervisor's thread; nothing here touches a socket. The payload checks of
`live_audio` (dtype, shape, NaN) are in daemon/requests.py with the other payloads'.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from avatard.ipc import protocol as P

MAX_HELD_INPUTS = 256  # inputs held for a session not yet placed (10 s of 40 ms chunks)
MAX_HELD_BYTES = 16 << 20  # and their audio bytes (87 s of 48 kHz float32)
KNOWN_SEGMENTS = 1024  # segment ids remembered per session (oldest forgotten first)

LiveRequest = P.LiveAudio | P.LiveText | P.LiveEnd | P.LiveInterrupt | P.LiveClose


@dataclass
class _Segment:
    kind: P.LiveInputKind | None  # AUDIO or TEXT; None: ended before any input came
    sample_rate: int = 0
    ended: bool = False
    ended_by: str = ""  # what ended it, for the refusal of input that comes later


@dataclass
class _Session:
    closing: bool = False
    # Segments whose playback_started went to the client and whose playback_finished did
    # not yet: id -> the index of the first frame with its speech.
    playing: dict[str, int] = field(default_factory=dict)
    segments: OrderedDict[str, _Segment] = field(default_factory=OrderedDict)
    open_segment: str | None = None  # the segment taking input now
    held: list[tuple[P.LiveInput, bytes]] = field(default_factory=list)
    held_bytes: int = 0


class LiveInputs:
    """The input state of every running live session, by job id."""

    def __init__(self, max_held: int = MAX_HELD_INPUTS, max_held_bytes: int = MAX_HELD_BYTES):
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.sessions: dict[str, _Session] = {}

    def open(self, job_id: str) -> None:
        """A live session was accepted."""
        self.sessions[job_id] = _Session()

    def forget(self, job_id: str) -> None:
        """The session ended: let its state and held input go."""
        self.sessions.pop(job_id, None)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.sessions

    def check_open(self, job_id: str, req_id: int) -> None:
        """Raises `ProtocolError` bad_message/job_id unless `job_id` is a live session
        that takes input (not closing)."""
        session = self.sessions.get(job_id)
        if session is None:
            raise P.ProtocolError(P.E_BAD_MESSAGE, "job_id", f"job {job_id} is not a live "
                                  "session (live_open starts one)", req_id)
        if session.closing:
            raise P.ProtocolError(P.E_BAD_MESSAGE, "job_id", f"live session {job_id} is "
                                  "closing (live_close came); it takes no more input", req_id)

    def take(self, job_id: str, msg: LiveRequest) -> P.LiveInput | None:
        """The worker's message for a checked request (None: nothing to tell the worker,
        e.g. a repeated `live_end`). Raises `ProtocolError`: bad_message/job_id for a job
        that is not a live session or is closing; bad_input/segment_id for input to a
        segment that ended or is of the other kind; bad_input/sample_rate for a segment's
        audio at a rate other than its first chunk's."""
        self.check_open(job_id, msg.req_id)
        session = self.sessions[job_id]
        make = lambda kind, **f: P.make(P.LiveInput, job_id=job_id, kind=kind, **f)  # noqa: E731
        if isinstance(msg, P.LiveAudio):
            self._speech(session, msg.segment_id, P.LiveInputKind.AUDIO, msg.sample_rate,
                         msg.req_id)
            return make(P.LiveInputKind.AUDIO, segment_id=msg.segment_id,
                        sample_rate=msg.sample_rate)
        if isinstance(msg, P.LiveText):
            seg = self._speech(session, msg.segment_id, P.LiveInputKind.TEXT, 0, msg.req_id)
            if msg.final:
                self._end(session, msg.segment_id, seg, "by its final text")
            return make(P.LiveInputKind.TEXT, segment_id=msg.segment_id, text=msg.text,
                        final=msg.final)
        if isinstance(msg, P.LiveEnd):
            seg = session.segments.get(msg.segment_id)
            if seg is not None and seg.ended:
                return None  # ended already (by a later segment, a barge-in): nothing to do
            if seg is None:
                seg = self._remember(session, msg.segment_id, _Segment(None))
            self._end(session, msg.segment_id, seg, "by live_end")
            return make(P.LiveInputKind.END, segment_id=msg.segment_id)
        if isinstance(msg, P.LiveInterrupt):
            # Every segment known so far is over: input still on its way for one of them
            # (the client's TTS had not stopped yet) is refused, never played.
            self._end_all(session, "by live_interrupt")
            return make(P.LiveInputKind.INTERRUPT)
        session.closing = True
        return make(P.LiveInputKind.CLOSE)

    def _speech(self, session: _Session, segment_id: str, kind: P.LiveInputKind,
                sample_rate: int, req_id: int) -> _Segment:
        seg = session.segments.get(segment_id)
        if seg is None:
            if session.open_segment is not None:  # a new segment ends the one before
                self._end(session, session.open_segment,
                          session.segments[session.open_segment],
                          f"when input for segment {segment_id[:64]!r} began")
            seg = self._remember(session, segment_id, _Segment(kind, sample_rate))
            session.open_segment = segment_id
            return seg
        if seg.ended:
            raise P.ProtocolError(P.E_BAD_INPUT, "segment_id", f"segment {segment_id!r} "
                                  f"ended {seg.ended_by}; send new speech in a new segment",
                                  req_id)
        if seg.kind is not kind:
            raise P.ProtocolError(P.E_BAD_INPUT, "segment_id", f"segment {segment_id!r} is "
                                  f"{seg.kind.value if seg.kind else 'empty'}; "
                                  f"{kind.value} goes in a segment of its own", req_id)
        if sample_rate != seg.sample_rate:
            raise P.ProtocolError(P.E_BAD_INPUT, "sample_rate", f"segment {segment_id!r} "
                                  f"began at {seg.sample_rate} Hz; every chunk of a segment "
                                  f"must have its rate (got {sample_rate})", req_id)
        return seg

    @staticmethod
    def _end(session: _Session, segment_id: str, seg: _Segment, ended_by: str) -> None:
        seg.ended, seg.ended_by = True, ended_by
        if session.open_segment == segment_id:
            session.open_segment = None

    @staticmethod
    def _end_all(session: _Session, ended_by: str) -> None:
        for seg in session.segments.values():
            if not seg.ended:
                seg.ended, seg.ended_by = True, ended_by
        session.open_segment = None

    @staticmethod
    def _remember(session: _Session, segment_id: str, seg: _Segment) -> _Segment:
        session.segments[segment_id] = seg
        while len(session.segments) > KNOWN_SEGMENTS:
            oldest = next(iter(session.segments))
            if oldest == session.open_segment:
                break  # never forget the segment taking input
            del session.segments[oldest]
        return seg

    # ------------------------------------------------------------ playback and moves

    def playback(self, job_id: str, msg: P.WPlaybackStarted | P.WPlaybackFinished,
                 next_frame: int) -> None:
        """A playback event went to the client; `next_frame`: the index of the frame the
        client gets next (the first with a started segment's speech)."""
        session = self.sessions.get(job_id)
        if session is None:
            return
        if isinstance(msg, P.WPlaybackStarted):
            session.playing[msg.segment_id] = next_frame
        else:
            session.playing.pop(msg.segment_id, None)

    def moved(self, job_id: str, frames_delivered: int, fps: int) -> list[tuple[str, float]]:
        """The session's worker was lost: its queued speech went with it. Every segment
        known so far ends (as at a barge-in: input still on its way for one is refused);
        returns (segment id, seconds played) of each segment that started and did not
        finish, for the `playback_finished` (interrupted) the client must still get. The
        seconds are the frames sent since its first (`frames_delivered` is the next frame
        index) / `fps`: exact while its speech filled every frame, an upper bound if it
        paused."""
        session = self.sessions.get(job_id)
        if session is None:
            return []
        self._end_all(session, "when the session moved to another worker (its queued "
                      "speech was lost with the worker)")
        return self.cut_short(job_id, frames_delivered, fps)

    def cut_short(self, job_id: str, frames_delivered: int, fps: int
                  ) -> list[tuple[str, float]]:
        """The session stops playing without its worker saying so (it moved, was
        cancelled, or failed): (segment id, seconds played) of each segment that started
        and did not finish, as `moved` counts them, for the `playback_finished`
        (interrupted) its client must still get; they are forgotten (asked again: [])."""
        session = self.sessions.get(job_id)
        if session is None:
            return []
        playing = [(segment_id, max(0, frames_delivered - first) / max(1, fps))
                   for segment_id, first in session.playing.items()]
        session.playing.clear()
        return playing

    # ------------------------------------------------------------ before placement

    def check_room(self, job_id: str, nbytes: int, req_id: int) -> None:
        """Before `hold`: raises `ProtocolError` busy/job_id when one more input of
        `nbytes` would pass `max_held` inputs or `max_held_bytes` held for the session."""
        session = self.sessions[job_id]
        if (len(session.held) >= self.max_held
                or session.held_bytes + nbytes > self.max_held_bytes):
            raise P.ProtocolError(P.E_BUSY, "job_id", f"live session {job_id} waits for a "
                                  f"worker and holds {len(session.held)} inputs "
                                  f"({session.held_bytes} bytes) already; send more once its "
                                  "first frame came", req_id)

    def hold(self, job_id: str, msg: P.LiveInput, data: bytes) -> None:
        """Keep input of a session that waits for a worker (after `check_room`); `held`
        gives it back when the session is placed."""
        session = self.sessions[job_id]
        session.held.append((msg, data))
        session.held_bytes += len(data)

    def held(self, job_id: str) -> list[tuple[P.LiveInput, bytes]]:
        """The input held for a session until it was placed, in order (and let go)."""
        session = self.sessions.get(job_id)
        if session is None:
            return []
        held, session.held, session.held_bytes = session.held, [], 0
        return held
