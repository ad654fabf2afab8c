"""`avatard bench recovery`: how long a staggered start takes and how long the daemon takes
to recover from each kind of fault, measured on real processes with the fake engine.

For faults during a job, long jobs stream while the fault hits the worker running them: with
`jobs_per_worker` N (`daemon.jobs_per_worker`), 2N - 1 jobs run at once on the two workers,
N on the worker the fault hits and N - 1 on the other, so the other keeps one place free
for a moved job as it does with one job per worker. The victim of a signal is the worker
with the most jobs in the daemon's status (`current_jobs`, every job id of a worker); the
victim of an engine fault (hang or crash at a frame) is the worker the fake engine aims it
at (`fault_workers`). We report how long each client waited for its first frame and the
longest gap between two frames it received (what a viewer would see: an engine fault
strikes before the client has a frame, since the fake engine hands over a sentence's frames
together, so it shows in the first), whether every frame of every job arrived exactly
once, jobs and frames lost, and how long from the fault until the replacement worker
served (READY, or BUSY with moved jobs). The fault's moment is when the signal went out,
or for an engine fault the moment the fake engine announced on stderr as it struck
(`injected_faults`, stamped with the host's monotonic clock). For faults while loading we
report how long until the worker was READY after its retry. After each daemon's SIGTERM we
count the segments it left in /dev/shm. The timeouts in force are printed with the
figures: recovery time is mostly them.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatard.daemon import PrivateDaemon
from avatard.engines.fake import injected_faults
from avatard.ipc import segments
from avatard.ipc.client import ClientError, DoneEvent, FrameEvent

from .timing import median

TIMEOUTS = {"hello_s": 20.0, "load_s": 3.0, "heartbeat_interval_s": 0.2,
            "heartbeat_timeout_s": 2.0, "stall_timeout_s": 2.0, "kill_grace_s": 1.0}
RESTART = {"backoff_initial_s": 0.2, "backoff_max_s": 2.0, "max_load_attempts": 3}
TEXT = " ".join(["This sentence keeps the worker busy for a while."] * 6)
PARTS = ("staggered-start", "during-job", "while-loading")
FAULT_AT_FRAME = 25  # the signal goes out when the first job reaches this frame
JOB_WAIT_S = 120.0  # bound on one job's stream, faults and replacements included


def _sections(workers: int, fake: dict[str, Any], jobs_per_worker: int = 1,
              **daemon: Any) -> dict[str, dict[str, Any]]:
    return {
        "daemon": {"workers": workers, "min_ready": 1, "devices": "cpu",
                   "jobs_per_worker": jobs_per_worker, **daemon},
        "timeouts": TIMEOUTS, "restart": RESTART,
        "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
        "engines.options.fake": {"width": 64, "height": 64, **fake},
    }


def _stop(d: PrivateDaemon) -> int:
    """SIGTERM the daemon; return how many segments it left (removed once counted, so one
    run does not poison the next)."""
    d.stop()
    leaked = d.segments()
    for name in leaked:
        segments.unlink_segment(name)
    return len(leaked)


def staggered_start(workers: int, load_s: float, jobs_per_worker: int = 1) -> dict[str, Any]:
    """Start `workers` workers whose fake engine loads in `load_s` seconds; seconds from
    the start to the first and to the last READY. Raises TimeoutError after 120 s."""
    with tempfile.TemporaryDirectory(prefix="avatard-bench-") as tmp:
        d = PrivateDaemon(Path(tmp), _sections(workers, {"load_s": load_s}, jobs_per_worker))
        try:
            d.wait_for(lambda s: s["daemon"]["ready_workers"] >= 1, 120, "first READY")
            first_s = time.monotonic() - d.started
            status = d.wait_for(lambda s: s["daemon"]["ready_workers"] == workers, 120,
                                "all READY")
            all_s = time.monotonic() - d.started
        finally:
            leaked = _stop(d)
    return {"workers": workers, "fake_load_s": load_s, "first_ready_s": round(first_s, 3),
            "all_ready_s": round(all_s, 3),
            "load_s_each": [w["load_s"] for w in status["workers"]],
            "segments_leaked": leaked}


@dataclass
class _Stream:
    """What one client saw of its job."""

    seed: int
    requested: float = 0.0  # monotonic, when the request went out
    stamps: list[float] = field(default_factory=list)  # monotonic arrival of each frame
    indices: list[int] = field(default_factory=list)
    done: DoneEvent | None = None
    error: str = ""
    ended: float = 0.0

    def in_order(self) -> bool:
        return (self.indices == list(range(len(self.indices))) and self.done is not None
                and self.done.frames == len(self.indices))

    def frames_lost(self) -> int:
        return max(0, self.done.frames - len(set(self.indices))) if self.done else 0

    def first_frame_s(self) -> float | None:
        """Seconds from the request to the first frame (None: no frame came)."""
        return self.stamps[0] - self.requested if self.stamps and self.requested else None


class _JobsUnderFault:
    """Runs the streams, one thread and one client each; the first stream to reach
    FAULT_AT_FRAME sends `action` to the worker with the most jobs. With `engine_victim`
    (the worker an engine fault is aimed at) no signal goes out: that worker is watched
    from the start until its replacement serves."""

    def __init__(self, d: PrivateDaemon, jobs: int, action: str | None,
                 engine_victim: int | None = None):
        self.d = d
        self.action = action
        self.engine_victim = engine_victim
        self.streams = [_Stream(seed=7 + k) for k in range(jobs)]
        # Every job is accepted before any is read, so all are running when the fault hits.
        self.accepted = threading.Barrier(jobs)
        self.lock = threading.Lock()
        # Its status entry when the signal went out (an engine fault: before the jobs).
        self.victim: dict[str, Any] = {}
        self.fault_at = 0.0  # monotonic; for an engine fault, set from the log afterwards
        self.replaced_at = 0.0  # when the victim's replacement began to serve
        self.watcher: threading.Thread | None = None

    def run(self) -> float:
        """Run every stream to its end; the seconds from the first request to the last
        stream's end. Raises TimeoutError when a stream is not over within JOB_WAIT_S."""
        if self.engine_victim is not None:
            self.victim = self.d.status()["workers"][self.engine_victim]
            self._start_watcher()
        threads = [threading.Thread(target=self._stream, args=(s,), daemon=True,
                                    name=f"recovery-job-{k}")
                   for k, s in enumerate(self.streams)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + JOB_WAIT_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise TimeoutError(f"{thread.name} did not end within {JOB_WAIT_S:g} s:\n"
                                   f"{self.d.log_text()[-3000:]}")
        if self.watcher is not None:
            self.watcher.join(max(0.0, deadline - time.monotonic()))
        return (max(s.ended for s in self.streams)
                - min(s.requested or s.ended for s in self.streams))

    def _stream(self, stream: _Stream) -> None:
        try:
            with self.d.client(timeout_s=60) as client:
                stream.requested = time.monotonic()
                events = client.speak(TEXT, seed=stream.seed)
                self.accepted.wait(timeout=60)
                for event in events:
                    if isinstance(event, FrameEvent):
                        stream.stamps.append(time.monotonic())
                        stream.indices.append(event.index)
                        if event.index == FAULT_AT_FRAME:
                            self._fault()
                    elif isinstance(event, DoneEvent):
                        stream.done = event
        except (ClientError, threading.BrokenBarrierError, OSError) as exc:
            stream.error = f"{type(exc).__name__}: {exc}"
            self.accepted.abort()  # the other streams must not wait for this one
        finally:
            stream.ended = time.monotonic()

    def _fault(self) -> None:
        with self.lock:
            if not self.action or self.victim:
                return
            busy = [w for w in self.d.status()["workers"] if w["current_jobs"]]
            if not busy:  # cannot be while a job streams; the wait for a restart says so
                return
            self.victim = max(busy, key=lambda w: len(w["current_jobs"]))
            self.fault_at = time.monotonic()
            os.kill(self.victim["pid"], getattr(signal, self.action))
            self._start_watcher()

    def _start_watcher(self) -> None:
        self.watcher = threading.Thread(target=self._watch_replacement, daemon=True,
                                        name="recovery-watch")
        self.watcher.start()

    def _watch_replacement(self) -> None:
        """Poll the victim's slot until its replacement serves: READY, or already BUSY with
        moved jobs (with several jobs per worker the other worker has no room for all of
        them, so the replacement takes some within a tick of its READY)."""
        victim = self.victim
        deadline = time.monotonic() + JOB_WAIT_S
        while time.monotonic() < deadline:
            try:
                slot = self.d.status()["workers"][victim["id"]]
            except ClientError:
                slot = None
            if (slot is not None and slot["restarts"] > victim["restarts"]
                    and slot["state"] in ("ready", "busy")):
                # When it got there: now minus how long it has been in that state.
                self.replaced_at = time.monotonic() - slot["state_age_s"]
                return
            time.sleep(0.05)


def fault_during_job(name: str, fake: dict[str, Any], action: str | None,
                     jobs_per_worker: int = 1) -> dict[str, Any]:
    """One fault while jobs stream on a 2-worker daemon (see the module docstring).

    `action`: a signal name ("SIGKILL", "SIGSTOP") sent to the worker with the most jobs
    when the first job reaches frame FAULT_AT_FRAME, or None for no signal (the baseline
    when `fake` is empty too, else the fake engine's own faults, e.g. ``hang_at_frame``,
    which must name their worker with ``fault_workers``). Returns the row of the report
    (times in seconds; `fault_kind` "none", "signal" or "engine"). Raises ValueError for an
    engine fault without ``fault_workers``; TimeoutError when the daemon does not get ready,
    a job does not end, or no replacement serves in time.
    """
    fault_kind = "signal" if action else ("engine" if fake else "none")
    engine_victim = None
    if fault_kind == "engine":
        if not fake.get("fault_workers"):
            raise ValueError(f"{name}: an engine fault must name its worker with "
                             "fault_workers, so the bench knows whose replacement to time")
        engine_victim = fake["fault_workers"][0]
    jobs = 2 * jobs_per_worker - 1
    with tempfile.TemporaryDirectory(prefix="avatard-bench-") as tmp:
        d = PrivateDaemon(Path(tmp), _sections(2, {"frame_ms": 10, **fake}, jobs_per_worker))
        try:
            d.wait_for(lambda s: s["daemon"]["ready_workers"] == 2, 120, "two ready workers")
            run = _JobsUnderFault(d, jobs, action, engine_victim)
            job_s = run.run()
            replaced_s = None
            if run.victim:
                if not run.replaced_at:
                    raise TimeoutError(f"no replacement of worker {run.victim['id']} served "
                                       f"within {JOB_WAIT_S:g} s of the {action or name}:\n"
                                       f"{d.log_text()[-3000:]}")
                if engine_victim is not None:
                    # The engine stamped the moment it struck (the host's monotonic clock,
                    # which this process reads too); its first fault in the victim's process.
                    struck = [f.at for f in injected_faults(d.log_text())
                              if (f.worker, f.attempt) == (engine_victim,
                                                           run.victim["attempt"])]
                    run.fault_at = min(struck, default=0.0)
                if run.fault_at:
                    replaced_s = run.replaced_at - run.fault_at
        finally:
            leaked = _stop(d)
    streams = run.streams
    gaps = [b - a for s in streams for a, b in zip(s.stamps, s.stamps[1:], strict=False)]
    first_frames = [t for s in streams if (t := s.first_frame_s()) is not None]
    attempts = [s.done.attempts for s in streams if s.done]
    if fault_kind == "engine":
        # No status entry at the fault: the jobs it hit are the ones that had to move.
        victim_jobs: int | None = sum(s.done is not None and s.done.attempts > 1
                                      for s in streams)
    else:
        victim_jobs = len(run.victim["current_jobs"]) if run.victim else None
    return {
        "fault": name,
        "fault_kind": fault_kind,
        "jobs": jobs,
        "victim_jobs": victim_jobs,
        "frames": sum(len(s.indices) for s in streams),
        "exactly_once_in_order": all(s.in_order() for s in streams),
        "attempts": max(attempts) if attempts else None,
        "job_s": round(job_s, 3),
        "max_first_frame_s": round(max(first_frames), 3) if first_frames else None,
        "max_frame_gap_s": round(max(gaps), 3) if gaps else None,
        "median_frame_gap_s": round(median(gaps), 4) if gaps else None,
        "replacement_ready_after_fault_s": (round(replaced_s, 3) if replaced_s is not None
                                            else None),
        "jobs_lost": sum(s.done is None for s in streams),
        "frames_lost": sum(s.frames_lost() for s in streams),
        "errors": [s.error for s in streams if s.error],
        "segments_leaked": leaked,
    }


def fault_while_loading(name: str, fake: dict[str, Any],
                        jobs_per_worker: int = 1) -> dict[str, Any]:
    """One worker whose first load attempt meets the fake engine's load fault in `fake`
    (``load_crash``, ``load_hang``, ``load_oom``); seconds until it was READY after the
    retry. Raises TimeoutError after 120 s."""
    with tempfile.TemporaryDirectory(prefix="avatard-bench-") as tmp:
        d = PrivateDaemon(Path(tmp), _sections(1, {"fault_attempts": [1], **fake},
                                               jobs_per_worker))
        try:
            status = d.wait_for(lambda s: s["daemon"]["ready_workers"] == 1, 120, "READY")
            ready_s = time.monotonic() - d.started
        finally:
            leaked = _stop(d)
    return {"fault": name, "ready_after_start_s": round(ready_s, 3),
            "restarts": status["workers"][0]["restarts"], "segments_leaked": leaked}


def run_recovery_bench(jobs_per_worker: int = 1,
                       parts: Sequence[str] = PARTS) -> dict[str, Any]:
    """Run the `parts` of the bench (any of PARTS, in that order) with `jobs_per_worker`
    concurrent jobs per worker and return the report (`format_recovery` prints it).
    Raises ValueError for an unknown part, TimeoutError when a daemon misses a deadline."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part {unknown}: choose from {list(PARTS)}")
    if jobs_per_worker < 1:
        raise ValueError(f"jobs_per_worker must be >= 1, got {jobs_per_worker}")
    n = jobs_per_worker
    report: dict[str, Any] = {"timeouts": TIMEOUTS, "restart": RESTART, "jobs_per_worker": n}
    if "staggered-start" in parts:
        report["staggered_start"] = [staggered_start(4, 0.0, n), staggered_start(4, 0.5, n)]
    if "during-job" in parts:
        # Worker 0 takes the first job; the engine faults spare worker 1 and the replacement.
        engine_fault = {"fault_workers": [0], "fault_attempts": [1]}
        report["during_job"] = [
            fault_during_job("none (baseline)", {}, None, n),
            fault_during_job("SIGKILL of the busy worker", {}, "SIGKILL", n),
            fault_during_job("SIGSTOP of the busy worker", {}, "SIGSTOP", n),
            fault_during_job("engine hangs mid-job", {"hang_at_frame": FAULT_AT_FRAME,
                                                      **engine_fault}, None, n),
            fault_during_job("engine crashes mid-job", {"crash_at_frame": FAULT_AT_FRAME,
                                                        **engine_fault}, None, n),
        ]
    if "while-loading" in parts:
        report["while_loading"] = [
            fault_while_loading("crash while loading (first attempt)", {"load_crash": True}, n),
            fault_while_loading("hang while loading (first attempt)", {"load_hang": True}, n),
            fault_while_loading("out of memory while loading (first attempt)",
                                {"load_oom": True}, n),
        ]
    return report


def format_recovery(report: dict[str, Any]) -> str:
    """The report as the text tables `avatard bench recovery` prints."""
    t, r = report["timeouts"], report["restart"]
    n = report.get("jobs_per_worker", 1)
    lines = [f"timeouts: heartbeat {t['heartbeat_timeout_s']} s, stall {t['stall_timeout_s']} s,"
             f" load {t['load_s']} s, kill grace {t['kill_grace_s']} s; backoff from "
             f"{r['backoff_initial_s']} s"]
    if "staggered_start" in report:
        lines += ["", "| staggered start | first READY (s) | all READY (s) |", "|---|---:|---:|"]
        for s in report["staggered_start"]:
            lines.append(f"| {s['workers']} workers, fake load {s['fake_load_s']} s | "
                         f"{s['first_ready_s']:.2f} | {s['all_ready_s']:.2f} |")
    if "during_job" in report:
        base = report["during_job"][0]["job_s"]
        setup = "2 workers" if n == 1 else f"2 workers x {n} jobs, {2 * n - 1} jobs"
        lines += ["", f"| fault during a job ({setup}) | job wall (s) | added by the fault (s) | "
                  "first frame after (s) | longest frame gap (s) | frames exactly once | "
                  "attempts | replacement READY after the fault (s) | jobs lost | "
                  "frames lost |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for f in report["during_job"]:
            lines.append(f"| {f['fault']} | {f['job_s']:.2f} | {f['job_s'] - base:+.2f} | "
                         f"{_figure(f['max_first_frame_s'], 'no frame came')} | "
                         f"{_figure(f['max_frame_gap_s'], 'under two frames')} | "
                         f"{'yes' if f['exactly_once_in_order'] else 'NO'} | {f['attempts']} | "
                         f"{_replacement(f)} | {f['jobs_lost']} | {f['frames_lost']} |")
    if "while_loading" in report:
        lines += ["", "| fault while loading (1 worker) | READY after start (s) | restarts |",
                  "|---|---:|---:|"]
        for f in report["while_loading"]:
            lines.append(f"| {f['fault']} | {f['ready_after_start_s']:.2f} | {f['restarts']} |")
    runs = [row for key in ("staggered_start", "during_job", "while_loading")
            for row in report.get(key, [])]
    errors = [e for row in runs for e in row.get("errors", [])]
    lines += ["", f"segments left in /dev/shm after SIGTERM: "
              f"{sum(row['segments_leaked'] for row in runs)} ({len(runs)} daemons)"]
    if errors:
        lines.append("client errors: " + "; ".join(errors[:5]))
    return "\n".join(lines)


def _figure(value: float | None, missing: str) -> str:
    """A measured figure, or in words why there is none (never a bare "-")."""
    return missing if value is None else f"{value}"


def _replacement(row: dict[str, Any]) -> str:
    """The replacement column: the time, or why there is none."""
    ready = row["replacement_ready_after_fault_s"]
    if ready is not None:
        return f"{ready}"
    if row.get("fault_kind", "signal") == "none":
        return "no fault"
    return "not timed (the fault's moment is unknown)"
