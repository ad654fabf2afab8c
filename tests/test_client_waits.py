"""The Client's per-event timeout is a liveness check, not a limit on how long a job may
wait: a job queued behind a long one (no events for a long time) completes while the
daemon answers, and a daemon that stops answering is reported as such."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import run_daemon
from PIL import Image

from avatard.ipc.client import DAEMON_GONE, Client, DaemonUnavailable, DoneEvent, FrameEvent

# About 6 s of rendering (0.3 s of speech per word, 7.5 frames, 10 ms each): well beyond
# the waiting clients' 1.5 s timeout.
LONG_TEXT = " ".join(["One two three four five six seven eight."] * 10)
FAKE = {"width": 32, "height": 32, "frame_ms": 10.0}


def _portrait() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _read_all(client: Client, text: str, seed: int, out: list) -> None:
    try:
        out.extend(client.speak(text, seed=seed))
    except Exception as exc:  # reported by the test's asserts
        out.append(exc)


@pytest.mark.timeout(120)
def test_a_job_queued_past_the_client_timeout_completes(tmp_path: Path) -> None:
    with run_daemon(tmp_path, workers=1, fake=FAKE) as d:
        with d.client(timeout_s=30.0) as first, d.client(timeout_s=1.5) as second, \
                d.client(timeout_s=1.5) as third:
            long_events: list = []
            runner = threading.Thread(target=_read_all, args=(first, LONG_TEXT, 1, long_events))
            runner.start()
            d.wait_for(lambda s: s["workers"][0]["current_jobs"], 30, "the long job running")
            started = time.monotonic()
            job = second.speak("Short one.", seed=2)
            assert d.status()["queue"]["depth"] == 1, "the job waits for the only worker"
            events = list(job)
            waited_s = time.monotonic() - started
            # A portrait's registration is a job too: it also waits for the worker.
            avatar_id = third.register_avatar(_portrait())
            runner.join(60)
            assert not runner.is_alive()
        assert isinstance(long_events[-1], DoneEvent), long_events[-1]
        assert isinstance(events[-1], DoneEvent), events[-1]
        assert events[-1].frames == sum(isinstance(e, FrameEvent) for e in events) > 0
        assert waited_s > 1.5, "the job should have waited longer than the client timeout"
        assert avatar_id


@pytest.mark.timeout(120)
def test_a_stopped_daemon_is_reported_as_not_answering(tmp_path: Path) -> None:
    with run_daemon(tmp_path, workers=1, fake=FAKE) as d:
        # A timeout far beyond the test's bound: only the heartbeats can end the wait.
        client = Client(d.endpoint, timeout_s=600.0, heartbeat_timeout_s=2.0)
        try:
            job = client.speak(LONG_TEXT, seed=3, send_audio=False)
            assert isinstance(next(job), FrameEvent)
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(DaemonUnavailable) as err:
                    for _ in job:
                        pass
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
        finally:
            client.close()
        assert err.value.code == DAEMON_GONE
        assert "for 2 s (stopped or hung)" in str(err.value), err.value
        # The daemon, running again, saw the connection go and cancelled the job.
        d.wait_for(lambda s: s["jobs"]["jobs_cancelled"] == 1, 30, "the dropped job cancelled")
        with d.client() as fresh:
            assert fresh.health().status == "ready"
