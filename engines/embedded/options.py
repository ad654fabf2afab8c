"""Options of the embedded engines (avatar, Piper TTS, Whisper ASR), which share the table
`[engines.options.embedded]`: each engine takes the keys it declares.

Torch-free and engine-free (no OpenCV, onnxruntime or piper here): the supervisor imports
this module to validate the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..images import background_option, check_background_option
from ..options import OptionConflict, option
from ..speech_options import TextLimitOptions, WhisperDecodeOptions


@dataclass(frozen=True, kw_only=True)
class EmbeddedAvatarOptions:
    """The embedded avatar engine (portraits animated on the CPU)."""

    cache_size: int = option(
        16, "Registered portraits kept in memory (least recently used goes first).", ge=1
    )
    warmup: bool = option(
        True, "At load, register the default portrait and render 1 s of speech-like audio; "
        "the time goes into report().warmup_s.",
    )
    background: str = background_option()

    def __post_init__(self) -> None:
        check_background_option(self)


@dataclass(frozen=True, kw_only=True)
class PiperTTSOptions(TextLimitOptions):
    """The embedded TTS (Piper, the shipped en_US joe voice unless model_path is set)."""

    model_path: str | None = option(
        None, "Another Piper voice (.onnx) instead of the shipped one.", nonempty=True,
        default_doc="the shipped voice", path="file",
    )
    config_path: str | None = option(
        None, "The voice's .onnx.json.", nonempty=True, default_doc="model_path + `.json`",
        path="file",
    )
    length_scale: float | None = option(
        None, "Above 1 speaks slower, below 1 faster.", gt=0, default_doc="the voice's own (1.0)"
    )
    deterministic: bool = option(
        True, "The same text gives the same samples: both noise terms are 0 (Piper's noise "
        "is unseeded).",
    )
    noise_scale: float | None = option(
        None, "Timbre variation; above 0 only with deterministic = false.", ge=0,
        default_doc="0, or the voice's own (0.667) when not deterministic",
    )
    noise_w_scale: float | None = option(
        None, "Phoneme-duration variation; above 0 only with deterministic = false.", ge=0,
        default_doc="0, or the voice's own (0.8) when not deterministic",
    )
    volume: float = option(1.0, "Output gain.", gt=0)
    voices_by_language: tuple[str, ...] = option(
        (), "More Piper voices, as `language=path/to/voice.onnx` (its .onnx.json beside it): "
        "text in a script the default voice cannot read goes to the voice of a language "
        "written in that script, when the request names no voice. Each is also listed by "
        "voices() under its file name.", nonempty=True,
    )

    def language_voices(self) -> dict[str, str]:
        """voices_by_language as {language: model path}."""
        return dict(entry.split("=", 1) for entry in self.voices_by_language)

    def __post_init__(self) -> None:
        for entry in self.voices_by_language:
            language, _, path = entry.partition("=")
            if not language.strip() or not path.strip() or language != language.strip():
                raise OptionConflict("voices_by_language", f"{entry!r} is not "
                                     "`language=path/to/voice.onnx`")
        if self.deterministic:
            for name in ("noise_scale", "noise_w_scale"):
                if getattr(self, name):
                    raise OptionConflict(name, f"{getattr(self, name)!r} makes Piper output "
                                         "random; set deterministic = false to use it")


@dataclass(frozen=True, kw_only=True)
class EmbeddedWhisperOptions(WhisperDecodeOptions):
    """The embedded ASR: Whisper tiny.en shipped on PyPI; its model cannot be changed (use
    the faster-whisper engine for another model)."""
