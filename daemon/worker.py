"""The worker process: one device, its engines, one job at a time.

Started by the supervisor with the `spawn` method (never fork: CUDA state does not survive
a fork). The first thing it does is pin its GPU through CUDA_VISIBLE_DEVICES, before any
engine (and so torch) is imported. It asks the kernel to kill it if the supervisor dies,
so a SIGKILLed supervisor leaves no orphan workers.

Handshake on its DEALER socket: HELLO -> LOADING (stage, progress)... -> READY (engines,
memory, warm-up) or LOAD_FAILED. A heartbeat thread with its own socket reports, every
`heartbeat_interval_s`, the current job and how many frames it has produced; the
supervisor kills the worker when heartbeats stop (hung or stopped process) or when the job
makes no progress (hung engine), except while the worker waits on back-pressure.

Frames and audio go into rings the supervisor owns; the worker writes each frame into a
slot once and sends a descriptor. Frames below `resume_from` were delivered by an earlier
attempt of the same job: they are recomputed (engines are seeded, so the rest matches) but
not sent again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from avatard.ipc import protocol as P
from avatard.ipc.ring import RingFullError, SlotRef, SlotRing
from avatard.ipc.segments import Segment

log = logging.getLogger("avatard.worker")

PR_SET_PDEATHSIG = 1
RING_WAIT_STEP_S = 0.1  # how long one back-pressure wait lasts before checking messages
LIPSYNC_CHUNK_S = 0.2  # audio fed to the avatar stream per push (streaming granularity)


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


class JobCancelled(Exception):
    pass


class ShutdownRequested(Exception):
    pass


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the heartbeat thread's parent check still ends us


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"w{spec.index}.{spec.attempt}".encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(spec.control_endpoint)
        self.engines: dict[str, Any] = {}
        self.avatars: dict[str, Any] = {}  # avatar_id -> engine state
        self.inputs: dict[str, SlotRing] = {}
        self.outputs: dict[str, SlotRing] = {}  # session rings of the current job
        # Read by the heartbeat thread (plain attribute reads are atomic under the GIL).
        self.job_id = ""
        self.progress = 0
        self.waiting = False
        self._stop = threading.Event()

    # ------------------------------------------------------------ messaging

    def send(self, cls: type[P.Msg], **fields: Any) -> None:
        self.sock.send_multipart(P.Codec.encode(P.make(cls, **fields)))

    def _heartbeat_loop(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"w{self.spec.index}.{self.spec.attempt}.hb".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.spec.control_endpoint)
        try:
            while not self._stop.wait(self.spec.heartbeat_interval_s):
                if self.spec.supervisor_pid and os.getppid() != self.spec.supervisor_pid:
                    os._exit(0)  # supervisor gone and no PDEATHSIG: do not linger
                msg = P.make(P.WHeartbeat, worker=self.spec.index, job_id=self.job_id,
                             progress=self.progress, waiting=self.waiting,
                             rss_bytes=_rss_bytes())
                sock.send_multipart(P.Codec.encode(msg))
        finally:
            sock.close(linger=0)

    def _check_control(self, job_id: str) -> None:
        """Act on messages that arrived while a job runs (cancel, shutdown)."""
        while self.sock.poll(0, zmq.POLLIN):
            msg, _ = P.CONTROL_CODEC.decode(self.sock.recv_multipart())
            if isinstance(msg, P.CancelJob) and msg.job_id == job_id:
                raise JobCancelled(job_id)
            if isinstance(msg, P.Shutdown):
                raise ShutdownRequested(msg.reason)

    # ------------------------------------------------------------ loading

    def load(self) -> None:
        from avatard.engines.registry import load_engine

        spec = self.spec
        device = spec.device
        if device.startswith("cuda:"):
            device = "cuda:0"  # CUDA_VISIBLE_DEVICES holds exactly our GPU
        started = time.monotonic()
        rss_before = _rss_bytes()
        kinds = [k for k in ("avatar", "tts", "asr") if spec.engines.get(k)]
        for position, kind in enumerate(kinds):
            name = spec.engines[kind]
            options = dict(spec.engine_options.get(name, {}))
            options.update(worker_index=spec.index, attempt=spec.attempt)

            def progress(stage: str, fraction: float, kind=kind, position=position,
                         name=name) -> None:
                overall = (position + max(0.0, min(1.0, fraction))) / len(kinds)
                self.send(P.WLoading, worker=spec.index, stage=f"{kind} {name}: {stage}"[:4000],
                          progress=overall)

            progress("start", 0.0)
            self.engines[kind] = load_engine(kind, name, device, options, progress)
            progress("ready", 1.0)
        reports = [e.report() for e in self.engines.values()]
        memory = max(0, _rss_bytes() - rss_before)
        if device.startswith("cuda"):
            memory = sum(r.memory_bytes for r in reports)
        self.send(P.WReady, worker=spec.index,
                  engines=[P.EngineInfo(name=r.name, kind=r.kind, device=r.device,
                                        memory_bytes=max(0, int(r.memory_bytes)),
                                        warmup_s=float(r.warmup_s), notes=r.notes[:4000])
                           for r in reports],
                  memory_bytes=memory, load_s=time.monotonic() - started,
                  warmup_s=sum(r.warmup_s for r in reports))

    # ------------------------------------------------------------ jobs

    def serve(self) -> None:
        frame_ring = SlotRing.attach(self.spec.frame_ring)
        audio_ring = SlotRing.attach(self.spec.audio_ring)
        try:
            while True:
                if not self.sock.poll(1000, zmq.POLLIN):
                    continue
                msg, _ = P.CONTROL_CODEC.decode(self.sock.recv_multipart())
                if isinstance(msg, P.Shutdown):
                    return
                if isinstance(msg, P.RunJob):
                    try:
                        self.run_job(msg, frame_ring, audio_ring)
                    except ShutdownRequested:
                        return
                # A CancelJob for a job already finished needs no answer.
        finally:
            frame_ring.close()
            audio_ring.close()
            for ring in self.inputs.values():
                ring.close()

    def run_job(self, job: P.RunJob, frame_ring: SlotRing, audio_ring: SlotRing) -> None:
        from avatard.engines.base import EngineInputError

        self.job_id, self.progress = job.job_id, 0
        try:
            if job.kind == "register":
                state = self._avatar(job)
                self.send(P.WAvatar, worker=self.spec.index, job_id=job.job_id,
                          avatar_id=state.avatar_id)
                return
            if job.kind == "transcribe":
                self._transcribe(job)
                return
            if job.frame_ring:  # the client session's own rings
                frame_ring = self._attach_output(job.frame_ring)
                audio_ring = self._attach_output(job.audio_ring)
            frames, samples, media_s = self._render(job, frame_ring, audio_ring)
            self.send(P.WJobDone, worker=self.spec.index, job_id=job.job_id, frames=frames,
                      audio_samples=samples, media_s=media_s)
        except JobCancelled:
            self.send(P.WJobFailed, worker=self.spec.index, job_id=job.job_id,
                      code=P.E_CANCELLED, message="cancelled")
        except EngineInputError as exc:
            self.send(P.WJobFailed, worker=self.spec.index, job_id=job.job_id,
                      code=P.E_BAD_INPUT, message=f"{exc.field}: {exc.rule}"[:4000])
        except ShutdownRequested:
            raise
        except Exception as exc:  # an engine fault: the supervisor decides on a retry
            log.exception("job %s failed", job.job_id)
            self.send(P.WJobFailed, worker=self.spec.index, job_id=job.job_id,
                      code=P.E_WORKER, message=f"{type(exc).__name__}: {exc}"[:4000])
        finally:
            self.job_id, self.progress, self.waiting = "", 0, False
            # Unmap the clients' input rings: sessions come and go, and an unlinked ring
            # stays in memory for as long as anyone maps it. Attaching again is cheap.
            for ring in self.inputs.values():
                ring.close()
            self.inputs.clear()
            for ring in self.outputs.values():
                ring.close()
            self.outputs.clear()

    def _attach_output(self, name: str) -> SlotRing:
        ring = self.outputs.get(name)
        if ring is None:
            ring = self.outputs[name] = SlotRing.attach(name)
        return ring

    def _input_array(self, desc: P.SlotDesc) -> np.ndarray:
        ring = self.inputs.get(desc.ring)
        if ring is None:
            ring = self.inputs[desc.ring] = SlotRing.attach(desc.ring)
        ref = SlotRef(desc.ring, desc.slot, desc.seq, tuple(desc.shape), desc.dtype)
        return np.array(ring.read(ref))  # a private copy: the slot goes back after the job

    def _avatar(self, job: P.RunJob) -> Any:
        from avatard.engines.base import EngineInputError

        engine = self.engines["avatar"]
        if job.avatar_id and job.avatar_id in self.avatars:
            return self.avatars[job.avatar_id]
        if job.avatar_segment:
            with Segment.attach(job.avatar_segment, min_size=job.avatar_bytes) as seg:
                image = bytes(seg.buffer[: job.avatar_bytes])
            state = engine.register(image)
        else:
            portrait = engine.default_portrait()
            if portrait is None:
                raise EngineInputError("avatar_id", "this engine has no default portrait; "
                                       "register an avatar first")
            state = engine.register(portrait)
        self.avatars[state.avatar_id] = state
        if job.avatar_id:
            self.avatars[job.avatar_id] = state
        return state

    def _transcribe(self, job: P.RunJob) -> None:
        assert job.audio is not None
        pcm = self._input_array(job.audio).reshape(-1).astype(np.float32, copy=False)
        transcript = self.engines["asr"].transcribe(pcm, job.sample_rate)
        segments = [P.SegmentMsg(text=s.text, start_s=s.start_s, end_s=s.end_s,
                                 words=[P.WordMsg(text=w.text, start_s=w.start_s,
                                                  end_s=w.end_s, probability=w.probability)
                                        for w in s.words])
                    for s in transcript.segments]
        self.send(P.WTranscript, worker=self.spec.index, job_id=job.job_id,
                  language=transcript.language, duration_s=transcript.duration_s,
                  segments=segments)
        self.send(P.WJobDone, worker=self.spec.index, job_id=job.job_id, frames=0,
                  media_s=transcript.duration_s)

    def _audio_chunks(self, job: P.RunJob, rate: int):
        """(pcm at the avatar's rate, original pcm, original rate) per chunk."""
        from avatard.engines.audio import resample

        if job.kind == "speak":
            tts = self.engines["tts"]
            for pcm in tts.stream(job.text, job.voice or None):
                pcm = np.asarray(pcm, np.float32)
                yield resample(pcm, tts.sample_rate, rate), pcm, tts.sample_rate
        elif job.kind == "lipsync":
            from avatard.engines.audio import validate_pcm

            assert job.audio is not None
            pcm = self._input_array(job.audio).reshape(-1).astype(np.float32, copy=False)
            # NaN, inf, 1e30 or an empty buffer: a clear bad_input, not an engine crash.
            pcm, _ = validate_pcm(pcm, job.sample_rate, field="audio")
            resampled = resample(pcm, job.sample_rate, rate)
            # A first chunk of one frame's audio, so the first frame leaves as soon as the
            # engine can make it; then bigger chunks, which cost less per frame.
            first = max(1, rate // 25)
            yield resampled[:first], None, 0
            step = max(1, int(rate * LIPSYNC_CHUNK_S))
            for start in range(first, resampled.size, step):
                yield resampled[start : start + step], None, 0
        else:
            raise ValueError(f"unknown job kind {job.kind!r}")

    def _render(self, job: P.RunJob, frame_ring: SlotRing, audio_ring: SlotRing
                ) -> tuple[int, int, float]:
        avatar = self.engines["avatar"]
        state = self._avatar(job)
        stream = avatar.open_stream(state, job.seed)
        fps = avatar.fps
        next_frame = 0
        audio_index = 0
        samples = 0
        out_samples = 0

        def emit(frames: list[np.ndarray]) -> None:
            nonlocal next_frame
            for frame in frames:
                index = next_frame
                next_frame += 1
                self.progress = next_frame
                if index < job.resume_from:
                    continue  # delivered by an earlier attempt
                ref = self._write(frame_ring, frame, job.job_id)
                self.send(P.WFrame, worker=self.spec.index, job_id=job.job_id, index=index,
                          pts_us=index * 1_000_000 // fps, data=_desc(ref))
                self._check_control(job.job_id)

        for pcm, original, original_rate in self._audio_chunks(job, avatar.audio_rate):
            self._check_control(job.job_id)
            if job.send_audio and original is not None:
                if audio_index >= job.audio_resume_from:
                    ref = self._write(audio_ring, original, job.job_id)
                    self.send(P.WAudio, worker=self.spec.index, job_id=job.job_id,
                              index=audio_index, pts_us=out_samples * 1_000_000 // original_rate,
                              sample_rate=original_rate, data=_desc(ref))
                audio_index += 1
                out_samples += original.size
            samples += pcm.size
            emit(stream.push(pcm))
        emit(stream.finish())
        return next_frame, out_samples, samples / avatar.audio_rate

    def _write(self, ring: SlotRing, array: np.ndarray, job_id: str) -> SlotRef:
        """Copy into a free slot, waiting out back-pressure while still obeying cancels."""
        array = np.ascontiguousarray(array)
        while True:
            try:
                ref = ring.write(array, timeout_s=RING_WAIT_STEP_S)
                self.waiting = False
                return ref
            except RingFullError:
                self.waiting = True  # the client is slow, not us: no stall
                self._check_control(job_id)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._stop.set()
        for engine in self.engines.values():
            try:
                engine.close()
            except Exception:
                log.exception("closing engine %s", engine)
        self.sock.close(linger=1000)
        self.ctx.term()


def _desc(ref: SlotRef) -> P.SlotDesc:
    return P.SlotDesc(ring=ref.ring, slot=ref.slot, seq=ref.seq, shape=list(ref.shape),
                      dtype=ref.dtype)


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
    worker.send(P.WHello, worker=spec.index, pid=os.getpid(), device=spec.device,
                attempt=spec.attempt)
    threading.Thread(target=worker._heartbeat_loop, name="heartbeat", daemon=True).start()
    try:
        worker.load()
    except MemoryError as exc:
        worker.send(P.WLoadFailed, worker=spec.index, reason=f"out of memory: {exc}"[:4000],
                    out_of_memory=True)
        worker.close()
        sys.exit(3)
    except Exception as exc:
        oom = "out of memory" in str(exc).lower()
        log.exception("loading failed")
        worker.send(P.WLoadFailed, worker=spec.index,
                    reason=f"{type(exc).__name__}: {exc}"[:4000], out_of_memory=oom)
        worker.close()
        sys.exit(2)
    try:
        worker.serve()
    finally:
        worker.close()
