"""A local client that dies mid-stream (SIGKILL: no bye, slots never released) must not
hold the only worker until client_call_s or the job deadline: the daemon sees its process
gone and cancels its jobs. A slow client that is alive keeps its job."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import zmq
from daemon_harness import free_port, run_daemon

from avatard.ipc import protocol as P
from avatard.ipc.client import Client, DoneEvent, FrameEvent
from avatard.ipc.sockets import ClientPort

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


# ---------------------------------------------------------------- remote (tcp) clients
# A tcp client has no pid the daemon can watch and gets its frames inline: frames to a
# dead one went nowhere and its job ran on at full speed. Here the job is long enough
# (about 10 000 frames at 10 ms: 100 s) that only noticing the closed connection frees
# the worker within these tests' bounds.
TCP_FAKE = {"width": 32, "height": 32, "frame_ms": 10.0}


def tcp_job_then_wait(endpoint: str, ready, frames_first: int) -> None:
    """Child: start a long job over tcp, read `frames_first` frames (0: none, the job may be
    queued), report its pid, then sleep without reading."""
    client = Client(endpoint, timeout_s=60.0)
    job = client.speak(LONG_TEXT, seed=4)
    got = 0
    while got < frames_first:
        if isinstance(next(job), FrameEvent):
            got += 1
    ready.put(os.getpid())
    time.sleep(3600)


def _start_child(endpoint: str, frames_first: int):
    ready = SPAWN.Queue()
    child = SPAWN.Process(target=tcp_job_then_wait, args=(endpoint, ready, frames_first),
                          daemon=True)
    child.start()
    assert ready.get(timeout=60) == child.pid, "the child's job started"
    return child


def _kill(child) -> None:
    if child.is_alive():
        os.kill(child.pid, signal.SIGCONT)  # a stopped child dies of SIGKILL all the same
        child.kill()
    child.join(10)


def test_a_killed_tcp_client_frees_the_worker_and_its_queued_job_is_cancelled(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with run_daemon(tmp_path, workers=1, fake=TCP_FAKE, timeouts=PATIENT,
                    daemon={"tcp_endpoint": endpoint, "job_deadline_s": 600.0}) as d:
        running = _start_child(endpoint, frames_first=2)
        queued = None
        try:
            d.wait_for(lambda s: s["workers"][0]["current_jobs"], 30, "the first job running")
            # Its job waits behind the first one (one worker, one job at a time).
            queued = _start_child(endpoint, frames_first=0)
            d.wait_for(lambda s: s["queue"]["depth"] == 1, 30, "a queued job")
            os.kill(queued.pid, signal.SIGKILL)
            d.wait_for(lambda s: s["jobs"]["jobs_cancelled"] == 1
                       and s["queue"]["depth"] == 0, 15,
                       "the killed client's queued job cancelled")
            assert d.status()["workers"][0]["current_jobs"], "the living client's job runs on"
            os.kill(running.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # Without noticing the closed connection the worker would run the dead client's
            # job for about 100 s more.
            with Client(endpoint, timeout_s=60.0) as nxt:
                first_frame_after_s = None
                for event in nxt.speak("Next please.", seed=2):
                    if isinstance(event, FrameEvent) and first_frame_after_s is None:
                        first_frame_after_s = time.monotonic() - killed_at
                    elif isinstance(event, DoneEvent):
                        assert event.frames > 0
            assert first_frame_after_s is not None and first_frame_after_s < 15.0, (
                f"the next job's first frame came {first_frame_after_s} s after the kill")
            assert d.status()["jobs"]["jobs_cancelled"] == 2
            assert "connection closed" in d.log_text()
        finally:
            for child in (running, queued):
                if child is not None:
                    _kill(child)


def test_a_slow_tcp_client_keeps_its_job_and_a_stopped_one_is_dropped(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # Heartbeats every 0.2 s, a connection silent for 1 s dropped: far shorter than the
    # slow client's pause, which must not matter (its ZeroMQ answers while it sleeps).
    with run_daemon(tmp_path, workers=1, fake=TCP_FAKE,
                    timeouts={**PATIENT, "tcp_heartbeat_timeout_s": 1.0},
                    daemon={"tcp_endpoint": endpoint, "job_deadline_s": 600.0}) as d:
        with Client(endpoint, timeout_s=60.0) as slow:
            frames = 0
            for event in slow.speak("A short answer. And a second sentence.", seed=1):
                if isinstance(event, FrameEvent):
                    frames += 1
                    if frames in (2, 20):
                        time.sleep(3.0)  # reads nothing for three heartbeat timeouts
                elif isinstance(event, DoneEvent):
                    assert event.frames == frames > 20
        assert d.status()["jobs"]["jobs_cancelled"] == 0
        # A stopped client process is what a host that vanished without closing its
        # connection looks like from here: nothing comes back, not even heartbeats.
        stopped = _start_child(endpoint, frames_first=2)
        try:
            d.wait_for(lambda s: s["workers"][0]["current_jobs"], 30, "the child's job")
            os.kill(stopped.pid, signal.SIGSTOP)
            d.wait_for(lambda s: s["jobs"]["jobs_cancelled"] == 1
                       and not s["workers"][0]["current_jobs"], 15,
                       "the stopped client's job cancelled and its worker free")
        finally:
            _kill(stopped)


# ---------------------------------------------------------------- the port itself


def _health(sock: zmq.Socket, req_id: int) -> None:
    sock.send_multipart(P.Codec.encode(P.make(P.Health, req_id=req_id)))


def _receive_one(port: ClientPort) -> bytes:
    """The identity of the next request the port reads (waits up to 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if port.sock.poll(100):
            for identity, _msg, _extra in port.receive():
                return identity
    raise AssertionError("no request reached the port within 10 s")


def _closed_within(port: ClientPort, timeout_s: float) -> list[bytes]:
    """What `closed_connections` reports once it reports something (or [] at the end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        closed = port.closed_connections()
        if closed:
            return closed
        time.sleep(0.05)
    return []


def test_a_closed_connection_is_not_taken_for_the_next_one_on_its_fd(tmp_path):
    """The kernel gives a new connection the fd of one that just closed; the port must
    report the closed one, never the new one that now has its number."""
    ctx = zmq.Context()
    port = ClientPort(ctx, f"ipc://{tmp_path}/run/avatard.sock")
    socks = []
    try:
        first = ctx.socket(zmq.DEALER)
        first.connect(port.endpoints[0])
        _health(first, 1)
        first_id = _receive_one(port)
        first.close(linger=0)
        time.sleep(0.3)  # libzmq has seen the close and freed the fd (not asserted on)
        second = ctx.socket(zmq.DEALER)
        socks.append(second)
        second.connect(port.endpoints[0])
        _health(second, 2)
        second_id = _receive_one(port)
        assert second_id != first_id
        assert _closed_within(port, 10) == [first_id]
        assert port.closed_connections() == [], "the living connection is not reported"
        second.close(linger=0)
        assert _closed_within(port, 10) == [second_id]
    finally:
        for sock in socks:
            sock.close(linger=0)
        port.close()
        ctx.term()


def test_peer_pid_of_a_connection_already_closed_is_none_not_an_error():
    """libzmq may close a connection (a client that sent and hung up at once) before the
    daemon reads its first message's fd: reading the peer then finds no descriptor. That
    must be "unknown peer", never an exception in the supervisor's loop (it was: the
    daemon exited with EBADF)."""
    import socket

    from avatard.ipc.sockets import peer_pid

    left, right = socket.socketpair()
    try:
        assert peer_pid(left.fileno()) == os.getpid()  # a live local peer: its pid
    finally:
        right.close()
    fd = left.detach()
    os.close(fd)
    assert peer_pid(fd) is None
