"""`avatard bench sweep`: throughput, real-time factor and realtime capacity of an avatar
engine behind the daemon, over a grid of workers x batch x streams x media length.

Each configuration runs S concurrent streams (one thread and one `Client` each). A stream
sends `lipsync` jobs: deterministic synthetic speech-like PCM of the given length, seeded
per stream, so no TTS runs inside the measurement and every run sends the same audio.

- ``offline`` mode: every stream submits its jobs back to back (``repeat`` each); what
  matters is throughput and RTF.
- ``online`` mode: all S streams start each round together (a barrier), one job each per
  round; what matters is whether each stream keeps up with realtime. The protocol sends a
  lipsync job's audio whole, so the input is not paced; the realtime check is on the output.

A stream is *realtime* when every frame of every one of its jobs arrives by
``job start + allowance_s + pts``: job start is when the client sends the request, the
allowance (default 0.5 s) is the first-frame latency a live viewer tolerates, pts is the
frame's presentation time (index / fps). Both modes report every metric.

The daemon is either one already running (``endpoint``) or a private one started per
(workers, batch) pair with `PrivateDaemon`; its configurations then run on it one after
another. Records go to ``results.json`` after every configuration, so an interrupted sweep
resumes where it stopped (a configuration whose key is already stored is skipped unless
``force``).
"""

from __future__ import annotations

import math
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatard.daemon import PrivateDaemon
from avatard.ipc.client import BusyError, Client, ClientError, DoneEvent, FrameEvent
from avatard.ipc.procmem import rss_bytes

from . import sweep_report as report
from .timing import percentile

ALLOWANCE_S = 0.5  # first-frame latency a live viewer tolerates (realtime deadline offset)
SAMPLE_RATE = 16000  # default rate of the synthetic speech; workers resample to the engine's
MIB = 1024 * 1024
MODES = ("offline", "online")
WARMUP_S = 0.4  # media seconds of the unmeasured warm-up job each worker renders first
RSS_SAMPLE_S = 0.2  # how often process memory is sampled during a configuration
# Engines that take `weights` in their options table (the others refuse unknown options).
WEIGHTS_ENGINES = frozenset({"ditto"})
# Engine -> its option capping the frames rendered per batch; `--batch` varies it.
BATCH_OPTIONS: dict[str, str] = {"ditto": "max_batch"}
NOT_APPLICABLE = "n/a"
ENGINE_DEFAULT = "default"  # --batch default: leave the engine's own batch option alone


# ---------------------------------------------------------------------------- input


def speech_like_pcm(seconds: float, seed: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Deterministic float32 PCM that looks like speech to an audio-driven model: voiced
    syllables (a harmonic series on a drifting pitch, shaped by two moving formants) of
    120-300 ms, gaps between words, a longer pause now and then, a faint noise floor."""
    rng = np.random.Generator(np.random.PCG64([seed, 0x5EEC]))
    total = int(round(seconds * rate))
    out = np.zeros(total, np.float64)
    f0_base = rng.uniform(100.0, 210.0)
    pos = int(rng.uniform(0.05, 0.15) * rate)
    harmonics = np.arange(1, 13)
    while pos < total:
        length = int(rng.uniform(0.12, 0.30) * rate)
        n = min(length, total - pos)
        t = np.arange(n) / rate
        f0 = f0_base * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 5) * t
                                          + rng.uniform(0, 2 * np.pi)))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        f1, f2 = rng.uniform(300, 900), rng.uniform(900, 2400)  # the vowel of this syllable
        syllable = np.zeros(n)
        for h in harmonics:
            freq = h * f0_base
            gain = (np.exp(-((freq - f1) / 250) ** 2) + 0.6 * np.exp(-((freq - f2) / 400) ** 2)
                    + 0.05) / h
            syllable += gain * np.sin(h * phase)
        envelope = np.sin(np.pi * np.arange(n) / max(1, length)) ** 1.5
        out[pos:pos + n] = 0.35 * envelope * syllable / np.abs(syllable).max(initial=1e-9)
        pos += length
        gap = rng.uniform(0.02, 0.08) if rng.random() < 0.7 else rng.uniform(0.15, 0.45)
        pos += int(gap * rate)
    out += rng.normal(0.0, 0.002, total)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SweepConfig:
    engine: str
    weights: str | None
    workers: int
    batch: int | str  # NOT_APPLICABLE when the engine has no batch option
    streams: int
    seconds: float
    mode: str
    repeat: int
    options: tuple[tuple[str, Any], ...]  # extra engine options, sorted
    daemon: str  # "private" or the endpoint of a running daemon
    allowance_s: float = ALLOWANCE_S
    sample_rate: int = SAMPLE_RATE
    settings: tuple[tuple[str, Any], ...] = ()  # daemon config overrides (--set), sorted

    def key(self) -> str:
        """What makes two records the same measurement (the resume key)."""
        opts = ",".join(f"{k}={v!r}" for k, v in self.options) or "-"
        sets = ",".join(f"{k}={v!r}" for k, v in self.settings) or "-"
        return (f"engine={self.engine}|weights={self.weights or '-'}|workers={self.workers}|"
                f"batch={self.batch}|streams={self.streams}|seconds={self.seconds:g}|"
                f"mode={self.mode}|repeat={self.repeat}|options={opts}|"
                f"allowance_s={self.allowance_s:g}|rate={self.sample_rate}|set={sets}|"
                f"daemon={self.daemon}")

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "weights": self.weights, "workers": self.workers,
                "batch": self.batch, "streams": self.streams, "seconds": self.seconds,
                "mode": self.mode, "repeat": self.repeat, "options": dict(self.options),
                "daemon": self.daemon, "allowance_s": self.allowance_s,
                "settings": dict(self.settings),
                "sample_rate": self.sample_rate,
                "input": "synthetic speech-like PCM (no TTS)"}


def audio_bytes(seconds: float, rate: int) -> int:
    return int(round(seconds * rate)) * 4  # float32 samples


def engine_sections(engine: str, workers: int, batch: int | str, weights: str | None,
                    options: dict[str, Any], streams_max: int, audio_max_bytes: int = 0,
                    settings: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Config of a private daemon for one (workers, batch) pair. TTS and ASR are the fake
    engines: lipsync jobs never use them, and loading real ones would only add load time
    and memory that do not belong to the avatar engine being measured. The audio slots
    are made large enough for the longest job: a job's audio must fit one slot of the
    session's input ring (`rings.input_slot_bytes`, 1 MiB by default: 16.4 s at 16 kHz).
    `settings` are dotted config keys (``timeouts.load_s``, ``rings.frame_slot_bytes``)
    applied last."""
    engine_options = dict(options)
    if weights is not None and engine in WEIGHTS_ENGINES:
        engine_options["weights"] = weights
    if engine in BATCH_OPTIONS and isinstance(batch, int):
        engine_options[BATCH_OPTIONS[engine]] = batch
    sections: dict[str, dict[str, Any]] = {
        "daemon": {"workers": workers, "min_ready": workers,
                   "queue_size": max(64, 4 * streams_max)},
        "engines": {"avatar": engine, "tts": "fake", "asr": "fake"},
    }
    if audio_max_bytes > MIB:
        sections["rings"] = {"input_slot_bytes": -(-audio_max_bytes // MIB) * MIB}
    for dotted, value in (settings or {}).items():
        section, _, name = dotted.rpartition(".")
        if not section:
            raise ValueError(f"--set {dotted}: give a dotted key such as timeouts.load_s")
        sections.setdefault(section, {})[name] = value
    if engine_options:
        sections[f"engines.options.{engine}"] = engine_options
    return sections


# ---------------------------------------------------------------------------- one job


@dataclass
class JobResult:
    stream: int
    round: int
    seed: int
    started: float  # monotonic, when the request was sent
    ended: float = 0.0  # monotonic, when `done` (or the failure) arrived
    accepted_s: float = 0.0
    first_frame_s: float | None = None
    media_s: float = 0.0
    daemon_wall_s: float = 0.0
    frames_received: int = 0
    frames_reported: int = 0
    out_of_order: int = 0
    late_frames: int = 0
    max_lateness_s: float = -math.inf  # frame arrival minus its deadline (>0: late)
    attempts: int = 0
    busy_retries: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.frames_reported == self.frames_received

    @property
    def wall_s(self) -> float:
        return self.ended - self.started


def run_job(client: Client, pcm: np.ndarray, stream: int, round_: int, seed: int,
            allowance_s: float, rate: int = SAMPLE_RATE) -> JobResult:
    """Send one lipsync job and time every frame on arrival (client side)."""
    result = JobResult(stream, round_, seed, started=time.monotonic())
    try:
        while True:
            try:
                events = client.lipsync(pcm, rate, seed=seed)
                break
            except BusyError as exc:  # queue full: wait as told and try again, counted
                result.busy_retries += 1
                time.sleep(max(0.01, exc.retry_after_s))
        result.accepted_s = time.monotonic() - result.started
        for event in events:
            now = time.monotonic()
            if isinstance(event, FrameEvent):
                if event.index != result.frames_received:
                    result.out_of_order += 1
                if result.first_frame_s is None:
                    result.first_frame_s = now - result.started
                lateness = now - (result.started + allowance_s + event.pts_us / 1e6)
                result.max_lateness_s = max(result.max_lateness_s, lateness)
                result.late_frames += lateness > 0
                result.frames_received += 1
            elif isinstance(event, DoneEvent):
                result.frames_reported = event.frames
                result.media_s = event.media_s
                result.daemon_wall_s = event.wall_s
                result.attempts = event.attempts
    except ClientError as exc:
        result.error = str(exc)
    result.ended = time.monotonic()
    return result


# ---------------------------------------------------------------------------- one configuration


class MemorySampler(threading.Thread):
    """Peak RSS of the daemon and each worker process while a configuration runs."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = dict(pids)
        self.peak = dict.fromkeys(pids, 0)
        self._halt = threading.Event()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], rss_bytes(pid))  # 0 once it is gone

    def run(self) -> None:
        while not self._halt.wait(RSS_SAMPLE_S):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def join_threads(threads: list[threading.Thread]) -> None:
    """Join in short steps: a join without a timeout would hold Ctrl-C back until every
    stream's job has finished."""
    for t in threads:
        while t.is_alive():
            t.join(0.2)


def _stream_thread(endpoint: str, cfg: SweepConfig, stream: int, pcm: np.ndarray, seed: int,
                   barrier: threading.Barrier, results: list[JobResult],
                   errors: list[str], on_job: Callable[[JobResult], None],
                   timeout_s: float) -> None:
    try:
        with Client(endpoint, timeout_s=timeout_s, name=f"sweep-stream-{stream}") as client:
            for round_ in range(cfg.repeat):
                # Online: every round starts together. Offline: only the first, so the
                # streams overlap from the start and then run back to back.
                if cfg.mode == "online" or round_ == 0:
                    barrier.wait(timeout=timeout_s)
                job = run_job(client, pcm, stream, round_, seed, cfg.allowance_s,
                              cfg.sample_rate)
                results.append(job)  # list.append is atomic under the GIL
                on_job(job)
    except (ClientError, threading.BrokenBarrierError, OSError) as exc:
        errors.append(f"stream {stream}: {type(exc).__name__}: {exc}")
        barrier.abort()  # the other streams must not wait for this one forever


def measure(endpoint: str, cfg: SweepConfig, seed: int,
            on_job: Callable[[JobResult], None] = lambda job: None) -> dict[str, Any]:
    """Run one configuration against a ready daemon and compute its metrics."""
    pcms = [speech_like_pcm(cfg.seconds, seed + s, cfg.sample_rate) for s in range(cfg.streams)]
    # inline: a status-only client needs no input ring in the daemon.
    with Client(endpoint, timeout_s=30, name="sweep-status", inline=True) as status_client:
        status = status_client.stats()
        workers = status["workers"]
        pids = {"daemon": status["daemon"]["pid"],
                **{f"worker{w['id']}": w["pid"] for w in workers if w["pid"]}}
        sampler = MemorySampler(pids)
        sampler.start()
        # A job may wait for a worker behind ceil(S / W) - 1 others: bound every wait by that.
        rounds = math.ceil(cfg.streams / max(1, len(workers)))
        timeout_s = 60.0 + 20.0 * cfg.seconds * rounds
        results: list[JobResult] = []
        errors: list[str] = []
        barrier = threading.Barrier(cfg.streams)
        # daemon threads: Ctrl-C ends the sweep (and stops its daemon) without waiting
        # for streams blocked on a reply.
        threads = [threading.Thread(target=_stream_thread, name=f"stream-{s}", daemon=True,
                                    args=(endpoint, cfg, s, pcms[s], seed + s, barrier,
                                          results, errors, on_job, timeout_s))
                   for s in range(cfg.streams)]
        for t in threads:
            t.start()
        join_threads(threads)
        sampler.stop()
        after = status_client.stats()
    return compute_metrics(cfg, results, errors, after, sampler.peak)


def compute_metrics(cfg: SweepConfig, results: list[JobResult], errors: list[str],
                    status: dict[str, Any], peak_rss: dict[str, int]) -> dict[str, Any]:
    done = [r for r in results if not r.error]
    rtfs = [r.wall_s / r.media_s for r in done if r.media_s > 0]
    daemon_rtfs = [r.daemon_wall_s / r.media_s for r in done if r.media_s > 0]
    first = [r.first_frame_s for r in done if r.first_frame_s is not None]
    wall = (max(r.ended for r in results) - min(r.started for r in results)) if results else 0.0
    frames = sum(r.frames_received for r in results)
    media = sum(r.media_s for r in done)
    realtime = 0
    for stream in range(cfg.streams):
        jobs = [r for r in results if r.stream == stream]
        if len(jobs) == cfg.repeat and all(r.ok and r.late_frames == 0 for r in jobs):
            realtime += 1
    workers = status["workers"]
    lateness = [r.max_lateness_s for r in done if r.frames_received]
    return {
        "jobs": len(done),
        "jobs_failed": len(results) - len(done) + (cfg.streams * cfg.repeat - len(results)),
        "errors": (errors + [r.error for r in results if r.error])[:10],
        "wall_s": round(wall, 4),
        "media_s": round(media, 4),
        "frames_received": frames,
        "frames_reported": sum(r.frames_reported for r in results),
        "frames_missing": sum(max(0, r.frames_reported - r.frames_received) for r in results),
        "frames_out_of_order": sum(r.out_of_order for r in results),
        "rtf_p50": percentile(rtfs, 50),
        "rtf_p95": percentile(rtfs, 95),
        "daemon_rtf_p50": percentile(daemon_rtfs, 50),
        "frames_per_s": frames / wall if wall > 0 else None,
        # Videos of `seconds` each finished per hour at this rate, all streams together.
        "videos_per_hour": len(done) / wall * 3600 if wall > 0 else None,
        "realtime_streams": realtime,
        "late_frames": sum(r.late_frames for r in results),
        "max_lateness_s": max(lateness) if lateness else None,
        "first_frame_s_p50": percentile(first, 50),
        "first_frame_s_p95": percentile(first, 95),
        "accepted_s_p50": percentile([r.accepted_s for r in done], 50),
        "attempts_max": max((r.attempts for r in done), default=0),
        "busy_retries": sum(r.busy_retries for r in results),
        "device_memory_bytes": [w["device_memory_bytes"] for w in workers],
        "rss_bytes": {"daemon": peak_rss.get("daemon", 0),
                      "workers": [peak_rss.get(f"worker{w['id']}", w["rss_bytes"])
                                  for w in workers]},
        "load_s": [w["load_s"] for w in workers],
        "worker_devices": [w["device_label"] for w in workers],
        "worker_engines": [[e["name"] for e in w["engines"]] for w in workers[:1]],
        "engine_notes": sorted({e["notes"] for w in workers for e in w["engines"]
                                if e["notes"]}),
    }


def warm_up(endpoint: str, jobs: int, seed: int) -> None:
    """Short unmeasured jobs, all at once: at least one per worker, and as many as the
    largest stream count measured, so first calls (avatar registration, lazy allocations,
    kernel selection, host buffers of every batch size) stay out of the data of the first
    configuration; with a batching engine those depend on how many streams run together."""
    pcm = speech_like_pcm(WARMUP_S, seed)
    failures: list[str] = []

    def one(i: int) -> None:
        with Client(endpoint, timeout_s=120, name=f"sweep-warmup-{i}") as client:
            job = run_job(client, pcm, i, 0, seed, ALLOWANCE_S)
        if job.error:
            failures.append(job.error)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(jobs)]
    for t in threads:
        t.start()
    join_threads(threads)
    if failures:
        raise ClientError(f"warm-up job failed: {failures[0]}")


# ---------------------------------------------------------------------------- progress


class _Progress:
    """tqdm when installed; else one rewritten line on a terminal; else nothing (the
    per-configuration lines still go to `echo`)."""

    def __init__(self, total_jobs: int, enabled: bool):
        self.total = total_jobs
        self.done = 0
        self.bar = None
        self.tty = enabled and sys.stderr.isatty()
        self._lock = threading.Lock()
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_jobs, unit="job", desc="sweep", file=sys.stderr)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        self.label = text

    def job_done(self, job: JobResult) -> None:
        with self._lock:
            self.done += 1
            if self.bar is not None:
                self.bar.update(1)
            elif self.tty:
                sys.stderr.write(f"\rsweep: {self.done}/{self.total} jobs "
                                 f"({getattr(self, 'label', '')})\x1b[K")
                sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\n")


# ---------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    records: list[dict[str, Any]]  # every record in the store, old and new
    measured: list[str] = field(default_factory=list)  # keys measured in this run
    skipped: list[str] = field(default_factory=list)  # keys already stored
    failures: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    plots_note: str = ""
    table: str = ""


def parse_list(text: str, kind: type, name: str, zero_ok: bool = False) -> list[Any]:
    """"1,2,4" -> [1, 2, 4]; every value positive (or 0 too, with `zero_ok`); order
    kept, duplicates dropped. Raises ValueError naming the option `--name`."""
    values: list[Any] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = kind(item)
        except ValueError:
            raise ValueError(f"--{name}: {item!r} is not a {kind.__name__}") from None
        if value < 0 or (value == 0 and not zero_ok):
            raise ValueError(f"--{name}: values must be {'>= 0' if zero_ok else '> 0'}, "
                             f"got {item}")
        if value not in values:
            values.append(value)
    if not values:
        raise ValueError(f"--{name}: give at least one value")
    return values


def _record(cfg: SweepConfig, metrics: dict[str, Any], facts: dict[str, Any],
            commit: tuple[str, bool | None], version: str, command: str) -> dict[str, Any]:
    return {"key": cfg.key(), "timestamp": report.utc_now(), "command": command,
            "avatard_version": version,
            "git_commit": commit[0], "git_dirty": commit[1], "device": facts["device"],
            "driver_version": facts["driver_version"], "cpu": facts["cpu"],
            "cpu_count": facts["cpu_count"], "config": cfg.as_dict(), "metrics": metrics}


def run_sweep(engine: str | None, out: Path, *, weights: str | None = None,
              workers: Iterable[int] | None = None,
              batches: Iterable[int | str] = (ENGINE_DEFAULT,),
              streams: Iterable[int] = (1,), seconds: Iterable[float] = (10.0,),
              mode: str = "offline", endpoint: str | None = None, repeat: int = 1,
              options: dict[str, Any] | None = None, force: bool = False,
              allowance_s: float = ALLOWANCE_S, seed: int = 1, sample_rate: int = SAMPLE_RATE,
              settings: dict[str, Any] | None = None, progress: bool = True,
              command: str = "", echo: Callable[[str], None] = print) -> SweepResult:
    """Measure every configuration not yet in `out`/results.json; write every output."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out.mkdir(parents=True, exist_ok=True)
    options = dict(sorted((options or {}).items()))
    settings = dict(sorted((settings or {}).items()))
    records = report.load_records(out)
    stored = {r["key"] for r in records}
    facts = report.device_facts()
    commit = report.git_commit()
    version = report.avatard_version()
    streams, seconds = list(streams), list(seconds)

    # Daemon groups: one private daemon per (workers, batch); one group for a running daemon.
    groups: list[tuple[int, int | str, list[SweepConfig]]] = []
    audio_max = audio_bytes(max(seconds), sample_rate)
    if endpoint:
        with Client(endpoint, timeout_s=10, name="sweep-status") as c:
            status = c.stats()
            # The Client keeps the welcome's input ring, whose slot size is the daemon's
            # rings.input_slot_bytes (larger audio would travel inline, a copy the sweep
            # does not want to measure).
            slot = c._input_ring.slot_bytes if c._input_ring is not None else MIB
        if audio_max > slot:
            raise ValueError(f"--seconds {max(seconds):g} at {sample_rate} Hz is {audio_max} "
                             f"bytes of audio; the daemon at {endpoint} takes at most {slot} "
                             "per job (rings.input_slot_bytes): raise it there")
        running = len(status["workers"])
        names = {e["name"] for w in status["workers"] for e in w["engines"]
                 if e["kind"] == "avatar"}
        if workers is not None and list(workers) != [running]:
            raise ValueError(f"--workers: the daemon at {endpoint} runs {running} workers; "
                             "a running daemon's workers cannot be swept (omit --workers)")
        if settings or options or weights:
            raise ValueError("--set, --option and --weights configure private daemons; a "
                             "running daemon (--endpoint) keeps its own config")
        if engine is not None and names and engine not in names:
            raise ValueError(f"--engine {engine}: the daemon at {endpoint} runs {sorted(names)}")
        engine = engine or (sorted(names)[0] if names else "unknown")
        plan = [(running, NOT_APPLICABLE, endpoint)]
    else:
        if engine is None:
            raise ValueError("--engine is required unless --endpoint names a running daemon")
        batch_values: list[int | str] = list(batches)
        if engine not in BATCH_OPTIONS:
            if batch_values not in ([1], [ENGINE_DEFAULT]):
                echo(f"note: engine {engine!r} has no batch option: batch is recorded as "
                     f"{NOT_APPLICABLE!r} and not swept")
            batch_values = [NOT_APPLICABLE]
        if weights is not None and engine not in WEIGHTS_ENGINES:
            echo(f"note: engine {engine!r} takes no weights option: --weights ignored")
            weights = None
        plan = [(w, b, "private") for w in (list(workers) if workers else [1])
                for b in batch_values]
    for n_workers, batch, daemon in plan:
        configs = [SweepConfig(engine, weights, n_workers, batch, s, sec, mode, repeat,
                               tuple(options.items()), daemon, allowance_s, sample_rate,
                               tuple(settings.items()))
                   for s in streams for sec in seconds]
        groups.append((n_workers, batch, configs))

    todo = [c for _, _, cs in groups for c in cs if force or c.key() not in stored]
    skipped = [c.key() for _, _, cs in groups for c in cs if c.key() not in
               {t.key() for t in todo}]
    result = SweepResult(records=records, skipped=skipped)
    for key in skipped:
        echo(f"skip (already in {report.RESULTS_JSON}; --force to redo): {key}")
    bar = _Progress(sum(c.streams * c.repeat for c in todo), progress and bool(todo))
    try:
        for n_workers, batch, configs in groups:
            pending = [c for c in configs if c in todo]
            if not pending:
                continue
            try:
                _run_group(endpoint, engine, n_workers, batch, weights, options, settings, pending,
                           out, seed, bar, records, result, facts, commit, version,
                           command or "(python API)", echo)
            except (ClientError, RuntimeError, TimeoutError, OSError) as exc:
                message = f"workers={n_workers} batch={batch}: {exc}"
                result.failures.append(message)
                echo(f"FAILED {message.splitlines()[0]}"
                     + (f" (daemon log kept in {out})" if endpoint is None else ""))
    finally:
        bar.close()
    if not records:
        return result
    report.save_records(out, records)
    result.files.append(out / report.RESULTS_JSON)
    result.files.append(report.write_csv(out, records))
    result.files.append(report.write_markdown(out, records))
    plots = report.write_plots(out, records)
    if isinstance(plots, str):
        result.plots_note = plots
    else:
        result.files += plots
    result.table = report.markdown_table(records)
    return result


def _run_group(endpoint: str | None, engine: str, n_workers: int, batch: int | str,
               weights: str | None, options: dict[str, Any], settings: dict[str, Any],
               configs: list[SweepConfig],
               out: Path, seed: int, bar: _Progress, records: list[dict[str, Any]],
               result: SweepResult, facts: dict[str, Any], commit: tuple[str, bool | None],
               version: str, command: str, echo: Callable[[str], None]) -> None:
    """Start a private daemon (unless one is given), warm it up, measure each config."""
    tmp = None
    d = None
    finished = False
    try:
        if endpoint is None:
            # Short path: the ipc:// socket path must fit a sockaddr_un (108 bytes).
            tmp = tempfile.mkdtemp(prefix="avatard-sweep-")
            sections = engine_sections(
                engine, n_workers, batch, weights, options, max(c.streams for c in configs),
                max(audio_bytes(c.seconds, c.sample_rate) for c in configs), settings)
            bar.describe(f"starting {n_workers} worker(s)")
            d = PrivateDaemon(Path(tmp), sections)
            try:
                d.wait_for(lambda s: s["daemon"]["ready_workers"] == n_workers, 3600,
                           f"{n_workers} workers READY")
            except (RuntimeError, TimeoutError):
                _keep_log(d, out, n_workers, batch)
                raise
            target = d.endpoint
        else:
            target = endpoint
        warm_up(target, max(n_workers, *(c.streams for c in configs)), seed)
        for cfg in configs:
            bar.describe(f"W={cfg.workers} B={cfg.batch} S={cfg.streams} "
                         f"{cfg.seconds:g}s {cfg.mode}")
            metrics = measure(target, cfg, seed, bar.job_done)
            record = _record(cfg, metrics, facts, commit, version, command)
            records[:] = [r for r in records if r["key"] != cfg.key()] + [record]
            report.save_records(out, records)  # after each: a crash loses one config at most
            result.measured.append(cfg.key())
            echo(f"W={cfg.workers} B={cfg.batch} S={cfg.streams} {cfg.seconds:g}s "
                 f"{cfg.mode}: RTF p50 {_show(metrics['rtf_p50'])}, "
                 f"{_show(metrics['frames_per_s'], 1)} frames/s, realtime "
                 f"{metrics['realtime_streams']}/{cfg.streams}, first frame p50 "
                 f"{_show(metrics['first_frame_s_p50'])} s"
                 + (f", {metrics['jobs_failed']} FAILED: {metrics['errors'][0]}"
                    if metrics["jobs_failed"] else ""))
        finished = True
    finally:
        if d is not None:
            if not finished and d.proc.poll() is None:
                drain_started(d)
            code = d.stop()
            if code != 0:
                _keep_log(d, out, n_workers, batch)
                echo(f"warning: the daemon exited with status {code}; log kept in {out}")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def drain_started(d: PrivateDaemon) -> None:
    """Interrupted with jobs running: SIGTERM starts the daemon's drain, so that the SIGTERM
    `stop` sends next ends it at once instead of waiting for the jobs. The second signal
    must come after the daemon has acted on the first: two pending signals of one kind
    are delivered as one."""
    d.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and d.proc.poll() is None:
        try:
            if d.status()["daemon"]["state"] == "draining":
                return
        except ClientError:
            pass
        time.sleep(0.05)


def _keep_log(d: PrivateDaemon, out: Path, workers: int, batch: int | str) -> None:
    name = f"daemon-w{workers}-b{str(batch).replace('/', '')}.log"  # "n/a" -> "na"
    (out / name).write_text(d.log_text())


def _show(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def exit_on_sigterm() -> None:
    """SIGTERM ends a bench like Ctrl-C: through the `finally` that stops its private
    daemon, instead of leaving it running (main thread only; elsewhere nothing)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def parse_overrides(items: tuple[str, ...], flag: str) -> dict[str, Any]:
    """KEY=VALUE items of a bench flag (`--option`, `--set`) as a dict. Raises ValueError
    naming the flag and the item."""
    from avatard.daemon import ConfigError, parse_override

    parsed: dict[str, Any] = {}
    for item in items:
        try:
            key, value = parse_override(item)
        except ConfigError as exc:
            raise ValueError(f"{flag} {item!r}: {exc}") from None
        parsed[key] = value
    return parsed


def sweep_command(engine: str | None, weights: str | None, workers: str | None, batch: str,
                  streams: str, seconds: str, mode: str, out: str, endpoint: str | None,
                  repeat: int, options: tuple[str, ...], force: bool, allowance_s: float,
                  seed: int, sample_rate: int = SAMPLE_RATE, sets: tuple[str, ...] = (),
                  progress: bool = True) -> SweepResult:
    """What `avatard bench sweep` runs: parse the comma lists and the KEY=VALUE options and
    settings, then run. Raises ValueError for bad arguments (the CLI shows them)."""
    exit_on_sigterm()
    parse = parse_overrides
    result = run_sweep(
        engine, Path(out), weights=weights,
        workers=parse_list(workers, int, "workers") if workers else None,
        batches=(
            [ENGINE_DEFAULT] if batch.strip() == ENGINE_DEFAULT else parse_list(batch, int, "batch")
        ),
        streams=parse_list(streams, int, "streams"),
        seconds=parse_list(seconds, float, "seconds"), mode=mode, endpoint=endpoint,
        repeat=repeat, options=parse(options, "--option"), force=force,
        allowance_s=allowance_s, seed=seed, sample_rate=sample_rate,
        settings=parse(sets, "--set"), progress=progress,
        command=shlex.join(["avatard", *sys.argv[1:]]),
        echo=lambda line: print(line, file=sys.stderr))
    return result
