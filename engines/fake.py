"""Fake engines: test patterns and injected faults, for tests and for operators.

They load no model and need no GPU, yet behave like real engines from the outside: loading
takes time and reports progress, frames cost time, and on request they hang, crash, run
out of memory or hold memory, so a supervisor's handling of each failure can be exercised
in tests and rehearsed on a real deployment (`[engines] avatar = "fake"`).

All three fake engines (avatar, TTS, ASR) are registered under the name "fake" and share
one options table, `[engines.options.fake]`, typed by `FakeOptions` (engines/fake_options.py,
listed with defaults and ranges in docs/config.md). Loading options (load_s and the load
faults) apply only to the engine kinds in `load_kinds`, by default the avatar engine alone,
because one worker loads all three engines from the same table. The engines take a
`WorkerContext` (worker slot, load attempt) so faults can be aimed: `fault_workers = [1, 3,
5]`, `fault_attempts = [1]`, `load_hang = true` makes workers 1, 3 and 5 hang on their first
load and load normally when restarted; `load_hang_workers` and friends mix faults in one
config (3 hang, 2 crash...).

Frames are a pure function of (job seed, frame index): `expected_frame` computes the frame
a stream must produce, so tests can check every pixel. Its first four pixels carry the
frame index and the seed in the clear (`frame_index_of`, `frame_seed_of`). Frames of a live
stream (`open_stream(..., live=True)`) also carry the loudness of the frame's own audio in
a fifth header pixel (`frame_audio_level_of`): 0 for silence, so a test of barge-in sees
which frames were rendered from speech and which from silence.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, NoReturn

import numpy as np

from avatard.ipc.procmem import rss_bytes

from .base import (
    STANDALONE,
    ASREngine,
    AudioProgressFn,
    AvatarEngine,
    AvatarState,
    AvatarStream,
    EngineInputError,
    EngineReport,
    ProgressFn,
    Segment,
    TextWarnFn,
    Transcript,
    TTSEngine,
    Word,
    WorkerContext,
    check_interruptible,
    frame_start_sample,
    frames_with_audio,
    no_audio_progress,
    no_progress,
    no_text_warning,
)
from .fake_options import FakeOptions
from .options import as_options

__all__ = [
    "FAKE_VOICES",
    "FakeASREngine",
    "FakeAvatarEngine",
    "FakeOptions",
    "FakeTTSEngine",
    "InjectedFault",
    "expected_frame",
    "frame_audio_level_of",
    "frame_count",
    "frame_index_of",
    "frame_seed_of",
    "injected_faults",
    "parse_fake_options",
]

NOTES = "FAKE ENGINE: test patterns and injected faults, not a model"
FAKE_VOICES = ["fake-a", "fake-b"]
HEADER_MARKER = 0xA5  # blue channel of the four header pixels, to spot a fake frame
MIB = 1024 * 1024
UINT64_MASK = (1 << 64) - 1


# ---------------------------------------------------------------------------- options


def parse_fake_options(options: FakeOptions | dict[str, Any] | None,
                       key_prefix: str = "options") -> FakeOptions:
    """The typed options of a fake engine from its table; a bad entry raises
    EngineOptionError (an EngineInputError) whose field is ``f"{key_prefix}.{name}"``."""
    return as_options(FakeOptions, options, key_prefix)


# ---------------------------------------------------------------------------- frames


def expected_frame(seed: int, index: int, height: int, width: int,
                   audio_level: int | None = None) -> np.ndarray:
    """Frame `index` of a job with seed `seed`: (height, width, 3) uint8 noise drawn from a
    PCG64 generator seeded with (seed, index), with a header in row 0, pixels 0..3:
    red = index (little-endian uint32), green = seed's low 32 bits, blue = 0xA5. Frames of
    a live stream pass `audio_level` (0..255, see `audio_level`): pixel 4 of row 0 is then
    (level, level, 0xA5)."""
    if index < 0:
        raise ValueError(f"frame index must be >= 0, got {index}")
    min_width = 4 if audio_level is None else 5
    if height < 1 or width < min_width:
        raise ValueError(f"frame must be at least 1x{min_width} pixels, got {height}x{width}")
    generator = np.random.Generator(np.random.PCG64([seed & UINT64_MASK, index]))
    frame = generator.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    frame[0, :4, 0] = np.frombuffer((index & 0xFFFFFFFF).to_bytes(4, "little"), np.uint8)
    frame[0, :4, 1] = np.frombuffer((seed & 0xFFFFFFFF).to_bytes(4, "little"), np.uint8)
    frame[0, :4, 2] = HEADER_MARKER
    if audio_level is not None:
        if not 0 <= audio_level <= 255:
            raise ValueError(f"audio_level must be in 0..255, got {audio_level}")
        frame[0, 4] = (audio_level, audio_level, HEADER_MARKER)
    return frame


def audio_level(pcm: np.ndarray) -> int:
    """Loudness of one frame's audio as a live fake frame shows it: round(255 * peak |pcm|),
    peak clipped to 1; 0 for silence or no samples."""
    if pcm.size == 0:
        return 0
    return round(255 * min(1.0, float(np.max(np.abs(pcm)))))


def frame_audio_level_of(frame: np.ndarray) -> int:
    """The audio level (0..255) written in a live fake frame's header (pixel 4 of row 0)."""
    if frame.shape[1] < 5 or not np.all(frame[0, :5, 2] == HEADER_MARKER) or (
            frame[0, 4, 0] != frame[0, 4, 1]):
        raise ValueError("not a live frame of the fake avatar engine (no audio level)")
    return int(frame[0, 4, 0])


def frame_index_of(frame: np.ndarray) -> int:
    """The frame index written in a fake frame's header (low 32 bits)."""
    if not np.all(frame[0, :4, 2] == HEADER_MARKER):
        raise ValueError("not a frame of the fake avatar engine (header marker missing)")
    return int.from_bytes(frame[0, :4, 0].tobytes(), "little")


def frame_seed_of(frame: np.ndarray) -> int:
    """The low 32 bits of the job seed written in a fake frame's header."""
    if not np.all(frame[0, :4, 2] == HEADER_MARKER):
        raise ValueError("not a frame of the fake avatar engine (header marker missing)")
    return int.from_bytes(frame[0, :4, 1].tobytes(), "little")


def frame_count(sample_count: int, audio_rate: int, fps: int) -> int:
    """round(audio_seconds * fps), computed exactly (Python's round: halves to even)."""
    return round(Fraction(sample_count * fps, audio_rate))


def _image_file_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header (no pixel is decoded). Raises
    EngineInputError("image", ...) for bytes Pillow cannot read, or a size below the
    smallest frame a header fits in (4 x 1)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            width, height = picture.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EngineInputError("image", f"is not an image file Pillow reads ({exc})") from None
    if width < 4 or height < 1:
        raise EngineInputError("image", f"is {width} x {height} px; the fake engine's frames "
                               "need at least 4 x 1")
    return width, height


# ---------------------------------------------------------------------------- faults


# The line an injected crash or hang writes on stderr, when it happens: an operator reading
# the journal knows the fault was asked for, and `avatard bench recovery` times recovery
# from the moment it struck (`injected_faults`). `at` is time.monotonic(): CLOCK_MONOTONIC,
# one clock for every process of a Linux host, so another process can compare it.
FAULT_LINE = ("avatard fake engine: injected {kind} {where} (worker {worker}, attempt "
              "{attempt}, at monotonic {at:.6f} s{more})\n")
_FAULT_LINE_RE = re.compile(r"avatard fake engine: injected (?P<kind>crash|hang) .*?\(worker "
                            r"(?P<worker>\d+), attempt (?P<attempt>\d+), at monotonic "
                            r"(?P<at>[0-9.]+) s")


@dataclass(frozen=True)
class InjectedFault:
    """A crash or hang a fake engine announced: which, in which worker process, and when
    (`at`: time.monotonic() seconds, comparable across the host's processes)."""

    kind: str  # "crash" | "hang"
    worker: int
    attempt: int
    at: float


def injected_faults(log_text: str) -> list[InjectedFault]:
    """The crashes and hangs announced in a daemon's log (its workers' stderr), in order."""
    return [InjectedFault(m["kind"], int(m["worker"]), int(m["attempt"]), float(m["at"]))
            for m in _FAULT_LINE_RE.finditer(log_text)]


def _announce(kind: str, context: WorkerContext, where: str, more: str = "") -> None:
    """Write the FAULT_LINE of a fault striking now, straight to fd 2 (nothing buffered is
    left behind by the exit or the hang that follows)."""
    message = FAULT_LINE.format(kind=kind, where=where, worker=context.worker_index,
                                attempt=context.attempt, at=time.monotonic(), more=more)
    try:
        sys.stderr.flush()
        os.write(2, message.encode())
    except OSError:
        pass


def _crash(options: FakeOptions, context: WorkerContext, where: str) -> NoReturn:
    """Die like a segfaulting native library would: no exception, no cleanup, no atexit."""
    _announce("crash", context, where, f", exit status {options.crash_exit_code}")
    time.sleep(options.crash_delay_s)
    os._exit(options.crash_exit_code)


def _hang(context: WorkerContext, where: str) -> NoReturn:
    """Block forever like a deadlocked driver call. Signal handlers are left alone, so
    SIGTERM and SIGKILL end the process as they would any other."""
    _announce("hang", context, where)
    while True:
        time.sleep(1.0)


def _spend(duration_s: float, busy: bool) -> None:
    if duration_s <= 0:
        return
    if not busy:
        time.sleep(duration_s)
        return
    deadline = time.perf_counter() + duration_s
    while time.perf_counter() < deadline:
        pass


class _FakeLoad:
    """The load every fake engine performs: timed progress, the load faults, the ballast
    allocation, and the figures for `report()`."""

    LOAD_STEPS = 10  # progress reports during the "weights" stage

    def __init__(self, kind: str, options: FakeOptions, context: WorkerContext,
                 progress: ProgressFn):
        self.kind = kind
        self.options = options
        self.context = context
        self.ballast: np.ndarray | None = None
        self.warmup_s = 0.0
        self.memory_bytes = 0
        self._progress = progress
        self._rss_before = rss_bytes()

    def load_weights(self) -> None:
        options = self.options
        applies_here = self.kind in options.load_kinds
        weights_s = options.load_s * 0.8 if applies_here else 0.0
        self._progress("weights", 0.0)
        for step in range(1, self.LOAD_STEPS + 1):
            time.sleep(weights_s / self.LOAD_STEPS)
            self._progress("weights", step / self.LOAD_STEPS)
            # The faults strike half-way, after the supervisor has seen the load progress.
            if step == self.LOAD_STEPS // 2 and applies_here:
                self._inject_load_faults()

    def _inject_load_faults(self) -> None:
        options, context = self.options, self.context
        where = f"worker {context.worker_index}, attempt {context.attempt}"
        if options.alloc_mb and options.faults_apply(context):
            # np.ones writes every byte, so the pages are resident, not just reserved.
            self.ballast = np.ones(options.alloc_mb * MIB, dtype=np.uint8)
        if options.load_fault(options.load_oom, options.load_oom_workers, context):
            raise MemoryError(
                f"fake engine: injected out-of-memory while loading {self.kind} weights "
                f"({where})"
            )
        if options.load_error and options.faults_apply(context):
            raise RuntimeError(f"fake engine: injected load error in {self.kind} engine ({where})")
        if options.load_fault(options.load_crash, options.load_crash_workers, context):
            _crash(options, context, f"while loading the {self.kind} engine")
        if options.load_fault(options.load_hang, options.load_hang_workers, context):
            _hang(context, f"while loading the {self.kind} engine")

    def warm_up(self, call: Any) -> None:
        """Time the warm-up: the remaining share of load_s plus one real call."""
        applies_here = self.kind in self.options.load_kinds
        started = time.perf_counter()
        self._progress("warmup", 0.0)
        time.sleep(self.options.load_s * 0.2 if applies_here else 0.0)
        call()
        self._progress("warmup", 1.0)
        self.warmup_s = time.perf_counter() - started
        self.memory_bytes = max(0, rss_bytes() - self._rss_before)

    def report(self, device: str) -> EngineReport:
        return EngineReport(
            name="fake",
            kind=self.kind,
            device=device,
            memory_bytes=self.memory_bytes,
            warmup_s=self.warmup_s,
            notes=NOTES,
        )


# ---------------------------------------------------------------------------- avatar


class FakeAvatarStream(AvatarStream):
    """Frames of one job: frame k exists once the audio up to its end has arrived
    (look-ahead 0). A live stream keeps the audio of the frames it has not returned yet,
    to write each frame's audio level into it and to silence it on interrupt(); it can
    stand in for an engine with look-ahead and bursts (options `lookahead_frames` L and
    `burst_frames` B): frames leave in groups of B, group [gB, gB + B) once the audio of
    frame gB + L is complete, so each frame leaves at the latest with the audio of frame
    k + L, some earlier (as Ditto's online windows do)."""

    def __init__(self, engine: FakeAvatarEngine, state: AvatarState, seed: int,
                 live: bool = False):
        self._engine = engine
        self._size = (state.height, state.width)  # the frames', from registration
        self._seed = seed
        self.live = live
        self._sample_count = 0
        self._next_index = 0
        self._finished = False
        # Live only: the pushed audio from the first sample of frame `_next_index` on.
        self._pending_pcm = np.zeros(0, np.float32)

    @property
    def frames_produced(self) -> int:
        return self._next_index

    @property
    def lookahead_frames(self) -> int:
        return self._engine.options.lookahead_frames if self.live else 0

    @property
    def burst_frames(self) -> int:
        return self._engine.options.burst_frames if self.live else 1

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        if self._finished:
            raise RuntimeError("push() after finish() on a fake avatar stream")
        if not isinstance(pcm, np.ndarray) or pcm.ndim != 1:
            raise EngineInputError("pcm", "must be a 1-D numpy array of mono samples")
        if pcm.dtype != np.float32:
            raise EngineInputError("pcm", f"must be float32, got {pcm.dtype}")
        self._sample_count += pcm.shape[0]
        if self.live:
            self._pending_pcm = np.concatenate([self._pending_pcm, pcm])
        engine = self._engine
        # Only whole frames: frame k needs the audio up to (k + 1) / fps seconds.
        complete = self._sample_count * engine.fps // engine.audio_rate
        if self.live:
            burst = engine.options.burst_frames
            groups = max(0, complete - self.lookahead_frames + burst - 1) // burst
            complete = min(complete, groups * burst)
        return self._render_until(complete)

    def finish(self) -> list[np.ndarray]:
        if self._finished:
            return []
        self._finished = True
        engine = self._engine
        return self._render_until(frame_count(self._sample_count, engine.audio_rate, engine.fps))

    def interrupt(self) -> int:
        """Barge-in (see `AvatarStream.interrupt`): the held audio of the frames not
        returned yet (at most the part of one frame, look-ahead being 0) becomes zeros, so
        those frames carry audio level 0."""
        check_interruptible(self, self._finished)
        engine = self._engine
        affected = frames_with_audio(self._sample_count, engine.audio_rate, engine.fps)
        self._pending_pcm = np.zeros_like(self._pending_pcm)
        return max(0, affected - self._next_index)

    def _render_until(self, end_index: int) -> list[np.ndarray]:
        frames = []
        while self._next_index < end_index:
            level = self._take_level() if self.live else None
            frames.append(self._engine._render_frame(self._seed, self._next_index,
                                                     *self._size, level))
            self._next_index += 1
        return frames

    def _take_level(self) -> int:
        """The audio level of frame `_next_index`, whose audio leaves the held audio."""
        engine = self._engine
        start = frame_start_sample(self._next_index, engine.audio_rate, engine.fps)
        end = frame_start_sample(self._next_index + 1, engine.audio_rate, engine.fps)
        own = self._pending_pcm[: end - start]  # shorter at finish() after a partial frame
        self._pending_pcm = self._pending_pcm[end - start :]
        return audio_level(own)


class FakeAvatarEngine(AvatarEngine):
    """Test-pattern avatar engine with injectable faults (see the module docstring)."""

    name: ClassVar[str] = "fake"
    needs_worker_context: ClassVar[bool] = True  # faults target workers and attempts
    # Streams share nothing but the avatar cache, which `_cache_lock` guards; frames are a
    # pure function of (seed, index).
    thread_safe: ClassVar[bool] = True

    def __init__(
        self,
        device: str = "cpu",
        options: FakeOptions | dict[str, Any] | None = None,
        progress: ProgressFn = no_progress,
        context: WorkerContext = STANDALONE,
    ):
        self.options = parse_fake_options(options, "engines.options.fake")
        self.context = context
        self.device = device
        self._cache_lock = threading.Lock()
        self._streams_opened = 0
        self._token = object()  # marks the avatar states this engine made
        self.fps = self.options.fps
        self.audio_rate = self.options.audio_rate
        self.frame_height = self.options.height
        self.frame_width = self.options.width
        self._avatars: collections.OrderedDict[str, AvatarState] = collections.OrderedDict()
        self._load = _FakeLoad(self.kind, self.options, context, progress)
        self._load.load_weights()
        self._load.warm_up(lambda: expected_frame(0, 0, self.frame_height, self.frame_width))

    def report(self) -> EngineReport:
        return self._load.report(self.device)

    def close(self) -> None:
        self._load.ballast = None
        with self._cache_lock:
            self._avatars.clear()

    def default_portrait(self) -> np.ndarray:
        """A flat grey portrait: the fake engine renders test patterns whatever the face."""
        return np.full((self.frame_height, self.frame_width, 3), 128, np.uint8)

    def register(self, image: bytes | np.ndarray) -> AvatarState:
        height, width = self.frame_height, self.frame_width
        if isinstance(image, bytes | bytearray | memoryview):
            data = bytes(image)
            if not data:
                raise EngineInputError("image", "must not be empty")
            avatar_id = hashlib.sha256(data).hexdigest()
            if self.options.portrait_size:
                width, height = _image_file_size(data)
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise EngineInputError(
                    "image", f"must be an (H, W, 3) uint8 array, got {image.shape} {image.dtype}"
                )
            if image.size == 0:
                raise EngineInputError("image", "must not be empty")
            # The shape is hashed too, so two arrays with the same bytes but different
            # shapes are different avatars.
            digest = hashlib.sha256(f"{image.shape[0]}x{image.shape[1]}x3:".encode())
            digest.update(np.ascontiguousarray(image).tobytes())
            avatar_id = digest.hexdigest()
            if self.options.portrait_size:
                height, width = image.shape[:2]
                if width < 4:
                    raise EngineInputError("image", f"is {width} px wide; the fake engine's "
                                           "frames need at least 4")
        else:
            raise EngineInputError(
                "image", f"must be bytes or an array, got {type(image).__name__}"
            )

        # Look-up, move and eviction as one step: another job thread may evict between them.
        with self._cache_lock:
            cached = self._avatars.get(avatar_id)
            if cached is not None:
                self._avatars.move_to_end(avatar_id)
                return cached
            payload = None
            if self.options.avatar_state_kb:
                payload = np.ones(self.options.avatar_state_kb * 1024, np.uint8)  # touched
            state = AvatarState(
                avatar_id=avatar_id, width=width, height=height,
                payload=payload, extras={"engine": self._token},
            )
            self._avatars[avatar_id] = state
            while len(self._avatars) > self.options.cache_size:
                self._avatars.popitem(last=False)
            return state

    def cached_avatars(self) -> int:
        """Avatars this engine's cache holds (the worker reports it in heartbeats)."""
        with self._cache_lock:
            return len(self._avatars)

    def open_stream(self, state: AvatarState, seed: int, live: bool = False
                    ) -> FakeAvatarStream:
        # Like the real engines, a stream needs only the state, which the caller may keep
        # after this cache let it go; a state this engine did not make is refused.
        if not isinstance(state, AvatarState) or state.extras.get("engine") is not self._token:
            raise EngineInputError("avatar_id", f"{getattr(state, 'avatar_id', state)!r} is "
                                   "not registered with this engine")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise EngineInputError("seed", f"must be an int, got {type(seed).__name__}")
        with self._cache_lock:
            self._streams_opened += 1
        return FakeAvatarStream(self, state, int(seed), live=bool(live))

    def counters(self) -> dict[str, float]:
        """Streams opened since load (batch and live), so tests can see the heartbeat's
        `engine_counters` path work end to end."""
        with self._cache_lock:
            return {"streams_opened": self._streams_opened}

    def _render_frame(self, seed: int, index: int, height: int, width: int,
                      audio_level: int | None = None) -> np.ndarray:
        options = self.options
        if options.faults_apply(self.context):
            if index == options.error_at_frame:
                raise RuntimeError(f"fake engine: injected render error at frame {index}")
            if index == options.crash_at_frame:
                _crash(options, self.context, f"at frame {index}")
            if index == options.hang_at_frame:
                _hang(self.context, f"at frame {index}")
        _spend(options.frame_ms / 1000.0, options.frame_busy)
        return expected_frame(seed, index, height, width, audio_level)


# ---------------------------------------------------------------------------- TTS

WORD_S = 0.25  # tone length of one word
WORD_GAP_S = 0.05  # silence between words
SENTENCE_GAP_S = 0.15  # silence after each sentence
TONE_AMPLITUDE = 0.3
RAMP_S = 0.005  # fade in/out of each tone, so bursts do not click
VOICE_BASE_HZ = {"fake-a": 220.0, "fake-b": 330.0}


def _split_sentences(text: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part.strip()]


class FakeTTSEngine(TTSEngine):
    """Speaks each word as a tone burst whose pitch depends on the word and the voice.
    The audio is a pure function of (text, voice)."""

    name: ClassVar[str] = "fake"
    needs_worker_context: ClassVar[bool] = True  # faults target workers and attempts

    def __init__(
        self,
        device: str = "cpu",
        options: FakeOptions | dict[str, Any] | None = None,
        progress: ProgressFn = no_progress,
        context: WorkerContext = STANDALONE,
    ):
        self.options = parse_fake_options(options, "engines.options.fake")
        self.context = context
        self.device = device
        self.sample_rate = 16000
        self.max_text_chars = self.options.tts_max_text_chars or None
        self._load = _FakeLoad(self.kind, self.options, context, progress)
        self._load.load_weights()
        self._load.warm_up(lambda: self._sentence_audio("warm up.", FAKE_VOICES[0]))

    def report(self) -> EngineReport:
        return self._load.report(self.device)

    def close(self) -> None:
        self._load.ballast = None

    def voices(self) -> list[str]:
        return list(FAKE_VOICES)

    def stream(self, text: str, voice: str | None = None,
               warn: TextWarnFn = no_text_warning) -> Iterator[np.ndarray]:
        # Validate before the first yield so bad input fails at the call, not mid-stream.
        # Every word becomes a tone, whatever its script: nothing is left out, no warning.
        if not isinstance(text, str) or not text.strip():
            raise EngineInputError("text", "must be a non-empty string")
        if self.max_text_chars is not None and len(text) > self.max_text_chars:
            raise EngineInputError("text", f"is {len(text)} characters long; the limit is "
                                   f"{self.max_text_chars}")
        refused = self.options.tts_refuse_word.lower()
        if refused and refused in (w.lower() for w in re.findall(r"\w+", text)):
            raise EngineInputError("text", f"holds {refused!r}, which this fake voice "
                                   "cannot say (engines.options.fake.tts_refuse_word)")
        chosen = FAKE_VOICES[0] if voice is None else voice
        if chosen not in FAKE_VOICES:
            raise EngineInputError("voice", f"unknown voice {voice!r} (known: {FAKE_VOICES})")
        return self._stream(text, chosen)

    def _stream(self, text: str, voice: str) -> Iterator[np.ndarray]:
        for sentence in _split_sentences(text):
            _spend(self.options.sentence_ms / 1000.0, busy=False)
            yield self._sentence_audio(sentence, voice)

    def _sentence_audio(self, sentence: str, voice: str) -> np.ndarray:
        rate = self.sample_rate
        word_samples = round(WORD_S * rate)
        ramp_samples = round(RAMP_S * rate)
        envelope = np.ones(word_samples, np.float32)
        envelope[:ramp_samples] = np.linspace(0, 1, ramp_samples, dtype=np.float32)
        envelope[-ramp_samples:] = np.linspace(1, 0, ramp_samples, dtype=np.float32)
        time_s = np.arange(word_samples, dtype=np.float64) / rate
        parts: list[np.ndarray] = []
        for word in re.findall(r"\w+", sentence):
            # crc32, unlike hash(), is the same in every process.
            pitch_hz = VOICE_BASE_HZ[voice] + 20.0 * (zlib.crc32(word.lower().encode()) % 20)
            tone = np.sin(2 * np.pi * pitch_hz * time_s).astype(np.float32)
            parts.append(TONE_AMPLITUDE * envelope * tone)
            parts.append(np.zeros(round(WORD_GAP_S * rate), np.float32))
        parts.append(np.zeros(round(SENTENCE_GAP_S * rate), np.float32))
        return np.concatenate(parts).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- ASR

ASR_WINDOW_S = 0.01  # loudness is judged per 10 ms window
ASR_SILENCE_LEVEL = 0.01  # peak below this is silence
ASR_MIN_RUN_S = 0.02  # shorter sounds are clicks, not speech
ASR_SECONDS_PER_WORD = 0.5
ASR_VOCABULARY = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


class FakeASREngine(ASREngine):
    """Hears one word per 0.5 s of non-silent audio (at least one per sound), named from
    a fixed vocabulary in order. The transcript is a pure function of the audio."""

    name: ClassVar[str] = "fake"
    needs_worker_context: ClassVar[bool] = True  # faults target workers and attempts

    def __init__(
        self,
        device: str = "cpu",
        options: FakeOptions | dict[str, Any] | None = None,
        progress: ProgressFn = no_progress,
        context: WorkerContext = STANDALONE,
    ):
        self.options = parse_fake_options(options, "engines.options.fake")
        self.context = context
        self.device = device
        self._load = _FakeLoad(self.kind, self.options, context, progress)
        self._load.load_weights()
        self._loaded = False  # the warm-up call spends no time and hangs nowhere
        self._load.warm_up(lambda: self.transcribe(np.zeros(1600, np.float32), 16000))
        self._loaded = True

    def report(self) -> EngineReport:
        return self._load.report(self.device)

    def close(self) -> None:
        self._load.ballast = None

    def transcribe(self, pcm: np.ndarray, sample_rate: int,
                   progress: AudioProgressFn = no_audio_progress) -> Transcript:
        """As `ASREngine.transcribe`. The work (`transcribe_ms_per_s` per second of input)
        is spent one second of audio at a time, with a progress call after each;
        `transcribe_hang_at_s` hangs when the work reaches that second."""
        if not isinstance(pcm, np.ndarray) or pcm.ndim != 1:
            raise EngineInputError("pcm", "must be a 1-D numpy array of mono samples")
        if not np.issubdtype(pcm.dtype, np.floating):
            raise EngineInputError("pcm", f"must be float32, got {pcm.dtype}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
            raise EngineInputError("sample_rate", f"must be a positive int, got {sample_rate!r}")
        duration_s = pcm.shape[0] / sample_rate
        self._work(duration_s, progress)
        window = max(1, round(ASR_WINDOW_S * sample_rate))
        window_count = pcm.shape[0] // window
        if window_count == 0:
            return Transcript(language="en", duration_s=duration_s, segments=())
        peaks = np.abs(pcm[: window_count * window]).reshape(window_count, window).max(axis=1)
        loud = peaks >= ASR_SILENCE_LEVEL

        segments: list[Segment] = []
        word_number = 0
        # Runs of loud windows: edges where `loud` flips.
        edges = np.flatnonzero(np.diff(np.concatenate(([False], loud, [False])).astype(np.int8)))
        for start_window, end_window in zip(edges[0::2], edges[1::2], strict=True):
            # Python floats, not numpy scalars, so transcripts serialize anywhere.
            start_s = int(start_window) * window / sample_rate
            end_s = int(end_window) * window / sample_rate
            if end_s - start_s < ASR_MIN_RUN_S:
                continue
            word_total = max(1, round((end_s - start_s) / ASR_SECONDS_PER_WORD))
            step_s = (end_s - start_s) / word_total
            words = []
            for k in range(word_total):
                text = ASR_VOCABULARY[word_number % len(ASR_VOCABULARY)]
                word_number += 1
                words.append(
                    Word(
                        text=text,
                        start_s=round(start_s + k * step_s, 3),
                        end_s=round(start_s + (k + 1) * step_s, 3),
                        probability=0.9,
                    )
                )
            segments.append(
                Segment(
                    text=" ".join(w.text for w in words),
                    start_s=round(start_s, 3),
                    end_s=round(end_s, 3),
                    words=tuple(words),
                )
            )
        return Transcript(language="en", duration_s=duration_s, segments=tuple(segments))

    def _work(self, duration_s: float, progress: AudioProgressFn) -> None:
        """Spend the configured compute time second by second, reporting each, and hang
        where asked."""
        options = self.options
        if not self._loaded:
            return
        faults = options.faults_apply(self.context)
        done_s = 0.0
        while True:
            if faults and 0 <= options.transcribe_hang_at_s <= done_s:
                _hang(self.context, f"transcribing at {done_s:g} s of the audio")
            if done_s >= duration_s:
                break
            _spend(options.transcribe_ms_per_s / 1000.0 * min(1.0, duration_s - done_s),
                   busy=False)
            done_s = min(duration_s, done_s + 1.0)
            progress(done_s)
