"""ZeroMQ endpoints: where sockets live, who may open them, and the client-facing port.

- Local endpoints are ``ipc://`` paths inside a runtime directory of mode 0700; the socket
  file itself is chmod 0600 right after bind, so only the service user can connect.
- ``tcp://`` endpoints are for remote clients; frames reach them inline as message parts.
- `ClientPort` wraps the supervisor's ROUTER socket: it decodes every request through the
  protocol codec and answers malformed ones itself with an error reply that names the
  field and the rule, so a bad client can never stop the daemon from serving.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from . import protocol as P

log = logging.getLogger("avatard.ipc")


def wait_readable(sock: zmq.Socket, timeout_ms: int, spin_us: int = 200) -> bool:
    """Wait until `sock` has a message, up to `timeout_ms`. Spins (non-blocking polls) for
    `spin_us` first: a frame's descriptor usually arrives within tens of microseconds, and
    waking a blocked thread costs more than that on a busy machine."""
    if spin_us > 0:
        import time

        end = time.perf_counter_ns() + spin_us * 1000
        while time.perf_counter_ns() < end:
            if sock.poll(0, zmq.POLLIN):
                return True
    return bool(sock.poll(timeout_ms, zmq.POLLIN))


def default_runtime_dir() -> Path:
    """$AVATARD_RUNTIME_DIR, systemd's $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/avatard, or a
    per-user folder under /tmp."""
    for var in ("AVATARD_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        value = os.environ.get(var)
        if value:
            return Path(value.split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "avatard"
    return Path(f"/tmp/avatard-{os.getuid()}")


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) or check an existing one is ours and not open to others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"runtime dir {path} belongs to uid {info.st_uid}, not us")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def is_local(endpoint: str) -> bool:
    """True for endpoints whose peers share this machine's /dev/shm."""
    if endpoint.startswith("ipc://"):
        return True
    return False


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind with owner-only permissions for ipc:// endpoints. Returns the bound endpoint."""
    path = ipc_path(endpoint)
    if path is not None:
        ensure_private_dir(path.parent)
        if path.exists():
            # A socket file left by a dead daemon: connecting to it would hang clients.
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            sock.bind(endpoint)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        return endpoint
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def unlink_endpoint(endpoint: str) -> None:
    path = ipc_path(endpoint)
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class ClientPort:
    """The supervisor's ROUTER socket for clients, with validation at the boundary."""

    def __init__(self, ctx: zmq.Context, endpoint: str, tcp_endpoint: str = ""):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Unroutable replies (client gone) must not raise: the client reconnects and asks.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.endpoints = [bind(self.sock, endpoint)]
        if tcp_endpoint:
            self.endpoints.append(bind(self.sock, tcp_endpoint))
        self.bad_messages = 0

    def receive(self) -> Iterator[tuple[bytes, P.Msg, list[Any]]]:
        """Every request waiting now, decoded; malformed ones are answered and skipped."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = bytes(frames[0].buffer)
            parts = [f.buffer for f in frames[1:]]
            try:
                msg, extra = P.CLIENT_CODEC.decode(parts)
            except P.ProtocolError as exc:
                self.bad_messages += 1
                log.warning("bad client message from %s: %s", identity.hex(), exc)
                self.send(identity, exc.reply())
                continue
            yield identity, msg, extra

    def send(self, identity: bytes, msg: P.Msg, *extra: bytes | memoryview) -> None:
        try:
            self.sock.send_multipart([identity, *P.Codec.encode(msg, *extra)], copy=False)
        except zmq.ZMQError as exc:  # peer vanished; nothing to deliver to
            log.info("reply to %s dropped: %s", identity.hex(), exc)

    def close(self) -> None:
        self.sock.close(linger=0)
        for endpoint in self.endpoints:
            unlink_endpoint(endpoint)
