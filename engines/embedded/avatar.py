"""Embedded default avatar engine: animates a frontal portrait from audio on the CPU.

Nothing is downloaded: faces are found with the Haar cascades inside the
`opencv-python-headless` wheel (see `landmarks.py`), and the portrait is animated by a
smooth mesh warp (see `warp.py`). Per frame, the audio around the frame gives a mouth
opening (loudness, weighted to vowel-like low bands) and a lip shape (spectral centroid:
bright sounds spread the lips, dark ones round them); a seeded RNG gives blinks, breathing
and slow head motion, in batch jobs and live streams alike. A 512x512 frame costs a few
milliseconds on one core (docs/embedded-avatar.md).

Image limits of `register`: 64..8192 px per side, at most 40 megapixels, formats PNG, JPEG,
WebP and BMP (or an (H, W, 3) uint8 RGB array).
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources

import numpy as np

from avatard.ipc.procmem import rss_bytes

from ..base import (
    AvatarEngine,
    AvatarState,
    AvatarStream,
    EngineInputError,
    EngineReport,
    ProgressFn,
    check_interruptible,
    frames_with_audio,
    no_progress,
)
from ..images import DecodedImage, decode_image, parse_colour
from ..options import as_options
from .landmarks import FaceLandmarks, NoFaceError, find_landmarks, load_detectors
from .options import EmbeddedAvatarOptions
from .warp import FacePose, Rig, build_rig, frame_portrait, render_frame

MIN_SIDE_PX = 64
MAX_SIDE_PX = 8192
MAX_PIXELS = 40_000_000
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # camera "MPO" JPEGs count as JPEG

FPS = 25
AUDIO_RATE = 16000
HOP = AUDIO_RATE // FPS  # 640 samples of audio per video frame
MAX_PCM_PEAK = 2.0  # codec overshoot is tolerated up to here (as in engines/audio.py)
# Each frame is analysed over a 64 ms window centred one frame ahead of the frame's own
# middle: lips move a little before the sound they make, and the window needs this much
# audio past the end of the frame before the frame can be drawn.
WINDOW = 1024
LEAD = HOP
LOOKAHEAD_SAMPLES = HOP // 2 + LEAD + WINDOW // 2 - HOP  # 832: past the frame's end
_HANN = np.hanning(WINDOW).astype(np.float32)
_FREQS = np.fft.rfftfreq(WINDOW, 1.0 / AUDIO_RATE)
_LOW_BAND = (_FREQS >= 350) & (_FREQS < 1200)  # open vowels' first formant
_MID_BAND = (_FREQS >= 1200) & (_FREQS < 2500)
_MURMUR_BAND = (_FREQS >= 80) & (_FREQS < 350)  # nasal murmur and voicing bar: lips shut
_HIGH_BAND = (_FREQS >= 2500) & (_FREQS < 7000)  # fricatives, sibilants
_SPEECH_BAND = (_FREQS >= 100) & (_FREQS < 7000)

# Loudness mapping: below SILENCE_DB the mouth is shut; at LOUD_DB it is fully open.
SILENCE_DB = -45.0
LOUD_DB = -14.0
# One-pole smoothing per frame: the mouth opens fast and closes a bit slower, as jaws do.
OPEN_ATTACK = 0.7
OPEN_RELEASE = 0.35
SPREAD_RATE = 0.4
NOD_RATE = 0.08
# After a barge-in the mouth goes to rest over this many frames: frame j of them (j = 1, 2,
# 3) shows 1 - j / 3 of the opening and lip spread the mouth had at the interrupt, so each
# step is a third of that opening, less than the ordinary release step from it
# (OPEN_RELEASE = 0.35 of it): quick, never a jump.
INTERRUPT_CLOSE_FRAMES = 3

# Blinks: 2-6 s apart (mean 4 s: 15 a minute, the resting rate of adults is 15-20), each
# about 160 ms (4 frames; a full blink lasts 100-400 ms) with this closure profile: the lid
# falls faster than it rises, as real lids do.
BLINK_INTERVAL_S = (2.0, 6.0)
BLINK_PROFILE = (0.55, 1.0, 0.7, 0.3)
# Breathing: each breath lasts 3-5 s (12-20 breaths a minute, the adult resting range),
# drawn per breath, and raises head and shoulders by BREATH_RISE_PX times a per-breath
# depth of 0.75-1.25 (about 1.6 mm at the framing's ~12 px per cm of face: quiet breathing
# lifts the shoulders a few millimetres). Inhale over the first 40% of the breath, exhale
# over the next 45%, then a pause before the next one, as in quiet breathing (inhale to
# exhale about 1:1.5, with an end-expiratory pause).
BREATH_S = (3.0, 5.0)
BREATH_DEPTH = (0.75, 1.25)
BREATH_RISE_PX = 2.0
BREATH_INHALE = 0.40
BREATH_EXHALE = 0.45
# Head motion: sums of slow sinusoids, amplitudes in pixels / degrees.
HEAD_SHIFT_PX = 5.0
HEAD_ROLL_DEG = 3.0
SPEECH_NOD_PX = 2.5

_ASSET_PORTRAIT = "astronaut.jpg"


def default_portrait() -> np.ndarray:
    """The built-in portrait (RGB uint8, 512x512): NASA's public-domain photo of astronaut
    Eileen Collins, the picture scikit-image ships as `skimage.data.astronaut()`."""
    return _decoded_default_portrait().copy()  # a copy: callers may draw on it


@functools.cache
def _decoded_default_portrait() -> np.ndarray:
    asset = resources.files(__package__).joinpath("assets", _ASSET_PORTRAIT)
    try:
        data = asset.read_bytes()
    except (FileNotFoundError, OSError):
        try:  # an install that lost package data: scikit-image carries the same picture
            from skimage import data as skimage_data
        except ImportError as error:
            raise RuntimeError(
                f"the default portrait assets/{_ASSET_PORTRAIT} is missing from this install"
            ) from error
        return np.ascontiguousarray(skimage_data.astronaut()[..., :3])
    return decode_image(data).rgb


# ---------------------------------------------------------------------------- input


def _image_from_bytes(data: bytes, background: tuple[int, int, int]) -> DecodedImage:
    """Decode encoded image bytes (the shared decoder, `engines/images.py`) after checking
    format and size limits; transparency is composited over `background`."""
    return decode_image(
        data, background=background, formats=ACCEPTED_FORMATS, check_size=_check_size
    )


def _check_size(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE_PX:
        raise EngineInputError(
            "image", f"is {width}x{height} px; each side must be at least {MIN_SIDE_PX} px"
        )
    if max(width, height) > MAX_SIDE_PX or width * height > MAX_PIXELS:
        raise EngineInputError(
            "image",
            f"is {width}x{height} px; the limit is {MAX_SIDE_PX} px per side and "
            f"{MAX_PIXELS // 1_000_000} megapixels",
        )


def _image_from_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise EngineInputError(
            "image",
            f"an array must be (height, width, 3) uint8 RGB, got {array.shape} {array.dtype}",
        )
    _check_size(array.shape[1], array.shape[0])
    return np.ascontiguousarray(array)


def content_hash(image: bytes | np.ndarray) -> str:
    """sha256 of the encoded bytes, or of an array's shape, dtype and pixels."""
    digest = hashlib.sha256()
    if isinstance(image, bytes | bytearray | memoryview):
        digest.update(b"bytes:")
        digest.update(bytes(image))
    else:
        array = np.ascontiguousarray(image)
        digest.update(f"array:{array.shape}:{array.dtype}:".encode())
        digest.update(array.data)
    return digest.hexdigest()


@dataclass(frozen=True)
class EmbeddedAvatarPayload:
    """What `AvatarState.payload` holds for this engine."""

    rig: Rig
    source_landmarks: FaceLandmarks  # in the coordinates of the submitted picture


# ---------------------------------------------------------------------------- audio


def audio_features(window: np.ndarray) -> tuple[float, float]:
    """(mouth opening target in [0, 1], lip spread target in [-1, 1]) of one window.

    Loudness opens the mouth (with an expanding curve, so quiet consonants stay nearly
    shut); the share of energy in the first-formant band of open vowels opens it further,
    while nasal murmur (energy only under 350 Hz: m, n) and hiss keep it narrow. The
    spectral centroid sets the lip shape: bright sounds ("ee", "s") spread the lips, dark
    ones ("oo") round them.
    """
    tapered = window * _HANN
    rms = math.sqrt(float(np.mean(tapered * tapered)) / 0.375 + 1e-12)  # 0.375: Hann power
    level_db = 20.0 * math.log10(rms + 1e-9)
    level = min(max((level_db - SILENCE_DB) / (LOUD_DB - SILENCE_DB), 0.0), 1.0) ** 1.5
    if level == 0.0:
        return 0.0, 0.0
    power = np.abs(np.fft.rfft(tapered)) ** 2
    murmur = float(power[_MURMUR_BAND].sum())
    low = float(power[_LOW_BAND].sum())
    mid = float(power[_MID_BAND].sum())
    high = float(power[_HIGH_BAND].sum())
    total = murmur + low + mid + high + 1e-12
    low_share = low / total
    speech_power = power[_SPEECH_BAND]
    centroid = float((speech_power * _FREQS[_SPEECH_BAND]).sum() / (speech_power.sum() + 1e-12))
    opening = min(1.0, level * (0.25 + 1.1 * low_share))
    spread = level * min(max((centroid - 1400.0) / 1400.0, -1.0), 1.0)
    return opening, spread


# ---------------------------------------------------------------------------- motion


class _Motion:
    """Seeded blinks, breathing and head motion as functions of the frame index.

    Each has its own RNG stream derived from the seed, so adding one never changes the
    others. `blink` and `breath` draw their schedules lazily and forget the past: they must
    be asked for frames in non-decreasing order (a stream renders its frames in order), and
    then hold O(1) state however long a live stream runs."""

    def __init__(self, seed: int):
        seed_word = seed & 0xFFFF_FFFF_FFFF_FFFF  # default_rng wants a non-negative int
        head_rng = np.random.default_rng([seed_word, 1])
        # Three sinusoids per axis between 0.06 and 0.45 Hz: a slow, never-repeating sway.
        self._frequencies = head_rng.uniform(0.06, 0.45, size=(3, 3))
        self._phases = head_rng.uniform(0.0, 2.0 * np.pi, size=(3, 3))
        weights = head_rng.uniform(0.5, 1.0, size=(3, 3))
        self._weights = weights / weights.sum(axis=1, keepdims=True)
        self._blink_rng = np.random.default_rng([seed_word, 2])
        self._blink_starts: list[int] = []
        self._next_blink_s = float(self._blink_rng.uniform(0.6, 2.5))
        self._breath_rng = np.random.default_rng([seed_word, 3])
        # The current breath: (start s, duration s, depth). The first one began before
        # frame 0, at a random point of its cycle, so streams do not all start on an inhale.
        duration = float(self._breath_rng.uniform(*BREATH_S))
        start = -float(self._breath_rng.uniform(0.0, duration))
        self._breath = (start, duration, float(self._breath_rng.uniform(*BREATH_DEPTH)))

    def blink(self, frame: int) -> float:
        """Lid closure of `frame` in [0, 1] (0 open, 1 shut)."""
        # Blink start frames are drawn in order as far as needed, so the schedule does not
        # depend on how many frames were asked for before.
        while self._next_blink_s * FPS <= frame + len(BLINK_PROFILE):
            self._blink_starts.append(round(self._next_blink_s * FPS))
            self._next_blink_s += float(self._blink_rng.uniform(*BLINK_INTERVAL_S))
        # Starts before the latest one at or before `frame` can no longer be asked for.
        while len(self._blink_starts) > 1 and self._blink_starts[1] <= frame:
            del self._blink_starts[0]
        for start in reversed(self._blink_starts):
            if start <= frame:
                offset = frame - start
                return BLINK_PROFILE[offset] if offset < len(BLINK_PROFILE) else 0.0
        return 0.0

    def breath(self, frame: int) -> float:
        """Pixels head and shoulders are raised by the breath at `frame` (>= 0)."""
        seconds = frame / FPS
        start, duration, depth = self._breath
        while seconds >= start + duration:
            start += duration
            duration = float(self._breath_rng.uniform(*BREATH_S))
            depth = float(self._breath_rng.uniform(*BREATH_DEPTH))
        self._breath = (start, duration, depth)
        phase = (seconds - start) / duration  # [0, 1) through this breath
        # Raised-cosine ramps: zero slope at both ends, so the motion never jerks where
        # inhale, exhale and pause meet, and 0 at every breath's start and end.
        if phase < BREATH_INHALE:
            rise = 0.5 - 0.5 * math.cos(math.pi * phase / BREATH_INHALE)
        elif phase < BREATH_INHALE + BREATH_EXHALE:
            rise = 0.5 + 0.5 * math.cos(math.pi * (phase - BREATH_INHALE) / BREATH_EXHALE)
        else:
            rise = 0.0
        return BREATH_RISE_PX * depth * rise

    def head(self, frame: int) -> tuple[float, float, float]:
        """(dx px, dy px, roll degrees) of the idle sway."""
        seconds = frame / FPS
        waves = np.sin(2.0 * np.pi * self._frequencies * seconds + self._phases)
        dx, dy, roll = (self._weights * waves).sum(axis=1)
        return (
            float(dx) * HEAD_SHIFT_PX,
            float(dy) * HEAD_SHIFT_PX * 0.6,
            float(roll) * HEAD_ROLL_DEG,
        )


class EmbeddedAvatarStream(AvatarStream):
    """One job: audio in, frames out. Frame k needs audio up to (k+1)*640 + 832 samples:
    a look-ahead of 2 frames when audio is pushed a frame at a time."""

    def __init__(self, rig: Rig, seed: int, live: bool = False):
        self.live = live
        self._rig = rig
        self._motion = _Motion(seed)
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = 0  # absolute index of self._buffer[0]
        self._received = 0
        self._next_frame = 0
        self._open = 0.0
        self._spread = 0.0
        self._nod = 0.0
        # Set by interrupt(): (first frame after the barge-in, mouth opening and lip spread
        # at the barge-in) while the mouth is being closed; None otherwise.
        self._closing: tuple[int, float, float] | None = None
        self._finished = False
        # The pose of the last frame rendered (None before the first): what the audio and
        # the motion asked for, for tests and tools that read the drive, not the pixels.
        self.last_pose: FacePose | None = None

    def _window(self, frame: int) -> np.ndarray:
        """The analysis window of `frame`; samples outside the audio read as silence."""
        start = frame * HOP + HOP // 2 + LEAD - WINDOW // 2
        out = np.zeros(WINDOW, np.float32)
        lo, hi = max(start, self._buffer_start), min(start + WINDOW, self._received)
        if hi > lo:
            base = self._buffer_start
            out[lo - start : hi - start] = self._buffer[lo - base : hi - base]
        return out

    def _render(self, frame: int) -> np.ndarray:
        opening, spread = audio_features(self._window(frame))
        rate = OPEN_ATTACK if opening > self._open else OPEN_RELEASE
        self._open += rate * (opening - self._open)
        self._spread += SPREAD_RATE * (spread - self._spread)
        if self._closing is not None:
            self._close_after_interrupt(frame)
        self._nod += NOD_RATE * (self._open - self._nod)
        dx, dy, roll = self._motion.head(frame)
        pose = FacePose(
            mouth_open=self._open,
            lip_spread=self._spread,
            blink=self._motion.blink(frame),
            head_dx=dx,
            head_dy=dy + SPEECH_NOD_PX * self._nod,
            head_roll_deg=roll,
            breath_px=self._motion.breath(frame),
        )
        self.last_pose = pose
        return render_frame(self._rig, pose)

    def _close_after_interrupt(self, frame: int) -> None:
        """Drive the mouth to rest over the INTERRUPT_CLOSE_FRAMES frames right after a
        barge-in: opening and lip spread fall in even steps from where the returned frames
        left them, to exactly 0 on the last of those frames, whatever the audio says.

        The one-pole release alone (0.35 per frame) would take about 10 frames, which after
        a barge-in reads as the avatar mumbling on. Each even step is 1/3 of the opening at
        the barge-in, less than the first step of the ordinary release from that opening
        (0.35 of it: the step speech itself makes when a sound stops), so the close is
        quick but never a jump. The head nod follows the mouth at its own slow rate and
        keeps moving smoothly."""
        first, open_at_cut, spread_at_cut = self._closing
        step = frame - first + 1  # 1 on the first frame after the barge-in
        keep = max(0.0, 1.0 - step / INTERRUPT_CLOSE_FRAMES)
        self._open = open_at_cut * keep
        self._spread = spread_at_cut * keep
        if keep == 0.0:
            self._closing = None

    def _drain(self, available_frames: int) -> list[np.ndarray]:
        frames = []
        while self._next_frame < available_frames:
            frames.append(self._render(self._next_frame))
            self._next_frame += 1
        # Keep only the audio that later windows can still reach.
        keep_from = self._next_frame * HOP + HOP // 2 + LEAD - WINDOW // 2
        if keep_from > self._buffer_start:
            drop = min(keep_from - self._buffer_start, self._buffer.size)
            self._buffer = self._buffer[drop:]
            self._buffer_start += drop
        return frames

    @property
    def lookahead_frames(self) -> int:
        return -(-LOOKAHEAD_SAMPLES // HOP)  # 832 samples past the frame: 2 frames

    def interrupt(self) -> int:
        """Barge-in (see `AvatarStream.interrupt`): the pushed audio from sample 640F on
        (F = frames returned) becomes zeros. Frame F's window starts at 640F + 448, so
        every frame still to come is analysed over silence only, and its mouth closes
        from where the returned frames left it (the smoothing state is kept: no jump),
        at rest on frame F + 2 (INTERRUPT_CLOSE_FRAMES, `_close_after_interrupt`); audio
        pushed after the call cannot open it again before frame F + 3. Frames F-2 and F-1
        were returned, and their windows had already read the first 832 samples of frame
        F's audio: they stay as shown. Frames are drawn inside push(), so none is in
        flight."""
        check_interruptible(self, self._finished)
        self._closing = (self._next_frame, self._open, self._spread)
        cut = self._next_frame * HOP
        if self._received > cut:
            keep = max(0, cut - self._buffer_start)
            self._buffer = np.concatenate(
                [self._buffer[:keep], np.zeros(self._buffer.size - keep, np.float32)])
        return max(0, frames_with_audio(self._received, AUDIO_RATE, FPS) - self._next_frame)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        if self._finished:
            raise RuntimeError("push() after finish()")
        samples = np.asarray(pcm)
        if samples.dtype.kind != "f":
            raise EngineInputError(
                "audio", f"must be float PCM in [-1, 1], got {samples.dtype} samples"
            )
        if samples.ndim > 1 and samples.size != samples.shape[0]:
            raise EngineInputError("audio", f"must be mono, got shape {samples.shape}")
        chunk = samples.astype(np.float32, copy=False).reshape(-1)
        if not np.all(np.isfinite(chunk)):
            raise EngineInputError("audio", "contains NaN or infinite samples")
        peak = float(np.max(np.abs(chunk))) if chunk.size else 0.0
        if peak > MAX_PCM_PEAK:
            # Squaring 1e30 overflows float32 in the energy features; such samples are
            # integer PCM passed as float (or garbage), never speech in [-1, 1].
            raise EngineInputError("audio", f"samples must lie in [-1, 1]; peak is {peak:.3g}")
        self._buffer = np.concatenate([self._buffer, chunk])
        self._received += chunk.size
        # A frame is ready once its whole analysis window has arrived, and never beyond
        # the frame count the final length allows (round(samples / HOP) at finish).
        ready = max(0, (self._received - LOOKAHEAD_SAMPLES) // HOP)
        ready = min(ready, self._received // HOP)
        return self._drain(ready)

    def finish(self) -> list[np.ndarray]:
        if self._finished:
            return []
        self._finished = True
        total = round(self._received / HOP)
        return self._drain(total)


# ---------------------------------------------------------------------------- engine


def speech_like_signal(seconds: float, seed: int = 0) -> np.ndarray:
    """Synthetic speech-like audio at 16 kHz: voiced syllables (a buzzing glottal pulse
    train through vowel formants) at about 4 per second, with hissy consonants and pauses.
    Used for the warm-up render, the tests and the contact sheet."""
    rng = np.random.default_rng(seed)
    count = int(round(seconds * AUDIO_RATE))
    times = np.arange(count) / AUDIO_RATE
    pitch = 125.0 + 20.0 * np.sin(2 * np.pi * 0.7 * times)
    glottal = np.sign(np.sin(2 * np.pi * np.cumsum(pitch) / AUDIO_RATE)) * 0.5
    envelope = np.zeros(count)
    formant = np.zeros(count)
    hiss_gate = np.zeros(count)
    position = int(0.25 * AUDIO_RATE)
    while position < count:
        length = int(rng.uniform(0.14, 0.3) * AUDIO_RATE)
        end = min(position + length, count)
        shape = np.sin(np.linspace(0, np.pi, end - position)) ** 0.7
        envelope[position:end] = shape * rng.uniform(0.6, 1.0)
        formant[position:end] = rng.choice([300.0, 500.0, 700.0, 850.0])
        if rng.random() < 0.4:  # a fricative right before the vowel
            hiss_start = max(0, position - int(0.07 * AUDIO_RATE))
            hiss_gate[hiss_start:position] = 0.5
        gap = rng.uniform(0.02, 0.12) if rng.random() < 0.8 else rng.uniform(0.3, 0.5)
        position = end + int(gap * AUDIO_RATE)
    # Vowel colour: ring the glottal buzz at the syllable's first formant.
    vowel = glottal * (0.4 + 0.6 * np.cos(2 * np.pi * formant * times) ** 2)
    noise = rng.standard_normal(count)
    hiss = np.diff(noise, prepend=0.0) * 0.4  # differencing makes it high-pass (sibilant)
    signal = vowel * envelope + 0.8 * hiss * hiss_gate
    # Peak-normalise to 0.7, where TTS output and normalised recordings usually sit.
    peak = float(np.abs(signal).max()) if count else 0.0
    if peak > 0.0:
        signal *= 0.7 / peak
    return signal.astype(np.float32)


class EmbeddedAvatarEngine(AvatarEngine):
    """CPU talking-head engine that needs no model download. Options:
    `EmbeddedAvatarOptions` (cache_size, warmup)."""

    name = "embedded"
    # Streams own all their state and only read the avatar's rig; the cache and the shared
    # OpenCV face detectors (not safe to call from two threads) are guarded by locks.
    thread_safe = True

    def __init__(
        self,
        device: str = "cpu",
        options: EmbeddedAvatarOptions | dict | None = None,
        progress: ProgressFn = no_progress,
    ):
        self.options = as_options(EmbeddedAvatarOptions, options, "engines.options.embedded")
        if not str(device).startswith("cpu"):
            # Everything here is OpenCV/numpy on the CPU; a GPU would sit idle.
            device = "cpu"
        self.device = device
        self.cache_size = self.options.cache_size
        self.background = parse_colour(self.options.background)
        self._cache: OrderedDict[str, AvatarState] = OrderedDict()
        self._lock = threading.Lock()
        # The Haar cascades are process-wide objects whose detectMultiScale keeps scratch
        # state in the classifier: one registration detects at a time.
        self._detect_lock = threading.Lock()
        # Counters that show whether registrations hit the cache.
        self.cache_hits = 0
        self.cache_misses = 0

        rss_before = rss_bytes()
        started = time.perf_counter()
        progress("landmarks", 0.0)
        load_detectors()
        progress("landmarks", 0.5)
        self._warmup_s = 0.0
        if self.options.warmup:
            state = self.register(default_portrait())
            warm_started = time.perf_counter()
            for _ in self.render(state, speech_like_signal(1.0), seed=0):
                pass
            self._warmup_s = time.perf_counter() - warm_started
        self._load_s = time.perf_counter() - started
        self._memory_bytes = max(0, rss_bytes() - rss_before)
        progress("landmarks", 1.0)

    def default_portrait(self) -> np.ndarray:
        """The built-in portrait, used when a job names no avatar (see `default_portrait`)."""
        return default_portrait()

    def register(self, image: bytes | np.ndarray) -> AvatarState:
        if isinstance(image, bytearray | memoryview):
            image = bytes(image)
        if not isinstance(image, bytes | np.ndarray):
            raise EngineInputError(
                "image", f"must be encoded image bytes or an RGB array, not {type(image).__name__}"
            )
        avatar_id = content_hash(image)
        with self._lock:
            cached = self._cache.get(avatar_id)
            if cached is not None:
                self._cache.move_to_end(avatar_id)
                self.cache_hits += 1
                return cached
        has_matte = False
        if isinstance(image, bytes):
            decoded = _image_from_bytes(image, self.background)
            rgb, has_matte = decoded.rgb, decoded.alpha is not None
        else:
            rgb = _image_from_array(image)
        try:
            with self._detect_lock:
                landmarks = find_landmarks(rgb)
        except NoFaceError as error:
            raise EngineInputError("image", str(error)) from None
        portrait, crop_landmarks = frame_portrait(rgb, landmarks)
        rig = build_rig(portrait, crop_landmarks)
        state = AvatarState(
            avatar_id=avatar_id,
            width=self.frame_width,
            height=self.frame_height,
            payload=EmbeddedAvatarPayload(rig=rig, source_landmarks=landmarks),
            extras={
                "eyes_found": landmarks.eyes_found,
                "mouth_found": landmarks.mouth_found,
                "face_box": tuple(float(v) for v in landmarks.face_box),
                # The picture was transparent and was composited over `background`; the
                # matte itself is not kept (frames are opaque RGB, see the docs).
                "composited": has_matte,
            },
        )
        with self._lock:
            self.cache_misses += 1
            self._cache[avatar_id] = state
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return state

    def cached_avatars(self) -> int:
        """Portraits this engine's cache holds (the worker reports it in heartbeats)."""
        return len(self._cache)

    def open_stream(self, state: AvatarState, seed: int, live: bool = False
                    ) -> EmbeddedAvatarStream:
        payload = state.payload
        if not isinstance(payload, EmbeddedAvatarPayload):
            raise EngineInputError("avatar", "was not registered with the embedded engine")
        return EmbeddedAvatarStream(payload.rig, int(seed), live=bool(live))

    def report(self) -> EngineReport:
        return EngineReport(
            name=self.name,
            kind=self.kind,
            device="cpu",
            memory_bytes=self._memory_bytes,
            warmup_s=self._warmup_s,
            notes="opencv haar cascades + mesh warp; no model download",
        )

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
