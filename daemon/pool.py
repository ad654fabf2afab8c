"""The worker pool: worker processes, their states, deadlines and restart policy.

Pure policy over process handles; no sockets, no shared memory, no jobs. The coordinator
(daemon/supervisor.py) feeds it the worker messages that concern a worker's life (hello,
loading, ready, load failure, heartbeat) and the clock, and acts on what it returns:

- `WorkerReady(index, capabilities)`: a worker finished loading and takes jobs; what its
  engines offer clients (voices...) comes with it;
- `WorkerLost(index, reason)`: a worker is being stopped or died; every job it held must
  be requeued or failed (the job book decides);
- `WorkerExited(index)`: its process is gone; slots it was writing can be reclaimed;
- `WorkerGaveUp(index, reason)`: it will not be started again (load attempts used up, or
  its device never had the memory a load needs).

Processes are started through a `launch(worker_id, device) -> ProcessHandle` callable that
the coordinator supplies (it knows the rings and config a worker needs), so the policy runs
in unit tests with a fake clock and fake processes.

Worker states (asserted on every transition)::

    WAITING -> STARTING -> LOADING -> READY <-> BUSY
       ^          |           |         |        |
       |          +-----------+---------+--------+--> STOPPING --> BACKOFF --> WAITING
       |                                                   |
       +---------------------------------------------------+--> FAILED (gave up loading)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from avatard.ipc import protocol as P

from . import devices as dev
from .config import RestartConfig, TimeoutsConfig

log = logging.getLogger("avatard.supervisor")


class WState(StrEnum):
    WAITING = "waiting"  # not started yet (or backoff over), wants a load slot
    STARTING = "starting"  # spawned, no HELLO yet
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"  # runs at least one job
    STOPPING = "stopping"  # SIGTERM sent (or shutdown asked), waiting for exit
    BACKOFF = "backoff"
    FAILED = "failed"


ALLOWED = {
    WState.WAITING: {WState.STARTING, WState.FAILED},
    WState.STARTING: {WState.LOADING, WState.STOPPING},
    WState.LOADING: {WState.READY, WState.STOPPING},
    WState.READY: {WState.BUSY, WState.STOPPING},
    WState.BUSY: {WState.READY, WState.STOPPING},
    WState.STOPPING: {WState.BACKOFF, WState.FAILED, WState.WAITING},
    WState.BACKOFF: {WState.WAITING, WState.FAILED},
    WState.FAILED: set(),
}
UP = (WState.READY, WState.BUSY)


@dataclass(frozen=True, slots=True)
class WorkerId:
    """The one identity of a worker process: slot index and start attempt. On the wire it
    is the ZeroMQ identity `w<index>.<attempt>`; the worker's other threads add a suffix
    (`.hb`, `.j<n>`) that `parse` ignores."""

    index: int
    attempt: int

    def identity(self, suffix: str = "") -> bytes:
        return f"w{self.index}.{self.attempt}{'.' + suffix if suffix else ''}".encode()

    @classmethod
    def parse(cls, identity: bytes) -> WorkerId | None:
        """The id in a socket identity, or None when it is not a worker's."""
        try:
            text = identity.decode("ascii")
            if not text.startswith("w"):
                return None
            index_text, attempt_text = text[1:].split(".")[:2]
            return cls(int(index_text), int(attempt_text))
        except (UnicodeDecodeError, ValueError):
            return None


class ProcessHandle(Protocol):
    """What the pool needs of a worker process (`multiprocessing.Process` fits)."""

    pid: int | None
    exitcode: int | None

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class WorkerReady:
    index: int
    capabilities: P.Capabilities  # from its READY report


@dataclass(frozen=True, slots=True)
class WorkerLost:
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class WorkerExited:
    index: int


@dataclass(frozen=True, slots=True)
class WorkerGaveUp:
    index: int
    reason: str


PoolEvent = WorkerReady | WorkerLost | WorkerExited | WorkerGaveUp


@dataclass
class WorkerSlot:
    """One worker place: the current process (if any) and everything known about it."""

    index: int
    device: dev.DeviceInfo
    state: WState = WState.WAITING
    proc: ProcessHandle | None = None
    pid: int = 0
    attempt: int = 0  # process starts so far (identity of the current process)
    load_failures: int = 0
    restarts: int = 0
    state_since: float = 0.0
    deadline: float = 0.0  # of the current phase (hello, load, kill grace, backoff)
    last_heartbeat: float = 0.0
    capacity: int = 1  # jobs it runs at once (from READY)
    jobs: int = 0  # jobs placed on it (the job book's count)
    rss_bytes: int = 0
    # Its avatar caches, from heartbeats: {"cached", "evictions", "engine_cached"}.
    avatar_cache: dict[str, int] = field(default_factory=dict)
    engine_counters: dict[str, float] = field(default_factory=dict)
    memory_bytes: int = 0
    load_s: float = 0.0
    warmup_s: float = 0.0
    stage: str = ""
    engines: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""  # why it was stopped / failed
    stop_cause: str = ""  # "load" | "runtime" | "shutdown"
    crashes: deque[float] = field(default_factory=deque)  # times of runtime deaths
    started_at: float = 0.0
    wait_since: float = 0.0  # since when it waits for device memory

    @property
    def id(self) -> WorkerId:
        return WorkerId(self.index, self.attempt)

    def to(self, state: WState, now: float, reason: str = "") -> None:
        assert state in ALLOWED[self.state], f"worker {self.index}: {self.state} -> {state}"
        log.info("worker %d: %s -> %s%s", self.index, self.state.value, state.value,
                 f" ({reason})" if reason else "")
        self.state = state
        self.state_since = now
        if reason:
            self.reason = reason


Launch = Callable[[WorkerId, dev.DeviceInfo], ProcessHandle]
RoomCheck = Callable[[dev.DeviceInfo, int], tuple[bool, int]]  # -> (has room, free bytes)


def device_room(device: dev.DeviceInfo, needed_bytes: int) -> tuple[bool, int]:
    """Whether `device` has `needed_bytes` free now (NVML on a GPU, RAM on the CPU)."""
    fresh = dev.refresh(device)
    return dev.has_room(fresh, needed_bytes), fresh.free_bytes


class WorkerPool:
    """Worker slots over `devices` (one entry per worker, placement already decided)."""

    def __init__(self, devices: list[dev.DeviceInfo], timeouts: TimeoutsConfig,
                 restart: RestartConfig, max_parallel_loads: int, launch: Launch,
                 room: RoomCheck = device_room, now: float = 0.0):
        self.timeouts = timeouts
        self.restart = restart
        self.max_parallel_loads = max_parallel_loads
        self._launch = launch
        self._room = room
        self.workers = [WorkerSlot(i, device, state_since=now)
                        for i, device in enumerate(devices)]
        self.last_load_bytes: dict[str, int] = {}  # device name -> what its last load used
        self.holding = False  # draining: start nothing, restart nothing

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.workers)

    def current(self, worker_id: WorkerId | None) -> WorkerSlot | None:
        """The slot whose live process has this id; None for a replaced or stopping one."""
        if worker_id is None or not 0 <= worker_id.index < len(self.workers):
            return None
        w = self.workers[worker_id.index]
        return w if w.attempt == worker_id.attempt and w.state is not WState.STOPPING else None

    def ready_count(self) -> int:
        return sum(w.state in UP for w in self.workers)

    def all_failed(self) -> bool:
        return all(w.state is WState.FAILED for w in self.workers)

    def unavailable_reason(self) -> str | None:
        """Why no job can ever run, when every worker has failed for good (FAILED is
        final: nothing restarts it without an operator), naming each worker's failure;
        None while any worker is up or may still come up."""
        if not self.workers or not self.all_failed():
            return None
        failures = "; ".join(f"worker {w.index}: {w.reason or 'failed'}" for w in self.workers)
        return ("no worker can run jobs: every worker failed for good and none is restarted "
                f"(fix the cause, then restart the daemon): {failures}")

    def capacities(self) -> dict[int, int]:
        """Places of every up worker (READY or BUSY): index -> jobs it runs at once."""
        return {w.index: w.capacity for w in self.workers if w.state in UP}

    def live_ids(self) -> list[WorkerId]:
        """Ids of the workers whose process may still read messages."""
        return [w.id for w in self.workers if w.proc is not None and w.proc.exitcode is None]

    def state_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for w in self.workers:
            counts[w.state.value] = counts.get(w.state.value, 0) + 1
        return counts

    # ------------------------------------------------------------ job load

    def set_load(self, index: int, jobs: int, now: float) -> None:
        """The job book's count of jobs placed on worker `index`: READY <-> BUSY."""
        w = self.workers[index]
        w.jobs = jobs
        if jobs and w.state is WState.READY:
            w.to(WState.BUSY, now, f"{jobs} job(s)")
        elif not jobs and w.state is WState.BUSY:
            w.to(WState.READY, now, "no job left")

    # ------------------------------------------------------------ starting

    def _loading_count(self) -> int:
        return sum(w.state in (WState.STARTING, WState.LOADING) for w in self.workers)

    def start_due(self, now: float) -> list[PoolEvent]:
        """Staggered start: at most `max_parallel_loads` at once, and only when the device
        has the free memory that the previous load on it used."""
        events: list[PoolEvent] = []
        if self.holding:
            return events
        for w in self.workers:
            if w.state is WState.BACKOFF and now >= w.deadline:
                w.to(WState.WAITING, now, "backoff over")
            if w.state is not WState.WAITING:
                continue
            if self._loading_count() >= self.max_parallel_loads:
                break
            needed = self.last_load_bytes.get(w.device.name, 0)
            if needed:
                ok, free = self._room(w.device, needed)
                if not ok:
                    if not w.wait_since:
                        w.wait_since = now
                        log.info("worker %d waits: %s has %d MiB free, the last load used "
                                 "%d MiB", w.index, w.device.name, free >> 20, needed >> 20)
                    if now - w.wait_since > self.timeouts.load_s:
                        reason = (f"{w.device.name} never had the {needed >> 20} MiB free that "
                                  f"a load needs (waited {self.timeouts.load_s:g} s)")
                        w.to(WState.FAILED, now, reason)
                        events.append(WorkerGaveUp(w.index, reason))
                    continue
            w.wait_since = 0.0
            self._spawn(w, now)
        return events

    def _spawn(self, w: WorkerSlot, now: float) -> None:
        w.attempt += 1
        w.proc = self._launch(w.id, w.device)
        w.pid = w.proc.pid or 0
        w.reason = ""
        w.started_at = now
        w.last_heartbeat = now
        w.deadline = now + self.timeouts.hello_s
        w.stage = "spawned"
        w.jobs = 0
        w.engine_counters = {}  # a new process counts from zero
        w.to(WState.STARTING, now, f"attempt {w.attempt} on {w.device.name}")

    # ------------------------------------------------------------ messages

    def on_message(self, w: WorkerSlot, msg: P.Msg, now: float) -> list[PoolEvent]:
        """A message from the current process of `w` (any message proves it alive)."""
        w.last_heartbeat = now
        if isinstance(msg, P.WHeartbeat):
            w.rss_bytes = msg.rss_bytes
            w.avatar_cache = {"cached": msg.avatars_cached, "evictions": msg.avatar_evictions,
                              "engine_cached": msg.engine_avatars_cached}
            w.engine_counters = dict(msg.engine_counters)
        elif isinstance(msg, P.WHello):
            if w.state is WState.STARTING:
                w.pid = msg.pid
                w.deadline = now + self.timeouts.load_s
                w.stage = "hello"
                w.to(WState.LOADING, now, f"pid {msg.pid} on {msg.device}")
        elif isinstance(msg, P.WLoading):
            w.stage = f"{msg.stage} ({msg.progress:.0%})"
        elif isinstance(msg, P.WReady):
            if w.state is WState.LOADING:
                w.memory_bytes, w.load_s, w.warmup_s = msg.memory_bytes, msg.load_s, msg.warmup_s
                w.capacity = msg.capacity
                w.engines = [{"name": e.name, "kind": e.kind, "device": e.device,
                              "memory_bytes": e.memory_bytes, "warmup_s": e.warmup_s,
                              "notes": e.notes} for e in msg.engines]
                for e in msg.engines:
                    if e.notes:
                        log.warning("worker %d engine %s: %s", w.index, e.name, e.notes)
                self.last_load_bytes[w.device.name] = msg.memory_bytes
                w.load_failures = 0
                w.to(WState.READY, now, f"loaded in {msg.load_s:.2f} s")
                return [WorkerReady(w.index, msg.capabilities)]
        elif isinstance(msg, P.WLoadFailed):
            w.reason = f"load failed: {msg.reason}" + (" (out of memory)" if
                                                        msg.out_of_memory else "")
        return []

    # ------------------------------------------------------------ stopping

    def stop(self, index: int, cause: str, reason: str, now: float) -> WorkerLost | None:
        """SIGTERM now, SIGKILL after `kill_grace_s` (enforced by `check`). Returns the
        loss to act on (its jobs), or None when it was already stopping or not running.
        `cause`: "load" (counts toward max_load_attempts), "runtime" (a crash: backoff grows
        with recent crashes) or "shutdown" (no restart)."""
        w = self.workers[index]
        if w.state not in (WState.STARTING, WState.LOADING, *UP):
            return None
        log.warning("worker %d (pid %d): stopping: %s", w.index, w.pid, reason)
        w.stop_cause = cause
        w.to(WState.STOPPING, now, reason)
        w.deadline = now + self.timeouts.kill_grace_s
        w.jobs = 0
        if w.proc is not None and w.proc.exitcode is None:
            w.proc.terminate()
        return WorkerLost(index, reason)

    def check(self, now: float) -> list[PoolEvent]:
        """Reap exits and enforce every deadline (hello, load, heartbeat, kill grace)."""
        t = self.timeouts
        events: list[PoolEvent] = []
        for w in self.workers:
            exited = w.proc is not None and w.proc.exitcode is not None
            if w.state is WState.STOPPING:
                if not exited and now >= w.deadline and w.proc is not None:
                    log.warning("worker %d (pid %d) still alive %.1f s after SIGTERM: SIGKILL",
                                w.index, w.pid, t.kill_grace_s)
                    w.proc.kill()
                    w.deadline = now + t.kill_grace_s
                if exited:
                    events.extend(self._after_exit(w, now))
                continue
            if w.state in (WState.WAITING, WState.BACKOFF, WState.FAILED):
                continue
            lost: WorkerLost | None = None
            if exited:
                assert w.proc is not None and w.proc.exitcode is not None
                code = w.proc.exitcode
                how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                if w.state in UP:
                    lost = self.stop(w.index, "runtime", f"{how} while {w.state.value}", now)
                elif w.reason.startswith("load failed"):  # it told us why before exiting
                    lost = self.stop(w.index, "load", f"{w.reason}; {how}", now)
                else:
                    lost = self.stop(w.index, "load",
                                     f"{how} while {w.state.value} (stage: {w.stage})", now)
            elif w.state is WState.STARTING and now >= w.deadline:
                lost = self.stop(w.index, "load", f"sent no HELLO within hello_s={t.hello_s:g} s",
                                 now)
            elif w.state is WState.LOADING and now >= w.deadline:
                lost = self.stop(w.index, "load", f"sent no READY within load_s={t.load_s:g} s "
                                 f"(last stage: {w.stage})", now)
            elif (w.state is not WState.STARTING  # heartbeats begin after HELLO: hello_s
                  and now - w.last_heartbeat > t.heartbeat_timeout_s):
                lost = self.stop(w.index, "runtime" if w.state in UP else "load",
                                 f"no heartbeat for {now - w.last_heartbeat:.1f} s "
                                 f"(heartbeat_timeout_s={t.heartbeat_timeout_s:g})", now)
            if lost is not None:
                events.append(lost)
        return events

    def _after_exit(self, w: WorkerSlot, now: float) -> list[PoolEvent]:
        """The process is gone: decide what comes next (backoff, or give up)."""
        assert w.proc is not None
        w.proc.join(timeout=0)
        w.proc, w.pid = None, 0
        events: list[PoolEvent] = [WorkerExited(w.index)]
        r = self.restart
        if self.holding or w.stop_cause == "shutdown":
            w.to(WState.BACKOFF, now, w.reason)
            w.deadline = float("inf")
            return events
        if w.stop_cause == "load":
            w.load_failures += 1
            if w.load_failures >= r.max_load_attempts:
                reason = f"gave up after {w.load_failures} load attempts; last: {w.reason}"
                w.to(WState.FAILED, now, reason)
                events.append(WorkerGaveUp(w.index, reason))
                return events
            delay = min(r.backoff_max_s, r.backoff_initial_s * r.backoff_factor **
                        (w.load_failures - 1))
        else:
            w.crashes.append(now)
            while w.crashes and now - w.crashes[0] > r.crash_loop_window_s:
                w.crashes.popleft()
            delay = min(r.backoff_max_s, r.backoff_initial_s * r.backoff_factor **
                        (len(w.crashes) - 1))
        w.restarts += 1
        w.to(WState.BACKOFF, now, w.reason)
        w.deadline = now + delay
        log.info("worker %d restarts in %.1f s", w.index, delay)
        return events

    def hold(self) -> None:
        """Draining: from now on no worker is started, and one that stops is not restarted."""
        self.holding = True

    def reap_all(self, grace_s: float) -> None:
        """Daemon exit, after the workers were asked to shut down: wait up to `grace_s`
        for them to exit, then SIGTERM and wait again, then SIGKILL. Bounded by about
        3 x grace_s."""
        for step in ("join", "terminate", "kill"):
            deadline = time.monotonic() + grace_s
            for w in self.workers:
                if w.proc is None:
                    continue
                if step != "join" and w.proc.exitcode is None:
                    if step == "kill":
                        log.warning("worker %d ignored SIGTERM for %.1f s: SIGKILL", w.index,
                                    grace_s)
                    getattr(w.proc, step)()
                w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
