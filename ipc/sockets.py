"""ZeroMQ endpoints: where sockets live, who may open them, and the client-facing port.

- Local endpoints are ``ipc://`` paths inside a runtime directory of mode 0700; the socket
  file itself is chmod 0600 right after bind, so only the service user can connect.
- ``tcp://`` endpoints are for remote clients; frames reach them inline as message parts.
- `ClientPort` wraps the supervisor's ROUTER socket: it decodes every request through the
  protocol codec and answers malformed ones itself with an error reply that names the
  field and the rule, so a bad client can never stop the daemon from serving. It also
  reports each client connection that closed (`closed_connections`), so the jobs of a
  client that died are cancelled at once, local or remote.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq

from . import protocol as P

log = logging.getLogger("avatard.ipc")


MAX_PEERS = 4096  # peer pids kept for identities with no session yet (oldest dropped)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def message_fd(frame: zmq.Frame) -> int | None:
    """The file descriptor of the connection `frame` came in on (libzmq's ZMQ_SRCFD), or
    None when it cannot be read. One connection has one fd for its whole life, and the
    socket monitor names the fd of a connection that closed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # ZMQ_SRCFD: no successor
            fd = frame.get(zmq.SRCFD)
    except (zmq.ZMQError, AttributeError, ValueError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def peer_pid(fd: int | None) -> int | None:
    """The process id of the peer of connection `fd` (`message_fd`) when it is an
    ``ipc://`` connection (SO_PEERCRED); None for tcp peers or when it cannot be read.
    Lets the daemon see a local client die even while another process holds its socket
    open (a forked child), instead of waiting out timeouts."""
    if fd is None:
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        # libzmq may have closed the connection (and its fd) before its first message is
        # read here: a client that sent and hung up at once. Nothing to read; not an error.
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        pid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            _UCRED.size))[0]
        return pid if pid > 0 else None
    except OSError:
        return None
    finally:
        sock.detach()  # the fd stays libzmq's


def wait_readable(sock: zmq.Socket, timeout_ms: int, spin_us: int = 0) -> bool:
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
    """The supervisor's client-facing ROUTER sockets, with validation at the boundary.

    Local (ipc://) clients and remote (tcp://) clients get separate sockets, because ZeroMQ
    security is per socket: with CURVE keys configured the TCP socket is a CURVE server
    that an authenticator thread checks against the allowed client keys, while the ipc://
    socket stays plain (the socket file's 0600 mode is its access control). The identity
    handed to the caller is the socket's index byte + the ROUTER identity, so replies go
    out on the socket the request came in on.

    Closed connections: ZeroMQ's ROUTER says nothing when a peer goes, and a message to a
    gone identity is dropped in silence, so a dead remote client's job would run on (its
    frames going nowhere) or wait in the queue. Each socket therefore has a monitor: the
    identity of a connection is tied to the connection's fd (`message_fd`) at its first
    message, and the monitor's DISCONNECTED event names the fd of a connection that
    closed. A peer reconnects under a new identity, so a closed connection's identity is
    gone for good. On tcp the daemon also sends ZMTP heartbeats (`heartbeat_timeout_s`),
    so a host that vanished without closing its connection (power cut, cable) is dropped
    like one that closed it.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, tcp_endpoint: str = "",
                 curve_secret_key_file: str = "", curve_clients_dir: str = "",
                 heartbeat_timeout_s: float = 0.0):
        """`heartbeat_timeout_s`: drop a tcp connection that brings nothing (not even the
        answer to a heartbeat, sent every fifth of it) for this long, in seconds; 0: no
        heartbeats. Raises `ValueError` for a CURVE key file without its secret key and
        `zmq.ZMQError` when an endpoint cannot be bound."""
        self.socks: list[zmq.Socket] = []
        self.endpoints: list[str] = []
        self.bad_messages = 0
        self.refused_clients = 0
        # Identity -> pid of a local (ipc://) client, None for tcp; read once per identity
        # and dropped with its session (`forget`).
        self.peer_pids: dict[bytes, int | None] = {}
        # (socket index, fd) <-> identity of each connection that sent a message.
        self._fd_identity: dict[tuple[int, int], bytes] = {}
        self._identity_fd: dict[bytes, tuple[int, int]] = {}
        self._closed: list[bytes] = []
        # Identities whose connection closed: messages of theirs still queued in the ROUTER
        # (libzmq may report the close before the last messages are readable) are dropped,
        # or a request read after the close would open a session for a dead client.
        self._gone: dict[bytes, None] = {}
        self._monitors: list[zmq.Socket] = []
        self._auth = None
        by_kind: dict[str, list[str]] = {"ipc": [], "tcp": []}
        for item in (endpoint, tcp_endpoint):
            if item:
                by_kind["ipc" if item.startswith("ipc://") else "tcp"].append(item)
        for kind in ("ipc", "tcp"):
            if not by_kind[kind]:
                continue
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            # Unroutable replies (client gone) must not raise: the monitor reports the
            # closed connection and the coordinator ends what the client had.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            # libzmq drops a peer that sends a part over this size before buffering it,
            # so an oversize upload costs the daemon nothing (the codec checks again).
            sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_INLINE_BYTES)
            events = zmq.EVENT_DISCONNECTED
            if kind == "tcp":
                if heartbeat_timeout_s > 0:
                    timeout_ms = max(1, round(heartbeat_timeout_s * 1000))
                    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, timeout_ms // 5))
                    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
                if curve_secret_key_file:
                    self._enable_curve(ctx, sock, curve_secret_key_file, curve_clients_dir)
                    events |= HANDSHAKE_FAILED
            self._monitors.append(self._monitor(ctx, sock, len(self.socks), events))
            for item in by_kind[kind]:
                self.endpoints.append(bind(sock, item))
            self.socks.append(sock)
        self.sock = self.socks[0]

    @staticmethod
    def _monitor(ctx: zmq.Context, sock: zmq.Socket, index: int, events: int) -> zmq.Socket:
        """A PAIR that receives `sock`'s monitor events. Its receive queue is unbounded:
        libzmq's I/O thread blocks on a full monitor queue, which would stop every client
        connection; the loop reads it every tick, so it stays short."""
        address = f"inproc://avatard-clients-monitor-{os.getpid()}-{id(sock)}-{index}"
        sock.monitor(address, events)
        reader = ctx.socket(zmq.PAIR)
        reader.setsockopt(zmq.RCVHWM, 0)
        reader.setsockopt(zmq.LINGER, 0)
        reader.connect(address)
        return reader

    def _enable_curve(self, ctx: zmq.Context, sock: zmq.Socket, secret_file: str,
                      clients_dir: str) -> None:
        from zmq.auth import load_certificate
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = load_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key (use the .key_secret file)")
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("avatard.auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=clients_dir)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        log.info("tcp clients must authenticate with CURVE (allowed keys in %s)", clients_dir)

    def register(self, poller: zmq.Poller) -> None:
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)

    def _read_monitors(self) -> None:
        """Take every waiting monitor event (non-blocking): note the identities whose
        connection closed, and log clients the CURVE handshake refused."""
        from zmq.utils.monitor import recv_monitor_message

        for index, monitor in enumerate(self._monitors):
            while monitor.poll(0):
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    identity = self._fd_identity.pop((index, int(event["value"])), None)
                    if identity is not None:
                        del self._identity_fd[identity]
                        self.peer_pids.pop(identity, None)
                        self._closed.append(identity)
                        if len(self._gone) >= MAX_PEERS:
                            del self._gone[next(iter(self._gone))]
                        self._gone[identity] = None
                elif event["event"] & HANDSHAKE_FAILED:
                    self.refused_clients += 1
                    log.warning("refused a tcp client: CURVE handshake failed (event %d, %s)",
                                event["event"],
                                event.get("endpoint", b"").decode(errors="replace"))

    def closed_connections(self) -> list[bytes]:
        """Identities whose connection closed since the last call (the client exited, was
        killed, closed its socket, or its host stopped answering heartbeats). What the
        daemon kept for them is theirs no more: end their jobs and sessions."""
        self._read_monitors()
        closed, self._closed = self._closed, []
        return closed

    def _note_peer(self, index: int, identity: bytes, frame: zmq.Frame) -> None:
        """Tie a new identity to its connection's fd (and a local peer's pid)."""
        fd = message_fd(frame)
        # Events first: a DISCONNECTED naming this fd may be of an earlier connection that
        # had the same number (the kernel reuses the lowest free fd at once). libzmq queues
        # that event before it closes the fd, so before this connection could be given the
        # number, and so before its first message: read now, it names the earlier one.
        self._read_monitors()
        if len(self.peer_pids) >= MAX_PEERS:  # connections that never said bye
            self.forget(next(iter(self.peer_pids)))
        self.peer_pids[identity] = peer_pid(fd)
        if fd is not None:
            earlier = self._fd_identity.get((index, fd))
            if earlier is not None:  # not reported closed (cannot happen, see above)
                self._identity_fd.pop(earlier, None)
            self._fd_identity[(index, fd)] = identity
            self._identity_fd[identity] = (index, fd)

    def receive(self, on_refused: Callable[[bytes, Any], None] | None = None
                ) -> Iterator[tuple[bytes, P.Msg, list[Any]]]:
        """Every request waiting now, decoded; malformed ones are answered and skipped,
        after `on_refused(identity, control part)` (if given) has had a look at them (the
        supervisor gives back the input slot one names)."""
        for index, sock in enumerate(self.socks):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                identity = bytes([index]) + bytes(frames[0].buffer)
                if identity in self._gone:
                    continue  # sent just before its connection closed: nobody to answer
                if identity not in self.peer_pids and len(frames) > 1:
                    self._note_peer(index, identity, frames[1])
                parts = [f.buffer for f in frames[1:]]
                try:
                    msg, extra = P.CLIENT_CODEC.decode(parts)
                except P.ProtocolError as exc:
                    self.bad_messages += 1
                    log.warning("bad client message from %s: %s", identity.hex(), exc)
                    if on_refused is not None and parts:
                        on_refused(identity, parts[0])
                    self.send(identity, exc.reply())
                    continue
                except Exception:  # a decoder bug must not stop the daemon
                    self.bad_messages += 1
                    log.exception("undecodable client message from %s", identity.hex())
                    self.send(identity, P.ProtocolError(P.E_BAD_MESSAGE, "message",
                                                        "could not be decoded").reply())
                    continue
                yield identity, msg, extra

    def serve(self, handler: Callable[[bytes, P.Msg, list[Any]], None],
              on_refused: Callable[[bytes, Any], None] | None = None) -> None:
        """Hand every waiting request to `handler(identity, msg, extra parts)`. A
        `ProtocolError` it raises becomes the error reply (and counts as a bad message);
        any other exception is a bug of ours: logged, answered as `internal`, and the
        daemon keeps serving. A client never sees a traceback. `on_refused`: see
        `receive`."""
        for identity, msg, extra in self.receive(on_refused):
            try:
                handler(identity, msg, extra)
            except P.ProtocolError as exc:  # well-formed but refused: counts as bad too
                self.bad_messages += 1
                self.send(identity, exc.reply())
            except Exception as exc:
                log.exception("internal error handling %s from %s", type(msg).__name__,
                              identity.hex())
                self.send(identity, P.make(
                    P.Error, req_id=getattr(msg, "req_id", 0), code=P.E_INTERNAL,
                    field="message", rule=f"internal error: {type(exc).__name__}"))

    def forget(self, identity: bytes) -> None:
        """The client's session ended: drop what is kept about its connection (a later
        message ties it again)."""
        self.peer_pids.pop(identity, None)
        place = self._identity_fd.pop(identity, None)
        if place is not None and self._fd_identity.get(place) == identity:
            del self._fd_identity[place]

    def send(self, identity: bytes, msg: P.Msg, *extra: bytes | memoryview) -> None:
        self.send_parts(identity, P.Codec.encode(msg, *extra))

    def send_parts(self, identity: bytes, parts: list[Any], track: bool = False
                   ) -> zmq.MessageTracker | None:
        """Send already-encoded parts to a client; returns a tracker when `track`."""
        sock = self.socks[identity[0]]
        try:
            return sock.send_multipart([identity[1:], *parts], copy=False, track=track)
        except zmq.ZMQError as exc:  # peer vanished; nothing to deliver to
            log.info("reply to %s dropped: %s", identity.hex(), exc)
            return None

    def close(self) -> None:
        for sock in self.socks:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        for monitor in self._monitors:
            monitor.close(linger=0)
        for sock in self.socks:
            sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        for endpoint in self.endpoints:
            unlink_endpoint(endpoint)
