"""Memory of a process as the kernel counts it: the resident set (RSS).

One reader for every place that reports memory: a worker's heartbeat and load figure, the
engines' load figures, the supervisor's status of each worker, the benches' samples of the
daemon and its workers. Standard library only (it reads /proc), so engines, the torch-free
supervisor and the benches can all import it. GPU memory per process comes from NVML in
`avatard.daemon.devices`.
"""

from __future__ import annotations

import os

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of process `pid` (this process when None), in bytes.

    Reads /proc/<pid>/statm, as psutil's `memory_info().rss` does on Linux. Returns 0 when
    the process does not exist (any more) or its figures cannot be read; a zombie reads 0
    too. Never raises.
    """
    where = "self" if pid is None else str(int(pid))
    try:
        with open(f"/proc/{where}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0
