"""What the blocking `Client` (ipc/client.py) and the asyncio `AsyncClient`
(ipc/async_client.py) share: the events a job or live session yields, the errors a call
raises, and every step between the wire and those events that does not wait.

- Routing: a message goes to the job it names (`job_id`), a refused live input to its
  session (by the request id the client remembered), anything else to the request it
  answers (`req_id`), so a late reply is never taken for the answer to a newer request.
- Events: a job's messages become `FrameEvent`, `AudioEvent`, ..., `DoneEvent`; a
  `job_failed` or an `error` naming the job is raised as `JobFailedError` / `ClientError`.
- Slots: input goes into the session's own input ring when it fits (local clients), inline
  otherwise; a frame or audio chunk in one of the daemon's rings is read as a numpy view
  without copying, and its slot is given back with a `release` request.

Nothing here touches a socket or waits: each client does its own waiting (a poll with a
deadline, or an awaited future) on top, so both speak the protocol the same way.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from . import protocol as P
from .ring import SlotRing, StaleSlotError

log = logging.getLogger("avatard.client")


class ClientError(RuntimeError):
    """The daemon refused a request or did not answer in time."""

    def __init__(self, message: str, code: str = "", field: str = ""):
        super().__init__(message)
        self.code = code
        self.field = field


class BusyError(ClientError):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message, code=P.E_BUSY)
        self.retry_after_s = retry_after_s


class JobFailedError(ClientError):
    pass


@dataclass
class FrameEvent:
    job_id: str
    index: int
    pts_us: int
    array: np.ndarray  # (H, W, 3) uint8; a view into shared memory for local clients


@dataclass
class AudioEvent:
    job_id: str
    index: int
    pts_us: int
    sample_rate: int
    pcm: np.ndarray  # float32 mono


@dataclass
class DoneEvent:
    job_id: str
    frames: int
    media_s: float
    wall_s: float
    first_frame_s: float
    attempts: int
    audio_samples: int = 0
    frames_dropped: int = 0  # live sessions: frames the client did not read in time
    late_frames: int = 0  # live sessions: frames made late on the session's clock
    frames_lost: int = 0  # live sessions: frames of the clock lost while it moved workers

    @property
    def rtf(self) -> float:
        return self.wall_s / self.media_s if self.media_s > 0 else float("nan")


@dataclass
class WarningEvent:
    """Part of the job's input was not used as given; the job goes on (`protocol.
    JobWarning`): `code` (`text_dropped`), `field` ("text"), `message` for people."""

    job_id: str
    code: str
    field: str
    message: str


@dataclass
class PlaybackStartedEvent:
    """Live sessions: the next frame is the first carrying speech of `segment_id`."""

    job_id: str
    segment_id: str


@dataclass
class PlaybackFinishedEvent:
    """Live sessions: `segment_id` stopped after `position_s` seconds of its speech went
    out with frames; `interrupted` when a barge-in or the session's close cut it short."""

    job_id: str
    segment_id: str
    position_s: float
    interrupted: bool


@dataclass
class SpeechRefusedEvent:
    """Live sessions: the session's TTS could not speak a piece of `segment_id`'s text
    (`text`: its first 200 characters); the rest of the segment plays. `code`, `field`,
    `rule` as in an `error` (e.g. `bad_input`/`text`: a script the voice cannot read)."""

    job_id: str
    segment_id: str
    code: str
    field: str
    rule: str
    text: str


@dataclass
class PlaybackSkippedEvent:
    """Live sessions: `segment_id` ended without any speech to play (`reason`); it gets
    no `PlaybackStartedEvent` or `PlaybackFinishedEvent`: this is its end."""

    job_id: str
    segment_id: str
    reason: str


@dataclass
class SessionMovedEvent:
    """Live sessions: the session's worker was lost and another took it over. The next
    frame is `resume_index`; the `frames_lost` frames before it were never made. Queued
    speech was lost: every segment so far has ended; send new speech in a new segment."""

    job_id: str
    resume_index: int
    frames_lost: int
    reason: str


@dataclass
class InputRefusedEvent:
    """Live sessions: the daemon refused one input (`req_id`, a `what` request); the
    session runs on. `code`, `field` and `rule` as in an `error` reply."""

    job_id: str
    req_id: int
    what: str
    code: str
    field: str
    rule: str


@dataclass
class TranscriptResult:
    job_id: str
    language: str
    duration_s: float
    segments: list[P.SegmentMsg] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments).strip()


# The client sends ZMTP heartbeats: a daemon that is stopped or hung, or whose host vanished
# without closing the connection, answers none, and libzmq drops the connection after the
# heartbeat timeout, which the client sees as a disconnect.
HEARTBEAT_IVL_MS = 1000  # at most; a third of the timeout when that is shorter
HEARTBEAT_TIMEOUT_S = 5.0


def apply_heartbeat(sock: Any, timeout_s: float) -> None:
    """ZMTP heartbeats on a client's DEALER socket `sock`: a ping every second (a third of
    `timeout_s` when shorter), the connection dropped when the daemon answers none for
    `timeout_s` seconds."""
    import zmq

    timeout_ms = max(1, round(timeout_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, min(HEARTBEAT_IVL_MS, timeout_ms // 3)))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)


LIVE_REQUESTS_KEPT = 4096  # live input requests remembered, to route their errors


class AcceptedMedia:
    """What `accepted` announced about a job or live session:

    - `job_id`; `queue_position`: jobs ahead of it when it was accepted;
    - `fps`: frames per second; `width`, `height`: pixels of every frame, which arrives as
      a uint8 (height, width, 3) array; all 0 for a job without frames (transcribe);
      width and height also 0 when the portrait's registration had not ended;
    - `audio_rate`: Hz of its `AudioEvent`s (0 when it sends none: lipsync, or speak with
      send_audio False; a live session's is the avatar engine's rate).

    Every figure is 0 when the daemon accepted the job before any worker had loaded its
    engines."""

    def __init__(self, accepted: P.Accepted):
        self.job_id: str = accepted.job_id
        self.queue_position: int = accepted.queue_position
        self.fps: int = accepted.fps
        self.width: int = accepted.width
        self.height: int = accepted.height
        self.audio_rate: int = accepted.audio_rate

    @property
    def frame_shape(self) -> tuple[int, int, int] | None:
        """(height, width, 3) of its frames; None when not announced (see the class)."""
        return (self.height, self.width, 3) if self.width and self.height else None


# ------------------------------------------------------------------ connection


def apply_curve(sock: zmq.Socket, endpoint: str, server_key_file: str | None,
                client_key_file: str | None) -> None:
    """Make `sock` authenticate with CURVE on a tcp:// `endpoint` when both key files are
    given (the daemon's public .key, this client's .key_secret), or named by
    $AVATARD_CURVE_SERVER_KEY and $AVATARD_CURVE_CLIENT_KEY. Raises `ClientError` for a
    client key file without its secret key, OSError for a file that cannot be read."""
    server_key = server_key_file or os.environ.get("AVATARD_CURVE_SERVER_KEY")
    client_key = client_key_file or os.environ.get("AVATARD_CURVE_CLIENT_KEY")
    if not (endpoint.startswith("tcp://") and server_key and client_key):
        return
    from zmq.auth import load_certificate

    sock.curve_serverkey = load_certificate(server_key)[0]
    public, secret = load_certificate(client_key)
    if secret is None:
        raise ClientError(f"{client_key} holds no secret key (use the .key_secret file)")
    sock.curve_publickey = public
    sock.curve_secretkey = secret


# ------------------------------------------------------------------ routing


def decode_server(parts: list[Any]) -> tuple[P.Msg, list[Any]] | None:
    """A message from the daemon, decoded; None for one of a type this client does not
    know (a newer daemon's event: protocol v2 grows by new event types and fields, which
    a client skips). Raises `ProtocolError` for anything else malformed."""
    try:
        return P.SERVER_CODEC.decode(parts)
    except P.ProtocolError as exc:
        if exc.code != P.E_UNKNOWN_TYPE:
            raise
        log.debug("skipped a message of a type this client does not know: %s", exc.rule)
        return None


def route_of(msg: P.Msg, live_requests: OrderedDict[int, tuple[str, str]]
             ) -> tuple[str | None, int | None]:
    """Who waits for `msg`: (job id, None) for an event of a job, or an `error` refusing
    a remembered live input (`remember_live`), which goes to its session; (None, request
    id) for a reply; (None, None) for neither."""
    job_id = getattr(msg, "job_id", None)
    req_id = getattr(msg, "req_id", None)
    if isinstance(msg, P.Error) and req_id in live_requests:
        return live_requests[req_id][0], None
    if job_id is not None and not isinstance(msg, P.Accepted):
        return job_id, None
    return None, req_id


def remember_live(live_requests: OrderedDict[int, tuple[str, str]], msg: P.Msg,
                  what: str) -> int:
    """Note a live input request before it is sent (it gets no reply when taken; a
    refusal names only its request id): returns its request id. Keeps the latest
    LIVE_REQUESTS_KEPT (errors come back within a tick of the daemon, long before this
    many more inputs are sent)."""
    req_id: int = msg.req_id  # type: ignore[attr-defined]
    live_requests[req_id] = (msg.job_id, what)  # type: ignore[attr-defined]
    while len(live_requests) > LIVE_REQUESTS_KEPT:
        live_requests.popitem(last=False)
    return req_id


def check_reply(msg: P.Msg, what: str) -> None:
    """Raise what a refusal of request `what` says: `ClientError` with the error's code
    and field, `BusyError` (with the retry time) for a full queue."""
    if isinstance(msg, P.Error):
        raise ClientError(f"{what} refused: {msg.code}: {msg.field}: {msg.rule}",
                          code=msg.code, field=msg.field)
    if isinstance(msg, P.Busy):
        raise BusyError(f"daemon busy ({msg.queue_depth} queued): {msg.reason}; "
                        f"retry after {msg.retry_after_s:.1f} s", msg.retry_after_s)


# ------------------------------------------------------------------ events


def job_event(job_id: str, msg: P.Msg, extra: list[Any],
              read: Callable[[P.Payload, list[Any]], np.ndarray],
              live_requests: OrderedDict[int, tuple[str, str]]) -> Any:
    """The event that message `msg` of job `job_id` stands for, or None for a message a
    client skips. `read` gives the array of a payload (`read_array`); a frame's or audio
    chunk's array is a view into the daemon's ring when `slot_of(msg)` names a slot, valid
    until that slot is released. A refused live input becomes an `InputRefusedEvent` and
    is forgotten. `DoneEvent` is the job's last event.

    Raises `JobFailedError` (the job's code and message) for `job_failed`, and
    `ClientError` for any other `error` naming the job: either ends the job's events."""
    if isinstance(msg, P.Frame):
        return FrameEvent(job_id, msg.index, msg.pts_us, read(msg.data, extra))
    if isinstance(msg, P.AudioChunk):
        return AudioEvent(job_id, msg.index, msg.pts_us, msg.sample_rate,
                          read(msg.data, extra))
    if isinstance(msg, P.PlaybackStarted):
        return PlaybackStartedEvent(job_id, msg.segment_id)
    if isinstance(msg, P.PlaybackFinished):
        return PlaybackFinishedEvent(job_id, msg.segment_id, msg.position_s, msg.interrupted)
    if isinstance(msg, P.SessionMoved):
        return SessionMovedEvent(job_id, msg.resume_index, msg.frames_lost, msg.reason)
    if isinstance(msg, P.JobWarning):
        return WarningEvent(job_id, msg.code, msg.field, msg.message)
    if isinstance(msg, P.SpeechRefused):
        return SpeechRefusedEvent(job_id, msg.segment_id, msg.code, msg.field, msg.rule,
                                  msg.text)
    if isinstance(msg, P.PlaybackSkipped):
        return PlaybackSkippedEvent(job_id, msg.segment_id, msg.reason)
    if isinstance(msg, P.Error) and msg.req_id in live_requests:
        _, what = live_requests.pop(msg.req_id)
        return InputRefusedEvent(job_id, msg.req_id, what, msg.code, msg.field, msg.rule)
    if isinstance(msg, P.TranscriptMsg):
        return TranscriptResult(job_id, msg.language, msg.duration_s, list(msg.segments))
    if isinstance(msg, P.Done):
        return DoneEvent(job_id, msg.frames, msg.media_s, msg.wall_s, msg.first_frame_s,
                         msg.attempts, msg.audio_samples, msg.frames_dropped,
                         msg.late_frames, msg.frames_lost)
    if isinstance(msg, P.JobFailed):
        raise JobFailedError(f"job {job_id} failed after {msg.attempts} attempt(s): "
                             f"{msg.code}: {msg.message}", code=msg.code)
    if isinstance(msg, P.Error):
        raise ClientError(f"job {job_id}: {msg.code}: {msg.field}: {msg.rule}",
                          code=msg.code, field=msg.field)
    return None


def no_reply_message(endpoint: str, timeout_s: float, what: str) -> str:
    """What to say when the daemon at `endpoint` sent no `what` within `timeout_s`: for an
    ipc:// endpoint whose socket file does not exist, that no daemon listens there (not
    running, or another runtime directory); else that it did not answer in time (busy,
    stopped, or not there)."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not os.path.exists(path):
            return (f"no {what} from a daemon at {endpoint}: the socket file {path} does "
                    "not exist (`avatard serve` is not running, or runs with another "
                    f"runtime directory); waited {timeout_s:.1f} s for it")
    return (f"no {what} from the daemon at {endpoint} within {timeout_s:.1f} s (is "
            "`avatard serve` running? `avatard status` says whether it is busy)")


def ends_job(msg: P.Msg) -> bool:
    """Whether `msg` is a job's last message (`done` or `job_failed`)."""
    return isinstance(msg, (P.Done, P.JobFailed))


def take_end_after_stale(messages: deque[tuple[P.Msg, list[Any]]], stale: StaleSlotError
                         ) -> tuple[P.Msg, list[Any]] | None:
    """After a frame or audio chunk of a job turned out stale (`stale`: the daemon took
    its slot back), the job's last message from `messages` (its queue, in arrival order),
    with every message before it dropped; None, leaving `messages` as they are, while it
    has not arrived.

    The daemon takes a slot back from a client that held it past
    `timeouts.client_call_s` and ends that client's jobs (`job_failed` code `timeout`);
    the frames queued before that end name slots that are no longer the client's, so
    what the caller must see is the end, not the stale slot. A job that had already
    completed when its slots were taken back ends in `done`, yet this client lost the
    frames from the stale one on: that end becomes a `job_failed` (code `timeout`), never
    a `done` that would pass for a complete delivery."""
    for position, (msg, _) in enumerate(messages):
        if ends_job(msg):
            for _ in range(position):
                messages.popleft()
            end, extra = messages.popleft()
            if isinstance(end, P.Done):
                end = P.make(P.JobFailed, job_id=end.job_id, code=P.E_TIMEOUT,
                             attempts=end.attempts, message=(
                                 "the job completed, but this client held a slot over "
                                 "timeouts.client_call_s and the daemon took it back: the "
                                 f"events from the stale one on were lost ({stale})"
                             ))
            return end, extra
    return None


# ------------------------------------------------------------------ slots


def slot_of(msg: P.Msg) -> P.SlotDesc | None:
    """The daemon's ring slot that `msg`'s data lives in (a frame or audio chunk of a
    local client), which the client must release once it is done with the data."""
    data = getattr(msg, "data", None)
    return data if isinstance(data, P.SlotDesc) else None


def release_request(slot: P.SlotDesc) -> P.Release:
    """The request that gives `slot` back to the worker that writes it (no reply)."""
    return P.make(P.Release, req_id=0, ring=slot.ring, slot=slot.slot, seq=slot.seq)


def read_array(data: P.Payload, extra: list[Any], ring_of: Callable[[str], SlotRing]
               ) -> np.ndarray:
    """The array a payload carries: its message part (inline), or a read-only view into
    the slot of ring `ring_of(name)` (shm). Raises `StaleSlotError` for a slot reused
    since the descriptor was made."""
    if isinstance(data, P.Inline):
        buf = extra[data.part - 1]
        return np.frombuffer(buf, dtype=data.dtype).reshape(data.shape)
    return ring_of(data.ring).read(data.ref())


def place_array(array: np.ndarray, input_ring: SlotRing | None, timeout_s: float
                ) -> tuple[P.Payload, list[bytes | memoryview]]:
    """Where a request's data goes: a slot of the session's input ring (local clients;
    copied in) when it fits one, else inline as message part 1 (no copy). Returns the
    payload field and the extra parts to send after the control part. Waits up to
    `timeout_s` for a free slot (0: not at all) and raises `RingFullError` after it."""
    array = np.ascontiguousarray(array)
    if input_ring is not None and array.nbytes <= input_ring.slot_bytes:
        ref = input_ring.write(array, timeout_s=timeout_s)
        return P.SlotDesc.from_ref(ref), []
    return P.Inline(part=1, shape=list(array.shape), dtype=array.dtype.name), [
        memoryview(array).cast("B")]


def audio_chunks(pcm: np.ndarray, max_payload_bytes: int) -> list[slice]:
    """How to send float32 mono `pcm` in payloads of at most `max_payload_bytes` (0: the
    daemon did not say; one payload): one slice when it fits, else consecutive chunks,
    the first sent with the job request (`more`), the rest as `job_audio`."""
    step = max_payload_bytes // 4
    if pcm.ndim != 1 or step == 0 or pcm.nbytes <= max_payload_bytes:
        return [slice(0, len(pcm))]
    return [slice(start, start + step) for start in range(0, len(pcm), step)]
