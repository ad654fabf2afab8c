"""`avatard web`: the WebRTC gateway. An asyncio process (aiohttp for HTTP, aiortc for
WebRTC, PyAV for media) that is a client of the daemon: per browser connection it opens a
live session and sends the session's frames and audio as a video track (VP8, or H264) and
an Opus audio track; the browser's microphone comes back as the session's speech.

HTTP surface (docs/web.md has the details and examples):
- ``GET /``, ``/static/...``: the demo page (package data, no build step).
- ``POST /api/offer`` {sdp, type, avatar_id?, session_id?}: SDP exchange for the page.
- ``POST /api/sessions/{id}/text|talk|interrupt|close``, ``GET .../stats``,
  ``POST /api/avatars`` (a portrait's bytes), ``GET /api/status``, ``GET /api/config``.
- WHEP (draft-ietf-wish-whep): ``POST /whep`` (new session) or ``POST /whep/{session}``
  (watch a running one) with ``application/sdp`` -> ``201`` + ``Location``; ``DELETE``
  the Location to end.

Ownership: the gateway owns one `AsyncClient` (reconnected when the daemon restarts),
every `LiveFeed` (a session and its pump task) and every `Peer` (an aiortc peer
connection). A peer that opened a session owns it: when that peer goes (DELETE, the page
closing, ICE failing) the session is closed and its other viewers end with it. A feed
whose session ends closes its peers. Nothing blocks the event loop: encoding runs in
aiortc's executor threads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import aioice.ice
from aiohttp import web
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)

from avatard.ipc.async_client import AsyncClient
from avatard.ipc.client_core import BusyError, ClientError

from .auth import AuthError, authorize
from .feed import LiveFeed
from .microphone import Microphone

log = logging.getLogger("avatard.web")

MAX_SDP_BYTES = 64 * 1024  # a browser offer is 3-10 kB; anything far larger is not SDP
MAX_TEXT_CHARS = 10_000  # per live_text request from the page
MAX_JSON_BYTES = 64 * 1024 + 4096  # an offer as JSON: the SDP plus a few fields
MAX_PORTRAIT_BYTES = 10 * 1024 * 1024  # a portrait photo; the daemon has its own limit too
ICE_GATHER_TIMEOUT_S = 15.0  # host candidates are instant; STUN/TURN may take seconds
CODECS = {"vp8": "video/VP8", "h264": "video/H264"}


@dataclass(frozen=True)
class GatewayOptions:
    """Settings of one gateway, validated by `avatard web` before it starts.

    `host`, `port`: where HTTP listens. `endpoint`: the daemon's (None: the default local
    one). `codec`: "vp8" or "h264". `token`: the shared secret (None: no auth; only
    allowed on loopback). `max_sessions`: live sessions this gateway holds open at once;
    `max_viewers`: peer connections at once; `max_viewers_per_client`: peer connections
    per client address. `ice_servers`: STUN/TURN servers for the peers (also given to the
    page). `loopback_media`: offer only 127.0.0.1 as ICE host candidate (a browser on the
    same host; tests). `prebuffer_ms`: the sessions' jitter buffer for microphone audio
    (`live_open` option). `daemon_timeout_s`: bound of every wait on the daemon.
    `shared_encode`: encode each session's video once for all its viewers (fixed bitrate,
    a keyframe every 2 s and when a viewer joins) instead of once per viewer. `nvenc`:
    that shared encode is H264 on the NVIDIA GPU (`feed.SHARED_CODECS["h264_nvenc"]`;
    needs `codec` "h264" and `shared_encode`).
    `curve_server_key_file`, `curve_client_key_file`: CURVE keys for a daemon's tcp://
    endpoint on another host (as for `AsyncClient`). `connect_timeout_s`: a peer whose
    connection is not "connected" this long after its answer is closed (and the session
    it opened), so that a player that never connects holds no session."""

    host: str = "127.0.0.1"
    port: int = 8080
    endpoint: str | None = None
    codec: str = "vp8"
    token: str | None = None
    max_sessions: int = 8
    max_viewers: int = 32
    max_viewers_per_client: int = 4
    ice_servers: tuple[RTCIceServer, ...] = ()
    loopback_media: bool = False
    prebuffer_ms: int = 100
    daemon_timeout_s: float = 10.0
    shared_encode: bool = False
    nvenc: bool = False
    curve_server_key_file: str | None = None
    curve_client_key_file: str | None = None
    connect_timeout_s: float = 30.0


class HttpError(web.HTTPException):
    """An error reply with a JSON body {"error", "field", "message"}: what was wrong and
    which field or limit, so a client can act on it."""

    def __init__(self, status: int, code: str, field_name: str, message: str) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": code, "field": field_name, "message": message}),
            content_type="application/json",
        )


@dataclass
class Peer:
    """One browser or WHEP player: its peer connection, the feed it watches, whether it
    owns (opened) that feed's session, its client address, and its microphone."""

    viewer_id: str
    pc: RTCPeerConnection
    feed: LiveFeed
    owner: bool
    client: str
    microphone: Microphone | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    watchdog: asyncio.Task | None = None  # the connect deadline
    closed: bool = False


class Gateway:
    """The gateway's state and request handlers (see the module docstring). Build it with
    `GatewayOptions`, get the aiohttp application from `app()`, then run it."""

    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        self.feeds: dict[str, LiveFeed] = {}  # session (job) id -> feed
        self.pumps: dict[str, asyncio.Task] = {}  # session id -> its pump task
        self.peers: dict[str, Peer] = {}  # viewer id -> peer
        self.started_at = time.monotonic()
        self._client: AsyncClient | None = None
        self._client_lock = asyncio.Lock()
        # Slots taken by offers still being answered (checked and taken before their
        # first await, so that concurrent offers cannot pass a limit together).
        self._pending_sessions = 0
        self._pending_viewers: dict[str, int] = {}  # client address -> offers in progress
        if options.loopback_media:
            # aioice gathers host candidates from every interface but leaves 127.0.0.1 out;
            # a gateway for a browser on the same host (and its tests) must offer exactly
            # loopback, so that no media leaves the machine. aioice has no option for it.
            aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]

    # ------------------------------------------------------------ application

    def app(self) -> web.Application:
        """The aiohttp application with every route and the auth middleware."""
        app = web.Application(
            client_max_size=MAX_PORTRAIT_BYTES, middlewares=[self._errors_and_auth]
        )
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/api/config", self.config)
        app.router.add_get("/api/status", self.status)
        app.router.add_post("/api/offer", self.offer)
        app.router.add_post("/api/avatars", self.register_avatar)
        app.router.add_post("/api/sessions/{session}/text", self.text)
        app.router.add_post("/api/sessions/{session}/talk", self.talk)
        app.router.add_post("/api/sessions/{session}/interrupt", self.interrupt)
        app.router.add_post("/api/sessions/{session}/close", self.close_session)
        app.router.add_get("/api/sessions/{session}/stats", self.session_stats)
        app.router.add_post("/whep", self.whep_new)
        app.router.add_post("/whep/{session}", self.whep_watch)
        app.router.add_delete("/whep/resources/{viewer}", self.whep_delete)
        app.router.add_patch("/whep/resources/{viewer}", self.whep_patch)
        app.router.add_options("/whep", self.whep_options)
        app.router.add_options("/whep/{tail:.*}", self.whep_options)
        app.on_shutdown.append(self._on_shutdown)
        app.on_response_prepare.append(_whep_cors)
        return app

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler):
        path = request.path
        if (
            self.options.token
            and (path.startswith("/api/") or path.startswith("/whep"))
            and request.method != "OPTIONS"
        ):
            try:
                authorize(self.options.token, request.headers, request.query)
            except AuthError as exc:
                raise HttpError(401, "unauthorized", "Authorization", str(exc)) from None
        try:
            return await handler(request)
        except HttpError:
            raise
        except web.HTTPException as exc:
            if exc.status in (404, 405):  # aiohttp's router: JSON as every other error
                what = "path" if exc.status == 404 else "method"
                raise HttpError(
                    exc.status,
                    "not_found" if exc.status == 404 else "method_not_allowed",
                    what,
                    f"{what}: no {request.method} {path} here ({exc.reason})",
                ) from None
            raise
        except BusyError as exc:
            raise HttpError(503, "daemon_busy", "daemon", str(exc)) from None
        except ClientError as exc:
            # The daemon refused or is gone: a clear error, and the gateway serves on.
            status = (
                400 if exc.code in ("bad_input", "bad_message", "not_found", "too_large") else 502
            )
            raise HttpError(
                status, exc.code or "daemon_error", exc.field or "daemon", str(exc)
            ) from None
        except Exception as exc:
            # A bug, not bad input: logged with its traceback; the client gets JSON, not
            # aiohttp's bare 500 page, and the gateway serves on.
            log.exception("%s %s failed", request.method, path)
            raise HttpError(
                500,
                "internal_error",
                "server",
                f"the gateway failed on this request ({type(exc).__name__}); its log has "
                "the details",
            ) from None

    async def _on_shutdown(self, _app: web.Application) -> None:
        await self.close_all("the gateway is stopping")

    async def close_all(self, reason: str) -> None:
        """Close every peer, session and the daemon client."""
        for peer in list(self.peers.values()):
            await self._close_peer(peer, reason)
        for session_id in list(self.feeds):
            await self._close_feed(session_id, reason)
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ------------------------------------------------------------ static and info

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=_static_bytes("index.html"), content_type="text/html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        suffix = Path(name).suffix
        if suffix not in types or "/" in name or name.startswith("."):
            raise HttpError(404, "not_found", "path", f"no static file {name!r}")
        try:
            body = _static_bytes(name)
        except FileNotFoundError:
            raise HttpError(404, "not_found", "path", f"no static file {name!r}") from None
        return web.Response(body=body, content_type=types[suffix])

    async def config(self, request: web.Request) -> web.Response:
        """What the page needs: the video codec and the ICE servers to use."""
        servers = [
            {
                "urls": s.urls,
                **({"username": s.username, "credential": s.credential} if s.username else {}),
            }
            for s in self.options.ice_servers
        ]
        return web.json_response({"codec": self.options.codec, "ice_servers": servers})

    async def status(self, request: web.Request) -> web.Response:
        """Sessions and viewers now, with the limits."""
        return web.json_response(
            {
                "sessions": len(self.feeds),
                "viewers": len(self.peers),
                "max_sessions": self.options.max_sessions,
                "max_viewers": self.options.max_viewers,
                "max_viewers_per_client": self.options.max_viewers_per_client,
                "uptime_s": round(time.monotonic() - self.started_at, 1),
                "session_ids": sorted(self.feeds),
            }
        )

    # ------------------------------------------------------------ SDP exchange

    async def offer(self, request: web.Request) -> web.Response:
        """The page's offer (JSON {sdp, type: "offer", avatar_id?, session_id?}) -> the
        answer (JSON {sdp, type: "answer", session_id, viewer_id}). With `session_id` the
        peer watches that running session instead of opening one."""
        body = await _read_json(request)
        sdp = body.get("sdp")
        if not isinstance(sdp, str) or not sdp:
            raise HttpError(400, "bad_request", "sdp", "sdp: a non-empty string is required")
        if body.get("type", "offer") != "offer":
            raise HttpError(400, "bad_request", "type", 'type: must be "offer"')
        avatar_id = body.get("avatar_id") or ""
        session_id = body.get("session_id") or None
        for name, value in (("avatar_id", avatar_id), ("session_id", session_id or "")):
            if not isinstance(value, str) or len(value) > 256:
                raise HttpError(400, "bad_request", name, f"{name}: a string of <= 256 chars")
        peer, answer = await self._connect(
            sdp, _client_of(request), session_id, avatar_id, accept_microphone=session_id is None
        )
        return web.json_response(
            {
                "sdp": answer,
                "type": "answer",
                "session_id": peer.feed.session.job_id,
                "viewer_id": peer.viewer_id,
            }
        )

    async def whep_new(self, request: web.Request) -> web.Response:
        """WHEP: a new live session (the avatar idles until speech is sent to it through
        /api/sessions/{id}/...); the `avatar` query parameter picks the portrait."""
        sdp = await _read_sdp(request)
        avatar_id = request.query.get("avatar", "")
        peer, answer = await self._connect(
            sdp, _client_of(request), None, avatar_id, accept_microphone=False
        )
        return self._whep_created(peer, answer)

    async def whep_watch(self, request: web.Request) -> web.Response:
        """WHEP: watch the running session `{session}` (another viewer of the same
        frames)."""
        sdp = await _read_sdp(request)
        peer, answer = await self._connect(
            sdp, _client_of(request), request.match_info["session"], "", accept_microphone=False
        )
        return self._whep_created(peer, answer)

    def _whep_created(self, peer: Peer, answer: str) -> web.Response:
        location = f"/whep/resources/{peer.viewer_id}"
        return web.Response(
            status=201,
            body=answer.encode(),  # bytes: no charset parameter, as WHEP players expect
            content_type="application/sdp",
            headers={"Location": location, "X-Avatard-Session": peer.feed.session.job_id},
        )

    async def whep_delete(self, request: web.Request) -> web.Response:
        peer = self._peer(request.match_info["viewer"])
        await self._close_peer(peer, "the WHEP player sent DELETE")
        return web.Response(status=200)

    async def whep_patch(self, request: web.Request) -> web.Response:
        # The answer carries every candidate (aiortc gathers before answering), so trickle
        # ICE and ICE restarts are not needed; WHEP lets a server refuse them with 405.
        self._peer(request.match_info["viewer"])
        raise HttpError(
            405,
            "not_supported",
            "method",
            "PATCH: trickle ICE and ICE restarts are not supported; the answer "
            "holds every candidate",
        )

    async def whep_options(self, request: web.Request) -> web.Response:
        return web.Response(
            status=204,
            headers={"Allow": "OPTIONS, POST, DELETE, PATCH", "Accept-Post": "application/sdp"},
        )

    async def _connect(
        self, sdp: str, client: str, session_id: str | None, avatar_id: str, accept_microphone: bool
    ) -> tuple[Peer, str]:
        """A peer connection answering `sdp`, watching session `session_id` or a new one
        on `avatar_id`; returns the peer and the answer SDP. Raises `HttpError` for a
        limit, an unknown session or an offer that is not usable SDP."""
        feed = None
        if session_id is not None:
            feed = self.feeds.get(session_id)
            if feed is None:
                raise HttpError(
                    404,
                    "not_found",
                    "session_id",
                    f"session_id: no running session {session_id!r} here",
                )
        self._check_viewer_limits(client)
        if feed is None:
            sessions = len(self.feeds) + self._pending_sessions
            if sessions >= self.options.max_sessions:
                raise HttpError(
                    429,
                    "too_many_sessions",
                    "max_sessions",
                    f"this gateway holds {sessions} live sessions, its limit "
                    f"(--max-sessions {self.options.max_sessions}); try later",
                )
        # Reserve the slots now, before the first await; given back when this offer is
        # answered (then the peer and its feed count) or refused.
        reservation = _Reservation(self, client, session=feed is None)
        try:
            return await self._answer(sdp, reservation, feed, avatar_id, accept_microphone)
        finally:
            reservation.release(session=True, viewer=True)

    async def _answer(
        self,
        sdp: str,
        reservation: _Reservation,
        feed: LiveFeed | None,
        avatar_id: str,
        accept_microphone: bool,
    ) -> tuple[Peer, str]:
        """`_connect` once the limits are checked and the slots reserved."""
        client = reservation.client
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.options.ice_servers)))
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except Exception as exc:  # aiortc raises ValueError, KeyError... on bad SDP
                raise HttpError(
                    400,
                    "bad_sdp",
                    "sdp",
                    f"sdp: not a usable WebRTC offer ({type(exc).__name__}: {exc})",
                ) from None
            kinds = [t.kind for t in pc.getTransceivers()]
            if "video" not in kinds:
                raise HttpError(
                    400,
                    "bad_sdp",
                    "sdp",
                    "sdp: the offer has no video m-line (add a recvonly video transceiver)",
                )
            if feed is None:
                feed = await self._open_feed(avatar_id)
                reservation.release(session=True)  # it counts in self.feeds now
                owner = True
            else:
                owner = False
            viewer_id = secrets.token_urlsafe(12)
            viewer = feed.add_viewer(viewer_id)
            peer = Peer(viewer_id, pc, feed, owner, client)
            self.peers[viewer_id] = peer
            reservation.release(viewer=True)  # it counts in self.peers now
            self._attach(peer, viewer, accept_microphone, "audio" in kinds)
            answer = await pc.createAnswer()
            await asyncio.wait_for(pc.setLocalDescription(answer), ICE_GATHER_TIMEOUT_S)
            if owner:
                await self._wait_started(feed)
        except BaseException as exc:
            peer_now = next((p for p in self.peers.values() if p.pc is pc), None)
            if peer_now is not None:
                await self._close_peer(peer_now, "its offer could not be answered")
            else:
                await pc_close(pc)
            if isinstance(exc, TimeoutError):
                raise HttpError(
                    504,
                    "ice_timeout",
                    "ice_servers",
                    f"gathering ICE candidates took over "
                    f"{ICE_GATHER_TIMEOUT_S:.0f} s (a STUN or TURN server does "
                    "not answer?)",
                ) from None
            raise
        log.info(
            "viewer %s (%s) %s session %s",
            viewer_id,
            client,
            "opened" if owner else "watches",
            feed.session.job_id,
        )
        peer.watchdog = asyncio.create_task(
            self._connect_deadline(peer), name=f"connect deadline of {viewer_id}"
        )
        return peer, pc.localDescription.sdp

    async def _wait_started(self, feed: LiveFeed) -> None:
        """Wait (up to the daemon timeout) for the new session's first frame. Raises
        `HttpError` 503 when the daemon holds it queued (every worker busy), 502 when the
        session ended before its first frame."""
        started = asyncio.ensure_future(feed.started.wait())
        ended = asyncio.ensure_future(feed.ended.wait())
        try:
            await asyncio.wait(
                {started, ended},
                timeout=self.options.daemon_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            started.cancel()
            ended.cancel()
        if feed.started.is_set():
            return
        if feed.ended.is_set() and not feed.timed_out:
            raise HttpError(
                502, "daemon_error", "daemon", f"the session ended before its first frame: "
                f"{feed.end_reason}"
            )
        raise HttpError(
            503,
            "daemon_busy",
            "daemon",
            f"the daemon did not start the session within {self.options.daemon_timeout_s:g} "
            "s (its workers are busy); try later",
        )

    async def _connect_deadline(self, peer: Peer) -> None:
        """Close `peer` (and the session it opened) unless its connection is up within
        `connect_timeout_s` of its answer: a player that took the answer and never
        connected (no ICE, no DELETE) must not hold a session and a worker."""
        await asyncio.sleep(self.options.connect_timeout_s)
        if not peer.closed and peer.pc.connectionState != "connected":
            await self._close_peer(
                peer,
                f"it did not connect within {self.options.connect_timeout_s:g} s "
                f"(connection {peer.pc.connectionState})",
            )

    def _attach(self, peer: Peer, viewer, accept_microphone: bool, has_audio: bool) -> None:
        pc = peer.pc
        pc.addTrack(viewer.video)
        if has_audio:
            pc.addTrack(viewer.audio)
        preferred = CODECS[self.options.codec]
        codecs = [
            c
            for c in RTCRtpSender.getCapabilities("video").codecs
            if c.mimeType in (preferred, "video/rtx")
        ]
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.setCodecPreferences(codecs)

        if accept_microphone:
            # The page's audio transceiver is sendrecv from the start (the microphone is put
            # on it later without renegotiating); aiortc made its receiving track when the
            # offer was set, before this peer existed, so it is taken from the receiver.
            track = next(
                (r.track for r in pc.getReceivers() if r.track and r.track.kind == "audio"), None
            )
            if track is not None:
                peer.microphone = Microphone(track, peer.feed.session, peer.feed.mark_input)
                peer.tasks.append(
                    asyncio.create_task(
                        peer.microphone.run(), name=f"microphone of {peer.viewer_id}"
                    )
                )

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and not peer.closed:
                await self._close_peer(peer, f"its connection is {pc.connectionState}")

    def _shared_codec(self) -> str | None:
        """The `feed.SHARED_CODECS` key of a new session's shared encoder, or None when
        each viewer's sender encodes (aiortc's own encoders)."""
        if not self.options.shared_encode:
            return None
        if self.options.nvenc:
            if self.options.codec != "h264":
                raise ValueError(f"nvenc encodes H264, not {self.options.codec}")
            return "h264_nvenc"
        return self.options.codec

    async def _open_feed(self, avatar_id: str) -> LiveFeed:
        client = await self._daemon()
        opened_at = time.monotonic()
        session = await client.live(avatar=avatar_id, prebuffer_ms=self.options.prebuffer_ms)
        feed = LiveFeed(
            session, opened_at, self._shared_codec()
        )
        session_id = session.job_id
        self.feeds[session_id] = feed
        task = asyncio.create_task(feed.run(), name=f"pump of {session_id}")
        self.pumps[session_id] = task
        task.add_done_callback(lambda _t: asyncio.ensure_future(self._feed_ended(session_id)))
        return feed

    async def _feed_ended(self, session_id: str) -> None:
        feed = self.feeds.get(session_id)
        if feed is None:
            return
        for peer in [p for p in self.peers.values() if p.feed is feed]:
            await self._close_peer(peer, feed.end_reason or "its session ended")
        await self._close_feed(session_id, feed.end_reason)

    async def _daemon(self) -> AsyncClient:
        """The daemon client, connected (again, after the daemon restarted)."""
        async with self._client_lock:
            if self._client is None or not self._client.is_open:
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                client = AsyncClient(
                    self.options.endpoint,
                    timeout_s=self.options.daemon_timeout_s,
                    name="avatard-web",
                    curve_server_key_file=self.options.curve_server_key_file,
                    curve_client_key_file=self.options.curve_client_key_file,
                )
                await client.connect()
                self._client = client
            return self._client

    def _check_viewer_limits(self, client: str) -> None:
        viewers = len(self.peers) + sum(self._pending_viewers.values())
        if viewers >= self.options.max_viewers:
            raise HttpError(
                429,
                "too_many_viewers",
                "max_viewers",
                f"this gateway serves {viewers} viewers, its limit "
                f"(--max-viewers {self.options.max_viewers}); try later",
            )
        mine = sum(1 for p in self.peers.values() if p.client == client)
        mine += self._pending_viewers.get(client, 0)
        if mine >= self.options.max_viewers_per_client:
            raise HttpError(
                429,
                "too_many_viewers",
                "max_viewers_per_client",
                f"client {client} has {mine} connections, the limit per client "
                f"(--max-viewers-per-client "
                f"{self.options.max_viewers_per_client}); close one first",
            )

    async def _close_peer(self, peer: Peer, reason: str) -> None:
        if peer.closed:
            return
        peer.closed = True
        self.peers.pop(peer.viewer_id, None)
        log.info(
            "viewer %s leaves session %s: %s", peer.viewer_id, peer.feed.session.job_id, reason
        )
        for task in [*peer.tasks, peer.watchdog]:
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        peer.feed.remove_viewer(peer.viewer_id, reason)
        await pc_close(peer.pc)
        if peer.owner:
            await self._close_feed(
                peer.feed.session.job_id, f"the viewer that opened it left ({reason})"
            )

    async def _close_feed(self, session_id: str, reason: str) -> None:
        feed = self.feeds.pop(session_id, None)
        task = self.pumps.pop(session_id, None)
        if feed is None:
            return
        log.info("closing session %s: %s", session_id, reason)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=self.options.daemon_timeout_s)
        try:
            # live_close; its `done` is not waited for. A session still queued (never
            # started) ends at once in the daemon too.
            await feed.session.aclose()
        except Exception as exc:  # the daemon is gone: the session went with it
            log.warning("closing session %s: %s", session_id, exc)
        for peer in [p for p in self.peers.values() if p.feed is feed]:
            await self._close_peer(peer, reason)

    # ------------------------------------------------------------ session controls

    def _owned_feed(self, request: web.Request) -> LiveFeed:
        session_id = request.match_info["session"]
        feed = self.feeds.get(session_id)
        if feed is None:
            raise HttpError(
                404,
                "not_found",
                "session",
                f"session: no running session {session_id!r} here (it ended, "
                "or was never opened by this gateway)",
            )
        return feed

    def _peer(self, viewer_id: str) -> Peer:
        peer = self.peers.get(viewer_id)
        if peer is None:
            raise HttpError(
                404,
                "not_found",
                "viewer",
                f"viewer: no connection {viewer_id!r} here (it ended already?)",
            )
        return peer

    async def text(self, request: web.Request) -> web.Response:
        """JSON {text, final?, segment_id?}: text streamed to the session as `live_text`
        (default segment: one per `final`-ended reply, named by the gateway)."""
        feed = self._owned_feed(request)
        body = await _read_json(request)
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise HttpError(400, "bad_request", "text", "text: a non-empty string is required")
        if len(text) > MAX_TEXT_CHARS:
            raise HttpError(
                413,
                "too_large",
                "text",
                f"text: {len(text)} characters, the limit is {MAX_TEXT_CHARS} per request",
            )
        final = body.get("final", True)
        if not isinstance(final, bool):
            raise HttpError(400, "bad_request", "final", "final: true or false")
        segment_id = body.get("segment_id")
        if segment_id is None:
            segment_id = feed.new_segment_id("text")
        elif not isinstance(segment_id, str) or not 1 <= len(segment_id) <= 256:
            raise HttpError(
                400, "bad_request", "segment_id", "segment_id: a string of 1..256 chars"
            )
        feed.mark_input(segment_id)
        await feed.session.send_text(text, segment_id, final=final)
        return web.json_response({"segment_id": segment_id})

    async def talk(self, request: web.Request) -> web.Response:
        """JSON {on: bool}: the page's microphone is the session's speech while on."""
        feed = self._owned_feed(request)
        body = await _read_json(request)
        on = body.get("on")
        if not isinstance(on, bool):
            raise HttpError(400, "bad_request", "on", "on: true or false")
        peer = next((p for p in self.peers.values() if p.feed is feed and p.owner), None)
        if peer is None or peer.microphone is None:
            raise HttpError(
                409,
                "no_microphone",
                "on",
                "on: this session's page sent no audio track (allow the "
                "microphone and connect again)",
            )
        segment = await peer.microphone.start_talking() if on else ""
        if not on:
            await peer.microphone.stop_talking()
        return web.json_response({"talking": on, "segment_id": segment})

    async def interrupt(self, request: web.Request) -> web.Response:
        """Barge-in: the session drops its queued speech and goes idle."""
        feed = self._owned_feed(request)
        for peer in self.peers.values():
            if peer.feed is feed and peer.microphone is not None and peer.microphone.segment_id:
                peer.microphone.segment_id = ""  # talking stops with the barge-in
        await feed.session.interrupt()
        return web.json_response({"interrupted": True})

    async def close_session(self, request: web.Request) -> web.Response:
        feed = self._owned_feed(request)
        await self._close_feed(feed.session.job_id, "the page asked to close it")
        return web.json_response({"closed": True})

    async def session_stats(self, request: web.Request) -> web.Response:
        """The gateway's view of a session: frames from the daemon, frames it skipped,
        frames each viewer's queue dropped, speech-to-frame latencies (ms)."""
        feed = self._owned_feed(request)
        stats = feed.stats
        return web.json_response(
            {
                "session_id": feed.session.job_id,
                "fps": feed.fps,
                "width": feed.session.width,
                "height": feed.session.height,
                "frames": stats.frames,
                "frames_missing": stats.frames_missing,
                "shared_encoder_dropped": None if feed.encoder is None else feed.encoder.dropped,
                "inputs_refused": stats.inputs_refused,
                "last_refusal": stats.last_refusal,
                "playing": stats.playing,
                "first_frame_ms": None
                if stats.first_frame_s is None
                else round(stats.first_frame_s * 1000, 1),
                "speech_to_frame_ms": [round(v, 1) for v in stats.speech_to_frame_ms],
                "viewers": {
                    v.viewer_id: {
                        "video_sent": v.video.sent,
                        "video_dropped": v.video.dropped,
                        "audio_dropped": v.audio.dropped,
                    }
                    for v in feed.viewers.values()
                },
            }
        )

    async def register_avatar(self, request: web.Request) -> web.Response:
        """The request body is a portrait image (JPEG/PNG bytes); returns {avatar_id}
        for the next session's offer."""
        body = await _read_body(request, MAX_PORTRAIT_BYTES, "image")
        if not body:
            raise HttpError(
                400, "bad_request", "image", "image: the body is empty; send the portrait's bytes"
            )
        client = await self._daemon()
        avatar_id = await client.register_avatar(body)
        return web.json_response({"avatar_id": avatar_id})


class _Reservation:
    """The slots one offer took before its first await (a session and a viewer of
    `client`), given back each once: when the feed or peer counts itself, or at the end."""

    def __init__(self, gateway: Gateway, client: str, session: bool) -> None:
        self.gateway = gateway
        self.client = client
        self.session = session
        self.viewer = True
        gateway._pending_sessions += session
        pending = gateway._pending_viewers
        pending[client] = pending.get(client, 0) + 1

    def release(self, session: bool = False, viewer: bool = False) -> None:
        """Give back the session slot and/or the viewer slot, if still held."""
        if session and self.session:
            self.session = False
            self.gateway._pending_sessions -= 1
        if viewer and self.viewer:
            self.viewer = False
            pending = self.gateway._pending_viewers
            pending[self.client] -= 1
            if not pending[self.client]:
                del pending[self.client]


async def pc_close(pc: RTCPeerConnection) -> None:
    """Close a peer connection, bounded: aiortc's close waits for its transports."""
    try:
        await asyncio.wait_for(pc.close(), 5.0)
    except TimeoutError:
        log.warning("closing a peer connection took over 5 s; left to aiortc")


async def _whep_cors(request: web.Request, response: web.StreamResponse) -> None:
    """WHEP players are often web pages on another origin: allow them (credentials are a
    bearer header, never cookies, so any origin may ask) and let them read Location."""
    if request.path.startswith("/whep"):
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Allow-Methods"] = "OPTIONS, POST, DELETE, PATCH"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Expose-Headers"] = "Location, X-Avatard-Session"


def _static_bytes(name: str) -> bytes:
    return resources.files("avatard.web").joinpath("static", name).read_bytes()


def _client_of(request: web.Request) -> str:
    """The client's address, the key of the per-client limit."""
    remote = request.remote or "unknown"
    try:
        return str(ipaddress.ip_address(remote))
    except ValueError:
        return remote


async def _read_body(request: web.Request, limit: int, field_name: str) -> bytes:
    """The body, at most `limit` bytes (else 413 naming `field_name` and the limit)."""
    too_large = HttpError(
        413,
        "too_large",
        field_name,
        f"{field_name}: the body is larger than the limit of {limit} bytes",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    # `content.read(n)` returns what is buffered now, not n bytes: read to the end (a
    # chunked body has no Content-Length, so the limit is checked as it arrives).
    body = bytearray()
    while True:
        chunk = await request.content.read(limit + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise too_large


async def _read_json(request: web.Request) -> dict:
    body = await _read_body(request, MAX_JSON_BYTES, "body")
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, "bad_request", "body", f"body: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise HttpError(400, "bad_request", "body", "body: a JSON object is required")
    return value


async def _read_sdp(request: web.Request) -> str:
    if request.content_type != "application/sdp":
        raise HttpError(
            415,
            "unsupported_media_type",
            "Content-Type",
            f"Content-Type: WHEP offers are application/sdp, not {request.content_type!r}",
        )
    body = await _read_body(request, MAX_SDP_BYTES, "sdp")
    try:
        sdp = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "bad_sdp", "sdp", "sdp: not UTF-8 text") from None
    if not sdp.strip():
        raise HttpError(400, "bad_sdp", "sdp", "sdp: the body is empty")
    return sdp


def run_gateway(options: GatewayOptions) -> None:
    """Serve until SIGINT or SIGTERM (aiohttp's runner handles both), then close every
    peer and session."""
    gateway = Gateway(options)
    web.run_app(
        gateway.app(),
        host=options.host,
        port=options.port,
        print=None,
        handle_signals=True,
        shutdown_timeout=5.0,
    )
