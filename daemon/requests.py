"""What the supervisor says and hears on a job's behalf: client requests -> typed job
specs and jobs (built once, at acceptance), worker output -> client events, and a job's
end -> the reply its client gets.

One builder per request type, chosen once by the request's type. A builder checks what
the protocol's types cannot (payload shape and dtype, a known avatar, non-empty text),
takes the request's data into a daemon-owned ring slot and returns the spec with that
slot's descriptor; every refusal is a `ProtocolError` naming the field and the rule.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from avatard.ipc import protocol as P
from avatard.ipc.segments import ShmFullError

from .avatars import AvatarStore, AvatarTooLarge
from .book import POLICIES, Ended
from .inputs import StreamedInputs
from .jobs import Job, new_job_id
from .sessions import Session, Sessions

# As engines/audio.MAX_FLOAT_PEAK (the supervisor imports no engine module): above it the
# samples are integer PCM sent as float, never speech in [-1, 1].
MAX_FLOAT_PEAK = 2.0


@dataclass(frozen=True, slots=True)
class Built:
    """A request's typed spec, the input slot it holds (None: none) and, for a streamed
    input (`more`), its first chunk (float32 PCM bytes, copied out of the client's slot)."""

    spec: P.AnyJobSpec
    input_desc: P.SlotDesc | None = None
    first_chunk: bytes | None = None


def _avatar(avatars: AvatarStore, avatar_id: str, req_id: int) -> P.AvatarRef | None:
    if not avatar_id:
        return None  # the engine's default portrait
    ref = avatars.ref(avatar_id)
    if ref is None:
        why = (" any more: it was let go to make room for newer portraits (avatars.max_count"
               f"={avatars.max_avatars}, avatars.max_bytes={avatars.max_bytes}); register "
               "it again" if avatars.was_evicted(avatar_id) else "")
        raise P.ProtocolError(P.E_NOT_FOUND, "avatar_id",
                              f"avatar {avatar_id!r} is not registered{why}", req_id)
    return ref


def _check_pcm(msg: P.Lipsync | P.Transcribe | P.JobAudio) -> None:
    if msg.audio.dtype != "float32":
        raise P.ProtocolError(P.E_BAD_MESSAGE, "audio.dtype", "must be float32 PCM, got "
                              f"{msg.audio.dtype}", msg.req_id)
    if len(msg.audio.shape) != 1:
        raise P.ProtocolError(P.E_BAD_MESSAGE, "audio.shape", "must be 1-D (mono) PCM, got "
                              f"shape {list(msg.audio.shape)}", msg.req_id)


def take_chunk(msg: P.Lipsync | P.Transcribe | P.JobAudio, extra: list[Any],
               session: Session, sessions: Sessions) -> bytes:
    """A chunk of streamed audio as bytes of its own: checked like any audio payload; a
    local client's is copied out of its input slot and the slot given back at once (the
    client writes its next chunk there). Raises `ProtocolError` naming `audio`."""
    _check_pcm(msg)
    if isinstance(msg.audio, P.Inline):  # its own bytes already: no slot needed
        return bytes(sessions.inline_part(msg.audio, extra, "audio", msg.req_id))
    desc = sessions.take_input(session, msg.audio, extra, "audio", msg.req_id)
    try:
        return sessions.read_input(desc).tobytes()
    finally:
        sessions.release_input(desc.key)


def live_audio_bytes(msg: P.LiveAudio, extra: list[Any], session: Session,
                     sessions: Sessions) -> bytes:
    """The speech of a `live_audio` request as bytes of its own (float32 mono PCM), copied
    out of its input slot, which goes back at once. Raises `ProtocolError`:
    bad_message/audio.dtype (not float32), bad_message/audio.shape (not 1-D), bad_input/audio
    (no samples; NaN or infinite samples; a peak over 2, integer PCM sent as float), and
    what `Sessions.take_input` raises (too_large/audio over the payload limit...)."""
    if msg.audio.dtype != "float32":
        raise P.ProtocolError(P.E_BAD_MESSAGE, "audio.dtype", "must be float32 (mono PCM in "
                              f"[-1, 1]), got {msg.audio.dtype}", msg.req_id)
    if len(msg.audio.shape) != 1:
        raise P.ProtocolError(P.E_BAD_MESSAGE, "audio.shape", "must be 1-D (mono), got "
                              f"{msg.audio.shape}", msg.req_id)
    if msg.audio.shape[0] == 0:
        raise P.ProtocolError(P.E_BAD_INPUT, "audio", "is empty (0 samples)", msg.req_id)
    desc = sessions.take_input(session, msg.audio, extra, "audio", msg.req_id)
    try:
        pcm = np.array(sessions.read_input(desc))
    finally:
        sessions.release_input(desc.key)
    # Checked here, at the boundary, so a bad chunk is the request's error and never
    # reaches the session's engine (where it would end the session).
    if not np.isfinite(pcm).all():
        raise P.ProtocolError(P.E_BAD_INPUT, "audio", "contains NaN or infinite samples",
                              msg.req_id)
    peak = float(np.abs(pcm).max())
    if peak > MAX_FLOAT_PEAK:
        raise P.ProtocolError(P.E_BAD_INPUT, "audio", f"samples must lie in [-1, 1], peak is "
                              f"{peak:.3g} (integer PCM as float?)", msg.req_id)
    return pcm.tobytes()


def _audio_input(msg: P.Lipsync | P.Transcribe, extra: list[Any], session: Session,
                 sessions: Sessions, inputs: StreamedInputs
                 ) -> tuple[P.SlotDesc | None, bytes | None]:
    """(input slot, None) for audio in one payload; (None, first chunk) for a streamed
    input (`more`), whose announced length is checked against the limit at once."""
    if not msg.more:
        _check_pcm(msg)
        return sessions.take_input(session, msg.audio, extra, "audio", msg.req_id), None
    inputs.check_length(msg.total_samples, msg.sample_rate, msg.req_id)
    return None, take_chunk(msg, extra, session, sessions)


def _register(msg: P.RegisterAvatar, extra: list[Any], session: Session, sessions: Sessions,
              avatars: AvatarStore, inputs: StreamedInputs) -> Built:
    if msg.image.dtype != "uint8" or len(msg.image.shape) != 1:
        raise P.ProtocolError(P.E_BAD_MESSAGE, "image.shape",
                              "must be 1-D uint8 (the bytes of an image file)", msg.req_id)
    desc = sessions.take_input(session, msg.image, extra, "image", msg.req_id)
    try:
        ref = avatars.store(sessions.read_input(desc))
    except AvatarTooLarge as exc:
        raise P.ProtocolError(P.E_TOO_LARGE, "image", str(exc), msg.req_id) from None
    except ShmFullError as exc:
        raise P.ProtocolError(P.E_NO_SPACE, "image", str(exc), msg.req_id) from None
    finally:
        sessions.release_input(desc.key)  # the store keeps its own copy
    return Built(P.RegisterSpec(avatar=ref))


def _speak(msg: P.Speak, extra: list[Any], session: Session, sessions: Sessions,
           avatars: AvatarStore, inputs: StreamedInputs) -> Built:
    avatar = _avatar(avatars, msg.avatar_id, msg.req_id)
    if not msg.text.strip():
        raise P.ProtocolError(P.E_BAD_INPUT, "text", "must not be empty", msg.req_id)
    return Built(P.SpeakSpec(text=msg.text, voice=msg.voice, avatar=avatar,
                             send_audio=msg.send_audio))


def _lipsync(msg: P.Lipsync, extra: list[Any], session: Session, sessions: Sessions,
             avatars: AvatarStore, inputs: StreamedInputs) -> Built:
    avatar = _avatar(avatars, msg.avatar_id, msg.req_id)
    desc, first = _audio_input(msg, extra, session, sessions, inputs)
    return Built(P.LipsyncSpec(audio=desc, sample_rate=msg.sample_rate, avatar=avatar),
                 desc, first)


def _transcribe(msg: P.Transcribe, extra: list[Any], session: Session, sessions: Sessions,
                avatars: AvatarStore, inputs: StreamedInputs) -> Built:
    desc, first = _audio_input(msg, extra, session, sessions, inputs)
    return Built(P.TranscribeSpec(audio=desc, sample_rate=msg.sample_rate), desc, first)


def _live_open(msg: P.LiveOpen, extra: list[Any], session: Session, sessions: Sessions,
               avatars: AvatarStore, inputs: StreamedInputs) -> Built:
    # The voice is checked by the worker's TTS engine when the session starts (the
    # supervisor does not know the engines' voices).
    return Built(P.LiveSpec(avatar=_avatar(avatars, msg.avatar_id, msg.req_id),
                            voice=msg.voice, options=msg.options))


BUILDERS: dict[type[P.Msg], Callable[..., Built]] = {
    P.RegisterAvatar: _register,
    P.Speak: _speak,
    P.Lipsync: _lipsync,
    P.Transcribe: _transcribe,
    P.LiveOpen: _live_open,
}


def build_job(msg: Any, extra: list[Any], session: Session, sessions: Sessions,
              avatars: AvatarStore, inputs: StreamedInputs, default_deadline_s: float,
              now: float) -> Job:
    """The job of a request: its typed spec (`build_spec`), a daemon-unique id, the seed
    (the request's, else a random one kept for reruns), the deadline (the request's
    `deadline_s`, else `default_deadline_s`, from `now`, monotonic s), the input slot it
    holds, and a streamed input's first chunk, opened in `inputs`. A kind without a
    deadline (a live session) gets `math.inf`. Raises `ProtocolError` like `build_spec` and
    `StreamedInputs.open`."""
    start_index = getattr(msg, "start_index", 0)
    audio_start_index = getattr(msg, "audio_start_index", 0)
    if (start_index or audio_start_index) and not getattr(msg, "seed", 0):
        # A random seed would make other frames than the ones the client already holds.
        field = "start_index" if start_index else "audio_start_index"
        raise P.ProtocolError(P.E_BAD_MESSAGE, field, "a start above 0 needs a seed other "
                              "than 0 (the seed of the attempt that sent the first part)",
                              msg.req_id)
    built = build_spec(msg, extra, session, sessions, avatars, inputs)
    deadline = math.inf
    if POLICIES[built.spec.job_kind].deadline:
        deadline = now + (getattr(msg, "deadline_s", 0.0) or default_deadline_s)
    job = Job(job_id=new_job_id(), spec=built.spec, client=session.identity,
              req_id=msg.req_id,
              seed=getattr(msg, "seed", 0) or int.from_bytes(os.urandom(7), "little"),
              deadline=deadline, accepted_at=now,
              input_slot=built.input_desc.key if built.input_desc else None,
              # A resumed request: the client holds what comes before these indices, so
              # the job is delivered from them on, as a job requeued after a crash is.
              frames_delivered=start_index, audio_delivered=audio_start_index)
    if built.first_chunk is not None:
        try:
            inputs.open(job.job_id, msg.sample_rate, built.first_chunk, final=False)
        except P.ProtocolError as exc:
            exc.req_id = msg.req_id
            raise
    return job


def accepted_reply(job: Job, queue_position: int, capabilities: P.Capabilities | None,
                   avatars: AvatarStore) -> P.Accepted:
    """The `accepted` of an announced job: its id, place in the queue and the media it
    will produce, from the workers' READY report (`capabilities`; None before any worker
    was ready: every figure 0) and the frame size the portrait's registration reported
    (0 x 0 while its registration runs). A live session's audio events carry the audio
    its frames were made from, at the avatar engine's rate."""
    spec = job.spec
    offer = capabilities or P.Capabilities()
    fps = width = height = audio_rate = 0
    if isinstance(spec, (P.SpeakSpec, P.LipsyncSpec, P.LiveSpec)):
        fps = offer.fps
        frame = (avatars.frame_size(spec.avatar.avatar_id) if spec.avatar is not None
                 else offer.default_frame)
        if frame is not None:
            width, height = frame.width, frame.height
        if isinstance(spec, P.SpeakSpec) and spec.send_audio:
            audio_rate = offer.audio_rate  # the TTS's own rate: audio events are not resampled
        elif isinstance(spec, P.LiveSpec):
            audio_rate = offer.live_audio_rate
    return P.make(P.Accepted, req_id=job.req_id, job_id=job.job_id,
                  queue_position=queue_position, fps=fps, width=width, height=height,
                  audio_rate=audio_rate)


def client_event(job: Job, msg: P.WFrame | P.WAudio) -> P.Frame | P.AudioChunk:
    """The client's `frame` / `audio` event for a frame or audio chunk a worker wrote
    (same index, pts and slot)."""
    if isinstance(msg, P.WFrame):
        return P.make(P.Frame, job_id=job.job_id, index=msg.index, pts_us=msg.pts_us,
                      data=msg.data)
    return P.make(P.AudioChunk, job_id=job.job_id, index=msg.index, pts_us=msg.pts_us,
                  sample_rate=msg.sample_rate, data=msg.data)


def playback_event(job: Job, msg: P.WPlaybackStarted | P.WPlaybackFinished
                   | P.WPlaybackSkipped | P.WSpeechRefused) -> P.Msg:
    """The client's `playback_started`, `playback_finished`, `playback_skipped` or
    `speech_refused` event of a live session."""
    if isinstance(msg, P.WPlaybackStarted):
        return P.make(P.PlaybackStarted, job_id=job.job_id, segment_id=msg.segment_id)
    if isinstance(msg, P.WPlaybackSkipped):
        return P.make(P.PlaybackSkipped, job_id=job.job_id, segment_id=msg.segment_id,
                      reason=msg.reason)
    if isinstance(msg, P.WSpeechRefused):
        return P.make(P.SpeechRefused, job_id=job.job_id, segment_id=msg.segment_id,
                      code=msg.code, field=msg.field, rule=msg.rule, text=msg.text)
    return P.make(P.PlaybackFinished, job_id=job.job_id, segment_id=msg.segment_id,
                  position_s=msg.position_s, interrupted=msg.interrupted)


def build_spec(msg: P.Msg, extra: list[Any], session: Session, sessions: Sessions,
               avatars: AvatarStore, inputs: StreamedInputs) -> Built:
    """The typed spec of a job request, the input slot it holds (None: none; release it
    with `sessions.release_input(desc.key)` when the job ends) and a streamed input's
    first chunk. Raises `ProtocolError` (`unknown_type` for a message that is not a job
    request)."""
    builder = BUILDERS.get(type(msg))
    if builder is None:
        raise P.ProtocolError(P.E_UNKNOWN_TYPE, "type", f"{type(msg).__name__} is not a job "
                              "request", getattr(msg, "req_id", 0))
    return builder(msg, extra, session, sessions, avatars, inputs)


def end_reply(ended: Ended, now: float) -> P.Msg:
    """The message a job's client gets at its end (`now`: monotonic seconds). An announced
    job gets `done` or `job_failed` (bad input as "field: rule"); a registration answers its
    request with `avatar_registered` or `error` {code, field, rule}."""
    job = ended.job
    if not POLICIES[job.kind].announced:
        assert isinstance(job.spec, P.RegisterSpec)
        if not ended.code:
            return P.make(P.AvatarRegistered, req_id=job.req_id,
                          avatar_id=job.spec.avatar.avatar_id)
        return P.make(P.Error, req_id=job.req_id, code=ended.code,
                      field=ended.field or "image", rule=(ended.rule or ended.message)[:4096])
    if ended.result is not None:
        r = ended.result
        # A live session that moved: the workers lost took their counts of frames and
        # audio sent and frames dropped with them; the book counted what it forwarded and
        # the index gaps. (Its media_s runs from index 0: the worker's clock went on from
        # the resume index.)
        return P.make(P.Done, job_id=job.job_id, frames=job.frames_earlier + r.frames,
                      audio_samples=job.audio_earlier + r.audio_samples, media_s=r.media_s,
                      wall_s=now - job.accepted_at,
                      first_frame_s=(job.first_frame_at - job.accepted_at
                                     if job.first_frame_at else 0.0), attempts=job.attempts,
                      frames_dropped=job.dropped_earlier + r.frames_dropped,
                      late_frames=job.late_earlier + r.late_frames,
                      frames_lost=job.frames_lost)
    message = f"{ended.field}: {ended.rule}" if ended.field else ended.message
    return P.make(P.JobFailed, job_id=job.job_id, code=ended.code, message=message[:4096],
                  attempts=job.attempts)
