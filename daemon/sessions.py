"""Client sessions: who is connected, the rings they read and write, delivery to them.

Owns every ring that carries client data: the shared inline input ring (requests from
remote clients), each worker's own frame/audio ring pair (remote sessions and jobs without
session rings), and per local session an input ring plus one frame/audio ring pair per
(worker, lane) that ran its jobs, so a client maps only its own session's segments and two
of its concurrent jobs never share a ring it must drain. It knows nothing of jobs or
workers' states: the coordinator says which session a frame is for, and asks which
sessions went quiet.

Every ring reserves its pages in /dev/shm when it is made: one that does not fit raises
`ShmFullError` from `hello` (the session's input ring) or `output_names` (a job's ring
pair), and the coordinator answers the client `no_space`. A session keeps the ring pair
of each (worker, lane) only while a job of its runs there, plus the one in use: a pair
whose place is free again is unlinked when the session needs a new one, so a long-lived
session that ran on many workers holds no more than its concurrent jobs need.

Delivery: a local session gets a descriptor and owns the slot until it sends RELEASE (or
`client_call_s` passes: the slot is taken back and the coordinator stops that client's
jobs); a remote (inline) session gets the bytes sent zero-copy from the slot, which goes
back once ZeroMQ is done with them.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np
import zmq

from avatard.ipc import protocol as P
from avatard.ipc import segments
from avatard.ipc.ring import WRITING, DescriptorError, SlotRing, StaleSlotError, ring_bytes
from avatard.ipc.segments import process_start_ticks

from .config import RingsConfig

log = logging.getLogger("avatard.supervisor")

SlotKey = tuple[str, int, int]  # (ring, slot, seq)
# A live session's audio ring holds one chunk per frame (the audio that frame was made
# from), as many as its frame ring holds frames: one frame's audio at up to 192 kHz.
LIVE_AUDIO_SLOT_BYTES = 32 * 1024


class Port(Protocol):
    """What sessions need of the client socket (`avatard.ipc.sockets.ClientPort`)."""

    def send(self, identity: bytes, msg: P.Msg, *extra: bytes | memoryview) -> None: ...

    def send_parts(self, identity: bytes, parts: list[Any], track: bool = False
                   ) -> zmq.MessageTracker | None: ...


@dataclass
class Session:
    identity: bytes
    session_id: str
    inline: bool
    input_ring: SlotRing | None = None
    # Frame and audio rings of this session, one pair per (worker, lane) that ran its jobs;
    # live sessions' pairs apart (their audio ring has a small slot per frame).
    outputs: dict[tuple[int, int], tuple[SlotRing, SlotRing]] = field(default_factory=dict)
    live_outputs: dict[tuple[int, int], tuple[SlotRing, SlotRing]] = field(
        default_factory=dict)
    held: dict[SlotKey, float] = field(default_factory=dict)  # slot -> when handed over
    last_seen: float = 0.0
    # A local client's process (pid and its start time, so a reused pid is not taken for
    # it): when it is gone, so is the client, whatever its socket still holds.
    pid: int | None = None
    pid_start: int | None = None


class Sessions:
    """Sessions by client identity, and every client-facing ring."""

    def __init__(self, rings: RingsConfig, port: Port, client_call_s: float,
                 session_idle_s: float, vanished_check_s: float = 0.5):
        self.rings_cfg = rings
        self.port = port
        self.client_call_s = client_call_s
        self.session_idle_s = session_idle_s
        self.vanished_check_s = vanished_check_s
        self._next_vanished_check = 0.0
        self.sessions: dict[bytes, Session] = {}
        self.inline_input = SlotRing.create("inline.in", rings.inline_slots,
                                            rings.inline_slot_bytes)
        self.worker_rings: list[tuple[SlotRing, SlotRing]] = []
        self.output_rings: dict[str, SlotRing] = {}  # name -> every ring workers write
        self.inline_sends: deque[tuple[zmq.MessageTracker, SlotRing, int, int]] = deque()
        self._opened = 0

    def add_worker_rings(self, count: int) -> None:
        """The frame and audio ring of each worker slot (index order)."""
        for i in range(count):
            pair = self._ring_pair(f"w{i}")
            self.worker_rings.append(pair)
            for ring in pair:
                self.output_rings[ring.name] = ring

    def _ring_pair(self, prefix: str, live: bool = False) -> tuple[SlotRing, SlotRing]:
        """A frame ring and an audio ring, both or neither (`ShmFullError`). A live
        session's audio ring has a slot of `LIVE_AUDIO_SLOT_BYTES` per frame slot: one
        chunk goes out with every frame, and a smaller ring would drop frames first."""
        r = self.rings_cfg
        frames = SlotRing.create(f"{prefix}.frames", r.frame_slots, r.frame_slot_bytes)
        try:
            audio = (SlotRing.create(f"{prefix}.audio", r.frame_slots, LIVE_AUDIO_SLOT_BYTES)
                     if live else
                     SlotRing.create(f"{prefix}.audio", r.audio_slots, r.audio_slot_bytes))
        except BaseException:
            frames.close()
            raise
        return frames, audio

    def shm_bytes(self) -> dict[str, int]:
        """What the rings reserve in /dev/shm: the daemon's own (inline input ring, worker
        rings), all sessions' together, and what one new local session takes with one job
        (its input ring and one ring pair)."""
        r = self.rings_cfg
        own = self.inline_input.segment.size + sum(
            ring.segment.size for pair in self.worker_rings for ring in pair)
        # Called on the supervisor's loop only (the metrics thread gets a finished status
        # body through StatusHandoff), so the dicts cannot change while they are summed.
        sessions = sum(
            (s.input_ring.segment.size if s.input_ring is not None else 0)
            + sum(ring.segment.size for pair in [*s.outputs.values(), *s.live_outputs.values()]
                  for ring in pair)
            for s in self.sessions.values())
        return {"daemon_rings_bytes": own, "session_rings_bytes": sessions,
                "per_session_bytes": (ring_bytes(r.input_slots, r.input_slot_bytes)
                                      + ring_bytes(r.frame_slots, r.frame_slot_bytes)
                                      + ring_bytes(r.audio_slots, r.audio_slot_bytes))}

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, identity: bytes) -> Session | None:
        return self.sessions.get(identity)

    # ------------------------------------------------------------ lifecycle

    def hello(self, identity: bytes, inline: bool, now: float, pid: int | None = None
              ) -> Session:
        """The client's session, opened on its first hello (a local one gets its input
        ring); a repeated hello keeps it. `pid`: the client's process when the connection
        tells it (ipc://), watched by `vanished`. Raises `ShmFullError` (no session is
        opened) when /dev/shm cannot hold the input ring."""
        session = self.sessions.get(identity)
        if session is None:
            input_ring = None
            if not inline:
                input_ring = SlotRing.create("s.in", self.rings_cfg.input_slots,
                                             self.rings_cfg.input_slot_bytes)
            self._opened += 1
            start = process_start_ticks(pid) if pid else None
            session = Session(identity, f"s{self._opened}-{os.urandom(4).hex()}", inline,
                              input_ring=input_ring, last_seen=now,
                              pid=pid if start is not None else None, pid_start=start)
            self.sessions[identity] = session
        return session

    def end(self, identity: bytes) -> bool:
        """Close a session: take back the slots it held, unlink its rings. The caller has
        ended its jobs first. False when there was no such session."""
        session = self.sessions.pop(identity, None)
        if session is None:
            return False
        for key in list(session.held):
            self.release_output(*key)
        if session.input_ring is not None:
            session.input_ring.close()
        # A worker may still write into these until it acknowledges the cancel: it keeps
        # its own mapping, and its late descriptors name a ring no longer known here.
        for pair in [*session.outputs.values(), *session.live_outputs.values()]:
            for ring in pair:
                self.output_rings.pop(ring.name, None)
                ring.close()
        return True

    def close_all(self) -> None:
        for identity in list(self.sessions):
            self.end(identity)
        for pair in self.worker_rings:
            for ring in pair:
                ring.close()
        self.inline_input.close()

    # ------------------------------------------------------------ client input

    def _input_ring(self, name: str) -> SlotRing | None:
        if name == self.inline_input.name:
            return self.inline_input
        return next((s.input_ring for s in self.sessions.values()
                     if s.input_ring is not None and s.input_ring.name == name), None)

    def take_input(self, session: Session, payload: P.Payload, extra: list[Any],
                   field_name: str, req_id: int) -> P.SlotDesc:
        """Client data as a descriptor into a daemon-owned ring: a local client's slot of
        its own input ring (checked), or an inline part copied into the inline ring.
        Raises `ProtocolError` naming `field_name` and the broken rule. Release the slot
        with `release_input(desc.key)` when the job ends."""
        if isinstance(payload, P.SlotDesc):
            ring = session.input_ring
            if ring is None or payload.ring != ring.name:
                raise P.ProtocolError(P.E_BAD_MESSAGE, f"{field_name}.ring",
                                      "must name this session's input ring", req_id)
            try:
                ring.read(payload.ref())
            except (StaleSlotError, DescriptorError) as exc:
                field_part = getattr(exc, "field", "seq")
                raise P.ProtocolError(P.E_STALE if isinstance(exc, StaleSlotError) else
                                      P.E_BAD_MESSAGE, f"{field_name}.{field_part}", str(exc),
                                      req_id) from None
            return payload
        raw = self.inline_part(payload, extra, field_name, req_id)
        array = np.frombuffer(raw, dtype=payload.dtype).reshape(payload.shape)
        try:
            ref = self.inline_input.write(array, timeout_s=0.0)
        except TimeoutError:
            raise P.ProtocolError(P.E_BUSY, field_name, "all inline input slots are in use; "
                                  "retry shortly", req_id) from None
        return P.SlotDesc.from_ref(ref)

    def drop_refused_input(self, identity: bytes, keys: list[tuple[str, int, int]]) -> None:
        """Free the slots of the client's own input ring that a refused request named (its
        `audio` or `image` payload: (ring, slot, seq) each), if a slot still holds that
        request's write. Slots of other rings are left alone."""
        session = self.sessions.get(identity)
        ring = session.input_ring if session is not None else None
        if ring is None:
            return
        for ring_name, slot, seq in keys:
            if ring_name != ring.name:
                continue
            try:
                ring.release(slot, seq)
            except (StaleSlotError, DescriptorError):
                pass  # taken and given back already, never written, or out of range

    def inline_part(self, payload: P.Inline, extra: list[Any], field_name: str,
                    req_id: int) -> Any:
        """The message part an inline payload names, checked: the part exists, holds
        exactly shape x dtype bytes, and is at most `rings.inline_slot_bytes`. Raises
        `ProtocolError` naming `field_name`."""
        if payload.part > len(extra):
            raise P.ProtocolError(P.E_BAD_MESSAGE, f"{field_name}.part",
                                  f"message has {len(extra)} extra parts", req_id)
        raw = extra[payload.part - 1]
        if P.payload_nbytes(payload) != len(raw):
            raise P.ProtocolError(P.E_BAD_MESSAGE, f"{field_name}.shape",
                                  f"{payload.shape} x {payload.dtype} is "
                                  f"{P.payload_nbytes(payload)} bytes; part holds {len(raw)}",
                                  req_id)
        if len(raw) > self.inline_input.slot_bytes:
            raise P.ProtocolError(P.E_TOO_LARGE, field_name, f"{len(raw)} bytes; max "
                                  f"{self.inline_input.slot_bytes} (rings.inline_slot_bytes)",
                                  req_id)
        return raw

    def read_input(self, desc: P.SlotDesc) -> np.ndarray:
        """A read-only view of an input slot taken by `take_input` (valid until released)."""
        ring = self._input_ring(desc.ring)
        if ring is None:
            raise KeyError(f"no input ring {desc.ring!r}")
        return ring.read(desc.ref())

    def release_input(self, key: SlotKey) -> None:
        """Give back an input slot (its job ended); a ring already gone needs nothing."""
        ring = self._input_ring(key[0])
        if ring is not None:
            try:
                ring.release(key[1], key[2])
            except (StaleSlotError, DescriptorError):
                pass

    # ------------------------------------------------------------ output rings

    def output_names(self, identity: bytes, worker: int, lane: int,
                     busy: Collection[tuple[int, int]] | None = None, live: bool = False
                     ) -> tuple[str, str]:
        """The (frame, audio) rings a job of this client writes on `worker` in `lane`:
        rings of the session's own for a local client (created on first use), ("", "") for
        the worker's own rings (remote clients: the daemon sends the bytes and releases).
        `busy`: the (worker, lane) places this client's other jobs still hold (running, or
        cancelled and not yet acknowledged); the session's pairs elsewhere that hold no
        slot go before a new pair is made (None: keep every pair). `live`: the pair of a
        live session (see `_ring_pair`). Raises `ShmFullError` when /dev/shm cannot hold a
        new pair."""
        session = self.sessions.get(identity)
        if session is None or session.inline:
            return "", ""
        pairs = session.live_outputs if live else session.outputs
        pair = pairs.get((worker, lane))
        if pair is None:
            if busy is not None:
                self._drop_idle_pairs(session, busy)
            pair = self._ring_pair("s", live)
            pairs[(worker, lane)] = pair
            for ring in pair:
                self.output_rings[ring.name] = ring
        return pair[0].name, pair[1].name

    def _drop_idle_pairs(self, session: Session, busy: Collection[tuple[int, int]]) -> None:
        held_rings = {key[0] for key in session.held}
        for pairs in (session.outputs, session.live_outputs):
            for place, pair in list(pairs.items()):
                if place in busy or any(ring.name in held_rings for ring in pair):
                    continue
                del pairs[place]
                for ring in pair:
                    self.output_rings.pop(ring.name, None)
                    ring.close()

    def release_output(self, ring_name: str, slot: int, seq: int) -> bool:
        """Free a slot of a ring workers write; False for an unknown ring or a stale pair."""
        ring = self.output_rings.get(ring_name)
        if ring is None:
            return False
        try:
            ring.release(slot, seq)
            return True
        except (StaleSlotError, DescriptorError):
            return False

    def reclaim_worker(self, index: int) -> None:
        """Worker `index`'s process is gone: the slots it was writing are half-written and
        go back to FREE (READY ones still belong to their readers)."""
        rings = list(self.worker_rings[index]) if index < len(self.worker_rings) else []
        rings += [r for s in self.sessions.values()
                  for (i, _), pair in [*s.outputs.items(), *s.live_outputs.items()]
                  if i == index for r in pair]
        for ring in rings:
            ring.reclaim([s for s in range(ring.slot_count) if ring.state(s) == WRITING])

    # ------------------------------------------------------------ delivery

    def client_release(self, identity: bytes, msg: P.Release) -> None:
        """A client's RELEASE of a slot it was handed. Raises `ProtocolError` (stale_slot)
        for a slot this session does not hold."""
        session = self.sessions.get(identity)
        key = (msg.ring, msg.slot, msg.seq)
        if session is None or session.held.pop(key, None) is None:
            raise P.ProtocolError(P.E_STALE, "seq", f"slot {msg.slot} seq {msg.seq} of "
                                  f"{msg.ring} is not held by this session", msg.req_id)
        self.release_output(*key)

    def forward(self, identity: bytes, msg: P.Frame | P.AudioChunk, now: float) -> None:
        """Deliver a frame or audio chunk whose bytes are in `msg.data` (a slot of an output
        ring). Without the session the slot goes straight back."""
        data = msg.data
        assert isinstance(data, P.SlotDesc)
        session = self.sessions.get(identity)
        ring = self.output_rings.get(data.ring)
        if session is None or ring is None:
            self.release_output(data.ring, data.slot, data.seq)
            return
        if session.inline:
            view = ring.read(data.ref())
            inline_msg = msgspec.structs.replace(
                msg, data=P.Inline(part=1, shape=data.shape, dtype=data.dtype))
            parts = [*P.Codec.encode(inline_msg), memoryview(view).cast("B")]
            tracker = self.port.send_parts(identity, parts, track=True)
            if tracker is None:
                ring.release(data.slot, data.seq)
                return
            # The slot goes back once ZeroMQ no longer needs its bytes (zero-copy send).
            self.inline_sends.append((tracker, ring, data.slot, data.seq))
        else:
            session.held[data.key] = now
            self.port.send(identity, msg)

    def finish_inline_sends(self) -> None:
        """Release the slots whose zero-copy sends ZeroMQ has finished with."""
        while self.inline_sends and self.inline_sends[0][0].done:
            _, ring, slot, seq = self.inline_sends.popleft()
            try:
                ring.release(slot, seq)
            except StaleSlotError:
                pass

    # ------------------------------------------------------------ the clock

    def expire_held(self, now: float) -> list[tuple[bytes, str]]:
        """Take back slots held over `client_call_s` (the client's view goes stale).
        Returns the clients concerned, each with what it held ("a frame slot", "an audio
        slot", "frame and audio slots"): one that stops releasing is gone or stuck, and
        its jobs must stop, or they hold their workers until their deadlines."""
        stuck = []
        for session in self.sessions.values():
            expired = [key for key, handed in session.held.items()
                       if now - handed > self.client_call_s]
            for key in expired:
                del session.held[key]
                self.release_output(*key)
                log.warning("session %s kept slot %s for over %.0f s: reclaimed",
                            session.session_id, key, self.client_call_s)
            if expired:
                # Ring labels end in ".frames" or ".audio" (`_ring_pair`).
                kinds = {"audio" if ring.endswith(".audio") else "frame"
                         for ring, _, _ in expired}
                held = ("frame and audio slots" if len(kinds) > 1 else
                        "an audio slot" if kinds == {"audio"} else "a frame slot")
                stuck.append((session.identity, held))
        return stuck

    def vanished(self, now: float) -> list[bytes]:
        """Clients whose process has exited (local clients only; checked at most every
        `vanished_check_s`): their jobs must end now, not when held slots or deadlines run
        out. A slow client that is alive is never among them."""
        if now < self._next_vanished_check:
            return []
        self._next_vanished_check = now + self.vanished_check_s
        return [s.identity for s in self.sessions.values()
                if s.pid is not None and process_start_ticks(s.pid) != s.pid_start]

    def expire_idle(self, now: float, busy: set[bytes]) -> list[bytes]:
        """Close sessions silent for `session_idle_s` that hold no slot and no job (`busy`:
        clients with live jobs), so the rings of clients that vanished without bye do not
        pile up in /dev/shm. Returns the closed sessions' client identities."""
        closed = []
        for identity, session in list(self.sessions.items()):
            if (now - session.last_seen <= self.session_idle_s or session.held
                    or identity in busy):
                continue
            log.info("session %s idle for %.0f s: closed", session.session_id,
                     self.session_idle_s)
            self.end(identity)
            closed.append(identity)
        return closed


def describe_shm(shm: dict[str, int]) -> str:
    """One log line from `Sessions.shm_bytes()`: what the daemon's rings reserve in
    /dev/shm, what is left, and what each local session running a job adds
    (docs/config.md, Shared memory)."""
    mib = 1 << 20
    size, free = segments.shm_space()
    return (f"rings reserve {shm['daemon_rings_bytes'] / mib:.1f} MiB of {segments.SHM_DIR} "
            f"({free / mib:.1f} of {size / mib:.1f} MiB left); a local session running one "
            f"job takes {shm['per_session_bytes'] / mib:.1f} MiB more (docs/config.md, "
            "Shared memory)")
