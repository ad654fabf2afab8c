"""systemd's notify protocol (sd_notify(3)), written against the socket API directly.

The service manager passes an AF_UNIX datagram socket address in $NOTIFY_SOCKET: a
filesystem path ("/run/systemd/notify") or an abstract-namespace name ("@/org/...", whose
"@" stands for a leading NUL byte). A message is one datagram of newline-separated
assignments such as ``READY=1\\nSTATUS=2 of 2 workers ready``.

What the supervisor uses:
- `ready()` once `daemon.min_ready` workers are ready (Type=notify waits for it),
- `status()` whenever worker states change (shown by `systemctl status`),
- `watchdog()` from the scheduler loop, every `watchdog_interval_s()` seconds,
- `stopping()` when draining starts, `extend_timeout()` while long loads run.

Without $NOTIFY_SOCKET (not started by systemd, or Type= is not notify) every call is a
cheap no-op returning False. Sending never raises: a daemon must not die because the
service manager went away; the first failure is logged as a warning, later ones at debug.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["NOTIFY_ENV_VARS", "Notifier", "parse_notify_address", "parse_watchdog_interval_s"]

log = logging.getLogger("avatard.sdnotify")

# The variables systemd sets for notify and watchdog; removed from the environment by
# `Notifier.from_environment(unset=True)` so worker processes do not inherit them.
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def parse_notify_address(value: str) -> str | None:
    """The sendto() address of a $NOTIFY_SOCKET value, or None if unusable here.

    "@name" is an abstract-namespace socket: its address starts with a NUL byte instead of
    the "@". systemd >= 254 may also pass "vsock:CID:PORT" for virtual machines, which a
    daemon on the host never gets and which is not supported here.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def parse_watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Recommended watchdog ping period in seconds: half of $WATCHDOG_USEC, as sd_notify(3)
    advises, so one late ping does not trip the watchdog. None when the watchdog is off,
    the value is malformed, or $WATCHDOG_PID names another process (the variables were
    inherited from a parent that is the real watchdog target)."""
    usec_text = environ.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec_text)
        return None
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID", "")
    if pid_text:
        try:
            if int(pid_text) != pid:
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", pid_text)
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends notify messages to the service manager. Thread-safe; never raises on send."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self._pid = os.getpid()
        self._socket_text = env.get("NOTIFY_SOCKET", "")
        self._address = parse_notify_address(self._socket_text) if self._socket_text else None
        self._watchdog_interval_s = parse_watchdog_interval_s(env, self._pid)
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failure_logged = False
        if self._socket_text and self._address is None:
            log.warning(
                "NOTIFY_SOCKET=%r is not a path or @abstract name; systemd will not get "
                "readiness or watchdog messages",
                self._socket_text,
            )

    @classmethod
    def from_environment(
        cls, unset: bool = True, environ: MutableMapping[str, str] | None = None
    ) -> Notifier:
        """Read the notify variables, then (with `unset`) remove them from the environment
        so processes started later (workers) do not inherit them: with NotifyAccess=main
        systemd ignores their messages anyway, and a worker must never look like the
        service to a watchdog check."""
        env = os.environ if environ is None else environ
        notifier = cls(env)
        if unset:
            for name in NOTIFY_ENV_VARS:
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (started by systemd with a usable socket)."""
        return self._address is not None

    @property
    def address(self) -> str | None:
        """The socket address used by sendto() (abstract names start with NUL)."""
        return self._address

    def watchdog_interval_s(self) -> float | None:
        """Seconds between `watchdog()` calls (half of WatchdogSec=), None when off."""
        return self._watchdog_interval_s

    # ------------------------------------------------------------------ messages

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: systemd moves the unit to "active" and starts dependents."""
        return self.send("READY=1", *self._status_lines(status))

    def status(self, text: str) -> bool:
        """One-line state for `systemctl status`, e.g. "3/4 workers ready, 2 jobs"."""
        return self.send(*self._status_lines(text))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (drain): systemd shows "deactivating" and stops waiting for
        READY or watchdog pings."""
        return self.send("STOPPING=1", *self._status_lines(status))

    def reloading(self, status: str | None = None) -> bool:
        """A configuration reload has begun; send `ready()` when it is done. MONOTONIC_USEC
        is required with Type=notify-reload (systemd >= 253) and ignored by older ones."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}", *self._status_lines(status))

    def watchdog(self) -> bool:
        """Liveness ping; must arrive at least once per WatchdogSec= or systemd kills us."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the start (or stop) timeout fires; useful while
        models load longer than TimeoutStartSec= expected."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def send(self, *assignments: str) -> bool:
        """Send one datagram of newline-joined assignments. True if it was sent."""
        if self._address is None or not assignments:
            return False
        if os.getpid() != self._pid:
            # A forked child: with NotifyAccess=main systemd rejects its messages and logs
            # a warning per message, so do not send at all.
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with self._lock:
                if self._socket is None:
                    self._socket = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                # MSG_DONTWAIT: if the manager's queue is full the message is dropped
                # rather than blocking the scheduler loop that sends watchdog pings.
                self._socket.sendto(payload, socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            self._log_failure(exc)
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _status_lines(text: str | None) -> tuple[str, ...]:
        if not text:
            return ()
        # A newline would end the assignment and start a bogus one.
        return ("STATUS=" + " ".join(text.splitlines()),)

    def _log_failure(self, exc: OSError) -> None:
        if self._failure_logged:
            log.debug("sd_notify to %s failed again: %s", self._socket_text, exc)
            return
        self._failure_logged = True
        log.warning(
            "sd_notify to NOTIFY_SOCKET=%s failed: %s (further failures are logged at debug)",
            self._socket_text,
            exc,
        )
