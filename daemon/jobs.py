"""Jobs and the bounded job queue: pure bookkeeping, no sockets, no processes.

A job is accepted into a bounded queue (a full queue answers `busy`; the queue never grows
without bound), runs on one worker at a time, and ends exactly once: done, failed (with a
reason), cancelled or timed out. If its worker dies, the job goes back to the front of the
queue with its delivery counters intact, so the next attempt resumes after the last frame
the client already received and every frame arrives exactly once, in order.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from avatard.ipc import protocol as P


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(eq=False)
class Job:
    """One accepted request, from acceptance to its one end. `spec` is the typed request
    (built once at acceptance, sent to the worker as is); the rest is the book's record:
    placement, progress and the delivery counters that make a rerun resume exactly where
    the client is. Times are `time.monotonic()` seconds."""

    job_id: str
    spec: P.AnyJobSpec
    client: bytes  # ROUTER identity of the client that owns the job
    req_id: int
    seed: int
    deadline: float
    accepted_at: float = field(default_factory=time.monotonic)
    state: JobState = JobState.QUEUED
    attempts: int = 0
    worker: int | None = None  # where it runs (or awaits the cancel's acknowledgement)
    lane: int = 0  # which of its session's ring pairs on that worker it writes
    progress: int = 0  # frames the worker says it has produced (this attempt)
    progress_at: float = 0.0  # when progress last grew (stall detection)
    waiting_on_ring: bool = False  # blocked on a full ring: back-pressure, not a stall
    waiting_since: float = 0.0  # when the heartbeats first said so (for parking)
    parks: int = 0  # times it gave its worker up to other clients' jobs (`JobBook.park`)
    frames_delivered: int = 0  # next frame index the client expects
    audio_delivered: int = 0  # next audio chunk index the client expects
    started_at: float = 0.0
    first_frame_at: float = 0.0
    last_error: str = ""
    input_slot: tuple[str, int, int] | None = None  # (ring, slot, seq) to release at the end
    # Live sessions: `last_frame_at` when frame frames_delivered - 1 went out; frames and
    # audio samples sent and frames dropped (index gaps) on the worker running it now
    # (`*_forwarded`, `dropped_gaps`) and on workers that were lost since (`*_earlier`):
    # a lost worker's own counts went with it; frame indices the moves skipped
    # (`frames_lost`); `moved` from the loss until it is placed again.
    last_frame_at: float = 0.0
    frames_forwarded: int = 0
    frames_earlier: int = 0
    audio_forwarded: int = 0
    audio_earlier: int = 0
    dropped_gaps: int = 0
    dropped_earlier: int = 0
    frames_lost: int = 0
    moved: bool = False
    # Live sessions: frames dropped and sent late on the worker running it now, as its last
    # heartbeat said (dropped frames show as index gaps only once a later frame goes
    # out), and late frames on workers that were lost since.
    dropped_reported: int = 0
    late_reported: int = 0
    late_earlier: int = 0

    @property
    def frames_dropped_now(self) -> int:
        """Live sessions: frames dropped so far, over every worker it ran on."""
        return self.dropped_earlier + max(self.dropped_gaps, self.dropped_reported)

    @property
    def late_frames_now(self) -> int:
        """Live sessions: frames sent late so far (by the heartbeats of the worker running
        it now), over every worker it ran on."""
        return self.late_earlier + self.late_reported
    # Live sessions: speech queued on the worker at its last heartbeat; client audio the
    # worker had taken by then, and all the supervisor has sent it (their difference is
    # on its way).
    queued_s: float = 0.0
    received_s: float = 0.0
    sent_s: float = 0.0
    # Warnings forwarded to the client (code, message): a rerun after a worker loss
    # notices them again, and the client hears each once.
    warnings_sent: set[tuple[str, str]] = field(default_factory=set)

    @property
    def kind(self) -> P.JobKind:
        return self.spec.job_kind

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED)


_job_counter = itertools.count(1)


def new_job_id() -> str:
    """A daemon-unique job id: a counter (readable in logs) plus 32 random bits."""
    return f"j{next(_job_counter)}-{secrets.token_hex(4)}"


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after_s: float):
        super().__init__(f"job queue full ({depth} waiting)")
        self.depth = depth
        self.retry_after_s = retry_after_s


class JobQueue:
    """FIFO of queued jobs with a hard size limit; requeued jobs go to the front."""

    def __init__(self, size: int):
        self.size = size
        self._queue: deque[Job] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self):
        return iter(list(self._queue))

    def push(self, job: Job, recent_job_s: float) -> int:
        """Queue a new job; returns its position. Raises QueueFull with a retry hint (how
        long until a place is likely free, from recent job durations)."""
        if len(self._queue) >= self.size:
            raise QueueFull(len(self._queue), max(0.1, recent_job_s))
        self._queue.append(job)
        return len(self._queue) - 1

    def push_front(self, job: Job) -> None:
        """Requeue a job whose worker died: it keeps its place ahead of newer jobs, behind
        live sessions that are moving (`Job.moved`: they were counted against free places
        and go first). May exceed `size` by the jobs the workers were running (workers x
        jobs_per_worker), never more."""
        at = 0
        if not job.moved:
            while at < len(self._queue) and self._queue[at].moved:
                at += 1
        self._queue.insert(at, job)

    def push_back(self, job: Job) -> None:
        """Queue a parked job (`JobBook.park`) behind every waiting job: it gave its place
        up for them. May exceed `size` as `push_front` does, by the jobs the workers were
        running, never more."""
        self._queue.append(job)

    def pop(self) -> Job | None:
        return self._queue.popleft() if self._queue else None

    def remove(self, job: Job) -> bool:
        try:
            self._queue.remove(job)
            return True
        except ValueError:
            return False

    def drain(self) -> list[Job]:
        jobs = list(self._queue)
        self._queue.clear()
        return jobs
