"""The WebRTC gateway (`avatard.web`) over HTTP, against a real daemon with the fake engines
and a real aiortc peer as the player: WHEP (201 + Location, frames and Opus arrive, DELETE
ends it), every kind of bad request answered with a clear HTTP error while the gateway
keeps serving, the token (bearer and signed URL), the session limits, and a non-loopback
`--listen` without a token refused at start. No browser here (tests/test_web_browser.py).

No timing assertions: status codes, fields named, counts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import zmq.auth
from daemon_harness import free_port, run_daemon

pytest.importorskip("aiortc")
pytest.importorskip("aiohttp")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

from avatard.web.auth import sign, signed_query  # noqa: E402
from avatard.web.gateway import Gateway, GatewayOptions  # noqa: E402

SIZE = 64
TOKEN = "0123456789abcdef0123"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with run_daemon(
        tmp_path_factory.mktemp("web-gw"),
        fake={"width": SIZE, "height": SIZE},
        daemon={"jobs_per_worker": 4},
    ) as d:
        yield d


async def _offer(audio: bool = True) -> tuple[RTCPeerConnection, str]:
    """An aiortc peer that wants to receive video (and audio), and its offer SDP."""
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    if audio:
        pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def _with_gateway(daemon, coro, **options):
    """Run `coro(client, gateway)` against a gateway on the test daemon."""

    async def main():
        gateway = Gateway(GatewayOptions(endpoint=daemon.endpoint, loopback_media=True, **options))
        async with TestClient(TestServer(gateway.app())) as client:
            try:
                return await coro(client, gateway)
            finally:
                await gateway.close_all("the test ended")

    return asyncio.run(main())


async def _error(reply, status: int, field: str) -> str:
    assert reply.status == status, await reply.text()
    body = await reply.json()
    assert body["field"] == field, body
    return body["message"]


def test_whep_player_receives_frames_and_opus_and_delete_ends_the_session(daemon):
    async def scenario(client, gateway):
        pc, sdp = await _offer()
        frames, audio = [], []

        @pc.on("track")
        def on_track(track):
            async def read():
                while True:
                    frame = await track.recv()
                    (frames if track.kind == "video" else audio).append(frame)

            asyncio.ensure_future(read())

        reply = await client.post("/whep", data=sdp, headers={"Content-Type": "application/sdp"})
        assert reply.status == 201, await reply.text()
        assert reply.content_type == "application/sdp"
        location = reply.headers["Location"]
        # A WHEP player on another origin may read the Location.
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert "Location" in reply.headers["Access-Control-Expose-Headers"]
        preflight = await client.options("/whep")
        assert preflight.status == 204 and preflight.headers["Accept-Post"] == "application/sdp"
        session_id = reply.headers["X-Avatard-Session"]
        await pc.setRemoteDescription(RTCSessionDescription(await reply.text(), "answer"))
        deadline = time.monotonic() + 60
        while (len(frames) < 10 or len(audio) < 10) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(frames) >= 10 and len(audio) >= 10, (len(frames), len(audio))
        assert (frames[-1].width, frames[-1].height) == (SIZE, SIZE)
        # A second player watches the same session: the same media, one more viewer.
        pc2, sdp2 = await _offer(audio=False)
        reply2 = await client.post(
            f"/whep/{session_id}", data=sdp2, headers={"Content-Type": "application/sdp"}
        )
        assert reply2.status == 201, await reply2.text()
        status = await (await client.get("/api/status")).json()
        assert (status["sessions"], status["viewers"]) == (1, 2)
        # Trickle ICE is refused as WHEP allows; the resource still exists.
        patch = await client.patch(
            location,
            data="a=candidate:x",
            headers={"Content-Type": "application/trickle-ice-sdpfrag"},
        )
        await _error(patch, 405, "method")
        # The owner's DELETE ends the session, and the watcher with it.
        assert (await client.delete(location)).status == 200
        status = await (await client.get("/api/status")).json()
        assert (status["sessions"], status["viewers"]) == (0, 0)
        await _error(await client.delete(location), 404, "viewer")
        await pc.close()
        await pc2.close()

    _with_gateway(daemon, scenario)


# VP8 only: aiortc as the player decodes no frame of the shared H264 stream (Chromium
# does: tests/test_web_browser.py runs H264 with --shared-encode); not understood yet.
def test_a_shared_encode_serves_viewers_that_join_later_from_a_keyframe(daemon):
    async def scenario(client, gateway):
        players = []

        async def join(url: str) -> list:
            pc, sdp = await _offer(audio=False)
            frames: list = []

            @pc.on("track")
            def on_track(track):
                async def read():
                    while True:
                        frames.append(await track.recv())

                asyncio.ensure_future(read())

            reply = await client.post(url, data=sdp, headers={"Content-Type": "application/sdp"})
            assert reply.status == 201, await reply.text()
            await pc.setRemoteDescription(RTCSessionDescription(await reply.text(), "answer"))
            players.append((pc, reply.headers["X-Avatard-Session"]))
            return frames

        async def until(frames: list, count: int) -> None:
            deadline = time.monotonic() + 60
            while len(frames) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert len(frames) >= count, len(frames)

        first = await join("/whep")
        await until(first, 30)  # past the first keyframe: the next one comes at a join
        second = await join(f"/whep/{players[0][1]}")
        await until(second, 10)
        # aiortc decoded what it got: the shared packets are a valid stream for both, and
        # the late viewer started at a keyframe (a decoder cannot start on a delta frame).
        assert (second[-1].width, second[-1].height) == (SIZE, SIZE)
        stats = await (await client.get(f"/api/sessions/{players[0][1]}/stats")).json()
        assert stats["shared_encoder_dropped"] is not None
        for pc, _ in players:
            await pc.close()

    _with_gateway(daemon, scenario, shared_encode=True)


def test_a_daemon_on_another_host_over_curve_tcp(tmp_path):
    # The gateway as a remote client: tcp:// with CURVE keys, frames inline (no shared
    # memory), the same tracks.
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(keys), "client")
    (allowed / "client.key").write_bytes(open(client_public, "rb").read())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon_config = {
        "tcp_endpoint": endpoint,
        "curve_secret_key_file": server_secret,
        "curve_clients_dir": str(allowed),
    }
    with run_daemon(tmp_path, fake={"width": SIZE, "height": SIZE}, daemon=daemon_config):

        async def scenario(client, gateway):
            pc, sdp = await _offer()
            frames: list = []

            @pc.on("track")
            def on_track(track):
                async def read():
                    while True:
                        frame = await track.recv()
                        if track.kind == "video":
                            frames.append(frame)

                asyncio.ensure_future(read())

            reply = await client.post(
                "/whep", data=sdp, headers={"Content-Type": "application/sdp"}
            )
            assert reply.status == 201, await reply.text()
            await pc.setRemoteDescription(RTCSessionDescription(await reply.text(), "answer"))
            deadline = time.monotonic() + 60
            while len(frames) < 10 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert len(frames) >= 10
            assert (frames[-1].width, frames[-1].height) == (SIZE, SIZE)
            await pc.close()

        _with_gateway(
            _Remote(endpoint),
            scenario,
            curve_server_key_file=server_public,
            curve_client_key_file=client_secret,
        )


def test_the_gateway_serves_on_while_the_daemon_is_away_and_after_it_restarts(tmp_path):
    fake = {"width": SIZE, "height": SIZE}

    async def scenario():
        gateway = None
        pcs = []
        try:
            with run_daemon(tmp_path, fake=fake) as d:
                gateway = Gateway(GatewayOptions(endpoint=d.endpoint, loopback_media=True))
                client = TestClient(TestServer(gateway.app()))
                await client.start_server()
                pc, sdp = await _offer()
                pcs.append(pc)
                assert (await client.post("/api/offer", json={"sdp": sdp})).status == 200
            # The daemon stopped: its session ended, and so did the peer watching it.
            deadline = time.monotonic() + 30
            while gateway.peers and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not gateway.peers and not gateway.feeds
            pc, sdp = await _offer()
            pcs.append(pc)
            message = await _error(
                await client.post("/api/offer", json={"sdp": sdp}), 502, "daemon"
            )
            assert "daemon" in message
            assert (await client.get("/api/status")).status == 200
            # A new daemon at the same endpoint: the gateway connects again by itself.
            with run_daemon(tmp_path, fake=fake):
                pc, sdp = await _offer()
                pcs.append(pc)
                reply = await client.post("/api/offer", json={"sdp": sdp})
                assert reply.status == 200, await reply.text()
                await gateway.close_all("the test ended")
        finally:
            for pc in pcs:
                await pc.close()
            if gateway is not None:
                await gateway.close_all("the test ended")
                await client.close()

    asyncio.run(scenario())


class _Remote:
    """What `_with_gateway` needs of a daemon: its endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint


def test_bad_requests_get_clear_errors_and_the_gateway_keeps_serving(daemon):
    async def scenario(client, gateway):
        sdp_headers = {"Content-Type": "application/sdp"}
        await _error(
            await client.post("/whep", data="v=0\r\nnonsense\r\n", headers=sdp_headers), 400, "sdp"
        )
        await _error(await client.post("/whep", data="", headers=sdp_headers), 400, "sdp")
        await _error(
            await client.post("/whep", data="v=0", headers={"Content-Type": "text/plain"}),
            415,
            "Content-Type",
        )
        message = await _error(
            await client.post("/whep", data="v=0" + " " * 70_000, headers=sdp_headers), 413, "sdp"
        )
        assert "65536" in message
        await _error(await client.post("/api/offer", data="{not json"), 400, "body")
        await _error(await client.post("/api/offer", json={"type": "offer"}), 400, "sdp")
        await _error(
            await client.post("/api/offer", json={"sdp": "v=0", "type": "answer"}), 400, "type"
        )
        pc, sdp = await _offer()
        await _error(
            await client.post("/api/offer", json={"sdp": sdp, "session_id": "j9-none"}),
            404,
            "session_id",
        )
        audio_only = RTCPeerConnection()
        audio_only.addTransceiver("audio", direction="recvonly")
        await audio_only.setLocalDescription(await audio_only.createOffer())
        message = await _error(
            await client.post("/api/offer", json={"sdp": audio_only.localDescription.sdp}),
            400,
            "sdp",
        )
        assert "video" in message
        await _error(
            await client.post("/api/sessions/j9-none/text", json={"text": "Hi."}), 404, "session"
        )
        await _error(await client.post("/api/sessions/j9-none/interrupt"), 404, "session")
        await _error(await client.post("/api/avatars", data=b""), 400, "image")
        # An unknown portrait is the daemon's refusal, passed on with its field.
        await _error(
            await client.post("/api/offer", json={"sdp": sdp, "avatar_id": "nope"}),
            400,
            "avatar_id",
        )
        # After all that the gateway still serves, with nothing left open; a registered
        # portrait is used for the next session (the fake engine takes any bytes).
        registered = await client.post("/api/avatars", data=b"\x89PNG portrait bytes")
        assert registered.status == 200, await registered.text()
        avatar_id = (await registered.json())["avatar_id"]
        reply = await client.post("/api/offer", json={"sdp": sdp, "avatar_id": avatar_id})
        assert reply.status == 200, await reply.text()
        answer = await reply.json()
        session = answer["session_id"]
        await _error(
            await client.post(f"/api/sessions/{session}/text", json={"text": 5}), 400, "text"
        )
        await _error(
            await client.post(f"/api/sessions/{session}/text", json={"text": "x" * 10_001}),
            413,
            "text",
        )
        await _error(
            await client.post(f"/api/sessions/{session}/talk", json={"on": "yes"}), 400, "on"
        )
        ok = await client.post(f"/api/sessions/{session}/text", json={"text": "Hello there."})
        assert ok.status == 200, await ok.text()
        stats = await (await client.get(f"/api/sessions/{session}/stats")).json()
        assert stats["width"] == SIZE and stats["fps"] == 25
        assert (await client.post(f"/api/sessions/{session}/close")).status == 200
        status = await (await client.get("/api/status")).json()
        assert (status["sessions"], status["viewers"]) == (0, 0)
        await pc.close()
        await audio_only.close()

    _with_gateway(daemon, scenario)


def test_limits_on_sessions_and_viewers_per_client(daemon):
    async def scenario(client, gateway):
        pcs = []

        async def post_offer(**fields):
            pc, sdp = await _offer()
            pcs.append(pc)
            return await client.post("/api/offer", json={"sdp": sdp, **fields})

        first = await post_offer()
        assert first.status == 200, await first.text()
        session = (await first.json())["session_id"]
        message = await _error(await post_offer(), 429, "max_sessions")
        assert "--max-sessions 1" in message
        watcher = await post_offer(session_id=session)
        assert watcher.status == 200, await watcher.text()
        message = await _error(await post_offer(session_id=session), 429, "max_viewers_per_client")
        assert "--max-viewers-per-client 2" in message
        status = await (await client.get("/api/status")).json()
        assert (status["sessions"], status["viewers"]) == (1, 2)
        for pc in pcs:
            await pc.close()

    _with_gateway(daemon, scenario, max_sessions=1, max_viewers_per_client=2)


def test_a_token_is_required_by_bearer_or_signed_url(daemon):
    async def scenario(client, gateway):
        assert (await client.get("/")).status == 200  # the page itself holds no secret
        await _error(await client.get("/api/status"), 401, "Authorization")
        await _error(
            await client.get("/api/status", headers={"Authorization": "Bearer wrong"}),
            401,
            "Authorization",
        )
        await _error(
            await client.get("/api/status", headers={"Authorization": f"Basic {TOKEN}"}),
            401,
            "Authorization",
        )
        ok = await client.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status == 200
        assert (await client.get(f"/api/status?{signed_query(TOKEN, 60)}")).status == 200
        expired = int(time.time()) - 5
        message = await _error(
            await client.get(f"/api/status?exp={expired}&sig={sign(TOKEN, expired)}"),
            401,
            "Authorization",
        )
        assert "expired" in message
        later = int(time.time()) + 60
        message = await _error(
            await client.get(f"/api/status?exp={later}&sig={sign('another-token-0000000', later)}"),
            401,
            "Authorization",
        )
        assert "signature" in message
        pc, sdp = await _offer()
        await _error(
            await client.post("/whep", data=sdp, headers={"Content-Type": "application/sdp"}),
            401,
            "Authorization",
        )
        await pc.close()
        assert not gateway.feeds

    _with_gateway(daemon, scenario, token=TOKEN)


def test_a_public_listen_address_without_a_token_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AVATARD_WEB_TOKEN"}
    cmd = [sys.executable, "-m", "avatard.daemon.cli", "web", "--listen", "0.0.0.0:18999"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 78, done.stderr
    assert "token is required" in done.stderr
    short = tmp_path / "short"
    short.write_text("abc")
    done = subprocess.run(
        cmd + ["--token-file", str(short)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 78 and "at least 16" in done.stderr, done.stderr
    good = tmp_path / "token"
    good.write_text(TOKEN + "\n")
    done = subprocess.run(
        [*cmd, "--token-file", str(good), "--sign-url", "60"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("http://0.0.0.0:18999/?exp=") and "&sig=" in done.stdout
