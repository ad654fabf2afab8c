"""A live session inside a worker: the pacing clock, the avatar stream, the session's TTS.

Runs on the job thread the worker starts for every job (`Worker._live` calls `run_live`)
(the clock), on a render thread that feeds the avatar stream (`StreamRenderer`), and on
one more thread, started on the first text, for the session's TTS. It owns:

- a **live avatar stream** (`open_stream(..., live=True)`), whose engine needs the audio
  of `lookahead_frames` (P) frames past frame k before it returns frame k. The session
  pushes P + A ticks of silence when it opens (the pre-roll; A is
  `daemon.live_render_ahead_frames`, slack for compute time), so that from then on
  the push of tick c + P + A can return frame c, A ticks before it is due, and frames
  leave from the first tick on. The pushes run on the render thread, so computing a
  burst never delays the frames the clock sends meanwhile.
- a **pacing clock**: tick c is due `c / fps` seconds after the session started
  (`time.monotonic()`). Between ticks the thread applies the session's input as it comes
  (the worker's main thread queues each `LiveInput`), so a barge-in takes effect at the
  next tick. At tick c the session hands one frame's worth of audio (tick c + P + A) to
  the render thread and sends the rendered frames that are due (index <= c): one frame
  per tick, even from engines that return frames in bursts (Ditto's online scheme: tens
  at once). A frame sent more than one frame period after it was due counts as late; a
  session whose frames fall more than `MAX_LAG_S` behind its clock makes the clock wait
  for them and go on from then (logged, its late frames counted), instead of queueing
  ever more audio for an engine that cannot keep up.
- a `Playout` (daemon/live_playout.py): every tick takes one frame's worth of queued speech
  (or silence: idle motion is the model fed silence), and every frame goes out with the
  audio it was made from, as frame k and audio chunk k, so speech reaches the client
  (P + A) / fps seconds after it was queued (up to a tick more).
- **barge-in**: the playout drops every queued piece of speech and silences the ticks
  whose frames have not been sent; the stream's `interrupt()` silences the audio it holds
  for frames it has not returned, so the avatar returns to rest the way the model does
  with silence. Frames already rendered and not yet sent (at most a burst) go out with
  silence.
- realtime writes: frame and audio go into the session's rings with timeout 0. A full ring
  (the client is not reading) drops both and counts the frame as dropped; the worker never
  waits for a client, so other sessions and jobs of the worker are unaffected.

The session ends at `close` (its `done` carries frames sent, dropped and late), or when
the supervisor cancels it (the client said bye or vanished), or on an engine fault (the
job fails; live sessions are not moved to another worker yet).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from avatard.ipc import protocol as P
from avatard.ipc.ring import DescriptorError, RingFullError, SlotRef, SlotRing

from .live_playout import Event, Finished, Playout, Skipped, Started, Tick

if TYPE_CHECKING:
    from .worker import JobResult, JobRun, Worker

log = logging.getLogger("avatard.worker")

MAX_LAG_S = 1.0  # frames this far behind the clock: the clock waits for them
RENDER_POLL_S = 0.005  # how often a frame that is due and not rendered yet is looked for
RENDER_JOIN_S = 5.0  # how long the end of a session waits for a push in progress
CONTROL_CHECK_S = 0.1  # longest wait for input before cancel/shutdown are checked again
TTS_JOIN_S = 2.0  # how long the end of a session waits for its TTS thread to stop


@dataclass(frozen=True, slots=True)
class TtsAudio:
    """The session's TTS thread -> its job thread: speech for text of a segment."""

    generation: int
    segment_id: str
    pcm: np.ndarray  # 1-D float32 at the avatar engine's audio_rate


@dataclass(frozen=True, slots=True)
class TtsWarning:
    """The TTS thread left words of a segment's text out (a `text_dropped` warning for
    the client, which the job thread sends: sockets belong to one thread)."""

    segment_id: str
    message: str


@dataclass(frozen=True, slots=True)
class TtsDone:
    """The TTS thread finished one piece of text (spoken, or refused by the engine:
    `refusal` says why, "" when spoken)."""

    generation: int
    segment_id: str
    refusal: str = ""


@dataclass(frozen=True, slots=True)
class TtsRefused:
    """The TTS engine refused part of a piece of text (`EngineInputError`): the client is
    told (`speech_refused`), the rest of the segment plays."""

    generation: int
    segment_id: str
    text: str
    field: str
    rule: str


def render_ahead_frames(configured: int, burst: int) -> int:
    """Frames a live session renders ahead of its clock: `configured` when >= 0, else
    (auto) 0 for a stream that returns a frame per push (`burst` 1: its frame, computed
    on the render thread right after the tick, goes out within that tick, which is not
    late) and burst // 2 + 1 for one that returns bursts: a burst's compute must end
    before its first frame is due. Measured on an H200 with Ditto (burst 10, random
    weights): 4 live sessions held with no late frame at 6, 18 late frames in 20 s at 1;
    the embedded engine's audio-to-frame p50 was 152 ms at 1 on the 2-core machine
    (docs/bench.md)."""
    if configured >= 0:
        return configured
    return 0 if burst <= 1 else burst // 2 + 1


def aligned_tick(at: float, phase: int, step: int) -> int:
    """The first tick of a grid at or after tick `at` (a float) whose number is `phase`
    modulo `step` (step >= 1)."""
    base = math.ceil(at)
    return base + (phase - base) % step


class StreamRenderer:
    """The thread that feeds a live session's avatar stream: the clock thread submits one
    tick of audio per frame period (`submit`) and barge-ins (`interrupt`), in order; this
    thread pushes each into the stream under the engine's lock, reads the frames it
    returns (a lazy iterator is read to the end, one engine call per frame) and appends
    them to `ready`, where the clock thread takes each at its tick. So the clock sends on
    time while an engine computes a burst (Ditto's online window: 10 frames at once), as
    long as the burst is ready by its first frame's tick. An engine fault is kept and
    raised on the clock thread by `check()`."""

    _INTERRUPT = object()

    def __init__(self, stream: Any, lock: Any, job_id: str):
        self.stream, self.lock, self.job_id = stream, lock, job_id
        self.ready: deque[np.ndarray] = deque()  # thread-safe append / popleft
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"render-{job_id}")

    def start(self) -> None:
        self._thread.start()

    def submit(self, pcm: np.ndarray) -> None:
        """One tick's audio (1-D float32 at the engine's rate), pushed after the ones
        before."""
        self._work.put(pcm)

    def interrupt(self) -> None:
        """Barge-in, after the ticks submitted so far (`AvatarStream.interrupt`)."""
        self._work.put(self._INTERRUPT)

    def check(self) -> None:
        """Raise the engine fault the thread met, if any (the session then fails)."""
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop after the push in progress, waiting at most `RENDER_JOIN_S` (a thread
        still inside the engine then is left behind, logged)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=RENDER_JOIN_S)
            if self._thread.is_alive():
                log.warning("live session %s: its stream is still rendering after %.0f s; "
                            "left behind", self.job_id, RENDER_JOIN_S)

    def _loop(self) -> None:
        from .worker import Worker

        try:
            while not self._stop.is_set():
                try:
                    item = self._work.get(timeout=CONTROL_CHECK_S)
                except queue.Empty:
                    continue
                if item is self._INTERRUPT:
                    with self.lock:
                        self.stream.interrupt()
                    continue
                with self.lock:
                    frames = self.stream.push(item)
                for frame in Worker.engine_frames(frames, self.lock):
                    self.ready.append(frame)
        except BaseException as exc:  # an engine fault: the clock thread raises it
            self._error = exc


def run_live(worker: Worker, job: P.RunJob, run: JobRun, frame_ring: SlotRing,
             audio_ring: SlotRing) -> JobResult:
    """Run live session `job` until it is closed: returns its result (frames sent, audio
    samples sent, seconds of media, frames dropped, late frames). Raises what
    `Worker._check_control` raises when it is cancelled or the worker shuts down,
    `EngineInputError` (field `voice`) for a voice the TTS engine does not have, and any
    engine fault."""
    session = LiveSession(worker, job, run, frame_ring, audio_ring)
    try:
        return session.run()
    finally:
        session.stop_tts()


class LiveSession:
    def __init__(self, worker: Worker, job: P.RunJob, run: JobRun, frame_ring: SlotRing,
                 audio_ring: SlotRing):
        from avatard.engines.base import EngineInputError

        spec = job.spec
        assert isinstance(spec, P.LiveSpec)
        self.worker, self.job, self.job_run = worker, job, run
        self.frame_ring, self.audio_ring = frame_ring, audio_ring
        self.voice = spec.voice
        if self.voice and "tts" in worker.engines:
            tts, tts_lock = worker._engine("tts")
            with tts_lock:
                voices = tts.voices()
            if self.voice not in voices:
                raise EngineInputError("voice", f"unknown voice {self.voice!r} (this "
                                       f"daemon's voices: {', '.join(voices)})")
        avatar, self.avatar_lock = worker._engine("avatar")
        state = worker._avatar_state(spec.avatar)
        with self.avatar_lock:
            self.stream = avatar.open_stream(state, job.seed, live=True)
        self.fps, self.rate = int(avatar.fps), int(avatar.audio_rate)
        self.lookahead = int(self.stream.lookahead_frames)
        # A session that moved here from a lost worker goes on at its clock's frame
        # (`resume_from`: the supervisor counted the frames of the gap as lost).
        self.first_index = job.resume_from
        options = spec.options
        self.playout = Playout(self.rate, self.fps, first_tick=self.first_index,
                               prebuffer_samples=options.prebuffer_ms * self.rate // 1000)
        # Ticks rendered ahead of the clock beyond the look-ahead: slack for compute time
        # (a burst of frames computed in one push must be ready before its first is due).
        self.ahead = render_ahead_frames(
            options.render_ahead_frames if options.render_ahead_frames >= 0
            else worker.spec.live_render_ahead_frames, self.stream.burst_frames)
        self.renderer = StreamRenderer(self.stream, self.avatar_lock, job.job_id)
        self.frames_out = self.first_index  # frames sent or dropped: the next one's index
        self.frames_sent = self.frames_dropped = self.late_frames = self.audio_samples = 0
        self._tts_requests: queue.SimpleQueue[tuple[int, str, str]] = queue.SimpleQueue()
        self._tts_stop = threading.Event()
        self._tts_thread: threading.Thread | None = None
        self._extra_frames_logged = False

    # ------------------------------------------------------------ the clock

    def run(self) -> JobResult:
        from .worker import JobResult

        period_s = 1.0 / self.fps
        renderer = self.renderer
        renderer.start()
        try:
            pre_roll = self.lookahead + self.ahead
            for _ in range(pre_roll):  # the pre-roll: silence
                renderer.submit(self._take_tick())
            first = self.first_index
            # The clock starts on the worker's grid, at a tick where its push count lines
            # up with every other live session's modulo the stream's burst (Ditto: a
            # window every 10 frames), so their windows are computed in one batch. The
            # first frame waits for it (up to a burst of ticks); speech latency does not.
            burst = max(1, int(self.stream.burst_frames))
            epoch = self.worker.live_epoch
            started = epoch + period_s * aligned_tick(
                (time.monotonic() - epoch) / period_s, pre_roll, burst)
            self.stream.set_due(started)
            clock = first  # the tick due next; frames up to clock - 1 are due
            while True:
                due = started + (clock - first) * period_s
                if self._wait_until(due, clock - 1, due):
                    break  # live_close
                if clock - self.frames_out > MAX_LAG_S * self.fps:
                    # The engine is over a second behind the clock: wait for it rather
                    # than queue ever more audio for it, then go on from now (the late
                    # frames say it happened; indices go on without a gap).
                    log.warning("live session %s: its frames are %d behind its clock "
                                "(%d late so far): the clock waits for them",
                                self.job.job_id, clock - self.frames_out, self.late_frames)
                    if self._wait_until(float("inf"), clock - 1, due):
                        break
                    # On from now, on the grid and in line with the other sessions.
                    behind = clock - first
                    started = epoch + period_s * (aligned_tick(
                        (time.monotonic() - epoch) / period_s - behind, pre_roll, burst))
                    self.stream.set_due(started)
                renderer.submit(self._take_tick())
                self._send_due(clock, started + (clock - first + 1) * period_s)
                clock += 1
                self.job_run.progress = self.frames_out
                self.job_run.queued_s = self.playout.queued_s
                self.job_run.frames_dropped = self.frames_dropped
                self.job_run.late_frames = self.late_frames
        finally:
            renderer.stop()
        # Segments still playing end here, cut short (playback_finished must always come).
        self._send_events(self.playout.close())
        return JobResult(frames=self.frames_sent, audio_samples=self.audio_samples,
                         # The session's length: its indices run from 0 on every
                         # worker it ran on (a moved one resumes at `first`).
                         media_s=self.frames_out / self.fps,
                         frames_dropped=self.frames_dropped, late_frames=self.late_frames)

    def _wait_until(self, until: float, overdue: int, overdue_since: float) -> bool:
        """Apply the session's input as it comes until monotonic time `until` (and all
        input already queued when it is past), sending frames up to index `overdue` as
        soon as the renderer has them (they are late: their tick began by
        `overdue_since`). With `until` infinite, waits until frame `overdue` is sent.
        Raises the renderer's engine fault, and what `_check_control` raises (cancel,
        shutdown). True when `close` came."""
        while True:
            self.worker._check_control(self.job_run)  # raises on cancel or shutdown
            self.renderer.check()
            self._send_due(overdue, overdue_since)
            missing = self.frames_out <= overdue
            if until == float("inf") and not missing:
                return False
            remaining_s = until - time.monotonic()
            # A frame that is due and not made yet is polled for often; else the wait
            # is for input (or the next tick) only.
            wait_s = min(remaining_s, RENDER_POLL_S if missing else CONTROL_CHECK_S)
            try:
                if wait_s > 0:
                    item = self.job_run.live_inputs.get(timeout=wait_s)
                else:
                    item = self.job_run.live_inputs.get(block=False)
            except queue.Empty:
                if remaining_s <= 0:
                    return False
                continue
            if self._apply(item):
                return True

    # ------------------------------------------------------------ input

    def _apply(self, item: Any) -> bool:
        """One input: from the supervisor (a `LiveInput` and its bytes) or from the TTS
        thread. True for `close`."""
        playout = self.playout
        if isinstance(item, TtsAudio):
            playout.tts_audio(item.generation, item.segment_id, item.pcm)
            return False
        if isinstance(item, TtsDone):
            playout.tts_done(item.generation, item.segment_id, item.refusal)
            return False
        if isinstance(item, TtsRefused):
            if item.generation == playout.generation:  # else a barge-in dropped it anyway
                self.worker.send(P.WSpeechRefused, job_id=self.job.job_id,
                                 segment_id=item.segment_id, code=P.E_BAD_INPUT,
                                 field=item.field[:256], rule=item.rule[:4096],
                                 text=item.text[:P.MAX_REFUSED_TEXT_CHARS])
            return False
        if isinstance(item, TtsWarning):
            self.worker.send(P.WJobWarning, job_id=self.job.job_id, code=P.W_TEXT_DROPPED,
                             message=f"segment {item.segment_id!r}: {item.message}"[:4000],
                             field="text")
            return False
        msg, data = item
        kind = msg.kind
        if kind is P.LiveInputKind.AUDIO:
            pcm = np.frombuffer(data, np.float32)
            playout.audio(msg.segment_id, pcm, msg.sample_rate)
            self.job_run.received_s += pcm.size / msg.sample_rate
            self.job_run.queued_s = playout.queued_s
        elif kind is P.LiveInputKind.TEXT:
            playout.text(msg.segment_id, msg.text, msg.final)
        elif kind is P.LiveInputKind.END:
            playout.end(msg.segment_id)
        elif kind is P.LiveInputKind.INTERRUPT:
            self._interrupt()
        elif kind is P.LiveInputKind.CLOSE:
            return True
        self._hand_to_tts(playout.take_sentences())
        return False

    def _interrupt(self) -> None:
        """Barge-in: the playout drops all queued speech (sentences waiting for the TTS
        too: a new generation), silences the ticks whose frames are not sent yet and
        answers with the segments cut short; the renderer then tells the stream, after the
        ticks handed to it so far (the stream silences every pushed sample whose frame it
        has not returned, so those ticks' speech never shows)."""
        self._send_events(self.playout.interrupt())
        self.renderer.interrupt()

    # ------------------------------------------------------------ ticks and frames

    def _take_tick(self) -> np.ndarray:
        """The playout's next tick: its audio, copied for the renderer (a barge-in
        silences the tick's own array, which goes to the client with its frame)."""
        return self.playout.take(self.playout.ticks_taken).pcm.copy()

    def _send_due(self, clock: int, late_after: float) -> None:
        """Send the rendered frames due by tick `clock` (index <= clock), each with its
        tick's audio and the events around it. A frame sent after `late_after`
        (monotonic s: the end of its tick) counts as late."""
        ready = self.renderer.ready
        while ready and self.frames_out <= clock:
            frame = ready.popleft()
            try:
                tick, before, after = self.playout.emitted()
            except IndexError:
                if not self._extra_frames_logged:
                    self._extra_frames_logged = True
                    log.warning("live session %s: the avatar stream returned more frames "
                                "than the audio it was given makes; the extra are dropped",
                                self.job.job_id)
                continue
            self._send_events(before)
            if time.monotonic() > late_after:
                self.late_frames += 1
            self._send_frame(np.asarray(frame), tick)
            self.frames_out += 1
            self._send_events(after)

    def _send_frame(self, frame: np.ndarray, tick: Tick) -> None:
        refs = self._write(frame, tick.pcm)
        if refs is None:
            self.frames_dropped += 1
            return
        frame_ref, audio_ref = refs
        job_id = self.job.job_id
        self.worker.send(P.WFrame, job_id=job_id, index=tick.index,
                         pts_us=tick.index * 1_000_000 // self.fps,
                         data=P.SlotDesc.from_ref(frame_ref))
        self.worker.send(P.WAudio, job_id=job_id, index=tick.index,
                         pts_us=self.playout.tick_start_sample(tick.index) * 1_000_000
                         // self.rate, sample_rate=self.rate,
                         data=P.SlotDesc.from_ref(audio_ref))
        self.frames_sent += 1
        self.audio_samples += tick.pcm.size

    def _write(self, frame: np.ndarray, pcm: np.ndarray) -> tuple[SlotRef, SlotRef] | None:
        """Frame and audio into their rings at once, or neither: None when either ring is
        full (timeout 0: a live session never waits for its client)."""
        frame = np.ascontiguousarray(frame)
        worker = self.worker
        try:
            with self.frame_ring.writing(frame.shape, frame.dtype.name, timeout_s=0.0,
                                         lock=worker._ring_lock(self.frame_ring.name)) as f:
                np.copyto(f.view, frame, casting="no")
                # Inside the frame's block: a full audio ring gives the frame slot back.
                with self.audio_ring.writing(pcm.shape, "float32", timeout_s=0.0,
                                             lock=worker._ring_lock(self.audio_ring.name)) as a:
                    np.copyto(a.view, pcm, casting="no")
        except RingFullError:
            return None
        except DescriptorError as exc:
            raise DescriptorError("frame", f"{exc.rule}: raise rings.frame_slot_bytes to at "
                                  f"least {frame.nbytes} (H x W x 3 of the largest frame; "
                                  "docs/config.md)") from None
        assert f.ref is not None and a.ref is not None
        return f.ref, a.ref

    def _send_events(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Started):
                self.worker.send(P.WPlaybackStarted, job_id=self.job.job_id,
                                 segment_id=event.segment_id)
            elif isinstance(event, Finished):
                self.worker.send(P.WPlaybackFinished, job_id=self.job.job_id,
                                 segment_id=event.segment_id, position_s=event.position_s,
                                 interrupted=event.interrupted)
            elif isinstance(event, Skipped):
                self.worker.send(P.WPlaybackSkipped, job_id=self.job.job_id,
                                 segment_id=event.segment_id, reason=event.reason[:4096])

    # ------------------------------------------------------------ the session's TTS

    def _hand_to_tts(self, pieces: list[tuple[int, str, str]]) -> None:
        if not pieces:
            return
        if self._tts_thread is None:
            self._tts_thread = threading.Thread(target=self._tts_loop, daemon=True,
                                                name=f"tts-{self.job.job_id}")
            self._tts_thread.start()
        for piece in pieces:
            self._tts_requests.put(piece)

    def _tts_loop(self) -> None:
        """The TTS thread: speaks each piece of text in order, one sentence at a time (so
        the first audio of a reply does not wait for its last sentence), and hands the
        audio to the job thread through its input queue. Text longer than the engine
        takes in one call (`TTSEngine.max_text_chars`) is spoken in parts cut at
        sentence, clause or word ends (`pack_sentences`). A part the engine refuses is
        reported (`TtsRefused`) and the next part goes on. Sends nothing itself (sockets
        belong to one thread). Work of an older generation (before a barge-in) is
        skipped between sentences."""
        from avatard.engines.audio import pack_sentences, resample
        from avatard.engines.base import EngineInputError

        tts, lock = self.worker._engine("tts")
        limit = getattr(tts, "max_text_chars", None)
        while not self._tts_stop.is_set():
            try:
                generation, segment_id, text = self._tts_requests.get(timeout=CONTROL_CHECK_S)
            except queue.Empty:
                continue
            refusal = ""
            spoken = False
            try:
                def warn(message: str, segment_id: str = segment_id) -> None:
                    self.job_run.live_inputs.put(TtsWarning(segment_id, message))

                parts = pack_sentences(text, limit) if limit and len(text) > limit else [text]
                for part in parts:
                    if generation != self.playout.generation or self._tts_stop.is_set():
                        break  # a barge-in came since it was asked
                    try:
                        spoken |= self._speak_part(tts, lock, generation, segment_id, part,
                                                   resample, warn)
                    except EngineInputError as exc:
                        # Text the voice cannot say: the client is told, the rest plays.
                        log.warning("live session %s: segment %r: TTS refused %r: %s",
                                    self.job.job_id, segment_id, part[:80], exc)
                        refusal = f"{exc.field}: {exc.rule}"
                        self.job_run.live_inputs.put(TtsRefused(
                            generation, segment_id, part, exc.field, exc.rule))
            except Exception as exc:
                log.exception("live session %s: segment %r: TTS failed", self.job.job_id,
                              segment_id)
                refusal = f"the TTS engine failed: {type(exc).__name__}"
            finally:
                self.job_run.live_inputs.put(TtsDone(generation, segment_id,
                                                     "" if spoken else refusal))

    def _speak_part(self, tts: Any, lock: Any, generation: int, segment_id: str, text: str,
                    resample: Any, warn: Any) -> bool:
        """Synthesize one part of a piece of text sentence by sentence into the job
        thread's queue; True when any audio came. `warn(message)` takes the engine's
        warnings (words left out). Raises `EngineInputError` (refused)."""
        with lock:
            sentences = iter(tts.stream(text, self.voice or None, warn))
        spoken = False
        while generation == self.playout.generation and not self._tts_stop.is_set():
            with lock:  # each sentence is synthesized inside next()
                pcm = next(sentences, None)
            if pcm is None:
                break
            pcm = resample(np.asarray(pcm, np.float32), tts.sample_rate, self.rate)
            self.job_run.live_inputs.put(TtsAudio(generation, segment_id, pcm))
            spoken = True
        return spoken

    def stop_tts(self) -> None:
        """Stop the TTS thread, waiting at most `TTS_JOIN_S` (a sentence being synthesized
        finishes first; a thread still inside the engine then is left behind, logged)."""
        self._tts_stop.set()
        if self._tts_thread is not None:
            self._tts_thread.join(timeout=TTS_JOIN_S)
            if self._tts_thread.is_alive():
                log.warning("live session %s: its TTS thread is still synthesizing after "
                            "%.0f s; left behind", self.job.job_id, TTS_JOIN_S)
