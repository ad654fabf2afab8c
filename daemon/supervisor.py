"""The supervisor: `avatard serve`. Owns every socket, segment and worker process.

It never imports torch or any engine. One loop, one tick at a time:

1. poll the client and worker sockets (bounded by the tick length),
2. handle what arrived (client requests, worker handshakes, frames, heartbeats),
3. reconcile: reap dead workers, enforce every deadline (hello, load, heartbeat, stall,
   kill grace, job deadline), start the next worker when the stagger rules allow, hand
   queued jobs to workers with a free place, release slots whose inline send finished,
4. tell systemd how things stand.

Worker states (asserted on every transition)::

    WAITING -> STARTING -> LOADING -> READY <-> BUSY
       ^          |           |         |        |
       |          +-----------+---------+--------+--> STOPPING --> BACKOFF --> WAITING
       |                                                   |
       +---------------------------------------------------+--> FAILED (gave up loading)

A worker runs up to `capacity` jobs at once (`daemon.jobs_per_worker`, reported in its
READY). Each queued job goes to the ready or busy worker with the fewest jobs that has room
(ties: lowest index). BUSY means "runs at least one job". Everything kept per job (progress,
back-pressure, cancel, deadline, requeue with `resume_from`) is in `RunningJob`; a worker
that dies or is stopped requeues every job it held.

Ownership: the supervisor creates the frame and audio ring of each worker slot (used for
remote sessions), per local client session an input ring and a frame/audio ring pair for
each (worker, lane) that runs its jobs, the lane telling apart the session's jobs that run
on one worker at once (so a client maps only its own session's segments, and two jobs never
share a ring a client must drain), and one segment per registered avatar; it unlinks a
session's rings when the session ends and everything on exit. Signal handlers only set
flags; the loop acts on them.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing as mp
import os
import signal
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from hashlib import sha256
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psutil
import zmq

from avatard.ipc import protocol as P
from avatard.ipc import segments
from avatard.ipc.ring import WRITING, DescriptorError, SlotRef, SlotRing, StaleSlotError
from avatard.ipc.sockets import ClientPort, bind, ensure_private_dir, unlink_endpoint

from . import devices as dev
from .config import Config, resolved_endpoint, resolved_runtime_dir
from .jobs import Job, JobQueue, JobState, QueueFull, new_job_id
from .sdnotify import Notifier
from .worker import WorkerSpec, worker_main

log = logging.getLogger("avatard.supervisor")

TICK_S = 0.02
MAX_AVATARS = 64
RETRYABLE = {P.E_WORKER}


class WState(StrEnum):
    WAITING = "waiting"  # not started yet (or backoff over), wants a load slot
    STARTING = "starting"  # spawned, no HELLO yet
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"  # SIGTERM sent (or shutdown asked), waiting for exit
    BACKOFF = "backoff"
    FAILED = "failed"


ALLOWED = {
    WState.WAITING: {WState.STARTING, WState.FAILED},
    WState.STARTING: {WState.LOADING, WState.STOPPING},
    WState.LOADING: {WState.READY, WState.STOPPING},
    WState.READY: {WState.BUSY, WState.STOPPING},
    WState.BUSY: {WState.READY, WState.STOPPING},
    WState.STOPPING: {WState.BACKOFF, WState.FAILED, WState.WAITING},
    WState.BACKOFF: {WState.WAITING, WState.FAILED},
    WState.FAILED: set(),
}


@dataclass
class RunningJob:
    """A job placed on a worker, as the supervisor tracks it until the worker lets go of
    it (done, failed, or a cancel acknowledged)."""

    job: Job
    lane: int  # which of its session's ring pairs on this worker it writes
    progress: int = 0  # frames the worker says it has produced
    progress_at: float = 0.0  # when progress last grew (stall detection)
    waiting_on_ring: bool = False  # blocked on a full ring: back-pressure, not a stall


@dataclass
class WorkerSlot:
    index: int
    device: dev.DeviceInfo
    frame_ring: SlotRing
    audio_ring: SlotRing
    state: WState = WState.WAITING
    proc: Any = None
    pid: int = 0
    attempt: int = 0  # process starts so far (identity of the current process)
    load_failures: int = 0
    restarts: int = 0
    state_since: float = field(default_factory=time.monotonic)
    deadline: float = 0.0  # of the current phase (hello, load, kill grace, backoff)
    last_heartbeat: float = 0.0
    jobs: dict[str, RunningJob] = field(default_factory=dict)  # by job id, dispatch order
    capacity: int = 1  # jobs it runs at once (from READY)
    rss_bytes: int = 0
    memory_bytes: int = 0
    load_s: float = 0.0
    warmup_s: float = 0.0
    stage: str = ""
    engines: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""  # why it was stopped / failed
    stop_cause: str = ""  # "load" | "runtime" | "shutdown"
    crashes: deque = field(default_factory=deque)  # monotonic times of runtime deaths
    started_at: float = 0.0
    wait_since: float = 0.0  # since when it waits for device memory

    def to(self, state: WState, reason: str = "") -> None:
        assert state in ALLOWED[self.state], f"worker {self.index}: {self.state} -> {state}"
        log.info("worker %d: %s -> %s%s", self.index, self.state.value, state.value,
                 f" ({reason})" if reason else "")
        self.state = state
        self.state_since = time.monotonic()
        if reason:
            self.reason = reason


@dataclass
class Session:
    identity: bytes
    session_id: str
    inline: bool
    input_ring: SlotRing | None = None
    # Frame and audio rings of this session, one pair per (worker, lane) that ran its
    # jobs: one writer job at a time each, and no other session's frames in them.
    outputs: dict[tuple[int, int], tuple[SlotRing, SlotRing]] = field(default_factory=dict)
    held: dict[tuple[str, int, int], float] = field(default_factory=dict)  # slot -> handed at
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class Avatar:
    avatar_id: str
    segment: segments.Segment
    nbytes: int
    validated: bool = False


class Supervisor:
    def __init__(self, config: Config):
        self.cfg = config
        self.ctx = zmq.Context()
        # Read NOTIFY_SOCKET/WATCHDOG_* and drop them from the environment, so spawned
        # workers cannot talk to systemd in the daemon's name.
        self.notifier = Notifier.from_environment(unset=True)
        self.runtime_dir = ensure_private_dir(resolved_runtime_dir(config))
        self.endpoint = resolved_endpoint(config)
        self.workers: list[WorkerSlot] = []
        self.sessions: dict[bytes, Session] = {}
        self.avatars: dict[str, Avatar] = {}
        self.jobs: dict[str, Job] = {}
        self.queue = JobQueue(config.daemon.queue_size)
        self.inline_sends: deque[tuple[zmq.MessageTracker, SlotRing, int, int]] = deque()
        self.inline_input: SlotRing | None = None
        self.output_rings: dict[str, SlotRing] = {}  # name -> every ring workers write
        self.stats = {"jobs_done": 0, "jobs_failed": 0, "jobs_cancelled": 0,
                      "frames_delivered": 0, "jobs_requeued": 0, "bad_messages": 0,
                      "refused_clients": 0}
        self.recent_rtf: deque[float] = deque(maxlen=50)
        self.recent_job_s: deque[float] = deque(maxlen=50)
        self.started_at = time.monotonic()
        self.last_load_bytes: dict[str, int] = {}
        self.ready_sent = False
        self.draining = False
        self.drain_deadline = 0.0
        self.exit_now = False
        self.exit_code = 0
        self._signals: list[int] = []
        self._last_status = ""
        self._last_watchdog = 0.0
        self._lock_fd: int | None = None
        self.spawn = mp.get_context("spawn")

    # ================================================================ start/stop

    def _take_lock(self) -> None:
        path = self.runtime_dir / "avatard.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = Path(path).read_text().strip() or "?"
            os.close(fd)
            raise RuntimeError(f"another avatard serve (pid {other}) holds {path}; stop it "
                               "or set daemon.runtime_dir to another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def start(self) -> None:
        self._take_lock()
        removed = segments.sweep_stale_segments()
        if removed:
            log.info("removed %d shared-memory segments of dead owners", len(removed))
        d = self.cfg.daemon
        self.client_port = ClientPort(self.ctx, self.endpoint, d.tcp_endpoint,
                                      d.curve_secret_key_file, d.curve_clients_dir)
        self.worker_endpoint = f"ipc://{self.runtime_dir / 'workers.sock'}"
        self.worker_sock = self.ctx.socket(zmq.ROUTER)
        self.worker_sock.setsockopt(zmq.LINGER, 0)
        self.worker_sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        bind(self.worker_sock, self.worker_endpoint)
        self.poller = zmq.Poller()
        self.client_port.register(self.poller)
        self.poller.register(self.worker_sock, zmq.POLLIN)
        device_list = dev.discover(self.cfg.daemon.devices)
        per_device: dict[str, int] = {}
        rings = self.cfg.rings
        for i in range(self.cfg.daemon.workers):
            device = dev.place(device_list, per_device)
            per_device[device.name] = per_device.get(device.name, 0) + 1
            self.workers.append(WorkerSlot(
                index=i, device=device,
                frame_ring=SlotRing.create(f"w{i}.frames", rings.frame_slots,
                                           rings.frame_slot_bytes),
                audio_ring=SlotRing.create(f"w{i}.audio", rings.audio_slots,
                                           rings.audio_slot_bytes)))
            w = self.workers[-1]
            self.output_rings[w.frame_ring.name] = w.frame_ring
            self.output_rings[w.audio_ring.name] = w.audio_ring
        self.inline_input = SlotRing.create("inline.in", rings.audio_slots,
                                            rings.audio_slot_bytes)
        self._check_shm_room()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._start_metrics()
        log.info("serving on %s; %d workers on %s", ", ".join(self.client_port.endpoints),
                 len(self.workers), ", ".join(sorted(per_device)))
        self._set_status()

    def _check_shm_room(self) -> None:
        """Rings are sparse files: pages are taken from /dev/shm only when written, and a
        write the tmpfs cannot hold kills the writer with SIGBUS. Warn at start when the
        rings could outgrow it (containers often give /dev/shm 64 MiB)."""
        rings = [r for w in self.workers for r in (w.frame_ring, w.audio_ring)]
        if self.inline_input is not None:
            rings.append(self.inline_input)
        capacity = sum(r.segment.size for r in rings)
        stat = os.statvfs(segments.SHM_DIR)
        free = stat.f_bavail * stat.f_frsize
        if capacity > free:
            log.warning("the rings may use up to %d MiB of %s but only %d MiB is free; lower "
                        "rings.frame_slots/frame_slot_bytes/audio_slots/audio_slot_bytes or "
                        "give /dev/shm more room", capacity >> 20, segments.SHM_DIR, free >> 20)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)  # the loop acts; nothing else happens in a handler

    def run(self) -> int:
        self.start()
        try:
            while not self.exit_now:
                self.tick()
        finally:
            self.shutdown()
        return self.exit_code

    def tick(self) -> None:
        events = dict(self.poller.poll(int(TICK_S * 1000)))
        if self.worker_sock in events:
            self._read_workers()
        if any(sock in events for sock in self.client_port.socks):
            self._read_clients()
        self.client_port.check_refusals()
        self._handle_signals()
        now = time.monotonic()
        self._reconcile_workers(now)
        self._start_workers(now)
        self._dispatch(now)
        self._check_jobs(now)
        self._finish_inline_sends()
        self._expire_held_slots(now)
        self._expire_sessions(now)
        if self.draining:
            self._check_drain(now)
        self._notify(now)

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

    def begin_drain(self) -> None:
        self.draining = True
        self.drain_deadline = time.monotonic() + self.cfg.daemon.drain_timeout_s
        self.notifier.stopping()
        for job in self.queue.drain():  # hand back what has not started
            self._fail_job(job, P.E_DRAINING, "daemon is shutting down; the job was not "
                           "started: submit it again")

    def _check_drain(self, now: float) -> None:
        running = [r.job for w in self.workers for r in w.jobs.values()]
        if not running:
            self.exit_now = True
        elif now >= self.drain_deadline:
            for job in running:
                self._fail_job(job, P.E_DRAINING, f"daemon stopped after drain_timeout_s="
                               f"{self.cfg.daemon.drain_timeout_s:g} s before the job ended")
            self.exit_now = True

    def shutdown(self) -> None:
        """Stop workers, close sockets, unlink every segment. Bounded in time."""
        grace = self.cfg.timeouts.kill_grace_s
        for w in self.workers:
            if w.proc is not None and w.proc.exitcode is None:
                self._send_worker(w, P.make(P.Shutdown, reason="daemon stopping"))
        deadline = time.monotonic() + grace
        for w in self.workers:
            if w.proc is not None:
                w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
                if w.proc.exitcode is None:
                    w.proc.terminate()
        deadline = time.monotonic() + grace
        for w in self.workers:
            if w.proc is not None:
                w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
                if w.proc.exitcode is None:
                    log.warning("worker %d ignored SIGTERM for %.1f s: SIGKILL", w.index, grace)
                    w.proc.kill()
                    w.proc.join(timeout=5)
        for job in list(self.jobs.values()):
            if not job.finished:
                self._fail_job(job, P.E_DRAINING, "daemon stopped before the job ended")
        self.client_port.close()
        self.worker_sock.close(linger=0)
        unlink_endpoint(self.worker_endpoint)
        for session in self.sessions.values():
            if session.input_ring is not None:
                session.input_ring.close()
            for pair in session.outputs.values():
                for ring in pair:
                    ring.close()
        for w in self.workers:
            w.frame_ring.close()
            w.audio_ring.close()
        if self.inline_input is not None:
            self.inline_input.close()
        for avatar in self.avatars.values():
            avatar.segment.close()
        segments.unlink_all_created()
        self.ctx.term()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        log.info("stopped")

    # ================================================================ workers

    def _spawn(self, w: WorkerSlot, now: float) -> None:
        w.attempt += 1
        spec = WorkerSpec(
            index=w.index, attempt=w.attempt, device=w.device.name,
            control_endpoint=self.worker_endpoint, frame_ring=w.frame_ring.name,
            audio_ring=w.audio_ring.name,
            engines={"avatar": self.cfg.engines.avatar, "tts": self.cfg.engines.tts,
                     "asr": self.cfg.engines.asr},
            engine_options={k: dict(v) for k, v in self.cfg.engines.options.items()},
            heartbeat_interval_s=self.cfg.timeouts.heartbeat_interval_s,
            supervisor_pid=os.getpid(), log_level=self.cfg.daemon.log_level,
            jobs_per_worker=self.cfg.daemon.jobs_per_worker)
        w.proc = self.spawn.Process(target=worker_main, args=(spec,),
                                    name=f"avatard-worker-{w.index}")
        w.proc.start()
        w.pid = w.proc.pid
        w.reason = ""
        w.started_at = now
        w.last_heartbeat = now
        w.deadline = now + self.cfg.timeouts.hello_s
        w.stage = "spawned"
        w.to(WState.STARTING, f"attempt {w.attempt} on {w.device.name}")
        self._set_status()

    def _loading_count(self) -> int:
        return sum(w.state in (WState.STARTING, WState.LOADING) for w in self.workers)

    def _start_workers(self, now: float) -> None:
        """Staggered start: at most max_parallel_loads at once, and only when the device
        has the free memory that the previous load on it used."""
        if self.draining:
            return
        for w in self.workers:
            if w.state is WState.BACKOFF and now >= w.deadline:
                w.to(WState.WAITING, "backoff over")
            if w.state is not WState.WAITING:
                continue
            if self._loading_count() >= self.cfg.daemon.max_parallel_loads:
                return
            needed = self.last_load_bytes.get(w.device.name, 0)
            device = dev.refresh(w.device)
            if needed and not dev.has_room(device, needed):
                if not w.wait_since:
                    w.wait_since = now
                    log.info("worker %d waits: %s has %d MiB free, the last load used %d MiB",
                             w.index, device.name, device.free_bytes >> 20, needed >> 20)
                if now - w.wait_since > self.cfg.timeouts.load_s:
                    w.to(WState.FAILED, f"{device.name} never had the {needed >> 20} MiB "
                         f"free that a load needs (waited {self.cfg.timeouts.load_s:g} s)")
                continue
            w.wait_since = 0.0
            self._spawn(w, now)

    def _stop(self, w: WorkerSlot, cause: str, reason: str) -> None:
        """SIGTERM now, SIGKILL after the grace period (enforced by the reconcile step)."""
        if w.state is WState.STOPPING:
            return
        log.warning("worker %d (pid %d): stopping: %s", w.index, w.pid, reason)
        w.stop_cause = cause
        w.to(WState.STOPPING, reason)
        w.deadline = time.monotonic() + self.cfg.timeouts.kill_grace_s
        if w.proc is not None and w.proc.exitcode is None:
            try:
                os.kill(w.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._worker_lost_jobs(w, reason)
        self._set_status()

    def _worker_lost_jobs(self, w: WorkerSlot, reason: str) -> None:
        """Every job of a worker that died or is being stopped: requeue (ahead of newer
        jobs, in their old order) or fail each on its own attempt count. Each keeps its
        delivery counters, so its next run resumes where its client is."""
        lost = [r.job for r in w.jobs.values()]
        w.jobs.clear()
        requeue = []
        for job in lost:
            if job.finished:
                continue  # cancelled or timed out, waiting for an acknowledgement
            job.worker = None
            job.last_error = reason
            if job.attempts >= self.cfg.restart.max_job_attempts:
                self._fail_job(job, P.E_WORKER, f"worker died {job.attempts} times running "
                               f"this job; last: {reason}")
            elif self.draining:
                self._fail_job(job, P.E_DRAINING, f"worker lost during drain: {reason}")
            else:
                job.state = JobState.QUEUED
                self.stats["jobs_requeued"] += 1
                requeue.append(job)
                log.info("job %s requeued after %d frames delivered (%s)", job.job_id,
                         job.frames_delivered, reason)
        for job in reversed(requeue):  # push_front: the first one ends up first
            self.queue.push_front(job)

    def _reconcile_workers(self, now: float) -> None:
        t = self.cfg.timeouts
        for w in self.workers:
            exited = w.proc is not None and w.proc.exitcode is not None
            if w.state is WState.STOPPING:
                if not exited and now >= w.deadline:
                    log.warning("worker %d (pid %d) still alive %.1f s after SIGTERM: SIGKILL",
                                w.index, w.pid, t.kill_grace_s)
                    w.proc.kill()
                    w.deadline = now + t.kill_grace_s
                if exited:
                    self._after_exit(w, now)
                continue
            if w.state in (WState.WAITING, WState.BACKOFF, WState.FAILED):
                continue
            if exited:
                code = w.proc.exitcode
                how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                if w.state in (WState.READY, WState.BUSY):
                    self._stop(w, "runtime", f"{how} while {w.state.value}")
                elif w.reason.startswith("load failed"):  # it told us why before exiting
                    self._stop(w, "load", f"{w.reason}; {how}")
                else:
                    self._stop(w, "load", f"{how} while {w.state.value} (stage: {w.stage})")
                continue
            if w.state is WState.STARTING and now >= w.deadline:
                self._stop(w, "load", f"sent no HELLO within hello_s={t.hello_s:g} s")
            elif w.state is WState.LOADING and now >= w.deadline:
                self._stop(w, "load", f"sent no READY within load_s={t.load_s:g} s "
                           f"(last stage: {w.stage})")
            elif now - w.last_heartbeat > t.heartbeat_timeout_s:
                self._stop(w, "runtime" if w.state in (WState.READY, WState.BUSY) else "load",
                           f"no heartbeat for {now - w.last_heartbeat:.1f} s "
                           f"(heartbeat_timeout_s={t.heartbeat_timeout_s:g})")
            elif w.state is WState.BUSY:
                # Per job: one stalled job is enough (a thread cannot be killed, so the
                # worker goes, and its other jobs are requeued with it).
                stalled = next((r for r in w.jobs.values() if not r.waiting_on_ring
                                and now - r.progress_at > t.stall_timeout_s), None)
                if stalled is not None:
                    self._stop(w, "runtime", f"job {stalled.job.job_id} made no progress for "
                               f"{now - stalled.progress_at:.1f} s "
                               f"(stall_timeout_s={t.stall_timeout_s:g})")

    def _after_exit(self, w: WorkerSlot, now: float) -> None:
        """The worker process is gone: reclaim its slots and decide what comes next."""
        w.proc.join(timeout=0)
        # Slots it was writing are half-written; READY slots still belong to clients.
        rings = [w.frame_ring, w.audio_ring]
        rings += [r for s in self.sessions.values() for (index, _), pair in s.outputs.items()
                  if index == w.index for r in pair]
        for ring in rings:
            ring.reclaim([s for s in range(ring.slot_count) if ring.state(s) == WRITING])
        w.proc, w.pid = None, 0
        r = self.cfg.restart
        if self.draining or w.stop_cause == "shutdown":
            w.to(WState.BACKOFF, w.reason)
            w.deadline = float("inf")
            return
        if w.stop_cause == "load":
            w.load_failures += 1
            if w.load_failures >= r.max_load_attempts:
                w.to(WState.FAILED, f"gave up after {w.load_failures} load attempts; "
                     f"last: {w.reason}")
                self._set_status()
                return
            delay = min(r.backoff_max_s, r.backoff_initial_s * r.backoff_factor **
                        (w.load_failures - 1))
        else:
            w.crashes.append(now)
            while w.crashes and now - w.crashes[0] > r.crash_loop_window_s:
                w.crashes.popleft()
            delay = min(r.backoff_max_s, r.backoff_initial_s * r.backoff_factor **
                        (len(w.crashes) - 1))
        w.restarts += 1
        w.to(WState.BACKOFF, w.reason)
        w.deadline = now + delay
        log.info("worker %d restarts in %.1f s", w.index, delay)
        self._set_status()

    def _worker_of(self, identity: bytes) -> WorkerSlot | None:
        """Map a socket identity to the worker slot, ignoring stale processes."""
        try:
            name = identity.decode()
            index_text, attempt_text = name[1:].split(".")[:2]
            index, attempt = int(index_text), int(attempt_text)
        except (UnicodeDecodeError, ValueError):
            return None
        if not 0 <= index < len(self.workers):
            return None
        w = self.workers[index]
        return w if w.attempt == attempt and w.state is not WState.STOPPING else None

    def _send_worker(self, w: WorkerSlot, msg: P.Msg) -> None:
        identity = f"w{w.index}.{w.attempt}".encode()
        try:
            self.worker_sock.send_multipart([identity, *P.Codec.encode(msg)])
        except zmq.ZMQError as exc:
            log.info("message to worker %d dropped: %s", w.index, exc)

    def _read_workers(self) -> None:
        while True:
            try:
                frames = self.worker_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            w = self._worker_of(frames[0])
            try:
                msg, _ = P.WORKER_CODEC.decode(frames[1:])
            except P.ProtocolError as exc:
                log.error("bad message from worker %r: %s", frames[0], exc)
                continue
            if w is None:
                self._drop_stale(msg)
                continue
            self._on_worker_msg(w, msg)

    def _drop_stale(self, msg: P.Msg) -> None:
        """A message from a process already replaced: give back any slot it names."""
        if isinstance(msg, (P.WFrame, P.WAudio)):
            self._release_worker_slot(msg.worker, msg.data, audio=isinstance(msg, P.WAudio))

    def _release_worker_slot(self, index: int, data: P.SlotDesc, audio: bool) -> None:
        # Only rings the daemon made for workers; a ring already closed (its session
        # ended) needs no release.
        self._release_by_name(data.ring, data.slot, data.seq)

    def _on_worker_msg(self, w: WorkerSlot, msg: P.Msg) -> None:
        now = time.monotonic()
        w.last_heartbeat = now
        if isinstance(msg, P.WHeartbeat):
            w.rss_bytes = msg.rss_bytes
            # A worker that predates `jobs` reports its one job in the old fields.
            reports = msg.jobs or ([P.JobProgress(job_id=msg.job_id, progress=msg.progress,
                                                  waiting=msg.waiting)] if msg.job_id else [])
            for report in reports:
                r = w.jobs.get(report.job_id)
                if r is None:
                    continue  # ended here already, or not started there yet
                r.waiting_on_ring = report.waiting
                if report.progress != r.progress:
                    r.progress, r.progress_at = report.progress, now
        elif isinstance(msg, P.WHello):
            if w.state is WState.STARTING:
                w.pid = msg.pid
                w.deadline = now + self.cfg.timeouts.load_s
                w.stage = "hello"
                w.to(WState.LOADING, f"pid {msg.pid} on {msg.device}")
                self._set_status()
        elif isinstance(msg, P.WLoading):
            w.stage = f"{msg.stage} ({msg.progress:.0%})"
        elif isinstance(msg, P.WReady):
            if w.state is WState.LOADING:
                w.memory_bytes, w.load_s, w.warmup_s = msg.memory_bytes, msg.load_s, msg.warmup_s
                w.capacity = msg.capacity
                w.engines = [{"name": e.name, "kind": e.kind, "device": e.device,
                              "memory_bytes": e.memory_bytes, "warmup_s": e.warmup_s,
                              "notes": e.notes} for e in msg.engines]
                for e in msg.engines:
                    if e.notes:
                        log.warning("worker %d engine %s: %s", w.index, e.name, e.notes)
                self.last_load_bytes[w.device.name] = msg.memory_bytes
                w.load_failures = 0
                w.to(WState.READY, f"loaded in {msg.load_s:.2f} s")
                self._set_status()
        elif isinstance(msg, P.WLoadFailed):
            w.reason = f"load failed: {msg.reason}" + (" (out of memory)" if
                                                        msg.out_of_memory else "")
        elif isinstance(msg, (P.WFrame, P.WAudio, P.WTranscript, P.WAvatar, P.WJobDone,
                              P.WJobFailed)):
            self._on_job_msg(w, msg, now)

    # ================================================================ jobs

    def _free_worker(self) -> WorkerSlot | None:
        """The up worker with the fewest jobs that has room for one more (ties: lowest
        index), or None."""
        free = [w for w in self.workers
                if w.state in (WState.READY, WState.BUSY) and len(w.jobs) < w.capacity]
        return min(free, key=lambda w: (len(w.jobs), w.index), default=None)

    def _dispatch(self, now: float) -> None:
        while len(self.queue):
            w = self._free_worker()
            if w is None:
                return
            job = self.queue.pop()
            if job is None:
                return
            job.state = JobState.RUNNING
            job.attempts += 1
            job.worker = w.index
            job.started_at = job.started_at or now
            # Lanes only keep one session's concurrent jobs apart (rings are per session),
            # so a client with one job at a time always writes the same ring pair.
            lanes = {r.lane for r in w.jobs.values() if r.job.client == job.client}
            lane = next(k for k in range(w.capacity) if k not in lanes)
            w.jobs[job.job_id] = RunningJob(job, lane, progress_at=now)
            if w.state is WState.READY:
                w.to(WState.BUSY, f"job {job.job_id}")
            else:
                log.info("worker %d: job %s too (%d of %d)", w.index, job.job_id,
                         len(w.jobs), w.capacity)
            p = job.params
            avatar = self.avatars.get(p.get("avatar_id", ""))
            self._send_worker(w, P.make(
                P.RunJob, job_id=job.job_id, kind=job.kind, seed=job.seed,
                attempt=job.attempts, resume_from=job.frames_delivered,
                audio_resume_from=job.audio_delivered, text=p.get("text", ""),
                voice=p.get("voice", ""), avatar_id=p.get("avatar_id", ""),
                avatar_segment=avatar.segment.name if avatar else "",
                avatar_bytes=avatar.nbytes if avatar else 0, audio=p.get("audio"),
                sample_rate=p.get("sample_rate", 0), send_audio=p.get("send_audio", False),
                **self._output_names(job, w, lane)))

    def _output_names(self, job: Job, w: WorkerSlot, lane: int) -> dict[str, str]:
        """Local sessions get rings of their own, one pair per lane, so a job never waits
        for its client to drain another job's frames; remote ones (bytes sent inline by the
        daemon, which releases the slots itself) and register/transcribe jobs use the
        worker's rings."""
        session = self.sessions.get(job.client)
        if session is None or session.inline or job.kind not in ("speak", "lipsync"):
            return {}
        frames, audio = self._session_outputs(session, w.index, lane)
        return {"frame_ring": frames.name, "audio_ring": audio.name}

    def _let_go(self, w: WorkerSlot, job_id: str, reason: str) -> None:
        """The worker no longer holds this job: free its place; with no job left it is
        READY again."""
        w.jobs.pop(job_id, None)
        if not w.jobs and w.state is WState.BUSY:
            w.to(WState.READY, reason)

    def _on_job_msg(self, w: WorkerSlot, msg: Any, now: float) -> None:
        running = w.jobs.get(msg.job_id)
        job = running.job if running is not None else None
        if running is None or job.finished:
            self._drop_stale(msg)  # a job already cancelled, timed out or requeued
            if running is not None and isinstance(msg, (P.WJobDone, P.WJobFailed)):
                # The worker acknowledged the cancel: that place is free again.
                self._let_go(w, msg.job_id, f"left cancelled job {msg.job_id}")
            return
        session = self.sessions.get(job.client)
        if isinstance(msg, (P.WFrame, P.WAudio)) and msg.data.ring not in self.output_rings:
            return  # a ring of a session that ended meanwhile
        if isinstance(msg, P.WFrame):
            running.progress, running.progress_at = max(running.progress, msg.index + 1), now
            if msg.index != job.frames_delivered or session is None:
                # Below: already delivered by an earlier attempt. Above: cannot happen
                # (workers send in order); never forward out of order.
                self._release_worker_slot(w.index, msg.data, audio=False)
                return
            job.frames_delivered += 1
            self.stats["frames_delivered"] += 1
            if not job.first_frame_at:
                job.first_frame_at = now
            self._forward(session, self.output_rings[msg.data.ring], msg.data,
                          P.make(P.Frame, job_id=job.job_id, index=msg.index,
                                 pts_us=msg.pts_us, data=msg.data))
        elif isinstance(msg, P.WAudio):
            if msg.index != job.audio_delivered or session is None:
                self._release_worker_slot(w.index, msg.data, audio=True)
                return
            job.audio_delivered += 1
            self._forward(session, self.output_rings[msg.data.ring], msg.data,
                          P.make(P.AudioChunk, job_id=job.job_id, index=msg.index,
                                 pts_us=msg.pts_us, sample_rate=msg.sample_rate,
                                 data=msg.data))
        elif isinstance(msg, P.WTranscript):
            self.client_port.send(job.client, P.make(
                P.TranscriptMsg, job_id=job.job_id, language=msg.language,
                duration_s=msg.duration_s, segments=msg.segments))
        elif isinstance(msg, P.WAvatar):
            avatar = self.avatars.get(job.params.get("avatar_id", ""))
            if avatar is not None:
                avatar.validated = True
            self.client_port.send(job.client, P.make(P.AvatarRegistered, req_id=job.req_id,
                                                     avatar_id=job.params["avatar_id"]))
            self._end_job(w, job, JobState.DONE)
        elif isinstance(msg, P.WJobDone):
            wall = now - job.accepted_at
            if job.kind != "register":
                self.client_port.send(job.client, P.make(
                    P.Done, job_id=job.job_id, frames=msg.frames,
                    audio_samples=msg.audio_samples, media_s=msg.media_s, wall_s=wall,
                    first_frame_s=(job.first_frame_at - job.accepted_at
                                   if job.first_frame_at else 0.0),
                    attempts=job.attempts))
            if msg.media_s > 0:
                self.recent_rtf.append(wall / msg.media_s)
            self.recent_job_s.append(now - job.started_at)
            self._end_job(w, job, JobState.DONE)
        elif isinstance(msg, P.WJobFailed):
            if msg.code in RETRYABLE and job.attempts < self.cfg.restart.max_job_attempts \
                    and not self.draining:
                job.last_error = msg.message
                job.state = JobState.QUEUED
                job.worker = None
                self._let_go(w, job.job_id, f"job {job.job_id} failed, requeued")
                self.stats["jobs_requeued"] += 1
                self.queue.push_front(job)
                return
            self._fail_job(job, msg.code, msg.message)
            self._let_go(w, job.job_id, f"job {job.job_id} failed")

    def _forward(self, session: Session, ring: SlotRing, data: P.SlotDesc, msg: P.Msg) -> None:
        if session.inline:
            view = ring.read(SlotRef(data.ring, data.slot, data.seq, tuple(data.shape),
                                     data.dtype))
            inline_msg = msgspec.structs.replace(
                msg, data=P.Inline(part=1, shape=data.shape, dtype=data.dtype))
            parts = [*P.Codec.encode(inline_msg), memoryview(view).cast("B")]
            tracker = self.client_port.send_parts(session.identity, parts, track=True)
            if tracker is None:
                ring.release(data.slot, data.seq)
                return
            # The slot goes back once ZeroMQ no longer needs its bytes (zero-copy send).
            self.inline_sends.append((tracker, ring, data.slot, data.seq))
        else:
            session.held[(data.ring, data.slot, data.seq)] = time.monotonic()
            self.client_port.send(session.identity, msg)

    def _finish_inline_sends(self) -> None:
        while self.inline_sends and self.inline_sends[0][0].done:
            _, ring, slot, seq = self.inline_sends.popleft()
            try:
                ring.release(slot, seq)
            except StaleSlotError:
                pass

    def _expire_held_slots(self, now: float) -> None:
        """A client that never releases would stall its worker forever: after
        client_call_s the daemon takes the slot back (the client's view goes stale)."""
        limit = self.cfg.timeouts.client_call_s
        for session in self.sessions.values():
            if not session.held:
                continue
            expired = [key for key, handed in session.held.items() if now - handed > limit]
            for key in expired:
                del session.held[key]
                self._release_by_name(*key)
                log.warning("session %s kept slot %s for over %.0f s: reclaimed",
                            session.session_id, key, limit)
            if expired:
                # A client that stops releasing is gone or stuck: its jobs would otherwise
                # hold their workers, one ring's worth of frames per client_call_s, until
                # their deadlines.
                for job in list(self.jobs.values()):
                    if job.client == session.identity and not job.finished:
                        self._fail_job(job, P.E_TIMEOUT, f"the client held a frame for over "
                                       f"client_call_s={limit:g} s; job stopped")

    def _expire_sessions(self, now: float) -> None:
        """Close sessions of clients that vanished without bye (killed, crashed), so their
        input rings do not pile up in /dev/shm."""
        limit = self.cfg.timeouts.session_idle_s
        for identity, session in list(self.sessions.items()):
            if now - session.last_seen <= limit or session.held:
                continue
            if any(job.client == identity for job in self.jobs.values()):
                continue
            log.info("session %s idle for %.0f s: closed", session.session_id, limit)
            self._end_session(identity)

    def _release_by_name(self, ring_name: str, slot: int, seq: int) -> bool:
        ring = self.output_rings.get(ring_name)
        if ring is None:
            return False
        try:
            ring.release(slot, seq)
            return True
        except (StaleSlotError, DescriptorError):
            return False

    def _session_outputs(self, session: Session, worker: int, lane: int
                         ) -> tuple[SlotRing, SlotRing]:
        pair = session.outputs.get((worker, lane))
        if pair is None:
            rings = self.cfg.rings
            pair = (SlotRing.create("s.frames", rings.frame_slots, rings.frame_slot_bytes),
                    SlotRing.create("s.audio", rings.audio_slots, rings.audio_slot_bytes))
            session.outputs[(worker, lane)] = pair
            for ring in pair:
                self.output_rings[ring.name] = ring
        return pair

    def _end_job(self, w: WorkerSlot | None, job: Job, state: JobState) -> None:
        job.state = state
        if state is JobState.DONE:
            self.stats["jobs_done"] += 1
        self._release_job_input(job)
        self.jobs.pop(job.job_id, None)
        if w is not None and job.job_id in w.jobs and w.jobs[job.job_id].job is job:
            self._let_go(w, job.job_id, f"job {job.job_id} {state.value}")

    def _release_job_input(self, job: Job) -> None:
        if job.input_slot is None:
            return
        ring_name, slot, seq = job.input_slot
        job.input_slot = None
        rings = [s.input_ring for s in self.sessions.values() if s.input_ring is not None]
        rings.append(self.inline_input)
        for ring in rings:
            if ring is not None and ring.name == ring_name:
                try:
                    ring.release(slot, seq)
                except (StaleSlotError, DescriptorError):
                    pass

    def _fail_job(self, job: Job, code: str, message: str) -> None:
        if job.finished:
            return
        worker = self.workers[job.worker] if job.worker is not None else None
        running = worker.jobs.get(job.job_id) if worker is not None else None
        if (running is not None and running.job is job
                and code in (P.E_CANCELLED, P.E_TIMEOUT, P.E_DRAINING)):
            self._send_worker(worker, P.make(P.CancelJob, job_id=job.job_id))
            # The job keeps its place on the worker until the worker acknowledges (its
            # late messages are dropped); the worker's other jobs run on.
            job.state = JobState.FAILED
            self._count_failure(code)
            self._release_job_input(job)
            self.jobs.pop(job.job_id, None)
            self._reply_failure(job, code, message)
            return
        self.queue.remove(job)
        self._count_failure(code)
        self._reply_failure(job, code, message)
        self._end_job(None, job, JobState.FAILED)

    def _count_failure(self, code: str) -> None:
        self.stats["jobs_cancelled" if code == P.E_CANCELLED else "jobs_failed"] += 1

    def _reply_failure(self, job: Job, code: str, message: str) -> None:
        log.info("job %s failed: %s: %s", job.job_id, code, message)
        if job.kind == "register":
            field_name, _, rule = message.partition(": ")
            self.client_port.send(job.client, P.make(P.Error, req_id=job.req_id, code=code,
                                                     field=field_name if rule else "image",
                                                     rule=(rule or message)[:4096]))
            self._forget_avatar(job.params.get("avatar_id", ""))
        else:
            self.client_port.send(job.client, P.make(P.JobFailed, job_id=job.job_id, code=code,
                                                     message=message[:4096],
                                                     attempts=job.attempts))

    def _check_jobs(self, now: float) -> None:
        for job in list(self.jobs.values()):
            if not job.finished and now >= job.deadline:
                self._fail_job(job, P.E_TIMEOUT, f"job deadline of "
                               f"{job.deadline - job.accepted_at:.1f} s passed "
                               f"({job.frames_delivered} frames delivered)")
        # A job cancelled while running keeps its place on the worker until the worker
        # answers; if it never does, the stall check replaces the worker.
        for w in self.workers:
            if w.state is not WState.BUSY:
                continue
            for r in list(w.jobs.values()):
                if r.job.finished and now - r.progress_at > self.cfg.timeouts.stall_timeout_s:
                    self._stop(w, "runtime", f"did not acknowledge cancelled job "
                               f"{r.job.job_id}")
                    break

    # ================================================================ clients

    def _read_clients(self) -> None:
        for identity, msg, extra in self.client_port.receive():
            session = self.sessions.get(identity)
            if session is not None:
                session.last_seen = time.monotonic()
            try:
                self._on_client_msg(identity, session, msg, extra)
            except P.ProtocolError as exc:  # well-formed but refused: counts as bad too
                self.client_port.bad_messages += 1
                self.client_port.send(identity, exc.reply())
            except Exception as exc:  # a bug of ours: answer it, log it, keep serving
                log.exception("internal error handling %s from %s", type(msg).__name__,
                              identity.hex())
                self.client_port.send(identity, P.make(
                    P.Error, req_id=getattr(msg, "req_id", 0), code=P.E_INTERNAL,
                    field="message", rule=f"internal error: {type(exc).__name__}"))
        self.stats["bad_messages"] = self.client_port.bad_messages
        self.stats["refused_clients"] = self.client_port.refused_clients

    def _on_client_msg(self, identity: bytes, session: Session | None, msg: Any,
                       extra: list[Any]) -> None:
        req_id = getattr(msg, "req_id", 0)
        if isinstance(msg, P.Hello):
            self._hello(identity, msg)
        elif isinstance(msg, P.Health):
            status = self._health()
            ready = sum(w.state in (WState.READY, WState.BUSY) for w in self.workers)
            self.client_port.send(identity, P.make(P.HealthReply, req_id=req_id, status=status,
                                                   ready_workers=ready,
                                                   workers=len(self.workers)))
        elif isinstance(msg, P.Stats):
            self.client_port.send(identity, P.make(P.StatsReply, req_id=req_id,
                                                   body=self.status()))
        elif isinstance(msg, P.Release):
            self._client_release(identity, session, msg)
        elif isinstance(msg, P.Bye):
            self._end_session(identity)
        elif isinstance(msg, P.Cancel):
            job = self.jobs.get(msg.job_id)
            if job is None or job.client != identity:
                raise P.ProtocolError(P.E_NOT_FOUND, "job_id",
                                      f"no running job {msg.job_id!r} of this client", req_id)
            self._fail_job(job, P.E_CANCELLED, "cancelled by the client")
        else:
            if session is None:
                raise P.ProtocolError(P.E_NO_SESSION, "type", "send hello before any job "
                                      "request (no session, or it expired)", req_id)
            if self.draining:
                raise P.ProtocolError(P.E_DRAINING, "type", "daemon is shutting down; "
                                      "not accepting jobs", req_id)
            self._accept(session, msg, extra)

    def _hello(self, identity: bytes, msg: P.Hello) -> None:
        session = self.sessions.get(identity)
        if session is None:
            session = Session(identity, f"s{len(self.sessions) + 1}-{os.urandom(4).hex()}",
                              msg.inline)
            if not msg.inline:
                session.input_ring = SlotRing.create("s.in", self.cfg.rings.audio_slots,
                                                     self.cfg.rings.audio_slot_bytes)
            self.sessions[identity] = session
        ring = session.input_ring
        self.client_port.send(identity, P.make(
            P.Welcome, req_id=msg.req_id, session=session.session_id,
            server=f"avatard pid {os.getpid()}", input_ring=ring.name if ring else "",
            input_slot_bytes=ring.slot_bytes if ring else 0))

    def _end_session(self, identity: bytes) -> None:
        session = self.sessions.pop(identity, None)
        if session is None:
            return
        for job in list(self.jobs.values()):
            if job.client == identity and not job.finished:
                self._fail_job(job, P.E_CANCELLED, "client said bye")
        for key in list(session.held):
            self._release_by_name(*key)
        if session.input_ring is not None:
            session.input_ring.close()
        # A worker may still write into these until it acknowledges the cancel: it keeps
        # its own mapping, and its late descriptors name a ring no longer known here.
        for pair in session.outputs.values():
            for ring in pair:
                self.output_rings.pop(ring.name, None)
                ring.close()

    def _client_release(self, identity: bytes, session: Session | None, msg: P.Release) -> None:
        key = (msg.ring, msg.slot, msg.seq)
        if session is None or session.held.pop(key, None) is None:
            raise P.ProtocolError(P.E_STALE, "seq", f"slot {msg.slot} seq {msg.seq} of "
                                  f"{msg.ring} is not held by this session", msg.req_id)
        self._release_by_name(*key)

    def _input(self, session: Session, payload: Any, extra: list[Any], field_name: str,
               req_id: int) -> tuple[P.SlotDesc, tuple[str, int, int]]:
        """Client data as a descriptor into a supervisor-owned ring."""
        if isinstance(payload, P.SlotDesc):
            ring = session.input_ring
            if ring is None or payload.ring != ring.name:
                raise P.ProtocolError(P.E_BAD_MESSAGE, f"{field_name}.ring",
                                      "must name this session's input ring", req_id)
            try:
                ring.read(SlotRef(payload.ring, payload.slot, payload.seq, tuple(payload.shape),
                                  payload.dtype))
            except (StaleSlotError, DescriptorError) as exc:
                field_part = getattr(exc, "field", "seq")
                raise P.ProtocolError(P.E_STALE if isinstance(exc, StaleSlotError) else
                                      P.E_BAD_MESSAGE, f"{field_name}.{field_part}", str(exc),
                                      req_id) from None
            return payload, (payload.ring, payload.slot, payload.seq)
        if payload.part > len(extra):
            raise P.ProtocolError(P.E_BAD_MESSAGE, f"{field_name}.part",
                                  f"message has {len(extra)} extra parts", req_id)
        raw = extra[payload.part - 1]
        if P.payload_nbytes(payload) != len(raw):
            raise P.ProtocolError(P.E_BAD_MESSAGE, f"{field_name}.shape",
                                  f"{payload.shape} x {payload.dtype} is "
                                  f"{P.payload_nbytes(payload)} bytes; part holds {len(raw)}",
                                  req_id)
        assert self.inline_input is not None
        if len(raw) > self.inline_input.slot_bytes:
            raise P.ProtocolError(P.E_TOO_LARGE, field_name, f"{len(raw)} bytes; max "
                                  f"{self.inline_input.slot_bytes}", req_id)
        array = np.frombuffer(raw, dtype=payload.dtype).reshape(payload.shape)
        try:
            ref = self.inline_input.write(array, timeout_s=0.0)
        except TimeoutError:
            raise P.ProtocolError(P.E_BUSY, field_name, "all inline input slots are in use; "
                                  "retry shortly", req_id) from None
        desc = P.SlotDesc(ring=ref.ring, slot=ref.slot, seq=ref.seq, shape=list(ref.shape),
                          dtype=ref.dtype)
        return desc, (ref.ring, ref.slot, ref.seq)

    def _accept(self, session: Session, msg: Any, extra: list[Any]) -> None:
        now = time.monotonic()
        deadline_s = getattr(msg, "deadline_s", 0.0) or self.cfg.daemon.job_deadline_s
        seed = getattr(msg, "seed", 0) or int.from_bytes(os.urandom(7), "little")
        params: dict[str, Any] = {}
        input_slot = None
        if isinstance(msg, P.RegisterAvatar):
            kind = "register"
            if msg.image.dtype != "uint8" or len(msg.image.shape) != 1:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "image.shape",
                                      "must be 1-D uint8 (the bytes of an image file)",
                                      msg.req_id)
            desc, input_slot = self._input(session, msg.image, extra, "image", msg.req_id)
            params["avatar_id"] = self._store_avatar(desc, input_slot)
            self._release_slot_of(input_slot)
            input_slot = None
        elif isinstance(msg, P.Speak):
            kind = "speak"
            if msg.avatar_id and msg.avatar_id not in self.avatars:
                raise P.ProtocolError(P.E_NOT_FOUND, "avatar_id",
                                      f"avatar {msg.avatar_id!r} is not registered", msg.req_id)
            if not msg.text.strip():
                raise P.ProtocolError(P.E_BAD_INPUT, "text", "must not be empty", msg.req_id)
            params.update(text=msg.text, voice=msg.voice, avatar_id=msg.avatar_id,
                          send_audio=msg.send_audio)
        elif isinstance(msg, (P.Lipsync, P.Transcribe)):
            kind = "lipsync" if isinstance(msg, P.Lipsync) else "transcribe"
            if msg.audio.dtype != "float32" or len(msg.audio.shape) != 1:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "audio.shape",
                                      "must be 1-D float32 PCM", msg.req_id)
            if isinstance(msg, P.Lipsync) and msg.avatar_id and msg.avatar_id not in self.avatars:
                raise P.ProtocolError(P.E_NOT_FOUND, "avatar_id",
                                      f"avatar {msg.avatar_id!r} is not registered", msg.req_id)
            desc, input_slot = self._input(session, msg.audio, extra, "audio", msg.req_id)
            params.update(audio=desc, sample_rate=msg.sample_rate,
                          avatar_id=getattr(msg, "avatar_id", ""))
        else:
            raise P.ProtocolError(P.E_UNKNOWN_TYPE, "type", f"{type(msg).__name__} is not a "
                                  "job request", getattr(msg, "req_id", 0))
        job = Job(job_id=new_job_id(), kind=kind, client=session.identity, req_id=msg.req_id,
                  seed=seed, deadline=now + deadline_s, params=params, input_slot=input_slot)
        recent = statistics.median(self.recent_job_s) if self.recent_job_s else 1.0
        try:
            position = self.queue.push(job, recent)
        except QueueFull as exc:
            self._release_job_input(job)
            self.client_port.send(session.identity, P.make(
                P.Busy, req_id=msg.req_id, retry_after_s=exc.retry_after_s,
                queue_depth=exc.depth, reason=f"queue_size={self.queue.size} reached"))
            return
        self.jobs[job.job_id] = job
        if kind != "register":
            self.client_port.send(session.identity, P.make(P.Accepted, req_id=msg.req_id,
                                                           job_id=job.job_id,
                                                           queue_position=position))

    def _release_slot_of(self, key: tuple[str, int, int]) -> None:
        job = Job("tmp", "tmp", b"", 0, 0, 0.0, input_slot=key)
        self._release_job_input(job)

    def _store_avatar(self, desc: P.SlotDesc, key: tuple[str, int, int]) -> str:
        """Keep the portrait's bytes in a segment of their own, named by content hash."""
        ring = (self.inline_input if self.inline_input and key[0] == self.inline_input.name
                else next(s.input_ring for s in self.sessions.values()
                          if s.input_ring is not None and s.input_ring.name == key[0]))
        data = ring.read(SlotRef(desc.ring, desc.slot, desc.seq, tuple(desc.shape), desc.dtype))
        avatar_id = sha256(data).hexdigest()[:32]
        if avatar_id not in self.avatars:
            if len(self.avatars) >= MAX_AVATARS:
                oldest = next(iter(self.avatars))
                self._forget_avatar(oldest)
            segment = segments.Segment.create("avatar", max(1, data.nbytes))
            segment.buffer[: data.nbytes] = data.tobytes()
            self.avatars[avatar_id] = Avatar(avatar_id, segment, data.nbytes)
        return avatar_id

    def _forget_avatar(self, avatar_id: str) -> None:
        avatar = self.avatars.get(avatar_id)
        if avatar is not None and not avatar.validated:
            self.avatars.pop(avatar_id)
            avatar.segment.close()

    # ================================================================ status

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = []
        for w in self.workers:
            device_memory = dev.nvml().process_memory(w.pid) if (w.pid and w.device.is_gpu) else 0
            rss = w.rss_bytes
            if w.pid:
                try:
                    rss = psutil.Process(w.pid).memory_info().rss
                except psutil.Error:
                    pass
            workers.append({
                "id": w.index, "pid": w.pid, "state": w.state.value,
                "state_age_s": round(now - w.state_since, 3), "device": w.device.name,
                "device_label": w.device.label, "device_memory_bytes": device_memory,
                "load_memory_bytes": w.memory_bytes, "rss_bytes": rss,
                "uptime_s": round(now - w.started_at, 3) if w.pid else 0.0,
                "restarts": w.restarts, "load_failures": w.load_failures,
                "attempt": w.attempt,
                # current_job: the first one, for readers that know one job per worker.
                "current_job": next(iter(w.jobs), ""), "current_jobs": list(w.jobs),
                "capacity": w.capacity,
                "stage": w.stage, "load_s": round(w.load_s, 3), "reason": w.reason,
                "engines": w.engines,
            })
        ready = sum(w.state in (WState.READY, WState.BUSY) for w in self.workers)
        return {
            "daemon": {"pid": os.getpid(), "uptime_s": round(now - self.started_at, 3),
                       "endpoints": self.client_port.endpoints,
                       "state": self._health(),
                       "ready_workers": ready, "min_ready": self.cfg.daemon.min_ready,
                       "sessions": len(self.sessions)},
            "workers": workers,
            "queue": {"depth": len(self.queue), "size": self.queue.size,
                      "running": sum(len(w.jobs) for w in self.workers)},
            "jobs": dict(self.stats),
            "rtf_recent_median": (statistics.median(self.recent_rtf) if self.recent_rtf
                                  else None),
        }

    def _health(self) -> str:
        """draining | ready (min_ready workers up) | failed (every worker gave up loading,
        nothing will change without an operator) | starting."""
        if self.draining:
            return "draining"
        ready = sum(w.state in (WState.READY, WState.BUSY) for w in self.workers)
        if ready >= self.cfg.daemon.min_ready:
            return "ready"
        if all(w.state is WState.FAILED for w in self.workers):
            return "failed"
        return "starting"

    def _set_status(self) -> None:
        counts: dict[str, int] = {}
        for w in self.workers:
            counts[w.state.value] = counts.get(w.state.value, 0) + 1
        text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        text = f"workers: {text}; queue {len(self.queue)}"
        ready = counts.get("ready", 0) + counts.get("busy", 0)
        if not self.ready_sent and ready >= self.cfg.daemon.min_ready:
            self.ready_sent = True
            log.info("ready: %d of %d workers up", ready, len(self.workers))
            self.notifier.ready(text)
            self._last_status = text
        elif text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    def _notify(self, now: float) -> None:
        interval = self.notifier.watchdog_interval_s()
        if interval and now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()

    def _start_metrics(self) -> None:
        port = self.cfg.daemon.metrics_port
        if not port:
            return
        from .metrics import start_metrics_server

        start_metrics_server(self, self.cfg.daemon.metrics_host, port)
