"""`avatard serve` speaks systemd's notify protocol to a real datagram socket: READY=1 once
min_ready workers are up, STATUS= lines, WATCHDOG=1 pings, STOPPING=1 on drain."""

from __future__ import annotations

import os
import signal
import socket
import time

from daemon_harness import run_daemon


def _read_all(sock: socket.socket, until, timeout_s: float) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until(messages):
            break
    return messages


def test_notify_ready_status_watchdog_stopping(tmp_path):
    name = f"avatard-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # abstract namespace, as systemd uses
    try:
        with run_daemon(tmp_path, workers=2, fake={"width": 32, "height": 32},
                        env={"NOTIFY_SOCKET": "@" + name}, watchdog_usec=400_000) as d:
            d.wait_for(lambda s: s["daemon"]["ready_workers"] == 2, 60, "two ready workers")
            def ready_then_watchdog(msgs):
                first_ready = next((i for i, m in enumerate(msgs) if "READY=1" in m), None)
                return first_ready is not None and "WATCHDOG=1" in msgs[first_ready:]

            messages = _read_all(sock, ready_then_watchdog, 20)
            ready = [m for m in messages if "READY=1" in m]
            assert len(ready) == 1, messages
            assert "STATUS=workers: " in ready[0]
            assert any(m.startswith("STATUS=") and "ready" in m for m in messages)
            assert any(m == "WATCHDOG=1" for m in messages), messages
            # Workers must not inherit the daemon's notify socket.
            for pid in d.worker_pids():
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                assert not any(e.startswith(b"NOTIFY_SOCKET=") for e in env)
            d.proc.send_signal(signal.SIGTERM)
            messages = _read_all(sock, lambda msgs: any("STOPPING=1" in m for m in msgs), 15)
            assert any("STOPPING=1" in m for m in messages), messages
    finally:
        sock.close()
