"""The `avatard bench` command group: benchmarks that print a table and can write JSON.

`avatard.daemon.cli` registers this group on the `avatard` command; nothing else of this
package is imported by the daemon. Each command imports its bench module when it runs, so
`avatard --help` stays fast and never loads torch. The benches use only the daemon's
public API (`avatard.daemon.__all__`).
"""

from __future__ import annotations

import json
import sys

import click


@click.group()
def bench() -> None:
    """Benchmarks that print a table and can write JSON."""


def _print_report(report: dict, as_json: bool, formatter) -> None:
    """A bench report as indented JSON, or as the bench's own text table."""
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        click.echo(formatter(report))


@bench.command("ipc")
@click.option("--frames", default=2000, show_default=True, type=click.IntRange(10, 10**6),
              help="Frames moved per method in the throughput phase.")
@click.option("--latency-frames", default=500, show_default=True,
              type=click.IntRange(10, 10**6),
              help="Frames handed over one at a time to measure handoff latency.")
@click.option("--slots", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Frames in flight (ring slots; queue/HWM size for the other methods).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the frame data.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_ipc(frames: int, latency_frames: int, slots: int, seed: int, as_json: bool) -> None:
    """Move 512x512x3 uint8 frames between two processes three ways and compare.

    Methods: `shm` (shared-memory slot ring + ZeroMQ descriptors, avatard's local path),
    `zmq_inline` (bytes as ZeroMQ message parts, the remote path) and `mp_queue` (pickled
    numpy through multiprocessing.Queue). Prints frames/s, GB/s, p50/p99 handoff latency
    and the ratios.
    """
    from avatard.bench.ipc_bench import format_table, run_ipc_bench

    report = run_ipc_bench(frames=frames, latency_frames=latency_frames, slots=slots, seed=seed)
    _print_report(report, as_json, format_table)


@bench.command("recovery")
@click.option("--jobs-per-worker", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Concurrent jobs each worker runs (daemon.jobs_per_worker); the faults "
              "during a job then hit a worker running that many (2N-1 jobs on 2 workers).")
@click.option("--part", "parts", multiple=True,
              type=click.Choice(["staggered-start", "during-job", "while-loading"]),
              help="Run only this part (repeatable). [default: all three]")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_recovery(jobs_per_worker: int, parts: tuple[str, ...], as_json: bool) -> None:
    """Time a 4-worker staggered start and the recovery from each fault (SIGKILL, SIGSTOP,
    hang and crash mid-job; crash, hang and out-of-memory while loading), with the fake
    engine on real processes."""
    from avatard.bench.recovery import PARTS, format_recovery, run_recovery_bench

    report = run_recovery_bench(jobs_per_worker, parts or PARTS)
    _print_report(report, as_json, format_recovery)


@bench.command("sweep")
@click.option("--engine", help="Avatar engine of the private daemons (fake, embedded, ditto). "
              "With --endpoint: checked against the running daemon's (may be omitted).")
@click.option("--weights", help="Engine weights, 'random' or a checkpoint folder, for engines "
              "that take a weights option (ditto); ignored with a note by the others.")
@click.option("--workers", help="Comma list of worker counts, e.g. 1,2,4,8: one private "
              "daemon each. Not with --endpoint (a running daemon's count is recorded). "
              "[default: 1]")
@click.option("--batch", default="default", show_default=True,
              help="Comma list of batch sizes (the engine's max_batch option), or 'default' "
              "for the engine's own. Engines without a batch option record n/a and run once.")
@click.option("--streams", default="1", show_default=True,
              help="Comma list of concurrent streams (one thread and one client each).")
@click.option("--seconds", default="10", show_default=True,
              help="Comma list of media lengths: seconds of synthetic speech per job.")
@click.option("--mode", type=click.Choice(["offline", "online"]), default="offline",
              show_default=True, help="offline: each stream submits its jobs back to back "
              "(throughput, RTF). online: every round of jobs starts together and each stream "
              "must keep up with realtime. Both modes report every metric.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1, 10_000),
              help="Jobs per stream.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Engine option of the private daemons, e.g. frame_ms=40 for the fake "
              "engine (repeatable; part of the resume key).")
@click.option("--out", default="sweep-results", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder of results.json/.csv/.md and the plots; a configuration already "
              "in its results.json is skipped.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Config override of the private daemons, e.g. timeouts.load_s=1800 or "
              "rings.frame_slot_bytes=3145728 (repeatable; part of the resume key).")
@click.option("--endpoint", help="Measure this running daemon instead of starting private "
              "ones.")
@click.option("--force", is_flag=True, help="Measure configurations already in results.json "
              "again (their records are replaced).")
@click.option("--allowance", "allowance_s", default=0.5, show_default=True,
              type=click.FloatRange(0), help="Seconds a frame may arrive after job start + "
              "its pts and still count as realtime.")
@click.option("--sample-rate", default=16000, show_default=True,
              type=click.IntRange(8000, 192000), help="Sample rate of the audio sent.")
@click.option("--seed", default=1, show_default=True, type=click.IntRange(1, 2**32 - 1),
              help="Seed of stream 0's audio and job; stream s uses seed + s.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def bench_sweep(engine: str | None, weights: str | None, workers: str | None, batch: str,
                streams: str, seconds: str, mode: str, repeat: int, options: tuple[str, ...],
                out: str, sets: tuple[str, ...], endpoint: str | None, force: bool,
                allowance_s: float, sample_rate: int, seed: int, no_progress: bool) -> None:
    """Throughput, RTF and realtime capacity of an avatar engine behind the daemon, over
    workers x batch x streams x seconds (see docs/bench.md).

    Each job is a lipsync of seeded synthetic speech (no TTS in the measurement). Writes
    results.json, results.csv, results.md and rtf.png/throughput.png to --out and prints
    the table.
    """
    from avatard.bench.sweep import sweep_command

    try:
        result = sweep_command(engine, weights, workers, batch, streams, seconds, mode, out,
                               endpoint, repeat, options, force, allowance_s, seed,
                               sample_rate=sample_rate, sets=sets, progress=not no_progress)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if result.table:
        click.echo(result.table)
    for path in result.files:
        click.echo(f"wrote {path}", err=True)
    if result.plots_note:
        click.echo(result.plots_note, err=True)
    if result.failures:
        raise click.ClickException("failed: " + "; ".join(f.splitlines()[0]
                                                          for f in result.failures))


@bench.command("live")
@click.option("--engine", help="Avatar engine of the private daemons (fake, embedded, ditto). "
              "With --endpoint: checked against the running daemon's (may be omitted).")
@click.option("--sessions", default="1", show_default=True,
              help="Comma list of live sessions open at once (one thread and one client "
              "each), e.g. 1,4,8,16: one configuration each.")
@click.option("--seconds", default=30.0, show_default=True, type=click.FloatRange(2, 3600),
              help="Length of every session, s.")
@click.option("--beside", default="0", show_default=True,
              help="Comma list of batch streams (lipsync jobs back to back, as `bench sweep` "
              "runs them) on the same daemon while the sessions run, e.g. 0,4,8: each "
              "session count is measured with each.")
@click.option("--workers", help="Comma list of worker counts: one private daemon each. Not "
              "with --endpoint. [default: 1]")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Engine option of the private daemons, e.g. weights=random for ditto "
              "(repeatable).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Config override of the private daemons, e.g. timeouts.stall_timeout_s=120 "
              "(repeatable). daemon.jobs_per_worker defaults to room for every session.")
@click.option("--endpoint", help="Measure this running daemon instead of starting private "
              "ones.")
@click.option("--tts", type=click.Choice(["fake", "embedded", "coqui"]), default="fake",
              show_default=True, help="TTS engine of the private daemons: it speaks the text "
              "segments (fake: tones at once, so text figures are the pipeline's own).")
@click.option("--text-share", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="Share of the segments sent as streamed text instead of audio.")
@click.option("--interrupt-share", default=0.3, show_default=True,
              type=click.FloatRange(0, 1), help="Share of the segments interrupted "
              "(barge-in) 0.3-1.5 s after their playback started.")
@click.option("--seed", default=1, show_default=True, type=click.IntRange(0, 2**31 - 1),
              help="Seeds every agent's segments, texts and interrupts (session s: seed, "
              "s; its live_open seed: seed + s).")
@click.option("--out", default="live-results", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder of live.json, live.md and live.png.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of "
              "the table.")
def bench_live(engine: str | None, sessions: str, seconds: float, beside: str,
               workers: str | None,
               options: tuple[str, ...], sets: tuple[str, ...], endpoint: str | None, tts: str,
               text_share: float, interrupt_share: float, seed: int, out: str,
               as_json: bool) -> None:
    """Voice agents on live sessions, N at once: audio-to-frame, text-to-first-frame and
    barge-in latency, frame pacing, dropped and late frames, realtime sessions and memory,
    per session count (see docs/bench.md, "Live sessions").

    Each agent sends seeded speech segments at realtime pace in 100 ms chunks, some as
    streamed text, with pauses between them and seeded interrupts. With --beside, batch
    streams run on the same daemon meanwhile (how many of each one worker holds in
    realtime together). Writes live.json, live.md and live.png to --out and prints the
    table.
    """
    from avatard.bench.live import live_command
    from avatard.bench.live_report import markdown_table

    try:
        result = live_command(engine, sessions, seconds, workers, options, sets, endpoint, tts,
                              text_share, interrupt_share, seed, out, beside)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    _print_report(result.report, as_json, markdown_table)
    for path in result.files:
        click.echo(f"wrote {path}", err=True)
    if result.plot_note:
        click.echo(result.plot_note, err=True)
    if result.failures:
        raise click.ClickException("failed: " + "; ".join(f.splitlines()[0]
                                                          for f in result.failures))


@bench.command("overhead")
@click.option("--frame-ms", default=40.0, show_default=True, type=click.FloatRange(0),
              help="The fake engine's compute time per frame.")
@click.option("--busy", is_flag=True, help="Spend frame-ms busy-waiting (CPU load) instead "
              "of sleeping.")
@click.option("--seconds", default=4.0, show_default=True, type=click.FloatRange(0.2, 60),
              help="Seconds of audio per job (at most 2^20 samples at 16 kHz: 65 s).")
@click.option("--size", default=512, show_default=True, type=click.IntRange(8, 4096),
              help="Frame width and height in pixels (even).")
@click.option("--repeat", default=10, show_default=True, type=click.IntRange(1, 1000),
              help="Runs of each path (alternating); medians and minima are compared.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_overhead(frame_ms: float, busy: bool, seconds: float, size: int, repeat: int,
                   as_json: bool) -> None:
    """What the daemon adds to the fake avatar engine: the engine called in this process
    vs. the same engine behind a 1-worker daemon and one local client, side by side:
    time per frame and first-frame latency (targets: < 2 % and < 5 ms)."""
    from avatard.bench.sweep_overhead import format_overhead, run_overhead

    try:
        report = run_overhead(frame_ms=frame_ms, seconds=seconds, size=size, repeat=repeat,
                              frame_busy=busy)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    _print_report(report, as_json, format_overhead)


@bench.command("chaos")
@click.option("--seconds", type=click.FloatRange(5, 86400), default=60.0, show_default=True,
              help="Seconds of load; the drain and the audit come after.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seeds the fault schedule and the jobs.")
@click.option("--workers", type=click.IntRange(2, 64), default=3, show_default=True,
              help="Workers of the daemon under test.")
@click.option("--jobs-per-worker", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Concurrent jobs each worker runs (daemon.jobs_per_worker).")
@click.option("--live", type=click.IntRange(0, 64), default=1, show_default=True,
              help="Live sessions kept open beside the speak load (renewed every few s).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_chaos(seconds: float, seed: int, workers: int, jobs_per_worker: int, live: int,
                as_json: bool) -> None:
    """Steady fake-engine load (speak jobs and live sessions) while a seeded schedule
    SIGKILLs, SIGSTOPs and SIGTERMs workers, fills a ring, slows a client and kills a
    client mid-stream; then audits: every job done or failed with a reason, frames
    exactly once, live frames in order and of their audio, every started segment
    finished, nothing leaked. Exits 1 when the audit fails."""
    from avatard.bench.chaos import format_chaos, run_chaos

    report = run_chaos(seconds, seed, workers=workers, jobs_per_worker=jobs_per_worker,
                       live=live)
    _print_report(report, as_json, format_chaos)
    sys.exit(0 if report["passed"] else 1)


@bench.command("ditto")
@click.option("--upstream", type=click.Path(exists=True, file_okay=False),
              help="A copy of antgroup/ditto-talkinghead's sources: time its networks beside "
              "ours (omit: ours only).")
@click.option("--device", help="cuda (default when present) or cpu.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write every figure to this JSON file.")
@click.option("--repeats", type=click.IntRange(1, 10_000),
              help="Timed calls per row (default 10; 1 with --quick).")
@click.option("--warmup", type=click.IntRange(0, 1000),
              help="Untimed calls first (default 2; 0 with --quick).")
@click.option("--batches", help="Warp+decode batch sizes, e.g. 1,8,16,32 (the default).")
@click.option("--modes", help="Comma list of fp32,tf32,fp16,bf16 (CUDA default: all; CPU: fp32).")
@click.option("--lmdm-steps", help="DDIM step counts of the LMDM rows (default 10,50).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random "
              "weights and inputs.")
@click.option("--time-budget", type=click.FloatRange(0), help="Seconds; rows after it are "
              "recorded as skipped.")
@click.option("--quick", is_flag=True, help="Smoke run: batch 1, one repeat, LMDM 2 steps "
              "(fp32 only on CPU).")
def bench_ditto(upstream: str | None, device: str | None, json_path: str | None,
                repeats: int | None, warmup: int | None, batches: str | None,
                modes: str | None, lmdm_steps: str | None, seed: int,
                time_budget: float | None, quick: bool) -> None:
    """Upstream Ditto's PyTorch networks vs ours, side by side, with RANDOM weights:
    latency per call and per frame in fp32, TF32, fp16 autocast and bf16, FLOPs per call
    (both counted), matmul peak, achieved TFLOP/s and the FLOP bound on frames/s."""
    from avatard.bench.ditto_baseline import main as baseline_main

    argv = ["--seed", str(seed)]
    for flag, value in (("--upstream", upstream), ("--device", device),
                        ("--json", json_path), ("--repeats", repeats), ("--warmup", warmup),
                        ("--batches", batches), ("--modes", modes),
                        ("--lmdm-steps", lmdm_steps), ("--time-budget", time_budget)):
        if value is not None:
            argv += [flag, str(value)]
    if quick:
        argv.append("--quick")
    sys.exit(baseline_main(argv))


@bench.command("encode")
@click.option("--encoders", default=",".join(("vp8", "h264", "h264_nvenc")),
              show_default=True, help="Comma list of the gateway's shared encoders.")
@click.option("--frames", default=250, show_default=True, type=click.IntRange(20, 100_000),
              help="Frames encoded per encoder (after 10 untimed ones).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_encode(encoders: str, frames: int, as_json: bool) -> None:
    """CPU per frame of one video encode of a live session, as `avatard web
    --shared-encode` / `--nvenc` runs it: VP8, H264 (libx264) and NVIDIA's h264_nvenc
    side by side on the same 512x512 clip (see docs/bench.md, "Browser delivery")."""
    from avatard.bench.encode import format_encode, run_encode_bench

    try:
        report = run_encode_bench([e.strip() for e in encoders.split(",") if e.strip()],
                                  frames)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    _print_report(report, as_json, format_encode)


@bench.command("web")
@click.option("--viewers", default="1,4,8", show_default=True,
              help="Comma list of browser viewers at once: one configuration each.")
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(2, 3600),
              help="Length of the measured window, s.")
@click.option("--codec", type=click.Choice(["vp8", "h264"]), default="vp8", show_default=True)
@click.option("--sessions", type=click.Choice(["one", "per-viewer"]), default="one",
              show_default=True, help="one: one live session, the other viewers watch it; "
              "per-viewer: one session per viewer.")
@click.option("--engine", default="embedded", show_default=True,
              help="Avatar engine of the private daemon (TTS and ASR are fake: unused).")
@click.option("--endpoint", help="Use this running daemon instead of a private one.")
@click.option("--gateway-arg", "gateway_args", multiple=True, metavar="ARG",
              help="Extra argument for `avatard web` (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_web(viewers: str, seconds: float, codec: str, sessions: str, engine: str,
              endpoint: str | None, gateway_args: tuple[str, ...], as_json: bool) -> None:
    """Browsers (headless Chromium) watching live sessions through `avatard web`: first
    frame in the browser after connect, fps held, frames dropped, gateway CPU per viewer
    (see docs/bench.md, "Browser delivery"). Needs the `web` extra and Chromium."""
    from avatard.bench.web import format_table, run_web_bench

    try:
        counts = [int(v) for v in viewers.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{viewers!r}: a comma list of integers",
                                 param_hint="--viewers") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("at least one count, each >= 1", param_hint="--viewers")
    report = run_web_bench(counts, seconds, codec, sessions, endpoint, engine, gateway_args,
                           echo=lambda line: click.echo(line, err=True))
    _print_report(report, as_json, format_table)


@bench.command("cluster")
@click.option("--nodes", default="1,2", show_default=True,
              help="Comma list of node counts: one local Ray cluster each.")
@click.option("--requests", default=40, show_default=True, type=click.IntRange(1, 100_000),
              help="Render requests per node, for throughput (n nodes: n x N).")
@click.option("--latency-requests", default=10, show_default=True,
              type=click.IntRange(0, 10_000),
              help="Requests one after another per node count, for the added latency.")
@click.option("--frame-ms", default=40.0, show_default=True, type=click.FloatRange(0, 1000),
              help="The fake engine's compute per frame (a sleep).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Workers of each node's daemon.")
@click.option("--jobs-per-worker", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Jobs each worker runs at once.")
@click.option("--concurrency-per-node", default=0, show_default=True,
              type=click.IntRange(0, 1000),
              help="Requests in flight per node (0: the node's slots).")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_cluster(nodes: str, requests: int, latency_requests: int, frame_ms: float,
                  workers: int, jobs_per_worker: int, concurrency_per_node: int,
                  out: str | None, as_json: bool) -> None:
    """Throughput against node count and the cluster's added latency (per request and to
    the first frame), on a local Ray cluster with the fake engine (docs/bench.md,
    "Cluster"). Needs the `cluster` extra."""
    from avatard.bench.cluster import ClusterBenchOptions, format_report, run_cluster_bench

    try:
        counts = tuple(int(part) for part in nodes.split(","))
        options = ClusterBenchOptions(
            nodes=counts, requests=requests, latency_requests=latency_requests,
            frame_ms=frame_ms, workers=workers, jobs_per_worker=jobs_per_worker,
            concurrency_per_node=concurrency_per_node)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--nodes") from None
    # Ray writes its own log lines to this process's stdout: while it runs, stdout goes
    # to stderr, so that stdout holds only the report (--json).
    import os

    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        report = run_cluster_bench(options, lambda line: click.echo(line, err=True))
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    _print_report(report, as_json, format_report)
