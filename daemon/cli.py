"""The `avatard` command line. Subcommands import what they need lazily, so that
`avatard --help` and the supervisor never pull in an engine runtime (torch, onnxruntime)."""

from __future__ import annotations

import json
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="avatard")
def main() -> None:
    """avatard: a render daemon for realtime talking-head avatars.

    Text or speech goes in, a talking portrait video comes out: text -> TTS -> audio ->
    talking-head frames -> stream or mp4. `avatard serve` runs the daemon; the other
    commands are clients of it (or start a private one for the call).
    """


@main.group()
def bench() -> None:
    """Benchmarks that print a table and can write JSON."""


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
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        click.echo(format_table(report))


if __name__ == "__main__":
    main()
