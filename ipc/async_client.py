"""asyncio client for the avatard daemon (`zmq.asyncio`): the `Client` API for code that
runs in an event loop, such as a voice agent driving many live sessions at once.

    async with AsyncClient() as client:                   # default local endpoint
        async with client.live(seed=1) as session:        # closed when the block ends
            await session.send_audio(pcm, 16000, "hello")  # float32 mono
            await session.end_segment("hello")
            async for event in session:                   # FrameEvent, AudioEvent, ...
                ...

How it waits: one task of the client (`_read_messages`) reads the socket and hands each
message to whoever waits for it, by request id (the future of the call that sent the
request) or by job id (the mailbox of a job or live session). Every call and every event
wait is bounded by the client's `timeout_s` and names what it waited for; a dropped
connection (the daemon exited or restarted) ends every wait at once with
`DaemonUnavailable` code `daemon_gone`. So any number of jobs and sessions run from one
loop, each read by its own task. Messages, events, errors and slots are handled by
`client_core`, exactly as the blocking `Client` does.

Slots: a frame or audio chunk of a local client is a view into the daemon's ring, valid
until the next event of its job is asked for: its slot is given back then, before waiting
(a slow engine must not look like a client holding a frame). Copy an array to keep it.
Events of a job nobody reads any more (`aclose()`, or a call that gave up before its
`accepted` came, whose job is cancelled) have their slots given back as they arrive.

Ownership: the client owns its socket, the socket's monitor and the reader task; `close()`
(or the end of `async with`) says bye, which ends its jobs and sessions in the daemon, and
closes them. A client belongs to the event loop that connected it; it is not thread-safe.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import protocol as P
from .client import (
    DAEMON_GONE,
    DaemonUnavailable,
    default_endpoint,
)
from .client_core import (
    HEARTBEAT_TIMEOUT_S,
    AcceptedMedia,
    ClientError,
    DoneEvent,
    TranscriptResult,
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
from .ring import RingFullError, SlotRing, StaleSlotError

__all__ = ["AsyncClient", "AsyncJobHandle", "AsyncLiveSession"]

# After close(), the socket keeps trying to deliver what is queued (the bye, a session's
# live_close) for this long in ZeroMQ's I/O thread; close() itself does not wait.
CLOSE_LINGER_MS = 1000
INPUT_RING_POLL_S = 0.002  # how often a full input ring is looked at again


class _Mailbox:
    """Messages of one job or session, in arrival order, for the task that reads them.
    `closed` once its handle stopped reading (`aclose`, a session's `async with` left):
    a task still waiting on it wakes and its iteration ends."""

    def __init__(self) -> None:
        self.messages: deque[tuple[P.Msg, list[Any]]] = deque()
        self.arrived = asyncio.Event()
        self.closed = False

    def put(self, msg: P.Msg, extra: list[Any]) -> None:
        self.messages.append((msg, extra))
        self.arrived.set()


class AsyncClient:
    """A session with the daemon, used from one asyncio event loop.

    `endpoint`: ``ipc://PATH`` (local: frames are shared-memory views) or
    ``tcp://HOST:PORT`` (remote: frame bytes come inline); default `default_endpoint()`.
    `timeout_s` bounds every wait of every call (a reply, the next event of a job, a free
    slot of the input ring), in seconds. `inline` forces inline data (default: for every
    endpoint but ipc://). `curve_server_key_file` / `curve_client_key_file` and
    `heartbeat_timeout_s` (the connection is dropped, and every wait ends with
    `DaemonUnavailable` `daemon_gone`, when the daemon sends nothing, not even a ZMTP
    heartbeat, for this long) as for `Client`. Nothing is sent before `connect()` (or
    `async with`).

    After `connect()`: `session`, `server`, `max_payload_bytes` (audio longer than this
    streams in chunks) and `max_media_s`, as the daemon's `welcome` said."""

    def __init__(self, endpoint: str | None = None, timeout_s: float = 30.0,
                 inline: bool | None = None, name: str = "python-asyncio",
                 curve_server_key_file: str | None = None,
                 curve_client_key_file: str | None = None,
                 heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S):
        self.endpoint = endpoint or default_endpoint()
        self.timeout_s = timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.inline = (not self.endpoint.startswith("ipc://")) if inline is None else inline
        self._name = name
        self._curve_files = (curve_server_key_file, curve_client_key_file)
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._req_ids = itertools.count(1)
        # Calls waiting for a reply: request id -> (future, what the call waits for).
        self._waiting: dict[int, tuple[asyncio.Future[tuple[P.Msg, list[Any]]], str]] = {}
        self._mailboxes: dict[str, _Mailbox] = {}  # job id -> its messages not yet read
        # Live inputs get no reply when taken; a refusal names only the request id.
        self._live_requests: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self._rings: dict[str, SlotRing] = {}  # the daemon's rings this client read from
        self._input_ring: SlotRing | None = None
        # Set once the connection is lost or the client closed: builds the error for a
        # wait on `what`, which every wait then raises.
        self._failure: Callable[[str], ClientError] | None = None
        self._closed = False
        self.session = ""
        self.server = ""
        self.max_payload_bytes = 0
        self.max_media_s = 0.0

    # ------------------------------------------------------------- connection

    async def connect(self) -> AsyncClient:
        """Connect and say hello; returns the client. Raises `DaemonUnavailable` when no
        daemon answers within `timeout_s`, `ClientError` when it refuses the session (e.g.
        `no_space`: /dev/shm cannot hold the session's input ring; ask with inline=True)."""
        if self._sock is not None:
            raise ClientError("this AsyncClient is connected already")
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock = sock
        try:
            sock.setsockopt(zmq.LINGER, 0)
            apply_curve(sock, self.endpoint, *self._curve_files)
            apply_heartbeat(sock, self.heartbeat_timeout_s)
            # A dropped connection is the one sure sign the daemon is gone (a SIGKILLed
            # daemon says nothing): the reader watches for it, and every wait ends on it.
            self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(self.endpoint)
            self._reader = asyncio.get_running_loop().create_task(
                self._read_messages(), name=f"avatard reader {self.endpoint}")
            welcome = await self._hello()
            if welcome.input_ring and not self.inline:
                self._input_ring = SlotRing.attach(welcome.input_ring)
        except BaseException:
            await self._shut_down("the client could not connect")  # leave no socket
            raise
        self.session = welcome.session
        self.server = welcome.server
        self.max_payload_bytes = welcome.max_payload_bytes
        self.max_media_s = welcome.max_media_s
        return self

    @property
    def is_open(self) -> bool:
        """Whether calls can still succeed: connected, not closed, connection not lost."""
        return self._sock is not None and not self._closed and self._failure is None

    async def close(self) -> None:
        """Say bye (the daemon ends this client's jobs and sessions and takes back the
        slots it holds), stop the reader and close the sockets and rings. Any call still
        waiting raises `ClientError`. Arrays of events read before are invalid after it."""
        if self._closed:
            return
        if self._sock is not None and self._failure is None:
            try:
                await self._send(P.make(P.Bye, req_id=self._next_id()), what="Bye")
            except (ClientError, zmq.ZMQError):
                pass  # the daemon notices a vanished client by itself
        await self._shut_down("the client was closed")

    def daemon_lost(self, why: str) -> None:
        """The caller knows the daemon is gone (its process exited): end every wait, now
        and later, with `DaemonUnavailable` code `daemon_gone` naming `why`, as when the
        connection drops (which a killed daemon's socket may not show at once)."""
        self._fail(lambda what: DaemonUnavailable(
            f"{why} while this client waited for {what}; its jobs and session are gone",
            code=DAEMON_GONE))

    async def _shut_down(self, why: str) -> None:
        self._closed = True
        self._fail(lambda what: ClientError(f"{why} while it waited for {what}"))
        reader, self._reader = self._reader, None
        try:
            if reader is not None and reader is not asyncio.current_task():
                reader.cancel()
                # wait() does not raise the reader's CancelledError; a cancellation of our
                # own task still ends the wait, and the sockets are closed all the same.
                await asyncio.wait({reader})
        finally:
            self._close_resources()

    def _close_resources(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        if self._input_ring is not None:
            self._input_ring.close()
            self._input_ring = None
        if self._sock is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._sock.close(linger=CLOSE_LINGER_MS)

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------- the reader

    async def _read_messages(self) -> None:
        """Hand every message to whoever waits for it, until the connection drops or the
        client closes. Its own wait has no timeout: it is the pump, not a call; every call
        waits for its own reply or event with one."""
        assert self._sock is not None and self._monitor is not None
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while True:
                await poller.poll()
                # The monitor first: what arrived before the drop is read next and still
                # reaches its reader (a job's done, then the daemon exits).
                dropped = await self._connection_dropped()
                await self._route_arrived()
                if dropped:
                    self._fail(lambda what: DaemonUnavailable(
                        f"the daemon at {self.endpoint} closed the connection while this "
                        f"client waited for {what}: it exited or restarted, or sent nothing, "
                        f"not even a heartbeat, for {self.heartbeat_timeout_s:g} s (stopped "
                        "or hung); its jobs and session are gone", code=DAEMON_GONE))
                    return
        except asyncio.CancelledError:
            raise
        except P.ProtocolError as exc:
            # (`exc` is unbound after the except block: the error builders keep copies.)
            bad = (exc.code, exc.field, exc.rule)
            self._fail(lambda what: ClientError(
                f"the daemon at {self.endpoint} sent a message that does not decode "
                f"({bad[1]}: {bad[2]}) while this client waited for {what}",
                code=bad[0], field=bad[1]))
        except Exception as exc:  # a socket error, or a send that timed out: no way on
            cause = f"{type(exc).__name__}: {exc}"
            self._fail(lambda what: ClientError(
                f"the connection to the daemon at {self.endpoint} failed while this client "
                f"waited for {what}: {cause}"))

    async def _connection_dropped(self) -> bool:
        """Whether the monitor reported the connection to the daemon dropped."""
        assert self._monitor is not None
        dropped = False
        while True:
            try:
                raw = await self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            dropped = dropped or parse_monitor_message(raw)["event"] == zmq.EVENT_DISCONNECTED

    async def _route_arrived(self) -> None:
        """Route every message that has arrived, without waiting for more."""
        assert self._sock is not None
        while True:
            try:
                frames = await self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            decoded = decode_server([f.buffer for f in frames])
            if decoded is not None:
                await self._route(*decoded)

    async def _route(self, msg: P.Msg, extra: list[Any]) -> None:
        job_id, req_id = route_of(msg, self._live_requests)
        if job_id is not None:
            box = self._mailboxes.get(job_id)
            if box is not None:
                box.put(msg, extra)
                return
            # Nobody reads this job any more: give its slot back at once, or the daemon
            # would see a client holding frames and end the job with a timeout.
            slot = slot_of(msg)
            if slot is not None:
                await self._release(slot)
            return
        waiter = self._waiting.pop(req_id, None) if req_id is not None else None
        if waiter is None or waiter[0].done():
            if isinstance(msg, P.Accepted):
                await self._abandon(msg.job_id)  # its caller gave up before it came
            return  # a late reply to an abandoned request: never anyone else's answer
        if isinstance(msg, P.Accepted):
            # Before the caller resumes: its first events may come in the same read.
            self._mailboxes[msg.job_id] = _Mailbox()
        waiter[0].set_result((msg, extra))

    async def _abandon(self, job_id: str) -> None:
        """Cancel a job whose caller gave up (a timeout, a cancelled task) before it could
        read it: nobody would, so it must not run. Slots of its events go back."""
        box = self._mailboxes.pop(job_id, None)
        for msg, _ in box.messages if box is not None else ():
            slot = slot_of(msg)
            if slot is not None:
                await self._release(slot)
        if not self._closed and self._failure is None:
            await self._send(P.make(P.Cancel, req_id=self._next_id(), job_id=job_id),
                             what="Cancel")

    def _fail(self, failure: Callable[[str], ClientError]) -> None:
        """End every wait, now and later, with the error `failure(what)` builds."""
        if self._failure is not None:
            return
        self._failure = failure
        for future, what in self._waiting.values():
            if not future.done():
                future.set_exception(failure(what))
        self._waiting.clear()
        for box in self._mailboxes.values():
            box.arrived.set()  # its reader wakes, reads what is left, then raises

    # ------------------------------------------------------------- plumbing

    def _next_id(self) -> int:
        return next(self._req_ids)

    async def _send(self, msg: P.Msg, *extra: bytes | memoryview, what: str) -> None:
        """Send `msg` (request `what`). A DEALER socket queues even while disconnected,
        so this is quick; it is bounded all the same."""
        if self._closed or self._sock is None:
            raise ClientError(f"cannot send {what}: the client is closed")
        if self._failure is not None:
            raise self._failure(what)
        async with self._deadline(f"the socket to take {what}"):
            await self._sock.send_multipart(P.Codec.encode(msg, *extra), copy=False)

    def _deadline(self, what: str) -> _Deadline:
        return _Deadline(self, what)

    def _timed_out(self, what: str) -> DaemonUnavailable:
        return DaemonUnavailable(no_reply_message(self.endpoint, self.timeout_s, what),
                                 code=P.E_TIMEOUT)

    async def _call(self, msg: P.Msg, what: str, *extra: bytes | memoryview) -> P.Msg:
        """Send a request and return its reply. Raises what a refusal says
        (`check_reply`), `DaemonUnavailable` when none comes within `timeout_s` or the
        connection drops."""
        req_id: int = msg.req_id  # type: ignore[attr-defined]
        if self._failure is not None:
            raise self._failure(what)
        future = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = (future, what)
        try:
            await self._send(msg, *extra, what=what)
            async with self._deadline(what):
                reply, _ = await future
        except BaseException:
            # Cancelled (or timed out) just as the reply came: an `accepted` then names a
            # job this caller will never read.
            if future.done() and not future.cancelled() and future.exception() is None:
                accepted, _ = future.result()
                if isinstance(accepted, P.Accepted):
                    await self._abandon(accepted.job_id)
            raise
        finally:
            self._waiting.pop(req_id, None)
        check_reply(reply, what)
        return reply

    async def _next_message(self, box: _Mailbox, what: str) -> tuple[P.Msg, list[Any]]:
        """The next message of a job (its mailbox `box`), waiting up to `timeout_s`.
        Raises StopAsyncIteration once the box is closed (its handle stopped reading,
        perhaps from another task)."""
        async with self._deadline(what):
            while not box.messages:
                if box.closed:
                    raise StopAsyncIteration
                if self._failure is not None:
                    raise self._failure(what)
                box.arrived.clear()
                await box.arrived.wait()
        return box.messages.popleft()

    async def _end_after_stale(self, box: _Mailbox, job_id: str, stale: StaleSlotError
                               ) -> tuple[P.Msg, list[Any]]:
        """The last message of job `job_id` (its mailbox `box`) once one of its frames
        turned out `stale`: the daemon took the slot back, because this client held a slot
        past `timeouts.client_call_s`, and ended the job; its `job_failed` follows the
        frames queued before it (a `done` turns into a `job_failed`:
        `take_end_after_stale`). Waits up to `timeout_s` for it;
        raises DaemonUnavailable naming the stale slot when it does not come."""
        what = (f"end of job {job_id} after the daemon took back the slot of one of its "
                f"events ({stale})")
        async with self._deadline(what):
            while (end := take_end_after_stale(box.messages, stale)) is None:
                if box.closed:
                    raise StopAsyncIteration
                if self._failure is not None:
                    raise self._failure(what)
                box.arrived.clear()
                await box.arrived.wait()
        return end

    def _ring(self, name: str) -> SlotRing:
        ring = self._rings.get(name)
        if ring is None:
            ring = self._rings[name] = SlotRing.attach(name)
        return ring

    def _read(self, data: P.Payload, extra: list[Any]) -> np.ndarray:
        return read_array(data, extra, self._ring)

    async def _release(self, slot: P.SlotDesc) -> None:
        if self._closed or self._failure is not None:
            return  # the daemon takes its slots back from a closed or lost session
        await self._send(release_request(slot), what="Release")

    async def _place(self, array: np.ndarray, what: str
                     ) -> tuple[P.Payload, list[bytes | memoryview]]:
        """Place request data like `Client` does (`place_array`), waiting without
        blocking the loop while the input ring is full (the daemon frees a slot when it
        has taken the input). Raises `DaemonUnavailable` after `timeout_s`."""
        async with self._deadline(f"free slot in the input ring for {what} (the daemon "
                                  "has not taken this client's earlier inputs)"):
            while True:
                try:
                    return place_array(array, self._input_ring, timeout_s=0.0)
                except RingFullError:
                    await asyncio.sleep(INPUT_RING_POLL_S)

    async def _hello(self) -> P.Welcome:
        welcome = await self._call(P.make(P.Hello, req_id=self._next_id(), client=self._name,
                                          inline=self.inline), "Hello")
        assert isinstance(welcome, P.Welcome)
        return welcome

    async def _accepted(self, msg: P.Msg, what: str, *extra: bytes | memoryview
                        ) -> P.Accepted:
        """Send a job request; its `accepted` reply (raises what a refusal says)."""
        try:
            accepted = await self._call(msg, what, *extra)
        except ClientError as exc:
            if exc.code != P.E_NO_SESSION or not self.inline:
                raise
            # The daemon closed our idle session (or restarted): open a new one and retry.
            # Only inline requests can be replayed; shm payloads named the old input ring.
            await self._hello()
            accepted = await self._call(msg, what, *extra)
        assert isinstance(accepted, P.Accepted)
        return accepted

    # ------------------------------------------------------------- public API

    async def health(self) -> P.HealthReply:
        reply = await self._call(P.make(P.Health, req_id=self._next_id()), "Health")
        assert isinstance(reply, P.HealthReply)
        return reply

    async def stats(self) -> dict[str, Any]:
        reply = await self._call(P.make(P.Stats, req_id=self._next_id()), "Stats")
        return reply.body  # type: ignore[attr-defined]

    async def voices(self) -> P.VoicesReply:
        """The TTS engine's voices and routing, as `Client.voices()`."""
        reply = await self._call(P.make(P.Voices, req_id=self._next_id()), "Voices")
        assert isinstance(reply, P.VoicesReply)
        return reply

    async def register_avatar(self, image: bytes) -> str:
        """Register a portrait (encoded image bytes); returns its avatar id. Raises
        `ClientError` naming `image` when the daemon refuses it (no face, too large)."""
        payload, extra = await self._place(np.frombuffer(image, dtype=np.uint8),
                                           "RegisterAvatar")
        reply = await self._call(P.make(P.RegisterAvatar, req_id=self._next_id(),
                                        image=payload), "RegisterAvatar", *extra)
        return reply.avatar_id  # type: ignore[attr-defined]

    async def speak(self, text: str, avatar: str = "", voice: str = "", seed: int = 0,
                    deadline_s: float = 0.0, send_audio: bool = True, start_index: int = 0,
                    audio_start_index: int = 0) -> AsyncJobHandle:
        """Speak `text` with `voice` and portrait `avatar` (as `Client.speak`, also
        `start_index` and `audio_start_index`). Returns once the daemon accepted the job:
        `async for event in job` reads its events. Raises `ClientError` naming the refused
        field (`BusyError` for a full queue)."""
        msg = P.make(P.Speak, req_id=self._next_id(), text=text, voice=voice, avatar_id=avatar,
                     seed=seed, deadline_s=deadline_s, send_audio=send_audio,
                     start_index=start_index, audio_start_index=audio_start_index)
        return AsyncJobHandle(self, await self._accepted(msg, "Speak"))

    async def lipsync(self, pcm: np.ndarray, sample_rate: int, avatar: str = "",
                      seed: int = 0, deadline_s: float = 0.0, start_index: int = 0
                      ) -> AsyncJobHandle:
        """Animate portrait `avatar` to mono float32 PCM at `sample_rate` Hz (as
        `Client.lipsync`; audio larger than one payload streams in chunks)."""
        return await self._audio_job(P.Lipsync, "Lipsync", pcm, sample_rate, avatar_id=avatar,
                                     seed=seed, deadline_s=deadline_s,
                                     start_index=start_index)

    async def transcribe(self, pcm: np.ndarray, sample_rate: int, deadline_s: float = 0.0
                         ) -> TranscriptResult:
        """The transcript of mono float32 PCM at `sample_rate` Hz (as `Client.transcribe`)."""
        job = await self._audio_job(P.Transcribe, "Transcribe", pcm, sample_rate,
                                    deadline_s=deadline_s)
        result = None
        async for event in job:
            if isinstance(event, TranscriptResult):
                result = event
        if result is None:
            raise ClientError("transcribe finished without a transcript")
        return result

    async def _audio_job(self, cls: type[P.Msg], what: str, pcm: np.ndarray,
                         sample_rate: int, **fields: Any) -> AsyncJobHandle:
        """An audio job, streamed like `Client._audio_job`: the first chunk with the
        request (`more` when there are others), the rest as `job_audio` once accepted,
        each placed when the input ring has a free slot. Stops sending when the job ends
        meanwhile; raises `ClientError` (and cancels the job) when a chunk is refused."""
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        first, *rest = audio_chunks(pcm, self.max_payload_bytes)
        more = {"more": True, "total_samples": len(pcm)} if rest else {}
        payload, extra = await self._place(pcm[first], what)
        msg = P.make(cls, req_id=self._next_id(), audio=payload, sample_rate=sample_rate,
                     **more, **fields)
        job = AsyncJobHandle(self, await self._accepted(msg, what, *extra))
        refusals: list[asyncio.Future[tuple[P.Msg, list[Any]]]] = []
        try:
            for chunk in rest:
                if job.ended_by_daemon():
                    break
                await self._check_chunks(job, refusals)
                payload, extra = await self._place(pcm[chunk], "JobAudio")
                req_id = self._next_id()
                refusals.append(asyncio.get_running_loop().create_future())
                self._waiting[req_id] = (refusals[-1], "JobAudio")
                await self._send(P.make(P.JobAudio, req_id=req_id, job_id=job.job_id,
                                        audio=payload, final=chunk is rest[-1]), *extra,
                                 what="JobAudio")
            if not job.ended_by_daemon():
                await self._check_chunks(job, refusals)
        except BaseException:
            await job.aclose()
            raise
        finally:
            # A chunk that was taken gets no reply: stop waiting for one. (A lost
            # connection's error in a future is retrieved, so asyncio does not log it.)
            for future in refusals:
                if future.done() and not future.cancelled():
                    future.exception()
                future.cancel()
            for req_id in [r for r, (f, _) in self._waiting.items() if f in refusals]:
                del self._waiting[req_id]
        return job

    async def _check_chunks(self, job: AsyncJobHandle,
                            refusals: list[asyncio.Future[tuple[P.Msg, list[Any]]]]) -> None:
        """Raise `ClientError` (after cancelling the job) when a chunk was refused."""
        for future in refusals:
            if future.done() and not future.cancelled() and future.exception() is None:
                msg, _ = future.result()
                if isinstance(msg, P.Error):
                    await self.cancel(job.job_id)  # it would wait for the rest of its audio
                    raise ClientError(f"job {job.job_id}: audio chunk refused: {msg.code}: "
                                      f"{msg.field}: {msg.rule}", code=msg.code,
                                      field=msg.field)

    def live(self, avatar: str = "", voice: str = "", seed: int = 0, prebuffer_ms: int = 0,
             render_ahead_frames: int = -1) -> _LiveOpening:
        """Open a live session on `avatar` (default: the engine's portrait), with `voice`
        for its text and `seed` for its motion (0: random): frames at the engine's fps
        from now until the session is closed. `prebuffer_ms`, `render_ahead_frames`: the
        session's options (`protocol.LiveOptions`). `await client.live(...)` returns the
        `AsyncLiveSession`; `async with client.live(...) as session:` also closes it when
        the block ends (`AsyncLiveSession.aclose`). Raises what `accepted` would not come
        for (`ClientError` naming the field, `BusyError`, `DaemonUnavailable`)."""

        async def open_session() -> AsyncLiveSession:
            msg = P.make(P.LiveOpen, req_id=self._next_id(), avatar_id=avatar, voice=voice,
                         seed=seed, options=P.LiveOptions(
                             prebuffer_ms=prebuffer_ms,
                             render_ahead_frames=render_ahead_frames))
            return AsyncLiveSession(self, await self._accepted(msg, "LiveOpen"))

        return _LiveOpening(open_session)

    async def cancel(self, job_id: str) -> None:
        """Cancel a job: it ends with `JobFailedError` code `cancelled`."""
        await self._send(P.make(P.Cancel, req_id=self._next_id(), job_id=job_id),
                         what="Cancel")


class _Deadline:
    """`async with client._deadline(what)`: the block must end within the client's
    `timeout_s`, else `DaemonUnavailable` code `timeout` naming `what`. A cancellation
    from outside stays a cancellation."""

    def __init__(self, client: AsyncClient, what: str):
        self._client = client
        self._what = what
        self._timeout = asyncio.timeout(client.timeout_s)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            if self._timeout.expired():
                raise self._client._timed_out(self._what) from None
            raise


class _LiveOpening:
    """What `AsyncClient.live()` returns: await it, or enter it with `async with`."""

    def __init__(self, open_session: Callable[[], Awaitable[AsyncLiveSession]]):
        self._open = open_session
        self._session: AsyncLiveSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncLiveSession]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncLiveSession:
        self._session = await self._open()
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.aclose()


class AsyncJobHandle(AcceptedMedia):
    """A job the daemon accepted (what `accepted` announced: `AcceptedMedia`), and the
    async iterator of its events: `FrameEvent`, `AudioEvent`, `TranscriptResult`, then
    `DoneEvent`; `JobFailedError` raised at its end. Each wait for the next event is
    bounded by the client's `timeout_s` (`DaemonUnavailable` code `timeout` after it, or
    code `daemon_gone` at once when the connection drops); any error ends the iteration.
    One task reads a job. The slot of the last event goes back when the next one is asked
    for; `aclose()` gives it back and stops reading (the job keeps running: `cancel`): an
    iteration then ends at once, also one waiting in another task."""

    def __init__(self, client: AsyncClient, accepted: P.Accepted, kind: str = "job"):
        super().__init__(accepted)
        self.client = client
        self._box = client._mailboxes[self.job_id]  # made by the reader at `accepted`
        self._held: P.SlotDesc | None = None
        self._ended = False  # this handle reads no more events
        self._daemon_ended = False  # the job's last message (done, job_failed) came
        self._what = f"event of {kind} {self.job_id}"

    def __aiter__(self) -> AsyncJobHandle:
        return self

    async def __anext__(self) -> Any:
        if self._ended:
            raise StopAsyncIteration
        try:
            # Asked for the next event, so done with the last one: its slot goes back
            # before the wait.
            if self._held is not None:
                held, self._held = self._held, None
                await self.client._release(held)
            while True:
                msg, extra = await self.client._next_message(self._box, self._what)
                self._daemon_ended = self._daemon_ended or ends_job(msg)
                try:
                    event = job_event(self.job_id, msg, extra, self.client._read,
                                      self.client._live_requests)
                except StaleSlotError as exc:
                    msg, extra = await self.client._end_after_stale(self._box, self.job_id,
                                                                    exc)
                    self._daemon_ended = self._daemon_ended or ends_job(msg)
                    event = job_event(self.job_id, msg, extra, self.client._read,
                                      self.client._live_requests)
                self._held = slot_of(msg)
                if isinstance(event, DoneEvent):
                    await self._stop_reading()
                if event is not None:
                    return event
        except Exception:
            await self._stop_reading()  # an error ends the events, as for `Client`
            raise

    def ended_by_daemon(self) -> bool:
        """Whether the job's last message (`done`, `job_failed`) has arrived."""
        return any(ends_job(msg) for msg, _ in self._box.messages)

    async def aclose(self) -> None:
        """Give back the slot of the last event and stop reading: events that arrive
        later are dropped, their slots given back. Does not stop the job."""
        await self._stop_reading()

    async def _stop_reading(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.client._mailboxes.pop(self.job_id, None)
        # A task still iterating (the session's `async with` left in another task) wakes
        # now and its iteration ends, instead of waiting timeout_s for events that the
        # reader no longer routes here.
        self._box.closed = True
        self._box.arrived.set()
        held = [self._held] + [slot_of(msg) for msg, _ in self._box.messages]
        self._held = None
        self._box.messages.clear()
        for slot in held:
            if slot is not None:
                await self.client._release(slot)


class AsyncLiveSession(AsyncJobHandle):
    """A live session of an `AsyncClient` (`client.live()`): send speech at any time from
    any task, read the endless stream of events with `async for` from one task (frames,
    audio, playback events, refused inputs, and `DoneEvent` once closed), as for the
    blocking `LiveSession`:

        async with client.live(seed=1) as session:
            await session.send_audio(pcm, 16000, segment_id="hello")
            await session.end_segment("hello")
            async for event in session:          # FrameEvent k, AudioEvent k, ...
                ...

    Frame k and audio chunk k (the audio frame k was made from) come at the engine's fps;
    indices skip frames this client did not read in time (counted in
    `DoneEvent.frames_dropped`). The sends return once the request is on its way (no
    reply when taken); a refused input arrives as an `InputRefusedEvent` among the events.
    A task reading no events loses frames, never stalls the daemon. Leaving the session's
    `async with` (or `aclose()`) ends an `async for` over it in another task at once."""

    def __init__(self, client: AsyncClient, accepted: P.Accepted):
        super().__init__(client, accepted, kind="live session")
        self._close_sent = False

    async def send_audio(self, pcm: np.ndarray, sample_rate: int, segment_id: str) -> int:
        """Append speech to segment `segment_id`: 1-D float32 PCM in [-1, 1] at
        `sample_rate` Hz (8000..192000; every chunk of a segment at one rate), any length
        up to one payload (`AsyncClient.max_payload_bytes`). Sent as given: another dtype
        is refused by the daemon. Returns the request id (an `InputRefusedEvent` names it).
        Waits (up to `timeout_s`) only for a free slot of the input ring."""
        payload, extra = await self.client._place(np.ascontiguousarray(pcm), "LiveAudio")
        return await self._send_live(P.make(
            P.LiveAudio, req_id=self.client._next_id(), job_id=self.job_id,
            segment_id=segment_id, audio=payload, sample_rate=sample_rate), "LiveAudio", *extra)

    async def send_text(self, text: str, segment_id: str, final: bool = False) -> int:
        """Append text to segment `segment_id` (an LLM's tokens as they come): each
        complete sentence is spoken as soon as it is complete; `final` speaks the rest
        and ends the segment. Returns the request id."""
        return await self._send_live(P.make(
            P.LiveText, req_id=self.client._next_id(), job_id=self.job_id,
            segment_id=segment_id, text=text, final=final), "LiveText")

    async def end_segment(self, segment_id: str) -> int:
        """No more input for `segment_id`: it plays out, then `playback_finished`."""
        return await self._send_live(P.make(
            P.LiveEnd, req_id=self.client._next_id(), job_id=self.job_id,
            segment_id=segment_id), "LiveEnd")

    async def interrupt(self) -> int:
        """Barge-in: every queued piece of speech is dropped, the avatar goes idle."""
        return await self._send_live(P.make(
            P.LiveInterrupt, req_id=self.client._next_id(), job_id=self.job_id),
            "LiveInterrupt")

    async def close(self) -> int:
        """End the session: events go on until its `DoneEvent` (read them to the end)."""
        self._close_sent = True
        return await self._send_live(P.make(
            P.LiveClose, req_id=self.client._next_id(), job_id=self.job_id), "LiveClose")

    async def aclose(self) -> None:
        """Close the session unless it was closed or the daemon ended it, and stop
        reading its events (their slots are given back as they arrive); does not wait for
        `done`. Also after reading stopped on an error (a wait that timed out): the daemon
        still runs or queues the session until `live_close`. Safe to call from a task
        being cancelled, and more than once."""
        if not self._close_sent and not self._daemon_ended and not self.ended_by_daemon() \
                and not self.client._closed and self.client._failure is None:
            try:
                await self.close()
            except ClientError:
                pass  # the client's bye or the daemon's loss ends the session anyway
        await self._stop_reading()

    async def __aenter__(self) -> AsyncLiveSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send_live(self, msg: P.Msg, what: str, *extra: bytes | memoryview) -> int:
        req_id = remember_live(self.client._live_requests, msg, what)
        await self.client._send(msg, *extra, what=what)
        return req_id
