"""Engine names -> implementation and options class; engines are imported lazily inside the
worker that loads them.

The supervisor reads this table to validate config without importing any engine module: a
name must exist, and an options table must fit the engine's options class, which lives in a
module that imports no engine runtime (no torch, onnxruntime or OpenCV).

One `[engines.options.<name>]` table serves every engine of that name: `embedded` and
`fake` exist for avatar, TTS and ASR at once. A key is accepted when at least one of those
engines declares it, each engine receives only the keys it declares, and an unknown key is
refused with the option names of all of them, saying which other engine it belongs to
when one declares it (a Ditto option given to the embedded avatar), or a did-you-mean.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .base import STANDALONE, Engine, ProgressFn, WorkerContext, no_progress
from .options import check_options, option_specs, parse_options, unknown_option_error


@dataclass(frozen=True)
class EngineEntry:
    """Where one engine lives: `engine` is "module:Class", imported only in a worker (the
    class takes device, options, progress, and `context` if it sets needs_worker_context);
    `options` is "module:OptionsClass", torch-free, imported by the supervisor too."""

    engine: str
    options: str


# kind -> name -> where the engine and its options class live.
ENGINES: dict[str, dict[str, EngineEntry]] = {
    "avatar": {
        "fake": EngineEntry("avatard.engines.fake:FakeAvatarEngine",
                            "avatard.engines.fake_options:FakeOptions"),
        "embedded": EngineEntry("avatard.engines.embedded.avatar:EmbeddedAvatarEngine",
                                "avatard.engines.embedded.options:EmbeddedAvatarOptions"),
        "ditto": EngineEntry("avatard.engines.ditto.engine:DittoEngine",
                             "avatard.engines.ditto.options:DittoOptions"),
    },
    "tts": {
        "fake": EngineEntry("avatard.engines.fake:FakeTTSEngine",
                            "avatard.engines.fake_options:FakeOptions"),
        "embedded": EngineEntry("avatard.engines.embedded.tts:PiperTTSEngine",
                                "avatard.engines.embedded.options:PiperTTSOptions"),
        "coqui": EngineEntry("avatard.engines.coqui_tts:CoquiTTSEngine",
                             "avatard.engines.speech_options:CoquiTTSOptions"),
    },
    "asr": {
        "fake": EngineEntry("avatard.engines.fake:FakeASREngine",
                            "avatard.engines.fake_options:FakeOptions"),
        "embedded": EngineEntry("avatard.engines.embedded.asr:EmbeddedWhisperEngine",
                                "avatard.engines.embedded.options:EmbeddedWhisperOptions"),
        "faster-whisper": EngineEntry("avatard.engines.whisper_asr:FasterWhisperEngine",
                                      "avatard.engines.speech_options:FasterWhisperOptions"),
    },
}

def engine_names(kind: str) -> list[str]:
    """The engine names registered for `kind` ("avatar", "tts", "asr"), sorted. Raises
    KeyError for an unknown kind."""
    return sorted(_kind_table(kind))


def engine_kinds(name: str) -> list[str]:
    """The kinds that have an engine called `name`, in registry order ([] if none)."""
    return [kind for kind, table in ENGINES.items() if name in table]


def options_key_prefix(name: str) -> str:
    """The dotted config key of engine `name`'s options table: ``engines.options.<name>``."""
    return f"engines.options.{name}"


def engine_options_class(kind: str, name: str) -> type:
    """The options class of engine `name` of `kind` (a frozen dataclass, see
    `avatard.engines.options`). Imports only its torch-free module. Raises KeyError for an
    unknown kind or name."""
    return _import(_entry(kind, name).options)


def parse_engine_options(kind: str, name: str, table: Mapping[str, Any] | None,
                         kinds: Collection[str] | None = None) -> Any:
    """The typed options of engine `name` of `kind`, from the table
    ``[engines.options.<name>]`` shared by the engines of that name of `kinds` (None: of
    every kind that has one). Keys that only those other engines declare are left out;
    a key none of them declares raises EngineOptionError naming the options of each; so
    does a bad value; a missing required option of this engine raises RequiredOptionError
    naming the option, this engine and its config table. Raises KeyError for an unknown
    kind or name."""
    cls = engine_options_class(kind, name)
    sharing = [k for k in engine_kinds(name) if k == kind or kinds is None or k in kinds]
    declared = _check_shared_keys(name, table, sharing)
    own = {spec.name for spec in option_specs(cls)}
    prefix = options_key_prefix(name)
    return parse_options(cls, table, prefix, ignore=frozenset(declared - own),
                         engine=f"{kind} engine {name}",
                         places=lambda option: (f"in the config file under [{prefix}] "
                                                f"({option} = ...)",))


def check_engine_options(name: str, table: Mapping[str, Any] | None,
                         configured_kinds: Collection[str] = ()) -> None:
    """Validate the table ``[engines.options.<name>]`` when the config is loaded.

    `configured_kinds`: the kinds whose configured engine is `name`. Then the table may hold
    only keys those engines declare, each engine's values must be valid and its required
    options present. With none configured (a table kept for another setup), the table is
    checked against the engines of that name of every kind, required options aside.
    Raises EngineOptionError, or KeyError when no kind has an engine called `name`.
    """
    if not engine_kinds(name):
        raise KeyError(f"no engine is called {name!r}")
    if configured_kinds:
        for kind in configured_kinds:
            parse_engine_options(kind, name, table, configured_kinds)
        return
    kinds = engine_kinds(name)
    declared = _check_shared_keys(name, table, kinds)
    for kind in kinds:
        cls = engine_options_class(kind, name)
        own = {spec.name for spec in option_specs(cls)}
        check_options(cls, table, options_key_prefix(name), ignore=frozenset(declared - own))


def load_engine(
    kind: str,
    name: str,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
    progress: ProgressFn = no_progress,
    context: WorkerContext | None = None,
) -> Engine:
    """Import and construct engine `name` of `kind`. Call only in a worker process.

    `device`: "cpu" or "cuda[:N]". `options`: the table ``[engines.options.<name>]`` as a
    plain dict (keys only sibling engines of that name declare are left out; see
    `parse_engine_options`). `progress(stage, fraction)` reports loading. `context` reaches
    the engine only if its class sets `needs_worker_context`. Raises KeyError for an
    unknown kind or name, EngineOptionError for a bad option, and whatever the engine's
    load raises.
    """
    entry = _entry(kind, name)
    table = dict(options or {})
    if context is None:
        context = STANDALONE  # loaded outside the daemon (benches, tests, tools)
    # Options first: a bad table fails before the engine's heavy imports.
    typed = parse_engine_options(kind, name, table)
    cls = _import(entry.engine)
    if getattr(cls, "needs_worker_context", False):
        return cls(device=device, options=typed, progress=progress, context=context)
    return cls(device=device, options=typed, progress=progress)


def _check_shared_keys(name: str, table: Mapping[str, Any] | None,
                       kinds: Collection[str]) -> set[str]:
    """Refuse a key of `table` that no engine `name` of `kinds` declares; return the
    option names they declare together."""
    kinds_of_class: dict[type, list[str]] = {}
    for kind in kinds:
        kinds_of_class.setdefault(engine_options_class(kind, name), []).append(kind)
    every = {spec.name for cls in kinds_of_class for spec in option_specs(cls)}
    if isinstance(table, Mapping):
        for key, value in table.items():
            if key not in every:
                # One options class (the fake engines share theirs): the names alone;
                # several: say whose each list is.
                known = {
                    (f"{'/'.join(class_kinds)} {name}" if len(kinds_of_class) > 1 else ""):
                    [spec.name for spec in option_specs(cls)]
                    for cls, class_kinds in kinds_of_class.items()
                }
                own_names = sorted({option for names in known.values() for option in names})
                hint = (_unconfigured_owner(name, str(key), kinds)
                        or _other_engines_hint(name, str(key), kinds, own_names))
                raise unknown_option_error(options_key_prefix(name), str(key), value, known,
                                           hint)
    return every


def _other_engines_hint(name: str, key: str, kinds: Collection[str],
                        own_names: list[str]) -> str:
    """A hint for `key`, unknown to the engines `name`: the engines of other names that
    declare it ("belongs to the avatar engine ditto: select it with ..."); else a close
    option of `name` ("did you mean ..."); else a close option of another engine; "" when
    none is close. Engines of the kinds in `kinds` come first: a Ditto option given to the
    embedded avatar is far likelier than one meant for an ASR engine."""
    owners = _owners(name, kinds)
    exact = [(kind, other) for kind, other, names in owners if key in names]
    if exact:
        return f"{key} belongs to {_engine_list(exact)}: {_how_to_select(exact)}"
    close = difflib.get_close_matches(key, own_names, n=1)
    if close:
        return f"did you mean {close[0]}?"
    for kind, other, names in owners:
        close = difflib.get_close_matches(key, names, n=1)
        if close:
            return (f"did you mean {close[0]}? it belongs to the {kind} engine {other}: "
                    f"{_how_to_select([(kind, other)])}")
    return ""


def _owners(name: str, kinds: Collection[str]) -> list[tuple[str, str, list[str]]]:
    """(kind, engine, option names) of every engine not called `name`, those of `kinds`
    first, then in registry order."""
    owners = [(kind, other, [spec.name for spec in option_specs(engine_options_class(kind,
                                                                                   other))])
              for kind, table in ENGINES.items() for other in table if other != name]
    return sorted(owners, key=lambda owner: owner[0] not in kinds)  # stable: registry order


def _engine_list(engines: list[tuple[str, str]]) -> str:
    """"the avatar engine ditto", "the tts engine coqui and the asr engine embedded"."""
    named = [f"the {kind} engine {other}" for kind, other in engines]
    return named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"


def _how_to_select(engines: list[tuple[str, str]]) -> str:
    """How an operator chooses one of `engines` and where its options go."""
    if len(engines) == 1:
        kind, other = engines[0]
        return (f'select it with engines.{kind} = "{other}" and set its options under '
                f"[{options_key_prefix(other)}]")
    return ('select one with engines.<kind> = "<engine>" and set its options under '
            "[engines.options.<engine>]")


def _unconfigured_owner(name: str, key: str, kinds: Collection[str]) -> str:
    """A hint when `key` belongs to an engine `name` of a kind not in `kinds` (e.g. a Piper
    option while engines.tts is not "embedded"); "" otherwise."""
    for kind in engine_kinds(name):
        if kind not in kinds and any(
            spec.name == key for spec in option_specs(engine_options_class(kind, name))
        ):
            return f"only the {kind} engine {name} declares it, and engines.{kind} is not {name}"
    return ""


def _kind_table(kind: str) -> dict[str, EngineEntry]:
    table = ENGINES.get(kind)
    if table is None:
        raise KeyError(f"engine kind {kind!r} is not one of {sorted(ENGINES)}")
    return table


def _entry(kind: str, name: str) -> EngineEntry:
    table = _kind_table(kind)
    if name not in table:
        raise KeyError(f"{kind} engine {name!r} is not one of {sorted(table)}")
    return table[name]


def _import(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
