"""POSIX shared-memory segments with explicit ownership and a sweep for dead owners.

On Linux a POSIX shared-memory object *is* a file under /dev/shm, so segments are made
with plain `os.open` + `ftruncate` + `mmap` there. This keeps us clear of
`multiprocessing.resource_tracker`, which on Python < 3.13 also unlinks segments that a
process merely attached to.

Ownership rules (the invariants the rest of avatard relies on):
- Only the owner creates a segment (O_CREAT | O_EXCL, mode 0600) and only the owner
  unlinks it. Attachers map and close, never unlink.
- The name records the owner: ``avatard-<pid>-<start ticks>-<token>-<label>``. The start
  ticks (field 22 of /proc/<pid>/stat) make the name immune to pid reuse.
- `sweep_stale_segments()` runs when an owner starts: it unlinks every avatard segment
  whose owner process no longer exists. So after a SIGKILL of an owner nothing is left once
  the next owner has started.
- Every segment this process created is unlinked at interpreter exit too (atexit), in
  case a caller forgot `close()`.
- Every page of a segment is reserved when it is created (`posix_fallocate`). A segment is
  a tmpfs file, and a store into a page that tmpfs cannot back raises SIGBUS in whichever
  process touches it (a 64 MiB Docker /dev/shm fills fast); reserving up front turns that
  into `ShmFullError` at creation, which callers answer with an error, never a signal.
"""

from __future__ import annotations

import atexit
import errno
import logging
import mmap
import os
import re
import secrets
import threading
from pathlib import Path

SHM_DIR = Path(os.environ.get("AVATARD_SHM_DIR", "/dev/shm"))
PREFIX = "avatard-"
_NAME_RE = re.compile(r"^avatard-(\d+)-(\d+)-([0-9a-f]{16})-([A-Za-z0-9_.]{1,64})$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.]{1,64}$")

log = logging.getLogger("avatard.segments")

_created_lock = threading.Lock()
_created_by_me: set[str] = set()


class SegmentError(OSError):
    """A segment could not be created, attached or validated."""


class ShmFullError(SegmentError):
    """The shared-memory directory cannot hold a new segment's pages. The message names the
    directory, its size, its free space, what the segment needs and the config keys that
    size rings, so an operator knows what to change (a container's `--shm-size`)."""

    def __init__(self, label: str, needed_bytes: int):
        total_bytes, free_bytes = shm_space()
        self.needed_bytes = needed_bytes
        self.total_bytes = total_bytes
        self.free_bytes = free_bytes
        super().__init__(no_room_message(label, needed_bytes, free_bytes, total_bytes))
        self.errno = errno.ENOSPC


def no_room_message(label: str, needed_bytes: int, free_bytes: int, total_bytes: int) -> str:
    """What `ShmFullError` says: the directory, what segment `label` needs, what is free of
    what size, and the keys to change. Sizes in MiB, with the exact bytes beside them when
    two different sizes would read the same (16.02 MiB needed, 15.98 MiB free)."""
    needed, free, total = _sizes(needed_bytes, free_bytes, total_bytes)
    return (f"{SHM_DIR} has no room: the {label} segment needs {needed} but only {free} of "
            f"its {total} is free; give it more room (docker run --shm-size, see "
            "docs/config.md) or lower rings.frame_slots, rings.frame_slot_bytes, "
            "rings.audio_slots, rings.audio_slot_bytes, rings.input_slots, "
            "rings.input_slot_bytes, rings.inline_slots, rings.inline_slot_bytes or "
            "avatars.max_bytes")


def _sizes(*nbytes: int) -> list[str]:
    """Each byte count as "X.X MiB"; as "X.X MiB (N bytes)" when two different counts
    would otherwise print alike."""
    texts = [f"{n / (1 << 20):.1f} MiB" for n in nbytes]
    if len(set(texts)) < len(set(nbytes)):
        texts = [f"{text} ({n} bytes)" for text, n in zip(texts, nbytes, strict=True)]
    return texts


def shm_space() -> tuple[int, int]:
    """(size, free bytes) of the shared-memory directory's file system; (0, 0) unknown."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return 0, 0
    return stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize


def _reserve(fd: int, size: int, label: str) -> None:
    """Back every page of a new segment now, or raise `ShmFullError` (see module doc)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise ShmFullError(label, size) from None
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            # A directory whose file system cannot reserve (AVATARD_SHM_DIR elsewhere):
            # the segment stays sparse, as before; say so once per creation.
            log.warning("%s cannot reserve pages (%s): segment %s stays sparse", SHM_DIR,
                        exc.strerror, label)
            return
        raise


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after the last
    # ')' are fixed. Field 22 (starttime) is index 19 after it.
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[19])


_MY_START_TICKS: int | None = None


def _my_start_ticks() -> int:
    global _MY_START_TICKS
    pid = os.getpid()
    # After a fork the cached value belongs to the parent; re-read when the pid changed.
    if _MY_START_TICKS is None or getattr(_my_start_ticks, "pid", None) != pid:
        _MY_START_TICKS = process_start_ticks(pid) or 0
        _my_start_ticks.pid = pid  # type: ignore[attr-defined]
    return _MY_START_TICKS


def new_segment_name(label: str) -> str:
    """A fresh name owned by this process: pid, start ticks, random token, label."""
    if not _LABEL_RE.match(label):
        raise ValueError(f"segment label {label!r} must match {_LABEL_RE.pattern}")
    return f"{PREFIX}{os.getpid()}-{_my_start_ticks()}-{secrets.token_hex(8)}-{label}"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """(owner pid, owner start ticks) of an avatard segment name, else None."""
    match = _NAME_RE.match(name)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2))


def owner_alive(name: str) -> bool:
    parsed = parse_segment_name(name)
    if parsed is None:
        return False
    pid, ticks = parsed
    return process_start_ticks(pid) == ticks


def list_segments() -> list[str]:
    """Names of all avatard segments currently in the shared-memory directory."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def segments_of(pid: int) -> list[str]:
    """Names of the avatard segments in the shared-memory directory whose name says `pid`
    created them (sorted; empty when there are none). After that process has exited, what
    is left is what it leaked."""
    return [name for name in list_segments() if (parse_segment_name(name) or (0,))[0] == pid]


def sweep_stale_segments() -> list[str]:
    """Unlink avatard segments whose owner process is gone. Returns what was removed."""
    removed = []
    for name in list_segments():
        if parse_segment_name(name) is None or owner_alive(name):
            continue
        try:
            os.unlink(SHM_DIR / name)
            removed.append(name)
        except FileNotFoundError:
            pass  # another starting owner swept it first
    return removed


class Segment:
    """One mapped shared-memory segment. `create()` makes an owner, `attach()` a user."""

    def __init__(self, name: str, fd: int, size: int, owner: bool):
        self.name = name
        self.size = size
        self.owner = owner
        self._mmap: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED)
        os.close(fd)  # the mapping keeps the object alive; the fd is not needed

    @classmethod
    def create(cls, label: str, size: int) -> Segment:
        if size <= 0:
            raise ValueError(f"segment size must be > 0, got {size}")
        name = new_segment_name(label)
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # independent of the umask, state it explicitly
            os.ftruncate(fd, size)
            _reserve(fd, size, label)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        with _created_lock:
            _created_by_me.add(name)
        return cls(name, fd, size, owner=True)

    @classmethod
    def attach(cls, name: str, min_size: int = 1) -> Segment:
        if parse_segment_name(name) is None:
            raise SegmentError(f"segment name {name!r} is not an avatard segment name")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentError(f"segment {name!r} does not exist (owner gone?)") from None
        size = os.fstat(fd).st_size
        if size < min_size:
            os.close(fd)
            raise SegmentError(f"segment {name!r} holds {size} bytes, need >= {min_size}")
        return cls(name, fd, size, owner=False)

    @property
    def buffer(self) -> mmap.mmap:
        if self._mmap is None:
            raise SegmentError(f"segment {self.name!r} is closed")
        return self._mmap

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unmap; the owner also unlinks. Safe to call twice."""
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # numpy views still point into the mapping; leave it mapped (the kernel
                # frees it at exit) but still unlink so no name leaks.
                pass
            self._mmap = None
        if self.owner:
            unlink_segment(self.name)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unlink_segment(name: str) -> None:
    with _created_lock:
        _created_by_me.discard(name)
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass


def unlink_all_created() -> list[str]:
    """Unlink every segment this process created and has not unlinked yet."""
    with _created_lock:
        names = sorted(_created_by_me)
    mine = [n for n in names if (parse_segment_name(n) or (0,))[0] == os.getpid()]
    for name in mine:
        unlink_segment(name)
    return mine


atexit.register(unlink_all_created)
