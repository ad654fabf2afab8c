"""Hostile shared-memory descriptors against a real `SlotRing`: whatever (ring, slot, seq,
shape, dtype) a peer claims, reading or releasing either works within the named slot or
raises `DescriptorError`/`StaleSlotError`, and the other slots are never touched."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avatard.ipc.ring import (
    ALLOWED_DTYPES,
    FREE,
    READY,
    WRITING,
    DescriptorError,
    SlotRef,
    SlotRing,
    StaleSlotError,
)

SLOTS = 6
SLOT_BYTES = 256
EXAMPLES = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def ring() -> Iterator[SlotRing]:
    """Slots 0-2 READY with known bytes, slot 3 WRITING, slots 4-5 FREE."""
    with SlotRing.create("fuzz.ring", SLOTS, SLOT_BYTES) as r:
        for i in range(3):
            r.write(np.full(SLOT_BYTES // 4, i + 1, np.float32), timeout_s=1.0)
        assert r.try_acquire() == 3
        yield r


def snapshot(ring: SlotRing) -> list[tuple[int, int, int]]:
    """(state, seq, crc of the data) of every slot."""
    out = []
    for slot in range(ring.slot_count):
        data = bytes(ring.segment.buffer[ring.data_offset + slot * ring.slot_bytes:
                                         ring.data_offset + (slot + 1) * ring.slot_bytes])
        out.append((ring.state(slot), int(ring._seq[slot]), zlib.crc32(data)))
    return out


def descriptors(ring_name: str) -> st.SearchStrategy[SlotRef]:
    dims = st.one_of(st.integers(-3, 70), st.integers(-(2**63), 2**63 - 1),
                     st.sampled_from([2**20, 2**31, 2**32, 2**62, 2**63 - 1]))
    return st.builds(
        SlotRef,
        ring=st.one_of(st.just(ring_name), st.text(max_size=20)),
        slot=st.one_of(st.integers(-2, SLOTS + 2), st.integers(-(2**63), 2**64)),
        seq=st.one_of(st.integers(0, 6), st.integers(-(2**63), 2**64)),
        shape=st.lists(dims, max_size=6).map(tuple),
        dtype=st.one_of(st.sampled_from(sorted(ALLOWED_DTYPES)),
                        st.sampled_from(["object", "V8", "<f4", "float32 ", "O", "U4",
                                         "complex64", "bool", ""]), st.text(max_size=8)),
    )


def _bounded_shape(shape: tuple[int, ...]) -> bool:
    """Shapes whose element count fits in int64."""
    count = 1
    for d in shape:
        count *= max(d, 1)
    return count < 2**62


@EXAMPLES
@given(data=st.data())
def test_hostile_descriptors(ring: SlotRing, data: st.DataObject) -> None:
    ref = data.draw(descriptors(ring.name))
    before = snapshot(ring)
    try:
        view = ring.read(ref)
    except (DescriptorError, StaleSlotError) as exc:
        assert str(exc)
        if isinstance(exc, DescriptorError):
            assert exc.field in ("ring", "slot", "shape", "dtype") and exc.rule
    else:
        # Only a READY slot with the right seq, within what the writer published.
        assert 0 <= ref.slot < SLOTS and ring.state(ref.slot) == READY
        assert int(ring._seq[ref.slot]) == ref.seq
        start = ring.data_offset + ref.slot * ring.slot_bytes
        base = np.frombuffer(ring.segment.buffer, np.uint8)
        offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        assert start <= offset and offset + view.nbytes <= start + int(ring._nbytes[ref.slot])
        assert not view.flags.writeable
        del view, base
    assert snapshot(ring) == before, "a read changed the ring"


@EXAMPLES
@given(slot=st.one_of(st.integers(-2, SLOTS + 2), st.integers(-(2**63), 2**64)),
       seq=st.one_of(st.integers(0, 8), st.integers(-(2**63), 2**64)))
def test_hostile_releases_touch_only_their_own_slot(slot: int, seq: int) -> None:
    with SlotRing.create("fuzz.rel", SLOTS, SLOT_BYTES) as ring:
        for i in range(3):
            ring.write(np.full(SLOT_BYTES // 4, i + 1, np.float32), timeout_s=1.0)
        ring.try_acquire()
        before = snapshot(ring)
        try:
            ring.release(slot, seq)
        except (DescriptorError, StaleSlotError):
            assert snapshot(ring) == before
            return
        after = snapshot(ring)
        assert before[slot][:2] == (READY, seq) and after[slot][0] == FREE
        assert [s for i, s in enumerate(after) if i != slot] == \
            [s for i, s in enumerate(before) if i != slot]


def test_replayed_release_and_reuse_are_stale() -> None:
    with SlotRing.create("fuzz.replay", 2, 64) as ring:
        ref = ring.write(np.arange(4, dtype=np.float32), timeout_s=1.0)
        ring.release(ref.slot, ref.seq)
        with pytest.raises(StaleSlotError):  # replay of the same release
            ring.release(ref.slot, ref.seq)
        again = ring.write(np.arange(4, dtype=np.float32), timeout_s=1.0)
        again = again if again.slot == ref.slot else ring.write(
            np.arange(4, dtype=np.float32), timeout_s=1.0)
        assert again.slot == ref.slot and again.seq > ref.seq
        with pytest.raises(StaleSlotError):  # the old descriptor of a reused slot
            ring.read(ref)
        assert ring.state(1 - ref.slot) in (READY, WRITING, FREE)


def test_shape_and_dtype_lies_are_refused() -> None:
    with SlotRing.create("fuzz.lies", 2, 64) as ring:
        ref = ring.write(np.arange(4, dtype=np.float32), timeout_s=1.0)  # 16 bytes
        for shape, dtype, field in [((5,), "float32", "shape"), ((4,), "float64", "shape"),
                                    ((-1,), "uint8", "shape"), ((), "uint8", "shape"),
                                    ((1, 1, 1, 1, 1), "uint8", "shape"),
                                    ((4,), "object", "dtype"), ((16,), "V1", "dtype")]:
            with pytest.raises(DescriptorError) as err:
                ring.read(SlotRef(ref.ring, ref.slot, ref.seq, shape, dtype))
            assert err.value.field == field
        assert ring.read(SlotRef(ref.ring, ref.slot, ref.seq, (2, 2), "float32")).shape == (2, 2)


@pytest.mark.parametrize("shape", [(2**20, 2**20, 2**20, 2**4), (2**32, 2**32)])
def test_shape_whose_size_overflows_int64_is_refused(shape: tuple[int, ...]) -> None:
    with SlotRing.create("fuzz.ovf", 2, 64) as ring:
        ref = ring.write(np.arange(4, dtype=np.float32), timeout_s=1.0)
        with pytest.raises(DescriptorError):
            ring.read(SlotRef(ref.ring, ref.slot, ref.seq, shape, "uint8"))
