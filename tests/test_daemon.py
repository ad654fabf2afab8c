"""The supervisor with real worker processes, real sockets and real signals (fake engine)."""

from __future__ import annotations

import os
import signal
import time

import msgspec
import numpy as np
import pytest
import zmq
from daemon_harness import free_port, run_daemon

from avatard.engines.fake import expected_frame
from avatard.ipc import protocol as P
from avatard.ipc.client import (
    AudioEvent,
    BusyError,
    ClientError,
    DoneEvent,
    FrameEvent,
    JobFailedError,
)

V = P.PROTOCOL_VERSION  # the version every well-formed message carries

SIZE = 32  # fake frames are SIZE x SIZE: every pixel is checked
FAKE = {"width": SIZE, "height": SIZE}
SPEECH = "One two three. Four five six. Seven eight nine. Ten eleven twelve."


def first_frame(events):
    """Advance a job's events to its first frame; returns (frame event, audio chunks seen)."""
    audio = 0
    for event in events:
        if isinstance(event, FrameEvent):
            return event, audio
        audio += isinstance(event, AudioEvent)
    raise AssertionError("the job ended without a frame")


def collect(events, on_frame=None, first_index=0, first_audio=0):
    """Frames (copied), audio and the Done event of one job; checks order as it goes."""
    frames, audio, done = [], [], None
    for event in events:
        if isinstance(event, FrameEvent):
            assert event.index == first_index + len(frames), "frames in order, exactly once"
            frames.append(np.array(event.array))
            if on_frame:
                on_frame(event)
        elif isinstance(event, AudioEvent):
            assert event.index == first_audio + len(audio)
            audio.append(np.array(event.pcm))
        elif isinstance(event, DoneEvent):
            done = event
    return frames, audio, done


def assert_frames_exact(frames, seed):
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, expected_frame(seed, i, SIZE, SIZE),
                                      err_msg=f"frame {i}")


def busy_worker(d, timeout_s=20):
    status = d.wait_for(lambda s: any(w["current_jobs"] for w in s["workers"]), timeout_s,
                        "a busy worker")
    return next(w for w in status["workers"] if w["current_jobs"])


def test_speak_streams_exact_frames_and_audio(tmp_path):
    with run_daemon(tmp_path, fake=FAKE) as d, d.client() as c:
        frames, audio, done = collect(c.speak(SPEECH, seed=11))
        assert done is not None and done.frames == len(frames) > 0
        assert_frames_exact(frames, 11)
        assert len(audio) == 4  # one chunk per sentence
        seconds = sum(a.size for a in audio) / 16000
        assert len(frames) == round(seconds * 25)
        assert done.attempts == 1 and done.first_frame_s > 0
        status = d.status()
        assert status["jobs"]["jobs_done"] == 1
        assert status["rtf_recent_median"] is not None


def test_lipsync_and_transcribe_through_shared_memory_and_inline(tmp_path):
    pcm = (np.sin(np.arange(16000 * 2) / 10) * 0.3).astype(np.float32)
    with run_daemon(tmp_path, fake=FAKE) as d:
        with d.client() as local:
            frames, _, done = collect(local.lipsync(pcm, 16000, seed=4))
            assert len(frames) == 50 and done.frames == 50
            assert_frames_exact(frames, 4)
            assert local.transcribe(pcm, 16000).duration_s == pytest.approx(2.0, abs=0.01)
        with d.client(inline=True) as remote:  # bytes as message parts, no shared memory
            frames, _, _ = collect(remote.lipsync(pcm, 16000, seed=4))
            assert len(frames) == 50
            assert_frames_exact(frames, 4)


def test_sigkill_of_worker_mid_job_delivers_every_frame_once(tmp_path):
    with run_daemon(tmp_path, workers=2, fake={**FAKE, "frame_ms": 30}) as d:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] == 2, 60, "two ready workers")
        killed = {}

        def kill_at_frame(event):
            if event.index == 20 and not killed:
                victim = busy_worker(d)
                os.kill(victim["pid"], signal.SIGKILL)
                killed.update(victim)

        with d.client() as c:
            frames, _, done = collect(c.speak(SPEECH, seed=3), on_frame=kill_at_frame)
        assert killed, "the worker was never killed"
        assert done.attempts == 2
        assert len(frames) == done.frames
        assert_frames_exact(frames, 3)
        # The dead worker is replaced.
        d.wait_for(lambda s: s["workers"][killed["id"]]["restarts"] >= 1
                   and s["daemon"]["ready_workers"] == 2, 30, "the killed worker's replacement")


def test_sigstop_of_busy_worker_is_detected_and_replaced(tmp_path):
    with run_daemon(tmp_path, fake={**FAKE, "frame_ms": 30}) as d:
        stopped = {}

        def stop_at_frame(event):
            if event.index == 10 and not stopped:
                victim = busy_worker(d)
                os.kill(victim["pid"], signal.SIGSTOP)
                stopped.update(victim, at=time.monotonic())

        with d.client(timeout_s=30) as c:
            frames, _, done = collect(c.speak(SPEECH, seed=8), on_frame=stop_at_frame)
        assert_frames_exact(frames, 8)
        assert done.attempts == 2
        status = d.wait_for(lambda s: s["workers"][0]["restarts"] >= 1, 30, "replacement")
        assert status["workers"][0]["pid"] != stopped["pid"]
        assert not _alive(stopped["pid"])


def test_hang_mid_job_is_a_stall_and_the_job_finishes_on_the_next_attempt(tmp_path):
    fake = {**FAKE, "hang_at_frame": 15, "fault_attempts": [1]}
    with run_daemon(tmp_path, fake=fake) as d, d.client(timeout_s=30) as c:
        t0 = time.monotonic()
        frames, _, done = collect(c.speak(SPEECH, seed=2))
        assert_frames_exact(frames, 2)
        assert done.attempts == 2
        assert time.monotonic() - t0 < 3.0 + 3.0 + 10  # stall_timeout + grace + slack
        log = d.log_text()
        assert "made no progress" in log or "no heartbeat" in log


def test_job_crashing_twice_is_reported_with_the_reason(tmp_path):
    with run_daemon(tmp_path, workers=2, fake={**FAKE, "crash_at_frame": 5}) as d:
        with d.client(timeout_s=30) as c, pytest.raises(JobFailedError) as err:
            collect(c.speak(SPEECH, seed=1))
        assert err.value.code == P.E_WORKER
        assert "2 times" in str(err.value) and "exited with status 70" in str(err.value)
        assert d.status()["jobs"]["jobs_failed"] == 1


def test_many_workers_with_load_hangs_and_crashes_serve_with_the_rest(tmp_path):
    fake = {**FAKE, "load_hang_workers": [1, 3, 5], "load_crash_workers": [2, 4]}
    with run_daemon(tmp_path, workers=8, fake=fake, wait_ready=False,
                    daemon={"max_parallel_loads": 2},
                    timeouts={"load_s": 2.0}) as d:
        status = d.wait_for(
            lambda s: sum(w["state"] == "failed" for w in s["workers"]) == 5
            and s["daemon"]["ready_workers"] == 3, 120, "3 ready and 5 failed workers")
        failed = {w["id"]: w["reason"] for w in status["workers"] if w["state"] == "failed"}
        assert sorted(failed) == [1, 2, 3, 4, 5]
        for i in (1, 3, 5):
            assert "no READY within load_s=2" in failed[i], failed[i]
        for i in (2, 4):
            assert "exited with status 70" in failed[i], failed[i]
        assert all("gave up after 2 load attempts" in r for r in failed.values())
        with d.client() as c:  # and it serves
            frames, _, _ = collect(c.speak("Still here.", seed=9))
            assert_frames_exact(frames, 9)


def test_sigterm_under_load_drains_cleanly(tmp_path):
    with run_daemon(tmp_path, fake={**FAKE, "frame_ms": 10},
                    daemon={"queue_size": 8, "drain_timeout_s": 20}) as d:
        c = d.client()
        running = c.speak(SPEECH, seed=5)
        queued = c.speak(SPEECH, seed=6)  # waits behind the first: handed back on drain
        first, audio_seen = first_frame(running)
        assert first.index == 0
        d.proc.send_signal(signal.SIGTERM)
        rest, _, done = collect(running, first_index=1, first_audio=audio_seen)
        assert done is not None, "the in-flight job must finish during the drain"
        with pytest.raises(JobFailedError) as err:
            collect(queued)
        assert err.value.code == P.E_DRAINING
        assert d.proc.wait(timeout=30) == 0
        c.close()
    # run_daemon's teardown asserts exit 0, no segment, no process, no socket left


def test_second_sigterm_exits_at_once_without_leaks(tmp_path):
    with run_daemon(tmp_path, fake={**FAKE, "frame_ms": 50},
                    daemon={"drain_timeout_s": 60}) as d:
        c = d.client()
        events = c.speak(SPEECH * 3, seed=5)
        first_frame(events)
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
        c.close()


def test_malformed_client_messages_get_errors_while_jobs_continue(tmp_path):
    with run_daemon(tmp_path, fake={**FAKE, "frame_ms": 5}) as d, d.client() as c:
        job = c.speak(SPEECH, seed=12)
        event, audio_seen = first_frame(job)
        frames = [np.array(event.array)]
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.RCVTIMEO, 5000)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(d.endpoint)
        enc = msgspec.msgpack.Encoder()
        bad = [b"\xc1", enc.encode({"type": "nope", "v": V, "req_id": 1}),
               enc.encode({"type": "speak", "v": 7, "req_id": 2, "text": "x"}),
               enc.encode({"type": "speak", "v": V, "req_id": 3}),
               enc.encode({"type": "lipsync", "v": V, "req_id": 4, "sample_rate": 16000,
                           "audio": {"at": "inline", "part": 1, "shape": [10],
                                     "dtype": "float32"}})]
        for message in bad:
            raw.send(message)
            reply, _ = P.SERVER_CODEC.decode(raw.recv_multipart())
            assert isinstance(reply, P.Error) and reply.field, reply
        # A job request before hello, and one with a lying inline shape after hello.
        raw.send_multipart(P.Codec.encode(P.make(P.Hello, req_id=5, inline=True)))
        P.SERVER_CODEC.decode(raw.recv_multipart())
        raw.send_multipart(P.Codec.encode(P.make(
            P.Lipsync, req_id=6, sample_rate=16000,
            audio=P.Inline(part=1, shape=[1000], dtype="float32")), b"\x00" * 12))
        reply, _ = P.SERVER_CODEC.decode(raw.recv_multipart())
        assert (reply.code, reply.field) == (P.E_BAD_MESSAGE, "audio.shape")
        raw.close()
        rest, _, done = collect(job, first_index=1, first_audio=audio_seen)
        assert done is not None
        assert_frames_exact(frames + rest, 12)
        assert d.status()["jobs"]["bad_messages"] == len(bad) + 1  # + the lying shape


def test_full_queue_answers_busy_with_a_retry_hint(tmp_path):
    with run_daemon(tmp_path, fake={**FAKE, "frame_ms": 20},
                    daemon={"queue_size": 1}) as d, d.client() as c:
        first = c.speak(SPEECH, seed=1)
        running, audio_seen = first_frame(first)
        second = c.speak(SPEECH, seed=2)  # queued: fills the queue
        with pytest.raises(BusyError) as err:
            c.speak(SPEECH, seed=3)
        assert err.value.retry_after_s > 0
        c.cancel(running.job_id)
        with pytest.raises(JobFailedError, match="cancelled"):
            collect(first, first_index=1, first_audio=audio_seen)
        _, _, done = collect(second)
        assert done is not None


def test_job_deadline_fails_the_job_and_frees_the_worker(tmp_path):
    with run_daemon(tmp_path, fake={**FAKE, "frame_ms": 50}) as d, d.client() as c:
        with pytest.raises(JobFailedError) as err:
            collect(c.speak(SPEECH * 4, seed=1, deadline_s=1.0))
        assert err.value.code == P.E_TIMEOUT
        frames, _, done = collect(c.speak("Short.", seed=2))
        assert done is not None and len(frames) == done.frames


def test_bad_requests_are_refused_with_the_field(tmp_path):
    with run_daemon(tmp_path, fake=FAKE) as d, d.client() as c:
        with pytest.raises(ClientError) as err:
            c.speak("hello", avatar="no-such-avatar")
        assert err.value.field == "avatar_id"
        with pytest.raises(ClientError) as err:
            c.speak("   ")
        assert err.value.field == "text"
        with pytest.raises(ClientError) as err:
            c.speak("x" * 1_000_000)  # 1 MB of text
        assert err.value.field == "text" and "length <= 100000" in str(err.value)
        with pytest.raises(ClientError) as err:
            c.lipsync(np.zeros(100, np.float32), 1000)
        assert "sample_rate" in str(err.value)


def test_status_json_lists_workers(tmp_path):
    import json
    import subprocess

    from daemon_harness import AVATARD

    with run_daemon(tmp_path, workers=2, fake=FAKE) as d:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] == 2, 60, "two ready workers")
        out = subprocess.run([AVATARD, "status", "--json", "--endpoint", d.endpoint],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        body = json.loads(out.stdout)
        assert [w["id"] for w in body["workers"]] == [0, 1]
        for w in body["workers"]:
            assert {"id", "pid", "state", "device", "restarts", "rss_bytes", "uptime_s",
                    "current_jobs", "device_memory_bytes"} <= set(w)
            assert w["state"] == "ready" and w["device"] == "cpu" and w["pid"] > 0
        text = subprocess.run([AVATARD, "status", "--endpoint", d.endpoint],
                              capture_output=True, text=True, timeout=60)
        assert "ready" in text.stdout and "queue 0/64" in text.stdout


def test_bad_config_is_refused_with_the_key(tmp_path):
    import subprocess

    from daemon_harness import AVATARD

    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nworkers = 0\n")
    out = subprocess.run([AVATARD, "serve", "--config", str(bad)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 78  # EX_CONFIG
    assert "daemon.workers" in out.stderr and ">= 1" in out.stderr


def test_status_without_daemon_says_what_it_waited_for(tmp_path):
    import subprocess

    from daemon_harness import AVATARD

    out = subprocess.run([AVATARD, "status", "--endpoint", f"ipc://{tmp_path}/none.sock",
                          "--timeout", "0.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "no Hello from a daemon" in out.stderr and "0.5 s" in out.stderr
    assert "none.sock does not exist" in out.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_loads_are_staggered_one_at_a_time(tmp_path):
    import re

    with run_daemon(tmp_path, workers=3, fake={**FAKE, "load_s": 0.4}, wait_ready=False) as d:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] == 3, 60, "three ready workers")
        events = []
        for line in d.log_text().splitlines():
            m = re.search(r"worker (\d+): \w+ -> (starting|ready)", line)
            if m:
                events.append((m.group(2), int(m.group(1))))
        # max_parallel_loads = 1: each start waits for the previous worker's READY.
        assert events == [("starting", 0), ("ready", 0), ("starting", 1), ("ready", 1),
                          ("starting", 2), ("ready", 2)], events


def test_prometheus_endpoint_serves_worker_and_job_metrics(tmp_path):
    import urllib.request

    pytest.importorskip("prometheus_client")
    port = free_port()
    with run_daemon(tmp_path, fake=FAKE, daemon={"metrics_port": port}) as d, d.client() as c:
        collect(c.speak("Hello.", seed=1))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = body.decode()
        assert 'avatard_workers{state="ready"} 1.0' in text
        assert 'avatard_jobs_total{outcome="done"} 1.0' in text
        assert "avatard_frames_delivered_total" in text


def test_registrations_are_counted_apart_from_jobs(tmp_path):
    import subprocess
    import urllib.request

    from daemon_harness import AVATARD

    pytest.importorskip("prometheus_client")
    port = free_port()
    with run_daemon(tmp_path, fake=FAKE, daemon={"metrics_port": port}) as d, d.client() as c:
        # The fake engine refuses an empty image as bad input, as a real one refuses a
        # picture without a face: the client's error, not a failed render job.
        with pytest.raises(ClientError, match="bad_input"):
            c.register_avatar(b"")
        avatar = c.register_avatar(b"a portrait")
        *_, done = collect(c.speak("Hello.", avatar=avatar, seed=1))
        assert done is not None
        status = d.status()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        printed = subprocess.run([AVATARD, "status", "--endpoint", d.endpoint],
                                 capture_output=True, text=True, timeout=60)
    jobs = status["jobs"]
    assert (jobs["jobs_done"], jobs["jobs_failed"], jobs["jobs_cancelled"]) == (1, 0, 0)
    assert status["registrations"] == {"registered": 1, "refused": 1, "failed": 0,
                                       "requeued": 0}
    metrics = text.decode()
    assert 'avatard_jobs_total{outcome="failed"} 0.0' in metrics
    assert 'avatard_jobs_total{outcome="done"} 1.0' in metrics
    assert 'avatard_avatar_registrations_total{outcome="registered"} 1.0' in metrics
    assert 'avatard_avatar_registrations_total{outcome="refused"} 1.0' in metrics
    assert printed.returncode == 0, printed.stderr
    assert "jobs done 1, failed 0," in printed.stdout
    assert "portraits registered 1, refused 1, failed 0" in printed.stdout


def _hello_then_die(endpoint, ready_q):
    from avatard.ipc.client import Client

    # A local session with an input ring, then SIGKILL. Kept referenced: a collected
    # Client closes its socket, and a closed connection ends its session at once.
    client = Client(endpoint, timeout_s=10)
    ready_q.put(1)
    time.sleep(600)
    client.close()


def test_sessions_of_vanished_clients_expire_and_idle_clients_reconnect(tmp_path):
    from conftest import spawn_context

    with run_daemon(tmp_path, fake=FAKE, timeouts={"session_idle_s": 1.0}) as d:
        ctx = spawn_context()
        ready_q = ctx.Queue()
        proc = ctx.Process(target=_hello_then_die, args=(d.endpoint, ready_q))
        proc.start()
        ready_q.get(timeout=30)
        rings = [n for n in d.segments() if n.endswith("-s.in")]
        assert len(rings) == 1, "the client's session owns one input ring"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                n.endswith("-s.in") for n in d.segments()):
            time.sleep(0.1)
        assert not [n for n in d.segments() if n.endswith("-s.in")]
        with d.client(inline=True) as c:
            time.sleep(1.5)  # the session expires while the client idles
            frames, _, done = collect(c.speak("Back again.", seed=3))
            assert done is not None
            assert_frames_exact(frames, 3)


def test_local_clients_get_frames_only_from_rings_of_their_own_session(tmp_path):
    with run_daemon(tmp_path, fake=FAKE) as d, d.client() as a, d.client() as b:
        def rings_of(client, seed):
            names = set()
            for event in client.speak("Hello there.", seed=seed):
                if isinstance(event, FrameEvent | AudioEvent):
                    names.update(client._rings)  # every segment this client mapped
            return names

        rings_a, rings_b = rings_of(a, 1), rings_of(b, 2)
        assert rings_a and rings_b and not rings_a & rings_b
        assert all(name.endswith(("-s.frames", "-s.audio")) for name in rings_a | rings_b)


def test_a_worker_that_fails_to_load_exits_cleanly_with_its_status(tmp_path):
    # The worker reports why, closes its engines and socket, and exits 2 (3 for out of
    # memory): no traceback of its own shutdown in the log.
    with run_daemon(tmp_path, workers=1, fake={**FAKE, "load_error": True},
                    wait_ready=False, restart={"max_load_attempts": 1}) as d:
        status = d.wait_for(lambda s: s["workers"][0]["state"] == "failed", 60,
                            "the worker to give up loading")
        reason = status["workers"][0]["reason"]
        assert "load failed: RuntimeError" in reason and "exited with status 2" in reason
    assert "Traceback" not in d.log_text().split("injected load error")[-1]


def test_a_slow_engine_is_not_taken_for_a_slow_client(tmp_path):
    """The Client gives a frame's slot back when asked for the next event, before it
    waits: frames that take longer than client_call_s to render do not end the job."""
    pcm = np.zeros(16000 // 5, np.float32)  # 5 frames
    with run_daemon(tmp_path, fake={**FAKE, "frame_ms": 1500},
                    timeouts={"client_call_s": 1.0, "stall_timeout_s": 20}) as d, \
            d.client() as c:
        frames, _, done = collect(c.lipsync(pcm, 16000, seed=2))
        assert done is not None and len(frames) == 5
        assert_frames_exact(frames, 2)


def test_a_job_that_completed_while_its_client_held_slots_too_long_is_not_done(tmp_path):
    """A client that reads nothing for longer than client_call_s loses its slots. When
    the job had already completed (its `done` queued behind the frames), the client must
    report a failure, not a `done` that would hide the frames it never got."""
    pcm = np.zeros(16000 // 5, np.float32)  # 5 frames: all fit in the frame ring at once
    with run_daemon(tmp_path, fake=FAKE, timeouts={"client_call_s": 1.0},
                    sections={"rings": {"frame_slots": 16, "audio_slots": 16}}) as d, \
            d.client() as c:
        events = c.lipsync(pcm, 16000, seed=2)
        d.wait_for(lambda s: s["queue"]["running"] == 0, 20, "the job to complete")
        time.sleep(2.5)  # past client_call_s (and the supervisor's next check of it)
        with pytest.raises(JobFailedError) as failure:
            for _ in events:
                pass
        assert failure.value.code == P.E_TIMEOUT
        assert "client_call_s" in str(failure.value) and "completed" in str(failure.value)
        # The daemon keeps serving the same client.
        frames, _, done = collect(c.lipsync(pcm, 16000, seed=3))
        assert done is not None and len(frames) == 5
