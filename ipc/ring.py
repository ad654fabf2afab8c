"""A ring of fixed-size slots in one shared-memory segment: the data plane.

Layout (little-endian, offsets in bytes)::

    0     +----------------------------------------------+
          | magic "AVTDRING" | layout u32 | slot_count u32 |
          | slot_bytes u64   | data_offset u64             |
          | next_seq u64     | creator_pid u32 | pad       |  ring header (64 B)
    64    +----------------------------------------------+
          | slot 0: state u32 | pad u32 | seq u64 | nbytes u64 | pad u64 |  32 B each
          | slot 1: ...                                                  |
    data_offset (page aligned)
          +----------------------------------------------+
          | slot 0 data (slot_bytes, 64-B aligned)       |
          | slot 1 data ...                              |
          +----------------------------------------------+

Slot states and who moves them (each transition has exactly one writer, so plain aligned
stores are enough; no compare-and-swap is needed)::

    FREE --acquire (writer)--> WRITING --publish (writer)--> READY
    READY --release (whoever receives the RELEASE message)--> FREE
    WRITING/READY --reclaim (ring owner, after the writer or reader died)--> FREE

Ownership of a READY slot passes by message: the writer sends a `SlotRef` descriptor
(ring, slot, seq, shape, dtype, pts); the reader maps the bytes as a numpy view without
copying and answers RELEASE with the same (slot, seq). `seq` grows with every publish, so a
descriptor that names a slot which was since released and reused is detected as stale.

A full ring is back-pressure: `acquire()` waits (bounded by its timeout) for a FREE slot
and never overwrites READY data.

Write ordering: `publish()` stores the data, then seq and nbytes, then state=READY; readers
check state and seq before touching the data. On x86-64 stores are not reordered with
other stores, which is what this relies on (both processes run the same code path).
"""

from __future__ import annotations

import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from .segments import Segment, SegmentError

MAGIC = b"AVTDRING"
LAYOUT_VERSION = 1
HEADER_BYTES = 64
SLOT_ENTRY_BYTES = 32
PAGE = 4096
ALIGN = 64

FREE, WRITING, READY = 0, 1, 2
STATE_NAMES = {FREE: "FREE", WRITING: "WRITING", READY: "READY"}

# dtypes that may travel in a slot: fixed-size numeric types only (never object).
ALLOWED_DTYPES = frozenset(
    ["uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32",
     "float64"]
)
MAX_DIMS = 4
_ITEMSIZE = {name: np.dtype(name).itemsize for name in ALLOWED_DTYPES}

_HEADER = struct.Struct("<8sIIQQQI")  # magic, layout, slot_count, slot_bytes, data_off,
# next_seq, creator_pid (remaining bytes of the 64-byte header are padding)


class RingFullError(TimeoutError):
    """No slot became free within the writer's timeout (the reader is not releasing)."""


class StaleSlotError(RuntimeError):
    """A descriptor names a slot whose seq or state no longer matches: it was released
    and reused, or never published."""


class DescriptorError(ValueError):
    """A descriptor that cannot describe data in this ring (bad slot, shape, dtype)."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


@dataclass(frozen=True, slots=True)
class SlotRef:
    """Where one published item lives. Mirrors the protocol's descriptor fields."""

    ring: str
    slot: int
    seq: int
    shape: tuple[int, ...]
    dtype: str
    pts: int = 0


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def ring_bytes(slot_count: int, slot_bytes: int) -> int:
    """Bytes of the segment of a ring of `slot_count` slots of `slot_bytes`: what it
    reserves in /dev/shm (header and slot table, then the 64-B aligned slots)."""
    data_offset = _round_up(HEADER_BYTES + slot_count * SLOT_ENTRY_BYTES, PAGE)
    return data_offset + slot_count * _round_up(slot_bytes, ALIGN)


def check_layout(shape: tuple[int, ...], dtype: str, slot_bytes: int) -> int:
    """Validate (shape, dtype) for a slot of `slot_bytes`; return the byte count."""
    if dtype not in ALLOWED_DTYPES:
        raise DescriptorError("dtype", f"must be one of {sorted(ALLOWED_DTYPES)}, got {dtype!r}")
    if not 1 <= len(shape) <= MAX_DIMS:
        raise DescriptorError("shape", f"must have 1..{MAX_DIMS} dimensions, got {len(shape)}")
    if any((not isinstance(d, int)) or d < 0 for d in shape):
        raise DescriptorError("shape", f"dimensions must be integers >= 0, got {list(shape)}")
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    if nbytes > slot_bytes:
        raise DescriptorError(
            "shape", f"{list(shape)} x {dtype} needs {nbytes} bytes; slot holds {slot_bytes}"
        )
    return nbytes


@dataclass(slots=True)
class PendingSlot:
    """A slot held for writing inside `SlotRing.writing()`: fill `view` (a writable numpy
    view of the slot, no copy); `ref` is set once the block exits and the slot is READY."""

    slot: int
    view: np.ndarray
    ref: SlotRef | None = field(default=None)


class SlotRing:
    """A slot ring over one segment. Use `create()` in the owner, `attach()` elsewhere."""

    def __init__(self, segment: Segment):
        self.segment = segment
        buf = segment.buffer
        magic, layout, count, slot_bytes, data_offset, _seq, creator = _HEADER.unpack_from(buf)
        if magic != MAGIC or layout != LAYOUT_VERSION:
            raise SegmentError(f"segment {segment.name!r} is not an avatard ring (layout {layout})")
        end = data_offset + count * slot_bytes
        if count < 1 or end > segment.size or data_offset < HEADER_BYTES + count * SLOT_ENTRY_BYTES:
            raise SegmentError(f"segment {segment.name!r} has an inconsistent ring header")
        self.name = segment.name
        self.slot_count = count
        self.slot_bytes = slot_bytes
        self.data_offset = data_offset
        self.creator_pid = creator
        raw = np.frombuffer(buf, dtype=np.uint8, count=end)
        # next_seq lives at byte 32 of the header: a one-element u64 view.
        self._next_seq = raw[32:40].view(np.uint64)
        entries = raw[HEADER_BYTES : HEADER_BYTES + count * SLOT_ENTRY_BYTES]
        words64 = entries.view(np.uint64).reshape(count, SLOT_ENTRY_BYTES // 8)
        words32 = entries.view(np.uint32).reshape(count, SLOT_ENTRY_BYTES // 4)
        self._state = words32[:, 0]  # u32 at offset 0 of each entry
        self._seq = words64[:, 1]
        self._nbytes = words64[:, 2]
        self._data = raw[data_offset:end].reshape(count, slot_bytes)
        self._cursor = 0  # where the writer starts looking for a FREE slot

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, label: str, slot_count: int, slot_bytes: int) -> SlotRing:
        if slot_count < 1 or slot_count > 65536:
            raise ValueError(f"slot_count must be 1..65536, got {slot_count}")
        if slot_bytes < 1:
            raise ValueError(f"slot_bytes must be >= 1, got {slot_bytes}")
        slot_bytes = _round_up(slot_bytes, ALIGN)
        data_offset = _round_up(HEADER_BYTES + slot_count * SLOT_ENTRY_BYTES, PAGE)
        # Raises ShmFullError when /dev/shm cannot hold every page (segments.py).
        segment = Segment.create(label, ring_bytes(slot_count, slot_bytes))
        _HEADER.pack_into(
            segment.buffer, 0, MAGIC, LAYOUT_VERSION, slot_count, slot_bytes, data_offset, 1,
            os.getpid(),
        )
        return cls(segment)

    @classmethod
    def attach(cls, name: str) -> SlotRing:
        return cls(Segment.attach(name, min_size=HEADER_BYTES))

    def close(self) -> None:
        # Drop our own views before unmapping so the mmap can close.
        self._data = self._state = self._seq = self._nbytes = self._next_seq = None  # type: ignore[assignment]
        self.segment.close()

    def __enter__(self) -> SlotRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writer side

    def try_acquire(self) -> int | None:
        """A FREE slot now marked WRITING, or None when the ring is full."""
        for step in range(self.slot_count):
            slot = (self._cursor + step) % self.slot_count
            if self._state[slot] == FREE:
                self._state[slot] = WRITING
                self._cursor = (slot + 1) % self.slot_count
                return slot
        return None

    def acquire(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for a FREE slot (back-pressure); never drops data."""
        slot = self.try_acquire()
        if slot is not None:
            return slot
        deadline = time.monotonic() + timeout_s
        pause_s = 20e-6
        while True:
            time.sleep(pause_s)
            slot = self.try_acquire()
            if slot is not None:
                return slot
            if time.monotonic() >= deadline:
                raise RingFullError(
                    f"ring {self.name}: no free slot among {self.slot_count} within "
                    f"{timeout_s:.3f} s (reader not releasing)"
                )
            pause_s = min(pause_s * 2, 2e-3)

    def slot_view(self, slot: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """A writable numpy view of a slot the writer holds (no copy)."""
        nbytes = check_layout(shape, dtype, self.slot_bytes)
        return self._data[slot, :nbytes].view(dtype).reshape(shape)

    def publish(self, slot: int, shape: tuple[int, ...], dtype: str, pts: int = 0) -> SlotRef:
        """Mark a written slot READY and return its descriptor."""
        if self._state[slot] != WRITING:
            raise StaleSlotError(
                f"ring {self.name}: publish of slot {slot} in state "
                f"{STATE_NAMES.get(int(self._state[slot]), '?')}, expected WRITING"
            )
        nbytes = check_layout(shape, dtype, self.slot_bytes)
        seq = int(self._next_seq[0])
        self._next_seq[0] = seq + 1
        self._nbytes[slot] = nbytes
        self._seq[slot] = seq
        self._state[slot] = READY  # last: readers trust the slot only after this store
        return SlotRef(self.name, slot, seq, tuple(int(d) for d in shape), dtype, pts)

    def write(self, array: np.ndarray, timeout_s: float, pts: int = 0) -> SlotRef:
        """Copy `array` into a free slot (the one copy of the data plane) and publish.
        Raises `RingFullError` after `timeout_s` of a full ring."""
        with self.writing(tuple(array.shape), array.dtype.name, timeout_s, pts) as pending:
            np.copyto(pending.view, array, casting="no")
        assert pending.ref is not None
        return pending.ref

    @contextmanager
    def writing(
        self,
        shape: tuple[int, ...],
        dtype: str,
        timeout_s: float,
        pts: int = 0,
        lock: threading.Lock | None = None,
        on_wait: Callable[[], None] | None = None,
        wait_step_s: float = 0.1,
    ) -> Iterator[PendingSlot]:
        """Hold one slot for writing: acquire -> yield a view to fill -> publish.

        The one way to write a slot by hand (the worker and the benches use it; `write()`
        is the copy-in shorthand). On a normal exit of the block the slot is published and
        `PendingSlot.ref` holds its descriptor; on an exception it goes back to FREE and
        the exception propagates, so an error can never leak a WRITING slot.

        `lock`: held only while taking and publishing a slot (several writer threads of one
        process may share a ring), never while waiting or copying. `on_wait`: called about
        every `wait_step_s` while the ring is full (back-pressure); it may raise to give up
        (a cancelled job), and a slot is looked for again right after it returns (it may
        have handled a RELEASE). Polls like `acquire()` (20 us doubling to 2 ms); with
        `wait_step_s` 0 the wait is `on_wait`'s own, so it should block for a while (poll
        a socket with a timeout).

        Raises `RingFullError` after `timeout_s` of a full ring (naming the ring, its slot
        count and the timeout), and `DescriptorError` when (shape, dtype) does not fit a
        slot, before any slot is taken.
        """
        shape = tuple(int(d) for d in shape)
        check_layout(shape, dtype, self.slot_bytes)
        guard: AbstractContextManager[object] = lock if lock is not None else nullcontext()
        deadline = time.monotonic() + timeout_s
        next_wait_call = time.monotonic() + wait_step_s
        pause_s = 20e-6
        while True:
            with guard:
                slot = self.try_acquire()
            if slot is not None:
                break
            now = time.monotonic()
            if now >= deadline:
                raise RingFullError(
                    f"ring {self.name}: no free slot among {self.slot_count} within "
                    f"{timeout_s:.3f} s (reader not releasing)"
                )
            if on_wait is not None and now >= next_wait_call:
                on_wait()
                next_wait_call = now + wait_step_s
                continue  # on_wait may have freed a slot (a RELEASE it read): look again
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 2e-3)
        pending = PendingSlot(slot, self.slot_view(slot, shape, dtype))
        try:
            yield pending
            with guard:
                pending.ref = self.publish(slot, shape, dtype, pts)
        except BaseException:
            self.abandon(slot)
            raise

    def abandon(self, slot: int) -> None:
        """Give back a slot acquired but not published (writer-side error path)."""
        if self._state[slot] == WRITING:
            self._state[slot] = FREE

    # ------------------------------------------------------------------ reader side

    def _check_ref(self, slot: int, seq: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.slot_count:
            raise DescriptorError("slot", f"must be in 0..{self.slot_count - 1}, got {slot}")
        if self._state[slot] != READY or int(self._seq[slot]) != seq:
            raise StaleSlotError(
                f"ring {self.name}: slot {slot} holds seq {int(self._seq[slot])} in state "
                f"{STATE_NAMES.get(int(self._state[slot]), '?')}; descriptor says seq {seq}"
            )

    def read(self, ref: SlotRef) -> np.ndarray:
        """A read-only numpy view of a published slot. Valid until `release()`."""
        if ref.ring != self.name:
            raise DescriptorError("ring", f"descriptor is for {ref.ring!r}, not {self.name!r}")
        self._check_ref(ref.slot, ref.seq)
        nbytes = check_layout(ref.shape, ref.dtype, self.slot_bytes)
        if nbytes > int(self._nbytes[ref.slot]):
            raise DescriptorError(
                "shape", f"{list(ref.shape)} x {ref.dtype} is {nbytes} bytes; the writer "
                f"published {int(self._nbytes[ref.slot])}"
            )
        # One ndarray straight over the mapping: the cheapest view numpy can make.
        view = np.ndarray(ref.shape, ref.dtype, self.segment.buffer,
                          self.data_offset + ref.slot * self.slot_bytes)
        view.flags.writeable = False
        return view

    def release(self, slot: int, seq: int) -> None:
        """Return a READY slot to FREE. Refuses a stale (slot, seq) pair."""
        self._check_ref(slot, seq)
        self._state[slot] = FREE

    # ------------------------------------------------------------------ owner tools

    def state(self, slot: int) -> int:
        return int(self._state[slot])

    def count(self, state: int) -> int:
        return int(np.count_nonzero(self._state == state))

    def reclaim(self, slots: list[int] | None = None) -> int:
        """Force slots back to FREE after their writer or reader died. Returns how many
        changed. Only the ring owner calls this, and only for slots no live process holds."""
        targets = range(self.slot_count) if slots is None else slots
        changed = 0
        for slot in targets:
            if self._state[slot] != FREE:
                self._state[slot] = FREE
                changed += 1
        return changed
