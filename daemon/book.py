"""The job book: every accepted job from acceptance to its one end. Pure policy.

It owns the bounded queue, the placement of jobs on workers (which worker, which lane),
per-job progress, deadlines, the exactly-once delivery counters and the requeue policy. It
never touches a socket, a ring or a process: the coordinator (daemon/supervisor.py) feeds
it worker reports and the clock, and acts on what it returns:

- `Ended(job, ...)`: the job ended (done, failed, cancelled, timed out); answer its client
  and release its input. `cancel_on` names the worker still running it, which must be told
  to stop (the job keeps its place there until the worker acknowledges).
- `Requeued(job, reason)`: back at the front of the queue; it resumes after the last frame
  its client has. A live session lost with its worker is `Requeued` only when another
  worker has room for it now (it moves and goes on from idle, its clock's frames in the
  gap lost: `resume_live` at its placement says how many).
- `StopWorker(index, reason)`: a worker holds a stalled job, or never acknowledged a
  cancel; only replacing the process frees it (a thread cannot be killed).
- `Parked(job, index, reason)`: a batch job whose client has read nothing for
  `park_after_s` while other clients' jobs wait for a place gave its worker up: the
  worker must be told to stop it (`CancelJob`); it waits at the back of the queue and
  resumes, exactly once as after a requeue, where its client is. Its place on the worker
  stays taken until the worker acknowledges (no second thread of it runs there).

Per-kind policy lives in `POLICIES`, so a new job kind adds one entry here.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass

from avatard.ipc import protocol as P

from .jobs import Job, JobQueue, JobState

log = logging.getLogger("avatard.supervisor")

RETRYABLE = frozenset({P.E_WORKER})  # failure codes that a rerun may fix


@dataclass(frozen=True, slots=True)
class KindPolicy:
    """How the daemon treats one job kind.

    `announced`: the client gets `accepted` {job_id} at once and `done`/`job_failed` at the
    end; otherwise the job answers its request directly at the end (registration: the
    reply is `avatar_registered` or `error`). `uses_session_rings`: its frames and audio go
    to rings of the client's own session (local clients). `registration`: its ends are
    counted in `JobBook.registrations`, not in the job counters: a portrait refused for bad
    input (no face, too small) is the client's error, not a render job that failed.
    `exactly_once`: every frame and audio chunk reaches the client once, in order, also
    across a requeue; otherwise (realtime) a frame is forwarded when it is newer than the
    last one, and the gaps are frames the worker dropped because the client did not read.
    `deadline`: the job ends `timeout` past its deadline (a live session runs until it is
    closed). `requeue`: a job whose worker dies or faults runs again elsewhere; otherwise
    it ends `worker_error`. `move_now`: only a lost worker requeues it, and only when
    another worker has a free place now (a live session cannot wait for a worker to load:
    its client watches the clock)."""

    announced: bool = True
    uses_session_rings: bool = False
    registration: bool = False
    exactly_once: bool = True
    deadline: bool = True
    requeue: bool = True
    move_now: bool = False


POLICIES: dict[P.JobKind, KindPolicy] = {
    P.JobKind.SPEAK: KindPolicy(uses_session_rings=True),
    P.JobKind.LIPSYNC: KindPolicy(uses_session_rings=True),
    P.JobKind.TRANSCRIBE: KindPolicy(),
    P.JobKind.REGISTER: KindPolicy(announced=False, registration=True),
    P.JobKind.LIVE: KindPolicy(uses_session_rings=True, exactly_once=False, deadline=False,
                               move_now=True),
}


@dataclass(frozen=True, slots=True)
class Ended:
    """A job's one end. `code` is "" when it succeeded (then `result` is the worker's
    WJobDone); else an error code with `message` and, for bad input, `field`/`rule`."""

    job: Job
    code: str = ""
    message: str = ""
    field: str = ""
    rule: str = ""
    result: P.WJobDone | None = None
    cancel_on: int | None = None


@dataclass(frozen=True, slots=True)
class Requeued:
    job: Job
    reason: str


@dataclass(frozen=True, slots=True)
class StopWorker:
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Parked:
    job: Job
    index: int  # the worker to tell to stop it
    reason: str


Outcome = Ended | Requeued | StopWorker | Parked


class JobBook:
    """Jobs by id, the queue, and the jobs placed on each worker."""

    def __init__(self, queue_size: int, max_job_attempts: int, stall_timeout_s: float,
                 park_after_s: float = float("inf")):
        self.queue = JobQueue(queue_size)
        self.max_job_attempts = max_job_attempts
        self.stall_timeout_s = stall_timeout_s
        self.park_after_s = park_after_s  # timeouts.park_unread_s
        # Parked jobs whose worker has not acknowledged the stop yet: index -> job id ->
        # (job, since). They hold their place there (`load`) and are not placed on that
        # worker again until then, so a late message of the old run cannot be taken for
        # the new one's.
        self.parking: dict[int, dict[str, tuple[Job, float]]] = {}
        self.jobs: dict[str, Job] = {}  # live jobs (not ended), by id
        # Jobs placed on each worker, in dispatch order; an ended job stays until the
        # worker lets go of it (done/failed message, or the worker is lost).
        self.placed: dict[int, dict[str, Job]] = {}
        # Ends of speak, lipsync and transcribe jobs; registrations have their own counts:
        # registered; refused (the engine refused the portrait: bad_input); failed (any
        # other end: worker lost too often, deadline, drain, client gone); requeued.
        self.stats = {"jobs_done": 0, "jobs_failed": 0, "jobs_cancelled": 0,
                      "frames_delivered": 0, "jobs_requeued": 0,
                      # Summed over live sessions at their end (the `done` figures).
                      "live_frames_dropped": 0, "live_late_frames": 0}
        self.registrations = {"registered": 0, "refused": 0, "failed": 0, "requeued": 0}
        self.recent_rtf: deque[float] = deque(maxlen=50)
        self.recent_job_s: deque[float] = deque(maxlen=50)
        self.queue_closed = False  # draining: nothing new is queued or requeued
        # Jobs cancelled while running, awaiting their worker's answer: since when (the
        # first tick that saw them ended), so the worker has stall_timeout_s from there.
        self.cancel_seen: dict[str, float] = {}

    # ------------------------------------------------------------ queries

    def of_client(self, client: bytes) -> list[Job]:
        return [job for job in self.jobs.values() if job.client == client]

    def on_worker(self, index: int) -> list[Job]:
        """Every job placed on worker `index`, ended ones awaiting acknowledgement too."""
        return list(self.placed.get(index, {}).values())

    def load(self, index: int) -> int:
        return len(self.placed.get(index, {})) + len(self.parking.get(index, {}))

    def running_count(self) -> int:
        return sum(len(jobs) for jobs in self.placed.values())

    # ------------------------------------------------------------ accept and place

    def accept(self, job: Job) -> int:
        """Queue a new job; returns its queue position. Raises `QueueFull` (the caller
        releases what the job held and answers `busy`)."""
        # The retry hint: how long until a place is likely free (median recent job time).
        hint_s = statistics.median(self.recent_job_s) if self.recent_job_s else 1.0
        position = self.queue.push(job, hint_s)
        self.jobs[job.job_id] = job
        return position

    def place(self, capacities: dict[int, int], now: float) -> list[Job]:
        """Hand queued jobs to up workers (`capacities`: index -> places): each to the one
        with the fewest jobs that has room (ties: lowest index). Returns the placed jobs,
        each with `worker`, `lane` and `attempts` set, in order."""
        placed = []
        while len(self.queue):
            free = [i for i, cap in capacities.items() if self.load(i) < cap]
            if not free:
                break
            head = next(iter(self.queue))
            # Not where its parked run has not stopped yet; the queue keeps its order.
            free = [i for i in free if head.job_id not in self.parking.get(i, {})]
            if not free:
                break
            index = min(free, key=lambda i: (self.load(i), i))
            job = self.queue.pop()
            if job is None:
                break
            on_worker = self.placed.setdefault(index, {})
            # Lanes only keep one session's concurrent jobs apart (rings are per session),
            # so a client with one job at a time always writes the same ring pair.
            lanes = {j.lane for j in on_worker.values() if j.client == job.client}
            job.lane = next(k for k in range(capacities[index]) if k not in lanes)
            job.state = JobState.RUNNING
            job.attempts += 1
            job.worker = index
            job.started_at = job.started_at or now
            job.progress, job.progress_at, job.waiting_on_ring = 0, now, False
            on_worker[job.job_id] = job
            placed.append(job)
        return placed

    # ------------------------------------------------------------ worker reports

    def _placed_job(self, index: int, job_id: str) -> Job | None:
        return self.placed.get(index, {}).get(job_id)

    def progress(self, index: int, reports: list[P.JobProgress], now: float) -> None:
        """A heartbeat's per-job frame counts and back-pressure flags."""
        for report in reports:
            job = self._placed_job(index, report.job_id)
            if job is None:
                continue  # ended here already, or not started there yet
            if job.waiting_on_ring and not report.waiting:
                # A wait (a full ring, a streamed input still arriving) that ended is
                # where the stall clock starts again: the work after it (a transcription's
                # first piece) has the whole stall_timeout_s, however long the wait was.
                job.progress_at = now
            if report.waiting and not job.waiting_on_ring:
                job.waiting_since = now
            job.waiting_on_ring = report.waiting
            job.queued_s, job.received_s = report.queued_s, report.received_s
            job.dropped_reported, job.late_reported = report.frames_dropped, report.late_frames
            if report.progress != job.progress:
                job.progress, job.progress_at = report.progress, now

    def delivered(self, index: int, msg: P.WFrame | P.WAudio, now: float) -> Job | None:
        """A frame or audio chunk the worker wrote. Returns the job when it is the next one
        its client expects (counted as delivered: forward it); None when it must be dropped
        (its slot released): an ended job, or one an earlier attempt delivered."""
        job = self._placed_job(index, msg.job_id)
        if job is None or job.finished:
            return None
        if not POLICIES[job.kind].exactly_once:
            return self._delivered_realtime(job, msg, now)
        if isinstance(msg, P.WAudio):
            if msg.index != job.audio_delivered:
                return None
            job.audio_delivered += 1
            return job
        job.progress, job.progress_at = max(job.progress, msg.index + 1), now
        if msg.index != job.frames_delivered:
            # Below: already delivered by an earlier attempt. Above: cannot happen
            # (workers send in order); never forward out of order.
            return None
        job.frames_delivered += 1
        self.stats["frames_delivered"] += 1
        if not job.first_frame_at:
            job.first_frame_at = now
        return job

    def _delivered_realtime(self, job: Job, msg: P.WFrame | P.WAudio, now: float
                            ) -> Job | None:
        """A live session's frame or audio chunk: forwarded when newer than the last one
        (the indices the worker skipped are frames it dropped for a client that did not
        read them; never forward one out of order)."""
        if isinstance(msg, P.WAudio):
            if msg.index < job.audio_delivered:
                return None
            job.audio_delivered = msg.index + 1
            job.audio_forwarded += msg.data.shape[0] if msg.data.shape else 0
            return job
        job.progress, job.progress_at = max(job.progress, msg.index + 1), now
        if msg.index < job.frames_delivered:
            return None
        job.dropped_gaps += msg.index - job.frames_delivered
        job.frames_delivered = msg.index + 1
        job.frames_forwarded += 1
        job.last_frame_at = now
        self.stats["frames_delivered"] += 1
        if not job.first_frame_at:
            job.first_frame_at = now
        return job

    def live(self, index: int, job_id: str) -> Job | None:
        """The job if it is placed on `index` and still running (for other results)."""
        job = self._placed_job(index, job_id)
        return None if job is None or job.finished else job

    def _let_go(self, index: int, job_id: str) -> Job | None:
        """The worker reported a job's end: free its place. Returns the job if it is still
        live here; None when unknown, ended here already (a cancel it acknowledged) or
        parked (the end of the run it gave up)."""
        if self.parking.get(index, {}).pop(job_id, None) is not None:
            return None
        job = self.placed.get(index, {}).pop(job_id, None)
        return None if job is None or job.finished else job

    def done(self, index: int, msg: P.WJobDone, now: float) -> Ended | None:
        """The worker finished a job. None when it was ended here already (the message only
        frees the job's place)."""
        job = self._let_go(index, msg.job_id)
        if job is None:
            return None
        wall = now - job.accepted_at
        if msg.media_s > 0:
            self.recent_rtf.append(wall / msg.media_s)
        self.recent_job_s.append(now - job.started_at)
        # The session's totals (a moved one's include the workers it lost).
        self.stats["live_frames_dropped"] += job.dropped_earlier + msg.frames_dropped
        self.stats["live_late_frames"] += job.late_earlier + msg.late_frames
        return self._end(job, JobState.DONE, Ended(job, result=msg))

    def failed(self, index: int, msg: P.WJobFailed) -> Ended | Requeued | None:
        """The worker gave up a job: a retryable fault is requeued while attempts are left
        (and the daemon is not draining); anything else ends it."""
        job = self._let_go(index, msg.job_id)
        if job is None:
            return None
        policy = POLICIES[job.kind]
        if msg.code in RETRYABLE and job.attempts < self.max_job_attempts \
                and policy.requeue and not policy.move_now and not self.queue_closed:
            return self._requeue([job], msg.message)[0]
        return self._end(job, JobState.FAILED, Ended(job, msg.code, msg.message, msg.field,
                                                     msg.rule))

    def worker_lost(self, index: int, reason: str, capacities: dict[int, int] | None = None
                    ) -> list[Ended | Requeued]:
        """Every job of a worker that died or is being stopped: requeue (ahead of newer
        jobs, in their old order) or fail each on its own attempt count. Each keeps its
        delivery counters, so its next run resumes where its client is. A live session
        (`move_now`) is requeued only while the other up workers (`capacities`: index ->
        places, as for `place`) have a free place for it; else it ends `worker_error`."""
        lost = list(self.placed.pop(index, {}).values())
        self.parking.pop(index, None)  # already queued: nothing of them ran on it
        room = sum(max(0, cap - self.load(i)) for i, cap in (capacities or {}).items()
                   if i != index) - sum(1 for job in self.queue if job.moved)
        outcomes: list[Ended | Requeued] = []
        requeue = []
        for job in lost:
            if job.finished:
                continue  # cancelled or timed out, was waiting for an acknowledgement
            job.worker = None
            job.last_error = reason
            policy = POLICIES[job.kind]
            if not policy.requeue:
                outcomes.append(self._end(job, JobState.FAILED, Ended(
                    job, P.E_WORKER, f"the worker running this job was lost ({reason}); a "
                    f"{job.kind.value} job is not moved to another worker: open a new one")))
            elif policy.move_now and (room <= 0 or self.queue_closed
                                      or job.attempts >= self.max_job_attempts):
                why = ("the daemon is draining" if self.queue_closed else
                       f"it ran on {job.attempts} workers that were lost (max_job_attempts)"
                       if job.attempts >= self.max_job_attempts else
                       "no other worker had a free place to take it over")
                outcomes.append(self._end(job, JobState.FAILED, Ended(
                    job, P.E_DRAINING if self.queue_closed else P.E_WORKER,
                    f"the worker running this live session was lost ({reason}) and {why}; "
                    "open a new session")))
            elif policy.move_now:
                room -= 1
                job.moved = True
                job.frames_earlier += job.frames_forwarded
                job.frames_forwarded = 0
                job.audio_earlier += job.audio_forwarded
                job.audio_forwarded = 0
                # The lost worker's own counts went with it: what its heartbeats said.
                job.dropped_earlier = job.frames_dropped_now
                job.dropped_gaps = job.dropped_reported = 0
                job.late_earlier = job.late_frames_now
                job.late_reported = 0
                job.queued_s = job.received_s = job.sent_s = 0.0  # its speech was lost
                requeue.append(job)
            elif job.attempts >= self.max_job_attempts:
                outcomes.append(self._end(job, JobState.FAILED, Ended(
                    job, P.E_WORKER, f"worker died {job.attempts} times running this job; "
                    f"last: {reason}")))
            elif self.queue_closed:
                outcomes.append(self._end(job, JobState.FAILED, Ended(
                    job, P.E_DRAINING, f"worker lost during drain: {reason}")))
            else:
                requeue.append(job)
        # Moved live sessions first: the free places they were counted against are theirs.
        requeue.sort(key=lambda job: not job.moved)
        return outcomes + self._requeue(requeue, reason)

    def _requeue(self, jobs: list[Job], reason: str) -> list[Requeued]:
        for job in reversed(jobs):  # push_front: the first one ends up first
            job.state = JobState.QUEUED
            job.worker = None
            job.last_error = reason
            if POLICIES[job.kind].registration:
                self.registrations["requeued"] += 1
            else:
                self.stats["jobs_requeued"] += 1
            self.queue.push_front(job)
            log.info("job %s requeued after %d frames delivered (%s)", job.job_id,
                     job.frames_delivered, reason)
        return [Requeued(job, reason) for job in jobs]

    def resume_live(self, job: Job, fps: int, now: float) -> int | None:
        """A moved live session is placed again: its first frame there is the frame its
        clock is at now (frames_delivered, plus a frame per 1 / fps since the last frame
        went out, at `fps`), so the client's timeline runs on; the frames between are lost
        (added to `frames_lost`). Returns the count lost by this move (None for a job that
        did not move). Its delivery counters jump to the resume index."""
        if not job.moved:
            return None
        job.moved = False
        elapsed = round((now - job.last_frame_at) * fps) if job.last_frame_at and fps else 0
        lost = max(0, elapsed - 1) if job.frames_delivered else 0
        job.frames_delivered += lost
        job.audio_delivered = job.frames_delivered
        job.frames_lost += lost
        return lost

    # ------------------------------------------------------------ ending

    def cancel(self, job: Job, code: str, message: str) -> Ended | None:
        """End a live job from this side (client cancel, bye, deadline, drain). A running
        job keeps its place until its worker acknowledges (`cancel_on` says which worker to
        tell). None when it had ended already."""
        if job.finished:
            return None
        self.queue.remove(job)
        running_on = job.worker if (job.worker is not None and
                                    self._placed_job(job.worker, job.job_id) is job) else None
        return self._end(job, JobState.FAILED, Ended(job, code, message, cancel_on=running_on))

    def close_waiting(self, job: Job, fps: int) -> Ended | None:
        """A live session its client closed while it waits for a worker (queued, or moving
        after its worker was lost): out of the queue and ended now, as done, with what it
        sent before (nothing for one never placed; `fps`: the session's frame rate, for its
        length), instead of running once a worker frees up only to close at once. None
        when it runs on a worker or has ended."""
        if job.finished or job.worker is not None:
            return None
        self.queue.remove(job)
        done = P.make(P.WJobDone, job_id=job.job_id, frames=0,
                      media_s=job.frames_delivered / fps if fps else 0.0)
        return self._end(job, JobState.DONE, Ended(job, result=done))

    def unplace(self, job: Job, code: str, message: str) -> Ended:
        """End a job just placed whose RunJob could not be sent (its session's rings could
        not be made): its place is free at once, no worker knows of it."""
        if job.worker is not None:
            self.placed.get(job.worker, {}).pop(job.job_id, None)
        job.worker = None
        return self._end(job, JobState.FAILED, Ended(job, code, message))

    def places_of(self, client: bytes) -> set[tuple[int, int]]:
        """(worker, lane) of every place this client's jobs hold, including jobs cancelled
        here whose worker has not acknowledged yet (it may still write their rings)."""
        places = {(index, job.lane) for index, jobs in self.placed.items()
                  for job in jobs.values() if job.client == client}
        # A parked run may still write its rings until its worker says it stopped.
        return places | {(index, job.lane) for index, parked in self.parking.items()
                         for job, _ in parked.values() if job.client == client}

    def _end(self, job: Job, state: JobState, ended: Ended) -> Ended:
        job.state = state
        self.jobs.pop(job.job_id, None)
        if POLICIES[job.kind].registration:
            if state is JobState.DONE:
                self.registrations["registered"] += 1
            else:
                self.registrations["refused" if ended.code == P.E_BAD_INPUT else "failed"] += 1
        elif state is JobState.DONE:
            self.stats["jobs_done"] += 1
        else:
            self.stats["jobs_cancelled" if ended.code == P.E_CANCELLED else "jobs_failed"] += 1
        log.info("job %s %s%s", job.job_id, state.value,
                 f": {ended.code}: {ended.message}" if ended.code else "")
        return ended

    def close_queue(self, message: str) -> list[Ended]:
        """Draining: end every queued job (not started; the client may submit it again),
        and requeue nothing from now on."""
        self.queue_closed = True
        return [ended for job in self.queue.drain()
                if (ended := self.cancel(job, P.E_DRAINING, message)) is not None]

    # ------------------------------------------------------------ the clock

    def tick(self, now: float) -> list[Ended | StopWorker | Parked]:
        """Deadlines (a job whose kind has one; `Job.deadline` is inf otherwise), stalled
        jobs and unacknowledged cancels."""
        outcomes: list[Ended | StopWorker | Parked] = []
        for job in list(self.jobs.values()):
            if now >= job.deadline:
                ended = self.cancel(job, P.E_TIMEOUT, f"job deadline of "
                                    f"{job.deadline - job.accepted_at:.1f} s passed "
                                    f"({job.frames_delivered} frames delivered)")
                if ended is not None:
                    outcomes.append(ended)
        cancel_seen: dict[str, float] = {}
        for index, on_worker in self.placed.items():
            stop: StopWorker | None = None
            for job in on_worker.values():
                if job.finished:
                    # Cancelled while running: timed from the cancel, not from its last
                    # progress (a job blocked on its ring may have none for long).
                    since = cancel_seen[job.job_id] = self.cancel_seen.get(job.job_id, now)
                    if stop is None and now - since > self.stall_timeout_s:
                        stop = StopWorker(index, f"did not acknowledge cancelled job "
                                                 f"{job.job_id}")
                    continue
                age = now - job.progress_at
                if stop is None and age > self.stall_timeout_s and not job.waiting_on_ring:
                    # One stalled job is enough (a thread cannot be killed, so the worker
                    # goes, and its other jobs are requeued with it).
                    stop = StopWorker(index, f"job {job.job_id} made no progress for "
                                      f"{age:.1f} s (stall_timeout_s={self.stall_timeout_s:g})")
            for job, since in self.parking.get(index, {}).values():
                if stop is None and now - since > self.stall_timeout_s:
                    stop = StopWorker(index, f"did not stop parked job {job.job_id}")
            if stop is not None:
                outcomes.append(stop)
        self.cancel_seen = cancel_seen  # only jobs still awaiting an answer
        outcomes += self._park_unread(now)
        return outcomes

    def _park_unread(self, now: float) -> list[Parked]:
        """Batch jobs whose client has read nothing for `park_after_s` (their worker
        waits on a full ring, and no frame went out since) while jobs of other clients
        wait in the queue: one parked per such waiting job, the longest-blocked first."""
        if self.queue_closed or not len(self.queue):
            return []
        blocked = []
        for index, on_worker in self.placed.items():
            for job in on_worker.values():
                policy = POLICIES[job.kind]
                if job.finished or not job.waiting_on_ring or not policy.exactly_once \
                        or not policy.requeue or policy.registration:
                    continue
                unread_s = now - max(job.waiting_since, job.progress_at)
                if unread_s >= self.park_after_s:
                    blocked.append((unread_s, index, job))
        parked: list[Parked] = []
        waiting = list(self.queue)
        for unread_s, index, job in sorted(blocked, key=lambda b: -b[0]):
            others = [q for q in waiting if q.client != job.client]
            if not others:
                continue
            waiting.remove(others[0])
            parked.append(self.park(job, index, now, f"its client read nothing for "
                                    f"{unread_s:.1f} s (timeouts.park_unread_s="
                                    f"{self.park_after_s:g}) while job {others[0].job_id} "
                                    "of another client waited for a worker"))
        return parked

    def park(self, job: Job, index: int, now: float, reason: str) -> Parked:
        """Take a blocked job off worker `index` (which must be told to stop it) and queue
        it behind the waiting jobs, its delivery counters kept: it resumes where its
        client is, every frame once. A park is not a failed attempt."""
        self.placed.get(index, {}).pop(job.job_id, None)
        self.parking.setdefault(index, {})[job.job_id] = (job, now)
        job.state = JobState.QUEUED
        job.worker = None
        job.attempts -= 1
        job.parks += 1
        job.waiting_on_ring = False
        self.queue.push_back(job)
        log.info("job %s parked: %s", job.job_id, reason)
        return Parked(job, index, reason)

    def end_all(self, code: str, message: str) -> list[Ended]:
        """Shutdown: end every live job."""
        return [ended for job in list(self.jobs.values())
                if (ended := self.cancel(job, code, message)) is not None]
