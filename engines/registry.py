"""Engine names -> implementation, imported lazily inside the worker that loads them.

The supervisor reads this table to validate config (a name must exist) without importing
any engine module, so it never pulls torch or a model runtime into its process.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Engine, ProgressFn, no_progress

# kind -> name -> "module:Class". Each class takes (device: str, options: dict, progress).
ENGINES: dict[str, dict[str, str]] = {
    "avatar": {
        "fake": "avatard.engines.fake:FakeAvatarEngine",
        "embedded": "avatard.engines.embedded.avatar:EmbeddedAvatarEngine",
        "ditto": "avatard.engines.ditto.engine:DittoEngine",
    },
    "tts": {
        "fake": "avatard.engines.fake:FakeTTSEngine",
        "embedded": "avatard.engines.embedded.tts:PiperTTSEngine",
        "coqui": "avatard.engines.coqui_tts:CoquiTTSEngine",
    },
    "asr": {
        "fake": "avatard.engines.fake:FakeASREngine",
        "embedded": "avatard.engines.embedded.asr:EmbeddedWhisperEngine",
        "faster-whisper": "avatard.engines.whisper_asr:FasterWhisperEngine",
    },
}


# Keys the worker adds to every engine's options (see `accepts_worker_context`).
WORKER_CONTEXT_KEYS = ("worker_index", "attempt")


def engine_names(kind: str) -> list[str]:
    if kind not in ENGINES:
        raise KeyError(f"engine kind {kind!r} is not one of {sorted(ENGINES)}")
    return sorted(ENGINES[kind])


def load_engine(
    kind: str,
    name: str,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    progress: ProgressFn = no_progress,
) -> Engine:
    """Import and construct engine `name` of `kind`. Call only in a worker process."""
    table = ENGINES.get(kind)
    if table is None:
        raise KeyError(f"engine kind {kind!r} is not one of {sorted(ENGINES)}")
    target = table.get(name)
    if target is None:
        raise KeyError(f"{kind} engine {name!r} is not one of {sorted(table)}")
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    options = dict(options or {})
    if not getattr(cls, "accepts_worker_context", False):
        # worker_index/attempt are for engines that act on them (the fault injector);
        # the others validate their options strictly and would refuse them.
        for key in WORKER_CONTEXT_KEYS:
            options.pop(key, None)
    return cls(device=device, options=options, progress=progress)
