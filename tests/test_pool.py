"""Unit tests of daemon/pool.py (WorkerPool): a fake clock (plain floats), fake processes
from a fake launch, a fake device-room check. No sockets, no processes, no sleeps."""

from __future__ import annotations

import itertools

import pytest

from avatard.daemon import devices as dev
from avatard.daemon.config import RestartConfig, TimeoutsConfig
from avatard.daemon.pool import (
    ALLOWED,
    WorkerExited,
    WorkerGaveUp,
    WorkerId,
    WorkerLost,
    WorkerPool,
    WorkerReady,
    WorkerSlot,
    WState,
)
from avatard.ipc import protocol as P

T0 = 1000.0  # a monotonic clock is never near 0
MIB = 1 << 20
GPU0 = dev.DeviceInfo("cuda:0", 0, 80 << 30, 70 << 30, "H200")
GPU1 = dev.DeviceInfo("cuda:1", 1, 80 << 30, 70 << 30, "H200")
CPU = dev.DeviceInfo("cpu", -1, 64 << 30, 32 << 30, "cpu")


class FakeProc:
    """A worker process handle that records what the pool does to it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.exitcode: int | None = None
        self.calls: list[str] = []
        self.join_timeouts: list[float | None] = []

    def terminate(self) -> None:
        self.calls.append("terminate")

    def kill(self) -> None:
        self.calls.append("kill")

    def join(self, timeout: float | None = None) -> None:
        self.calls.append("join")
        self.join_timeouts.append(timeout)


class FakeLaunch:
    def __init__(self) -> None:
        self.launched: list[tuple[WorkerId, dev.DeviceInfo, FakeProc]] = []
        self._pids = itertools.count(4000)

    def __call__(self, worker_id: WorkerId, device: dev.DeviceInfo) -> FakeProc:
        proc = FakeProc(next(self._pids))
        self.launched.append((worker_id, device, proc))
        return proc

    def ids(self) -> list[WorkerId]:
        return [wid for wid, _, _ in self.launched]

    def last(self, index: int) -> FakeProc:
        return [p for wid, _, p in self.launched if wid.index == index][-1]


class FakeRoom:
    def __init__(self, ok: bool = True, free: int = 1 << 30):
        self.ok = ok
        self.free = free
        self.calls: list[tuple[str, int]] = []

    def __call__(self, device: dev.DeviceInfo, needed: int) -> tuple[bool, int]:
        self.calls.append((device.name, needed))
        return self.ok, self.free


def make_pool(devices=(CPU,), timeouts: TimeoutsConfig | None = None,
              restart: RestartConfig | None = None, max_parallel_loads: int = 1,
              room: FakeRoom | None = None) -> tuple[WorkerPool, FakeLaunch, FakeRoom]:
    launch = FakeLaunch()
    room = room or FakeRoom()
    pool = WorkerPool(list(devices), timeouts or TimeoutsConfig(), restart or RestartConfig(),
                      max_parallel_loads, launch, room=room, now=T0)
    return pool, launch, room


def hello(pool: WorkerPool, index: int, now: float):
    w = pool.workers[index]
    return pool.on_message(w, P.make(P.WHello, pid=w.pid, device=w.device.name), now)


def ready(pool: WorkerPool, index: int, now: float, memory_bytes: int = 512 * MIB,
          capacity: int = 1):
    engine = P.EngineInfo(name="fake", kind="avatar", device=pool.workers[index].device.name,
                          memory_bytes=memory_bytes, warmup_s=0.1)
    return pool.on_message(pool.workers[index], P.make(
        P.WReady, engines=[engine], memory_bytes=memory_bytes, load_s=2.0, warmup_s=0.1,
        capacity=capacity, capabilities=P.Capabilities()), now)


def heartbeat(pool: WorkerPool, index: int, now: float, rss: int = 0):
    return pool.on_message(pool.workers[index], P.make(P.WHeartbeat, rss_bytes=rss), now)


def bring_up(pool: WorkerPool, index: int, now: float, **ready_kw) -> None:
    """Start (if it waits), hello and ready worker `index` at `now`."""
    if pool.workers[index].state in (WState.WAITING, WState.BACKOFF):
        pool.start_due(now)
    assert pool.workers[index].state is WState.STARTING
    hello(pool, index, now)
    assert ready(pool, index, now, **ready_kw) == [WorkerReady(index, P.Capabilities())]


def crash(pool: WorkerPool, launch: FakeLaunch, index: int, now: float,
          code: int = -9) -> tuple[list, list]:
    """The current process of `index` dies at `now`; two checks: the loss, then the exit."""
    launch.last(index).exitcode = code
    return pool.check(now), pool.check(now)


# ------------------------------------------------------------------ staggered start


def test_staggered_start_one_load_at_a_time():
    pool, launch, room = make_pool(devices=(CPU, CPU, CPU), max_parallel_loads=1)
    assert pool.start_due(T0) == []
    assert launch.ids() == [WorkerId(0, 1)]
    assert launch.launched[0][1] is CPU
    assert [w.state for w in pool.workers] == [WState.STARTING, WState.WAITING, WState.WAITING]
    assert pool.workers[0].pid == launch.launched[0][2].pid
    assert pool.workers[0].deadline == T0 + pool.timeouts.hello_s

    pool.start_due(T0 + 1)  # worker 0 has not said hello: nothing more starts
    hello(pool, 0, T0 + 1)
    assert pool.workers[0].state is WState.LOADING
    pool.start_due(T0 + 2)  # loading still counts against max_parallel_loads
    assert len(launch.launched) == 1

    assert ready(pool, 0, T0 + 3) == [WorkerReady(0, P.Capabilities())]
    assert pool.workers[0].state is WState.READY
    pool.start_due(T0 + 3)
    assert launch.ids() == [WorkerId(0, 1), WorkerId(1, 1)]
    assert pool.workers[2].state is WState.WAITING
    bring_up(pool, 1, T0 + 4)
    pool.start_due(T0 + 4)
    assert launch.ids()[-1] == WorkerId(2, 1)
    # CPU has no `last_load_bytes` entry until a READY: the room was asked only after
    # worker 0's load on that device, with what that load used.
    assert room.calls == [("cpu", 512 * MIB), ("cpu", 512 * MIB)]


def test_max_parallel_loads_two():
    pool, launch, _ = make_pool(devices=(GPU0, GPU1, CPU), max_parallel_loads=2)
    pool.start_due(T0)
    assert launch.ids() == [WorkerId(0, 1), WorkerId(1, 1)]
    hello(pool, 0, T0)
    pool.start_due(T0)
    assert len(launch.launched) == 2
    ready(pool, 1, T0 + 1)  # worker 1 never said hello: READY is ignored in STARTING
    assert pool.workers[1].state is WState.STARTING
    ready(pool, 0, T0 + 1)
    pool.start_due(T0 + 1)
    assert launch.ids()[-1] == WorkerId(2, 1)
    assert launch.launched[-1][1] is CPU


def test_waits_for_device_memory_then_starts():
    pool, launch, room = make_pool(devices=(GPU0, GPU0), room=FakeRoom(ok=False, free=100 * MIB))
    bring_up(pool, 0, T0, memory_bytes=900 * MIB)
    assert pool.last_load_bytes == {"cuda:0": 900 * MIB}
    pool.start_due(T0 + 1)
    assert room.calls == [("cuda:0", 900 * MIB)]
    assert pool.workers[1].state is WState.WAITING
    assert pool.workers[1].wait_since == T0 + 1
    pool.start_due(T0 + 5)
    assert pool.workers[1].wait_since == T0 + 1  # the wait runs from its first refusal
    room.ok = True
    pool.start_due(T0 + 6)
    assert pool.workers[1].state is WState.STARTING
    assert pool.workers[1].wait_since == 0.0
    assert len(launch.launched) == 2


def test_never_enough_device_memory_fails_after_load_s():
    t = TimeoutsConfig(load_s=50.0)
    pool, launch, room = make_pool(devices=(GPU0, GPU0, GPU1), timeouts=t,
                                   room=FakeRoom(ok=False, free=100 * MIB))
    bring_up(pool, 0, T0, memory_bytes=900 * MIB)
    assert pool.start_due(T0 + 1) == []
    # Worker 1 waits for cuda:0 memory without holding a load place: worker 2 on another
    # device (no previous load there, no room check) starts meanwhile.
    assert pool.workers[1].state is WState.WAITING
    assert launch.ids()[-1] == WorkerId(2, 1)
    assert all(name == "cuda:0" for name, _ in room.calls)
    hello(pool, 2, T0 + 2)
    ready(pool, 2, T0 + 2)  # no load in flight: the waiting worker is checked again
    assert pool.start_due(T0 + 51) == []  # waited exactly load_s: not over yet
    events = pool.start_due(T0 + 51.5)
    assert len(events) == 1 and isinstance(events[0], WorkerGaveUp)
    assert events[0].index == 1
    assert "cuda:0" in events[0].reason and "900 MiB" in events[0].reason
    assert "50 s" in events[0].reason
    assert pool.workers[1].state is WState.FAILED
    assert pool.workers[1].reason == events[0].reason
    assert [wid.index for wid in launch.ids()] == [0, 2]  # worker 1 was never launched
    assert pool.start_due(T0 + 1000) == []


# ------------------------------------------------------------------ load deadlines


def test_hello_timeout_names_hello_s():
    # Defaults: hello_s (30) is longer than heartbeat_timeout_s (10). A process that has not
    # said hello yet sends no heartbeat either; the hello deadline governs it.
    pool, launch, _ = make_pool()
    pool.start_due(T0)
    proc = launch.last(0)
    assert pool.check(T0 + 29.9) == []
    assert pool.workers[0].state is WState.STARTING
    events = pool.check(T0 + 30)
    assert len(events) == 1 and isinstance(events[0], WorkerLost)
    assert events[0].index == 0
    assert "hello_s=30" in events[0].reason
    assert pool.workers[0].state is WState.STOPPING
    assert pool.workers[0].stop_cause == "load"
    assert proc.calls == ["terminate"]


def test_load_timeout_names_load_s_and_last_stage():
    t = TimeoutsConfig(load_s=100.0)
    pool, _, _ = make_pool(timeouts=t)
    pool.start_due(T0)
    hello(pool, 0, T0 + 1)
    assert pool.workers[0].deadline == T0 + 1 + 100
    for k in range(1, 20):  # heartbeats keep coming: only the load deadline can end it
        now = T0 + 1 + 5 * k
        heartbeat(pool, 0, now)
        assert pool.check(now) == []
    assert now == T0 + 96
    pool.on_message(pool.workers[0], P.make(P.WLoading, stage="weights", progress=0.5), now)
    assert pool.check(T0 + 100.9) == []
    events = pool.check(T0 + 101)
    assert len(events) == 1 and isinstance(events[0], WorkerLost)
    assert "load_s=100" in events[0].reason
    assert "weights (50%)" in events[0].reason
    assert pool.workers[0].stop_cause == "load"


def test_load_failures_count_to_max_load_attempts():
    r = RestartConfig(max_load_attempts=3, backoff_initial_s=1.0, backoff_factor=3.0,
                      backoff_max_s=100.0)
    pool, launch, _ = make_pool(restart=r)
    now = T0
    delays = []
    for attempt in (1, 2, 3):
        pool.start_due(now)
        assert pool.workers[0].attempt == attempt
        assert pool.workers[0].state is WState.STARTING
        hello(pool, 0, now)
        pool.on_message(pool.workers[0], P.make(P.WLoadFailed, reason="CUDA error",
                                                 out_of_memory=True), now)
        launch.last(0).exitcode = 1
        lost = pool.check(now)
        assert len(lost) == 1 and isinstance(lost[0], WorkerLost)
        assert lost[0].reason == ("load failed: CUDA error (out of memory); "
                                  "exited with status 1")
        after = pool.check(now)
        assert after[0] == WorkerExited(0)
        assert pool.workers[0].load_failures == attempt
        if attempt < 3:
            assert after == [WorkerExited(0)]
            assert pool.workers[0].state is WState.BACKOFF
            delays.append(pool.workers[0].deadline - now)
            now = pool.workers[0].deadline
    assert delays == [1.0, 3.0]  # initial x factor^(n-1)
    assert len(after) == 2 and isinstance(after[1], WorkerGaveUp)
    assert "gave up after 3 load attempts" in after[1].reason
    assert "CUDA error" in after[1].reason
    assert pool.workers[0].state is WState.FAILED
    assert pool.all_failed()
    assert pool.start_due(now + 1000) == []
    assert len(launch.launched) == 3
    assert launch.last(0).calls == ["join"]  # it had exited already: no signal at all


def test_ready_resets_load_failures_and_exit_while_starting_is_a_load_failure():
    pool, launch, _ = make_pool()
    pool.start_due(T0)
    launch.last(0).exitcode = 1
    lost = pool.check(T0 + 1)
    assert lost[0].reason == "exited with status 1 while starting (stage: spawned)"
    pool.check(T0 + 1)
    assert pool.workers[0].load_failures == 1
    pool.start_due(pool.workers[0].deadline)
    bring_up(pool, 0, pool.workers[0].deadline)
    assert pool.workers[0].load_failures == 0
    assert pool.workers[0].attempt == 2


# ------------------------------------------------------------------ restart policy


def test_runtime_crash_backoff_grows_and_is_capped():
    r = RestartConfig(backoff_initial_s=1.0, backoff_factor=2.0, backoff_max_s=5.0,
                      crash_loop_window_s=1000.0)
    pool, launch, _ = make_pool(restart=r)
    now = T0
    bring_up(pool, 0, now)
    delays = []
    for n in range(1, 6):
        now += 10
        heartbeat(pool, 0, now)
        lost, exited = crash(pool, launch, 0, now)
        assert lost == [WorkerLost(0, "killed by signal 9 while ready")]
        assert exited == [WorkerExited(0)]
        assert pool.workers[0].restarts == n
        assert pool.workers[0].load_failures == 0  # a runtime crash is no load failure
        delays.append(pool.workers[0].deadline - now)
        before = len(launch.launched)
        pool.start_due(pool.workers[0].deadline - 0.01)
        assert len(launch.launched) == before and pool.workers[0].state is WState.BACKOFF
        now = pool.workers[0].deadline
        bring_up(pool, 0, now)
        assert len(launch.launched) == before + 1
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_crash_loop_window_forgets_old_crashes():
    r = RestartConfig(backoff_initial_s=1.0, backoff_factor=2.0, backoff_max_s=60.0,
                      crash_loop_window_s=30.0)
    pool, launch, _ = make_pool(restart=r)

    def crash_at(now: float) -> float:
        heartbeat(pool, 0, now)
        crash(pool, launch, 0, now)
        delay = pool.workers[0].deadline - now
        bring_up(pool, 0, pool.workers[0].deadline)
        return delay

    bring_up(pool, 0, T0)
    assert crash_at(T0 + 5) == 1.0
    assert crash_at(T0 + 10) == 2.0
    assert crash_at(T0 + 20) == 4.0
    # At T0+41 the crashes of T0+5 and T0+10 are over 30 s old: two count (T0+20, T0+41).
    assert crash_at(T0 + 41) == 2.0
    # Long quiet: every old crash has left the window, the delay is the initial one again.
    assert crash_at(T0 + 500) == 1.0
    assert list(pool.workers[0].crashes) == [T0 + 500]


def test_heartbeat_timeout_of_a_ready_worker():
    pool, launch, _ = make_pool(restart=RestartConfig(backoff_initial_s=2.0))
    bring_up(pool, 0, T0)
    heartbeat(pool, 0, T0 + 5, rss=123)
    assert pool.workers[0].rss_bytes == 123
    assert pool.check(T0 + 15) == []  # exactly heartbeat_timeout_s: not over
    events = pool.check(T0 + 15.5)
    assert events == [WorkerLost(0, "no heartbeat for 10.5 s (heartbeat_timeout_s=10)")]
    assert pool.workers[0].stop_cause == "runtime"
    assert launch.last(0).calls == ["terminate"]
    launch.last(0).exitcode = -15
    assert pool.check(T0 + 16) == [WorkerExited(0)]
    assert pool.workers[0].state is WState.BACKOFF
    assert pool.workers[0].deadline == T0 + 16 + 2.0
    assert pool.workers[0].load_failures == 0


def test_any_message_proves_a_worker_alive():
    pool, _, _ = make_pool()
    bring_up(pool, 0, T0)
    pool.on_message(pool.workers[0], P.make(P.WJobDone, job_id="j", frames=1), T0 + 9)
    assert pool.check(T0 + 18) == []
    assert pool.workers[0].last_heartbeat == T0 + 9


def test_heartbeat_timeout_while_loading_counts_as_load_failure():
    pool, launch, _ = make_pool()
    pool.start_due(T0)
    hello(pool, 0, T0)
    events = pool.check(T0 + 10.5)
    assert len(events) == 1 and "heartbeat_timeout_s=10" in events[0].reason
    assert pool.workers[0].stop_cause == "load"
    launch.last(0).exitcode = -15
    pool.check(T0 + 11)
    assert pool.workers[0].load_failures == 1


def test_sigterm_then_sigkill_after_kill_grace():
    pool, launch, _ = make_pool(timeouts=TimeoutsConfig(kill_grace_s=5.0))
    bring_up(pool, 0, T0)
    proc = launch.last(0)
    lost = pool.stop(0, "runtime", "job j1 stalled", T0 + 1)
    assert lost == WorkerLost(0, "job j1 stalled")
    assert pool.workers[0].state is WState.STOPPING
    assert pool.workers[0].reason == "job j1 stalled"
    assert proc.calls == ["terminate"]
    assert pool.stop(0, "runtime", "again", T0 + 2) is None  # already stopping
    assert pool.check(T0 + 5.9) == []
    assert proc.calls == ["terminate"]
    assert pool.check(T0 + 6) == []
    assert proc.calls == ["terminate", "kill"]
    assert pool.check(T0 + 7) == []  # the next SIGKILL only after another grace
    assert proc.calls == ["terminate", "kill"]
    assert pool.check(T0 + 11) == []
    assert proc.calls == ["terminate", "kill", "kill"]
    proc.exitcode = -9
    assert pool.check(T0 + 12) == [WorkerExited(0)]
    assert proc.calls[-1] == "join" and proc.join_timeouts == [0]
    assert pool.workers[0].proc is None and pool.workers[0].pid == 0
    assert pool.live_ids() == []


def test_reap_all_joins_then_terminates_then_kills_only_live_processes():
    pool, launch, _ = make_pool(devices=(CPU, CPU, CPU), max_parallel_loads=3)
    pool.start_due(T0)
    alive, exited = launch.last(0), launch.last(1)
    exited.exitcode = 0
    pool.reap_all(0.0)  # fake processes return from join at once: no wait
    assert alive.calls == ["join", "terminate", "join", "kill", "join"]
    assert exited.calls == ["join", "join", "join"]
    assert launch.last(2).calls == alive.calls


def test_stop_of_an_exited_process_sends_no_signal_and_of_an_idle_slot_is_none():
    pool, launch, _ = make_pool(devices=(CPU, CPU), max_parallel_loads=1)
    bring_up(pool, 0, T0)
    launch.last(0).exitcode = 0
    assert isinstance(pool.stop(0, "runtime", "gone", T0), WorkerLost)
    assert launch.last(0).calls == []
    assert pool.stop(1, "runtime", "never started", T0) is None  # WAITING
    assert pool.workers[1].state is WState.WAITING


# ------------------------------------------------------------------ identities


def test_worker_id_identity_and_parse():
    wid = WorkerId(3, 7)
    assert wid.identity() == b"w3.7"
    assert wid.identity("hb") == b"w3.7.hb"
    assert WorkerId.parse(b"w3.7") == wid
    assert WorkerId.parse(b"w3.7.hb") == wid
    assert WorkerId.parse(b"w3.7.j12") == wid
    for bad in (b"", b"client-1", b"w3", b"wx.1", b"w1.y", b"\xffw1.2", b"x3.7"):
        assert WorkerId.parse(bad) is None, bad


def test_stale_ids_after_a_restart():
    pool, launch, _ = make_pool(restart=RestartConfig(backoff_initial_s=1.0))
    bring_up(pool, 0, T0)
    old = pool.workers[0].id
    assert old == WorkerId(0, 1)
    assert pool.current(old) is pool.workers[0]
    assert pool.current(WorkerId.parse(old.identity("hb"))) is pool.workers[0]
    pool.stop(0, "runtime", "test", T0 + 1)
    assert pool.current(old) is None  # a stopping process's messages are not heard
    launch.last(0).exitcode = -15
    pool.check(T0 + 2)
    pool.start_due(T0 + 3)
    new = pool.workers[0].id
    assert new == WorkerId(0, 2)
    assert pool.current(old) is None
    assert pool.current(new) is pool.workers[0]
    assert pool.current(WorkerId(1, 1)) is None  # no such slot
    assert pool.current(WorkerId(-1, 1)) is None
    assert pool.current(None) is None
    assert pool.live_ids() == [new]


# ------------------------------------------------------------------ load and holding


def test_set_load_moves_ready_and_busy():
    pool, _, _ = make_pool(devices=(CPU, CPU), max_parallel_loads=2)
    pool.start_due(T0)
    pool.set_load(1, 2, T0)  # a loading worker stays loading
    assert pool.workers[1].state is WState.STARTING
    bring_up(pool, 0, T0, capacity=3)
    assert pool.capacities() == {0: 3}
    pool.set_load(0, 2, T0 + 1)
    assert pool.workers[0].state is WState.BUSY and pool.workers[0].jobs == 2
    assert pool.workers[0].state_since == T0 + 1
    pool.set_load(0, 3, T0 + 2)  # BUSY stays BUSY
    assert pool.workers[0].state_since == T0 + 1
    assert pool.capacities() == {0: 3}  # BUSY is up too
    assert pool.ready_count() == 1
    pool.set_load(0, 0, T0 + 3)
    assert pool.workers[0].state is WState.READY and pool.workers[0].jobs == 0
    assert pool.state_counts() == {"ready": 1, "starting": 1}


def test_hold_starts_nothing_and_restarts_nothing():
    pool, launch, _ = make_pool(devices=(CPU, CPU), max_parallel_loads=2)
    bring_up(pool, 0, T0)
    assert pool.workers[1].state is WState.STARTING
    pool.hold()
    lost, exited = crash(pool, launch, 0, T0 + 1)
    assert lost and exited == [WorkerExited(0)]
    assert pool.workers[0].state is WState.BACKOFF
    assert pool.workers[0].deadline == float("inf")
    assert pool.workers[0].restarts == 0
    assert pool.start_due(T0 + 10_000) == []
    assert pool.workers[0].state is WState.BACKOFF
    assert len(launch.launched) == 2


def test_hold_before_start_launches_nothing():
    pool, launch, _ = make_pool(devices=(CPU, CPU))
    pool.hold()
    assert pool.start_due(T0) == []
    assert launch.launched == []
    assert [w.state for w in pool.workers] == [WState.WAITING, WState.WAITING]


def test_shutdown_stop_is_not_restarted():
    pool, launch, _ = make_pool()
    bring_up(pool, 0, T0)
    pool.stop(0, "shutdown", "daemon stopping", T0 + 1)
    launch.last(0).exitcode = 0
    assert pool.check(T0 + 2) == [WorkerExited(0)]
    assert pool.workers[0].state is WState.BACKOFF
    pool.start_due(T0 + 10_000)
    assert len(launch.launched) == 1


# ------------------------------------------------------------------ the state machine


@pytest.mark.parametrize("src,dst", list(itertools.product(WState, WState)))
def test_to_allows_exactly_the_allowed_transitions(src, dst):
    slot = WorkerSlot(0, CPU, state=src)
    if dst in ALLOWED[src]:
        slot.to(dst, T0 + 1, "why")
        assert slot.state is dst and slot.state_since == T0 + 1 and slot.reason == "why"
    else:
        with pytest.raises(AssertionError):
            slot.to(dst, T0 + 1)
        assert slot.state is src


def test_allowed_names_every_state_and_failed_is_final():
    assert set(ALLOWED) == set(WState)
    assert ALLOWED[WState.FAILED] == set()


def test_pool_uses_only_allowed_transitions(monkeypatch):
    """Drive every path of the pool and record each transition it makes."""
    seen: set[tuple[WState, WState]] = set()
    original = WorkerSlot.to

    def recording_to(self, state, now, reason=""):
        seen.add((self.state, state))
        original(self, state, now, reason)

    monkeypatch.setattr(WorkerSlot, "to", recording_to)
    r = RestartConfig(max_load_attempts=1, backoff_initial_s=1.0)
    # Startup -> ready -> busy -> ready -> crash -> backoff -> waiting -> again.
    pool, launch, room = make_pool(restart=r)
    bring_up(pool, 0, T0)
    pool.set_load(0, 1, T0)
    pool.set_load(0, 0, T0)
    pool.set_load(0, 1, T0)
    crash(pool, launch, 0, T0 + 1)  # BUSY -> STOPPING
    pool.start_due(pool.workers[0].deadline)
    bring_up(pool, 0, pool.workers[0].deadline)
    crash(pool, launch, 0, T0 + 100)  # READY -> STOPPING
    # STARTING -> STOPPING (hello timeout), LOADING -> STOPPING (load failure) and
    # STOPPING -> FAILED (attempts used up) on a pool that gives up after one load.
    for stop_while in ("starting", "loading"):
        pool, launch, room = make_pool(restart=r)
        pool.start_due(T0)
        if stop_while == "loading":
            hello(pool, 0, T0)
        launch.last(0).exitcode = 1
        pool.check(T0)
        pool.check(T0)
        assert pool.workers[0].state is WState.FAILED
    # WAITING -> FAILED: the device never has the room.
    pool, launch, room = make_pool(devices=(GPU0, GPU0), room=FakeRoom(ok=False))
    bring_up(pool, 0, T0)
    pool.start_due(T0 + 1)
    pool.start_due(T0 + 1 + pool.timeouts.load_s + 1)
    assert pool.workers[1].state is WState.FAILED

    assert all(dst in ALLOWED[src] for src, dst in seen)
    W = WState
    used = {(W.WAITING, W.STARTING), (W.WAITING, W.FAILED), (W.STARTING, W.LOADING),
            (W.STARTING, W.STOPPING), (W.LOADING, W.READY), (W.LOADING, W.STOPPING),
            (W.READY, W.BUSY), (W.READY, W.STOPPING), (W.BUSY, W.READY),
            (W.BUSY, W.STOPPING), (W.STOPPING, W.BACKOFF), (W.STOPPING, W.FAILED),
            (W.BACKOFF, W.WAITING)}
    assert seen == used
    # What ALLOWED permits but no path of the pool takes (kept for a future policy).
    unused = {(src, dst) for src, dsts in ALLOWED.items() for dst in dsts} - used
    assert unused == {(W.STOPPING, W.WAITING), (W.BACKOFF, W.FAILED)}


def test_ready_reports_engines_and_capacity():
    pool, _, _ = make_pool(devices=(GPU0,))
    pool.start_due(T0)
    hello(pool, 0, T0 + 0.5)
    assert pool.workers[0].stage == "hello"
    bring_up_msg = ready(pool, 0, T0 + 1, memory_bytes=3 * MIB, capacity=4)
    assert bring_up_msg == [WorkerReady(0, P.Capabilities())]
    w = pool.workers[0]
    assert (w.capacity, w.memory_bytes, w.load_s) == (4, 3 * MIB, 2.0)
    assert w.engines == [{"name": "fake", "kind": "avatar", "device": "cuda:0",
                          "memory_bytes": 3 * MIB, "warmup_s": 0.1, "notes": ""}]
    assert ready(pool, 0, T0 + 2) == []  # a second READY changes nothing
    assert pool.ready_count() == 1 and len(pool) == 1
