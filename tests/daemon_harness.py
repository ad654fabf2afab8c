"""Run a real `avatard serve` in a subprocess for tests, and check it leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from avatard.ipc import segments
from avatard.ipc.client import Client, ClientError

AVATARD = str(Path(sys.executable).with_name("avatard"))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


FAST_TIMEOUTS = {
    "hello_s": 20.0, "load_s": 20.0, "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 3.0,
    "stall_timeout_s": 3.0, "kill_grace_s": 1.0, "client_call_s": 30.0,
}
FAST_RESTART = {"backoff_initial_s": 0.1, "backoff_max_s": 1.0, "max_load_attempts": 2}


class Daemon:
    def __init__(self, proc: subprocess.Popen, endpoint: str, runtime_dir: Path, log: Path):
        self.proc = proc
        self.endpoint = endpoint
        self.runtime_dir = runtime_dir
        self.log = log

    def client(self, **kwargs: Any) -> Client:
        return Client(self.endpoint, **{"timeout_s": 20.0, **kwargs})

    def status(self) -> dict[str, Any]:
        with self.client(name="test-status") as c:
            return c.stats()

    def wait_for(self, predicate, timeout_s: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) while waiting "
                                     f"for {what}:\n{self.log_text()}")
            try:
                status = self.status()
                if predicate(status):
                    return status
            except ClientError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last status: "
                             f"{json.dumps(status)[:3000]}\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["pid"]]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"daemon did not exit within {timeout_s} s of signal {sig}:\n"
                                 f"{self.log_text()[-4000:]}") from None


def daemon_segments(pid: int) -> list[str]:
    return [n for n in segments.list_segments() if (segments.parse_segment_name(n) or (0,))[0]
            == pid]


@contextmanager
def run_daemon(tmp_path: Path, workers: int = 1, fake: dict[str, Any] | None = None,
               daemon: dict[str, Any] | None = None, timeouts: dict[str, Any] | None = None,
               restart: dict[str, Any] | None = None, env: dict[str, str] | None = None,
               wait_ready: bool = True, extra: dict[str, dict[str, Any]] | None = None,
               watchdog_usec: int = 0, engines: dict[str, str] | None = None):
    runtime_dir = tmp_path / "run"
    config = write_config(tmp_path / "avatard.toml", {
        "daemon": {"workers": workers, "min_ready": 1, "devices": "cpu", "log_level": "info",
                   "runtime_dir": str(runtime_dir), **(daemon or {})},
        "timeouts": {**FAST_TIMEOUTS, **(timeouts or {})},
        "restart": {**FAST_RESTART, **(restart or {})},
        "engines": engines or {"avatar": "fake", "tts": "fake", "asr": "fake"},
        "engines.options.fake": fake or {},
        **(extra or {}),
    })
    log = tmp_path / "daemon.log"
    proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if not env or "NOTIFY_SOCKET" not in env:
        proc_env.pop("NOTIFY_SOCKET", None)
    command = [AVATARD, "serve", "--config", str(config)]
    if watchdog_usec:
        # systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the shell's pid.
        proc_env["WATCHDOG_USEC"] = str(watchdog_usec)
        command = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *command]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                env=proc_env)
    d = Daemon(proc, f"ipc://{runtime_dir / 'avatard.sock'}", runtime_dir, log)
    children: list[psutil.Process] = []
    try:
        if wait_ready:
            d.wait_for(lambda s: s["daemon"]["ready_workers"] >= 1, 60, "a ready worker")
        yield d
    finally:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        code = d.stop()
        leaked = daemon_segments(proc.pid)
        # Helpers such as multiprocessing's resource tracker exit when they see the daemon
        # gone; give them a moment before calling them orphans.
        _, still = psutil.wait_procs(children, timeout=5)
        alive = [f"{c.pid} {' '.join(c.cmdline())[:200]}" for c in still
                 if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for c in still:
            c.kill()
        for name in leaked:
            segments.unlink_segment(name)
        assert code == 0, f"daemon exit status {code}\n{d.log_text()[-4000:]}"
        assert not leaked, f"daemon left segments {leaked}"
        assert not alive, f"daemon left processes {alive}"
        assert not (runtime_dir / "avatard.sock").exists(), "daemon left its socket file"
