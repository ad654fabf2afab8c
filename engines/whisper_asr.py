"""faster-whisper ASR (Whisper on CTranslate2) from a local model directory.

The model directory is a CTranslate2 conversion of a Whisper checkpoint: `model.bin`,
`config.json`, `tokenizer.json` and `vocabulary.*`. It is always loaded from disk with
`local_files_only`, so a missing directory fails at once instead of trying a hub.

Options: `FasterWhisperOptions` (engines/speech_options.py; the table is in
docs/engines.md).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from avatard.ipc.procmem import rss_bytes

from .audio import resample, validate_pcm
from .base import (
    MAX_PROGRESS_GAP_S,
    ASREngine,
    AudioProgressFn,
    EngineReport,
    ProgressFn,
    Segment,
    Transcript,
    Word,
    no_audio_progress,
    no_progress,
)
from .options import as_options
from .speech_options import FasterWhisperOptions, WhisperDecodeOptions

log = logging.getLogger(__name__)

REQUIRED_MODEL_FILES = ("model.bin", "config.json")

# Long inputs are transcribed in pieces of at most one Whisper window (30 s: the encoder's
# fixed input, `MAX_PROGRESS_GAP_S`), with a progress call after each, so the stall watchdog
# hears from the worker every few seconds however long the input is. A piece ends at the
# quietest 100 ms of its last 5 s, which is a pause between words (or sentences) in any
# ordinary speech, so no word is cut in two; Whisper itself would cut its windows blindly
# and then re-seek, which the pieces make unnecessary.
PIECE_MAX_S = MAX_PROGRESS_GAP_S
CUT_SEARCH_S = 5.0
CUT_FRAME_S = 0.1


def piece_bounds(samples: np.ndarray, rate: int, max_s: float = PIECE_MAX_S,
                 search_s: float = CUT_SEARCH_S, frame_s: float = CUT_FRAME_S
                 ) -> list[tuple[int, int]]:
    """Where to cut 1-D PCM at `rate` Hz into pieces of at most `max_s` seconds: a list of
    (start, end) sample indices, contiguous, covering every sample. Each cut but the last
    lies at the start of the quietest `frame_s` frame (lowest mean square) within the last
    `search_s` seconds of its piece; an input of at most `max_s` is one piece."""
    total = int(samples.size)
    max_len = max(1, int(max_s * rate))
    frame = max(1, int(frame_s * rate))
    search = min(max_len - frame, int(search_s * rate))
    bounds: list[tuple[int, int]] = []
    start = 0
    while total - start > max_len:
        limit = start + max_len
        if search >= frame:
            region = samples[limit - search:limit].astype(np.float64)
            frames = region[: region.size // frame * frame].reshape(-1, frame)
            quietest = int(np.argmin((frames * frames).mean(axis=1)))
            cut = limit - search + quietest * frame
        else:
            cut = limit
        bounds.append((start, cut))
        start = cut
    bounds.append((start, total))
    return bounds


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' / 'cuda:1' -> ('cuda', 1) as CTranslate2 wants them."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if index and not index.isdigit():
        raise ValueError(f"bad device index in {device!r}")
    return kind, int(index or 0)


class FasterWhisperEngine(ASREngine):
    name: ClassVar[str] = "faster-whisper"

    def __init__(
        self,
        device: str = "cpu",
        options: FasterWhisperOptions | dict[str, Any] | None = None,
        progress: ProgressFn = no_progress,
    ):
        opts = as_options(FasterWhisperOptions, options, self.options_key)
        self._load(Path(opts.model_dir), opts, device, progress)

    @property
    def options_key(self) -> str:
        """The config table of this engine's options (error messages name its keys)."""
        return f"engines.options.{self.name}"

    def _load(self, model_dir: Path, opts: WhisperDecodeOptions, device: str,
              progress: ProgressFn) -> None:
        """Load the CTranslate2 model in `model_dir` on `device` and warm it up."""
        self.model_dir = model_dir
        progress("check model", 0.0)
        missing = [f for f in REQUIRED_MODEL_FILES if not (self.model_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.model_dir} is not a CTranslate2 Whisper model: missing {missing}"
            )

        from faster_whisper import WhisperModel

        kind, index = parse_device(device)
        self.device = device
        # Unset options: the device's and the host's own values.
        self.compute_type = opts.compute_type or ("float16" if kind == "cuda" else "int8")
        cpu_threads = opts.cpu_threads or len(os.sched_getaffinity(0))
        self.beam_size = opts.beam_size
        self.vad = opts.vad
        self.word_timestamps = opts.word_timestamps
        self.max_duration_s = opts.max_duration_s

        progress("load model", 0.2)
        rss_before = rss_bytes()
        self._model = WhisperModel(
            str(self.model_dir),
            device=kind,
            device_index=index,
            compute_type=self.compute_type,
            cpu_threads=cpu_threads,
            local_files_only=True,
        )
        self.language: str | None = opts.language or (
            None if self._model.model.is_multilingual else "en"
        )

        progress("warm up", 0.8)
        started = time.perf_counter()
        # Half a second of quiet noise runs the encoder and one decoder step, so the first
        # real request does not pay for lazy initialisation.
        warmup = np.random.default_rng(0).standard_normal(self.sample_rate // 2) * 1e-3
        self._decode(warmup.astype(np.float32), self.language)
        self._warmup_s = time.perf_counter() - started
        self._memory_bytes = max(0, rss_bytes() - rss_before)
        progress("ready", 1.0)

    def transcribe(self, pcm: np.ndarray, sample_rate: int,
                   progress: AudioProgressFn = no_audio_progress) -> Transcript:
        """As `ASREngine.transcribe`: in pieces of at most `PIECE_MAX_S` seconds (cut in
        pauses, see `piece_bounds`), each resampled to 16 kHz on its own and decoded by
        Whisper, with `progress` called after each. Over `max_duration_s` raises
        `EngineInputError("audio")` naming `engines.options.<engine>.max_duration_s`."""
        samples, rate = validate_pcm(pcm, sample_rate, max_duration_s=self.max_duration_s,
                                     limit_key=f"{self.options_key}.max_duration_s")
        duration_s = samples.size / rate
        language = self.language
        segments: list[Segment] = []
        last_end = 0.0
        for start, end in piece_bounds(samples, rate):
            piece = samples[start:end]
            if rate != self.sample_rate:
                piece = resample(piece, rate, self.sample_rate)
            offset_s = start / rate
            raw_segments, piece_language = self._decode(piece, language)
            # A multilingual model detects the language once, on the first piece, as it
            # would on its first window of the whole input.
            language = language or piece_language
            for raw in raw_segments:
                segment, last_end = _placed(raw, offset_s, duration_s, last_end)
                segments.append(segment)
            progress(end / rate)
        return Transcript(language=language or "", duration_s=duration_s,
                          segments=tuple(segments))

    def _decode(self, samples: np.ndarray, language: str | None) -> tuple[list[Any], str]:
        """Whisper's segments of 16 kHz `samples` (its own objects, times on the samples'
        timeline) and the language it used."""
        segments_iter, info = self._model.transcribe(
            samples,
            language=language,
            beam_size=self.beam_size,
            # A single temperature keeps decoding greedy/beam and so reproducible; the
            # default fallback ladder samples at higher temperatures.
            temperature=0.0,
            word_timestamps=self.word_timestamps,
            vad_filter=self.vad,
            # Conditioning on the previous window's text is what lets Whisper fall into
            # repetition loops on long inputs; each window stands alone instead.
            condition_on_previous_text=False,
        )
        return list(segments_iter), info.language or (language or "")

    def report(self) -> EngineReport:
        return EngineReport(
            name=self.name,
            kind=self.kind,
            device=self.device,
            memory_bytes=self._memory_bytes,
            warmup_s=self._warmup_s,
            notes=f"{self.model_dir.name} {self.compute_type}",
        )

    def close(self) -> None:
        self._model = None  # type: ignore[assignment]


def _placed(raw: Any, offset_s: float, duration_s: float, last_end: float
            ) -> tuple[Segment, float]:
    """A Whisper segment of a piece that starts at `offset_s`, on the input's timeline:
    its words in order, none before `last_end` (the previous word's end) or past
    `duration_s`. Returns the segment and the new `last_end`."""
    words: list[Word] = []
    for raw_word in raw.words or ():
        # Whisper's timestamps come from attention alignment and can step a few ms
        # backwards or past the end; clamp so callers can rely on order and bounds.
        start = min(max(offset_s + float(raw_word.start), last_end), duration_s)
        end = min(max(offset_s + float(raw_word.end), start), duration_s)
        words.append(Word(raw_word.word.strip(), start, end, float(raw_word.probability)))
        last_end = end
    seg_start = min(max(offset_s + float(raw.start), 0.0), duration_s)
    seg_end = min(max(offset_s + float(raw.end), seg_start), duration_s)
    if words:
        seg_start, seg_end = min(seg_start, words[0].start_s), max(seg_end, words[-1].end_s)
    return Segment(raw.text.strip(), seg_start, seg_end, tuple(words)), last_end
