"""The avatar store: registered portraits, each in a shared-memory segment of its own.

The supervisor mints the one id of a portrait here (the SHA-256 of the image file's bytes,
32 hex digits) and every layer uses it: the client, the job specs, the workers' caches of
engine state. Workers read the file's bytes from the segment when they first need the
avatar, so a portrait crosses no socket after its upload. An avatar stays `pending` until a
worker has registered it successfully; a failed registration forgets it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from hashlib import sha256

import numpy as np

from avatard.ipc import protocol as P
from avatard.ipc import segments

log = logging.getLogger("avatard.supervisor")

MAX_AVATARS = 64  # pending ones beyond this are forgotten oldest first


@dataclass
class Avatar:
    ref: P.AvatarRef
    segment: segments.Segment
    validated: bool = False


class AvatarStore:
    """Portraits by id, in insertion order."""

    def __init__(self, max_avatars: int = MAX_AVATARS):
        self.max_avatars = max_avatars
        self._avatars: dict[str, Avatar] = {}

    def __contains__(self, avatar_id: str) -> bool:
        return avatar_id in self._avatars

    def __len__(self) -> int:
        return len(self._avatars)

    def store(self, data: np.ndarray | bytes) -> P.AvatarRef:
        """Keep an image file's bytes (1-D uint8) under their content hash; storing the
        same bytes again returns the same reference. Raises `SegmentError` when /dev/shm
        cannot hold them."""
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        avatar_id = sha256(raw).hexdigest()[:32]
        avatar = self._avatars.get(avatar_id)
        if avatar is not None:
            return avatar.ref
        if len(self._avatars) >= self.max_avatars:
            oldest = next((a for a, v in self._avatars.items() if not v.validated), None)
            if oldest is not None:
                self.forget(oldest)
        segment = segments.Segment.create("avatar", max(1, len(raw)))
        segment.buffer[: len(raw)] = raw
        ref = P.AvatarRef(avatar_id=avatar_id, segment=segment.name, nbytes=len(raw))
        self._avatars[avatar_id] = Avatar(ref, segment)
        return ref

    def ref(self, avatar_id: str) -> P.AvatarRef | None:
        """The reference of a stored avatar; None when unknown ("" is never stored)."""
        avatar = self._avatars.get(avatar_id)
        return avatar.ref if avatar is not None else None

    def validated(self, avatar_id: str) -> None:
        """A worker registered it: keep it for good."""
        avatar = self._avatars.get(avatar_id)
        if avatar is not None:
            avatar.validated = True

    def forget(self, avatar_id: str) -> None:
        """Drop an avatar no worker accepted (a failed registration); validated ones stay,
        since jobs may name them."""
        avatar = self._avatars.get(avatar_id)
        if avatar is not None and not avatar.validated:
            del self._avatars[avatar_id]
            avatar.segment.close()

    def close_all(self) -> None:
        for avatar in self._avatars.values():
            avatar.segment.close()
        self._avatars.clear()
