"""The shared-memory slot ring, with real processes and real signals."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import threading
import time

import numpy as np
import pytest
from conftest import spawn_context

from avatard.ipc import segments
from avatard.ipc.ring import (
    READY,
    DescriptorError,
    RingFullError,
    SlotRef,
    SlotRing,
    StaleSlotError,
)

SHAPE = (512, 512, 3)


def _frame(seed: int, index: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).integers(0, 256, SHAPE, dtype=np.uint8)


# --------------------------------------------------------------- child processes


def _producer(name_q, ack_q, count: int, seed: int) -> None:
    ring = SlotRing.create("test", 4, int(np.prod(SHAPE)))
    try:
        name_q.put(ring.name)
        for i in range(count):
            ref = ring.write(_frame(seed, i), timeout_s=20)
            name_q.put((ref.slot, ref.seq, i))
            # The consumer releases through the ring (in avatard the supervisor does it
            # on a RELEASE message); wait for the ack so the ring drains before close.
        ack_q.get(timeout=30)
    finally:
        ring.close()


def _consumer(name_q, digest_q, count: int) -> None:
    ring = SlotRing.attach(name_q.get(timeout=20))
    try:
        digests = []
        for _ in range(count):
            slot, seq, index = name_q.get(timeout=20)
            view = ring.read(SlotRef(ring.name, slot, seq, SHAPE, "uint8"))
            digests.append((index, hashlib.sha256(view.tobytes()).hexdigest()))
            del view
            ring.release(slot, seq)
        digest_q.put(digests)
    finally:
        ring.close()


def _owner_then_hang(name_q) -> None:
    ring = SlotRing.create("victim", 2, 1024)
    name_q.put(ring.name)
    time.sleep(600)


def _attach_then_hang(name, ready_q) -> None:
    ring = SlotRing.attach(name)
    ref = SlotRef(ring.name, 0, 1, (4,), "uint8")
    ready_q.put(int(ring.read(ref)[0]))
    time.sleep(600)


def _owner_exits_without_close(name_q) -> None:
    ring = SlotRing.create("forgotten", 2, 1024)
    name_q.put(ring.name)
    # no close(): the atexit hook must unlink it


# --------------------------------------------------------------- tests


def test_frames_round_trip_bit_exactly_across_processes():
    ctx = spawn_context()
    name_q, digest_q, ack_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    count = 24  # more than the 4 slots: exercises reuse and back-pressure too
    prod = ctx.Process(target=_producer, args=(name_q, ack_q, count, 7))
    # The consumer reads the ring name from the same queue as the descriptors.
    cons = ctx.Process(target=_consumer, args=(name_q, digest_q, count))
    prod.start()
    cons.start()
    try:
        digests = digest_q.get(timeout=60)
        ack_q.put(1)
    finally:
        for proc in (prod, cons):
            proc.join(timeout=30)
            assert proc.exitcode == 0, f"{proc.name} exit {proc.exitcode}"
    expected = [(i, hashlib.sha256(_frame(7, i).tobytes()).hexdigest()) for i in range(count)]
    assert digests == expected


def test_segment_is_owner_only_and_named_after_owner():
    with SlotRing.create("perm", 2, 64) as ring:
        info = os.stat(segments.SHM_DIR / ring.name)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid()
        pid, ticks = segments.parse_segment_name(ring.name)
        assert pid == os.getpid()
        assert ticks == segments.process_start_ticks(os.getpid())
    assert ring.name not in segments.list_segments()


def test_views_do_not_copy():
    with SlotRing.create("view", 2, 1024) as ring:
        reader = SlotRing.attach(ring.name)
        slot = ring.acquire(1.0)
        view = ring.slot_view(slot, (16,), "float32")
        view[:] = np.arange(16)
        ref = ring.publish(slot, (16,), "float32")
        got = reader.read(ref)
        assert np.shares_memory(got, reader._data)  # a view into the mapping
        np.testing.assert_array_equal(got, np.arange(16, dtype=np.float32))
        with pytest.raises(ValueError):
            got[0] = 1  # readers get read-only views
        del got
        reader.close()
        ring.release(ref.slot, ref.seq)


def test_full_ring_blocks_writer_until_release_and_never_overwrites():
    with SlotRing.create("bp", 2, 64) as ring:
        refs = [ring.write(np.full(8, i, np.uint8), timeout_s=0.1) for i in range(2)]
        t0 = time.monotonic()
        with pytest.raises(RingFullError, match="no free slot among 2 within 0.050 s"):
            ring.write(np.full(8, 9, np.uint8), timeout_s=0.05)
        assert time.monotonic() - t0 >= 0.05
        # Unread data is intact after the failed write.
        for i, ref in enumerate(refs):
            assert (ring.read(ref) == i).all()
        # A writer blocked in acquire proceeds as soon as a reader releases.
        result = {}

        def blocked_writer():
            result["ref"] = ring.write(np.full(8, 5, np.uint8), timeout_s=5.0)

        thread = threading.Thread(target=blocked_writer)
        thread.start()
        time.sleep(0.1)
        assert "ref" not in result, "writer must wait while the ring is full"
        ring.release(refs[0].slot, refs[0].seq)
        thread.join(timeout=5)
        assert result["ref"].slot == refs[0].slot
        assert (ring.read(refs[1]) == 1).all()  # the other unread slot was not touched
        for ref in (refs[1], result["ref"]):
            ring.release(ref.slot, ref.seq)


def test_stale_descriptor_detected_by_seq():
    with SlotRing.create("seq", 1, 64) as ring:
        old = ring.write(np.zeros(4, np.uint8), timeout_s=0.1)
        ring.release(old.slot, old.seq)
        new = ring.write(np.ones(4, np.uint8), timeout_s=0.1)
        assert new.slot == old.slot and new.seq > old.seq
        with pytest.raises(StaleSlotError, match="descriptor says seq"):
            ring.read(old)  # reused slot: the old descriptor must not see new data
        with pytest.raises(StaleSlotError):
            ring.release(old.slot, old.seq)  # a replayed RELEASE is refused
        assert ring.state(new.slot) == READY
        ring.release(new.slot, new.seq)
        with pytest.raises(StaleSlotError):
            ring.release(new.slot, new.seq)  # double release


@pytest.mark.parametrize(
    ("ref_fields", "field"),
    [
        ({"slot": 5}, "slot"),
        ({"slot": -1}, "slot"),
        ({"shape": (1000,)}, "shape"),
        ({"shape": ()}, "shape"),
        ({"shape": (2, -3)}, "shape"),
        ({"dtype": "object"}, "dtype"),
        ({"ring": "avatard-1-1-0000000000000000-other"}, "ring"),
    ],
)
def test_descriptor_lies_are_refused_with_the_field(ref_fields, field):
    with SlotRing.create("lies", 2, 64) as ring:
        good = ring.write(np.zeros(16, np.uint8), timeout_s=0.1)
        fields = {"ring": good.ring, "slot": good.slot, "seq": good.seq, "shape": good.shape,
                  "dtype": good.dtype, **ref_fields}
        with pytest.raises(DescriptorError) as err:
            ring.read(SlotRef(**fields))
        assert err.value.field == field
        ring.release(good.slot, good.seq)


def test_shape_larger_than_published_is_refused():
    with SlotRing.create("short", 1, 1024) as ring:
        ref = ring.write(np.zeros(4, np.uint8), timeout_s=0.1)
        with pytest.raises(DescriptorError, match="published 4"):
            ring.read(SlotRef(ref.ring, ref.slot, ref.seq, (64,), "uint8"))
        ring.release(ref.slot, ref.seq)


def test_sigkill_of_owner_leaves_nothing_once_next_owner_starts():
    ctx = spawn_context()
    name_q = ctx.Queue()
    proc = ctx.Process(target=_owner_then_hang, args=(name_q,))
    proc.start()
    name = name_q.get(timeout=20)
    assert name in segments.list_segments()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=10)
    assert proc.exitcode == -signal.SIGKILL
    assert name in segments.list_segments()  # the kernel keeps it: nobody unlinked it
    assert not segments.owner_alive(name)
    # The next owner starts: its sweep removes segments of dead owners, and only those.
    with SlotRing.create("next", 1, 64) as mine:
        removed = segments.sweep_stale_segments()
        assert name in removed
        assert mine.name in segments.list_segments()
    assert name not in segments.list_segments()


def test_sigkill_of_consumer_leaves_nothing_after_owner_exits():
    ctx = spawn_context()
    ready_q = ctx.Queue()
    with SlotRing.create("owner", 2, 64) as ring:
        ref = ring.write(np.full(4, 42, np.uint8), timeout_s=0.1)
        proc = ctx.Process(target=_attach_then_hang, args=(ring.name, ready_q))
        proc.start()
        assert ready_q.get(timeout=20) == 42
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        assert proc.exitcode == -signal.SIGKILL
        # The reader died holding the slot: the owner reclaims it.
        assert ring.reclaim([ref.slot]) == 1
        assert ring.try_acquire() is not None
        name = ring.name
    assert name not in segments.list_segments()


def test_owner_exit_without_close_unlinks_at_exit():
    ctx = spawn_context()
    name_q = ctx.Queue()
    proc = ctx.Process(target=_owner_exits_without_close, args=(name_q,))
    proc.start()
    name = name_q.get(timeout=20)
    proc.join(timeout=20)
    assert proc.exitcode == 0
    assert name not in segments.list_segments()


def test_attach_refuses_foreign_and_missing_names():
    with pytest.raises(segments.SegmentError, match="not an avatard segment"):
        SlotRing.attach("../../etc/passwd")
    with pytest.raises(segments.SegmentError, match="does not exist"):
        SlotRing.attach("avatard-1-1-0123456789abcdef-gone")


def test_no_room_message_tells_sizes_apart_and_reads_well():
    mib = 1 << 20
    # A 16 MiB /dev/shm with a few pages used, and a ring a little over 16 MiB: in MiB to
    # one decimal all three read "16.0 MiB", so the exact bytes are given.
    text = segments.no_room_message("inline.in", 16 * mib + 8192, 16 * mib - 4096, 16 * mib)
    assert "the inline.in segment needs 16.0 MiB (16785408 bytes)" in text, text
    assert "only 16.0 MiB (16773120 bytes) of its 16.0 MiB (16777216 bytes) is free" in text
    # Sizes that read differently stay short.
    text = segments.no_room_message("s.in", 16 * mib, 12 * mib, 16 * mib)
    assert "the s.in segment needs 16.0 MiB but only 12.0 MiB of its 16.0 MiB is free" in text
    assert "bytes)" not in text and " a s.in" not in text
