"""`avatard livekit`: be the avatar of a LiveKit room, rendered by an avatard live session.

`avatard.daemon.cli` registers this command; it imports only click (and the shared
options) at the top, and the LiveKit SDK and agents framework (extra `livekit`) when it
runs, so `avatard --help` works without them.
"""

from __future__ import annotations

import sys

import click

from avatard.daemon.cli_options import avatar_option


@click.command("livekit")
@click.option(
    "--url",
    required=True,
    envvar="LIVEKIT_URL",
    show_envvar=True,
    help="The LiveKit server, wss://HOST (or ws:// on a private network).",
)
@click.option(
    "--token",
    required=True,
    envvar="LIVEKIT_TOKEN",
    show_envvar=True,
    help="Access token of the avatar's participant (its identity, room and "
    "grants); the environment variable keeps it out of the process list.",
)
@click.option(
    "--agent-identity",
    default=None,
    metavar="IDENTITY",
    help="The agent participant whose audio to render (default: the first agent to join the room).",
)
@avatar_option
@click.option(
    "--seed",
    default=1,
    show_default=True,
    type=click.IntRange(0, 2**63 - 1),
    help="Seed of blinks and head motion.",
)
@click.option(
    "--prebuffer-ms",
    default=0,
    show_default=True,
    type=click.IntRange(0, 5000),
    metavar="MS",
    help="The session's jitter buffer (docs/protocol.md, live_open).",
)
@click.option(
    "--connect-timeout",
    "connect_timeout_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="S",
    help="Seconds to wait for the room connection.",
)
@click.option(
    "--agent-timeout",
    "agent_timeout_s",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="S",
    help="Seconds to wait for the agent to join the room.",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="S",
    help="Seconds to wait for the daemon, per wait.",
)
@click.option(
    "--endpoint",
    help="Daemon endpoint (default: $AVATARD_ENDPOINT or the local "
    "socket). Without a daemon there, a private one runs for the call.",
)
@click.option("--engine", help="Avatar engine of a private daemon (default: embedded).")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Config override for a private daemon (repeatable).",
)
def livekit(
    url: str,
    token: str,
    agent_identity: str | None,
    avatar: str | None,
    seed: int,
    prebuffer_ms: int,
    connect_timeout_s: float,
    agent_timeout_s: float,
    timeout_s: float,
    endpoint: str | None,
    engine: str | None,
    sets: tuple[str, ...],
) -> None:
    """Join the LiveKit room of --token as the avatar of a LiveKit Agents voice agent.

    The agent sends its speech to this participant (LiveKit Agents' DataStreamAudioOutput
    with this participant's identity as destination); each frame of speech goes into an
    avatard live session, and the session's video and lip-synced audio are published as
    this participant's tracks (AvatarRunner), with playback reported back to the agent.
    Runs until the room disconnects or SIGINT/SIGTERM (docs/integrations.md).
    """
    import asyncio
    import logging
    from pathlib import Path

    try:
        from livekit import rtc

        from avatard.integrations.livekit_avatar import run_in_room
    except ImportError as exc:
        raise click.ClickException(
            f"avatard livekit needs the `livekit` extra (pip install 'avatard[livekit]'): {exc}"
        ) from None
    from avatard.daemon.render import daemon_endpoint, engine_overrides, read_file
    from avatard.ipc.client import ClientError

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        avatar_image = None
        if avatar is not None and Path(avatar).is_file():
            avatar_image = read_file(avatar, "avatar")
        with daemon_endpoint(endpoint, engine_overrides(engine, sets), sys.stderr) as found:
            asyncio.run(
                run_in_room(
                    url,
                    token,
                    found,
                    avatar_image=avatar_image,
                    avatar="" if avatar_image else (avatar or ""),
                    seed=seed,
                    prebuffer_ms=prebuffer_ms,
                    agent_identity=agent_identity,
                    connect_timeout_s=connect_timeout_s,
                    agent_timeout_s=agent_timeout_s,
                    timeout_s=timeout_s,
                )
            )
    except rtc.ConnectError as exc:
        _exit_now(1, f"could not join the LiveKit room at {url}: {exc}")
    except (ClientError, OSError, ValueError, TimeoutError) as exc:
        _exit_now(1, str(exc))
    _exit_now(0)


def _exit_now(code: int, error: str | None = None) -> None:
    """End the process at once with `code`, after printing `error` (as click would) and
    flushing. Not through the interpreter's shutdown: the livekit package's native
    runtime can abort the process (SIGABRT, a panic in a thread being torn down) while
    Python exits, seen about once in four runs after a refused connection, which would
    turn exit status 1 into -6. Everything of ours (the private daemon, the session) is
    closed by then."""
    import logging
    import os

    if error is not None:
        click.echo(f"Error: {error}", err=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
