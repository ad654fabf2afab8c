"""Unit tests of daemon/sessions.py (Sessions): client sessions, their rings, delivery and
expiry, on a fake clock with a fake port. Rings are real shared-memory segments (tiny
ones); every test closes them all (the autouse leak check in conftest.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from avatard.daemon.config import RingsConfig
from avatard.daemon.sessions import Sessions
from avatard.ipc import protocol as P
from avatard.ipc import segments
from avatard.ipc.ring import FREE, READY, WRITING

T0 = 1000.0
RINGS = RingsConfig(frame_slots=2, frame_slot_bytes=1024, audio_slots=2, audio_slot_bytes=1024,
                    input_slots=2, input_slot_bytes=1024, inline_slots=2, inline_slot_bytes=1024)
LOCAL, OTHER, REMOTE = b"local-client", b"other-client", b"remote-client"


class FakeTracker:
    def __init__(self) -> None:
        self.done = False


class FakePort:
    """Records what Sessions sends; `track=False` answers send_parts without a tracker."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, P.Msg, tuple]] = []
        self.parts: list[tuple[bytes, list[bytes], bool]] = []
        self.trackers: list[FakeTracker] = []
        self.track = True

    def send(self, identity: bytes, msg: P.Msg, *extra: bytes | memoryview) -> None:
        self.sent.append((identity, msg, extra))

    def send_parts(self, identity: bytes, parts: list, track: bool = False):
        self.parts.append((identity, [bytes(p) for p in parts], track))
        if not self.track:
            return None
        tracker = FakeTracker()
        self.trackers.append(tracker)
        return tracker


@pytest.fixture
def port() -> FakePort:
    return FakePort()


@pytest.fixture
def sessions(port):
    s = Sessions(RINGS, port, client_call_s=30.0, session_idle_s=300.0)
    try:
        s.add_worker_rings(2)
        yield s
    finally:
        s.close_all()


def shm_exists(name: str) -> bool:
    return (segments.SHM_DIR / name).exists()


def refused(call, *args) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        call(*args)
    return info.value


def worker_writes(sessions: Sessions, ring_name: str, fill: int = 7,
                  nbytes: int = 16) -> P.SlotDesc:
    """What a worker does: write a slot of an output ring, publish it, send its descriptor."""
    ref = sessions.output_rings[ring_name].write(np.full(nbytes, fill, np.uint8), timeout_s=0.0)
    return P.SlotDesc.from_ref(ref)


def frame(desc: P.SlotDesc, index: int = 0) -> P.Frame:
    return P.make(P.Frame, job_id="j1", index=index, pts_us=index * 40_000, data=desc)


def release(desc: P.SlotDesc, req_id: int = 3) -> P.Release:
    return P.make(P.Release, req_id=req_id, ring=desc.ring, slot=desc.slot, seq=desc.seq)


# ------------------------------------------------------------------ lifecycle


def test_a_local_sessions_input_ring_is_the_size_the_docs_say_and_reserved(port):
    """docs/security.md and docs/config.md state what a local session takes in /dev/shm
    with the default [rings]: the ring the daemon really makes, every page reserved."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    security = (docs / "security.md").read_text(encoding="utf-8")
    config_doc = (docs / "config.md").read_text(encoding="utf-8")
    sessions = Sessions(RingsConfig(), port, client_call_s=30.0, session_idle_s=300.0)
    try:
        ring = sessions.hello(LOCAL, False, T0).input_ring
        assert ring is not None
        stat = os.stat(segments.SHM_DIR / ring.name)
        assert stat.st_blocks * 512 >= stat.st_size  # reserved up front, not sparse
        mib = stat.st_size / (1 << 20)
    finally:
        sessions.close_all()
    said = re.search(r"its own input ring: (\d+) MiB with the default", security)
    assert said and int(said.group(1)) == round(mib), (said, mib)
    assert "reserved in /dev/shm when the ring is made" in security
    assert "sparse" not in security
    row = re.search(r"\| each local session \(`inline = false`\) \| [^|]+\| ([\d.]+) \|",
                    config_doc)
    assert row and float(row.group(1)) == round(mib, 1), (row, mib)


def test_hello_opens_one_session_per_client(sessions):
    local = sessions.hello(LOCAL, inline=False, now=T0)
    assert local.identity == LOCAL and not local.inline and local.last_seen == T0
    ring = local.input_ring
    assert ring is not None and shm_exists(ring.name)
    assert (ring.slot_count, ring.slot_bytes) == (2, 1024)
    again = sessions.hello(LOCAL, inline=True, now=T0 + 5)  # a repeat keeps the session
    assert again is local and again.session_id == local.session_id
    assert again.input_ring is ring and not again.inline
    remote = sessions.hello(REMOTE, inline=True, now=T0)
    assert remote.inline and remote.input_ring is None
    assert remote.session_id != local.session_id
    assert len(sessions) == 2
    assert sessions.get(REMOTE) is remote and sessions.get(b"nobody") is None


def test_end_unlinks_every_ring_of_the_session(sessions):
    session = sessions.hello(LOCAL, inline=False, now=T0)
    names = [session.input_ring.name, *sessions.output_names(LOCAL, 0, 0),
             *sessions.output_names(LOCAL, 1, 0)]
    assert len(set(names)) == 5 and all(shm_exists(n) for n in names)
    held = worker_writes(sessions, names[1])
    sessions.forward(LOCAL, frame(held), T0)
    assert sessions.end(LOCAL)
    assert not any(shm_exists(n) for n in names)
    assert not any(n in sessions.output_rings for n in names)
    assert sessions.release_output(*held.key) is False  # a ring no longer known
    sessions.release_input((names[0], 0, 1))  # a ring already gone needs nothing
    assert sessions.get(LOCAL) is None and len(sessions) == 0
    assert sessions.end(LOCAL) is False
    # The daemon's own rings stay.
    assert shm_exists(sessions.inline_input.name)
    assert all(shm_exists(r.name) for pair in sessions.worker_rings for r in pair)


# ------------------------------------------------------------------ client input: inline


def test_inline_input_is_copied_into_the_inline_ring(sessions):
    remote = sessions.hello(REMOTE, inline=True, now=T0)
    data = np.arange(8, dtype=np.float32)
    payload = P.Inline(part=1, shape=[8], dtype="float32")
    desc = sessions.take_input(remote, payload, [data.tobytes()], "audio", 5)
    assert desc.ring == sessions.inline_input.name and desc.shape == [8]
    np.testing.assert_array_equal(sessions.read_input(desc), data)
    assert sessions.inline_input.count(READY) == 1
    sessions.release_input(desc.key)
    assert sessions.inline_input.count(FREE) == 2
    sessions.release_input(desc.key)  # a second release is harmless
    with pytest.raises(KeyError):
        sessions.read_input(P.SlotDesc(ring="nope", slot=0, seq=1, shape=[1], dtype="uint8"))


def test_inline_input_errors_name_the_field_and_rule(sessions):
    remote = sessions.hello(REMOTE, inline=True, now=T0)
    take = sessions.take_input

    exc = refused(take, remote, P.Inline(part=2, shape=[2], dtype="float32"), [b"12345678"],
                  "audio", 5)
    assert (exc.code, exc.field, exc.req_id) == (P.E_BAD_MESSAGE, "audio.part", 5)

    exc = refused(take, remote, P.Inline(part=1, shape=[10], dtype="float32"), [b"x" * 8],
                  "audio", 6)
    assert (exc.code, exc.field, exc.req_id) == (P.E_BAD_MESSAGE, "audio.shape", 6)
    assert "40 bytes" in exc.rule and "part holds 8" in exc.rule

    exc = refused(take, remote, P.Inline(part=1, shape=[512], dtype="float32"),
                  [b"\0" * 2048], "image", 7)
    assert (exc.code, exc.field) == (P.E_TOO_LARGE, "image")
    assert "2048 bytes; max 1024" in exc.rule
    assert sessions.inline_input.count(FREE) == 2  # nothing was taken by a refusal

    payload = P.Inline(part=1, shape=[4], dtype="float32")
    first = take(remote, payload, [b"\0" * 16], "audio", 8)
    take(remote, payload, [b"\0" * 16], "audio", 9)
    exc = refused(take, remote, payload, [b"\0" * 16], "audio", 10)  # every slot in use
    assert (exc.code, exc.field, exc.req_id) == (P.E_BUSY, "audio", 10)
    sessions.release_input(first.key)
    take(remote, payload, [b"\0" * 16], "audio", 11)


# ------------------------------------------------------------------ client input: shm


def test_shm_input_from_the_sessions_own_ring(sessions):
    local = sessions.hello(LOCAL, inline=False, now=T0)
    data = np.ones(4, np.float32)
    ref = local.input_ring.write(data, timeout_s=0.0)  # the client writes its own ring
    desc = P.SlotDesc.from_ref(ref)
    assert sessions.take_input(local, desc, [], "audio", 9) is desc
    np.testing.assert_array_equal(sessions.read_input(desc), data)
    sessions.release_input(desc.key)
    assert local.input_ring.count(FREE) == 2


def test_shm_input_errors_name_the_field_and_rule(sessions):
    local = sessions.hello(LOCAL, inline=False, now=T0)
    other = sessions.hello(OTHER, inline=False, now=T0)
    remote = sessions.hello(REMOTE, inline=True, now=T0)
    desc = P.SlotDesc.from_ref(local.input_ring.write(np.ones(4, np.float32), timeout_s=0.0))
    take = sessions.take_input

    for session in (other, remote):  # another session's ring; an inline session has none
        exc = refused(take, session, desc, [], "audio", 4)
        assert (exc.code, exc.field, exc.req_id) == (P.E_BAD_MESSAGE, "audio.ring", 4)

    stale = P.SlotDesc(ring=desc.ring, slot=desc.slot, seq=desc.seq + 1, shape=desc.shape,
                       dtype=desc.dtype)
    exc = refused(take, local, stale, [], "audio", 5)
    assert (exc.code, exc.field, exc.req_id) == (P.E_STALE, "audio.seq", 5)

    bad_slot = P.SlotDesc(ring=desc.ring, slot=5, seq=desc.seq, shape=desc.shape,
                          dtype=desc.dtype)
    exc = refused(take, local, bad_slot, [], "audio", 6)
    assert (exc.code, exc.field) == (P.E_BAD_MESSAGE, "audio.slot")

    too_long = P.SlotDesc(ring=desc.ring, slot=desc.slot, seq=desc.seq, shape=[8],
                          dtype="float32")  # 32 bytes; the client published 16
    exc = refused(take, local, too_long, [], "audio", 7)
    assert (exc.code, exc.field) == (P.E_BAD_MESSAGE, "audio.shape")

    assert take(local, desc, [], "audio", 8) is desc  # the right one still works
    sessions.release_input(desc.key)
    exc = refused(take, local, desc, [], "audio", 9)  # released: stale now
    assert (exc.code, exc.field) == (P.E_STALE, "audio.seq")


# ------------------------------------------------------------------ output rings, delivery


def test_output_rings_per_session_worker_and_lane(sessions):
    sessions.hello(LOCAL, inline=False, now=T0)
    sessions.hello(REMOTE, inline=True, now=T0)
    names = sessions.output_names(LOCAL, 0, 0)
    assert all(names) and names[0] != names[1]
    assert sessions.output_names(LOCAL, 0, 0) == names  # created once
    assert set(sessions.output_names(LOCAL, 0, 1)).isdisjoint(names)
    assert set(sessions.output_names(LOCAL, 1, 0)).isdisjoint(names)
    assert sessions.output_rings[names[0]].slot_bytes == 1024
    assert sessions.output_rings[names[1]].slot_count == 2
    assert sessions.output_names(REMOTE, 0, 0) == ("", "")  # the worker's own rings
    assert sessions.output_names(b"nobody", 0, 0) == ("", "")


def test_forward_to_a_local_session_holds_the_slot_until_release(sessions, port):
    session = sessions.hello(LOCAL, inline=False, now=T0)
    sessions.hello(OTHER, inline=False, now=T0)
    ring_name, _ = sessions.output_names(LOCAL, 0, 0)
    ring = sessions.output_rings[ring_name]
    desc = worker_writes(sessions, ring_name)
    msg = frame(desc)
    sessions.forward(LOCAL, msg, T0 + 1)
    assert port.sent == [(LOCAL, msg, ())] and port.parts == []
    assert session.held == {desc.key: T0 + 1}
    assert ring.state(desc.slot) == READY

    exc = refused(sessions.client_release, OTHER, release(desc))  # not OTHER's slot
    assert (exc.code, exc.field, exc.req_id) == (P.E_STALE, "seq", 3)
    assert ring.state(desc.slot) == READY and desc.key in session.held

    sessions.client_release(LOCAL, release(desc))
    assert ring.state(desc.slot) == FREE and session.held == {}
    exc = refused(sessions.client_release, LOCAL, release(desc, req_id=4))
    assert (exc.code, exc.field, exc.req_id) == (P.E_STALE, "seq", 4)
    exc = refused(sessions.client_release, b"nobody", release(desc))
    assert exc.code == P.E_STALE


def test_forward_to_an_inline_session_sends_the_bytes_zero_copy(sessions, port):
    sessions.hello(REMOTE, inline=True, now=T0)
    ring = sessions.worker_rings[0][0]
    desc = worker_writes(sessions, ring.name, fill=9, nbytes=24)
    sessions.forward(REMOTE, frame(desc, index=3), T0)
    assert port.sent == []
    ((identity, parts, track),) = port.parts
    assert identity == REMOTE and track
    msg, extra = P.SERVER_CODEC.decode(parts)
    assert isinstance(msg, P.Frame) and msg.index == 3
    assert msg.data == P.Inline(part=1, shape=[24], dtype="uint8")
    assert extra == [bytes([9]) * 24]
    # The slot goes back only once ZeroMQ is done with the bytes.
    sessions.finish_inline_sends()
    assert ring.state(desc.slot) == READY
    port.trackers[0].done = True
    sessions.finish_inline_sends()
    assert ring.state(desc.slot) == FREE and not sessions.inline_sends


def test_forward_inline_without_a_tracker_releases_at_once(sessions, port):
    port.track = False
    sessions.hello(REMOTE, inline=True, now=T0)
    ring = sessions.worker_rings[1][1]
    desc = worker_writes(sessions, ring.name)
    sessions.forward(REMOTE, frame(desc), T0)
    assert len(port.parts) == 1
    assert ring.state(desc.slot) == FREE and not sessions.inline_sends


def test_forward_for_a_gone_session_gives_the_slot_back(sessions, port):
    ring = sessions.worker_rings[0][0]
    desc = worker_writes(sessions, ring.name)
    sessions.forward(b"gone", frame(desc), T0)
    assert ring.state(desc.slot) == FREE
    assert port.sent == [] and port.parts == []


def test_release_output_refuses_unknown_rings_and_stale_pairs(sessions):
    ring = sessions.worker_rings[0][0]
    desc = worker_writes(sessions, ring.name)
    assert sessions.release_output("no-such-ring", desc.slot, desc.seq) is False
    assert sessions.release_output(ring.name, desc.slot, desc.seq + 1) is False
    assert ring.state(desc.slot) == READY
    assert sessions.release_output(*desc.key) is True
    assert sessions.release_output(*desc.key) is False


# ------------------------------------------------------------------ the clock


def test_expire_held_takes_back_slots_after_client_call_s(sessions):
    session = sessions.hello(LOCAL, inline=False, now=T0)
    sessions.hello(OTHER, inline=False, now=T0)
    ring_name, _ = sessions.output_names(LOCAL, 0, 0)
    desc = worker_writes(sessions, ring_name)
    sessions.forward(LOCAL, frame(desc), T0)
    assert sessions.expire_held(T0 + 30) == []  # exactly client_call_s: not over
    assert session.held
    # Only the client concerned, and what it held.
    assert sessions.expire_held(T0 + 30.5) == [(LOCAL, "a frame slot")]
    assert session.held == {}
    assert sessions.output_rings[ring_name].state(desc.slot) == FREE
    assert sessions.expire_held(T0 + 100) == []
    exc = refused(sessions.client_release, LOCAL, release(desc))  # too late: stale
    assert exc.code == P.E_STALE
    assert sessions.get(LOCAL) is session  # the session itself stays


def test_expire_held_names_an_audio_slot_as_such(sessions):
    sessions.hello(LOCAL, inline=False, now=T0)
    _, audio_ring = sessions.output_names(LOCAL, 0, 0)
    desc = worker_writes(sessions, audio_ring)
    sessions.forward(LOCAL, P.make(P.AudioChunk, job_id="j", index=0, pts_us=0,
                                   sample_rate=16000, data=desc), T0)
    assert sessions.expire_held(T0 + 30.5) == [(LOCAL, "an audio slot")]


def test_expire_idle_closes_only_quiet_sessions(sessions):
    quiet = sessions.hello(b"quiet", inline=False, now=T0)
    quiet_remote = sessions.hello(b"quiet-remote", inline=True, now=T0)
    sessions.hello(b"busy", inline=False, now=T0)
    holding = sessions.hello(b"holding", inline=False, now=T0)
    sessions.hello(b"fresh", inline=False, now=T0 + 200)
    ring_name, _ = sessions.output_names(b"holding", 0, 0)
    sessions.forward(b"holding", frame(worker_writes(sessions, ring_name)), T0)
    quiet_ring = quiet.input_ring.name

    assert sessions.expire_idle(T0 + 300, busy={b"busy"}) == []  # exactly session_idle_s
    closed = sessions.expire_idle(T0 + 300.5, busy={b"busy"})
    assert sorted(closed) == sorted([quiet.identity, quiet_remote.identity])
    assert sorted(sessions.sessions) == [b"busy", b"fresh", b"holding"]
    assert not shm_exists(quiet_ring)
    assert holding.held and shm_exists(holding.input_ring.name)
    assert sessions.expire_idle(T0 + 300.5, busy={b"busy"}) == []


def test_reclaim_worker_frees_writing_slots_only(sessions):
    sessions.hello(LOCAL, inline=False, now=T0)
    own0 = sessions.worker_rings[0][0]
    own1 = sessions.worker_rings[1][0]
    lane0 = sessions.output_rings[sessions.output_names(LOCAL, 0, 0)[0]]
    lane1 = sessions.output_rings[sessions.output_names(LOCAL, 1, 0)[0]]
    slots = {}
    for ring in (own0, own1, lane0, lane1):
        writing = ring.try_acquire()  # a half-written slot of a worker that died
        ready = worker_writes(sessions, ring.name).slot  # published, its reader owns it
        slots[ring.name] = (writing, ready)
    sessions.reclaim_worker(0)
    for ring in (own0, lane0):
        writing, ready = slots[ring.name]
        assert (ring.state(writing), ring.state(ready)) == (FREE, READY)
    for ring in (own1, lane1):  # worker 1's rings are not touched
        writing, ready = slots[ring.name]
        assert (ring.state(writing), ring.state(ready)) == (WRITING, READY)
    sessions.reclaim_worker(7)  # no such worker: nothing to do


def test_vanished_finds_local_clients_whose_process_exited(sessions):
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    try:
        gone = sessions.hello(LOCAL, inline=False, now=T0, pid=child.pid)
        alive = sessions.hello(OTHER, inline=False, now=T0, pid=os.getpid())
        remote = sessions.hello(REMOTE, inline=True, now=T0, pid=None)  # tcp: no pid
        assert gone.pid == child.pid and alive.pid == os.getpid() and remote.pid is None
        assert sessions.vanished(T0) == []  # everyone runs
        child.kill()
        child.wait(timeout=10)
        assert sessions.vanished(T0 + 0.1) == []  # checked at most every vanished_check_s
        assert sessions.vanished(T0 + 0.6) == [LOCAL]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


def test_hello_with_a_pid_that_does_not_run_watches_nothing(sessions):
    session = sessions.hello(LOCAL, inline=False, now=T0, pid=2**22 + 12345)
    assert session.pid is None
    assert sessions.vanished(T0 + 1) == []
