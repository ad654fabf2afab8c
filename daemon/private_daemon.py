"""A private `avatard serve` in a child process, started and stopped by one caller:
`avatard render`, `lipsync` and `transcribe` when no daemon answers, the benches and the
tests.

Ownership: the caller owns a work folder; the daemon's config (`avatard.toml`), its log
(`daemon.log`) and its runtime directory (`run/`: client socket, lock) live in it, so a
private daemon never meets another daemon's socket or lock. The caller stops it (`stop()`:
a signal, a bounded wait, then SIGKILL) and removes the folder. The daemon names its
shared-memory segments with its pid, so `segments()` after `stop()` lists what it leaked.

Runs in the caller's process and imports no engine and no torch. The child is this
interpreter running `-m avatard.daemon.cli serve`, not the console script: that works
wherever the package imports (a --target install has no script next to the interpreter).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from avatard.ipc.client import Client, ClientError
from avatard.ipc.paths import SOCKET_NAME, socket_endpoint
from avatard.ipc.segments import segments_of

# Keys the launcher sets itself: the daemon must answer in the work folder.
OWN_KEYS = ("daemon.runtime_dir", "daemon.endpoint")
LOG_TAIL_CHARS = 4000  # how much of the daemon's log an error carries


class PrivateDaemonError(RuntimeError):
    """The private daemon exited, or gave up loading, while the caller waited for it."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)  # int, float (repr of inf and nan is TOML too)


def _toml_text(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines: list[str] = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


class PrivateDaemon:
    """A running private `avatard serve`: its process, endpoint, runtime directory and log.

    Attributes: `workdir`, `runtime_dir` (workdir/run), `endpoint` (its ipc:// client
    socket), `log` (path of its stdout and stderr), `proc` (the `subprocess.Popen`),
    `started` (`time.monotonic()` when it was started).
    """

    def __init__(self, workdir: Path, sections: Mapping[str, Mapping[str, Any]] | None = None,
                 *, overrides: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 watchdog_usec: int = 0, extra_args: Sequence[str] = (),
                 die_with_caller: bool = False) -> None:
        """Start the daemon and return at once (`wait_for` and `wait_ready` wait for it).

        `workdir`: an existing folder the caller owns; keep its path short (the socket path
        must fit AF_UNIX's 107 bytes, or the daemon exits with a config error).
        `sections`: config tables by dotted name, e.g. ``{"daemon": {"workers": 2},
        "engines.options.fake": {"frame_ms": 10}}``, written to workdir/avatard.toml.
        `overrides`: ``KEY=VALUE`` items given as ``--set`` (they beat the file).
        `env`: extra environment variables; NOTIFY_SOCKET is removed unless given here (a
        private daemon must not report to the caller's systemd). `watchdog_usec`: run with
        WATCHDOG_USEC and WATCHDOG_PID set as systemd's watchdog would. `extra_args`: more
        arguments of `avatard serve`. `die_with_caller`: the daemon drains and exits when
        this process exits, even by SIGKILL (a pipe whose write end only this process
        holds: `avatard serve --parent-fd`); without it a killed caller leaves it running.

        Raises ValueError when `sections` or `overrides` set daemon.runtime_dir or
        daemon.endpoint (the launcher sets them), OSError when the process cannot start.
        """
        sections = dict(sections or {})
        daemon_table = dict(sections.get("daemon", {}))
        given = [f"daemon.{key}" for key in daemon_table if f"daemon.{key}" in OWN_KEYS]
        given += [item.partition("=")[0].strip() for item in overrides
                  if item.partition("=")[0].strip() in OWN_KEYS]
        if given:
            raise ValueError(f"{', '.join(given)}: a private daemon has its own runtime "
                             "directory and socket; these keys cannot be set")
        self.workdir = workdir
        self.runtime_dir = workdir / "run"
        self.endpoint = socket_endpoint(self.runtime_dir)
        self.log = workdir / "daemon.log"
        sections["daemon"] = {"runtime_dir": str(self.runtime_dir), **daemon_table}
        config = workdir / "avatard.toml"
        config.write_text(_toml_text(sections))
        command = [sys.executable, "-m", "avatard.daemon.cli", "serve", "--config", str(config),
                   *[arg for item in overrides for arg in ("--set", item)], *extra_args]
        proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if not env or "NOTIFY_SOCKET" not in env:
            proc_env.pop("NOTIFY_SOCKET", None)
        if watchdog_usec:
            # systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the shell's pid.
            proc_env["WATCHDOG_USEC"] = str(watchdog_usec)
            command = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *command]
        self._parent_pipe: int | None = None
        pass_fds: tuple[int, ...] = ()
        if die_with_caller:
            # os.pipe() is close-on-exec: only the daemon gets the read end (pass_fds), and
            # the write end stays in this process alone, so its end of file means we died.
            read_fd, self._parent_pipe = os.pipe()
            pass_fds = (read_fd,)
            command += ["--parent-fd", str(read_fd)]
        self.started = time.monotonic()
        try:
            with open(self.log, "wb") as log_file:
                self.proc = subprocess.Popen(command, stdout=log_file,
                                             stderr=subprocess.STDOUT, env=proc_env,
                                             pass_fds=pass_fds)
        finally:
            for fd in pass_fds:
                os.close(fd)

    # ------------------------------------------------------------------ talking to it

    def client(self, **kwargs: Any) -> Client:
        """A `Client` of this daemon; keyword arguments go to `Client` (default timeout_s
        20). Raises `ClientError` (`DaemonUnavailable`) when the daemon does not answer."""
        return Client(self.endpoint, **{"timeout_s": 20.0, **kwargs})

    def status(self) -> dict[str, Any]:
        """The daemon's status, as `avatard status --json` prints it. Raises `ClientError`
        when it does not answer within 20 s."""
        with self.client(name="status", inline=True) as client:
            return client.stats()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
                 what: str, poll_s: float = 0.05) -> dict[str, Any]:
        """Poll the status every `poll_s` seconds until `predicate(status)` holds; return
        that status. `what` names the wait in errors.

        Raises `PrivateDaemonError` (with the log's tail) when the daemon exits first and
        `TimeoutError` (with the last status and the log's tail) after `timeout_s` seconds.
        """
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        socket = self.runtime_dir / SOCKET_NAME
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrivateDaemonError(
                    f"the private daemon exited with status {self.proc.returncode} while "
                    f"waiting for {what}:\n{self.log_text()[-LOG_TAIL_CHARS:]}")
            if socket.exists():  # before it binds, a status call would only wait
                try:
                    status = self.status()
                    if predicate(status):
                        return status
                except ClientError:
                    pass
            time.sleep(poll_s)
        raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}; last status: "
                           f"{json.dumps(status)[:3000]}\n{self.log_text()[-LOG_TAIL_CHARS:]}")

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Wait until the daemon serves (daemon.min_ready workers READY); return its status.

        Raises `PrivateDaemonError` when it exits or every worker gave up loading (the
        message names each worker's reason), `TimeoutError` after `timeout_s` seconds.
        """
        status = self.wait_for(lambda s: s["daemon"]["state"] in ("ready", "failed"),
                               timeout_s, "daemon.min_ready workers READY", poll_s=0.2)
        if status["daemon"]["state"] == "failed":
            reasons = "; ".join(f"worker {w['id']}: {w['reason']}" for w in status["workers"])
            raise PrivateDaemonError(f"the private daemon could not load its engines: {reasons}")
        return status

    # ------------------------------------------------------------------ what it left

    def log_text(self) -> str:
        """Everything the daemon has written to its log so far ("" before it wrote)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def worker_pids(self) -> list[int]:
        """Pids of the workers that have one now (from its status; raises `ClientError`)."""
        return [w["pid"] for w in self.status()["workers"] if w["pid"]]

    def segments(self) -> list[str]:
        """Shared-memory segments named with the daemon's pid: while it runs, its own;
        after it exited, what it leaked."""
        return segments_of(self.proc.pid)

    # ------------------------------------------------------------------ stopping

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Send `sig` (SIGTERM: drain, then exit) unless it exited already, wait up to
        `timeout_s` seconds and return its exit status.

        A daemon still running then is SIGKILLed, reaped, and `TimeoutError` is raised
        (with the log's tail); the process is gone either way.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise TimeoutError(f"the private daemon did not exit within {timeout_s:g} s of "
                               f"signal {sig}:\n{self.log_text()[-LOG_TAIL_CHARS:]}") from None
        finally:
            if self._parent_pipe is not None and self.proc.poll() is not None:
                os.close(self._parent_pipe)
                self._parent_pipe = None
