"""Coqui TTS (the maintained `coqui-tts` fork, import name `TTS`) from a local model dir.

A model directory is what Coqui's model zoo unpacks: a checkpoint (`model.pth`,
`model_file.pth`, `best_model.pth` or `checkpoint_*.pth`), `config.json`, and for
multi-speaker or multi-lingual models `speakers.pth`/`speakers.json` and
`language_ids.json`. Models that need a separate vocoder name its directory in the
`vocoder_dir` option. Nothing is downloaded: the hub is never contacted.

The zoo rewrites file paths inside config.json when it downloads a model; a directory
copied from elsewhere still holds the trainer's paths. We point those entries at the files
in the model directory (in a temporary copy of the config) so such a directory loads.

Options: `CoquiTTSOptions` (engines/speech_options.py; the table is in docs/engines.md).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from avatard.ipc.procmem import rss_bytes

from .base import (
    EngineInputError,
    EngineReport,
    ProgressFn,
    TextWarnFn,
    TTSEngine,
    no_progress,
    no_text_warning,
)
from .options import as_options
from .speech_options import CoquiTTSOptions
from .speech_text import SpeechText, route_voice, speak_sentences

log = logging.getLogger(__name__)

CHECKPOINT_NAMES = ("model.pth", "model_file.pth", "best_model.pth", "model.pt")
# Config entries (in config or config["model_args"]) that name a side file, and the file
# names the zoo uses for them inside a model directory.
SIDE_FILES = {
    "speakers_file": ("speakers.pth", "speakers.json"),
    "language_ids_file": ("language_ids.json",),
    "d_vector_file": ("speakers.pth", "speakers.json"),
    "speaker_encoder_model_path": ("model_se.pth", "model_se.pth.tar"),
    "speaker_encoder_config_path": ("config_se.json",),
}


def find_checkpoint(model_dir: Path, model_file: str | None = None) -> Path:
    """The checkpoint file inside a Coqui model directory."""
    if model_file:
        path = model_dir / model_file
        if not path.is_file():
            raise FileNotFoundError(f"model_file {path} does not exist")
        return path
    for name in CHECKPOINT_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    numbered = sorted(model_dir.glob("checkpoint_*.pth"), key=lambda p: p.stat().st_mtime)
    if numbered:
        return numbered[-1]
    raise FileNotFoundError(
        f"no checkpoint in {model_dir}: expected one of {CHECKPOINT_NAMES} or checkpoint_*.pth"
    )


def localise_config(config: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """Point side-file entries that do not exist at the matching files in `model_dir`."""
    fixed = json.loads(json.dumps(config))
    sections = [fixed] + (
        [fixed["model_args"]] if isinstance(fixed.get("model_args"), dict) else []
    )
    for section in sections:
        for key, names in SIDE_FILES.items():
            value = section.get(key)
            if not value or not isinstance(value, str) or Path(value).is_file():
                continue
            local = next((model_dir / n for n in names if (model_dir / n).is_file()), None)
            if local is None:
                local = model_dir / Path(value).name
            if local.is_file():
                section[key] = str(local)
            else:
                raise FileNotFoundError(
                    f"config.json names {key}={value!r}, not found in {model_dir}"
                )
    return fixed


class CoquiTTSEngine(TTSEngine):
    name: ClassVar[str] = "coqui"

    def __init__(
        self,
        device: str = "cpu",
        options: CoquiTTSOptions | dict[str, Any] | None = None,
        progress: ProgressFn = no_progress,
    ):
        opts = as_options(CoquiTTSOptions, options, "engines.options.coqui")
        model_dir = Path(opts.model_dir)
        progress("check model", 0.0)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json")
        checkpoint = find_checkpoint(model_dir, opts.model_file)
        vocoder_checkpoint = vocoder_config = None
        if opts.vocoder_dir:
            vocoder_dir = Path(opts.vocoder_dir)
            vocoder_checkpoint = find_checkpoint(vocoder_dir)
            vocoder_config = vocoder_dir / "config.json"
            if not vocoder_config.is_file():
                raise FileNotFoundError(f"{vocoder_dir} has no config.json")

        progress("import coqui-tts", 0.1)
        import torch
        from TTS.utils.synthesizer import Synthesizer

        self._torch = torch
        use_cuda = device.startswith("cuda")
        if use_cuda:
            _, _, index = device.partition(":")
            torch.cuda.set_device(int(index or 0))
        self.device = device
        self.model_dir = model_dir

        progress("load model", 0.3)
        rss_before = rss_bytes()
        config = localise_config(json.loads(config_path.read_text()), model_dir)
        with tempfile.TemporaryDirectory(prefix="avatard-coqui-") as scratch:
            local_config = Path(scratch) / "config.json"
            local_config.write_text(json.dumps(config))
            self._synth = Synthesizer(
                tts_checkpoint=checkpoint,
                tts_config_path=local_config,
                vocoder_checkpoint=vocoder_checkpoint,
                vocoder_config=vocoder_config,
                use_cuda=use_cuda,
            )
        model = self._synth.tts_model
        self.sample_rate = int(self._synth.output_sample_rate)

        progress("speakers and languages", 0.7)
        speaker_manager = getattr(model, "speaker_manager", None)
        speakers = list(getattr(speaker_manager, "speaker_names", None) or [])
        language_manager = getattr(model, "language_manager", None)
        languages = list(getattr(language_manager, "language_names", None) or [])
        self._speakers = speakers
        self._voices = speakers or ["default"]
        default_voice = opts.speaker or self._voices[0]
        if default_voice not in self._voices:
            raise ValueError(f"speaker {default_voice!r} is not one of {self._voices}")
        self._voices.remove(default_voice)
        self._voices.insert(0, default_voice)
        self.languages = languages
        self.language = opts.language or (languages[0] if languages else None)
        if languages and self.language not in languages:
            raise ValueError(f"language {self.language!r} is not one of {languages}")
        # What the text check compares with: a multi-lingual model's languages (a request
        # goes to the one that can read its script), else the phonemizer language that a
        # single-language model's config declares; none declared: the text is not checked.
        declared = config.get("phoneme_language")
        self._text_languages = ((self.language,) if languages
                                else (str(declared),) if declared else ())

        self.seed = opts.seed
        self.max_text_chars = opts.max_text_chars
        self.max_sentence_chars = opts.max_sentence_chars

        progress("warm up", 0.8)
        started = time.perf_counter()
        self.synthesize("Hello.")
        self._warmup_s = time.perf_counter() - started
        self._memory_bytes = self._measure_memory(rss_before)
        progress("ready", 1.0)

    def _measure_memory(self, rss_before: int) -> int:
        if self.device.startswith("cuda"):
            return int(self._torch.cuda.memory_allocated())
        return max(0, rss_bytes() - rss_before)

    def voices(self) -> list[str]:
        return list(self._voices)

    def voice_languages(self, voice: str) -> tuple[str, ...]:
        """Every speaker speaks the model's languages (the configured one first: text goes
        to the first that reads it), else the phonemizer language its config declares;
        raises KeyError for a name not in `voices()`."""
        if voice not in self._voices:
            raise KeyError(voice)
        if self.languages:
            return (str(self.language),
                    *(name for name in self.languages if name != self.language))
        return tuple(self._text_languages)

    def stream(self, text: str, voice: str | None = None,
               warn: TextWarnFn = no_text_warning) -> Iterator[np.ndarray]:
        speech = SpeechText.parse(text, self.max_text_chars)
        if voice is None:
            voice = self._voices[0]
        if not isinstance(voice, str) or voice not in self._voices:
            raise EngineInputError("voice", f"unknown voice {voice!r}; one of {self._voices}")
        speaker = voice if self._speakers else None
        language = self.language
        if self.languages:
            # A multi-lingual model speaks the text in the first of its languages (the
            # configured one first) whose script it is written in.
            language = route_voice(speech.text, None, str(self.language),
                                   {name: (name,) for name in self.languages},
                                   {name: name for name in self.languages})
        languages = (language,) if self.languages else self._text_languages
        sentences = speech.sentences(voice, languages, self.max_sentence_chars, warn=warn)
        counter = iter(range(len(sentences)))
        return speak_sentences(
            sentences, lambda s: self._synthesize(s, next(counter), speaker, language),
            self.sample_rate)

    def _synthesize(self, sentence: str, index: int, speaker: str | None,
                    language: str | None) -> np.ndarray:
        torch = self._torch
        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        # VITS-family models sample noise; seeding per sentence makes the output a
        # function of (text, voice, seed). fork_rng restores the global generator so other
        # engines in this worker see no change.
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(self.seed + index)
            wav = self._synth.tts(
                sentence,
                speaker_name=speaker,
                language_name=language,
                split_sentences=False,
            )
        return np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0)

    def report(self) -> EngineReport:
        return EngineReport(
            name=self.name,
            kind=self.kind,
            device=self.device,
            memory_bytes=self._memory_bytes,
            warmup_s=self._warmup_s,
            notes=f"{self.model_dir.name}",
        )

    def close(self) -> None:
        self._synth = None  # type: ignore[assignment]
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
