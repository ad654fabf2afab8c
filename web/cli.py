"""`avatard web`: the command that starts the WebRTC gateway. Imports only click at the
top; aiohttp and aiortc load when the command runs (`pip install "avatard[web]"`)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import click

EXIT_CONFIG_ERROR = 78  # EX_CONFIG, as the daemon's config errors
TOKEN_ENV = "AVATARD_WEB_TOKEN"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:8080``) -> (host, port); raises `click.BadParameter`."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(
            f"{value!r}: expected HOST:PORT with a port 1..65535", param_hint="--listen"
        )
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise click.BadParameter(f"{value!r}: the host is missing", param_hint="--listen")
    return host, int(port)


@click.command("web")
@click.option(
    "--listen",
    default="127.0.0.1:8080",
    show_default=True,
    metavar="HOST:PORT",
    help="Where HTTP listens. Any address other than loopback needs a token.",
)
@click.option(
    "--endpoint", help="Daemon endpoint (default: $AVATARD_ENDPOINT or the local socket)."
)
@click.option(
    "--curve-server-key",
    type=click.Path(exists=True, dir_okay=False),
    help="The daemon's CURVE public key file, for a tcp:// --endpoint on another host.",
)
@click.option(
    "--curve-client-key",
    type=click.Path(exists=True, dir_okay=False),
    help="This gateway's CURVE secret key file (its public key in the daemon's "
    "daemon.curve_clients_dir).",
)
@click.option(
    "--codec",
    type=click.Choice(["vp8", "h264"]),
    default="vp8",
    show_default=True,
    help="Video codec of the WebRTC track.",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False),
    help=f"File holding the shared secret (or set ${TOKEN_ENV}); required when "
    "--listen is not loopback.",
)
@click.option(
    "--max-sessions",
    default=8,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Live sessions this gateway opens at once.",
)
@click.option(
    "--max-viewers",
    default=32,
    show_default=True,
    type=click.IntRange(1, 10000),
    help="WebRTC connections at once (pages and WHEP players).",
)
@click.option(
    "--max-viewers-per-client",
    default=4,
    show_default=True,
    type=click.IntRange(1, 10000),
    help="WebRTC connections per client address.",
)
@click.option(
    "--ice-server",
    "ice_servers",
    multiple=True,
    metavar="URL",
    help="STUN or TURN server (stun:host:3478, turn:host:3478?transport=udp), "
    "repeatable; also given to the page.",
)
@click.option("--turn-username", help="Username for the TURN servers.")
@click.option(
    "--turn-credential-file",
    type=click.Path(exists=True, dir_okay=False),
    help="File holding the TURN password.",
)
@click.option(
    "--loopback-media",
    is_flag=True,
    help="Offer only 127.0.0.1 as ICE host candidate: the browser runs on this "
    "host and no media leaves it.",
)
@click.option(
    "--prebuffer-ms",
    default=100,
    show_default=True,
    type=click.IntRange(0, 5000),
    help="Sessions' jitter buffer for microphone audio (live_open prebuffer_ms).",
)
@click.option(
    "--shared-encode",
    is_flag=True,
    help="Encode each session's video once for all its viewers (fixed bitrate, a keyframe "
    "every 2 s and when a viewer joins) instead of once per viewer: less CPU per viewer.",
)
@click.option(
    "--nvenc",
    is_flag=True,
    help="Encode H264 on the NVIDIA GPU (FFmpeg's h264_nvenc through PyAV) instead of the "
    "CPU: needs --codec h264, implies --shared-encode; refused at start when no NVIDIA "
    "encoder opens.",
)
@click.option(
    "--connect-timeout",
    "connect_timeout_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    metavar="SECONDS",
    help="A viewer whose WebRTC connection is not up this long after its answer is "
    "closed, with the session it opened.",
)
@click.option(
    "--sign-url",
    "sign_url_s",
    type=click.IntRange(1, 10**8),
    metavar="SECONDS",
    help="Print a signed URL of the demo page valid this long, and exit.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def web(
    listen: str,
    endpoint: str | None,
    curve_server_key: str | None,
    curve_client_key: str | None,
    codec: str,
    token_file: str | None,
    max_sessions: int,
    max_viewers: int,
    max_viewers_per_client: int,
    ice_servers: tuple[str, ...],
    turn_username: str | None,
    turn_credential_file: str | None,
    loopback_media: bool,
    prebuffer_ms: int,
    shared_encode: bool,
    nvenc: bool,
    connect_timeout_s: float,
    sign_url_s: int | None,
    log_level: str,
) -> None:
    """Serve live sessions to browsers over WebRTC (demo page at /, WHEP at /whep).

    A client of the daemon: each browser connection opens a live session and receives its
    frames (VP8 or H264) and audio (Opus); text, the microphone and barge-in go back to the
    session. Runs until SIGINT or SIGTERM. docs/web.md has the endpoints, security (token,
    TLS through a reverse proxy) and STUN/TURN set-up.
    """
    import logging

    from avatard.web.auth import check_token, is_loopback, signed_query

    host, port = parse_listen(listen)
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    token = None
    try:
        if token_file:
            token = check_token(Path(token_file).read_text())
        elif os.environ.get(TOKEN_ENV):
            token = check_token(os.environ[TOKEN_ENV])
    except (OSError, ValueError) as exc:
        click.echo(f"avatard web: token: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    if token is None and not is_loopback(host):
        click.echo(
            f"avatard web: --listen {listen} is not a loopback address, so a token is "
            f"required: --token-file PATH or ${TOKEN_ENV} (docs/web.md, Security)",
            err=True,
        )
        sys.exit(EXIT_CONFIG_ERROR)
    if sign_url_s is not None:
        if token is None:
            click.echo(
                f"avatard web: --sign-url needs a token (--token-file or ${TOKEN_ENV})", err=True
            )
            sys.exit(EXIT_CONFIG_ERROR)
        where = shown
        if host in ("0.0.0.0", "::"):
            # Listening on every address: the URL needs one a viewer can reach.
            where = socket.gethostname()
            click.echo(f"avatard web: --listen {listen} listens on every address; the URL "
                       f"names this host as {where!r}: use an address or name your viewers "
                       "reach", err=True)
        click.echo(f"http://{where}:{port}/?{signed_query(token, sign_url_s)}")
        return

    if nvenc:
        if codec != "h264":
            click.echo(f"avatard web: --nvenc encodes H264: give --codec h264 (not {codec})",
                       err=True)
            sys.exit(EXIT_CONFIG_ERROR)
        from avatard.web.feed import nvenc_unavailable

        why = nvenc_unavailable()
        if why is not None:
            click.echo(f"avatard web: --nvenc: {why}", err=True)
            sys.exit(EXIT_CONFIG_ERROR)
        shared_encode = True

    from aiortc import RTCIceServer
    from aiortc.rtcicetransport import parse_stun_turn_uri

    from avatard.web.gateway import GatewayOptions, run_gateway

    for url in ice_servers:
        try:
            parse_stun_turn_uri(url)
        except ValueError as exc:
            click.echo(
                f"avatard web: --ice-server {url!r}: {exc}; expected stun:HOST[:PORT], "
                "turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]",
                err=True,
            )
            sys.exit(EXIT_CONFIG_ERROR)

    credential = None
    if turn_credential_file:
        credential = Path(turn_credential_file).read_text().strip()
    servers = tuple(
        RTCIceServer(
            urls=url,
            username=turn_username if url.startswith("turn") else None,
            credential=credential if url.startswith("turn") else None,
        )
        for url in ice_servers
    )
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if log_level != "debug":
        # aioice and aiortc log every ICE check, aiohttp every request (the page polls
        # its stats each second) at info; keep the gateway's own lines.
        for name in ("aioice", "aiortc", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
    options = GatewayOptions(
        host=host,
        port=port,
        endpoint=endpoint,
        codec=codec,
        token=token,
        max_sessions=max_sessions,
        max_viewers=max_viewers,
        max_viewers_per_client=max_viewers_per_client,
        ice_servers=servers,
        loopback_media=loopback_media,
        prebuffer_ms=prebuffer_ms,
        shared_encode=shared_encode,
        nvenc=nvenc,
        connect_timeout_s=connect_timeout_s,
        curve_server_key_file=curve_server_key,
        curve_client_key_file=curve_client_key,
    )
    logging.getLogger("avatard.web").info(
        "avatard web on http://%s:%d (codec %s, daemon %s, %s)",
        shown,
        port,
        codec,
        endpoint or "default endpoint",
        "token required" if token else "no token: loopback",
    )
    run_gateway(options)
