"""Chaos: a real daemon under load while workers and clients are killed, stopped and
starved (bench/chaos.py, short version), and the supervisor itself SIGKILLed mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from daemon_harness import AVATARD, FAST_RESTART, FAST_TIMEOUTS

from avatard.bench.chaos import FAULT_KINDS, format_chaos, run_chaos
from avatard.daemon import PrivateDaemon
from avatard.engines.fake import expected_frame
from avatard.ipc import protocol as P
from avatard.ipc import segments
from avatard.ipc.client import (
    DAEMON_GONE,
    Client,
    ClientError,
    DaemonUnavailable,
    DoneEvent,
    FrameEvent,
)

SIZE = 32


@pytest.mark.timeout(150)
@pytest.mark.parametrize("jobs_per_worker", [1, 3])
def test_short_chaos_loses_nothing_and_leaves_nothing(tmp_path: Path, jobs_per_worker: int
                                                      ) -> None:
    # With 3 jobs per worker a killed or stopped worker takes several jobs down at once.
    report = run_chaos(seconds=20, seed=7, workers=3, workdir=tmp_path,
                       jobs_per_worker=jobs_per_worker)
    assert report["jobs_per_worker"] == jobs_per_worker
    summary = format_chaos(report)
    log = (tmp_path / "daemon.log").read_text(errors="replace")[-3000:]
    assert report["jobs_accepted"] > 10, summary
    assert report["jobs_lost"] == 0, f"{summary}\n{log}"
    assert report["frames_duplicated"] == 0, summary
    assert report["frames_missing"] == 0, summary
    assert report["frames_corrupt"] == 0, summary
    assert report["jobs_completed"] + report["jobs_failed"] == report["jobs_accepted"], summary
    assert report["daemon_exit_code"] == 0, f"{summary}\n{log}"
    assert report["segments_leaked"] == 0, summary
    assert report["orphan_processes"] == 0, report["orphan_detail"]
    assert report["zombie_processes"] == 0, summary
    assert report["load_thread_errors"] == [], summary
    for kind in FAULT_KINDS:
        assert report["faults_by_kind"][kind] > 0, f"no {kind} injected\n{summary}"
    assert report["rss_flat"], summary
    # A live session runs beside the load: its frames in order, pixel-exact, each with
    # its own audio, and every segment that started finished (sessions that fail for want
    # of a free worker, or whose worker was lost in the drain, are fine).
    assert report["live_sessions"] > 0 and report["live_frames"] > 0, summary
    assert report["live_lost"] == 0, summary
    assert report["live_corrupt"] == report["live_out_of_order"] == 0, summary
    assert report["live_unfinished_segments"] == 0, summary
    assert set(report["live_failed_by_code"]) <= {P.E_WORKER, P.E_DRAINING}, summary


def _sections(tmp_path: Path) -> dict[str, dict[str, object]]:
    return {
        "daemon": {"workers": 2, "min_ready": 2, "devices": "cpu"},
        "timeouts": FAST_TIMEOUTS, "restart": FAST_RESTART,
        "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
        "engines.options.fake": {"width": SIZE, "height": SIZE, "frame_ms": 20},
    }


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(150)
def test_sigkill_of_the_supervisor_mid_stream(tmp_path: Path) -> None:
    old = PrivateDaemon(tmp_path, _sections(tmp_path))
    new = None
    try:
        old.wait_for(lambda s: s["daemon"]["ready_workers"] == 2, 60, "two ready workers")
        worker_pids = old.worker_pids()
        assert len(worker_pids) == 2
        # A timeout far beyond the test's own: only the dropped connection can end the wait.
        client = Client(old.endpoint, timeout_s=600.0, name="victim")
        frames = 0
        with pytest.raises(DaemonUnavailable) as err:
            for event in client.speak("One two three four. Five six seven eight.", seed=5):
                if isinstance(event, FrameEvent):
                    assert event.index == frames
                    np.testing.assert_array_equal(event.array,
                                                  expected_frame(5, frames, SIZE, SIZE))
                    frames += 1
                    if frames == 10:
                        os.kill(old.proc.pid, signal.SIGKILL)
        # A clear error naming what it waited for and why it stopped waiting: the daemon's
        # connection dropped (not a timeout).
        assert err.value.code == DAEMON_GONE, err.value
        assert "event of job" in str(err.value) and "exited or restarted" in str(err.value)
        assert old.proc.wait(timeout=10) == -signal.SIGKILL
        # Workers die with their parent (PR_SET_PDEATHSIG).
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in worker_pids if _alive(p)], "workers outlived the supervisor"
        stale = old.segments()
        assert stale, "a SIGKILLed supervisor cannot unlink its segments"
        assert (old.runtime_dir / "avatard.sock").exists(), "expected a stale socket file"

        new = PrivateDaemon(tmp_path, _sections(tmp_path))
        new.wait_for(lambda s: s["daemon"]["ready_workers"] == 2, 60, "the new daemon")
        assert not old.segments(), "the new daemon swept the old segments"
        assert "shared-memory segments of dead owners" in new.log_text()
        # The old Client object's session died with the old daemon; it is told so, fast.
        with pytest.raises(ClientError):
            list(client.speak("Hello again.", seed=6))
        client.close()
        with Client(new.endpoint, timeout_s=20.0, name="reconnected") as fresh:
            got = [e for e in fresh.speak("Hello again.", seed=6)]
        frames_after = [e for e in got if isinstance(e, FrameEvent)]
        assert isinstance(got[-1], DoneEvent) and got[-1].frames == len(frames_after) > 0
        assert new.stop() == 0, new.log_text()[-3000:]
        assert not new.segments()
    finally:
        for d in (old, new):
            if d is not None and d.proc.poll() is None:
                d.stop(signal.SIGKILL, timeout_s=10)


@pytest.mark.timeout(90)
def test_session_of_a_dead_client_is_ended(tmp_path: Path) -> None:
    """Found by the chaos run (77 sessions of killed clients left after 10 minutes), fixed by
    `timeouts.session_idle_s`: a session with no message and no job is closed."""
    d = PrivateDaemon(tmp_path, {**_sections(tmp_path),
                                 "timeouts": {**FAST_TIMEOUTS, "client_call_s": 2.0,
                                              "session_idle_s": 3.0}})
    try:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] >= 1, 60, "a ready worker")
        baseline = len(d.segments())
        gone = Client(d.endpoint, timeout_s=10.0, name="vanishes")
        list(gone.speak("One two.", seed=1))
        # Its input ring and its own frame and audio rings (one pair per worker it used),
        # counted before the socket goes: the daemon may see the closed connection and
        # end the session at once, before the count.
        assert len(d.segments()) == baseline + 3
        gone._sock.close(linger=0)  # the process "dies": no bye, the socket just goes away
        deadline = time.monotonic() + 15  # session_idle_s, plus slack for a busy machine
        while len(d.segments()) > baseline and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(d.segments()) == baseline, "its rings were unlinked"
        status = d.status()  # counts its own (inline) session too
        assert status["daemon"]["sessions"] == 1, status["daemon"]
    finally:
        d.stop(signal.SIGKILL if d.proc.poll() is None else signal.SIGTERM, timeout_s=10)
        for name in d.segments():  # a SIGKILLed owner cannot clean up
            segments.unlink_segment(name)


@pytest.mark.timeout(150)
def test_render_fails_fast_and_leaves_no_file_when_the_daemon_dies(tmp_path: Path) -> None:
    # `avatard render` waits up to 600 s per event; a SIGKILLed daemon must end it within
    # the test's own bounded wait, with a clear message and without a partial mp4.
    daemon = PrivateDaemon(tmp_path, _sections(tmp_path))
    out = tmp_path / "out.mp4"
    text = " ".join(f"Sentence {i} of a long answer to render." for i in range(300))
    render = None
    try:
        daemon.wait_for(lambda s: s["daemon"]["ready_workers"] == 2, 60, "two ready workers")
        render = subprocess.Popen([AVATARD, "render", text, "-o", str(out), "--endpoint",
                                   daemon.endpoint], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        daemon.wait_for(lambda s: s["jobs"]["frames_delivered"] > 20, 60, "frames flowing")
        os.kill(daemon.proc.pid, signal.SIGKILL)
        _, stderr = render.communicate(timeout=60)
        assert render.returncode != 0
        assert "exited or restarted" in stderr, stderr
        assert not out.exists(), "a partial mp4 was left behind"
    finally:
        if render is not None and render.poll() is None:
            render.kill()
            render.wait(timeout=10)
        if daemon.proc.poll() is None:
            daemon.stop()
        for name in daemon.segments():  # a SIGKILLed daemon cannot unlink its own
            segments.unlink_segment(name)
