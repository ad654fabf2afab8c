"""What the supervisor says and hears on a job's behalf: client requests -> typed job
specs and jobs (built once, at acceptance), worker output -> client events, and a job's
end -> the reply its client gets.

One builder per request type, chosen once by the request's type. A builder checks what
the protocol's types cannot (payload shape and dtype, a known avatar, non-empty text),
takes the request's data into a daemon-owned ring slot and returns the spec with that
slot's descriptor; every refusal is a `ProtocolError` naming the field and the rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from avatard.ipc import protocol as P
from avatard.ipc.segments import ShmFullError

from .avatars import AvatarStore, AvatarTooLarge
from .book import POLICIES, Ended
from .jobs import Job, new_job_id
from .sessions import Session, Sessions

Built = tuple[P.AnyJobSpec, P.SlotDesc | None]  # the spec, and the input slot it holds


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


def _check_pcm(msg: P.Lipsync | P.Transcribe) -> None:
    if msg.audio.dtype != "float32" or len(msg.audio.shape) != 1:
        raise P.ProtocolError(P.E_BAD_MESSAGE, "audio.shape", "must be 1-D float32 PCM",
                              msg.req_id)


def _register(msg: P.RegisterAvatar, extra: list[Any], session: Session, sessions: Sessions,
              avatars: AvatarStore) -> Built:
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
    return P.RegisterSpec(avatar=ref), None


def _speak(msg: P.Speak, extra: list[Any], session: Session, sessions: Sessions,
           avatars: AvatarStore) -> Built:
    avatar = _avatar(avatars, msg.avatar_id, msg.req_id)
    if not msg.text.strip():
        raise P.ProtocolError(P.E_BAD_INPUT, "text", "must not be empty", msg.req_id)
    return P.SpeakSpec(text=msg.text, voice=msg.voice, avatar=avatar,
                       send_audio=msg.send_audio), None


def _lipsync(msg: P.Lipsync, extra: list[Any], session: Session, sessions: Sessions,
             avatars: AvatarStore) -> Built:
    _check_pcm(msg)
    avatar = _avatar(avatars, msg.avatar_id, msg.req_id)
    desc = sessions.take_input(session, msg.audio, extra, "audio", msg.req_id)
    return P.LipsyncSpec(audio=desc, sample_rate=msg.sample_rate, avatar=avatar), desc


def _transcribe(msg: P.Transcribe, extra: list[Any], session: Session, sessions: Sessions,
                avatars: AvatarStore) -> Built:
    _check_pcm(msg)
    desc = sessions.take_input(session, msg.audio, extra, "audio", msg.req_id)
    return P.TranscribeSpec(audio=desc, sample_rate=msg.sample_rate), desc


BUILDERS: dict[type[P.Msg], Callable[..., Built]] = {
    P.RegisterAvatar: _register,
    P.Speak: _speak,
    P.Lipsync: _lipsync,
    P.Transcribe: _transcribe,
}


def build_job(msg: Any, extra: list[Any], session: Session, sessions: Sessions,
              avatars: AvatarStore, default_deadline_s: float, now: float) -> Job:
    """The job of a request: its typed spec (`build_spec`), a daemon-unique id, the seed
    (the request's, else a random one kept for reruns), the deadline (the request's
    `deadline_s`, else `default_deadline_s`, from `now`, monotonic s) and the input slot it
    holds. Raises `ProtocolError` like `build_spec`."""
    spec, input_desc = build_spec(msg, extra, session, sessions, avatars)
    return Job(job_id=new_job_id(), spec=spec, client=session.identity, req_id=msg.req_id,
               seed=getattr(msg, "seed", 0) or int.from_bytes(os.urandom(7), "little"),
               deadline=now + (getattr(msg, "deadline_s", 0.0) or default_deadline_s),
               accepted_at=now, input_slot=input_desc.key if input_desc else None)


def accepted_reply(job: Job, queue_position: int, capabilities: P.Capabilities | None,
                   avatars: AvatarStore) -> P.Accepted:
    """The `accepted` of an announced job: its id, place in the queue and the media it
    will produce, from the workers' READY report (`capabilities`; None before any worker
    was ready: every figure 0) and the frame size the portrait's registration reported
    (0 x 0 while its registration runs)."""
    spec = job.spec
    offer = capabilities or P.Capabilities()
    fps = width = height = audio_rate = 0
    if isinstance(spec, (P.SpeakSpec, P.LipsyncSpec)):
        fps = offer.fps
        frame = (avatars.frame_size(spec.avatar.avatar_id) if spec.avatar is not None
                 else offer.default_frame)
        if frame is not None:
            width, height = frame.width, frame.height
        if isinstance(spec, P.SpeakSpec) and spec.send_audio:
            audio_rate = offer.audio_rate  # the TTS's own rate: audio events are not resampled
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


def build_spec(msg: P.Msg, extra: list[Any], session: Session, sessions: Sessions,
               avatars: AvatarStore) -> Built:
    """The typed spec of a job request, and the input slot it holds (None: none; release
    it with `sessions.release_input(desc.key)` when the job ends). Raises `ProtocolError`
    (`unknown_type` for a message that is not a job request)."""
    builder = BUILDERS.get(type(msg))
    if builder is None:
        raise P.ProtocolError(P.E_UNKNOWN_TYPE, "type", f"{type(msg).__name__} is not a job "
                              "request", getattr(msg, "req_id", 0))
    return builder(msg, extra, session, sessions, avatars)


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
        return P.make(P.Done, job_id=job.job_id, frames=r.frames, audio_samples=r.audio_samples,
                      media_s=r.media_s, wall_s=now - job.accepted_at,
                      first_frame_s=(job.first_frame_at - job.accepted_at
                                     if job.first_frame_at else 0.0), attempts=job.attempts)
    message = f"{ended.field}: {ended.rule}" if ended.field else ended.message
    return P.make(P.JobFailed, job_id=job.job_id, code=ended.code, message=message[:4096],
                  attempts=job.attempts)
