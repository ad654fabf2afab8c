"""The supervisor process (`avatard serve`): a coordinator over five components.

It owns the sockets, the signal flags and the process lock, and routes between components
that never call each other: each returns what happened, and only the coordinator turns
one component's output into another's input (docs/daemon.md, "Architecture"):

    clients <-> ClientPort --> Sessions (rings, delivery, expiry), AvatarStore (portraits)
                                    ^ frames, replies
    Supervisor tick --------------- + ---------------------------------------------------
      | Ended / Requeued / StopWorker           | WorkerReady / WorkerLost / WorkerExited
    JobBook (queue, placement, deadlines)     WorkerPool (processes, states, backoff)
    StatusBoard (status body, systemd)        workers <-> RunJob / CancelJob / Shutdown

One tick: read both sockets (bounded by TICK_S), act on recorded signals, then the named
steps: workers checked, workers started, jobs checked, jobs placed, sends finished,
sessions expired, drain checked, status published. It never imports torch or an engine.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

import zmq

from avatard.ipc import protocol as P
from avatard.ipc import segments
from avatard.ipc.sockets import ClientPort, bind, ensure_private_dir, unlink_endpoint

from . import devices as dev
from .avatars import AvatarStore
from .book import POLICIES, Ended, JobBook, Outcome, Parked, Requeued, StopWorker
from .config import Config, resolved_endpoint, resolved_runtime_dir
from .inputs import StreamedInputs
from .jobs import Job, JobState, QueueFull
from .live_inputs import LiveInputs
from .pool import (
    PoolEvent,
    ProcessHandle,
    WorkerExited,
    WorkerGaveUp,
    WorkerId,
    WorkerLost,
    WorkerPool,
    WorkerReady,
)
from .requests import (
    accepted_reply,
    build_job,
    client_event,
    end_reply,
    live_audio_bytes,
    playback_event,
    take_chunk,
)
from .runtime import hold_runtime_lock
from .sdnotify import Notifier
from .sessions import Session, Sessions, describe_shm
from .status import StatusBoard, StatusHandoff, health
from .worker import WorkerSpec, start_worker

_T = TypeVar("_T")
log = logging.getLogger("avatard.supervisor")

TICK_S = 0.02


class Supervisor:
    def __init__(self, config: Config, parent_fd: int | None = None):
        """`parent_fd`: the read end of a pipe the starting process holds open; its end of
        file (that process is gone) starts a drain, as SIGTERM does. None: not watched."""
        self.cfg = config
        self.parent_fd = parent_fd
        self.ctx = zmq.Context()
        # Read NOTIFY_SOCKET/WATCHDOG_* and drop them from the environment, so spawned
        # workers cannot talk to systemd in the daemon's name.
        self.board = StatusBoard(Notifier.from_environment(unset=True),
                                 config.daemon.min_ready, time.monotonic())
        self.runtime_dir = ensure_private_dir(resolved_runtime_dir(config))
        self.endpoint = resolved_endpoint(config)
        self.book = JobBook(config.daemon.queue_size, config.restart.max_job_attempts,
                            config.timeouts.stall_timeout_s, config.timeouts.park_unread_s)
        self.avatars = AvatarStore(config.avatars.max_count, config.avatars.max_bytes)
        self.inputs = StreamedInputs(config.daemon.max_media_s,
                                     config.daemon.streamed_input_bytes)
        # Status bodies for the metrics thread, built on this loop's thread (see tick).
        self.status_handoff = StatusHandoff()
        # What the engines offer clients, from the READY report of the last worker that
        # became ready (every worker runs the same engines and config); None before any.
        self.capabilities: P.Capabilities | None = None
        self.live = LiveInputs()
        self.draining = False
        self.drain_deadline = 0.0
        self.exit_now = False
        self.exit_code = 0
        self._signals: list[int] = []
        self._lock_fd: int | None = None

    # ================================================================ start / stop

    def start(self) -> None:
        self._lock_fd = hold_runtime_lock(self.runtime_dir)
        removed = segments.sweep_stale_segments()
        if removed:
            log.info("removed %d shared-memory segments of dead owners", len(removed))
        d, t = self.cfg.daemon, self.cfg.timeouts
        self.client_port = ClientPort(self.ctx, self.endpoint, d.tcp_endpoint,
                                      d.curve_secret_key_file, d.curve_clients_dir,
                                      t.tcp_heartbeat_timeout_s)
        self.worker_endpoint = f"ipc://{self.runtime_dir / 'workers.sock'}"
        self.worker_sock = self.ctx.socket(zmq.ROUTER)
        self.worker_sock.setsockopt(zmq.LINGER, 0)
        self.worker_sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        bind(self.worker_sock, self.worker_endpoint)
        self.poller = zmq.Poller()
        self.client_port.register(self.poller)
        self.poller.register(self.worker_sock, zmq.POLLIN)
        if self.parent_fd is not None:
            os.set_blocking(self.parent_fd, False)
            self.poller.register(self.parent_fd, zmq.POLLIN)
        placed = dev.place_all(dev.discover(d.devices), d.workers)
        # Rings reserve their pages now: a /dev/shm too small refuses the start with
        # ShmFullError (`avatard serve` reports it), never a SIGBUS later.
        self.sessions = Sessions(self.cfg.rings, self.client_port, t.client_call_s,
                                 t.session_idle_s, t.vanished_check_s)
        self.sessions.add_worker_rings(len(placed))
        def launch(worker_id: WorkerId, device: dev.DeviceInfo) -> ProcessHandle:
            frames, audio = self.sessions.worker_rings[worker_id.index]
            return start_worker(WorkerSpec.from_config(
                self.cfg, worker_id.index, worker_id.attempt, device.name,
                self.worker_endpoint, frames.name, audio.name))

        self.pool = WorkerPool(placed, t, self.cfg.restart, d.max_parallel_loads, launch,
                               now=time.monotonic())
        log.info("%s", describe_shm(self.sessions.shm_bytes()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            # The handler only records; the loop acts (nothing else is safe in a handler).
            signal.signal(sig, lambda signum, _frame: self._signals.append(signum))
        if d.metrics_port:
            from .metrics import start_metrics_server

            start_metrics_server(self.status_handoff, d.metrics_host, d.metrics_port)
        log.info("serving on %s; %d workers on %s", ", ".join(self.client_port.endpoints),
                 len(placed), ", ".join(sorted({device.name for device in placed})))
        self.board.publish(self.pool.state_counts(), len(self.book.queue), len(self.pool))

    def run(self) -> int:
        try:
            self.start()
            while not self.exit_now:
                self.tick()
        finally:
            self.shutdown()  # also after a start that failed half-way
        return self.exit_code

    def tick(self) -> None:
        events = dict(self.poller.poll(int(TICK_S * 1000)))
        if self.worker_sock in events:
            self._read_workers()
        if any(sock in events for sock in self.client_port.socks):
            self.client_port.serve(self._on_client_msg, self._on_undecodable)
        if self.parent_fd is not None and self.parent_fd in events:
            self._check_parent()
        self._handle_signals()
        now = time.monotonic()
        self._route(self.pool.check(now), now)
        self._route(self.pool.start_due(now), now)
        self._route(self.book.tick(now), now)
        self._place_jobs(now)
        self.sessions.finish_inline_sends()
        self._expire_sessions(now)
        if self.draining:
            self._check_drain(now)
        self.board.publish(self.pool.state_counts(), len(self.book.queue), len(self.pool))
        if self.status_handoff.wanted:
            # Built here, between steps, never on the metrics thread: the book, the pool and
            # the sessions change on this thread only, so the body is of one moment.
            self.status_handoff.publish(self.status())
        self.board.watchdog(now)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if not self.draining:
                log.info("signal %d: draining (up to %.0f s)", signum,
                         self.cfg.daemon.drain_timeout_s)
                self.begin_drain()
            else:
                log.warning("signal %d again: stopping now", signum)
                self.exit_now = True

    def _check_parent(self) -> None:
        """The parent pipe is readable: nothing is ever written, so it is end of file (the
        process that started us is gone) unless a stray byte came; drain on EOF."""
        try:
            data = os.read(self.parent_fd, 4096)
        except BlockingIOError:
            return
        if data:
            return
        self.poller.unregister(self.parent_fd)
        os.close(self.parent_fd)
        self.parent_fd = None
        if not self.draining:
            log.warning("the process that started this daemon is gone (parent pipe closed): "
                        "draining (up to %.0f s)", self.cfg.daemon.drain_timeout_s)
            self.begin_drain()

    def begin_drain(self) -> None:
        self.draining = True
        self.drain_deadline = time.monotonic() + self.cfg.daemon.drain_timeout_s
        self.board.stopping()
        self.pool.hold()
        self._route(self.book.close_queue("daemon is shutting down; the job was not "
                                          "started: submit it again"), time.monotonic())
        self._close_live_sessions()

    def _close_live_sessions(self) -> None:
        """Draining: a live session never ends by itself, so each running one is closed
        as if its client had sent `live_close` (playing segments finish, interrupted; it
        ends with `done`), instead of holding the drain until drain_timeout_s."""
        for job in list(self.book.jobs.values()):
            if job.kind is not P.JobKind.LIVE or job.job_id not in self.live:
                continue
            if job.worker is None or job.state is not JobState.RUNNING:
                continue
            try:
                out = self.live.take(job.job_id, P.make(P.LiveClose, req_id=0,
                                                        job_id=job.job_id))
            except P.ProtocolError:
                continue  # closing already
            if out is not None:
                log.info("live session %s closed: the daemon is draining", job.job_id)
                self._send(job.worker, out)

    def _check_drain(self, now: float) -> None:
        if not self.book.running_count():
            self.exit_now = True
        elif now >= self.drain_deadline:
            self._route(self.book.end_all(P.E_DRAINING, f"daemon stopped after drain_timeout_s"
                                          f"={self.cfg.daemon.drain_timeout_s:g} s before "
                                          "the job ended"), now)
            self.exit_now = True

    def shutdown(self) -> None:
        """Stop workers, close sockets, unlink every segment; bounded in time. Also undoes
        a start that failed half-way (a /dev/shm too small for the rings, a socket in use):
        whatever was made is closed and unlinked."""
        if hasattr(self, "pool"):
            for worker_id in self.pool.live_ids():
                self._send(worker_id.index, P.make(P.Shutdown, reason="daemon stopping"))
            self.pool.reap_all(self.cfg.timeouts.kill_grace_s)
            self._route(self.book.end_all(P.E_DRAINING, "daemon stopped before the job "
                                          "ended"), time.monotonic())
        if hasattr(self, "client_port"):
            self.client_port.close()
        if hasattr(self, "worker_sock"):
            self.worker_sock.close(linger=0)
            unlink_endpoint(self.worker_endpoint)
        if hasattr(self, "sessions"):
            self.sessions.close_all()
        self.avatars.close_all()
        segments.unlink_all_created()
        self.ctx.destroy(linger=0)  # also a socket a failed constructor left open
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")

    # ================================================================ routing

    def _route(self, items: list[PoolEvent] | list[Outcome] | list[Any], now: float) -> None:
        """Act on what a component returned (events, outcomes), then give the pool the
        book's per-worker job counts and publish the status."""
        for item in items:
            if isinstance(item, WorkerLost):
                self._route(self.book.worker_lost(item.index, item.reason,
                                                  self.pool.capacities()), now)
            elif isinstance(item, WorkerExited):
                self.sessions.reclaim_worker(item.index)
            elif isinstance(item, StopWorker):
                self._route([self.pool.stop(item.index, "runtime", item.reason, now)], now)
            elif isinstance(item, Parked):
                # Its place stays taken until the worker says the run stopped; the job
                # waits in the queue meanwhile.
                self._send(item.index, P.make(P.CancelJob, job_id=item.job.job_id))
            elif isinstance(item, Ended):
                self._finish(item, now)
            elif isinstance(item, WorkerReady):
                self.capabilities = item.capabilities
            elif isinstance(item, Requeued) and item.job.moved:
                self._live_session_moving(item.job)
            elif item is None or isinstance(item, Requeued):
                pass  # nothing to do (yet): requeued jobs are placed by the next step
            elif isinstance(item, WorkerGaveUp):
                self._fail_if_unavailable(now)
        for index in range(len(self.pool)):
            self.pool.set_load(index, self.book.load(index), now)
        # At once, not at the end of the tick: systemd sees each step (READY=1, then
        # the next worker starting) as its own STATUS= line.
        self.board.publish(self.pool.state_counts(), len(self.book.queue), len(self.pool))

    def _fail_if_unavailable(self, now: float) -> None:
        """The last worker gave up: no queued job can ever be placed, so each ends now
        with the workers' failure instead of at its deadline."""
        unavailable = self.pool.unavailable_reason()
        if unavailable is not None and not self.draining:
            self._route(self.book.end_all(P.E_UNAVAILABLE, unavailable), now)

    def _send(self, index: int, msg: P.Msg, *parts: bytes) -> None:
        identity = self.pool.workers[index].id.identity()
        try:
            self.worker_sock.send_multipart([identity, *P.Codec.encode(msg, *parts)],
                                            copy=False)
        except zmq.ZMQError as exc:
            log.info("message to worker %d dropped: %s", index, exc)

    def _with_shm_room(self, what: str, make: Callable[[], _T]) -> _T:
        """`make()`, which creates rings for `what`; when /dev/shm is full, the least
        recently used portrait no live job names is let go (its segment unlinked) and
        `make` tried again, until it fits or no idle portrait is left (then the last
        `ShmFullError` is raised). Stored portraits are a cache: a client registers one
        again; a session or job refused for want of room would just fail."""
        while True:
            try:
                return make()
            except segments.ShmFullError:
                if not self.avatars.evict_idle(what):
                    raise

    def _place_jobs(self, now: float) -> None:
        for job in self.book.place(self.pool.capacities(), now):
            assert job.worker is not None
            frame_ring = audio_ring = ""
            if POLICIES[job.kind].uses_session_rings:
                others = self.book.places_of(job.client) - {(job.worker, job.lane)}
                try:
                    frame_ring, audio_ring = self._with_shm_room(
                        f"the rings of job {job.job_id}",
                        lambda job=job, others=others: self.sessions.output_names(
                            job.client, job.worker, job.lane, others,
                            live=job.kind is P.JobKind.LIVE))
                except segments.ShmFullError as exc:
                    self._route([self.book.unplace(job, P.E_NO_SPACE, str(exc))], now)
                    continue
            fps = self.capabilities.fps if self.capabilities else 0
            lost = self.book.resume_live(job, fps, now)
            if lost is not None:  # a live session moved: the client's clock ran on
                self.client_port.send(job.client, P.make(
                    P.SessionMoved, job_id=job.job_id, resume_index=job.frames_delivered,
                    frames_lost=lost, reason=job.last_error[:4096]))
            self._send(job.worker, P.make(
                P.RunJob, job_id=job.job_id, seed=job.seed, attempt=job.attempts,
                spec=job.spec, resume_from=job.frames_delivered,
                audio_resume_from=job.audio_delivered, frame_ring=frame_ring,
                audio_ring=audio_ring))
            for msg, chunk in self.inputs.messages(job.job_id):  # a streamed input so far
                self._send(job.worker, msg, chunk)
            for live_msg, data in self.live.held(job.job_id):  # live input while queued
                self._send(job.worker, live_msg, *([data] if data else []))
        self._route([], now)  # the workers' new loads (READY -> BUSY)

    def _live_session_moving(self, job: Any) -> None:
        """A live session's worker was lost and the session waits (first in the queue) for
        the worker that takes it over: its queued speech is gone, so every segment ends,
        and the ones playing get their `playback_finished` (interrupted) now."""
        fps = self.capabilities.fps if self.capabilities else 0
        self._finish_playing(job, self.live.moved(job.job_id, job.frames_delivered, fps))

    def _finish_playing(self, job: Any, playing: list[tuple[str, float]]) -> None:
        for segment_id, position_s in playing:
            self.client_port.send(job.client, P.make(
                P.PlaybackFinished, job_id=job.job_id, segment_id=segment_id,
                position_s=position_s, interrupted=True))

    def _finish(self, ended: Ended, now: float) -> None:
        """A job's one end: stop it on its worker if it still runs there, give back its
        input slot, answer its client."""
        job = ended.job
        if ended.cancel_on is not None:
            self._send(ended.cancel_on, P.make(P.CancelJob, job_id=job.job_id))
        if job.input_slot is not None:
            self.sessions.release_input(job.input_slot)
            job.input_slot = None
        self.inputs.close(job.job_id)
        if job.kind is P.JobKind.LIVE:
            # A session that ends here and not by its worker's close (cancel, a lost
            # worker with no free replacement, an engine fault, a timeout): the segments
            # playing get their playback_finished (interrupted) before its end, as they
            # would from the worker. After a close the worker sent them already: none left.
            fps = self.capabilities.fps if self.capabilities else 0
            self._finish_playing(job, self.live.cut_short(job.job_id, job.frames_delivered,
                                                          fps))
        self.live.forget(job.job_id)
        self.avatars.job_ended(job.spec, ended.result)
        self.client_port.send(job.client, end_reply(ended, now))

    def _expire_sessions(self, now: float) -> None:
        limit = self.cfg.timeouts.client_call_s
        for identity, held in self.sessions.expire_held(now):
            self._end_client_jobs(identity, P.E_TIMEOUT, f"the client held {held} for over "
                                  f"timeouts.client_call_s={limit:g} s without releasing it; "
                                  "job stopped", now)
        for identity in self.sessions.vanished(now):
            log.info("client %s: its process exited; its jobs end", identity.hex())
            self._end_client_jobs(identity, P.E_CANCELLED, "the client process exited", now)
            self.sessions.end(identity)
        # A closed connection is a client gone for good (it reconnects under a new
        # identity): the one sign a remote client gives, queued jobs included.
        for identity in self.client_port.closed_connections():
            if self.sessions.get(identity) is None:
                continue  # said bye first, or never said hello
            log.info("client %s: its connection closed; its jobs end", identity.hex())
            self._end_client_jobs(identity, P.E_CANCELLED, "the client's connection closed",
                                  now)
            self.sessions.end(identity)
        busy = {job.client for job in self.book.jobs.values()}
        for identity in self.sessions.expire_idle(now, busy):
            self.client_port.forget(identity)

    def _end_client_jobs(self, identity: bytes, code: str, message: str, now: float) -> None:
        self._route([self.book.cancel(job, code, message)
                     for job in self.book.of_client(identity)], now)

    # ================================================================ workers

    def _read_workers(self) -> None:
        while True:
            try:
                frames = self.worker_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg, _ = P.WORKER_CODEC.decode(frames[1:])
            except P.ProtocolError as exc:
                log.error("bad message from worker %r: %s", frames[0], exc)
                continue
            self._on_worker_msg(self.pool.current(WorkerId.parse(frames[0])), msg)

    def _on_worker_msg(self, w: Any, msg: P.Msg) -> None:
        if isinstance(msg, (P.WFrame, P.WAudio)) and (
                w is None or msg.data.ring not in self.sessions.output_rings):
            # From a replaced process: give its slot back. A ring no longer known was a
            # session's that ended meanwhile: nothing to give back.
            self.sessions.release_output(*msg.data.key)
            return
        if w is None:
            return
        now = time.monotonic()
        events = self.pool.on_message(w, msg, now)
        if events:  # not per frame: _route also walks every worker and the status text
            self._route(events, now)
        index = w.index
        if isinstance(msg, P.WHeartbeat):
            self.book.progress(index, msg.jobs, now)
        elif isinstance(msg, (P.WFrame, P.WAudio)):
            job = self.book.delivered(index, msg, now)
            if job is None:
                self.sessions.release_output(*msg.data.key)
            else:
                self.sessions.forward(job.client, client_event(job, msg), now)
        elif isinstance(msg, P.WTranscript):
            job = self.book.live(index, msg.job_id)
            if job is not None:
                self.client_port.send(job.client, P.make(
                    P.TranscriptMsg, job_id=job.job_id, language=msg.language,
                    duration_s=msg.duration_s, segments=msg.segments))
        elif isinstance(msg, (P.WPlaybackStarted, P.WPlaybackFinished, P.WPlaybackSkipped,
                              P.WSpeechRefused)):
            job = self.book.live(index, msg.job_id)
            if job is not None:
                if isinstance(msg, (P.WPlaybackStarted, P.WPlaybackFinished)):
                    self.live.playback(job.job_id, msg, job.frames_delivered)
                self.client_port.send(job.client, playback_event(job, msg))
        elif isinstance(msg, P.WJobWarning):
            job = self.book.live(index, msg.job_id)
            if job is not None and (msg.code, msg.message) not in job.warnings_sent:
                job.warnings_sent.add((msg.code, msg.message))
                log.info("job %s: warning %s: %s", job.job_id, msg.code, msg.message)
                self.client_port.send(job.client, P.make(
                    P.JobWarning, job_id=job.job_id, code=msg.code, message=msg.message,
                    field=msg.field))
        elif isinstance(msg, P.WJobDone):
            self._route([self.book.done(index, msg, now)], now)
        elif isinstance(msg, P.WJobFailed):
            self._route([self.book.failed(index, msg)], now)

    # ================================================================ clients

    def _on_client_msg(self, identity: bytes, msg: Any, extra: list[Any]) -> None:
        try:
            self._handle_client_msg(identity, msg, extra)
        except P.ProtocolError:
            # A refused request gives back the input slot it named: the client wrote it
            # and only the daemon frees it (four refusals would fill the client's ring).
            self._drop_refused_input(identity, [
                payload.key for payload in (getattr(msg, "audio", None),
                                            getattr(msg, "image", None))
                if isinstance(payload, P.SlotDesc)])
            raise

    def _on_undecodable(self, identity: bytes, control: Any) -> None:
        """A request the decoder refused (a field of the wrong type or past its limit):
        its input slot goes back too, as for a request refused after decoding."""
        self._drop_refused_input(identity, P.shm_payloads_named(control))

    def _drop_refused_input(self, identity: bytes, keys: list[tuple[str, int, int]]) -> None:
        # A slot that one of the client's accepted jobs holds stays with that job (a
        # refused request that named it again must not free it under the job).
        held = {job.input_slot for job in self.book.of_client(identity)}
        self.sessions.drop_refused_input(identity, [k for k in keys if k not in held])

    def _handle_client_msg(self, identity: bytes, msg: Any, extra: list[Any]) -> None:
        req_id = getattr(msg, "req_id", 0)
        now = time.monotonic()
        port = self.client_port
        session = self.sessions.get(identity)
        if session is not None:
            session.last_seen = now
        if isinstance(msg, P.Hello):
            try:
                session = self._with_shm_room(
                    "a client session's input ring",
                    lambda: self.sessions.hello(identity, msg.inline, now,
                                                port.peer_pids.get(identity)))
            except segments.ShmFullError as exc:
                raise P.ProtocolError(P.E_NO_SPACE, "inline", f"{exc}; a session with "
                                      "inline=true needs no ring of its own", req_id) from None
            ring = session.input_ring
            port.send(identity, P.make(
                P.Welcome, req_id=req_id, session=session.session_id,
                server=f"avatard pid {os.getpid()}", input_ring=ring.name if ring else "",
                input_slot_bytes=ring.slot_bytes if ring else 0,
                max_payload_bytes=(ring or self.sessions.inline_input).slot_bytes,
                max_media_s=self.cfg.daemon.max_media_s,
                job_deadline_s=min(self.cfg.daemon.job_deadline_s, P.MAX_SECONDS)))
        elif isinstance(msg, P.Health):
            port.send(identity, P.make(P.HealthReply, req_id=req_id, status=self._health(),
                                       ready_workers=self.pool.ready_count(),
                                       workers=len(self.pool)))
        elif isinstance(msg, P.Stats):
            port.send(identity, P.make(P.StatsReply, req_id=req_id, body=self.status()))
        elif isinstance(msg, P.Voices):
            # From the READY report, never a job: a client may ask while every worker is busy.
            offer = self.capabilities or P.Capabilities()
            port.send(identity, P.make(
                P.VoicesReply, req_id=req_id, status=self._health(), engine=offer.tts_engine,
                voices=offer.voices, voices_by_language=offer.voices_by_language))
        elif isinstance(msg, P.Release):
            self.sessions.client_release(identity, msg)
        elif isinstance(msg, P.Bye):
            self._end_client_jobs(identity, P.E_CANCELLED, "client said bye", now)
            self.sessions.end(identity)
            port.forget(identity)
        elif isinstance(msg, P.Cancel):
            job = self._client_job(identity, msg.job_id, req_id)
            self._route([self.book.cancel(job, P.E_CANCELLED, "cancelled by the client")], now)
        elif isinstance(msg, P.JobAudio) and session is not None:
            self._job_audio(session, msg, extra, now)
        elif isinstance(msg, P.LIVE_INPUTS) and session is not None:
            self._live_input(session, msg, extra)
        else:
            if session is None:
                raise P.ProtocolError(P.E_NO_SESSION, "type", "send hello before any job "
                                      "request (no session, or it expired)", req_id)
            if self.draining:
                raise P.ProtocolError(P.E_DRAINING, "type", "daemon is shutting down; "
                                      "not accepting jobs", req_id)
            if (unavailable := self.pool.unavailable_reason()) is not None:
                # Accepted, the job would wait silently until its deadline.
                raise P.ProtocolError(P.E_UNAVAILABLE, "type", unavailable, req_id)
            self._accept(session, msg, extra, now)

    def _client_job(self, identity: bytes, job_id: str, req_id: int) -> Job:
        job = self.book.jobs.get(job_id)
        if job is None or job.client != identity:
            raise P.ProtocolError(P.E_NOT_FOUND, "job_id",
                                  f"no running job {job_id!r} of this client", req_id)
        return job

    def _job_audio(self, session: Session, msg: P.JobAudio, extra: list[Any],
                   now: float) -> None:
        """The next chunk of a streamed input: kept (for a resend after a requeue) and
        passed on at once to the worker that runs the job. A chunk the job cannot take
        ends the job; a job that takes no more input is the request's error."""
        job = self._client_job(session.identity, msg.job_id, msg.req_id)
        if not self.inputs.takes_more(job.job_id):
            raise P.ProtocolError(P.E_BAD_MESSAGE, "job_id", f"job {job.job_id} takes no "
                                  "more audio (it was not sent with `more`, or its final "
                                  "chunk came)", msg.req_id)
        try:
            index = self.inputs.add(job.job_id, take_chunk(msg, extra, session,
                                                           self.sessions), msg.final)
        except P.ProtocolError as exc:
            self._route([self.book.cancel(job, exc.code, f"{exc.field}: {exc.rule}")], now)
            return
        if job.worker is not None and job.state is JobState.RUNNING:
            for out, chunk in self.inputs.messages(job.job_id, index):
                self._send(job.worker, out, chunk)

    def _live_input(self, session: Session, msg: Any, extra: list[Any]) -> None:
        """Input of a running live session: checked (a refusal is the request's error; the
        session runs on), then passed on at once to its worker, or held until the session
        is placed. No reply when taken."""
        job = self._client_job(session.identity, msg.job_id, msg.req_id)
        self.live.check_open(job.job_id, msg.req_id)
        data = (live_audio_bytes(msg, extra, session, self.sessions)
                if isinstance(msg, P.LiveAudio) else b"")
        running = job.worker is not None and job.state is JobState.RUNNING
        if not running:
            self.live.check_room(job.job_id, len(data), msg.req_id)
        speech_s = len(data) / 4 / msg.sample_rate if isinstance(msg, P.LiveAudio) else 0.0
        if isinstance(msg, (P.LiveAudio, P.LiveText)):
            self._check_queued_speech(job, msg, speech_s)
        # Every refusal is raised by now: a refused input changes nothing.
        if isinstance(msg, P.LiveClose) and not running:
            fps = self.capabilities.fps if self.capabilities else 0
            ended = self.book.close_waiting(job, fps)
            if ended is not None:
                # Waiting for a worker: it ends now (a worker would only close it).
                self._route([ended], time.monotonic())
                return
        out = self.live.take(job.job_id, msg)
        if out is None:
            return
        job.sent_s += speech_s
        if running:
            self._send(job.worker, out, *([data] if data else []))
        else:
            self.live.hold(job.job_id, out, data)

    def _check_queued_speech(self, job: Job, msg: P.LiveAudio | P.LiveText,
                             speech_s: float) -> None:
        """Raises `ProtocolError` busy (field `audio` or `text`) when the session's queued
        speech (the worker's last report plus what was sent since) and `speech_s` more
        would pass `daemon.live_max_queued_s`: a client that sends faster than realtime
        for long must wait for playback, not fill the worker's memory."""
        limit = self.cfg.daemon.live_max_queued_s
        queued = job.queued_s + max(0.0, job.sent_s - job.received_s)
        if queued + speech_s > limit:
            field = "audio" if isinstance(msg, P.LiveAudio) else "text"
            raise P.ProtocolError(P.E_BUSY, field, f"live session {job.job_id} has "
                                  f"{queued:.1f} s of speech queued; with this {field} it "
                                  f"would pass daemon.live_max_queued_s={limit:g} s: send it "
                                  "again once some has played", msg.req_id)

    def _accept(self, session: Session, msg: Any, extra: list[Any], now: float) -> None:
        """A job request -> its typed spec (built once, here) -> the job book."""
        job = build_job(msg, extra, session, self.sessions, self.avatars, self.inputs,
                        self.cfg.daemon.job_deadline_s, now)
        try:
            position = self.book.accept(job)
            if job.kind is P.JobKind.LIVE:
                self.live.open(job.job_id)
            if getattr(job.spec, "avatar", None) is not None:
                self.avatars.pin(job.spec.avatar.avatar_id)  # type: ignore[union-attr]
        except QueueFull as exc:
            self.inputs.close(job.job_id)
            if job.input_slot is not None:
                self.sessions.release_input(job.input_slot)
            reason = f"queue_size={self.book.queue.size} reached"
            retry_after_s = exc.retry_after_s
            if job.kind is P.JobKind.LIVE:
                # The hint comes from how long batch jobs take; live sessions end only
                # when their clients close them, so no time can be promised: 0, said so.
                retry_after_s = 0.0
                reason += ("; live sessions end only when closed, so no retry time can be "
                           "given: retry when a session of yours closes, or add workers")
            self.client_port.send(session.identity, P.make(
                P.Busy, req_id=msg.req_id, retry_after_s=retry_after_s,
                queue_depth=exc.depth, reason=reason))
            return
        if POLICIES[job.kind].announced:
            self.client_port.send(session.identity, accepted_reply(
                job, position, self.capabilities, self.avatars))

    # ================================================================ status

    def _health(self) -> str:
        return health(self.draining, self.pool.ready_count(), self.cfg.daemon.min_ready,
                      self.pool.all_failed())

    def status(self) -> dict[str, Any]:
        """The `stats` body. Call on the loop's thread only (the metrics thread gets it
        through `status_handoff`)."""
        workers = [(w, [j.job_id for j in self.book.on_worker(w.index)])
                   for w in self.pool.workers]
        counters = {**self.book.stats, "bad_messages": self.client_port.bad_messages,
                    "refused_clients": self.client_port.refused_clients}
        return self.board.snapshot(
            time.monotonic(), self._health(), self.client_port.endpoints, len(self.sessions),
            workers, self.book.queue, self.book.running_count(), counters,
            self.book.recent_rtf, self.avatars.stats(), self.sessions.shm_bytes(),
            self.book.registrations,
            [self.board.live_session_status(job, time.monotonic())
             for job in self.book.jobs.values() if job.kind is P.JobKind.LIVE])
