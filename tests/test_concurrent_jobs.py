"""Several jobs on one worker (`daemon.jobs_per_worker`): real daemon, real worker process,
real sockets and shared memory, fake engine. Every job's frames are checked pixel by pixel,
in order and exactly once, also across a SIGKILL of the worker running them."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from daemon_harness import run_daemon

from avatard.daemon.config import ConfigError, load_config
from avatard.engines.fake import expected_frame
from avatard.ipc import protocol as P
from avatard.ipc.client import DoneEvent, FrameEvent, JobFailedError

SIZE = 32
TWO_SENTENCES = "One two three. Four five six."  # 2.1 s of speech: 52 frames


class JobThread(threading.Thread):
    """One speak job on a client of its own, consumed in a thread of its own: frames are
    copied and stamped with their arrival time; order is checked as they come."""

    def __init__(self, d, seed: int, text: str = TWO_SENTENCES, on_frame=None,
                 pcm: np.ndarray | None = None):
        super().__init__(name=f"job-seed-{seed}", daemon=True)
        self.d, self.seed, self.text, self.on_frame, self.pcm = d, seed, text, on_frame, pcm
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.job_id = ""
        self.done: DoneEvent | None = None
        self.done_at = 0.0
        self.error: BaseException | None = None
        self.client = None
        self.paused_at = 0.0

    def run(self) -> None:
        try:
            with self.d.client(timeout_s=30) as c:
                self.client = c
                events = (c.speak(self.text, seed=self.seed, send_audio=False)
                          if self.pcm is None else c.lipsync(self.pcm, 16000, seed=self.seed))
                for event in events:
                    if isinstance(event, FrameEvent):
                        assert event.index == len(self.frames), "frames in order, exactly once"
                        self.job_id = event.job_id
                        self.frames.append(np.array(event.array))
                        self.times.append(time.monotonic())
                        if self.on_frame:
                            self.on_frame(self, event)
                    elif isinstance(event, DoneEvent):
                        self.done, self.done_at = event, time.monotonic()
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def finish(self, timeout_s: float = 60) -> JobThread:
        self.join(timeout_s)
        assert not self.is_alive(), f"job seed {self.seed} did not end in {timeout_s} s"
        return self

    def check(self) -> None:
        """Ended with Done, every frame present, each the exact frame of its index."""
        assert self.error is None, f"job seed {self.seed}: {self.error!r}"
        assert self.done is not None and self.done.frames == len(self.frames) > 0
        for i, frame in enumerate(self.frames):
            np.testing.assert_array_equal(frame, expected_frame(self.seed, i, SIZE, SIZE),
                                          err_msg=f"seed {self.seed} frame {i}")


def worker_jobs(d, count: int, timeout_s: float = 30) -> dict:
    """Status once worker 0 runs `count` jobs."""
    status = d.wait_for(lambda s: len(s["workers"][0]["current_jobs"]) == count, timeout_s,
                        f"worker 0 running {count} jobs")
    return status["workers"][0]


def test_two_jobs_run_at_once_on_one_worker(tmp_path):
    fake = {"width": SIZE, "height": SIZE, "frame_ms": 30}
    # Lipsync feeds the engine 0.2 s of audio per call, so frames leave 5 at a time (a
    # speak job's come a sentence at a time): fine enough to see them interleave.
    pcm = (np.sin(np.arange(16000 * 2) / 10) * 0.3).astype(np.float32)
    with run_daemon(tmp_path, fake=fake, daemon={"jobs_per_worker": 2}) as d:
        a, b = JobThread(d, seed=21, pcm=pcm), JobThread(d, seed=22, pcm=pcm)
        a.start()
        b.start()
        w = worker_jobs(d, 2)
        assert w["state"] == "busy" and w["capacity"] == 2
        assert len(w["current_jobs"]) == 2 and len(set(w["current_jobs"])) == 2
        assert d.status()["queue"]["running"] == 2
        a.finish().check()
        b.finish().check()
        assert len(a.frames) == len(b.frames) == 50
        # Concurrent, not one after the other: each started before the other ended, they
        # overlap for most of their run, and their frames interleave.
        assert a.times[0] < b.times[-1] and b.times[0] < a.times[-1]
        overlap = min(a.times[-1], b.times[-1]) - max(a.times[0], b.times[0])
        shorter = min(a.times[-1] - a.times[0], b.times[-1] - b.times[0])
        assert overlap > 0.5 * shorter, (overlap, shorter)
        merged = sorted([(t, "a") for t in a.times] + [(t, "b") for t in b.times])
        switches = sum(x[1] != y[1] for x, y in zip(merged, merged[1:], strict=False))
        assert switches >= 6, f"frames of the two jobs barely interleave ({switches})"
        assert a.done.attempts == b.done.attempts == 1
        status = d.wait_for(lambda s: s["workers"][0]["state"] == "ready", 10, "idle worker")
        assert status["workers"][0]["current_jobs"] == []
        assert status["jobs"]["jobs_done"] == 2 and status["workers"][0]["restarts"] == 0
        assert "runs 2 jobs at once" in d.log_text()


def test_sigkill_of_a_worker_running_two_jobs_requeues_both(tmp_path):
    fake = {"width": SIZE, "height": SIZE, "frame_ms": 30}
    with run_daemon(tmp_path, fake=fake, daemon={"jobs_per_worker": 2}) as d:
        a, b = JobThread(d, seed=31), JobThread(d, seed=32)
        a.start()
        b.start()
        w = worker_jobs(d, 2)
        deadline = time.monotonic() + 30
        while (len(a.frames) < 8 or len(b.frames) < 8) and time.monotonic() < deadline:
            time.sleep(0.01)
        delivered = (len(a.frames), len(b.frames))
        assert min(delivered) >= 8, "both jobs should be streaming before the kill"
        os.kill(w["pid"], signal.SIGKILL)
        a.finish().check()
        b.finish().check()
        assert a.done.attempts == b.done.attempts == 2
        assert len(a.frames) > delivered[0] and len(b.frames) > delivered[1]
        status = d.wait_for(lambda s: s["workers"][0]["restarts"] >= 1
                            and s["daemon"]["ready_workers"] == 1, 30, "the replacement")
        assert status["workers"][0]["pid"] != w["pid"]
        assert status["jobs"]["jobs_requeued"] == 2 and status["jobs"]["jobs_done"] == 2


def test_cancelling_one_job_leaves_the_other_running(tmp_path):
    fake = {"width": SIZE, "height": SIZE, "frame_ms": 30}
    with run_daemon(tmp_path, fake=fake, daemon={"jobs_per_worker": 2}) as d:
        started = threading.Event()

        def cancel_at_5(job: JobThread, event: FrameEvent) -> None:
            if event.index == 5:
                started.wait(30)  # both jobs on the worker before the cancel
                job.client.cancel(event.job_id)

        a = JobThread(d, seed=41, on_frame=cancel_at_5)
        b = JobThread(d, seed=42)
        a.start()
        b.start()
        worker_jobs(d, 2)
        started.set()
        a.finish()
        assert isinstance(a.error, JobFailedError) and a.error.code == P.E_CANCELLED
        cancelled_at = a.times[-1]
        b.finish().check()
        assert b.done.attempts == 1
        assert sum(t > cancelled_at for t in b.times) > 10, "b kept streaming after the cancel"
        status = d.status()
        assert status["jobs"]["jobs_cancelled"] == 1 and status["jobs"]["jobs_done"] == 1
        assert status["workers"][0]["restarts"] == 0


def test_a_third_job_waits_for_a_free_place(tmp_path):
    fake = {"width": SIZE, "height": SIZE, "frame_ms": 30}
    with run_daemon(tmp_path, fake=fake, daemon={"jobs_per_worker": 2}) as d:
        a, b = JobThread(d, seed=51), JobThread(d, seed=52)
        a.start()
        b.start()
        worker_jobs(d, 2)
        c = JobThread(d, seed=53, text="Seven eight.")
        c.start()
        status = d.wait_for(lambda s: s["queue"]["depth"] == 1, 10, "the third job queued")
        assert len(status["workers"][0]["current_jobs"]) == 2
        for job in (a, b, c):
            job.finish().check()
        first_free = min(a.done_at, b.done_at)
        # Done reaches a client a moment after the worker let go: allow that much.
        assert c.times[0] > first_free - 0.5, "the third job started before a place was free"
        assert c.times[0] > max(a.times[0], b.times[0])


def test_one_job_per_worker_runs_jobs_one_after_the_other(tmp_path):
    fake = {"width": SIZE, "height": SIZE, "frame_ms": 10}
    with run_daemon(tmp_path, fake=fake) as d:
        a = JobThread(d, seed=61)
        a.start()
        w = worker_jobs(d, 1)
        assert w["capacity"] == 1
        b = JobThread(d, seed=62)
        b.start()
        d.wait_for(lambda s: s["queue"]["depth"] == 1, 10, "the second job queued")
        a.finish().check()
        b.finish().check()
        assert b.times[0] > a.times[-1], "with jobs_per_worker = 1 jobs never overlap"
        assert "jobs at once" not in d.log_text()


@pytest.mark.parametrize(("value", "rule"), [(0, ">= 1"), (65, "<= 64"), (-3, ">= 1")])
def test_jobs_per_worker_out_of_range_is_refused_with_key_and_limit(value, rule):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"daemon.jobs_per_worker": value})
    assert err.value.key == "daemon.jobs_per_worker"
    assert rule in str(err.value) and str(value) in str(err.value)


def test_jobs_per_worker_accepts_its_range_and_only_ints():
    assert load_config().daemon.jobs_per_worker == 1
    assert load_config(overrides={"daemon.jobs_per_worker": 64}).daemon.jobs_per_worker == 64
    with pytest.raises(ConfigError, match="daemon.jobs_per_worker: expected int"):
        load_config(overrides={"daemon.jobs_per_worker": 2.0})


def test_hung_jobs_are_stalls_and_both_finish_on_the_next_attempt(tmp_path):
    # Both jobs hang at frame 15 on the first worker process only: heartbeats go on, so
    # only per-job progress can tell; the worker is replaced and both jobs resume.
    fake = {"width": SIZE, "height": SIZE, "frame_ms": 10, "hang_at_frame": 15,
            "fault_attempts": [1]}
    with run_daemon(tmp_path, fake=fake, daemon={"jobs_per_worker": 2}) as d:
        a, b = JobThread(d, seed=71), JobThread(d, seed=72)
        a.start()
        b.start()
        a.finish().check()
        b.finish().check()
        assert a.done.attempts == b.done.attempts == 2
        assert "made no progress" in d.log_text()
        assert d.status()["jobs"]["jobs_requeued"] == 2


def test_one_jobs_slow_client_is_no_stall_and_does_not_hold_the_other(tmp_path):
    fake = {"width": SIZE, "height": SIZE, "frame_ms": 30}
    pause_s = 6.0  # twice stall_timeout_s: the worker waits on a full ring meanwhile

    def pause_at_10(job: JobThread, event: FrameEvent) -> None:
        if event.index == 10:
            job.paused_at = time.monotonic()
            time.sleep(pause_s)

    with run_daemon(tmp_path, fake=fake, daemon={"jobs_per_worker": 2}) as d:
        slow, fast = JobThread(d, seed=81, on_frame=pause_at_10), JobThread(d, seed=82)
        slow.start()
        fast.start()
        worker_jobs(d, 2)
        fast.finish().check()
        slow.finish().check()
        # Back-pressure is per job: the fast job ended while the slow one's client slept.
        assert fast.done_at < slow.paused_at + pause_s
        assert slow.done.attempts == fast.done.attempts == 1
        assert d.status()["workers"][0]["restarts"] == 0


def test_two_jobs_of_one_client_do_not_share_a_ring(tmp_path):
    # One client reads its first job to the end before the second: the second job's
    # frames (more than a ring holds) wait in a ring of their own, not in the first's way.
    fake = {"width": SIZE, "height": SIZE, "frame_ms": 5}
    with run_daemon(tmp_path, fake=fake, daemon={"jobs_per_worker": 2}) as d, \
            d.client(timeout_s=20) as c:
        first = c.speak(TWO_SENTENCES, seed=91, send_audio=False)
        second = c.speak(TWO_SENTENCES, seed=92, send_audio=False)
        for seed, events in ((91, first), (92, second)):
            frames = []
            for event in events:
                if isinstance(event, FrameEvent):
                    assert event.index == len(frames)
                    frames.append(np.array(event.array))
                elif isinstance(event, DoneEvent):
                    assert event.frames == len(frames) == 52 and event.attempts == 1
            for i, frame in enumerate(frames):
                np.testing.assert_array_equal(frame, expected_frame(seed, i, SIZE, SIZE))
        assert d.status()["workers"][0]["restarts"] == 0


def test_sigterm_drain_waits_for_every_running_job(tmp_path):
    fake = {"width": SIZE, "height": SIZE, "frame_ms": 30}
    with run_daemon(tmp_path, fake=fake,
                    daemon={"jobs_per_worker": 2, "drain_timeout_s": 20}) as d:
        a, b = JobThread(d, seed=101), JobThread(d, seed=102)
        a.start()
        b.start()
        worker_jobs(d, 2)
        d.proc.send_signal(signal.SIGTERM)
        a.finish().check()
        b.finish().check()
        assert d.proc.wait(timeout=30) == 0


@pytest.mark.parametrize("engine_name", ["fake", "embedded"])
def test_thread_safe_avatar_engines_render_the_same_frames_from_several_threads(engine_name):
    """The engines that declare thread_safe: registrations and streams in four threads at
    once give exactly the frames a single thread gives."""
    if engine_name == "embedded":
        pytest.importorskip("cv2")
        from avatard.engines.embedded.avatar import (
            EmbeddedAvatarEngine,
            default_portrait,
            speech_like_signal,
        )

        engine = EmbeddedAvatarEngine("cpu", {"warmup": False})
        base = default_portrait()
        portraits = [base, base[:, ::-1].copy()]  # a mirrored face is another avatar
        pcm = speech_like_signal(1.0)
    else:
        from avatard.engines.fake import FakeAvatarEngine

        engine = FakeAvatarEngine("cpu", {"width": SIZE, "height": SIZE})
        portraits = [np.full((SIZE, SIZE, 3), v, np.uint8) for v in (10, 20)]
        pcm = np.zeros(16000, np.float32)
    assert engine.thread_safe

    def render(portrait: np.ndarray, seed: int) -> list[np.ndarray]:
        stream = engine.open_stream(engine.register(portrait), seed)
        frames = []
        for start in range(0, pcm.size, 3200):
            frames += stream.push(pcm[start : start + 3200])
        return frames + stream.finish()

    work = [(portraits[k % 2], 7 + k) for k in range(4)]
    results: list[list[np.ndarray] | BaseException] = [[] for _ in work]

    def run(k: int) -> None:
        try:
            results[k] = render(*work[k])
        except BaseException as exc:
            results[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for k, (portrait, seed) in enumerate(work):
        assert not isinstance(results[k], BaseException), results[k]
        serial = render(portrait, seed)
        assert len(results[k]) == len(serial) == 25
        for i, (got, want) in enumerate(zip(results[k], serial, strict=True)):
            np.testing.assert_array_equal(got, want, err_msg=f"thread {k} frame {i}")
    engine.close()
