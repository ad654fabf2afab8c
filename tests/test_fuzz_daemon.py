"""A real daemon fed hostile messages over its client socket keeps serving: every reply is
a valid protocol message, Health is still answered and a job still renders exact frames."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq
from daemon_harness import run_daemon

from avatard.engines.fake import expected_frame
from avatard.ipc import protocol as P
from avatard.ipc.client import DaemonUnavailable, FrameEvent

V = P.PROTOCOL_VERSION  # the version every well-formed message carries

ENC = msgspec.msgpack.Encoder()
SIZE = 16
TEMPLATES: dict[str, dict[str, Any]] = {
    "hello": {"client": "fuzz", "inline": False},
    "health": {},
    "stats": {},
    "voices": {},
    "register_avatar": {"image": {"at": "inline", "part": 1, "shape": [8], "dtype": "uint8"}},
    "speak": {"text": "hi", "seed": 1},
    "lipsync": {"audio": {"at": "shm", "ring": "r", "slot": 0, "seq": 1, "shape": [4],
                          "dtype": "float32"}, "sample_rate": 16000},
    "transcribe": {"audio": {"at": "inline", "part": 1, "shape": [4], "dtype": "float32"},
                   "sample_rate": 16000},
    "cancel": {"job_id": "j1"},
    "live_open": {"seed": 2},
    "live_audio": {"job_id": "j1", "segment_id": "s", "sample_rate": 16000,
                   "audio": {"at": "inline", "part": 1, "shape": [4], "dtype": "float32"}},
    "live_interrupt": {"job_id": "j1"},
    "release": {"ring": "avatard-1-1-0000000000000000-w0.frames", "slot": 0, "seq": 0},
    "w_hello": {"worker": 0, "pid": 1, "device": "cpu", "attempt": 1},
}


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack value, nested at most 4 deep (deep nesting is its own test)."""
    pick = rng.randrange(9 if depth < 4 else 7)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)])
    if pick == 3:
        return rng.choice([0.0, -0.0, float("nan"), float("inf"), 1e308, -5.5])
    if pick == 4:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    if pick == 5:
        return rng.randbytes(rng.randrange(16))
    if pick == 6:
        return "x" * rng.choice([0, 256, 257, 4097, 100_001])
    if pick == 7:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {str(_value(rng, 4))[:10]: _value(rng, depth + 1) for _ in range(rng.randrange(5))}


def hostile_message(rng: random.Random) -> list[bytes]:
    """One multipart message: random bytes, a mutated request, or a broken envelope."""
    roll = rng.random()
    if roll < 0.15:
        return [rng.randbytes(rng.randrange(64))]
    if roll < 0.2:
        return [rng.randbytes(8) for _ in range(rng.randrange(1, 12))]
    if roll < 0.23:
        return [b"\x81\xa4type" + b"\xc1" * 64]  # 0xc1 is never valid msgpack
    if roll < 0.25:
        return [b"\x84\xa4type\xa5speak\xa1v" + bytes([V]) + b"\xa6req_id\x10\xa4text\xa2\xff\xfe"]
    if roll < 0.27:
        return [b"\x80" + b"\x00" * P.MAX_CONTROL_BYTES]  # over the control-part limit
    kind = rng.choice(sorted(TEMPLATES))
    msg: dict[str, Any] = {"type": kind, "v": V, "req_id": rng.randrange(2**40),
                           **TEMPLATES[kind]}
    for _ in range(rng.randrange(4)):
        op = rng.randrange(3)
        if op == 0 and msg:
            msg[rng.choice(sorted(msg))] = _value(rng)
        elif op == 1 and msg:
            msg.pop(rng.choice(sorted(msg)))
        else:
            msg[str(_value(rng, 4))[:10]] = _value(rng)
    return [ENC.encode(msg), *(rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(3)))]


def _drain(sock: zmq.Socket, until: float) -> list[P.Msg]:
    replies = []
    while sock.poll(max(0, int((until - time.monotonic()) * 1000)), zmq.POLLIN):
        parts = sock.recv_multipart()
        try:
            msg, _ = P.SERVER_CODEC.decode(parts)  # a valid reply, always...
        except P.ProtocolError as exc:
            # ...but for the known bug pinned in test_fuzz_protocol.py: a request whose
            # req_id is a boolean gets an error reply echoing `req_id: true`.
            assert exc.field == "req_id" and "got `bool`" in exc.rule, exc
            msg = P.make(P.Error, req_id=0, code=P.E_BAD_MESSAGE, field="req_id",
                         rule="(bool echoed)")
        replies.append(msg)
    return replies


@pytest.mark.timeout(120)
def test_daemon_keeps_serving_after_hostile_messages(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    fake = {"width": SIZE, "height": SIZE}
    with run_daemon(tmp_path, fake=fake) as d:
        ctx = zmq.Context.instance()
        socks = []
        for _ in range(3):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(d.endpoint)
            socks.append(sock)
        sent = 0
        try:
            for _ in range(600):
                sock = rng.choice(socks)
                sock.send_multipart(hostile_message(rng))
                sent += 1
            # A mutated hello may have opened a session and a mutated speak started a job
            # on these raw sockets, which never release frames: say bye for them.
            for sock in socks:
                sock.send(ENC.encode({"type": "bye", "v": V, "req_id": 1}))
            replies = []
            for sock in socks:
                replies += _drain(sock, time.monotonic() + 2.0)
        finally:
            for sock in socks:
                sock.close(linger=0)
        errors = [r for r in replies if isinstance(r, P.Error)]
        assert len(errors) > sent // 2, f"{len(errors)} error replies to {sent} messages"
        assert all(e.field and e.rule for e in errors if e.code != P.E_STALE)
        assert d.proc.poll() is None, d.log_text()[-3000:]
        with d.client(timeout_s=20) as c:
            assert c.health().status == "ready"
            assert c.stats()["jobs"]["bad_messages"] >= len(errors) // 2
            frames = [e for e in c.speak("Still serving.", seed=3) if isinstance(e, FrameEvent)
                      and np.array_equal(e.array, expected_frame(3, e.index, SIZE, SIZE))]
            assert len(frames) > 0


@pytest.mark.timeout(120)
def test_deeply_nested_message_does_not_stop_the_daemon(tmp_path: Path) -> None:
    with run_daemon(tmp_path, fake={"width": SIZE, "height": SIZE}) as d:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(d.endpoint)
        try:
            sock.send(b"\x83\xa4type" + b"\x91" * 2000 + b"\xc0\xa1v" + bytes([V])
                      + b"\xa6req_id\x01")
            reply = _drain(sock, time.monotonic() + 3.0)
        finally:
            sock.close(linger=0)
        assert reply and isinstance(reply[0], P.Error), "no error reply"
        try:
            with d.client(timeout_s=5) as c:
                assert c.health().status == "ready"
        except DaemonUnavailable:
            pytest.fail(f"daemon stopped: exit {d.proc.poll()}\n{d.log_text()[-1500:]}")
