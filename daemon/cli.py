"""The `avatard` command line. Subcommands import what they need lazily, so that
`avatard --help` and the supervisor never pull in an engine runtime (torch, onnxruntime)."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from avatard.daemon.cli_options import avatar_option
from avatard.daemon.config import ENGINE_FLAG_HELP

# Longest audio file the CLI decodes (seconds): the config's ceiling of
# daemon.max_media_s; the daemon refuses anything over its own limit at the first request.
CLIENT_MAX_MEDIA_S = 86400.0


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="avatard")
def main() -> None:
    """avatard: a render daemon for realtime talking-head avatars.

    Text or speech goes in, a talking portrait video comes out: text -> TTS -> audio ->
    talking-head frames -> stream or mp4. `avatard serve` runs the daemon; the other
    commands are clients of it (or start a private one for the call).
    """


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML config file (every key is documented in docs/config.md).")
@click.option("--workers", type=int, help="Worker processes (overrides daemon.workers).")
@click.option("--engine", help=ENGINE_FLAG_HELP)
@click.option("--endpoint", help="Client endpoint, ipc://PATH or tcp://HOST:PORT "
              "(overrides daemon.endpoint).")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False),
              help="Ditto: the folder holding ditto_pytorch/ and ditto_cfg/ (sets "
              "engines.options.ditto.weights).")
@click.option("--weights", type=click.Choice(["random"]),
              help="Ditto: seeded random weights of the official shapes, for benchmarking "
              "compute only (every output says RANDOM WEIGHTS).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set timeouts.load_s=120 (repeatable).")
@click.option("--parent-fd", type=click.IntRange(min=0), default=None, metavar="FD",
              help="Read end of a pipe whose write end the starting process holds: at its "
              "end of file (that process exited, even by SIGKILL) the daemon drains as on "
              "SIGTERM. For programs that run a daemon as their child (the cluster's nodes).")
def serve(config_path: str | None, workers: int | None, engine: str | None,
          endpoint: str | None, checkpoints: str | None, weights: str | None,
          sets: tuple[str, ...], parent_fd: int | None) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT.

    Workers start one after another with health handshakes; the daemon serves as soon as
    daemon.min_ready workers are ready. SIGTERM/SIGINT drain (finish or hand back jobs
    within daemon.drain_timeout_s) and exit 0; a second signal exits at once.
    """
    import logging

    from avatard.daemon.config import (
        EXIT_CONFIG_ERROR,
        ConfigError,
        engine_flag_overrides,
        load_config,
        parse_override,
    )

    overrides: dict = {}
    try:
        for item in sets:
            key, value = parse_override(item)
            overrides[key] = value
        if workers is not None:
            overrides["daemon.workers"] = workers
            if "daemon.min_ready" not in overrides:
                overrides.setdefault("daemon.min_ready", min(workers, 1))
        if engine:
            overrides.update(engine_flag_overrides(engine, overrides))
        if endpoint:
            overrides["daemon.endpoint"] = endpoint
        if checkpoints and weights:
            raise ConfigError("engines.options.ditto.weights",
                              "give --checkpoints or --weights, not both")
        if checkpoints or weights:
            overrides["engines.options.ditto.weights"] = checkpoints or weights
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        # EX_CONFIG: the unit's RestartPreventExitStatus keeps systemd from looping on it.
        click.echo(f"avatard serve: bad config: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    logging.basicConfig(level=cfg.daemon.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from avatard.daemon.supervisor import Supervisor
    from avatard.ipc.segments import SegmentError

    try:
        code = Supervisor(cfg, parent_fd=parent_fd).run()
    except (RuntimeError, SegmentError) as exc:
        # SegmentError: /dev/shm cannot hold the daemon's own rings (ShmFullError says
        # how big it is, what is free, what the rings need and which keys size them).
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command()
@click.option("--endpoint", help="Daemon endpoint (default: $AVATARD_ENDPOINT or the local "
              "socket).")
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
@click.option("--timeout", "timeout_s", default=5.0, show_default=True,
              help="Seconds to wait for the daemon.")
def status(endpoint: str | None, as_json: bool, timeout_s: float) -> None:
    """Show every worker (state, pid, device, memory, uptime, restarts, job), the queue,
    job counts and the recent real-time factor."""
    from avatard.ipc.client import Client, ClientError

    try:
        # inline: a status call needs no input ring in shared memory.
        with Client(endpoint, timeout_s=timeout_s, name="status", inline=True) as client:
            body = client.stats()
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    d = body["daemon"]
    click.echo(f"avatard pid {d['pid']}: {d['state']}, {d['ready_workers']} ready "
               f"(min {d['min_ready']}), up {d['uptime_s']:.0f} s, on {', '.join(d['endpoints'])}")
    click.echo(f"{'id':>3} {'state':9} {'pid':>7} {'device':8} {'gpu MiB':>8} {'rss MiB':>8} "
               f"{'up s':>7} {'restarts':>8}  job / reason")
    for w in body["workers"]:
        jobs = ", ".join(w["current_jobs"])  # every job placed on the worker
        click.echo(f"{w['id']:>3} {w['state']:9} {w['pid']:>7} {w['device']:8} "
                   f"{w['device_memory_bytes'] >> 20:>8} {w['rss_bytes'] >> 20:>8} "
                   f"{w['uptime_s']:>7.0f} {w['restarts']:>8}  {jobs or w['reason']}")
    q, j, r = body["queue"], body["jobs"], body["registrations"]
    rtf = body["rtf_recent_median"]
    click.echo(f"queue {q['depth']}/{q['size']}, running {q['running']}; jobs done "
               f"{j['jobs_done']}, failed {j['jobs_failed']}, cancelled {j['jobs_cancelled']}, "
               f"requeued {j['jobs_requeued']}; portraits registered {r['registered']}, "
               f"refused {r['refused']}, failed {r['failed']}; recent RTF "
               f"{'-' if rtf is None else f'{rtf:.3f}'}")
    for s in body.get("live_sessions", []):  # a daemon before live sessions sends none
        where = "waiting" if s["worker"] is None else f"on worker {s['worker']}"
        click.echo(f"live {s['job_id']} {where}: frame {s['next_index']}, sent "
                   f"{s['frames_sent']}, dropped {s['frames_dropped']}, late "
                   f"{s.get('late_frames', 0)}, lost {s['frames_lost']}, speech queued "
                   f"{s['queued_s']:.1f} s, age {s['age_s']:.0f} s")


def _client_options(func):
    func = click.option("--endpoint", help="Daemon endpoint (default: $AVATARD_ENDPOINT or the "
                        "local socket). Without a daemon there, a private one runs for the "
                        "call.")(func)
    func = click.option("--engine", help=f"For a private daemon (default: embedded): "
                        f"{ENGINE_FLAG_HELP[:1].lower()}{ENGINE_FLAG_HELP[1:]} A daemon that "
                        "already answers at --endpoint keeps its own engines.")(func)
    func = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="Config override for a private daemon (repeatable).")(func)
    return func


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from None


# The signals that end a client command that writes a file: each is turned into
# `Interrupted` so the way out runs every cleanup (the mp4 writer deletes its temporary
# file, a private daemon is stopped) instead of dying mid-write.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal arrived while a command wrote its output (`writing_output`). A
    BaseException, as KeyboardInterrupt is, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def writing_output(output: str) -> Iterator[None]:
    """Run the body of a command that writes the file `output` (render, lipsync, live).

    SIGTERM, SIGINT and SIGHUP raise `Interrupted` in the main thread (the first one; a
    second one takes the signal's default action, for a user who insists): the command
    then exits with 128 + the signal number and says that `output` was not written. A
    failure (`click.ClickException`) says the same after its own message. Either way a
    file that was at `output` before is left as it was: the writer renames its temporary
    file onto `output` only when it is complete (`avatard.engines.mux.Mp4Writer`)."""
    existed = os.path.lexists(output)
    kept = " (the file already there is unchanged)" if existed else ""

    def stop(signum: int, _frame: object) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                          else signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, stop) for sig in _STOP_SIGNALS}
    try:
        yield
    except Interrupted as exc:
        click.echo(f"Error: interrupted by {exc}: {output} was not written{kept}", err=True)
        sys.exit(128 + exc.signum)
    except click.ClickException as exc:
        raise click.ClickException(f"{exc.message}; {output} was not written{kept}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@main.command()
@click.argument("text")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="The mp4 to write.")
@avatar_option
@click.option("--voice", default="", help="TTS voice (default: the engine's first voice).")
@click.option("--seed", default=1, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seed of blinks and head motion: the same seed renders the same video.")
@_client_options
def render(text: str, output: str, avatar: str | None, voice: str, seed: int,
           endpoint: str | None, engine: str | None, sets: tuple[str, ...]) -> None:
    """Speak TEXT with a talking portrait and write an mp4 (H.264 + AAC).

    Prints the real-time factor achieved (wall time / video duration; below 1 is faster
    than realtime).
    """
    from pathlib import Path

    from avatard.daemon.render import engine_overrides, render_to_mp4
    from avatard.ipc.client import ClientError

    with writing_output(output):
        try:
            result = render_to_mp4(
                endpoint, engine_overrides(engine, sets), avatar, Path(output), "render",
                lambda client, avatar_id: client.speak(text, avatar=avatar_id, voice=voice,
                                                       seed=seed))
        except (ClientError, OSError, ValueError) as exc:
            _fail(exc)
    click.echo(f"wrote {result.path}: {result.frames} frames, {result.media_s:.2f} s of video "
               f"in {result.wall_s:.2f} s: RTF {result.rtf:.3f} (first frame after "
               f"{result.first_frame_s:.2f} s)")


@main.command()
@click.argument("audio", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="The mp4 to write.")
@avatar_option
@click.option("--seed", default=1, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seed of blinks and head motion.")
@_client_options
def lipsync(audio: str, output: str, avatar: str | None, seed: int, endpoint: str | None,
            engine: str | None, sets: tuple[str, ...]) -> None:
    """Animate a portrait to an audio file (wav, mp3, flac, ogg...) and write an mp4."""
    from pathlib import Path

    from avatard.daemon.render import engine_overrides, render_to_mp4
    from avatard.engines.audio import decode_audio
    from avatard.engines.base import EngineInputError
    from avatard.engines.mux import check_writable
    from avatard.ipc.client import ClientError

    with writing_output(output):
        try:
            check_writable(Path(output))  # before decoding a long file
            pcm, rate = decode_audio(audio, max_duration_s=CLIENT_MAX_MEDIA_S)
            result = render_to_mp4(
                endpoint, engine_overrides(engine, sets), avatar, Path(output), "lipsync",
                lambda client, avatar_id: client.lipsync(pcm, rate, avatar=avatar_id,
                                                         seed=seed),
                audio=(pcm, rate))
        except EngineInputError as exc:
            _fail(ClientError(f"bad audio file {audio}: {exc}"))
        except (ClientError, OSError, ValueError) as exc:
            _fail(exc)
    click.echo(f"wrote {result.path}: {result.frames} frames, {result.media_s:.2f} s of video "
               f"in {result.wall_s:.2f} s: RTF {result.rtf:.3f}")


@main.command()
@click.argument("audio", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="The mp4 to write: every frame and audio chunk the session sent.")
@click.option("--text-stream", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="Stream this UTF-8 text file into the session instead of AUDIO, a few "
              "words every 100 ms (an LLM's pace), spoken by the session's TTS.")
@click.option("--interrupt-at", "interrupt_at_s", type=click.FloatRange(min=0.0), metavar="S",
              help="Barge in (live_interrupt) this many seconds after the input started; "
              "the rest of the input is not sent. Within AUDIO's length.")
@click.option("--tail", "tail_s", default=1.0, show_default=True,
              type=click.FloatRange(min=0.0), metavar="S",
              help="Seconds of idle frames recorded after the speech, before closing.")
@avatar_option
@click.option("--voice", default="", help="TTS voice of --text-stream (default: the engine's "
              "first voice).")
@click.option("--seed", default=1, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seed of blinks and head motion.")
@click.option("--prebuffer-ms", default=0, show_default=True, type=click.IntRange(0, 5000),
              metavar="MS", help="The session's jitter buffer: a segment starts playing "
              "once this much of it is queued (audio sent at exactly realtime otherwise "
              "plays with short gaps where a chunk came late).")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True,
              type=click.FloatRange(min=0.1), metavar="S",
              help="Seconds to wait for the daemon, per wait.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the figures as JSON instead of lines.")
@_client_options
def live(audio: str | None, output: str, text_file: str | None, interrupt_at_s: float | None,
         tail_s: float, avatar: str | None, voice: str, seed: int, prebuffer_ms: int,
         timeout_s: float, as_json: bool, endpoint: str | None, engine: str | None,
         sets: tuple[str, ...]) -> None:
    """Play AUDIO (wav, mp3, flac...: any rate, any channels) into a live session at
    realtime pace, 100 ms at a time, or stream a text file with --text-stream; optionally
    barge in; record what came out into an mp4 (H.264 + AAC).

    Prints the latencies: first frame after open, audio sent -> frame showing it received,
    barge-in -> playback_finished and -> first silent frame, and the frames the daemon
    dropped or made late.
    """
    import asyncio
    from pathlib import Path

    from avatard.daemon.live_client import LiveInput, run_live
    from avatard.daemon.render import daemon_endpoint, engine_overrides, read_file
    from avatard.engines.audio import decode_audio
    from avatard.engines.base import EngineInputError
    from avatard.engines.mux import check_writable
    from avatard.ipc.client import ClientError

    if (audio is None) == (text_file is None):
        raise click.UsageError("give AUDIO or --text-stream FILE (one of them)")
    with writing_output(output):
        try:
            out = Path(output)
            check_writable(out)
            if audio is not None:
                try:
                    pcm, rate = decode_audio(audio, max_duration_s=CLIENT_MAX_MEDIA_S)
                except EngineInputError as exc:
                    raise ClientError(f"bad audio file {audio}: {exc}") from None
                audio_s = len(pcm) / rate
                if interrupt_at_s is not None and interrupt_at_s > audio_s:
                    # It would record idle frames up to S and interrupt nothing.
                    raise ClientError(
                        f"--interrupt-at {interrupt_at_s:g} s is past the end of the audio: "
                        f"{audio} is {audio_s:.2f} s long; give a time within it")
                source = LiveInput(pcm=pcm, rate=rate)
            else:
                try:
                    text = read_file(text_file, "text").decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ClientError(f"text file {text_file} is not UTF-8 ({exc})") from None
                if not text.strip():
                    raise ClientError(f"text file {text_file} holds no words")
                source = LiveInput(text=text)
            avatar_image = None
            if avatar is not None and Path(avatar).is_file():
                avatar_image = read_file(avatar, "avatar")
            with daemon_endpoint(endpoint, engine_overrides(engine, sets), sys.stderr) as found:
                report = asyncio.run(run_live(
                    found, source, out, avatar_image=avatar_image,
                    avatar_id="" if avatar_image else (avatar or ""), voice=voice, seed=seed,
                    interrupt_at_s=interrupt_at_s, tail_s=tail_s, timeout_s=timeout_s,
                    prebuffer_ms=prebuffer_ms))
        except (ClientError, OSError, ValueError) as exc:
            _fail(exc)
    if as_json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for line in report.lines():
            click.echo(line)


@main.command()
@click.argument("audio", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print segments and word timings as JSON.")
@_client_options
def transcribe(audio: str, as_json: bool, endpoint: str | None, engine: str | None,
               sets: tuple[str, ...]) -> None:
    """Transcribe an audio file with word timings."""
    from avatard.daemon.render import connect, engine_overrides
    from avatard.engines.audio import decode_audio
    from avatard.engines.base import EngineInputError
    from avatard.ipc.client import ClientError

    try:
        pcm, rate = decode_audio(audio, max_duration_s=CLIENT_MAX_MEDIA_S)
        with connect(endpoint, engine_overrides(engine, sets), sys.stderr) as client:
            result = client.transcribe(pcm, rate)
    except EngineInputError as exc:
        _fail(ClientError(f"bad audio file {audio}: {exc}"))
    except (ClientError, OSError, ValueError) as exc:
        _fail(exc)
    if not result.text:  # exit 0 all the same: silence is a valid thing to transcribe
        click.echo(f"no speech heard in {result.duration_s:.2f} s of audio", err=True)
    if as_json:
        import msgspec

        body = {"language": result.language, "duration_s": result.duration_s,
                "text": result.text, "segments": msgspec.to_builtins(result.segments)}
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        click.echo(result.text)


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print the daemon's voices reply as JSON (docs/protocol.md, `voices`).")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True,
              help="Seconds to wait for the daemon's answer.")
@_client_options
def voices(as_json: bool, timeout_s: float, endpoint: str | None, engine: str | None,
           sets: tuple[str, ...]) -> None:
    """List the TTS voices `render --voice` takes: each voice's languages, sample rate and
    which one is the default, and where text the default voice cannot read is routed."""
    from avatard.daemon.render import connect, engine_overrides
    from avatard.ipc.client import ClientError

    try:
        with connect(endpoint, engine_overrides(engine, sets), sys.stderr,
                     timeout_s=timeout_s) as client:
            reply = client.voices()
    except (ClientError, OSError, ValueError) as exc:
        _fail(exc)
    if not reply.engine:
        # Empty lists: say why, with what to do, rather than print an empty table.
        why = ("no worker could load its engines (`avatard status` shows why)"
               if reply.status == "failed" else "no worker has loaded its engines yet; ask "
               "again once `avatard status` shows a ready worker")
        _fail(ClientError(f"no voices: {why} (daemon {reply.status})"))
    if as_json:
        import msgspec

        body = {"status": reply.status, "engine": reply.engine,
                "voices": msgspec.to_builtins(reply.voices),
                "voices_by_language": reply.voices_by_language}
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    width = max([len("voice"), *(len(v.name) for v in reply.voices)])
    click.echo(f"TTS engine {reply.engine} (daemon {reply.status}):")
    click.echo(f"{'voice':{width}}  default  {'rate Hz':>7}  languages")
    for v in reply.voices:
        click.echo(f"{v.name:{width}}  {'yes' if v.default else '':7}  {v.sample_rate:>7}  "
                   f"{', '.join(v.languages) or '- (text not checked)'}")
    if reply.voices_by_language:
        routes = ", ".join(f"{language} -> {name}"
                           for language, name in reply.voices_by_language.items())
        click.echo(f"text the default voice cannot read, when no voice is asked for: {routes}")


def _attach_groups() -> None:
    # These modules import only click at the top; their commands import the rest when run.
    from avatard.bench.cli import bench as bench_group
    from avatard.cluster.cli import cluster
    from avatard.engines.ditto.cli import ditto
    from avatard.integrations.cli import livekit
    from avatard.web.cli import web

    main.add_command(bench_group)
    main.add_command(cluster)
    main.add_command(ditto)
    main.add_command(livekit)
    main.add_command(web)


_attach_groups()

if __name__ == "__main__":
    main()
