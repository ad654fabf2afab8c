"""Start and stop a real `avatard serve` subprocess from a dict of config sections.

Used by the benchmarks (and the tests) that need a daemon they control: they write a
TOML config, start the daemon, wait for a state through `avatard status`' data, inject
faults, and stop it with a signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class DaemonProcess:
    """A running `avatard serve`, its endpoint and its log file."""

    def __init__(self, workdir: Path, sections: dict[str, dict[str, Any]],
                 env: dict[str, str] | None = None, watchdog_usec: int = 0,
                 extra_args: list[str] | None = None):
        self.runtime_dir = workdir / "run"
        sections = {**sections}
        sections["daemon"] = {"runtime_dir": str(self.runtime_dir), **sections.get("daemon", {})}
        config = write_config(workdir / "avatard.toml", sections)
        self.log = workdir / "daemon.log"
        proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if not env or "NOTIFY_SOCKET" not in env:
            proc_env.pop("NOTIFY_SOCKET", None)
        # The module, not the console script: works wherever the package imports (a
        # --target install has no script next to the interpreter).
        command = [sys.executable, "-m", "avatard.daemon.cli", "serve", "--config", str(config),
                   *(extra_args or [])]
        if watchdog_usec:
            # systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the shell's pid.
            proc_env["WATCHDOG_USEC"] = str(watchdog_usec)
            command = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *command]
        self.started = time.monotonic()
        with open(self.log, "wb") as log_file:
            self.proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                         env=proc_env)
        self.endpoint = f"ipc://{self.runtime_dir / 'avatard.sock'}"

    def client(self, **kwargs: Any) -> Client:
        return Client(self.endpoint, **{"timeout_s": 20.0, **kwargs})

    def status(self) -> dict[str, Any]:
        with self.client(name="status", inline=True) as c:
            return c.stats()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
                 what: str, poll_s: float = 0.05) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}) while waiting "
                                   f"for {what}:\n{self.log_text()[-4000:]}")
            try:
                status = self.status()
                if predicate(status):
                    return status
            except ClientError:
                pass
            time.sleep(poll_s)
        raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}; last status: "
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
            raise TimeoutError(f"daemon did not exit within {timeout_s} s of signal {sig}:\n"
                               f"{self.log_text()[-4000:]}") from None
