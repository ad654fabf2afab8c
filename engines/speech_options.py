"""Options of the speech engines that load a model from disk: Coqui TTS and faster-whisper,
and the option groups the embedded speech engines share with them (text limits, Whisper
decoding).

Torch-free and engine-free: the supervisor imports this module to validate the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from .audio import DEFAULT_MAX_DURATION_S, DEFAULT_MAX_SENTENCE_CHARS, DEFAULT_MAX_TEXT_CHARS
from .options import option

# What CTranslate2 accepts as compute_type (its quantization types, plus "default" for the
# model's own type and "auto" for the fastest the device supports).
CT2_COMPUTE_TYPES = ("default", "auto", "int8", "int8_float32", "int8_float16",
                     "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


@dataclass(frozen=True, kw_only=True)
class TextLimitOptions:
    """Text limits every TTS engine applies to a request."""

    max_text_chars: int = option(
        DEFAULT_MAX_TEXT_CHARS,
        "Longest text accepted, in characters; checked before any other work.", ge=1,
    )
    max_sentence_chars: int = option(
        DEFAULT_MAX_SENTENCE_CHARS,
        "Longer sentences are cut at a clause mark or a space, so the first audio of a "
        "run-on sentence is not held back.", ge=1,
    )


@dataclass(frozen=True, kw_only=True)
class CoquiTTSOptions(TextLimitOptions):
    """A Coqui TTS model from a local directory, and how to speak with it."""

    model_dir: str = option(
        doc="The model directory: a checkpoint, config.json and the side files the model "
        "needs.", nonempty=True, path="dir",
    )
    model_file: str | None = option(
        None, "Checkpoint file name inside model_dir, when more than one is present.",
        nonempty=True, default_doc="searched",
    )
    vocoder_dir: str | None = option(
        None, "Directory of a separate vocoder (checkpoint + config.json), for models that "
        "are not end-to-end.", nonempty=True, default_doc="none", path="dir",
    )
    speaker: str | None = option(
        None, "The default voice; voices() lists the model's speakers (or `default`).",
        nonempty=True, default_doc="first speaker",
    )
    language: str | None = option(
        None, "Language of multi-lingual models.", nonempty=True, default_doc="first language"
    )
    seed: int = option(
        0, "Seed of the sampling noise: sentence i uses seed + i, so the same text gives the "
        "same audio.",
    )


@dataclass(frozen=True, kw_only=True)
class WhisperDecodeOptions:
    """How a faster-whisper engine decodes (shared by the embedded ASR)."""

    compute_type: str | None = option(
        None, "CTranslate2 weight and compute type.", choices=CT2_COMPUTE_TYPES,
        default_doc="`int8` on CPU, `float16` on CUDA",
    )
    cpu_threads: int | None = option(
        None, "CTranslate2 threads on CPU.", ge=1, default_doc="the cores this process may use"
    )
    beam_size: int = option(
        1, "Beam width; 1 is greedy (beam 5 costs about 2x CPU for little gain on clean "
        "speech).", ge=1,
    )
    language: str | None = option(
        None, "ISO language code of the speech.", nonempty=True,
        default_doc="`en` for English-only models, else detected",
    )
    vad: bool = option(
        False, "Skip non-speech with the Silero VAD bundled in faster-whisper; timestamps "
        "stay on the original timeline.",
    )
    word_timestamps: bool = option(True, "Give each word its start and end time.")
    max_duration_s: float = option(
        DEFAULT_MAX_DURATION_S, "Longest audio accepted, in seconds (the daemon's "
        "`daemon.max_media_s` applies too). Any length is transcribed in 30 s pieces, with "
        "progress after each, so only this limit and the job deadline bound it.", gt=0
    )


@dataclass(frozen=True, kw_only=True)
class FasterWhisperOptions(WhisperDecodeOptions):
    """Any local CTranslate2 Whisper model, and how to decode with it."""

    model_dir: str = option(
        doc="CTranslate2 Whisper model directory (model.bin, config.json, tokenizer.json, "
        "vocabulary.*); never fetched from a hub.", nonempty=True, path="dir",
    )
