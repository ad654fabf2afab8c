"""Engine interfaces: the small contracts every TTS, ASR and avatar engine keeps.

Engines are loaded inside worker processes only (never in the supervisor, which must not
import torch). A worker builds an engine through `avatard.engines.registry.load_engine`,
which passes the engine's typed options (parsed from its config table by the engine's
options class, see `avatard.engines.options`), the device string (``"cpu"``,
``"cuda:0"``), a progress callback that feeds the LOADING stage of the handshake and, to
engines that declare `needs_worker_context`, a `WorkerContext`.

Conventions shared by every engine:
- Audio is mono float32 PCM in [-1, 1] as a 1-D numpy array plus its sample rate.
- Frames are (H, W, 3) uint8 RGB numpy arrays, C-contiguous.
- Bad input raises `EngineInputError(field, rule)`; the worker turns it into an error
  reply naming the field and the rule. Any other exception is an engine fault.
- Everything an engine does per job is a deterministic function of the inputs and the job
  seed, so a job re-run after a worker crash reproduces the same frames.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

# Called by an engine while it loads: (stage name, progress in [0, 1]).
ProgressFn = Callable[[str, float], None]


def no_progress(stage: str, fraction: float) -> None:
    """Progress callback for callers that do not report loading stages."""


# Called by a TTS engine for input it speaks but not as given (words left out): a message
# for people, naming what was left out and why. The worker sends it to the client as a
# `warning` event (code `text_dropped`, field `text`); the speech goes on.
TextWarnFn = Callable[[str], None]


def no_text_warning(message: str) -> None:
    """Warning callback for callers that do not pass warnings on."""


# Called by an ASR engine while it transcribes: seconds of the input done so far (a float,
# never decreasing, the input's duration at the end). The worker turns each call into job
# progress, which is what keeps the daemon's stall watchdog (`timeouts.stall_timeout_s`)
# from killing a worker that transcribes a long input; the callback may raise (a cancel, a
# shutdown) to stop the transcription.
AudioProgressFn = Callable[[float], None]


def no_audio_progress(done_s: float) -> None:
    """Transcription progress callback for callers that do not watch it."""


@dataclass(frozen=True)
class WorkerContext:
    """Which worker slot loads an engine and which load attempt this is, for engines that
    act on it (the fake engines aim their injected faults with it). Only engines whose
    class sets `needs_worker_context` receive it, as the `context=` constructor argument."""

    worker_index: int  # the worker slot, 0-based
    attempt: int  # load attempt of that slot, 1-based (a restart after a crash is 2)

    def __post_init__(self) -> None:
        for name, smallest in (("worker_index", 0), ("attempt", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ValueError(f"WorkerContext.{name} must be an int >= {smallest}, "
                                 f"got {value!r}")


# The context of an engine loaded outside the daemon (a test, a benchmark): worker 0, first
# attempt.
STANDALONE = WorkerContext(worker_index=0, attempt=1)


class EngineInputError(ValueError):
    """Input an engine refuses: names the offending field and the rule it broke."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


@dataclass(frozen=True)
class EngineReport:
    """What an engine tells the READY handshake about itself."""

    name: str
    kind: str  # "tts" | "asr" | "avatar"
    device: str
    memory_bytes: int  # device memory (GPU) or RSS growth (CPU) caused by loading
    warmup_s: float  # time of the warm-up call made at load
    notes: str = ""  # e.g. "RANDOM WEIGHTS" for benchmark-only modes


class Engine(abc.ABC):
    """Base of every engine. Subclasses set `name` and `kind`."""

    name: ClassVar[str]
    kind: ClassVar[str]
    # Whether several job threads of one worker (daemon.jobs_per_worker > 1) may call this
    # engine at the same time: its methods, and those of the streams it opens, on
    # different streams. False makes the worker serialise every call into it with one
    # lock; set True only where shared state (caches, detectors, models) is guarded.
    thread_safe: ClassVar[bool] = False
    # Whether the constructor takes `context: WorkerContext` (see `WorkerContext`). Only
    # engines that act on the worker slot or load attempt set it; `load_engine` passes the
    # context to those alone, so the others' constructors stay (device, options, progress).
    needs_worker_context: ClassVar[bool] = False

    @abc.abstractmethod
    def report(self) -> EngineReport:
        """Device, memory and warm-up figures for the handshake."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory and files. Called once when the worker stops."""


# ---------------------------------------------------------------------------- TTS


@dataclass(frozen=True)
class Voice:
    """One voice of a TTS engine, as `TTSEngine.voice_list()` describes it."""

    name: str  # what the `voice` argument of `stream` accepts
    # Language codes the voice speaks, as it declares them ("en_US", "ru", "fr-fr"); its
    # text is checked against their scripts (engines/speech_text.py). (): it declares none,
    # and its text is not checked.
    languages: tuple[str, ...]
    sample_rate: int  # Hz of the float32 PCM `stream` yields for this voice


class TTSEngine(Engine):
    kind: ClassVar[str] = "tts"
    sample_rate: int
    # The longest text one `stream` call takes, in characters (its option
    # `max_text_chars`), or None for no limit. Callers with longer text (a live session's
    # reply) cut it with `engines.audio.pack_sentences` rather than have it refused.
    max_text_chars: int | None = None

    @abc.abstractmethod
    def voices(self) -> list[str]:
        """Names accepted by the `voice` argument (the first is the default)."""

    def voice_languages(self, voice: str) -> tuple[str, ...]:
        """Language codes `voice` (one of `voices()`) speaks; () when it declares none.
        Engines that check text against a voice's languages override this."""
        return ()

    def voice_list(self) -> list[Voice]:
        """Every voice of `voices()`, in the same order (the first is the default), with
        its languages and the sample rate of its PCM (`sample_rate`: engines resample
        every voice to one rate)."""
        return [Voice(name, self.voice_languages(name), int(self.sample_rate))
                for name in self.voices()]

    def voices_by_language(self) -> dict[str, str]:
        """Routing of text the default voice cannot read, when a request names no voice:
        language code -> voice name (the first whose language reads the text speaks it).
        {} when the engine routes nothing to other voices."""
        return {}

    @abc.abstractmethod
    def stream(self, text: str, voice: str | None = None,
               warn: TextWarnFn = no_text_warning) -> Iterator[np.ndarray]:
        """Yield float32 PCM at `self.sample_rate`, one chunk per sentence, as soon as
        each sentence is synthesized. Text and voice are checked at the call (bad ones
        raise `EngineInputError` naming "text" or "voice"); words the voice cannot read
        that are left out of the speech are told to `warn`, once per call, before the
        first chunk."""

    def synthesize(self, text: str, voice: str | None = None,
                   warn: TextWarnFn = no_text_warning) -> tuple[np.ndarray, int]:
        """The whole utterance at once: (pcm, sample_rate)."""
        chunks = list(self.stream(text, voice, warn))
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return pcm.astype(np.float32, copy=False), self.sample_rate


# ---------------------------------------------------------------------------- ASR


@dataclass(frozen=True)
class Word:
    text: str
    start_s: float
    end_s: float
    probability: float


@dataclass(frozen=True)
class Segment:
    text: str
    start_s: float
    end_s: float
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    language: str
    duration_s: float
    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments).strip()


# The most input audio an ASR engine transcribes between two progress calls, in seconds:
# Whisper's own 30 s window (one encoder pass and its decode, about 1-4 s of CPU time for
# tiny.en on a 2-core VM), far inside the default 30 s stall timeout.
MAX_PROGRESS_GAP_S = 30.0


class ASREngine(Engine):
    kind: ClassVar[str] = "asr"
    sample_rate: int = 16000  # rate the engine wants; callers resample to it

    @abc.abstractmethod
    def transcribe(self, pcm: np.ndarray, sample_rate: int,
                   progress: AudioProgressFn = no_audio_progress) -> Transcript:
        """Transcribe mono float32 PCM (shape (n,), in [-1, 1]) at `sample_rate` Hz with
        word timings in seconds of the input's timeline.

        `progress(done_s)` is called as the work advances, at least once per
        `MAX_PROGRESS_GAP_S` of input audio (whatever it holds: speech or silence), and
        once with the whole duration at the end: the daemon's stall watchdog sees a
        transcription that makes no call for `timeouts.stall_timeout_s` as a hung worker.
        Whatever `progress` raises ends the transcription and propagates. Bad input
        raises `EngineInputError` naming the field ("audio", "sample_rate"); input over
        the engine's length limit names the option that sets it."""


# ---------------------------------------------------------------------------- avatar


@dataclass
class AvatarState:
    """Once-per-avatar state. `avatar_id` is the content hash of the source image;
    `width` x `height` the pixels of every frame rendered for it (the engine's fixed size,
    or the portrait's own for engines that paste back into it, such as Ditto): the daemon
    announces it to clients and refuses a portrait whose frames do not fit its frame
    slots; `payload` is engine-specific (landmarks, cached features, tensors...)."""

    avatar_id: str
    width: int
    height: int
    payload: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


class AvatarStream(abc.ABC):
    """One job's rendering session. Audio arrives in chunks; frames leave as soon as they
    exist, in order, numbered 0, 1, 2, ... (frame k shows the audio of seconds
    [k / fps, (k + 1) / fps), samples [ceil(k * audio_rate / fps), ceil((k + 1) * audio_rate /
    fps)) of the pushed audio: "the audio of frame k").

    Determinism: frame k is a function of (avatar, seed, the pushed audio, k) and, for a
    live stream, of where in the sequence of push() calls each interrupt() came. A stream
    re-run with the same inputs and calls gives the same frames bit for bit.

    Live streams (`AvatarEngine.open_stream(..., live=True)`) are fed forever: the live
    clock pushes one frame of audio per 1 / fps (the client's speech, or silence when none
    is queued: idle motion is the model fed silence) and sends the frames push() returns.
    They are never finish()ed in normal operation (finish() still works and returns the
    frames of the audio pushed so far). Only live streams accept interrupt() (barge-in).

    Calls on one stream come from one thread at a time; push(), finish() and interrupt()
    are engine calls (the worker holds the engine's lock around each, and around each step
    of an iterator that push() returns)."""

    # Set by `AvatarEngine.open_stream(..., live=True)`.
    live: bool = False

    @abc.abstractmethod
    def push(self, pcm: np.ndarray) -> Iterable[np.ndarray]:
        """Feed the next chunk of audio and return the frames that became ready, in order.

        pcm: mono float32 PCM in [-1, 1] at the engine's `audio_rate`, shape (n,), any n
        >= 0 (the chunking does not change any frame). Returns (H, W, 3) uint8 RGB frames,
        as a list or as an iterator that does the work while it is read (Ditto); an
        iterator must be read to the end before the next push(), finish() or interrupt().
        Bad audio raises `EngineInputError("audio" or "pcm", rule)`; a push after finish()
        raises (RuntimeError or EngineInputError, per engine)."""

    @abc.abstractmethod
    def finish(self) -> Iterable[np.ndarray]:
        """No more audio: return the remaining frames. The total frame count is
        round(audio_seconds * fps) so audio and video lengths agree within a frame."""

    @property
    def lookahead_frames(self) -> int:
        """Frames of audio past frame k that must have been pushed before push() returns
        frame k: with audio pushed one frame per call, frame k leaves at the latest in the
        call that pushes the audio of frame k + lookahead_frames (some engines return some
        frames earlier: Ditto's online scheme returns them in tens). 0 means frame k
        leaves as soon as its own audio is complete. The live clock's delay between audio
        in and its frame out is lookahead_frames / fps (plus compute time).

        Constant for a stream's lifetime. Engines that do not state it raise
        NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} does not state its look-ahead")

    @property
    def burst_frames(self) -> int:
        """The period, in pushes of one frame of audio each, of the pattern in which the
        stream returns frames: 1 for a stream that returns a frame per push, the window
        step for one that computes frames in bursts (Ditto online: 10). The pattern
        depends only on the count of pushes, so live streams whose push counts agree
        modulo `burst_frames` compute their bursts in the same tick: the worker aligns its
        live sessions' clocks that way, so that one batch of the engine serves all of
        them. Constant for a stream's lifetime."""
        return 1

    def set_due(self, start_s: float) -> None:  # noqa: B027 - optional hook
        """Frame k of this stream will be sent at `time.monotonic()` value
        `start_s + k / fps` (the live clock says so once it starts, and again when it
        restarts after falling behind). Engines that order shared work by when its frames
        are due (Ditto's batchers) use it; by default a stream's frames count as due from
        its opening. May be called from another thread than push()."""

    def interrupt(self) -> int:
        """Barge-in: the audio pushed so far whose frames have not been returned becomes
        silence.

        Every pushed sample of a frame k >= F (F = frames returned so far) is treated from
        now on as if it had been zeros: the stream drops or recomputes whatever internal
        work depended on it (buffered audio, features, queued motion) so that every frame
        still to come is computed from silence in its place, and the frames after the
        interrupt show the mouth returning to rest the way the model does with silence
        (state that already shaped returned frames, such as smoothed or fused motion, is
        kept, so the pose does not jump). Frames returned before the call are not changed;
        through their look-ahead they may already have shown part of the silenced audio.
        Frame indices stay continuous: the next frame returned is frame F. Audio pushed
        after the call is used as pushed.

        No frame is being rendered when interrupt() may be called: it is called between
        pushes, after the previous push's frames were all read, and every engine hands out
        each frame it submitted for rendering before that push's frames end. Nothing that
        was rendered is recalled or dropped.

        Returns the number of frames whose pushed audio was silenced: frames F .. L, L the
        last frame with at least one pushed sample (0 when all pushed audio has its frames
        returned). The caller replaces the audio it holds for those frames with silence.

        Raises RuntimeError on a stream that is not live, after finish(), or while the
        iterator of the last push() is not read to the end."""
        raise NotImplementedError(f"{type(self).__name__} does not support interrupt()")


def frame_start_sample(index: int, audio_rate: int, fps: int) -> int:
    """First sample of frame `index`'s audio: ceil(index * audio_rate / fps)."""
    return -(-index * audio_rate // fps)


def frames_with_audio(sample_count: int, audio_rate: int, fps: int) -> int:
    """How many frames hold at least one of the first `sample_count` samples: those whose
    first sample (`frame_start_sample`) is below sample_count."""
    if sample_count <= 0:
        return 0
    # ceil(k * rate / fps) < n  <=>  k * rate / fps <= n - 1 for integer n.
    return (sample_count - 1) * fps // audio_rate + 1


def check_interruptible(stream: AvatarStream, finished: bool) -> None:
    """The RuntimeError interrupt() raises on a stream that cannot take one."""
    if not stream.live:
        raise RuntimeError(f"interrupt() needs a live stream (open_stream(..., live=True)); "
                           f"this {type(stream).__name__} is not live")
    if finished:
        raise RuntimeError(f"interrupt() after finish() on a {type(stream).__name__}")


class AvatarEngine(Engine):
    kind: ClassVar[str] = "avatar"
    fps: int = 25
    audio_rate: int = 16000
    frame_height: int = 512
    frame_width: int = 512

    @abc.abstractmethod
    def register(self, image: bytes | np.ndarray) -> AvatarState:
        """Validate a portrait (encoded image bytes or an RGB uint8 array), compute the
        once-per-avatar state and cache it by content hash."""

    def default_portrait(self) -> bytes | np.ndarray | None:
        """The portrait used when a job names no avatar (None: the engine has none)."""
        return None

    def counters(self) -> dict[str, float]:
        """Running totals since load that explain the engine's speed (names -> counts;
        at most 64), sent with every worker heartbeat and shown per worker under
        `engine_counters` in `avatard stats`. Default: none."""
        return {}

    @abc.abstractmethod
    def open_stream(self, state: AvatarState, seed: int, live: bool = False) -> AvatarStream:
        """Start rendering a job for a registered avatar. `seed` (int) fixes the job's
        randomness. `live=True` opens a live stream (see `AvatarStream`): fed forever,
        interruptible, and run in the engine's lowest-latency scheme (Ditto: "online").
        An unregistered avatar or a bad seed raises EngineInputError."""

    def render(self, state: AvatarState, pcm: np.ndarray, seed: int) -> Iterator[np.ndarray]:
        """Offline convenience: all audio at once, frames as they come."""
        stream = self.open_stream(state, seed)
        yield from stream.push(pcm)
        yield from stream.finish()
