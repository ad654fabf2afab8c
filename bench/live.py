"""`avatard bench live`: voice agents on live sessions, N at once, and what they see.

Per configuration (workers x sessions) N sessions open together on one daemon, each run
by one thread with one `Client` (the sync client is one thread per client) acting as a
voice agent for `seconds`:

- **Speech.** Segments one after another: an audio segment is seeded synthetic speech
  (`sweep.speech_like_pcm`, 1.5-4 s) sent at realtime pace in 100 ms chunks (chunk j at
  j x 100 ms after the first), then `live_end`; a text segment (a share `text_share` of
  them) is one to three sentences streamed as word tokens (`live_text`, one every 50 ms,
  the last `final`), spoken by the daemon's TTS. The next segment begins a pause
  (0.4-1.2 s) after the previous one's `playback_finished`, as an agent answers the
  user's next turn.
- **Barge-in.** A share `interrupt_share` of the segments is interrupted (`live_interrupt`)
  0.3-1.5 s after its `playback_started`, if it is still playing then.
- The session is closed after `seconds`; the segment playing then is cut short by the
  close (not a barge-in).

Every random choice comes from the seed and the session's index, so a run repeats the
same segments, texts and interrupts. The thread waits for events with `LiveSession.poll`
bounded by its next send, so chunks, tokens and interrupts leave on their own schedule,
not only right after a frame.

What is measured (client side, `time.monotonic()`):

- *audio-to-frame*: the first chunk of an audio segment sent -> the frame made from its
  first samples received. That frame is the one after the segment's `playback_started`
  (its audio chunk carries the segment's first samples); the engine's look-ahead is part
  of it: the live worker pre-rolls `lookahead` frames of silence and sends frame k at
  tick k, so this is about lookahead / fps + the wait for the next tick + compute.
- *text-to-first-frame*: the first token of a text segment sent -> its first speech
  frame received; *sentence-to-first-frame*: from the token that completed the first
  sentence instead (TTS and the engine, without the time spent typing the sentence).
- *barge-in*: `live_interrupt` sent -> its `playback_finished` (interrupted) received,
  and -> the first frame received after it whose audio is silent (and stays silent until
  the next segment: a speech gap before the interrupt took effect does not count).
- *frame jitter*: per pair of consecutive frames received, |arrival gap - index gap /
  fps|, in ms.
- from each session's `done`: frames sent, dropped (the client's ring was full) and late
  (sent more than a frame period after due). A session is **realtime** when it ended with
  `done`, dropped no frame and made under 1 % of its frames late (`LATE_SHARE_MAX`).
- peak RSS of the daemon and of each worker (psutil, every 0.2 s), and each worker's GPU
  memory through the daemon's status (NVML); "n/a" for workers on the CPU.

**Beside batch streams** (`beside` > 0): that many batch streams run on the same daemon
while the sessions do, as `bench sweep` runs them: each sends `lipsync` jobs of
`BESIDE_JOB_S` of seeded speech back to back until the sessions have closed. A batch
stream is realtime when every frame of every job arrived by job start + 0.5 s + its pts
(`sweep.ALLOWANCE_S`) and no job failed; the figures say how many live sessions and batch
streams one worker holds in realtime together.

`run_live_bench` starts one private daemon per worker count (or uses `endpoint`), warms
it up with short sessions, then measures each (sessions, beside) pair on it in turn.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
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
from avatard.ipc.client import (
    AudioEvent,
    Client,
    ClientError,
    DoneEvent,
    FrameEvent,
    InputRefusedEvent,
    LiveSession,
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
)

from . import sweep_report as facts_of
from .sweep import (
    ALLOWANCE_S,
    NOT_APPLICABLE,
    JobResult,
    MemorySampler,
    drain_started,
    engine_sections,
    exit_on_sigterm,
    join_threads,
    parse_list,
    parse_overrides,
    run_job,
    speech_like_pcm,
)
from .timing import percentile

SAMPLE_RATE = 16000  # Hz of the speech the agents send (workers resample to the engine's)
CHUNK_S = 0.1  # audio leaves in chunks this long, one per CHUNK_S (realtime pace)
SEGMENT_S = (1.5, 4.0)  # length range of an audio segment, s
FIRST_SEGMENT_S = (0.3, 1.0)  # the first segment begins this long after the open, s
PAUSE_S = (0.4, 1.2)  # from a segment's playback_finished to the next segment, s
TOKEN_S = 0.05  # one text token (a word and its space) every TOKEN_S: 20 tokens/s
SENTENCES = (1, 3)  # sentences per text segment (inclusive)
SENTENCE_WORDS = (4, 9)  # words per sentence (inclusive)
BARGE_IN_AFTER_S = (0.3, 1.5)  # interrupt this long after playback_started, s
TEXT_SHARE = 0.3
INTERRUPT_SHARE = 0.3
LATE_SHARE_MAX = 0.01  # a realtime session makes fewer late frames than this share
POLL_MAX_S = 0.05  # longest wait for an event before the schedule is looked at again
CLIENT_TIMEOUT_S = 120.0  # longest wait for a reply, or for the other agents to open
# Longest a session may go without any event before its agent gives up: frames come at
# the engine's fps, but an engine far slower than realtime (Ditto on a CPU: ~12 s a frame,
# 10 frames a window) leaves minutes between them.
EVENT_TIMEOUT_S = 600.0
WARMUP_SESSION_S = 2.0  # each warm-up session runs this long (unmeasured)
BESIDE_JOB_S = 4.0  # media seconds of each lipsync job of a batch stream beside the sessions
STATUS_SAMPLE_S = 1.0  # how often GPU memory is read through the daemon's status
TTS_CHOICES = ("fake", "embedded", "coqui")
# Words without abbreviations or single letters: a period after them always ends the
# sentence, so the token that completes the first sentence is known (docs/protocol.md).
WORDS = ("the", "answer", "is", "that", "we", "can", "meet", "on", "tuesday", "at", "noon",
         "if", "this", "works", "for", "you", "and", "then", "send", "notes", "about",
         "your", "order", "which", "should", "arrive", "before", "friday", "morning",
         "thanks", "waiting", "today", "please", "check", "email", "again", "later")
JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "live.json", "live.md", "live.png"
LATENCIES = ("audio_to_frame", "text_to_first_frame", "sentence_to_first_frame",
             "barge_in_finished", "barge_in_silent", "open_to_first_frame", "frame_jitter")


# ---------------------------------------------------------------------------- the plan


@dataclass
class SegmentPlan:
    """One segment an agent will speak: audio chunks or text tokens, and whether (and how
    long after its playback_started, s) it is interrupted."""

    segment_id: str
    kind: str  # "audio" or "text"
    items: list[Any]  # audio: float32 chunks of CHUNK_S; text: tokens
    interval_s: float  # between two items
    interrupt_after_s: float | None
    # Text: the token that completes the first sentence (its end and a space, or the last
    # token, sent final).
    sentence_token: int = 0


def plan_segment(rng: np.random.Generator, segment_id: str, text_share: float,
                 interrupt_share: float) -> SegmentPlan:
    """The next segment of an agent, from its random generator."""
    interrupt_after = (float(rng.uniform(*BARGE_IN_AFTER_S))
                       if rng.random() < interrupt_share else None)
    if rng.random() < text_share:
        tokens: list[str] = []
        sentence_token = 0
        for n in range(int(rng.integers(SENTENCES[0], SENTENCES[1] + 1))):
            words = [str(w) for w in rng.choice(WORDS, int(rng.integers(
                SENTENCE_WORDS[0], SENTENCE_WORDS[1] + 1)))]
            words[0] = words[0].capitalize()
            words[-1] += "?" if rng.random() < 0.2 else "."
            tokens += [w + " " for w in words]
            if n == 0:
                sentence_token = len(tokens) - 1  # "noon. ": its space completes it
        tokens[-1] = tokens[-1].rstrip()  # the last token goes with final=True
        return SegmentPlan(segment_id, "text", tokens, TOKEN_S, interrupt_after,
                           sentence_token)
    seconds = float(rng.uniform(*SEGMENT_S))
    pcm = speech_like_pcm(seconds, int(rng.integers(1, 2**31)), SAMPLE_RATE)
    step = int(round(CHUNK_S * SAMPLE_RATE))
    chunks = [pcm[i:i + step] for i in range(0, pcm.size, step)]
    return SegmentPlan(segment_id, "audio", chunks, CHUNK_S, interrupt_after)


# ---------------------------------------------------------------------------- one session


@dataclass
class SegmentRecord:
    """What one segment's sends and events were, monotonic seconds (None: did not
    happen)."""

    segment_id: str
    kind: str
    interrupt_planned: bool
    first_sent: float | None = None
    sentence_sent: float | None = None
    started: float | None = None  # playback_started received
    first_frame: float | None = None  # its first speech frame received
    first_frame_index: int | None = None
    unmatched: bool = False  # that frame was dropped: no audio-to-frame figure
    interrupt_sent: float | None = None
    finished: float | None = None
    interrupted: bool = False  # its playback_finished said so (a barge-in or the close)
    silent_frame: float | None = None  # barge-in: the first silent frame after it
    starved_frames: int = 0  # audio: speech frames with a gap (the next chunk came late)


@dataclass
class SessionResult:
    """What one agent saw of its session: times are monotonic seconds."""

    index: int
    opened: float = 0.0  # live_open sent
    first_frame: float | None = None
    fps: int = 0
    arrivals: list[tuple[int, float]] = field(default_factory=list)  # (frame index, time)
    segments: list[SegmentRecord] = field(default_factory=list)
    frames_received: int = 0
    out_of_order: int = 0
    done: DoneEvent | None = None
    refused: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def realtime(self) -> bool:
        """Ended with `done`, dropped no frame, and fewer than 1 % of its frames late."""
        d = self.done
        return (d is not None and not self.error and d.frames_dropped == 0
                and d.late_frames < LATE_SHARE_MAX * max(1, d.frames))


class Agent:
    """One simulated voice agent on one live session: sends on its schedule, reads every
    event, and records the times of both. Used from one thread."""

    def __init__(self, index: int, seed: int, seconds: float, text_share: float,
                 interrupt_share: float):
        self.rng = np.random.default_rng([seed, index])
        self.seconds = seconds
        self.text_share, self.interrupt_share = text_share, interrupt_share
        self.result = SessionResult(index)
        self.plan: SegmentPlan | None = None  # the segment being sent or played
        self.record: SegmentRecord | None = None
        self.next_item = 0  # of the plan's items
        self.send_from = 0.0  # when the plan's first item is due (monotonic s)
        self.count = 0  # segments begun
        self.closing = False
        self.last_index = -1  # the last frame index received
        self.frame_times: dict[int, float] = {}
        self.first_of: SegmentRecord | None = None  # started, first frame not seen yet
        self.barge_in: SegmentRecord | None = None  # interrupted, silence not settled
        self.silent_since: tuple[int, float] | None = None  # (frame index, arrival)
        self.zero_ticks: list[int] = []  # gaps of the playing audio segment, by index
        self.last_audio_index = -1
        self._new_plan()

    def _new_plan(self) -> None:
        self.plan = plan_segment(self.rng, f"s{self.result.index}-{self.count}",
                                 self.text_share, self.interrupt_share)
        self.count += 1
        self.next_item = 0
        self.record = None

    # ------------------------------------------------------------ the loop

    def run(self, endpoint: str, open_barrier: threading.Barrier, live_seed: int) -> None:
        """Open a client, wait for the other agents, open the session and run it to its
        `done`. A failure is kept in `result.error` (and releases the others' barrier)."""
        try:
            with Client(endpoint, timeout_s=CLIENT_TIMEOUT_S,
                        name=f"bench-live-{self.result.index}") as client:
                open_barrier.wait(timeout=CLIENT_TIMEOUT_S)
                self.result.opened = time.monotonic()
                session = client.live(seed=live_seed)
                self.result.fps = session.fps
                self.send_from = self.result.opened + float(self.rng.uniform(*FIRST_SEGMENT_S))
                self._loop(session)
        except Exception as exc:  # a failed session is a row of the report, not a traceback
            self.result.error = f"{type(exc).__name__}: {exc}"
            open_barrier.abort()  # the others must not wait for this one

    def _loop(self, session: LiveSession) -> None:
        end_at = self.result.opened + self.seconds
        last_event = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last_event > EVENT_TIMEOUT_S:
                raise TimeoutError(f"live session {session.job_id} sent no event for "
                                   f"{EVENT_TIMEOUT_S:.0f} s (bench.live.EVENT_TIMEOUT_S)")
            if not self.closing and now >= end_at:
                session.close()
                self.closing = True
            if not self.closing:
                self._act(session, now)
            due = min(self._next_due(), end_at) if not self.closing else now + POLL_MAX_S
            if session.poll(min(POLL_MAX_S, max(0.0, due - time.monotonic()))):
                event = next(session)
                last_event = time.monotonic()
                if self._handle(event, last_event):
                    return

    def _next_due(self) -> float:
        """When the agent must act next (monotonic s)."""
        plan, record = self.plan, self.record
        due = math.inf
        if plan is not None:
            if self.next_item < len(plan.items) and not (record and record.interrupt_sent):
                due = self.send_from + self.next_item * plan.interval_s
            if (record is not None and record.started is not None
                    and plan.interrupt_after_s is not None and record.interrupt_sent is None
                    and record.finished is None):
                due = min(due, record.started + plan.interrupt_after_s)
        return due

    def _act(self, session: LiveSession, now: float) -> None:
        """Send what is due: the plan's items up to now, then an interrupt."""
        plan = self.plan
        if plan is None:
            return
        if self.record is None:
            if now < self.send_from:
                return
            self.record = SegmentRecord(plan.segment_id, plan.kind,
                                        plan.interrupt_after_s is not None)
            self.result.segments.append(self.record)
        record = self.record
        while (self.next_item < len(plan.items) and record.interrupt_sent is None
               and self.send_from + self.next_item * plan.interval_s <= now):
            item, last = plan.items[self.next_item], self.next_item == len(plan.items) - 1
            sent = time.monotonic()
            if plan.kind == "audio":
                session.send_audio(item, SAMPLE_RATE, plan.segment_id)
                if last:
                    session.end_segment(plan.segment_id)
            else:
                session.send_text(item, plan.segment_id, final=last)
                if self.next_item == plan.sentence_token:
                    record.sentence_sent = sent
            if self.next_item == 0:
                record.first_sent = sent
            self.next_item += 1
        if (record.started is not None and plan.interrupt_after_s is not None
                and record.interrupt_sent is None and record.finished is None
                and now >= record.started + plan.interrupt_after_s):
            record.interrupt_sent = time.monotonic()
            session.interrupt()
            self._settle_barge_in()
            self.barge_in = record

    # ------------------------------------------------------------ events

    def _handle(self, event: Any, now: float) -> bool:
        """Record one event received at `now`. True at the session's `done`."""
        result = self.result
        if isinstance(event, FrameEvent):
            if result.first_frame is None:
                result.first_frame = now
            if event.index <= self.last_index:
                result.out_of_order += 1
            self.last_index = max(self.last_index, event.index)
            self.frame_times[event.index] = now
            result.arrivals.append((event.index, now))
            result.frames_received += 1
        elif isinstance(event, AudioEvent):
            self._audio(event.index, not event.pcm.any(), int((event.pcm == 0).sum()))
        elif isinstance(event, PlaybackStartedEvent):
            record = self._record(event.segment_id)
            if record is not None:
                self._settle_barge_in()
                record.started = now
                # Its first speech frame is the next one: index last_index + 1.
                self.first_of = record
                record.first_frame_index = self.last_index + 1
                self.zero_ticks = []
        elif isinstance(event, PlaybackFinishedEvent):
            record = self._record(event.segment_id)
            if record is not None:
                record.finished, record.interrupted = now, event.interrupted
                if (record.kind == "audio" and not event.interrupted and self.zero_ticks
                        and self.zero_ticks[-1] == self.last_audio_index):
                    # Its last frame holds the tail of its speech, then silence: no gap.
                    self.zero_ticks.pop()
                if record.kind == "audio":
                    record.starved_frames = len(self.zero_ticks)
                self.zero_ticks = []
                if record is self.record:
                    self.plan, self.record = None, None
                    if not self.closing:
                        self._new_plan()
                        self.send_from = now + float(self.rng.uniform(*PAUSE_S))
        elif isinstance(event, InputRefusedEvent):
            result.refused.append(f"{event.what} {event.code} {event.field}: {event.rule}")
        elif isinstance(event, DoneEvent):
            self._settle_barge_in()
            result.done = event
            return True
        return False

    def _record(self, segment_id: str) -> SegmentRecord | None:
        for record in reversed(self.result.segments):
            if record.segment_id == segment_id:
                return record
        return None

    def _audio(self, index: int, silent: bool, zeros: int) -> None:
        """The audio chunk of frame `index` (sent right after the frame)."""
        self.last_audio_index = index
        first = self.first_of
        if first is not None:
            self.first_of = None
            if index == first.first_frame_index and index in self.frame_times:
                first.first_frame = self.frame_times[index]
            else:
                first.unmatched = True  # the frame after playback_started was dropped
        playing = self.record
        if (playing is not None and playing.kind == "audio" and playing.started is not None
                and playing.interrupt_sent is None and zeros):
            self.zero_ticks.append(index)
        if self.barge_in is not None:
            if not silent:
                self.silent_since = None  # speech came after: not the barge-in's silence
            elif self.silent_since is None:
                self.silent_since = (index, self.frame_times.get(index, time.monotonic()))

    def _settle_barge_in(self) -> None:
        """The interrupted segment's silence is settled (a new segment starts, another
        interrupt, or the session ended): the first frame of the silent run is its."""
        if self.barge_in is not None and self.silent_since is not None:
            self.barge_in.silent_frame = self.silent_since[1]
        self.barge_in, self.silent_since = None, None


# ---------------------------------------------------------------------------- figures


def _summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": percentile(values, 50, 2), "p99": percentile(values, 99, 2),
            "max": round(max(values), 2) if values else None}


def session_samples(result: SessionResult) -> dict[str, list[float]]:
    """The latency samples of one session, ms, by name (`LATENCIES`)."""
    samples: dict[str, list[float]] = {name: [] for name in LATENCIES}

    def add(name: str, start: float | None, end: float | None) -> None:
        if start is not None and end is not None:
            samples[name].append(round((end - start) * 1e3, 3))

    for seg in result.segments:
        if seg.kind == "audio":
            add("audio_to_frame", seg.first_sent, seg.first_frame)
        else:
            add("text_to_first_frame", seg.first_sent, seg.first_frame)
            add("sentence_to_first_frame", seg.sentence_sent, seg.first_frame)
        if seg.interrupt_sent is not None and seg.interrupted:
            add("barge_in_finished", seg.interrupt_sent, seg.finished)
            add("barge_in_silent", seg.interrupt_sent, seg.silent_frame)
    add("open_to_first_frame", result.opened, result.first_frame)
    if result.fps:
        period = 1.0 / result.fps
        pairs = zip(result.arrivals, result.arrivals[1:], strict=False)
        samples["frame_jitter"] = [round(abs((t1 - t0) - (i1 - i0) * period) * 1e3, 3)
                                   for (i0, t0), (i1, t1) in pairs]
    return samples


def session_summary(result: SessionResult) -> dict[str, Any]:
    done = result.done
    segs = result.segments
    return {
        "session": result.index, "error": result.error, "realtime": result.realtime,
        "frames_received": result.frames_received,
        "frames_sent": done.frames if done else None,
        "frames_dropped": done.frames_dropped if done else None,
        "late_frames": done.late_frames if done else None,
        "media_s": done.media_s if done else None,
        "out_of_order": result.out_of_order,
        "segments_audio": sum(s.kind == "audio" for s in segs),
        "segments_text": sum(s.kind == "text" for s in segs),
        "interrupts_sent": sum(s.interrupt_sent is not None for s in segs),
        "first_frames_unmatched": sum(s.unmatched for s in segs),
        "starved_frames": sum(s.starved_frames for s in segs),
        "inputs_refused": result.refused[:5],
    }


def compute_metrics(results: list[SessionResult], status: dict[str, Any],
                    peak_rss: dict[str, int], peak_gpu: dict[int, int]) -> dict[str, Any]:
    """A configuration's figures from its sessions, the daemon's status after it ran and
    the memory peaks seen while it ran."""
    per_session = [session_summary(r) for r in results]
    samples: dict[str, list[float]] = {name: [] for name in LATENCIES}
    for r in results:
        for name, values in session_samples(r).items():
            samples[name] += values
    workers = status["workers"]
    on_gpu = any(w["device_label"] != "cpu" for w in workers)
    total = {key: sum(s[key] or 0 for s in per_session)
             for key in ("frames_received", "frames_sent", "frames_dropped", "late_frames",
                         "segments_audio", "segments_text", "interrupts_sent",
                         "first_frames_unmatched", "starved_frames", "out_of_order")}
    return {
        "sessions_done": sum(r.done is not None for r in results),
        "realtime_sessions": sum(r.realtime for r in results),
        "errors": [r.error for r in results if r.error][:10],
        **total,
        "barge_ins_measured": len(samples["barge_in_finished"]),
        "latency_ms": {name: _summary(values) for name, values in samples.items()},
        "rss_bytes": {"daemon": peak_rss.get("daemon", 0),
                      "workers": [peak_rss.get(f"worker{w['id']}", w["rss_bytes"])
                                  for w in workers]},
        # NVML's figure for each worker process; CPU workers have none.
        "gpu_memory_bytes": ([max(peak_gpu.get(w["id"], 0), w["device_memory_bytes"])
                              for w in workers] if on_gpu else NOT_APPLICABLE),
        "worker_devices": [w["device_label"] for w in workers],
        "engine_notes": sorted({e["notes"] for w in workers for e in w["engines"]
                                if e["notes"]}),
        "per_session": per_session,
        # Every latency sample but the jitter's (one per frame: its summary is enough).
        "samples_ms": {k: v for k, v in samples.items() if k != "frame_jitter"},
    }


# ---------------------------------------------------------------------------- one configuration


def run_agents(endpoint: str, sessions: int, seconds: float, seed: int, text_share: float,
               interrupt_share: float,
               on_status: Callable[[dict[str, Any]], None] = lambda s: None
               ) -> list[SessionResult]:
    """`sessions` agents at once, for `seconds` each; their results (in session order).
    `on_status` gets the daemon's status every STATUS_SAMPLE_S while they run."""
    barrier = threading.Barrier(sessions)
    agents = [Agent(i, seed, seconds, text_share, interrupt_share) for i in range(sessions)]
    # daemon threads: Ctrl-C ends the bench (and its daemon) without waiting for them.
    threads = [threading.Thread(target=a.run, args=(endpoint, barrier, seed + a.result.index),
                                name=f"agent-{a.result.index}", daemon=True) for a in agents]
    for t in threads:
        t.start()
    with Client(endpoint, timeout_s=30, name="bench-live-status", inline=True) as status:
        while alive := [t for t in threads if t.is_alive()]:
            on_status(status.stats())
            alive[0].join(STATUS_SAMPLE_S)  # a bounded wait that ends early when done
    join_threads(threads)
    return [a.result for a in agents]


class BatchStreams:
    """`count` batch streams beside the live sessions: one thread and one `Client` each,
    `lipsync` jobs of BESIDE_JOB_S seconds back to back (`sweep.run_job`) from `start()`
    until `stop()`, which lets each finish the job it is running."""

    def __init__(self, endpoint: str, count: int, seed: int):
        self.endpoint, self.count, self.seed = endpoint, count, seed
        self.results: list[JobResult] = []
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._threads = [threading.Thread(target=self._stream, args=(s,), daemon=True,
                                          name=f"beside-{s}") for s in range(count)]
        self.started = self.ended = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._halt.set()
        join_threads(self._threads)
        self.ended = time.monotonic()

    def _stream(self, stream: int) -> None:
        seed = self.seed + 1000 + stream
        pcm = speech_like_pcm(BESIDE_JOB_S, seed, SAMPLE_RATE)
        try:
            with Client(self.endpoint, timeout_s=CLIENT_TIMEOUT_S,
                        name=f"bench-live-batch-{stream}") as client:
                round_ = 0
                while not self._halt.is_set():
                    self.results.append(run_job(client, pcm, stream, round_, seed,
                                                ALLOWANCE_S, SAMPLE_RATE))
                    round_ += 1
        except (ClientError, OSError) as exc:
            self.errors.append(f"batch stream {stream}: {type(exc).__name__}: {exc}")

    def metrics(self) -> dict[str, Any]:
        """Streams held in realtime (every job complete, no frame past job start +
        ALLOWANCE_S + pts), jobs, frames per second over the streams' run, late frames,
        first-frame latency."""
        done = [r for r in self.results if r.ok]
        realtime = sum(
            1 for s in range(self.count)
            if (jobs := [r for r in self.results if r.stream == s])
            and all(r.ok and r.late_frames == 0 for r in jobs))
        wall = self.ended - self.started
        frames = sum(r.frames_received for r in self.results)
        first = [r.first_frame_s for r in done if r.first_frame_s is not None]
        return {"batch_streams": self.count, "batch_realtime_streams": realtime,
                "batch_jobs": len(done), "batch_jobs_failed": len(self.results) - len(done),
                "batch_frames_per_s": round(frames / wall, 1) if wall > 0 else None,
                "batch_late_frames": sum(r.late_frames for r in self.results),
                "batch_first_frame_ms_p50": (round(1000 * percentile(first, 50))
                                             if first else None),
                "batch_errors": (self.errors + [r.error for r in self.results
                                                if r.error])[:5]}


def measure(endpoint: str, sessions: int, seconds: float, seed: int, text_share: float,
            interrupt_share: float, beside: int = 0) -> dict[str, Any]:
    """One configuration against a ready daemon: its metrics. `beside`: batch streams
    run meanwhile (`BatchStreams`); 0 for none."""
    with Client(endpoint, timeout_s=30, name="bench-live-status", inline=True) as c:
        status = c.stats()
    pids = {"daemon": status["daemon"]["pid"],
            **{f"worker{w['id']}": w["pid"] for w in status["workers"] if w["pid"]}}
    sampler = MemorySampler(pids)
    peak_gpu: dict[int, int] = {}

    def gpu(status: dict[str, Any]) -> None:
        for w in status["workers"]:
            peak_gpu[w["id"]] = max(peak_gpu.get(w["id"], 0), w["device_memory_bytes"])

    batch = BatchStreams(endpoint, beside, seed)
    sampler.start()
    batch.start()
    try:
        results = run_agents(endpoint, sessions, seconds, seed, text_share, interrupt_share,
                             gpu)
    finally:
        batch.stop()
        sampler.stop()
    with Client(endpoint, timeout_s=30, name="bench-live-status", inline=True) as c:
        after = c.stats()
    metrics = compute_metrics(results, after, sampler.peak, peak_gpu)
    metrics["engine_batches"] = batch_figures(status, after)
    if beside:
        metrics.update(batch.metrics())
    return metrics


def batch_figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """How full the avatar engine's batches were between two `stats` bodies, from the
    workers' `engine_counters` (engines that keep batch counts, e.g. Ditto): mean frames
    per warp + decode batch, the share of computed slots that were padding, and mean
    windows per LMDM batch. Workers that restarted in between count from zero. {} when
    the engine keeps no batch counts. The counters come with heartbeats, so the last
    second of a run may be missing from `after`."""
    totals: dict[str, float] = {}
    old = {w["pid"]: w.get("engine_counters", {}) for w in before["workers"]}
    for w in after["workers"]:
        start = old.get(w["pid"], {})
        for key, value in w.get("engine_counters", {}).items():
            totals[key] = totals.get(key, 0.0) + value - start.get(key, 0.0)
    if not totals.get("frame_batches"):
        return {}
    frames, padded = totals.get("frames", 0.0), totals.get("frames_padded", 0.0)
    figures = {"mean_frame_batch": round(frames / totals["frame_batches"], 2),
               "frame_padding_share": round(padded / (frames + padded), 3) if frames else 0.0}
    if totals.get("window_batches"):
        figures["mean_window_batch"] = round(totals["windows"] / totals["window_batches"], 2)
    return figures


def warm_up(endpoint: str, sessions: int, seed: int) -> None:
    """Short unmeasured sessions, all at once, each speaking audio and text, so first calls
    (avatar registration, lazy allocations, the TTS's first sentence) stay out of the
    figures. Raises ClientError when one of them fails."""
    results = run_agents(endpoint, sessions, WARMUP_SESSION_S, seed + 7919, 0.5, 0.0)
    failed = [r.error for r in results if r.error or r.done is None]
    if failed:
        raise ClientError(f"warm-up session failed: {failed[0] or 'no done'}")


# ---------------------------------------------------------------------------- the bench


@dataclass(frozen=True)
class LiveConfig:
    engine: str
    workers: int
    sessions: int
    beside: int  # batch streams running beside the sessions
    seconds: float
    tts: str
    text_share: float
    interrupt_share: float
    seed: int
    options: tuple[tuple[str, Any], ...]
    settings: tuple[tuple[str, Any], ...]
    daemon: str  # "private" or the endpoint of a running daemon

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "workers": self.workers, "sessions": self.sessions,
                "beside": self.beside, "seconds": self.seconds, "tts": self.tts,
                "text_share": self.text_share,
                "interrupt_share": self.interrupt_share, "seed": self.seed,
                "options": dict(self.options), "settings": dict(self.settings),
                "daemon": self.daemon}


@dataclass
class LiveBenchResult:
    report: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    plot_note: str = ""


def daemon_sections(engine: str, workers: int, max_sessions: int, tts: str,
                    options: dict[str, Any], settings: dict[str, Any]
                    ) -> dict[str, dict[str, Any]]:
    """Config of a private daemon: `sweep.engine_sections` (ASR fake), the chosen TTS
    (it speaks the text segments), and room for every session at once on its workers
    (`daemon.jobs_per_worker`, unless --set gives it): a session left waiting in the queue
    would show no frames at all."""
    per_worker = min(64, -(-max_sessions // workers))
    sections = engine_sections(engine, workers, NOT_APPLICABLE, None, options, max_sessions,
                               settings={"daemon.jobs_per_worker": per_worker, **settings})
    sections["engines"]["tts"] = tts
    return sections


def run_live_bench(engine: str | None, sessions: Iterable[int], seconds: float, out: Path, *,
                   workers: Iterable[int] | None = None, endpoint: str | None = None,
                   options: dict[str, Any] | None = None,
                   settings: dict[str, Any] | None = None, tts: str = "fake",
                   text_share: float = TEXT_SHARE, interrupt_share: float = INTERRUPT_SHARE,
                   seed: int = 1, command: str = "", beside: Iterable[int] = (0,),
                   echo: Callable[[str], None] = print) -> LiveBenchResult:
    """Measure every (workers, sessions, beside) configuration, `beside` batch streams
    running beside the sessions; write live.json, live.md and live.png to `out`. Raises
    ValueError for arguments that cannot run."""
    from . import live_report

    options = dict(sorted((options or {}).items()))
    settings = dict(sorted((settings or {}).items()))
    sessions = list(sessions)
    beside = list(beside) or [0]
    if min(beside) < 0:
        raise ValueError(f"--beside: values must be >= 0, got {min(beside)}")
    most = max(s + b for s in sessions for b in beside)
    if tts not in TTS_CHOICES:
        raise ValueError(f"--tts must be one of {', '.join(TTS_CHOICES)}, got {tts!r}")
    if endpoint:
        if workers is not None or options or settings:
            raise ValueError("--workers, --option and --set configure private daemons; a "
                             "running daemon (--endpoint) keeps its own config")
        with Client(endpoint, timeout_s=10, name="bench-live-status", inline=True) as c:
            status = c.stats()
        names = sorted({e["name"] for w in status["workers"] for e in w["engines"]
                        if e["kind"] == "avatar"})
        if engine is not None and names and engine not in names:
            raise ValueError(f"--engine {engine}: the daemon at {endpoint} runs {names}")
        engine = engine or (names[0] if names else "unknown")
        tts_names = sorted({e["name"] for w in status["workers"] for e in w["engines"]
                            if e["kind"] == "tts"})
        tts = ",".join(tts_names) or "unknown"
        room = sum(w["capacity"] for w in status["workers"] if w["state"] in ("ready", "busy"))
        if most > room:
            raise ValueError(f"--sessions with --beside: {most} jobs at once, but the daemon "
                             f"at {endpoint} runs {room} at once on its ready workers "
                             "(daemon.workers x daemon.jobs_per_worker); the sessions past "
                             "that would wait in its queue with no frames")
        plan = [(len(status["workers"]), endpoint)]
    else:
        if engine is None:
            raise ValueError("--engine is required unless --endpoint names a running daemon")
        plan = [(w, "private") for w in (list(workers) if workers else [1])]
    out.mkdir(parents=True, exist_ok=True)
    facts = facts_of.device_facts()
    commit = facts_of.git_commit()
    report: dict[str, Any] = {
        "command": command or "(python API)", "timestamp": facts_of.utc_now(),
        "avatard_version": facts_of.avatard_version(), "git_commit": commit[0],
        "git_dirty": commit[1], **facts, "records": [],
    }
    result = LiveBenchResult(report)
    for n_workers, daemon in plan:
        configs = [LiveConfig(engine, n_workers, s, b, seconds, tts, text_share,
                              interrupt_share, seed, tuple(options.items()),
                              tuple(settings.items()), daemon)
                   for s in sessions for b in beside]
        try:
            _run_group(endpoint, configs, options, settings, out, report["records"], echo)
        except (ClientError, RuntimeError, TimeoutError, OSError) as exc:
            message = f"workers={n_workers}: {exc}"
            result.failures.append(message)
            echo(f"FAILED {message.splitlines()[0]}")
    result.files = live_report.write_outputs(out, report)
    plots = live_report.write_plot(out, report)
    if isinstance(plots, str):
        result.plot_note = plots
    else:
        result.files.append(plots)
    return result


def _run_group(endpoint: str | None, configs: list[LiveConfig], options: dict[str, Any],
               settings: dict[str, Any], out: Path, records: list[dict[str, Any]],
               echo: Callable[[str], None]) -> None:
    """Start a private daemon (unless one is given), warm it up, measure each config."""
    first = configs[0]
    max_sessions = max(c.sessions for c in configs)
    max_jobs = max(c.sessions + c.beside for c in configs)
    tmp = d = None
    finished = False
    try:
        if endpoint is None:
            # Short path: the ipc:// socket path must fit a sockaddr_un (108 bytes).
            tmp = tempfile.mkdtemp(prefix="avatard-live-")
            d = PrivateDaemon(Path(tmp), daemon_sections(first.engine, first.workers,
                                                         max_jobs, first.tts, options,
                                                         settings))
            echo(f"starting a daemon: {first.engine}, {first.workers} worker(s)")
            try:
                d.wait_for(lambda s: s["daemon"]["ready_workers"] == first.workers, 3600,
                           f"{first.workers} workers READY")
            except (RuntimeError, TimeoutError):
                (out / f"daemon-w{first.workers}.log").write_text(d.log_text())
                raise
            target = d.endpoint
        else:
            target = endpoint
        echo(f"warming up: {max(first.workers, max_sessions)} session(s)")
        warm_up(target, max(first.workers, max_sessions), first.seed)
        for cfg in configs:
            load_before = os.getloadavg()
            started = facts_of.utc_now()
            metrics = measure(target, cfg.sessions, cfg.seconds, cfg.seed, cfg.text_share,
                              cfg.interrupt_share, cfg.beside)
            records.append({"config": cfg.as_dict(), "started": started,
                            "ended": facts_of.utc_now(),
                            "load_average": {"before": [round(x, 2) for x in load_before],
                                             "after": [round(x, 2) for x in os.getloadavg()]},
                            "metrics": metrics})
            lat = metrics["latency_ms"]
            batch = (f", batch streams realtime {metrics['batch_realtime_streams']}/"
                     f"{cfg.beside} at {metrics['batch_frames_per_s']} frames/s"
                     if cfg.beside else "")
            echo(f"W={cfg.workers} sessions={cfg.sessions}: realtime "
                 f"{metrics['realtime_sessions']}/{cfg.sessions}{batch}, audio-to-frame p50 "
                 f"{_ms(lat['audio_to_frame']['p50'])}, barge-in p50 "
                 f"{_ms(lat['barge_in_silent']['p50'])}"
                 + "".join(f", {k} {v}" for k, v in metrics["engine_batches"].items())
                 + (f", errors: {metrics['errors'][0]}" if metrics["errors"] else ""))
        finished = True
    finally:
        if d is not None:
            if not finished and d.proc.poll() is None:
                drain_started(d)
            code = d.stop()
            if code != 0:
                (out / f"daemon-w{first.workers}.log").write_text(d.log_text())
                echo(f"warning: the daemon exited with status {code}; log kept in {out}")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def live_command(engine: str | None, sessions: str, seconds: float, workers: str | None,
                 options: tuple[str, ...], sets: tuple[str, ...], endpoint: str | None,
                 tts: str, text_share: float, interrupt_share: float, seed: int,
                 out: str, beside: str = "0") -> LiveBenchResult:
    """What `avatard bench live` runs: parse the lists and KEY=VALUE items, then run.
    Raises ValueError for bad arguments (the CLI shows them)."""
    exit_on_sigterm()
    parse = parse_overrides
    return run_live_bench(
        engine, parse_list(sessions, int, "sessions"), seconds, Path(out),
        workers=parse_list(workers, int, "workers") if workers else None, endpoint=endpoint,
        options=parse(options, "--option"), settings=parse(sets, "--set"), tts=tts,
        text_share=text_share, interrupt_share=interrupt_share, seed=seed,
        beside=parse_list(beside, int, "beside", zero_ok=True),
        command=shlex.join(["avatard", *sys.argv[1:]]),
        echo=lambda line: print(line, file=sys.stderr))
