"""Run a real `avatard serve` in a subprocess for tests, and check it leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from avatard.daemon import PrivateDaemon
from avatard.ipc import segments

__all__ = ["AVATARD", "run_daemon", "free_port", "reap_killed_daemon", "FAST_TIMEOUTS",
           "FAST_RESTART"]

# The console script next to this interpreter (the tests run the installed command).
AVATARD = str(Path(sys.executable).with_name("avatard"))
FAST_TIMEOUTS = {
    "hello_s": 20.0, "load_s": 20.0, "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 3.0,
    "stall_timeout_s": 3.0, "kill_grace_s": 1.0, "client_call_s": 30.0,
}
FAST_RESTART = {"backoff_initial_s": 0.1, "backoff_max_s": 1.0, "max_load_attempts": 2}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a metrics or tcp endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_daemon(tmp_path: Path, workers: int = 1, fake: dict[str, Any] | None = None,
               daemon: dict[str, Any] | None = None, timeouts: dict[str, Any] | None = None,
               restart: dict[str, Any] | None = None, env: dict[str, str] | None = None,
               wait_ready: bool = True, watchdog_usec: int = 0,
               engines: dict[str, str] | None = None,
               engine_options: dict[str, dict[str, Any]] | None = None,
               extra_args: list[str] | None = None, ready_timeout_s: float = 60,
               sections: dict[str, dict[str, Any]] | None = None):
    """A daemon with the fake engines and short timeouts. On exit: SIGTERM, then assert
    exit status 0, no shared-memory segment, no child process and no socket left.
    `sections`: more config tables by dotted name (``{"avatars": {"max_count": 8}}``)."""
    d = PrivateDaemon(tmp_path, {
        "daemon": {"workers": workers, "min_ready": 1, "devices": "cpu", "log_level": "info",
                   **(daemon or {})},
        "timeouts": {**FAST_TIMEOUTS, **(timeouts or {})},
        "restart": {**FAST_RESTART, **(restart or {})},
        "engines": engines or {"avatar": "fake", "tts": "fake", "asr": "fake"},
        "engines.options.fake": fake or {},
        **{f"engines.options.{name}": opts for name, opts in (engine_options or {}).items()},
        **(sections or {}),
    }, env=env, watchdog_usec=watchdog_usec, extra_args=extra_args or ())
    try:
        if wait_ready:
            d.wait_for(lambda s: s["daemon"]["ready_workers"] >= 1, ready_timeout_s,
                       "a ready worker")
        yield d
    finally:
        try:
            children = psutil.Process(d.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        code = d.stop()
        leaked = d.segments()
        # Helpers such as multiprocessing's resource tracker exit when they see the daemon
        # gone; give them a moment before calling them orphans.
        _, still = psutil.wait_procs(children, timeout=5)
        alive = [f"{c.pid} {' '.join(c.cmdline())[:200]}" for c in still
                 if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for c in still:
            try:
                os.kill(c.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in leaked:
            segments.unlink_segment(name)
        assert code == 0, f"daemon exit status {code}\n{d.log_text()[-4000:]}"
        assert not leaked, f"daemon left segments {leaked}"
        assert not alive, f"daemon left processes {alive}"
        assert not (d.runtime_dir / "avatard.sock").exists(), "daemon left its socket file"


def reap_killed_daemon(d: PrivateDaemon, pids: list[int]) -> None:
    """After a test that SIGKILLs daemon `d`: kill it if it still runs, wait for the
    processes `pids` (supervisor and workers, which die with their supervisor) and unlink
    their shared-memory segments (a SIGKILLed daemon cannot unlink its own)."""
    from avatard.ipc import segments

    if d.proc.poll() is None:
        d.stop(signal.SIGKILL, timeout_s=10)
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    for pid in pids:
        for name in segments.segments_of(pid):
            segments.unlink_segment(name)
