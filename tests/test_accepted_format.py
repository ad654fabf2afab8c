"""`accepted` announces the media a job will produce (fps, frame size, audio rate), against
real daemons with the fake engines: the figures come from the workers' READY reports and
the portrait's registration, and the frames and audio that follow match them."""

from __future__ import annotations

import io
import subprocess
import sys

import msgspec
import numpy as np
import pytest
import zmq
from daemon_harness import run_daemon
from PIL import Image

from avatard.ipc import protocol as P
from avatard.ipc.client import AudioEvent, DoneEvent, FrameEvent

# The fake engine at 30 fps: no engine we ship renders at the 25 fps a client would assume.
FAKE = {"portrait_size": True, "width": 32, "height": 24, "fps": 30}
SPEECH = "One two three. Four five."
TIMEOUT_S = 20.0


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (20, 40, 60)).save(out, format="PNG")
    return out.getvalue()


def announced(job) -> tuple[int, int, int, int]:
    return job.fps, job.width, job.height, job.audio_rate


def check_events(job) -> int:
    """Read a job to its end; every frame and audio chunk matches what was announced.
    Returns the frame count."""
    frames = 0
    for event in job:
        if isinstance(event, FrameEvent):
            assert event.array.shape == job.frame_shape
            assert event.pts_us == event.index * 1_000_000 // job.fps
            frames += 1
        elif isinstance(event, AudioEvent):
            assert event.sample_rate == job.audio_rate
    assert isinstance(event, DoneEvent) and event.frames == frames > 0
    return frames


@pytest.mark.parametrize("inline", [False, True], ids=["shm", "inline"])
def test_accepted_announces_fps_frame_size_and_audio_rate(tmp_path, inline):
    with run_daemon(tmp_path, fake=FAKE) as d, d.client(inline=inline) as client:
        default = client.speak(SPEECH, seed=1)
        assert announced(default) == (30, 32, 24, 16000)  # the fake TTS speaks at 16 kHz
        check_events(default)
        silent = client.speak(SPEECH, seed=1, send_audio=False)
        assert announced(silent) == (30, 32, 24, 0)  # no audio events, so no rate
        check_events(silent)
        # A registered portrait: the frame size its registration reported.
        portrait = client.register_avatar(png(48, 40))
        own = client.speak(SPEECH, avatar=portrait, seed=2)
        assert announced(own) == (30, 48, 40, 16000) and own.frame_shape == (40, 48, 3)
        check_events(own)
        pcm = (0.3 * np.sin(np.arange(8000) / 7)).astype(np.float32)
        lipsync = client.lipsync(pcm, 16000, avatar=portrait, seed=3)
        assert announced(lipsync) == (30, 48, 40, 0)  # lipsync sends no audio events
        assert check_events(lipsync) == 15  # 0.5 s at 30 fps


def test_accepted_of_a_transcribe_job_announces_no_media(tmp_path):
    """On the wire, as docs/protocol.md shows it: every media figure of a job without
    frames or audio events is 0."""
    pcm = (0.3 * np.sin(np.arange(16000) / 7)).astype(np.float32)
    with run_daemon(tmp_path, fake=FAKE) as d:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(d.endpoint)
            sock.send(msgspec.msgpack.encode(
                {"type": "hello", "v": P.PROTOCOL_VERSION, "req_id": 1, "inline": True}))
            assert sock.poll(int(TIMEOUT_S * 1000)), f"no welcome within {TIMEOUT_S} s"
            welcome, _ = P.SERVER_CODEC.decode(sock.recv_multipart())
            assert isinstance(welcome, P.Welcome)
            sock.send_multipart([msgspec.msgpack.encode(
                {"type": "transcribe", "v": P.PROTOCOL_VERSION, "req_id": 2,
                 "sample_rate": 16000,
                 "audio": {"at": "inline", "part": 1, "shape": [pcm.size],
                           "dtype": "float32"}}), pcm.tobytes()])
            assert sock.poll(int(TIMEOUT_S * 1000)), f"no accepted within {TIMEOUT_S} s"
            accepted, _ = P.SERVER_CODEC.decode(sock.recv_multipart())
            sock.send(msgspec.msgpack.encode({"type": "bye", "v": P.PROTOCOL_VERSION,
                                              "req_id": 3}))
        finally:
            sock.close(linger=0)
    assert isinstance(accepted, P.Accepted) and accepted.req_id == 2
    assert (accepted.fps, accepted.width, accepted.height, accepted.audio_rate) == (0, 0, 0, 0)


def test_a_job_accepted_before_any_worker_loaded_announces_zeros(tmp_path):
    # The only worker hangs while loading: the job waits in the queue, and nothing is
    # known yet of the engines that will run it.
    with run_daemon(tmp_path, fake={**FAKE, "load_hang": True}, wait_ready=False,
                    timeouts={"load_s": 300.0}) as d:
        d.wait_for(lambda s: s["workers"][0]["state"] == "loading", 60, "a loading worker")
        with d.client() as client:
            job = client.speak(SPEECH, seed=1)
            assert announced(job) == (0, 0, 0, 0) and job.frame_shape is None
            assert job.queue_position == 0
            job.close()


def test_a_version_1_client_is_told_the_version_before_anything_else(tmp_path):
    """A version 1 client would refuse `accepted`'s new fields as unknown: it is refused
    up front, with the version it must speak, instead of failing after its job started."""
    with run_daemon(tmp_path, fake=FAKE) as d:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(d.endpoint)
            sock.send(msgspec.msgpack.encode({"type": "hello", "v": 1, "req_id": 5}))
            assert sock.poll(int(TIMEOUT_S * 1000)), f"no error within {TIMEOUT_S} s"
            reply, _ = P.SERVER_CODEC.decode(sock.recv_multipart())
        finally:
            sock.close(linger=0)
    assert isinstance(reply, P.Error) and reply.req_id == 5
    assert (reply.code, reply.field) == (P.E_BAD_VERSION, "v")
    assert reply.rule == f"must be {P.PROTOCOL_VERSION}, got 1"


@pytest.mark.timeout(300)
def test_render_writes_the_mp4_at_the_announced_fps(tmp_path):
    pytest.importorskip("av")
    from avatard.engines.mux import read_mp4

    out = tmp_path / "thirty.mp4"
    with run_daemon(tmp_path, fake={"fps": 30, "width": 64, "height": 48}) as d:
        result = subprocess.run(
            [sys.executable, "-m", "avatard.daemon.cli", "render", "Hello there.", "-o",
             str(out), "--endpoint", d.endpoint], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    info = read_mp4(out)
    assert info.frame_count > 0
    assert info.video_duration_s == pytest.approx(info.frame_count / 30, abs=1e-6)
    assert abs(info.audio_duration_s - info.video_duration_s) <= 1 / 30
