"""Unit tests of daemon/book.py (JobBook): placement, delivery counters, requeue, deadlines,
cancels, stalls and draining, on a fake clock (plain floats). No sockets, no processes."""

from __future__ import annotations

import pytest

from avatard.daemon.book import POLICIES, Ended, JobBook, Parked, Requeued, StopWorker
from avatard.daemon.jobs import Job, JobState, QueueFull
from avatard.ipc import protocol as P

T0 = 1000.0


def make_job(job_id: str, client: bytes = b"c1", deadline: float = T0 + 600,
             spec: P.AnyJobSpec | None = None) -> Job:
    return Job(job_id=job_id, spec=spec or P.SpeakSpec(text="hello"), client=client,
               req_id=7, seed=1, deadline=deadline, accepted_at=T0)


def make_book(queue_size: int = 8, max_job_attempts: int = 2,
              stall_timeout_s: float = 30.0) -> JobBook:
    return JobBook(queue_size, max_job_attempts, stall_timeout_s)


def accept(book: JobBook, *jobs: Job) -> list[Job]:
    for job in jobs:
        book.accept(job)
    return list(jobs)


def frame(job_id: str, index: int) -> P.WFrame:
    return P.make(P.WFrame, job_id=job_id, index=index, pts_us=index * 40_000,
                  data=P.SlotDesc(ring="r", slot=0, seq=1, shape=[4], dtype="uint8"))


def audio(job_id: str, index: int) -> P.WAudio:
    return P.make(P.WAudio, job_id=job_id, index=index, pts_us=0, sample_rate=16000,
                  data=P.SlotDesc(ring="r", slot=0, seq=1, shape=[4], dtype="float32"))


def done_msg(job_id: str, media_s: float = 2.0) -> P.WJobDone:
    return P.make(P.WJobDone, job_id=job_id, frames=50, media_s=media_s)


def failed_msg(job_id: str, code: str, message: str = "boom", field: str = "",
               rule: str = "") -> P.WJobFailed:
    return P.make(P.WJobFailed, job_id=job_id, code=code, message=message, field=field,
                  rule=rule)


def progress(job_id: str, frames: int, waiting: bool = False) -> P.JobProgress:
    return P.JobProgress(job_id=job_id, progress=frames, waiting=waiting)


# ------------------------------------------------------------------ accept and place


def test_place_on_the_worker_with_fewest_jobs():
    book = make_book()
    a, b, c, d, e = accept(book, *(make_job(x) for x in "abcde"))
    placed = book.place({0: 2, 1: 2}, T0 + 1)
    assert placed == [a, b, c, d]  # queue order
    assert [j.worker for j in placed] == [0, 1, 0, 1]  # fewest jobs first, ties: lowest
    assert all(j.state is JobState.RUNNING and j.attempts == 1 for j in placed)
    assert all(j.started_at == T0 + 1 and j.progress_at == T0 + 1 for j in placed)
    assert list(book.queue) == [e]  # both full
    assert e.worker is None and e.state is JobState.QUEUED
    assert book.load(0) == book.load(1) == 2 and book.running_count() == 4
    assert book.on_worker(0) == [a, c]
    # Worker 1 has one job fewer after a done: it gets the next one, not worker 0.
    assert book.done(1, done_msg("b"), T0 + 2) is not None
    assert book.place({0: 2, 1: 2}, T0 + 3) == [e] and e.worker == 1


def test_place_only_on_listed_workers_with_room():
    book = make_book()
    a, b = accept(book, make_job("a"), make_job("b"))
    assert book.place({}, T0) == []
    assert book.place({3: 1}, T0) == [a]
    assert a.worker == 3
    assert book.place({3: 1}, T0) == []  # full: b waits
    assert list(book.queue) == [b]


def test_lanes_keep_one_clients_concurrent_jobs_apart():
    book = make_book()
    a1, a2, b1 = accept(book, make_job("a1", b"A"), make_job("a2", b"A"),
                        make_job("b1", b"B"))
    book.place({0: 3}, T0)
    assert (a1.lane, a2.lane, b1.lane) == (0, 1, 0)  # another client may share lane 0
    book.done(0, done_msg("a1"), T0 + 1)
    (a3,) = accept(book, make_job("a3", b"A"))
    book.place({0: 3}, T0 + 2)
    assert a3.lane == 0  # the lane a1 left


def test_queue_full_answers_busy_with_a_retry_hint():
    book = make_book(queue_size=2)
    assert book.accept(make_job("a")) == 0
    assert book.accept(make_job("b")) == 1
    with pytest.raises(QueueFull) as info:
        book.accept(make_job("c"))
    assert info.value.depth == 2
    assert info.value.retry_after_s == 1.0  # no job has finished yet
    assert [j.job_id for j in book.of_client(b"c1")] == ["a", "b"]  # c was not recorded
    # Recent job times (placement to done) make the hint: their median.
    for job_id, took in (("a", 4.0), ("b", 8.0)):
        book.place({0: 1}, T0)
        assert book.done(0, done_msg(job_id), T0 + took) is not None
    accept(book, make_job("d"), make_job("e"))
    with pytest.raises(QueueFull) as info:
        book.accept(make_job("f"))
    assert info.value.retry_after_s == 6.0


# ------------------------------------------------------------------ delivery, exactly once


def test_frames_are_delivered_exactly_once_in_order():
    book = make_book()
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0)
    assert book.delivered(0, frame("a", 0), T0 + 1) is a
    assert a.frames_delivered == 1 and a.first_frame_at == T0 + 1
    assert book.delivered(0, frame("a", 0), T0 + 2) is None  # below: a duplicate
    assert book.delivered(0, frame("a", 2), T0 + 2) is None  # above: never out of order
    assert a.frames_delivered == 1
    assert book.delivered(0, frame("a", 1), T0 + 3) is a
    assert a.frames_delivered == 2 and a.first_frame_at == T0 + 1
    assert book.stats["frames_delivered"] == 2
    assert book.delivered(1, frame("a", 2), T0 + 3) is None  # not placed on worker 1
    assert book.delivered(0, frame("zz", 0), T0 + 3) is None


def test_audio_chunks_are_delivered_exactly_once():
    book = make_book()
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0)
    assert book.delivered(0, audio("a", 0), T0) is a
    assert book.delivered(0, audio("a", 0), T0) is None
    assert book.delivered(0, audio("a", 1), T0) is a
    assert (a.audio_delivered, a.frames_delivered) == (2, 0)
    assert book.stats["frames_delivered"] == 0


def test_worker_lost_requeues_at_the_front_in_the_old_order_with_counters():
    book = make_book(queue_size=2, max_job_attempts=3)
    a, b = accept(book, make_job("a"), make_job("b"))
    book.place({0: 3}, T0)
    c, d = accept(book, make_job("c"), make_job("d"))  # newer jobs, still queued
    book.place({0: 3}, T0 + 1)
    assert c.worker == 0 and list(book.queue) == [d]
    for i in range(3):
        assert book.delivered(0, frame("a", i), T0 + 2) is a
    assert book.delivered(0, audio("a", 0), T0 + 2) is a
    assert book.delivered(0, frame("b", 0), T0 + 2) is b

    outcomes = book.worker_lost(0, "worker 0 killed by signal 9")
    assert outcomes == [Requeued(a, "worker 0 killed by signal 9"),
                        Requeued(b, "worker 0 killed by signal 9"),
                        Requeued(c, "worker 0 killed by signal 9")]
    assert list(book.queue) == [a, b, c, d]  # ahead of newer jobs, may exceed queue_size
    assert book.load(0) == 0 and book.on_worker(0) == []
    for job in (a, b, c):
        assert job.state is JobState.QUEUED and job.worker is None
        assert job.attempts == 1
        assert job.last_error == "worker 0 killed by signal 9"
    assert (a.frames_delivered, a.audio_delivered, b.frames_delivered) == (3, 1, 1)
    assert book.stats["jobs_requeued"] == 3

    assert book.place({1: 4}, T0 + 5) == [a, b, c, d]
    assert (a.attempts, d.attempts) == (2, 1)
    assert a.started_at == T0 and a.progress == 0 and a.progress_at == T0 + 5
    # The rerun recomputes frames 0..2; only frame 3 is new to the client.
    for i in range(3):
        assert book.delivered(1, frame("a", i), T0 + 6) is None
    assert book.delivered(1, frame("a", 3), T0 + 6) is a
    assert a.frames_delivered == 4
    assert book.delivered(1, audio("a", 0), T0 + 6) is None
    assert book.delivered(1, audio("a", 1), T0 + 6) is a


def test_max_job_attempts_ends_the_job_with_worker_error():
    book = make_book(max_job_attempts=2)
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0)
    assert book.worker_lost(0, "first death") == [Requeued(a, "first death")]
    book.place({1: 1}, T0 + 1)
    assert a.attempts == 2
    (ended,) = book.worker_lost(1, "second death")
    assert isinstance(ended, Ended) and ended.job is a
    assert ended.code == P.E_WORKER
    assert "2 times" in ended.message and "second death" in ended.message
    assert ended.cancel_on is None
    assert a.state is JobState.FAILED and a.finished
    assert book.of_client(b"c1") == [] and len(book.queue) == 0
    assert book.stats["jobs_failed"] == 1 and book.stats["jobs_requeued"] == 1


def test_retryable_failure_is_requeued_while_attempts_are_left():
    book = make_book(max_job_attempts=3)
    (a,) = accept(book, make_job("a"))
    for attempt in (1, 2):
        book.place({0: 1}, T0 + attempt)
        assert a.attempts == attempt
        outcome = book.failed(0, failed_msg("a", P.E_WORKER, "engine crashed"))
        assert outcome == Requeued(a, "engine crashed")
        assert book.load(0) == 0 and list(book.queue) == [a]
    book.place({0: 1}, T0 + 3)
    ended = book.failed(0, failed_msg("a", P.E_WORKER, "engine crashed"))
    assert isinstance(ended, Ended) and ended.code == P.E_WORKER
    assert ended.message == "engine crashed"
    assert a.state is JobState.FAILED and len(book.queue) == 0


def test_bad_input_ends_at_once_with_field_and_rule():
    book = make_book(max_job_attempts=5)
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0)
    ended = book.failed(0, failed_msg("a", P.E_BAD_INPUT, "no face found", field="avatar",
                                      rule="must show exactly one face"))
    assert isinstance(ended, Ended)
    assert (ended.code, ended.field, ended.rule) == (P.E_BAD_INPUT, "avatar",
                                                     "must show exactly one face")
    assert ended.message == "no face found" and ended.result is None
    assert a.attempts == 1 and len(book.queue) == 0 and book.load(0) == 0
    assert book.failed(0, failed_msg("a", P.E_WORKER)) is None  # no longer placed


def test_registrations_are_counted_apart_from_jobs():
    book = make_book(max_job_attempts=2)
    spec = P.RegisterSpec(avatar=P.AvatarRef(avatar_id="a" * 32, segment="seg", nbytes=3))
    refused, lost, registered = (make_job(job_id, spec=spec)
                                 for job_id in ("r", "l", "ok"))
    accept(book, refused, lost, registered)
    book.place({0: 3}, T0)
    book.failed(0, failed_msg("r", P.E_BAD_INPUT, "no face found", field="image",
                              rule="no face found"))
    book.done(0, done_msg("ok", media_s=0.0), T0 + 1)
    book.worker_lost(0, "worker 0 exited")  # "l": requeued once
    book.place({1: 1}, T0 + 2)
    book.worker_lost(1, "worker 1 exited")  # "l": attempts used up
    assert book.registrations == {"registered": 1, "refused": 1, "failed": 1, "requeued": 1}
    assert (book.stats["jobs_done"], book.stats["jobs_failed"],
            book.stats["jobs_requeued"]) == (0, 0, 0)


def test_done_ends_the_job_with_the_result():
    book = make_book()
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0 + 1)
    book.delivered(0, frame("a", 0), T0 + 2)
    assert book.live(0, "a") is a
    msg = done_msg("a", media_s=2.0)
    ended = book.done(0, msg, T0 + 5)
    assert ended == Ended(a, result=msg)
    assert a.state is JobState.DONE and book.load(0) == 0
    assert book.stats["jobs_done"] == 1
    assert list(book.recent_rtf) == [2.5]  # 5 s from acceptance for 2 s of media
    assert list(book.recent_job_s) == [4.0]  # from its first start
    assert book.live(0, "a") is None
    assert book.done(0, msg, T0 + 6) is None


# ------------------------------------------------------------------ deadlines and cancels


def test_deadline_ends_running_and_queued_jobs_with_timeout():
    book = make_book()
    a, b = accept(book, make_job("a", deadline=T0 + 10), make_job("b", deadline=T0 + 10))
    book.place({0: 1}, T0)
    book.delivered(0, frame("a", 0), T0 + 1)
    assert book.tick(T0 + 9.9) == []
    outcomes = book.tick(T0 + 10)
    assert [(o.job, o.code, o.cancel_on) for o in outcomes] == [
        (a, P.E_TIMEOUT, 0), (b, P.E_TIMEOUT, None)]
    assert "10.0 s" in outcomes[0].message and "1 frames delivered" in outcomes[0].message
    assert len(book.queue) == 0 and book.of_client(b"c1") == []
    assert book.stats["jobs_failed"] == 2
    # The running job keeps its place until its worker answers the cancel.
    assert book.load(0) == 1 and book.on_worker(0) == [a]
    assert book.tick(T0 + 11) == []  # ended once
    assert book.failed(0, failed_msg("a", P.E_CANCELLED)) is None
    assert book.load(0) == 0


@pytest.mark.parametrize("ack", ["done", "failed"])
def test_cancel_of_a_running_job_keeps_its_place_until_the_worker_answers(ack):
    book = make_book()
    a, b = accept(book, make_job("a"), make_job("b"))
    book.place({0: 1}, T0)
    ended = book.cancel(a, P.E_CANCELLED, "cancelled by the client")
    assert ended == Ended(a, P.E_CANCELLED, "cancelled by the client", cancel_on=0)
    assert book.cancel(a, P.E_CANCELLED, "again") is None
    assert book.stats["jobs_cancelled"] == 1 and book.stats["jobs_failed"] == 0
    assert book.delivered(0, frame("a", 0), T0 + 1) is None  # its late frames are dropped
    assert book.live(0, "a") is None
    assert book.place({0: 1}, T0 + 1) == []  # the place is still taken
    assert book.load(0) == 1 and book.running_count() == 1
    if ack == "done":
        assert book.done(0, done_msg("a"), T0 + 2) is None
    else:
        assert book.failed(0, failed_msg("a", P.E_CANCELLED, "cancelled")) is None
    assert book.load(0) == 0
    assert book.stats["jobs_done"] == 0 and book.stats["jobs_cancelled"] == 1
    assert book.place({0: 1}, T0 + 2) == [b]


def test_cancel_of_a_queued_job_removes_it():
    book = make_book()
    a, b = accept(book, make_job("a"), make_job("b"))
    ended = book.cancel(b, P.E_CANCELLED, "client said bye")
    assert ended.cancel_on is None and list(book.queue) == [a]


def test_unacknowledged_cancel_stops_the_worker_stall_timeout_after_the_cancel():
    book = make_book(stall_timeout_s=30.0)
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0)
    # Blocked on a full ring for long (a slow client): back-pressure, not a stall.
    book.progress(0, [progress("a", 3, waiting=True)], T0 + 1)
    assert book.tick(T0 + 100) == []
    assert book.cancel(a, P.E_CANCELLED, "client said bye").cancel_on == 0
    # The worker gets stall_timeout_s from the cancel to acknowledge it, however old its
    # last progress is.
    assert book.tick(T0 + 100) == []
    assert book.tick(T0 + 130) == []
    assert book.tick(T0 + 130.5) == [StopWorker(0, "did not acknowledge cancelled job a")]


def test_deadline_of_a_job_blocked_on_its_ring_leaves_time_to_acknowledge():
    book = make_book(stall_timeout_s=30.0)
    (a,) = accept(book, make_job("a", deadline=T0 + 60))
    book.place({0: 1}, T0)
    book.progress(0, [progress("a", 3, waiting=True)], T0 + 1)
    outcomes = book.tick(T0 + 60)
    assert len(outcomes) == 1 and isinstance(outcomes[0], Ended)
    assert outcomes[0].code == P.E_TIMEOUT and outcomes[0].cancel_on == 0
    assert book.tick(T0 + 90) == []
    assert book.tick(T0 + 90.5) == [StopWorker(0, "did not acknowledge cancelled job a")]


def test_progress_of_a_cancelled_job_does_not_postpone_the_stop():
    book = make_book(stall_timeout_s=30.0)
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0)
    book.cancel(a, P.E_CANCELLED, "cancelled by the client")
    assert book.tick(T0 + 1) == []
    for k in range(1, 4):  # the worker runs on as if nothing was cancelled
        book.progress(0, [progress("a", 10 * k)], T0 + 10 * k)
    assert book.tick(T0 + 31.5) == [StopWorker(0, "did not acknowledge cancelled job a")]


def test_acknowledged_cancel_stops_nothing():
    book = make_book(stall_timeout_s=30.0)
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0)
    book.cancel(a, P.E_CANCELLED, "x")
    assert book.tick(T0 + 1) == []
    book.failed(0, failed_msg("a", P.E_CANCELLED))
    assert book.tick(T0 + 1000) == []


# ------------------------------------------------------------------ stalls


def test_a_stalled_job_stops_its_worker_once():
    book = make_book(stall_timeout_s=30.0)
    a, b, c = accept(book, make_job("a"), make_job("b"), make_job("c"))
    book.place({0: 2, 1: 1}, T0)
    assert (a.worker, b.worker, c.worker) == (0, 1, 0)
    book.progress(0, [progress("a", 5), progress("c", 5)], T0 + 20)
    book.progress(0, [progress("a", 5)], T0 + 29)  # same count: no progress
    assert book.tick(T0 + 30) == []
    assert book.tick(T0 + 30.5) == [
        StopWorker(1, "job b made no progress for 30.5 s (stall_timeout_s=30)")]
    # Both jobs of worker 0 stalled: one StopWorker for the worker (its first stalled job).
    assert book.tick(T0 + 60) == [
        StopWorker(0, "job a made no progress for 40.0 s (stall_timeout_s=30)"),
        StopWorker(1, "job b made no progress for 60.0 s (stall_timeout_s=30)")]


def test_frames_count_as_progress():
    book = make_book(stall_timeout_s=30.0)
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0)
    book.delivered(0, frame("a", 0), T0 + 25)
    assert a.progress == 1 and a.progress_at == T0 + 25
    assert book.tick(T0 + 55) == []
    assert len(book.tick(T0 + 55.5)) == 1


def test_no_stall_while_waiting_on_the_ring():
    book = make_book(stall_timeout_s=30.0)
    (a,) = accept(book, make_job("a", deadline=T0 + 10_000))
    book.place({0: 1}, T0)
    book.progress(0, [progress("a", 2, waiting=True)], T0 + 1)
    assert a.waiting_on_ring
    assert book.tick(T0 + 1000) == []
    book.progress(0, [progress("a", 2, waiting=False)], T0 + 1000)  # unblocked, no frame
    assert not a.waiting_on_ring
    # The end of the wait restarts the stall clock: the job has stall_timeout_s from there
    # (a transcription that waited for its streamed input decodes its first piece).
    assert book.tick(T0 + 1030) == []
    assert book.tick(T0 + 1030.5) == [
        StopWorker(0, "job a made no progress for 30.5 s (stall_timeout_s=30)")]


def test_a_long_job_that_reports_progress_is_never_stalled():
    # A transcription: no frames, only progress counts (ms of audio done) in heartbeats.
    book = make_book(stall_timeout_s=30.0)
    (a,) = accept(book, make_job("a", spec=P.TranscribeSpec(audio=None, sample_rate=16000),
                                 deadline=T0 + 10_000))
    book.place({0: 1}, T0)
    for step in range(1, 40):  # 39 x 20 s = 780 s, each step inside the stall timeout
        now = T0 + 20 * step
        book.progress(0, [progress("a", step * 30_000)], now)
        assert book.tick(now + 29) == []
    # Progress stops (a hung engine): caught stall_timeout_s after the last report.
    last = T0 + 20 * 39
    book.progress(0, [progress("a", 39 * 30_000)], last + 10)  # the same count again
    assert book.tick(last + 30.5) == [
        StopWorker(0, "job a made no progress for 30.5 s (stall_timeout_s=30)")]


def test_progress_reports_of_unknown_jobs_are_ignored():
    book = make_book()
    book.progress(0, [progress("nobody", 3)], T0)
    assert book.placed == {} and book.tick(T0 + 1000) == []


# ------------------------------------------------------------------ draining and shutdown


def test_close_queue_ends_queued_jobs_and_requeues_nothing_afterwards():
    book = make_book(max_job_attempts=5)
    a, b, c = accept(book, make_job("a"), make_job("b"), make_job("c"))
    book.place({0: 1}, T0)
    ended = book.close_queue("daemon is shutting down")
    assert [(e.job, e.code, e.message, e.cancel_on) for e in ended] == [
        (b, P.E_DRAINING, "daemon is shutting down", None),
        (c, P.E_DRAINING, "daemon is shutting down", None)]
    assert len(book.queue) == 0 and list(book.jobs.values()) == [a]
    (lost,) = book.worker_lost(0, "worker died")
    assert isinstance(lost, Ended) and lost.code == P.E_DRAINING
    assert "worker died" in lost.message
    assert len(book.queue) == 0 and book.stats["jobs_requeued"] == 0


def test_retryable_failure_while_draining_is_not_requeued():
    book = make_book(max_job_attempts=5)
    (a,) = accept(book, make_job("a"))
    book.place({0: 1}, T0)
    assert book.close_queue("draining") == []
    ended = book.failed(0, failed_msg("a", P.E_WORKER, "engine crashed"))
    assert isinstance(ended, Ended) and ended.code == P.E_WORKER
    assert len(book.queue) == 0


def test_end_all_ends_every_live_job():
    book = make_book()
    a, b = accept(book, make_job("a"), make_job("b", client=b"c2"))
    book.place({0: 1}, T0)
    ended = book.end_all(P.E_DRAINING, "daemon stopped")
    assert [(e.job, e.code, e.cancel_on) for e in ended] == [(a, P.E_DRAINING, 0),
                                                             (b, P.E_DRAINING, None)]
    assert book.jobs == {} and len(book.queue) == 0
    assert book.running_count() == 1  # a still awaits its worker's answer
    assert book.end_all(P.E_DRAINING, "again") == []


def test_every_job_kind_has_a_policy():
    assert set(POLICIES) == set(P.JobKind)
    assert not POLICIES[P.JobKind.REGISTER].announced
    assert POLICIES[P.JobKind.SPEAK].uses_session_rings
    assert not POLICIES[P.JobKind.TRANSCRIBE].uses_session_rings


# ------------------------------------------------------------------ live sessions


def live_job(job_id: str) -> Job:
    return make_job(job_id, deadline=float("inf"), spec=P.LiveSpec())


def test_live_frames_are_forwarded_when_newer_and_gaps_are_drops():
    book = make_book()
    (job,) = accept(book, live_job("l"))
    book.place({0: 1}, T0)
    # The worker dropped frames 1 and 2 (the client's ring was full): 3 still goes out.
    assert [book.delivered(0, frame("l", i), T0) is job for i in (0, 3, 4)] == [True] * 3
    assert book.delivered(0, frame("l", 2), T0) is None  # never out of order
    assert job.frames_delivered == 5 and book.stats["frames_delivered"] == 3
    assert [book.delivered(0, audio("l", i), T0) is job for i in (0, 3)] == [True, True]
    assert book.delivered(0, audio("l", 1), T0) is None


def test_live_session_has_no_deadline_and_is_not_requeued_for_a_fault():
    assert not POLICIES[P.JobKind.LIVE].exactly_once
    book = make_book(max_job_attempts=3)
    a, b = accept(book, live_job("a"), live_job("b"))
    book.place({0: 2}, T0)
    # A day later: stalled (no progress reported here), but never past a deadline.
    assert not [o for o in book.tick(T0 + 86400) if isinstance(o, Ended)]
    ended = book.failed(0, failed_msg("a", P.E_WORKER))
    assert isinstance(ended, Ended) and ended.code == P.E_WORKER  # retryable, yet ended
    (lost,) = book.worker_lost(0, "exited with status 70 while busy")
    assert isinstance(lost, Ended) and lost.job is b and lost.code == P.E_WORKER
    assert "no other worker had a free place" in lost.message and "status 70" in lost.message
    assert not book.queue and not book.jobs


def test_live_done_adds_its_drop_and_late_counts_to_the_stats():
    book = make_book()
    accept(book, live_job("l"))
    book.place({0: 1}, T0)
    msg = P.make(P.WJobDone, job_id="l", frames=100, frames_dropped=7, late_frames=2)
    ended = book.done(0, msg, T0 + 4)
    assert isinstance(ended, Ended) and ended.result is msg
    assert (book.stats["live_frames_dropped"], book.stats["live_late_frames"]) == (7, 2)


# ------------------------------------------------------------------ live sessions move


def test_a_live_session_moves_to_a_worker_with_room_and_its_clock_runs_on():
    book = make_book(max_job_attempts=3)
    (s,) = accept(book, live_job("s"))
    book.place({0: 1, 1: 1}, T0)
    assert s.worker == 0
    for i in (0, 1, 3):  # frame 2 was dropped by the worker (the client did not read)
        assert book.delivered(0, frame("s", i), T0 + 0.04 * i) is s
    (moved,) = book.worker_lost(0, "worker 0 killed by signal 9", {1: 1})
    assert moved == Requeued(s, "worker 0 killed by signal 9") and s.moved
    (placed,) = book.place({1: 1}, T0 + 1)
    assert placed is s and s.worker == 1 and s.attempts == 2
    # Last frame (3) went out at T0 + 0.12; at T0 + 1 the clock is 22 frames further on:
    # frames 4..24 are lost, the new worker starts at frame 25 (its audio chunk too).
    assert book.resume_live(s, 25, T0 + 1) == 21
    assert (s.frames_delivered, s.audio_delivered, s.frames_lost) == (25, 25, 21)
    assert book.resume_live(s, 25, T0 + 2) is None  # only once per move
    assert book.delivered(1, frame("s", 24), T0 + 1.1) is None  # never backwards
    assert book.delivered(1, frame("s", 25), T0 + 1.1) is s
    assert (s.frames_earlier, s.dropped_earlier, s.frames_forwarded, s.dropped_gaps) == (
        3, 1, 1, 0)


def test_a_live_session_ends_when_no_other_worker_has_room():
    book = make_book(max_job_attempts=3)
    s, t = accept(book, live_job("s"), live_job("t"))
    book.place({0: 2, 1: 1}, T0)
    assert (s.worker, t.worker) == (0, 1)
    (b,) = accept(book, make_job("b"))  # a batch job waits for a place
    # Worker 1 is full (t): worker 0's session has nowhere to go now, and a live session
    # does not wait for a worker to load.
    (ended,) = book.worker_lost(0, "worker 0 exited", {1: 1})
    assert isinstance(ended, Ended) and ended.job is s and ended.code == P.E_WORKER
    assert "no other worker had a free place" in ended.message
    assert list(book.queue) == [b]


def test_moved_live_sessions_go_ahead_of_requeued_batch_jobs_and_count_the_room():
    book = make_book(max_job_attempts=3)
    a, s = accept(book, make_job("a"), live_job("s"))
    book.place({0: 3}, T0)
    (u,) = accept(book, live_job("u"))
    book.place({1: 1}, T0)
    assert (a.worker, s.worker, u.worker) == (0, 0, 1)
    book.worker_lost(1, "worker 1 exited", {0: 3})  # u moves: one room left on worker 0
    assert u.moved
    (ended,) = [o for o in book.worker_lost(0, "worker 0 exited", {2: 1}) if
                isinstance(o, Ended)]
    # Worker 2's one place is u's already: s cannot move; the batch job a is requeued.
    assert ended.job is s and list(book.queue) == [u, a]


# ------------------------------------------------------------------ parking


def make_parking_book() -> JobBook:
    return JobBook(8, 2, stall_timeout_s=30.0, park_after_s=2.0)


def test_a_job_whose_client_reads_nothing_yields_its_worker_to_another_clients_job():
    book = make_parking_book()
    a, b = accept(book, make_job("a", b"A"), make_job("b", b"B"))
    assert book.place({0: 1}, T0) == [a]
    book.delivered(0, frame("a", 0), T0 + 0.5)
    book.progress(0, [progress("a", 8, waiting=True)], T0 + 1)  # its ring is full
    assert book.tick(T0 + 2.9) == []  # 1.9 s unread: not yet
    (parked,) = book.tick(T0 + 3.1)
    assert parked == Parked(a, 0, parked.reason) and "read nothing for 2.1 s" in parked.reason
    assert "job b of another client" in parked.reason
    assert list(book.queue) == [b, a] and a.state is JobState.QUEUED and a.parks == 1
    # Its place stays taken until the worker says the run stopped; then b runs there.
    assert book.place({0: 1}, T0 + 3.2) == []
    assert book.failed(0, failed_msg("a", P.E_CANCELLED, "cancelled")) is None
    assert book.place({0: 1}, T0 + 3.3) == [b]
    # a resumes where its client is, on the next free place; a park is not an attempt.
    assert book.done(0, done_msg("b"), T0 + 4) is not None
    assert book.place({0: 1}, T0 + 5) == [a] and a.attempts == 1
    assert a.frames_delivered == 1 and book.delivered(0, frame("a", 0), T0 + 5.1) is None
    assert book.delivered(0, frame("a", 1), T0 + 5.2) is a


def test_no_park_without_another_clients_job_or_while_the_client_reads():
    book = make_parking_book()
    a, a2 = accept(book, make_job("a", b"A"), make_job("a2", b"A"))  # the same client
    book.place({0: 1}, T0)
    book.progress(0, [progress("a", 8, waiting=True)], T0 + 1)
    assert book.tick(T0 + 60) == []  # only its own client's job waits: nothing gained
    # A slow reader: a frame goes out now and then, so it never reads "nothing" for 2 s.
    (b,) = accept(book, make_job("b", b"B"))
    for step in range(10):
        now = T0 + 61 + 1.5 * step
        book.delivered(0, frame("a", step), now)
        assert book.tick(now + 1.9) == []
    assert book.placed[0] == {"a": a}


def test_a_parked_run_is_not_placed_again_on_its_worker_before_it_stopped():
    book = make_parking_book()
    a, b = accept(book, make_job("a", b"A"), make_job("b", b"B"))
    book.place({0: 1, 1: 0}, T0)
    book.progress(0, [progress("a", 8, waiting=True)], T0)
    book.tick(T0 + 3)
    book.cancel(b, P.E_CANCELLED, "client left")  # b goes; a is first in the queue
    assert book.place({0: 2, 1: 0}, T0 + 4) == []  # room on worker 0, but a's run is there
    assert book.place({0: 2, 1: 1}, T0 + 4) == [a] and a.worker == 1
    # A worker that never stops the parked run is replaced like any stalled one.
    assert book.tick(T0 + 3 + 30.5) == [StopWorker(0, "did not stop parked job a")]
