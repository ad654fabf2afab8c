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
    ASREngine,
    EngineReport,
    ProgressFn,
    Segment,
    Transcript,
    Word,
    no_progress,
)
from .options import as_options
from .speech_options import FasterWhisperOptions, WhisperDecodeOptions

log = logging.getLogger(__name__)

REQUIRED_MODEL_FILES = ("model.bin", "config.json")


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
        opts = as_options(FasterWhisperOptions, options, "engines.options.faster-whisper")
        self._load(Path(opts.model_dir), opts, device, progress)

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
        self._run(warmup.astype(np.float32))
        self._warmup_s = time.perf_counter() - started
        self._memory_bytes = max(0, rss_bytes() - rss_before)
        progress("ready", 1.0)

    def transcribe(self, pcm: np.ndarray, sample_rate: int) -> Transcript:
        samples, rate = validate_pcm(pcm, sample_rate, max_duration_s=self.max_duration_s)
        if rate != self.sample_rate:
            samples = resample(samples, rate, self.sample_rate)
        return self._run(samples)

    def _run(self, samples: np.ndarray) -> Transcript:
        duration_s = samples.size / self.sample_rate
        segments_iter, info = self._model.transcribe(
            samples,
            language=self.language,
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
        segments: list[Segment] = []
        last_end = 0.0
        for raw in segments_iter:
            words: list[Word] = []
            for raw_word in raw.words or ():
                # Whisper's timestamps come from attention alignment and can step a few
                # ms backwards or past the end; clamp so callers can rely on order/bounds.
                start = min(max(float(raw_word.start), last_end), duration_s)
                end = min(max(float(raw_word.end), start), duration_s)
                words.append(Word(raw_word.word.strip(), start, end, float(raw_word.probability)))
                last_end = end
            seg_start = min(max(float(raw.start), 0.0), duration_s)
            seg_end = min(max(float(raw.end), seg_start), duration_s)
            if words:
                seg_start, seg_end = min(seg_start, words[0].start_s), max(seg_end, words[-1].end_s)
            segments.append(Segment(raw.text.strip(), seg_start, seg_end, tuple(words)))
        return Transcript(
            language=info.language or (self.language or ""),
            duration_s=duration_s,
            segments=tuple(segments),
        )

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
