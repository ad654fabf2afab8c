"""A local client that dies mid-stream (SIGKILL: no bye, slots never released) must not
hold the only worker until client_call_s or the job deadline: the daemon sees its process
gone and cancels its jobs. A slow client that is alive keeps its job."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from daemon_harness import run_daemon

from avatard.ipc.client import Client, DoneEvent, FrameEvent

SPAWN = multiprocessing.get_context("spawn")
LONG_TEXT = " ".join(f"Sentence number {i} of a long answer." for i in range(200))
FAKE = {"width": 32, "height": 32, "frame_ms": 2.0}
# Far beyond this test's waits: only the vanished-client check can end the first job.
PATIENT = {"client_call_s": 600.0}


def hold_frames_forever(endpoint: str, ready) -> None:
    """Child: start a long job, keep the frames it was handed (never releases), wait."""
    client = Client(endpoint)
    events = iter(client.speak(LONG_TEXT, seed=3))
    held = []
    while len(held) < 2:
        event = next(events)
        if isinstance(event, FrameEvent):
            held.append(event)
    ready.put(os.getpid())
    time.sleep(3600)


def test_a_killed_client_frees_the_worker_and_a_slow_one_keeps_its_job(tmp_path):
    with run_daemon(tmp_path, workers=1, fake=FAKE, timeouts=PATIENT,
                    daemon={"job_deadline_s": 600.0}) as d:
        # A slow but living client: holds its frames a while, then reads on.
        with Client(d.endpoint) as slow:
            frames = 0
            for event in slow.speak("A short answer. And a second sentence.", seed=1):
                if isinstance(event, FrameEvent):
                    frames += 1
                    if frames == 2:
                        time.sleep(1.5)  # three vanished checks pass while it holds slots
                elif isinstance(event, DoneEvent):
                    break
            assert frames > 2
        assert d.status()["jobs"]["jobs_cancelled"] == 0
        ready = SPAWN.Queue()
        child = SPAWN.Process(target=hold_frames_forever, args=(d.endpoint, ready),
                              daemon=True)
        child.start()
        try:
            assert ready.get(timeout=60) == child.pid
            d.wait_for(lambda s: s["workers"][0]["current_jobs"], 30, "the child's job")
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
            d.wait_for(lambda s: s["jobs"]["jobs_cancelled"] == 1, 30,
                       "the killed client's job cancelled")
            d.wait_for(lambda s: not s["workers"][0]["current_jobs"], 30, "a free worker")
        finally:
            if child.is_alive():
                child.kill()
                child.join(10)
        # The worker serves the next client.
        with Client(d.endpoint) as nxt:
            done = [e for e in nxt.speak("Next please.", seed=2) if isinstance(e, DoneEvent)]
            assert done and done[0].frames > 0
