"""The avatar store: registered portraits, each in a shared-memory segment of its own.

The supervisor mints the one id of a portrait here (the SHA-256 of the image file's bytes,
32 hex digits) and every layer uses it: the client, the job specs, the workers' caches of
engine state. Workers read the file's bytes from the segment when they first need the
avatar, so a portrait crosses no socket after its upload. An avatar stays `pending` until a
worker has registered it successfully; a failed registration forgets it.

Bounds: at most `max_count` portraits and `max_bytes` of image files. A new portrait makes
room by letting the least recently used ones go (used: registered, or named by an accepted
job), never one that a live job names (`pin`/`unpin`, counted, from the coordinator):
that job's worker may still have to read its segment. When /dev/shm itself is full, more
unpinned portraits go before the store gives up with `ShmFullError`; the coordinator also
lets idle portraits go (`evict_idle`) when a client's or a job's ring does not fit, so
stored portraits never crowd out the rings that serving needs. A let-go id is
remembered (a bounded list) so that a request naming it is told why it is not found.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from hashlib import sha256

import numpy as np

from avatard.ipc import protocol as P
from avatard.ipc import segments

log = logging.getLogger("avatard.supervisor")

MAX_AVATARS = 64
MAX_BYTES = 16 << 20
EVICTED_REMEMBERED = 4096  # let-go ids kept to explain a not_found


class AvatarTooLarge(ValueError):
    """One image file larger than the whole store may hold (`avatars.max_bytes`)."""


@dataclass
class Avatar:
    ref: P.AvatarRef
    segment: segments.Segment
    validated: bool = False
    pins: int = 0  # live jobs naming it
    frame: P.FrameSize | None = None  # its frames' size, as the registering worker said


class AvatarStore:
    """Portraits by id, least recently used first."""

    def __init__(self, max_avatars: int = MAX_AVATARS, max_bytes: int = MAX_BYTES):
        self.max_avatars = max_avatars
        self.max_bytes = max_bytes
        self._avatars: OrderedDict[str, Avatar] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self.bytes = 0  # image bytes held, all portraits together
        self.evictions = 0  # portraits let go to make room, since start

    def __contains__(self, avatar_id: str) -> bool:
        return avatar_id in self._avatars

    def __len__(self) -> int:
        return len(self._avatars)

    def store(self, data: np.ndarray | bytes) -> P.AvatarRef:
        """Keep an image file's bytes (1-D uint8) under their content hash; storing the
        same bytes again returns the same reference. Raises `AvatarTooLarge` for a file
        over `max_bytes`, `ShmFullError` when /dev/shm cannot hold it even after every
        unpinned portrait went."""
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        avatar_id = sha256(raw).hexdigest()[:32]
        avatar = self._avatars.get(avatar_id)
        if avatar is not None:
            self._avatars.move_to_end(avatar_id)
            return avatar.ref
        size = max(1, len(raw))
        if size > self.max_bytes:
            raise AvatarTooLarge(f"{len(raw)} bytes; the daemon keeps at most {self.max_bytes} "
                                 "bytes of portraits (avatars.max_bytes)")
        while len(self._avatars) >= self.max_avatars or self.bytes + size > self.max_bytes:
            if not self.evict_idle("a new portrait, within avatars.max_count/max_bytes"):
                break  # every portrait is pinned: go over the bound rather than refuse
        while True:
            try:
                segment = segments.Segment.create("avatar", size)
                break
            except segments.ShmFullError:
                if not self.evict_idle("a new portrait"):
                    raise
        segment.buffer[: len(raw)] = raw
        ref = P.AvatarRef(avatar_id=avatar_id, segment=segment.name, nbytes=len(raw))
        self._avatars[avatar_id] = Avatar(ref, segment)
        self._evicted.pop(avatar_id, None)
        self.bytes += segment.size
        return ref

    def evict_idle(self, room_for: str) -> bool:
        """Let the least recently used portrait that no live job names go, unlinking its
        segment, to make room for `room_for` (said in the log); False when every
        portrait is in use (or there is none)."""
        victim = next((a for a, v in self._avatars.items() if not v.pins), None)
        if victim is None:
            return False
        self._drop(victim)
        self.evictions += 1
        self._evicted[victim] = None
        while len(self._evicted) > EVICTED_REMEMBERED:
            self._evicted.popitem(last=False)
        log.info("avatar %s let go to make room for %s (least recently used; %d kept, %d "
                 "bytes)", victim, room_for, len(self._avatars), self.bytes)
        return True

    def _drop(self, avatar_id: str) -> None:
        avatar = self._avatars.pop(avatar_id)
        self.bytes -= avatar.segment.size
        avatar.segment.close()

    def ref(self, avatar_id: str) -> P.AvatarRef | None:
        """The reference of a stored avatar, now its most recently used; None when unknown
        ("" is never stored)."""
        avatar = self._avatars.get(avatar_id)
        if avatar is None:
            return None
        self._avatars.move_to_end(avatar_id)
        return avatar.ref

    def was_evicted(self, avatar_id: str) -> bool:
        """It was stored, then let go to make room (so a not_found can say so)."""
        return avatar_id in self._evicted

    def pin(self, avatar_id: str) -> None:
        """A live job names it: keep it until `unpin`."""
        avatar = self._avatars.get(avatar_id)
        if avatar is not None:
            avatar.pins += 1

    def unpin(self, avatar_id: str) -> None:
        avatar = self._avatars.get(avatar_id)
        if avatar is not None and avatar.pins:
            avatar.pins -= 1

    def job_ended(self, spec: P.AnyJobSpec, result: P.WJobDone | None) -> None:
        """A job that named a portrait ended (`result`: the worker's report when it
        succeeded, else None): unpin it; a registration's portrait is kept for good, with
        the frame size the worker reported, when a worker accepted it, and forgotten when
        none could."""
        avatar = getattr(spec, "avatar", None)
        if avatar is None:
            return
        self.unpin(avatar.avatar_id)
        if not isinstance(spec, P.RegisterSpec):
            return
        if result is not None and result.frame is not None:
            self.validated(avatar.avatar_id, result.frame)
        else:
            self.forget(avatar.avatar_id)

    def validated(self, avatar_id: str, frame: P.FrameSize) -> None:
        """A worker registered it; its frames are `frame` (width x height pixels)."""
        avatar = self._avatars.get(avatar_id)
        if avatar is not None:
            avatar.validated = True
            avatar.frame = frame

    def frame_size(self, avatar_id: str) -> P.FrameSize | None:
        """The size of the frames rendered for a stored portrait; None when unknown (not
        stored, or its registration has not ended yet). Not a use: the order is kept."""
        avatar = self._avatars.get(avatar_id)
        return avatar.frame if avatar is not None else None

    def forget(self, avatar_id: str) -> None:
        """Drop an avatar no worker accepted (a failed registration); validated ones stay,
        since jobs may name them."""
        avatar = self._avatars.get(avatar_id)
        if avatar is not None and not avatar.validated and not avatar.pins:
            self._drop(avatar_id)

    def stats(self) -> dict[str, int]:
        """The status body's `avatars` map."""
        return {"count": len(self._avatars), "bytes": self.bytes,
                "max_count": self.max_avatars, "max_bytes": self.max_bytes,
                "evictions": self.evictions}

    def close_all(self) -> None:
        for avatar in self._avatars.values():
            avatar.segment.close()
        self._avatars.clear()
        self.bytes = 0
