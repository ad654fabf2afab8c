"""The runtime directory's lock: one `avatard serve` per runtime directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def hold_runtime_lock(runtime_dir: Path) -> int:
    """Take `runtime_dir/avatard.lock` (flock, exclusive, not blocking) and write our pid
    into it; returns the file descriptor, held until it is closed (or the process dies).
    Raises RuntimeError naming the pid of the daemon that holds it and what to change."""
    path = runtime_dir / "avatard.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = Path(path).read_text().strip() or "?"
        os.close(fd)
        raise RuntimeError(f"another avatard serve (pid {other}) holds {path}; stop it "
                           "or set daemon.runtime_dir to another folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd
