"""Unit tests of daemon/avatars.py (AvatarStore) and daemon/status.py (health word, status
body, systemd publishing). The notify socket is a tiny real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from hashlib import sha256

import numpy as np
import pytest

from avatard.daemon import devices as dev
from avatard.daemon.avatars import AvatarStore, AvatarTooLarge
from avatard.daemon.pool import WorkerSlot, WState
from avatard.daemon.sdnotify import Notifier
from avatard.daemon.status import StatusBoard, health, worker_status
from avatard.ipc import protocol as P
from avatard.ipc import segments

T0 = 1000.0
FRAME = P.FrameSize(width=640, height=480)
CPU = dev.DeviceInfo("cpu", -1, 64 << 30, 32 << 30, "cpu")


# ------------------------------------------------------------------ avatar store


@pytest.fixture
def store() -> Iterator[AvatarStore]:
    s = AvatarStore(max_avatars=3)
    try:
        yield s
    finally:
        s.close_all()


def shm_exists(name: str) -> bool:
    return (segments.SHM_DIR / name).exists()


def segment_bytes(name: str, nbytes: int) -> bytes:
    with segments.Segment.attach(name) as seg:  # an attacher never unlinks
        return bytes(seg.buffer[:nbytes])


def test_same_bytes_same_id(store):
    raw = b"\x89PNG fake image bytes"
    ref = store.store(raw)
    assert ref.avatar_id == sha256(raw).hexdigest()[:32] and len(ref.avatar_id) == 32
    assert ref.nbytes == len(raw)
    assert segment_bytes(ref.segment, ref.nbytes) == raw  # workers read it from there
    again = store.store(np.frombuffer(raw, dtype=np.uint8))  # as the client's array
    assert again == ref and len(store) == 1
    other = store.store(raw + b"!")
    assert other.avatar_id != ref.avatar_id and other.segment != ref.segment
    assert len(store) == 2 and ref.avatar_id in store and other.avatar_id in store
    assert store.ref(ref.avatar_id) == ref
    assert store.ref("") is None and store.ref("0" * 32) is None


def test_forget_drops_only_unvalidated_avatars(store):
    pending = store.store(b"pending portrait")
    kept = store.store(b"registered portrait")
    store.validated(kept.avatar_id, FRAME)
    store.validated("unknown", FRAME)  # harmless
    store.forget(pending.avatar_id)
    assert pending.avatar_id not in store and not shm_exists(pending.segment)
    store.forget(kept.avatar_id)
    assert kept.avatar_id in store and shm_exists(kept.segment)
    store.forget("unknown")
    assert len(store) == 1
    assert store.store(b"pending portrait") == store.ref(pending.avatar_id)  # back, anew


def test_a_registration_keeps_the_frame_size_its_worker_reported(store):
    kept, failed = store.store(b"fits"), store.store(b"too large for a slot")
    assert store.frame_size(kept.avatar_id) is None  # registration still running
    store.job_ended(P.RegisterSpec(avatar=kept),
                    P.make(P.WJobDone, job_id="j1", frames=0, frame=FRAME))
    store.job_ended(P.RegisterSpec(avatar=failed), None)  # the worker refused it
    assert store.frame_size(kept.avatar_id) == FRAME
    assert failed.avatar_id not in store and store.frame_size(failed.avatar_id) is None
    # A job naming it ends: nothing about the portrait changes.
    store.job_ended(P.SpeakSpec(text="hi", avatar=kept), None)
    assert store.frame_size(kept.avatar_id) == FRAME and kept.avatar_id in store


def test_eviction_beyond_max_avatars_takes_the_least_recently_used(store):
    # The store fixture keeps 3. Use (a registration or a job naming it) refreshes one.
    a, b, c = (store.store(x) for x in (b"a", b"b", b"c"))
    store.validated(a.avatar_id, FRAME)
    assert store.ref(a.avatar_id) == a  # a job named a: now the most recently used
    d = store.store(b"d")
    assert len(store) == 3
    assert b.avatar_id not in store and not shm_exists(b.segment)  # least recently used
    assert store.was_evicted(b.avatar_id) and not store.was_evicted(a.avatar_id)
    assert a.avatar_id in store and c.avatar_id in store and d.avatar_id in store
    store.store(b"e")
    assert c.avatar_id not in store and a.avatar_id in store and d.avatar_id in store
    assert store.store(b"a") == a and len(store) == 3  # a known one evicts nothing
    assert store.stats()["evictions"] == 2 and store.stats()["count"] == 3


def test_validated_avatars_are_evicted_but_pinned_ones_never():
    store = AvatarStore(max_avatars=2)
    try:
        refs = [store.store(x) for x in (b"x", b"y")]
        for ref in refs:
            store.validated(ref.avatar_id, FRAME)
        store.pin(refs[0].avatar_id)  # a live job names x
        z = store.store(b"z")
        assert len(store) == 2 and refs[0].avatar_id in store and z.avatar_id in store
        assert not shm_exists(refs[1].segment)
        store.pin(z.avatar_id)
        w = store.store(b"w")  # everything pinned: over the bound rather than refuse
        assert len(store) == 3
        store.unpin(refs[0].avatar_id)
        store.unpin(z.avatar_id)
        store.store(b"v")
        assert len(store) == 2 and w.avatar_id in store
    finally:
        store.close_all()
    assert len(store) == 0 and not any(shm_exists(r.segment) for r in [*refs, z])


def test_evict_idle_lets_the_least_recently_used_unpinned_portrait_go():
    # What the coordinator calls when a ring does not fit in /dev/shm.
    store = AvatarStore(max_avatars=8)
    try:
        a, b, c = (store.store(x) for x in (b"a", b"b", b"c"))
        store.pin(a.avatar_id)  # in use by a live job: never let go
        store.ref(b.avatar_id)  # b used after c: c is the least recently used idle one
        assert store.evict_idle("a ring") and c.avatar_id not in store
        assert not shm_exists(c.segment) and store.was_evicted(c.avatar_id)
        assert store.evict_idle("a ring") and b.avatar_id not in store
        assert not store.evict_idle("a ring")  # only the pinned one is left
        assert a.avatar_id in store and shm_exists(a.segment)
        assert store.stats()["evictions"] == 2
    finally:
        store.close_all()


def test_byte_bound_evicts_and_refuses_a_file_larger_than_the_bound():
    store = AvatarStore(max_avatars=64, max_bytes=3 * 4096)
    try:
        refs = [store.store(bytes([i]) * 4000) for i in range(5)]
        assert len(store) == 3 and store.bytes <= 3 * 4096
        assert [r.avatar_id in store for r in refs] == [False, False, True, True, True]
        with pytest.raises(AvatarTooLarge, match="avatars.max_bytes"):
            store.store(b"x" * (3 * 4096 + 1))
        assert len(store) == 3
    finally:
        store.close_all()


# ------------------------------------------------------------------ health


@pytest.mark.parametrize("draining,ready,min_ready,all_failed,word", [
    (True, 2, 1, False, "draining"),
    (True, 0, 1, True, "draining"),
    (False, 1, 1, False, "ready"),
    (False, 3, 2, False, "ready"),
    (False, 1, 2, False, "starting"),
    (False, 0, 1, False, "starting"),
    (False, 0, 1, True, "failed"),
])
def test_health_word(draining, ready, min_ready, all_failed, word):
    assert health(draining, ready, min_ready, all_failed) == word


# ------------------------------------------------------------------ systemd publishing


class Receiver:
    """systemd's side of NOTIFY_SOCKET: an abstract-namespace datagram socket."""

    def __init__(self) -> None:
        name = f"avatard-test-status-{os.getpid()}-{secrets.token_hex(4)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name)
        self.sock.setblocking(False)  # datagrams are queued by sendto(): no waiting
        self.env_value = "@" + name

    def messages(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.sock.close()


def test_publish_sends_ready_once_and_status_only_on_change(receiver):
    with Notifier({"NOTIFY_SOCKET": receiver.env_value}) as notifier:
        board = StatusBoard(notifier, min_ready=2, started_at=T0)
        board.publish({"loading": 2}, 0, 2)
        assert receiver.messages() == [b"STATUS=workers: 2 loading; queue 0"]
        board.publish({"loading": 2}, 0, 2)
        assert receiver.messages() == []
        board.publish({"loading": 1, "ready": 1}, 0, 2)
        assert receiver.messages() == [b"STATUS=workers: 1 loading, 1 ready; queue 0"]
        assert not board.ready_sent
        board.publish({"busy": 1, "ready": 1}, 3, 2)  # busy workers are up too
        assert receiver.messages() == [b"READY=1\nSTATUS=workers: 1 busy, 1 ready; queue 3"]
        assert board.ready_sent
        board.publish({"busy": 1, "ready": 1}, 3, 2)
        assert receiver.messages() == []
        board.publish({"ready": 2}, 0, 2)
        board.publish({"backoff": 1, "ready": 1}, 0, 2)
        board.publish({"ready": 2}, 0, 2)
        assert receiver.messages() == [b"STATUS=workers: 2 ready; queue 0",
                                       b"STATUS=workers: 1 backoff, 1 ready; queue 0",
                                       b"STATUS=workers: 2 ready; queue 0"]
        board.stopping()
        assert receiver.messages() == [b"STOPPING=1"]


def test_publish_without_notify_socket_is_silent():
    board = StatusBoard(Notifier({}), min_ready=1, started_at=T0)
    board.publish({"ready": 1}, 0, 1)
    assert board.ready_sent
    board.publish({"busy": 1}, 2, 1)
    board.stopping()
    board.watchdog(T0)


def test_watchdog_pings_every_half_watchdog_usec(receiver):
    env = {"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "2000000"}
    with Notifier(env) as notifier:
        board = StatusBoard(notifier, min_ready=1, started_at=T0)
        board.watchdog(T0)
        assert receiver.messages() == [b"WATCHDOG=1"]
        board.watchdog(T0 + 0.5)
        assert receiver.messages() == []
        board.watchdog(T0 + 1.0)
        board.watchdog(T0 + 1.5)
        assert receiver.messages() == [b"WATCHDOG=1"]


# ------------------------------------------------------------------ the status body


def test_body_counts_up_workers_and_the_rtf_median():
    board = StatusBoard(Notifier({}), min_ready=2, started_at=T0)
    workers = [{"state": "ready"}, {"state": "busy"}, {"state": "loading"}]
    body = board.body(T0 + 5, "ready", ["ipc:///run/avatard.sock"], 3, iter(workers), 2, 8, 1,
                      {"jobs_done": 4}, iter([1.0, 3.0, 2.0]))
    daemon = body["daemon"]
    assert daemon["pid"] == os.getpid() and daemon["uptime_s"] == 5.0
    assert daemon["state"] == "ready" and daemon["endpoints"] == ["ipc:///run/avatard.sock"]
    assert (daemon["ready_workers"], daemon["min_ready"], daemon["sessions"]) == (2, 2, 3)
    assert body["workers"] == workers
    assert body["queue"] == {"depth": 2, "size": 8, "running": 1}
    assert body["jobs"] == {"jobs_done": 4}
    assert body["rtf_recent_median"] == 2.0
    empty = board.body(T0, "starting", [], 0, [], 0, 8, 0, {}, [])
    assert empty["rtf_recent_median"] is None and empty["daemon"]["ready_workers"] == 0


def test_worker_status_entry():
    w = WorkerSlot(1, CPU, state=WState.BUSY, pid=os.getpid(), attempt=2, restarts=1,
                   state_since=T0 + 2, started_at=T0, capacity=2, memory_bytes=5,
                   stage="hello", reason="1 job(s)")
    entry = worker_status(w, ["j1", "j2"], T0 + 10)
    assert (entry["id"], entry["pid"], entry["state"]) == (1, os.getpid(), "busy")
    assert entry["state_age_s"] == 8.0 and entry["uptime_s"] == 10.0
    assert entry["rss_bytes"] > 0  # this process's own resident memory
    assert entry["device_memory_bytes"] == 0  # a CPU worker asks no GPU
    assert entry["current_jobs"] == ["j1", "j2"] and entry["capacity"] == 2
    assert (entry["attempt"], entry["restarts"], entry["load_memory_bytes"]) == (2, 1, 5)
    gone = worker_status(WorkerSlot(0, CPU, state=WState.BACKOFF, rss_bytes=77), [], T0)
    assert (gone["pid"], gone["rss_bytes"], gone["uptime_s"]) == (0, 77, 0.0)
