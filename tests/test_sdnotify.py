"""Tests of daemon/sdnotify.py against real AF_UNIX datagram sockets the tests bind."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from avatard.daemon.sdnotify import Notifier, parse_notify_address, parse_watchdog_interval_s


class Receiver:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str):
        self.sock = sock
        self.env_value = env_value  # what NOTIFY_SOCKET is set to

    def receive(self, timeout_s: float = 2.0) -> bytes:
        self.sock.settimeout(timeout_s)
        return self.sock.recv(65536)

    def nothing_pending(self) -> bool:
        self.sock.settimeout(0.2)
        try:
            self.sock.recv(65536)
        except TimeoutError:
            return True
        return False


@pytest.fixture
def path_receiver() -> Iterator[Receiver]:
    # A short directory under the system temp dir: pytest's tmp_path can exceed the
    # 107-byte limit of AF_UNIX socket paths.
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = str(Path(directory) / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        try:
            yield Receiver(sock, path)
        finally:
            sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"avatard-test-notify-{os.getpid()}-{secrets.token_hex(4)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request, path_receiver, abstract_receiver) -> Receiver:
    return path_receiver if request.param == "path" else abstract_receiver


# ---------------------------------------------------------------------------- messages


def test_ready_with_status_sends_exact_bytes(receiver):
    with Notifier({"NOTIFY_SOCKET": receiver.env_value}) as notifier:
        assert notifier.enabled
        assert notifier.ready("2/2 workers ready")
        assert receiver.receive() == b"READY=1\nSTATUS=2/2 workers ready"
        assert notifier.ready()
        assert receiver.receive() == b"READY=1"


def test_each_message_kind(receiver):
    with Notifier({"NOTIFY_SOCKET": receiver.env_value}) as notifier:
        assert notifier.status("worker 1 loading (weights 40%)")
        assert receiver.receive() == b"STATUS=worker 1 loading (weights 40%)"
        assert notifier.watchdog()
        assert receiver.receive() == b"WATCHDOG=1"
        assert notifier.stopping("draining 3 jobs")
        assert receiver.receive() == b"STOPPING=1\nSTATUS=draining 3 jobs"
        assert notifier.stopping()
        assert receiver.receive() == b"STOPPING=1"
        assert notifier.extend_timeout(90)
        assert receiver.receive() == b"EXTEND_TIMEOUT_USEC=90000000"

        before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        message = receiver.receive()
        after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", message)
        assert match, message
        assert before_usec <= int(match.group(1)) <= after_usec


def test_status_newlines_cannot_inject_assignments(path_receiver):
    notifier = Notifier({"NOTIFY_SOCKET": path_receiver.env_value})
    assert notifier.status("line one\nREADY=1")
    assert path_receiver.receive() == b"STATUS=line one READY=1"
    notifier.close()


def test_unset_notify_socket_is_a_cheap_no_op():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.address is None
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert not notifier.reloading()
    assert notifier._socket is None  # no socket was even created
    assert notifier.watchdog_interval_s() is None
    assert not any(notifier.watchdog() for _ in range(10_000))
    assert notifier._socket is None


def test_addresses():
    assert parse_notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_notify_address("@/org/freedesktop/systemd1/notify") == (
        "\0/org/freedesktop/systemd1/notify"
    )
    assert parse_notify_address("@") is None
    assert parse_notify_address("vsock:2:1234") is None
    assert parse_notify_address("relative/path") is None


def test_unsupported_address_is_disabled_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="avatard.sdnotify"):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert "vsock:2:1234" in caplog.text


def test_send_failure_never_raises_and_logs_once(caplog):
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        missing = str(Path(directory) / "nobody-listens.sock")
        notifier = Notifier({"NOTIFY_SOCKET": missing})
        with caplog.at_level(logging.DEBUG, logger="avatard.sdnotify"):
            results = [notifier.watchdog() for _ in range(3)] + [notifier.ready("x")]
        assert results == [False] * 4
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert missing in warnings[0].getMessage()
        notifier.close()


def test_full_receiver_queue_does_not_block(path_receiver):
    # The receiver never reads: once its queue is full, sends fail fast instead of
    # blocking the caller (the scheduler loop).
    path_receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    notifier = Notifier({"NOTIFY_SOCKET": path_receiver.env_value})
    # A blocking send would hang here (the test's timeout catches it).
    results = [notifier.status("x" * 512) for _ in range(5000)]
    assert results[0] is True
    assert False in results
    notifier.close()


def test_forked_child_does_not_send(path_receiver):
    notifier = Notifier({"NOTIFY_SOCKET": path_receiver.env_value})
    child = multiprocessing.get_context("fork").Process(target=_child_pings, args=(notifier,))
    child.start()
    child.join(30)
    assert child.exitcode == 0  # the child's watchdog() returned False
    assert path_receiver.nothing_pending()
    assert notifier.watchdog()  # the parent still sends
    assert path_receiver.receive() == b"WATCHDOG=1"
    notifier.close()


def _child_pings(notifier: Notifier) -> None:
    sys.exit(1 if notifier.watchdog() else 0)


def test_from_environment_unsets_the_variables(monkeypatch, path_receiver):
    monkeypatch.setenv("NOTIFY_SOCKET", path_receiver.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environment(unset=True)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ
    # A process started now does not inherit them.
    probe = "import os; print(os.environ.get('NOTIFY_SOCKET', 'unset'))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "unset"
    # The notifier read them before they went.
    assert notifier.watchdog_interval_s() == 10.0
    assert notifier.ready()
    assert path_receiver.receive() == b"READY=1"
    notifier.close()


def test_from_environment_can_keep_the_variables(monkeypatch, abstract_receiver):
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_receiver.env_value)
    notifier = Notifier.from_environment(unset=False)
    assert os.environ["NOTIFY_SOCKET"] == abstract_receiver.env_value
    assert notifier.watchdog()
    assert abstract_receiver.receive() == b"WATCHDOG=1"
    notifier.close()


# ---------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("environ", "expected_s"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
    ],
)
def test_watchdog_interval(environ, expected_s):
    pid = os.getpid()
    env = {key: value.format(pid=pid) for key, value in environ.items()}
    assert parse_watchdog_interval_s(env, pid) == expected_s
    assert Notifier(env).watchdog_interval_s() == expected_s


# ---------------------------------------------------------------------------- the unit file

UNIT_PATH = Path(__file__).resolve().parent.parent / "systemd" / "avatard.service"


def unit_settings() -> dict[str, list[str]]:
    """Key -> values of the [Service] and [Unit] sections (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for raw_line in UNIT_PATH.read_text(encoding="utf-8").splitlines():
        line = raw_line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def seconds_of(value: str) -> float:
    units = {"min": 60.0, "s": 1.0, "": 1.0}
    match = re.fullmatch(r"(\d+)(min|s|)", value)
    assert match, value
    return int(match.group(1)) * units[match.group(2)]


def test_unit_file_matches_the_daemon():
    from avatard.daemon.config import Config

    settings = unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["KillMode"] == ["mixed"]
    assert settings["RuntimeDirectory"] == ["avatard"]
    assert settings["RuntimeDirectoryMode"] == ["0700"]  # ipc/sockets.py insists on 0700
    defaults = Config()
    drain_s = defaults.daemon.drain_timeout_s + defaults.timeouts.kill_grace_s
    assert seconds_of(settings["TimeoutStopSec"][0]) > drain_s
    assert seconds_of(settings["TimeoutStartSec"][0]) >= defaults.timeouts.load_s
    # Clients map rings in the host's /dev/shm: nothing may hide or clean it.
    for forbidden in ("PrivateIPC", "PrivateDevices", "RemoveIPC", "DynamicUser"):
        assert forbidden not in settings, forbidden


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart's binary exists: point it at this Python.
    text = UNIT_PATH.read_text(encoding="utf-8").replace(
        "ExecStart=/usr/local/bin/avatard", f"ExecStart={sys.executable}"
    )
    unit = tmp_path / "avatard.service"
    unit.write_text(text, encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "avatard.service" not in result.stderr, result.stderr
