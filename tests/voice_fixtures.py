"""A second Piper voice for tests of language routing (no Russian Piper voice is on PyPI)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def russian_voice_model(folder: Path) -> Path:
    """The shipped joe voice linked into `folder` under a ru_RU name, with a config that
    declares ru_RU; returns the .onnx path (its .onnx.json beside it)."""
    from avatard.engines.embedded.tts import shipped_voice_path

    model = shipped_voice_path()
    config = json.loads(model.with_name(model.name + ".json").read_text())
    config["language"] = {"code": "ru_RU", "family": "ru", "region": "RU"}
    config["espeak"] = {"voice": "ru"}
    target = folder / "ru_RU-test-medium.onnx"
    os.symlink(model, target)
    target.with_name(target.name + ".json").write_text(json.dumps(config))
    return target
