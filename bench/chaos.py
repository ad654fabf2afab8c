"""`avatard bench chaos`: a real daemon under steady load while a seeded schedule of faults
hits its workers and its clients; afterwards, an audit of what every job got and of what
the daemon left behind.

Load: several client threads (one `Client` each: ZeroMQ sockets belong to one thread) run
`speak` jobs back to back and check every frame against the fake engine's reference
(`expected_frame`): exactly once, in order, pixel-exact.

Faults, drawn from a `random.Random(seed)` in shuffled rounds (every kind appears once per
round, so even a short run injects each kind):

  sigkill_worker   SIGKILL a READY/BUSY worker (mostly a busy one)
  sigstop_worker   SIGSTOP a worker, SIGCONT after 0.3..2 x heartbeat_timeout_s: the short
                   pauses must be survived in place, the long ones end in a replacement
  sigterm_worker   SIGTERM a worker
  ring_fill        a client that takes a long job's first frame and then stops consuming,
                   so its frame slots stay held and the worker's frame ring fills up
  slow_client      a client that sleeps between events for one job
  client_kill      a client in a separate (spawned) process, SIGKILLed while streaming

Live sessions: `live` more client threads each keep a live session open (a new one when
one ends), sending speech segments at realtime pace, interrupting some, closing after a
few seconds; every frame is checked against the fake engine's live reference (its index
continuous except for counted gaps, its pixels those of its index with the audio level of
the chunk sent with it) and every `playback_started` must get its `playback_finished`
unless the session failed. A worker fault under a session moves it (`session_moved`) or
ends it `worker_error` when no other worker has a free place.

Audit: the daemon must exit 0 on SIGTERM; every accepted job must end in `done` with all
its frames exactly once or in a failure with a reason (`jobs_lost` counts the others); no
segment of the daemon's pid in /dev/shm; no child of the daemon alive after it exited; no
zombie child while it ran; the supervisor's RSS flat within `RSS_GROWTH_BOUND_MB`.

`recovery_p99_s`: for each fault that hit a busy worker, the time from the injection until
every job that worker was running (`current_jobs` in the status) had delivered its next
event (a frame, its `done` or its `job_failed`) to its client; the 99th percentile over
those faults.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from avatard.daemon import PrivateDaemon
from avatard.engines.fake import audio_level, expected_frame, frame_audio_level_of
from avatard.ipc import segments
from avatard.ipc.client import (
    AudioEvent,
    BusyError,
    Client,
    ClientError,
    DoneEvent,
    FrameEvent,
    JobFailedError,
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
    SessionMovedEvent,
)
from avatard.ipc.procmem import rss_bytes
from avatard.ipc.ring import StaleSlotError

from .timing import percentile

FRAME = 48  # frames are FRAME x FRAME: small, so every pixel is checked cheaply
FRAME_MS = 3.0
HEARTBEAT_TIMEOUT_S = 2.0
# A slot a client holds longer than this is taken back by the daemon (`client_call_s`).
CLIENT_HOLD_S = 2.5
TIMEOUTS = {"hello_s": 30.0, "load_s": 30.0, "heartbeat_interval_s": 0.2,
            "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "stall_timeout_s": 2.0,
            "kill_grace_s": 1.0, "client_call_s": CLIENT_HOLD_S}
# Faults only target READY/BUSY workers, but a worker killed right after it became READY
# still counts nothing against loading; a high max_load_attempts keeps an unlucky run from
# marking a worker FAILED for good, which would only measure the schedule, not the daemon.
RESTART = {"backoff_initial_s": 0.1, "backoff_max_s": 1.0, "max_load_attempts": 20,
           "max_job_attempts": 3}
# 32 frame slots (the default is 8): a worker fills them in ~0.1 s, so ring_fill still
# fills a ring, as in the runs the chaos figures were first measured with.
RINGS = {"frame_slots": 32}
FAULT_KINDS = ("sigkill_worker", "sigstop_worker", "sigterm_worker", "ring_fill",
               "slow_client", "client_kill")
WORKER_FAULTS = FAULT_KINDS[:3]
# Allowed growth of the supervisor's RSS from the first sample (taken once a worker is
# READY) to the end of the run. The supervisor keeps bounded state only (deques of 50, a
# 64-slot queue, 64 avatars); what legitimately grows is Python's allocator arenas and the
# pages of shared-memory rings it touches, a few MiB. 32 MiB is far above that yet far
# below what a per-frame or per-job leak adds over thousands of jobs.
RSS_GROWTH_BOUND_MB = 32.0
FAKE_RATE = 16000  # the fake avatar engine's audio rate (its default)
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey").split()


def _text(rng: random.Random, sentences: tuple[int, int], words: tuple[int, int]) -> str:
    out = []
    for _ in range(rng.randint(*sentences)):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize()
                   + ".")
    return " ".join(out)


@dataclass
class JobRecord:
    """What one client saw of one accepted job."""

    job_id: str
    seed: int
    client: str
    frames: int = 0  # frames received with the expected index
    duplicated: int = 0  # frames whose index was already received
    skipped: int = 0  # indices jumped over (a later frame arrived first)
    corrupt: int = 0  # frames not pixel-equal to the reference
    outcome: str = ""  # "done" | "failed" | "lost"
    code: str = ""  # failure code, or what went wrong for a lost job
    done_frames: int | None = None
    attempts: int = 0
    stamps: list[float] = field(default_factory=list)  # monotonic time of each event


def consume(events: Any, record: JobRecord, pause_s: float = 0.0,
            hold: tuple[float, threading.Event] | None = None) -> None:
    """Run one job's events into `record`, checking every frame. `pause_s`: sleep after
    each event (a slow client). `hold`: after the first frame, stop consuming for that
    many seconds (holding every slot forwarded meanwhile), or until the event is set."""
    held = False
    try:
        for event in events:
            record.stamps.append(time.monotonic())
            if isinstance(event, FrameEvent):
                if event.index < record.frames:
                    record.duplicated += 1
                    continue
                if event.index > record.frames:
                    record.skipped += event.index - record.frames
                    record.frames = event.index
                if not np.array_equal(event.array, expected_frame(record.seed, event.index,
                                                                  FRAME, FRAME)):
                    record.corrupt += 1
                record.frames += 1
                if hold is not None and not held:
                    held = True
                    hold[1].wait(hold[0])
            elif isinstance(event, DoneEvent):
                record.outcome, record.done_frames = "done", event.frames
                record.attempts = event.attempts
            elif isinstance(event, AudioEvent):
                pass
            if pause_s:
                time.sleep(pause_s)
        if not record.outcome:
            record.outcome, record.code = "lost", "event stream ended without done"
    except JobFailedError as exc:
        record.stamps.append(time.monotonic())
        record.outcome, record.code = "failed", exc.code or "?"
    except StaleSlotError:
        # Only legitimate for a client that held its slots past client_call_s.
        record.stamps.append(time.monotonic())
        record.outcome, record.code = "failed", "stale_slot (client held slots too long)"
    except ClientError as exc:
        record.outcome, record.code = "lost", f"{type(exc).__name__}: {exc}"[:300]


@dataclass
class LiveRecord:
    """What one client saw of one live session."""

    job_id: str
    seed: int
    frames: int = 0  # frames received
    gaps: int = 0  # indices jumped over: frames dropped or lost in a move
    out_of_order: int = 0  # frames whose index was not above the last one
    corrupt: int = 0  # frames not pixel-equal to the reference, or not of their audio
    moves: int = 0
    started: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    outcome: str = ""  # "done" | "failed" | "lost"
    code: str = ""


class LiveChecker:
    """Checks a live session's events as they come (into a `LiveRecord`)."""

    def __init__(self, record: LiveRecord):
        self.record = record
        self.next_index = 0
        self.stream_start = 0  # a fake stream numbers its frames from 0 on each worker
        self.levels: dict[int, int] = {}

    def see(self, event: Any) -> None:
        rec = self.record
        if isinstance(event, FrameEvent):
            if event.index < self.next_index:
                rec.out_of_order += 1
                return
            rec.gaps += event.index - self.next_index
            self.next_index = event.index + 1
            rec.frames += 1
            try:
                level = frame_audio_level_of(event.array)
            except ValueError:
                rec.corrupt += 1
                return
            if not np.array_equal(event.array, expected_frame(
                    rec.seed, event.index - self.stream_start, FRAME, FRAME, level)):
                rec.corrupt += 1
            self.levels[event.index] = level
        elif isinstance(event, AudioEvent):
            level = self.levels.pop(event.index, None)
            sent = audio_level(np.asarray(event.pcm))
            # A frame made from speech may go out silent after a barge-in; never the
            # other way round, and never with another level.
            if level is not None and sent != level and sent != 0:
                rec.corrupt += 1
        elif isinstance(event, PlaybackStartedEvent):
            rec.started.add(event.segment_id)
        elif isinstance(event, PlaybackFinishedEvent):
            rec.finished.add(event.segment_id)
        elif isinstance(event, SessionMovedEvent):
            rec.moves += 1
            self.stream_start = event.resume_index
            self.next_index = event.resume_index
        elif isinstance(event, DoneEvent):
            rec.outcome = "done"


def _doomed_client(endpoint: str, seed: int, text: str, conn: Any) -> None:
    """Runs in a spawned process: stream a job slowly and report progress until killed."""
    with Client(endpoint, timeout_s=30.0, name="chaos-doomed") as client:
        events = client.speak(text, seed=seed)
        conn.send(("job", events.job_id))
        for event in events:
            if isinstance(event, FrameEvent):
                conn.send(("frame", event.index))
            time.sleep(0.01)
    conn.send(("end", 0))


class Chaos:
    def __init__(self, seconds: float, seed: int, workers: int, clients: int, workdir: Path,
                 jobs_per_worker: int = 1, live: int = 1):
        self.seconds = seconds
        self.seed = seed
        self.workers = workers
        self.jobs_per_worker = jobs_per_worker
        self.clients = clients
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.jobs: list[JobRecord] = []
        self.live = live
        self.live_records: list[LiveRecord] = []
        self.refused: Counter[str] = Counter()  # job requests not accepted (busy...)
        self.errors: list[str] = []  # unexpected exceptions in load threads
        self.faults: list[dict[str, Any]] = []
        self.timers: list[threading.Timer] = []
        self.side_threads: list[threading.Thread] = []
        self.doomed_jobs: dict[str, float] = {}  # job id of a killed client -> killed at
        self.doomed_seen: dict[str, float] = {}  # -> last time a worker still ran it
        self.rss: list[tuple[float, float]] = []
        self.children: dict[int, psutil.Process] = {}
        self.max_daemon_segments = 0
        self.t0 = time.monotonic()
        self.d = PrivateDaemon(workdir, {
            "daemon": {"workers": workers, "jobs_per_worker": jobs_per_worker,
                       "min_ready": 1, "devices": "cpu",
                       "queue_size": 64, "job_deadline_s": 120.0, "drain_timeout_s": 30.0,
                       "log_level": "info"},
            "timeouts": TIMEOUTS, "restart": RESTART, "rings": RINGS,
            "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
            "engines.options.fake": {"width": FRAME, "height": FRAME, "frame_ms": FRAME_MS},
        })

    # ------------------------------------------------------------- load

    def _record(self, record: JobRecord) -> None:
        with self.lock:
            self.jobs.append(record)

    def _submit(self, client: Client, text: str, seed: int, name: str
                ) -> tuple[JobRecord, Any] | None:
        """Ask for a job; the record and its event iterator, or None if refused (busy)."""
        try:
            events = client.speak(text, seed=seed)
        except BusyError as exc:
            with self.lock:
                self.refused["busy"] += 1
            time.sleep(min(exc.retry_after_s, 0.5))
            return None
        record = JobRecord(events.job_id, seed, name)
        record.stamps.append(time.monotonic())
        self._record(record)
        return record, events

    def _load_loop(self, n: int) -> None:
        rng = random.Random(self.seed * 1009 + n)
        client: Client | None = None
        name = f"load-{n}"
        try:
            while not self.stop.is_set():
                try:
                    if client is None:
                        client = Client(self.d.endpoint, timeout_s=30.0, name=name)
                    job = self._submit(client, _text(rng, (1, 4), (2, 6)),
                                       rng.randrange(1, 2**31), name)
                    if job is not None:
                        record, events = job
                        consume(events, record)
                        if record.outcome == "lost":  # the socket may be in a bad state
                            client.close()
                            client = None
                except ClientError as exc:
                    with self.lock:
                        self.refused[exc.code or type(exc).__name__] += 1
                    if client is not None:
                        client.close()
                        client = None
                    time.sleep(0.2)
        except Exception as exc:  # noqa: BLE001 - reported in the audit, never swallowed
            with self.lock:
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            if client is not None:
                client.close()

    def _live_loop(self, n: int) -> None:
        """Keep a live session open, renewed every few seconds, fed and checked."""
        rng = random.Random(self.seed * 2003 + n)
        name = f"live-{n}"
        try:
            with Client(self.d.endpoint, timeout_s=30.0, name=name) as client:
                while not self.stop.is_set():
                    seed = rng.randrange(1, 2**31)
                    try:
                        session = client.live(seed=seed)
                    except ClientError as exc:
                        with self.lock:
                            self.refused[f"live {exc.code or type(exc).__name__}"] += 1
                        time.sleep(0.5)
                        continue
                    record = LiveRecord(session.job_id, seed)
                    with self.lock:
                        self.live_records.append(record)
                    self._run_live(session, LiveChecker(record), rng)
        except Exception as exc:  # noqa: BLE001 - reported in the audit, never swallowed
            with self.lock:
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    def _run_live(self, session: Any, checker: LiveChecker, rng: random.Random) -> None:
        """Segments of 0.3-1 s at realtime pace (100 ms chunks), some interrupted, for
        2-6 s; then close and read to the end."""
        record = checker.record
        tone = np.full(FAKE_RATE // 10, 0.5, np.float32)  # 100 ms of speech, level 128
        end = time.monotonic() + rng.uniform(2.0, 6.0)
        segment = 0
        try:
            while time.monotonic() < end and not self.stop.is_set():
                segment += 1
                chunks = rng.randint(3, 10)
                for _ in range(chunks):
                    session.send_audio(tone, FAKE_RATE, f"s{segment}")
                    until = time.monotonic() + 0.1
                    while (left := until - time.monotonic()) > 0:
                        if session.poll(left):
                            checker.see(next(session))
                if rng.random() < 0.3:
                    session.interrupt()
                else:
                    session.end_segment(f"s{segment}")
                pause = time.monotonic() + rng.uniform(0.1, 0.6)
                while (left := pause - time.monotonic()) > 0:
                    if session.poll(left):
                        checker.see(next(session))
            session.close()
            for event in session:
                checker.see(event)
            if not record.outcome:
                record.outcome, record.code = "lost", "event stream ended without done"
        except JobFailedError as exc:
            record.outcome, record.code = "failed", exc.code or "?"
        except ClientError as exc:
            record.outcome, record.code = "lost", f"{type(exc).__name__}: {exc}"[:300]

    # ------------------------------------------------------------- client faults

    def _side(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=self._guard, args=(target, *args), daemon=True)
        thread.start()
        self.side_threads.append(thread)

    def _guard(self, target: Any, *args: Any) -> None:
        try:
            target(*args)
        except Exception as exc:  # noqa: BLE001 - reported in the audit
            with self.lock:
                self.errors.append(f"{target.__name__}: {type(exc).__name__}: {exc}")

    def _ring_fill(self, seed: int, hold_s: float) -> None:
        with Client(self.d.endpoint, timeout_s=30.0, name="ring-fill") as client:
            job = self._submit(client, _text(random.Random(seed), (6, 8), (4, 6)), seed,
                               "ring-fill")
            if job is not None:
                consume(job[1], job[0], hold=(hold_s, self.stop))

    def _slow_client(self, seed: int, pause_s: float) -> None:
        with Client(self.d.endpoint, timeout_s=30.0, name="slow") as client:
            job = self._submit(client, _text(random.Random(seed), (2, 3), (3, 5)), seed,
                               "slow")
            if job is not None:
                consume(job[1], job[0], pause_s=pause_s)

    def _client_kill(self, seed: int, after_frames: int, fault: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_doomed_client, args=(
            self.d.endpoint, seed, _text(random.Random(seed), (1, 2), (3, 5)), child),
            name="avatard-chaos-client")
        proc.start()
        child.close()
        job_id, frames = "", 0
        deadline = time.monotonic() + 60
        try:
            while frames < after_frames and time.monotonic() < deadline:
                if not parent.poll(0.5):
                    if not proc.is_alive():
                        break
                    continue
                what, value = parent.recv()
                if what == "job":
                    job_id = value
                elif what == "frame":
                    frames = value + 1
                else:
                    break
        except EOFError:
            pass
        finally:
            killed_at = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            parent.close()
        fault.update(job_id=job_id, client_frames=frames, at=killed_at)
        if job_id:
            with self.lock:
                self.doomed_jobs[job_id] = killed_at

    # ------------------------------------------------------------- worker faults

    def _victim(self, status: dict[str, Any]) -> dict[str, Any] | None:
        live = [w for w in status["workers"] if w["pid"] and w["state"] in ("ready", "busy")]
        busy = [w for w in live if w["current_jobs"]]
        pool = busy if busy and self.rng.random() < 0.85 else live
        if not pool:
            return None
        victim = self.rng.choice(pool)
        try:  # the pid must still be the daemon's child (not a reused pid)
            if psutil.Process(victim["pid"]).ppid() != self.d.proc.pid:
                return None
        except psutil.Error:
            return None
        return victim

    def _cont(self, pid: int, created: float) -> None:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if psutil.Process(pid).create_time() == created:
                os.kill(pid, signal.SIGCONT)

    def _worker_fault(self, kind: str, status: dict[str, Any]) -> dict[str, Any] | None:
        victim = self._victim(status)
        if victim is None:
            return None
        pid = victim["pid"]
        fault: dict[str, Any] = {"kind": kind, "worker": victim["id"], "pid": pid,
                                 "job_ids": list(victim["current_jobs"])}
        try:
            created = psutil.Process(pid).create_time()
            fault["at"] = time.monotonic()
            if kind == "sigkill_worker":
                os.kill(pid, signal.SIGKILL)
            elif kind == "sigterm_worker":
                os.kill(pid, signal.SIGTERM)
            else:
                # Half the pauses end before heartbeat_timeout_s (the worker must carry on
                # in place), half after (it must be replaced and its job moved).
                pause = HEARTBEAT_TIMEOUT_S * self.rng.uniform(0.15, 0.85) \
                    if self.rng.random() < 0.5 else HEARTBEAT_TIMEOUT_S * self.rng.uniform(1.2, 2)
                fault["pause_s"] = round(pause, 3)
                os.kill(pid, signal.SIGSTOP)
                timer = threading.Timer(pause, self._cont, (pid, created))
                timer.daemon = True
                timer.start()
                self.timers.append(timer)
        except (ProcessLookupError, psutil.Error):
            return None
        return fault

    def _inject(self, kind: str, status: dict[str, Any]) -> dict[str, Any] | None:
        if kind in WORKER_FAULTS:
            return self._worker_fault(kind, status)
        seed = self.rng.randrange(1, 2**31)
        fault: dict[str, Any] = {"kind": kind, "at": time.monotonic()}
        if kind == "ring_fill":
            # Mostly within client_call_s (back-pressure, then the job completes); sometimes
            # beyond it (the daemon takes the slots back and this client's descriptors go
            # stale: it gets the job's failure, `timeout`, even when the job had completed
            # meanwhile; the worker carries on).
            hold = CLIENT_HOLD_S * (self.rng.uniform(0.2, 0.8) if self.rng.random() < 0.8
                                    else self.rng.uniform(1.2, 1.6))
            fault["hold_s"] = round(hold, 3)
            self._side(self._ring_fill, seed, hold)
        elif kind == "slow_client":
            fault["pause_s"] = round(self.rng.uniform(0.01, 0.05), 3)
            self._side(self._slow_client, seed, fault["pause_s"])
        else:
            self._side(self._client_kill, seed, self.rng.randint(2, 40), fault)
        return fault

    # ------------------------------------------------------------- the run

    def _sample(self, ctl: Client) -> dict[str, Any]:
        now = time.monotonic()
        self.rss.append((now, rss_bytes(self.d.proc.pid) / 2**20))
        for child in psutil.Process(self.d.proc.pid).children(recursive=True):
            self.children.setdefault(child.pid, child)
        self.max_daemon_segments = max(self.max_daemon_segments, len(self.d.segments()))
        status = ctl.stats()
        running = {job for w in status["workers"] for job in w["current_jobs"]}
        with self.lock:
            for job_id in self.doomed_jobs:
                if job_id in running:
                    self.doomed_seen[job_id] = now
        return status

    def run(self) -> dict[str, Any]:
        d = self.d
        try:
            d.wait_for(lambda s: s["daemon"]["ready_workers"] == self.workers, 120,
                       "every worker READY")
            ctl = Client(d.endpoint, timeout_s=30.0, name="chaos-control")
            try:
                self._sample(ctl)
                loaders = [threading.Thread(target=self._load_loop, args=(n,), daemon=True)
                           for n in range(self.clients)]
                loaders += [threading.Thread(target=self._live_loop, args=(n,), daemon=True)
                            for n in range(self.live)]
                for thread in loaders:
                    thread.start()
                started = self.t0 = time.monotonic()
                end = started + self.seconds
                kinds: list[str] = []
                next_fault = started + 1.0
                while time.monotonic() < end:
                    status = self._sample(ctl)
                    if time.monotonic() >= next_fault:
                        if not kinds:
                            kinds = list(FAULT_KINDS)
                            self.rng.shuffle(kinds)
                        fault = self._inject(kinds[0], status)
                        if fault is not None:  # no target now: same kind next time
                            kinds.pop(0)
                            self.faults.append(fault)
                        next_fault = time.monotonic() + self.rng.uniform(0.4, 1.6)
                    time.sleep(0.2)
                load_s = time.monotonic() - started
                self.stop.set()
                for thread in loaders + self.side_threads:
                    thread.join(120)
                for timer in self.timers:  # resume anything still stopped, now
                    timer.cancel()
                    self._cont(*timer.args)
                # Let the daemon finish jobs of killed clients before the drain.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    status = self._sample(ctl)
                    if not status["queue"]["running"] and not status["queue"]["depth"]:
                        break
                    time.sleep(0.2)
                zombies = self._zombies()
                final_status = ctl.stats()
            finally:
                ctl.close()
        except BaseException:
            with contextlib.suppress(Exception):
                d.stop(signal.SIGKILL, timeout_s=10)
            raise
        exit_code = d.stop(signal.SIGTERM, timeout_s=60)
        return self._audit(load_s, exit_code, zombies, final_status)

    def _zombies(self) -> int:
        # A zombie is a child the supervisor has not reaped; give its tick a moment.
        def now_zombies() -> set[int]:
            found = set()
            for child in psutil.Process(self.d.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.status() == psutil.STATUS_ZOMBIE:
                        found.add(child.pid)
            return found

        first = now_zombies()
        if not first:
            return 0
        time.sleep(2.0)
        return len(first & now_zombies())

    def _audit(self, load_s: float, exit_code: int, zombies: int,
               final_status: dict[str, Any]) -> dict[str, Any]:
        leaked = self.d.segments()
        for name in leaked:  # report, then clean up so one run does not poison the next
            segments.unlink_segment(name)
        _, alive = psutil.wait_procs(list(self.children.values()), timeout=5)
        orphans = []
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    orphans.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
                proc.kill()
        live = self.live_records
        live_unfinished = sum(len(r.started - r.finished) for r in live
                              if r.outcome == "done")
        jobs = self.jobs
        done = [j for j in jobs if j.outcome == "done"]
        failed = [j for j in jobs if j.outcome == "failed"]
        lost = [j for j in jobs if j.outcome not in ("done", "failed")]
        missing = sum(max(0, (j.done_frames or 0) - j.frames) + j.skipped for j in done)
        by_kind = Counter(f["kind"] for f in self.faults)
        recovery: dict[str, list[float]] = {}
        stamps = {j.job_id: j.stamps for j in jobs}
        for fault in self.faults:
            if fault["kind"] not in WORKER_FAULTS:
                continue
            # Each job the worker ran recovers at its next event; the fault, at the last.
            next_events = [next((t for t in stamps.get(job_id, ()) if t > fault["at"]), None)
                           for job_id in fault["job_ids"]]
            seen = [t for t in next_events if t is not None]
            if seen:
                recovery.setdefault(fault["kind"], []).append(max(seen) - fault["at"])
        every = sorted(s for values in recovery.values() for s in values)
        rss = [mb for _, mb in self.rss]
        doomed_ran_on = [self.doomed_seen.get(j, k) - k for j, k in self.doomed_jobs.items()]
        report = {
            "seconds": round(load_s, 1), "seed": self.seed, "workers": self.workers,
            "jobs_per_worker": self.jobs_per_worker,
            "load_clients": self.clients, "frame": f"{FRAME}x{FRAME}", "frame_ms": FRAME_MS,
            "timeouts": TIMEOUTS, "restart": RESTART, "rings": RINGS,
            "jobs_accepted": len(jobs),
            "jobs_completed": len(done),
            "jobs_failed": len(failed),
            "jobs_failed_by_code": dict(Counter(j.code for j in failed)),
            "jobs_lost": len(lost),
            "jobs_lost_detail": [f"{j.job_id} ({j.client}): {j.code}" for j in lost][:20],
            "jobs_refused": dict(self.refused),
            # Each fault with `t_s`, seconds from the start of the load to the injection.
            "faults": [{**{k: v for k, v in f.items() if k != "at"},
                        "t_s": round(f["at"] - self.t0, 3)} for f in self.faults][:300],
            "frames_delivered": sum(j.frames for j in jobs),
            "frames_duplicated": sum(j.duplicated for j in jobs),
            "frames_missing": missing,
            "frames_corrupt": sum(j.corrupt for j in jobs),
            "jobs_moved_to_another_worker": sum(j.attempts > 1 for j in done),
            "faults_injected": len(self.faults),
            "faults_by_kind": {k: by_kind.get(k, 0) for k in FAULT_KINDS},
            "worker_faults_on_busy_worker": sum(bool(f["job_ids"]) for f in self.faults
                                                if f["kind"] in WORKER_FAULTS),
            "recovery_samples": len(every),
            "recovery_p50_s": percentile(every, 50, 3),
            "recovery_p99_s": percentile(every, 99, 3),
            "recovery_max_s": round(every[-1], 3) if every else None,
            "recovery_p99_by_kind_s": {k: percentile(v, 99, 3) for k, v in recovery.items()},
            "live_sessions": len(live),
            "live_done": sum(r.outcome == "done" for r in live),
            "live_failed_by_code": dict(Counter(r.code for r in live if r.outcome == "failed")),
            "live_lost": sum(r.outcome not in ("done", "failed") for r in live),
            "live_lost_detail": [f"{r.job_id}: {r.code}" for r in live
                                 if r.outcome not in ("done", "failed")][:20],
            "live_frames": sum(r.frames for r in live),
            "live_gaps": sum(r.gaps for r in live),
            "live_moves": sum(r.moves for r in live),
            "live_out_of_order": sum(r.out_of_order for r in live),
            "live_corrupt": sum(r.corrupt for r in live),
            "live_unfinished_segments": live_unfinished,
            "killed_client_jobs": len(self.doomed_jobs),
            "killed_client_job_ran_on_max_s": (round(max(doomed_ran_on), 2) if doomed_ran_on
                                               else None),
            "daemon_exit_code": exit_code,
            "daemon_segments_max_during_run": self.max_daemon_segments,
            "daemon_sessions_at_end": final_status["daemon"]["sessions"],
            "segments_leaked": len(leaked),
            "orphan_processes": len(orphans),
            "orphan_detail": orphans,
            "zombie_processes": zombies,
            "supervisor_rss_mb": {"start": _r(rss[0]), "max": _r(max(rss)), "end": _r(rss[-1]),
                                  "bound_growth_mb": RSS_GROWTH_BOUND_MB} if rss else {},
            "worker_restarts": sum(w["restarts"] for w in final_status["workers"]),
            "daemon_jobs": final_status["jobs"],
            "daemon_registrations": final_status["registrations"],
            "load_thread_errors": self.errors,
        }
        report["rss_flat"] = bool(rss) and rss[-1] - rss[0] <= RSS_GROWTH_BOUND_MB
        report["passed"] = (report["jobs_lost"] == 0 and report["frames_duplicated"] == 0
                            and report["frames_missing"] == 0 and report["frames_corrupt"] == 0
                            and report["segments_leaked"] == 0 and exit_code == 0
                            and report["orphan_processes"] == 0 and zombies == 0
                            and report["rss_flat"] and not self.errors
                            and report["live_lost"] == 0 and report["live_corrupt"] == 0
                            and report["live_out_of_order"] == 0
                            and report["live_unfinished_segments"] == 0)
        return report


def _r(value: float) -> float:
    return round(value, 1)


def run_chaos(seconds: float, seed: int, workers: int = 3, clients: int = 3,
              workdir: Path | None = None, jobs_per_worker: int = 1, live: int = 1
              ) -> dict[str, Any]:
    """Run the chaos scenario for `seconds` of load and return the audit (see the module
    docstring). `live`: live-session client threads beside the `clients` speak loaders.
    `workdir` keeps the daemon's config and log (a temporary folder if None)."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return Chaos(seconds, seed, workers, clients, workdir, jobs_per_worker, live).run()
    with tempfile.TemporaryDirectory(prefix="avatard-chaos-") as tmp:
        return Chaos(seconds, seed, workers, clients, Path(tmp), jobs_per_worker,
                     live).run()


def format_chaos(report: dict[str, Any]) -> str:
    rss = report["supervisor_rss_mb"]
    kinds = ", ".join(f"{k} {n}" for k, n in report["faults_by_kind"].items())
    failed = ", ".join(f"{k} {n}" for k, n in report["jobs_failed_by_code"].items()) or "-"
    lines = [
        f"chaos: {report['seconds']} s of load, seed {report['seed']}, {report['workers']} "
        f"workers x {report.get('jobs_per_worker', 1)} jobs, {report['load_clients']} load "
        f"clients, {report['frame']} frames at {report['frame_ms']} ms",
        f"jobs: {report['jobs_accepted']} accepted, {report['jobs_completed']} completed, "
        f"{report['jobs_failed']} failed ({failed}), {report['jobs_lost']} lost; "
        f"{report['jobs_moved_to_another_worker']} completed on another worker",
        f"frames: {report['frames_delivered']} delivered, {report['frames_duplicated']} "
        f"duplicated, {report['frames_missing']} missing, {report['frames_corrupt']} corrupt",
        f"faults: {report['faults_injected']} ({kinds})",
        f"recovery (fault on a busy worker -> that job's next event): p50 "
        f"{report['recovery_p50_s']} s, p99 {report['recovery_p99_s']} s, max "
        f"{report['recovery_max_s']} s over {report['recovery_samples']} faults",
        f"live sessions: {report['live_sessions']} ({report['live_done']} done, failed "
        f"{report['live_failed_by_code'] or '-'}, {report['live_lost']} lost), "
        f"{report['live_frames']} frames checked, {report['live_gaps']} gaps, "
        f"{report['live_moves']} moves, {report['live_out_of_order']} out of order, "
        f"{report['live_corrupt']} corrupt, {report['live_unfinished_segments']} segments "
        "started and never finished",
        f"killed clients: {report['killed_client_jobs']} jobs; longest one ran on "
        f"{report['killed_client_job_ran_on_max_s']} s after its client died",
        f"after SIGTERM: exit {report['daemon_exit_code']}, segments leaked "
        f"{report['segments_leaked']}, orphan processes {report['orphan_processes']}, "
        f"zombies {report['zombie_processes']}",
        f"supervisor RSS: start {rss.get('start')} MiB, max {rss.get('max')} MiB, end "
        f"{rss.get('end')} MiB (bound: +{rss.get('bound_growth_mb')} MiB) -> "
        f"{'flat' if report['rss_flat'] else 'GREW'}",
        "PASSED" if report["passed"] else "FAILED",
    ]
    if report["jobs_lost_detail"]:
        lines.insert(-1, "lost: " + "; ".join(report["jobs_lost_detail"]))
    if report["load_thread_errors"]:
        lines.insert(-1, "errors: " + "; ".join(report["load_thread_errors"][:10]))
    return "\n".join(lines)
