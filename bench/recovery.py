"""`avatard bench recovery`: how long a staggered start takes and how long the daemon takes
to recover from each kind of fault, measured on real processes with the fake engine.

For faults during a job the client streams a long job while the fault hits its worker; we
report the longest gap between two frames the client received (what a viewer would see),
whether every frame arrived exactly once, and how long until the replacement worker was
READY. For faults while loading we report how long until the worker was READY after its
retry. The timeouts in force are printed with the figures: recovery time is mostly them.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from avatard.daemon import PrivateDaemon
from avatard.ipc.client import DoneEvent, FrameEvent

from .timing import median

TIMEOUTS = {"hello_s": 20.0, "load_s": 3.0, "heartbeat_interval_s": 0.2,
            "heartbeat_timeout_s": 2.0, "stall_timeout_s": 2.0, "kill_grace_s": 1.0}
RESTART = {"backoff_initial_s": 0.2, "backoff_max_s": 2.0, "max_load_attempts": 3}
TEXT = " ".join(["This sentence keeps the worker busy for a while."] * 6)


def _sections(workers: int, fake: dict[str, Any], **daemon: Any) -> dict[str, dict[str, Any]]:
    return {
        "daemon": {"workers": workers, "min_ready": 1, "devices": "cpu", **daemon},
        "timeouts": TIMEOUTS, "restart": RESTART,
        "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
        "engines.options.fake": {"width": 64, "height": 64, **fake},
    }


def staggered_start(workers: int, load_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="avatard-bench-") as tmp:
        d = PrivateDaemon(Path(tmp), _sections(workers, {"load_s": load_s}))
        try:
            first = d.wait_for(lambda s: s["daemon"]["ready_workers"] >= 1, 120, "first READY")
            first_s = time.monotonic() - d.started
            status = d.wait_for(lambda s: s["daemon"]["ready_workers"] == workers, 120,
                                "all READY")
            all_s = time.monotonic() - d.started
        finally:
            d.stop()
    del first
    return {"workers": workers, "fake_load_s": load_s, "first_ready_s": round(first_s, 3),
            "all_ready_s": round(all_s, 3),
            "load_s_each": [w["load_s"] for w in status["workers"]]}


def _fault_during_job(name: str, fake: dict[str, Any], action: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="avatard-bench-") as tmp:
        d = PrivateDaemon(Path(tmp), _sections(2, {"frame_ms": 10, **fake}))
        try:
            d.wait_for(lambda s: s["daemon"]["ready_workers"] == 2, 120, "two ready workers")
            stamps: list[float] = []
            indices: list[int] = []
            victim: dict[str, Any] = {}
            fault_at = 0.0
            done = None
            job_started = time.monotonic()
            with d.client(timeout_s=60) as client:
                for event in client.speak(TEXT, seed=7):
                    if isinstance(event, FrameEvent):
                        stamps.append(time.monotonic())
                        indices.append(event.index)
                        if action and event.index == 25 and not victim:
                            victim = next(w for w in d.status()["workers"] if w["current_job"])
                            fault_at = time.monotonic()
                            os.kill(victim["pid"], getattr(signal, action))
                    elif isinstance(event, DoneEvent):
                        done = event
            job_s = time.monotonic() - job_started
            victim_id = victim["id"] if victim else None
            if action is None and not fake:
                d.stop()
                return {"fault": name, "frames": len(indices), "job_s": round(job_s, 3),
                        "exactly_once_in_order": indices == list(range(len(indices))),
                        "attempts": done.attempts if done else None, "max_frame_gap_s": None,
                        "replacement_ready_after_fault_s": None}
            if victim_id is None:  # faults injected by the engine: find the restarted one
                status = d.wait_for(lambda s: any(w["restarts"] for w in s["workers"]), 30,
                                    "a restart")
                victim_id = next(w["id"] for w in status["workers"] if w["restarts"])
            status = d.wait_for(lambda s: s["workers"][victim_id]["state"] == "ready"
                                and s["workers"][victim_id]["restarts"] >= 1, 60,
                                "replacement READY")
            # When it became READY: now minus how long it has been in that state.
            ready_at = time.monotonic() - status["workers"][victim_id]["state_age_s"]
            replaced_s = ready_at - fault_at if fault_at else None
        finally:
            d.stop()
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "fault": name,
        "frames": len(indices),
        "exactly_once_in_order": indices == list(range(len(indices))) and done is not None
        and done.frames == len(indices),
        "attempts": done.attempts if done else None,
        "job_s": round(job_s, 3),
        "max_frame_gap_s": round(max(gaps), 3) if gaps else None,
        "median_frame_gap_s": round(median(gaps), 4) if gaps else None,
        "replacement_ready_after_fault_s": round(replaced_s, 3) if replaced_s else None,
    }


def _fault_while_loading(name: str, fake: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="avatard-bench-") as tmp:
        d = PrivateDaemon(Path(tmp), _sections(1, {"fault_attempts": [1], **fake}))
        try:
            status = d.wait_for(lambda s: s["daemon"]["ready_workers"] == 1, 120, "READY")
            ready_s = time.monotonic() - d.started
        finally:
            d.stop()
    return {"fault": name, "ready_after_start_s": round(ready_s, 3),
            "restarts": status["workers"][0]["restarts"]}


def run_recovery_bench() -> dict[str, Any]:
    return {
        "timeouts": TIMEOUTS,
        "restart": RESTART,
        "staggered_start": [staggered_start(4, 0.0), staggered_start(4, 0.5)],
        "during_job": [
            _fault_during_job("none (baseline)", {}, None),
            _fault_during_job("SIGKILL of the busy worker", {}, "SIGKILL"),
            _fault_during_job("SIGSTOP of the busy worker", {}, "SIGSTOP"),
            # Worker 0 takes the job first; the fault spares worker 1 and the replacement.
            _fault_during_job("engine hangs mid-job", {"hang_at_frame": 25, "fault_workers": [0],
                                                       "fault_attempts": [1]}, None),
            _fault_during_job("engine crashes mid-job", {"crash_at_frame": 25,
                                                         "fault_workers": [0],
                                                         "fault_attempts": [1]}, None),
        ],
        "while_loading": [
            _fault_while_loading("crash while loading (first attempt)", {"load_crash": True}),
            _fault_while_loading("hang while loading (first attempt)", {"load_hang": True}),
            _fault_while_loading("out of memory while loading (first attempt)",
                                 {"load_oom": True}),
        ],
    }


def format_recovery(report: dict[str, Any]) -> str:
    t, r = report["timeouts"], report["restart"]
    lines = [f"timeouts: heartbeat {t['heartbeat_timeout_s']} s, stall {t['stall_timeout_s']} s,"
             f" load {t['load_s']} s, kill grace {t['kill_grace_s']} s; backoff from "
             f"{r['backoff_initial_s']} s", "",
             "| staggered start | first READY (s) | all READY (s) |", "|---|---:|---:|"]
    for s in report["staggered_start"]:
        lines.append(f"| {s['workers']} workers, fake load {s['fake_load_s']} s | "
                     f"{s['first_ready_s']:.2f} | {s['all_ready_s']:.2f} |")
    base = report["during_job"][0]["job_s"]
    lines += ["", "| fault during a job (2 workers) | job wall (s) | added by the fault (s) | "
              "longest frame gap (s) | frames exactly once | attempts | replacement READY "
              "after (s) |", "|---|---:|---:|---:|---|---:|---:|"]
    for f in report["during_job"]:
        ready = f["replacement_ready_after_fault_s"]
        gap = f["max_frame_gap_s"]
        lines.append(f"| {f['fault']} | {f['job_s']:.2f} | {f['job_s'] - base:+.2f} | "
                     f"{'-' if gap is None else gap} | "
                     f"{'yes' if f['exactly_once_in_order'] else 'NO'} | {f['attempts']} | "
                     f"{'-' if ready is None else ready} |")
    lines += ["", "| fault while loading (1 worker) | READY after start (s) | restarts |",
              "|---|---:|---:|"]
    for f in report["while_loading"]:
        lines.append(f"| {f['fault']} | {f['ready_after_start_s']:.2f} | {f['restarts']} |")
    return "\n".join(lines)
