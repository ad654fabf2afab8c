"""Status and notify: what the daemon tells about itself, to clients and to systemd.

Builds the `stats`/`avatard status` body and the Prometheus snapshot from plain figures
the coordinator passes in (worker slots, the job book's counters, session count), decides
the health word, and sends systemd READY=1 once, STATUS= lines when the summary changes and
WATCHDOG=1 pings while the loop runs. It reads nothing of the other components itself.

`StatusHandoff` carries a body from the supervisor's loop to another thread (the metrics
server's): only the loop's thread reads the job book, the pool and the sessions, which it
changes as it goes, so another thread asks for a body and waits for the loop to build one.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
from collections.abc import Iterable
from typing import Any

from avatard.ipc import segments
from avatard.ipc.procmem import rss_bytes

from . import devices as dev
from .pool import UP, WorkerSlot, WState
from .sdnotify import Notifier

log = logging.getLogger("avatard.supervisor")


def health(draining: bool, ready: int, min_ready: int, all_failed: bool) -> str:
    """draining | ready (min_ready workers up) | failed (every worker gave up loading,
    nothing will change without an operator) | starting."""
    if draining:
        return "draining"
    if ready >= min_ready:
        return "ready"
    if all_failed:
        return "failed"
    return "starting"


def worker_status(w: WorkerSlot, running: list[str], now: float) -> dict[str, Any]:
    """One worker's entry of the status body. `running`: ids of every job placed on it."""
    device_memory = dev.nvml().process_memory(w.pid) if (w.pid and w.device.is_gpu) else 0
    rss = (rss_bytes(w.pid) or w.rss_bytes) if w.pid else w.rss_bytes
    return {
        "id": w.index, "pid": w.pid, "state": w.state.value,
        "state_age_s": round(now - w.state_since, 3), "device": w.device.name,
        "device_label": w.device.label, "device_memory_bytes": device_memory,
        "load_memory_bytes": w.memory_bytes, "rss_bytes": rss,
        "uptime_s": round(now - w.started_at, 3) if w.pid else 0.0,
        "restarts": w.restarts, "load_failures": w.load_failures, "attempt": w.attempt,
        "current_jobs": running, "capacity": w.capacity,
        "stage": w.stage, "load_s": round(w.load_s, 3), "reason": w.reason,
        "engines": w.engines,
        "avatar_cache": {"cached": 0, "evictions": 0, "engine_cached": 0, **w.avatar_cache},
        "engine_counters": dict(w.engine_counters),
    }


class StatusBoard:
    """systemd notification state and the status body."""

    def __init__(self, notifier: Notifier, min_ready: int, started_at: float):
        self.notifier = notifier
        self.min_ready = min_ready
        self.started_at = started_at
        self.ready_sent = False
        self._last_status = ""
        self._last_watchdog = 0.0

    def snapshot(self, now: float, state: str, endpoints: list[str], sessions: int,
                 workers: list[tuple[WorkerSlot, list[str]]], queue: Any, running: int,
                 counters: dict[str, int], recent_rtf: Iterable[float],
                 avatars: dict[str, Any], session_shm: dict[str, int],
                 registrations: dict[str, int],
                 live_sessions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The status body from the coordinator's figures: each worker slot with the ids
        of the jobs placed on it, the queue (its length and `size`), the shared-memory use
        of the daemon's rings and sessions (plus /dev/shm's size, free space and this
        daemon's segment count, read here), the job and registration counters."""
        size, free = segments.shm_space()
        shm = {"dir": str(segments.SHM_DIR), "size_bytes": size, "free_bytes": free,
               "segments": len(segments.segments_of(os.getpid())), **session_shm}
        return self.body(now, state, endpoints, sessions,
                         [worker_status(w, jobs, now) for w, jobs in workers], len(queue),
                         queue.size, running, counters, recent_rtf, avatars, shm,
                         registrations, live_sessions)

    def body(self, now: float, state: str, endpoints: list[str], sessions: int,
             workers: Iterable[dict[str, Any]], queue_depth: int, queue_size: int,
             running: int, counters: dict[str, int], recent_rtf: Iterable[float],
             avatars: dict[str, int] | None = None, shm: dict[str, Any] | None = None,
             registrations: dict[str, int] | None = None,
             live_sessions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The `stats_reply` body (docs/protocol.md, `avatard status --json`). `counters`:
        the job counters (speak, lipsync, transcribe) and the client port's; `registrations`:
        portrait registrations by outcome (registered, refused, failed, requeued);
        `live_sessions`: one entry per live session not ended (`live_session_status`)."""
        workers = list(workers)
        rtf = list(recent_rtf)
        return {
            "daemon": {"pid": os.getpid(), "uptime_s": round(now - self.started_at, 3),
                       "endpoints": endpoints, "state": state,
                       "ready_workers": sum(w["state"] in UP for w in workers),
                       "min_ready": self.min_ready, "sessions": sessions},
            "workers": workers,
            "queue": {"depth": queue_depth, "size": queue_size, "running": running},
            "jobs": dict(counters),
            "registrations": dict(registrations or {}),
            "rtf_recent_median": statistics.median(rtf) if rtf else None,
            "avatars": dict(avatars or {}),  # the supervisor's portrait store
            "shm": dict(shm or {}),  # /dev/shm and what the daemon's segments take
            "live_sessions": list(live_sessions or []),
        }

    @staticmethod
    def live_session_status(job: Any, now: float) -> dict[str, Any]:
        """One live session's figures (a `Job` of kind live): its worker (None while it
        waits or moves), the next frame index, frames sent, dropped (index gaps: the
        client did not read; also those its worker's last heartbeat counted that no later
        frame has shown yet), late and lost (moves), speech queued on its worker (seconds,
        at the last heartbeat), and its age in seconds."""
        return {"job_id": job.job_id, "worker": job.worker, "state": job.state.value,
                "next_index": job.frames_delivered,
                "frames_sent": job.frames_earlier + job.frames_forwarded,
                "frames_dropped": job.frames_dropped_now,
                "late_frames": job.late_frames_now, "frames_lost": job.frames_lost,
                "queued_s": round(job.queued_s, 3),
                "age_s": round(now - job.accepted_at, 3)}

    def publish(self, state_counts: dict[str, int], queue_depth: int, total: int) -> None:
        """READY=1 once `min_ready` workers are up; STATUS= whenever the summary changes."""
        text = ", ".join(f"{n} {s}" for s, n in sorted(state_counts.items()))
        text = f"workers: {text}; queue {queue_depth}"
        ready = state_counts.get(WState.READY.value, 0) + state_counts.get(WState.BUSY.value, 0)
        if not self.ready_sent and ready >= self.min_ready:
            self.ready_sent = True
            log.info("ready: %d of %d workers up", ready, total)
            self.notifier.ready(text)
            self._last_status = text
        elif text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    def stopping(self) -> None:
        self.notifier.stopping()

    def watchdog(self, now: float) -> None:
        """WATCHDOG=1 every `WATCHDOG_USEC / 2`, called from the loop (so a stuck loop
        stops the pings and systemd restarts the daemon)."""
        interval = self.notifier.watchdog_interval_s()
        if interval and now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()


class StatusHandoff:
    """Status bodies built on the supervisor's loop, handed to readers on other threads.

    A reader calls `take(timeout_s)`: it raises the request flag and waits. The loop checks
    `wanted` once per tick and, when set, builds the body on its own thread (between two
    steps of a tick, so every figure is of the same moment) and hands it over with
    `publish`. The body is a fresh dict the loop never changes afterwards; every reader
    waiting then gets the same one. Nothing is built while nobody asks.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wanted = False
        self._body: dict[str, Any] | None = None
        self._generation = 0  # bodies published so far

    @property
    def wanted(self) -> bool:
        """Whether a reader waits for a body (read by the loop each tick without the lock:
        a request raised just after the read is seen at the next tick)."""
        return self._wanted

    def publish(self, body: dict[str, Any]) -> None:
        """Hand `body` to every waiting reader (the loop's thread only)."""
        with self._cond:
            self._body = body
            self._generation += 1
            self._wanted = False
            self._cond.notify_all()

    def take(self, timeout_s: float) -> dict[str, Any]:
        """A body the loop built after this call (or during the tick it was made in).
        `timeout_s`: how long to wait for the loop, in seconds. Raises TimeoutError when
        it published none in that time (the loop is stuck, or the daemon is stopping)."""
        with self._cond:
            asked_at = self._generation
            self._wanted = True
            if not self._cond.wait_for(lambda: self._generation > asked_at, timeout_s):
                raise TimeoutError(f"the supervisor loop built no status snapshot within "
                                   f"{timeout_s:g} s (it answers at its next tick; is it "
                                   "stuck, or is the daemon stopping?)")
            assert self._body is not None
            return self._body
