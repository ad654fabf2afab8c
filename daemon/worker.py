"""The worker process: one device, its engines, `jobs_per_worker` jobs at a time.

Started by the supervisor with the `spawn` method (never fork: CUDA state does not survive
a fork). The first thing it does is pin its GPU through CUDA_VISIBLE_DEVICES, before any
engine (and so torch) is imported. It asks the kernel to kill it if the supervisor dies,
so a SIGKILLed supervisor leaves no orphan workers.

Handshake on its DEALER socket: HELLO -> LOADING (stage, progress)... -> READY (engines,
memory, warm-up, capacity) or LOAD_FAILED. A heartbeat thread with its own socket reports,
every `heartbeat_interval_s`, each running job and how many frames it has produced; the
supervisor kills the worker when heartbeats stop (hung or stopped process) or when a job
makes no progress (hung engine), except while that job waits on back-pressure.

Concurrency: the main thread only reads control messages (run, cancel, shutdown); every
job runs on a thread of its own, whatever `jobs_per_worker` is, and dispatches once on its
spec's type (one handler per job kind). ZeroMQ sockets must not be shared between threads,
so each thread sends on a socket it owns: the main socket, the heartbeat socket, one socket
per job thread, all named by the worker's identity (`WorkerId`: `w<index>.<attempt>`, plus
`.hb` / `.j<n>`), which is how the supervisor knows whose message it is. Calls into an
engine whose `thread_safe` is False are serialised by a lock per engine; writes into a ring
shared by several jobs by a lock per ring (`SlotRing.writing(lock=...)`).

A live session (`LiveSpec`) is a job like the others whose handler never ends by itself:
its thread runs the session's pacing clock and takes the session's input between ticks
(daemon/live_worker.py); it writes with timeout 0 and drops what its client does not read.

Frames and audio go into rings the supervisor owns; the worker writes each frame into a
slot once and sends a descriptor. Frames below `resume_from` were delivered by an earlier
attempt of the same job: they are recomputed (engines are seeded, so the rest matches) but
not sent again.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.process
import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import zmq

from avatard.ipc import protocol as P
from avatard.ipc.procmem import rss_bytes
from avatard.ipc.ring import DescriptorError, SlotRef, SlotRing, check_layout
from avatard.ipc.segments import Segment

from .config import Config
from .pool import WorkerId

log = logging.getLogger("avatard.worker")

PR_SET_PDEATHSIG = 1
RING_WAIT_STEP_S = 0.1  # how long one back-pressure wait lasts before checking messages
SHUTDOWN_JOIN_S = 2.0  # how long a Shutdown waits for job threads to notice it


@dataclass
class WorkerSpec:
    """Everything a worker needs, passed once at spawn (process arguments, not the wire)."""

    index: int
    attempt: int
    device: str  # "cpu" or "cuda:<nvml index>"
    control_endpoint: str
    frame_ring: str
    audio_ring: str
    engines: dict[str, str]  # kind -> engine name
    engine_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    heartbeat_interval_s: float = 1.0
    supervisor_pid: int = 0
    log_level: str = "info"
    jobs_per_worker: int = 1
    avatar_cache_size: int = 8  # avatars.worker_cache_size
    max_media_s: float = 600.0  # daemon.max_media_s
    input_gap_s: float = 30.0  # timeouts.input_gap_s
    live_render_ahead_frames: int = -1  # daemon.live_render_ahead_frames (-1: auto)

    @classmethod
    def from_config(cls, config: Config, index: int, attempt: int, device: str,
                    control_endpoint: str, frame_ring: str, audio_ring: str) -> WorkerSpec:
        """The spec of one worker process of a daemon running `config`."""
        e = config.engines
        return cls(index=index, attempt=attempt, device=device,
                   control_endpoint=control_endpoint, frame_ring=frame_ring,
                   audio_ring=audio_ring,
                   engines={"avatar": e.avatar, "tts": e.tts, "asr": e.asr},
                   engine_options={k: dict(v) for k, v in e.options.items()},
                   heartbeat_interval_s=config.timeouts.heartbeat_interval_s,
                   supervisor_pid=os.getpid(), log_level=config.daemon.log_level,
                   jobs_per_worker=config.daemon.jobs_per_worker,
                   avatar_cache_size=config.avatars.worker_cache_size,
                   max_media_s=config.daemon.max_media_s,
                   input_gap_s=config.timeouts.input_gap_s,
                   live_render_ahead_frames=config.daemon.live_render_ahead_frames)


def check_frame_fits(shape: tuple[int, ...], slot_bytes: int, field: str) -> None:
    """Raise `DescriptorError(field, rule)` when uint8 frames of `shape` ([height, width,
    3]) do not fit a frame slot of `slot_bytes` (a frame ring's `slot_bytes`): the rule
    names the frame size, the bytes a frame needs and `rings.frame_slot_bytes`, the key
    to raise. The ring's own check (`check_layout`) decides, so a portrait refused at
    registration is exactly one whose frames the ring would refuse mid-job."""
    try:
        check_layout(tuple(int(d) for d in shape), "uint8", slot_bytes)
    except DescriptorError:
        height, width = (list(shape) + [0, 0])[:2]
        nbytes = 1
        for dim in shape:
            nbytes *= int(dim)
        # Ditto renders at the portrait's own size (up to 1920 px a side).
        raise DescriptorError(field, f"frames of {width} x {height} px need {nbytes} bytes; "
                              f"a frame slot holds {slot_bytes}: raise rings.frame_slot_bytes "
                              f"to at least {nbytes} (H x W x 3 of the largest frame; "
                              "docs/config.md)") from None


def start_worker(spec: WorkerSpec) -> multiprocessing.process.BaseProcess:
    """Start a worker process with the `spawn` method (never fork: CUDA state does not
    survive a fork) and return its handle."""
    proc = multiprocessing.get_context("spawn").Process(
        target=worker_main, args=(spec,), name=f"avatard-worker-{spec.index}")
    proc.start()
    return proc


class JobCancelled(Exception):
    pass


class ShutdownRequested(Exception):
    pass


class InputTimeout(Exception):
    """A streamed input's next chunk did not come within `timeouts.input_gap_s`."""


@dataclass(frozen=True, slots=True)
class JobResult:
    """What a job handler produced: frames, audio samples sent, media seconds; for a
    registration, the frame size of its portrait; for a live session, the frames it
    dropped (the client's ring was full) and made late."""

    frames: int = 0
    audio_samples: int = 0
    media_s: float = 0.0
    frame: P.FrameSize | None = None
    frames_dropped: int = 0
    late_frames: int = 0


@dataclass(eq=False)
class JobRun:
    """One running job inside the worker, on a thread of its own. The heartbeat thread
    reads `progress` and `waiting` (plain attribute reads and writes are atomic under the
    GIL); the main thread sets `cancelled`."""

    msg: P.RunJob
    number: int  # numbers the job thread's socket identity
    progress: int = 0
    waiting: bool = False  # blocked on a full ring: back-pressure, not a stall
    queued_s: float = 0.0  # live sessions: seconds of speech queued (the job thread sets it)
    received_s: float = 0.0  # live sessions: seconds of client audio taken into the queue
    frames_dropped: int = 0  # live sessions: frames dropped for a client that did not read
    late_frames: int = 0  # live sessions: frames sent over a frame period after their tick
    cancelled: threading.Event = field(default_factory=threading.Event)
    inputs: dict[str, SlotRing] = field(default_factory=dict)  # clients' input rings
    outputs: dict[str, SlotRing] = field(default_factory=dict)  # session rings it writes
    thread: threading.Thread | None = None
    # Streamed input (a spec whose audio is None): (index, bytes, final) per JobInput,
    # put by the main thread, taken by the job thread.
    streamed: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    # A live session's input: (LiveInput, bytes) put by the main thread, and the audio of
    # its TTS thread (daemon/live_worker.py); taken by the job thread between ticks.
    live_inputs: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    @property
    def job_id(self) -> str:
        return self.msg.job_id

    def close_rings(self) -> None:
        # Unmap the clients' rings: sessions come and go, and an unlinked ring stays in
        # memory for as long as anyone maps it. Attaching again is cheap.
        for ring in (*self.inputs.values(), *self.outputs.values()):
            ring.close()
        self.inputs.clear()
        self.outputs.clear()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the heartbeat thread's parent check still ends us


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        # The grid of every live session's clock on this worker (`live_worker`): their
        # ticks fall at live_epoch + k / fps, so their pushes can be batched together.
        self.live_epoch = time.monotonic()
        self.id = WorkerId(spec.index, spec.attempt)
        self.ctx = zmq.Context()
        self.sock = self._socket()
        self.engines: dict[str, Any] = {}
        self._engine_locks: dict[str, AbstractContextManager[Any]] = {}  # kind -> lock
        # Supervisor's avatar id -> engine state, least recently used first, at most
        # `avatar_cache_size` (a state is a few MiB of a real engine's tensors): a state
        # let go here is registered again from the avatar's segment when next needed.
        self.avatars: OrderedDict[str, Any] = OrderedDict()
        self._avatars_lock = threading.Lock()
        self.avatar_evictions = 0
        # Running jobs by id, in start order; read by the heartbeat thread.
        self.runs: dict[str, JobRun] = {}
        self._runs_lock = threading.Lock()
        self._ring_locks: dict[str, threading.Lock] = {}  # ring name -> writer lock
        self._ring_locks_lock = threading.Lock()
        self._run_count = 0
        self._local = threading.local()  # .sock: the socket a job thread sends on
        self._shutdown = threading.Event()
        self._stop = threading.Event()
        self.handlers = {  # job spec type -> handler; the one dispatch on the job kind
            P.SpeakSpec: self._render,
            P.LipsyncSpec: self._render,
            P.TranscribeSpec: self._transcribe,
            P.RegisterSpec: self._register,
            P.LiveSpec: self._live,
        }

    # ------------------------------------------------------------ messaging

    def _socket(self, suffix: str = "", linger_ms: int = 2000) -> zmq.Socket:
        """A DEALER to the supervisor named by this worker's identity (+ a thread suffix)."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.id.identity(suffix))
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.connect(self.spec.control_endpoint)
        return sock

    def send(self, cls: type[P.Msg], **fields: Any) -> None:
        """Send on the calling thread's own socket: a job thread's, else the main one."""
        sock = getattr(self._local, "sock", None) or self.sock
        sock.send_multipart(P.Codec.encode(P.make(cls, **fields)))

    def _heartbeat_loop(self) -> None:
        sock = self._socket("hb", linger_ms=0)
        try:
            while not self._stop.wait(self.spec.heartbeat_interval_s):
                if self.spec.supervisor_pid and os.getppid() != self.spec.supervisor_pid:
                    os._exit(0)  # supervisor gone and no PDEATHSIG: do not linger
                with self._runs_lock:
                    jobs = [P.JobProgress(job_id=r.job_id, progress=r.progress,
                                          waiting=r.waiting, queued_s=r.queued_s,
                                          received_s=r.received_s,
                                          frames_dropped=r.frames_dropped,
                                          late_frames=r.late_frames)
                            for r in self.runs.values()]
                with self._avatars_lock:
                    cached, evictions = len(self.avatars), self.avatar_evictions
                msg = P.make(P.WHeartbeat, rss_bytes=rss_bytes(), jobs=jobs,
                             avatars_cached=cached, avatar_evictions=evictions,
                             engine_avatars_cached=self._engine_avatars(),
                             engine_counters=self._engine_counters())
                sock.send_multipart(P.Codec.encode(msg))
        finally:
            sock.close(linger=0)

    def _engine_avatars(self) -> int:
        """Portraits the avatar engine's own cache holds (engines that say)."""
        engine = self.engines.get("avatar")
        count = getattr(engine, "cached_avatars", None)
        return int(count()) if callable(count) else 0

    def _engine_counters(self) -> dict[str, float]:
        """The avatar engine's running totals (`AvatarEngine.counters`), {} if it keeps none."""
        engine = self.engines.get("avatar")
        return {str(k): float(v) for k, v in engine.counters().items()} if engine else {}

    def _check_control(self, run: JobRun) -> None:
        """Between frames: act on a cancel or shutdown that the main thread recorded."""
        if self._shutdown.is_set():
            raise ShutdownRequested("shutdown")
        if run.cancelled.is_set():
            raise JobCancelled(run.job_id)

    def _engine(self, kind: str) -> tuple[Any, AbstractContextManager[Any]]:
        """An engine and what to hold while calling it: a lock shared by every job when
        the engine is not thread-safe, else nothing."""
        return self.engines[kind], self._engine_locks[kind]

    def _ring_lock(self, name: str) -> threading.Lock:
        # Per ring name, not per mapping: two jobs may map the same ring separately.
        with self._ring_locks_lock:
            lock = self._ring_locks.get(name)
            if lock is None:
                lock = self._ring_locks[name] = threading.Lock()
            return lock

    # ------------------------------------------------------------ loading

    def load(self) -> None:
        from avatard.engines.base import WorkerContext
        from avatard.engines.registry import load_engine

        spec = self.spec
        context = WorkerContext(worker_index=spec.index, attempt=spec.attempt)
        device = spec.device
        if device.startswith("cuda:"):
            device = "cuda:0"  # CUDA_VISIBLE_DEVICES holds exactly our GPU
        started = time.monotonic()
        rss_before = rss_bytes()
        kinds = [k for k in ("avatar", "tts", "asr") if spec.engines.get(k)]
        for position, kind in enumerate(kinds):
            name = spec.engines[kind]
            options = dict(spec.engine_options.get(name, {}))

            def progress(stage: str, fraction: float, kind=kind, position=position,
                         name=name) -> None:
                overall = (position + max(0.0, min(1.0, fraction))) / len(kinds)
                self.send(P.WLoading, stage=f"{kind} {name}: {stage}"[:4000], progress=overall)

            progress("start", 0.0)
            engine = self.engines[kind] = load_engine(kind, name, device, options, progress,
                                                      context=context)
            self._engine_locks[kind] = (nullcontext() if getattr(engine, "thread_safe", False)
                                        else threading.Lock())
            progress("ready", 1.0)
        if spec.jobs_per_worker > 1:
            serialised = [f"{kind} {spec.engines[kind]}" for kind in self.engines
                          if not getattr(self.engines[kind], "thread_safe", False)]
            log.info("runs %d jobs at once; %s", spec.jobs_per_worker,
                     f"engines not thread-safe, called by one job at a time: "
                     f"{', '.join(serialised)}" if serialised else
                     "every engine is thread-safe")
        capabilities = self._capabilities()
        reports = [e.report() for e in self.engines.values()]
        memory = max(0, rss_bytes() - rss_before)
        if device.startswith("cuda"):
            memory = sum(r.memory_bytes for r in reports)
        self.send(P.WReady,
                  engines=[P.EngineInfo(name=r.name, kind=r.kind, device=r.device,
                                        memory_bytes=max(0, int(r.memory_bytes)),
                                        warmup_s=float(r.warmup_s), notes=r.notes[:4000])
                           for r in reports],
                  memory_bytes=memory, load_s=time.monotonic() - started,
                  warmup_s=sum(r.warmup_s for r in reports), capacity=spec.jobs_per_worker,
                  capabilities=capabilities)

    def _capabilities(self) -> P.Capabilities:
        """What the loaded engines offer clients (the READY report). Registers the avatar
        engine's default portrait, the one way to learn its frame size (the state stays in
        the avatar cache for the first job without an avatar). Raises ValueError, a load
        failure naming the limit, when the TTS engine describes more voices or longer
        names than the protocol carries: the supervisor would drop the READY otherwise."""
        from avatard.engines.base import EngineInputError

        fps, default_frame, live_rate = 0, None, 0
        avatar = self.engines.get("avatar")
        if avatar is not None:
            fps, live_rate = int(avatar.fps), int(avatar.audio_rate)
            self.send(P.WLoading, stage=f"avatar {self.spec.engines['avatar']}: default "
                      "portrait", progress=1.0)
            try:
                state = self._avatar_state(None)
            except EngineInputError as exc:  # none, or one it refuses: jobs must name one
                log.info("no default portrait (%s): jobs must name an avatar", exc)
            else:
                default_frame = P.FrameSize(width=state.width, height=state.height)
        tts = self.engines.get("tts")
        if tts is None:
            return P.Capabilities(fps=fps, default_frame=default_frame,
                                  live_audio_rate=live_rate)
        voices = [P.VoiceInfo(name=v.name, languages=list(v.languages),
                              sample_rate=v.sample_rate, default=index == 0)
                  for index, v in enumerate(tts.voice_list())]
        capabilities = P.Capabilities(fps=fps, default_frame=default_frame,
                                      audio_rate=int(tts.sample_rate),
                                      live_audio_rate=live_rate, tts_engine=tts.name,
                                      voices=voices,
                                      voices_by_language=tts.voices_by_language())
        try:
            # Structs are not checked when built; the round trip checks every limit.
            return msgspec.msgpack.decode(msgspec.msgpack.encode(capabilities),
                                          type=P.Capabilities)
        except msgspec.ValidationError as exc:
            raise ValueError(f"engines {', '.join(self.spec.engines.values())}: what they "
                             f"report does not fit the READY message ({exc}; at most "
                             f"{P.MAX_VOICES} voices, names of 256 characters, fps <= "
                             "1000)") from None

    # ------------------------------------------------------------ jobs

    def serve(self) -> None:
        """The main thread: read control messages; every job runs on a thread of its own
        (one way to run a job, whatever `jobs_per_worker` is)."""
        frame_ring = SlotRing.attach(self.spec.frame_ring)
        audio_ring = SlotRing.attach(self.spec.audio_ring)
        try:
            while True:
                if not self.sock.poll(1000, zmq.POLLIN):
                    continue
                msg, extra = P.CONTROL_CODEC.decode(self.sock.recv_multipart())
                if isinstance(msg, P.Shutdown):
                    return
                if isinstance(msg, P.RunJob):
                    self._start(msg, frame_ring, audio_ring)
                elif isinstance(msg, P.JobInput):
                    with self._runs_lock:
                        run = self.runs.get(msg.job_id)
                    if run is not None and extra:
                        run.streamed.put((msg.index, bytes(extra[0]), msg.final))
                elif isinstance(msg, P.LiveInput):
                    with self._runs_lock:
                        run = self.runs.get(msg.job_id)
                    if run is not None:  # else the session ended meanwhile: nothing to do
                        run.live_inputs.put((msg, bytes(extra[0]) if extra else b""))
                elif isinstance(msg, P.CancelJob):
                    with self._runs_lock:
                        run = self.runs.get(msg.job_id)
                    if run is not None:
                        run.cancelled.set()
                # A CancelJob for a job already finished needs no answer.
        finally:
            # Give job threads a moment to see the shutdown (they check between frames) so
            # their sockets close; a thread stuck in an engine is left behind, and may still
            # write into the rings: then the process exit unmaps them.
            self._shutdown.set()
            deadline = time.monotonic() + SHUTDOWN_JOIN_S
            threads = [r.thread for r in list(self.runs.values()) if r.thread is not None]
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if not any(thread.is_alive() for thread in threads):
                frame_ring.close()
                audio_ring.close()

    def _start(self, msg: P.RunJob, frame_ring: SlotRing, audio_ring: SlotRing) -> None:
        if len(self.runs) >= self.spec.jobs_per_worker:
            # The supervisor never sends more; if it did, running it beats dropping it.
            log.warning("job %s arrived with %d jobs running (jobs_per_worker=%d)",
                        msg.job_id, len(self.runs), self.spec.jobs_per_worker)
        self._run_count += 1
        run = JobRun(msg, self._run_count)
        run.thread = threading.Thread(target=self._job_thread, name=f"job-{msg.job_id}",
                                      args=(run, frame_ring, audio_ring), daemon=True)
        # Registered before the thread starts, so a CancelJob right behind finds it.
        with self._runs_lock:
            self.runs[msg.job_id] = run
        run.thread.start()

    def _job_thread(self, run: JobRun, frame_ring: SlotRing, audio_ring: SlotRing) -> None:
        # The thread's own socket: ZeroMQ sockets must not be used from two threads. Its
        # linger lets the job's last messages leave on close.
        sock = self._local.sock = self._socket(f"j{run.number}")
        try:
            self._run_job(run, frame_ring, audio_ring)
        except ShutdownRequested:
            pass  # the supervisor is stopping us: it expects nothing more of this job
        except BaseException:
            log.exception("job thread %s died", run.job_id)
        finally:
            self._local.sock = None
            sock.close()

    def _run_job(self, run: JobRun, frame_ring: SlotRing, audio_ring: SlotRing) -> None:
        """Run one job through the handler of its spec type and report its end: done (the
        handler's result), cancelled, bad input (field and rule), or an engine fault."""
        from avatard.engines.base import EngineInputError

        job = run.msg
        try:
            if job.frame_ring:  # the client session's own rings
                for name in (job.frame_ring, job.audio_ring):
                    run.outputs[name] = SlotRing.attach(name)
                frame_ring, audio_ring = run.outputs[job.frame_ring], run.outputs[job.audio_ring]
            result = self.handlers[type(job.spec)](job, run, frame_ring, audio_ring)
            self.send(P.WJobDone, job_id=job.job_id, frames=result.frames,
                      audio_samples=result.audio_samples, media_s=result.media_s,
                      frame=result.frame, frames_dropped=result.frames_dropped,
                      late_frames=result.late_frames)
        except JobCancelled:
            self.send(P.WJobFailed, job_id=job.job_id, code=P.E_CANCELLED, message="cancelled")
        except EngineInputError as exc:
            self.send(P.WJobFailed, job_id=job.job_id, code=P.E_BAD_INPUT,
                      message=str(exc)[:4000], field=exc.field[:256], rule=exc.rule[:4000])
        except InputTimeout as exc:
            self.send(P.WJobFailed, job_id=job.job_id, code=P.E_TIMEOUT, message=str(exc),
                      field="audio", rule=str(exc))
        except DescriptorError as exc:  # an output larger than a slot: a config limit
            self.send(P.WJobFailed, job_id=job.job_id, code=P.E_TOO_LARGE,
                      message=str(exc)[:4000], field=exc.field, rule=exc.rule[:4000])
        except ShutdownRequested:
            raise
        except Exception as exc:  # an engine fault: the supervisor decides on a retry
            log.exception("job %s failed", job.job_id)
            self.send(P.WJobFailed, job_id=job.job_id, code=P.E_WORKER,
                      message=f"{type(exc).__name__}: {exc}"[:4000])
        finally:
            with self._runs_lock:
                # A retried job may already run again under the same id: keep that one.
                if self.runs.get(job.job_id) is run:
                    del self.runs[job.job_id]
            names = list(run.outputs)
            run.close_rings()
            # Drop the locks of session rings no running job writes any more: sessions
            # come and go for as long as the worker lives.
            with self._runs_lock:
                in_use = {name for r in self.runs.values() for name in r.outputs}
            with self._ring_locks_lock:
                for name in names:
                    if name not in in_use:
                        self._ring_locks.pop(name, None)

    def _input_array(self, run: JobRun, desc: P.SlotDesc) -> np.ndarray:
        ring = run.inputs.get(desc.ring)
        if ring is None:
            ring = run.inputs[desc.ring] = SlotRing.attach(desc.ring)
        return np.array(ring.read(desc.ref()))  # a private copy: the slot goes back later

    def _input_pcm(self, run: JobRun, desc: P.SlotDesc | None, sample_rate: int
                   ) -> np.ndarray:
        """A job's whole audio input as 1-D float32: its input slot, or (desc None) the
        chunks of a streamed input joined once the final one came. The supervisor sends
        the chunks in order (after a requeue again from 0, to the new run). Raises
        `InputTimeout` when a chunk is `input_gap_s` late, `EngineInputError` (field
        `audio`) past `max_media_s`, `JobCancelled`/`ShutdownRequested` while waiting."""
        from avatard.engines.base import EngineInputError

        if desc is not None:
            return self._input_array(run, desc).reshape(-1).astype(np.float32, copy=False)
        chunks: list[bytes] = []
        size = 0
        limit_bytes = int(self.spec.max_media_s * sample_rate) * 4
        final = False
        run.waiting = True  # waiting for the client's input is not a stall
        try:
            while not final:
                deadline = time.monotonic() + self.spec.input_gap_s
                while True:
                    self._check_control(run)
                    try:
                        index, data, final = run.streamed.get(timeout=0.25)
                        break
                    except queue.Empty:
                        if time.monotonic() >= deadline:
                            raise InputTimeout(
                                f"chunk {len(chunks)} of the streamed audio did not come "
                                f"within {self.spec.input_gap_s:g} s (timeouts.input_gap_s)"
                            ) from None
                if index != len(chunks):
                    continue  # a resend of a chunk this run already has
                chunks.append(data)
                size += len(data)
                if size > limit_bytes:
                    raise EngineInputError("audio", f"is longer than {self.spec.max_media_s:g}"
                                           " s (daemon.max_media_s)")
        finally:
            run.waiting = False
        return np.frombuffer(b"".join(chunks), np.float32)

    # ------------------------------------------------------------ handlers, one per kind

    def _avatar_state(self, avatar: P.AvatarRef | None) -> Any:
        """The engine's state for a registered portrait (registered on first use, then
        kept under the supervisor's id), or for the engine's default portrait."""
        from avatard.engines.base import EngineInputError

        key = avatar.avatar_id if avatar is not None else ""
        with self._avatars_lock:
            state = self.avatars.get(key)
            if state is not None:
                self.avatars.move_to_end(key)
        if state is not None:
            return state
        engine, lock = self._engine("avatar")
        if avatar is not None:
            with Segment.attach(avatar.segment, min_size=avatar.nbytes) as seg:
                image = bytes(seg.buffer[: avatar.nbytes])
        else:
            with lock:
                image = engine.default_portrait()
            if image is None:
                raise EngineInputError("avatar_id", "this engine has no default portrait; "
                                       "register an avatar first")
        with lock:
            state = engine.register(image)
        with self._avatars_lock:
            self.avatars[key] = state
            self.avatars.move_to_end(key)
            while len(self.avatars) > self.spec.avatar_cache_size:
                self.avatars.popitem(last=False)
                self.avatar_evictions += 1
        return state

    def _register(self, job: P.RunJob, run: JobRun, frame_ring: SlotRing, *_rings: SlotRing
                  ) -> JobResult:
        """Register the portrait and report the size of its frames. A portrait whose frames
        do not fit a frame slot is refused here (`too_large`/`image`), not by the first
        job that renders it; every frame ring has the slot size of the worker's own."""
        spec = job.spec
        assert isinstance(spec, P.RegisterSpec)
        state = self._avatar_state(spec.avatar)
        try:
            check_frame_fits((state.height, state.width, 3), frame_ring.slot_bytes, "image")
        except DescriptorError:
            with self._avatars_lock:  # no job may name it: keep no state for it
                self.avatars.pop(spec.avatar.avatar_id, None)
            raise
        return JobResult(frame=P.FrameSize(width=state.width, height=state.height))

    def _transcribe(self, job: P.RunJob, run: JobRun, *_rings: SlotRing) -> JobResult:
        spec = job.spec
        assert isinstance(spec, P.TranscribeSpec)
        pcm = self._input_pcm(run, spec.audio, spec.sample_rate)
        asr, lock = self._engine("asr")

        def advanced(done_s: float) -> None:
            # Milliseconds of audio done are this job's progress: the heartbeat carries
            # them, and the supervisor's stall watchdog sees a long transcription move
            # (a hung engine makes no more calls, and is still caught). Also the point
            # where a cancel or shutdown stops a long transcription.
            run.progress = max(run.progress, int(done_s * 1000))
            self._check_control(run)

        with lock:
            transcript = asr.transcribe(pcm, spec.sample_rate, progress=advanced)
        segments = [P.SegmentMsg(text=s.text, start_s=s.start_s, end_s=s.end_s,
                                 words=[P.WordMsg(text=w.text, start_s=w.start_s,
                                                  end_s=w.end_s, probability=w.probability)
                                        for w in s.words])
                    for s in transcript.segments]
        self.send(P.WTranscript, job_id=job.job_id, language=transcript.language,
                  duration_s=transcript.duration_s, segments=segments)
        return JobResult(media_s=transcript.duration_s)

    def _live(self, job: P.RunJob, run: JobRun, frame_ring: SlotRing, audio_ring: SlotRing
              ) -> JobResult:
        from .live_worker import run_live

        return run_live(self, job, run, frame_ring, audio_ring)

    def _text_warning(self, job_id: str) -> Any:
        """The `warn` callback of a TTS call for job `job_id`: each message goes to the
        supervisor as a `text_dropped` warning (on the calling thread's socket), which
        passes it on to the client once."""

        def warn(message: str) -> None:
            self.send(P.WJobWarning, job_id=job_id, code=P.W_TEXT_DROPPED,
                      message=message[:4000], field="text")

        return warn

    def _audio_chunks(self, spec: P.SpeakSpec | P.LipsyncSpec, run: JobRun, rate: int):
        """(pcm at the avatar's rate, original pcm or None, original rate) per chunk."""
        from avatard.engines.audio import lipsync_chunks, resample, validate_pcm

        if isinstance(spec, P.SpeakSpec):
            tts, lock = self._engine("tts")
            with lock:
                sentences = iter(tts.stream(spec.text, spec.voice or None,
                                            self._text_warning(run.job_id)))
            while True:
                # Each sentence is synthesized inside next(): that is the engine call.
                with lock:
                    pcm = next(sentences, None)
                if pcm is None:
                    return
                pcm = np.asarray(pcm, np.float32)
                yield resample(pcm, tts.sample_rate, rate), pcm, tts.sample_rate
        else:
            pcm = self._input_pcm(run, spec.audio, spec.sample_rate)
            # NaN, inf, 1e30 or an empty buffer: a clear bad_input, not an engine crash.
            pcm, _ = validate_pcm(pcm, spec.sample_rate, field="audio",
                                  max_duration_s=self.spec.max_media_s,
                                  limit_key="daemon.max_media_s")
            for chunk in lipsync_chunks(resample(pcm, spec.sample_rate, rate), rate):
                yield chunk, None, 0

    def _render(self, job: P.RunJob, run: JobRun, frame_ring: SlotRing, audio_ring: SlotRing
                ) -> JobResult:
        spec = job.spec
        assert isinstance(spec, (P.SpeakSpec, P.LipsyncSpec))
        avatar, lock = self._engine("avatar")
        state = self._avatar_state(spec.avatar)
        with lock:
            stream = avatar.open_stream(state, job.seed)
        fps = avatar.fps
        send_audio = isinstance(spec, P.SpeakSpec) and spec.send_audio
        next_frame = audio_index = samples = out_samples = 0

        def emit(frames: Iterable[np.ndarray]) -> None:
            nonlocal next_frame
            for frame in self.engine_frames(frames, lock):
                index = next_frame
                next_frame += 1
                run.progress = next_frame
                if index < job.resume_from:
                    continue  # delivered by an earlier attempt
                try:
                    ref = self._write(frame_ring, frame, run)
                except DescriptorError:
                    # Too large for a slot: said as at registration (the default portrait
                    # is never registered by a client, so its frames are checked here).
                    check_frame_fits(np.shape(frame), frame_ring.slot_bytes, "frame")
                    raise
                self.send(P.WFrame, job_id=job.job_id, index=index,
                          pts_us=index * 1_000_000 // fps, data=P.SlotDesc.from_ref(ref))
                self._check_control(run)

        for pcm, original, original_rate in self._audio_chunks(spec, run, avatar.audio_rate):
            self._check_control(run)
            if send_audio and original is not None:
                # A sentence longer than one slot goes out as several chunks; the split
                # depends only on the slot size, so a resumed attempt counts the same.
                step = max(1, audio_ring.slot_bytes // original.itemsize)
                for start in range(0, max(1, original.size), step):
                    piece = original[start:start + step]
                    if audio_index >= job.audio_resume_from:
                        ref = self._write(audio_ring, piece, run)
                        self.send(P.WAudio, job_id=job.job_id, index=audio_index,
                                  pts_us=out_samples * 1_000_000 // original_rate,
                                  sample_rate=original_rate, data=P.SlotDesc.from_ref(ref))
                    audio_index += 1
                    out_samples += piece.size
            samples += pcm.size
            with lock:
                frames = stream.push(pcm)
            emit(frames)
        with lock:
            frames = stream.finish()
        emit(frames)
        return JobResult(next_frame, out_samples, samples / avatar.audio_rate)

    @staticmethod
    def engine_frames(frames: Iterable[np.ndarray], lock: AbstractContextManager[Any]
                      ) -> Iterator[np.ndarray]:
        """The frames an avatar stream's push() or finish() returned, one by one. An
        engine may return a lazy iterator that computes frames as it is read: each step
        is an engine call, made under the engine's `lock`."""
        frames = iter(frames)
        while True:
            with lock:
                frame = next(frames, None)
            if frame is None:
                return
            yield frame

    def _write(self, ring: SlotRing, array: np.ndarray, run: JobRun) -> SlotRef:
        """Copy into a free slot, waiting out back-pressure (the client is slow, not us: no
        stall) while still obeying cancels. A ring has one writer process but possibly
        several job threads: taking and publishing a slot happen under the ring's lock;
        the copy into the slot, which the thread then owns, does not."""
        array = np.ascontiguousarray(array)

        def waiting() -> None:
            run.waiting = True
            self._check_control(run)

        try:
            with ring.writing(array.shape, array.dtype.name, timeout_s=float("inf"),
                              lock=self._ring_lock(ring.name), on_wait=waiting,
                              wait_step_s=RING_WAIT_STEP_S) as pending:
                np.copyto(pending.view, array, casting="no")
        finally:
            run.waiting = False
        assert pending.ref is not None
        return pending.ref

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the engines and the control socket (its linger lets the last messages,
        such as a load failure's reason, leave). With a job thread still inside an engine,
        leave both to the process exit: closing an engine under a running call could crash
        it, and terminating the context would wait forever for that thread's socket."""
        self._stop.set()
        stuck = [r.job_id for r in list(self.runs.values())
                 if r.thread is not None and r.thread.is_alive()]
        if stuck:
            log.warning("exiting with job threads still in the engine: %s", ", ".join(stuck))
            self.sock.close(linger=1000)
            return
        for engine in self.engines.values():
            try:
                engine.close()
            except Exception:
                log.exception("closing engine %s", engine)
        self.sock.close(linger=1000)
        self.ctx.term()


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a spawned worker process."""
    if spec.device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.device.split(":", 1)[1]
    # Our own process group: a signal sent to the supervisor's group (a terminal's Ctrl-C,
    # `kill -TERM -PGID`) must not kill workers behind the supervisor's back while it drains.
    os.setpgid(0, 0)
    _die_with_parent()
    logging.basicConfig(level=spec.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s worker{spec.index} %(levelname)s %(message)s")
    # SIGTERM ends the worker at once; SIGINT from a terminal belongs to the supervisor,
    # which decides how to stop us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    worker = Worker(spec)
    worker.send(P.WHello, pid=os.getpid(), device=spec.device)
    threading.Thread(target=worker._heartbeat_loop, name="heartbeat", daemon=True).start()
    try:
        worker.load()
    except MemoryError as exc:
        worker.send(P.WLoadFailed, reason=f"out of memory: {exc}"[:4000], out_of_memory=True)
        worker.close()
        sys.exit(3)
    except Exception as exc:
        oom = "out of memory" in str(exc).lower()
        log.exception("loading failed")
        worker.send(P.WLoadFailed, reason=f"{type(exc).__name__}: {exc}"[:4000],
                    out_of_memory=oom)
        worker.close()
        sys.exit(2)
    try:
        worker.serve()
    finally:
        worker.close()
