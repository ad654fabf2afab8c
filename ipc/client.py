"""Python client for the avatard daemon.

    with Client() as client:                       # default local endpoint
        for event in client.speak("Hello there"):
            if isinstance(event, FrameEvent):
                use(event.array)                   # numpy view, valid until the next event

Local (``ipc://``) clients receive frames as descriptors into the daemon's shared-memory
rings and map them without copying; the slot is released when the iterator moves on (copy
the array to keep it). Remote (``tcp://``) clients get the bytes inline. Every call has a
timeout and says what it waited for; replies are matched by request id, so a late reply
to an abandoned request is never taken for the answer to a newer one.

Waiting for a job is a liveness check, not a countdown: a queued job legitimately sends
nothing for as long as the jobs ahead of it take. When a job (or a registration) is quiet
for `timeout_s`, the client asks the daemon for its health; while the daemon answers, it
waits on, up to the job's deadline (the request's `deadline_s`, else the daemon's
`job_deadline_s` from `welcome`) plus `timeout_s`. A daemon that exits or restarts drops
the connection, and one that is stopped or hung stops answering ZMTP heartbeats
(`heartbeat_timeout_s`): either ends the wait at once with `DaemonUnavailable`.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import zmq

from . import protocol as P
from .client_core import (  # the events and errors are this module's API too
    HEARTBEAT_TIMEOUT_S,
    LIVE_REQUESTS_KEPT,
    AcceptedMedia,
    AudioEvent,
    BusyError,
    ClientError,
    DoneEvent,
    FrameEvent,
    InputRefusedEvent,
    JobFailedError,
    PlaybackFinishedEvent,
    PlaybackSkippedEvent,
    PlaybackStartedEvent,
    SessionMovedEvent,
    SpeechRefusedEvent,
    TranscriptResult,
    WarningEvent,
    apply_curve,
    apply_heartbeat,
    audio_chunks,
    check_reply,
    decode_server,
    ends_job,
    job_event,
    no_reply_message,
    place_array,
    read_array,
    release_request,
    remember_live,
    route_of,
    slot_of,
    take_end_after_stale,
)
from .paths import default_runtime_dir, socket_endpoint
from .ring import SlotRing, StaleSlotError
from .sockets import wait_readable

__all__ = [
    "DAEMON_GONE", "LIVE_REQUESTS_KEPT", "AudioEvent", "BusyError", "Client", "ClientError",
    "DaemonUnavailable", "DoneEvent", "FrameEvent", "InputRefusedEvent", "JobFailedError",
    "JobHandle", "LiveSession", "PlaybackFinishedEvent", "PlaybackSkippedEvent",
    "PlaybackStartedEvent", "SessionMovedEvent", "SpeechRefusedEvent", "TranscriptResult",
    "WarningEvent", "default_endpoint",
]


class DaemonUnavailable(ClientError):
    """No daemon answered at the endpoint, or the one that did went away (code
    `daemon_gone`: its connection closed, so it exited or restarted, and with it every job
    and session of this client)."""


DAEMON_GONE = "daemon_gone"  # DaemonUnavailable.code when the connection dropped mid-call
# How long a job may stay quiet while the daemon answers, when the daemon did not say its
# default job deadline (welcome.job_deadline_s 0).
FALLBACK_JOB_DEADLINE_S = 600.0


def default_endpoint() -> str:
    """$AVATARD_ENDPOINT, else the socket in the runtime directory the environment names
    (`avatard.ipc.paths.default_runtime_dir`, as the daemon resolves it)."""
    return os.environ.get("AVATARD_ENDPOINT") or socket_endpoint(default_runtime_dir())


class JobHandle(AcceptedMedia, Iterator[Any]):
    """A job the daemon accepted, and the iterator of its events (`FrameEvent`,
    `AudioEvent`, `TranscriptResult`, `WarningEvent`, then `DoneEvent`; `JobFailedError`
    raised at its end). What `accepted` announced (`job_id`, `fps`, `width`, `height`,
    `audio_rate`...): see `AcceptedMedia`. Iterating releases each shared-memory slot
    when the next event is asked for; `close()` releases the one held and stops reading
    the job (it keeps running: `cancel` stops it)."""

    def __init__(self, accepted: P.Accepted, events: Iterator[Any]):
        super().__init__(accepted)
        self._events = events

    def __next__(self) -> Any:
        return next(self._events)

    def close(self) -> None:
        """Release the slot held by the last event and stop reading the job's events."""
        self._events.close()  # type: ignore[attr-defined]


class Client:
    def __init__(self, endpoint: str | None = None, timeout_s: float = 30.0,
                 inline: bool | None = None, name: str = "python",
                 curve_server_key_file: str | None = None,
                 curve_client_key_file: str | None = None,
                 heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S):
        """Connect to the daemon at `endpoint` (default: `default_endpoint()`) and say hello.

        `timeout_s`: how long the daemon may take to answer a request (hello, health...),
        and how long a job may stay quiet before the client checks that the daemon still
        answers (a job itself may wait in the queue up to its deadline). `heartbeat_timeout_s`:
        the connection is dropped, and every wait ends with `DaemonUnavailable` code
        `daemon_gone`, when the daemon sends nothing, not even a ZMTP heartbeat, for this
        long (a stopped or hung daemon, or a vanished host). `curve_server_key_file` (the
        daemon's public .key) and `curve_client_key_file` (this client's .key_secret)
        authenticate over tcp:// to a daemon that requires CURVE; they default to
        $AVATARD_CURVE_SERVER_KEY and $AVATARD_CURVE_CLIENT_KEY. Raises `ClientError`
        (`DaemonUnavailable` when no daemon answers within `timeout_s`)."""
        self.endpoint = endpoint or default_endpoint()
        self.timeout_s = timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.inline = (not self.endpoint.startswith("ipc://")) if inline is None else inline
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        apply_curve(self._sock, self.endpoint, curve_server_key_file, curve_client_key_file)
        apply_heartbeat(self._sock, heartbeat_timeout_s)
        # A dropped connection is the one sure sign the daemon is gone (a SIGKILLed daemon
        # says nothing): every wait watches for it instead of running out its timeout.
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._sock.connect(self.endpoint)
        self._req_ids = itertools.count(1)
        self._rings: dict[str, SlotRing] = {}
        self._input_ring: SlotRing | None = None
        self._pending: dict[str, deque[tuple[P.Msg, list[Any]]]] = {}
        self._replies: dict[int, tuple[P.Msg, list[Any]]] = {}
        # Live input requests get no reply when taken: req_id -> (job id, request type) of
        # the latest ones, so a refusal reaches its session's events (errors come back
        # within a tick of the daemon, long before this many more inputs are sent).
        self._live_requests: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self._name = name
        try:
            welcome = self._hello(name)
        except BaseException:
            self._close_sockets()  # no daemon, or it refused us: leave no socket
            raise
        self.session = welcome.session
        self.server = welcome.server
        # Audio above this streams in chunks (0: a daemon that does not say; one payload).
        self.max_payload_bytes = welcome.max_payload_bytes
        self.max_media_s = welcome.max_media_s
        self.job_deadline_s = welcome.job_deadline_s or FALLBACK_JOB_DEADLINE_S
        if welcome.input_ring and not self.inline:
            self._input_ring = SlotRing.attach(welcome.input_ring)

    # ------------------------------------------------------------- plumbing

    def _next_id(self) -> int:
        return next(self._req_ids)

    def _send(self, msg: P.Msg, *extra: bytes | memoryview) -> None:
        self._sock.send_multipart(P.Codec.encode(msg, *extra), copy=False)

    def _recv_one(self, deadline: float, what: str) -> tuple[P.Msg, list[Any]] | None:
        """The next message, waiting until `deadline` (monotonic s); None when nothing
        came. Raises DaemonUnavailable code `daemon_gone` as soon as the connection drops
        (what the daemon had of this client is gone)."""
        while True:
            if wait_readable(self._sock, 0, spin_us=0):
                frames = self._sock.recv_multipart(copy=False)
                decoded = decode_server([f.buffer for f in frames])
                if decoded is None:
                    continue  # a newer daemon's event type: skipped
                return decoded
            if self._disconnected():
                raise DaemonUnavailable(
                    f"the connection to the daemon at {self.endpoint} dropped while this "
                    f"client waited for {what}: the daemon exited or restarted, or sent "
                    f"nothing, not even a heartbeat, for {self.heartbeat_timeout_s:g} s "
                    "(stopped or hung); the jobs and session this client had there are gone",
                    code=DAEMON_GONE)
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return None
            self._poller.poll(remaining_ms)

    def _wait(self, ready: Callable[[], bool], what: str, until: float) -> None:
        """Route messages until `ready()` holds. Whenever nothing comes for `timeout_s`,
        check that the daemon answers (`_check_alive`) and wait on while it does, up to
        `until` (monotonic s). Raises DaemonUnavailable: `daemon_gone` when the connection
        drops, `timeout` when the daemon answers no health check or `until` passes."""
        while not ready():
            now = time.monotonic()
            if now >= until:
                raise DaemonUnavailable(
                    f"no {what} from the daemon at {self.endpoint} by its deadline (the job's "
                    f"deadline_s + timeout_s={self.timeout_s:g} s), although the daemon "
                    "answers health checks", code=P.E_TIMEOUT)
            got = self._recv_one(min(now + self.timeout_s, until), what)
            if got is not None:
                self._route(*got)
            elif time.monotonic() < until:
                self._check_alive(what)

    def _check_alive(self, what: str) -> None:
        """Ask the daemon for its health and wait `timeout_s` for the answer, routing what
        else comes meanwhile. Raises DaemonUnavailable (`timeout`, or `daemon_gone`) when
        it does not answer."""
        req_id = self._next_id()
        self._send(P.make(P.Health, req_id=req_id))
        deadline = time.monotonic() + self.timeout_s
        while req_id not in self._replies:
            got = self._recv_one(deadline, f"the answer to a health check (while waiting "
                                           f"for {what})")
            if got is None:
                raise DaemonUnavailable(
                    f"no {what} from the daemon at {self.endpoint} for {self.timeout_s:g} s, "
                    f"and no answer to a health check within {self.timeout_s:g} s more: the "
                    "daemon is hung or overloaded", code=P.E_TIMEOUT)
            self._route(*got)
        del self._replies[req_id]

    def _job_wait_until(self, deadline_s: float) -> float:
        """The monotonic time past which a job accepted now stops being waited for, however
        alive the daemon: its deadline (`deadline_s`, else the daemon's default) plus
        `timeout_s` for its end to arrive. The daemon ends the job at its deadline itself."""
        return time.monotonic() + (deadline_s or self.job_deadline_s) + self.timeout_s

    def _disconnected(self) -> bool:
        """Whether the monitor reported the connection to the daemon dropped."""
        from zmq.utils.monitor import recv_monitor_message

        gone = False
        while self._monitor.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self._monitor)
            gone = gone or event["event"] == zmq.EVENT_DISCONNECTED
        return gone

    def _route(self, msg: P.Msg, extra: list[Any]) -> None:
        """Keep a message for whoever waits for it: a request id or a job id."""
        job_id, req_id = route_of(msg, self._live_requests)
        if job_id is not None:
            self._pending.setdefault(job_id, deque()).append((msg, extra))
        elif req_id is not None:
            self._replies[req_id] = (msg, extra)

    def _route_arrived(self) -> None:
        """Route every message that has arrived, without waiting."""
        while wait_readable(self._sock, 0, spin_us=0):
            frames = self._sock.recv_multipart(copy=False)
            decoded = decode_server([f.buffer for f in frames])
            if decoded is not None:
                self._route(*decoded)

    def _await_reply(self, req_id: int, what: str, until: float | None = None
                     ) -> tuple[P.Msg, list[Any]]:
        """The reply to request `req_id`: within `timeout_s`, or, with `until` (monotonic
        s; a request the daemon answers after a job, such as a registration), for as long
        as the daemon answers health checks, up to `until`. Raises `ClientError` for an
        error reply, `BusyError`, `DaemonUnavailable`."""
        if until is not None:
            self._wait(lambda: req_id in self._replies, what, until)
        deadline = time.monotonic() + self.timeout_s
        while req_id not in self._replies:
            got = self._recv_one(deadline, what)
            if got is None:
                raise DaemonUnavailable(no_reply_message(self.endpoint, self.timeout_s, what),
                                        code=P.E_TIMEOUT)
            self._route(*got)
        msg, extra = self._replies.pop(req_id)
        check_reply(msg, what)
        return msg, extra

    def _call(self, msg: P.Msg, what: str, *extra: bytes | memoryview,
              until: float | None = None) -> P.Msg:
        self._send(msg, *extra)
        reply, _ = self._await_reply(msg.req_id, what, until)  # type: ignore[attr-defined]
        return reply

    def _ring(self, name: str) -> SlotRing:
        ring = self._rings.get(name)
        if ring is None:
            ring = self._rings[name] = SlotRing.attach(name)
        return ring

    def _payload(self, array: np.ndarray) -> tuple[P.Payload, list[bytes | memoryview]]:
        """Place client data: in the input ring for local clients, inline otherwise."""
        return place_array(array, self._input_ring, self.timeout_s)

    # ------------------------------------------------------------- public API

    def health(self) -> P.HealthReply:
        return self._call(P.make(P.Health, req_id=self._next_id()), "Health")  # type: ignore

    def stats(self) -> dict[str, Any]:
        reply = self._call(P.make(P.Stats, req_id=self._next_id()), "Stats")
        return reply.body  # type: ignore[attr-defined]

    def voices(self) -> P.VoicesReply:
        """The TTS engine's voices (`.voices`: `VoiceInfo` name, languages, sample_rate in
        Hz, default), its routing by language (`.voices_by_language`: language code ->
        voice name) and the daemon's health word (`.status`). The lists are empty until a
        worker has loaded its engines (`.engine` ""; `.status` "starting": ask again;
        "failed": none could). Answered from the workers' READY reports, so it does not
        queue behind jobs. Raises `ClientError`
        (`DaemonUnavailable` after `timeout_s` without an answer)."""
        reply = self._call(P.make(P.Voices, req_id=self._next_id()), "Voices")
        assert isinstance(reply, P.VoicesReply)
        return reply

    def register_avatar(self, image: bytes) -> str:
        """Register a portrait (encoded image bytes); returns its avatar id. A worker
        registers it, so it waits behind running jobs (while the daemon answers, up to its
        job deadline). Raises `ClientError` naming the refused field (`image`)."""
        payload, extra = self._payload(np.frombuffer(image, dtype=np.uint8))
        reply = self._call(P.make(P.RegisterAvatar, req_id=self._next_id(), image=payload),
                           "RegisterAvatar", *extra, until=self._job_wait_until(0.0))
        return reply.avatar_id  # type: ignore[attr-defined]

    def speak(self, text: str, avatar: str = "", voice: str = "", seed: int = 0,
              deadline_s: float = 0.0, send_audio: bool = True, start_index: int = 0,
              audio_start_index: int = 0) -> JobHandle:
        """Speak `text` (at most 100000 characters; the TTS engine's own limit is smaller)
        with `voice` ("" = the default; `voices()` lists them) and portrait `avatar` ("" =
        the engine's default). `start_index` / `audio_start_index`: the first frame / audio
        chunk to send, for a retry that already holds the ones before (needs the same
        `seed`, not 0). Returns once the daemon accepted the job: a `JobHandle` with the
        announced media format, iterating the job's events. Raises `ClientError` naming
        the refused field (`BusyError` for a full queue)."""
        msg = P.make(P.Speak, req_id=self._next_id(), text=text, voice=voice, avatar_id=avatar,
                     seed=seed, deadline_s=deadline_s, send_audio=send_audio,
                     start_index=start_index, audio_start_index=audio_start_index)
        return self._job(msg, "Speak")

    def lipsync(self, pcm: np.ndarray, sample_rate: int, avatar: str = "", seed: int = 0,
                deadline_s: float = 0.0, start_index: int = 0) -> JobHandle:
        """Animate portrait `avatar` ("" = the engine's default) to mono PCM `pcm`
        (float32, shape (n,)) at `sample_rate` Hz (8000..192000). Returns a `JobHandle`
        once the daemon accepted the job (no audio events: `audio_rate` 0). Audio larger
        than one payload streams in chunks (`_audio_job`). Raises `ClientError` naming
        the refused field (`BusyError` for a full queue). `start_index` as for `speak`."""
        return self._audio_job(P.Lipsync, "Lipsync", pcm, sample_rate, avatar_id=avatar,
                               seed=seed, deadline_s=deadline_s, start_index=start_index)

    def transcribe(self, pcm: np.ndarray, sample_rate: int, deadline_s: float = 0.0
                   ) -> TranscriptResult:
        result = None
        for event in self._audio_job(P.Transcribe, "Transcribe", pcm, sample_rate,
                                     deadline_s=deadline_s):
            if isinstance(event, TranscriptResult):
                result = event
        if result is None:
            raise ClientError("transcribe finished without a transcript")
        return result

    def _audio_job(self, cls: type[P.Msg], what: str, pcm: np.ndarray, sample_rate: int,
                   **fields: Any) -> JobHandle:
        """An audio job: the audio in one payload when it fits `max_payload_bytes`, else
        its first chunk with `more` and the rest as `job_audio` requests, each written
        once the daemon has taken the one before from the input ring (it copies a chunk
        out at once). Stops sending when the daemon ends the job meanwhile."""
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        first, *rest = audio_chunks(pcm, self.max_payload_bytes)
        if not rest:
            payload, extra = self._payload(pcm)
            msg = P.make(cls, req_id=self._next_id(), audio=payload, sample_rate=sample_rate,
                         **fields)
            return self._job(msg, what, *extra)
        payload, extra = self._payload(pcm[first])
        msg = P.make(cls, req_id=self._next_id(), audio=payload, sample_rate=sample_rate,
                     more=True, total_samples=len(pcm), **fields)
        accepted = self._accepted(msg, what, *extra)
        until = self._job_wait_until(fields.get("deadline_s", 0.0))
        job_id = accepted.job_id
        chunk_ids: list[int] = []
        for chunk in rest:
            if self._job_ended(job_id, chunk_ids):
                break
            payload, extra = self._payload(pcm[chunk])
            chunk_ids.append(self._next_id())
            self._send(P.make(P.JobAudio, req_id=chunk_ids[-1], job_id=job_id, audio=payload,
                              final=chunk is rest[-1]), *extra)
        self._job_ended(job_id, chunk_ids)
        return JobHandle(accepted, self._events(job_id, until))

    def _job_ended(self, job_id: str, chunk_ids: list[int]) -> bool:
        """Route what has arrived, without waiting. True when `job_id` has ended (its
        events say how); raises `ClientError` when a chunk was refused while it runs."""
        self._route_arrived()
        refused = [r for r in (self._replies.pop(i, None) for i in chunk_ids) if r is not None]
        if any(isinstance(m, (P.JobFailed, P.Done)) for m, _ in self._pending.get(job_id, ())):
            return True
        for msg, _ in refused:
            if isinstance(msg, P.Error):
                self.cancel(job_id)  # it would wait for the rest of its audio
                raise ClientError(f"job {job_id}: audio chunk refused: {msg.code}: "
                                  f"{msg.field}: {msg.rule}", code=msg.code, field=msg.field)
        return False

    def live(self, avatar: str = "", voice: str = "", seed: int = 0, prebuffer_ms: int = 0,
             render_ahead_frames: int = -1) -> LiveSession:
        """Open a live session on `avatar` (default: the engine's portrait): frames at the
        engine's fps from now until `LiveSession.close()`, speech fed with `send_audio` /
        `send_text`. `prebuffer_ms` and `render_ahead_frames`: the session's options
        (`protocol.LiveOptions`; a jitter buffer for audio sent at realtime pace, and the
        compute slack). Raises what `accepted` would not come for (`ClientError` naming
        the field, `BusyError`)."""
        msg = P.make(P.LiveOpen, req_id=self._next_id(), avatar_id=avatar, voice=voice,
                     seed=seed, options=P.LiveOptions(
                         prebuffer_ms=prebuffer_ms, render_ahead_frames=render_ahead_frames))
        self._send(msg)
        accepted, _ = self._await_reply(msg.req_id, "LiveOpen")
        assert isinstance(accepted, P.Accepted)
        return LiveSession(self, accepted)

    def _send_live(self, msg: P.Msg, what: str, *extra: bytes | memoryview) -> int:
        req_id = remember_live(self._live_requests, msg, what)
        self._send(msg, *extra)
        return req_id

    def cancel(self, job_id: str) -> None:
        self._send(P.make(P.Cancel, req_id=self._next_id(), job_id=job_id))

    def _hello(self, name: str) -> P.Welcome:
        welcome = self._call(P.make(P.Hello, req_id=self._next_id(), client=name,
                                    inline=self.inline), "Hello")
        assert isinstance(welcome, P.Welcome)
        return welcome

    def _job(self, msg: P.Msg, what: str, *extra: bytes | memoryview) -> JobHandle:
        accepted = self._accepted(msg, what, *extra)
        until = self._job_wait_until(getattr(msg, "deadline_s", 0.0))
        return JobHandle(accepted, self._events(accepted.job_id, until))

    def _accepted(self, msg: P.Msg, what: str, *extra: bytes | memoryview) -> P.Accepted:
        """Send a job request; its `accepted` reply (raises what a refusal says)."""
        self._send(msg, *extra)
        try:
            accepted, _ = self._await_reply(msg.req_id, what)  # type: ignore[attr-defined]
        except ClientError as exc:
            if exc.code != P.E_NO_SESSION or not self.inline:
                raise
            # The daemon closed our idle session (or restarted): open a new one and retry.
            # Only inline requests can be replayed; shm payloads named the old input ring.
            self._hello(self._name)
            self._send(msg, *extra)
            accepted, _ = self._await_reply(msg.req_id, what)  # type: ignore[attr-defined]
        assert isinstance(accepted, P.Accepted)
        return accepted

    def _events(self, job_id: str, until: float | None = None) -> Iterator[Any]:
        """Frames, audio and the final event of one job, in order, each waited for while
        the daemon answers, up to `until` (monotonic s: `_job_wait_until`; None: the
        daemon's default deadline from now). A slot is released when the caller asks for
        the next event."""
        if until is None:
            until = self._job_wait_until(0.0)
        queue = self._pending.setdefault(job_id, deque())
        held: P.SlotDesc | None = None
        try:
            while True:
                # The caller asked for the next event, so it is done with the last one:
                # give its slot back before waiting (a slow engine must not look like a
                # client holding a frame past timeouts.client_call_s).
                if held is not None:
                    self._release(held)
                    held = None
                self._wait(lambda: bool(queue), f"event of job {job_id}", until)
                msg, extra = queue.popleft()
                try:
                    # Raises JobFailedError / ClientError for the job's failure.
                    event = job_event(job_id, msg, extra, self._materialise,
                                      self._live_requests)
                except StaleSlotError as exc:
                    msg, extra = self._end_after_stale(job_id, queue, exc)
                    event = job_event(job_id, msg, extra, self._materialise,
                                      self._live_requests)
                held = slot_of(msg)
                if event is not None:
                    yield event
                if isinstance(event, DoneEvent):
                    return
        finally:
            if held is not None:
                self._release(held)
            self._pending.pop(job_id, None)

    def _end_after_stale(self, job_id: str, queue: deque[tuple[P.Msg, list[Any]]],
                         stale: StaleSlotError) -> tuple[P.Msg, list[Any]]:
        """The last message of job `job_id` (its message queue `queue`) once one of its
        frames turned out `stale`: the daemon took the slot back, because this client held
        a slot past `timeouts.client_call_s`, and ended the job; its `job_failed` follows
        the frames queued before it (a `done` turns into a `job_failed`:
        `take_end_after_stale`). Waits up to `timeout_s` for
        it; raises DaemonUnavailable naming the stale slot when it does not come."""
        self._wait(lambda: any(ends_job(msg) for msg, _ in queue),
                   f"end of job {job_id} after the daemon took back the slot of one of its "
                   f"events ({stale})", time.monotonic() + self.timeout_s)
        end = take_end_after_stale(queue, stale)
        assert end is not None  # what _wait waited for
        return end

    def _materialise(self, data: P.Payload, extra: list[Any]) -> np.ndarray:
        return read_array(data, extra, self._ring)

    def _release(self, data: P.SlotDesc) -> None:
        if self._sock.closed:  # an abandoned job iterator collected after close()
            return
        self._send(release_request(data))

    def close(self) -> None:
        try:
            self._send(P.make(P.Bye, req_id=self._next_id()))
        except zmq.ZMQError:
            pass
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        if self._input_ring is not None:
            self._input_ring.close()
            self._input_ring = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveSession(AcceptedMedia):
    """A live session of a `Client` (`Client.live()`): send speech at any time, read the
    endless stream of events by iterating (frames, audio, playback events, refused
    inputs, and `DoneEvent` once closed).

        session = client.live(seed=1)
        session.send_audio(pcm, 16000, segment_id="hello")   # float32 mono
        session.end_segment("hello")
        for event in session:                  # FrameEvent k, AudioEvent k, ... forever
            ...                                # until close() -> DoneEvent

    Frame k and audio chunk k (the audio frame k was made from: speech, or silence while
    idle) come at the engine's fps; indices skip frames this client did not read in
    time (dropped, counted in `DoneEvent.frames_dropped`). The sends return at once (no
    reply when taken); a refused input arrives as an `InputRefusedEvent` among the
    events. Like the `Client`, a session is used from one thread: interleave sends with
    reading events (an idle reader loses frames, never stalls the daemon); `poll` waits
    for the next event with a bound, so the sends can keep a schedule of their own."""

    def __init__(self, client: Client, accepted: P.Accepted):
        # What `accepted` announced (`AcceptedMedia`): frames per second, the frames'
        # width x height, and the Hz of its AudioEvents (the avatar engine's rate).
        super().__init__(accepted)
        self.client = client
        # A live session has no deadline: its events are waited for as long as the daemon
        # answers (frames come at the engine's fps once it runs).
        self._events = client._events(self.job_id, until=math.inf)

    def send_audio(self, pcm: np.ndarray, sample_rate: int, segment_id: str) -> int:
        """Append speech to segment `segment_id`: 1-D float32 PCM in [-1, 1] at
        `sample_rate` Hz (8000..192000; every chunk of a segment at one rate), any length
        up to one payload (`Client.max_payload_bytes`). Sent as given: another dtype is
        refused by the daemon. Returns the request id (an `InputRefusedEvent` names it)."""
        payload, extra = self.client._payload(np.ascontiguousarray(pcm))
        return self.client._send_live(P.make(
            P.LiveAudio, req_id=self.client._next_id(), job_id=self.job_id,
            segment_id=segment_id, audio=payload, sample_rate=sample_rate), "LiveAudio", *extra)

    def send_text(self, text: str, segment_id: str, final: bool = False) -> int:
        """Append text to segment `segment_id` (an LLM's tokens as they come): each
        complete sentence is spoken as soon as it is complete; `final` speaks the rest
        and ends the segment."""
        return self.client._send_live(P.make(
            P.LiveText, req_id=self.client._next_id(), job_id=self.job_id,
            segment_id=segment_id, text=text, final=final), "LiveText")

    def end_segment(self, segment_id: str) -> int:
        """No more input for `segment_id`: it plays out, then `playback_finished`."""
        return self.client._send_live(P.make(
            P.LiveEnd, req_id=self.client._next_id(), job_id=self.job_id,
            segment_id=segment_id), "LiveEnd")

    def interrupt(self) -> int:
        """Barge-in: every queued piece of speech is dropped, the avatar goes idle."""
        return self.client._send_live(P.make(
            P.LiveInterrupt, req_id=self.client._next_id(), job_id=self.job_id),
            "LiveInterrupt")

    def close(self) -> int:
        """End the session: events go on until its `DoneEvent`."""
        return self.client._send_live(P.make(
            P.LiveClose, req_id=self.client._next_id(), job_id=self.job_id), "LiveClose")

    def poll(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` seconds for an event of this session. True when `next()`
        will not wait: an event is in hand, or the connection to the daemon dropped (then
        `next()` raises `DaemonUnavailable` at once); False when none came in time.

        Lets the one thread that reads a session also act at times of its own (a voice
        agent sending audio at realtime pace, an interrupt at a given moment) instead of
        only right after an event. Messages that arrive meanwhile are kept for their
        readers as `next()` keeps them; the slot of the last event read stays held until
        `next()` is called."""
        client = self.client
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            client._route_arrived()
            if client._pending.get(self.job_id):
                return True
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return False
            # The monitor is only read here, not drained: a dropped connection stays
            # pending for the `next()` that reports it.
            if client._monitor in dict(client._poller.poll(remaining_ms)):
                return True

    def __iter__(self) -> Iterator[Any]:
        return self._events

    def __next__(self) -> Any:
        """The next event, waiting at most the client's `timeout_s` (frames come at the
        engine's fps, so a wait that long means the daemon is gone or stuck)."""
        return next(self._events)
